//! What the store keeps where: the trees, their keys, and how records are encoded.
//!
//! Trees of the sled database:
//! - `meta`: [`FORMAT_KEY`] → the format version (u64 BE); its presence marks a duraflow
//!   store.
//! - `outputs`: task id (UTF-8) → the stored bytes of its output.
//! - `runs`: run id (u64 BE) → a [`RunRecord`].
//! - `attempts`, two kinds of entries, both under the run's id so that a run's attempts are
//!   one prefix scan:
//!   - `run (u64 BE) | key | 0xFF | attempt (u32 BE)` → one [`AttemptRecord`];
//!   - `run (u64 BE) | 0xFF | epoch (u64 BE) | seq (u32 BE)` → a [`CachedBatch`]: many
//!     `Cached` attempts of that run in one value (a cached task costs a few microseconds;
//!     one sled insert per task would cost more than the task). A task id is non-empty UTF-8, whose first byte is
//!     never 0xFF, so the two kinds never collide and a run's batches sort after its single
//!     records.
//!
//! Every value is rmp-serde's named (map) encoding, so records can gain `#[serde(default)]`
//! fields.

use std::cmp::Ordering;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::{AttemptOutcome, AttemptRecord, RunId};
use crate::DuraflowError;

/// The on-disk format this code writes; kept in the `meta` tree.
pub(super) const FORMAT_VERSION: u64 = 1;
/// Key of the format version in the `meta` tree: its presence marks a duraflow store.
pub(super) const FORMAT_KEY: &[u8] = b"duraflow.format";
/// Separates a key from what follows it in record keys; never occurs in UTF-8.
pub(super) const SEP: u8 = 0xFF;

/// The trees a store uses besides `meta`.
#[derive(Clone)]
pub(super) struct Trees {
    pub(super) outputs: sled::Tree,
    pub(super) runs: sled::Tree,
    pub(super) attempts: sled::Tree,
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

/// `run (u64 BE) | 0xFF | epoch (u64 BE) | seq (u32 BE)`: the key of one cached batch.
/// `epoch` is an id from sled's `generate_id` (unique over the database's life, taken by
/// each writer), `seq` counts the writer's batches.
pub(super) fn batch_key(run: RunId, epoch: u64, seq: u32) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[..9].copy_from_slice(&batch_prefix(run));
    k[9..17].copy_from_slice(&epoch.to_be_bytes());
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Whether an `attempts` key (after its 8-byte run id) is a cached batch.
fn is_batch_key(k: &[u8]) -> bool {
    k.get(8) == Some(&SEP)
}

/// The order of single attempt records in the tree: by `key | 0xFF`, then attempt number.
/// [`crate::store::SledStore::run`] returns attempts in this order.
fn record_order(a: &AttemptRecord, b: &AttemptRecord) -> Ordering {
    let ka = a.key.bytes().chain(std::iter::once(SEP));
    let kb = b.key.bytes().chain(std::iter::once(SEP));
    ka.cmp(kb).then(a.attempt.cmp(&b.attempt))
}

/// A `Cached` attempt waiting to be stored in a [`CachedBatch`]: an [`AttemptRecord`]
/// without its outcome, holding the task id the run shares rather than a copy, in one cache
/// line (every task of a cached re-run writes one): its optional numbers are kept as plain
/// numbers and a mask of which are present.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(align(64))]
pub(super) struct CachedAttempt {
    pub(super) run: RunId,
    pub(super) key: Arc<str>,
    pub(super) started_ms: u64,
    finished_ms: u64,
    duration_us: u64,
    output_size: u64,
    pub(super) attempt: u32,
    /// Which of the optional numbers are present: [`FINISHED`], [`DURATION`], [`SIZE`].
    present: u8,
}

const FINISHED: u8 = 1;
const DURATION: u8 = 2;
const SIZE: u8 = 4;

impl CachedAttempt {
    /// `record` (a `Cached` attempt), with `key` as its task id.
    pub(super) fn new(key: Arc<str>, record: &AttemptRecord) -> CachedAttempt {
        let bit = |number: Option<u64>, bit: u8| if number.is_some() { bit } else { 0 };
        CachedAttempt {
            run: record.run,
            key,
            started_ms: record.started_ms,
            finished_ms: record.finished_ms.unwrap_or(0),
            duration_us: record.duration_us.unwrap_or(0),
            output_size: record.output_size.unwrap_or(0),
            attempt: record.attempt,
            present: bit(record.finished_ms, FINISHED)
                | bit(record.duration_us, DURATION)
                | bit(record.output_size, SIZE),
        }
    }

