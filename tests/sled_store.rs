//! Promises of the sled store: outputs survive reopening (tasks never run again), every run
//! and attempt is recorded and queryable, one handle at a time, and paths that are not a
//! duraflow store are refused untouched.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{multi_thread_rt, Boom};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{
    AttemptOutcome, Context, DurableDag, DuraflowError, RunStats, RunStatus, SledStore, Storage,
};

/// A task that counts how often its body runs.
#[derive(Clone)]
struct Counted {
    n: u64,
    runs: Arc<AtomicUsize>,
}
#[task]
impl Counted {
    async fn run(&self) -> u64 {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.n * 10
    }
}

const TASKS: u64 = 40;

/// One run of `TASKS` counted tasks (plus a panicking one if `boom`) over the store at `path`.
fn run_round(path: &std::path::Path, runs: &Arc<AtomicUsize>, boom: bool) -> RunStats {
    run_round_in(SledStore::open(path).unwrap(), runs, boom)
}

/// One run of `TASKS` counted tasks (plus a panicking one if `boom`) over `store`.
fn run_round_in(store: SledStore, runs: &Arc<AtomicUsize>, boom: bool) -> RunStats {
    let ctx = Arc::new(Context::new(store));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    for n in 0..TASKS {
        d.add(
            &format!("t/{n}"),
            Counted {
                n,
                runs: runs.clone(),
            },
        );
    }
    if boom {
        d.add("boom", Boom);
    }
    let _ = multi_thread_rt().block_on(dag.run(|f| {
        tokio::spawn(f);
    }));
    for n in 0..TASKS {
        assert_eq!(ctx.get::<u64>(&format!("t/{n}")), Some(n * 10));
    }
    d.stats()
}

#[test]
fn three_rounds_over_one_file_execute_each_task_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.db");
    let runs = Arc::new(AtomicUsize::new(0));
    let first = run_round(&path, &runs, false);
    assert_eq!((first.executed, first.cached), (TASKS as usize, 0));
    for _ in 0..2 {
        let again = run_round(&path, &runs, false);
        assert_eq!((again.executed, again.cached), (0, TASKS as usize));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        TASKS as usize,
        "no task ran twice"
    );
}

#[test]
fn runs_and_attempts_are_recorded_and_queryable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let runs = Arc::new(AtomicUsize::new(0));
    run_round(&path, &runs, false); // clean, all executed
    run_round(&path, &runs, true); // cached + one panicking task

    let store = SledStore::open(&path).unwrap();
    let all = store.runs().unwrap();
    assert_eq!(all.len(), 2);
    let (clean, failed) = (&all[0], &all[1]);
    assert!(clean.id < failed.id, "run ids increase");
    assert_eq!(clean.status, RunStatus::Succeeded);
    assert_eq!((clean.executed, clean.cached, clean.failed), (TASKS, 0, 0));
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(
        (failed.executed, failed.cached, failed.failed),
        (0, TASKS, 1)
    );
    assert!(clean.finished_ms.unwrap() >= clean.started_ms);

    let details = store.run(clean.id).unwrap().unwrap();
    assert_eq!(details.attempts.len(), TASKS as usize);
    for a in &details.attempts {
        assert_eq!(a.outcome, AttemptOutcome::Succeeded, "{a:?}");
        assert_eq!(a.attempt, 1);
        assert!(a.output_size.unwrap() > 0 && a.duration_us.is_some());
        assert!(
            store.read(&a.key).unwrap().is_some(),
            "a Succeeded attempt has its output"
        );
    }
    let details = store.run(failed.id).unwrap().unwrap();
    let boom = details.attempts.iter().find(|a| a.key == "boom").unwrap();
    match &boom.outcome {
        AttemptOutcome::Failed { error } => assert!(error.contains("boom"), "{error}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    let cached = details
        .attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Cached)
        .count();
    assert_eq!(cached, TASKS as usize);

    let history = store.attempts_of("t/3").unwrap();
    let outcomes: Vec<_> = history.iter().map(|a| (a.run, a.outcome.clone())).collect();
    assert_eq!(
        outcomes,
        vec![
            (clean.id, AttemptOutcome::Succeeded),
            (failed.id, AttemptOutcome::Cached)
        ]
    );
    assert!(store.run(failed.id + 100).unwrap().is_none());
    assert!(store.attempts_of("never-ran").unwrap().is_empty());
}

