//! [`SledStore`]: outputs, runs and attempts in one sled database, committed by one writer
//! thread in groups.

mod blob;
mod history;
mod layout;
mod marker;
mod open;
mod registry;
mod stop;
mod sync;
mod writer;

pub use self::open::{Durability, SledConfig};

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use futures::channel::oneshot;

use self::blob::{over_max, Blobs, Held, Spill, Spilled, Written};
use self::layout::Witness;
use self::layout::{attempt_key, encode_record, Trees};
use self::stop::{inside_sled, Failure, Prior, Shared};
use self::sync::Syncer;
use self::writer::{Commit, Msg, Record, Reply};
use super::{ready, StoreFuture};
use crate::record::{AttemptOutcome, AttemptRecord, RunId, RunRecord, RunStatus};
use crate::{unblock, validate_key, DuraflowError, RunHistory, RunLog, Storage, Stored, Value};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// A [`Storage`], [`RunLog`] and [`RunHistory`] in one sled database (sled 0.34), reused
/// across process restarts.
///
/// # Guarantees
/// - A task's output and its `Succeeded` attempt record are written in one sled
///   transaction: after a crash both exist or neither does.
/// - With [`Durability::Immediate`] (the default) a commit is on stable storage before it
///   is acknowledged, so a task whose progress was reported is never executed again after
///   a crash or a power cut: sled's flush, then an fsync of every file it created (its
///   blob files) and of every directory that gained one, an `fdatasync` of its database
///   file, and the commit's number recorded in the marker file `duraflow-store`. Concurrent
///   commits are applied and synced together by one writer thread.
/// - A store whose database lacks a commit the marker records (sled reads damage as the
///   end of its log, and opens what precedes it) is [`DuraflowError::Corrupt`] when it
///   opens, never silently older. An output whose page sled opened as it was before (a
///   blob file of sled's missing) reads as `Corrupt` naming its key: each output is
///   checked against a witness (length and CRC-32) kept in another tree.
/// - A panic inside sled is caught: `Corrupt` for a read (naming the key) or a failed write.
///   A store that found damage stops like one whose write failed (below), and a DAG then
///   fails a task whose output is unreadable instead of running it again.
/// - Other attempt records are durable no later than the next commit or finished run;
///   those of cached tasks are stored many to a value.
/// - With [`Durability::Immediate`], a run's records are on disk when its DAG's run
///   returns. A run killed before it returned and before its first commit may be missing
///   (its id then goes to a later run); one killed later shows `Interrupted`.
/// - One handle at a time: a second open of the same path fails with
///   [`DuraflowError::StoreLocked`]; once the handle is dropped, the store can be opened
///   again at once.
/// - An output over [`SledConfig::blob_threshold`] (64 KiB by default) is a file of its
///   own under `outputs/`, named by the BLAKE3 hash of its bytes (identical outputs share
///   one), durable (fsynced, renamed, its directory fsynced) before the commit that refers
///   to it: a crash leaves at worst a file nothing refers to, which [`RunHistory::gc`]
///   removes.
///   Its reads check its length and digest: a damaged file is [`DuraflowError::Corrupt`]
///   naming the key and the file, and the store keeps working (a new write repairs it).
/// - No output is refused for its size unless [`SledConfig::max_value_size`] sets a
///   limit; one over it is refused and the previous value kept.
/// - A write the disk refuses (full, failing) is an error ([`DuraflowError::Persist`] for a
///   task's output): this handle then reads the previous value, and after a reopen the
///   store holds the previous value or, when sled had written the new one before the disk
///   refused the rest of the sync, the new one with its attempt record; never a mix. Every
///   acknowledged value stays. sled does not always recover from such a
///   failure, so the handle then refuses every later write with the same error
///   ([`health`](Storage::health) says which), and dropping it leaves sled's database open
///   (its lock held) until the process exits: reopen the store in a new process once the
///   disk has room.
/// - The executor is never blocked: reads and queries run inside
///   [`unblock`](crate::unblock), writes on the writer thread.
pub struct SledStore {
    inner: Arc<Inner>,
    next_run: AtomicU64,
    max_value_size: Option<usize>,
    /// Outputs larger than this are kept in files of their own.
    blob_threshold: usize,
    /// Whether commits wait for a flush.
    flush_commits: bool,
    writer: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    /// This process's claim on the store; the last field, so it is dropped after the
    /// database, and marks the store closed.
    _claim: registry::Claim,
}

