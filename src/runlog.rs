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

    /// Called before task `key` runs, once its cache check found no usable output: where
    /// several processes share the store, takes this process's lease on the key, so that one
    /// process at a time runs the task. While another live process (or another caller in
    /// this one) holds the lease, waits:
    /// [`Lease::Stored`] when the output was stored since the caller's check (the caller checks
    /// the store again), [`Lease::Held`] once this process holds the lease (the other one
    /// gave it up or was presumed dead). The store keeps a held lease alive until the key's
    /// [`commit`](RunLog::commit) or [`release`](RunLog::release), and fences a commit whose
    /// lease passed to another process ([`DuraflowError::Fenced`]).
    ///
    /// `seen` is `None` on a task's first call. A caller answered `Stored { done }` that
    /// checked the store again and must still run the task (say, a keyed output made from
    /// other inputs) calls again with `Some(done)`: the store then takes over the lease
    /// that output was stored under, rather than answer `Stored` for it again. So a caller
    /// never runs a task whose output was stored after its check, and never waits forever
    /// on an output it cannot use.
    ///
    /// By default (a store one process has open at a time), `Held` at once.
    ///
    /// # Errors
    /// Any backend error; the task then fails without running.
    fn lease<'a>(&'a self, key: &'a str, seen: Option<u64>) -> StoreFuture<'a, Lease> {
        let _ = (key, seen);
        Box::pin(std::future::ready(Ok(Lease::Held)))
    }

    /// Gives up the lease [`lease`](RunLog::lease) took on `key`, if it is still held: the
    /// task ended without a committed output, or its run was dropped. Must not block. By
    /// default, nothing.
    fn release(&self, key: &str) {
        let _ = key;
    }
}

/// What [`RunLog::lease`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lease {
    /// This process holds the key's lease: the task runs here.
    Held,
    /// The key's output was stored since the caller's check (by another process, or another
    /// caller in this one), under the lease `done` names (a number the store chooses, passed
    /// back as `seen`): the caller checks the store again.
    Stored {
        /// The lease the output was stored under.
        done: u64,
    },
}