    fn finished_ms(&self) -> Option<u64> {
        (self.present & FINISHED != 0).then_some(self.finished_ms)
    }

    fn duration_us(&self) -> Option<u64> {
        (self.present & DURATION != 0).then_some(self.duration_us)
    }

    fn output_size(&self) -> Option<u64> {
        (self.present & SIZE != 0).then_some(self.output_size)
    }
}

impl From<&AttemptRecord> for CachedAttempt {
    fn from(record: &AttemptRecord) -> CachedAttempt {
        CachedAttempt::new(record.key.as_str().into(), record)
    }
}

/// Many `Cached` attempts of one run, stored as one value: an [`AttemptRecord`] without
/// the fields they share, by column (entry `i` of every column is attempt `i`), so that
/// field names are written once per batch rather than once per attempt.
#[derive(Serialize, Deserialize)]
pub(super) struct CachedBatch<K> {
    /// The run every attempt belongs to.
    pub(super) run: RunId,
    /// [`AttemptRecord::key`] of each attempt.
    pub(super) keys: Vec<K>,
    /// [`AttemptRecord::attempt`].
    pub(super) attempt: Vec<u32>,
    /// [`AttemptRecord::started_ms`].
    pub(super) started_ms: Vec<u64>,
    /// [`AttemptRecord::finished_ms`].
    pub(super) finished_ms: Vec<Option<u64>>,
    /// [`AttemptRecord::duration_us`].
    pub(super) duration_us: Vec<Option<u64>>,
    /// [`AttemptRecord::output_size`].
    pub(super) output_size: Vec<Option<u64>>,
}

impl<'a> CachedBatch<&'a str> {
    /// The batch of `records`, which are `Cached` attempts of `run`.
    pub(super) fn of(run: RunId, records: &'a [CachedAttempt]) -> Self {
        CachedBatch {
            run,
            keys: records.iter().map(|r| &*r.key).collect(),
            attempt: records.iter().map(|r| r.attempt).collect(),
            started_ms: records.iter().map(|r| r.started_ms).collect(),
            finished_ms: records.iter().map(CachedAttempt::finished_ms).collect(),
            duration_us: records.iter().map(CachedAttempt::duration_us).collect(),
            output_size: records.iter().map(CachedAttempt::output_size).collect(),
        }
    }
}

impl CachedBatch<&str> {
    /// The batch's named msgpack encoding: the bytes [`encode_record`] gives (rmp-serde's
    /// named encoding, the most compact marker for every length and integer), written
    /// directly into a buffer of the right size. The writer thread encodes every cached
    /// attempt of every cached re-run, at the end of the run, so rmp-serde's per-element
    /// dispatch cost the run a few hundred nanoseconds per task.
    pub(super) fn encode(&self) -> Vec<u8> {
        let keys: usize = self.keys.iter().map(|k| k.len() + 5).sum();
        // At most: 128 bytes of markers, names and the run; per entry its key and 41 bytes.
        let mut out = Vec::with_capacity(128 + keys + self.keys.len() * 41);
        map_len(&mut out, 7);
        str(&mut out, "run");
        uint(&mut out, self.run);
        str(&mut out, "keys");
        array_len(&mut out, self.keys.len());
        for key in &self.keys {
            str(&mut out, key);
        }
        str(&mut out, "attempt");
        array_len(&mut out, self.attempt.len());
        for &a in &self.attempt {
            uint(&mut out, u64::from(a));
        }
        for (name, column) in [
            ("started_ms", None),
            ("finished_ms", Some(&self.finished_ms)),
            ("duration_us", Some(&self.duration_us)),
            ("output_size", Some(&self.output_size)),
        ] {
            str(&mut out, name);
            match column {
                None => {
                    array_len(&mut out, self.started_ms.len());
                    for &v in &self.started_ms {
                        uint(&mut out, v);
                    }
                }
                Some(column) => {
                    array_len(&mut out, column.len());
                    for &v in column {
                        option(&mut out, v);
                    }
                }
            }
        }
        out
    }
}

/// An attempt record's named msgpack encoding: the bytes [`encode_record`] gives, written
/// directly for every outcome but `Failed` (which goes through rmp-serde). Two records are
/// encoded per executed task, on the executor's threads, and rmp-serde's growing buffer and
/// per-field dispatch cost several thousand instructions per record.
///
/// # Errors
/// As [`encode_record`] (only for a `Failed` outcome).
pub(super) fn encode_attempt(record: &AttemptRecord) -> Result<Vec<u8>, DuraflowError> {
    // Every field by name: a field added to the record fails to compile here, rather than
    // being left out of the encoding.
    let AttemptRecord {
        run,
        key,
        attempt,
        started_ms,
        finished_ms,
        outcome,
        duration_us,
        output_size,
    } = record;
    let outcome = match outcome {
        AttemptOutcome::Running => "Running",
        AttemptOutcome::Succeeded => "Succeeded",
        AttemptOutcome::Cached => "Cached",
        AttemptOutcome::Interrupted => "Interrupted",
        AttemptOutcome::Failed { .. } => return encode_record(record),
    };
    // The most it can take: 72 bytes of map marker and names, at most 62 of values besides
    // the key's bytes, 4 more for a long key's marker. No realloc, and no spare half.
    let mut out = Vec::with_capacity(140 + key.len());
    map_len(&mut out, 8);
    str(&mut out, "run");
    uint(&mut out, *run);
    str(&mut out, "key");
    str(&mut out, key);
    str(&mut out, "attempt");
    uint(&mut out, u64::from(*attempt));
    str(&mut out, "started_ms");
    uint(&mut out, *started_ms);
    str(&mut out, "finished_ms");
    option(&mut out, *finished_ms);
    str(&mut out, "outcome");
    str(&mut out, outcome);
    str(&mut out, "duration_us");
    option(&mut out, *duration_us);
    str(&mut out, "output_size");
    option(&mut out, *output_size);
    Ok(out)
}

// msgpack markers, as rmp writes them (the smallest that fits).

fn option(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => uint(out, v),
        None => out.push(0xc0), // nil
    }
}

