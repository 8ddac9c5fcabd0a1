//! One run of a pipeline: its task ids, counters and progress callback.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use futures::future::BoxFuture;
use serde::Serialize;

use crate::codec;
use crate::offload::{off_executor, Offloaded};
use crate::readahead::{Pending, Read, ReadAhead};
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
    /// Tasks claimed in this run: the run is over when this many have ended.
    total: AtomicUsize,
    /// The run's id in spans: its run-log id, or a process-wide sequence number when the
    /// store keeps no run log.
    span_id: u64,
    /// The `duraflow.run` span, dropped (closed, once its tasks' spans close) when the run
    /// ends. Task spans name it as their parent.
    span: Mutex<Option<tracing::Span>>,
    parent: Option<tracing::Id>,
    /// Reads the run's stored outputs ahead of its tasks, for stores whose reads block.
    readahead: Option<ReadAhead>,
    /// The subscriber that was current when the run was made, if it was a scoped (thread)
    /// default: every task's future is polled with it, so spans reach it from whatever
    /// worker thread runs the task. `None` with no subscriber, and with the global default,
    /// which every thread sees without being told (and setting a scope per poll costs a
    /// few contended atomic writes).
    dispatch: Option<tracing::Dispatch>,
    /// Set once the run, or a task of it, found its span's call site stale and had tracing's
    /// interest cache rebuilt (see [`stale`]): at most once per run.
    rebuilt: AtomicBool,
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
        let span_id = match record {
            Some(id) => id,
            None => {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            }
        };
        let dispatch = tracing::dispatcher::get_default(|d| {
            let none = cfg!(duraflow_no_spans) || d.is::<tracing::subscriber::NoSubscriber>();
            (!none && !is_global(d)).then(|| d.clone())
        });
        // `--cfg duraflow_no_spans` builds the crate without spans, as the baseline the
        // span-overhead benchmark compares against (benches/no-spans); it is not a
        // supported configuration.
        let run_span = || {
            if cfg!(duraflow_no_spans) {
                tracing::Span::none()
            } else {
                tracing::info_span!(
                    "duraflow.run",
                    run.id = span_id,
                    store = ctx.db.kind(),
                    executed = tracing::field::Empty,
                    cached = tracing::field::Empty,
                    failed = tracing::field::Empty,
                )
            }
        };
        let (span, rebuilt) = match dispatch {
            Some(_) => fresh_span(run_span, || true),
            None => (run_span(), false),
        };
        RunState {
            record,
            started_ms,
            closed: AtomicBool::new(false),
            total: AtomicUsize::new(0),
            readahead: (ctx.db.may_block() && ctx.db.read_ahead()).then(ReadAhead::new),
            span_id,
            parent: span.id(),
            span: Mutex::new(Some(span)),
            dispatch,
            rebuilt: AtomicBool::new(rebuilt),
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
    /// With read-ahead, also returns what the task's stored-output read will arrive on.
    pub(crate) fn claim(&self, id: &str) -> Result<(Arc<str>, Option<Pending>), DuraflowError> {
        // One hash and probe: insert, and learn from that whether the id was taken.
        let shared: Arc<str> = Arc::from(id);
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = ids.insert(Arc::clone(&shared));
        drop(ids);
        if !fresh {
            return Err(DuraflowError::DuplicateTaskId { id: id.to_owned() });
        }
        let id = shared;
        self.total.fetch_add(1, Ordering::SeqCst);
        let pending = self.readahead.as_ref().map(|r| r.enqueue(Arc::clone(&id)));
        Ok((id, pending))
    }

    /// Reads what the store holds under `id`, off the executor: from the run's read-ahead
    /// when the task has a `pending` read there (starting the read-ahead if this is the
    /// run's first task), otherwise with a read of its own.
    pub(crate) fn read_stored<'a>(&'a self, id: &'a str, pending: Option<Pending>) -> Read<'a> {
        match (&self.readahead, pending) {
            (Some(readahead), Some(pending)) => {
                readahead.start(&self.ctx.db);
                readahead.read(&self.ctx.db, id, pending)
            }
            _ => Read::own(&self.ctx.db, id),
        }
    }

    /// Starts an attempt at task `id` (recorded only when it ends or starts running).
    pub(crate) fn start_attempt(&self, attempt: u32) -> Attempt {
        Attempt {
            // `record` is set only for a store with a run log.
            start: self.record.map(|run| AttemptStart {
                run,
                attempt,
                started_ms: now_ms(),
                started: Instant::now(),
            }),
        }
    }

    /// The run log `attempt` is to be recorded in: `None` at once, without asking the store,
    /// for an attempt of a run without one.
    fn log_of(&self, attempt: &Attempt) -> Option<&dyn RunLog> {
        attempt.start.as_ref()?;
        self.ctx.db.run_log()
    }

    /// Records the attempt at task `id` as `Running`: the inner task is about to run, and a
    /// crash from here on leaves it `Interrupted`. (A cached task never runs and is
    /// recorded once.)
    pub(crate) fn mark_running(&self, id: &str, attempt: &Attempt) {
        let Some(log) = self.log_of(attempt) else {
            return;
        };
        if let Some(record) = attempt.running(id) {
            if let Err(error) = log.record(record) {
                tracing::warn!(key = id, %error, "attempt not recorded");
            }
        }
    }

    /// Records how an attempt at task `id` ended (a `Succeeded` one is recorded by
    /// [`persist`](Self::persist)). The id goes to the log as the run's shared `Arc`
    /// ([`RunLog::record_shared`]): a cached re-run records a `Cached` attempt per task.
    pub(crate) fn end_attempt(
        &self,
        id: &Arc<str>,
        attempt: &Attempt,
        outcome: AttemptOutcome,
        size: Option<usize>,
    ) {
        let Some(log) = self.log_of(attempt) else {
            return;
        };
        // The key is left empty (no allocation): `record_shared` takes it from `id`.
        if let Some(record) = attempt.ended("", outcome, size) {
            if let Err(error) = log.record_shared(id, record) {
                tracing::warn!(key = &**id, %error, "attempt not recorded");
            }
        }
    }

    /// Persists the output of task `id`: with its `Succeeded` attempt in one atomic commit
    /// where the store keeps records, as a plain write otherwise. Returns once durable.
    /// The caller awaits the returned future and maps its error with
    /// [`DuraflowError::into_persist`]: building the future does the encoding and queues the
    /// write, so the future itself stays small.
    pub(crate) fn persist<T: Serialize>(
        &self,
        id: &Arc<str>,
        value: &T,
        attempt: &Attempt,
    ) -> Offloaded<'static, ()> {
        let bytes = match codec::encode(id, value) {
            Ok(bytes) => bytes,
            Err(e) => return Offloaded::now(Err(e)),
        };
        let size = bytes.len();
        let logged = self.log_of(attempt).and_then(|log| {
            let record = attempt.ended(id, AttemptOutcome::Succeeded, Some(size));
            Some((log, record?))
        });
        match logged {
            Some((log, record)) => match log.commit(id, bytes, record) {
                Ok(ticket) => Offloaded::Later(Box::pin(ticket)),
                Err(e) => Offloaded::now(Err(e)),
            },
            None => {
                let key = Arc::clone(id);
                off_executor(&self.ctx.db, id, move |db, _| db.write_shared(&key, bytes))
            }
        }
    }

    /// Records how task `id` ended. A completed task (executed or cached) bumps the
    /// context's and the run's counts and then calls the progress callback, once.
    ///
    /// Returns the work left when this task is the last of the run to end: closing the
    /// run's record. It is boxed, and only then, so the future of every task stays small.
    pub(crate) fn finish(&self, id: &str, ending: Ending) -> Option<BoxFuture<'_, ()>> {
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
        let stats = self.stats();
        let ended = stats.executed + stats.cached + stats.failed;
        if ended < self.total.load(Ordering::SeqCst) || self.closed.swap(true, Ordering::SeqCst) {
            return None;
        }
        self.close_span(stats);
        self.record
            .map(|id| Box::pin(self.close_record(id, stats)) as BoxFuture<'_, ()>)
    }

    /// Records the run's counts on its span and lets it close.
    fn close_span(&self, stats: RunStats) {
        let span = self
            .span
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(span) = span {
            span.record("executed", stats.executed);
            span.record("cached", stats.cached);
            span.record("failed", stats.failed);
        }
    }

    /// A span for one attempt at task `id`, a child of the run's span.
    pub(crate) fn task_span(&self, id: &str, attempt: u32) -> tracing::Span {
        if cfg!(duraflow_no_spans) {
            return tracing::Span::none();
        }
        // Made by a task's future, which is polled with the run's subscriber as the default
        // (see `Durable::execute`): the span goes to it without setting it here again.
        let task_span = || {
            tracing::info_span!(
                parent: self.parent.clone(),
                "duraflow.task",
                task.id = id,
                run.id = self.span_id,
                attempt,
                outcome = tracing::field::Empty,
            )
        };
        if self.dispatch.is_none() {
            return task_span();
        }
        fresh_span(task_span, || !self.rebuilt.swap(true, Ordering::Relaxed)).0
    }

    /// The subscriber every task of the run is polled with (see [`RunState::dispatch`]).
    pub(crate) fn dispatch(&self) -> Option<&tracing::Dispatch> {
        self.dispatch.as_ref()
    }

    /// Writes the run's final record, as durably as the store promises for it
    /// ([`RunLog::finish_run`]).
    async fn close_record(&self, id: RunId, stats: RunStats) {
        let Some(log) = self.ctx.db.run_log() else {
            return;
        };
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

impl Drop for RunState {
    /// A run dropped before all its tasks ended (never run, or its runner dropped) still
    /// gets its counts on its span.
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.close_span(self.stats());
        }
    }
}

