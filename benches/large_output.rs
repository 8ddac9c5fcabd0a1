//! What one large output costs: a 256 MiB `Vec<f64>` made by one task and summed by a
//! second, through `SledStore` and `FileStore`, against the same bytes through rmp-serde
//! alone (time) and the same DAG on raw dagx (memory).
//!
//! Every measurement is a process of its own, `examples/large_output.rs` (built here with
//! `cargo build --release --example large_output`), since peak RSS is per process:
//!
//! - `rmp`: rmp-serde's `write_named` into a `BufWriter<File>`, `sync_all`, and `from_read`
//!   back from a `BufReader<File>`: the time baseline. Timed: the write, the sync and the
//!   read (not making the `Vec`).
//! - `raw dagx`: the two tasks on a plain `DagRunner`: the peak RSS baseline.
//! - `sled fresh`, `file fresh`: the DAG through `DurableDag` over a new store (both tasks
//!   execute; the output is encoded, written and synced). Timed: opening the store, building
//!   and running the DAG, until `dag.run` returns.
//! - `sled cached`, `file cached`: a new process on the same store with `--reread`: `produce`
//!   is cached (its output read from the store and decoded), `consume` runs on it. Timed as
//!   the fresh runs.
//!
//! A round runs every variant once (the store's fresh run, then its cached one), each round
//! in another order; every figure is the median over the rounds ([`ROUNDS`] by default),
//! and each ratio is the ratio of two medians.
//!
//! Guards: each durable run's time <= 1.5 x `rmp` (a fresh run writes and does not read
//! back, a cached run reads and does not write), and each durable run's peak RSS <= 1.15 x
//! `raw dagx`'s. Reported, unguarded: a store's two runs together against `rmp`, and each
//! run against rmp's write or read alone; a durable run also runs the DAG (dagx copies the
//! output for `consume`), and a fresh one makes the `Vec`, which `rmp`'s time leaves out.
//!
//! ```sh
//! cargo bench --bench large_output
//! DURAFLOW_LARGE_MIB=64 DURAFLOW_LARGE_ROUNDS=5 cargo bench --bench large_output
//! ```
//!
//! Run without `--bench` (`cargo test --benches`), it runs one round of 8 MiB and prints
//! no verdicts: a smoke test.

#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Rounds by default (`DURAFLOW_LARGE_ROUNDS`).
const ROUNDS: usize = 3;
/// The output's size in MiB by default (`DURAFLOW_LARGE_MIB`).
const MIB: usize = 256;
/// The output's size in a smoke test.
const MIB_SMOKE: usize = 8;
/// Durable time / the rmp-serde write and read.
const TIME_TARGET: f64 = 1.5;
/// Durable peak RSS / raw dagx's.
const RSS_TARGET: f64 = 1.15;

/// The variants, in the order of the table, and the rounds' groups: a store's cached run
/// follows its fresh one.
const VARIANTS: [&str; 6] = [
    "rmp",
    "raw dagx",
    "sled fresh",
    "sled cached",
    "file fresh",
    "file cached",
];
const GROUPS: [&[usize]; 4] = [&[0], &[1], &[2, 3], &[4, 5]];

/// The example program, built in release.
fn example() -> PathBuf {
    support::release_example("large_output")
}

fn env_or(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{var}: not a number: {text:?}")),
        Err(_) => default,
    }
}

/// One measurement: the example's JSON line.
struct Measured {
    secs: f64,
    rss_kib: f64,
    line: serde_json::Value,
}

