//! [`FileStore`]: one directory per key, atomic and durable writes, one writer per root.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use super::value::{carried, carry, WHOLE_LIMIT};
use super::{create_dir_durably, unblock, unblock_on, StoreFuture};
use crate::{validate_key, DuraflowError, Storage, Stored, Value, MAX_KEY_LEN};

/// Name of the lock file at the root; held with an exclusive `flock` while a store is open,
/// as the root directory itself is.
const LOCK_FILE: &str = ".lock";
/// The manifest at the root, written by [`write_manifest`] with the store's format.
const MANIFEST: &str = ".duraflow-format";
/// The format this version writes and reads (older ones are upgraded on open; see
/// `migrations/`).
pub(crate) const FORMAT: u32 = 1;
/// While a 1.x upgrade finishes: the 1.x files still to move aside.
const UPGRADE_LIST: &str = ".duraflow-upgrade";

#[path = "../../migrations/filestore/0001_from_duraflow_1x.rs"]
mod from_1x;

/// Writes the manifest of this version's format at `root`, durably: the store's commit point.
fn write_manifest(root: &Path) -> Result<(), DuraflowError> {
    let text = format!("duraflow filestore format {FORMAT}\n");
    write_small_file(&root.join(MANIFEST), text.as_bytes())
}

/// The format the manifest at `root` records, `None` when there is no manifest.
fn read_manifest(root: &Path) -> Result<Option<u32>, DuraflowError> {
    let path = root.join(MANIFEST);
    if !holds(&path, Want::File, "")? {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).map_err(|e| DuraflowError::io(&path, e))?;
    text.trim_end()
        .strip_prefix("duraflow filestore format ")
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| DuraflowError::Corrupt {
            key: String::new(),
            path: Some(path.clone()),
            reason: format!("unreadable format manifest {text:?}"),
        })
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, dir fsync.
fn write_small_file(path: &Path, bytes: &[u8]) -> Result<(), DuraflowError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    create_temp(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| DuraflowError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| DuraflowError::io(path, e))?;
    sync_dir(dir)
}

/// The file inside a key's directory that holds its value.
const VALUE_FILE: &str = "value";
/// Where a new value is written before it is renamed over [`VALUE_FILE`].
const TEMP_FILE: &str = "value.tmp";
/// Magic at the start of every value file.
const RECORD_MAGIC: &[u8; 4] = b"DFK1";
/// The magic and key length that start every value file.
const RECORD_HEADER: usize = 8;
/// Directory names longer than this are replaced by a hash of the key (file systems allow 255).
const MAX_NAME_LEN: usize = 200;
/// Writers of the same key are serialised in-process by one of this many mutexes.
const STRIPES: usize = 64;

