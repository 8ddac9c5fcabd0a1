//! Promise: a 256 MiB output (a `Vec<f64>` of 32 Mi values) goes through a SledStore and a
//! FileStore whole: a fresh run executes both tasks and its dependent sums exactly the values
//! produced; a second process reopening the store finds the output cached, and a dependent
//! that runs on what the store hands back (`--reread`) sums exactly the same values.
//!
//! Each run is a process of its own: `examples/large_output.rs`, built here in release, as
//! `benches/large_output.rs` runs it (unoptimized, a run takes several times as long). Its
//! JSON lines go to stderr, so the figures (time, peak RSS) are in the test's log; nothing
//! here asserts on them: the benchmark holds the guards.

#[allow(dead_code)]
#[path = "../benches/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The size of the output.
const MIB: usize = 256;

/// What the child's `consume` returns: the length, the sum and a checksum of its input.
type Summary = (u64, f64, u64);

/// The summary `examples/large_output.rs` computes (the same formula): `consume` of the
/// values `i * 0.5` for `i` in `0..len`.
fn expected(len: usize) -> Summary {
    (0..len)
        .map(|i| i as f64 * 0.5)
        .fold((0, 0.0, 0xcbf2_9ce4_8422_2325), |(n, sum, h), x| {
            (
                n + 1,
                sum + x,
                (h ^ x.to_bits()).wrapping_mul(0x100_0000_01b3),
            )
        })
}

/// The example program, built in release once per test binary.
fn example() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| support::release_example("large_output"))
}

/// Runs the example with `args`; returns the JSON line it printed (after printing it to
/// stderr).
fn run(args: &[&str]) -> serde_json::Value {
    let output = Command::new(example())
        .args(args)
        .output()
        .expect("spawn the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "large_output {args:?}: {}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let line = stdout.lines().last().expect("a line of JSON");
    eprintln!("large_output {}: {line}", args.join(" "));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// `executed`, `cached` and `consume` of a child's line.
fn outcome(line: &serde_json::Value) -> (u64, u64, Summary) {
    let count = |field: &str| line[field].as_u64().expect(field);
    let summary = serde_json::from_value(line["consume"].clone()).expect("consume: a summary");
    (count("executed"), count("cached"), summary)
}

/// A fresh run on `store`, then a run in a new process on the reopened store.
fn stored_and_read_back(store: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let dir = dir.to_str().unwrap();
    let mib = MIB.to_string();
    let want = expected(MIB * 1024 * 1024 / 8);

    let fresh = run(&["--store", store, "--dir", dir, "--mib", &mib]);
    assert_eq!(outcome(&fresh), (2, 0, want), "{store}: fresh run");

    // `produce` is cached; `consume`, under a new id, runs on the output read back.
    let again = run(&["--store", store, "--dir", dir, "--mib", &mib, "--reread"]);
    let (executed, cached, summary) = outcome(&again);
    assert!(cached >= 1, "{store}: produce not cached: {again}");
    assert_eq!(
        (executed, cached),
        (1, 1),
        "{store}: only the new consume runs"
    );
    assert_eq!(summary, want, "{store}: the output read back");
}

#[test]
fn sled_large_output_is_stored_and_read_back() {
    stored_and_read_back("sled");
}

#[test]
fn file_large_output_is_stored_and_read_back() {
    stored_and_read_back("file");
}
