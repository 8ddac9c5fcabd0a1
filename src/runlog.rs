//! [`RunLog`]: the optional capability of a store to record runs and attempts as they
//! happen.

use crate::record::{AttemptRecord, RunId, RunRecord};
use crate::{DuraflowError, StoreFuture, Value};

/// A store that records runs and attempts, and commits a task's output together with its
/// `Succeeded` attempt atomically. Reached through [`Storage::run_log`](crate::Storage::run_log).
///
/// [`begin_run`](RunLog::begin_run) and [`record`](RunLog::record) are called from async
/// code and **must not block**: queue the work and return. The futures of
/// [`commit`](RunLog::commit) and [`finish_run`](RunLog::finish_run) resolve once their work
/// is done, as durably as the store promises.
pub trait RunLog: Send + Sync {
    /// Starts a run and returns its id (increasing with every run of this store that is
    /// recorded: a store may give the id of a run whose records a crash lost to a later run).
    ///
    /// # Errors
    /// Any backend error; the run then proceeds without records.
    fn begin_run(&self, started_ms: u64) -> Result<RunId, DuraflowError>;

    /// Stores (or replaces) an attempt record; durable no later than the next commit or
    /// finished run of this store resolves.
    ///
    /// # Errors
    /// Any backend error.
    fn record(&self, attempt: AttemptRecord) -> Result<(), DuraflowError>;

    /// Stores `value` under `key` and `attempt` in one atomic step: neither exists without
    /// the other after a crash. Resolves when both are as durable as the store promises.
    /// The store records the stored value's length in the attempt's `output_size`.
    ///
    /// # Errors
    /// Any backend error, or the encoder's (see
    /// [`Encoder::write_to`](crate::Encoder::write_to)); the previous value is then
    /// unchanged.
    fn commit<'a>(
        &'a self,
        key: &'a str,
        value: Value,
        attempt: AttemptRecord,
    ) -> StoreFuture<'a, ()>;

    /// Stores the final record of a run; resolves when it, and every record of the run sent
    /// before it, can be read back and is as durable as the store promises.
    ///
    /// # Errors
    /// Any backend error.
    fn finish_run(&self, run: RunRecord) -> StoreFuture<'_, ()>;
}
