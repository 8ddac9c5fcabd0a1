//! One run of a pipeline: its task ids, counters and progress callback.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

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
/// [`Durable`](crate::Durable)): each task holds one `Arc` of it, which also reaches the
/// context.
pub(crate) struct RunState {
    pub(crate) ctx: Arc<Context>,
    ids: Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>>,
    /// Set before the run starts; read without a lock by every task.
    progress: OnceLock<ProgressFn>,
    /// Executed tasks in the low 32 bits, cached ones in the high 32: one atomic add both
    /// counts a task and yields the distinct running count its callback reports, so two
    /// worker threads share one contended cache line per task instead of several.
    done: AtomicU64,
    failed: AtomicUsize,
}

const EXECUTED_ONE: u64 = 1;
const CACHED_ONE: u64 = 1 << 32;

impl RunState {
    pub(crate) fn new(ctx: Arc<Context>, progress: Option<ProgressFn>) -> RunState {
        RunState {
            ctx,
            ids: Mutex::default(),
            progress: progress.map(OnceLock::from).unwrap_or_default(),
            done: AtomicU64::new(0),
            failed: AtomicUsize::new(0),
        }
    }

    /// Sets the progress callback: replaces it while `run` is not yet shared with any task,
    /// otherwise only if none was set. Returns whether `progress` is now the callback.
    pub(crate) fn set_progress(run: &mut Arc<RunState>, progress: ProgressFn) -> bool {
        match Arc::get_mut(run) {
            Some(run) => {
                run.progress = OnceLock::from(progress);
                true
            }
            None => run.progress.set(progress).is_ok(),
        }
    }

    /// Claims `id` for one task of this run; the returned id is shared with the claim set.
    pub(crate) fn claim(&self, id: &str) -> Result<Arc<str>, DuraflowError> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if ids.contains(id) {
            return Err(DuraflowError::DuplicateTaskId { id: id.to_owned() });
        }
        let id: Arc<str> = Arc::from(id);
        ids.insert(Arc::clone(&id));
        Ok(id)
    }

    /// Records how task `id` ended. A completed task (executed or cached) bumps the
    /// context's and the run's counts and then calls the progress callback, once.
    pub(crate) fn finish(&self, id: &str, ending: Ending) {
        let one = match ending {
            Ending::Executed => EXECUTED_ONE,
            Ending::Cached => CACHED_ONE,
            Ending::Failed => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        self.ctx.completed_count.fetch_add(1, Ordering::SeqCst);
        let before = self.done.fetch_add(one, Ordering::SeqCst);
        if let Some(cb) = self.progress.get() {
            let (executed, cached) = split(before + one);
            cb(id, executed + cached);
        }
    }

    pub(crate) fn stats(&self) -> RunStats {
        let (executed, cached) = split(self.done.load(Ordering::SeqCst));
        RunStats {
            executed,
            cached,
            failed: self.failed.load(Ordering::SeqCst),
        }
    }
}

/// Unpacks [`RunState::done`] into (executed, cached).
fn split(done: u64) -> (usize, usize) {
    ((done & 0xffff_ffff) as usize, (done >> 32) as usize)
}
