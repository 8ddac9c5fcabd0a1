//! [`SledStore`]: outputs, runs and attempts in one sled database, committed by one writer
//! thread in groups.

mod gc;
pub use self::gc::GcStats;
mod layout;
mod registry;
mod writer;

use std::fs;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::layout::{
    attempt_key, decode_record, encode_attempt, encode_record, key_attempts, run_attempts,
    CachedAttempt, OnUndecodable, Trees, FORMAT_KEY, FORMAT_VERSION,
};
use self::writer::{Commit, Failure, Msg, Record, Reply, Shared, Tree, Writer};
use crate::record::{now_ms, AttemptOutcome, AttemptRecord, RunId, RunRecord, RunStatus};
use crate::runlog::Ticket;
use crate::{validate_key, DuraflowError, RunLog, Storage};

/// A file beside sled's own, written when the store is created: if it exists but sled
/// recovers no duraflow metadata, sled discarded damaged data and the store is `Corrupt`.
const MARKER_FILE: &str = "duraflow-store";
/// sled's page cache by default here (sled's own default is 1 GiB).
const DEFAULT_CACHE: u64 = 64 * 1024 * 1024;
/// Longest pause between two tries of sled's lock while a handle this process closed lets
/// go of it.
const MAX_LOCK_BACKOFF: Duration = Duration::from_millis(50);

/// When a [`SledStore`] makes committed outputs durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Every commit is flushed to disk before it is acknowledged, so a task's progress is
    /// reported only once its output survives a crash. Concurrent commits share one flush
    /// (group commit). The default.
    Immediate,
    /// Commits are acknowledged once applied in memory; sled flushes every given interval.
    /// Faster, but a crash can lose up to that much finished work, which then runs again
    /// (a progress callback may have reported it already).
    Periodic(Duration),
}

/// Options for opening a [`SledStore`].
#[derive(Debug, Clone)]
pub struct SledConfig {
    path: PathBuf,
    cache_capacity: u64,
    durability: Durability,
    max_value_size: usize,
}

impl SledConfig {
    /// The largest output a store accepts unless
    /// [`max_value_size`](SledConfig::max_value_size) says otherwise: 16 MiB. sled keeps a
    /// value whole in its page cache and rewrites it whenever its page is rewritten, so
    /// outputs of many megabytes are better kept in files, with their paths as the output.
    pub const DEFAULT_MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;

    /// Options for the store at `path`: a 64 MiB page cache, [`Durability::Immediate`], and
    /// values up to [`SledConfig::DEFAULT_MAX_VALUE_SIZE`].
    pub fn new(path: impl AsRef<Path>) -> SledConfig {
        SledConfig {
            path: path.as_ref().to_owned(),
            cache_capacity: DEFAULT_CACHE,
            durability: Durability::Immediate,
            max_value_size: SledConfig::DEFAULT_MAX_VALUE_SIZE,
        }
    }

    /// Sets sled's page cache size in bytes.
    pub fn cache_capacity(mut self, bytes: u64) -> SledConfig {
        self.cache_capacity = bytes;
        self
    }

    /// Sets when commits become durable.
    pub fn durability(mut self, durability: Durability) -> SledConfig {
        self.durability = durability;
        self
    }

    /// Sets the largest value the store accepts, in bytes: the encoded output plus
    /// duraflow's envelope of a few dozen bytes (the type name and a checksum). A larger
    /// output is refused with [`DuraflowError::Persist`] naming its key (its source gives
    /// both sizes), and the value stored before, if any, stays.
    pub fn max_value_size(mut self, bytes: usize) -> SledConfig {
        self.max_value_size = bytes;
        self
    }

