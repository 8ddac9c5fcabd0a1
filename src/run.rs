//! One run of a pipeline: its task ids, counters, records and progress callback.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, TypeCheck};
use crate::fingerprint::{self, Why};
use crate::output::OutputKind;
use crate::record::now_ms;
use crate::slot::{Key, KeyedSpec, Slot};
use crate::spans::RunSpans;
use crate::store::value::WHOLE_LIMIT;
use crate::{
    unblock, AttemptOutcome, AttemptRecord, Context, DuraflowError, Encoder, Lease, RunId, RunLog,
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
    /// Every task, in the order added (for `explain`).
    slots: Mutex<Vec<Arc<Slot>>>,
    /// The slot of each task whose dagx number is known (to resolve dagx handles).
    nodes: Mutex<HashMap<usize, Arc<Slot>>>,
    /// The code version of keyed tasks (empty unless set).
    pub(crate) code_version: OnceLock<String>,
    /// How long a keyed output may be reused.
    pub(crate) max_age: OnceLock<Duration>,
}

/// What the cache check ([`RunState::check`]) decided.
pub(crate) enum Check<T> {
    /// The stored output is the output.
    Cached(Loaded<T>),
    /// The task runs (a keyed one, under this key).
    Run(Option<Key>),
    /// The task fails without running.
    Fail(DuraflowError),
}

/// What [`RunState::stored`] found.
pub(crate) enum Found<T> {
    Absent,
    /// Present, but unreadable as the task's output: why.
    Unusable(String),
    Loaded(Loaded<T>),
}

