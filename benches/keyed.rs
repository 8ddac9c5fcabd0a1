//! What `DurableDag::add_keyed` costs next to `DurableDag::add`: the same DAG, built and run
//! with every task added through `add_keyed` (`*keyed*`: an output is reused only while its
//! fingerprint matches) or through `add` (`*plain*`: cached by id), in one process, over
//!
//! - `keyed_memory_10k`: 10,000 tasks over a `MemoryStore`, as `benches/overhead.rs`'s
//!   `memory_v2`;
//! - `keyed_sled_2k`: 2,000 tasks over a `SledStore` (`Durability::Immediate`, the default),
//!   as `benches/sled.rs`'s `durable_dag`;
//!
//! each into a fresh store (`plain`, `keyed`: every task executes and is persisted) and again
//! over a populated store (`plain_cached`, `keyed_cached`: every task is a hit; the keyed side
//! reads, decodes and compares each stored fingerprint).
//!
//! # The DAG
//! The wide DAG of those benches is all independent tasks, which would leave out what keyed
//! tasks do with the outputs they consume. Here the tasks come in pairs instead: `task-2k` is
//! a `Source` (no inputs) and `task-2k+1` a `Step` that consumes `task-2k`'s output. So half
//! the tasks depend on one upstream, and on the keyed side every source's output digest is
//! taken (executed or cached) and goes into its step's fingerprint. Both tasks are trivial
//! and their parameters (`#[derive(Serialize)]`, one `u64`) are the same on both sides;
//! only the keyed side serialises and hashes them.
//!
//! Guards: `keyed` <= 1.3 x `plain` for each store. The cached ratios are reported, without
//! a target. The ratios are printed at the end, from the estimates criterion wrote in this
//! run, then measured again interleaved (both sides back to back in alternating order, see
//! `support::interleaved`; medians). `DURAFLOW_BENCH_ONLY_INTERLEAVED=1` skips criterion.
//!
//! # What is timed
//! One iteration is one pipeline run: create the `DagRunner` and the `DurableDag`, add the
//! tasks (for keyed tasks, this serialises and hashes their parameters), and `run` it to
//! completion with `tokio::spawn` on a multi-thread runtime with 2 worker threads. Not timed:
//! making the task ids, creating the store (a fresh `MemoryStore`, or a `SledStore` in a
//! fresh temporary directory, per iteration of the uncached variants; one populated store per
//! side, reused by the cached variants), checking the run's counts, and dropping the runner,
//! the store (a `SledStore`'s `Drop` flushes and joins its writer) and the directory.

// Uses neither `support::Val` nor `support::run_raw`: its tasks have parameters to key on.
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, SamplingMode};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, DurableTask, MemoryStore, Plain, RunStats, SledStore};
use serde::Serialize;
use tokio::runtime::Runtime;

/// Tasks in the smoke test (`cargo test --benches`, or `-- --test`): every benchmark runs once.
const N_SMOKE: usize = 100;
/// Set (to anything) to skip criterion's measurements and run only the interleaved ones.
const ONLY_INTERLEAVED_VAR: &str = "DURAFLOW_BENCH_ONLY_INTERLEAVED";

/// A task without inputs: returns `n`.
#[derive(Serialize)]
struct Source {
    n: u64,
}

#[task]
impl Source {
    async fn run(&self) -> u64 {
        self.n
    }
}

/// A task that consumes one output: returns it plus `n`.
#[derive(Serialize)]
struct Step {
    n: u64,
}

#[task]
impl Step {
    async fn run(&self, up: &u64) -> u64 {
        up + self.n
    }
}

/// Which method adds every task.
#[derive(Clone, Copy)]
enum How {
    Plain,
    Keyed,
}

impl How {
    fn name(self) -> &'static str {
        match self {
            How::Plain => "plain",
            How::Keyed => "keyed",
        }
    }

    fn add<'a, Tk>(self, d: &DurableDag<'a>, id: &str, task: Tk) -> DurableTask<'a, Tk, Plain>
    where
        Tk: Task<Output = u64> + Serialize + 'static,
        Tk::Input: Clone + 'static,
    {
        match self {
            How::Plain => d.add(id, task),
            How::Keyed => d.add_keyed(id, task),
        }
    }
}

