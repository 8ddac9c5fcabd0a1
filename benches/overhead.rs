//! What durability costs: a wide DAG of 10,000 independent trivial tasks, run with
//!
//! - raw dagx (`wide_10k/raw_dagx`), the floor;
//! - duraflow-rs 2 (`*_v2`) and duraflow-rs 1.0.1 (`*_v1`, the `duraflow_v1` dev-dependency),
//!   each over its own `MemoryStore` and `FileStore`, into an empty store (every task executes
//!   and is persisted) and again over a populated store (`*_cached`: every task is a hit).
//!
//! Note the two `FileStore`s promise different things: 2's fsyncs the value file, its
//! directory and (for a new key) the root on every write, so a write that returned survives a
//! crash; 1.0.1's is a plain `fs::write`, gone on power loss. `file_v2_durable_write` and
//! `file_v1_write` therefore compare a durable store with a non-durable one.
//!
//! Guards against regressions: `memory_v2` <= 1.25 x `memory_v1`, and `file_v2_cached` <=
//! 1.25 x `file_v1_cached`. The ratios are printed at the end of the run, computed from the
//! estimates criterion wrote in this run (`<target>/criterion/wide_10k/<id>/new/estimates.json`).
//!
//! # What is timed
//! One iteration is what a user pays for one pipeline run: create the `DagRunner`, add the
//! 10,000 tasks (through `DurableDag::add` for duraflow), and `run` it to completion with
//! `tokio::spawn` on a multi-thread runtime with 2 worker threads. That is the same for every
//! variant. Not timed (done between iterations with `iter_custom`): making the task ids (the
//! same `String`s for v1 and v2), creating/opening the store (a fresh one per iteration for the
//! uncached variants; one populated store reused by the cached variants), and dropping the
//! runner, the store and the temporary directory afterwards.
//!
//! Every variant uses flat sampling (each sample is a few whole iterations), so criterion's
//! estimate is a plain mean per iteration and the variants are comparable.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use dagx::DagRunner;
use tokio::runtime::Runtime;

/// Tasks in the wide DAG.
const N: usize = 10_000;
/// Tasks in the wide DAG when criterion runs as a smoke test (`cargo test --benches` or
/// `--all-targets`, which pass no `--bench`; or `-- --test`): every benchmark runs once, so
/// a small DAG keeps that quick (10k durable writes alone take seconds).
const N_SMOKE: usize = 100;
/// The criterion group every benchmark is in.
const GROUP: &str = "wide_10k";

use support::{runtime, Val};

/// The task ids (see [`support::task_ids`]).
fn task_ids() -> Vec<String> {
    support::task_ids(N, N_SMOKE)
}

fn temp_dir() -> tempfile::TempDir {
    support::temp_dir("duraflow-bench-")
}

// ---------------------------------------------------------------------------------------
// One timed run per variant. Each returns the time taken and what must be dropped untimed.
// ---------------------------------------------------------------------------------------

/// duraflow-rs 2: build the wide DAG through a `DurableDag` over `ctx` and run it.
fn run_v2(
    rt: &Runtime,
    ctx: &Arc<duraflow_rs::Context>,
    ids: &[String],
) -> (Duration, DagRunner, duraflow_rs::RunStats) {
    let start = Instant::now();
    let (dag, stats) = rt.block_on(async {
        let dag = DagRunner::new();
        let stats = {
            let d = duraflow_rs::DurableDag::new(&dag, Arc::clone(ctx));
            for (i, id) in ids.iter().enumerate() {
                d.add(id, Val(i as u64));
            }
            support::run_spawned(&dag, "duraflow-rs 2").await;
            d.stats()
        };
        (dag, stats)
    });
    (start.elapsed(), dag, stats)
}