/// A [`Storage`] that keeps each key in its own directory under a root directory.
///
/// # Layout
/// `ROOT/.duraflow-format` records the store's format (see `migrations/README.md`); the
/// root directory and `ROOT/.lock` are held locked while the store is open; after an
/// upgrade from duraflow-rs 1.x, `ROOT/.duraflow-1x/` holds the 1.x files. Key `k` lives in
/// `ROOT/<name>/value`, where `<name>` is `k-` followed by `k`'s UTF-8 bytes with every byte
/// outside `[a-z0-9-]` written as `_` and two lowercase hex digits: `a/b` → `k-a_2fb`,
/// `..` → `k-_2e_2e`. The encoding is injective, never yields `.`, `..` or a separator, and
/// keeps keys distinct on case-insensitive file systems. Names longer than 200 bytes become
/// `h-` and the SHA-256 of the key; the full key is stored in the file and checked on read.
///
/// # Guarantees
/// - **Atomic and durable**: a value is written to a temporary file in the key's directory,
///   fsynced, renamed over the old value, and the directory is fsynced (the root too, for a
///   key's first value); when [`write`](Storage::write) resolves to `Ok`, the value survives a
///   crash or power loss, and a crash at any moment leaves the old value or the new one,
///   never a torn one. A write that fails before the rename (a full disk, say) leaves the
///   old value; one whose final directory sync fails may have left either.
/// - **Integrity**: every value file carries its key and a CRC-32; a damaged file is
///   [`DuraflowError::Corrupt`] naming the key and the file, never a wrong value. A value
///   over 64 KiB is handed out as a reader ([`Storage::read_value`]) that checks it as it is
///   read and fails at its end when it is damaged; [`keys`](Storage::keys) reads each file's
///   header only.
/// - **Streaming**: a stream ([`Storage::write_value`]) is written to the temporary file as
///   it is encoded; nothing but a buffer is held in memory.
/// - **One writer**: a second `FileStore` on the same root, in this process or another,
///   gets [`DuraflowError::StoreLocked`]. The lock is an `flock` on the root directory itself
///   (and on `ROOT/.lock`), so deleting `.lock` does not release it; it is released when the
///   store is dropped or the process dies.
/// - **No link is followed** inside the root: a link (or an entry of the wrong kind, such as a
///   file) where a key's directory or value file, or the store's own file, should be is
///   [`DuraflowError::Corrupt`] naming it, for reads, writes, removes and
///   [`keys`](Storage::keys) alike, never a missing value; a link left at a temporary file's
///   name is removed, never written through. Nothing is read as a value from, or written
///   to, anywhere outside the root. Each path is looked at (without following links) just
///   before it is used: a link swapped in between, by a process racing the store, is not
///   caught.
/// - The executor is never blocked: every file operation runs inside [`unblock`].
///
/// # Formats and duraflow-rs 1.x
/// A directory with the manifest is a store; a new or empty directory becomes one.
/// [`FileStore::new`] on a directory duraflow-rs 1.x could have written (nothing but files
/// named `[A-Za-z0-9_-]+`, each holding one JSON value) upgrades it in place, crash-safely:
/// afterwards `Context::get::<T>` returns what 1.x returned for the same key, and the 1.x
/// files are kept, byte for byte, in `ROOT/.duraflow-1x/`, which can be removed once the
/// upgrade has been checked. Nothing is deleted. Keys are the 1.x file names: 1.x replaced
/// every character outside `[A-Za-z0-9_-]` by `_`, so a value saved under `a/b` is found
/// under `a_b`. A directory without the manifest holding anything else (a subdirectory, a
/// link, a dot file, another name, a file that is not JSON) is refused as
/// [`DuraflowError::NotAStore`], and a store of a newer format as
/// [`DuraflowError::UnsupportedFormat`], both before anything in it is written.
pub struct FileStore {
    dir: Arc<Dir>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("root", &self.dir.root)
            .finish_non_exhaustive()
    }
}

/// The store's directory and its blocking operations.
#[derive(Debug)]
pub(crate) struct Dir {
    root: PathBuf,
    /// The root directory and [`LOCK_FILE`], each held with an exclusive `flock` for as long
    /// as the store lives. The directory's lock is the one that counts: no deletion inside
    /// the root releases it. The lock file is locked too, so that an opener locking only
    /// that file is refused as well.
    _locks: [File; 2],
    stripes: Vec<Mutex<()>>,
}

impl FileStore {
    /// Opens (creating if needed) the store rooted at `dir` and takes its lock, upgrading a
    /// duraflow-rs 1.x directory first (see [Formats](FileStore#formats-and-duraflow-rs-1x)).
    ///
    /// # Errors
    /// [`DuraflowError::UnsupportedFormat`] for a store of a newer format and
    /// [`DuraflowError::NotAStore`] naming the entry for a directory that is neither a store
    /// nor a 1.x directory (both left untouched);
    /// [`DuraflowError::StoreLocked`] when another handle holds the store;
    /// [`DuraflowError::Corrupt`] naming the path when a link or an entry of the wrong kind
    /// is where the store keeps its own file (see the guarantees);
    /// [`DuraflowError::Io`] naming the path when the directory cannot be created or opened
    /// (for example because `dir` is a plain file).
    pub fn new<P: AsRef<Path>>(dir: P) -> Result<FileStore, DuraflowError> {
        let dir = dir.as_ref();
        create_dir_durably(dir)?;
        let root = fs::canonicalize(dir).map_err(|e| DuraflowError::io(dir, e))?;
        // Locking the directory writes nothing: a newer format is refused, under the lock,
        // before anything (even the lock file) is written.
        let root_lock = File::open(&root).map_err(|e| DuraflowError::io(&root, e))?;
        try_lock(&root_lock, &root, &root)?;
        let found = read_manifest(&root)?;
        if let Some(found) = found.filter(|&f| f > FORMAT) {
            return Err(DuraflowError::UnsupportedFormat {
                path: root,
                found,
                supported: FORMAT,
            });
        }
        // So is a directory that is neither a store nor a 1.x directory.
        let legacy = match found {
            Some(_) => None,
            None => from_1x::classify(&root)?,
        };
        // The first write makes the directory a store (the manifest) or one being upgraded
        // (the upgrade's mark), and only then is the lock file made: an open killed at any
        // moment leaves a directory the next open accepts.
        match (found, &legacy) {
            (Some(_), _) => {}
            (None, None) => write_manifest(&root)?,
            (None, Some(_)) => from_1x::begin(&root)?,
        }
        let store = Dir::open(root, root_lock)?;
        match legacy {
            None => from_1x::finish(&store.root)?,
            Some(legacy) => {
                tracing::info!(root = %store.root.display(), files = legacy.len(), "upgrading a duraflow-rs 1.x directory");
                from_1x::upgrade(&store, &legacy, || write_manifest(&store.root))?;
            }
        }
        Ok(FileStore {
            dir: Arc::new(store),
        })
    }

