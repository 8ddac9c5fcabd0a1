//! The writer thread: it writes every commit and record of a store (removals and gc write
//! on the calling thread). It takes the queued messages in groups and applies each group in
//! order: plain inserts for records that stand alone, the group's `Cached` attempts as a
//! few [`CachedBatch`] values, and its commits in transactions of up to [`TX_COMMITS`]; then
//! one sync (see `sync.rs`), if anyone in the group waits for one, and the answers.
//!
//! The first error sled returns to the writer (a full disk, say), or a panic inside sled,
//! fails its group and stops the store for good (see `stop.rs`): every later message is
//! answered with that error, without calling sled again. sled 0.34 does not always recover
//! from a failed write — after a failed blob write (a value or page over 128 KiB) its next
//! flush waits forever — so a failed store never flushes again, and
//! [`SledStore`](super::SledStore)'s drop leaves sled's database open rather than let
//! sled's own drop (which flushes) hang.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use futures::channel::oneshot;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::blob::{Blobs, Collected, Held};
use super::layout::{batch_key, encode_record, CachedBatch, Trees, Witness};
use super::stop::{inside_sled, Failure, Prior, Shared};
use super::sync::Syncer;
use crate::record::AttemptRecord;

/// The most messages one group takes.
const MAX_GROUP: usize = 4096;
/// The most commits one sled transaction takes. A sled transaction keeps a copy of every
/// value it writes and reads, and what sled frees during it waits for it to end, so a
/// group's commits are applied in transactions of this many, and flushed once.
const TX_COMMITS: usize = 256;
/// The most `Cached` attempts one [`CachedBatch`] value holds, and the most bytes of ids
/// (sled writes a value over 128 KiB to a blob file of its own).
const BATCH_ENTRIES: usize = 256;
const BATCH_KEY_BYTES: usize = 16 * 1024;

/// One record: its tree, key and encoded value.
pub(super) struct Record {
    pub(super) tree: sled::Tree,
    pub(super) key: Vec<u8>,
    pub(super) value: Vec<u8>,
}

/// What the store asks its writer to do.
pub(super) enum Msg {
    /// Store a record; nobody waits for it.
    Record(Record),
    /// Store a `Cached` attempt, batched with the others of its group.
    Cached(Box<AttemptRecord>),
    /// Store an output, with its attempt record if any, then answer.
    Commit(Box<Commit>),
    /// Store a record, then answer.
    Acked(Record, Reply),
    /// Once every message before is applied and durable, remove the output files nothing
    /// refers to, then answer with what was removed.
    Gc(oneshot::Sender<Result<Collected, Failure>>),
}

/// How a waiting message is answered.
pub(super) struct Reply {
    /// Flush before answering.
    pub(super) flush: bool,
    pub(super) to: oneshot::Sender<Result<(), Failure>>,
}

impl Reply {
    /// A reply, and where its answer arrives.
    pub(super) fn new(flush: bool) -> (Reply, oneshot::Receiver<Result<(), Failure>>) {
        let (to, answer) = oneshot::channel();
        (Reply { flush, to }, answer)
    }
}

/// An output and its attempt record, written in one transaction.
pub(super) struct Commit {
    /// The task id.
    pub(super) key: String,
    /// The stored bytes, for the `outputs` tree; `None` for an output kept in a file of its
    /// own (already durable), which `witness` names.
    pub(super) value: Option<Vec<u8>>,
    /// The output's witness; the writer sets its commit number.
    pub(super) witness: Witness,
    /// The output's file, held from gc until the commit is applied and durable.
    pub(super) _held: Option<Held>,
    /// The attempt record's key and value (in the `attempts` tree).
    pub(super) attempt: Option<(Vec<u8>, Vec<u8>)>,
    pub(super) reply: Reply,
}

/// The writer's state between groups.
pub(super) struct Writer {
    pub(super) db: sled::Db,
    pub(super) trees: Trees,
    pub(super) shared: Arc<Shared>,
    pub(super) syncer: Arc<Syncer>,
    pub(super) blobs: Arc<Blobs>,
}