    /// Opens (creating if needed) the store. Runs and attempts a killed process left
    /// `Running` are marked `Interrupted`.
    ///
    /// A store that this process closed (dropped) a moment ago opens again: sled releases
    /// its lock a little after the drop, and the open waits for that (up to 2 s).
    ///
    /// # Errors
    /// [`DuraflowError::StoreLocked`] when another handle (in this process or another)
    /// has the store open, or a handle of this process stopped after a failed write (its
    /// database stays open until the process exits); [`DuraflowError::NotAStore`] when `path` is a plain file, a
    /// non-empty directory without a sled database, or a sled database that is not a
    /// duraflow store (nothing in it is changed); [`DuraflowError::UnsupportedFormat`] for a
    /// store written by a newer format (see `migrations/README.md`; refused before sled opens
    /// it, so nothing in it is changed); [`DuraflowError::Corrupt`] when sled finds
    /// the database damaged; [`DuraflowError::Io`] for other I/O failures.
    pub fn open(self) -> Result<SledStore, DuraflowError> {
        SledStore::open_with(self)
    }
}

/// A run with all its attempts, from [`SledStore::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunDetails {
    /// The run.
    pub run: RunRecord,
    /// Its attempts, ordered by key, then attempt number.
    pub attempts: Vec<AttemptRecord>,
}