    /// The store's root directory (canonicalised).
    pub fn root(&self) -> &Path {
        &self.dir.root
    }

    /// The file that holds (or would hold) the value of `key`.
    ///
    /// # Errors
    /// [`DuraflowError::InvalidKey`] for a key no store accepts.
    pub fn value_path(&self, key: &str) -> Result<PathBuf, DuraflowError> {
        self.dir.value_path(key)
    }
}

impl Dir {
    /// The store at `root`, whose directory `root_lock` is locked: takes the lock file's
    /// lock too (see [`Dir::_locks`]).
    fn open(root: PathBuf, root_lock: File) -> Result<Dir, DuraflowError> {
        let lock_path = root.join(LOCK_FILE);
        let lock = open_lock_file(&lock_path)?;
        try_lock(&lock, &lock_path, &root)?;
        Ok(Dir {
            root,
            _locks: [root_lock, lock],
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    fn value_path(&self, key: &str) -> Result<PathBuf, DuraflowError> {
        validate_key(key)?;
        Ok(self.key_dir(key).join(VALUE_FILE))
    }

    fn key_dir(&self, key: &str) -> PathBuf {
        self.root.join(dir_name(key))
    }

    fn stripe(&self, key: &str) -> std::sync::MutexGuard<'_, ()> {
        let idx = crc32fast::hash(key.as_bytes()) as usize % self.stripes.len();
        self.stripes[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The value of `key`, checked against the key and checksum its file records: read
    /// whole when it is small, handed out as a reader that checks it as it is read
    /// otherwise.
    fn read_value(&self, key: &str) -> Result<Option<Stored>, DuraflowError> {
        validate_key(key)?;
        let Some(path) = value_in(&self.key_dir(key), key)? else {
            return Ok(None);
        };
        let mut file = match File::open(&path) {
            Ok(file) => file,
            // Removed since it was looked at.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DuraflowError::io(&path, e)),
        };
        let corrupt = |reason| DuraflowError::Corrupt {
            key: key.to_owned(),
            path: Some(path.clone()),
            reason,
        };
        let file_len = file
            .metadata()
            .map_err(|e| DuraflowError::io(&path, e))?
            .len();
        let framing = (RECORD_HEADER + key.len() + 4) as u64;
        if file_len <= (WHOLE_LIMIT as u64).saturating_add(framing) {
            let mut bytes = Vec::with_capacity(file_len as usize);
            file.read_to_end(&mut bytes)
                .map_err(|e| DuraflowError::io(&path, e))?;
            let (stored_key, value) = parse_record(&bytes).map_err(corrupt)?;
            if stored_key != key {
                return Err(corrupt(format!("the file belongs to key {stored_key:?}")));
            }
            return Ok(Some(Stored::Bytes(value.to_vec())));
        }
        let mut header = vec![0; RECORD_HEADER + key.len()];
        file.read_exact(&mut header)
            .map_err(|e| DuraflowError::io(&path, e))?;
        let key_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if &header[..4] != RECORD_MAGIC {
            return Err(corrupt("not a duraflow value file (bad magic)".to_owned()));
        }
        if key_len != key.len() || &header[RECORD_HEADER..] != key.as_bytes() {
            return Err(corrupt("the file belongs to another key".to_owned()));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        let len = file_len - framing;
        let reader = RecordReader {
            file: file.take(len),
            crc,
            key: key.to_owned(),
            path,
            checked: false,
        };
        Ok(Some(Stored::Reader {
            len,
            reader: Box::new(reader),
        }))
    }

    /// The value of `key` in memory: [`read_value`](Self::read_value), read whole.
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        self.read_value(key)?
            .map(|found| found.into_bytes(key))
            .transpose()
    }

    /// Writes `value` under `key`: see [`FileStore`]'s guarantees. A stream is written as
    /// it is encoded.
    pub(crate) fn write(&self, key: &str, value: Value) -> Result<(), DuraflowError> {
        validate_key(key)?;
        let dir = self.key_dir(key);
        let _guard = self.stripe(key);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // What is there must be a directory, not a link to one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                holds(&dir, Want::Dir, key)?;
            }
            Err(e) => return Err(DuraflowError::io(&dir, e)),
        }
        let target = dir.join(VALUE_FILE);
        // The key's directory entry may be new (or left unsynced by a crash between its
        // creation and the root's sync): the first value of a key also syncs the root.
        let first_value = !holds(&target, Want::File, key)?;
        let tmp = dir.join(TEMP_FILE);
        let written = create_temp(&tmp)
            .map_err(|e| DuraflowError::io(&tmp, e))
            .and_then(|file| write_record(file, &tmp, key, value));
        if let Err(e) = written {
            // Best effort: the old value is untouched either way; a leftover temp file is
            // replaced by the next write of this key.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &target).map_err(|e| DuraflowError::io(&target, e))?;
        sync_dir(&dir)?;
        if first_value {
            sync_dir(&self.root)?;
        }
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<bool, DuraflowError> {
        validate_key(key)?;
        let dir = self.key_dir(key);
        let _guard = self.stripe(key);
        let Some(target) = value_in(&dir, key)? else {
            return Ok(false);
        };
        match fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(DuraflowError::io(&target, e)),
        }
        sync_dir(&dir)?;
        // The value is gone durably; the empty directory is tidied up if nothing else is in it.
        let _ = fs::remove_file(dir.join(TEMP_FILE));
        if fs::remove_dir(&dir).is_ok() {
            sync_dir(&self.root)?;
        }
        Ok(true)
    }

    /// Every key, read from its value file (a key directory without one holds no value). An
    /// entry named like a key directory that cannot be read as one is an error naming it.
    fn keys(&self, _: &str) -> Result<Vec<String>, DuraflowError> {
        let mut keys = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| DuraflowError::io(&self.root, e))? {
            let entry = entry.map_err(|e| DuraflowError::io(&self.root, e))?;
            let name = entry.file_name();
            let Some(name) = name
                .to_str()
                .filter(|n| n.starts_with("k-") || n.starts_with("h-"))
            else {
                continue; // the lock file, the manifest, anything that is not ours
            };
            let Some(path) = value_in(&entry.path(), name)? else {
                continue;
            };
            let corrupt = |reason: String| DuraflowError::Corrupt {
                key: name.to_owned(),
                path: Some(path.clone()),
                reason,
            };
            // The key the file records; its value is checked when it is read.
            let key = match read_key(&path) {
                Ok(key) => key.map_err(corrupt)?,
                // Removed since it was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DuraflowError::io(&path, e)),
            };
            let key = key.as_str();
            // Only the canonical spelling of a key is the key's directory.
            if dir_name(key) != name {
                return Err(corrupt(format!("the file belongs to key {key:?}")));
            }
            keys.push(key.to_owned());
        }
        Ok(keys)
    }
}

impl Storage for FileStore {
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        unblock_on(&self.dir, key, Dir::read)
    }

    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        self.write_value(key, Value::Bytes(value))
    }

