//! [`Durable`]: the dagx task wrapper, and `execute`, the one path every output takes.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use dagx::Task;
use futures::future::BoxFuture;
use futures::FutureExt;
use tracing::{instrument::WithSubscriber, Instrument};

use crate::output::{OutputKind, Plain};
use crate::readahead::Pending;
use crate::run::{Attempt, Ending, ProgressFn, RunState};
use crate::{AttemptOutcome, Context, DuraflowError, RetryPolicy};

/// A dagx [`Task`] that persists its inner task's output under `id` and, when an output is
/// already stored, returns it without running the inner task.
///
/// Usually made by [`DurableDag::add`](crate::DurableDag::add) (`K` = [`Plain`]: every output
/// is stored) or [`DurableDag::add_fallible`](crate::DurableDag::add_fallible) (`K` =
/// [`Fallible`](crate::Fallible): only `Ok` outputs are stored). Every entry point — dagx's
/// `extract_and_run`, [`Task::run`] and [`Durable::run_result`] — takes the same path: look
/// the id up in the store; on a hit return the stored value; otherwise run the inner task
/// (again, under a [`RetryPolicy`], while it fails and attempts are left), persist its
/// output, and only then count it and call the progress callback.
///
/// A task that panics on its last attempt persists nothing and the panic continues to dagx
/// unchanged.
pub struct Durable<Tk: Task, K = Plain> {
    id: Arc<str>,
    inner: Tk,
    run: Arc<RunState>,
    /// This task's read in the run's read-ahead, if any.
    pending: Option<Pending>,
    /// How to attempt the task again, for tasks added with a retry policy.
    retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
    kind: PhantomData<fn() -> K>,
}

/// A retry policy with the means to attempt a task afresh: a clone of the task run on a
/// clone of its input, received once from dagx's channels.
pub(crate) struct Retry<I, O> {
    policy: RetryPolicy,
    attempt: AttemptFn<I, O>,
    extract: ExtractFn<I>,
}

/// Runs a fresh clone of the task on a clone of the input.
type AttemptFn<I, O> = Box<dyn Fn(&I) -> BoxFuture<'static, O> + Send>;
/// Receives the input from dagx's channels.
type ExtractFn<I> = fn(Vec<Box<dyn Any + Send>>) -> BoxFuture<'static, Extracted<I>>;

impl<I, O> Retry<I, O>
where
    I: Clone + Send + Sync + 'static,
    O: 'static,
{
    /// Attempts of `task` under `policy`.
    pub(crate) fn of<Tk>(task: Tk, policy: RetryPolicy) -> Box<Self>
    where
        Tk: Task<Input = I, Output = O> + Clone + 'static,
    {
        Box::new(Retry {
            policy,
            attempt: Box::new(move |input: &I| Box::pin(task.clone().run(input.clone()))),
            extract: |receivers| Box::pin(extract_input::<I>(receivers)),
        })
    }
}

impl<Tk: Task, K> std::fmt::Debug for Durable<Tk, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("id", &self.id)
            .field("task", &std::any::type_name::<Tk>())
            .field("retry", &self.retry.as_ref().map(|r| &r.policy))
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
        Self::in_run(
            id.into(),
            inner,
            Arc::new(RunState::new(ctx, progress)),
            None,
            None,
        )
    }
}

impl<Tk: Task, K> Durable<Tk, K> {
    pub(crate) fn in_run(
        id: Arc<str>,
        inner: Tk,
        run: Arc<RunState>,
        pending: Option<Pending>,
        retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
    ) -> Self {
        Durable {
            id,
            inner,
            run,
            pending,
            retry,
            kind: PhantomData,
        }
    }

