//! Run and attempt records, what a store with a run log keeps about every run, and
//! [`RunHistory`], how they are read back.

use serde::{Deserialize, Serialize};

use crate::StoreFuture;

/// A run's id: assigned by the store, increasing with every run it sees.
pub type RunId = u64;

/// How a run ended (or that it has not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RunStatus {
    /// Started and not yet finished.
    Running,
    /// Every task completed (executed or cached).
    Succeeded,
    /// Every task reached a final state and at least one failed.
    Failed,
    /// The process stopped before the run finished (found Running at the next open).
    Interrupted,
}

/// One run of a [`DurableDag`](crate::DurableDag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunRecord {
    /// The run's id.
    pub id: RunId,
    /// When the run started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it finished (or was found interrupted), in milliseconds since the Unix epoch.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Its state.
    pub status: RunStatus,
    /// Tasks that ran and were persisted.
    #[serde(default)]
    pub executed: u64,
    /// Tasks whose stored output was reused.
    #[serde(default)]
    pub cached: u64,
    /// Tasks that failed.
    #[serde(default)]
    pub failed: u64,
    /// The duraflow-rs version that ran it.
    #[serde(default)]
    pub version: String,
}

/// How one attempt at one task ended (or that it has not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// Started and not yet finished.
    Running,
    /// Ran, and its output was persisted (in the same atomic commit as this record).
    Succeeded,
    /// Its stored output was reused.
    Cached,
    /// It returned `Err` (fallible tasks), panicked, timed out, a dependency failed, or its
    /// output could not be persisted.
    Failed {
        /// The panic message or error text.
        error: String,
    },
    /// The process stopped while it ran (found Running at the next open).
    Interrupted,
}

/// One attempt at one task in one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AttemptRecord {
    /// The run it belongs to.
    pub run: RunId,
    /// The task id (storage key).
    pub key: String,
    /// 1 for the first attempt in a run.
    pub attempt: u32,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it ended, in milliseconds since the Unix epoch: `started_ms` plus the attempt's
    /// duration, measured on the monotonic clock (so a system clock set back during the
    /// attempt does not make it end before it started); for an attempt found `Interrupted`,
    /// when it was found.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// How long it took, in microseconds.
    #[serde(default)]
    pub duration_us: Option<u64>,
    /// The size of the stored output in bytes, when one was stored or reused.
    #[serde(default)]
    pub output_size: Option<u64>,
    /// Why the task ran or was cached, in plain words, as
    /// [`DurableDag::explain`](crate::DurableDag::explain) gives it: recorded for tasks added
    /// with [`add_keyed`](crate::DurableDag::add_keyed); `None` for the others (cached by id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A run with all its attempts, from [`RunHistory::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunDetails {
    /// The run.
    pub run: RunRecord,
    /// Its attempts: those of one key together, by attempt number (the order of keys is the
    /// store's own).
    pub attempts: Vec<AttemptRecord>,
}

/// What [`RunHistory::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcStats {
    /// The ids of the runs whose records were removed, oldest first.
    pub runs_removed: Vec<RunId>,
    /// How many attempts those runs had.
    pub attempts_removed: u64,
    /// How many stored entries were removed (a store may keep several attempts in one).
    pub records_removed: u64,
    /// The sizes of the removed entries' keys and values, and of the removed files, added
    /// up, in bytes. A store's database files need not shrink by that much at once.
    pub bytes_reclaimed: u64,
    /// How many files of outputs that no output refers to any more (overwritten or removed
    /// ones, or those a killed process left) were removed.
    pub output_files_removed: u64,
}

/// A store whose run and attempt records can be read back: what the `duraflow` command-line
/// tool and its report are built on. Reached through
/// [`Storage::history`](crate::Storage::history).
///
/// Attempt records reach a store in the background; those of a finished run (one whose
/// `dag.run` returned) are all there.
pub trait RunHistory: Send + Sync {
    /// Every run, oldest first.
    ///
    /// # Errors
    /// [`DuraflowError::Corrupt`](crate::DuraflowError::Corrupt) for a record that does not
    /// decode; any backend error.
    fn runs(&self) -> StoreFuture<'_, Vec<RunRecord>>;

    /// One run and its attempts, or `None` if there is no run `id`.
    ///
    /// # Errors
    /// As [`runs`](RunHistory::runs).
    fn run(&self, id: RunId) -> StoreFuture<'_, Option<RunDetails>>;

    /// Every attempt at task `key`, over all runs, oldest first.
    ///
    /// # Errors
    /// [`DuraflowError::InvalidKey`](crate::DuraflowError::InvalidKey); otherwise as
    /// [`runs`](RunHistory::runs).
    fn attempts_of<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Vec<AttemptRecord>>;

    /// Removes the records of every run but the newest `keep_runs` (by id), with all their
    /// attempts. Outputs are never touched, so nothing runs again because of a gc; nor is a
    /// run that is still `Running`. Durable when it resolves.
    ///
    /// # Errors
    /// As [`runs`](RunHistory::runs); runs removed before a failure stay removed.
    fn gc(&self, keep_runs: usize) -> StoreFuture<'_, GcStats>;
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
