//! What `SledStore` costs: a wide DAG of 2,000 independent trivial tasks, run with
//!
//! - `durable_dag`: duraflow over a fresh `SledStore` (every task executes; its output and
//!   its attempt record are committed by the store's writer thread in groups, one flush per
//!   group), against `serial_insert_flush`: 2,000 × (`insert` + `flush`) on a raw `sled::Db`,
//!   one after the other — what a store without group commit would pay;
//! - `cached_dag`: duraflow over a populated `SledStore` (every task is a hit), against
//!   `raw_dagx_sled_gets`: raw dagx where each task does a `get` of its key from a populated
//!   raw `sled::Db`, inline in the task;
//! - `memory_dag`: duraflow over a fresh `MemoryStore`, against `raw_dagx`: raw dagx alone.
//!
//! Guards against regressions: `durable_dag` <= 0.2 x `serial_insert_flush`, `cached_dag` <=
//! 2.5 x `raw_dagx_sled_gets`. The ratios are printed at the
//! end of the run, computed from the estimates criterion wrote in this run
//! (`<target>/criterion/sled_2k/<id>/new/estimates.json`).
//!
//! # What is timed
//! One iteration of a DAG variant is what a user pays for one pipeline run: create the
//! `DagRunner`, add the 2,000 tasks (through `DurableDag::add` for duraflow), and `run` it to
//! completion with `tokio::spawn` on a multi-thread runtime with 2 worker threads. One
//! iteration of `serial_insert_flush` is the 2,000 inserts and flushes. Not timed (done
//! between iterations with `iter_custom`): making the task ids, creating/opening the store
//! or database (a fresh one in a fresh temporary directory per iteration for `durable_dag`
//! and `serial_insert_flush`; one populated store reused by the cached variants), and
//! dropping the runner, the store (whose `Drop` flushes and joins its writer thread) and the
//! temporary directory afterwards.
//!
//! Both sled databases use the settings `SledStore` opens with: a 64 MiB page cache and
//! sled's background flush every 500 ms.
//!
//! Every variant uses flat sampling (each sample is a few whole iterations), so criterion's
//! estimate is a plain mean per iteration and the variants are comparable.
//!
//! Criterion measures one variant after the other, so on a shared machine a burst of load
//! can land on one side of a ratio. The run therefore ends (unless criterion runs as a smoke
//! test or a filter leaves a variant out) with interleaved measurements of both store
//! ratios: [`INTERLEAVED_ROUNDS`] rounds, each timing one `raw_dagx_sled_gets` iteration and
//! one `cached_dag` iteration back to back, in alternating order, then
//! [`INTERLEAVED_DURABLE_ROUNDS`] rounds of `serial_insert_flush` and `durable_dag`; each
//! prints the median of each side and the ratio of the medians. With
//! `DURAFLOW_BENCH_ONLY_INTERLEAVED=1` in the environment only these run (no criterion), a
//! quicker check:
//!
//! ```sh
//! DURAFLOW_BENCH_ONLY_INTERLEAVED=1 cargo bench --bench sled
//! ```

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, MemoryStore, RunStats, SledStore};
use tokio::runtime::Runtime;

/// Tasks in the wide DAG.
const N: usize = 2_000;
/// Tasks in the wide DAG when criterion runs as a smoke test (`cargo test --benches` or
/// `--all-targets`, which pass no `--bench`; or `-- --test`): every benchmark runs once, so
/// a small DAG keeps that quick.
const N_SMOKE: usize = 100;
/// The criterion group every benchmark is in.
const GROUP: &str = "sled_2k";
/// sled's page cache as `SledStore` configures it.
const CACHE: u64 = 64 * 1024 * 1024;
/// Rounds of the interleaved cached measurement.
const INTERLEAVED_ROUNDS: usize = 200;
/// Rounds of the interleaved durable measurement (a round takes about a quarter second).
const INTERLEAVED_DURABLE_ROUNDS: usize = 30;
/// Set (to anything) to skip criterion's measurements and run only the interleaved ones:
/// a quicker A/B check on a noisy machine.
const ONLY_INTERLEAVED_VAR: &str = "DURAFLOW_BENCH_ONLY_INTERLEAVED";

