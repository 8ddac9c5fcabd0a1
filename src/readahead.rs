//! Read-ahead of a run's stored outputs, for stores that ask for it
//! ([`Storage::read_ahead`](crate::Storage::read_ahead)).
//!
//! A task of a cached re-run spends most of its time waiting for its store read to come
//! back from the I/O pool: two thread hand-overs for a few microseconds of reading. So when
//! the first task of a run starts, every task id of the run is handed to the pool in
//! chunks, in the order the tasks were added; each task then takes its read from there
//! instead of queueing its own. A run therefore sees the outputs stored when it started,
//! as it would if its tasks all started at once.
//!
//! Read-ahead is bounded: only the first [`MAX_QUEUED`] tasks of a run are read ahead (each
//! holds a channel until its read arrives; the others cost nothing here), and once
//! [`MAX_AHEAD_BYTES`] of read but not yet taken outputs, or [`MAX_AHEAD_READS`] reads, are
//! held, the rest of the ids are dropped. Tasks left out read for themselves.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::channel::oneshot;

use crate::offload::{off_executor, submit, Offloaded};
use crate::{DuraflowError, Storage};

/// What a read of one key gives.
pub(crate) type ReadResult = Result<Option<Vec<u8>>, DuraflowError>;

/// Where a task's read will come from: the read-ahead (a dropped sender then means "read
/// it yourself"), or the task's own read, when its key was not queued. A task awaits it
/// through [`ReadAhead::read`].
pub(crate) enum Pending {
    /// The key is queued: the read arrives here.
    Queued(oneshot::Receiver<ReadResult>),
    /// The key was not queued (the run has [`MAX_QUEUED`] queued already, or has started).
    Own,
}

/// A key waiting to be read ahead, with the sender its task waits on.
type Queued = (Arc<str>, oneshot::Sender<ReadResult>);

/// Bytes of read-ahead outputs not yet taken by their tasks, above which reading ahead stops.
const MAX_AHEAD_BYTES: usize = 32 << 20;
/// Reads done ahead and not yet taken, above which reading ahead stops: each holds a
/// channel and a buffer, and a run of 100k tasks must not hold them all at once.
const MAX_AHEAD_READS: usize = 8192;
/// Keys per pool job: enough to amortise the hand-over, few enough to spread over threads.
const CHUNK: usize = 32;
/// Keys queued per run, above which tasks read for themselves: a wide run of 100k tasks
/// would otherwise hold a channel per task from the moment it is added, tens of MiB. This
/// many (about 2 MiB of channels) cover a wide layer of ten thousand tasks, whose last
/// tasks would otherwise each pay a hand-over of their own (reads held are bounded by
/// [`MAX_AHEAD_READS`] anyway).
const MAX_QUEUED: usize = 16384;

/// The read-ahead state of one run.
pub(crate) struct ReadAhead {
    /// Keys waiting for the run to start, with the sender their task waits on.
    queued: Mutex<Vec<Queued>>,
    started: AtomicBool,
    /// Shared with the pool jobs: bytes and reads done ahead and not yet taken.
    ahead: Arc<Ahead>,
}

impl ReadAhead {
    pub(crate) fn new() -> ReadAhead {
        ReadAhead {
            queued: Mutex::default(),
            started: AtomicBool::new(false),
            ahead: Arc::default(),
        }
    }

    /// Queues `key` for reading ahead, unless [`MAX_QUEUED`] keys are queued already or the
    /// read-ahead has started; its task waits on what this returns.
    pub(crate) fn enqueue(&self, key: Arc<str>) -> Pending {
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked at under the lock: `start` sets it before it takes the queue, so a key is
        // either in the queue it takes or not queued at all.
        if queued.len() >= MAX_QUEUED || self.started.load(Ordering::SeqCst) {
            return Pending::Own;
        }
        let (tx, rx) = oneshot::channel();
        queued.push((key, tx));
        Pending::Queued(rx)
    }

