//! What the `duraflow.run` / `duraflow.task` spans cost: the 10,000-task wide DAG over a
//! fresh `MemoryStore` (the `memory_v2` case of `benches/overhead.rs`), run
//!
//! - `no_subscriber`: with no `tracing` subscriber at all (spans are created disabled): the
//!   baseline;
//! - `registry_only`: with `tracing_subscriber::registry()` alone as the scoped default of
//!   the thread that builds and runs the DAG (real spans, no layer);
//! - `progress_layer`: with `registry().with(ProgressLayer::new(..))` as that scoped default;
//! - `progress_layer_global`: the same subscriber installed as the global default.
//!
//! Guards, against `no_subscriber`: `progress_layer` and `progress_layer_global` ≤ 1.25×.
//!
//! `cargo bench --bench spans`: first criterion measures each variant in turn; then the
//! scoped variants run in interleaved rounds (each round runs every variant once, in an
//! order that rotates), and their verdicts are the medians over the rounds of each round's
//! ratio to `no_subscriber`. The global default cannot be taken back, so
//! `progress_layer_global` runs last, in criterion only, compared with criterion's
//! `no_subscriber`.
//!
//! One iteration creates the `DagRunner`, adds the 10,000 tasks through `DurableDag::add`,
//! and runs them with `tokio::spawn` on a multi-thread runtime with 2 worker threads.
//! `DURAFLOW_SPANS_ROUNDS` sets the number of interleaved rounds (default 300).

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
const BASELINE: &str = "no_subscriber";
/// One variant: its id, what it runs as, and its guard against the baseline.
type Case = (&'static str, Variant, Option<f64>);
/// The variants, in the order they run: the first three in a process with no global
/// subscriber, the last once one is installed.
const VARIANTS: [Case; 4] = [
    (BASELINE, Variant::Current, None),
    ("registry_only", Variant::Registry, None),
    ("progress_layer", Variant::Progress, Some(1.25)),
    ("progress_layer_global", Variant::Current, Some(1.25)),
];
/// Sets the number of interleaved rounds.
const ROUNDS_VAR: &str = "DURAFLOW_SPANS_ROUNDS";

/// Builds the wide DAG over a fresh `MemoryStore`, runs it, checks it, and returns the time
/// it took (only building and running it is timed).
fn timed_run(rt: &Runtime, ids: &[String]) -> Duration {
    let ctx = Arc::new(duraflow_rs::Context::new(duraflow_rs::MemoryStore::new()));
    let start = Instant::now();
    let (dag, stats) = rt.block_on(async {
        let dag = DagRunner::new();
        let stats = {
            let d = duraflow_rs::DurableDag::new(&dag, Arc::clone(&ctx));
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
}

/// What a variant runs under.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
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
        Variant::Current => None,
    };
    let before = global.map(|count| count.load(Ordering::Relaxed));
    let elapsed = match &scoped {
        None => timed_run(rt, ids),
        Some(dispatch) => tracing::dispatcher::with_default(dispatch, || timed_run(rt, ids)),
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
    let scoped = &VARIANTS[..3];
    criterion_runs(&mut criterion, &rt, &ids, scoped, None);
    interleaved_runs(&rt, &ids, rounds, scoped, None);

    // Then with the global default, for good.
    let reported = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(progress_subscriber(&reported))
        .expect("no global subscriber yet");
    criterion_runs(&mut criterion, &rt, &ids, &VARIANTS[3..], Some(&reported));

    criterion.final_summary();
    // Criterion's variants ran one after another, not in rounds: their ratios are shown
    // without a verdict (the verdicts are the interleaved ones above).
    let ratios: Vec<_> = VARIANTS[1..]
        .iter()
        .map(|&(id, _, target)| (id, BASELINE, target))
        .collect();
    let ids: Vec<&str> = VARIANTS.iter().map(|(id, _, _)| *id).collect();
    support::print_summary(GROUP, N, &ids, &ratios, since);
    println!("(criterion's variants ran one after another; for the scoped variants the interleaved verdicts are the ones to trust)");
}