    /// The key this task's output is stored under.
    pub fn id(&self) -> &str {
        &self.id
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
    /// [`DuraflowError::TimedOut`] when every attempt timed out.
    pub async fn run_result(self, input: Tk::Input) -> Result<Tk::Output, DuraflowError> {
        self.execute(Inputs::Given(input)).await.into_result()
    }

    /// The one path every output takes: cache check → run (and retry) → persist → report.
    /// Each attempt runs in its own `duraflow.task` span.
    async fn execute(self, inputs: Inputs<Tk::Input>) -> Outcome<Tk::Output> {
        let Durable {
            id,
            inner,
            run,
            pending,
            retry,
            ..
        } = self;
        let dispatch = run.dispatch().cloned();
        let body = async move {
            let mut work = Work::new(inner, inputs, retry);
            let mut pending = Some(pending);
            let mut number = 1;
            loop {
                let span = run.task_span(&id, number);
                let step = attempt::<Tk, K>(&run, &id, number, pending.take(), &mut work, &span)
                    .instrument(span.clone())
                    .await;
                match step {
                    Step::Final(outcome) => return outcome,
                    Step::Panicked(payload) => std::panic::resume_unwind(payload),
                    Step::Again(wait) => {
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        number += 1;
                    }
                }
            }
        };
        // Spans must be dropped while `dispatch` is the default: closing the last task span
        // makes the registry close the run span through the *current* default. Every span
        // is made and dropped inside `body`, so inside the scope.
        match dispatch {
            Some(dispatch) => body.with_subscriber(dispatch).await,
            None => body.await,
        }
    }
}

/// One attempt at task `id`, in its span: the cache check (first attempt only), the run,
/// then either the task's end (persist, count, report) or the decision to try again.
async fn attempt<Tk, K>(
    run: &RunState,
    id: &str,
    number: u32,
    pending: Option<Option<Pending>>,
    work: &mut Work<Tk>,
    span: &tracing::Span,
) -> Step<Tk::Output>
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    let finish = |ending: Ending| {
        span.record("outcome", ending.as_str());
        run.finish(id, ending)
    };
    let attempt = run.start_attempt(id, number);

    if let Some(pending) = pending {
        let stored = match run.read_stored(id, pending).now() {
            Ok(stored) => stored,
            Err(later) => later.await,
        };
        if let Some((stored, size)) = Context::usable_output::<K::Stored>(id, stored) {
            run.end_attempt(&attempt, AttemptOutcome::Cached, Some(size));
            closed(finish(Ending::Cached)).await;
            return Step::Final(Outcome::Done(K::from_stored(stored)));
        }
    }

    run.mark_running(&attempt);
    let last = number >= work.max_attempts();
    match work.run(id).await {
        Ran::Output(value) => match K::stored(&value).map(|s| run.persist(id, s, &attempt).now()) {
            Ok(persisting) => {
                let result = match persisting {
                    Ok(result) => result,
                    Err(later) => later.await,
                };
                return persisted(run, id, &attempt, result, value, finish).await;
            }
            Err(error) => {
                tracing::warn!(key = id, attempt = number, %error, "task returned an error");
                run.end_attempt(&attempt, failed(&error), None);
                if last {
                    closed(finish(Ending::Failed)).await;
                    return Step::Final(Outcome::Done(value));
                }
            }
        },
        Ran::NoInput(message) => {
            tracing::error!(key = id, %message, "task did not run: a dependency failed");
            let error = DuraflowError::DependencyFailed {
                key: id.to_owned(),
                message,
            };
            run.end_attempt(&attempt, failed(&error.to_string()), None);
            closed(finish(Ending::Failed)).await;
            return Step::Final(Outcome::Failed(error));
        }
        Ran::Panicked(panic) => {
            let message = format!("panicked: {}", panic_message(&*panic));
            tracing::error!(key = id, attempt = number, panic = %panic_message(&*panic), "task panicked; nothing persisted");
            run.end_attempt(&attempt, failed(&message), None);
            if last {
                closed(finish(Ending::Failed)).await;
                return Step::Panicked(panic);
            }
        }
        Ran::TimedOut(timeout) => {
            tracing::error!(key = id, attempt = number, ?timeout, "task timed out");
            run.end_attempt(
                &attempt,
                failed(&format!("timed out after {timeout:?}")),
                None,
            );
            if last {
                closed(finish(Ending::Failed)).await;
                return Step::Final(Outcome::Failed(DuraflowError::TimedOut {
                    key: id.to_owned(),
                    timeout,
                    attempts: number,
                }));
            }
        }
    }
    span.record("outcome", Ending::Failed.as_str());
    Step::Again(work.backoff_before(number + 1))
}