    /// Starts reading every queued key from `db` on the I/O pool; does nothing after the
    /// first call. Keys enqueued later are not queued: their tasks read for themselves.
    pub(crate) fn start(&self, db: &Arc<dyn Storage + Send + Sync>) {
        // Every task of the run calls this: a load, not a write, once it has started.
        if self.started.load(Ordering::SeqCst) || self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let queued =
            std::mem::take(&mut *self.queued.lock().unwrap_or_else(PoisonError::into_inner));
        // Chunks taken from the front in order (not `split_off`, which would copy the rest
        // of the queue once per chunk).
        let mut queued = queued.into_iter();
        loop {
            let chunk: Vec<Queued> = queued.by_ref().take(CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            let db = Arc::clone(db);
            let ahead = Arc::clone(&self.ahead);
            // A job that cannot be queued drops its senders: those tasks read for themselves.
            submit(Box::new(move || read_chunk(&*db, &ahead, chunk)));
        }
    }

    /// The read of `id` from `db` for the task that got `pending` from
    /// [`enqueue`](Self::enqueue): the read-ahead's, or the task's own when the read-ahead
    /// has none for it.
    pub(crate) fn read<'a>(
        &'a self,
        db: &'a Arc<dyn Storage + Send + Sync>,
        id: &'a str,
        pending: Pending,
    ) -> Read<'a> {
        match pending {
            Pending::Queued(rx) => Read::Ahead {
                rx,
                readahead: self,
                db,
                id,
            },
            Pending::Own => Read::own(db, id),
        }
    }
}

/// A task's read of its stored output. A plain future (no box, no copy of the id): every
/// task of a cached re-run awaits one.
pub(crate) enum Read<'a> {
    /// Waiting for the read-ahead; if it has no read for the task, the task reads itself.
    Ahead {
        rx: oneshot::Receiver<ReadResult>,
        readahead: &'a ReadAhead,
        db: &'a Arc<dyn Storage + Send + Sync>,
        id: &'a str,
    },
    /// The task's own read.
    Own(Offloaded<'static, Option<Vec<u8>>>),
    /// The read was returned.
    Done,
}

impl Read<'_> {
    /// The task's own read of `id` from `db`, off the executor.
    pub(crate) fn own(db: &Arc<dyn Storage + Send + Sync>, id: &str) -> Self {
        Read::Own(off_executor(db, id, |db, key| db.read(key)))
    }
}

impl Future for Read<'_> {
    type Output = ReadResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReadResult> {
        loop {
            match &mut *self {
                Read::Ahead {
                    rx,
                    readahead,
                    db,
                    id,
                } => match Pin::new(rx).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(read)) => {
                        // Taken: no longer held (once per read, as `Done` follows).
                        readahead.ahead.take(match &read {
                            Ok(Some(bytes)) => bytes.len(),
                            _ => 0,
                        });
                        *self = Read::Done;
                        return Poll::Ready(read);
                    }
                    // Not read ahead: read it now.
                    Poll::Ready(Err(oneshot::Canceled)) => {
                        let own = Read::own(db, id);
                        *self = own;
                    }
                },
                Read::Own(own) => {
                    let read = std::task::ready!(Pin::new(own).poll(cx));
                    *self = Read::Done;
                    return Poll::Ready(read);
                }
                // Like any future: not to be polled again once it returned its output (a
                // read-ahead's answer would be gone, and a second read is not the answer).
                Read::Done => panic!("a stored-output read was polled after it completed"),
            }
        }
    }
}

/// What the read-ahead of one run holds that its tasks have not taken yet: reads and their
/// bytes, packed in one word (reads in the high [`READS_BITS`] bits), so that handing a read
/// over and taking it cost one atomic operation each on a line the I/O threads and the
/// worker threads all write.
#[derive(Default)]
struct Ahead(AtomicU64);

/// Bits of [`Ahead`] counting bytes; the rest count reads.
const BYTES_BITS: u32 = 40;
/// Bits of [`Ahead`] counting reads.
const READS_BITS: u32 = 64 - BYTES_BITS;

impl Ahead {
    /// One read of `bytes` bytes, as added to or taken from the count. Bytes count only
    /// towards [`MAX_AHEAD_BYTES`], so a larger read counts as just over it: the bytes held
    /// then stay far below 2^40 (each I/O thread adds at most one read after the count is
    /// full), and the reads' bits are never reached.
    fn one(bytes: usize) -> u64 {
        (1 << BYTES_BITS) | bytes.min(MAX_AHEAD_BYTES + 1) as u64
    }

    fn add(&self, bytes: usize) {
        self.0.fetch_add(Ahead::one(bytes), Ordering::SeqCst);
    }