    /// A value over 64 KiB is handed out as a reader of its file, which checks the key and
    /// checksum the file records as it is read.
    fn read_value<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Stored>> {
        unblock_on(&self.dir, key, Dir::read_value)
    }

    /// As [`write`](Storage::write); a stream is written to the file as it is encoded, on an
    /// I/O thread.
    fn write_value<'a>(&'a self, key: &'a str, value: Value) -> StoreFuture<'a, ()> {
        let dir = Arc::clone(&self.dir);
        let key = key.to_owned();
        unblock(move || dir.write(&key, value))
    }

    fn remove<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        unblock_on(&self.dir, key, Dir::remove)
    }

    fn keys(&self) -> StoreFuture<'_, Vec<String>> {
        unblock_on(&self.dir, "", Dir::keys)
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

/// The directory name of `key` (see [`FileStore`]'s layout).
pub(crate) fn dir_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 2);
    name.push_str("k-");
    for b in key.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' {
            name.push(b as char);
        } else {
            name.push_str(&format!("_{b:02x}"));
        }
        if name.len() > MAX_NAME_LEN {
            let digest = Sha256::digest(key.as_bytes());
            return digest
                .iter()
                .fold("h-".to_owned(), |h, b| h + &format!("{b:02x}"));
        }
    }
    name
}

