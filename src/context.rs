//! [`Context`]: the store handle shared by every task of a pipeline.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pollster::block_on as wait;
use serde::{de::DeserializeOwned, Serialize};

use crate::codec::{self, TypeCheck};
use crate::{validate_key, DuraflowError, Storage, Stored};

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
        match wait(self.db.read_value(key))? {
            None => Ok(None),
            Some(Stored::Bytes(bytes)) => {
                codec::decode(key, &bytes, TypeCheck::Structural).map(Some)
            }
            // A large value is decoded as it is read, on the calling thread.
            Some(Stored::Reader { len, mut reader }) => {
                codec::read(key, &mut reader, len, TypeCheck::Structural).map(Some)
            }
        }
    }

    /// The value stored under `key` whatever its type, for inspection, read into memory:
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

    /// Writes the value stored under `key`, whatever its type, to `out` as pretty-printed
    /// JSON as it is read, so that a large value is never held in memory (the CLI's `get`):
    /// `head` is called first, with the name of the type that wrote it (empty for values
    /// upgraded from duraflow-rs 1.x), its size in bytes and `out`. Returns `false`, having
    /// written nothing, if the key holds nothing. Blocks the calling thread.
    ///
    /// The value is checked as it is read: damage found past its start is reported once
    /// part of it has been written.
    ///
    /// # Errors
    /// [`DuraflowError::Corrupt`] when the bytes fail their checksum or do not decode (a
    /// map key that JSON cannot express, say); [`DuraflowError::Io`] naming `"<output>"`
    /// when `out` or `head` fails; [`DuraflowError::InvalidKey`]; any error of the store.
    pub fn write_json(
        &self,
        key: &str,
        out: &mut dyn Write,
        head: impl FnOnce(&str, u64, &mut dyn Write) -> io::Result<()>,
    ) -> Result<bool, DuraflowError> {
        validate_key(key)?;
        let Some(found) = wait(self.db.read_value(key))? else {
            return Ok(false);
        };
        let len = found.len();
        let mut reader: Box<dyn Read + Send> = match found {
            Stored::Bytes(bytes) => Box::new(io::Cursor::new(bytes)),
            Stored::Reader { reader, .. } => reader,
        };
        let output = |e| DuraflowError::io("<output>", e);
        codec::read_with(key, &mut reader, len, |header, payload| {
            head(&header.type_name, len, out).map_err(output)?;
            let mut json = serde_json::Serializer::pretty(&mut *out);
            let transcoded = if header.json {
                let mut from = serde_json::Deserializer::from_reader(&mut *payload);
                serde_transcode::transcode(&mut from, &mut json)
            } else {
                let mut from = rmp_serde::Deserializer::new(&mut *payload);
                serde_transcode::transcode(&mut from, &mut json)
            };
            transcoded.map_err(|e| match e.io_error_kind() {
                Some(kind) => output(io::Error::new(kind, e)),
                None => DuraflowError::Corrupt {
                    key: key.to_owned(),
                    path: None,
                    reason: e.to_string(),
                },
            })?;
            writeln!(out).map_err(output)
        })?;
        Ok(true)
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