/// duraflow-rs 1.0.1: build the wide DAG through its `DurableDag` over `ctx` and run it.
fn run_v1(rt: &Runtime, ctx: &Arc<duraflow_v1::Context>, ids: &[String]) -> (Duration, DagRunner) {
    let start = Instant::now();
    let dag = rt.block_on(async {
        let dag = DagRunner::new();
        {
            let d = duraflow_v1::DurableDag::new(&dag, Arc::clone(ctx));
            for (i, id) in ids.iter().enumerate() {
                d.add(id, Val(i as u64));
            }
            support::run_spawned(&dag, "duraflow-rs 1.0.1").await;
        }
        dag
    });
    (start.elapsed(), dag)
}

// ---------------------------------------------------------------------------------------
// Stores.
// ---------------------------------------------------------------------------------------

fn v2_memory() -> Arc<duraflow_rs::Context> {
    Arc::new(duraflow_rs::Context::new(duraflow_rs::MemoryStore::new()))
}

fn v2_file(dir: &Path) -> Arc<duraflow_rs::Context> {
    let store = duraflow_rs::FileStore::new(dir).expect("open duraflow-rs 2 FileStore");
    Arc::new(duraflow_rs::Context::new(store))
}

fn v1_context(db: Arc<dyn duraflow_v1::Storage + Send + Sync>) -> Arc<duraflow_v1::Context> {
    Arc::new(duraflow_v1::Context {
        db,
        completed_count: Arc::new(AtomicUsize::new(0)),
    })
}

fn v1_memory() -> Arc<duraflow_v1::Context> {
    v1_context(Arc::new(duraflow_v1::MemoryStore::new()))
}

fn v1_file(dir: &Path) -> Arc<duraflow_v1::Context> {
    v1_context(Arc::new(
        duraflow_v1::FileStore::new(dir).expect("open duraflow-rs 1.0.1 FileStore"),
    ))
}

/// Checks a run of v2 over a fresh store executed all `n` tasks and persisted their outputs.
fn check_v2_fresh(ctx: &duraflow_rs::Context, stats: duraflow_rs::RunStats, n: usize) {
    assert_eq!((stats.executed, stats.cached, stats.failed), (n, 0, 0));
    assert_eq!(ctx.get::<u64>("task-7"), Some(7));
}

/// Checks a run of v2 over a populated store took all `n` outputs from the store.
fn check_v2_cached(stats: duraflow_rs::RunStats, n: usize) {
    assert_eq!((stats.executed, stats.cached, stats.failed), (0, n, 0));
}

/// Checks a run of v1 completed `n` more tasks over `ctx` and left their outputs in it.
fn check_v1(ctx: &duraflow_v1::Context, completed_before: usize, n: usize) {
    assert_eq!(
        ctx.completed_count.load(Ordering::SeqCst) - completed_before,
        n
    );
    assert_eq!(ctx.get::<u64>("task-7"), Some(7));
}

// ---------------------------------------------------------------------------------------
// Benchmarks.
// ---------------------------------------------------------------------------------------

/// Flat sampling with `samples` samples, aiming at `measure` of measured time.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, samples: usize, measure: Duration) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(samples)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(measure);
}