use support::{runtime, Val};

/// The task ids (see [`support::task_ids`]).
fn task_ids() -> Vec<Arc<str>> {
    support::task_ids(N, N_SMOKE)
}

fn temp_dir() -> tempfile::TempDir {
    support::temp_dir("duraflow-sled-bench-")
}

/// The raw baseline of a cached task: a `get` of its key from a sled tree, inline.
struct Get {
    db: sled::Db,
    key: Arc<str>,
}

#[task]
impl Get {
    async fn run(&self) -> u64 {
        let bytes = self
            .db
            .get(self.key.as_bytes())
            .expect("sled get")
            .expect("key present");
        u64::from_be_bytes(bytes.as_ref().try_into().expect("8-byte value"))
    }
}

/// A raw sled database configured as `SledStore` configures its own.
fn raw_sled(path: &Path) -> sled::Db {
    sled::Config::new()
        .path(path)
        .cache_capacity(CACHE)
        .flush_every_ms(Some(500))
        .open()
        .expect("open raw sled db")
}

/// A raw sled database in a fresh temporary directory holding every id with its index as an
/// 8-byte value: what the raw baseline of the cached run reads.
fn populated_raw_sled(ids: &[Arc<str>]) -> (tempfile::TempDir, sled::Db) {
    let dir = temp_dir();
    let db = raw_sled(dir.path());
    for (i, id) in ids.iter().enumerate() {
        db.insert(id.as_bytes(), &(i as u64).to_be_bytes())
            .expect("sled insert");
    }
    db.flush().expect("sled flush");
    (dir, db)
}

/// A fresh `SledStore` in a fresh temporary directory.
fn fresh_sled() -> (tempfile::TempDir, Arc<Context>) {
    let dir = temp_dir();
    let store = SledStore::open(dir.path().join("store")).expect("open SledStore");
    (dir, Arc::new(Context::new(store)))
}

// ---------------------------------------------------------------------------------------
// One timed run per variant. Each returns the time taken and what must be dropped untimed.
// ---------------------------------------------------------------------------------------

/// Raw dagx where each task reads its key from `db`.
fn run_raw_gets(rt: &Runtime, db: &sled::Db, ids: &[Arc<str>]) -> (Duration, DagRunner) {
    let start = Instant::now();
    let dag = rt.block_on(async {
        let dag = DagRunner::new();
        for id in ids {
            dag.add_task(Get {
                db: db.clone(),
                key: Arc::clone(id),
            });
        }
        support::run_spawned(&dag, "raw dagx + sled gets").await;
        dag
    });
    (start.elapsed(), dag)
}

/// duraflow: build the wide DAG through a `DurableDag` over `ctx` and run it.
fn run_durable(
    rt: &Runtime,
    ctx: &Arc<Context>,
    ids: &[Arc<str>],
) -> (Duration, DagRunner, RunStats) {
    let start = Instant::now();
    let (dag, stats) = rt.block_on(async {
        let dag = DagRunner::new();
        let stats = {
            let d = DurableDag::new(&dag, Arc::clone(ctx));
            for (i, id) in ids.iter().enumerate() {
                d.add(id, Val(i as u64));
            }
            support::run_spawned(&dag, "duraflow").await;
            d.stats()
        };
        (dag, stats)
    });
    (start.elapsed(), dag, stats)
}

/// 2,000 (or `ids.len()`) × (insert + flush) on `db`, one after the other.
fn serial_insert_flush(db: &sled::Db, ids: &[Arc<str>]) -> Duration {
    let start = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        db.insert(id.as_bytes(), &(i as u64).to_be_bytes())
            .expect("sled insert");
        db.flush().expect("sled flush");
    }
    start.elapsed()
}