/// What reads and queries need, shared with the threads they run on.
struct Inner {
    path: PathBuf,
    db: sled::Db,
    trees: Trees,
    /// What the store shares with its writer thread and syncer.
    shared: Arc<Shared>,
    syncer: Arc<Syncer>,
    /// The last commit the store had acknowledged when it was opened.
    acknowledged: u64,
    /// The outputs kept in files of their own.
    blobs: Arc<Blobs>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.inner.path)
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
        &self.inner.path
    }

    /// Runs `op` on `key` inside [`unblock`], guarded against panics inside sled.
    fn call<T: Send + 'static>(
        &self,
        key: &str,
        op: impl FnOnce(&Inner, &str) -> Result<T, DuraflowError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let (inner, key) = (Arc::clone(&self.inner), key.to_owned());
        unblock(move || inner.guarded(&key, |inner| op(inner, &key)))
    }

    /// Hands `msg` to the writer thread; refused once the store has stopped after a failure.
    fn send(&self, msg: Msg) -> Result<(), DuraflowError> {
        self.inner.usable()?;
        send(self.writer.as_ref(), self.path(), msg)
    }

    /// Hands the writer a message that it answers; resolves with the answer.
    fn send_acked(
        &self,
        key: &str,
        msg: impl FnOnce(Reply) -> Msg,
        flush: bool,
    ) -> StoreFuture<'static, ()> {
        let (reply, answer) = Reply::new(flush);
        if let Err(e) = self.send(msg(reply)) {
            return ready(Err(e));
        }
        let (inner, key) = (Arc::clone(&self.inner), key.to_owned());
        Box::pin(async move { answered(answer, &inner.path, key).await })
    }

    /// Queues an output, with its attempt record if any, for the writer's next group. An
    /// output over the blob threshold is first written to a file of its own (see
    /// `blob.rs`), on an I/O thread, as it is encoded.
    fn commit_output(
        &self,
        key: &str,
        value: Value,
        attempt: Option<AttemptRecord>,
        flush: bool,
    ) -> StoreFuture<'static, ()> {
        if let Err(e) = validate_key(key) {
            return ready(Err(e));
        }
        let key = key.to_owned();
        let value = match value {
            Value::Bytes(bytes) if bytes.len() <= self.blob_threshold => {
                let commit = self.check_size(&key, bytes.len()).and_then(|()| {
                    let witness = Witness::of(&bytes, 0, None);
                    commit(&key, Some(bytes), witness, None, attempt)
                });
                return match commit {
                    Ok(commit) => self.send_acked(&key, commit, flush),
                    Err(e) => ready(Err(e)),
                };
            }
            value => value,
        };
        let (inner, writer) = (Arc::clone(&self.inner), self.writer.clone());
        let (threshold, max) = (self.blob_threshold, self.max_value_size);
        Box::pin(async move {
            inner.usable()?;
            let (blobs, of) = (Arc::clone(&inner.blobs), key.clone());
            let spilled = unblock(move || {
                let persist = |e| DuraflowError::Persist {
                    key: of.clone(),
                    source: Box::new(e),
                };
                let mut spill = Spill::new(blobs, threshold, max);
                match value {
                    Value::Bytes(bytes) => spill.write_all(&bytes).map_err(persist)?,
                    Value::Stream(encoder) => encoder.write_to(&mut spill)?,
                }
                spill.finish().map_err(persist)
            });
            // A file is held from gc until the writer has applied the commit and made it
            // durable (or, should this future be dropped first, until then).
            let commit = match spilled.await? {
                Spilled::Memory(bytes) => {
                    let witness = Witness::of(&bytes, 0, None);
                    commit(&key, Some(bytes), witness, None, attempt)?
                }
                Spilled::File(Written { held, crc, len }) => {
                    let blob = Some(held.digest);
                    let witness = Witness {
                        len,
                        crc,
                        commit: 0,
                        blob,
                    };
                    commit(&key, None, witness, Some(held), attempt)?
                }
            };
            let (reply, answer) = Reply::new(flush);
            inner.usable()?;
            send(writer.as_ref(), &inner.path, commit(reply))?;
            answered(answer, &inner.path, key).await
        })
    }

    /// Refuses a value over the configured maximum.
    fn check_size(&self, key: &str, len: usize) -> Result<(), DuraflowError> {
        match self.max_value_size.filter(|&max| len > max) {
            None => Ok(()),
            Some(max) => Err(DuraflowError::Persist {
                key: key.to_owned(),
                source: Box::new(over_max(len, max)),
            }),
        }
    }
}

