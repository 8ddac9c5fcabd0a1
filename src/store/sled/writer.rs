//! The writer thread: the only writer of a store's records and outputs. It applies queued
//! messages in groups — plain inserts for records that stand alone, transactions of up to
//! [`TX_COMMITS`] commits for the group's commits — and flushes once per group that holds a
//! message waiting for it. A
//! task's `Running` record is not queued: it waits in [`RunningRecords`], where the task's
//! commit (which overwrites it) usually takes it back before the writer gets to it.
//!
//! `Cached` attempt records do not go through the queue one by one: the store appends them
//! to [`CachedRecords`], buffers shared with the writer (one of [`CACHED_SHARDS`], chosen by
//! the adding thread), and only the first record of an empty shard (and every
//! [`FULL`] / [`CACHED_SHARDS`]-th of a shard) sends the writer a nudge. The writer stores
//! the shards as [`CachedBatch`] values, many records to a value: before it applies a group
//! that someone waits for (what [`RunLog::record`](crate::RunLog::record) promises), once
//! about [`FULL`] records are kept (counted over the shards when a nudge arrives),
//! [`IDLE_WRITE`] after a nudge, and when the store closes. A
//! cached task thus costs neither a sled insert nor a thread wake-up.
//!
//! The first error sled returns to the writer (a full disk, say) fails its group and stops
//! the store for good: every later message is answered with that error, without calling
//! sled again. sled 0.34 does not always recover from a failed write — after a failed blob
//! write (a value or page over 128 KiB) its next flush waits forever — so a failed store
//! never flushes again, and [`SledStore`](super::SledStore)'s drop leaves sled's database
//! open rather than let sled's own drop (which flushes) hang.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::layout::{batch_key, encode_attempt, CachedAttempt, CachedBatch, Trees};
use crate::record::{AttemptRecord, RunId};
use crate::runlog::TicketSender;
use crate::DuraflowError;

/// The most messages one group takes.
const MAX_GROUP: usize = 4096;
/// The most commits one sled transaction takes; a group's commits are applied in as many
/// transactions as this needs, and flushed once. A sled transaction keeps a copy of every
/// value it writes and of every value it reads, and what sled frees during it waits for it
/// to end: at 4,096 commits a transaction, a wide run of 100k tasks peaked 40-50 MiB higher
/// than at 256 (the scale example), at no cost to the 2k-task benchmark.
const TX_COMMITS: usize = 256;
/// How many kept `Cached` records make the writer store them at once.
pub(super) const FULL: usize = 4096;
/// A cached batch is cut when its entries' keys reach this many bytes: sled writes a leaf
/// of up to 16 entries as one log message, and a message over 128 KiB becomes a separate
/// blob file, so a batch value stays a few KiB.
const BATCH_KEY_BYTES: usize = 4 * 1024;
/// ... or when it holds this many entries.
const BATCH_ENTRIES: usize = 256;
/// How long the queue may stay idle before kept `Cached` records are stored anyway.
pub(super) const IDLE_WRITE: Duration = Duration::from_millis(20);

/// Which tree a record goes to.
#[derive(Debug, Clone, Copy)]
pub(super) enum Tree {
    Runs,
    Attempts,
}

/// One record: tree, key, encoded value.
pub(super) struct Record {
    pub(super) tree: Tree,
    pub(super) key: Vec<u8>,
    pub(super) value: Vec<u8>,
}

/// What the store asks its writer to do.
pub(super) enum Msg {
    /// Store a record on its own; nobody waits for it.
    Record(Record),
    /// `Cached` records were added to [`CachedRecords`]: store them, soon.
    CachedKept,
    /// A `Running` record was kept in [`RunningRecords`]: store what is kept there now.
    RunningKept,
    /// Store an output, with its attempt record if any, then answer.
    Commit(Box<Commit>),
    /// Store a record, then answer.
    Acked(Box<(Record, Reply)>),
}

/// How a waiting message is answered.
pub(super) struct Reply {
    /// Flush before answering.
    pub(super) flush: bool,
    pub(super) to: TicketSender,
}

/// An output and its attempt record, written in one transaction.
pub(super) struct Commit {
    /// The task id and the stored bytes.
    pub(super) output: (String, Vec<u8>),
    /// The attempt record's key and value (in the `attempts` tree).
    pub(super) attempt: Option<(Vec<u8>, Vec<u8>)>,
    pub(super) reply: Reply,
}

