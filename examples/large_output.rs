//! One large output through a store: the child program `tests/large_output.rs` and
//! `benches/large_output.rs` run, one process per measurement (peak RSS is per process).
//!
//! A two-task DAG: `produce` returns a `Vec<f64>` of `--mib` MiB (`--mib 256`: 32 Mi values,
//! value `i` being `i * 0.5`), and `consume`, which depends on it, returns a summary of what it
//! was handed: `(length, sum, checksum of the bits)`. Prints one line of JSON on stdout
//! (keys in alphabetical order), such as:
//!
//! ```text
//! {"cached":0,"close_secs":0.0067,"consume":[33554432,281474968322048.0,15240334806175851301],
//!  "executed":2,"failed":0,"mib":256,"peak_rss_kib":562556,"reread":false,"secs":1.18,"store":"sled"}
//! ```
//!
//! - `--store sled` / `--store file`: the DAG through `DurableDag` over `SledStore::open(DIR)`
//!   / `FileStore::new(DIR)`. `executed` and `cached` are `DurableDag::stats()` after the run;
//!   `secs` is opening the store, building the DAG and running it (`dag.run` returns once
//!   both outputs are durable); `close_secs` is dropping the DAG and the store afterwards.
//!   Run it again on the same DIR and both tasks are cached (`produce`'s output is still read
//!   and decoded: a cached task hands its stored value to dagx). With `--reread`, `consume` is
//!   added under an id no earlier run used (`consume-PID-NANOS`), so it executes on what the
//!   store handed back for `produce`: its summary is computed from the value read back.
//! - `--store raw`: the same two tasks on a plain `dagx::DagRunner`, no duraflow (the peak
//!   RSS baseline). `executed` is 2: both tasks ran.
//! - `--store rmp`: no DAG. Makes the same `Vec`, then times `rmp_serde::encode::write_named`
//!   into a `BufWriter<File>` (in DIR) and `sync_all`, then `rmp_serde::from_read` back from
//!   a `BufReader<File>` (the time baseline). `secs` is that write and read; `write_secs`,
//!   `read_secs` and `make_secs` (making the `Vec`, not in `secs`) are printed beside it, and
//!   `consume` is the summary of the value read back.
//!
//! `peak_rss_kib` is `VmHWM` from `/proc/self/status` at the end of the process.
//!
//! ```sh
//! cargo run --release --example large_output -- --store sled --dir /tmp/lo.db
//! cargo run --release --example large_output -- --store sled --dir /tmp/lo.db --reread
//! cargo run --release --example large_output -- --store raw --mib 64
//! ```
//!
//! The DAG runs on a multi-thread tokio runtime with 2 worker threads, as in the benchmarks.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, FileStore, RunStats, SledStore};

// The benchmarks' runtime and spawning run.
#[allow(dead_code)]
#[path = "../benches/support/mod.rs"]
mod support;

type Error = Box<dyn std::error::Error>;

/// What `consume` returns: the length, the sum and a checksum of the values it was handed.
type Summary = (u64, f64, u64);

/// Value `i` of the large output.
fn value(i: usize) -> f64 {
    i as f64 * 0.5
}

/// The summary of `values`, in order: the length, the sum and an FNV-1a-style fold of each
/// value's bits (which sees a value moved, changed or lost). `tests/large_output.rs` computes
/// the expected one with the same formula.
fn summarize(values: impl Iterator<Item = f64>) -> Summary {
    values.fold((0, 0.0, 0xcbf2_9ce4_8422_2325), |(n, sum, h), x| {
        (
            n + 1,
            sum + x,
            (h ^ x.to_bits()).wrapping_mul(0x100_0000_01b3),
        )
    })
}

/// Makes the large output: `len` values.
struct Produce {
    len: usize,
}

#[task]
impl Produce {
    async fn run(&self) -> Vec<f64> {
        (0..self.len).map(value).collect()
    }
}

/// Summarizes the large output it depends on.
struct Consume;

#[task]
impl Consume {
    // `#[task]` takes the input type from the parameter, so it must be `&Vec<f64>`.
    #[allow(clippy::ptr_arg)]
    async fn run(&self, values: &Vec<f64>) -> Summary {
        summarize(values.iter().copied())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Sled,
    File,
    Raw,
    Rmp,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Sled => "sled",
            Store::File => "file",
            Store::Raw => "raw",
            Store::Rmp => "rmp",
        }
    }
}

struct Args {
    store: Store,
    dir: Option<PathBuf>,
    mib: usize,
    reread: bool,
}

const USAGE: &str = "\
usage: large_output --store sled|file|raw|rmp [--dir PATH] [--mib N] [--reread]
  --store   sled, file: the DAG over a SledStore / FileStore at --dir
            raw: the DAG on plain dagx; rmp: rmp-serde into a file in --dir and back
  --dir     the store's location (sled, file) or the file's directory (rmp)
  --mib     the size of the output in MiB (default 256)
  --reread  (sled, file) add `consume` under a new id, so it runs on the stored output";