fn wide_10k(c: &mut Criterion) {
    let rt = runtime();
    let ids = task_ids();
    let rt = &rt;
    let ids = &ids[..];
    let n = ids.len();

    let mut group = c.benchmark_group(GROUP);

    // In-memory variants: a few ms per iteration, so many samples.
    configure(&mut group, 60, Duration::from_secs(12));

    group.bench_function("raw_dagx", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (elapsed, dag) = support::run_raw(rt, n);
                    drop(dag);
                    elapsed
                })
                .sum()
        })
    });

    group.bench_function("memory_v2", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let ctx = v2_memory();
                    let (elapsed, dag, stats) = run_v2(rt, &ctx, ids);
                    check_v2_fresh(&ctx, stats, n);
                    drop((dag, ctx));
                    elapsed
                })
                .sum()
        })
    });

    group.bench_function("memory_v1", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let ctx = v1_memory();
                    let (elapsed, dag) = run_v1(rt, &ctx, ids);
                    check_v1(&ctx, 0, n);
                    drop((dag, ctx));
                    elapsed
                })
                .sum()
        })
    });

    // Cached variants: the store is populated once (lazily, so a filtered-out benchmark costs
    // nothing), and every iteration is a fresh DagRunner + DurableDag over that context.
    let mut populated: Option<Arc<duraflow_rs::Context>> = None;
    group.bench_function("memory_v2_cached", |b| {
        let ctx = populated.get_or_insert_with(|| {
            let ctx = v2_memory();
            let (_, _, stats) = run_v2(rt, &ctx, ids);
            check_v2_fresh(&ctx, stats, n);
            ctx
        });
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (elapsed, dag, stats) = run_v2(rt, ctx, ids);
                    check_v2_cached(stats, n);
                    drop(dag);
                    elapsed
                })
                .sum()
        })
    });
    drop(populated);

    let mut populated: Option<Arc<duraflow_v1::Context>> = None;
    group.bench_function("memory_v1_cached", |b| {
        let ctx = populated.get_or_insert_with(|| {
            let ctx = v1_memory();
            run_v1(rt, &ctx, ids);
            check_v1(&ctx, 0, n);
            ctx
        });
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let before = ctx.completed_count.load(Ordering::SeqCst);
                    let (elapsed, dag) = run_v1(rt, ctx, ids);
                    check_v1(ctx, before, n);
                    drop(dag);
                    elapsed
                })
                .sum()
        })
    });
    drop(populated);

    // FileStore, cached: a few tens of ms per iteration. Stores live in temporary directories
    // on the same file system as /tmp.
    configure(&mut group, 40, Duration::from_secs(12));

    let mut populated: Option<(tempfile::TempDir, Arc<duraflow_rs::Context>)> = None;
    group.bench_function("file_v2_cached", |b| {
        let (_dir, ctx) = populated.get_or_insert_with(|| {
            let dir = temp_dir();
            let ctx = v2_file(dir.path());
            let (_, _, stats) = run_v2(rt, &ctx, ids);
            check_v2_fresh(&ctx, stats, n);
            (dir, ctx)
        });
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (elapsed, dag, stats) = run_v2(rt, ctx, ids);
                    check_v2_cached(stats, n);
                    drop(dag);
                    elapsed
                })
                .sum()
        })
    });
    // The store (and its directory lock) goes before its directory.
    if let Some((dir, ctx)) = populated.take() {
        drop(ctx);
        drop(dir);
    }

    let mut populated: Option<(tempfile::TempDir, Arc<duraflow_v1::Context>)> = None;
    group.bench_function("file_v1_cached", |b| {
        let (_dir, ctx) = populated.get_or_insert_with(|| {
            let dir = temp_dir();
            let ctx = v1_file(dir.path());
            run_v1(rt, &ctx, ids);
            check_v1(&ctx, 0, n);
            (dir, ctx)
        });
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let before = ctx.completed_count.load(Ordering::SeqCst);
                    let (elapsed, dag) = run_v1(rt, ctx, ids);
                    check_v1(ctx, before, n);
                    drop(dag);
                    elapsed
                })
                .sum()
        })
    });
    if let Some((dir, ctx)) = populated.take() {
        drop(ctx);
        drop(dir);
    }

    // FileStore into an empty directory, one per iteration. 1.0.1's plain writes take a few
    // hundred ms per iteration.
    configure(&mut group, 20, Duration::from_secs(10));
    group.bench_function("file_v1_write", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let dir = temp_dir();
                    let ctx = v1_file(dir.path());
                    let (elapsed, dag) = run_v1(rt, &ctx, ids);
                    check_v1(&ctx, 0, n);
                    drop((dag, ctx, dir));
                    elapsed
                })
                .sum()
        })
    });

    // 2's durable writes: three fsyncs per new key, seconds per iteration. The fewest samples
    // criterion allows, one iteration each.
    configure(&mut group, 10, Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(1));
    group.bench_function("file_v2_durable_write", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let dir = temp_dir();
                    let ctx = v2_file(dir.path());
                    let (elapsed, dag, stats) = run_v2(rt, &ctx, ids);
                    check_v2_fresh(&ctx, stats, n);
                    drop((dag, ctx, dir));
                    elapsed
                })
                .sum()
        })
    });

    group.finish();
}