/// Ends the task after the write of `value`'s stored part (with the attempt's success)
/// gave `result`.
async fn persisted<'a, O, F>(
    run: &'a RunState,
    id: &str,
    attempt: &Attempt,
    result: Result<(), DuraflowError>,
    value: O,
    finish: F,
) -> Step<O>
where
    F: Fn(Ending) -> Option<BoxFuture<'a, ()>>,
{
    match result.map_err(|e| e.into_persist(id)) {
        Ok(()) => {
            tracing::trace!("output persisted");
            closed(finish(Ending::Executed)).await;
            Step::Final(Outcome::Done(value))
        }
        Err(error) => {
            tracing::error!(key = id, %error, "task output not persisted");
            run.end_attempt(attempt, failed(&error.to_string()), None);
            closed(finish(Ending::Failed)).await;
            Step::Final(Outcome::NotPersisted(value, error))
        }
    }
}

/// Awaits the close of the run when `finish` found this task to be its last.
async fn closed(close: Option<BoxFuture<'_, ()>>) {
    if let Some(close) = close {
        close.await;
    }
}

/// What an attempt leads to.
enum Step<O> {
    /// The task is over, with this outcome.
    Final(Outcome<O>),
    /// The last attempt panicked: the panic goes on to dagx.
    Panicked(Box<dyn Any + Send>),
    /// Try again after this wait.
    Again(std::time::Duration),
}

/// What running the task once gave.
enum Ran<O> {
    Output(O),
    /// The input could not be had: a dependency failed.
    NoInput(String),
    Panicked(Box<dyn Any + Send>),
    TimedOut(std::time::Duration),
}

/// The task and its input, as the attempts need them.
enum Work<Tk: Task> {
    /// One attempt: the task and its input are used up by it.
    Once(Option<(Tk, Inputs<Tk::Input>)>),
    /// Any number of attempts, each on a clone of the input, once it is extracted.
    Retry {
        retry: Box<Retry<Tk::Input, Tk::Output>>,
        inner: Option<Tk>,
        inputs: Option<Inputs<Tk::Input>>,
        input: Option<Tk::Input>,
    },
}

impl<Tk: Task> Work<Tk>
where
    Tk::Output: 'static,
{
    fn new(
        inner: Tk,
        inputs: Inputs<Tk::Input>,
        retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
    ) -> Self {
        match retry {
            None => Work::Once(Some((inner, inputs))),
            Some(retry) => Work::Retry {
                retry,
                inner: Some(inner),
                inputs: Some(inputs),
                input: None,
            },
        }
    }

    fn max_attempts(&self) -> u32 {
        match self {
            Work::Once(_) => 1,
            Work::Retry { retry, .. } => retry.policy.max_attempts(),
        }
    }

    fn backoff_before(&self, next: u32) -> std::time::Duration {
        match self {
            Work::Once(_) => std::time::Duration::ZERO,
            Work::Retry { retry, .. } => retry.policy.backoff_before(next),
        }
    }

    /// Runs the next attempt, catching a panic and applying the policy's timeout. A task
    /// without a retry policy runs its own future in place; the retry path is boxed, so the
    /// future of every other task stays small.
    async fn run(&mut self, id: &str) -> Ran<Tk::Output> {
        match self {
            Work::Once(once) => match once.take() {
                Some((inner, Inputs::Given(input))) => caught(inner.run(input).map(Ok)).await,
                Some((inner, Inputs::Channels(receivers))) => {
                    caught(inner.extract_and_run(receivers)).await
                }
                None => Ran::NoInput("the task was already run".to_owned()),
            },
            Work::Retry {
                retry,
                inner,
                inputs,
                input,
            } => Box::pin(retry_attempt(id, retry, inner, inputs, input)).await,
        }
    }
}

/// One attempt of a task with a retry policy: its input is received once, then each attempt
/// runs a fresh clone of the task on a clone of it, cut off after the policy's timeout.
async fn retry_attempt<Tk: Task>(
    id: &str,
    retry: &mut Retry<Tk::Input, Tk::Output>,
    inner: &mut Option<Tk>,
    inputs: &mut Option<Inputs<Tk::Input>>,
    input: &mut Option<Tk::Input>,
) -> Ran<Tk::Output> {
    if input.is_none() {
        match inputs.take() {
            Some(Inputs::Given(given)) => *input = Some(given),
            Some(Inputs::Channels(receivers)) => match (retry.extract)(receivers).await {
                Extracted::Input(Ok(extracted)) => *input = Some(extracted),
                Extracted::Input(Err(message)) => return Ran::NoInput(message),
                Extracted::Unsupported(receivers) => {
                    // dagx hands two or more inputs over in a form only the task itself can
                    // unpack: one attempt, no retry.
                    tracing::warn!(
                        key = id,
                        "a task with several dependencies is attempted once"
                    );
                    let Some(inner) = inner.take() else {
                        return Ran::NoInput("the task was already run".into());
                    };
                    retry.policy = RetryPolicy::attempts(1);
                    return caught(inner.extract_and_run(receivers)).await;
                }
            },
            None => return Ran::NoInput("the task's input is gone".to_owned()),
        }
    }
    let Some(given) = input.as_ref() else {
        return Ran::NoInput("the task's input is gone".to_owned());
    };
    let attempt = (retry.attempt)(given).map(Ok);
    match retry.policy.attempt_timeout() {
        None => caught(attempt).await,
        Some(limit) => match tokio::time::timeout(limit, caught(attempt)).await {
            Ok(ran) => ran,
            Err(_) => Ran::TimedOut(limit),
        },
    }
}