/// A store, and the temporary directory a `SledStore` lives in (dropped after it).
struct Store {
    ctx: Arc<Context>,
    _dir: Option<tempfile::TempDir>,
}

/// The two stores, with their group name, DAG size, and criterion's sampling per variant
/// (samples, measurement time) for fresh and cached runs.
#[derive(Clone, Copy)]
enum Backend {
    Memory,
    Sled,
}

impl Backend {
    fn group(self) -> &'static str {
        match self {
            Backend::Memory => "keyed_memory_10k",
            Backend::Sled => "keyed_sled_2k",
        }
    }

    fn tasks(self) -> usize {
        match self {
            Backend::Memory => 10_000,
            Backend::Sled => 2_000,
        }
    }

    fn sampling(self, cached: bool) -> (usize, Duration) {
        match (self, cached) {
            (Backend::Memory, _) => (60, Duration::from_secs(12)),
            (Backend::Sled, false) => (20, Duration::from_secs(15)),
            (Backend::Sled, true) => (60, Duration::from_secs(8)),
        }
    }

    /// Interleaved rounds of fresh and of cached runs.
    fn rounds(self, cached: bool) -> usize {
        match (self, cached) {
            (Backend::Memory, _) => 60,
            (Backend::Sled, false) => 30,
            (Backend::Sled, true) => 100,
        }
    }

    fn ids(self) -> Vec<String> {
        support::task_ids(self.tasks(), N_SMOKE)
    }

    fn fresh(self) -> Store {
        match self {
            Backend::Memory => Store {
                ctx: Arc::new(Context::new(MemoryStore::new())),
                _dir: None,
            },
            Backend::Sled => {
                let dir = support::temp_dir("duraflow-keyed-bench-");
                let store = SledStore::open(dir.path().join("store")).expect("open SledStore");
                Store {
                    ctx: Arc::new(Context::new(store)),
                    _dir: Some(dir),
                }
            }
        }
    }
}

/// Builds the DAG of pairs (see the module docs) with `how` over `ctx` and runs it: the
/// timed part. Returns the time, the runner (to be dropped untimed) and the run's counts.
fn run_dag(
    rt: &Runtime,
    ctx: &Arc<Context>,
    ids: &[String],
    how: How,
) -> (Duration, DagRunner, RunStats) {
    let start = Instant::now();
    let (dag, stats) = rt.block_on(async {
        let dag = DagRunner::new();
        let stats = {
            let d = DurableDag::new(&dag, Arc::clone(ctx));
            for (k, pair) in ids.chunks_exact(2).enumerate() {
                let n = 2 * k as u64;
                let source = how.add(&d, &pair[0], Source { n });
                how.add(&d, &pair[1], Step { n: n + 1 }).depends_on(&source);
            }
            support::run_spawned(&dag, how.name()).await;
            d.stats()
        };
        (dag, stats)
    });
    (start.elapsed(), dag, stats)
}

/// One run over a fresh store, checked: every task executed, `task-7` is 6 + 7.
fn fresh_run(rt: &Runtime, backend: Backend, ids: &[String], how: How) -> Duration {
    let store = backend.fresh();
    let (elapsed, dag, stats) = run_dag(rt, &store.ctx, ids, how);
    assert_eq!(
        (stats.executed, stats.cached, stats.failed),
        (ids.len(), 0, 0)
    );
    assert_eq!(store.ctx.get::<u64>("task-7"), Some(13));
    drop((dag, store));
    elapsed
}

/// One run over `store`, populated by the same side, checked: every task cached.
fn cached_run(rt: &Runtime, store: &Store, ids: &[String], how: How) -> Duration {
    let (elapsed, dag, stats) = run_dag(rt, &store.ctx, ids, how);
    assert_eq!(
        (stats.executed, stats.cached, stats.failed),
        (0, ids.len(), 0)
    );
    drop(dag);
    elapsed
}