// ---------------------------------------------------------------------------------------
// Summary: ratios from the estimates criterion wrote during this run.
// ---------------------------------------------------------------------------------------

fn print_summary(since: SystemTime) {
    let ids = [
        "raw_dagx",
        "memory_v2",
        "memory_v1",
        "memory_v2_cached",
        "memory_v1_cached",
        "file_v2_cached",
        "file_v1_cached",
        "file_v1_write",
        "file_v2_durable_write",
    ];
    let ratios = [
        ("memory_v2", "memory_v1", Some(1.25)),
        ("file_v2_cached", "file_v1_cached", Some(1.25)),
        ("memory_v2", "raw_dagx", None),
        ("memory_v1", "raw_dagx", None),
        ("memory_v2_cached", "memory_v1_cached", None),
        ("memory_v2_cached", "raw_dagx", None),
        ("file_v2_durable_write", "file_v1_write", None),
    ];
    support::print_summary(GROUP, N, &ids, &ratios, since);
}

/// Rounds of the interleaved measurements.
const INTERLEAVED_ROUNDS: usize = 40;

/// The targets measured again with both sides interleaved (see [`support::interleaved`]).
fn interleaved() {
    let rt = runtime();
    let ids = task_ids();
    let n = ids.len();
    if support::selected(GROUP, "memory_v2") && support::selected(GROUP, "memory_v1") {
        let (mem, v1) = support::interleaved(
            INTERLEAVED_ROUNDS,
            || {
                let ctx = v2_memory();
                let (elapsed, dag, stats) = run_v2(&rt, &ctx, &ids);
                check_v2_fresh(&ctx, stats, n);
                drop((dag, ctx));
                elapsed
            },
            || run_v1(&rt, &v1_memory(), &ids).0,
        );
        println!("\n== interleaved: {INTERLEAVED_ROUNDS} rounds of memory_v2 and memory_v1 ==");
        println!("{:<24} {mem:>10.3} ms  (median)", "memory_v2");
        support::print_interleaved(("memory_v2", mem), ("memory_v1", v1), Some(1.25));
    }
    if support::selected(GROUP, "file_v2_cached") && support::selected(GROUP, "file_v1_cached") {
        let (dir2, dir1) = (temp_dir(), temp_dir());
        let (ctx2, ctx1) = (v2_file(dir2.path()), v1_file(dir1.path()));
        let (_, _, stats) = run_v2(&rt, &ctx2, &ids);
        check_v2_fresh(&ctx2, stats, n);
        run_v1(&rt, &ctx1, &ids);
        let (v2, v1) = support::interleaved(
            INTERLEAVED_ROUNDS,
            || {
                let (elapsed, dag, stats) = run_v2(&rt, &ctx2, &ids);
                check_v2_cached(stats, n);
                drop(dag);
                elapsed
            },
            || run_v1(&rt, &ctx1, &ids).0,
        );
        println!(
            "\n== interleaved: {INTERLEAVED_ROUNDS} rounds of file_v2_cached and file_v1_cached =="
        );
        println!("{:<24} {v2:>10.3} ms  (median)", "file_v2_cached");
        support::print_interleaved(("file_v2_cached", v2), ("file_v1_cached", v1), Some(1.25));
        drop((ctx2, ctx1, dir2, dir1));
    }
}

fn main() {
    let since = SystemTime::now();
    let mut criterion = Criterion::default().configure_from_args();
    wide_10k(&mut criterion);
    criterion.final_summary();
    print_summary(since);
    if !support::smoke_test() {
        interleaved();
    }
}
