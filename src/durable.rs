//! [`Durable`]: the dagx task wrapper, and `execute`, the one path every output takes.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use dagx::Task;
use futures::future::BoxFuture;
use futures::future::Either;
use futures::FutureExt;
use tracing::instrument::WithSubscriber;

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
    ///
    /// Every task's future is this one, so it is built from combinators and `async` blocks
    /// that hold each piece of state once (an `async fn` holds a second copy of its
    /// arguments).
    fn execute(self, inputs: Inputs<Tk::Input>) -> impl Future<Output = Outcome<Tk::Output>> {
        let Durable {
            id,
            inner,
            run,
            pending,
            retry,
            ..
        } = self;
        let dispatch = run.dispatch().cloned();
        let body = attempts::<Tk, K>(id, run, Work::new(inner, inputs, retry), pending);
        // Spans must be dropped while `dispatch` is the default: closing the last task span
        // makes the registry close the run span through the *current* default. Every span
        // is made and dropped inside `body`, so inside the scope.
        match dispatch {
            Some(dispatch) => Either::Left(body.with_subscriber(dispatch)),
            None => Either::Right(body),
        }
    }
}

/// Attempts task `id` until an attempt is final, each in its own span; waits out the
/// policy's backoff between attempts (outside any attempt's span).
///
/// The future of every task holds this state, so what lives across its awaits is kept
/// small: waits that are rare (a backoff, the run's close) are boxed.
// Not an `async fn`: that would hold its arguments twice (see `execute`).
#[allow(clippy::manual_async_fn)]
fn attempts<Tk, K>(
    id: Arc<str>,
    run: Arc<RunState>,
    mut work: Work<Tk>,
    pending: Option<Pending>,
) -> impl Future<Output = Outcome<Tk::Output>>
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    // An `async` block, not an `async fn`: the latter keeps a second copy of its arguments.
    async move {
        let mut pending = Some(pending);
        let mut number = 1;
        loop {
            let span = run.task_span(&id, number);
            let Ended { step, close } = InSpan {
                span: &span,
                inner: attempt::<Tk, K>(&run, &id, number, pending.take(), &mut work, &span),
            }
            .await;
            let done = match step {
                Step::Final(outcome) => Ok(outcome),
                Step::Panicked(payload) => Err(payload),
                Step::Again(wait) => {
                    drop(span);
                    if !wait.is_zero() {
                        Box::pin(tokio::time::sleep(wait)).await;
                    }
                    number += 1;
                    continue;
                }
            };
            // The task's last attempt: close the run if it was the run's last task.
            if let Some(close) = close {
                InSpan {
                    span: &span,
                    inner: close,
                }
                .await;
            }
            drop(span);
            match done {
                Ok(outcome) => return outcome,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        }
    }
}

/// One attempt at task `id`, in its span: the cache check (first attempt only), the run,
/// then either the task's end (persist, count, report) or the decision to try again.
#[allow(clippy::manual_async_fn)]
fn attempt<'a, 'r: 'a, Tk, K>(
    run: &'r RunState,
    id: &'a Arc<str>,
    number: u32,
    pending: Option<Option<Pending>>,
    work: &'a mut Work<Tk>,
    span: &'a tracing::Span,
) -> impl Future<Output = Ended<'r, Tk::Output>> + 'a
where
    Tk: Task,
    Tk::Output: 'static,
    K: OutputKind<Tk::Output>,
{
    async move {
        let attempt = run.start_attempt(number);

        if let Some(pending) = pending {
            let stored = run.read_stored(id, pending).await;
            if let Some((stored, size)) = Context::usable_output::<K::Stored>(id, stored) {
                run.end_attempt(id, &attempt, AttemptOutcome::Cached, Some(size));
                let done = Step::Final(Outcome::Done(K::from_stored(stored)));
                return end(run, id, span, Ending::Cached, done);
            }
        }

        run.mark_running(id, &attempt);
        let (outcome, if_last) = match work.run(id).await {
            Ran::Output(value) => 'failed: {
                // The result of `stored` is gone before the await: only the write's own
                // future is held across it.
                let persisting = match K::stored(&value).map(|s| run.persist(id, s, &attempt)) {
                    Ok(persisting) => persisting,
                    Err(error) => {
                        tracing::warn!(key = &**id, attempt = number, %error, "task returned an error");
                        break 'failed (failed(&error), Step::Final(Outcome::Done(value)));
                    }
                };
                let result = persisting.await;
                return persisted(run, id, span, &attempt, result, value);
            }
            Ran::NoInput(message) => {
                tracing::error!(key = &**id, %message, "task did not run: a dependency failed");
                let error = DuraflowError::DependencyFailed {
                    key: id.to_string(),
                    message,
                };
                run.end_attempt(id, &attempt, failed(&error.to_string()), None);
                return end(
                    run,
                    id,
                    span,
                    Ending::Failed,
                    Step::Final(Outcome::Failed(Box::new(error))),
                );
            }
            Ran::Panicked(panic) => {
                let message = format!("panicked: {}", panic_message(&*panic));
                tracing::error!(key = &**id, attempt = number, panic = %panic_message(&*panic), "task panicked; nothing persisted");
                (failed(&message), Step::Panicked(panic))
            }
            Ran::TimedOut(timeout) => {
                tracing::error!(key = &**id, attempt = number, ?timeout, "task timed out");
                let error = DuraflowError::TimedOut {
                    key: id.to_string(),
                    timeout,
                    attempts: number,
                };
                (
                    failed(&format!("timed out after {timeout:?}")),
                    Step::Final(Outcome::Failed(Box::new(error))),
                )
            }
        };
        run.end_attempt(id, &attempt, outcome, None);
        if number >= work.max_attempts() {
            return end(run, id, span, Ending::Failed, if_last);
        }
        span.record("outcome", Ending::Failed.as_str());
        Ended {
            step: Step::Again(work.backoff_before(number + 1)),
            close: None,
        }
    }
}

