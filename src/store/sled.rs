//! [`SledStore`]: outputs, runs and attempts in one sled database, committed by one writer
//! thread in groups.

use std::fs;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::record::{now_ms, AttemptOutcome, AttemptRecord, RunId, RunRecord, RunStatus};
use crate::runlog::{Ticket, TicketSender};
use crate::{validate_key, DuraflowError, RunLog, Storage};

/// The on-disk format this code writes; kept in the `meta` tree.
const FORMAT_VERSION: u64 = 1;
/// Key of the format version in the `meta` tree: its presence marks a duraflow store.
const FORMAT_KEY: &[u8] = b"duraflow.format";
/// A file beside sled's own, written when the store is created: if it exists but sled
/// recovers no duraflow metadata, sled discarded damaged data and the store is `Corrupt`.
const MARKER_FILE: &str = "duraflow-store";
/// Separates a key from what follows it in record keys; never occurs in UTF-8.
const SEP: u8 = 0xFF;
/// The most messages one group commit takes.
const MAX_GROUP: usize = 4096;
/// sled's page cache by default here (sled's own default is 1 GiB).
const DEFAULT_CACHE: u64 = 64 * 1024 * 1024;

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
}

impl SledConfig {
    /// Options for the store at `path`: a 64 MiB page cache and [`Durability::Immediate`].
    pub fn new(path: impl AsRef<Path>) -> SledConfig {
        SledConfig {
            path: path.as_ref().to_owned(),
            cache_capacity: DEFAULT_CACHE,
            durability: Durability::Immediate,
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

    /// Opens (creating if needed) the store. Runs and attempts a killed process left
    /// `Running` are marked `Interrupted`.
    ///
    /// # Errors
    /// [`DuraflowError::StoreLocked`] when another handle (in this process or another)
    /// has the store open; [`DuraflowError::NotAStore`] when `path` is a plain file, a
    /// non-empty directory without a sled database, or a sled database that is not a
    /// duraflow store (nothing in it is changed); [`DuraflowError::Corrupt`] when sled finds
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

#[derive(Clone)]
struct Trees {
    outputs: sled::Tree,
    runs: sled::Tree,
    attempts: sled::Tree,
}

enum Op {
    Output(String, Vec<u8>),
    Run(RunId, Vec<u8>),
    Attempt { key: Vec<u8>, value: Vec<u8> },
}

struct Msg {
    ops: Vec<Op>,
    durable: bool,
    reply: Option<TicketSender>,
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
/// - One handle at a time: a second open of the same path fails with
///   [`DuraflowError::StoreLocked`].
/// - The executor is never blocked: reads run on duraflow's I/O threads, writes on the
///   writer thread.
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    trees: Trees,
    next_run: AtomicU64,
    writer: Option<crossbeam_channel::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
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
        let sled_config = sled::Config::new()
            .path(&path)
            .cache_capacity(config.cache_capacity)
            .flush_every_ms(match config.durability {
                Durability::Immediate => Some(500),
                Durability::Periodic(every) => Some(every.as_millis().max(1) as u64),
            });
        let db = match catch_unwind(AssertUnwindSafe(|| sled_config.open())) {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(open_error(&path, e)),
            Err(panic) => {
                return Err(DuraflowError::Corrupt {
                    key: String::new(),
                    path: Some(path),
                    reason: format!(
                        "sled panicked opening the database: {}",
                        panic_text(&*panic)
                    ),
                })
            }
        };
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
                    return Err(DuraflowError::NotAStore {
                        path,
                        reason: format!(
                            "written by format {found}; this version reads up to {FORMAT_VERSION}"
                        ),
                    });
                }
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
        let last_run = mark_interrupted(&trees).map_err(io)?;
        db.flush().map_err(io)?;

        let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
        let durable_flush = config.durability == Durability::Immediate;
        let (w_db, w_trees, w_path) = (db.clone(), trees.clone(), path.clone());
        let thread = std::thread::Builder::new()
            .name("duraflow-sled-writer".to_owned())
            .spawn(move || writer(w_db, w_trees, w_path, rx, durable_flush))
            .map_err(|e| DuraflowError::io(&path, e))?;
        Ok(SledStore {
            path,
            db,
            trees,
            next_run: AtomicU64::new(last_run + 1),
            writer: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, ops: Vec<Op>, durable: bool) -> Result<Ticket, DuraflowError> {
        let (ticket, reply) = Ticket::pending();
        let sent = self.writer.as_ref().map(|w| {
            w.send(Msg {
                ops,
                durable,
                reply: Some(reply),
            })
        });
        match sent {
            Some(Ok(())) => Ok(ticket),
            _ => Err(DuraflowError::io(
                &self.path,
                io::Error::other("the store's writer thread has stopped"),
            )),
        }
    }

    /// Every run, oldest first.
    ///
    /// # Errors
    /// [`DuraflowError::Io`] or [`DuraflowError::Corrupt`] from the database.
    pub fn runs(&self) -> Result<Vec<RunRecord>, DuraflowError> {
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

    /// One run and its attempts, or `None` if there is no run `id`.
    ///
    /// # Errors
    /// [`DuraflowError::Io`] or [`DuraflowError::Corrupt`] from the database.
    pub fn run(&self, id: RunId) -> Result<Option<RunDetails>, DuraflowError> {
        let Some(run) = self
            .trees
            .runs
            .get(id.to_be_bytes())
            .map_err(|e| sled_error(&self.path, e))?
        else {
            return Ok(None);
        };
        let run: RunRecord = decode_record(&self.path, "run", &run)?;
        let attempts = self
            .trees
            .attempts
            .scan_prefix(id.to_be_bytes())
            .values()
            .map(|v| {
                let v = v.map_err(|e| sled_error(&self.path, e))?;
                decode_record(&self.path, "attempt", &v)
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(RunDetails { run, attempts }))
    }

    /// Every attempt at task `key`, over all runs, oldest first.
    ///
    /// # Errors
    /// [`DuraflowError::InvalidKey`]; [`DuraflowError::Io`] or [`DuraflowError::Corrupt`]
    /// from the database.
    pub fn attempts_of(&self, key: &str) -> Result<Vec<AttemptRecord>, DuraflowError> {
        validate_key(key)?;
        let io = |e| sled_error(&self.path, e);
        let mut out = Vec::new();
        // One prefix scan per run: runs are few next to attempts, and no second index has to
        // be written with every attempt.
        for run in self.trees.runs.iter().keys() {
            let run = run.map_err(io)?;
            let mut prefix = run.to_vec();
            prefix.extend_from_slice(key.as_bytes());
            prefix.push(SEP);
            for v in self.trees.attempts.scan_prefix(&prefix).values() {
                out.push(decode_record(&self.path, "attempt", &v.map_err(io)?)?);
            }
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
        let _ = self.db.flush();
    }
}

impl Storage for SledStore {
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        validate_key(key)?;
        Ok(self
            .trees
            .outputs
            .get(key)
            .map_err(|e| sled_error(&self.path, e))?
            .map(|v| v.to_vec()))
    }

    /// Writes durably (flushed, whatever the [`Durability`]) before returning.
    fn write(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError> {
        validate_key(key)?;
        let ticket = self.send(vec![Op::Output(key.to_owned(), value.to_vec())], true)?;
        futures::executor::block_on(ticket)
    }

    fn remove(&self, key: &str) -> Result<bool, DuraflowError> {
        validate_key(key)?;
        let io = |e| sled_error(&self.path, e);
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
        let bytes = encode_record(&record)?;
        self.send(vec![Op::Run(id, bytes)], false)?;
        Ok(id)
    }

    fn record(&self, attempt: AttemptRecord) -> Result<(), DuraflowError> {
        let op = attempt_op(&attempt)?;
        self.send(vec![op], false).map(drop)
    }

    fn commit(
        &self,
        key: &str,
        value: Vec<u8>,
        attempt: AttemptRecord,
    ) -> Result<Ticket, DuraflowError> {
        validate_key(key)?;
        let op = attempt_op(&attempt)?;
        self.send(vec![Op::Output(key.to_owned(), value), op], true)
    }

    fn finish_run(&self, run: RunRecord) -> Result<Ticket, DuraflowError> {
        let bytes = encode_record(&run)?;
        self.send(vec![Op::Run(run.id, bytes)], true)
    }
}

/// The writer thread: applies queued messages in groups, one transaction per group, and
/// flushes once per group that holds a durable message.
fn writer(
    db: sled::Db,
    trees: Trees,
    path: PathBuf,
    rx: crossbeam_channel::Receiver<Msg>,
    flush_durable: bool,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(msg) => group.push(msg),
                Err(_) => break,
            }
        }
        let mut result = apply(&trees, &group).map_err(|e| match e {
            TransactionError::Storage(e) => e.to_string(),
            TransactionError::Abort(()) => "transaction aborted".to_owned(),
        });
        if result.is_ok() && flush_durable && group.iter().any(|m| m.durable) {
            result = db.flush().map(drop).map_err(|e| e.to_string());
        }
        for msg in group {
            if let Some(reply) = msg.reply {
                reply.send(
                    result
                        .clone()
                        .map_err(|reason| DuraflowError::io(&path, io::Error::other(reason))),
                );
            }
        }
    }
    let _ = db.flush();
}

/// Applies a group: records that stand alone are plain inserts (a sled batch or
/// transaction costs tens of microseconds per call, an insert a few); every commit (an
/// output with its attempt) goes in one transaction for the group, so no output exists
/// without its record.
fn apply(trees: &Trees, group: &[Msg]) -> Result<(), TransactionError<()>> {
    let is_commit = |m: &&Msg| m.ops.iter().any(|op| matches!(op, Op::Output(..)));
    for op in group.iter().filter(|m| !is_commit(m)).flat_map(|m| &m.ops) {
        match op {
            Op::Output(..) => {}
            Op::Run(id, value) => {
                trees.runs.insert(id.to_be_bytes(), value.as_slice())?;
            }
            Op::Attempt { key, value } => {
                trees.attempts.insert(key.as_slice(), value.as_slice())?;
            }
        }
    }
    let commits: Vec<&Msg> = group.iter().filter(is_commit).collect();
    if commits.is_empty() {
        return Ok(());
    }
    (&trees.outputs, &trees.attempts).transaction(|(outputs, attempts)| {
        for op in commits.iter().flat_map(|m| &m.ops) {
            match op {
                Op::Output(key, value) => {
                    outputs.insert(key.as_bytes(), value.as_slice())?;
                }
                Op::Attempt { key, value } => {
                    attempts.insert(key.as_slice(), value.as_slice())?;
                }
                Op::Run(..) => {}
            }
        }
        Ok::<(), ConflictableTransactionError<()>>(())
    })
}

/// Marks runs and attempts left `Running` as `Interrupted`; returns the highest run id.
fn mark_interrupted(trees: &Trees) -> Result<RunId, sled::Error> {
    let now = now_ms();
    let mut last = 0;
    for entry in trees.runs.iter() {
        let (k, v) = entry?;
        let Ok(mut run) = rmp_serde::from_slice::<RunRecord>(&v) else {
            continue;
        };
        last = last.max(run.id);
        if run.status != RunStatus::Running {
            continue;
        }
        run.status = RunStatus::Interrupted;
        run.finished_ms = Some(now);
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&k[..8.min(k.len())]);
        for a in trees.attempts.scan_prefix(prefix) {
            let (ak, av) = a?;
            let Ok(mut attempt) = rmp_serde::from_slice::<AttemptRecord>(&av) else {
                continue;
            };
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
                if let Ok(bytes) = rmp_serde::to_vec_named(&attempt) {
                    trees.attempts.insert(ak, bytes)?;
                }
            }
        }
        if let Ok(bytes) = rmp_serde::to_vec_named(&run) {
            trees.runs.insert(k, bytes)?;
        }
    }
    Ok(last)
}

/// `run (u64 BE) | key | 0xFF | attempt (u32 BE)`: a run's attempts are one prefix scan.
fn attempt_key(run: RunId, key: &str, attempt: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len() + 5);
    k.extend_from_slice(&run.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&attempt.to_be_bytes());
    k
}

fn attempt_op(attempt: &AttemptRecord) -> Result<Op, DuraflowError> {
    Ok(Op::Attempt {
        key: attempt_key(attempt.run, &attempt.key, attempt.attempt),
        value: encode_record(attempt)?,
    })
}

fn encode_record<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, DuraflowError> {
    rmp_serde::to_vec_named(record).map_err(|source| DuraflowError::Encode {
        key: "<record>".to_owned(),
        type_name: std::any::type_name::<T>(),
        source,
    })
}

fn decode_record<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    bytes: &[u8],
) -> Result<T, DuraflowError> {
    rmp_serde::from_slice(bytes).map_err(|e| DuraflowError::Corrupt {
        key: String::new(),
        path: Some(path.to_owned()),
        reason: format!("unreadable {what} record: {e}"),
    })
}

/// Refuses paths that are not (and cannot become) a duraflow store, before sled touches
/// them.
fn check_path(path: &Path) -> Result<(), DuraflowError> {
    let not_a_store = |reason: &str| DuraflowError::NotAStore {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
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