/// Whether `dispatch` is the global default subscriber. tracing-core offers no identity
/// check for this; its `Debug` output names the kind (`Dispatch::Global(..)` or
/// `Dispatch::Scoped(..)`). Were that output to change, this says `false` and the run keeps
/// polling its tasks in a scope: correct, only slower. Called once per run.
fn is_global(dispatch: &tracing::Dispatch) -> bool {
    format!("{dispatch:?}").starts_with("Dispatch::Global")
}

/// Whether `span` (an `INFO` span) came out disabled although the subscribers take `INFO`:
/// its call site's cached interest is likely stale. tracing caches whether a call site is
/// enabled when it is first reached, and while one `Dispatch` is all there is, asks only the
/// default of the thread that reached it (tokio-rs/tracing#3611). A run made outside a
/// subscriber's scope can thus leave duraflow's spans and events disabled for a later run in
/// that scope; `tracing::callsite::rebuild_interest_cache` asks again.
/// (A disabled span carries no metadata to ask the subscriber about, so this asks tracing's
/// global level filter; a subscriber that takes `INFO` but filters duraflow out by target
/// costs a rebuild per run.)
fn stale(span: &tracing::Span) -> bool {
    use tracing::level_filters::LevelFilter;
    span.is_disabled() && LevelFilter::current() >= LevelFilter::INFO
}

