//! Outputs too large to keep in sled's tree: files under `outputs/`, each named by the
//! BLAKE3 hash of its bytes, so identical outputs share one file.
//!
//! A file is written to a temporary file in the same directory, fsynced, renamed to its
//! digest and the directory fsynced, all before the commit that refers to it is sent to the
//! writer: a crash can leave a file no output refers to (removed by gc), never a reference
//! to a missing file. A read checks the file's length and digest.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::sync::{sync_dir, with_path};
use crate::store::value::carry;
use crate::DuraflowError;

/// The directory, in the store's, that holds the output files.
pub(super) const DIR: &str = "outputs";
/// The prefix of temporary files.
const TEMP: &str = ".tmp-";

/// A BLAKE3 hash (32 bytes).
pub(super) type Digest = [u8; 32];

/// A digest whose file gc leaves alone while this lives: from just before the file is
/// renamed to its digest until its commit is applied and durable (or abandoned).
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
    /// Files waiting for their commit, by digest (with how many writers), and temporary
    /// files being written: gc leaves them alone.
    in_flight: Mutex<InFlight>,
}

/// Numbers the temporary files of every store of this process: a store dropped and opened
/// again while a write of the old handle is still running never reuses its name.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

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
        };
        blobs.remove_temps()?;
        Ok(blobs)
    }

    /// The file of `digest`.
    pub(super) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(hex(digest))
    }

    /// Stores `bytes` durably under their digest (one file for identical outputs): see
    /// [`BlobWriter::finish`].
    ///
    /// # Errors
    /// The I/O error, its path in the text.
    pub(super) fn put(self: &Arc<Self>, bytes: &[u8]) -> io::Result<Written> {
        let mut writer = self.writer()?;
        writer.write_all(bytes)?;
        writer.finish()
    }

    /// A new file, written as its bytes come.
    ///
    /// # Errors
    /// The I/O error, its path in the text.
    pub(super) fn writer(self: &Arc<Self>) -> io::Result<BlobWriter> {
        let name = format!(
            "{TEMP}{}-{}",
            std::process::id(),
            NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
        );
        let temp = self.dir.join(&name);
        self.lock().temps.insert(name.clone());
        let file = OpenOptions::new().write(true).create_new(true).open(&temp);
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                self.lock().temps.remove(&name);
                return Err(with_path(&temp, e));
            }
        };
        Ok(BlobWriter {
            blobs: Arc::clone(self),
            file: Some(file),
            temp,
            name,
            hasher: blake3::Hasher::new(),
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    /// A reader of the file of `digest`, which holds `len` bytes: it checks the digest when
    /// it reaches the end, and fails then with `Corrupt` naming `key` and the file. `Err`
    /// says what is wrong (the file is missing, or of another length).
    pub(super) fn reader(
        &self,
        digest: &Digest,
        len: u64,
        key: &str,
    ) -> Result<BlobReader, String> {
        let path = self.path(digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err("its file is missing".to_owned())
            }
            Err(e) => return Err(format!("its file cannot be read: {e}")),
        };
        let found = file
            .metadata()
            .map_err(|e| format!("its file cannot be read: {e}"))?
            .len();
        if found != len {
            return Err(format!(
                "its file holds {found} bytes, not the {len} stored"
            ));
        }
        Ok(BlobReader {
            file: file.take(len),
            hasher: blake3::Hasher::new(),
            digest: *digest,
            key: key.to_owned(),
            path,
        })
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
    /// [`BlobWriter::finish`] takes to hold its digest before its rename, so a write of the
    /// same digest waits for its removal.
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

/// A file of [`Blobs`] being written: a temporary file (created by this writer) until
/// [`finish`](Self::finish) names it by its digest; dropped unfinished, it is removed.
pub(super) struct BlobWriter {
    blobs: Arc<Blobs>,
    /// `None` once finished.
    file: Option<File>,
    temp: PathBuf,
    name: String,
    hasher: blake3::Hasher,
    crc: crc32fast::Hasher,
    len: u64,
}

/// A file [`BlobWriter::finish`] wrote.
pub(super) struct Written {
    /// Its digest, held until this is dropped.
    pub(super) held: Held,
    /// The CRC-32 of its bytes.
    pub(super) crc: u32,
    /// Its length.
    pub(super) len: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("the file is finished"));
        };
        let n = file.write(buf).map_err(|e| with_path(&self.temp, e))?;
        self.hasher.update(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter {
    /// Makes the file durable under its digest: fsynced, its digest held (gc leaves it
    /// alone while the returned [`Written`] lives), renamed to its digest (replacing a file
    /// of the same digest, which may be damaged, atomically with the same bytes), and the
    /// directory fsynced.
    ///
    /// # Errors
    /// The I/O error, its path in the text; the digest is then not held, and the file is
    /// removed (or, when only the directory's sync failed, left for gc).
    pub(super) fn finish(mut self) -> io::Result<Written> {
        let synced = self.file.take().map_or(Ok(()), |f| f.sync_all());
        synced.map_err(|e| with_path(&self.temp, e))?;
        let digest: Digest = *self.hasher.finalize().as_bytes();
        *self.blobs.lock().digests.entry(digest).or_default() += 1;
        let held = Held {
            blobs: Arc::clone(&self.blobs),
            digest,
        };
        let target = self.blobs.path(&digest);
        fs::rename(&self.temp, &target).map_err(|e| with_path(&target, e))?;
        sync_dir(&self.blobs.dir)?;
        Ok(Written {
            held,
            crc: self.crc.clone().finalize(),
            len: self.len,
        })
    }
}

impl Drop for BlobWriter {
    /// Removes the temporary file (gone already once renamed) and forgets its name.
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.temp);
        self.blobs.lock().temps.remove(&self.name);
    }
}

