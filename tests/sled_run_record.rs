//! Promise (`SledStore`, `Durability::Immediate`): when a DAG's run returns, the run's final
//! record is on disk, whether it executed its tasks or found them all cached, and whatever
//! its progress callback did (the child's panics on every call). A real child process runs
//! the DAG, reports that the run returned, and is killed with SIGKILL at once; the store,
//! reopened, shows the run `Succeeded` with its counts.
//!
//! The test binary re-executes itself as the child: `run_record_child` is an ignored test
//! that only does work when the parent passes the store directory in the environment.

#![cfg(unix)]

mod common;

use common::wait;
use duraflow_rs::RunHistory;

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
    // The callback's panics are expected: keep them off stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx).with_progress(|_, _| panic!("the progress display broke"));
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

    // A run that executed every task, then one that found every task cached.
    for (round, counts) in [(TASKS as u64, 0), (0, TASKS as u64)]
        .into_iter()
        .enumerate()
    {
        let (executed, cached) = run_and_kill(dir.path());
        assert_eq!((executed as u64, cached as u64), counts);
        let store = SledStore::open(dir.path()).unwrap();
        let runs = wait(store.runs()).unwrap();
        assert_eq!(runs.len(), round + 1, "{runs:?}");
        let run = &runs[round];
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        assert_eq!((run.executed, run.cached), counts);
        let attempts = wait(store.run(run.id)).unwrap().unwrap().attempts;
        assert_eq!(attempts.len(), TASKS, "every attempt is on disk too");
    }
    let store = SledStore::open(dir.path()).unwrap();
    let ctx = Context::new(store);
    for i in 0..TASKS {
        assert_eq!(ctx.get::<u64>(&format!("t{i}")), Some(i as u64));
    }
}
