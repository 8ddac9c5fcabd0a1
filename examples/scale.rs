//! `SledStore` at scale: a wide DAG of 100,000 independent trivial tasks.
//!
//! 1. runs it over a fresh `SledStore` (every task executes and is committed) and prints the
//!    wall time;
//! 2. drops the store (its `Drop` applies what is queued, flushes and joins the writer
//!    thread), reopens it and prints the time the reopen took;
//! 3. runs the DAG again over the reopened store (every task is cached) and prints that time;
//! 4. prints the process's peak resident set size (`VmHWM` in `/proc/self/status`): the
//!    peak over the whole process, both runs included.
//!
//! For each run it also prints when the last task was reported done and how much later the
//! run returned: `dag.run` returns once the run's final record is flushed, which the store's
//! writer thread does after every record queued before it, so that gap is the time the
//! writer took to catch up with the tasks. Resident memory is printed after each step.
//!
//! Guards against regressions: peak RSS <= 300 MiB, reopen <= 1 s.
//!
//! ```sh
//! cargo run --release --example scale                  # store in a temporary directory
//! cargo run --release --example scale -- DIR           # store in DIR (must not hold one)
//! cargo run --release --example scale -- DIR 20000     # another number of tasks
//! cargo run --release --example scale -- --raw         # the floor: raw dagx, no duraflow
//! cargo run --release --example scale -- --memory      # duraflow over a MemoryStore
//! ```
//!
//! `--raw` builds and runs the same DAG with dagx alone (twice, like the two runs above), and
//! `--memory` through duraflow over a `MemoryStore` (a fresh run, then a cached one): their
//! peak RSS is what the DAG itself and duraflow without sled cost, the floor under the
//! `SledStore` figure. Each mode runs in a process of its own, since the peak is per process.
//!
//! The DAG runs on a multi-thread tokio runtime with 2 worker threads, as in the benchmarks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, MemoryStore, RunStats, SledStore};

// The benchmarks' trivial task, runtime and raw-dagx run: the floors printed here are the
// same DAG the benchmarks time.
#[allow(dead_code)]
#[path = "../benches/support/mod.rs"]
mod support;

use support::Val;

/// Tasks in the wide DAG.
const N: usize = 100_000;
/// Peak RSS target, in MiB.
const RSS_TARGET_MIB: f64 = 300.0;
/// Reopen target.
const REOPEN_TARGET: Duration = Duration::from_secs(1);

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn memory(label: &str) {
    println!(
        "  memory after {label}: VmRSS {}, VmHWM (peak) {}",
        mib(support::status_kib("VmRSS")),
        mib(support::status_kib("VmHWM"))
    );
}

/// How one run went.
struct Run {
    /// Build (add every task) and run to completion.
    total: Duration,
    /// From the start until the last task was reported done (its output persisted or read).
    all_reported: Duration,
    stats: RunStats,
}

/// Builds the wide DAG of `n` tasks through a `DurableDag` over `ctx` and runs it.
///
/// `dag.run` returns only once the run's final record is flushed, which the writer thread
/// does after everything queued before it: `total - all_reported` is the time the writer
/// took to catch up with the tasks.
fn run(rt: &tokio::runtime::Runtime, ctx: &Arc<Context>, n: usize) -> Run {
    let ids: Vec<String> = (0..n).map(|i| format!("task-{i}")).collect();
    let reported = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let stats = rt.block_on(async {
        let dag = DagRunner::new();
        let last = Arc::clone(&reported);
        let d = DurableDag::new(&dag, Arc::clone(ctx)).with_progress(move |_, completed| {
            if completed == n {
                last.store(start.elapsed().as_nanos() as u64, Ordering::SeqCst);
                memory("every task was reported");
            }
        });
        for (i, id) in ids.iter().enumerate() {
            d.add(id, Val(i as u64));
        }
        support::run_spawned(&dag, "scale").await;
        d.stats()
    });
    Run {
        total: start.elapsed(),
        all_reported: Duration::from_nanos(reported.load(Ordering::SeqCst)),
        stats,
    }
}

