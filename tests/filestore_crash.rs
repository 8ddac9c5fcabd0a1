//! Promise: `FileStore` writes are atomic and durable. A real child process writing in a
//! loop is killed with SIGKILL at random moments; afterwards every key reads a complete
//! value, and that value is either the last one the child acknowledged for the key or the
//! one it was writing when it died — never a torn or mixed one.
//!
//! The test binary re-executes itself as the child: `child_writer` is an ignored test that
//! only does work when the parent passes the store directory in an environment variable.

mod common;

use common::wait;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use duraflow_rs::{DuraflowError, FileStore, Storage};

/// Store directory for the child; the child does nothing without it.
const DIR_ENV: &str = "DURAFLOW_CRASH_DIR";
/// First round the child writes.
const START_ENV: &str = "DURAFLOW_CRASH_START";
/// Overrides [`DEFAULT_SEED`] to replay or explore other kill schedules.
const SEED_ENV: &str = "DURAFLOW_CRASH_SEED";
const DEFAULT_SEED: u64 = 0x00d0_7a5f_10c4_a5e1;
/// How many times the child is started and killed.
const ITERATIONS: usize = 40;
/// The child is killed after 1..=MAX_ACKS acknowledged writes (plus a random spin).
const MAX_ACKS: usize = 40;
/// Payloads are 0..MAX_PAYLOAD bytes, so writes take measurable time.
const MAX_PAYLOAD: usize = 64 * 1024;
const VALUE_MAGIC: &[u8; 4] = b"DFV1";
/// The child prints `ack <key index> <round>` after each write returns.
const ACK: &str = "ack ";

/// The keys the child writes, in this order, every round.
fn keys() -> Vec<String> {
    vec![
        "plain".to_owned(),
        "a/b".to_owned(),
        "é".to_owned(),
        "..".to_owned(),
        "x".repeat(3000), // hashed directory name
        ".".to_owned(),
        "k-_2e".to_owned(), // looks like an encoded name
        "A\0b".to_owned(),
    ]
}

/// The only value the child ever writes for key number `ki` in `round`:
/// `magic | ki (u32 LE) | round (u64 LE) | key length (u32 LE) | key | payload`, where the
/// payload's length (0..64 KiB) and bytes are determined by `(ki, round)`.
fn make_value(ki: usize, key: &str, round: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ki as u64);
    let len = rng.usize(0..MAX_PAYLOAD);
    let mut value = Vec::with_capacity(4 + 4 + 8 + 4 + key.len() + len);
    value.extend_from_slice(VALUE_MAGIC);
    value.extend_from_slice(&u32::try_from(ki).expect("key index fits u32").to_le_bytes());
    value.extend_from_slice(&round.to_le_bytes());
    value.extend_from_slice(
        &u32::try_from(key.len())
            .expect("key fits u32")
            .to_le_bytes(),
    );
    value.extend_from_slice(key.as_bytes());
    let start = value.len();
    value.resize(start + len, 0);
    rng.fill(&mut value[start..]);
    value
}

/// The round encoded in a value read back, if its header is well formed.
fn round_of(value: &[u8]) -> Option<u64> {
    if value.len() < 16 || &value[..4] != VALUE_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(value[8..16].try_into().ok()?))
}

#[test]
#[ignore = "helper: run only as a child process by kill9_at_random_moments_leaves_old_or_new_values"]
fn child_writer() {
    let Some(dir) = common::child_dir(DIR_ENV, "child_writer") else {
        return;
    };
    let start: u64 = common::env_number(START_ENV);
    let store = FileStore::new(&dir).expect("child_writer: open the store");
    let keys = keys();
    let stdout = std::io::stdout();
    for round in start.. {
        for (ki, key) in keys.iter().enumerate() {
            let value = make_value(ki, key, round);
            wait(store.write(key, value.clone()))
                .unwrap_or_else(|e| panic!("child_writer: write {key:?} round {round}: {e}"));
            let mut out = stdout.lock();
            writeln!(out, "{ACK}{ki} {round}").expect("child_writer: print ack");
            out.flush().expect("child_writer: flush ack");
        }
    }
}

/// Kills (SIGKILL) and reaps the child if the parent panics before killing it itself.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which write the child performs after `last` (the last acknowledged `(key, round)`).
fn next_write(last: Option<(usize, u64)>, start: u64, n_keys: usize) -> (usize, u64) {
    match last {
        None => (0, start),
        Some((ki, round)) if ki + 1 < n_keys => (ki + 1, round),
        Some((_, round)) => (0, round + 1),
    }
}

