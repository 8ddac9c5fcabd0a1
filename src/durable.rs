//! [`Durable`]: the dagx task wrapper, and [`run_task`], the one path every output takes.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use dagx::Task;
use futures::future::Either;
use futures::FutureExt;
use tracing::instrument::WithSubscriber;
use tracing::Instrument;

use crate::output::{OutputKind, Plain};
use crate::retry::{Inputs, Ran, Retry, Work};
use crate::run::{Check, Ending, ProgressFn, RunState};
use crate::slot::{Key, Slot};
use crate::{validate_key, AttemptOutcome, Context, DuraflowError, Lease};

/// A dagx [`Task`] that persists its inner task's output under `id` and, when an output is
/// already stored, returns it without running the inner task.
///
/// Usually made by [`DurableDag::add`](crate::DurableDag::add) (`K` = [`Plain`]: every output
/// is stored) or [`DurableDag::add_fallible`](crate::DurableDag::add_fallible) (`K` =
/// [`Fallible`](crate::Fallible): only `Ok` outputs are stored). Every entry point — dagx's
/// `extract_and_run`, [`Task::run`] and [`Durable::run_result`] — takes the same path: look
/// the id up in the store; on a hit return the stored value; otherwise run the inner task
/// (again, under a [`RetryPolicy`](crate::RetryPolicy), while it fails and attempts are
/// left), persist its output, and only then count it and call the progress callback.
///
/// A task that panics on its last attempt persists nothing and the panic continues to dagx
/// unchanged.
pub struct Durable<Tk: Task, K = Plain> {
    /// Its id, and what keyed tasks need to know of it.
    slot: Arc<Slot>,
    inner: Tk,
    run: Arc<RunState>,
    /// How to attempt the task again, for tasks added with a retry policy.
    retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
    kind: PhantomData<fn() -> K>,
}

impl<Tk: Task, K> std::fmt::Debug for Durable<Tk, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("id", &self.slot.id)
            .field("task", &std::any::type_name::<Tk>())
            .field("retries", &self.retry.is_some())
            .finish_non_exhaustive()
    }
}

impl<Tk: Task> Durable<Tk> {
    /// Wraps `inner` so its output is persisted in `ctx` under `id`. The task forms a run of
    /// its own: `progress`, if given, is called with `(id, 1)` when it completes.
    pub fn new(
        id: impl Into<String>,
        ctx: Arc<Context>,
        inner: Tk,
        progress: Option<ProgressFn>,
    ) -> Self {
        let id: String = id.into();
        let run = Arc::new(RunState::new(ctx, progress));
        // The run's one task. An id no store takes fails when the task runs, with `InvalidKey`.
        let _ = run.claim(&id);
        Self::in_run(Arc::new(Slot::new(id.into(), None, None)), inner, run, None)
    }
}

impl<Tk: Task, K> Durable<Tk, K> {
    pub(crate) fn in_run(
        slot: Arc<Slot>,
        inner: Tk,
        run: Arc<RunState>,
        retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
    ) -> Self {
        Durable {
            slot,
            inner,
            run,
            retry,
            kind: PhantomData,
        }
    }
}

impl<Tk, K> Durable<Tk, K>
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    /// Runs the task like [`Task::run`], but reports a failed persist instead of only
    /// logging it.
    ///
    /// # Errors
    /// [`DuraflowError::Persist`] naming the key when the output could not be stored (the
    /// output is then lost to the caller; the store keeps its previous value);
    /// [`DuraflowError::InvalidKey`] for an id no store accepts;
    /// [`DuraflowError::TimedOut`] when every attempt timed out.
    pub async fn run_result(self, input: Tk::Input) -> Result<Tk::Output, DuraflowError> {
        self.execute(Inputs::Given(input)).await.into_result()
    }

    /// [`run_task`], polled with the run's subscriber as the default: spans must be made and
    /// dropped inside that scope (closing the last task span makes the registry close the
    /// run span through the *current* default).
    fn execute(self, inputs: Inputs<Tk::Input>) -> impl Future<Output = Outcome<Tk::Output>> {
        let Durable {
            slot,
            inner,
            run,
            retry,
            ..
        } = self;
        let dispatch = run.spans.dispatch.clone();
        let body = run_task::<Tk, K>(slot, run, Work::new(inner, inputs, retry));
        match dispatch {
            Some(dispatch) => Either::Left(body.with_subscriber(dispatch)),
            None => Either::Right(body),
        }
    }
}