/// A [`Storage`] and [`RunLog`] in one sled database (sled 0.34), reused across process
/// restarts.
///
/// # Guarantees
/// - A task's output and its `Succeeded` attempt record are written in one sled
///   transaction: after a crash both exist or neither does.
/// - With [`Durability::Immediate`] (the default) a commit is on disk (flushed) before it
///   is acknowledged, so a task whose progress was reported is never executed again after
///   a crash. Concurrent commits are applied and flushed together by one writer thread.
/// - Other attempt records are durable no later than the next commit: those of cached
///   tasks are stored many to a value, so a cached re-run costs little more than its reads.
/// - With [`Durability::Immediate`], a run's final record is on disk when its DAG's run
///   returns, except for a run that executed and failed nothing (every task came from the
///   store): its record and its `Cached` attempts are stored then (a query sees them) and
///   reach the disk with sled's next flush, within 500 ms. After a crash in between, that
///   run shows `Interrupted`, or is not recorded at all (and its id goes to the next run);
///   every output it returned was on disk before it began.
/// - One handle at a time: a second open of the same path fails with
///   [`DuraflowError::StoreLocked`]; once the handle is dropped, the store can be opened
///   again at once.
/// - A value larger than [`SledConfig::max_value_size`] is refused and the previous value
///   kept.
/// - A write the disk refuses (full, failing) is an error ([`DuraflowError::Persist`] for a
///   task's output) and the previous value stays. sled does not always recover from such a
///   failure, so the handle then refuses every later write with the same error, and dropping
///   it leaves sled's database open (its lock held) until the process exits: reopen the
///   store in a new process once the disk has room.
/// - The executor is never blocked: reads run on duraflow's I/O threads, writes on the
///   writer thread.
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    trees: Trees,
    next_run: AtomicU64,
    max_value_size: usize,
    /// Whether commits wait for a flush.
    flush_commits: bool,
    /// What the store shares with its writer thread.
    shared: Arc<Shared>,
    writer: Option<crossbeam_channel::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    /// This process's claim on the store; the last field, so it is dropped after the
    /// database, and marks the store closed.
    _claim: registry::Claim,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (creating if needed) the store at `path` with the default [`SledConfig`].
    ///
    /// # Errors
    /// As [`SledConfig::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<SledStore, DuraflowError> {
        SledConfig::new(path).open()
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_with(config: SledConfig) -> Result<SledStore, DuraflowError> {
        let path = config.path.clone();
        check_path(&path)?;
        // The directory is created here rather than by sled, so that it has a canonical
        // path to register the open store under.
        let canonical = fs::create_dir_all(&path)
            .and_then(|()| fs::canonicalize(&path))
            .map_err(|e| DuraflowError::io(&path, e))?;
        let Some((mut claim, release_by)) = registry::claim(&canonical) else {
            return Err(DuraflowError::StoreLocked { path });
        };
        let sled_config = sled::Config::new()
            .path(&path)
            .cache_capacity(config.cache_capacity)
            .flush_every_ms(match config.durability {
                Durability::Immediate => Some(500),
                Durability::Periodic(every) => Some(every.as_millis().max(1) as u64),
            });
        let db = open_sled(&sled_config, &path, release_by)?;
        // From here on sled has held the lock: dropping the claim records a close.
        claim.opened();
        let io = |e: sled::Error| sled_error(&path, e);
        // Look before touching: opening a tree creates it.
        let names = db.tree_names();
        let has_meta = names.iter().any(|n| n.as_ref() == b"meta");
        let has_data = names.len() > 1 || !db.is_empty();
        if db.was_recovered() && has_data && !has_meta {
            return Err(DuraflowError::NotAStore {
                path,
                reason: "a sled database that is not a duraflow store".to_owned(),
            });
        }
        let meta = db.open_tree("meta").map_err(io)?;
        match meta.get(FORMAT_KEY).map_err(io)? {
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                if found > FORMAT_VERSION {
                    return Err(unsupported(&path, found));
                }
                // Older formats would be upgraded here, one step per file of
                // `migrations/sled/`, each in one transaction with the new version. Format 1
                // is the first: there is none yet.
            }
            None if has_meta => {
                return Err(DuraflowError::NotAStore {
                    path,
                    reason: "a sled database that is not a duraflow store".to_owned(),
                });
            }
            // sled treats a damaged log as the end of the log and opens what precedes it,
            // possibly nothing: our marker says there was a store here.
            None if path.join(MARKER_FILE).exists() => {
                return Err(DuraflowError::Corrupt {
                    key: String::new(),
                    path: Some(path),
                    reason: "sled recovered no duraflow metadata from this store: its \
                             database files are damaged"
                        .to_owned(),
                });
            }
            None => {
                meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                    .map_err(io)?;
                db.flush().map_err(io)?;
                write_marker(&path)?;
            }
        }
        let trees = Trees {
            outputs: db.open_tree("outputs").map_err(io)?,
            runs: db.open_tree("runs").map_err(io)?,
            attempts: db.open_tree("attempts").map_err(io)?,
        };
        let last_run = mark_interrupted(&trees, &path)?;
        db.flush().map_err(io)?;

        let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
        let shared = Arc::new(Shared::default());
        let writer = Writer::new(db.clone(), trees.clone(), path.clone(), Arc::clone(&shared))
            .map_err(io)?;
        let thread = std::thread::Builder::new()
            .name("duraflow-sled-writer".to_owned())
            .spawn(move || writer.run(rx))
            .map_err(|e| DuraflowError::io(&path, e))?;
        Ok(SledStore {
            path,
            db,
            trees,
            next_run: AtomicU64::new(last_run + 1),
            max_value_size: config.max_value_size,
            flush_commits: config.durability == Durability::Immediate,
            shared,
            writer: Some(tx),
            thread: Some(thread),
            _claim: claim,
        })
    }

    /// Hands `msg` to the writer thread; refused once the store has stopped after a failure.
    fn send(&self, msg: Msg) -> Result<(), DuraflowError> {
        if let Some(failure) = self.shared.failed.get() {
            return Err(failure.error(&self.path, true));
        }
        match self.writer.as_ref().map(|w| w.send(msg)) {
            Some(Ok(())) => Ok(()),
            _ => Err(DuraflowError::io(
                &self.path,
                io::Error::other("the store's writer thread has stopped"),
            )),
        }
    }

    /// Keeps a `Cached` attempt for the writer's next batch, nudging it when needed.
    fn keep_cached(&self, attempt: CachedAttempt) -> Result<(), DuraflowError> {
        // A stopped store takes nothing more (nor would its writer ever store it).
        if self.writer.is_none() || self.shared.failed.get().is_some() {
            return self.send(Msg::CachedKept); // the error
        }
        if self.shared.cached.push(attempt) {
            self.send(Msg::CachedKept)?;
        }
        Ok(())
    }

    /// Hands a message that is answered to the writer; the ticket resolves with the answer.
    fn send_acked(
        &self,
        msg: impl FnOnce(Reply) -> Msg,
        flush: bool,
    ) -> Result<Ticket, DuraflowError> {
        let (ticket, to) = Ticket::pending();
        self.send(msg(Reply { flush, to }))?;
        Ok(ticket)
    }

    /// Refuses a value over the configured maximum.
    fn check_size(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError> {
        if value.len() <= self.max_value_size {
            return Ok(());
        }
        Err(DuraflowError::Persist {
            key: key.to_owned(),
            source: Box::new(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the value is {} bytes, over this store's maximum value size of {} bytes \
                     (SledConfig::max_value_size)",
                    value.len(),
                    self.max_value_size
                ),
            )),
        })
    }

    /// Refuses a query once the store has stopped after a failed write: sled may hold
    /// records of the failed group in memory that never reached the disk.
    fn queryable(&self) -> Result<(), DuraflowError> {
        match self.shared.failed.get() {
            Some(failure) => Err(failure.error(&self.path, true)),
            None => Ok(()),
        }
    }

    /// Every run, oldest first.
    ///
    /// # Errors
    /// [`DuraflowError::Io`] or [`DuraflowError::Corrupt`] from the database;
    /// [`DuraflowError::Io`] once the store has stopped after a failed write (reopen it in a
    /// new process).
    pub fn runs(&self) -> Result<Vec<RunRecord>, DuraflowError> {
        self.queryable()?;
        self.trees
            .runs
            .iter()
            .values()
            .map(|v| {
                let v = v.map_err(|e| sled_error(&self.path, e))?;
                decode_record(&self.path, "run", &v)
            })
            .collect()
    }

    /// One run and its attempts, or `None` if there is no run `id`. Attempt records reach
    /// the database in the background: those of a finished run (one whose `dag.run`
    /// returned) are all there.
    ///
    /// # Errors
    /// As [`runs`](SledStore::runs).
    pub fn run(&self, id: RunId) -> Result<Option<RunDetails>, DuraflowError> {
        self.queryable()?;
        let Some(run) = self
            .trees
            .runs
            .get(id.to_be_bytes())
            .map_err(|e| sled_error(&self.path, e))?
        else {
            return Ok(None);
        };
        let run: RunRecord = decode_record(&self.path, "run", &run)?;
        let attempts = run_attempts(&self.trees, &self.path, id, OnUndecodable::Fail)?;
        Ok(Some(RunDetails { run, attempts }))
    }

    /// Every attempt at task `key`, over all runs, oldest first.
    ///
    /// # Errors
    /// [`DuraflowError::InvalidKey`]; otherwise as [`runs`](SledStore::runs).
    pub fn attempts_of(&self, key: &str) -> Result<Vec<AttemptRecord>, DuraflowError> {
        validate_key(key)?;
        self.queryable()?;
        let mut out = Vec::new();
        // A scan per run: runs are few next to attempts, and no second index has to be
        // written with every attempt.
        for run in self.trees.runs.iter().keys() {
            let run = run.map_err(|e| sled_error(&self.path, e))?;
            let Ok(run) = <[u8; 8]>::try_from(run.as_ref()) else {
                continue;
            };
            out.extend(key_attempts(
                &self.trees,
                &self.path,
                RunId::from_be_bytes(run),
                key,
            )?);
        }
        Ok(out)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer apply what is queued, flush, and stop.
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if self.shared.failed.get().is_some() {
            // sled may not recover from the failure, and dropping its last handle flushes,
            // which can then wait forever: leave the database open (and its lock held)
            // until the process exits.
            std::mem::forget(self.db.clone());
            std::mem::forget(self.trees.clone());
            self._claim.leaked();
            return;
        }
        let _ = self.db.flush();
    }
}

