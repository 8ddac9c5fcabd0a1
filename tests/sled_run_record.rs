//! Promise (`SledStore`, `Durability::Immediate`): when a DAG's run returns, the run's final
//! record is on disk if the run executed anything. A real child process runs the DAG,
//! reports that the run returned, and is killed with SIGKILL at once; the store, reopened,
//! shows the run `Succeeded` with its counts.
//!
//! A run that executed nothing (every task cached) is not flushed for its own sake (see
//! `SledStore`'s guarantees): killed the same way, it shows `Succeeded` or `Interrupted`, or
//! is not recorded at all (its start was not flushed either), never `Running`; the outputs
//! are untouched.
//!
//! The test binary re-executes itself as the child: `run_record_child` is an ignored test
//! that only does work when the parent passes the store directory in the environment.

#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use common::Val;
use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, RunStatus, SledStore};

/// Store directory for the child; the child does nothing without it.
const DIR_ENV: &str = "DURAFLOW_RUN_RECORD_DIR";
const CHILD_TEST: &str = "run_record_child";
/// Every line the child reports starts with this marker (libtest prints its own text
/// before the first one).
const MARKER: &str = "@@ ";
const TASKS: usize = 40;

#[test]
#[ignore = "helper: run only as a child process by a_returned_run_is_recorded_on_disk"]
fn run_record_child() {
    let Some(dir) = common::child_dir(DIR_ENV, CHILD_TEST) else {
        return;
    };
    let ctx = Arc::new(Context::new(SledStore::open(&dir).expect("child: open")));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx);
    for i in 0..TASKS {
        d.add(&format!("t{i}"), Val(i as u64));
    }
    common::multi_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .expect("child: the run succeeds");
    let stats = d.stats();
    println!("{MARKER}returned {} {}", stats.executed, stats.cached);
    // Wait to be killed: the parent keeps stdin open and never writes to it.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Runs the child over `dir` until it reports that its run returned, kills it with
/// SIGKILL, and returns its (executed, cached) counts.
fn run_and_kill(dir: &Path) -> (usize, usize) {
    let mut child = common::child_test(CHILD_TEST)
        .env(DIR_ENV, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let line = BufReader::new(stdout)
        .lines()
        .map(|l| l.expect("read the child's stdout"))
        .find_map(|l| l.split_once(MARKER).map(|(_, r)| r.to_owned()));
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    let report = line.expect("the child reported that its run returned");
    let counts: Vec<usize> = report
        .strip_prefix("returned ")
        .expect("a `returned` report")
        .split(' ')
        .map(|n| n.parse().expect("a count"))
        .collect();
    (counts[0], counts[1])
}

#[test]
fn a_returned_run_is_recorded_on_disk() {
    let dir = tempfile::tempdir().unwrap();

    // A run that executed every task: its final record was flushed before it returned.
    assert_eq!(run_and_kill(dir.path()), (TASKS, 0));
    let store = SledStore::open(dir.path()).unwrap();
    let runs = store.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Succeeded);
    assert_eq!((runs[0].executed, runs[0].cached), (TASKS as u64, 0));
    drop(store);

    // A run that executed nothing: finished, interrupted or absent, never left `Running`.
    assert_eq!(run_and_kill(dir.path()), (0, TASKS));
    let store = SledStore::open(dir.path()).unwrap();
    let runs = store.runs().unwrap();
    assert!(matches!(runs.len(), 1 | 2), "{runs:?}");
    assert_eq!(runs[0].status, RunStatus::Succeeded);
    if let Some(cached) = runs.get(1) {
        assert!(
            matches!(cached.status, RunStatus::Succeeded | RunStatus::Interrupted),
            "{cached:?}"
        );
    }
    let ctx = Context::new(store);
    for i in 0..TASKS {
        assert_eq!(ctx.get::<u64>(&format!("t{i}")), Some(i as u64));
    }
}