/// One group's messages, by kind.
#[derive(Default)]
struct Group {
    records: Vec<Record>,
    cached: Vec<AttemptRecord>,
    commits: Vec<Commit>,
    acked: Vec<(Record, Reply)>,
    gcs: Vec<oneshot::Sender<Result<Collected, Failure>>>,
}

impl Writer {
    /// Applies messages from `rx` in groups until every sender is gone, then syncs.
    pub(super) fn run(self, rx: Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            group.extend(rx.try_iter().take(MAX_GROUP - 1));
            self.apply(group);
        }
        if let Err(failure) = self.guarded(|| self.syncer.sync(&self.db, &self.trees.meta)) {
            self.shared.stop(failure);
        }
    }

    /// Runs `work`, a panic inside sled becoming a failure.
    fn guarded(&self, work: impl FnOnce() -> Result<(), Failure>) -> Result<(), Failure> {
        inside_sled(work).unwrap_or_else(|panic| Err(Failure::damage(panic)))
    }

    /// Applies one group and answers whoever waits. A failure (an error or a panic inside
    /// sled) fails the group and stops the store, once what its outputs held before is
    /// kept for readers.
    fn apply(&self, group: Vec<Msg>) {
        let mut writes = Group::default();
        for msg in group {
            match msg {
                Msg::Record(record) => writes.records.push(record),
                Msg::Cached(attempt) => writes.cached.push(*attempt),
                Msg::Commit(commit) => writes.commits.push(*commit),
                Msg::Acked(record, reply) => writes.acked.push((record, reply)),
                Msg::Gc(reply) => writes.gcs.push(reply),
            }
        }
        let prior = RefCell::new(Vec::new());
        let result = match self.shared.failed() {
            Some(stopped) => Err(stopped.clone()),
            None => self
                .guarded(|| self.write(&writes, &prior))
                .map_err(|failure| {
                    let prior = prior.into_inner();
                    // Values the group did not reach are read from sled, which may panic again.
                    let shadow = inside_sled(|| self.prior(&writes.commits, prior));
                    self.shared.stop_with(failure, shadow.unwrap_or_default())
                }),
        };
        let Group {
            commits,
            acked,
            gcs,
            ..
        } = writes;
        // Dropping a commit releases its output's file to gc: it is applied and durable.
        for reply in acked
            .into_iter()
            .map(|(_, reply)| reply)
            .chain(commits.into_iter().map(|c| c.reply))
        {
            let _ = reply.to.send(result.clone());
        }
        for reply in gcs {
            let collected = result.clone().and_then(|()| self.guarded_gc());
            let _ = reply.send(collected);
        }
    }

    /// Removes the output files nothing refers to, after a sync: a file goes only once
    /// no durable witness can name it. A failure stops the store.
    fn guarded_gc(&self) -> Result<Collected, Failure> {
        let mut collected = Collected::default();
        let gc = self.guarded(|| {
            self.syncer.sync(&self.db, &self.trees.meta)?;
            let mut referenced = HashSet::new();
            for witness in self.trees.witnesses.iter().values() {
                let witness = witness.map_err(|e| Failure::of(&e))?;
                if let Some(digest) = Witness::decode(&witness).and_then(|w| w.blob) {
                    referenced.insert(digest);
                }
            }
            collected = self.blobs.gc(&referenced).map_err(|e| Failure::io(&e))?;
            Ok(())
        });
        gc.map(|()| collected)
            .map_err(|failure| self.shared.stop(failure))
    }

    /// Writes a group in order — records, `Cached` batches, commits, then the records
    /// answered (a run's final record goes after every record of the run sent before it) —
    /// and syncs once if anyone in the group waits for it.
    fn write(&self, group: &Group, prior: &RefCell<Vec<Prior>>) -> Result<(), Failure> {
        for record in &group.records {
            self.insert(record)?;
        }
        self.store_cached(&group.cached)?;
        self.commit(&group.commits, prior)?;
        for (record, _) in &group.acked {
            self.insert(record)?;
        }
        let flush = (group.acked.iter().map(|(_, r)| r))
            .chain(group.commits.iter().map(|c| &c.reply))
            .any(|r| r.flush);
        if flush {
            self.syncer.sync(&self.db, &self.trees.meta)?;
        }
        Ok(())
    }

    fn insert(&self, record: &Record) -> Result<(), Failure> {
        (record.tree)
            .insert(record.key.as_slice(), record.value.as_slice())
            .map(drop)
            .map_err(|e| Failure::of(&e))
    }

    /// Stores `Cached` attempts as batches of up to [`BATCH_ENTRIES`] attempts of one run
    /// each, under keys unique over the database's life (sled's `generate_id`).
    fn store_cached(&self, cached: &[AttemptRecord]) -> Result<(), Failure> {
        let mut rest = cached;
        while let Some(first) = rest.first() {
            let run = first.run;
            let mut bytes = 0;
            let len = rest
                .iter()
                .take(BATCH_ENTRIES)
                .take_while(|a| {
                    bytes += a.key.len();
                    a.run == run && (bytes <= BATCH_KEY_BYTES || a.key.len() == bytes)
                })
                .count();
            let (batch, tail) = rest.split_at(len);
            rest = tail;
            let Ok(value) = encode_record(&CachedBatch::of(run, batch)) else {
                continue; // plain numbers and strings always encode
            };
            let id = self.db.generate_id().map_err(|e| Failure::of(&e))?;
            self.trees
                .attempts
                .insert(batch_key(run, id), value)
                .map_err(|e| Failure::of(&e))?;
        }
        Ok(())
    }

    /// What the outputs of a failed group held before it, from `prior` (as
    /// [`commit`](Self::commit) found them; an output it did not reach kept its value,
    /// which is read now). The first commit of a key says what it was before the group.
    fn prior(&self, commits: &[Commit], prior: Vec<Prior>) -> Vec<(String, Prior)> {
        let mut prior = prior.into_iter();
        let mut found = Vec::new();
        for commit in commits {
            let key = commit.key.as_str();
            let before = match prior.next() {
                Some(before) => before,
                None => match (self.trees.outputs.get(key), self.trees.witnesses.get(key)) {
                    (Ok(value), Ok(witness)) => Prior { value, witness },
                    _ => continue, // unknown: the read goes to sled
                },
            };
            found.push((key.to_owned(), before));
        }
        found
    }

    /// Applies the group's commits in transactions of up to [`TX_COMMITS`], so no output
    /// exists without its attempt record and its witness. Leaves in `prior` the value each
    /// output had before, for every commit its transaction reached, failed or not (the
    /// first failure stops the store; an output not reached kept its value).
    fn commit(&self, commits: &[Commit], prior: &RefCell<Vec<Prior>>) -> Result<(), Failure> {
        // No sync that ends before these writes makes them durable.
        let commit_number = self.syncer.durable() + 1;
        for chunk in commits.chunks(TX_COMMITS) {
            let chunk_prior = RefCell::new(Vec::with_capacity(chunk.len()));
            let trees = (
                &self.trees.outputs,
                &self.trees.witnesses,
                &self.trees.attempts,
            );
            let applied = trees.transaction(|(outputs, witnesses, attempts)| {
                // sled runs this again after a conflict: start over.
                let mut chunk_prior = chunk_prior.borrow_mut();
                chunk_prior.clear();
                for commit in chunk {
                    let key = commit.key.as_bytes();
                    let value = match &commit.value {
                        Some(value) => outputs.insert(key, value.as_slice())?,
                        None => outputs.remove(key)?,
                    };
                    let witness = Witness {
                        commit: commit_number,
                        ..commit.witness
                    };
                    let witness = witnesses.insert(key, witness.encode())?;
                    chunk_prior.push(Prior { value, witness });
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
                TransactionError::Storage(e) => Failure::of(&e),
                TransactionError::Abort(()) => {
                    Failure::io(&io::Error::other("transaction aborted"))
                }
            })?;
        }
        Ok(())
    }
}
