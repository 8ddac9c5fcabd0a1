//! Opening a [`SledStore`]: its options, the checks before sled touches a path, sled's own
//! open, and the recovery of what a killed process left `Running`.

use std::fs;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::layout::{
    attempt_key, encode_record, run_attempts, OnUndecodable, Trees, FORMAT_KEY, FORMAT_VERSION,
};
use super::writer::{Shared, Writer};
use super::{registry, sled_error, Inner, SledStore};
use crate::record::{now_ms, AttemptOutcome, RunId, RunRecord, RunStatus};
use crate::DuraflowError;

/// A file beside sled's own, written when the store is created: if it exists but sled
/// recovers no duraflow metadata, sled discarded damaged data and the store is `Corrupt`.
const MARKER_FILE: &str = "duraflow-store";
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
    /// A store that this process closed (dropped) opens again at once: the drop waits (up
    /// to 2 s) until sled has released its lock.
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
        open_with(self)
    }
}

/// Opens the store `config` describes (see [`SledConfig::open`]).
fn open_with(config: SledConfig) -> Result<SledStore, DuraflowError> {
    let path = config.path.clone();
    check_path(&path)?;
    // The directory is created here rather than by sled, so that it has a canonical
    // path to register the open store under.
    let canonical = fs::create_dir_all(&path)
        .and_then(|()| fs::canonicalize(&path))
        .map_err(|e| DuraflowError::io(&path, e))?;
    let Some(mut claim) = registry::claim(&canonical) else {
        return Err(DuraflowError::StoreLocked { path });
    };
    let sled_config = sled::Config::new()
        .path(&path)
        .cache_capacity(config.cache_capacity)
        .flush_every_ms(match config.durability {
            Durability::Immediate => Some(500),
            Durability::Periodic(every) => Some(every.as_millis().max(1) as u64),
        });
    let db = match open_sled(&sled_config, &path) {
        Err(DuraflowError::Corrupt { .. }) if remove_torn_snapshots(&path)? => {
            open_sled(&sled_config, &path)?
        }
        opened => opened?,
    };
    // From here on sled has held the lock: dropping the claim waits for its release.
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

    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared::default());
    let writer = Writer {
        db: db.clone(),
        trees: trees.clone(),
        path: path.clone(),
        shared: Arc::clone(&shared),
    };
    let thread = std::thread::Builder::new()
        .name("duraflow-sled-writer".to_owned())
        .spawn(move || writer.run(rx))
        .map_err(|e| DuraflowError::io(&path, e))?;
    Ok(SledStore {
        inner: Arc::new(Inner {
            path,
            db,
            trees,
            shared,
        }),
        next_run: AtomicU64::new(last_run + 1),
        max_value_size: config.max_value_size,
        flush_commits: config.durability == Durability::Immediate,
        writer: Some(tx),
        thread: Some(thread),
        _claim: claim,
    })
}

/// Removes the snapshot files sled was still writing when its process was killed
/// (`snap.*.generating`), after sled refused to open: it opens the newest `snap.*` file it
/// finds, this one included, and fails when it is incomplete (sled#1527). sled renames a
/// snapshot only once it is complete, and keeps the previous one until then, so nothing is
/// lost. Returns whether it removed any.
fn remove_torn_snapshots(path: &Path) -> Result<bool, DuraflowError> {
    let entries = fs::read_dir(path).map_err(|e| DuraflowError::io(path, e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| DuraflowError::io(path, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            fs::remove_file(entry.path()).map_err(|e| DuraflowError::io(entry.path(), e))?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Opens sled's database, turning a panic into `Corrupt`.
fn open_sled(config: &sled::Config, path: &Path) -> Result<sled::Db, DuraflowError> {
    match catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(open_error(path, e)),
        Err(panic) => Err(DuraflowError::Corrupt {
            key: String::new(),
            path: Some(path.to_owned()),
            reason: format!(
                "sled panicked opening the database: {}",
                crate::durable::panic_message(&*panic)
            ),
        }),
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
                let key = attempt_key(attempt.run, &attempt.key, attempt.attempt);
                if let Ok(value) = encode_record(&attempt) {
                    trees.attempts.insert(key, value).map_err(io)?;
                }
            }
        }
        if let Ok(bytes) = encode_record(&run) {
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
    let bytes = match fs::read(&marker) {
        Ok(bytes) => bytes,
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
    let text = String::from_utf8_lossy(&bytes);
    let digits = text.split_once("format ").map(|(_, rest)| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits
    });
    Ok(digits.and_then(|d| d.parse().ok()))
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
