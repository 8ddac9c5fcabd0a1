//! What the `duraflow.run` / `duraflow.task` spans cost: the 10,000-task wide DAG over a
//! fresh `MemoryStore` (the `memory_v2` case of `benches/overhead.rs`), run
//!
//! - `no_spans`: by this library built without spans (the crate `duraflow_no_spans`: the
//!   same sources compiled with `--cfg duraflow_no_spans`, see `benches/no-spans`): the
//!   baseline;
//! - `no_subscriber`: with no `tracing` subscriber at all (spans are created disabled);
//! - `registry_only`: with `tracing_subscriber::registry()` alone as the scoped default of
//!   the thread that builds and runs the DAG (real spans, no layer): splits what spans cost
//!   from what `ProgressLayer` adds;
//! - `progress_layer`: with `registry().with(ProgressLayer::new(..))` as that scoped default
//!   (every task gets a real span, polled with that subscriber on the worker threads, and is
//!   reported by the layer);
//! - `progress_layer_global`: the same subscriber installed as the global default (as the
//!   README shows), which every worker thread sees without a scope per task.
//!
//! Targets (from the issue), against `no_spans`: `no_subscriber` <= 1.05 x, and
//! `progress_layer` (and `progress_layer_global`) <= 1.25 x.
//!
//! Everything runs in this one process, so both builds see the same machine at the same
//! moment: `cargo bench --bench spans`. First criterion measures each variant in turn; then
//! the variants run in interleaved rounds (each round runs every variant once, in an order
//! that rotates), and the verdicts are the medians over the rounds of each round's ratio to
//! `no_spans`.
//! On a shared machine the interleaved figures are the ones to trust: criterion times one
//! variant after another, and a burst of load favours whichever ran outside it.
//!
//! A subscriber is alive only while its variant runs (a scoped one is made just before its
//! run and dropped after it, and tracing's interest cache rebuilt): `no_subscriber` and
//! `no_spans` run in a process with no subscriber, as they would in a program without one.
//! The global default cannot be taken back, so `progress_layer_global` runs last, against
//! `no_spans` alone (which has no spans for the global subscriber to see).
//!
//! # What is timed
//! As in `benches/overhead.rs`: one iteration creates the `DagRunner`, adds the 10,000 tasks
//! through `DurableDag::add`, and runs them with `tokio::spawn` on a multi-thread runtime
//! with 2 worker threads. Not timed: making the task ids, creating the store and the
//! subscriber, checking the run, dropping the runner, the store and the subscriber.
//! Criterion uses flat sampling: its estimate is a plain mean per iteration.
//!
//! `DURAFLOW_SPANS_ROUNDS` sets the number of interleaved rounds (default 300), and
//! criterion's filter argument selects variants for both passes (`no_spans` always runs in
//! the interleaved one, as the baseline).
//!
//! A scoped variant gets a fresh subscriber for every run, so its registry starts empty
//! each time, where the global variant's has warmed up: a small bias against the scoped
//! figures.

// This benchmark prints its own summary (`print_summary` reads criterion's estimates).
#[allow(dead_code)]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, SamplingMode};
use dagx::DagRunner;
use duraflow_rs::ProgressLayer;
use support::{runtime, Val};
use tokio::runtime::Runtime;
use tracing_subscriber::layer::SubscriberExt;

