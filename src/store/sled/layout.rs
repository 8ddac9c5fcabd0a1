//! What the store keeps where: the trees, their keys, and how records are encoded.
//!
//! Trees of the sled database:
//! - `meta`: [`FORMAT_KEY`] → the format version (u64 BE); its presence marks a duraflow
//!   store. [`COMMIT_KEY`] → the number of the last commit made durable (u64 BE), which the
//!   marker file records too (see `marker.rs`).
//! - `outputs`: task id (UTF-8) → the stored bytes of its output, when they are no larger
//!   than the store's blob threshold.
//! - `witnesses`: task id → the [`Witness`] of its output (length, CRC-32, a commit
//!   number, and the digest of its file for an output over the store's blob threshold,
//!   which is then not in `outputs`: see `blob.rs`), written in the same transaction. sled
//!   skips a log entry whose own blob file is missing and opens the page as it was before
//!   it, silently; a read that finds an output not matching its witness (older, missing, or
//!   present without one) reports it damaged, unless the witness's commit is newer than the
//!   last one acknowledged before the open (a write lost to a crash before it was
//!   acknowledged: the output is absent). A witness is at most 52 bytes, so its tree's
//!   pages stay in sled's log.
//! - `runs`: run id (u64 BE) → a [`RunRecord`](crate::RunRecord).
//! - `attempts`, two kinds of entries, both under the run's id so that a run's attempts are
//!   one prefix scan:
//!   - `run (u64 BE) | key | 0xFF | attempt (u32 BE)` → one [`AttemptRecord`];
//!   - `run (u64 BE) | 0xFF | id` → a [`CachedBatch`]: many `Cached` attempts of that run in
//!     one value (a cached task costs a few microseconds; one sled insert each would cost
//!     more than the task). `id` is unique over the database's life. A task id is non-empty
//!     UTF-8, whose first byte is never 0xFF, so the two kinds never collide and a run's
//!     batches sort after its single records.
//!
//! Every value is rmp-serde's named (map) encoding, so records can gain `#[serde(default)]`
//! fields.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::blob::Digest;
use crate::record::{AttemptOutcome, AttemptRecord, RunId};
use crate::DuraflowError;

/// The on-disk format this code writes; kept in the `meta` tree.
pub(super) const FORMAT_VERSION: u64 = 3;
/// Key of the format version in the `meta` tree: its presence marks a duraflow store.
pub(super) const FORMAT_KEY: &[u8] = b"duraflow.format";
/// Separates a key from what follows it in record keys; never occurs in UTF-8.
const SEP: u8 = 0xFF;
/// Key of the last durable commit's number in the `meta` tree.
pub(super) const COMMIT_KEY: &[u8] = b"duraflow.commit";

/// The trees a store uses.
#[derive(Clone)]
pub(super) struct Trees {
    pub(super) meta: sled::Tree,
    pub(super) outputs: sled::Tree,
    pub(super) witnesses: sled::Tree,
    pub(super) runs: sled::Tree,
    pub(super) attempts: sled::Tree,
}

/// What the store knows of an output, kept in the `witnesses` tree: its length and CRC-32,
/// a commit number no higher than the one that made it durable (0 for outputs from before
/// witnesses), and, for an output kept in a file of its own, that file's BLAKE3 hash.
///
/// `length (u64 BE) | CRC-32 (u32 BE) | commit (u64 BE) [| BLAKE3 hash (32 bytes)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Witness {
    pub(super) len: u64,
    pub(super) crc: u32,
    pub(super) commit: u64,
    /// The digest naming the output's file, when it is not in the `outputs` tree.
    pub(super) blob: Option<Digest>,
}

impl Witness {
    /// The witness of `value`.
    pub(super) fn of(value: &[u8], commit: u64, blob: Option<Digest>) -> Witness {
        Witness {
            len: value.len() as u64,
            crc: crc32fast::hash(value),
            commit,
            blob,
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(52);
        w.extend_from_slice(&self.len.to_be_bytes());
        w.extend_from_slice(&self.crc.to_be_bytes());
        w.extend_from_slice(&self.commit.to_be_bytes());
        if let Some(blob) = &self.blob {
            w.extend_from_slice(blob);
        }
        w
    }

    /// The witness `bytes` encode, `None` when they do not.
    pub(super) fn decode(bytes: &[u8]) -> Option<Witness> {
        let u64_at = |at: usize| Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        let blob = match bytes.len() {
            20 => None,
            52 => Some(bytes[20..].try_into().ok()?),
            _ => return None,
        };
        Some(Witness {
            len: u64_at(0)?,
            crc: u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?),
            commit: u64_at(12)?,
            blob,
        })
    }

