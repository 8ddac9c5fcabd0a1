//! Promises of the sled store: outputs survive reopening (tasks never run again), every run
//! and attempt is recorded and queryable (cached attempts too, which the store keeps many to
//! a value), one handle at a time (and the store opens again as soon as the handle is
//! dropped), paths that are not a duraflow store are refused untouched, a value over a
//! configured maximum size is a `Persist` error that keeps the previous value, and large
//! outputs are checked files of their own that gc removes once nothing refers to them.

mod common;

use common::wait;
use duraflow_rs::RunHistory;

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{current_thread_rt, multi_thread_rt, Boom};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{
    AttemptOutcome, Context, Durable, DurableDag, DuraflowError, RunStats, RunStatus, SledConfig,
    SledStore, Storage,
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
    let all = wait(store.runs()).unwrap();
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

    let details = wait(store.run(clean.id)).unwrap().unwrap();
    assert_eq!(details.attempts.len(), TASKS as usize);
    for a in &details.attempts {
        assert_eq!(a.outcome, AttemptOutcome::Succeeded, "{a:?}");
        assert_eq!(a.attempt, 1);
        assert!(a.output_size.unwrap() > 0 && a.duration_us.is_some());
        assert!(
            wait(store.read(&a.key)).unwrap().is_some(),
            "a Succeeded attempt has its output"
        );
    }
    let details = wait(store.run(failed.id)).unwrap().unwrap();
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

    let history = wait(store.attempts_of("t/3")).unwrap();
    let outcomes: Vec<_> = history.iter().map(|a| (a.run, a.outcome.clone())).collect();
    assert_eq!(
        outcomes,
        vec![
            (clean.id, AttemptOutcome::Succeeded),
            (failed.id, AttemptOutcome::Cached)
        ]
    );
    assert!(wait(store.run(failed.id + 100)).unwrap().is_none());
    assert!(wait(store.attempts_of("never-ran")).unwrap().is_empty());
}

/// Far longer than a prompt `StoreLocked` takes, far shorter than the 2 s an open waits
/// for the lock of a handle this process just dropped.
const PROMPT: Duration = Duration::from_millis(1500);

#[test]
fn a_second_open_of_the_same_path_is_store_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
    let first = SledStore::open(&path).unwrap();
    // Also under another spelling of the same path.
    let other_spelling = dir.path().join(".").join("locked.db");
    for p in [&path, &other_spelling] {
        let start = Instant::now();
        match SledStore::open(p) {
            Err(DuraflowError::StoreLocked { path: locked }) => assert_eq!(&locked, p),
            other => panic!("expected StoreLocked, got {other:?}"),
        }
        assert!(start.elapsed() < PROMPT, "took {:?}", start.elapsed());
    }
    drop(first);
    SledStore::open(&path).expect("released on drop");
}

#[test]
fn a_dropped_store_opens_again_at_once_in_the_same_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reopen.db");
    let other_spelling = dir.path().join(".").join("reopen.db");
    let runs = Arc::new(AtomicUsize::new(0));
    for round in 0..20 {
        // Every round writes (a run, its records, a flush), so sled's threads have work in
        // flight when the handle is dropped.
        let p = if round % 2 == 0 {
            &path
        } else {
            &other_spelling
        };
        let store = SledStore::open(p)
            .unwrap_or_else(|e| panic!("round {round}: reopen right after the drop: {e}"));
        let stats = run_round_in(store, &runs, false);
        assert_eq!(stats.completed(), TASKS as usize);
        // `run_round_in` dropped the store (its only handle) before returning; sled's lock
        // on its `db` file is free for anyone, another process too, once the drop returned.
        let lock = std::fs::File::open(path.join("db")).unwrap();
        lock.try_lock().unwrap_or_else(|e| {
            panic!("round {round}: sled's lock still held after the drop: {e}")
        });
        lock.unlock().unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), TASKS as usize);
    let store = SledStore::open(&path).unwrap();
    assert_eq!(wait(store.runs()).unwrap().len(), 20);
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
    raw_sled(&foreign, "foreign");
    let opened = SledStore::open(&foreign);
    assert!(
        matches!(opened, Err(DuraflowError::NotAStore { .. })),
        "{opened:?}"
    );
    let db = sled::open(&foreign).unwrap();
    let mut trees = db.tree_names();
    trees.sort();
    assert_eq!(
        trees,
        [&b"__sled__default"[..], b"their-data"],
        "no tree added"
    );
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