/// Ends the task after the write of `value`'s stored part (with the attempt's success)
/// gave `result`.
fn persisted<'r, O>(
    run: &'r RunState,
    id: &Arc<str>,
    span: &tracing::Span,
    attempt: &Attempt,
    result: Result<(), DuraflowError>,
    value: O,
) -> Ended<'r, O> {
    match result.map_err(|e| e.into_persist(id)) {
        Ok(()) => {
            // Only a store that writes somewhere has something to report (the flush, for
            // sled and files); in memory this event would be per-task cost for nothing.
            if run.ctx.db.may_block() {
                tracing::trace!("output persisted");
            }
            end(
                run,
                id,
                span,
                Ending::Executed,
                Step::Final(Outcome::Done(value)),
            )
        }
        Err(error) => {
            tracing::error!(key = &**id, %error, "task output not persisted");
            run.end_attempt(id, attempt, failed(&error.to_string()), None);
            let step = Step::Final(Outcome::NotPersisted(value, Box::new(error)));
            end(run, id, span, Ending::Failed, step)
        }
    }
}

/// Ends task `id` as `ending` (recorded on its span, counted and reported by the run) with
/// `step`; the run's close comes along when this task was the run's last.
fn end<'r, O>(
    run: &'r RunState,
    id: &str,
    span: &tracing::Span,
    ending: Ending,
    step: Step<O>,
) -> Ended<'r, O> {
    span.record("outcome", ending.as_str());
    Ended {
        step,
        close: run.finish(id, ending),
    }
}

/// How an attempt ended: what comes next, and the run's close when the task was its last.
struct Ended<'r, O> {
    step: Step<O>,
    close: Option<BoxFuture<'r, ()>>,
}

pin_project_lite::pin_project! {
    /// `inner`, entered in `span` whenever it is polled: tracing's `Instrumented` without
    /// owning the span, so an attempt costs no clone of it (each clone and drop of a real
    /// span is a round trip through the subscriber).
    struct InSpan<'s, F> {
        span: &'s tracing::Span,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for InSpan<'_, F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        this.inner.poll(cx)
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
/// A combinator, not an `async fn`, so the attempt's future is held once, not twice.
fn caught<O>(attempt: impl Future<Output = Result<O, String>>) -> impl Future<Output = Ran<O>> {
    AssertUnwindSafe(attempt)
        .catch_unwind()
        .map(|caught| match caught {
            Ok(Ok(value)) => Ran::Output(value),
            Ok(Err(message)) => Ran::NoInput(message),
            Err(panic) => Ran::Panicked(panic),
        })
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

/// Where the inner task's input comes from.
enum Inputs<I> {
    /// Handed over by the caller ([`Task::run`], [`Durable::run_result`]).
    Given(I),
    /// dagx's dependency channels, extracted by the inner task.
    Channels(Vec<Box<dyn Any + Send>>),
}

/// How a task ended, for its caller. Errors are boxed: every task's future holds one of
/// these, and the common outcome (`Done`) should not pay for the rare one's size.
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

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::MemoryStore;

    /// The smallest task: no input, a `u64` out.
    struct Trivial;

    impl Task for Trivial {
        type Input = ();
        type Output = u64;
        async fn run(self, _input: ()) -> u64 {
            1
        }
        async fn extract_and_run(
            self,
            _receivers: Vec<Box<dyn Any + Send>>,
        ) -> Result<u64, String> {
            Ok(1)
        }
    }

    /// Every task's future is moved into a heap block by dagx and stays there until the task
    /// ends, so its size is paid per task in allocator work and in memory (100k suspended
    /// tasks). It was 1,312 bytes, which glibc serves outside its per-thread cache; the
    /// bound keeps it within, with room for a real task's own future.
    #[test]
    fn a_trivial_tasks_future_stays_small() {
        let ctx = Arc::new(Context::new(MemoryStore::new()));
        let run = Arc::new(RunState::new(ctx, None));
        let durable: Durable<Trivial> = Durable::in_run("a".into(), Trivial, run, None, None);
        let future = Task::extract_and_run(durable, Vec::new());
        let size = std::mem::size_of_val(&future);
        assert!(size <= 512, "a trivial task's future is {size} bytes");
    }
}