fn parse_args() -> Result<Args, String> {
    let mut store = None;
    let mut dir = None;
    let mut mib = 256;
    let mut reread = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--store" => {
                store = Some(match value("--store")?.as_str() {
                    "sled" => Store::Sled,
                    "file" => Store::File,
                    "raw" => Store::Raw,
                    "rmp" => Store::Rmp,
                    other => return Err(format!("unknown store {other:?}")),
                })
            }
            "--dir" => dir = Some(PathBuf::from(value("--dir")?)),
            "--mib" => {
                let text = value("--mib")?;
                mib = text
                    .parse()
                    .map_err(|_| format!("--mib: not a number: {text:?}"))?;
            }
            "--reread" => reread = true,
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let store = store.ok_or("--store is required")?;
    if store != Store::Raw && dir.is_none() {
        return Err(format!("--store {} needs --dir", store.name()));
    }
    if reread && !matches!(store, Store::Sled | Store::File) {
        return Err("--reread is for --store sled or file".to_owned());
    }
    Ok(Args {
        store,
        dir,
        mib,
        reread,
    })
}

/// An id for `consume` that no earlier run used.
fn fresh_consume_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("consume-{}-{nanos}", std::process::id())
}

/// How a DAG run went.
struct Ran {
    /// `DurableDag::stats()` after the run (raw dagx: both tasks executed).
    stats: (usize, usize, usize),
    summary: Summary,
    secs: f64,
    close_secs: f64,
}

/// The DAG through `DurableDag` over the store at `dir`.
fn durable(args: &Args, dir: &Path, len: usize) -> Result<Ran, Error> {
    let rt = support::runtime();
    let start = Instant::now();
    let ctx = Arc::new(match args.store {
        Store::Sled => Context::new(SledStore::open(dir)?),
        Store::File => Context::new(FileStore::new(dir)?),
        Store::Raw | Store::Rmp => unreachable!("not a store"),
    });
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx);
    let produce = d.add("produce", Produce { len });
    let consume_id = match args.reread {
        true => fresh_consume_id(),
        false => "consume".to_owned(),
    };
    let consume = d.add(&consume_id, Consume).depends_on(&produce);
    rt.block_on(support::run_spawned(&dag, "large_output"));
    let RunStats {
        executed,
        cached,
        failed,
        ..
    } = d.stats();
    let stats = (executed, cached, failed);
    let summary = dag.get(consume)?;
    let secs = start.elapsed().as_secs_f64();
    let close = Instant::now();
    drop(d); // the last handle to the context: this drops the store
    drop(dag);
    Ok(Ran {
        stats,
        summary,
        secs,
        close_secs: close.elapsed().as_secs_f64(),
    })
}

/// The same DAG on plain dagx.
fn raw(len: usize) -> Result<Ran, Error> {
    let rt = support::runtime();
    let start = Instant::now();
    let dag = DagRunner::new();
    let produce = dag.add_task(Produce { len });
    let consume = dag.add_task(Consume).depends_on(&produce);
    rt.block_on(support::run_spawned(&dag, "raw dagx"));
    let summary = dag.get(consume)?;
    let secs = start.elapsed().as_secs_f64();
    let close = Instant::now();
    drop(dag);
    Ok(Ran {
        stats: (2, 0, 0),
        summary,
        secs,
        close_secs: close.elapsed().as_secs_f64(),
    })
}

/// rmp-serde straight into a file, fsynced, and back.
fn rmp(dir: &Path, len: usize) -> Result<serde_json::Value, Error> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("large_output.rmp");
    let made = Instant::now();
    let values: Vec<f64> = (0..len).map(value).collect();
    let make_secs = made.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut writer = BufWriter::new(File::create(&path)?);
    rmp_serde::encode::write_named(&mut writer, &values)?;
    writer
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    let write_secs = start.elapsed().as_secs_f64();
    let read = Instant::now();
    let back: Vec<f64> = rmp_serde::from_read(BufReader::new(File::open(&path)?))?;
    let read_secs = read.elapsed().as_secs_f64();
    let secs = start.elapsed().as_secs_f64();

    let bytes = std::fs::metadata(&path)?.len();
    drop(values);
    Ok(serde_json::json!({
        "store": "rmp",
        "consume": summarize(back.into_iter()),
        "secs": secs,
        "write_secs": write_secs,
        "read_secs": read_secs,
        "make_secs": make_secs,
        "bytes": bytes,
    }))
}

fn main() -> Result<(), Error> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("large_output: {message}");
            }
            eprintln!("{USAGE}");
            std::process::exit(if message.is_empty() { 0 } else { 2 });
        }
    };
    let len = args.mib * 1024 * 1024 / std::mem::size_of::<f64>();
    let dir = args.dir.as_deref();
    let ran = match (args.store, dir) {
        (Store::Raw, _) => raw(len)?,
        (Store::Sled | Store::File, Some(dir)) => durable(&args, dir, len)?,
        (Store::Rmp, Some(dir)) => {
            let mut line = rmp(dir, len)?;
            line["mib"] = args.mib.into();
            line["peak_rss_kib"] = support::status_kib("VmHWM").into();
            println!("{line}");
            return Ok(());
        }
        (_, None) => unreachable!("parse_args requires --dir"),
    };
    let mut line = serde_json::json!({
        "store": args.store.name(),
        "mib": args.mib,
        "reread": args.reread,
        "executed": ran.stats.0,
        "cached": ran.stats.1,
        "failed": ran.stats.2,
        "consume": ran.summary,
        "secs": ran.secs,
        "close_secs": ran.close_secs,
    });
    line["peak_rss_kib"] = support::status_kib("VmHWM").into();
    println!("{line}");
    Ok(())
}
