//! The [`Storage`] trait and the stores that ship with the crate.
//!
//! A store only keeps bytes under string keys; it knows nothing of dagx, tasks or tracing.
//! The envelope (type name, checksum) is put around values before they reach a store.

mod file;
pub(crate) mod location;
mod memory;
mod open;
#[cfg(feature = "postgres")]
mod postgres;
mod sled;
pub(crate) mod value;

pub use self::location::redacted;
pub use self::open::open_existing;
#[cfg(feature = "postgres")]
pub use self::postgres::{PgConfig, PgStore};
pub use self::sled::{Durability, SledConfig, SledStore};
pub use file::FileStore;
pub use memory::MemoryStore;
pub use value::{Encoder, Stored, Value};

use std::fs;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use futures::channel::oneshot;

use crate::{DuraflowError, RunHistory, RunLog};

/// What every store method returns: a boxed future of its result, so that [`Storage`] stays
/// object-safe and each store decides where its work runs.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DuraflowError>> + Send + 'a>>;

/// An object-safe, asynchronous byte store that duraflow-rs persists task outputs in.
///
/// Implement [`read`](Storage::read) and [`write`](Storage::write) to plug in your own
/// backend; every other method has a default. Keys reaching a store have passed
/// [`validate_key`](crate::validate_key); values are opaque bytes.
///
/// duraflow-rs awaits these futures on the async executor, so **a store must not block in
/// them**: a store that waits on files or a blocking client does that work inside
/// [`unblock`] (as [`FileStore`] does, and [`SledStore`] besides its writer thread); one
/// that never waits (like [`MemoryStore`]) answers with a ready future.
///
/// # Example
/// A store of one file per key, its blocking work inside [`unblock`]:
/// ```no_run
/// use std::{io::{self, Write}, path::PathBuf, sync::Arc};
/// use duraflow_rs::{unblock, Context, DuraflowError, Storage, StoreFuture};
///
/// /// One file per key in an existing directory. A sketch: hex file names limit keys to
/// /// 127 bytes, and nothing stops two processes from writing at once.
/// struct Dir(PathBuf);
///
/// impl Dir {
///     fn path(&self, key: &str) -> PathBuf {
///         self.0.join(key.bytes().map(|b| format!("{b:02x}")).collect::<String>())
///     }
/// }
///
/// impl Storage for Dir {
///     fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
///         let path = self.path(key);
///         unblock(move || match std::fs::read(&path) {
///             Ok(bytes) => Ok(Some(bytes)),
///             Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
///             Err(source) => Err(DuraflowError::Io { path, source }),
///         })
///     }
///
///     fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
///         let path = self.path(key);
///         unblock(move || {
///             // A crash leaves the old value or the new one: write aside, sync, rename.
///             let tmp = path.with_extension("tmp");
///             let written = std::fs::File::create(&tmp)
///                 .and_then(|mut file| file.write_all(&value).and_then(|()| file.sync_all()))
///                 .and_then(|()| std::fs::rename(&tmp, &path));
///             written.map_err(|source| DuraflowError::Io { path, source })
///         })
///     }
///
///     fn kind(&self) -> &'static str { "dir" }
/// }
///
/// let ctx = Arc::new(Context::new(Dir(PathBuf::from("outputs"))));
/// ```
pub trait Storage: Send + Sync {
    /// The bytes last written under `key`, or `None` if the key was never written (or was
    /// removed).
    ///
    /// # Errors
    /// Any [`DuraflowError`] the backend meets; [`DuraflowError::Corrupt`] when the stored
    /// bytes fail the backend's own integrity check.
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;

    /// Stores `value` under `key`, replacing any previous value atomically: a reader (or a
    /// restart after a crash) sees the old bytes or the new ones, never a mix. When the
    /// future resolves to `Ok`, the value is as durable as the store promises in its docs.
    ///
    /// # Errors
    /// Any [`DuraflowError`] the backend meets. The store then holds the previous value or
    /// the new one, never a mix; stores document which (a failure before anything is
    /// replaced, such as a full disk, leaves the previous value).
    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()>;