impl Storage for SledStore {
    /// Once the store has stopped after a failed write, an output that write did not
    /// store reads as its value before it (never as the value that failed).
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        validate_key(key)?;
        if self.shared.failed.get().is_some() {
            if let Some(prior) = self.shared.shadowed(key) {
                return Ok(prior);
            }
        }
        Ok(self
            .trees
            .outputs
            .get(key)
            .map_err(|e| sled_error(&self.path, e))?
            .map(|v| v.to_vec()))
    }

    /// Writes durably (flushed, whatever the [`Durability`]) before returning. A value over
    /// [`SledConfig::max_value_size`] is refused with [`DuraflowError::Persist`].
    fn write(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError> {
        validate_key(key)?;
        self.check_size(key, value)?;
        let output = (key.to_owned(), value.to_vec());
        let ticket = self.send_acked(
            |reply| {
                Msg::Commit(Box::new(Commit {
                    output,
                    attempt: None,
                    reply,
                }))
            },
            true,
        )?;
        futures::executor::block_on(ticket)
    }

    fn remove(&self, key: &str) -> Result<bool, DuraflowError> {
        validate_key(key)?;
        if let Some(failure) = self.shared.failed.get() {
            return Err(failure.error(&self.path, true));
        }
        let io = |e: sled::Error| {
            self.shared.failed.get_or_init(|| Failure::of(&e));
            sled_error(&self.path, e)
        };
        let removed = self.trees.outputs.remove(key).map_err(io)?.is_some();
        self.db.flush().map_err(io)?;
        Ok(removed)
    }

    fn keys(&self) -> Result<Vec<String>, DuraflowError> {
        self.trees
            .outputs
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(|e| sled_error(&self.path, e))?;
                String::from_utf8(k.to_vec()).map_err(|_| DuraflowError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    path: Some(self.path.clone()),
                    reason: "stored key is not UTF-8".to_owned(),
                })
            })
            .collect()
    }

    fn kind(&self) -> &'static str {
        "sled"
    }

    /// Yes: a sled read of a cached page takes a microsecond or two, less than handing it
    /// to an I/O thread and back, so a run's first tasks get their reads in batches.
    fn read_ahead(&self) -> bool {
        true
    }

    fn run_log(&self) -> Option<&dyn RunLog> {
        Some(self)
    }
}

