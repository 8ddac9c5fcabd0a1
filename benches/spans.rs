//! What the `duraflow.run` / `duraflow.task` spans cost: the 10,000-task wide DAG over a
//! fresh `MemoryStore` (the `memory_v2` case of `benches/overhead.rs`), run
//!
//! - `no_subscriber`: with no `tracing` subscriber at all (spans are created disabled);
//! - `registry_only`: with `tracing_subscriber::registry()` alone as that default (real spans,
//!   no layer): splits what spans cost from what `ProgressLayer` adds;
//! - `progress_layer`: with `tracing_subscriber::registry().with(ProgressLayer::new(..))` as
//!   the default subscriber of the thread that builds and runs the DAG (so every task gets a
//!   real span, polled with that subscriber on the worker threads, and reported by the
//!   layer);
//! - `progress_layer_global`: the same subscriber installed as the global default (as the
//!   README shows), which every worker thread sees without a scope per task.
//!
//! Targets (from the issue), against the same DAG in a build without spans
//! (`--cfg duraflow_no_spans`, with no subscriber): `no_subscriber` <= 1.05 x, and
//! `progress_layer` (and `progress_layer_global`) <= 1.25 x.
//!
//! # Procedure
//! The build without spans is a different compilation of the library, so it cannot be in
//! this binary: the benchmark is run twice, first built with the cfg (saved as criterion's
//! baseline `no-spans`), then built normally and compared with it. `benches/spans.sh` does
//! exactly this:
//!
//! ```sh
//! export CRITERION_HOME=$PWD/target/criterion   # one results directory for both builds
//! CARGO_TARGET_DIR=target/no-spans RUSTFLAGS="--cfg duraflow_no_spans" \
//!     cargo bench --bench spans -- --save-baseline no-spans
//! cargo bench --bench spans -- --baseline no-spans
//! ```
//!
//! The cfg build goes to its own target directory so it does not evict the normal build's
//! artifacts. The second run prints criterion's change against the baseline of the same name
//! and, at the end, the two target ratios, both against the baseline's `no_subscriber` (the
//! build without spans has none to report, so its `progress_layer` differs from its
//! `no_subscriber` only by the subscriber's cost for the crate's trace events).
//!
//! # What is timed
//! As in `benches/overhead.rs`: one iteration creates the `DagRunner`, adds the 10,000 tasks
//! through `DurableDag::add`, and runs them with `tokio::spawn` on a multi-thread runtime
//! with 2 worker threads. Not timed: making the task ids, creating the store, installing the
//! subscriber (once per variant), checking the run, dropping the runner and the store.
//! Flat sampling: criterion's estimate is a plain mean per iteration.
//!
//! With `DURAFLOW_SPANS_CPU=1` in the environment (Linux), an iteration is measured in the
//! CPU time of all the process's threads instead of wall time (criterion still labels it
//! "time"). Spans cost CPU, and CPU time hardly moves when other processes load the machine,
//! while wall time there can vary by more than the overhead being measured. Use the same
//! setting for both builds: `DURAFLOW_SPANS_CPU=1 ROUNDS=6 sh benches/spans.sh ..`.

// This benchmark reads named baselines (`estimate_in`), not the shared summary.
#[allow(dead_code)]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, SamplingMode};
use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, MemoryStore, ProgressLayer, RunStats};
use tokio::runtime::Runtime;
use tracing_subscriber::layer::SubscriberExt;

/// Tasks in the wide DAG.
const N: usize = 10_000;
/// Tasks in criterion's test mode (no `--bench`, or `--test`): every benchmark runs once.
const N_SMOKE: usize = 100;
/// The criterion group.
const GROUP: &str = "spans_10k";
/// The baseline the build without spans is saved as.
const BASELINE: &str = "no-spans";

fn args() -> Vec<String> {
    std::env::args().collect()
}

use support::{runtime, Val};

/// The task ids (see [`support::task_ids`]).
fn task_ids() -> Vec<String> {
    support::task_ids(N, N_SMOKE)
}

/// Set (to anything) to measure CPU time instead of wall time (see the module docs).
const CPU_VAR: &str = "DURAFLOW_SPANS_CPU";

/// What one iteration is measured in.
#[derive(Clone, Copy)]
enum Clock {
    Wall,
    /// The CPU time of every thread of the process (Linux).
    Cpu,
}