    /// The value stored under `key`, whole or as a reader of it: what a DAG reads, so that a
    /// store can hand out a large value without reading it into memory. By default,
    /// [`read`](Storage::read)'s bytes.
    ///
    /// # Errors
    /// As [`read`](Storage::read).
    fn read_value<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move { Ok(self.read(key).await?.map(Stored::Bytes)) })
    }

    /// Stores `value` under `key` as [`write`](Storage::write) does: what a DAG writes, so
    /// that a store can write a large output as it is encoded, without holding it in memory.
    /// By default, a stream is encoded into memory inside [`unblock`], then written with
    /// `write`.
    ///
    /// A store calls a stream's [`Encoder::write_to`] at most once, off the executor, and
    /// drops the encoder before the future resolves: a DAG takes the output back then (an
    /// encoder kept longer makes it wait).
    ///
    /// # Errors
    /// As [`write`](Storage::write); the encoder's error (see [`Encoder::write_to`]).
    fn write_value<'a>(&'a self, key: &'a str, value: Value) -> StoreFuture<'a, ()> {
        match value {
            Value::Bytes(bytes) => self.write(key, bytes),
            Value::Stream(encoder) => Box::pin(async move {
                let bytes = unblock(move || encoder.into_bytes()).await?;
                self.write(key, bytes).await
            }),
        }
    }

    /// Removes `key`; resolves to whether it was present.
    ///
    /// # Errors
    /// [`DuraflowError::Unsupported`] by default; backend errors otherwise.
    fn remove<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        let (store, operation) = (self.kind(), "remove");
        let _ = key;
        ready(Err(DuraflowError::Unsupported { store, operation }))
    }

    /// Every stored key, in no particular order.
    ///
    /// # Errors
    /// [`DuraflowError::Unsupported`] by default; backend errors otherwise.
    fn keys(&self) -> StoreFuture<'_, Vec<String>> {
        let (store, operation) = (self.kind(), "keys");
        ready(Err(DuraflowError::Unsupported { store, operation }))
    }

    /// A short name for the kind of store (`"memory"`, `"file"`, `"sled"`, …), used in spans
    /// and messages. Defaults to `"custom"`.
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// Whether the store still takes writes. A DAG runs a task whose stored output is
    /// unreadable again only while this is `Ok`; otherwise the task fails with the read's
    /// error, so nothing is written to a store whose files are damaged. `Ok` by default.
    ///
    /// # Errors
    /// The error that stopped the store ([`SledStore`] stops after a failed write, a panic
    /// inside sled, or damage found in its files).
    fn health(&self) -> Result<(), DuraflowError> {
        Ok(())
    }

    /// The store's run log, if it records runs and attempts ([`SledStore`] among the
    /// built-in stores). `None` by default.
    fn run_log(&self) -> Option<&dyn RunLog> {
        None
    }

    /// The store's run history, if it keeps one that can be queried ([`SledStore`] among
    /// the built-in stores). `None` by default.
    fn history(&self) -> Option<&dyn RunHistory> {
        None
    }
}

/// An `Arc` of a store is that store, so a caller can keep a handle to it
/// (`Context::new(store.clone())`).
impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        (**self).read(key)
    }
    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        (**self).write(key, value)
    }
    fn read_value<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Stored>> {
        (**self).read_value(key)
    }
    fn write_value<'a>(&'a self, key: &'a str, value: Value) -> StoreFuture<'a, ()> {
        (**self).write_value(key, value)
    }
    fn remove<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        (**self).remove(key)
    }
    fn keys(&self) -> StoreFuture<'_, Vec<String>> {
        (**self).keys()
    }
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    fn health(&self) -> Result<(), DuraflowError> {
        (**self).health()
    }
    fn run_log(&self) -> Option<&dyn RunLog> {
        (**self).run_log()
    }
    fn history(&self) -> Option<&dyn RunHistory> {
        (**self).history()
    }
}

/// Threads of the pool [`unblock`] runs work on: enough concurrent fsyncs for a file system
/// to batch them, few enough to stay cheap.
const IO_THREADS: usize = 8;

/// Runs `work`, which may block (files, sled, a blocking client), on duraflow's I/O threads
/// (a rayon thread pool of 8 threads of its own), never on the calling thread: what a
/// [`Storage`] implementation wraps its blocking calls in. Works under any async runtime,
/// and without one. A panic in `work` is resumed where the future is awaited.
pub fn unblock<T, F>(work: F) -> StoreFuture<'static, T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DuraflowError> + Send + 'static,
{
    static POOL: OnceLock<Option<rayon_core::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let threads = rayon_core::ThreadPoolBuilder::new().num_threads(IO_THREADS);
        threads
            .thread_name(|i| format!("duraflow-io-{i}"))
            .build()
            .ok()
    });
    let (to, answer) = oneshot::channel();
    let job = move || {
        let _ = to.send(catch_unwind(AssertUnwindSafe(work)));
    };
    match pool {
        Some(pool) => pool.spawn(job),
        // No pool (its threads could not start): a thread for this call, or, failing that,
        // the error below.
        None => drop(std::thread::Builder::new().spawn(job)),
    }
    Box::pin(async move {
        match answer.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => Err(DuraflowError::RuntimeShutdown {
                key: "<store work>".to_owned(),
            }),
        }
    })
}

/// Runs `op` on `state` with its own copy of `key`, inside [`unblock`].
pub(crate) fn unblock_on<S, T>(
    state: &Arc<S>,
    key: &str,
    op: fn(&S, &str) -> Result<T, DuraflowError>,
) -> StoreFuture<'static, T>
where
    S: Send + Sync + 'static,
    T: Send + 'static,
{
    let (state, key) = (Arc::clone(state), key.to_owned());
    unblock(move || op(&state, &key))
}

/// Creates `dir` and whatever parents it lacks, durably: each directory that gained an
/// entry is fsynced once the entry is there.
///
/// # Errors
/// [`DuraflowError::Io`] naming the directory that could not be created or synced.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<(), DuraflowError> {
    let mut missing = Vec::new();
    let mut at = dir;
    while fs::symlink_metadata(at).is_err() {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    // Also refuses a `dir` that is a file.
    fs::create_dir_all(dir).map_err(|e| DuraflowError::io(dir, e))?;
    for level in missing.iter().rev() {
        let parent = match level.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| DuraflowError::io(parent, e))?;
    }
    Ok(())
}

/// A future that is ready with `result`.
pub(crate) fn ready<'a, T: Send + 'a>(result: Result<T, DuraflowError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}