/// What a store shares with its writer thread.
#[derive(Default)]
pub(super) struct Shared {
    /// `Cached` attempt records on their way to the writer.
    pub(super) cached: CachedRecords,
    /// `Running` attempt records on their way to the writer.
    pub(super) running: RunningRecords,
    /// The first error sled returned, once it did: the store has stopped.
    pub(super) failed: OnceLock<Failure>,
    /// Once the store has stopped: the values the outputs of the failed group had before
    /// it (`None`: no value). sled may hold the group's values in memory although they
    /// never reached the disk; reads answer these instead.
    shadow: Mutex<HashMap<String, Option<sled::IVec>>>,
}

impl Shared {
    /// The value `key` had before the failed group, if the failed group wrote it.
    pub(super) fn shadowed(&self, key: &str) -> Option<Option<Vec<u8>>> {
        let shadow = self.shadow.lock().unwrap_or_else(PoisonError::into_inner);
        shadow.get(key).map(|v| v.as_ref().map(|v| v.to_vec()))
    }
}

/// A failure of sled, kept to answer with (an `io::Error` is not `Clone`).
#[derive(Debug, Clone)]
pub(super) struct Failure {
    kind: io::ErrorKind,
    text: String,
}

impl Failure {
    pub(super) fn of(e: &sled::Error) -> Failure {
        match e {
            sled::Error::Io(io) => Failure {
                kind: io.kind(),
                text: io.to_string(),
            },
            other => Failure {
                kind: io::ErrorKind::Other,
                text: other.to_string(),
            },
        }
    }

    /// The error to answer with, for the store at `path`. `earlier` says the store had
    /// stopped before the work was tried.
    pub(super) fn error(&self, path: &std::path::Path, earlier: bool) -> DuraflowError {
        let text = if earlier {
            format!("the store stopped after an earlier failure: {}", self.text)
        } else {
            self.text.clone()
        };
        DuraflowError::io(path, io::Error::new(self.kind, text))
    }
}

/// `Cached` attempt records not stored yet; shared by the store, which adds to it, and its
/// writer, which takes them. In shards, one per adding thread (as far as there are shards):
/// every task of a cached re-run adds one, and with one buffer the worker threads would
/// take turns at its lock for every task.
#[derive(Default)]
pub(super) struct CachedRecords {
    shards: [CachedShard; CACHED_SHARDS],
}

/// Shards of [`CachedRecords`].
const CACHED_SHARDS: usize = 4;

// A shard nudges the writer every `FULL / CACHED_SHARDS` records: that must be a whole,
// non-zero number.
const _: () = assert!(FULL.is_multiple_of(CACHED_SHARDS) && FULL >= CACHED_SHARDS);

/// One shard of [`CachedRecords`], on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct CachedShard {
    kept: Mutex<Vec<CachedAttempt>>,
    /// The buffer that takes `kept`'s place when the writer takes its records: the one
    /// before it, emptied. A fresh buffer would cost the adding threads a page fault and a
    /// cache miss every few records; this one was written a moment ago.
    spare: Mutex<Vec<CachedAttempt>>,
}

/// Largest buffer a shard keeps as its spare.
const MAX_SPARE: usize = FULL;

impl CachedRecords {
    /// Adds `record`; returns whether the writer needs a nudge ([`Msg::CachedKept`]): the
    /// shard was empty, or holds a multiple of [`FULL`] / [`CACHED_SHARDS`] records now.
    pub(super) fn push(&self, record: CachedAttempt) -> bool {
        thread_local! {
            /// This thread's shard: threads take them in turn as they first add a record.
            static SHARD: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % CACHED_SHARDS
            };
        }
        let shard = SHARD.with(|shard| *shard);
        let mut kept = lock(&self.shards[shard].kept);
        kept.push(record);
        kept.len() == 1 || kept.len().is_multiple_of(FULL / CACHED_SHARDS)
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(&shard.kept).len())
            .sum()
    }

    /// Every kept record, shard by shard; each shard gets its spare buffer in their place.
    /// Give the buffers back with [`give_back`](Self::give_back) once done with them.
    fn take(&self) -> Vec<Vec<CachedAttempt>> {
        self.shards
            .iter()
            .map(|shard| {
                let spare = std::mem::take(&mut *lock(&shard.spare));
                std::mem::replace(&mut *lock(&shard.kept), spare)
            })
            .collect()
    }

    /// Empties the buffers [`take`](Self::take) returned and keeps them as the shards'
    /// spares (all but oversized ones).
    fn give_back(&self, taken: Vec<Vec<CachedAttempt>>) {
        for (shard, mut buffer) in self.shards.iter().zip(taken) {
            if buffer.capacity() <= MAX_SPARE {
                buffer.clear();
                *lock(&shard.spare) = buffer;
            }
        }
    }
}

