//! Making a store's writes durable: sled's flush, with the data syncs sled leaves out, then
//! the commit number in the marker.
//!
//! sled 0.34's `flush` ends in `sync_file_range` on Linux, which flushes neither the
//! device's write cache nor the file's size and block map, and sled writes pages over about
//! 128 KiB to files under `blobs/` that it never fsyncs. [`Syncer::sync`] adds what a power
//! cut needs, in this order: the blob files new or grown since the last sync fsynced, and
//! `blobs/` if its entries changed (before sled's flush writes the log entries that refer
//! to them); sled's flush; the files new in the store's directory (snapshots) and the
//! directory itself if its entries changed; the database file `fdatasync`ed; and only then
//! the commit number recorded in the marker.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::layout::COMMIT_KEY;
use super::marker::{MarkerFile, MARKER_FILE};
use super::stop::{Failure, Shared};

/// Makes a store's writes durable, one sync at a time.
pub(super) struct Syncer {
    /// The number of the last durable commit.
    durable: AtomicU64,
    shared: Arc<Shared>,
    state: Mutex<State>,
}

struct State {
    db_file: File,
    marker: MarkerFile,
    /// The entries of the store's directory and of `blobs/` at the last sync.
    root: Listing,
    blobs: Listing,
}

/// A directory, and the regular files it held at the last sync with their lengths then.
struct Listing {
    dir: PathBuf,
    /// Files synced on their own, left out: the database file and the marker.
    skip: &'static [&'static str],
    files: BTreeMap<OsString, u64>,
    /// The other entries (directories, the files skipped).
    others: Vec<OsString>,
}

impl Syncer {
    /// A syncer for the store at `dir` whose last durable commit is `commit`. Its first
    /// [`sync`](Syncer::sync) syncs every file of the store: a process killed before its
    /// sync may have left files that never reached the disk.
    ///
    /// # Errors
    /// The I/O error opening the database file, its path in the text.
    pub(super) fn new(
        dir: &Path,
        commit: u64,
        marker: MarkerFile,
        shared: Arc<Shared>,
    ) -> io::Result<Syncer> {
        let db = dir.join("db");
        let db_file = File::open(&db).map_err(|e| with_path(&db, e))?;
        Ok(Syncer {
            durable: AtomicU64::new(commit),
            shared,
            state: Mutex::new(State {
                db_file,
                marker,
                root: Listing::new(dir.to_owned(), &["db", MARKER_FILE]),
                blobs: Listing::new(dir.join("blobs"), &[]),
            }),
        })
    }

    /// The number of the last durable commit: a write made now is durable at a later one.
    pub(super) fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Makes everything written to `db` so far durable: see the module docs. The commit
    /// number is kept in `meta` too, written before the flush, so an open can tell whether
    /// sled recovered the last commit the marker records. Refused once the store has
    /// stopped: sled's flush may never return after a failed write.
    ///
    /// # Errors
    /// The failure that stopped the store, or the error of this sync (which the caller
    /// stops the store with).
    pub(super) fn sync(&self, db: &sled::Db, meta: &sled::Tree) -> Result<(), Failure> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stopped) = self.shared.failed() {
            return Err(stopped.clone());
        }
        let commit = self.durable() + 1;
        let sled = |e: sled::Error| Failure::of(&e);
        let io = |e: io::Error| Failure::io(&e);
        meta.insert(COMMIT_KEY, &commit.to_be_bytes())
            .map_err(sled)?;
        state.blobs.sync_changes().map_err(io)?;
        db.flush().map_err(sled)?;
        state.root.sync_changes().map_err(io)?;
        state.db_file.sync_data().map_err(io)?;
        state.marker.record(commit).map_err(io)?;
        self.durable.store(commit, Ordering::Release);
        Ok(())
    }
}

impl Syncer {
    /// Writes the marker anew, saying `format` and the last durable commit (after an
    /// upgrade to `format` was synced).
    ///
    /// # Errors
    /// The I/O error, with the file's path in its text.
    pub(super) fn new_marker(&self, dir: &Path, format: u64) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.marker = MarkerFile::create(dir, format, self.durable())?;
        Ok(())
    }
}

impl Listing {
    fn new(dir: PathBuf, skip: &'static [&'static str]) -> Listing {
        Listing {
            dir,
            skip,
            files: BTreeMap::new(),
            others: Vec::new(),
        }
    }

    /// Fsyncs every regular file that is new or has another length since the last call
    /// (one still being written is synced again once it is complete), then the directory
    /// if its entries changed. A directory that does not exist (no blob yet) has no
    /// entries. Returns how many files it synced.
    fn sync_changes(&mut self) -> io::Result<usize> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(with_path(&self.dir, e)),
        };
        let (mut files, mut others) = (BTreeMap::new(), Vec::new());
        let mut synced = 0;
        for entry in entries {
            let entry = entry.map_err(|e| with_path(&self.dir, e))?;
            let name = entry.file_name();
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                others.push(name);
                continue;
            }
            if self.skip.iter().any(|s| name == *s) {
                others.push(name);
                continue;
            }
            let path = entry.path();
            let opened = File::open(&path).and_then(|f| {
                // The length before the sync: a file that grows meanwhile is synced again.
                let len = f.metadata()?.len();
                if self.files.get(&name) != Some(&len) {
                    f.sync_all()?;
                    synced += 1;
                }
                Ok(len)
            });
            match opened {
                Ok(len) => drop(files.insert(name, len)),
                // sled removed it meanwhile (a blob or snapshot replaced).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(&path, e)),
            }
        }
        others.sort();
        let changed = !files.keys().eq(self.files.keys()) || others != self.others;
        if changed {
            sync_dir(&self.dir)?;
        }
        (self.files, self.others) = (files, others);
        Ok(synced)
    }
}

/// `e`, with `path` in its text.
pub(super) fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Fsyncs the directory `dir`.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_is_synced_when_new_and_again_once_it_has_grown() {
        let dir = tempfile::tempdir().unwrap();
        let mut listing = Listing::new(dir.path().to_owned(), &[]);
        let mut file = File::create(dir.path().join("blob")).unwrap();
        file.write_all(b"half").unwrap();
        assert_eq!(listing.sync_changes().unwrap(), 1);
        assert_eq!(listing.sync_changes().unwrap(), 0, "nothing changed");
        file.write_all(b" and the rest").unwrap();
        assert_eq!(
            listing.sync_changes().unwrap(),
            1,
            "the grown file is synced again"
        );
    }
}