/// A span from `make` (in a run with a scoped subscriber), made again after rebuilding
/// tracing's interest cache if it came out [`stale`] and `may_rebuild` (asked only then)
/// agrees; and whether it rebuilt.
fn fresh_span(
    make: impl Fn() -> tracing::Span,
    may_rebuild: impl FnOnce() -> bool,
) -> (tracing::Span, bool) {
    let span = make();
    if stale(&span) && may_rebuild() {
        tracing::callsite::rebuild_interest_cache();
        return (make(), true);
    }
    (span, false)
}

/// Unpacks [`RunState::done`] into (executed, cached).
fn split(done: u64) -> (usize, usize) {
    ((done & 0xffff_ffff) as usize, (done >> 32) as usize)
}

/// One attempt at one task, as the run log will record it. Its record is made only when
/// one is stored (the task's id is copied then), so an attempt costs nothing up front.
pub(crate) struct Attempt {
    /// `None` when the store keeps no run log: nothing to record, nothing to time.
    start: Option<AttemptStart>,
}

/// When and in which run an attempt started.
struct AttemptStart {
    run: RunId,
    attempt: u32,
    started_ms: u64,
    started: Instant,
}

impl Attempt {
    /// The record of this attempt at task `key`, running (`None` without a run log).
    fn running(&self, key: &str) -> Option<AttemptRecord> {
        let start = self.start.as_ref()?;
        Some(AttemptRecord {
            run: start.run,
            key: key.to_owned(),
            attempt: start.attempt,
            started_ms: start.started_ms,
            finished_ms: None,
            outcome: AttemptOutcome::Running,
            duration_us: None,
            output_size: None,
        })
    }

    /// The record of this attempt at task `key` ending now with `outcome` (`None` without a
    /// run log). Its end is its start plus its duration on the monotonic clock: one clock
    /// read, not two, in every task's end.
    fn ended(
        &self,
        key: &str,
        outcome: AttemptOutcome,
        size: Option<usize>,
    ) -> Option<AttemptRecord> {
        let elapsed = self.start.as_ref()?.started.elapsed();
        let mut record = self.running(key)?;
        record.finished_ms = Some(record.started_ms.saturating_add(elapsed.as_millis() as u64));
        record.outcome = outcome;
        record.duration_us = Some(elapsed.as_micros() as u64);
        record.output_size = size.map(|s| s as u64);
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::is_global;

    #[test]
    fn tells_the_global_default_from_a_scoped_one() {
        // `Dispatch::none()` is the global kind; a `Dispatch::new` is what `set_default` and
        // `with_default` install.
        assert!(is_global(&tracing::Dispatch::none()));
        let scoped = tracing::Dispatch::new(tracing_subscriber::registry());
        assert!(!is_global(&scoped));
        tracing::dispatcher::with_default(&scoped, || {
            tracing::dispatcher::get_default(|current| assert!(!is_global(current)));
        });
    }
}