impl RunLog for SledStore {
    fn begin_run(&self, started_ms: u64) -> Result<RunId, DuraflowError> {
        let id = self.next_run.fetch_add(1, Ordering::SeqCst);
        let record = RunRecord {
            id,
            started_ms,
            finished_ms: None,
            status: RunStatus::Running,
            executed: 0,
            cached: 0,
            failed: 0,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.send(Msg::Record(Record {
            tree: Tree::Runs,
            key: id.to_be_bytes().to_vec(),
            value: encode_record(&record)?,
        }))?;
        Ok(id)
    }

    /// A `Cached` attempt is stored later in a batch with others, a `Running` one when the
    /// writer next applies a group unless the attempt's commit replaces it first (either way
    /// before the next commit's ticket resolves); any other is queued as its own record.
    fn record(&self, attempt: AttemptRecord) -> Result<(), DuraflowError> {
        if attempt.outcome == AttemptOutcome::Running {
            if self.writer.is_none() {
                return self.send(Msg::RunningKept); // the error
            }
            let key = attempt_key(attempt.run, &attempt.key, attempt.attempt);
            if self.shared.running.push(key, attempt) {
                self.send(Msg::RunningKept)?;
            }
            return Ok(());
        }
        if attempt.outcome == AttemptOutcome::Cached {
            return self.keep_cached(CachedAttempt::from(&attempt));
        }
        self.send(Msg::Record(attempt_record(&attempt)?))
    }

    /// A `Cached` attempt is kept with the run's shared id (see [`record`](RunLog::record)
    /// for when it is stored); any other is recorded as by `record`.
    fn record_shared(&self, key: &Arc<str>, attempt: AttemptRecord) -> Result<(), DuraflowError> {
        if attempt.outcome != AttemptOutcome::Cached {
            return self.record(AttemptRecord {
                key: key.to_string(),
                ..attempt
            });
        }
        self.keep_cached(CachedAttempt::new(Arc::clone(key), &attempt))
    }

    fn commit(
        &self,
        key: &str,
        value: Vec<u8>,
        attempt: AttemptRecord,
    ) -> Result<Ticket, DuraflowError> {
        validate_key(key)?;
        self.check_size(key, &value)?;
        let Record {
            key: attempt_key,
            value: attempt_value,
            ..
        } = attempt_record(&attempt)?;
        // The attempt's `Running` record, if still kept, would only be overwritten.
        self.shared.running.remove(&attempt_key);
        let output = (key.to_owned(), value);
        self.send_acked(
            |reply| {
                Msg::Commit(Box::new(Commit {
                    output,
                    attempt: Some((attempt_key, attempt_value)),
                    reply,
                }))
            },
            self.flush_commits,
        )
    }

    fn finish_run(&self, run: RunRecord) -> Result<Ticket, DuraflowError> {
        let record = Record {
            tree: Tree::Runs,
            key: run.id.to_be_bytes().to_vec(),
            value: encode_record(&run)?,
        };
        // A run that changed nothing on disk is not worth a flush of its own: its records
        // are stored before the ticket resolves and flushed by sled's flusher.
        let changed = run.executed > 0 || run.failed > 0;
        self.send_acked(
            |reply| Msg::Acked(Box::new((record, reply))),
            self.flush_commits && changed,
        )
    }
}

/// The record of `attempt`, under its key in the `attempts` tree.
fn attempt_record(attempt: &AttemptRecord) -> Result<Record, DuraflowError> {
    Ok(Record {
        tree: Tree::Attempts,
        key: attempt_key(attempt.run, &attempt.key, attempt.attempt),
        value: encode_attempt(attempt)?,
    })
}

/// Opens sled's database, turning a panic into `Corrupt`. While `release_by` is in the
/// future (this process closed the store a moment ago), a lock error is sled's lock not yet
/// released and the open is tried again, with growing pauses, until then.
fn open_sled(
    config: &sled::Config,
    path: &Path,
    release_by: Option<Instant>,
) -> Result<sled::Db, DuraflowError> {
    let mut pause = Duration::from_millis(1);
    loop {
        match catch_unwind(AssertUnwindSafe(|| config.open())) {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(e)) => match open_error(path, e) {
                DuraflowError::StoreLocked { .. }
                    if release_by.is_some_and(|by| Instant::now() < by) =>
                {
                    let left = release_by
                        .map(|by| by.saturating_duration_since(Instant::now()))
                        .unwrap_or_default();
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(MAX_LOCK_BACKOFF);
                }
                other => return Err(other),
            },
            Err(panic) => {
                return Err(DuraflowError::Corrupt {
                    key: String::new(),
                    path: Some(path.to_owned()),
                    reason: format!(
                        "sled panicked opening the database: {}",
                        panic_text(&*panic)
                    ),
                })
            }
        }
    }
}

