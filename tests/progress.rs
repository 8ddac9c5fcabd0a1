//! Promise: the progress callback is called exactly once per task per run, for cached and
//! executed tasks alike, after the output is persisted; `completed_count` counts the same.

mod common;

use common::wait;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::{multi_thread_rt, Inc, Val};
use dagx::{DagRunner, TaskHandle};
use duraflow_rs::{Context, DurableDag, MemoryStore, RunStats};

type Calls = Arc<Mutex<Vec<(String, usize, bool)>>>;

/// A DAG of `width` chains of length 3 (val → inc → inc), with ids that encode the position.
/// Returns the calls the progress callback received: (id, completed, persisted-at-call-time).
fn run_once(ctx: &Arc<Context>, width: usize) -> (Vec<(String, usize, bool)>, RunStats, Vec<u64>) {
    let dag = DagRunner::new();
    let calls: Calls = Arc::default();
    let db = ctx.db.clone();
    let sink = calls.clone();
    let d = DurableDag::new(&dag, ctx.clone()).with_progress(move |id, completed| {
        let persisted = wait(db.read(id)).ok().flatten().is_some();
        sink.lock()
            .unwrap()
            .push((id.to_owned(), completed, persisted));
    });
    let mut ends: Vec<TaskHandle<u64>> = Vec::new();
    for w in 0..width {
        let a = d.add(&format!("val/{w}"), Val(w as u64));
        let b = d.add(&format!("inc1/{w}"), Inc).depends_on(&a);
        ends.push(d.add(&format!("inc2/{w}"), Inc).depends_on(b));
    }
    multi_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
    let outputs = ends.into_iter().map(|h| dag.get(h).unwrap()).collect();
    let calls = calls.lock().unwrap().clone();
    (calls, d.stats(), outputs)
}

fn check_calls(calls: &[(String, usize, bool)], expected_tasks: usize) {
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for (id, _, persisted) in calls {
        *per_id.entry(id).or_default() += 1;
        assert!(*persisted, "{id} reported before its output was persisted");
    }
    assert_eq!(per_id.len(), expected_tasks);
    assert!(
        per_id.values().all(|&n| n == 1),
        "some task reported twice: {per_id:?}"
    );
    let mut counts: Vec<usize> = calls.iter().map(|c| c.1).collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=expected_tasks).collect::<Vec<_>>(),
        "counts are 1..=n, each once"
    );
}

#[test]
fn progress_once_per_task_per_run_for_executed_and_cached_tasks() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let width = 50;
    let tasks = width * 3;

    let (calls, stats, out1) = run_once(&ctx, width);
    check_calls(&calls, tasks);
    assert_eq!((stats.executed, stats.cached, stats.failed), (tasks, 0, 0));
    assert_eq!(ctx.completed_count.load(Ordering::SeqCst), tasks);
    assert_eq!(out1, (0..width as u64).map(|w| w + 2).collect::<Vec<_>>());

    let (calls, stats, out2) = run_once(&ctx, width);
    check_calls(&calls, tasks);
    assert_eq!((stats.executed, stats.cached, stats.failed), (0, tasks, 0));
    assert_eq!(ctx.completed_count.load(Ordering::SeqCst), 2 * tasks);
    assert_eq!(out2, out1);
}

#[test]
fn a_partly_cached_run_reports_every_task_once() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    run_once(&ctx, 10);
    for w in (0..10).step_by(2) {
        assert!(wait(ctx.db.remove(&format!("inc2/{w}"))).unwrap());
    }
    let (calls, stats, out) = run_once(&ctx, 10);
    check_calls(&calls, 30);
    assert_eq!((stats.executed, stats.cached), (5, 25));
    assert_eq!(out, (0..10u64).map(|w| w + 2).collect::<Vec<_>>());
}

#[test]
fn standalone_durable_reports_itself_once() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let calls: Calls = Arc::default();
    let sink = calls.clone();
    let cb: duraflow_rs::ProgressFn = Arc::new(move |id: &str, n: usize| {
        sink.lock().unwrap().push((id.to_owned(), n, true));
    });
    let rt = multi_thread_rt();
    for _ in 0..2 {
        let durable = duraflow_rs::Durable::new("solo", ctx.clone(), Val(4), Some(cb.clone()));
        assert_eq!(rt.block_on(durable.run_result(())).unwrap(), 4);
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![("solo".into(), 1, true), ("solo".into(), 1, true)]
    );
    assert_eq!(ctx.completed_count.load(Ordering::SeqCst), 2);
}