#[test]
fn kill9_at_random_moments_leaves_old_or_new_values() {
    let seed: u64 = match std::env::var(SEED_ENV) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_ENV}={s:?} is not a u64: {e}")),
        Err(_) => DEFAULT_SEED,
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let exe = std::env::current_exe().expect("path of the test binary");
    let tmp = tempfile::tempdir().expect("create a temp dir");
    let root = tmp.path().join("store");
    let keys = keys();

    // The round of each key as last seen on disk (None: never written).
    let mut on_disk: Vec<Option<u64>> = vec![None; keys.len()];
    let mut start: u64 = 1;
    let mut in_flight_landed = 0usize;
    let mut temp_files_seen = 0usize;
    let began = std::time::Instant::now();

    for iteration in 0..ITERATIONS {
        let ctx = format!("seed {seed} (set {SEED_ENV} to replay), iteration {iteration}");
        let target_acks = rng.usize(1..=MAX_ACKS);
        let spin = rng.usize(0..200_000);

        let mut child = KillOnDrop(
            common::child_test("child_writer")
                .env(DIR_ENV, &root)
                .env(START_ENV, start.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{ctx}: spawn the child {exe:?}: {e}")),
        );
        let child = &mut child.0;
        let stdout = child.stdout.take().expect("child stdout is piped");

        let mut acked: Vec<Option<u64>> = on_disk.clone();
        let mut last: Option<(usize, u64)> = None;
        let mut acks = 0usize;
        let mut lines = BufReader::new(stdout).lines();
        // Every `ack` line the child printed, in order; `false` once stdout has ended.
        let mut read_ack = |acked: &mut Vec<Option<u64>>, last: &mut Option<(usize, u64)>| {
            for line in lines.by_ref() {
                let line = line.unwrap_or_else(|e| panic!("{ctx}: read the child's stdout: {e}"));
                // libtest prints `test child_writer ... ` without a newline before the test
                // body runs, so the first ack shares its line; anything else is libtest's.
                let Some((_, rest)) = line.split_once(ACK) else {
                    continue;
                };
                let mut parts = rest.split(' ');
                let parsed = (|| {
                    let ki: usize = parts.next()?.parse().ok()?;
                    let round: u64 = parts.next()?.parse().ok()?;
                    Some((ki, round))
                })();
                let (ki, round) = parsed.unwrap_or_else(|| panic!("{ctx}: bad ack line {line:?}"));
                let expected = next_write(*last, start, keys.len());
                assert_eq!(
                    (ki, round),
                    expected,
                    "{ctx}: the child acknowledged writes out of order"
                );
                acked[ki] = Some(round);
                *last = Some((ki, round));
                return true;
            }
            false
        };
        while acks < target_acks && read_ack(&mut acked, &mut last) {
            acks += 1;
        }
        let early_exit = acks < target_acks;
        // A random extra delay (busy, not a sleep) so the kill lands anywhere in a write.
        for _ in 0..spin {
            std::hint::spin_loop();
        }
        child
            .kill()
            .unwrap_or_else(|e| panic!("{ctx}: SIGKILL the child: {e}"));
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("{ctx}: wait for the child: {e}"));
        // The child kept writing while we stopped reading: its later acks are still in the
        // pipe, and they too are promises the store must keep.
        while read_ack(&mut acked, &mut last) {}
        if early_exit {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!(
                "{ctx}: the child exited ({status}) after {acks} of {target_acks} acks; \
                 its stderr:\n{err}"
            );
        }

        // The write that was in flight when the child died, if any.
        let (flight_ki, flight_round) = next_write(last, start, keys.len());

        // Temp files present now: a kill between creating and renaming one (or a leftover
        // from an earlier kill whose key has not been written since).
        temp_files_seen += count_named(&root, "value.tmp");

        let store = FileStore::new(&root)
            .unwrap_or_else(|e| panic!("{ctx}: reopen the store after the kill: {e}"));
        let mut max_round = start;
        for (ki, key) in keys.iter().enumerate() {
            let short: String = key.chars().take(16).collect();
            let got = match wait(store.read(key)) {
                Ok(v) => v,
                Err(e @ DuraflowError::Corrupt { .. }) => {
                    panic!("{ctx}: key {ki} ({short:?}) is torn/corrupt after SIGKILL: {e}")
                }
                Err(e) => panic!("{ctx}: key {ki} ({short:?}) failed to read: {e}"),
            };
            let mut allowed: BTreeSet<Option<u64>> = BTreeSet::from([acked[ki]]);
            if ki == flight_ki {
                allowed.insert(Some(flight_round));
            }
            let round = match &got {
                None => None,
                Some(value) => {
                    let round = round_of(value).unwrap_or_else(|| {
                        panic!(
                            "{ctx}: key {ki} ({short:?}) holds {} bytes that are not a value \
                             the child writes",
                            value.len()
                        )
                    });
                    let expected = make_value(ki, key, round);
                    assert!(
                        *value == expected,
                        "{ctx}: key {ki} ({short:?}) holds a torn value claiming round {round}: \
                         {} bytes, expected {} bytes, first difference at byte {:?}",
                        value.len(),
                        expected.len(),
                        value.iter().zip(&expected).position(|(a, b)| a != b)
                    );
                    Some(round)
                }
            };
            assert!(
                allowed.contains(&round),
                "{ctx}: key {ki} ({short:?}) holds round {round:?}; allowed {allowed:?} \
                 (last acked {:?}, in flight: key {flight_ki} round {flight_round})",
                acked[ki]
            );
            if ki == flight_ki && round == Some(flight_round) && acked[ki] != round {
                in_flight_landed += 1;
            }
            on_disk[ki] = round;
            max_round = max_round.max(round.unwrap_or(0));
        }
        // Every key present reads back and is listed; nothing else is.
        let mut listed = wait(store.keys()).unwrap_or_else(|e| panic!("{ctx}: list keys: {e}"));
        listed.sort();
        let mut present: Vec<String> = keys
            .iter()
            .zip(&on_disk)
            .filter(|(_, r)| r.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        present.sort();
        assert_eq!(listed, present, "{ctx}: keys() disagrees with read()");
        drop(store); // release the lock before the next child opens the store

        // The next child writes only rounds newer than anything on disk.
        start = max_round + 1;
    }

    check_layout(tmp.path(), &root, &keys, seed);
    eprintln!(
        "kill -9 test: {ITERATIONS} kills, {} keys, seed {seed}, {in_flight_landed} in-flight \
         writes landed unacknowledged, {temp_files_seen} temp files seen after kills, {:?}",
        keys.len(),
        began.elapsed()
    );
}