/// `magic | key length (u32 LE) | key | value | CRC-32 of all before (u32 LE)`.
#[cfg(test)]
fn build_record(key: &str, value: &[u8]) -> Vec<u8> {
    let mut rec = Vec::new();
    let out = Counted {
        out: &mut rec,
        crc: crc32fast::Hasher::new(),
        path: Path::new(""),
    };
    let written = write_into(out, key, Value::Bytes(value.to_vec()));
    assert!(written.is_ok());
    rec
}

/// Writes the record of `value` under `key` (see [`build_record`]'s layout) into the new
/// file `file` at `path`, and fsyncs it.
fn write_record(file: File, path: &Path, key: &str, value: Value) -> Result<(), DuraflowError> {
    let mut buffered = io::BufWriter::new(file);
    let out = Counted {
        out: &mut buffered,
        crc: crc32fast::Hasher::new(),
        path,
    };
    write_into(out, key, value)?;
    let file = buffered
        .into_inner()
        .map_err(|e| DuraflowError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| DuraflowError::io(path, e))
}

/// Writes a record into `out`: header, value, then the checksum of both.
fn write_into(mut out: Counted<'_>, key: &str, value: Value) -> Result<(), DuraflowError> {
    let mut header = Vec::with_capacity(RECORD_HEADER + key.len());
    header.extend_from_slice(RECORD_MAGIC);
    // Keys are at most MAX_KEY_LEN bytes (validated), so the length fits in a u32.
    header.extend_from_slice(&(key.len() as u32).to_le_bytes());
    header.extend_from_slice(key.as_bytes());
    let path = out.path;
    let io_error = |e| carried(e).unwrap_or_else(|e| DuraflowError::io(path, e));
    out.write_all(&header).map_err(io_error)?;
    match value {
        Value::Bytes(bytes) => out.write_all(&bytes).map_err(io_error)?,
        Value::Stream(encoder) => encoder.write_to(&mut out)?,
    }
    let crc = out.crc.clone().finalize();
    out.out.write_all(&crc.to_le_bytes()).map_err(io_error)
}

/// Passes bytes on to `out`, computing their CRC-32; its errors name `path`.
struct Counted<'a> {
    out: &'a mut dyn Write,
    crc: crc32fast::Hasher,
    path: &'a Path,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self
            .out
            .write(buf)
            .map_err(|e| carry(DuraflowError::io(self.path, e)))?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out
            .flush()
            .map_err(|e| carry(DuraflowError::io(self.path, e)))
    }
}

/// Reads the value of a record, checking the record's checksum at the end.
struct RecordReader {
    /// The file, past the record's header, limited to the value.
    file: io::Take<File>,
    /// The checksum of what was read so far, header included.
    crc: crc32fast::Hasher,
    key: String,
    path: PathBuf,
    /// Whether the trailer was read and matched.
    checked: bool,
}

impl Read for RecordReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let io_error = |e| carry(DuraflowError::io(&self.path, e));
        let n = self.file.read(buf).map_err(io_error)?;
        self.crc.update(&buf[..n]);
        if n > 0 || buf.is_empty() || self.checked {
            return Ok(n);
        }
        let mut trailer = [0; 4];
        let ended = self.file.get_mut().read_exact(&mut trailer);
        let reason = match ended {
            Ok(()) if self.crc.clone().finalize() == u32::from_le_bytes(trailer) => {
                self.checked = true;
                return Ok(0);
            }
            Ok(()) => "checksum mismatch",
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => "truncated",
            Err(e) => return Err(io_error(e)),
        };
        Err(carry(DuraflowError::Corrupt {
            key: self.key.clone(),
            path: Some(self.path.clone()),
            reason: reason.to_owned(),
        }))
    }
}

fn parse_record(rec: &[u8]) -> Result<(&str, &[u8]), String> {
    if rec.len() < 12 || &rec[..4] != RECORD_MAGIC {
        return Err("not a duraflow value file (bad magic or too short)".to_owned());
    }
    let (body, crc) = rec.split_at(rec.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err("checksum mismatch".to_owned());
    }
    let key_len = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as usize;
    let rest = &body[8..];
    if rest.len() < key_len {
        return Err("truncated key".to_owned());
    }
    let (key, value) = rest.split_at(key_len);
    let key = std::str::from_utf8(key).map_err(|_| "stored key is not UTF-8".to_owned())?;
    Ok((key, value))
}