/// Tasks in the wide DAG.
const N: usize = 10_000;
/// Tasks in criterion's test mode (no `--bench`, or `--test`): every benchmark runs once.
const N_SMOKE: usize = 100;
/// The criterion group.
const GROUP: &str = "spans_10k";
/// The variant every other is compared with.
const BASELINE: &str = "no_spans";
/// One variant: its id, what it runs as, and its target ratio against `no_spans`.
type Case = (&'static str, Variant, Option<f64>);
/// The variants, in the order they run: the first four in a process with no global
/// subscriber, the last once one is installed.
const VARIANTS: [Case; 5] = [
    (BASELINE, Variant::NoSpans, None),
    ("no_subscriber", Variant::Current, Some(1.05)),
    ("registry_only", Variant::Registry, None),
    ("progress_layer", Variant::Progress, Some(1.25)),
    ("progress_layer_global", Variant::Current, Some(1.25)),
];
/// Sets the number of interleaved rounds.
const ROUNDS_VAR: &str = "DURAFLOW_SPANS_ROUNDS";

/// Builds the wide DAG through `$lib`'s `DurableDag` over a fresh `MemoryStore`, runs it,
/// checks it, and evaluates to the time it took (only building and running it is timed).
/// A macro because `$lib` is one of two crates: this library, or its build without spans.
macro_rules! timed_run {
    ($lib:ident, $rt:expr, $ids:expr) => {{
        let (rt, ids): (&Runtime, &[String]) = ($rt, $ids);
        let ctx = Arc::new($lib::Context::new($lib::MemoryStore::new()));
        let start = Instant::now();
        let (dag, stats) = rt.block_on(async {
            let dag = DagRunner::new();
            let stats = {
                let d = $lib::DurableDag::new(&dag, Arc::clone(&ctx));
                for (i, id) in ids.iter().enumerate() {
                    d.add(id, Val(i as u64));
                }
                support::run_spawned(&dag, "spans benchmark").await;
                d.stats()
            };
            (dag, stats)
        });
        let elapsed = start.elapsed();
        assert_eq!(
            (stats.executed, stats.cached, stats.failed),
            (ids.len(), 0, 0)
        );
        assert_eq!(ctx.get::<u64>("task-7"), Some(7));
        drop((dag, ctx));
        elapsed
    }};
}

/// What a variant runs under.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// `duraflow_no_spans`, with whatever subscriber there is (its runs make no spans).
    NoSpans,
    /// This library, with no scoped subscriber (the global one, if any).
    Current,
    /// This library, with a fresh registry as the scoped default.
    Registry,
    /// This library, with a fresh registry + `ProgressLayer` as the scoped default.
    Progress,
}

/// A registry with a `ProgressLayer` counting its calls into `reported`.
fn progress_subscriber(reported: &Arc<AtomicUsize>) -> impl tracing::Subscriber + Send + Sync {
    let counter = Arc::clone(reported);
    tracing_subscriber::registry().with(ProgressLayer::new(move |_, _| {
        counter.fetch_add(1, Ordering::Relaxed);
    }))
}

/// One timed run of `variant`. A scoped subscriber is made before it and dropped after it,
/// untimed, and tracing's interest cache is then rebuilt, so that no subscriber outlives its
/// run (and the next run without one takes tracing's path for a process without any). With
/// `ProgressLayer`, checks that it reported every task (`global`: the global one, counting
/// into `reported`).
fn run_variant(
    variant: Variant,
    rt: &Runtime,
    ids: &[String],
    global: Option<&AtomicUsize>,
) -> Duration {
    let reported = Arc::new(AtomicUsize::new(0));
    let scoped = match variant {
        Variant::Registry => Some(tracing::Dispatch::new(tracing_subscriber::registry())),
        Variant::Progress => Some(tracing::Dispatch::new(progress_subscriber(&reported))),
        Variant::NoSpans | Variant::Current => None,
    };
    let before = global.map(|count| count.load(Ordering::Relaxed));
    let elapsed = match (&scoped, variant) {
        (_, Variant::NoSpans) => timed_run!(duraflow_no_spans, rt, ids),
        (None, _) => timed_run!(duraflow_rs, rt, ids),
        (Some(dispatch), _) => {
            tracing::dispatcher::with_default(dispatch, || timed_run!(duraflow_rs, rt, ids))
        }
    };
    if variant == Variant::Progress {
        assert_eq!(reported.load(Ordering::Relaxed), ids.len());
    }
    if let (Some(count), Some(before), Variant::Current) = (global, before, variant) {
        assert_eq!(count.load(Ordering::Relaxed) - before, ids.len());
    }
    if scoped.is_some() {
        drop(scoped);
        tracing::callsite::rebuild_interest_cache();
    }
    elapsed
}