/// Where a value goes as it is written: memory while it is at most `threshold` bytes (it is
/// then kept in sled's tree), a file of [`Blobs`] once it is more.
pub(super) struct Spill {
    blobs: Arc<Blobs>,
    threshold: usize,
    /// The store's maximum value size, if it has one.
    max: Option<usize>,
    to: SpillTo,
}

enum SpillTo {
    Memory(Vec<u8>),
    File(Box<BlobWriter>),
}

/// Where a [`Spill`] put its value.
pub(super) enum Spilled {
    /// In memory: the value is at most the threshold.
    Memory(Vec<u8>),
    /// In a file, durable.
    File(Written),
}

impl Spill {
    /// A value of the store whose files are `blobs`, kept in memory up to `threshold` bytes,
    /// refused over `max`.
    pub(super) fn new(blobs: Arc<Blobs>, threshold: usize, max: Option<usize>) -> Spill {
        Spill {
            blobs,
            threshold,
            max,
            to: SpillTo::Memory(Vec::new()),
        }
    }

    /// Where the value is: in memory, or in its file made durable ([`BlobWriter::finish`]).
    ///
    /// # Errors
    /// The I/O error, its path in the text.
    pub(super) fn finish(self) -> io::Result<Spilled> {
        match self.to {
            SpillTo::Memory(bytes) => Ok(Spilled::Memory(bytes)),
            SpillTo::File(file) => file.finish().map(Spilled::File),
        }
    }
}

impl Write for Spill {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = match &self.to {
            SpillTo::Memory(bytes) => bytes.len(),
            SpillTo::File(file) => usize::try_from(file.len).unwrap_or(usize::MAX),
        };
        if let Some(max) = self.max {
            if len.saturating_add(buf.len()) > max {
                return Err(over_max(len.saturating_add(buf.len()), max));
            }
        }
        if let SpillTo::Memory(bytes) = &mut self.to {
            if bytes.len() + buf.len() > self.threshold {
                let mut file = self.blobs.writer()?;
                file.write_all(bytes)?;
                self.to = SpillTo::File(Box::new(file));
            }
        }
        match &mut self.to {
            SpillTo::Memory(bytes) => {
                bytes.extend_from_slice(buf);
                Ok(buf.len())
            }
            SpillTo::File(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The error of a value of (at least) `len` bytes, over a store's maximum of `max`.
pub(super) fn over_max(len: usize, max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "the value is {len} bytes or more, over this store's maximum value size of {max} \
             bytes (SledConfig::max_value_size)"
        ),
    )
}

/// Reads a file of [`Blobs`], checking its digest at the end.
pub(super) struct BlobReader {
    file: io::Take<File>,
    hasher: blake3::Hasher,
    digest: Digest,
    key: String,
    path: PathBuf,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let corrupt = |reason: &str| {
            carry(DuraflowError::Corrupt {
                key: self.key.clone(),
                path: Some(self.path.clone()),
                reason: reason.to_owned(),
            })
        };
        let read = self.file.read(buf);
        let n = read.map_err(|e| carry(DuraflowError::io(&self.path, e)))?;
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            if self.file.limit() > 0 {
                return Err(corrupt("its file is shorter than the value stored"));
            }
            if self.hasher.finalize().as_bytes() != &self.digest {
                return Err(corrupt("its file's bytes do not match their digest"));
            }
        }
        Ok(n)
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
        let a = blobs.put(&bytes).unwrap().held;
        let b = blobs.put(&bytes).unwrap().held;
        assert_eq!(a.digest, b.digest);
        assert_eq!(fs::read_dir(dir.path().join(DIR)).unwrap().count(), 1);
        let len = bytes.len() as u64;
        let read = |blobs: &Blobs| {
            let mut back = Vec::new();
            let mut reader = blobs.reader(&a.digest, len, "k")?;
            reader.read_to_end(&mut back).map_err(|e| e.to_string())?;
            Ok::<_, String>(back)
        };
        assert_eq!(read(&blobs).unwrap(), bytes);
        let mut damaged = bytes.clone();
        damaged[500] ^= 1;
        fs::write(blobs.path(&a.digest), damaged).unwrap();
        let error = read(&blobs).unwrap_err();
        assert!(error.contains("do not match their digest"), "{error}");
        fs::write(blobs.path(&a.digest), &bytes[1..]).unwrap();
        assert!(read(&blobs).unwrap_err().contains("not the 100000 stored"));
    }

    #[test]
    fn gc_removes_only_files_nothing_refers_to_or_holds() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(Blobs::open(dir.path()).unwrap());
        // Released once written, as after their commits.
        let kept = blobs.put(b"kept").unwrap().held.digest;
        let orphan = blobs.put(b"orphan").unwrap().held.digest;
        let held = blobs.put(b"held").unwrap().held;
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
