//! Promises of `PgStore` over a real server (`DURAFLOW_PG_URL`; see `tests/common/pg.rs`),
//! one test each. Two `PgStore` connections to one schema act as two worker processes.

#![cfg(feature = "postgres")]

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{fresh_schema, pg_url};
use common::{Inc, Val};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{
    AttemptOutcome, Context, Durable, DurableDag, DuraflowError, Encoder, PgConfig, PgStore,
    RunHistory, RunStats, RunStatus, Storage, Value,
};

/// Counts its runs, then waits until its gate opens, then returns its value.
#[derive(Clone)]
struct Gated {
    gate: Arc<AtomicBool>,
    runs: Arc<AtomicUsize>,
    value: u64,
}

#[task]
impl Gated {
    async fn run(&self) -> u64 {
        self.runs.fetch_add(1, Ordering::SeqCst);
        while !self.gate.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.value
    }
}

impl Gated {
    fn new(value: u64, runs: &Arc<AtomicUsize>) -> Gated {
        Gated {
            gate: Arc::new(AtomicBool::new(false)),
            runs: Arc::clone(runs),
            value,
        }
    }
}

async fn connect(url: &str, schema: &str, lease: Duration) -> Arc<PgStore> {
    let config = PgConfig::default().schema(schema).lease(lease);
    Arc::new(PgStore::connect_with(url, config).await.unwrap())
}

/// A DAG of the one task `task` under `key`, over `store`.
async fn run_one(store: Arc<PgStore>, key: &'static str, task: Gated) -> RunStats {
    let ctx = Arc::new(Context::new(store));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx);
    d.add(key, task);
    let _ = dag
        .run(|f| {
            tokio::spawn(f);
        })
        .await;
    d.stats()
}

