//! Opening a [`SledStore`]: its options, the checks before sled touches a path, sled's own
//! open, and the recovery of what a killed process left `Running`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::blob::Blobs;
use super::layout::{
    attempt_key, encode_record, run_attempts, OnUndecodable, Trees, COMMIT_KEY, FORMAT_KEY,
    FORMAT_VERSION,
};
use super::marker::{self, Marker, MarkerFile};
use super::stop::{inside_sled, Shared};
use super::sync::Syncer;
use super::writer::Writer;
use crate::store::create_dir_durably;

#[path = "../../../migrations/sled/0002_witnesses.rs"]
mod to_2;
#[path = "../../../migrations/sled/0003_output_files.rs"]
mod to_3;
use super::{registry, sled_error, Inner, SledStore};
use crate::record::{now_ms, AttemptOutcome, RunId, RunRecord, RunStatus};
use crate::DuraflowError;

/// sled's page cache by default here (sled's own default is 1 GiB).
const DEFAULT_CACHE: u64 = 64 * 1024 * 1024;

/// When a [`SledStore`] makes committed outputs durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Every commit is on stable storage before it is acknowledged (see [`SledStore`]'s
    /// guarantees), so a task's progress is reported only once its output survives a crash
    /// or a power cut. Concurrent commits share one sync (group commit). The default.
    Immediate,
    /// Commits are acknowledged once applied in memory; sled flushes and fsyncs its
    /// database every given interval. Faster, but a crash can lose up to that much finished
    /// work, which then runs again (a progress callback may have reported it already); a
    /// power cut can lose more, as sled's blob files are synced only by the store's own
    /// syncs (writes through [`Storage`](crate::Storage), removals, closing the store).
    /// The commit number in the marker counts only those syncs, so a store that lost work
    /// of the interval still opens, without it.
    Periodic(Duration),
}

/// Options for opening a [`SledStore`].
#[derive(Debug, Clone)]
pub struct SledConfig {
    path: PathBuf,
    cache_capacity: u64,
    durability: Durability,
    max_value_size: Option<usize>,
    blob_threshold: usize,
    rebuild_marker: bool,
}

impl SledConfig {
    /// The size over which an output is kept in a file of its own unless
    /// [`blob_threshold`](SledConfig::blob_threshold) says otherwise: 64 KiB. Smaller
    /// outputs are cheaper in sled's tree (a file costs three fsyncs of its own); larger
    /// ones cost less as files, which sled neither caches nor rewrites with their page.
    pub const DEFAULT_BLOB_THRESHOLD: usize = 64 * 1024;

    /// Options for the store at `path`: a 64 MiB page cache, [`Durability::Immediate`],
    /// outputs over [`SledConfig::DEFAULT_BLOB_THRESHOLD`] in files of their own, and no
    /// limit on the size of an output but the disk.
    pub fn new(path: impl AsRef<Path>) -> SledConfig {
        SledConfig {
            path: path.as_ref().to_owned(),
            cache_capacity: DEFAULT_CACHE,
            durability: Durability::Immediate,
            max_value_size: None,
            blob_threshold: SledConfig::DEFAULT_BLOB_THRESHOLD,
            rebuild_marker: false,
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
    /// the limit, and the size the value reached), and the value stored before, if any,
    /// stays. No limit by default.
    pub fn max_value_size(mut self, bytes: usize) -> SledConfig {
        self.max_value_size = Some(bytes);
        self
    }

    /// Sets the size in bytes over which an output (as stored: encoded, in its envelope)
    /// is kept in a file of its own under `outputs/` in the store's directory, named by its
    /// BLAKE3 hash, rather than in sled's tree; identical outputs share one file. Outputs
    /// already stored stay where they are.
    pub fn blob_threshold(mut self, bytes: usize) -> SledConfig {
        self.blob_threshold = bytes;
        self
    }

    /// Opens a store whose marker file (`duraflow-store`, which numbers the last commit the
    /// store acknowledged) is missing or damaged, trusting sled's database as sled
    /// recovers it, and writes the marker anew. Off by default: without the marker, a
    /// database that lost acknowledged commits cannot be told from an intact one, and the
    /// open is [`DuraflowError::Corrupt`].
    pub fn rebuild_marker(mut self, rebuild: bool) -> SledConfig {
        self.rebuild_marker = rebuild;
        self
    }

    /// Opens (creating if needed) the store, upgrading one of an older format (see
    /// `migrations/README.md`). Runs and attempts a killed process left `Running` are
    /// marked `Interrupted`.
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
    /// the database damaged, or without the last commit the marker records;
    /// [`DuraflowError::Io`] for other I/O failures.
    pub fn open(self) -> Result<SledStore, DuraflowError> {
        open_with(self)
    }
}

/// Opens the store `config` describes (see [`SledConfig::open`]).
fn open_with(config: SledConfig) -> Result<SledStore, DuraflowError> {
    let path = config.path.clone();
    let marker = check_path(&path)?;
    // The directory is created here rather than by sled, so that it has a canonical
    // path to register the open store under.
    let canonical = create_dir(&path)?;
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
    let recovered = inside_sled(|| recover(&db, &path, marker, &config))
        .unwrap_or_else(|panic| Err(panicked(&path, panic)))?;
    let Recovered {
        trees,
        blobs,
        shared,
        syncer,
        acknowledged,
        last_run,
    } = recovered;
    let (tx, rx) = mpsc::channel();
    let syncer = Arc::new(syncer);
    let writer = Writer {
        db: db.clone(),
        trees: trees.clone(),
        shared: Arc::clone(&shared),
        syncer: Arc::clone(&syncer),
        blobs: Arc::clone(&blobs),
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
            syncer,
            acknowledged,
            blobs,
        }),
        next_run: AtomicU64::new(last_run + 1),
        max_value_size: config.max_value_size,
        blob_threshold: config.blob_threshold,
        flush_commits: config.durability == Durability::Immediate,
        writer: Some(tx),
        thread: Some(thread),
        _claim: claim,
    })
}