/// A stored output, decoded.
pub(crate) struct Loaded<T> {
    pub(crate) value: T,
    pub(crate) size: usize,
    /// A keyed output's block (see [`fingerprint::block`]).
    pub(crate) block: Option<Vec<u8>>,
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
            slots: Mutex::default(),
            nodes: Mutex::default(),
            code_version: OnceLock::new(),
            max_age: OnceLock::new(),
        }
    }

    /// Adds the slot of a task, in the order added.
    pub(crate) fn add_slot(&self, slot: &Arc<Slot>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.push(Arc::clone(slot));
    }

    /// Every task's slot, in the order added.
    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records that dagx numbers the task of `slot` `node`.
    pub(crate) fn locate(&self, node: Option<usize>, slot: &Arc<Slot>) {
        if let Some(node) = node {
            let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
            nodes.insert(node, Arc::clone(slot));
        }
    }

    /// The slot of the task dagx numbers `node`, if it is one of this run's.
    pub(crate) fn slot_at(&self, node: usize) -> Option<Arc<Slot>> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.get(&node).cloned()
    }

    /// The code version of keyed tasks without their own.
    pub(crate) fn code_version(&self) -> &str {
        self.code_version.get().map_or("", String::as_str)
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

    /// The stored output of task `id`, if it can be handed to the task's dependents:
    /// present, intact and written by the same type. Anything else is logged and
    /// `Unusable`, so the task runs again and overwrites it — unless the store has stopped
    /// ([`Storage::health`]): then the read's error.
    pub(crate) async fn stored<T: DeserializeOwned + Send + 'static>(
        &self,
        id: &str,
    ) -> Result<Found<T>, DuraflowError> {
        match load(&self.ctx, id).await {
            Ok(Some(loaded)) => Ok(Found::Loaded(loaded)),
            Ok(None) => Ok(Found::Absent),
            Err(error) if self.ctx.db.health().is_ok() => {
                tracing::warn!(key = id, %error, "stored output unusable; running the task again");
                Ok(Found::Unusable(error.to_string()))
            }
            Err(error) => Err(error),
        }
    }

    /// The cache check of the task of `slot` (of type `Tk`, storing a `T`): a usable stored
    /// output is the output — for a keyed task, one made from the same things, within its
    /// maximum age. Also returns, for a keyed task, why it runs or is cached.
    pub(crate) async fn check<Tk, T>(&self, slot: &Slot) -> (Check<T>, Option<String>)
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let id = &*slot.id;
        if let Some(KeyedSpec {
            params: Err(message),
            ..
        }) = &slot.keyed
        {
            let error = DuraflowError::Encode {
                key: id.to_owned(),
                type_name: std::any::type_name::<Tk>(),
                source: rmp_serde::encode::Error::Syntax(message.clone()),
            };
            return (Check::Fail(error), None);
        }
        let found = match self.stored::<T>(id).await {
            Ok(found) => found,
            Err(error) => return (Check::Fail(error), None),
        };
        let digest_of = |up: &Slot| up.digest.get().copied().ok_or(Why::UpstreamUnknown);
        let keyed = slot.key(self.code_version(), digest_of);
        let Some(keyed) = keyed else {
            // A task added with `add`: cached by id.
            return match found {
                Found::Loaded(loaded) => {
                    slot.note(&loaded.value);
                    (Check::Cached(loaded), None)
                }
                Found::Absent | Found::Unusable(_) => (Check::Run(None), None),
            };
        };
        let task_type = slot.keyed.as_ref().map_or("", |spec| spec.task_type);
        let why = match (&keyed, &found) {
            (_, Found::Absent) => Why::NeverStored,
            (_, Found::Unusable(reason)) => Why::Unreadable(reason.clone()),
            (Err(why), _) => why.clone(),
            (Ok(now), Found::Loaded(loaded)) => {
                let max_age = self.max_age.get().copied();
                let at = fingerprint::now_ms();
                let version = slot.code_version(self.code_version());
                let block = loaded.block.as_deref();
                fingerprint::decide(now, task_type, version, block, at, max_age)
            }
        };
        // Only records keep the reason.
        let reason = self.log().is_some().then(|| why.to_string());
        match (why.runs(), found) {
            (false, Found::Loaded(loaded)) => {
                slot.note(&loaded.value);
                (Check::Cached(loaded), reason)
            }
            _ => (Check::Run(keyed.ok()), reason),
        }
    }

    /// Where processes share the store ([`RunLog::lease`]): this process's lease on task
    /// `id`, or [`Lease::Stored`] when its output was stored since the check (`seen`:
    /// the last such answer's `done`, if the caller checked again and still runs the task).
    /// `Held` at once for a store without a run log.
    ///
    /// # Errors
    /// The store's.
    pub(crate) async fn lease(&self, id: &str, seen: Option<u64>) -> Result<Lease, DuraflowError> {
        match self.log() {
            Some((log, _)) => log.lease(id, seen).await,
            None => Ok(Lease::Held),
        }
    }

    /// Gives up the lease on task `id`, if this process still holds it ([`RunLog::release`]).
    pub(crate) fn release(&self, id: &str) {
        if let Some((log, _)) = self.log() {
            log.release(id);
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
        keyed: Option<(&Key, &str, &str)>,
        attempt: &Attempt,
    ) -> (O, Result<(), DuraflowError>)
    where
        O: Send + 'static,
        K: OutputKind<O>,
    {
        // A keyed output carries its block: its fingerprint, when, and what it was made from.
        let made = keyed.map(|(key, task_type, version)| {
            fingerprint::block(key, task_type, version, fingerprint::now_ms())
        });
        let whole = match K::stored(&output) {
            Ok(value) => codec::encode_within(id, value, made.as_deref(), WHOLE_LIMIT),
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
                        Some(Ok(value)) => codec::write(&key, value, made.as_deref(), out),
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

/// The output stored under `id` in `ctx`, decoded as a `T` written by the same type, with
/// its size and made block: the one read of a stored output. A value over [`WHOLE_LIMIT`] is
/// decoded on duraflow's I/O threads (as it is read, when the store hands out a reader).
///
/// # Errors
/// The store's error, or the value's (`Corrupt`, `TypeMismatch`).
pub(crate) async fn load<T: DeserializeOwned + Send + 'static>(
    ctx: &Context,
    id: &str,
) -> Result<Option<Loaded<T>>, DuraflowError> {
    let stored = ctx.db.read_value(id).await?;
    let (value, size, block) = match stored {
        None => return Ok(None),
        Some(Stored::Bytes(bytes)) if bytes.len() <= WHOLE_LIMIT => {
            let (value, made) = codec::decode_made(id, &bytes, TypeCheck::Exact)?;
            (value, bytes.len(), made)
        }
        // Boxed: the future of every task's cache check stays as small as a small value's.
        Some(large) => Box::pin(decode_large(id.to_owned(), large)).await?,
    };
    Ok(Some(Loaded { value, size, block }))
}

/// Decodes `stored`, a value over [`WHOLE_LIMIT`] stored under `key`, on duraflow's I/O
/// threads (as it is read, when the store hands out a reader).
async fn decode_large<T: DeserializeOwned + Send + 'static>(
    key: String,
    stored: Stored,
) -> Result<(T, usize, Option<Vec<u8>>), DuraflowError> {
    match stored {
        Stored::Bytes(bytes) => {
            let len = bytes.len();
            let decoded = unblock(move || codec::decode_made(&key, &bytes, TypeCheck::Exact));
            let (value, made) = decoded.await?;
            Ok((value, len, made))
        }
        Stored::Reader { len, mut reader } => {
            let decoded =
                unblock(move || codec::read_made(&key, &mut reader, len, TypeCheck::Exact));
            let (value, made) = decoded.await?;
            Ok((value, len as usize, made))
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