/// Waits (up to 10 s) until `runs` reaches `n`.
async fn until_runs(runs: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn decode(bytes: Vec<u8>) -> u64 {
    let ctx = Context::new(duraflow_rs::MemoryStore::new());
    futures::executor::block_on(ctx.db.write("v", bytes)).unwrap();
    ctx.get::<u64>("v").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_held_by_a_live_worker_makes_the_other_wait_for_its_output() {
    let Some(url) = pg_url("lease_held_by_a_live_worker") else {
        return;
    };
    let schema = fresh_schema("lease_wait");
    let (a, b) = (
        connect(&url, &schema, Duration::from_secs(2)).await,
        connect(&url, &schema, Duration::from_secs(2)).await,
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let task_a = Gated::new(7, &runs);
    let gate = Arc::clone(&task_a.gate);
    let first = tokio::spawn(run_one(Arc::clone(&a), "shared/task", task_a));
    until_runs(&runs, 1).await;
    // B's task is open: it would finish at once if it ran.
    let task_b = Gated::new(8, &runs);
    task_b.gate.store(true, Ordering::SeqCst);
    let second = tokio::spawn(run_one(Arc::clone(&b), "shared/task", task_b));
    // Longer than several leases: A's heartbeats keep its lease, B waits.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!second.is_finished(), "B did not wait for A's lease");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let opened = Instant::now();
    gate.store(true, Ordering::SeqCst);
    let stats_a = first.await.unwrap();
    let stats_b = second.await.unwrap();
    // Woken by A's commit's notification, not by a lease expiring.
    assert!(
        opened.elapsed() < Duration::from_millis(1500),
        "{:?}",
        opened.elapsed()
    );
    assert_eq!((stats_a.executed, stats_a.cached), (1, 0));
    assert_eq!(
        (stats_b.executed, stats_b.cached),
        (0, 1),
        "B took A's output"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the task ran once across workers"
    );
    let stored = b.read("shared/task").await.unwrap().unwrap();
    assert_eq!(decode(stored), 7);
}

/// Two callers in one process need one key: the second waits for the first, which is alive,
/// even once the first's lease lapsed (its heartbeats stopped), and finds its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_held_in_this_process_is_not_taken_over_by_a_caller_here() {
    let Some(url) = pg_url("a_lapsed_lease_held_in_this_process") else {
        return;
    };
    let schema = fresh_schema("same_process");
    let lease = Duration::from_millis(400);
    let store = connect(&url, &schema, lease).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let first = Gated::new(1, &runs);
    let gate = Arc::clone(&first.gate);
    let one = tokio::spawn(run_one(Arc::clone(&store), "same/k", first));
    until_runs(&runs, 1).await;
    store.stop_heartbeats();
    let client = raw(&url).await;
    let lapsed = format!("SELECT expires_at < now() FROM \"{schema}\".leases WHERE key = $1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client
        .query_one(&lapsed, &[&b"same/k".as_slice()])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(Instant::now() < deadline, "the lease never lapsed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The second caller's task is open: it would finish at once if it ran.
    let second = Gated::new(2, &runs);
    second.gate.store(true, Ordering::SeqCst);
    let two = tokio::spawn(run_one(Arc::clone(&store), "same/k", second));
    // A window of several of its looks (a quarter of the lease each) to take the lease over.
    tokio::time::sleep(lease * 2).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the second caller ran the task"
    );
    assert!(!two.is_finished(), "the second caller did not wait");
    gate.store(true, Ordering::SeqCst);
    let (one, two) = (one.await.unwrap(), two.await.unwrap());
    assert_eq!((one.executed, one.failed), (1, 0), "{one:?}");
    assert_eq!((two.executed, two.cached), (0, 1), "{two:?}");
    assert_eq!(decode(store.read("same/k").await.unwrap().unwrap()), 1);
}

/// A holds `key` and stalls (its heartbeats stop); B takes the key over after the lease.
/// Returns both stores, A's open gate, and A's pending run.
async fn reclaimed(
    url: &str,
    schema: &str,
    key: &'static str,
) -> (
    Arc<PgStore>,
    Arc<PgStore>,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<Result<u64, DuraflowError>>,
    RunStats,
) {
    let lease = Duration::from_secs(1);
    let (a, b) = (
        connect(url, schema, lease).await,
        connect(url, schema, lease).await,
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let task_a = Gated::new(1, &runs);
    let gate = Arc::clone(&task_a.gate);
    let ctx_a = Arc::new(Context::new(Arc::clone(&a)));
    let first = tokio::spawn(Durable::new(key, ctx_a, task_a, None).run_result(()));
    until_runs(&runs, 1).await;
    a.stop_heartbeats();
    let task_b = Gated::new(2, &runs);
    task_b.gate.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let stats_b = run_one(Arc::clone(&b), key, task_b).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "B took a live lease after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "B waited {waited:?} for a 1 s lease"
    );
    assert_eq!((stats_b.executed, stats_b.cached), (1, 0));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    (a, b, gate, first, stats_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_taken_as_a_new_attempt() {
    let Some(url) = pg_url("expired_lease_is_taken") else {
        return;
    };
    let schema = fresh_schema("expired");
    let key = "stalled/task";
    let (a, b, _gate, first, _) = reclaimed(&url, &schema, key).await;
    let attempts = b.attempts_of(key).await.unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[0].run >> 24, a.worker());
    assert_eq!(
        attempts[0].outcome,
        AttemptOutcome::Interrupted,
        "{attempts:#?}"
    );
    assert_eq!(attempts[1].run >> 24, b.worker());
    assert_eq!(
        attempts[1].outcome,
        AttemptOutcome::Succeeded,
        "{attempts:#?}"
    );
    // A's worker stopped extending its liveness: its run is Interrupted.
    let runs = b.runs().await.unwrap();
    let run_a = runs.iter().find(|r| r.id == attempts[0].run).unwrap();
    assert_eq!(run_a.status, RunStatus::Interrupted, "{runs:#?}");
    first.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_fenced_after_reclaim() {
    let Some(url) = pg_url("commit_fenced_after_reclaim") else {
        return;
    };
    let schema = fresh_schema("fenced");
    let key = "fenced/task";
    let (a, b, gate, first, _) = reclaimed(&url, &schema, key).await;
    gate.store(true, Ordering::SeqCst);
    match first.await.unwrap() {
        Err(DuraflowError::Fenced { key: fenced, newer }) => {
            assert_eq!(fenced, key);
            assert_eq!(newer, 2, "B's lease is the key's second");
        }
        other => panic!("A's commit after the reclaim: {other:?}"),
    }
    // The newer output stays, whoever reads it; A's attempt stays Interrupted.
    for store in [&a, &b] {
        assert_eq!(decode(store.read(key).await.unwrap().unwrap()), 2);
    }
    let attempts = b.attempts_of(key).await.unwrap();
    assert_eq!(
        attempts[0].outcome,
        AttemptOutcome::Interrupted,
        "{attempts:#?}"
    );
    assert_eq!(
        attempts[1].outcome,
        AttemptOutcome::Succeeded,
        "{attempts:#?}"
    );
    // A plain write by A (no lease) just writes.
    a.write("fenced/other", b"x".to_vec()).await.unwrap();
}

/// A raw client of the test server.
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_unsupported_and_untouched() {
    let Some(url) = pg_url("newer_schema_is_unsupported") else {
        return;
    };
    let schema = fresh_schema("newer");
    let store = connect(&url, &schema, Duration::from_secs(10)).await;
    store.write("kept", b"value".to_vec()).await.unwrap();
    drop(store);
    let client = raw(&url).await;
    let q = |sql: &str| sql.replace("S.", &format!("\"{schema}\"."));
    client
        .execute(
            &q("INSERT INTO S.schema_version (version) VALUES (99)"),
            &[],
        )
        .await
        .unwrap();
    let snapshot = q("SELECT (SELECT count(*) FROM S.workers), \
             (SELECT string_agg(version::text, ',' ORDER BY version) FROM S.schema_version), \
             (SELECT count(*) FROM S.outputs)");
    let before = client.query_one(&snapshot, &[]).await.unwrap();
    let config = PgConfig::default().schema(&schema);
    match PgStore::connect_with(&url, config).await {
        Err(DuraflowError::UnsupportedFormat {
            found, supported, ..
        }) => {
            assert_eq!(found, 99);
            assert!(supported < 99);
        }
        other => panic!("connect to a newer schema: {other:?}"),
    }
    let after = client.query_one(&snapshot, &[]).await.unwrap();
    let cols = |row: &tokio_postgres::Row| {
        (
            row.get::<_, i64>(0),
            row.get::<_, String>(1),
            row.get::<_, i64>(2),
        )
    };
    assert_eq!(cols(&before), cols(&after), "the newer schema was changed");
    assert_eq!(cols(&after).1, "1,99");
}

/// `url` with its password replaced by `password`.
fn with_password(url: &str, password: &str) -> (String, String) {
    let start = url.find("://").unwrap() + 3;
    let at = url.rfind('@').unwrap();
    let colon = start + url[start..at].find(':').unwrap();
    let real = url[colon + 1..at].to_owned();
    (
        format!("{}{password}{}", &url[..colon + 1], &url[at..]),
        real,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_url_and_down_server_and_bad_password_are_typed_errors_naming_the_url_without_password()
{
    let Some(url) = pg_url("bad_url_and_down_server") else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let secret = "hunter2-not-shown";
    let free_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Takes connections (the kernel completes them) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let (bad_password, real) = with_password(&url, secret);
    let cases = [
        format!("postgres://duraflow:{secret}@127.0.0.1:notaport/duraflow"),
        format!("postgres://duraflow:{secret}@127.0.0.1:{free_port}/duraflow"),
        bad_password,
        // A server that never answers: the connect timeout ends the wait.
        format!("postgres://duraflow:{secret}@127.0.0.1:{silent_port}/duraflow"),
    ];
    for case in cases {
        let started = Instant::now();
        let config = PgConfig::default().connect_timeout(timeout);
        let error = PgStore::connect_with(&case, config).await.unwrap_err();
        let took = started.elapsed();
        assert!(took < timeout + Duration::from_secs(2), "{case}: {took:?}");
        let shown = format!("{error} / {error:?}");
        match &error {
            DuraflowError::Database { url: named, .. } => {
                assert!(named.contains(":***@"), "{named}");
            }
            other => panic!("{case}: {other:?}"),
        }
        assert!(!shown.contains(secret), "{shown}");
        assert!(!shown.contains(&real), "{shown}");
        assert!(shown.contains("duraflow:***@"), "{shown}");
        eprintln!("{took:?}: {error}");
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_over_max_value_size_is_persist_naming_the_key() {
    let Some(url) = pg_url("value_over_max_value_size") else {
        return;
    };
    let schema = fresh_schema("max_value");
    let config = PgConfig::default().schema(&schema).max_value_size(1024);
    let store = PgStore::connect_with(&url, config).await.unwrap();
    let check = |error: DuraflowError, key: &str| match &error {
        DuraflowError::Persist { key: named, .. } => {
            assert_eq!(named, key);
            assert!(error.to_string().contains("1024"), "{error}");
        }
        other => panic!("{other:?}"),
    };
    check(
        store.write("big/bytes", vec![7; 1025]).await.unwrap_err(),
        "big/bytes",
    );
    let stream = Encoder::new(|out| {
        for _ in 0..64 {
            out.write_all(&[9; 100])
                .map_err(|e| DuraflowError::Persist {
                    key: "big/stream".into(),
                    source: e.into(),
                })?;
        }
        Ok(())
    });
    let written = store.write_value("big/stream", Value::Stream(stream)).await;
    check(written.unwrap_err(), "big/stream");
    assert_eq!(store.read("big/bytes").await.unwrap(), None);
    assert_eq!(store.read("big/stream").await.unwrap(), None);
    store.write("small", vec![1; 1024]).await.unwrap();
    assert_eq!(store.read("small").await.unwrap().unwrap().len(), 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_over_pgstore_persists_and_resumes() {
    let Some(url) = pg_url("a_dag_over_pgstore") else {
        return;
    };
    let schema = fresh_schema("dag");
    let mut ids = Vec::new();
    for round in 0..2 {
        let store = PgStore::connect_with(&url, PgConfig::default().schema(&schema))
            .await
            .unwrap();
        let ctx = Arc::new(Context::new(store));
        let dag = DagRunner::new();
        let d = DurableDag::new(&dag, ctx.clone());
        let a = d.add("dag/a", Val(40));
        let b = d.add("dag/b", Inc).depends_on(&a);
        d.add("dag/c", Inc).depends_on(b);
        dag.run(|f| {
            tokio::spawn(f);
        })
        .await
        .unwrap();
        let stats = d.stats();
        let expected = if round == 0 { (3, 0) } else { (0, 3) };
        assert_eq!((stats.executed, stats.cached), expected, "round {round}");
        assert_eq!(ctx.get::<u64>("dag/c"), Some(42));
        let history = ctx.db.history().unwrap();
        let runs = history.runs().await.unwrap();
        let last = runs.last().unwrap();
        assert_eq!(last.status, RunStatus::Succeeded);
        ids.push(last.id);
        let details = history.run(last.id).await.unwrap().unwrap();
        let outcome = if round == 0 {
            AttemptOutcome::Succeeded
        } else {
            AttemptOutcome::Cached
        };
        assert_eq!(details.attempts.len(), 3, "{details:#?}");
        assert!(
            details.attempts.iter().all(|a| a.outcome == outcome),
            "{details:#?}"
        );
    }
    assert!(ids[1] > ids[0], "{ids:?}");
}

/// The server's count of deadlocks in the test database.
async fn deadlocks(client: &tokio_postgres::Client) -> i64 {
    let sql = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()";
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// A wide DAG of `n` independent tasks over `store`.
async fn wide(store: Arc<PgStore>, n: u64) -> RunStats {
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, Arc::new(Context::new(store)));
    for i in 0..n {
        d.add(&format!("wide/{i}"), Val(i));
    }
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await
    .unwrap();
    d.stats()
}

/// Two stores that take and commit the leases of the same 2,000 keys at once, in batches,
/// never deadlock on the server (a deadlock stalls both batches for `deadlock_timeout`,
/// then fails one): the server's deadlock count is the same after twelve such runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_taking_and_committing_the_same_keys_never_deadlock() {
    let Some(url) = pg_url("two_workers_never_deadlock") else {
        return;
    };
    const N: u64 = 2_000;
    let client = raw(&url).await;
    let before = deadlocks(&client).await;
    // The stores' connections carry this name, so that the test can wait until they end.
    let app = format!("duraflow_deadlock_{}", std::process::id());
    let named = format!(
        "{url}{}application_name={app}",
        if url.contains('?') { '&' } else { '?' }
    );
    for _ in 0..12 {
        let schema = fresh_schema("deadlock");
        let a = connect(&named, &schema, Duration::from_secs(10)).await;
        let b = connect(&named, &schema, Duration::from_secs(10)).await;
        let (x, y) = futures::join!(wide(a, N), wide(b, N));
        assert_eq!(x.executed + y.executed, N as usize, "{x:?} {y:?}");
    }
    // A server process counts its deadlocks for certain once it exits, and the stores'
    // processes exit once the stores (dropped above) have closed their connections.
    let gone = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1";
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query_one(gone, &[&app])
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the stores' connections stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(deadlocks(&client).await, before, "see the server's log");
}