/// How many files named `name` are under `dir`.
fn count_named(dir: &Path, name: &str) -> usize {
    let mut entries = Vec::new();
    walk(dir, &mut entries);
    entries
        .iter()
        .filter(|(p, is_dir)| !is_dir && p.file_name().is_some_and(|n| n == name))
        .count()
}

/// Every entry under `dir`, recursively, with whether it is a directory.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, bool)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read directory {dir:?}: {e}"));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("read an entry of {dir:?}: {e}"));
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .unwrap_or_else(|e| panic!("file type of {path:?}: {e}"))
            .is_dir();
        out.push((path.clone(), is_dir));
        if is_dir {
            walk(&path, out);
        }
    }
}

/// Nothing was written outside the store root, and inside it only `.lock` and the
/// directories of our keys (each holding `value` and maybe a leftover `value.tmp`) exist.
fn check_layout(tmp: &Path, root: &Path, keys: &[String], seed: u64) {
    let store = FileStore::new(root).expect("reopen the store for the layout check");
    let canon_root = store.root().to_owned();
    let key_dirs: BTreeMap<PathBuf, &str> = keys
        .iter()
        .map(|k| {
            let value = store.value_path(k).expect("value path of a valid key");
            let dir = value
                .parent()
                .expect("value file has a directory")
                .to_owned();
            (dir, k.as_str())
        })
        .collect();
    assert_eq!(
        key_dirs.len(),
        keys.len(),
        "seed {seed}: two keys share a directory"
    );
    drop(store);

    let canon_tmp = std::fs::canonicalize(tmp).expect("canonicalize the temp dir");
    let mut entries = Vec::new();
    walk(&canon_tmp, &mut entries);
    let mut seen_dirs = BTreeSet::new();
    for (path, is_dir) in entries {
        if path == canon_root {
            continue;
        }
        assert!(
            path.starts_with(&canon_root),
            "seed {seed}: {path:?} was written outside the store root {canon_root:?}"
        );
        if is_dir {
            assert!(
                key_dirs.contains_key(&path),
                "seed {seed}: unexpected directory {path:?} in the store root"
            );
            seen_dirs.insert(path);
            continue;
        }
        // The lock file and the format manifest (and its temp file, if killed while the
        // store was opening).
        let own = [".lock", ".duraflow-format", ".duraflow-format.tmp"];
        if own.iter().any(|name| path == canon_root.join(name)) {
            continue;
        }
        let parent = path.parent().expect("a file in the store has a parent");
        let name = path.file_name().expect("a file has a name");
        assert!(
            key_dirs.contains_key(parent) && (name == "value" || name == "value.tmp"),
            "seed {seed}: unexpected file {path:?} in the store root"
        );
    }
    assert_eq!(
        seen_dirs.len(),
        keys.len(),
        "seed {seed}: every key was written, so every key has its directory"
    );
}