/// A process killed while sled wrote a snapshot leaves `snap.*.generating`, incomplete;
/// sled would take it for the newest snapshot and refuse to open (sled#1527).
#[test]
fn a_snapshot_left_half_written_by_a_killed_process_does_not_stop_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torn-snapshot.db");
    {
        let ctx = Context::new(SledStore::open(&path).unwrap());
        for i in 0..100u64 {
            ctx.save(&format!("k{i}"), &i).unwrap();
        }
    }
    // The name sorts after any snapshot sled wrote; the bytes fail its checksum.
    let torn = path.join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&torn, vec![0x5a; 4096]).unwrap();
    let ctx = Context::new(SledStore::open(&path).unwrap());
    for i in 0..100u64 {
        assert_eq!(ctx.get::<u64>(&format!("k{i}")), Some(i));
    }
    assert!(!torn.exists(), "the torn snapshot is removed");
}

const HOLDER_VAR: &str = "DURAFLOW_SLED_LOCK_HOLDER";
const HELD: &str = "duraflow-sled-lock-holder: open";

/// Not a test of its own: the child process of
const RAW_DIR: &str = "DURAFLOW_RAW_SLED_DIR";
const RAW_KIND: &str = "DURAFLOW_RAW_SLED_KIND";

/// Makes a sled database at `path` with sled itself, in a child process (`raw_sled_writer`):
/// sled's lock is released when the process exits, not when its handle is dropped.
fn raw_sled(path: &std::path::Path, kind: &str) {
    let status = common::child_test("raw_sled_writer")
        .env(RAW_DIR, path)
        .env(RAW_KIND, kind)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "raw_sled_writer failed: {status}");
}

