//! Outputs too large to keep in sled's tree: files under `outputs/`, each named by the
//! BLAKE3 hash of its bytes, so identical outputs share one file.
//!
//! A file is written to a temporary file in the same directory, fsynced, renamed to its
//! digest and the directory fsynced, all before the commit that refers to it is sent to the
//! writer: a crash can leave a file no output refers to (removed by gc), never a reference
//! to a missing file. A read checks the file's length and digest.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::sync::{sync_dir, with_path};

/// The directory, in the store's, that holds the output files.
pub(super) const DIR: &str = "outputs";
/// The prefix of temporary files.
const TEMP: &str = ".tmp-";

/// A BLAKE3 hash (32 bytes).
pub(super) type Digest = [u8; 32];

/// A digest whose file gc leaves alone while this lives: from before the file is written
/// until its commit is applied and durable (or abandoned).
pub(super) struct Held {
    blobs: Arc<Blobs>,
    pub(super) digest: Digest,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut in_flight = self.blobs.lock();
        if let Some(n) = in_flight.digests.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                in_flight.digests.remove(&self.digest);
            }
        }
    }
}

/// The output files of one store.
pub(super) struct Blobs {
    dir: PathBuf,
    /// Files being written or waiting for their commit, by digest (with how many writers),
    /// and temporary files being written: gc leaves them alone.
    in_flight: Mutex<InFlight>,
    next_temp: AtomicU64,
}

#[derive(Default)]
struct InFlight {
    digests: HashMap<Digest, usize>,
    temps: HashSet<String>,
}

/// What [`Blobs::gc`] removed.
#[derive(Debug, Default)]
pub(super) struct Collected {
    pub(super) files: usize,
    pub(super) bytes: u64,
}

impl Blobs {
    /// The output files of the store at `store`, whose directory is created (durably) if
    /// needed.
    ///
    /// # Errors
    /// The I/O error, its path in the text.
    pub(super) fn open(store: &Path) -> io::Result<Blobs> {
        let dir = store.join(DIR);
        if fs::symlink_metadata(&dir).is_err() {
            fs::create_dir(&dir).map_err(|e| with_path(&dir, e))?;
            sync_dir(store)?;
        }
        let blobs = Blobs {
            dir,
            in_flight: Mutex::default(),
            next_temp: AtomicU64::new(0),
        };
        blobs.remove_temps()?;
        Ok(blobs)
    }

