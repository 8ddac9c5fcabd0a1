//! Promise: a SledStore writing outputs kept in files of their own (over the blob threshold)
//! survives SIGKILL at any moment: after each of 24 or more kills, every output reads as the value
//! last acknowledged or the one being written, whole, never damaged and never a reference
//! to a missing file; and gc then leaves exactly the files the outputs refer to.
//!
//! A child process (this test binary, re-run with `--ignored --exact large_writer`)
//! overwrites a few large outputs in turn, whole or streamed in pieces, reporting each
//! acknowledged write, until it is killed at a random moment.

mod common;

use std::time::Duration;

use common::{wait, MARKER};

use duraflow_rs::{DuraflowError, Encoder, RunHistory, SledStore, Storage, Value};

const DIR_ENV: &str = "DURAFLOW_LARGE_CRASH_DIR";
const CHILD_TEST: &str = "large_writer";
const KEYS: usize = 3;
const KILLS: usize = 24;
const MAX_KILLS: usize = 120;

/// Version `version` of output `key`: 300 KiB that differ from every other version.
fn value(key: usize, version: u64) -> Vec<u8> {
    let mut x = (key as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version;
    (0..300 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The version whose bytes `found` are, among those `key` may hold.
fn version_of(key: usize, found: &[u8], candidates: &[u64]) -> Option<u64> {
    candidates.iter().copied().find(|&v| value(key, v) == found)
}

#[test]
#[ignore = "helper: run only as a child process, to be killed, by the test below"]
fn large_writer() {
    let Some(dir) = common::child_dir(DIR_ENV, CHILD_TEST) else {
        return;
    };
    let store = SledStore::open(&dir).expect("child: open");
    let start: u64 = common::env_number("DURAFLOW_LARGE_CRASH_FROM");
    for version in start.. {
        for key in 0..KEYS {
            let bytes = value(key, version);
            println!("{MARKER}writing {key} {version}");
            let name = format!("k{key}");
            // Every other version is a stream written in pieces, as a task's output is.
            if version % 2 == 0 {
                wait(store.write(&name, bytes)).expect("child: write");
            } else {
                let of = name.clone();
                let stream = Encoder::new(move |out| {
                    for piece in bytes.chunks(4096) {
                        out.write_all(piece).map_err(|e| DuraflowError::Persist {
                            key: of.clone(),
                            source: Box::new(e),
                        })?;
                    }
                    Ok(())
                });
                wait(store.write_value(&name, Value::Stream(stream))).expect("child: write");
            }
            println!("{MARKER}wrote {key} {version}");
        }
    }
}

#[test]
fn large_outputs_survive_sigkill_at_any_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    let mut rng = fastrand::Rng::with_seed(0x1a59_e0b1_0b5c_0de5);
    // The version each key last acknowledged (0: none yet).
    let mut acked = [0u64; KEYS];
    let mut next = 1;
    // Kills that landed inside a write: seen as a version durable but not reported.
    let mut in_flight = 0;
    let temps = || {
        std::fs::read_dir(path.join("outputs"))
            .map(|entries| {
                let temp =
                    |e: &std::fs::DirEntry| e.file_name().to_string_lossy().starts_with(".tmp-");
                entries.filter(|e| e.as_ref().is_ok_and(temp)).count()
            })
            .unwrap_or(0)
    };
    // At least KILLS kills, and on until one landed inside a write (up to MAX_KILLS).
    let mut round = 0;
    let mut left_temps = 0;
    while round < KILLS || (left_temps + in_flight == 0 && round < MAX_KILLS) {
        round += 1;
        let mut writer = common::child_test(CHILD_TEST);
        writer
            .env(DIR_ENV, &path)
            .env("DURAFLOW_LARGE_CRASH_FROM", next.to_string());
        let (mut child, mut reports) = common::spawn_reporting(writer);
        // A kill at a random moment of a write: a few milliseconds into one, at most.
        let nth = rng.usize(1..=2 * KEYS);
        let mut seen = Vec::new();
        for report in reports.by_ref() {
            let writing = report.starts_with("writing ");
            seen.push(report);
            if writing && seen.iter().filter(|r| r.starts_with("writing ")).count() == nth {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.u64(0..6000)));
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        // A kill while an output's file was being written leaves its temporary file (the
        // next open removes it).
        left_temps += temps();
        for report in seen.into_iter().chain(reports) {
            let Some(wrote) = report.strip_prefix("wrote ") else {
                continue;
            };
            let mut parts = wrote.split(' ');
            let key: usize = parts.next().unwrap().parse().unwrap();
            let version: u64 = parts.next().unwrap().parse().unwrap();
            acked[key] = acked[key].max(version);
        }
        // A write in flight is at most one version past the newest acknowledged one.
        let top = acked.iter().max().copied().unwrap_or(0) + 1;
        let store = SledStore::open(&path).unwrap();
        for (key, &last) in acked.clone().iter().enumerate() {
            let found = wait(store.read(&format!("k{key}")))
                .unwrap_or_else(|e| panic!("round {round}, k{key}: {e}"));
            let Some(found) = found else {
                assert_eq!(last, 0, "round {round}: k{key} lost version {last}");
                continue;
            };
            // The last acknowledged version, or one the child was writing when killed.
            let candidates: Vec<u64> = (last.max(1)..=top).collect();
            let version = version_of(key, &found, &candidates)
                .unwrap_or_else(|| panic!("round {round}: k{key} holds no version it was given"));
            assert!(
                version >= last,
                "round {round}: k{key} went back to {version}"
            );
            if version > last {
                in_flight += 1; // durable, but killed before it was reported
            }
            acked[key] = version;
        }
        next = acked.iter().max().copied().unwrap_or(0) + 1;
    }
    eprintln!("{round} kills: {left_temps} left a temporary file, {in_flight} a write durable but unreported");
    assert!(
        left_temps + in_flight > 0,
        "no kill landed inside a write (no temporary file left, no write durable unreported)"
    );
    // Files the kills left that no output refers to are removed; the outputs stay whole.
    let store = SledStore::open(&path).unwrap();
    wait(store.gc(usize::MAX)).unwrap();
    let files = std::fs::read_dir(path.join("outputs")).unwrap().count();
    assert_eq!(files, KEYS, "one file per output after gc");
    assert_eq!(temps(), 0);
    for (key, &version) in acked.iter().enumerate() {
        let found = wait(store.read(&format!("k{key}"))).unwrap();
        assert!(found == Some(value(key, version)), "k{key} after gc");
    }
}
