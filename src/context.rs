//! [`Context`]: the store handle shared by every task of a pipeline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pollster::block_on as wait;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{self, TypeCheck};
use crate::{validate_key, DuraflowError, Storage};

/// The store a pipeline persists into, plus a counter of completed tasks.
///
/// Build it with [`Context::new`] or the struct literal
/// `Context { db, completed_count: Arc::new(AtomicUsize::new(0)) }`. Share it as an
/// `Arc<Context>` between [`DurableDag`](crate::DurableDag)s: a second run over the same
/// context short-circuits every task whose output is already stored.
pub struct Context {
    /// The store that holds every output, keyed by task id.
    pub db: Arc<dyn Storage + Send + Sync>,
    /// How many tasks (executed or cached) have completed over every run using this context.
    /// Incremented once per task per run, after the output is persisted.
    pub completed_count: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("store", &self.db.kind())
            .field(
                "completed_count",
                &self.completed_count.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl Context {
    /// A context over `store`, with a completed count of zero. `store` may be an `Arc` of a
    /// store, so that the caller keeps a handle to it (for its queries, say).
    pub fn new<S: Storage + 'static>(store: S) -> Context {
        Context {
            db: Arc::new(store),
            completed_count: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The value stored under `key` as a `T`, or `None` if there is none or it cannot be
    /// read as a `T` (the reason is logged with `tracing::warn!`; use
    /// [`try_get`](Context::try_get) to see it). Blocks the calling thread until the store
    /// answers: from async code, await `ctx.db.read(key)` instead, or call this through your
    /// runtime's blocking facility (e.g. `tokio::task::spawn_blocking`).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        match self.try_get(key) {
            Ok(v) => v,
            Err(error) => {
                tracing::warn!(key, %error, "stored value not returned");
                None
            }
        }
    }

    /// The value stored under `key` as a `T`, `Ok(None)` if the key holds nothing.
    ///
    /// Any `T` whose serde form matches the stored value is accepted (an `i64` can read a
    /// stored `i32`; a struct with a new `#[serde(default)]` field can read the old struct).
    ///
    /// # Errors
    /// [`DuraflowError::TypeMismatch`] naming the stored and requested types when the value
    /// does not decode as `T`; [`DuraflowError::Corrupt`] when the bytes fail their checksum;
    /// [`DuraflowError::InvalidKey`]; any error of the store.
    pub fn try_get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, DuraflowError> {
        validate_key(key)?;
        match wait(self.db.read(key))? {
            None => Ok(None),
            Some(bytes) => codec::decode(key, &bytes, TypeCheck::Structural).map(Some),
        }
    }

    /// The value stored under `key` whatever its type, for inspection (the CLI's `get`):
    /// the name of the type that wrote it (empty for values upgraded from duraflow-rs 1.x),
    /// the value as JSON, and its size in bytes. `Ok(None)` if the key holds nothing.
    ///
    /// # Errors
    /// [`DuraflowError::Corrupt`] when the bytes fail their checksum or do not decode;
    /// [`DuraflowError::InvalidKey`]; any error of the store.
    pub fn inspect(&self, key: &str) -> Result<Option<StoredValue>, DuraflowError> {
        validate_key(key)?;
        let Some(bytes) = wait(self.db.read(key))? else {
            return Ok(None);
        };
        let (type_name, value) = codec::inspect(key, &bytes)?;
        Ok(Some(StoredValue {
            type_name,
            value,
            size: bytes.len(),
        }))
    }

    /// Stores `value` under `key`, replacing any previous value, with the store's durability
    /// guarantee. A task with id `key` will return this value instead of running. Blocks
    /// the calling thread until the store answers, as [`get`](Context::get) does.
    ///
    /// # Errors
    /// [`DuraflowError::InvalidKey`] for a key no store accepts; [`DuraflowError::Persist`]
    /// naming the key, with the encoder's or store's error as its source. The previous
    /// value is then unchanged.
    pub fn save<T: Serialize>(&self, key: &str, value: &T) -> Result<(), DuraflowError> {
        validate_key(key)?;
        let bytes = codec::encode(key, value).map_err(|e| e.into_persist(key))?;
        wait(self.db.write(key, bytes)).map_err(|e| e.into_persist(key))
    }
}

/// A stored value as [`Context::inspect`] sees it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredValue {
    /// `std::any::type_name` of the type that wrote it; empty when unknown (values upgraded
    /// from duraflow-rs 1.x).
    pub type_name: String,
    /// The value, as JSON.
    pub value: serde_json::Value,
    /// Its size in the store, envelope included, in bytes.
    pub size: usize,
}