    fn take(&self, bytes: usize) {
        self.0.fetch_sub(Ahead::one(bytes), Ordering::SeqCst);
    }

    /// (reads, bytes) held.
    fn held(&self) -> (usize, usize) {
        let held = self.0.load(Ordering::SeqCst);
        (
            (held >> BYTES_BITS) as usize,
            (held & ((1 << BYTES_BITS) - 1)) as usize,
        )
    }

    fn full(&self) -> bool {
        let (reads, bytes) = self.held();
        bytes > MAX_AHEAD_BYTES || reads >= MAX_AHEAD_READS
    }
}

// Both counts fit their bits with room to spare (see `Ahead::one`).
const _: () = assert!(MAX_AHEAD_READS < 1 << (READS_BITS - 1));
const _: () = assert!(((MAX_AHEAD_BYTES + 1) as u64) < 1 << (BYTES_BITS - 1));

fn read_chunk(db: &dyn Storage, ahead: &Ahead, chunk: Vec<Queued>) {
    for (key, tx) in chunk {
        if ahead.full() || tx.is_canceled() {
            continue; // dropping `tx` sends the task to read for itself
        }
        let result = db.read(&key);
        let len = match &result {
            Ok(Some(bytes)) => bytes.len(),
            _ => 0,
        };
        ahead.add(len);
        if tx.send(result).is_err() {
            ahead.take(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn one_key(key: &str) -> (Vec<Queued>, oneshot::Receiver<ReadResult>) {
        let (tx, rx) = oneshot::channel();
        (vec![(Arc::from(key), tx)], rx)
    }

    #[test]
    fn a_full_read_ahead_sends_the_task_to_read_for_itself() {
        let db = MemoryStore::new();
        db.write("k", b"v").unwrap();
        let ahead = Ahead::default();
        for _ in 0..MAX_AHEAD_READS {
            ahead.add(0);
        }
        let (chunk, rx) = one_key("k");
        read_chunk(&db, &ahead, chunk);
        assert!(
            futures::executor::block_on(rx).is_err(),
            "no read: the sender was dropped"
        );
        assert_eq!(ahead.held(), (MAX_AHEAD_READS, 0));

        let ahead = Ahead::default();
        ahead.add(MAX_AHEAD_BYTES + 1);
        let (chunk, rx) = one_key("k");
        read_chunk(&db, &ahead, chunk);
        assert!(futures::executor::block_on(rx).is_err());
    }

    #[test]
    fn held_reads_and_bytes_are_counted_apart() {
        let ahead = Ahead::default();
        ahead.add(5);
        ahead.add(7);
        ahead.add(usize::MAX);
        assert_eq!(ahead.held().0, 3);
        assert!(ahead.full(), "a read of more than MAX_AHEAD_BYTES fills it");
        ahead.take(usize::MAX);
        ahead.take(5);
        assert_eq!(ahead.held(), (1, 7));
        assert!(!ahead.full());
    }

    #[test]
    fn a_read_ahead_is_counted_until_taken() {
        let db = MemoryStore::new();
        db.write("k", b"value").unwrap();
        let ahead = Ahead::default();
        let (chunk, rx) = one_key("k");
        read_chunk(&db, &ahead, chunk);
        let read = futures::executor::block_on(rx).unwrap().unwrap();
        assert_eq!(read.as_deref(), Some(&b"value"[..]));
        assert_eq!(ahead.held(), (1, 5));
    }

    #[test]
    fn only_the_first_keys_of_a_run_are_queued() {
        let readahead = ReadAhead::new();
        for i in 0..MAX_QUEUED {
            let pending = readahead.enqueue(Arc::from(format!("k{i}")));
            assert!(matches!(pending, Pending::Queued(_)));
        }
        let over = readahead.enqueue(Arc::from("over"));
        assert!(matches!(over, Pending::Own), "read it yourself");
    }

    #[test]
    fn a_key_added_after_the_start_reads_for_itself() {
        let db: Arc<dyn Storage + Send + Sync> = Arc::new(MemoryStore::new());
        let readahead = ReadAhead::new();
        readahead.start(&db);
        let late = readahead.enqueue(Arc::from("late"));
        assert!(matches!(late, Pending::Own), "read it yourself");
    }
}
