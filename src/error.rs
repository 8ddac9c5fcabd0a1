//! The one error type of the crate.

use std::path::PathBuf;

/// A boxed error from a lower layer (a store backend, the encoder), kept as the `source`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in duraflow-rs.
///
/// Every variant that concerns one stored output names its key; every variant that concerns
/// the file system names the path. The enum is `#[non_exhaustive]`: later versions may add
/// variants without a breaking change, so match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DuraflowError {
    /// The output of `key` could not be persisted; the previous stored value (if any) is
    /// unchanged. `source` says why (encoding, I/O, a full disk, a custom backend).
    #[error("could not persist output for key {key:?}: {source}")]
    Persist {
        /// The task id / storage key.
        key: String,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// The stored value of `key` cannot be decoded as the requested type.
    #[error("value stored under {key:?} has type `{stored}`, which cannot be read as `{requested}`: {reason}")]
    TypeMismatch {
        /// The key that was read.
        key: String,
        /// The type name recorded when the value was written (empty when unknown).
        stored: String,
        /// The type the caller asked for.
        requested: &'static str,
        /// What the decoder reported.
        reason: String,
    },

    /// The bytes stored under `key` failed their integrity check (checksum, framing, or the
    /// key recorded inside the file), or the entry at `path` that should hold them is not
    /// what the store made (a link, which a FileStore never follows, or a file where a
    /// directory belongs); they are never returned as a value. An empty `key` means the
    /// store as a whole (its database or its own file at `path`) is damaged.
    #[error("{}", corrupt_message(key, path, reason))]
    Corrupt {
        /// The key that was read.
        key: String,
        /// The file holding the value, for file-backed stores.
        path: Option<PathBuf>,
        /// What failed.
        reason: String,
    },

    /// The key cannot be used as a storage key (empty, or longer than
    /// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes).
    #[error("invalid key {}: {reason}", key_preview(key))]
    InvalidKey {
        /// The rejected key.
        key: String,
        /// Why it was rejected.
        reason: String,
    },

    /// Two tasks of one [`DurableDag`](crate::DurableDag) were given the same id.
    #[error("duplicate task id {id:?}: every task of a DurableDag needs its own id")]
    DuplicateTaskId {
        /// The id used twice.
        id: String,
    },

    /// Another store handle (in this or another process) holds the store open for writing.
    #[error("store at {} is locked by another open handle or process", path.display())]
    StoreLocked {
        /// The store's root path.
        path: PathBuf,
    },

    /// `path` is not a duraflow store and cannot become one; nothing in it was changed.
    #[error("{} is not a duraflow store: {reason}", path.display())]
    NotAStore {
        /// The path given.
        path: PathBuf,
        /// What was found there.
        reason: String,
    },

    /// A file-system operation on `path` failed.
    #[error("I/O error at {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The value for `key` could not be encoded.
    #[error("could not encode value of type `{type_name}` for key {key:?}: {source}")]
    Encode {
        /// The key being written.
        key: String,
        /// The Rust type of the value.
        type_name: &'static str,
        /// The encoder's error.
        #[source]
        source: rmp_serde::encode::Error,
    },

    /// A dependency of the task `key` failed, so the task could not run; `message` is what
    /// dagx reported while handing the inputs over.
    #[error("task {key:?} did not run because a dependency failed: {message}")]
    DependencyFailed {
        /// The task that could not run.
        key: String,
        /// dagx's description of the failed hand-over.
        message: String,
    },

    /// The store does not implement `operation`.
    #[error("the {store} store does not support {operation}")]
    Unsupported {
        /// The store kind.
        store: &'static str,
        /// The operation asked for.
        operation: &'static str,
    },

    /// The store at `path` was written in format `found`, newer than the `supported` one of
    /// this version of the crate (upgrade the crate). Nothing in the store was modified.
    #[error(
        "store at {path:?} has format {found}; this duraflow-rs reads formats up to {supported}"
    )]
    UnsupportedFormat {
        /// The store.
        path: PathBuf,
        /// The format the store records.
        found: u32,
        /// The newest format this crate reads.
        supported: u32,
    },

    /// Every attempt at task `key` was cut off by the retry policy's timeout; the task has no
    /// output and nothing was stored.
    #[error("task {key:?} timed out after {timeout:?} on each of its {attempts} attempt(s)")]
    TimedOut {
        /// The task's id.
        key: String,
        /// The per-attempt timeout.
        timeout: std::time::Duration,
        /// How many attempts were made.
        attempts: u32,
    },

    /// The output of `key` was not stored: this attempt's lease on the key was taken over by
    /// another process (this one was presumed dead), so a newer attempt owns the key. The
    /// stored output and records are the newer attempt's.
    #[error(
        "the output of {} was not stored: its lease passed to lease {newer} of another process",
        key_preview(key)
    )]
    Fenced {
        /// The task's key.
        key: String,
        /// The fencing token (the number of the key's lease in the store) that holds the key
        /// now.
        newer: u64,
    },

    /// The database at `url` could not be used: the URL does not parse, the server cannot be
    /// reached (or not within the connect timeout), it refused the credentials, or the
    /// connection was lost or a statement failed mid-run. `url` is the connection URL with
    /// its password replaced by `***`; no message of this error shows the password. An
    /// output whose commit failed so is unchanged in the database.
    #[error("database error at {url}: {source}")]
    Database {
        /// The connection URL, password redacted.
        url: String,
        /// What failed.
        #[source]
        source: BoxError,
    },

    /// Store work for `key` was abandoned because the thread doing it went away (the
    /// process is shutting down).
    #[error("store work for key {key:?} was abandoned: the process is shutting down")]
    RuntimeShutdown {
        /// The key whose operation was abandoned.
        key: String,
    },
}

fn corrupt_message(key: &str, path: &Option<PathBuf>, reason: &str) -> String {
    match (key.is_empty(), path) {
        (true, Some(path)) => format!("store at {} is corrupt: {reason}", path.display()),
        (_, Some(path)) => format!(
            "value stored under {key:?} is corrupt (file {}): {reason}",
            path.display()
        ),
        (_, None) => format!("value stored under {key:?} is corrupt: {reason}"),
    }
}

/// Keys can be 4 KiB; a message shows the first 80 characters and the length.
fn key_preview(key: &str) -> String {
    const SHOWN: usize = 80;
    if key.chars().count() <= SHOWN {
        format!("{key:?}")
    } else {
        let head: String = key.chars().take(SHOWN).collect();
        format!("{head:?}… ({} bytes)", key.len())
    }
}

impl DuraflowError {
    /// Wraps `self` as the cause of a failed persist of `key` (no double wrapping; a key no
    /// store accepts stays [`DuraflowError::InvalidKey`], a fenced write
    /// [`DuraflowError::Fenced`]).
    pub(crate) fn into_persist(self, key: &str) -> DuraflowError {
        match self {
            e @ (DuraflowError::Persist { .. }
            | DuraflowError::InvalidKey { .. }
            | DuraflowError::Fenced { .. }) => e,
            other => DuraflowError::Persist {
                key: key.to_owned(),
                source: Box::new(other),
            },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> DuraflowError {
        DuraflowError::Io {
            path: path.into(),
            source,
        }
    }
}