/// Checks a run over a fresh store executed all `n` tasks and persisted their outputs.
fn check_fresh(ctx: &Context, stats: RunStats, n: usize) {
    assert_eq!((stats.executed, stats.cached, stats.failed), (n, 0, 0));
    assert_eq!(ctx.get::<u64>("task-7"), Some(7));
}

/// Checks a run over a populated store took all `n` outputs from the store.
fn check_cached(stats: RunStats, n: usize) {
    assert_eq!((stats.executed, stats.cached, stats.failed), (0, n, 0));
}

// ---------------------------------------------------------------------------------------
// Benchmarks.
// ---------------------------------------------------------------------------------------

/// Flat sampling with `samples` samples, aiming at `measure` of measured time.
fn configure(
    group: &mut BenchmarkGroup<'_, WallTime>,
    samples: usize,
    warm_up: Duration,
    measure: Duration,
) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(samples)
        .warm_up_time(warm_up)
        .measurement_time(measure);
}

fn sled_2k(c: &mut Criterion) {
    let rt = runtime();
    let ids = task_ids();
    let rt = &rt;
    let ids = &ids[..];
    let n = ids.len();

    let mut group = c.benchmark_group(GROUP);

    // In-memory variants: about a millisecond per iteration, so many samples.
    configure(
        &mut group,
        60,
        Duration::from_secs(2),
        Duration::from_secs(8),
    );

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

    group.bench_function("memory_dag", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let ctx = Arc::new(Context::new(MemoryStore::new()));
                    let (elapsed, dag, stats) = run_durable(rt, &ctx, ids);
                    check_fresh(&ctx, stats, n);
                    drop((dag, ctx));
                    elapsed
                })
                .sum()
        })
    });

    // Cached reads. The raw database is populated once (lazily, so a filtered-out benchmark
    // costs nothing) with the same keys and 8-byte values.
    let mut populated: Option<(tempfile::TempDir, sled::Db)> = None;
    group.bench_function("raw_dagx_sled_gets", |b| {
        let (_dir, db) = populated.get_or_insert_with(|| populated_raw_sled(ids));
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (elapsed, dag) = run_raw_gets(rt, db, ids);
                    drop(dag);
                    elapsed
                })
                .sum()
        })
    });
    // The database (and its lock) goes before its directory.
    if let Some((dir, db)) = populated.take() {
        drop(db);
        drop(dir);
    }

    // Every cached run also writes its run record and two attempt records per task (cached
    // tasks included), and waits for the run record to be flushed.
    let mut populated: Option<(tempfile::TempDir, Arc<Context>)> = None;
    group.bench_function("cached_dag", |b| {
        let (_dir, ctx) = populated.get_or_insert_with(|| {
            let (dir, ctx) = fresh_sled();
            let (_, _, stats) = run_durable(rt, &ctx, ids);
            check_fresh(&ctx, stats, n);
            (dir, ctx)
        });
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (elapsed, dag, stats) = run_durable(rt, ctx, ids);
                    check_cached(stats, n);
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

    // Durable writes into a fresh store, one per iteration.
    configure(
        &mut group,
        20,
        Duration::from_secs(2),
        Duration::from_secs(15),
    );
    group.bench_function("durable_dag", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (dir, ctx) = fresh_sled();
                    let (elapsed, dag, stats) = run_durable(rt, &ctx, ids);
                    check_fresh(&ctx, stats, n);
                    drop((dag, ctx, dir));
                    elapsed
                })
                .sum()
        })
    });

    // One flush per insert: the slowest variant. The fewest samples criterion allows.
    configure(
        &mut group,
        10,
        Duration::from_millis(1),
        Duration::from_secs(5),
    );
    group.bench_function("serial_insert_flush", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let dir = temp_dir();
                    let db = raw_sled(dir.path());
                    let elapsed = serial_insert_flush(&db, ids);
                    assert_eq!(db.len(), n);
                    drop(db);
                    drop(dir);
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
        "memory_dag",
        "raw_dagx_sled_gets",
        "cached_dag",
        "durable_dag",
        "serial_insert_flush",
    ];
    let ratios = [
        ("durable_dag", "serial_insert_flush", Some(0.2)),
        ("cached_dag", "raw_dagx_sled_gets", Some(2.5)),
        ("memory_dag", "raw_dagx", None),
        ("raw_dagx_sled_gets", "raw_dagx", None),
    ];
    support::print_summary(GROUP, N, &ids, &ratios, since);
}