/// Marks runs and attempts left `Running` as `Interrupted` (rebuilding a run's counts from
/// its attempts); returns the highest run id.
fn mark_interrupted(trees: &Trees, path: &Path) -> Result<RunId, DuraflowError> {
    let io = |e| sled_error(path, e);
    let now = now_ms();
    let mut last = 0;
    for entry in trees.runs.iter() {
        let (k, v) = entry.map_err(io)?;
        let Ok(mut run) = rmp_serde::from_slice::<RunRecord>(&v) else {
            continue;
        };
        last = last.max(run.id);
        if run.status != RunStatus::Running {
            continue;
        }
        run.status = RunStatus::Interrupted;
        run.finished_ms = Some(now);
        for mut attempt in run_attempts(trees, path, run.id, OnUndecodable::Skip)? {
            // The run's counts were to be written at its end: rebuild them from its attempts.
            match attempt.outcome {
                AttemptOutcome::Succeeded => run.executed += 1,
                AttemptOutcome::Cached => run.cached += 1,
                AttemptOutcome::Failed { .. } => run.failed += 1,
                _ => {}
            }
            if attempt.outcome == AttemptOutcome::Running {
                attempt.outcome = AttemptOutcome::Interrupted;
                attempt.finished_ms = Some(now);
                if let Ok(record) = attempt_record(&attempt) {
                    trees
                        .attempts
                        .insert(record.key, record.value)
                        .map_err(io)?;
                }
            }
        }
        if let Ok(bytes) = rmp_serde::to_vec_named(&run) {
            trees.runs.insert(k, bytes).map_err(io)?;
        }
    }
    Ok(last)
}