/// Runs one attempt's future, catching its panic.
async fn caught<O>(attempt: impl std::future::Future<Output = Result<O, String>>) -> Ran<O> {
    match AssertUnwindSafe(attempt).catch_unwind().await {
        Ok(Ok(value)) => Ran::Output(value),
        Ok(Err(message)) => Ran::NoInput(message),
        Err(panic) => Ran::Panicked(panic),
    }
}

/// What [`extract_input`] could make of dagx's channels.
pub(crate) enum Extracted<I> {
    Input(Result<I, String>),
    /// Two or more channels: their types are known only to the task's own extraction.
    Unsupported(Vec<Box<dyn Any + Send>>),
}

/// Receives a task's input from dagx's channels the way dagx's `#[task]` does for zero or
/// one dependency (a `oneshot::Receiver<Arc<I>>`), so it can be cloned for every attempt.
pub(crate) async fn extract_input<I: Clone + Send + Sync + 'static>(
    mut receivers: Vec<Box<dyn Any + Send>>,
) -> Extracted<I> {
    match receivers.len() {
        0 => match (Box::new(()) as Box<dyn Any>).downcast::<I>() {
            Ok(unit) => Extracted::Input(Ok(*unit)),
            Err(_) => Extracted::Input(Err("expected dependencies, got none".to_owned())),
        },
        1 => {
            let Some(receiver) = receivers.pop() else {
                return Extracted::Unsupported(receivers);
            };
            match receiver.downcast::<futures::channel::oneshot::Receiver<Arc<I>>>() {
                Ok(rx) => Extracted::Input(
                    rx.await
                        .map(|value| I::clone(&value))
                        .map_err(|_| "the dependency produced no output".to_owned()),
                ),
                Err(receiver) => Extracted::Unsupported(vec![receiver]),
            }
        }
        _ => Extracted::Unsupported(receivers),
    }
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
    async fn run(self, input: Self::Input) -> Self::Output {
        match self.execute(Inputs::Given(input)).await {
            Outcome::Done(value) | Outcome::NotPersisted(value, _) => value,
            Outcome::Failed(error) => panic!("{error}"),
        }
    }

    async fn extract_and_run(
        self,
        receivers: Vec<Box<dyn Any + Send>>,
    ) -> Result<Self::Output, String> {
        // Boxed: dagx moves this future into its own box and tokio's task cell; a
        // pointer-sized future keeps those small (measured: fewer instructions per task).
        Box::pin(self.execute(Inputs::Channels(receivers)))
            .await
            .into_result()
            .map_err(|e| e.to_string())
    }
}

/// Where the inner task's input comes from.
enum Inputs<I> {
    /// Handed over by the caller ([`Task::run`], [`Durable::run_result`]).
    Given(I),
    /// dagx's dependency channels, extracted by the inner task.
    Channels(Vec<Box<dyn Any + Send>>),
}

enum Outcome<O> {
    /// Cached, executed and persisted, or (fallible tasks) the error of the last attempt.
    Done(O),
    /// Executed, but the output could not be persisted.
    NotPersisted(O, DuraflowError),
    /// The task has no output: a dependency failed, or every attempt timed out.
    Failed(DuraflowError),
}

impl<O> Outcome<O> {
    fn into_result(self) -> Result<O, DuraflowError> {
        match self {
            Outcome::Done(value) => Ok(value),
            Outcome::NotPersisted(_, error) | Outcome::Failed(error) => Err(error),
        }
    }
}

fn failed(error: &str) -> AttemptOutcome {
    AttemptOutcome::Failed {
        error: error.to_owned(),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}