/// The interleaved cached measurement (see the module docs).
fn interleaved_cached(rounds: usize) {
    let rt = runtime();
    let ids = task_ids();
    let n = ids.len();
    let (raw_dir, db) = populated_raw_sled(&ids);
    let (dir, ctx) = fresh_sled();
    let (_, _, stats) = run_durable(&rt, &ctx, &ids);
    check_fresh(&ctx, stats, n);
    let (raw_ms, cached_ms) = support::interleaved(
        rounds,
        || {
            let (elapsed, dag) = run_raw_gets(&rt, &db, &ids);
            drop(dag);
            elapsed
        },
        || {
            let (elapsed, dag, stats) = run_durable(&rt, &ctx, &ids);
            check_cached(stats, n);
            drop(dag);
            elapsed
        },
    );
    println!(
        "\n== interleaved: {rounds} rounds of raw_dagx_sled_gets and cached_dag back to back =="
    );
    println!("{:<24} {cached_ms:>10.3} ms  (median)", "cached_dag");
    support::print_interleaved(
        ("cached_dag", cached_ms),
        ("raw_dagx_sled_gets", raw_ms),
        Some(2.5),
    );
    drop((ctx, dir, db, raw_dir));
}

/// The interleaved durable measurement: like [`interleaved_cached`], for `durable_dag`
/// (each iteration over a fresh store) against `serial_insert_flush` (each over a fresh
/// database), so that a burst of load hits both sides of the first ratio.
fn interleaved_durable(rounds: usize) {
    let rt = runtime();
    let ids = task_ids();
    let n = ids.len();
    let (serial_ms, durable_ms) = support::interleaved(
        rounds,
        || {
            let dir = temp_dir();
            let db = raw_sled(dir.path());
            let elapsed = serial_insert_flush(&db, &ids);
            assert_eq!(db.len(), n);
            drop((db, dir));
            elapsed
        },
        || {
            let (dir, ctx) = fresh_sled();
            let (elapsed, dag, stats) = run_durable(&rt, &ctx, &ids);
            check_fresh(&ctx, stats, n);
            drop((dag, ctx, dir));
            elapsed
        },
    );
    println!(
        "\n== interleaved: {rounds} rounds of serial_insert_flush and durable_dag back to back =="
    );
    println!("{:<24} {durable_ms:>10.3} ms  (median)", "durable_dag");
    support::print_interleaved(
        ("durable_dag", durable_ms),
        ("serial_insert_flush", serial_ms),
        Some(0.2),
    );
}

fn main() {
    let since = SystemTime::now();
    if std::env::var_os(ONLY_INTERLEAVED_VAR).is_none() {
        let mut criterion = Criterion::default().configure_from_args();
        sled_2k(&mut criterion);
        criterion.final_summary();
        print_summary(since);
    }
    if support::smoke_test() {
        return;
    }
    if support::selected(GROUP, "raw_dagx_sled_gets") && support::selected(GROUP, "cached_dag") {
        interleaved_cached(INTERLEAVED_ROUNDS);
    }
    if support::selected(GROUP, "serial_insert_flush") && support::selected(GROUP, "durable_dag") {
        interleaved_durable(INTERLEAVED_DURABLE_ROUNDS);
    }
}