#[test]
#[ignore = "helper: run only as a child process, by raw_sled"]
fn raw_sled_writer() {
    let Some(path) = common::child_dir(RAW_DIR, "raw_sled_writer") else {
        return;
    };
    let db = sled::open(&path).unwrap();
    match std::env::var(RAW_KIND).as_deref() {
        Ok("foreign") => drop(
            db.open_tree("their-data")
                .unwrap()
                .insert("k", "v")
                .unwrap(),
        ),
        Ok("empty-meta") => drop(db.open_tree("meta").unwrap()),
        other => panic!("{RAW_KIND} is {other:?}"),
    }
    db.flush().unwrap();
}

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
    let mut child = common::child_test("sled_lock_holder")
        .env(HOLDER_VAR, &path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    assert!(stdout.lines().map(|l| l.unwrap()).any(|l| l.contains(HELD)));
    let start = Instant::now();
    assert!(matches!(
        SledStore::open(&path),
        Err(DuraflowError::StoreLocked { .. })
    ));
    assert!(start.elapsed() < PROMPT, "took {:?}", start.elapsed());
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

/// A task whose output is `len` bytes of text.
#[derive(Clone)]
struct Text {
    len: usize,
    runs: Arc<AtomicUsize>,
}
#[task]
impl Text {
    async fn run(&self) -> String {
        self.runs.fetch_add(1, Ordering::SeqCst);
        "x".repeat(self.len)
    }
}

/// Checks `result` is `Persist` for `key`, its source naming both sizes.
fn assert_too_large<T: std::fmt::Debug>(result: Result<T, DuraflowError>, key: &str, limit: usize) {
    match result {
        Err(DuraflowError::Persist { key: k, source }) => {
            assert_eq!(k, key);
            let text = source.to_string();
            assert!(
                text.contains("maximum value size") && text.contains(&format!("{limit} bytes")),
                "{text}"
            );
        }
        other => panic!("expected Persist for {key:?}, got {other:?}"),
    }
}

#[test]
fn a_value_over_the_maximum_size_is_a_persist_error_and_the_old_value_stays() {
    const LIMIT: usize = 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limit.db");
    let store = Arc::new(SledConfig::new(&path).max_value_size(LIMIT).open().unwrap());

    // The store's own write: the limit is on the stored bytes, inclusive.
    wait(store.write("raw", b"old".to_vec())).unwrap();
    wait(store.write("raw", vec![7; LIMIT])).unwrap();
    assert_too_large(wait(store.write("raw", vec![8; LIMIT + 1])), "raw", LIMIT);
    assert_eq!(wait(store.read("raw")).unwrap().unwrap(), vec![7; LIMIT]);
    // The source is an `io::Error` of kind `InvalidInput`.
    match wait(store.write("raw", vec![8; LIMIT + 1])) {
        Err(e @ DuraflowError::Persist { .. }) => {
            let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>());
            assert_eq!(
                io.map(|io| io.kind()),
                Some(std::io::ErrorKind::InvalidInput)
            );
        }
        other => panic!("expected Persist, got {other:?}"),
    }

    // Through a context and a task: the previous value (of another type, so the task runs
    // and tries to replace it) stays.
    let ctx = Arc::new(Context {
        db: store.clone(),
        completed_count: Arc::default(),
    });
    ctx.save("big", &42u64).unwrap();
    assert_too_large(ctx.save("big", &"y".repeat(2 * LIMIT)), "big", LIMIT);
    let runs = Arc::new(AtomicUsize::new(0));
    let big = Text {
        len: 4 * LIMIT,
        runs: runs.clone(),
    };
    let result = current_thread_rt()
        .block_on(Durable::new("big", ctx.clone(), big.clone(), None).run_result(()));
    assert_too_large(result, "big", LIMIT);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(ctx.try_get::<u64>("big").unwrap(), Some(42));

    // In a DAG: the task fails (its attempt says why), the others persist, the value stays.
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    d.add("big", big);
    d.add(
        "small",
        Text {
            len: 10,
            runs: runs.clone(),
        },
    );
    let _ = multi_thread_rt().block_on(dag.run(|f| {
        tokio::spawn(f);
    }));
    let stats = d.stats();
    assert_eq!((stats.executed, stats.failed), (1, 1));
    assert_eq!(ctx.try_get::<u64>("big").unwrap(), Some(42));
    assert_eq!(
        ctx.try_get::<String>("small").unwrap(),
        Some("x".repeat(10))
    );
    let last = wait(store.runs()).unwrap().pop().unwrap();
    assert_eq!(last.status, RunStatus::Failed);
    let attempts = wait(store.run(last.id)).unwrap().unwrap().attempts;
    let failed = attempts.iter().find(|a| a.key == "big").unwrap();
    match &failed.outcome {
        AttemptOutcome::Failed { error } => {
            assert!(error.contains("maximum value size"), "{error}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn large_outputs_are_files_of_their_own_shared_when_identical_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.db");
    let files = |path: &std::path::Path| {
        let mut names: Vec<_> = std::fs::read_dir(path.join("outputs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        names
    };
    // Over the 16 MiB that sled's tree would take whole; and a copy of it.
    let big: Vec<u8> = (0..20 << 20).map(|i: u32| (i % 251) as u8).collect();
    {
        let store = SledStore::open(&path).unwrap();
        wait(store.write("a", big.clone())).unwrap();
        wait(store.write("b", big.clone())).unwrap();
        wait(store.write("small", b"inline".to_vec())).unwrap();
    }
    assert_eq!(files(&path).len(), 1, "identical outputs share one file");
    let store = SledStore::open(&path).unwrap();
    assert_eq!(wait(store.read("a")).unwrap().as_deref(), Some(&big[..]));
    assert_eq!(wait(store.read("b")).unwrap().as_deref(), Some(&big[..]));
    assert_eq!(wait(store.read("small")).unwrap().unwrap(), b"inline");
    let mut keys = wait(store.keys()).unwrap();
    keys.sort();
    assert_eq!(keys, ["a", "b", "small"]);

    // A flipped byte in the file, the file cut short or gone: `Corrupt` naming the key and
    // the file. The store's trees are intact, so it keeps working, and a new write of the
    // value repairs it.
    let file = files(&path).pop().unwrap();
    type Damage = fn(&std::path::Path);
    let damages: [(&str, Damage); 3] = [
        ("a flipped byte", |f| {
            let mut bytes = std::fs::read(f).unwrap();
            bytes[12_345] ^= 1;
            std::fs::write(f, bytes).unwrap();
        }),
        ("cut short", |f| {
            let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
            file.set_len(1000).unwrap();
        }),
        ("deleted", |f| std::fs::remove_file(f).unwrap()),
    ];
    for (what, damage) in damages {
        damage(&file);
        match wait(store.read("a")) {
            Err(DuraflowError::Corrupt { key, path, .. }) => {
                assert_eq!(
                    (key.as_str(), path.as_deref()),
                    ("a", Some(file.as_path())),
                    "{what}"
                )
            }
            other => panic!(
                "{what}: expected Corrupt, got {:?}",
                other.map(|v| v.map(|v| v.len()))
            ),
        }
        assert!(store.health().is_ok(), "{what}");
        wait(store.write("a", big.clone())).unwrap();
        for key in ["a", "b"] {
            let found = wait(store.read(key)).unwrap();
            assert!(found.as_deref() == Some(&big[..]), "{what}: {key}");
        }
    }
}

#[test]
fn gc_removes_the_files_of_outputs_no_longer_stored_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path().join("gc.db")).unwrap();
    let large = |byte| vec![byte; 100 * 1024];
    wait(store.write("overwritten", large(1))).unwrap();
    wait(store.write("overwritten", large(2))).unwrap();
    wait(store.write("removed", large(3))).unwrap();
    assert!(wait(store.remove("removed")).unwrap(), "it was stored");
    wait(store.write("kept", large(4))).unwrap();
    let stats = wait(store.gc(usize::MAX)).unwrap();
    assert_eq!(stats.output_files_removed, 2, "{stats:?}");
    assert_eq!(wait(store.read("overwritten")).unwrap(), Some(large(2)));
    assert_eq!(wait(store.read("kept")).unwrap(), Some(large(4)));
    let again = wait(store.gc(usize::MAX)).unwrap();
    assert_eq!(again.output_files_removed, 0);
}

#[test]
fn gc_running_beside_writes_never_takes_a_file_an_output_refers_to() {
    const KEYS: usize = 4;
    const VERSIONS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path().join("busy.db")).unwrap());
    let large = |key: usize, version: usize| vec![(key * 31 + version) as u8; 80 * 1024];
    let writer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            for version in 0..VERSIONS {
                for key in 0..KEYS {
                    wait(store.write(&format!("k{key}"), large(key, version))).unwrap();
                }
            }
        })
    };
    let mut removed = 0;
    while !writer.is_finished() {
        removed += wait(store.gc(usize::MAX)).unwrap().output_files_removed;
        for key in 0..KEYS {
            let found = wait(store.read(&format!("k{key}")));
            assert!(
                found.is_ok(),
                "k{key} during gc: {:?}",
                found.map(|v| v.map(|v| v.len()))
            );
        }
    }
    writer.join().unwrap();
    removed += wait(store.gc(usize::MAX)).unwrap().output_files_removed;
    assert!(removed > 0, "gc removed the overwritten versions");
    for key in 0..KEYS {
        let found = wait(store.read(&format!("k{key}"))).unwrap();
        assert!(found == Some(large(key, VERSIONS - 1)), "k{key}");
    }
}