/// `mutex`, locked. Every critical section on these buffers is one call on a `Vec`, so a
/// poisoned lock holds a consistent one.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `Running` attempt records not given to the writer yet, by attempt key; shared by the
/// store, which adds them and takes back those a commit makes moot, and its writer, which
/// stores the rest before every group it applies.
///
/// A task that runs quickly commits its output, with its `Succeeded` record under the same
/// attempt key, a moment after its `Running` record: queued as a message of its own, that
/// record was encoded, held in the queue and written only to be overwritten by the commit
/// (a third of such a task's sled writes, and in a wide run of 100k tasks, whose messages
/// all wait in the queue while the writer catches up, some 25 MiB). Kept here instead, it is
/// taken back by the commit and never reaches the writer. A record still kept when the
/// writer applies a group is stored first in that group, before the group's own messages:
/// it was kept before any of them was sent by its task, so a later record of the same
/// attempt (`Failed`, say) still overwrites it, and it is durable no later than the next
/// commit, as [`RunLog::record`](crate::RunLog::record) promises.
#[derive(Default)]
pub(super) struct RunningRecords {
    kept: Mutex<HashMap<Vec<u8>, AttemptRecord, foldhash::fast::RandomState>>,
    /// A [`Msg::RunningKept`] is on its way and the writer has not taken the records yet.
    nudged: AtomicBool,
}

