//! One run of a pipeline: its task ids, counters and progress callback.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::{Context, DuraflowError};

/// The progress callback: called with a task's id and how many tasks of the run have
/// completed so far (this one included).
pub type ProgressFn = Arc<dyn Fn(&str, usize) + Send + Sync + 'static>;

/// Counts of how a run's tasks ended, as reported by [`DurableDag::stats`](crate::DurableDag::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunStats {
    /// Tasks that ran and whose output was persisted.
    pub executed: usize,
    /// Tasks whose persisted output was reused without running them.
    pub cached: usize,
    /// Tasks that panicked, could not run because a dependency failed, or whose output could
    /// not be persisted.
    pub failed: usize,
}

impl RunStats {
    /// Tasks that completed (executed or cached): the count progress callbacks report.
    pub fn completed(&self) -> usize {
        self.executed + self.cached
    }
}

/// How a task ended, as far as the run is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Executed,
    Cached,
    Failed,
}

impl Ending {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Ending::Executed => "executed",
            Ending::Cached => "cached",
            Ending::Failed => "failed",
        }
    }
}

/// Shared by every task of one run (one [`DurableDag`](crate::DurableDag), or one standalone
/// [`Durable`](crate::Durable)).
#[derive(Default)]
pub(crate) struct RunState {
    ids: Mutex<HashSet<String>>,
    progress: RwLock<Option<ProgressFn>>,
    executed: AtomicUsize,
    cached: AtomicUsize,
    failed: AtomicUsize,
    /// Executed + cached, bumped in one step so every callback sees a distinct count.
    completed: AtomicUsize,
}

impl RunState {
    pub(crate) fn new(progress: Option<ProgressFn>) -> RunState {
        RunState {
            progress: RwLock::new(progress),
            ..RunState::default()
        }
    }

    pub(crate) fn set_progress(&self, progress: ProgressFn) {
        *self
            .progress
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(progress);
    }

    /// Claims `id` for one task of this run.
    pub(crate) fn claim(&self, id: &str) -> Result<(), DuraflowError> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if ids.insert(id.to_owned()) {
            Ok(())
        } else {
            Err(DuraflowError::DuplicateTaskId { id: id.to_owned() })
        }
    }

    /// Records how task `id` ended. A completed task (executed or cached) bumps the
    /// context's and the run's counts and then calls the progress callback, once.
    pub(crate) fn finish(&self, ctx: &Context, id: &str, ending: Ending) {
        let counter = match ending {
            Ending::Executed => &self.executed,
            Ending::Cached => &self.cached,
            Ending::Failed => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        counter.fetch_add(1, Ordering::SeqCst);
        ctx.completed_count.fetch_add(1, Ordering::SeqCst);
        let completed = self.completed.fetch_add(1, Ordering::SeqCst) + 1;
        let progress = self.progress.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(cb) = progress.as_ref() {
            cb(id, completed);
        }
    }

    pub(crate) fn stats(&self) -> RunStats {
        RunStats {
            executed: self.executed.load(Ordering::SeqCst),
            cached: self.cached.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
        }
    }
}