/// The one path every output takes: cache check → run (and retry) → persist → report. Each
/// attempt runs in its own `duraflow.task` span; the backoff between attempts is outside any.
async fn run_task<Tk, K>(
    slot: Arc<Slot>,
    run: Arc<RunState>,
    mut work: Work<Tk>,
) -> Outcome<Tk::Output>
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    let id: &str = &slot.id;
    if let Err(error) = validate_key(id) {
        run.finish(id, Ending::Failed).await;
        return Outcome::Failed(Box::new(error));
    }
    let task_type = slot.keyed.as_ref().map_or("", |spec| spec.task_type);
    let mut number = 1;
    // A keyed task's key (boxed: every task's future carries only a pointer), and why it
    // runs: found on the first attempt.
    let mut key: Option<Box<Key>> = None;
    let mut reason: Option<String> = None;
    // The key's lease, while this process holds it: given up when the task ends without a
    // commit that was answered (written or fenced), or its future is dropped.
    let mut leased: Option<Leased<'_>> = None;
    loop {
        let span = run.spans.task(id, number);
        let mut attempt = run.start_attempt(number);
        let step = async {
            // 1. The cache check, on the first attempt: a usable stored output is the output
            // (for a keyed task, one made from the same things).
            if number == 1 {
                // The lease whose stored output this task was last answered with.
                let mut seen = None;
                let (check, why) = loop {
                    let (check, why) = run.check::<Tk, K::Stored>(&slot).await;
                    if !matches!(check, Check::Run(_)) {
                        break (check, why);
                    }
                    // Where processes share the store, one of them runs the task: this one
                    // once it holds the key's lease, or none when another stored the output
                    // meanwhile (found by checking again).
                    match run.lease(id, seen).await {
                        Ok(Lease::Held) => {
                            leased = Some(Leased(&run, id));
                            break (check, why);
                        }
                        Ok(Lease::Stored { done }) => seen = Some(done),
                        Err(error) => break (Check::Fail(error), why),
                    }
                };
                reason = why;
                attempt.reason = reason.clone();
                match check {
                    Check::Cached(loaded) => {
                        run.record(id, &attempt, AttemptOutcome::Cached, Some(loaded.size));
                        let outcome = Outcome::Done(K::from_stored(loaded.value));
                        return Step::Final(outcome, Ending::Cached);
                    }
                    Check::Run(keyed) => key = keyed.map(Box::new),
                    // Parameters that cannot be serialised, or an unreadable output in a
                    // store that has stopped (nothing can be stored): the task does not run.
                    Check::Fail(error) => {
                        tracing::error!(key = &*id, %error, "task not run");
                        run.record(id, &attempt, failed(error.to_string()), None);
                        return Step::Final(Outcome::Failed(Box::new(error)), Ending::Failed);
                    }
                }
            } else {
                attempt.reason = reason.clone();
            }
            // 2. The run.
            run.record(id, &attempt, AttemptOutcome::Running, None);
            let ran = work.run(id).await;
            let (error, if_last) = match ran {
                // A fallible task's `Err`: handed to dependents once attempts run out.
                Ran::Output(output) => match K::stored(&output).err() {
                    Some(message) => (message, Step::Final(Outcome::Done(output), Ending::Failed)),
                    // 3. The persist; with the attempt's success, where attempts are recorded.
                    None => {
                        let version = slot.code_version(run.code_version());
                        let keyed = key.as_deref().map(|key| (key, task_type, version));
                        let persisting = run.persist::<_, K>(id, output, keyed, &attempt);
                        let (output, persisted) = persisting.await;
                        // An answered commit (written, or fenced) ended the lease: nothing
                        // is left to give up, and the key may be leased again meanwhile.
                        if matches!(&persisted, Ok(()) | Err(DuraflowError::Fenced { .. })) {
                            if let Some(lease) = leased.take() {
                                lease.ended();
                            }
                        }
                        return match persisted.map_err(|e| e.into_persist(id)) {
                            Ok(()) => {
                                if let Ok(value) = K::stored(&output) {
                                    slot.note(value);
                                }
                                Step::Final(Outcome::Done(output), Ending::Executed)
                            }
                            Err(error) => {
                                tracing::error!(key = &*id, %error, "task output not persisted");
                                run.record(id, &attempt, failed(error.to_string()), None);
                                let outcome = Outcome::NotPersisted(output, Box::new(error));
                                Step::Final(outcome, Ending::Failed)
                            }
                        };
                    }
                },
                Ran::NoInput(message) => {
                    tracing::error!(key = &*id, %message, "task did not run: a dependency failed");
                    let error = DuraflowError::DependencyFailed {
                        key: id.to_string(),
                        message,
                    };
                    run.record(id, &attempt, failed(error.to_string()), None);
                    return Step::Final(Outcome::Failed(Box::new(error)), Ending::Failed);
                }
                Ran::Panicked(panic) => {
                    let message = panic_message(&*panic);
                    tracing::error!(key = &*id, attempt = number, panic = %message, "task panicked; nothing persisted");
                    (format!("panicked: {message}"), Step::Panicked(panic))
                }
                Ran::TimedOut(timeout) => {
                    tracing::error!(key = &*id, attempt = number, ?timeout, "task timed out");
                    let error = DuraflowError::TimedOut {
                        key: id.to_string(),
                        timeout,
                        attempts: number,
                    };
                    let outcome = Outcome::Failed(Box::new(error));
                    (format!("timed out after {timeout:?}"), Step::Final(outcome, Ending::Failed))
                }
            };
            run.record(id, &attempt, failed(error), None);
            if number < work.max_attempts() {
                return Step::Again;
            }
            if_last
        }
        .instrument(span.clone())
        .await;
        // 4. The report: the outcome on the span, then the run's counts and progress.
        let (ending, done) = match step {
            Step::Again => {
                span.record("outcome", Ending::Failed.as_str());
                drop(span);
                let wait = work.backoff_before(number + 1);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                number += 1;
                continue;
            }
            Step::Final(outcome, ending) => (ending, Ok(outcome)),
            Step::Panicked(panic) => (Ending::Failed, Err(panic)),
        };
        span.record("outcome", ending.as_str());
        run.finish(id, ending).instrument(span).await;
        match done {
            Ok(outcome) => return outcome,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// This process's lease on a task's key: given up when dropped, unless a commit ended it.
struct Leased<'a>(&'a RunState, &'a str);

impl Leased<'_> {
    /// A commit ended the lease: nothing to give up.
    fn ended(self) {
        std::mem::forget(self);
    }
}

impl Drop for Leased<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// What an attempt leads to.
enum Step<O> {
    /// The task is over, with this outcome.
    Final(Outcome<O>, Ending),
    /// The last attempt panicked: the panic goes on to dagx.
    Panicked(Box<dyn Any + Send>),
    /// Try again after the policy's backoff.
    Again,
}

impl<Tk, K> Task for Durable<Tk, K>
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    type Input = Tk::Input;
    type Output = Tk::Output;

    /// Runs the task through the durable path. A failed persist is logged with
    /// `tracing::error!` and the output is still returned; use [`Durable::run_result`] to
    /// get the error instead.
    ///
    /// # Panics
    /// When every attempt timed out (there is no output to return); `run_result` returns
    /// [`DuraflowError::TimedOut`] instead.
    fn run(self, input: Self::Input) -> impl Future<Output = Self::Output> + Send {
        self.execute(Inputs::Given(input))
            .map(|outcome| match outcome {
                Outcome::Done(value) | Outcome::NotPersisted(value, _) => value,
                Outcome::Failed(error) => panic!("{error}"),
            })
    }

    fn extract_and_run(
        self,
        receivers: Vec<Box<dyn Any + Send>>,
    ) -> impl Future<Output = Result<Self::Output, String>> + Send {
        self.execute(Inputs::Channels(receivers))
            .map(|outcome| outcome.into_result().map_err(|e| e.to_string()))
    }
}

/// How a task ended, for its caller.
enum Outcome<O> {
    /// Cached, executed and persisted, or (fallible tasks) the error of the last attempt.
    Done(O),
    /// Executed, but the output could not be persisted.
    NotPersisted(O, Box<DuraflowError>),
    /// The task has no output: a dependency failed, or every attempt timed out.
    Failed(Box<DuraflowError>),
}

impl<O> Outcome<O> {
    fn into_result(self) -> Result<O, DuraflowError> {
        match self {
            Outcome::Done(value) => Ok(value),
            Outcome::NotPersisted(_, error) | Outcome::Failed(error) => Err(*error),
        }
    }
}

fn failed(error: String) -> AttemptOutcome {
    AttemptOutcome::Failed { error }
}

/// The text of a panic.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}
