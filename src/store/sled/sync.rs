//! Making a store's writes durable: sled's flush, then the data syncs sled leaves out,
//! then the commit number in the marker.
//!
//! sled 0.34's `flush` ends in `sync_file_range` on Linux, which flushes neither the
//! device's write cache nor the file's size and block map, and sled writes pages over about
//! 128 KiB to files under `blobs/` that it never fsyncs. [`Syncer::sync`] adds what a power
//! cut needs, in this order: every file new since the last sync (blobs, snapshots) fsynced,
//! every directory whose entries changed fsynced, the database file `fdatasync`ed, and only
//! then the commit number recorded in the marker.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use super::layout::COMMIT_KEY;
use super::marker::MarkerFile;

/// Makes a store's writes durable, one sync at a time.
pub(super) struct Syncer {
    state: Mutex<State>,
}

struct State {
    /// The number of the last durable commit.
    commit: u64,
    db_file: File,
    marker: MarkerFile,
    /// The entries of the store's directory and of `blobs/` at the last sync.
    root: Listing,
    blobs: Listing,
}

/// A directory and the names it held at the last sync.
struct Listing {
    dir: PathBuf,
    names: BTreeSet<OsString>,
}

impl Syncer {
    /// A syncer for the store at `dir` whose last durable commit is `commit`. Its first
    /// [`sync`](Syncer::sync) syncs every file of the store: a process killed before its
    /// sync may have left files that never reached the disk.
    ///
    /// # Errors
    /// The I/O error opening the database file, its path in the text.
    pub(super) fn new(dir: &Path, commit: u64, marker: MarkerFile) -> io::Result<Syncer> {
        let db = dir.join("db");
        let db_file = File::open(&db).map_err(|e| with_path(&db, e))?;
        Ok(Syncer {
            state: Mutex::new(State {
                commit,
                db_file,
                marker,
                root: Listing::new(dir.to_owned()),
                blobs: Listing::new(dir.join("blobs")),
            }),
        })
    }

    /// Makes everything written to `db` so far durable: see the module docs. The commit
    /// number is kept in `meta` too, written before the flush, so an open can tell whether
    /// sled recovered the last commit the marker records.
    ///
    /// # Errors
    /// sled's error, or an I/O error with the path of the file in its text.
    pub(super) fn sync(&self, db: &sled::Db, meta: &sled::Tree) -> Result<(), sled::Error> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let commit = state.commit + 1;
        meta.insert(COMMIT_KEY, &commit.to_be_bytes())?;
        db.flush()?;
        state.blobs.sync_changes()?;
        state.root.sync_changes()?;
        state.db_file.sync_data()?;
        state.marker.record(commit)?;
        state.commit = commit;
        Ok(())
    }
}

impl Listing {
    fn new(dir: PathBuf) -> Listing {
        Listing {
            dir,
            names: BTreeSet::new(),
        }
    }

    /// Fsyncs every regular file that is new since the last call, then the directory if
    /// its entries changed. A directory that does not exist (no blob yet) has no entries.
    fn sync_changes(&mut self) -> io::Result<()> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(with_path(&self.dir, e)),
        };
        let mut names = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| with_path(&self.dir, e))?;
            let name = entry.file_name();
            let path = entry.path();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && !self.names.contains(&name) {
                match File::open(&path).and_then(|f| f.sync_all()) {
                    Ok(()) => {}
                    // sled removed it meanwhile (a blob or snapshot replaced).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(with_path(&path, e)),
                }
            }
            names.insert(name);
        }
        if names != self.names {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| with_path(&self.dir, e))?;
            self.names = names;
        }
        Ok(())
    }
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