/// Runs variant `v` in `dir` (the round's own directory).
fn measure(exe: &Path, v: usize, dir: &Path, mib: usize) -> Measured {
    let at = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mib = mib.to_string();
    let mut args: Vec<String> = match VARIANTS[v] {
        "rmp" => vec!["--store".into(), "rmp".into(), "--dir".into(), at("rmp")],
        "raw dagx" => vec!["--store".into(), "raw".into()],
        name => {
            let (store, phase) = name.split_once(' ').expect("store and phase");
            let mut args = vec!["--store".into(), store.into(), "--dir".into(), at(store)];
            if phase == "cached" {
                args.push("--reread".into());
            }
            args
        }
    };
    args.extend(["--mib".into(), mib]);
    let output = Command::new(exe)
        .args(&args)
        .output()
        .expect("spawn the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "large_output {args:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = stdout.lines().last().expect("a line of JSON");
    let line: serde_json::Value = serde_json::from_str(text).expect("JSON");
    let number = |field: &str| line[field].as_f64().unwrap_or(f64::NAN);
    Measured {
        secs: number("secs"),
        rss_kib: number("peak_rss_kib"),
        line,
    }
}

/// Checks that a run did what its variant says, so no figure comes from a broken run.
fn check(v: usize, m: &Measured, want: &serde_json::Value) {
    let name = VARIANTS[v];
    assert_eq!(&m.line["consume"], want, "{name}: consume's summary");
    let counts = (m.line["executed"].as_u64(), m.line["cached"].as_u64());
    match name {
        "sled fresh" | "file fresh" => assert_eq!(counts, (Some(2), Some(0)), "{name}"),
        "sled cached" | "file cached" => assert_eq!(counts, (Some(1), Some(1)), "{name}"),
        _ => {}
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let smoke = support::smoke_test();
    let mib = env_or("DURAFLOW_LARGE_MIB", if smoke { MIB_SMOKE } else { MIB });
    let rounds = env_or("DURAFLOW_LARGE_ROUNDS", if smoke { 1 } else { ROUNDS }).max(1);
    let exe = example();
    println!(
        "large output: a {mib} MiB Vec<f64>, {rounds} round(s), each variant in a process of its own"
    );

    let mut secs = vec![Vec::new(); VARIANTS.len()];
    let mut rss = vec![Vec::new(); VARIANTS.len()];
    let mut rmp_write = Vec::new();
    let mut rmp_read = Vec::new();
    let mut want = None;
    for round in 0..rounds {
        let tmp = support::temp_dir("duraflow-large-output-");
        for g in 0..GROUPS.len() {
            for &v in GROUPS[(g + round) % GROUPS.len()] {
                let m = measure(&exe, v, tmp.path(), mib);
                println!("  round {}: {:<12} {}", round + 1, VARIANTS[v], m.line);
                check(v, &m, want.get_or_insert_with(|| m.line["consume"].clone()));
                if VARIANTS[v] == "rmp" {
                    rmp_write.push(m.line["write_secs"].as_f64().unwrap_or(f64::NAN));
                    rmp_read.push(m.line["read_secs"].as_f64().unwrap_or(f64::NAN));
                }
                secs[v].push(m.secs);
                rss[v].push(m.rss_kib);
            }
        }
    }

    let secs: Vec<f64> = secs.iter_mut().map(|s| median(s)).collect();
    let rss: Vec<f64> = rss.iter_mut().map(|r| median(r)).collect();
    let (rmp_write, rmp_read) = (median(&mut rmp_write), median(&mut rmp_read));
    let target = |t: f64| if smoke { None } else { Some(t) };

    println!("\n== medians of {rounds} round(s), {mib} MiB ==");
    println!("{:<14} {:>10} {:>14}", "variant", "secs", "peak RSS");
    for (v, name) in VARIANTS.iter().enumerate() {
        println!(
            "{name:<14} {:>8.3} s {:>10.1} MiB",
            secs[v],
            rss[v] / 1024.0
        );
    }
    println!("(rmp: write + fsync {rmp_write:.3} s, read {rmp_read:.3} s)");

    println!("\n== time / rmp-serde into a file, fsync and back ==");
    for v in 2..VARIANTS.len() {
        let ratio = secs[v] / secs[0];
        let verdict = support::verdict(ratio, target(TIME_TARGET));
        let label = format!("{} / rmp", VARIANTS[v]);
        println!("{label:<32} {ratio:>7.2}x  {verdict}");
    }
    // Both runs of a store: its write and its read in a new process, each with a DAG run.
    for (store, fresh) in [("sled", 2), ("file", 4)] {
        let ratio = (secs[fresh] + secs[fresh + 1]) / secs[0];
        let label = format!("{store} fresh + cached / rmp");
        println!("{label:<32} {ratio:>7.2}x  (reported)");
    }
    for v in 2..VARIANTS.len() {
        let (side, base) = match VARIANTS[v].ends_with("fresh") {
            true => ("write + fsync", rmp_write),
            false => ("read", rmp_read),
        };
        let label = format!("{} / rmp {side}", VARIANTS[v]);
        println!("{label:<32} {:>7.2}x  (reported)", secs[v] / base);
    }

    println!("\n== peak RSS / raw dagx ==");
    for v in 2..VARIANTS.len() {
        let ratio = rss[v] / rss[1];
        let verdict = support::verdict(ratio, target(RSS_TARGET));
        let label = format!("{} / raw dagx", VARIANTS[v]);
        println!("{label:<32} {ratio:>7.2}x  {verdict}");
    }
}
