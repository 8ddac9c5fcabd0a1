//! [`DurableDag`]: adds durable tasks to a dagx [`DagRunner`].

use std::sync::Arc;

use dagx::{DagRunner, Pending, Task, TaskBuilder};
use serde::{de::DeserializeOwned, Serialize};

use crate::run::{RunState, RunStats};
use crate::{validate_key, Context, Durable, DuraflowError};

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
    /// Set it before adding tasks (as in `DurableDag::new(..).with_progress(..)`). Once tasks
    /// have been added, a handler can still be set if none was, but no longer replaced: the
    /// first one stays and a `tracing::warn!` says so.
    pub fn with_progress<F>(mut self, handler: F) -> Self
    where
        F: Fn(&str, usize) + Send + Sync + 'static,
    {
        if !RunState::set_progress(&mut self.run, Arc::new(handler)) {
            tracing::warn!("with_progress after tasks were added: the first handler stays");
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
        match self.try_add(id, task) {
            Ok(builder) => builder,
            Err(error) => panic!("DurableDag::add: {error}"),
        }
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
        validate_key(id)?;
        let (id, pending) = self.run.claim(id)?;
        let durable = Durable::in_run(id, task, self.run.clone(), pending);
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