/// The writer's message that commits an output of `key` (`value`, or the file `held`, as
/// `witness` describes it), with its attempt record if any, once given the reply.
fn commit(
    key: &str,
    value: Option<Vec<u8>>,
    witness: Witness,
    held: Option<Held>,
    attempt: Option<AttemptRecord>,
) -> Result<impl FnOnce(Reply) -> Msg, DuraflowError> {
    let attempt = match attempt {
        Some(mut attempt) => {
            attempt.output_size = Some(witness.len);
            let at = attempt_key(attempt.run, &attempt.key, attempt.attempt);
            Some((at, encode_record(&attempt)?))
        }
        None => None,
    };
    let key = key.to_owned();
    Ok(move |reply| {
        Msg::Commit(Box::new(Commit {
            key,
            value,
            witness,
            _held: held,
            attempt,
            reply,
        }))
    })
}

/// What one read of an output found.
enum Resolved {
    /// The output, checked, or a reader that checks it (`None`: none is stored).
    Value(Option<Stored>),
    /// A write lost to a crash before it was acknowledged: no output.
    Unacknowledged,
    /// sled's trees are damaged, for this reason: the store stops.
    Damaged(String),
    /// The output's own file is damaged: `Corrupt` naming it; the store works on.
    BadFile(DuraflowError),
    /// sled's read failed.
    Failed(DuraflowError),
}

/// Hands `msg` to the writer thread.
fn send(writer: Option<&mpsc::Sender<Msg>>, path: &Path, msg: Msg) -> Result<(), DuraflowError> {
    match writer.map(|w| w.send(msg)) {
        Some(Ok(())) => Ok(()),
        _ => Err(DuraflowError::io(
            path,
            io::Error::other("the store's writer thread has stopped"),
        )),
    }
}

/// The writer's answer to a message about `key`.
async fn answered(
    answer: oneshot::Receiver<Result<(), Failure>>,
    path: &Path,
    key: String,
) -> Result<(), DuraflowError> {
    match answer.await {
        Ok(result) => result.map_err(|f| f.error(path, false)),
        Err(_) => Err(DuraflowError::RuntimeShutdown { key }),
    }
}

impl SledStore {
    /// The record of `attempt`, under its key in the `attempts` tree.
    fn attempt_record(&self, attempt: &AttemptRecord) -> Result<Record, DuraflowError> {
        let key = attempt_key(attempt.run, &attempt.key, attempt.attempt);
        let (tree, value) = (self.inner.trees.attempts.clone(), encode_record(attempt)?);
        Ok(Record { tree, key, value })
    }

    /// The record of `run`, under its id in the `runs` tree.
    fn run_record(&self, run: &RunRecord) -> Result<Record, DuraflowError> {
        let (key, value) = (run.id.to_be_bytes().to_vec(), encode_record(run)?);
        Ok(Record {
            tree: self.inner.trees.runs.clone(),
            key,
            value,
        })
    }
}

