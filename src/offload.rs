//! Running store calls off the async executor.

use std::sync::Arc;

use crate::{DuraflowError, Storage};

/// Runs `op` against `db` without blocking the async executor.
///
/// Stores that say they never block ([`Storage::may_block`] is `false`) run inline. Others
/// run on tokio's blocking pool when a tokio runtime is current, and on a fresh thread
/// otherwise (dagx itself is runtime-agnostic). A panic inside `op` is resumed here.
pub(crate) async fn off_executor<R, F>(
    db: &Arc<dyn Storage + Send + Sync>,
    key: &str,
    op: F,
) -> Result<R, DuraflowError>
where
    R: Send + 'static,
    F: FnOnce(&dyn Storage) -> Result<R, DuraflowError> + Send + 'static,
{
    if !db.may_block() {
        return op(db.as_ref());
    }
    let db = Arc::clone(db);
    let shutdown = || DuraflowError::RuntimeShutdown {
        key: key.to_owned(),
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => match handle.spawn_blocking(move || op(db.as_ref())).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(shutdown()),
        },
        Err(_) => {
            let (tx, rx) = futures::channel::oneshot::channel();
            std::thread::Builder::new()
                .name("duraflow-io".to_owned())
                .spawn(move || {
                    let _ = tx.send(op(db.as_ref()));
                })
                .map_err(|e| DuraflowError::io("<thread spawn>", e))?;
            rx.await.map_err(|_| shutdown())?
        }
    }
}