fn print_run(label: &str, run: &Run, n: usize) {
    println!(
        "{label:<21}{:>10.3?}  ({:.2} us/task; {} executed, {} cached, {} failed)",
        run.total,
        run.total.as_secs_f64() * 1e6 / n as f64,
        run.stats.executed,
        run.stats.cached,
        run.stats.failed
    );
    println!(
        "  every task reported at {:.3?}; the run's record flushed {:.3?} later",
        run.all_reported,
        run.total.saturating_sub(run.all_reported)
    );
}

fn du(path: &std::path::Path) -> u64 {
    fn walk(path: &std::path::Path) -> u64 {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => std::fs::read_dir(path)
                .map(|entries| entries.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    walk(path)
}

/// The floors: raw dagx (`raw`), or duraflow over a `MemoryStore`.
fn floor(rt: &tokio::runtime::Runtime, raw: bool, n: usize) {
    let what = if raw {
        "raw dagx"
    } else {
        "DurableDag + MemoryStore"
    };
    println!("{what}: {n} independent trivial tasks");
    memory("start");
    if raw {
        for label in ["first run:", "second run:"] {
            let (took, dag) = support::run_raw(rt, n);
            drop(dag);
            println!("{label:<21}{took:>10.3?}");
            memory(label.trim_end_matches(':'));
        }
    } else {
        let ctx = Arc::new(Context::new(MemoryStore::new()));
        for label in ["fresh run:", "cached run:"] {
            let r = run(rt, &ctx, n);
            print_run(label, &r, n);
            memory(label.trim_end_matches(':'));
        }
    }
    println!(
        "\npeak RSS (VmHWM)     {:>10}",
        mib(support::status_kib("VmHWM"))
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    let mode = args.next_if(|a| a == "--raw" || a == "--memory");
    let rt = support::runtime();
    if mode.is_some() {
        let n = match args.next() {
            Some(n) => n.parse()?,
            None => N,
        };
        floor(&rt, mode.as_deref() == Some("--raw"), n);
        return Ok(());
    }
    let (_temp, path) = match args.next() {
        Some(dir) => (None, PathBuf::from(dir)),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("duraflow-scale-")
                .tempdir()?;
            let path = temp.path().join("store");
            (Some(temp), path)
        }
    };
    let n = match args.next() {
        Some(n) => n.parse()?,
        None => N,
    };
    println!("SledStore scale run: {n} independent trivial tasks, store at {path:?}");
    memory("start");

    let open = Instant::now();
    let store = SledStore::open(&path)?;
    println!("open (fresh):        {:>10.3?}", open.elapsed());
    let ctx = Arc::new(Context::new(store));

    let fresh = run(&rt, &ctx, n);
    print_run("fresh run:", &fresh, n);
    memory("fresh run");
    let stats = fresh.stats;
    assert_eq!(
        (stats.executed, stats.failed),
        (n, 0),
        "fresh run incomplete"
    );

    let close = Instant::now();
    drop(ctx); // the only handle: this drops the store
    println!("close (drop store):  {:>10.3?}", close.elapsed());
    println!(
        "store on disk:       {:>10.1} MiB",
        du(&path) as f64 / (1024.0 * 1024.0)
    );

    let reopen = Instant::now();
    let store = SledStore::open(&path)?;
    let reopened = reopen.elapsed();
    println!("reopen:              {reopened:>10.3?}");
    memory("reopen");
    let ctx = Arc::new(Context::new(store));

    let cached = run(&rt, &ctx, n);
    print_run("cached run:", &cached, n);
    memory("cached run");
    let stats = cached.stats;
    assert_eq!(
        (stats.cached, stats.failed),
        (n, 0),
        "cached run incomplete"
    );

    let close = Instant::now();
    drop(ctx);
    println!("close (drop store):  {:>10.3?}", close.elapsed());

    let peak = support::status_kib("VmHWM");
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    println!("\n== targets ==");
    println!(
        "peak RSS (VmHWM)     {:>10}  target <= {RSS_TARGET_MIB:.0} MiB: {}",
        mib(peak),
        peak.map_or("?", |k| verdict(k as f64 / 1024.0 <= RSS_TARGET_MIB))
    );
    println!(
        "reopen               {reopened:>10.3?}  target <= {REOPEN_TARGET:?}: {}",
        verdict(reopened <= REOPEN_TARGET)
    );
    Ok(())
}