/// A fresh store populated by one run with `how`.
fn populated(rt: &Runtime, backend: Backend, ids: &[String], how: How) -> Store {
    let store = backend.fresh();
    let (_, _, stats) = run_dag(rt, &store.ctx, ids, how);
    assert_eq!(stats.executed, ids.len());
    store
}

const SIDES: [How; 2] = [How::Plain, How::Keyed];

fn bench(c: &mut Criterion, rt: &Runtime, backend: Backend) {
    let ids = backend.ids();
    let ids = &ids[..];
    let mut group = c.benchmark_group(backend.group());
    group
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2));

    let (samples, time) = backend.sampling(false);
    group.sample_size(samples).measurement_time(time);
    for how in SIDES {
        group.bench_function(how.name(), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| fresh_run(rt, backend, ids, how)).sum())
        });
    }

    // Each side over a store it populated (lazily, so a filtered-out benchmark costs nothing).
    let (samples, time) = backend.sampling(true);
    group.sample_size(samples).measurement_time(time);
    for how in SIDES {
        let mut store: Option<Store> = None;
        group.bench_function(format!("{}_cached", how.name()), |b| {
            let store = store.get_or_insert_with(|| populated(rt, backend, ids, how));
            b.iter_custom(|iters| (0..iters).map(|_| cached_run(rt, store, ids, how)).sum())
        });
    }
    group.finish();
}

fn print_summary(backend: Backend, since: SystemTime) {
    let ids = ["plain", "keyed", "plain_cached", "keyed_cached"];
    let ratios = [
        ("keyed", "plain", Some(1.3)),
        ("keyed_cached", "plain_cached", None),
    ];
    support::print_summary(backend.group(), backend.tasks(), &ids, &ratios, since);
}

/// Both ratios of `backend` again, each side timed back to back with the other.
fn interleaved(rt: &Runtime, backend: Backend) {
    let group = backend.group();
    let ids = backend.ids();
    let ids = &ids[..];
    let pair = |(plain, keyed): (&str, &str)| {
        support::selected(group, plain) && support::selected(group, keyed)
    };

    if pair(("plain", "keyed")) {
        let rounds = backend.rounds(false);
        let (keyed, plain) = support::interleaved(
            rounds,
            || fresh_run(rt, backend, ids, How::Keyed),
            || fresh_run(rt, backend, ids, How::Plain),
        );
        println!("\n== interleaved: {rounds} rounds of {group}/keyed and plain ==");
        println!("{:<24} {keyed:>10.3} ms  (median)", "keyed");
        support::print_interleaved(("keyed", keyed), ("plain", plain), Some(1.3));
    }

    if pair(("plain_cached", "keyed_cached")) {
        let rounds = backend.rounds(true);
        let keyed_store = populated(rt, backend, ids, How::Keyed);
        let plain_store = populated(rt, backend, ids, How::Plain);
        let (keyed, plain) = support::interleaved(
            rounds,
            || cached_run(rt, &keyed_store, ids, How::Keyed),
            || cached_run(rt, &plain_store, ids, How::Plain),
        );
        println!("\n== interleaved: {rounds} rounds of {group}/keyed_cached and plain_cached ==");
        println!("{:<24} {keyed:>10.3} ms  (median)", "keyed_cached");
        support::print_interleaved(("keyed_cached", keyed), ("plain_cached", plain), None);
    }
}

fn main() {
    let since = SystemTime::now();
    let rt = support::runtime();
    let backends = [Backend::Memory, Backend::Sled];
    if std::env::var_os(ONLY_INTERLEAVED_VAR).is_none() {
        let mut criterion = Criterion::default().configure_from_args();
        for backend in backends {
            bench(&mut criterion, &rt, backend);
        }
        criterion.final_summary();
        for backend in backends {
            print_summary(backend, since);
        }
    }
    if !support::smoke_test() {
        for backend in backends {
            interleaved(&rt, backend);
        }
    }
}