/// A task that says it started, then never finishes.
#[derive(Clone)]
struct Stuck(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);
#[task]
impl Stuck {
    async fn run(&self) -> u64 {
        if let Some(started) = self.0.lock().unwrap().take() {
            let _ = started.send(());
        }
        std::future::pending().await
    }
}

#[test]
fn cached_attempts_are_queryable_in_order_and_counted_when_a_run_is_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cached.db");
    let runs = Arc::new(AtomicUsize::new(0));
    run_round(&path, &runs, false); // every task executes: the next run finds them cached

    // A run whose cached tasks all complete while one task runs and never ends; the
    // process "stops" (runtime and store dropped) before the run is closed.
    let store = SledStore::open(&path).unwrap();
    let ctx = Arc::new(Context::new(store));
    let dag = DagRunner::new();
    let (all_cached, cached_done) = tokio::sync::oneshot::channel::<()>();
    let all_cached = std::sync::Mutex::new(Some(all_cached));
    let d = DurableDag::new(&dag, ctx.clone()).with_progress(move |_, completed| {
        if completed == TASKS as usize {
            if let Some(tx) = all_cached.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    });
    for n in 0..TASKS {
        d.add(
            &format!("t/{n}"),
            Counted {
                n,
                runs: runs.clone(),
            },
        );
    }
    let (started, stuck_started) = tokio::sync::oneshot::channel::<()>();
    d.add(
        "stuck",
        Stuck(Arc::new(std::sync::Mutex::new(Some(started)))),
    );
    let rt = multi_thread_rt();
    rt.block_on(async {
        let both = async {
            cached_done.await.unwrap();
            stuck_started.await.unwrap(); // so its attempt was recorded `Running`
        };
        tokio::select! {
            _ = dag.run(|f| { tokio::spawn(f); }) => panic!("the run cannot finish"),
            () = both => {}
        }
    });
    drop(rt); // drops the stuck task
    drop(d);
    drop(dag);
    drop(ctx); // the last handle: the store applies what is queued and closes

    let store = SledStore::open(&path).unwrap();
    let all = wait(store.runs()).unwrap();
    let interrupted = all.last().unwrap();
    assert_eq!(interrupted.status, RunStatus::Interrupted);
    assert_eq!(
        (interrupted.executed, interrupted.cached, interrupted.failed),
        (0, TASKS, 0),
        "counts rebuilt from the attempts at open, cached ones included"
    );
    let attempts = wait(store.run(interrupted.id)).unwrap().unwrap().attempts;
    let keys: Vec<&str> = attempts.iter().map(|a| a.key.as_str()).collect();
    let mut expected: Vec<String> = (0..TASKS).map(|n| format!("t/{n}")).collect();
    expected.push("stuck".to_owned());
    // The order of the records' keys: by `key | 0xFF`, so "t/10" comes before "t/1".
    expected.sort_by(|a, b| a.bytes().chain([0xFF]).cmp(b.bytes().chain([0xFF])));
    assert_eq!(keys, expected);
    for a in &attempts {
        assert_eq!((a.run, a.attempt), (interrupted.id, 1));
        if a.key == "stuck" {
            assert_eq!(a.outcome, AttemptOutcome::Interrupted);
        } else {
            assert_eq!(a.outcome, AttemptOutcome::Cached, "{a:?}");
            assert!(a.output_size.unwrap() > 0, "{a:?}");
            assert!(a.finished_ms.unwrap() >= a.started_ms, "{a:?}");
            assert!(a.duration_us.is_some(), "{a:?}");
        }
    }
    let history: Vec<_> = wait(store.attempts_of("t/7"))
        .unwrap()
        .into_iter()
        .map(|a| (a.run, a.outcome))
        .collect();
    assert_eq!(
        history,
        vec![
            (all[0].id, AttemptOutcome::Succeeded),
            (interrupted.id, AttemptOutcome::Cached)
        ]
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        TASKS as usize,
        "no task ran twice"
    );
}