/// Creates the store's directory if needed (durably), and returns its canonical path.
fn create_dir(path: &Path) -> Result<PathBuf, DuraflowError> {
    create_dir_durably(path)?;
    fs::canonicalize(path).map_err(|e| DuraflowError::io(path, e))
}

/// What [`recover`] found and set up.
struct Recovered {
    trees: Trees,
    blobs: Arc<Blobs>,
    shared: Arc<Shared>,
    syncer: Syncer,
    /// The last commit the store had acknowledged.
    acknowledged: u64,
    /// The highest run id.
    last_run: RunId,
}

/// Decides what sled opened (a duraflow store, a new one, or neither) before touching it;
/// checks it against the marker (`marker`: what it said before the open); upgrades an
/// older format; marks what a killed process left `Running` as `Interrupted`; and makes
/// all of it durable.
fn recover(
    db: &sled::Db,
    path: &Path,
    marker: Option<Marker>,
    config: &SledConfig,
) -> Result<Recovered, DuraflowError> {
    let io = |e: sled::Error| sled_error(path, e);
    let corrupt = |reason: String| DuraflowError::Corrupt {
        key: String::new(),
        path: Some(path.to_owned()),
        reason,
    };
    // The marker numbers the last commit the store acknowledged: a store that numbers one
    // was set up, and sled must hold it.
    let acknowledged = marker.as_ref().and_then(|m| m.commit);
    let set_up = marker.is_some() && acknowledged != Some(0);
    // Look before touching: opening a tree creates it, and sled writes it out.
    let names = db.tree_names();
    let has_meta = names.iter().any(|n| n.as_ref() == b"meta");
    let meta = has_meta
        .then(|| db.open_tree("meta"))
        .transpose()
        .map_err(io)?;
    let format = match &meta {
        Some(meta) => meta.get(FORMAT_KEY).map_err(io)?,
        None => None,
    };
    // Nothing but sled's default tree, empty, and perhaps an empty `meta`: a new store, or
    // one whose first open was interrupted.
    let blank = db.is_empty()
        && meta.as_ref().is_none_or(|m| m.is_empty())
        && names.len() <= 1 + usize::from(has_meta);
    let found = match format {
        Some(v) => {
            let found = v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            if found > FORMAT_VERSION {
                return Err(unsupported(path, found));
            }
            Some(found)
        }
        // sled treats a damaged log as the end of the log and opens what precedes it,
        // possibly nothing: the marker says there was a store here.
        None if set_up => {
            return Err(corrupt(
                "sled recovered no duraflow metadata from this store: its database files \
                 are damaged"
                    .to_owned(),
            ));
        }
        None if !blank => {
            return Err(DuraflowError::NotAStore {
                path: path.to_owned(),
                reason: "a sled database that is not a duraflow store".to_owned(),
            })
        }
        None => None,
    };
    let meta = db.open_tree("meta").map_err(io)?;
    let trees = Trees {
        meta: meta.clone(),
        outputs: db.open_tree("outputs").map_err(io)?,
        witnesses: db.open_tree("witnesses").map_err(io)?,
        runs: db.open_tree("runs").map_err(io)?,
        attempts: db.open_tree("attempts").map_err(io)?,
    };
    let recovered = match meta.get(COMMIT_KEY).map_err(io)? {
        Some(v) => v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
            corrupt(format!(
                "the commit number in sled's metadata is damaged: {v:?}"
            ))
        })?,
        None => 0,
    };
    match acknowledged {
        Some(acknowledged) if acknowledged > recovered => {
            return Err(corrupt(format!(
                "the store acknowledged commit {acknowledged}, but sled recovered its \
                 database only up to commit {recovered}: its files are damaged or were \
                 rolled back (restore them from a backup, or remove the store)"
            )));
        }
        None if recovered > 0 && !config.rebuild_marker => {
            return Err(corrupt(
                "the marker file `duraflow-store`, which numbers the last commit the store \
                 acknowledged, is missing or damaged, so whether the database lost commits \
                 cannot be told (SledConfig::rebuild_marker opens it as sled recovers it)"
                    .to_owned(),
            ));
        }
        _ => {}
    }
    // Only a store that passed the checks above is changed.
    let blobs = Arc::new(Blobs::open(path).map_err(|e| DuraflowError::io(path, e))?);
    match found {
        None => drop(
            meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                .map_err(io)?,
        ),
        // One step per file of `migrations/sled/`, from the store's format up.
        Some(found) if found < FORMAT_VERSION => {
            tracing::info!(store = %path.display(), from = found, "upgrading the store");
            if found < 2 {
                to_2::upgrade(&trees, path)?;
            }
            to_3::upgrade(&trees, &blobs, config.blob_threshold, path)?;
        }
        Some(_) => {}
    }
    let marker_file = match marker {
        Some(m) if m.current && found.is_none_or(|f| f == FORMAT_VERSION) => {
            MarkerFile::open(path)?
        }
        old => {
            if old.is_some_and(|m| m.format.is_none() || m.commit.is_none()) {
                tracing::warn!(store = %path.display(), "the store's marker file was damaged or old; writing it anew");
            }
            // The format sled holds durably: an upgrade's is written once it is synced.
            let format = found.unwrap_or(FORMAT_VERSION);
            MarkerFile::create(path, format, recovered).map_err(|e| DuraflowError::io(path, e))?
        }
    };
    let last_run = mark_interrupted(&trees, path)?;
    let shared = Arc::new(Shared::new(path.to_owned()));
    let syncer = Syncer::new(path, recovered, marker_file, Arc::clone(&shared))
        .map_err(|e| DuraflowError::io(path, e))?;
    syncer
        .sync(db, &meta)
        .map_err(|failure| failure.error(path, false))?;
    if found.is_some_and(|f| f < FORMAT_VERSION) {
        syncer
            .new_marker(path, FORMAT_VERSION)
            .map_err(|e| DuraflowError::io(path, e))?;
    }
    Ok(Recovered {
        trees,
        blobs,
        shared,
        syncer,
        acknowledged: acknowledged.unwrap_or(recovered),
        last_run,
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
    match inside_sled(|| config.open()) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(open_error(path, e)),
        Err(panic) => Err(panicked(path, panic)),
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
/// them; returns the store's marker, if it has one.
fn check_path(path: &Path) -> Result<Option<Marker>, DuraflowError> {
    let not_a_store = |reason: &str| DuraflowError::NotAStore {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    // A store of a newer format is refused before sled (which may write while it recovers)
    // or anything else touches it; the marker says the format.
    let marker = marker::read(path)?;
    if let Some(found) = marker.as_ref().and_then(|m| m.format) {
        if found > FORMAT_VERSION {
            return Err(unsupported(path, found));
        }
    }
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(path).map_err(|e| DuraflowError::io(path, e))?;
            let empty = entries.next().is_none();
            if !empty && marker.is_none() && !path.join("conf").exists() {
                return Err(not_a_store(
                    "a non-empty directory that holds no sled database",
                ));
            }
            Ok(marker)
        }
        Ok(_) => Err(not_a_store("a file, not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DuraflowError::io(path, e)),
    }
}

/// The store at `path` is damaged: sled panicked (`panic`) opening or reading it.
fn panicked(path: &Path, panic: String) -> DuraflowError {
    DuraflowError::Corrupt {
        key: String::new(),
        path: Some(path.to_owned()),
        reason: panic,
    }
}

fn unsupported(path: &Path, found: u64) -> DuraflowError {
    DuraflowError::UnsupportedFormat {
        path: path.to_owned(),
        found: u32::try_from(found).unwrap_or(u32::MAX),
        supported: FORMAT_VERSION as u32,
    }
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