impl Inner {
    /// Refuses work once the store has stopped: sled may hold records of a failed group in
    /// memory that never reached the disk, or its files are damaged.
    fn usable(&self) -> Result<(), DuraflowError> {
        self.shared.usable()
    }

    /// The output of `key`, checked against its witness (an output in a file of its own is
    /// checked as it is read: see [`Blobs::reader`]). Once the store has stopped after a
    /// failed write, an output that write did not store reads as its value before it (never
    /// as the value that failed).
    fn read_value(&self, key: &str) -> Result<Option<Stored>, DuraflowError> {
        validate_key(key)?;
        let found = match self.read_once(key, false) {
            found @ (Resolved::Value(_) | Resolved::Failed(_)) => found,
            // The output and its witness, read one after the other, may be of two commits
            // (a write applied between the two reads), or (for an output in a file) a gc
            // may have removed the old file meanwhile: read both again, in one
            // transaction, so that only lasting damage is reported as damage.
            _ => self.read_once(key, true),
        };
        match found {
            Resolved::Value(value) => Ok(value),
            Resolved::Unacknowledged => Ok(None),
            Resolved::Damaged(reason) => Err(self.damaged(key, reason)),
            Resolved::BadFile(e) | Resolved::Failed(e) => Err(e),
        }
    }