/// Every file's name and bytes under `dir`, recursively.
fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            for (k, v) in snapshot(&entry.path()) {
                out.insert(format!("{name}/{k}"), v);
            }
        } else {
            out.insert(name, std::fs::read(entry.path()).unwrap());
        }
    }
    out
}

#[test]
fn a_store_of_a_newer_format_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let store = SledStore::open(&path).unwrap();
        Context::new(store).save("k", &1u32).unwrap();
    }
    let marker = path.join("duraflow-store");
    let text = std::fs::read_to_string(&marker).unwrap();
    assert!(text.contains("format 3"), "{text}");
    std::fs::write(&marker, text.replace("format 3", "format 7")).unwrap();
    let before = snapshot(&path);
    match SledStore::open(&path) {
        Err(DuraflowError::UnsupportedFormat {
            path: p,
            found,
            supported,
        }) => assert_eq!((p, found, supported), (path.clone(), 7, 3)),
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    assert_eq!(snapshot(&path), before, "nothing in the store changed");
    // Back at format 3, the store opens and still holds its value.
    std::fs::write(&marker, text).unwrap();
    let ctx = Context::new(SledStore::open(&path).unwrap());
    assert_eq!(ctx.get::<u32>("k"), Some(1));
}

#[test]
fn a_marker_with_a_byte_that_is_not_utf8_is_a_damaged_marker_not_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let store = SledStore::open(&path).unwrap();
        Context::new(store).save("k", &1u32).unwrap();
    }
    let marker = path.join("duraflow-store");
    let damage = || {
        let mut bytes = std::fs::read(&marker).unwrap();
        bytes[3] = 0xFF;
        std::fs::write(&marker, bytes).unwrap();
    };
    damage();
    // sled's metadata still says what the store is: it opens, and gets a new marker.
    {
        let ctx = Context::new(SledStore::open(&path).unwrap());
        assert_eq!(ctx.get::<u32>("k"), Some(1));
    }
    let text = std::fs::read_to_string(&marker).expect("the new marker is text");
    assert!(text.starts_with("duraflow-rs store, format 3;"), "{text}");
    // Without sled's database, the damaged marker still says that a store was here.
    damage();
    std::fs::remove_file(path.join("db")).unwrap();
    match SledStore::open(&path) {
        Err(DuraflowError::Corrupt { path: Some(p), .. }) => assert_eq!(p, path),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_first_open_interrupted_before_its_metadata_opens_as_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    // What a first open killed between creating `meta` and filling it leaves.
    raw_sled(&path, "empty-meta");
    let ctx = Context::new(SledStore::open(&path).expect("a new store"));
    ctx.save("k", &3u32).unwrap();
    assert_eq!(ctx.get::<u32>("k"), Some(3));
}

/// Reads that race overwrites of the same key, between values kept in the tree and values
/// in files, always see one written value, whole, and never stop the store.
#[test]
fn reads_racing_overwrites_see_old_or_new_and_never_damage() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path().join("race")).unwrap());
    let values: Vec<Vec<u8>> = (0..4u8)
        .map(|i| match i % 2 {
            0 => vec![i; 100],
            _ => vec![i; 100 * 1024],
        })
        .collect();
    wait(store.write("k", values[0].clone())).unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, done, values) = (store.clone(), done.clone(), values.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !done.load(Ordering::SeqCst) {
                    let found = wait(store.read("k")).unwrap_or_else(|e| panic!("read: {e}"));
                    let found = found.expect("a read found no value");
                    assert!(
                        values.contains(&found),
                        "a torn value of {} bytes",
                        found.len()
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for round in 0..400 {
        wait(store.write("k", values[round % values.len()].clone())).unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let reads: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
    assert!(store.health().is_ok(), "{:?}", store.health());
}
