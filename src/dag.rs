//! [`DurableDag`]: adds durable tasks to a dagx [`DagRunner`].

use std::sync::Arc;

use dagx::{DagRunner, Pending, Task, TaskBuilder};
use serde::{de::DeserializeOwned, Serialize};

use crate::run::{RunState, RunStats};
use std::fmt::Display;

use crate::retry::Retry;
use crate::{validate_key, Context, Durable, DuraflowError, Fallible, OutputKind, RetryPolicy};

/// Adds tasks to a dagx [`DagRunner`] so that each one's output is persisted in a
/// [`Context`] under the id it is given, and reused instead of recomputed on a later run.
///
/// One `DurableDag` is one run: its tasks share one progress callback and one set of
/// counters ([`stats`](DurableDag::stats)). Task ids must be unique within it.
pub struct DurableDag<'a> {
    dag: &'a DagRunner,
    run: Arc<RunState>,
}

impl std::fmt::Debug for DurableDag<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableDag")
            .field("ctx", &self.run.ctx)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<'a> DurableDag<'a> {
    /// A durable view of `dag` persisting into `ctx`.
    pub fn new(dag: &'a DagRunner, ctx: Arc<Context>) -> Self {
        DurableDag {
            dag,
            run: Arc::new(RunState::new(ctx, None)),
        }
    }

    /// Calls `handler(id, completed)` once per task of this run, executed or cached, after
    /// its output is persisted; `completed` counts this run's completed tasks, this one
    /// included. Tasks that fail are not reported.
    ///
    /// A run has one handler: a second call leaves the first in place (a `tracing::warn!`
    /// says so). A panic in the handler is caught and logged, and the run goes on.
    pub fn with_progress<F>(self, handler: F) -> Self
    where
        F: Fn(&str, usize) + Send + Sync + 'static,
    {
        if self.run.progress.set(Arc::new(handler)).is_err() {
            tracing::warn!("with_progress called twice: the first handler stays");
        }
        self
    }

    /// Adds `task` under `id` and returns dagx's builder, so `.depends_on(..)` and
    /// `dag.get(..)` work as for a plain task.
    ///
    /// # Panics
    /// When `id` is already used in this `DurableDag` or is not a valid key (empty or over
    /// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes); the message names the id. Use
    /// [`try_add`](DurableDag::try_add) to get the error instead.
    pub fn add<Tk>(&self, id: &str, task: Tk) -> TaskBuilder<'a, Durable<Tk>, Pending>
    where
        Tk: Task + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        or_panic("DurableDag::add", self.try_add(id, task))
    }

    /// Like [`add`](DurableDag::add), returning an error instead of panicking.
    ///
    /// # Errors
    /// [`DuraflowError::DuplicateTaskId`] when `id` is already used in this `DurableDag`;
    /// [`DuraflowError::InvalidKey`] when `id` is empty or too long.
    pub fn try_add<Tk>(
        &self,
        id: &str,
        task: Tk,
    ) -> Result<TaskBuilder<'a, Durable<Tk>, Pending>, DuraflowError>
    where
        Tk: Task + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.add_kind(id, task, None)
    }

    /// Adds a task whose output is a `Result`: `Ok(T)` is persisted (as a `T`, so
    /// `Context::get::<T>` reads it) and reused by later runs; an `Err` is recorded as a
    /// failed attempt with the error's text, never persisted, and handed to dependents as
    /// dagx would. A panic is a failed attempt too. The task is attempted once per run (see
    /// [`add_fallible_with`](DurableDag::add_fallible_with) to retry it); a later run executes
    /// a task that ended in `Err` again.
    ///
    /// A dependent receives the `Result` itself. Make dependents fallible too and propagate
    /// the error (as `Result::map` does): a dependent that turns an upstream `Err` into an
    /// `Ok` output has that output stored and reused like any other.
    ///
    /// # Panics
    /// As [`add`](DurableDag::add), when `id` is used already or is not a valid key.
    pub fn add_fallible<Tk, T, E>(
        &self,
        id: &str,
        task: Tk,
    ) -> TaskBuilder<'a, Durable<Tk, Fallible>, Pending>
    where
        Tk: Task<Output = Result<T, E>> + 'static,
        Tk::Input: Clone + 'static,
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Display + Clone + Send + Sync + 'static,
    {
        or_panic("DurableDag::add_fallible", self.add_kind(id, task, None))
    }

    /// [`add_fallible`](DurableDag::add_fallible), attempted again under `policy` while it
    /// fails (returns `Err`, panics or times out) and attempts are left; once they are spent,
    /// the last `Err` goes to dependents.
    ///
    /// Retrying runs a fresh clone of the task on a clone of its input, hence the `Clone`
    /// bounds. dagx hands a task with two or more dependencies its inputs in a form only the
    /// task itself can unpack: such a task is attempted once (a `warn!` says so); give it
    /// one dependency (a task that combines the others) to have it retried.
    ///
    /// # Panics
    /// As [`add`](DurableDag::add).
    pub fn add_fallible_with<Tk, T, E>(
        &self,
        id: &str,
        task: Tk,
        policy: RetryPolicy,
    ) -> TaskBuilder<'a, Durable<Tk, Fallible>, Pending>
    where
        Tk: Task<Output = Result<T, E>> + Clone + 'static,
        Tk::Input: Clone + Sync + 'static,
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Display + Clone + Send + Sync + 'static,
    {
        let retry = Retry::of(task.clone(), policy);
        or_panic(
            "DurableDag::add_fallible",
            self.add_kind(id, task, Some(retry)),
        )
    }

    /// Adds an infallible task that is attempted again, under `policy`, when it panics or
    /// times out; otherwise as [`add`](DurableDag::add). Retrying runs a fresh clone of the
    /// task on a clone of its input (see [`add_fallible_with`](DurableDag::add_fallible_with)
    /// for tasks with several dependencies).
    ///
    /// # Panics
    /// As [`add`](DurableDag::add).
    pub fn add_with_retry<Tk>(
        &self,
        id: &str,
        task: Tk,
        policy: RetryPolicy,
    ) -> TaskBuilder<'a, Durable<Tk>, Pending>
    where
        Tk: Task + Clone + 'static,
        Tk::Input: Clone + Sync + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let retry = Retry::of(task.clone(), policy);
        or_panic(
            "DurableDag::add_with_retry",
            self.add_kind(id, task, Some(retry)),
        )
    }

    /// Claims `id` and hands the wrapped task to dagx: the one place tasks are added.
    fn add_kind<Tk, K>(
        &self,
        id: &str,
        task: Tk,
        retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
    ) -> Result<TaskBuilder<'a, Durable<Tk, K>, Pending>, DuraflowError>
    where
        Tk: Task + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Clone + Send + Sync + 'static,
        K: OutputKind<Tk::Output>,
    {
        validate_key(id)?;
        let id = self.run.claim(id)?;
        let durable = Durable::in_run(id, task, self.run.clone(), retry);
        Ok(self.dag.add_task(durable))
    }

    /// How this run's tasks have ended so far.
    pub fn stats(&self) -> RunStats {
        self.run.stats()
    }

    /// The context outputs are persisted in.
    pub fn context(&self) -> &Arc<Context> {
        &self.run.ctx
    }
}

/// The builder, or a panic naming the method and the error (the panicking `add`s).
fn or_panic<T>(method: &str, added: Result<T, DuraflowError>) -> T {
    added.unwrap_or_else(|error| panic!("{method}: {error}"))
}