impl Clock {
    fn from_env() -> Clock {
        match std::env::var_os(CPU_VAR) {
            Some(_) => {
                assert!(
                    process_cpu().is_some(),
                    "{CPU_VAR}: no /proc/self/task/*/schedstat"
                );
                Clock::Cpu
            }
            None => Clock::Wall,
        }
    }

    /// Runs `f`, returning what it cost on this clock.
    fn measure<R>(self, f: impl FnOnce() -> R) -> (Duration, R) {
        match self {
            Clock::Wall => {
                let start = Instant::now();
                let r = f();
                (start.elapsed(), r)
            }
            Clock::Cpu => {
                let start = process_cpu().unwrap_or_default();
                let r = f();
                let end = process_cpu().unwrap_or_default();
                (end.saturating_sub(start), r)
            }
        }
    }
}

/// The CPU time all threads of this process have run so far: the first field
/// (`sum_exec_runtime`, ns) of each `/proc/self/task/<tid>/schedstat`. The runtime's workers
/// and the I/O threads live as long as the process, so no thread's time is lost in between.
fn process_cpu() -> Option<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

/// Builds the wide DAG through a `DurableDag` over a fresh `MemoryStore` and runs it; only
/// that is measured.
fn run_once(
    clock: Clock,
    rt: &Runtime,
    ids: &[String],
) -> (Duration, DagRunner, Arc<Context>, RunStats) {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let (elapsed, (dag, stats)) = clock.measure(|| {
        rt.block_on(async {
            let dag = DagRunner::new();
            let stats = {
                let d = DurableDag::new(&dag, Arc::clone(&ctx));
                for (i, id) in ids.iter().enumerate() {
                    d.add(id, Val(i as u64));
                }
                support::run_spawned(&dag, "spans benchmark").await;
                d.stats()
            };
            (dag, stats)
        })
    });
    (elapsed, dag, ctx, stats)
}

/// `iters` timed runs of the DAG, each checked; with `reported`, also that the layer counting
/// into it reported the expected number of tasks.
fn timed_runs(
    clock: Clock,
    rt: &Runtime,
    ids: &[String],
    iters: u64,
    reported: Option<(&AtomicUsize, usize)>,
) -> Duration {
    (0..iters)
        .map(|_| {
            if let Some((count, _)) = reported {
                count.store(0, Ordering::Relaxed);
            }
            let (elapsed, dag, ctx, stats) = run_once(clock, rt, ids);
            check(&ctx, stats, ids.len());
            if let Some((count, expected)) = reported {
                assert_eq!(count.load(Ordering::Relaxed), expected);
            }
            drop((dag, ctx));
            elapsed
        })
        .sum()
}

/// A registry with a `ProgressLayer` that counts its calls into the returned counter.
fn progress_subscriber() -> (impl tracing::Subscriber + Send + Sync, Arc<AtomicUsize>) {
    let reported = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reported);
    let subscriber = tracing_subscriber::registry().with(ProgressLayer::new(move |_, _| {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    (subscriber, reported)
}

fn check(ctx: &Context, stats: RunStats, n: usize) {
    assert_eq!((stats.executed, stats.cached, stats.failed), (n, 0, 0));
    assert_eq!(ctx.get::<u64>("task-7"), Some(7));
}

fn spans(c: &mut Criterion) {
    let clock = Clock::from_env();
    let rt = runtime();
    let ids = task_ids();
    let (rt, ids) = (&rt, &ids[..]);
    let n = ids.len();

    let mut group = c.benchmark_group(GROUP);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(60)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(12));

    // The build without spans has nothing to report.
    let expected = if cfg!(duraflow_no_spans) { 0 } else { n };

    // First, before any subscriber was ever installed in this process.
    group.bench_function("no_subscriber", |b| {
        b.iter_custom(|iters| timed_runs(clock, rt, ids, iters, None))
    });

    // The registry alone: what real spans cost before any layer looks at them.
    {
        let _default = tracing::subscriber::set_default(tracing_subscriber::registry());
        group.bench_function("registry_only", |b| {
            b.iter_custom(|iters| timed_runs(clock, rt, ids, iters, None))
        });
    }

    {
        let (subscriber, reported) = progress_subscriber();
        let _default = tracing::subscriber::set_default(subscriber);
        group.bench_function("progress_layer", |b| {
            b.iter_custom(|iters| timed_runs(clock, rt, ids, iters, Some((&reported, expected))))
        });
    }

    // The same layer installed as the global default, as most programs do (and the README
    // shows): every thread sees it, so the run polls its tasks without a subscriber scope.
    // Last, because a global default cannot be taken back.
    let (subscriber, reported) = progress_subscriber();
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        group.bench_function("progress_layer_global", |b| {
            b.iter_custom(|iters| timed_runs(clock, rt, ids, iters, Some((&reported, expected))))
        });
    }
    group.finish();
}