/// The key the value file at `path` records, or what is wrong with its header: read
/// without reading the value.
fn read_key(path: &Path) -> io::Result<Result<String, String>> {
    let mut file = File::open(path)?;
    let mut header = [0; RECORD_HEADER];
    match file.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err("truncated: too short for its header".to_owned()))
        }
        Err(e) => return Err(e),
    }
    if &header[..4] != RECORD_MAGIC {
        return Ok(Err("not a duraflow value file (bad magic)".to_owned()));
    }
    let key_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if key_len == 0 || key_len > MAX_KEY_LEN {
        return Ok(Err(format!("its key length {key_len} is out of range")));
    }
    let mut key = vec![0; key_len];
    match file.read_exact(&mut key) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err("truncated: too short for its key".to_owned()))
        }
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8(key).map_err(|_| "stored key is not UTF-8".to_owned()))
}

/// Creates the temporary file `tmp` afresh, never through a link: whatever an interrupted
/// write left at that name (a file, or a link, which is removed as a link) is removed first.
fn create_temp(tmp: &Path) -> io::Result<File> {
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new().write(true).create_new(true).open(tmp)
}

/// The value file in the key directory `dir`, if there is one (a directory without it holds
/// no value yet: a first write was cut off before its rename). Both must be what the store
/// made (see [`holds`]); `key` names the key in errors.
fn value_in(dir: &Path, key: &str) -> Result<Option<PathBuf>, DuraflowError> {
    let path = dir.join(VALUE_FILE);
    Ok((holds(dir, Want::Dir, key)? && holds(&path, Want::File, key)?).then_some(path))
}

/// What the store keeps at a path inside its root.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    Dir,
    File,
}

/// Whether `path` holds the directory or the regular file `want` (`false`: nothing is
/// there), looked at without following a link. Anything else there, a link above all, is
/// [`DuraflowError::Corrupt`] naming `key` (empty for the store's own files) and `path`:
/// the store never follows a link inside its root.
fn holds(path: &Path, want: Want, key: &str) -> Result<bool, DuraflowError> {
    let kind = match fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(DuraflowError::io(path, e)),
    };
    if (want == Want::Dir && kind.is_dir()) || (want == Want::File && kind.is_file()) {
        return Ok(true);
    }
    let found = if kind.is_symlink() {
        "a symbolic link (FileStore never follows links inside its root)"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_file() {
        "a file"
    } else {
        "a special file"
    };
    let wanted = match want {
        Want::Dir => "a directory",
        Want::File => "a regular file",
    };
    Err(DuraflowError::Corrupt {
        key: key.to_owned(),
        path: Some(path.to_owned()),
        reason: format!("found {found} where the store keeps {wanted}"),
    })
}

/// Takes the exclusive `flock` of `file` (at `path`, in the store at `root`) without waiting.
fn try_lock(file: &File, path: &Path, root: &Path) -> Result<(), DuraflowError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(DuraflowError::StoreLocked {
            path: root.to_owned(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(DuraflowError::io(path, e)),
    }
}

/// Opens the lock file `path`, creating it if it is missing, never through a link.
fn open_lock_file(path: &Path) -> Result<File, DuraflowError> {
    let io_error = |e| DuraflowError::io(path, e);
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(file) => return Ok(file),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error(e)),
    }
    holds(path, Want::File, "")?;
    OpenOptions::new().write(true).open(path).map_err(io_error)
}

fn sync_dir(dir: &Path) -> Result<(), DuraflowError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DuraflowError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_injective_and_safe() {
        let keys = [
            "a/b", "a_b", "a.b", "é", "ü", "..", ".", "/abs", "a\\b", "a\0b", "A", "a", "k-a", "-",
        ];
        let names: Vec<String> = keys.iter().map(|k| dir_name(k)).collect();
        for n in &names {
            assert!(n.starts_with("k-"), "{n}");
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'_'),
                "{n}"
            );
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn long_keys_are_hashed_to_a_short_name() {
        let name = dir_name(&"é".repeat(2000));
        assert!(name.starts_with("h-") && name.len() == 66, "{name}");
        assert_ne!(dir_name(&"a".repeat(300)), dir_name(&"a".repeat(301)));
    }

    #[test]
    fn record_round_trip_and_damage() {
        let rec = build_record("key", b"value");
        assert_eq!(parse_record(&rec).unwrap(), ("key", &b"value"[..]));
        for i in 0..rec.len() {
            let mut r = rec.clone();
            r[i] ^= 1;
            assert!(parse_record(&r).is_err(), "flip at {i}");
        }
    }
}
