//! [`RunHistory`] of a [`SledStore`]: reading runs and attempts back, and dropping old ones.

use super::layout::{attempts_in, decode_record, key_attempts, run_attempts, OnUndecodable};
use super::writer::Msg;
use super::{sled_error, Inner, SledStore};
use crate::record::{GcStats, RunDetails, RunId, RunRecord, RunStatus};
use crate::{validate_key, AttemptRecord, DuraflowError, RunHistory, StoreFuture};
use futures::channel::oneshot;

/// Every query fails with [`DuraflowError::Io`] once the store has stopped after a failed
/// write (reopen it in a new process): sled may hold records that never reached the disk.
impl RunHistory for SledStore {
    fn runs(&self) -> StoreFuture<'_, Vec<RunRecord>> {
        self.call("", |inner, _| inner.runs())
    }

    fn run(&self, id: RunId) -> StoreFuture<'_, Option<RunDetails>> {
        self.call("", move |inner, _| inner.run(id))
    }

    fn attempts_of<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Vec<AttemptRecord>> {
        self.call(key, Inner::attempts_of)
    }

    /// Each run's attempts are removed before its run record, in one atomic batch, and the
    /// database is synced before this resolves: a crash in between leaves at most a run
    /// with fewer attempts, which the next gc removes. With `keep_runs` 0 and no run
    /// running, the run ids start again from 1 when the store is next opened. sled's files
    /// shrink only as it compacts its segments, over later writes. Then the files of
    /// outputs no output refers to (overwritten or removed since) are deleted, and the
    /// temporary files a killed process left; never a file a commit in flight will refer to.
    fn gc(&self, keep_runs: usize) -> StoreFuture<'_, GcStats> {
        let records = self.call("", move |inner, _| inner.gc(keep_runs));
        Box::pin(async move {
            let mut stats = records.await?;
            // The files, on the writer thread: after every commit sent before is durable,
            // and with no commit applied meanwhile.
            let (to, answer) = oneshot::channel();
            self.send(Msg::Gc(to))?;
            let collected = match answer.await {
                Ok(collected) => collected.map_err(|f| f.error(self.path(), false))?,
                Err(_) => return Err(DuraflowError::RuntimeShutdown { key: String::new() }),
            };
            stats.output_files_removed = collected.files as u64;
            stats.bytes_reclaimed += collected.bytes;
            Ok(stats)
        })
    }
}

impl Inner {
    fn runs(&self) -> Result<Vec<RunRecord>, DuraflowError> {
        self.usable()?;
        self.trees
            .runs
            .iter()
            .values()
            .map(|v| {
                let v = v.map_err(|e| sled_error(&self.path, e))?;
                decode_record(&self.path, "run", &v)
            })
            .collect()
    }

    fn run(&self, id: RunId) -> Result<Option<RunDetails>, DuraflowError> {
        self.usable()?;
        let found = self.trees.runs.get(id.to_be_bytes());
        let Some(run) = found.map_err(|e| sled_error(&self.path, e))? else {
            return Ok(None);
        };
        let run: RunRecord = decode_record(&self.path, "run", &run)?;
        let attempts = run_attempts(&self.trees, &self.path, id, OnUndecodable::Fail)?;
        Ok(Some(RunDetails { run, attempts }))
    }

    fn attempts_of(&self, key: &str) -> Result<Vec<AttemptRecord>, DuraflowError> {
        validate_key(key)?;
        self.usable()?;
        let mut out = Vec::new();
        // A scan per run: runs are few next to attempts, and no second index has to be
        // written with every attempt.
        for run in self.trees.runs.iter().keys() {
            let run = run.map_err(|e| sled_error(&self.path, e))?;
            let Ok(run) = <[u8; 8]>::try_from(run.as_ref()) else {
                continue;
            };
            let run = RunId::from_be_bytes(run);
            out.extend(key_attempts(&self.trees, &self.path, run, key)?);
        }
        Ok(out)
    }

    fn gc(&self, keep_runs: usize) -> Result<GcStats, DuraflowError> {
        let mut runs = self.runs()?;
        let io = |e: sled::Error| self.write_error(e);
        runs.sort_by_key(|r| r.id);
        let old = runs.len().saturating_sub(keep_runs);
        let mut stats = GcStats::default();
        for run in &runs[..old] {
            if run.status == RunStatus::Running {
                continue;
            }
            let mut batch = sled::Batch::default();
            for entry in self.trees.attempts.scan_prefix(run.id.to_be_bytes()) {
                let (key, value) = entry.map_err(|e| sled_error(&self.path, e))?;
                stats.attempts_removed += attempts_in(&key, &value);
                stats.records_removed += 1;
                stats.bytes_reclaimed += (key.len() + value.len()) as u64;
                batch.remove(key);
            }
            self.trees.attempts.apply_batch(batch).map_err(io)?;
            let run_key = run.id.to_be_bytes();
            if let Some(value) = self.trees.runs.remove(run_key).map_err(io)? {
                stats.records_removed += 1;
                stats.bytes_reclaimed += (run_key.len() + value.len()) as u64;
                stats.runs_removed.push(run.id);
            }
        }
        if stats.records_removed > 0 {
            self.sync()?;
        }
        Ok(stats)
    }
}
