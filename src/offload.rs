//! Running store calls off the async executor, on a small pool of I/O threads.
//!
//! tokio's `spawn_blocking` starts a new OS thread whenever none is idle, up to 512: a wide
//! DAG layer of 10k cached tasks then pays for hundreds of thread starts. A fixed pool fed
//! by one MPMC queue keeps the threads warm, works under any async runtime (dagx is
//! runtime-agnostic), and bounds how many store calls run at once.

use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::thread;

use futures::future::BoxFuture;

use crate::{DuraflowError, Storage};

/// Work for an I/O thread.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// Environment variable that sets the number of I/O threads (default [`DEFAULT_THREADS`]).
const THREADS_VAR: &str = "DURAFLOW_IO_THREADS";
/// Enough concurrent fsyncs for the file system to batch them, few enough to stay cheap.
const DEFAULT_THREADS: usize = 8;

/// The queue of the process-wide I/O pool, or `None` when no thread could be started.
fn pool() -> &'static Option<crossbeam_channel::Sender<Job>> {
    static POOL: OnceLock<Option<crossbeam_channel::Sender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var(THREADS_VAR)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_THREADS);
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let started = (0..threads)
            .filter(|i| {
                let rx = rx.clone();
                thread::Builder::new()
                    .name(format!("duraflow-io-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .is_ok()
            })
            .count();
        (started > 0).then_some(tx)
    })
}

/// Queues `job` on the I/O pool without waiting for it; returns whether it was queued
/// (`false` when no pool thread could be started: `job` is then dropped unrun). A panic in
/// `job` is caught and leaves the thread serving the pool.
pub(crate) fn submit(job: Job) -> bool {
    let job: Job = Box::new(move || {
        let _ = catch_unwind(AssertUnwindSafe(job));
    });
    matches!(pool(), Some(queue) if queue.send(job).is_ok())
}

/// Why a job handed to the pool produced no result.
enum Lost {
    /// No thread could be started for it.
    Spawn(std::io::Error),
    /// Its thread went away before it ran (the process is exiting).
    Abandoned,
}

/// Runs `job` on an I/O thread and waits for it without blocking; a panic in `job` is
/// resumed here.
async fn on_pool<R: Send + 'static>(job: impl FnOnce() -> R + Send + 'static) -> Result<R, Lost> {
    let (tx, rx) = futures::channel::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(job)));
    });
    let job = match pool() {
        Some(queue) => queue
            .send(job)
            .err()
            .map(|crossbeam_channel::SendError(job)| job),
        None => Some(job),
    };
    if let Some(job) = job {
        thread::Builder::new()
            .name("duraflow-io".to_owned())
            .spawn(job)
            .map_err(Lost::Spawn)?;
    }
    match rx.await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => Err(Lost::Abandoned),
    }
}

/// A store call's result: here now (a store that never blocks answered inline), or to be
/// awaited from the I/O pool. Awaiting a `Now` is ready at once. Either way the task's future
/// holds one of these across the await, never a second copy of the result.
pub(crate) enum Offloaded<'a, R> {
    Now(Option<Result<R, DuraflowError>>),
    Later(BoxFuture<'a, Result<R, DuraflowError>>),
}

impl<'a, R> Offloaded<'a, R> {
    /// A result that is here now.
    pub(crate) fn now(result: Result<R, DuraflowError>) -> Self {
        Offloaded::Now(Some(result))
    }
}

impl<R: Unpin> Future for Offloaded<'_, R> {
    type Output = Result<R, DuraflowError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Offloaded::Now(result) => match result.take() {
                Some(result) => Poll::Ready(result),
                None => Poll::Pending,
            },
            Offloaded::Later(later) => later.as_mut().poll(cx),
        }
    }
}

/// Runs `op(db, key)` without blocking the async executor.
///
/// Stores that say they never block ([`Storage::may_block`] is `false`) run inline, now.
/// Others run on the I/O pool. A panic inside `op` is resumed in the caller.
pub(crate) fn off_executor<R, F>(
    db: &Arc<dyn Storage + Send + Sync>,
    key: &str,
    op: F,
) -> Offloaded<'static, R>
where
    R: Send + 'static,
    F: FnOnce(&dyn Storage, &str) -> Result<R, DuraflowError> + Send + 'static,
{
    if !db.may_block() {
        return Offloaded::now(op(db.as_ref(), key));
    }
    let db = Arc::clone(db);
    // One copy of the key, shared by the job and the error that may name it.
    let key: Arc<str> = Arc::from(key);
    Offloaded::Later(Box::pin(async move {
        let job_key = Arc::clone(&key);
        match on_pool(move || op(db.as_ref(), &job_key)).await {
            Ok(result) => result,
            Err(Lost::Spawn(e)) => Err(DuraflowError::Persist {
                key: key.to_string(),
                source: Box::new(e),
            }),
            Err(Lost::Abandoned) => Err(DuraflowError::RuntimeShutdown {
                key: key.to_string(),
            }),
        }
    }))
}