impl RunningRecords {
    /// Keeps `record` under its attempt `key`; returns whether the writer needs a nudge
    /// ([`Msg::RunningKept`]): none is on its way.
    pub(super) fn push(&self, key: Vec<u8>, record: AttemptRecord) -> bool {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, record);
        !self.nudged.swap(true, Ordering::SeqCst)
    }

    /// Forgets the record under `key`, if still kept: a commit that writes a newer record
    /// under the same key is about to be sent.
    pub(super) fn remove(&self, key: &[u8]) {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Every kept record. A record kept from here on sends a new nudge.
    fn take(&self) -> HashMap<Vec<u8>, AttemptRecord, foldhash::fast::RandomState> {
        self.nudged.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.kept.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The writer's state between groups.
pub(super) struct Writer {
    pub(super) db: sled::Db,
    pub(super) trees: Trees,
    pub(super) path: PathBuf,
    shared: Arc<Shared>,
    /// When the kept `Cached` records are to be stored at the latest.
    store_by: Option<Instant>,
    /// This writer's batch keys: an id unique over the database's life, and a count.
    epoch: u64,
    seq: u32,
}

impl Writer {
    /// A writer for `db`.
    ///
    /// # Errors
    /// sled's, taking an id for the writer's batch keys.
    pub(super) fn new(
        db: sled::Db,
        trees: Trees,
        path: PathBuf,
        shared: Arc<Shared>,
    ) -> Result<Writer, sled::Error> {
        Ok(Writer {
            epoch: db.generate_id()?,
            seq: 0,
            db,
            trees,
            path,
            shared,
            store_by: None,
        })
    }

    /// Applies messages from `rx` until every sender is gone, then stores what is kept and
    /// flushes.
    pub(super) fn run(mut self, rx: Receiver<Msg>) {
        let mut group = Vec::new();
        loop {
            let first = match self.store_by {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(by) => rx.recv_deadline(by),
            };
            match first {
                Ok(msg) => group.push(msg),
                Err(RecvTimeoutError::Timeout) => {
                    self.store_kept();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(msg) => group.push(msg),
                    Err(_) => break,
                }
            }
            self.apply(&mut group);
        }
        if self.shared.failed.get().is_none() {
            if self.store_running().is_ok() {
                self.store_kept();
            }
            if self.shared.failed.get().is_some() {
                return;
            }
            if let Err(e) = self.db.flush() {
                self.fail(&e);
            }
        }
    }

    /// Records `e` as the failure that stopped the store (the first one wins).
    fn fail(&self, e: &sled::Error) -> Failure {
        let failure = Failure::of(e);
        tracing::error!(store = %self.path.display(), error = %failure.text, "sled failed; the store accepts no more writes");
        self.shared.failed.get_or_init(|| failure).clone()
    }

    /// Applies one group and answers whoever waits.
    fn apply(&mut self, group: &mut Vec<Msg>) {
        if let Some(failure) = self.shared.failed.get() {
            // Stopped: answer without touching sled.
            self.shared.cached.take();
            self.shared.running.take();
            for msg in group.drain(..) {
                let reply = match msg {
                    Msg::Commit(commit) => commit.reply,
                    Msg::Acked(acked) => acked.1,
                    Msg::Record(_) | Msg::CachedKept | Msg::RunningKept => continue,
                };
                reply.to.send(Err(failure.error(&self.path, true)));
            }
            return;
        }
        let mut commits = Vec::new();
        let mut replies = Vec::new();
        let mut result = self.store_running();
        for msg in group.drain(..) {
            match msg {
                Msg::Record(record) => {
                    if result.is_ok() {
                        result = self.insert(&record);
                    }
                }
                Msg::RunningKept => {} // stored above
                Msg::CachedKept => {
                    self.store_by
                        .get_or_insert_with(|| Instant::now() + IDLE_WRITE);
                }
                Msg::Commit(commit) => commits.push(commit),
                Msg::Acked(acked) => {
                    let (record, reply) = *acked;
                    if result.is_ok() {
                        result = self.insert(&record);
                    }
                    replies.push(reply);
                }
            }
        }
        if commits.is_empty() && replies.is_empty() && self.shared.cached.len() < FULL {
            return; // a failure is recorded and logged by `fail`
        }
        // Whoever waits for a commit may rely on every record sent before it.
        if result.is_ok() {
            result = self.store_batches();
        }
        let prior = RefCell::new(Vec::new());
        if result.is_ok() {
            result = self.commit(&commits, &prior);
        }
        if result.is_ok()
            && (replies.iter().chain(commits.iter().map(|c| &c.reply))).any(|r| r.flush)
        {
            result = self.db.flush().map(drop).map_err(|e| self.fail(&e));
        }
        if result.is_err() && self.shared.failed.get().is_some() {
            self.shadow(&commits, &prior.into_inner());
        }
        replies.extend(commits.into_iter().map(|c| c.reply));
        for reply in replies {
            reply
                .to
                .send(result.clone().map_err(|f| f.error(&self.path, false)));
        }
    }

    /// Stores every kept `Cached` record now (when they were due, or at the end).
    fn store_kept(&mut self) {
        if self.shared.failed.get().is_none() {
            // A failure is recorded and logged by `store_batches`.
            let _ = self.store_batches();
        }
    }

    /// Stores the kept `Running` records (see [`RunningRecords`]).
    fn store_running(&self) -> Result<(), Failure> {
        for (key, record) in self.shared.running.take() {
            // Encoding a record of plain fields does not fail; if it ever did, the record
            // is left out, as a record the store could not queue would be.
            let Ok(value) = encode_attempt(&record) else {
                continue;
            };
            self.trees
                .attempts
                .insert(key, value)
                .map_err(|e| self.fail(&e))?;
        }
        Ok(())
    }

    fn insert(&self, record: &Record) -> Result<(), Failure> {
        let tree = match record.tree {
            Tree::Runs => &self.trees.runs,
            Tree::Attempts => &self.trees.attempts,
        };
        tree.insert(record.key.as_slice(), record.value.as_slice())
            .map(drop)
            .map_err(|e| self.fail(&e))
    }

    /// Stores the kept `Cached` records as batches, shard by shard and one run at a time
    /// within a shard (records of one run arrive together, so a run's records stay in a few
    /// batches per shard).
    fn store_batches(&mut self) -> Result<(), Failure> {
        self.store_by = None;
        let kept = self.shared.cached.take();
        let stored = kept
            .iter()
            .try_for_each(|shard| self.store_batches_of(shard));
        self.shared.cached.give_back(kept);
        stored
    }

    /// Stores `kept` (the records of one shard) as batches.
    fn store_batches_of(&mut self, kept: &[CachedAttempt]) -> Result<(), Failure> {
        let mut rest = kept;
        while let Some(first) = rest.first() {
            let run: RunId = first.run;
            let mut len = 0;
            let mut key_bytes = 0;
            while let Some(r) = rest.get(len) {
                if r.run != run
                    || len == BATCH_ENTRIES
                    || (len > 0 && key_bytes + r.key.len() > BATCH_KEY_BYTES)
                {
                    break;
                }
                key_bytes += r.key.len();
                len += 1;
            }
            let (batch, tail) = rest.split_at(len);
            rest = tail;
            let value = CachedBatch::of(run, batch).encode();
            if self.seq == u32::MAX {
                self.epoch = self.db.generate_id().map_err(|e| self.fail(&e))?;
                self.seq = 0;
            }
            self.seq += 1;
            self.trees
                .attempts
                .insert(batch_key(run, self.epoch, self.seq), value)
                .map_err(|e| self.fail(&e))?;
        }
        Ok(())
    }

    /// Keeps what the outputs of a failed group were before it (see [`Shared`]'s `shadow`),
    /// from `prior` (as [`commit`](Self::commit) found them; an output it did not reach kept
    /// its value, which is read now).
    fn shadow(&self, commits: &[Box<Commit>], prior: &[Option<sled::IVec>]) {
        let mut shadow = self
            .shared
            .shadow
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, commit) in commits.iter().enumerate() {
            let key = &commit.output.0;
            if shadow.contains_key(key) {
                continue; // an earlier commit of the group wrote it: its prior value stands
            }
            let value = match prior.get(i) {
                Some(value) => value.clone(),
                None => match self.trees.outputs.get(key) {
                    Ok(value) => value,
                    Err(_) => continue, // unknown: the read goes to sled
                },
            };
            shadow.insert(key.clone(), value);
        }
    }

    /// Applies the group's commits in transactions of up to [`TX_COMMITS`], so no output
    /// exists without its attempt record (both are in the same transaction; records that
    /// stand alone are plain inserts: a sled transaction costs tens of microseconds per
    /// call, an insert a few). Leaves in `prior` the value each output had before, for every
    /// commit its transaction reached, failed or not (the first failure stops the store;
    /// an output not reached kept its value).
    fn commit(
        &self,
        commits: &[Box<Commit>],
        prior: &RefCell<Vec<Option<sled::IVec>>>,
    ) -> Result<(), Failure> {
        prior.borrow_mut().clear();
        for chunk in commits.chunks(TX_COMMITS) {
            let chunk_prior = RefCell::new(Vec::with_capacity(chunk.len()));
            let applied =
                (&self.trees.outputs, &self.trees.attempts).transaction(|(outputs, attempts)| {
                    // sled runs this again after a conflict: start over.
                    let mut chunk_prior = chunk_prior.borrow_mut();
                    chunk_prior.clear();
                    for commit in chunk {
                        let (key, value) = &commit.output;
                        chunk_prior.push(outputs.insert(key.as_bytes(), value.as_slice())?);
                        if let Some((key, value)) = &commit.attempt {
                            attempts.insert(key.as_slice(), value.as_slice())?;
                        }
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                });
            // Kept whether or not the transaction failed: a transaction that failed while
            // committing may already show its values to readers, and the shadow must then
            // answer the values from before it (what `prior` holds), not those.
            prior.borrow_mut().extend(chunk_prior.into_inner());
            applied.map_err(|e| match e {
                TransactionError::Storage(e) => self.fail(&e),
                TransactionError::Abort(()) => Failure {
                    kind: io::ErrorKind::Other,
                    text: "transaction aborted".to_owned(),
                },
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AttemptOutcome;

    fn running(key: &str) -> AttemptRecord {
        AttemptRecord {
            run: 1,
            key: key.to_owned(),
            attempt: 1,
            started_ms: 0,
            finished_ms: None,
            outcome: AttemptOutcome::Running,
            duration_us: None,
            output_size: None,
        }
    }

    #[test]
    fn a_kept_running_record_nudges_once_until_taken() {
        let kept = RunningRecords::default();
        assert!(kept.push(b"a".to_vec(), running("a")), "the first nudges");
        assert!(
            !kept.push(b"b".to_vec(), running("b")),
            "one nudge on its way"
        );
        kept.remove(b"a"); // its commit is on its way
        let taken = kept.take();
        assert_eq!(taken.keys().collect::<Vec<_>>(), [&b"b".to_vec()]);
        assert!(kept.take().is_empty());
        assert!(kept.push(b"c".to_vec(), running("c")), "taken: a new nudge");
    }
}
