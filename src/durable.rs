//! [`Durable`]: the dagx task wrapper, and `execute`, the one path every output takes.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use dagx::Task;
use futures::FutureExt;
use serde::{de::DeserializeOwned, Serialize};
use tracing::{instrument::WithSubscriber, Instrument};

use crate::readahead::Pending;
use crate::run::{Ending, ProgressFn, RunState};
use crate::{AttemptOutcome, Context, DuraflowError};

/// A dagx [`Task`] that persists its inner task's output under `id` and, when an output is
/// already stored, returns it without running the inner task.
///
/// Usually made by [`DurableDag::add`](crate::DurableDag::add). Every entry point —
/// dagx's `extract_and_run`, [`Task::run`] and [`Durable::run_result`] — takes the same
/// path: look the id up in the store; on a hit return the stored value; otherwise run the
/// inner task, persist its output, and only then count it and call the progress callback.
///
/// A task that panics persists nothing and the panic continues to dagx unchanged.
pub struct Durable<Tk> {
    id: Arc<str>,
    inner: Tk,
    run: Arc<RunState>,
    /// This task's read in the run's read-ahead, if any.
    pending: Option<Pending>,
}

impl<Tk> std::fmt::Debug for Durable<Tk> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("id", &self.id)
            .field("task", &std::any::type_name::<Tk>())
            .finish_non_exhaustive()
    }
}

impl<Tk> Durable<Tk> {
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
        )
    }

    pub(crate) fn in_run(
        id: Arc<str>,
        inner: Tk,
        run: Arc<RunState>,
        pending: Option<Pending>,
    ) -> Self {
        Durable {
            id,
            inner,
            run,
            pending,
        }
    }

    /// The key this task's output is stored under.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl<Tk> Durable<Tk>
where
    Tk: Task,
    Tk::Output: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Runs the task like [`Task::run`], but reports a failed persist instead of only
    /// logging it.
    ///
    /// # Errors
    /// [`DuraflowError::Persist`] naming the key when the output could not be stored (the
    /// output is then lost to the caller; the store keeps its previous value).
    pub async fn run_result(self, input: Tk::Input) -> Result<Tk::Output, DuraflowError> {
        self.execute(Inputs::Given(input)).await.into_result()
    }

    /// The one path every output takes: cache check → run → persist → report.
    async fn execute(self, inputs: Inputs<Tk::Input>) -> Outcome<Tk::Output> {
        let Durable {
            id,
            inner,
            run,
            pending,
        } = self;
        let span = run.task_span(&id, ATTEMPT);
        let outcome_span = span.clone();
        let dispatch = run.dispatch().cloned();
        let body = async move {
            let finish = |ending: Ending| {
                outcome_span.record("outcome", ending.as_str());
                run.finish(&id, ending)
            };
            // Awaits the close of the run when `finish` found this task to be its last.
            async fn closed(close: Option<futures::future::BoxFuture<'_, ()>>) {
                if let Some(close) = close {
                    close.await;
                }
            }
            let attempt = run.start_attempt(&id, ATTEMPT);

            let stored = run.read_stored(&id, pending).await;
            if let Some((value, size)) = Context::usable_output::<Tk::Output>(&id, stored) {
                run.end_attempt(&attempt, AttemptOutcome::Cached, Some(size));
                closed(finish(Ending::Cached)).await;
                return Outcome::Done(value);
            }

            run.mark_running(&attempt);
            let ran = AssertUnwindSafe(async move {
                match inputs {
                    Inputs::Given(input) => Ok(inner.run(input).await),
                    Inputs::Channels(receivers) => inner.extract_and_run(receivers).await,
                }
            })
            .catch_unwind()
            .await;
            let value = match ran {
                Ok(Ok(value)) => value,
                Ok(Err(message)) => {
                    tracing::error!(key = %id, %message, "task did not run: a dependency failed");
                    let error = DuraflowError::DependencyFailed {
                        key: id.to_string(),
                        message,
                    };
                    run.end_attempt(&attempt, failed(&error.to_string()), None);
                    closed(finish(Ending::Failed)).await;
                    return Outcome::Failed(error);
                }
                Err(panic) => {
                    let message = panic_message(&*panic);
                    tracing::error!(key = %id, panic = message, "task panicked; nothing persisted");
                    run.end_attempt(&attempt, failed(&format!("panicked: {message}")), None);
                    closed(finish(Ending::Failed)).await;
                    std::panic::resume_unwind(panic);
                }
            };

            let persisted = run.persist(&id, &value, &attempt).await;
            match persisted.map_err(|e| e.into_persist(&id)) {
                Ok(()) => {
                    tracing::trace!("output persisted");
                    closed(finish(Ending::Executed)).await;
                    Outcome::Done(value)
                }
                Err(error) => {
                    tracing::error!(key = %id, %error, "task output not persisted");
                    run.end_attempt(&attempt, failed(&error.to_string()), None);
                    closed(finish(Ending::Failed)).await;
                    Outcome::NotPersisted(value, error)
                }
            }
        };
        // The span must be dropped while `dispatch` is the default: closing the last task
        // span makes the registry close the run span through the *current* default. An
        // awaited future is dropped inside the poll that completes it, so inside the scope.
        let traced = async move { body.instrument(span).await };
        match dispatch {
            Some(dispatch) => traced.with_subscriber(dispatch).await,
            None => traced.await,
        }
    }
}

impl<Tk> Task for Durable<Tk>
where
    Tk: Task,
    Tk::Output: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Input = Tk::Input;
    type Output = Tk::Output;

    /// Runs the task through the durable path. A failed persist is logged with
    /// `tracing::error!` and the output is still returned; use [`Durable::run_result`] to
    /// get the error instead.
    async fn run(self, input: Self::Input) -> Self::Output {
        match self.execute(Inputs::Given(input)).await {
            Outcome::Done(value) | Outcome::NotPersisted(value, _) => value,
            // Only dagx's channel hand-over can fail; a given input cannot.
            Outcome::Failed(error) => unreachable!("{error}"),
        }
    }

    async fn extract_and_run(
        self,
        receivers: Vec<Box<dyn Any + Send>>,
    ) -> Result<Self::Output, String> {
        self.execute(Inputs::Channels(receivers))
            .await
            .into_result()
            .map_err(|e| e.to_string())
    }
}

/// The attempt number of every task's first (and, until retries exist, only) attempt.
const ATTEMPT: u32 = 1;

/// Where the inner task's input comes from.
enum Inputs<I> {
    /// Handed over by the caller ([`Task::run`], [`Durable::run_result`]).
    Given(I),
    /// dagx's dependency channels, extracted by the inner task.
    Channels(Vec<Box<dyn Any + Send>>),
}

enum Outcome<O> {
    /// Cached, or executed and persisted.
    Done(O),
    /// Executed, but the output could not be persisted.
    NotPersisted(O, DuraflowError),
    /// The inner task did not run.
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