/// Criterion's measurement of `variants`.
fn criterion_runs(
    c: &mut Criterion,
    rt: &Runtime,
    ids: &[String],
    variants: &[Case],
    global: Option<&AtomicUsize>,
) {
    let mut group = c.benchmark_group(GROUP);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(60)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    for &(id, variant, _) in variants {
        if !support::selected(GROUP, id) {
            continue;
        }
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| run_variant(variant, rt, ids, global))
                    .sum()
            })
        });
    }
    group.finish();
}

/// `rounds` interleaved rounds of `variants` (the first is the baseline): every round runs
/// each once, starting at a different one each round. Prints each variant's median time,
/// and its ratio to the baseline's as the median of the per-round ratios (each round's runs
/// are back to back, so a drift in load moves both sides of a round's ratio alike), with
/// their quartiles, against its target.
fn interleaved_runs(
    rt: &Runtime,
    ids: &[String],
    rounds: usize,
    variants: &[Case],
    global: Option<&AtomicUsize>,
) {
    let variants: Vec<Case> = variants
        .iter()
        .enumerate()
        .filter(|&(i, &(id, _, _))| i == 0 || support::selected(GROUP, id))
        .map(|(_, v)| *v)
        .collect();
    if variants.len() < 2 || rounds == 0 {
        return;
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); variants.len()];
    for round in 0..rounds + 2 {
        for k in 0..variants.len() {
            let v = (round + k) % variants.len();
            let elapsed = run_variant(variants[v].1, rt, ids, global);
            if round >= 2 {
                times[v].push(elapsed); // the first two rounds warm up
            }
        }
    }
    println!(
        "\n== interleaved: {rounds} rounds of {} ==",
        variants
            .iter()
            .map(|(id, _, _)| *id)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<24} {:>8}    ratio to {BASELINE}: median of rounds [quartiles]",
        "", "median"
    );
    for (v, &(id, _, target)) in variants.iter().enumerate() {
        let mut ratios: Vec<f64> = times[v]
            .iter()
            .zip(&times[0])
            .map(|(t, base)| t.as_secs_f64() / base.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let quartile = |q: usize| ratios[(ratios.len() - 1) * q / 4];
        println!(
            "{id:<24} {:>8.3} ms  {:>6.3}x  [{:.3} .. {:.3}]  {}",
            support::median_ms(&mut times[v].clone()),
            quartile(2),
            quartile(1),
            quartile(3),
            support::verdict(quartile(2), target)
        );
    }
}

fn main() {
    let since = SystemTime::now();
    let mut criterion = Criterion::default().configure_from_args();
    let rt = runtime();
    let ids: Vec<String> = support::task_ids(N, N_SMOKE);
    let rounds = match std::env::var(ROUNDS_VAR) {
        Ok(v) => v.parse().expect("DURAFLOW_SPANS_ROUNDS: a number"),
        Err(_) if support::smoke_test() => 1,
        Err(_) => 300,
    };

    // With no subscriber installed anywhere yet.
    let scoped = &VARIANTS[..4];
    criterion_runs(&mut criterion, &rt, &ids, scoped, None);
    interleaved_runs(&rt, &ids, rounds, scoped, None);

    // Then with the global default, for good.
    let reported = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(progress_subscriber(&reported))
        .expect("no global subscriber yet");
    let global = [VARIANTS[0], VARIANTS[4]];
    criterion_runs(&mut criterion, &rt, &ids, &global[1..], Some(&reported));
    interleaved_runs(&rt, &ids, rounds, &global, Some(&reported));

    criterion.final_summary();
    // Criterion's variants ran one after another, not in rounds: their ratios are shown
    // without a verdict (the verdicts are the interleaved ones above).
    let ratios: Vec<_> = VARIANTS[1..]
        .iter()
        .map(|&(id, _, _)| (id, BASELINE, None))
        .collect();
    let ids: Vec<&str> = VARIANTS.iter().map(|(id, _, _)| *id).collect();
    support::print_summary(GROUP, N, &ids, &ratios, since);
    println!("(criterion's variants ran one after another; the verdicts are the interleaved ones)");
}
