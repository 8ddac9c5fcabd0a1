//! How a store stops: the first failure (a write sled refused, a panic inside sled, damage
//! found in its files) is kept, and from then on every write is refused with it, without
//! calling sled again.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::DuraflowError;

/// What a store shares with its writer thread and its syncer.
pub(super) struct Shared {
    /// The store's directory.
    path: PathBuf,
    /// The failure that stopped the store, once one did.
    failed: OnceLock<Failure>,
    /// Once the store has stopped after a failed group: the values the group's outputs had
    /// before it (`None`: no value). sled may hold the group's values in memory although
    /// they never reached the disk; reads answer these instead. Filled before `failed` is
    /// set, so a reader that sees the store stopped sees them.
    shadow: Mutex<HashMap<String, Prior>>,
}

/// What an output was before a group: its entries in the `outputs` and `witnesses` trees.
#[derive(Debug, Clone, Default)]
pub(super) struct Prior {
    pub(super) value: Option<sled::IVec>,
    pub(super) witness: Option<sled::IVec>,
}

impl Shared {
    /// The state of a running store at `path`.
    pub(super) fn new(path: PathBuf) -> Shared {
        Shared {
            path,
            failed: OnceLock::new(),
            shadow: Mutex::default(),
        }
    }

    /// The failure that stopped the store, if it has stopped.
    pub(super) fn failed(&self) -> Option<&Failure> {
        self.failed.get()
    }

    /// The value `key` had before the failed group, if the store has stopped and the group
    /// wrote `key`.
    pub(super) fn shadowed(&self, key: &str) -> Option<Prior> {
        self.failed.get()?;
        let shadow = self.shadow.lock().unwrap_or_else(PoisonError::into_inner);
        shadow.get(key).cloned()
    }

    /// Stops the store with `failure`, unless it stopped already, after keeping `prior`
    /// (what the outputs a failed group wrote held before it; an earlier entry of a key
    /// wins). Returns the failure that stopped the store.
    pub(super) fn stop_with(
        &self,
        failure: Failure,
        prior: impl IntoIterator<Item = (String, Prior)>,
    ) -> Failure {
        if self.failed.get().is_none() {
            let mut shadow = self.shadow.lock().unwrap_or_else(PoisonError::into_inner);
            for (key, value) in prior {
                shadow.entry(key).or_insert(value);
            }
        }
        let mut first = false;
        let failure = self.failed.get_or_init(|| {
            first = true;
            failure
        });
        if first {
            tracing::error!(store = %self.path.display(), error = %failure.text, "the store has stopped: it accepts no more writes");
        }
        failure.clone()
    }

    /// Stops the store with `failure` (see [`stop_with`](Self::stop_with)).
    pub(super) fn stop(&self, failure: Failure) -> Failure {
        self.stop_with(failure, [])
    }

    /// Refuses work once the store has stopped.
    pub(super) fn usable(&self) -> Result<(), DuraflowError> {
        match self.failed.get() {
            Some(failure) => Err(failure.error(&self.path, true)),
            None => Ok(()),
        }
    }
}

/// Runs `work`, which calls sled: `Err` says what sled panicked with (sled 0.34 panics on
/// some damage it finds), so that the store can stop instead of the caller unwinding.
pub(super) fn inside_sled<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .map_err(|panic| format!("sled panicked: {}", crate::durable::panic_message(&*panic)))
}

/// A failure, kept to answer with (an `io::Error` is not `Clone`).
#[derive(Debug, Clone)]
pub(super) struct Failure {
    kind: io::ErrorKind,
    text: String,
}

impl Failure {
    /// An error sled returned.
    pub(super) fn of(e: &sled::Error) -> Failure {
        match e {
            sled::Error::Io(io) => Failure::io(io),
            other => Failure {
                kind: io::ErrorKind::Other,
                text: other.to_string(),
            },
        }
    }

    /// An I/O error (whose text names the file).
    pub(super) fn io(e: &io::Error) -> Failure {
        Failure {
            kind: e.kind(),
            text: e.to_string(),
        }
    }

    /// A panic inside sled, or damage found: the store's files cannot be trusted.
    pub(super) fn damage(text: String) -> Failure {
        Failure {
            kind: io::ErrorKind::InvalidData,
            text,
        }
    }

    /// The error to answer with, for the store at `path`. `earlier` says the store had
    /// stopped before the work was tried.
    pub(super) fn error(&self, path: &Path, earlier: bool) -> DuraflowError {
        let text = if earlier {
            format!("the store stopped after an earlier failure: {}", self.text)
        } else {
            self.text.clone()
        };
        DuraflowError::io(path, io::Error::new(self.kind, text))
    }
}
