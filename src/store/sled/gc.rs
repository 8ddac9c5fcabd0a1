//! Dropping the run and attempt records of old runs ([`SledStore::gc`]).

use super::layout::{decode_record, CachedBatch, SEP};
use super::writer::Failure;
use super::{sled_error, SledStore};
use crate::record::{RunId, RunRecord, RunStatus};
use crate::DuraflowError;

/// What [`SledStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcStats {
    /// The ids of the runs whose records were removed, oldest first.
    pub runs_removed: Vec<RunId>,
    /// How many attempts those runs had (each attempt of a cached batch counts once).
    pub attempts_removed: u64,
    /// How many database entries were removed: one per run record, one per single attempt
    /// record, one per cached batch.
    pub records_removed: u64,
    /// The sizes of the removed entries' keys and values, added up, in bytes. sled's files
    /// do not shrink by that much at once: the space is reused, and the files shrink only
    /// as sled compacts its segments, over later writes.
    pub bytes_reclaimed: u64,
}

impl SledStore {
    /// Removes the records of every run but the newest `keep_runs` (by id): each run record
    /// and all its attempt records, single and cached batches. Outputs are never touched, so
    /// nothing runs again because of a gc; nor is a run that is still `Running` (one of this
    /// process: another process cannot have the store open), whatever its age.
    ///
    /// Each run's attempts are removed before its run record, in one atomic batch, and the
    /// database is flushed before this returns: a crash in between leaves at most a run with
    /// fewer attempts, which the next gc removes. With `keep_runs` 0 and no run running, the
    /// run ids start again from 1 when the store is next opened.
    ///
    /// The bytes reported are those of the removed entries; sled's files shrink only as it
    /// compacts its segments, over later writes.
    ///
    /// # Errors
    /// [`DuraflowError::Corrupt`] when a run record does not decode (nothing is removed);
    /// [`DuraflowError::Io`] from the database, or once the store has stopped after a failed
    /// write (reopen it in a new process). Runs removed before a failure stay removed.
    pub fn gc(&self, keep_runs: usize) -> Result<GcStats, DuraflowError> {
        self.queryable()?;
        let io = |e: sled::Error| {
            self.shared.failed.get_or_init(|| Failure::of(&e));
            sled_error(&self.path, e)
        };
        let mut runs: Vec<RunRecord> = Vec::new();
        for value in self.trees.runs.iter().values() {
            let value = value.map_err(|e| sled_error(&self.path, e))?;
            runs.push(decode_record(&self.path, "run", &value)?);
        }
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
            self.db.flush().map_err(io)?;
        }
        Ok(stats)
    }
}

/// How many attempts the `attempts` entry `key` → `value` holds: one for a single record,
/// the batch's length for a cached batch (0 if the batch does not decode: it is removed all
/// the same).
fn attempts_in(key: &[u8], value: &[u8]) -> u64 {
    if key.get(8) != Some(&SEP) {
        return 1;
    }
    rmp_serde::from_slice::<CachedBatch<&str>>(value).map_or(0, |b| b.keys.len() as u64)
}
