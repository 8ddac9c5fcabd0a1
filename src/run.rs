//! One run of a pipeline: its task ids, counters, records and progress callback.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use serde::de::DeserializeOwned;

use crate::codec::{self, TypeCheck};
use crate::output::OutputKind;
use crate::record::now_ms;
use crate::spans::RunSpans;
use crate::store::value::WHOLE_LIMIT;
use crate::{
    unblock, AttemptOutcome, AttemptRecord, Context, DuraflowError, Encoder, RunId, RunLog,
    RunRecord, RunStatus, StoreFuture, Stored, Value,
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
    /// The task span's `outcome` field.
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
pub(crate) struct RunState {
    pub(crate) ctx: Arc<Context>,
    pub(crate) spans: RunSpans,
    ids: Mutex<HashSet<Arc<str>>>,
    /// Set before the run starts; read without a lock by every task.
    pub(crate) progress: OnceLock<ProgressFn>,
    /// Executed tasks in the low 32 bits, cached ones in the high 32: one atomic add counts
    /// a task and yields the distinct count of completed tasks its callback reports.
    done: AtomicU64,
    failed: AtomicUsize,
    /// Tasks claimed in this run: the run is over when this many have ended.
    total: AtomicUsize,
    /// Set by the task that finds every task of the run ended (or by the drop).
    closed: AtomicBool,
    /// Set once a progress callback panicked (it is then logged once).
    callback_panicked: AtomicBool,
    /// The run's id in the store's run log, if the store keeps one.
    record: Option<RunId>,
    started_ms: u64,
}

impl RunState {
    pub(crate) fn new(ctx: Arc<Context>, progress: Option<ProgressFn>) -> RunState {
        let started_ms = now_ms();
        let record = ctx.db.run_log().and_then(|log| {
            log.begin_run(started_ms)
                .map_err(|error| tracing::warn!(%error, "run not recorded"))
                .ok()
        });
        // Without a run log, runs are numbered in spans by a process-wide sequence.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let span_id = record.unwrap_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed));
        RunState {
            spans: RunSpans::new(span_id, ctx.db.kind()),
            ctx,
            ids: Mutex::default(),
            progress: progress.map(OnceLock::from).unwrap_or_default(),
            done: AtomicU64::new(0),
            failed: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            callback_panicked: AtomicBool::new(false),
            record,
            started_ms,
        }
    }

    /// Claims `id` for one task of this run; the task keeps the id the claim holds.
    ///
    /// # Errors
    /// [`DuraflowError::DuplicateTaskId`] when a task of this run has it already.
    pub(crate) fn claim(&self, id: &str) -> Result<Arc<str>, DuraflowError> {
        let id: Arc<str> = id.into();
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if !ids.insert(Arc::clone(&id)) {
            return Err(DuraflowError::DuplicateTaskId { id: id.to_string() });
        }
        drop(ids);
        self.total.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }

    /// The stored output of task `id` and its size in bytes, if it can be handed to the
    /// task's dependents: present, intact and written by the same type. Anything else is
    /// logged and treated as absent, so the task runs again and overwrites it — unless the
    /// store has stopped ([`Storage::health`]): then the read's error. A value over
    /// [`WHOLE_LIMIT`] is decoded on duraflow's I/O threads (as it is read, when the store
    /// hands out a reader).
    pub(crate) async fn stored<T: DeserializeOwned + Send + 'static>(
        &self,
        id: &str,
    ) -> Result<Option<(T, usize)>, DuraflowError> {
        let found = match self.ctx.db.read_value(id).await {
            Ok(None) => Ok(None),
            Ok(Some(Stored::Bytes(bytes))) if bytes.len() <= WHOLE_LIMIT => {
                codec::decode(id, &bytes, TypeCheck::Exact).map(|v| Some((v, bytes.len())))
            }
            Ok(Some(Stored::Bytes(bytes))) => {
                let (key, len) = (id.to_owned(), bytes.len());
                let decoded = unblock(move || codec::decode(&key, &bytes, TypeCheck::Exact));
                decoded.await.map(|v| Some((v, len)))
            }
            Ok(Some(Stored::Reader { len, mut reader })) => {
                let key = id.to_owned();
                let decoded =
                    unblock(move || codec::read(&key, &mut reader, len, TypeCheck::Exact));
                decoded.await.map(|v| Some((v, len as usize)))
            }
            Err(error) => Err(error),
        };
        match found {
            Ok(found) => Ok(found),
            Err(error) if self.ctx.db.health().is_ok() => {
                tracing::warn!(key = id, %error, "stored output unusable; running the task again");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Starts attempt `number` at a task.
    pub(crate) fn start_attempt(&self, number: u32) -> Attempt {
        Attempt {
            number,
            started_ms: now_ms(),
            started: Instant::now(),
            reason: None,
        }
    }

    /// The run log this run's records go to, if the store keeps one.
    fn log(&self) -> Option<(&dyn RunLog, RunId)> {
        Some((self.ctx.db.run_log()?, self.record?))
    }

    /// Records attempt `attempt` at task `id` as `outcome`: `Running` when the inner task is
    /// about to run (a crash from here on leaves it `Interrupted`), or how it ended (a
    /// `Succeeded` attempt is recorded by [`persist`](Self::persist)).
    pub(crate) fn record(
        &self,
        id: &str,
        attempt: &Attempt,
        outcome: AttemptOutcome,
        size: Option<usize>,
    ) {
        let Some((log, run)) = self.log() else {
            return;
        };
        if let Err(error) = log.record(attempt.record(run, id, outcome, size)) {
            tracing::warn!(key = id, %error, "attempt not recorded");
        }
    }

    /// Persists `output`, the output of task `id` (what `K` stores of it): with its
    /// `Succeeded` attempt in one atomic commit where the store keeps records, as a plain
    /// write otherwise; returns the output with the result once the store has answered. An
    /// output that encodes to at most [`WHOLE_LIMIT`] bytes is encoded here; a larger one is
    /// lent to the store, which encodes it as it writes it (on its own threads), and is
    /// handed back once the store is done with it.
    pub(crate) async fn persist<O, K>(
        &self,
        id: &str,
        output: O,
        attempt: &Attempt,
    ) -> (O, Result<(), DuraflowError>)
    where
        O: Send + 'static,
        K: OutputKind<O>,
    {
        let whole = match K::stored(&output) {
            Ok(value) => codec::encode_within(id, value, WHOLE_LIMIT),
            // Not reached: a failed output is not persisted.
            Err(message) => Err(DuraflowError::Persist {
                key: id.to_owned(),
                source: message.into(),
            }),
        };
        match whole {
            Ok(Some(bytes)) => {
                let stored = self.store(id, Value::Bytes(bytes), attempt).await;
                (output, stored)
            }
            Err(error) => (output, Err(error)),
            Ok(None) => {
                let slot = Arc::new(Mutex::new(Some(output)));
                let (lent, key) = (Arc::clone(&slot), id.to_owned());
                let encoder = Encoder::new(move |out| {
                    let output = lent.lock().unwrap_or_else(PoisonError::into_inner);
                    match output.as_ref().map(K::stored) {
                        Some(Ok(value)) => codec::write(&key, value, out),
                        // Not reached: the output is taken back only after this is dropped.
                        _ => Err(DuraflowError::Persist {
                            key,
                            source: "the output was taken back before it was written".into(),
                        }),
                    }
                });
                let stored = self.store(id, Value::Stream(encoder), attempt).await;
                let output = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                match output {
                    Some(output) => (output, stored),
                    // Only this function takes the output out of its slot.
                    None => unreachable!("the output of {id:?} was taken twice"),
                }
            }
        }
    }

    /// Hands `value` to the store: see [`persist`](Self::persist).
    fn store<'a>(&'a self, id: &'a str, value: Value, attempt: &Attempt) -> StoreFuture<'a, ()> {
        match self.log() {
            Some((log, run)) => {
                let record = attempt.record(run, id, AttemptOutcome::Succeeded, None);
                log.commit(id, value, record)
            }
            None => self.ctx.db.write_value(id, value),
        }
    }

    /// Counts how task `id` ended. A completed task (executed or cached) bumps the context's
    /// and the run's counts and then calls the progress callback, once. The task that ends
    /// the run closes its span and writes its final record, whatever the callback did.
    pub(crate) async fn finish(&self, id: &str, ending: Ending) {
        let ended = match ending {
            Ending::Executed | Ending::Cached => {
                let one = if ending == Ending::Executed {
                    1
                } else {
                    1 << 32
                };
                let (executed, cached) = split(self.done.fetch_add(one, Ordering::SeqCst) + one);
                self.ctx.completed_count.fetch_add(1, Ordering::SeqCst);
                if let Some(callback) = self.progress.get() {
                    self.call(callback, id, executed + cached);
                }
                executed + cached + self.failed.load(Ordering::SeqCst)
            }
            Ending::Failed => {
                let (executed, cached) = split(self.done.load(Ordering::SeqCst));
                executed + cached + self.failed.fetch_add(1, Ordering::SeqCst) + 1
            }
        };
        if ended < self.total.load(Ordering::SeqCst) || self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let stats = self.stats();
        self.spans.close(stats);
        self.close_record(stats).await;
    }

    /// Calls the progress callback; a panic in it is caught and logged (once per run), so
    /// that it cannot leave the run's record unfinished.
    fn call(&self, callback: &ProgressFn, id: &str, completed: usize) {
        let called = catch_unwind(AssertUnwindSafe(|| callback(id, completed)));
        if called.is_err() && !self.callback_panicked.swap(true, Ordering::SeqCst) {
            tracing::error!(
                key = id,
                "the progress callback panicked; the run goes on (logged once per run)"
            );
        }
    }

    /// Writes the run's final record, as durably as the store promises for it
    /// ([`RunLog::finish_run`]).
    async fn close_record(&self, stats: RunStats) {
        let Some((log, id)) = self.log() else {
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
        if let Err(error) = log.finish_run(record).await {
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
            self.spans.close(self.stats());
        }
    }
}

/// Unpacks [`RunState::done`] into (executed, cached).
fn split(done: u64) -> (usize, usize) {
    ((done & 0xffff_ffff) as usize, (done >> 32) as usize)
}

/// One attempt at one task: when it started, for its records.
pub(crate) struct Attempt {
    number: u32,
    started_ms: u64,
    started: Instant,
    /// Why the task runs or was cached (keyed tasks), for every record of the attempt.
    pub(crate) reason: Option<String>,
}

impl Attempt {
    /// The record of this attempt at task `key` in run `run`, as `outcome`. An attempt that
    /// has ended (any outcome but `Running`) ends at its start plus its duration on the
    /// monotonic clock, so a system clock set back meanwhile cannot make it end before it
    /// started.
    fn record(
        &self,
        run: RunId,
        key: &str,
        outcome: AttemptOutcome,
        size: Option<usize>,
    ) -> AttemptRecord {
        let elapsed = (outcome != AttemptOutcome::Running).then(|| self.started.elapsed());
        AttemptRecord {
            run,
            key: key.to_owned(),
            attempt: self.number,
            started_ms: self.started_ms,
            finished_ms: elapsed.map(|e| self.started_ms.saturating_add(e.as_millis() as u64)),
            outcome,
            duration_us: elapsed.map(|e| e.as_micros() as u64),
            output_size: size.map(|s| s as u64),
            reason: self.reason.clone(),
        }
    }
}
