//! A scoped subscriber that is the only `Dispatch` in the process still sees every span of a
//! run made in its scope, even after a run made outside it (with no subscriber at all) was
//! the first to reach duraflow's span and event call sites.
//!
//! tracing-core caches each call site's interest when the call site is first reached. While
//! exactly one `Dispatch` exists, it asks only the *current thread's* default
//! (tokio-rs/tracing#3611): a first visit on a thread without that subscriber caches "never",
//! and every later span of that call site is disabled, in every scope. A run made in a
//! subscriber's scope rebuilds the interest cache, so this does not hide its spans.
//!
//! Any other `Dispatch` alive in the process hides the problem (tracing then asks every
//! registered one), so this binary holds one test and makes one `Dispatch`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{multi_thread_rt, Val};
use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, MemoryStore, ProgressLayer};
use tracing_subscriber::layer::SubscriberExt;

const WIDTH: usize = 64;

/// Runs a fresh wide DAG of `WIDTH` tasks over a new `MemoryStore`, its tasks spawned on
/// the runtime's worker threads; returns how many tasks executed.
fn run_dag(rt: &tokio::runtime::Runtime) -> usize {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let dag = DagRunner::new();
    let durable = DurableDag::new(&dag, ctx);
    for i in 0..WIDTH {
        durable.add(&format!("t{i}"), Val(i as u64));
    }
    rt.block_on(dag.run(|f| {
        tokio::spawn(f);
    }))
    .unwrap();
    durable.stats().executed
}

#[test]
fn a_scoped_progress_layer_reports_after_a_run_without_subscriber() {
    let rt = multi_thread_rt();
    let reported = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reported);
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(ProgressLayer::new(
        move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
        },
    )));

    // First, a run outside the subscriber's scope: it reaches every call site first, on
    // threads where the only subscriber is not the default.
    assert_eq!(run_dag(&rt), WIDTH);
    assert_eq!(reported.load(Ordering::SeqCst), 0);

    // Then a run made in its scope: every task is reported.
    let executed = tracing::dispatcher::with_default(&dispatch, || run_dag(&rt));
    assert_eq!(executed, WIDTH);
    assert_eq!(reported.load(Ordering::SeqCst), WIDTH);
}