/// Refuses paths that are not (and cannot become) a duraflow store, before sled touches
/// them.
fn check_path(path: &Path) -> Result<(), DuraflowError> {
    let not_a_store = |reason: &str| DuraflowError::NotAStore {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    // A store of a newer format is refused before sled (which may write while it recovers)
    // or anything else touches it; the marker says the format.
    if let Some(found) = marker_format(path)? {
        if found > FORMAT_VERSION {
            return Err(unsupported(path, found));
        }
    }
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(path).map_err(|e| DuraflowError::io(path, e))?;
            let empty = entries.next().is_none();
            if !empty && !path.join("conf").exists() {
                return Err(not_a_store(
                    "a non-empty directory that holds no sled database",
                ));
            }
            Ok(())
        }
        Ok(_) => Err(not_a_store("a file, not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DuraflowError::io(path, e)),
    }
}

/// The format the marker file at `path` records: `None` without a marker (or one of no
/// format, as a damaged one), which the open then judges by sled's own metadata.
fn marker_format(path: &Path) -> Result<Option<u64>, DuraflowError> {
    let marker = path.join(MARKER_FILE);
    let text = match fs::read_to_string(&marker) {
        Ok(text) => text,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(DuraflowError::io(&marker, e)),
    };
    Ok(text
        .split_once("format ")
        .map(|(_, rest)| {
            rest.bytes()
                .take_while(u8::is_ascii_digit)
                .collect::<Vec<u8>>()
        })
        .and_then(|digits| String::from_utf8(digits).ok()?.parse().ok()))
}

fn unsupported(path: &Path, found: u64) -> DuraflowError {
    DuraflowError::UnsupportedFormat {
        path: path.to_owned(),
        found: u32::try_from(found).unwrap_or(u32::MAX),
        supported: FORMAT_VERSION as u32,
    }
}

fn write_marker(path: &Path) -> Result<(), DuraflowError> {
    let marker = path.join(MARKER_FILE);
    let text = format!("duraflow-rs store, format {FORMAT_VERSION}; the data is in sled's files\n");
    fs::File::create(&marker)
        .and_then(|mut f| {
            io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| fs::File::open(path)?.sync_all())
        .map_err(|e| DuraflowError::io(&marker, e))
}

fn open_error(path: &Path, e: sled::Error) -> DuraflowError {
    match e {
        sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
            DuraflowError::StoreLocked {
                path: path.to_owned(),
            }
        }
        other => sled_error(path, other),
    }
}

fn sled_error(path: &Path, e: sled::Error) -> DuraflowError {
    match e {
        sled::Error::Io(source) => DuraflowError::io(path, source),
        sled::Error::Corruption { at, .. } => DuraflowError::Corrupt {
            key: String::new(),
            path: Some(path.to_owned()),
            reason: format!("sled reports corruption at {at:?}"),
        },
        other => DuraflowError::io(path, io::Error::other(other.to_string())),
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