    /// Whether `value` is the output this witness describes.
    pub(super) fn matches(&self, value: &[u8]) -> bool {
        value.len() as u64 == self.len && crc32fast::hash(value) == self.crc
    }
}

/// `run (u64 BE) | key | 0xFF | attempt (u32 BE)`: the key of one attempt record.
pub(super) fn attempt_key(run: RunId, key: &str, attempt: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len() + 5);
    k.extend_from_slice(&run.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&attempt.to_be_bytes());
    k
}

/// `run (u64 BE) | 0xFF`: the prefix of every cached batch of `run`.
fn batch_prefix(run: RunId) -> [u8; 9] {
    let mut k = [SEP; 9];
    k[..8].copy_from_slice(&run.to_be_bytes());
    k
}

/// `run (u64 BE) | 0xFF | id (u64 BE)`: the key of one cached batch.
pub(super) fn batch_key(run: RunId, id: u64) -> Vec<u8> {
    let mut k = batch_prefix(run).to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Whether an `attempts` key (after its 8-byte run id) is a cached batch.
pub(super) fn is_batch_key(k: &[u8]) -> bool {
    k.get(8) == Some(&SEP)
}

/// The order of single attempt records in the tree: by `key | 0xFF`, then attempt number.
fn record_order(a: &AttemptRecord, b: &AttemptRecord) -> std::cmp::Ordering {
    let ka = a.key.bytes().chain(std::iter::once(SEP));
    let kb = b.key.bytes().chain(std::iter::once(SEP));
    ka.cmp(kb).then(a.attempt.cmp(&b.attempt))
}

/// Many `Cached` attempts of one run, stored as one value: an [`AttemptRecord`] without
/// the fields they share, by column (entry `i` of every column is attempt `i`).
#[derive(Serialize, Deserialize)]
pub(super) struct CachedBatch<K> {
    /// The run every attempt belongs to.
    pub(super) run: RunId,
    /// [`AttemptRecord::key`] of each attempt.
    pub(super) keys: Vec<K>,
    /// [`AttemptRecord::attempt`].
    attempt: Vec<u32>,
    /// [`AttemptRecord::started_ms`].
    started_ms: Vec<u64>,
    /// [`AttemptRecord::finished_ms`].
    finished_ms: Vec<Option<u64>>,
    /// [`AttemptRecord::duration_us`].
    duration_us: Vec<Option<u64>>,
    /// [`AttemptRecord::output_size`].
    output_size: Vec<Option<u64>>,
    /// [`AttemptRecord::reason`]; empty when no attempt has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    reason: Vec<Option<K>>,
}

impl<'a> CachedBatch<&'a str> {
    /// The batch of `records`, which are `Cached` attempts of `run`.
    pub(super) fn of(run: RunId, records: &'a [AttemptRecord]) -> Self {
        CachedBatch {
            run,
            keys: records.iter().map(|r| r.key.as_str()).collect(),
            attempt: records.iter().map(|r| r.attempt).collect(),
            started_ms: records.iter().map(|r| r.started_ms).collect(),
            finished_ms: records.iter().map(|r| r.finished_ms).collect(),
            duration_us: records.iter().map(|r| r.duration_us).collect(),
            output_size: records.iter().map(|r| r.output_size).collect(),
            reason: match records.iter().any(|r| r.reason.is_some()) {
                true => records.iter().map(|r| r.reason.as_deref()).collect(),
                false => Vec::new(),
            },
        }
    }
}

impl CachedBatch<&str> {
    /// The attempts whose key passes `keep`, or `None` if the columns differ in length.
    fn records(&self, keep: impl Fn(&str) -> bool) -> Option<Vec<AttemptRecord>> {
        let n = self.keys.len();
        let lens = [
            self.attempt.len(),
            self.started_ms.len(),
            self.finished_ms.len(),
            self.duration_us.len(),
            self.output_size.len(),
        ];
        if lens.iter().any(|&l| l != n) || !(self.reason.is_empty() || self.reason.len() == n) {
            return None;
        }
        let record = |i: usize| AttemptRecord {
            run: self.run,
            key: self.keys[i].to_owned(),
            attempt: self.attempt[i],
            started_ms: self.started_ms[i],
            finished_ms: self.finished_ms[i],
            outcome: AttemptOutcome::Cached,
            duration_us: self.duration_us[i],
            output_size: self.output_size[i],
            reason: self.reason.get(i).copied().flatten().map(str::to_owned),
        };
        Some((0..n).filter(|&i| keep(self.keys[i])).map(record).collect())
    }
}

/// The attempts of the cached batch `bytes` whose key passes `keep`; a batch that does not
/// decode or whose columns differ in length is `Corrupt`.
fn batch_records(
    path: &Path,
    bytes: &[u8],
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<AttemptRecord>, DuraflowError> {
    let batch: CachedBatch<&str> = decode_record(path, "cached attempts", bytes)?;
    batch.records(keep).ok_or_else(|| DuraflowError::Corrupt {
        key: String::new(),
        path: Some(path.to_owned()),
        reason: "unreadable cached attempts record: its columns differ in length".to_owned(),
    })
}

/// How many attempts the `attempts` entry `key` → `value` holds: one for a single record,
/// the batch's length for a cached batch (0 if the batch does not decode).
pub(super) fn attempts_in(key: &[u8], value: &[u8]) -> u64 {
    if !is_batch_key(key) {
        return 1;
    }
    rmp_serde::from_slice::<CachedBatch<&str>>(value).map_or(0, |b| b.keys.len() as u64)
}

/// Encodes a record (rmp-serde, named).
pub(super) fn encode_record<T: Serialize>(record: &T) -> Result<Vec<u8>, DuraflowError> {
    rmp_serde::to_vec_named(record).map_err(|source| DuraflowError::Encode {
        key: "<record>".to_owned(),
        type_name: std::any::type_name::<T>(),
        source,
    })
}

/// Decodes a record; an undecodable one is `Corrupt`.
pub(super) fn decode_record<'a, T: Deserialize<'a>>(
    path: &Path,
    what: &str,
    bytes: &'a [u8],
) -> Result<T, DuraflowError> {
    rmp_serde::from_slice(bytes).map_err(|e| DuraflowError::Corrupt {
        key: String::new(),
        path: Some(path.to_owned()),
        reason: format!("unreadable {what} record: {e}"),
    })
}

/// What to do with a record that does not decode.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum OnUndecodable {
    /// Fail with `Corrupt` (queries).
    Fail,
    /// Leave it out (marking interrupted runs at open: a damaged record must not stop the
    /// store from opening).
    Skip,
}

/// Every attempt of run `run`: its single records and the entries of its cached batches,
/// ordered by key, then attempt number.
pub(super) fn run_attempts(
    trees: &Trees,
    path: &Path,
    run: RunId,
    on_undecodable: OnUndecodable,
) -> Result<Vec<AttemptRecord>, DuraflowError> {
    let mut attempts = Vec::new();
    for entry in trees.attempts.scan_prefix(run.to_be_bytes()) {
        let (k, v) = entry.map_err(|e| super::sled_error(path, e))?;
        let decoded = if is_batch_key(&k) {
            batch_records(path, &v, |_| true)
        } else {
            decode_record(path, "attempt", &v).map(|a| vec![a])
        };
        match decoded {
            Ok(records) => attempts.extend(records),
            Err(e) if on_undecodable == OnUndecodable::Fail => return Err(e),
            Err(_) => {}
        }
    }
    attempts.sort_by(record_order);
    Ok(attempts)
}

/// Every attempt at task `key` in run `run`, by attempt number.
pub(super) fn key_attempts(
    trees: &Trees,
    path: &Path,
    run: RunId,
    key: &str,
) -> Result<Vec<AttemptRecord>, DuraflowError> {
    let io = |e| super::sled_error(path, e);
    let mut found = Vec::new();
    for v in trees.attempts.scan_prefix(batch_prefix(run)).values() {
        found.extend(batch_records(path, &v.map_err(io)?, |k| k == key)?);
    }
    let mut prefix = run.to_be_bytes().to_vec();
    prefix.extend_from_slice(key.as_bytes());
    prefix.push(SEP);
    for v in trees.attempts.scan_prefix(&prefix).values() {
        found.push(decode_record(path, "attempt", &v.map_err(io)?)?);
    }
    found.sort_by_key(|a| a.attempt);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(key: &str, started_ms: u64) -> AttemptRecord {
        AttemptRecord {
            run: 7,
            key: key.to_owned(),
            attempt: 1,
            started_ms,
            finished_ms: Some(started_ms + 1),
            outcome: AttemptOutcome::Cached,
            duration_us: Some(3),
            output_size: Some(9),
            reason: None,
        }
    }

    #[test]
    fn a_batch_is_named_msgpack_and_round_trips() {
        let records = [cached("t/1", 10), cached("t/2", 11)];
        let bytes = encode_record(&CachedBatch::of(7, &records)).unwrap();
        // A map (named encoding), not an array.
        assert_eq!(bytes[0] & 0xf0, 0x80, "{bytes:x?}");
        let back = batch_records(Path::new("x"), &bytes, |_| true).unwrap();
        assert_eq!(back, records);
        let only = batch_records(Path::new("x"), &bytes, |k| k == "t/2").unwrap();
        assert_eq!(only, records[1..]);
    }

    #[test]
    fn a_batch_with_uneven_columns_is_corrupt() {
        let mut batch = CachedBatch::of(7, &[]);
        batch.attempt.push(1);
        let bytes = encode_record(&batch).unwrap();
        assert!(matches!(
            batch_records(Path::new("x"), &bytes, |_| true),
            Err(DuraflowError::Corrupt { .. })
        ));
    }

    #[test]
    fn batch_keys_sort_after_every_single_record_of_their_run() {
        let single = attempt_key(7, "\u{10FFFF}", u32::MAX);
        let batch = batch_key(7, 0);
        assert!(single < batch);
        assert!(batch < attempt_key(8, "a", 0));
        assert!(is_batch_key(&batch) && !is_batch_key(&single));
    }
    /// Records as format 1 has always written them (the bytes of the store's first
    /// encoder): they decode to the same values, and are what the encoder writes today.
    #[test]
    fn records_written_by_format_1_still_decode() {
        let attempt = |outcome, ended: bool| AttemptRecord {
            run: 7,
            key: "load/1".to_owned(),
            attempt: 2,
            started_ms: 1_700_000_000_123,
            finished_ms: ended.then_some(1_700_000_000_456),
            outcome,
            duration_us: ended.then_some(333_000),
            output_size: ended.then_some(42),
            reason: None,
        };
        let failed = attempt(
            AttemptOutcome::Failed {
                error: "boom".into(),
            },
            true,
        );
        let running = attempt(AttemptOutcome::Running, false);
        for (bytes, record) in [(&FAILED[..], failed), (&RUNNING[..], running)] {
            let decoded: AttemptRecord = decode_record(Path::new("x"), "attempt", bytes).unwrap();
            assert_eq!(decoded, record);
            assert_eq!(encode_record(&record).unwrap(), bytes);
        }
        let batch = batch_records(Path::new("x"), &BATCH, |_| true).unwrap();
        let second = AttemptRecord {
            key: "b/c".to_owned(),
            started_ms: 11,
            finished_ms: None,
            duration_us: None,
            output_size: None,
            ..cached("a", 10)
        };
        let first = AttemptRecord {
            finished_ms: Some(12),
            duration_us: Some(5),
            ..cached("a", 10)
        };
        assert_eq!(batch, [first, second]);
        let run: crate::RunRecord = decode_record(Path::new("x"), "run", &RUN).unwrap();
        assert_eq!(
            (run.id, run.started_ms, run.finished_ms),
            (7, 1_700_000_000_000, Some(1_700_000_009_000))
        );
        assert_eq!(
            (run.status, run.executed, run.cached, run.failed),
            (crate::RunStatus::Succeeded, 3, 2, 1)
        );
        assert_eq!(run.version, "2.0.0");
        assert_eq!(encode_record(&run).unwrap(), RUN);
    }

    const FAILED: [u8; 125] = [
        0x88, 0xa3, 0x72, 0x75, 0x6e, 0x07, 0xa3, 0x6b, 0x65, 0x79, 0xa6, 0x6c, 0x6f, 0x61, 0x64,
        0x2f, 0x31, 0xa7, 0x61, 0x74, 0x74, 0x65, 0x6d, 0x70, 0x74, 0x02, 0xaa, 0x73, 0x74, 0x61,
        0x72, 0x74, 0x65, 0x64, 0x5f, 0x6d, 0x73, 0xcf, 0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x68,
        0x7b, 0xab, 0x66, 0x69, 0x6e, 0x69, 0x73, 0x68, 0x65, 0x64, 0x5f, 0x6d, 0x73, 0xcf, 0x00,
        0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x69, 0xc8, 0xa7, 0x6f, 0x75, 0x74, 0x63, 0x6f, 0x6d, 0x65,
        0x81, 0xa6, 0x46, 0x61, 0x69, 0x6c, 0x65, 0x64, 0x81, 0xa5, 0x65, 0x72, 0x72, 0x6f, 0x72,
        0xa4, 0x62, 0x6f, 0x6f, 0x6d, 0xab, 0x64, 0x75, 0x72, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x5f,
        0x75, 0x73, 0xce, 0x00, 0x05, 0x14, 0xc8, 0xab, 0x6f, 0x75, 0x74, 0x70, 0x75, 0x74, 0x5f,
        0x73, 0x69, 0x7a, 0x65, 0x2a,
    ];
    const RUNNING: [u8; 101] = [
        0x88, 0xa3, 0x72, 0x75, 0x6e, 0x07, 0xa3, 0x6b, 0x65, 0x79, 0xa6, 0x6c, 0x6f, 0x61, 0x64,
        0x2f, 0x31, 0xa7, 0x61, 0x74, 0x74, 0x65, 0x6d, 0x70, 0x74, 0x02, 0xaa, 0x73, 0x74, 0x61,
        0x72, 0x74, 0x65, 0x64, 0x5f, 0x6d, 0x73, 0xcf, 0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x68,
        0x7b, 0xab, 0x66, 0x69, 0x6e, 0x69, 0x73, 0x68, 0x65, 0x64, 0x5f, 0x6d, 0x73, 0xc0, 0xa7,
        0x6f, 0x75, 0x74, 0x63, 0x6f, 0x6d, 0x65, 0xa7, 0x52, 0x75, 0x6e, 0x6e, 0x69, 0x6e, 0x67,
        0xab, 0x64, 0x75, 0x72, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x5f, 0x75, 0x73, 0xc0, 0xab, 0x6f,
        0x75, 0x74, 0x70, 0x75, 0x74, 0x5f, 0x73, 0x69, 0x7a, 0x65, 0xc0,
    ];
    const BATCH: [u8; 88] = [
        0x87, 0xa3, 0x72, 0x75, 0x6e, 0x07, 0xa4, 0x6b, 0x65, 0x79, 0x73, 0x92, 0xa1, 0x61, 0xa3,
        0x62, 0x2f, 0x63, 0xa7, 0x61, 0x74, 0x74, 0x65, 0x6d, 0x70, 0x74, 0x92, 0x01, 0x01, 0xaa,
        0x73, 0x74, 0x61, 0x72, 0x74, 0x65, 0x64, 0x5f, 0x6d, 0x73, 0x92, 0x0a, 0x0b, 0xab, 0x66,
        0x69, 0x6e, 0x69, 0x73, 0x68, 0x65, 0x64, 0x5f, 0x6d, 0x73, 0x92, 0x0c, 0xc0, 0xab, 0x64,
        0x75, 0x72, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x5f, 0x75, 0x73, 0x92, 0x05, 0xc0, 0xab, 0x6f,
        0x75, 0x74, 0x70, 0x75, 0x74, 0x5f, 0x73, 0x69, 0x7a, 0x65, 0x92, 0x09, 0xc0,
    ];
    const RUN: [u8; 103] = [
        0x88, 0xa2, 0x69, 0x64, 0x07, 0xaa, 0x73, 0x74, 0x61, 0x72, 0x74, 0x65, 0x64, 0x5f, 0x6d,
        0x73, 0xcf, 0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00, 0xab, 0x66, 0x69, 0x6e, 0x69,
        0x73, 0x68, 0x65, 0x64, 0x5f, 0x6d, 0x73, 0xcf, 0x00, 0x00, 0x01, 0x8b, 0xcf, 0xe5, 0x8b,
        0x28, 0xa6, 0x73, 0x74, 0x61, 0x74, 0x75, 0x73, 0xa9, 0x53, 0x75, 0x63, 0x63, 0x65, 0x65,
        0x64, 0x65, 0x64, 0xa8, 0x65, 0x78, 0x65, 0x63, 0x75, 0x74, 0x65, 0x64, 0x03, 0xa6, 0x63,
        0x61, 0x63, 0x68, 0x65, 0x64, 0x02, 0xa6, 0x66, 0x61, 0x69, 0x6c, 0x65, 0x64, 0x01, 0xa7,
        0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0xa5, 0x32, 0x2e, 0x30, 0x2e, 0x30,
    ];
}
