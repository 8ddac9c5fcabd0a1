//! A scoped subscriber that is the only `Dispatch` in the process still sees every span of a
//! run made in its scope, even after a run made outside it (with no subscriber at all) was
//! the first to reach duraflow's span call sites.
//!
//! tracing-core caches each call site's interest when the call site is first reached. While
//! exactly one `Dispatch` exists, it asks only the *current thread's* default
//! (tokio-rs/tracing#3611): a first visit on a thread without that subscriber caches "never",
//! and every later span of that call site is disabled, in every scope. A run made in a
//! subscriber's scope whose span, or a task's, comes out disabled rebuilds the interest
//! cache, so this does not hide its spans. Two scenarios, one per path:
//!
//! - `run`: the run outside the scope reached both call sites first (the run's and the
//!   tasks'): the next scoped run finds its own span disabled.
//! - `task`: a run made in the scope (never run) reached the run's call site first, then a
//!   run outside the scope reached the tasks': the next scoped run has its span, but its
//!   first task finds its own disabled.
//!
//! Any other `Dispatch` alive in the process hides the problem (tracing then asks every
//! registered one), and a call site's first visit happens once per process, so each
//! scenario runs in a child process of its own: this test binary re-executed, running the
//! ignored test `scoped_child`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{multi_thread_rt, Val};
use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, MemoryStore, ProgressLayer};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};

const WIDTH: usize = 64;
/// The scenario the child runs; the child does nothing without it.
const SCENARIO_ENV: &str = "DURAFLOW_SCOPED_SCENARIO";
const CHILD_TEST: &str = "scoped_child";

/// A run of `WIDTH` tasks on `dag`, over a new `MemoryStore` (made where this is called).
fn wide_run(dag: &DagRunner) -> DurableDag<'_> {
    let durable = DurableDag::new(dag, Arc::new(Context::new(MemoryStore::new())));
    for i in 0..WIDTH {
        durable.add(&format!("t{i}"), Val(i as u64));
    }
    durable
}

/// Makes a fresh wide DAG where this is called and runs it, its tasks spawned on the
/// runtime's worker threads; returns how many tasks executed.
fn run_dag(rt: &tokio::runtime::Runtime) -> usize {
    let dag = DagRunner::new();
    let durable = wide_run(&dag);
    rt.block_on(dag.run(|f| {
        tokio::spawn(f);
    }))
    .unwrap();
    durable.stats().executed
}

/// Counts the `duraflow.run` spans made.
struct RunSpans(Arc<AtomicUsize>);

impl<S: Subscriber> Layer<S> for RunSpans {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: LayerContext<'_, S>) {
        if attrs.metadata().name() == "duraflow.run" {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
#[ignore = "helper: run only as a child process by a_scoped_progress_layer_reports_after_a_run_without_subscriber"]
fn scoped_child() {
    let Ok(scenario) = std::env::var(SCENARIO_ENV) else {
        eprintln!("{CHILD_TEST}: {SCENARIO_ENV} is not set; nothing to do");
        return;
    };
    let rt = multi_thread_rt();
    let reported = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reported);
    let runs = Arc::new(AtomicUsize::new(0));
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(RunSpans(Arc::clone(&runs)))
            .with(ProgressLayer::new(move |_, _| {
                counter.fetch_add(1, Ordering::SeqCst);
            })),
    );

    match scenario.as_str() {
        "run" => {}
        "task" => {
            // A run made in the scope, never run: the run's call site is reached first
            // there, and enabled.
            tracing::dispatcher::with_default(&dispatch, || drop(wide_run(&DagRunner::new())));
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
        other => panic!("unknown scenario {other:?}"),
    }
    // A run outside the subscriber's scope, on threads where the only subscriber is not
    // the default: it reaches the call sites not reached yet.
    assert_eq!(run_dag(&rt), WIDTH);
    assert_eq!(reported.load(Ordering::SeqCst), 0);

    // Then a run made in its scope: its span is made, and every task is reported.
    let runs_before = runs.load(Ordering::SeqCst);
    let executed = tracing::dispatcher::with_default(&dispatch, || run_dag(&rt));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        runs_before + 1,
        "scenario {scenario}"
    );
    assert_eq!(executed, WIDTH);
    assert_eq!(
        reported.load(Ordering::SeqCst),
        WIDTH,
        "scenario {scenario}"
    );
}

#[test]
fn a_scoped_progress_layer_reports_after_a_run_without_subscriber() {
    for scenario in ["run", "task"] {
        let output = common::child_test(CHILD_TEST)
            .env(SCENARIO_ENV, scenario)
            .output()
            .expect("run the child");
        assert!(
            output.status.success(),
            "scenario {scenario}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
