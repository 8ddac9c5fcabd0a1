//! The [`Storage`] trait and the stores that ship with the crate.
//!
//! A store only keeps bytes under string keys; it knows nothing of dagx, tasks or tracing.
//! The envelope (type name, checksum) is put around values before they reach a store.

mod file;
mod memory;
mod sled;

pub use self::sled::{Durability, GcStats, RunDetails, SledConfig, SledStore};
pub use file::FileStore;
pub use memory::MemoryStore;

use std::sync::Arc;

use crate::{DuraflowError, RunLog};

/// An object-safe byte store that duraflow-rs persists task outputs in.
///
/// Implement [`read`](Storage::read) and [`write`](Storage::write) to plug in your own
/// backend; every other method has a default. Keys reaching a store have passed
/// [`validate_key`](crate::validate_key); values are opaque bytes.
///
/// Methods are synchronous and may block: duraflow-rs calls them off the async executor
/// (on a small pool of I/O threads) unless [`may_block`](Storage::may_block) says they never
/// block.
pub trait Storage: Send + Sync {
    /// Returns the bytes last written under `key`, or `None` if the key was never written
    /// (or was removed).
    ///
    /// # Errors
    /// Any [`DuraflowError`] the backend meets; [`DuraflowError::Corrupt`] when the stored
    /// bytes fail the backend's own integrity check.
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError>;

    /// Stores `value` under `key`, replacing any previous value atomically: a reader (or a
    /// restart after a crash) sees the old bytes or the new ones, never a mix. When it
    /// returns `Ok`, the value is as durable as the store promises in its own docs.
    ///
    /// # Errors
    /// Any [`DuraflowError`] the backend meets. The store then holds the previous value or
    /// the new one, never a mix; stores document which (a failure before anything is
    /// replaced, such as a full disk, leaves the previous value).
    fn write(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError>;

    /// Like [`write`](Storage::write), with the same guarantees, but takes the value by
    /// ownership: duraflow-rs persists every output through this method, so a store that
    /// keeps the bytes as they are (such as [`MemoryStore`]) can override it to avoid a
    /// copy. Defaults to calling `write`.
    ///
    /// # Errors
    /// As [`write`](Storage::write).
    fn write_owned(&self, key: &str, value: Vec<u8>) -> Result<(), DuraflowError> {
        self.write(key, &value)
    }

    /// Like [`write_owned`](Storage::write_owned), with the same guarantees, but also gets
    /// the key as a shared string: duraflow-rs persists every task output through this
    /// method, so a store that keeps its keys in memory (such as [`MemoryStore`]) can
    /// keep this one instead of copying it. Defaults to calling `write_owned`.
    ///
    /// # Errors
    /// As [`write`](Storage::write).
    fn write_shared(&self, key: &Arc<str>, value: Vec<u8>) -> Result<(), DuraflowError> {
        self.write_owned(key, value)
    }

    /// Removes `key`; returns whether it was present.
    ///
    /// # Errors
    /// [`DuraflowError::Unsupported`] by default; backend errors otherwise.
    fn remove(&self, key: &str) -> Result<bool, DuraflowError> {
        let _ = key;
        Err(DuraflowError::Unsupported {
            store: self.kind(),
            operation: "remove",
        })
    }

    /// Lists every stored key, in no particular order.
    ///
    /// # Errors
    /// [`DuraflowError::Unsupported`] by default; backend errors otherwise.
    fn keys(&self) -> Result<Vec<String>, DuraflowError> {
        Err(DuraflowError::Unsupported {
            store: self.kind(),
            operation: "keys",
        })
    }

    /// A short name for the kind of store (`"memory"`, `"file"`, …), used in spans and
    /// messages. Defaults to `"custom"`.
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// The store's run log, if it keeps run and attempt records (only [`SledStore`] among
    /// the built-in stores). `None` by default.
    fn run_log(&self) -> Option<&dyn RunLog> {
        None
    }

    /// Whether duraflow-rs should read a run's stored outputs ahead of its tasks, in
    /// batches on its I/O threads, rather than one read per task when it starts. Worth it
    /// when a read costs more than handing it to another thread (a file, the network); it
    /// holds a channel per task while the run lasts. Only consulted when
    /// [`may_block`](Storage::may_block) is `true`. Defaults to `false`.
    fn read_ahead(&self) -> bool {
        false
    }

    /// Whether the methods may block the calling thread (disk, network). When `true`, the
    /// default, duraflow-rs runs them on its I/O threads, never on the async executor.
    /// Return `false` only for stores that never wait on I/O or contended locks.
    fn may_block(&self) -> bool {
        true
    }
}
