//! Values on their way into a store ([`Value`]) and out of it ([`Stored`]): whole bytes, or
//! streamed, so that a large output is never held in memory as bytes.

use std::io::{self, Read, Write};

use crate::DuraflowError;

/// Outputs that encode to at most this many bytes travel between a DAG and its store whole,
/// encoded and decoded on the executor (CPU work on at most this much); larger ones are
/// encoded and decoded on duraflow's I/O threads, streamed to and from the store.
pub(crate) const WHOLE_LIMIT: usize = 64 * 1024;

/// A value to store, as [`Storage::write_value`](crate::Storage::write_value) and
/// [`RunLog::commit`](crate::RunLog::commit) receive it.
#[derive(Debug)]
pub enum Value {
    /// The bytes to store, whole.
    Bytes(Vec<u8>),
    /// An encoder that writes the bytes to store into the store's writer.
    Stream(Encoder),
}

impl Value {
    /// The bytes to store, in memory (a stream is encoded now, on the calling thread).
    ///
    /// # Errors
    /// The encoder's error (see [`Encoder::write_to`]).
    pub fn into_bytes(self) -> Result<Vec<u8>, DuraflowError> {
        match self {
            Value::Bytes(bytes) => Ok(bytes),
            Value::Stream(encoder) => encoder.into_bytes(),
        }
    }
}

/// The writing of one value to store: a value being encoded as it is written, or stored
/// bytes being copied from another store.
///
/// A store calls [`write_to`](Encoder::write_to) once, from a thread where it may block
/// (inside [`unblock`](crate::unblock), say), and drops the encoder before its future
/// resolves: a DAG waits for that to hand the task's output to its dependents.
pub struct Encoder {
    write: Box<WriteFn>,
}

/// What an [`Encoder`] runs.
type WriteFn = dyn FnOnce(&mut dyn Write) -> Result<(), DuraflowError> + Send;

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder that writes with `write`, which must write the whole value or fail.
    pub fn new(
        write: impl FnOnce(&mut dyn Write) -> Result<(), DuraflowError> + Send + 'static,
    ) -> Encoder {
        Encoder {
            write: Box::new(write),
        }
    }

    /// Writes the value into `out`, in pieces, without holding it in memory. May block.
    ///
    /// A store reports a failure of `out` it can name precisely (a full disk at a given
    /// file, say) as an [`io::Error`] made with `io::Error::other(error)` from a
    /// [`DuraflowError`]: this returns that error as it is.
    ///
    /// # Errors
    /// [`DuraflowError::Encode`] when the value cannot be serialised (found before anything
    /// is written); the `DuraflowError` an error of `out` carries, or
    /// [`DuraflowError::Persist`] naming the key with the error of `out` as its source; for
    /// stored bytes being copied, the error of the store they are read from.
    pub fn write_to(self, out: &mut dyn Write) -> Result<(), DuraflowError> {
        (self.write)(out)
    }

    /// The bytes the encoder writes, in memory.
    ///
    /// # Errors
    /// As [`write_to`](Encoder::write_to).
    pub fn into_bytes(self) -> Result<Vec<u8>, DuraflowError> {
        let mut bytes = Vec::new();
        self.write_to(&mut bytes)?;
        Ok(bytes)
    }
}

/// A stored value, as [`Storage::read_value`](crate::Storage::read_value) hands it out.
pub enum Stored {
    /// The stored bytes, whole.
    Bytes(Vec<u8>),
    /// A reader of the stored bytes, read on a thread where it may block.
    Reader {
        /// How many bytes the value has.
        len: u64,
        /// Yields exactly `len` bytes, then the end. A store that checks the bytes as they
        /// are read (a digest, say) fails the read that finds the end when they do not match,
        /// with an [`io::Error`] made with `io::Error::other(error)` from a
        /// [`DuraflowError`] ([`DuraflowError::Corrupt`] naming the key and the file): the
        /// reader of the value returns that error as it is.
        reader: Box<dyn Read + Send>,
    },
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stored::Bytes(bytes) => f.debug_tuple("Bytes").field(&bytes.len()).finish(),
            Stored::Reader { len, .. } => f.debug_struct("Reader").field("len", len).finish(),
        }
    }
}

impl Stored {
    /// The value's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Stored::Bytes(bytes) => bytes.len() as u64,
            Stored::Reader { len, .. } => *len,
        }
    }

    /// Whether the value has no bytes at all (no envelope is empty).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored bytes, in memory (a reader is read to its end now, on the calling thread).
    ///
    /// # Errors
    /// The reader's error: the [`DuraflowError`] it carries, or
    /// [`DuraflowError::Corrupt`] naming `key` for another; `Corrupt` too when the reader
    /// yields other than `len` bytes.
    pub fn into_bytes(self, key: &str) -> Result<Vec<u8>, DuraflowError> {
        let (len, mut reader) = match self {
            Stored::Bytes(bytes) => return Ok(bytes),
            Stored::Reader { len, reader } => (len, reader),
        };
        let corrupt = |reason: String| DuraflowError::Corrupt {
            key: key.to_owned(),
            path: None,
            reason,
        };
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        reader.read_to_end(&mut bytes).map_err(|e| {
            carried(e).unwrap_or_else(|e| corrupt(format!("reading it failed: {e}")))
        })?;
        if bytes.len() as u64 != len {
            return Err(corrupt(format!(
                "{} bytes were read of the {len} stored",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

/// `e` wrapped so that it passes through an `io` reader or writer: see [`carried`].
pub(crate) fn carry(e: DuraflowError) -> io::Error {
    io::Error::other(e)
}

/// The [`DuraflowError`] an `io::Error` carries (made with [`carry`] or `io::Error::other`),
/// or the `io::Error` itself.
pub(crate) fn carried(e: io::Error) -> Result<DuraflowError, io::Error> {
    if !e.get_ref().is_some_and(|inner| inner.is::<DuraflowError>()) {
        return Err(e);
    }
    match e
        .into_inner()
        .map(|inner| inner.downcast::<DuraflowError>())
    {
        Some(Ok(error)) => Ok(*error),
        // Not reached: the check above saw a DuraflowError.
        _ => Err(io::Error::other("an error of the store")),
    }
}