/// The variants, and the target ratio of each against the build without spans.
const VARIANTS: [(&str, Option<f64>); 4] = [
    ("no_subscriber", Some(1.05)),
    ("registry_only", None),
    ("progress_layer", Some(1.25)),
    ("progress_layer_global", Some(1.25)),
];

/// Set (to anything) to print the ratios between the saved baselines `spans` and `no-spans`
/// without running any benchmark: what `benches/spans.sh` does after each round.
const COMPARE_VAR: &str = "DURAFLOW_SPANS_COMPARE";

/// Prints this run's estimates and, when the `no-spans` baseline exists, the target ratios.
fn print_summary(since: SystemTime) {
    let Some(dir) = support::criterion_dir() else {
        return;
    };
    let args = args();
    // With `--save-baseline NAME` criterion writes this run's results under NAME.
    let current = args
        .iter()
        .position(|a| a == "--save-baseline")
        .and_then(|i| args.get(i + 1))
        .map_or("new", String::as_str);
    let this: Vec<_> = VARIANTS
        .iter()
        .filter_map(|(id, _)| Some((*id, support::estimate_in(&dir, GROUP, id, current, since)?)))
        .collect();
    if this.is_empty() {
        return;
    }
    let build = if cfg!(duraflow_no_spans) {
        "built without spans (--cfg duraflow_no_spans)"
    } else {
        "built with spans"
    };
    let n = task_ids().len();
    println!("\n== {GROUP}, {build}: mean time per run of {n} tasks (95% CI) ==");
    for (id, (mean, lo, hi)) in &this {
        println!(
            "{id:<16} {:>9.3} ms  [{:.3} .. {:.3}]  {:>6.3} us/task",
            mean * 1e3,
            lo * 1e3,
            hi * 1e3,
            mean * 1e6 / n as f64
        );
    }
    if !cfg!(duraflow_no_spans) && current != BASELINE {
        print_ratios(&dir, &this);
    }
}

/// Prints each of `this` (a build with spans) against the baseline's `no_subscriber`.
fn print_ratios(dir: &std::path::Path, this: &[(&str, (f64, f64, f64))]) {
    let Some((b, b_lo, b_hi)) = support::estimate_in(
        dir,
        GROUP,
        "no_subscriber",
        BASELINE,
        SystemTime::UNIX_EPOCH,
    ) else {
        println!("\n(no `{BASELINE}` baseline: run benches/spans.sh for the ratios)");
        return;
    };
    println!("\n== against the build without spans (baseline `{BASELINE}`, no_subscriber) ==");
    for (id, target) in VARIANTS {
        let Some((_, (a, a_lo, a_hi))) = this.iter().find(|(i, _)| *i == id) else {
            continue;
        };
        let verdict = support::verdict(a / b, target);
        println!(
            "{id:<16} {:>6.3}x  [{:.3} .. {:.3}]  ({:+.1}%)  {verdict}",
            a / b,
            a_lo / b_hi,
            a_hi / b_lo,
            (a / b - 1.0) * 100.0
        );
    }
}

/// The ratios between the saved baselines `spans` and `no-spans` ([`COMPARE_VAR`]).
fn compare_saved() {
    let Some(dir) = support::criterion_dir() else {
        return;
    };
    let spans: Vec<_> = VARIANTS
        .iter()
        .filter_map(|(id, _)| {
            let e = support::estimate_in(&dir, GROUP, id, "spans", SystemTime::UNIX_EPOCH)?;
            Some((*id, e))
        })
        .collect();
    print_ratios(&dir, &spans);
}

fn main() {
    if std::env::var_os(COMPARE_VAR).is_some() {
        compare_saved();
        return;
    }
    let since = SystemTime::now();
    let mut criterion = Criterion::default().configure_from_args();
    spans(&mut criterion);
    criterion.final_summary();
    print_summary(since);
}