    /// The file of `digest`.
    pub(super) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(hex(digest))
    }

    /// Stores `bytes` durably under their digest (one file for identical outputs), and
    /// returns the digest held (gc leaves its file alone) until the [`Held`] is dropped,
    /// with the CRC-32 of the bytes.
    ///
    /// # Errors
    /// The I/O error, its path in the text; the digest is then not held.
    pub(super) fn put(self: &Arc<Self>, bytes: &[u8]) -> io::Result<(Held, u32)> {
        let digest: Digest = *blake3::hash(bytes).as_bytes();
        *self.lock().digests.entry(digest).or_default() += 1;
        let held = Held {
            blobs: Arc::clone(self),
            digest,
        };
        self.write(&digest, bytes)?;
        Ok((held, crc32fast::hash(bytes)))
    }

    /// Writes the file of `digest` anew even when there is one (it may be damaged): the
    /// rename replaces it atomically with the same bytes.
    fn write(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        let target = self.path(digest);
        let name = format!(
            "{TEMP}{}-{}",
            std::process::id(),
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        );
        let temp = self.dir.join(&name);
        self.lock().temps.insert(name.clone());
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .map_err(|e| with_path(&temp, e))
            .and_then(|()| fs::rename(&temp, &target).map_err(|e| with_path(&target, e)))
            .and_then(|()| sync_dir(&self.dir));
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        self.lock().temps.remove(&name);
        written
    }

    /// The bytes of the file of `digest`, checked: `Err` says what is wrong (the file is
    /// missing, of another length, or not what its name says).
    pub(super) fn get(&self, digest: &Digest, len: u64) -> Result<Vec<u8>, String> {
        let path = self.path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err("its file is missing".to_owned())
            }
            Err(e) => return Err(format!("its file cannot be read: {e}")),
        };
        if bytes.len() as u64 != len {
            return Err(format!(
                "its file holds {} bytes, not the {len} stored",
                bytes.len()
            ));
        }
        if blake3::hash(&bytes).as_bytes() != digest {
            return Err("its file's bytes do not match their digest".to_owned());
        }
        Ok(bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the temporary files a killed process left: at open, when the store is this
    /// process's alone.
    fn remove_temps(&self) -> io::Result<()> {
        for entry in fs::read_dir(&self.dir).map_err(|e| with_path(&self.dir, e))? {
            let entry = entry.map_err(|e| with_path(&self.dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(TEMP) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| with_path(&path, e))?;
            }
        }
        Ok(())
    }

    /// Removes every file no output refers to (`referenced`, read once every commit sent
    /// before is applied and durable) and no write holds, and every temporary file no write
    /// of this process is writing. Each file is checked and removed under the lock that
    /// [`put`](Self::put) takes, so a write of the same digest waits for its removal.
    ///
    /// # Errors
    /// The I/O error, its path in the text.
    pub(super) fn gc(&self, referenced: &HashSet<Digest>) -> io::Result<Collected> {
        let mut collected = Collected::default();
        for entry in fs::read_dir(&self.dir).map_err(|e| with_path(&self.dir, e))? {
            let entry = entry.map_err(|e| with_path(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let in_flight = self.lock();
            let unused = match parse_hex(name) {
                Some(digest) => {
                    !referenced.contains(&digest) && !in_flight.digests.contains_key(&digest)
                }
                None => name.starts_with(TEMP) && !in_flight.temps.contains(name),
            };
            if !unused {
                continue;
            }
            let path = entry.path();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {
                    collected.files += 1;
                    collected.bytes += len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(&path, e)),
            }
        }
        if collected.files > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(collected)
    }
}

fn hex(digest: &Digest) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(name: &str) -> Option<Digest> {
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut digest = [0; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_outputs_share_a_file_and_a_flipped_byte_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(Blobs::open(dir.path()).unwrap());
        let bytes = vec![7u8; 100_000];
        let (a, _) = blobs.put(&bytes).unwrap();
        let (b, _) = blobs.put(&bytes).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(fs::read_dir(dir.path().join(DIR)).unwrap().count(), 1);
        assert_eq!(blobs.get(&a.digest, bytes.len() as u64).unwrap(), bytes);
        let mut damaged = bytes.clone();
        damaged[500] ^= 1;
        fs::write(blobs.path(&a.digest), damaged).unwrap();
        assert!(blobs.get(&a.digest, bytes.len() as u64).is_err());
    }

    #[test]
    fn gc_removes_only_files_nothing_refers_to_or_holds() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(Blobs::open(dir.path()).unwrap());
        // Released once written, as after their commits.
        let kept = blobs.put(b"kept").unwrap().0.digest;
        let orphan = blobs.put(b"orphan").unwrap().0.digest;
        let (held, _) = blobs.put(b"held").unwrap();
        fs::write(
            dir.path().join(DIR).join(".tmp-1-0"),
            b"left by a killed process",
        )
        .unwrap();
        let collected = blobs.gc(&HashSet::from([kept])).unwrap();
        assert_eq!(
            collected.files, 2,
            "the orphan and the stale temporary file"
        );
        assert!(blobs.path(&kept).exists() && blobs.path(&held.digest).exists());
        assert!(!blobs.path(&orphan).exists());
    }

    #[test]
    fn temporary_files_a_killed_process_left_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Blobs::open(dir.path()).unwrap());
        let temp = dir.path().join(DIR).join(".tmp-1-0");
        fs::write(&temp, b"left by a killed process").unwrap();
        let blobs = Arc::new(Blobs::open(dir.path()).unwrap());
        assert!(!temp.exists());
        blobs.put(b"the first write of the next process").unwrap();
    }
}