fn map_len(out: &mut Vec<u8>, len: usize) {
    sized(out, len, 0x80, 0xde, 0xdf);
}

fn array_len(out: &mut Vec<u8>, len: usize) {
    sized(out, len, 0x90, 0xdc, 0xdd);
}

/// A map or array length: a fix marker below 16, else a 16- or 32-bit one.
fn sized(out: &mut Vec<u8>, len: usize, fix: u8, m16: u8, m32: u8) {
    if len < 16 {
        out.push(fix | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(m16);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(m32);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

fn str(out: &mut Vec<u8>, s: &str) {
    let len = s.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if let Ok(len) = u8::try_from(len) {
        out.extend_from_slice(&[0xd9, len]);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0xda);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

fn uint(out: &mut Vec<u8>, v: u64) {
    if v < 128 {
        out.push(v as u8);
    } else if let Ok(v) = u8::try_from(v) {
        out.extend_from_slice(&[0xcc, v]);
    } else if let Ok(v) = u16::try_from(v) {
        out.push(0xcd);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(v) {
        out.push(0xce);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

impl<K: AsRef<str>> CachedBatch<K> {
    /// The number of attempts, or `None` if the columns differ in length.
    fn len(&self) -> Option<usize> {
        let n = self.keys.len();
        let lens = [
            self.attempt.len(),
            self.started_ms.len(),
            self.finished_ms.len(),
            self.duration_us.len(),
            self.output_size.len(),
        ];
        lens.iter().all(|&l| l == n).then_some(n)
    }

    /// Attempt `i` (`i` < [`len`](Self::len)).
    fn record(&self, i: usize) -> Option<AttemptRecord> {
        Some(AttemptRecord {
            run: self.run,
            key: self.keys.get(i)?.as_ref().to_owned(),
            attempt: *self.attempt.get(i)?,
            started_ms: *self.started_ms.get(i)?,
            finished_ms: *self.finished_ms.get(i)?,
            outcome: AttemptOutcome::Cached,
            duration_us: *self.duration_us.get(i)?,
            output_size: *self.output_size.get(i)?,
        })
    }

    /// The attempts whose key passes `keep`.
    fn records<'s>(
        &'s self,
        keep: impl Fn(&str) -> bool + 's,
    ) -> impl Iterator<Item = AttemptRecord> + 's {
        self.keys
            .iter()
            .enumerate()
            .filter(move |(_, k)| keep(k.as_ref()))
            .filter_map(|(i, _)| self.record(i))
    }
}

/// Decodes a cached batch; one that does not decode or whose columns differ in length is
/// `Corrupt`.
fn decode_batch<'a>(path: &Path, bytes: &'a [u8]) -> Result<CachedBatch<&'a str>, DuraflowError> {
    let batch: CachedBatch<&str> = decode_record(path, "cached attempts", bytes)?;
    match batch.len() {
        Some(_) => Ok(batch),
        None => Err(DuraflowError::Corrupt {
            key: String::new(),
            path: Some(path.to_owned()),
            reason: "unreadable cached attempts record: its columns differ in length".to_owned(),
        }),
    }
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
/// ordered by key, then attempt number (the order of the single records' keys). A `Cached`
/// attempt is final, so when a batch and a single record hold the same attempt (not done by
/// this crate), the batch's wins.
pub(super) fn run_attempts(
    trees: &Trees,
    path: &Path,
    run: RunId,
    on_undecodable: OnUndecodable,
) -> Result<Vec<AttemptRecord>, DuraflowError> {
    let io = |e| super::sled_error(path, e);
    let mut singles = Vec::new();
    let mut batched = Vec::new();
    for entry in trees.attempts.scan_prefix(run.to_be_bytes()) {
        let (k, v) = entry.map_err(io)?;
        let decoded = if is_batch_key(&k) {
            decode_batch(path, &v).map(|batch| batched.extend(batch.records(|_| true)))
        } else {
            decode_record::<AttemptRecord>(path, "attempt", &v).map(|a| singles.push(a))
        };
        if let Err(e) = decoded {
            if on_undecodable == OnUndecodable::Fail {
                return Err(e);
            }
        }
    }
    if batched.is_empty() {
        return Ok(singles); // already in key order
    }
    // Batches first, so the stable sort keeps a batch's record ahead of a single one for the
    // same attempt, and `dedup_by` keeps the first.
    batched.append(&mut singles);
    batched.sort_by(record_order);
    batched.dedup_by(|later, first| record_order(later, first) == Ordering::Equal);
    Ok(batched)
}

/// Every attempt at task `key` in run `run`, by attempt number (see [`run_attempts`] for
/// attempts held twice).
pub(super) fn key_attempts(
    trees: &Trees,
    path: &Path,
    run: RunId,
    key: &str,
) -> Result<Vec<AttemptRecord>, DuraflowError> {
    let io = |e| super::sled_error(path, e);
    let mut prefix = run.to_be_bytes().to_vec();
    prefix.extend_from_slice(key.as_bytes());
    prefix.push(SEP);
    let mut found = Vec::new();
    for v in trees.attempts.scan_prefix(batch_prefix(run)).values() {
        let v = v.map_err(io)?;
        found.extend(decode_batch(path, &v)?.records(|k| k == key));
    }
    for v in trees.attempts.scan_prefix(&prefix).values() {
        found.push(decode_record(path, "attempt", &v.map_err(io)?)?);
    }
    found.sort_by_key(|a| a.attempt);
    found.dedup_by_key(|a| a.attempt);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_named_msgpack_and_round_trips() {
        let record = AttemptRecord {
            run: 7,
            key: "t/1".to_owned(),
            attempt: 1,
            started_ms: 10,
            finished_ms: Some(11),
            outcome: AttemptOutcome::Cached,
            duration_us: Some(3),
            output_size: Some(9),
        };
        let records = [record.clone(), record.clone()];
        let cached: Vec<CachedAttempt> = records.iter().map(CachedAttempt::from).collect();
        let bytes = rmp_serde::to_vec_named(&CachedBatch::of(7, &cached)).unwrap();
        // A map (named encoding), not an array.
        assert_eq!(bytes[0] & 0xf0, 0x80, "{bytes:x?}");
        let back = decode_batch(Path::new("x"), &bytes).unwrap();
        assert_eq!(back.records(|_| true).collect::<Vec<_>>(), records);
    }

    #[test]
    fn the_direct_encoding_of_a_batch_is_rmp_serdes() {
        let edges = [
            0,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ];
        let key_lens = [1, 31, 32, 255, 256, 65_535, 65_536];
        let record = |i: usize| {
            let v = edges[i % edges.len()];
            AttemptRecord {
                run: v,
                // Every key length in the first records only, to keep the test small.
                key: "k".repeat(key_lens.get(i).copied().unwrap_or(i % 40 + 1)),
                attempt: u32::try_from(v).unwrap_or(u32::MAX),
                started_ms: edges[(i + 3) % edges.len()],
                finished_ms: (!i.is_multiple_of(3)).then_some(v),
                outcome: AttemptOutcome::Cached,
                duration_us: i.is_multiple_of(2).then_some(edges[(i + 5) % edges.len()]),
                output_size: (!i.is_multiple_of(5)).then_some(v / 3),
            }
        };
        // Column lengths around every array-marker boundary.
        for len in [0, 1, 15, 16, 17, 40, 256, 65_535, 65_536] {
            let records: Vec<CachedAttempt> =
                (0..len).map(|i| CachedAttempt::from(&record(i))).collect();
            for run in [0, 127, 128, 70_000, u64::MAX] {
                let batch = CachedBatch::of(run, &records);
                let expected = rmp_serde::to_vec_named(&batch).unwrap();
                assert!(batch.encode() == expected, "{len} records, run {run}");
            }
        }
    }

    #[test]
    fn the_direct_encoding_of_an_attempt_is_rmp_serdes() {
        let edges = [0, 127, 128, 65_536, u64::from(u32::MAX) + 1, u64::MAX];
        let outcomes = [
            AttemptOutcome::Running,
            AttemptOutcome::Succeeded,
            AttemptOutcome::Cached,
            AttemptOutcome::Interrupted,
            AttemptOutcome::Failed {
                error: "boom".to_owned(),
            },
        ];
        for (i, outcome) in outcomes.iter().cycle().take(60).enumerate() {
            let v = edges[i % edges.len()];
            let record = AttemptRecord {
                run: v,
                key: "t".repeat([1, 31, 32, 300][i % 4]),
                attempt: u32::try_from(v).unwrap_or(u32::MAX),
                started_ms: edges[(i + 1) % edges.len()],
                finished_ms: (!i.is_multiple_of(3)).then_some(v),
                outcome: outcome.clone(),
                duration_us: i.is_multiple_of(2).then_some(edges[(i + 2) % edges.len()]),
                output_size: (i % 4 != 1).then_some(v / 7),
            };
            let expected = rmp_serde::to_vec_named(&record).unwrap();
            assert_eq!(encode_attempt(&record).unwrap(), expected, "{record:?}");
        }
    }

    #[test]
    fn a_kept_cached_attempt_fits_a_cache_line_and_keeps_absent_numbers_absent() {
        assert_eq!(std::mem::size_of::<CachedAttempt>(), 64);
        let record = AttemptRecord {
            run: 3,
            key: "k".to_owned(),
            attempt: 2,
            started_ms: 10,
            finished_ms: None,
            outcome: AttemptOutcome::Cached,
            duration_us: Some(0),
            output_size: Some(u64::MAX),
        };
        let kept = CachedAttempt::from(&record);
        assert_eq!(kept.finished_ms(), None);
        assert_eq!(kept.duration_us(), Some(0));
        assert_eq!(kept.output_size(), Some(u64::MAX));
        let batch = CachedBatch::of(3, std::slice::from_ref(&kept));
        let bytes = batch.encode();
        let back = decode_batch(Path::new("x"), &bytes).unwrap();
        assert_eq!(back.records(|_| true).collect::<Vec<_>>(), [record]);
    }

    #[test]
    fn a_batch_with_uneven_columns_is_corrupt() {
        let mut batch = CachedBatch::of(7, &[]);
        batch.attempt.push(1);
        let bytes = rmp_serde::to_vec_named(&batch).unwrap();
        assert!(matches!(
            decode_batch(Path::new("x"), &bytes),
            Err(DuraflowError::Corrupt { .. })
        ));
    }

    #[test]
    fn batch_keys_sort_after_every_single_record_of_their_run() {
        let single = attempt_key(7, "\u{10FFFF}", u32::MAX);
        let batch = batch_key(7, 0, 0);
        assert!(single < batch.to_vec());
        assert!(batch.to_vec() < attempt_key(8, "a", 0));
        assert!(is_batch_key(&batch) && !is_batch_key(&single));
    }
}