#[test]
fn a_second_open_of_the_same_path_is_store_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
    let first = SledStore::open(&path).unwrap();
    match SledStore::open(&path) {
        Err(DuraflowError::StoreLocked { path: p }) => assert_eq!(p, path),
        other => panic!("expected StoreLocked, got {other:?}"),
    }
    drop(first);
    SledStore::open(&path).expect("released on drop");
}

#[test]
fn paths_that_are_not_stores_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"precious").unwrap();
    assert!(matches!(
        SledStore::open(&file),
        Err(DuraflowError::NotAStore { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let other = dir.path().join("someone-elses-dir");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"keep me").unwrap();
    match SledStore::open(&other) {
        Err(DuraflowError::NotAStore { path, .. }) => assert_eq!(path, other),
        other => panic!("expected NotAStore, got {other:?}"),
    }
    let names: Vec<_> = std::fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("notes.txt")],
        "nothing added"
    );

    // A sled database that some other program made.
    let foreign = dir.path().join("foreign.db");
    {
        let db = sled::open(&foreign).unwrap();
        db.open_tree("their-data")
            .unwrap()
            .insert("k", "v")
            .unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        SledStore::open(&foreign),
        Err(DuraflowError::NotAStore { .. })
    ));
    let db = sled::open(&foreign).unwrap();
    assert_eq!(
        db.open_tree("their-data")
            .unwrap()
            .get("k")
            .unwrap()
            .as_deref(),
        Some(&b"v"[..])
    );
}

#[test]
fn a_damaged_database_is_corrupt_not_a_panic_nor_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.db");
    {
        let ctx = Context::new(SledStore::open(&path).unwrap());
        for i in 0..500u64 {
            ctx.save(&format!("k{i}"), &vec![i; 50]).unwrap();
        }
    }
    let db_file = path.join("db");
    let mut bytes = std::fs::read(&db_file).unwrap();
    for i in (0..bytes.len()).step_by(97) {
        bytes[i] ^= 0xff;
    }
    std::fs::write(&db_file, &bytes).unwrap();
    match std::panic::catch_unwind(|| SledStore::open(&path)) {
        Ok(Err(e @ DuraflowError::Corrupt { .. })) => {
            assert!(e.to_string().starts_with("store at "), "{e}");
            assert!(matches!(e, DuraflowError::Corrupt { path: Some(ref p), .. } if *p == path));
        }
        Ok(other) => panic!("expected Corrupt, got {:?}", other.map(|_| "an open store")),
        Err(_) => panic!("sled's panic escaped SledStore::open"),
    }
}

const HOLDER_VAR: &str = "DURAFLOW_SLED_LOCK_HOLDER";
const HELD: &str = "duraflow-sled-lock-holder: open";

/// Not a test of its own: the child process of
/// `a_store_open_in_another_process_is_store_locked`.
#[test]
#[ignore = "helper: run only as a child process by the cross-process lock test"]
fn sled_lock_holder() {
    let path = std::env::var(HOLDER_VAR).expect("run by the cross-process lock test");
    let _store = SledStore::open(path).unwrap();
    println!("\n{HELD}");
    let _ = std::io::stdin().read_line(&mut String::new());
}

#[test]
fn a_store_open_in_another_process_is_store_locked() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sled_lock_holder",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_VAR, &path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    assert!(stdout.lines().map(|l| l.unwrap()).any(|l| l.contains(HELD)));
    assert!(matches!(
        SledStore::open(&path),
        Err(DuraflowError::StoreLocked { .. })
    ));
    child.kill().unwrap();
    child.wait().unwrap();
    SledStore::open(&path).expect("the lock dies with the process");
}

#[test]
fn periodic_durability_persists_and_resumes_like_immediate() {
    use duraflow_rs::{Durability, SledConfig};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("periodic.db");
    let runs = Arc::new(AtomicUsize::new(0));
    for round in 0..2 {
        let store = SledConfig::new(&path)
            .durability(Durability::Periodic(std::time::Duration::from_millis(20)))
            .open()
            .unwrap();
        let stats = run_round_in(store, &runs, false);
        let expected = if round == 0 {
            (TASKS as usize, 0)
        } else {
            (0, TASKS as usize)
        };
        assert_eq!((stats.executed, stats.cached), expected);
    }
    assert_eq!(runs.load(Ordering::SeqCst), TASKS as usize);
}
