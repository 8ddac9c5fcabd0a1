//! Running store calls off the async executor, on a small pool of I/O threads.
//!
//! tokio's `spawn_blocking` starts a new OS thread whenever none is idle, up to 512: a wide
//! DAG layer of 10k cached tasks then pays for hundreds of thread starts. A fixed pool fed
//! by one MPMC queue keeps the threads warm, works under any async runtime (dagx is
//! runtime-agnostic), and bounds how many store calls run at once.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::thread;

use crate::{DuraflowError, Storage};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Environment variable that sets the number of I/O threads (default [`DEFAULT_THREADS`]).
const THREADS_VAR: &str = "DURAFLOW_IO_THREADS";
/// Enough concurrent fsyncs for the file system to batch them, few enough to stay cheap.
const DEFAULT_THREADS: usize = 8;

/// The queue of the process-wide I/O pool, or `None` when no thread could be started.
fn pool() -> Option<&'static crossbeam_channel::Sender<Job>> {
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
    .as_ref()
}

/// Runs `op(db, key)` without blocking the async executor.
///
/// Stores that say they never block ([`Storage::may_block`] is `false`) run inline. Others
/// run on the I/O pool. A panic inside `op` is resumed in the caller.
pub(crate) async fn off_executor<R, F>(
    db: &Arc<dyn Storage + Send + Sync>,
    key: &str,
    op: F,
) -> Result<R, DuraflowError>
where
    R: Send + 'static,
    F: FnOnce(&dyn Storage, &str) -> Result<R, DuraflowError> + Send + 'static,
{
    if !db.may_block() {
        return op(db.as_ref(), key);
    }
    let db = Arc::clone(db);
    let owned_key = key.to_owned();
    let (tx, rx) = futures::channel::oneshot::channel();
    let job: Job = Box::new(move || {
        let result = catch_unwind(AssertUnwindSafe(|| op(db.as_ref(), &owned_key)));
        let _ = tx.send(result);
    });
    match pool() {
        Some(queue) => {
            if let Err(crossbeam_channel::SendError(job)) = queue.send(job) {
                run_on_new_thread(key, job)?;
            }
        }
        None => run_on_new_thread(key, job)?,
    }
    match rx.await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => resume_unwind(panic),
        // The job was dropped unrun: only when its thread died, i.e. the process is exiting.
        Err(_) => Err(DuraflowError::RuntimeShutdown {
            key: key.to_owned(),
        }),
    }
}

fn run_on_new_thread(key: &str, job: Job) -> Result<(), DuraflowError> {
    thread::Builder::new()
        .name("duraflow-io".to_owned())
        .spawn(job)
        .map(drop)
        .map_err(|e| DuraflowError::Persist {
            key: key.to_owned(),
            source: Box::new(e),
        })
}