    /// The output of `key` in memory: [`read_value`](Self::read_value), read whole.
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        self.read_value(key)?
            .map(|found| found.into_bytes(key))
            .transpose()
    }

    /// Reads `key` once: its output and its witness one after the other, or `together` in
    /// one transaction (a consistent view of both trees).
    fn read_once(&self, key: &str, together: bool) -> Resolved {
        let prior = match self.shared.shadowed(key) {
            Some(prior) => Ok(prior),
            None if together => {
                let trees = (&self.trees.outputs, &self.trees.witnesses);
                let read = trees.transaction(|(outputs, witnesses)| {
                    let value = outputs.get(key.as_bytes())?;
                    let witness = witnesses.get(key.as_bytes())?;
                    Ok::<_, ConflictableTransactionError<()>>(Prior { value, witness })
                });
                read.map_err(|e| match e {
                    TransactionError::Storage(e) => e,
                    TransactionError::Abort(()) => {
                        sled::Error::Unsupported("transaction aborted".to_owned())
                    }
                })
            }
            None => self.trees.outputs.get(key).and_then(|value| {
                let witness = self.trees.witnesses.get(key)?;
                Ok(Prior { value, witness })
            }),
        };
        match prior {
            Ok(prior) => self.resolve(key, prior),
            Err(e) => Resolved::Failed(self.read_error(key, e)),
        }
    }

    /// The output `prior` describes, checked against its witness.
    fn resolve(&self, key: &str, prior: Prior) -> Resolved {
        let Prior { value, witness } = prior;
        let Some(found) = witness else {
            return match value {
                None => Resolved::Value(None),
                Some(_) => Resolved::Damaged("its witness is missing".to_owned()),
            };
        };
        let Some(witness) = Witness::decode(&found) else {
            return Resolved::Damaged(format!("its witness is damaged: {found:?}"));
        };
        if let Some(digest) = &witness.blob {
            // A file of the store's own: damage there leaves sled's trees intact.
            let path = self.blobs.path(digest);
            let corrupt = |reason| {
                Resolved::BadFile(DuraflowError::Corrupt {
                    key: key.to_owned(),
                    path: Some(path.clone()),
                    reason,
                })
            };
            return match self.blobs.reader(digest, witness.len, key) {
                Ok(reader) => Resolved::Value(Some(Stored::Reader {
                    len: witness.len,
                    reader: Box::new(reader),
                })),
                Err(reason) => corrupt(reason),
            };
        }
        match value {
            Some(value) if witness.matches(&value) => {
                Resolved::Value(Some(Stored::Bytes(value.to_vec())))
            }
            // A write the store never acknowledged, lost to a crash: sled kept the log entry
            // of the witness but not the blob file of the value.
            _ if witness.commit > self.acknowledged => Resolved::Unacknowledged,
            found => {
                let what = match found {
                    Some(_) => "it is not the value last stored",
                    None => "it is missing, though it was stored",
                };
                Resolved::Damaged(format!(
                    "{what} (sled opened an older version of its page: a file of sled's is \
                     missing)"
                ))
            }
        }
    }

    /// The error of a sled read of `key`: damage sled found (a checksum, a missing file of
    /// its own) is `Corrupt` naming the key, and stops the store.
    fn read_error(&self, key: &str, e: sled::Error) -> DuraflowError {
        let reason = match &e {
            sled::Error::Corruption { at, .. } => format!("sled reports corruption at {at:?}"),
            sled::Error::Io(io) if io.kind() == io::ErrorKind::NotFound => {
                format!("a file sled keeps it in is missing: {io}")
            }
            _ => return sled_error(&self.path, e),
        };
        self.damaged(key, reason)
    }

    /// Stops the store because its files are damaged, and returns `Corrupt` naming `key`.
    fn damaged(&self, key: &str, reason: String) -> DuraflowError {
        self.shared
            .stop(Failure::damage(format!("reading {key:?}: {reason}")));
        DuraflowError::Corrupt {
            key: key.to_owned(),
            path: Some(self.path.clone()),
            reason,
        }
    }

    /// Runs `op` (sled work on `key`, `""` for none), turning a panic inside sled into
    /// `Corrupt` naming the key; the store then stops.
    fn guarded<T>(
        &self,
        key: &str,
        op: impl FnOnce(&Inner) -> Result<T, DuraflowError>,
    ) -> Result<T, DuraflowError> {
        inside_sled(|| op(self)).unwrap_or_else(|panic| Err(self.damaged(key, panic)))
    }

    /// Makes everything written so far durable; a failure stops the store.
    fn sync(&self) -> Result<(), DuraflowError> {
        self.syncer
            .sync(&self.db, &self.trees.meta)
            .map_err(|failure| self.shared.stop(failure).error(&self.path, false))
    }

    /// The error of a write of sled's, which stops the store.
    fn write_error(&self, e: sled::Error) -> DuraflowError {
        self.shared.stop(Failure::of(&e)).error(&self.path, false)
    }

    /// Removes `key`, durably.
    fn remove(&self, key: &str) -> Result<bool, DuraflowError> {
        validate_key(key)?;
        self.usable()?;
        let trees = (&self.trees.outputs, &self.trees.witnesses);
        let removed = trees.transaction(|(outputs, witnesses)| {
            // An output kept in a file of its own has only its witness in the trees.
            let witness = witnesses.remove(key.as_bytes())?;
            let value = outputs.remove(key.as_bytes())?;
            Ok::<_, ConflictableTransactionError<()>>(witness.is_some() || value.is_some())
        });
        let removed = removed.map_err(|e| match e {
            TransactionError::Storage(e) => self.write_error(e),
            TransactionError::Abort(()) => {
                DuraflowError::io(&self.path, io::Error::other("aborted"))
            }
        })?;
        self.sync()?;
        Ok(removed)
    }

    /// Every key stored: those of the outputs and those of their witnesses (an output
    /// missing from a damaged tree is listed, and reading it reports the damage).
    fn keys(&self, _: &str) -> Result<Vec<String>, DuraflowError> {
        self.usable()?;
        let mut keys = std::collections::BTreeSet::new();
        for tree in [&self.trees.outputs, &self.trees.witnesses] {
            for k in tree.iter().keys() {
                keys.insert(k.map_err(|e| sled_error(&self.path, e))?);
            }
        }
        keys.into_iter()
            .map(|k| {
                String::from_utf8(k.to_vec()).map_err(|_| DuraflowError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    path: Some(self.path.clone()),
                    reason: "stored key is not UTF-8".to_owned(),
                })
            })
            .collect()
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer apply what is queued, sync, and stop.
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if self.inner.shared.failed().is_some() {
            // sled may not recover from the failure, and dropping its last handle flushes,
            // which can then wait forever: leave the database open (and its lock held)
            // until the process exits.
            std::mem::forget(Arc::clone(&self.inner));
            self._claim.leaked();
        }
    }
}

