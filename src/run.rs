//! One run of a pipeline: its task ids, counters and progress callback.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use serde::Serialize;

use crate::codec;
use crate::offload::off_executor;
use crate::record::now_ms;
use crate::{
    AttemptOutcome, AttemptRecord, Context, DuraflowError, RunId, RunLog, RunRecord, RunStatus,
};

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
    /// The run's id in the store's run log, if the store keeps one.
    record: Option<RunId>,
    started_ms: u64,
    /// Set by the task that finds every task of the run final and closes the record.
    closed: AtomicBool,
}

const EXECUTED_ONE: u64 = 1;
const CACHED_ONE: u64 = 1 << 32;

impl RunState {
    pub(crate) fn new(ctx: Arc<Context>, progress: Option<ProgressFn>) -> RunState {
        let started_ms = now_ms();
        let record = ctx.db.run_log().and_then(|log| {
            log.begin_run(started_ms)
                .map_err(|error| tracing::warn!(%error, "run not recorded"))
                .ok()
        });
        RunState {
            record,
            started_ms,
            closed: AtomicBool::new(false),
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

    fn log(&self) -> Option<(&dyn RunLog, RunId)> {
        Some((self.ctx.db.run_log()?, self.record?))
    }

    /// Starts an attempt at task `id` (recorded only when it ends or starts running).
    pub(crate) fn start_attempt(&self, id: &str) -> Attempt {
        let record = self.log().map(|(_, run)| AttemptRecord {
            run,
            key: id.to_owned(),
            attempt: 1,
            started_ms: now_ms(),
            finished_ms: None,
            outcome: AttemptOutcome::Running,
            duration_us: None,
            output_size: None,
        });
        Attempt {
            record,
            started: Instant::now(),
        }
    }

    /// Records the attempt as `Running`: the inner task is about to run, and a crash from
    /// here on leaves it `Interrupted`. (A cached task never runs and is recorded once.)
    pub(crate) fn mark_running(&self, attempt: &Attempt) {
        if let (Some((log, _)), Some(record)) = (self.log(), attempt.record.clone()) {
            let key = record.key.clone();
            if let Err(error) = log.record(record) {
                tracing::warn!(key, %error, "attempt not recorded");
            }
        }
    }

    /// Records how an attempt ended (a `Succeeded` one is recorded by [`persist`](Self::persist)).
    pub(crate) fn end_attempt(
        &self,
        attempt: &Attempt,
        outcome: AttemptOutcome,
        size: Option<usize>,
    ) {
        if let (Some((log, _)), Some(record)) = (self.log(), attempt.ended(outcome, size)) {
            let key = record.key.clone();
            if let Err(error) = log.record(record) {
                tracing::warn!(key, %error, "attempt not recorded");
            }
        }
    }

    /// Persists the output of task `id`: with its `Succeeded` attempt in one atomic commit
    /// where the store keeps records, as a plain write otherwise. Returns once durable.
    pub(crate) async fn persist<T: Serialize>(
        &self,
        id: &str,
        value: &T,
        attempt: &Attempt,
    ) -> Result<(), DuraflowError> {
        let bytes = codec::encode(id, value).map_err(|e| e.into_persist(id))?;
        let size = bytes.len();
        let done = match (
            self.log(),
            attempt.ended(AttemptOutcome::Succeeded, Some(size)),
        ) {
            (Some((log, _)), Some(record)) => match log.commit(id, bytes, record) {
                Ok(ticket) => ticket.await,
                Err(e) => Err(e),
            },
            _ => off_executor(&self.ctx.db, id, move |db, key| db.write(key, &bytes)).await,
        };
        done.map_err(|e| e.into_persist(id))
    }

    /// Records how task `id` ended. A completed task (executed or cached) bumps the
    /// context's and the run's counts and then calls the progress callback, once. The task
    /// that finds every task of the run final closes the run's record.
    pub(crate) async fn finish(&self, id: &str, ending: Ending) {
        match ending {
            Ending::Executed | Ending::Cached => {
                let one = if ending == Ending::Executed {
                    EXECUTED_ONE
                } else {
                    CACHED_ONE
                };
                self.ctx.completed_count.fetch_add(1, Ordering::SeqCst);
                let before = self.done.fetch_add(one, Ordering::SeqCst);
                if let Some(cb) = self.progress.get() {
                    let (executed, cached) = split(before + one);
                    cb(id, executed + cached);
                }
            }
            Ending::Failed => {
                self.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
        if self.record.is_some() {
            self.close_if_done().await;
        }
    }

    async fn close_if_done(&self) {
        let Some((log, id)) = self.log() else { return };
        let stats = self.stats();
        let total = self
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if stats.executed + stats.cached + stats.failed < total
            || self.closed.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let record = RunRecord {
            id,
            started_ms: self.started_ms,
            finished_ms: Some(now_ms()),
            status: if stats.failed == 0 {
                RunStatus::Succeeded
            } else {
                RunStatus::Failed
            },
            executed: stats.executed as u64,
            cached: stats.cached as u64,
            failed: stats.failed as u64,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let closed = match log.finish_run(record) {
            Ok(ticket) => ticket.await,
            Err(e) => Err(e),
        };
        if let Err(error) = closed {
            tracing::warn!(run = id, %error, "run record not closed");
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

/// One attempt at one task, as the run log will record it.
pub(crate) struct Attempt {
    record: Option<AttemptRecord>,
    started: Instant,
}

impl Attempt {
    /// The record of this attempt ending now with `outcome` (`None` without a run log).
    fn ended(&self, outcome: AttemptOutcome, size: Option<usize>) -> Option<AttemptRecord> {
        let mut record = self.record.clone()?;
        record.finished_ms = Some(now_ms());
        record.duration_us = Some(self.started.elapsed().as_micros() as u64);
        record.outcome = outcome;
        record.output_size = size.map(|s| s as u64);
        Some(record)
    }
}