impl Storage for SledStore {
    /// A value sled finds damaged (or panics reading) is [`DuraflowError::Corrupt`] naming
    /// the key, and the store stops (see [`health`](Storage::health)).
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        self.call(key, Inner::read)
    }

    /// Durable (synced, whatever the [`Durability`]) when it resolves. A value over
    /// [`SledConfig::max_value_size`], if set, is refused with [`DuraflowError::Persist`].
    /// A value over the blob threshold is written to its file when the future is first
    /// polled, and committed after that: two such writes of one key that are not awaited
    /// one after the other may be applied in either order.
    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        self.commit_output(key, Value::Bytes(value), None, true)
    }

    /// An output in a file of its own is handed out as a reader of the file, which checks
    /// its length and digest as it is read.
    fn read_value<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Stored>> {
        self.call(key, Inner::read_value)
    }

    /// As [`write`](Storage::write); a stream over the blob threshold is written to its file
    /// as it is encoded, on an I/O thread.
    fn write_value<'a>(&'a self, key: &'a str, value: Value) -> StoreFuture<'a, ()> {
        self.commit_output(key, value, None, true)
    }

    fn remove<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        self.call(key, Inner::remove)
    }

    fn keys(&self) -> StoreFuture<'_, Vec<String>> {
        self.call("", Inner::keys)
    }

    fn health(&self) -> Result<(), DuraflowError> {
        self.inner.usable()
    }

    fn kind(&self) -> &'static str {
        "sled"
    }

    fn run_log(&self) -> Option<&dyn RunLog> {
        Some(self)
    }

    fn history(&self) -> Option<&dyn RunHistory> {
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
        self.send(Msg::Record(self.run_record(&record)?))?;
        Ok(id)
    }

    /// A `Cached` attempt is stored in a batch with the others that reach the writer with
    /// it; any other as a record of its own.
    fn record(&self, attempt: AttemptRecord) -> Result<(), DuraflowError> {
        if attempt.outcome == AttemptOutcome::Cached {
            return self.send(Msg::Cached(Box::new(attempt)));
        }
        self.send(Msg::Record(self.attempt_record(&attempt)?))
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        value: Value,
        attempt: AttemptRecord,
    ) -> StoreFuture<'a, ()> {
        self.commit_output(key, value, Some(attempt), self.flush_commits)
    }

    fn finish_run(&self, run: RunRecord) -> StoreFuture<'_, ()> {
        let record = match self.run_record(&run) {
            Ok(record) => record,
            Err(e) => return ready(Err(e)),
        };
        let acked = |reply| Msg::Acked(record, reply);
        self.send_acked("<run record>", acked, self.flush_commits)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_sled_work_is_corrupt_naming_the_key_and_stops_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path().join("s")).unwrap();
        let answer = store.inner.guarded("k", |_| -> Result<(), _> {
            panic!("cannot find pid 7 in view_for_key")
        });
        match answer {
            Err(DuraflowError::Corrupt { key, reason, .. }) => {
                assert_eq!(key, "k");
                assert!(reason.contains("cannot find pid 7"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(store.health().is_err());
        let write = pollster::block_on(store.write("other", vec![1]));
        assert!(write.is_err(), "a stopped store took a write");
        let remove = pollster::block_on(store.remove("other"));
        assert!(remove.is_err(), "a stopped store removed a key");
        // Nor does it sync when closed: dropping it returns.
    }
}
