//! Promise: worker processes that run one DAG over one PostgreSQL store cooperate, each task
//! executed by one of them at a time:
//! - two workers on one 300-task DAG, no kill: every task executed exactly once across both;
//! - a worker SIGKILLed at a random moment, again and again, and restarted: no task whose
//!   progress was reported executes again, no task executes twice in one process, the dead
//!   workers' attempts end `Interrupted`, and every output equals a clean in-process run's;
//! - a hung worker (SIGSTOP) loses its lease when it expires, another worker takes the task
//!   over as a new attempt, and the hung worker's late commit, once it is continued, is
//!   refused as `Fenced`: the newer output stays;
//! - the server restarted (`pg_ctl restart`) mid-run: the worker resumes its run or ends it
//!   with an error, without hanging; a new worker completes the DAG, no task reported done
//!   executes again, and every output is right.
//!
//! The test binary re-executes itself as the worker: `pg_worker` is an ignored test that only
//! does work when the parent passes it a schema. Without `DURAFLOW_PG_URL` (and without `CI`)
//! the tests say they skipped.

#![cfg(all(unix, feature = "postgres"))]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use dagx::{task, DagRunner, Task};
use duraflow_rs::{
    AttemptOutcome, Context, Durable, DurableDag, DuraflowError, MemoryStore, PgConfig, PgStore,
    Storage,
};

use common::MARKER;

/// The schema the worker runs in; it does nothing without it.
const SCHEMA_ENV: &str = "DURAFLOW_PGW_SCHEMA";
/// What the worker runs: `dag` (the 300-task DAG) or `slow` (one task, fenced test).
const MODE_ENV: &str = "DURAFLOW_PGW_MODE";
/// How long each task of the DAG works, in milliseconds.
const TASK_MS_ENV: &str = "DURAFLOW_PGW_TASK_MS";
/// The lease of the worker's store, in milliseconds.
const LEASE_MS_ENV: &str = "DURAFLOW_PGW_LEASE_MS";
/// The value the `slow` task returns, and how long it works.
const SLOW_VALUE_ENV: &str = "DURAFLOW_PGW_SLOW_VALUE";
const SLOW_MS_ENV: &str = "DURAFLOW_PGW_SLOW_MS";
const CHILD_TEST: &str = "pg_worker";
const SIGKILL: i32 = 9;
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

/// The DAG: WIDTH sources, then LAYERS - 1 layers of WIDTH tasks, each consuming two tasks
/// of the layer before.
const WIDTH: usize = 30;
const LAYERS: usize = 10;
const TASKS: usize = WIDTH * LAYERS;

fn id(layer: usize, i: usize) -> String {
    format!("t-{layer}-{i}")
}

fn mix(a: u64, b: u64) -> u64 {
    a.wrapping_mul(31).wrapping_add(b) % 1_000_003
}

/// Set in the worker process: only it reports (the parent runs the DAG too, for the
/// outputs a clean run gives).
static WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Prints a report line for the parent, in the worker.
fn report(line: &str) {
    if !WORKER.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER}{line}").expect("pg_worker: print");
    out.flush().expect("pg_worker: flush");
}

struct Source {
    id: String,
    value: u64,
    work: Duration,
}

#[task]
impl Source {
    async fn run(&self) -> u64 {
        report(&format!("exec {}", self.id));
        tokio::time::sleep(self.work).await;
        self.value
    }
}

struct Mix {
    id: String,
    work: Duration,
}

#[task]
impl Mix {
    async fn run(&self, a: &u64, b: &u64) -> u64 {
        report(&format!("exec {}", self.id));
        tokio::time::sleep(self.work).await;
        mix(*a, *b)
    }
}

/// The slow task of the fencing test: its value and duration come from the environment.
struct Slow {
    value: u64,
    work: Duration,
}

#[task]
impl Slow {
    async fn run(&self) -> u64 {
        report("exec slow");
        tokio::time::sleep(self.work).await;
        self.value
    }
}

fn env_ms(var: &str) -> Duration {
    Duration::from_millis(common::env_number(var))
}

async fn connect(url: &str, schema: &str, lease: Duration) -> PgStore {
    let config = PgConfig::default().schema(schema).lease(lease);
    PgStore::connect_with(url, config)
        .await
        .unwrap_or_else(|e| panic!("connect to {schema}: {e}"))
}

/// The worker: runs the DAG (or the slow task) over the schema it is handed.
#[test]
#[ignore = "a child process of the tests in this file; does nothing on its own"]
fn pg_worker() {
    let Ok(schema) = std::env::var(SCHEMA_ENV) else {
        eprintln!("{CHILD_TEST}: {SCHEMA_ENV} is not set; nothing to do");
        return;
    };
    WORKER.store(true, std::sync::atomic::Ordering::SeqCst);
    let url = std::env::var("DURAFLOW_PG_URL").expect("pg_worker: DURAFLOW_PG_URL");
    let lease = env_ms(LEASE_MS_ENV);
    common::multi_thread_rt().block_on(async {
        let ctx = Arc::new(Context::new(connect(&url, &schema, lease).await));
        report("ready");
        if std::env::var(MODE_ENV).as_deref() == Ok("slow") {
            let slow = Slow {
                value: common::env_number(SLOW_VALUE_ENV),
                work: env_ms(SLOW_MS_ENV),
            };
            match Durable::new("slow", ctx, slow, None).run_result(()).await {
                Ok(value) => report(&format!("stored {value}")),
                Err(DuraflowError::Fenced { newer, .. }) => report(&format!("fenced {newer}")),
                Err(e) => report(&format!("error {e}")),
            }
            return;
        }
        match run_dag(ctx, env_ms(TASK_MS_ENV), |id| report(&format!("done {id}"))).await {
            Ok(stats) => report(&format!(
                "finished {} {} {}",
                stats.executed, stats.cached, stats.failed
            )),
            Err(error) => report(&format!("failed {error}")),
        }
    });
}

/// Runs the DAG over `ctx`, its tasks working between 1 and 10 times `work` each (so that
/// their ends spread), calling `progress` with the id of each task that completes.
async fn run_dag(
    ctx: Arc<Context>,
    work: Duration,
    progress: impl Fn(&str) + Send + Sync + 'static,
) -> Result<duraflow_rs::RunStats, dagx::DagError> {
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx).with_progress(move |id, _| progress(id));
    let work_of = |layer: usize, i: usize| work * (1 + ((i * 7 + layer * 3) % 10) as u32);
    let mut prev = Vec::new();
    for i in 0..WIDTH {
        let source = Source {
            id: id(0, i),
            value: i as u64 * 7 + 1,
            work: work_of(0, i),
        };
        prev.push(dagx::TaskHandle::from(d.add(&id(0, i), source)));
    }
    for layer in 1..LAYERS {
        let mut next = Vec::new();
        for i in 0..WIDTH {
            let task = Mix {
                id: id(layer, i),
                work: work_of(layer, i),
            };
            let inputs = (&prev[i], &prev[(i + 1) % WIDTH]);
            next.push(d.add(&id(layer, i), task).depends_on(inputs));
        }
        prev = next;
    }
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await?;
    Ok(d.stats())
}

/// The tests of this file run one at a time: one of them restarts the server.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One worker process and what it reported.
struct Worker {
    child: Child,
    reports: std::sync::mpsc::Receiver<String>,
    executed: Vec<String>,
    done: Vec<String>,
    finished: bool,
}

impl Worker {
    fn start(url: &str, schema: &str, env: &[(&str, String)]) -> Worker {
        let mut command = common::child_test(CHILD_TEST);
        command
            .env("DURAFLOW_PG_URL", url)
            .env(SCHEMA_ENV, schema)
            .env(LEASE_MS_ENV, "1000")
            .env(TASK_MS_ENV, "10");
        for (k, v) in env {
            command.env(k, v);
        }
        let (child, lines) = common::spawn_reporting(command);
        let (tx, reports) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Worker {
            child,
            reports,
            executed: Vec::new(),
            done: Vec::new(),
            finished: false,
        }
    }

    /// The next report, kept; `None` once the worker's output ended.
    fn next(&mut self) -> Option<String> {
        let line = self.reports.recv().ok()?;
        if let Some(key) = line.strip_prefix("exec ") {
            self.executed.push(key.to_owned());
        } else if let Some(key) = line.strip_prefix("done ") {
            self.done.push(key.to_owned());
        } else if line.starts_with("finished ") {
            self.finished = true;
        }
        Some(line)
    }

    /// Reads reports until one satisfies `stop`, returning it (`None`: the output ended).
    fn until(&mut self, mut stop: impl FnMut(&str) -> bool) -> Option<String> {
        while let Some(line) = self.next() {
            if stop(&line) {
                return Some(line);
            }
        }
        None
    }

    /// Reads every report to the end and waits for the process.
    fn finish(mut self) -> Worker {
        while self.next().is_some() {}
        let status = self.child.wait().expect("wait for the worker");
        assert!(
            status.success() || !self.finished,
            "worker exited with {status}"
        );
        self
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
    }
}

/// Every stored output, read through a fresh connection, equals what a clean in-process
/// run of the same DAG over a `MemoryStore` gives.
fn assert_outputs(url: &str, schema: &str) {
    let rt = common::multi_thread_rt();
    let ctx = Context::new(rt.block_on(connect(url, schema, Duration::from_secs(10))));
    let clean = Arc::new(Context::new(MemoryStore::new()));
    let stats = rt.block_on(run_dag(Arc::clone(&clean), Duration::ZERO, |_| {}));
    assert_eq!(stats.expect("the clean run").executed, TASKS);
    assert_eq!(clean.db.kind(), "memory");
    for layer in 0..LAYERS {
        for i in 0..WIDTH {
            let key = id(layer, i);
            let want: Option<u64> = clean.get(&key);
            assert!(want.is_some(), "the clean run stored {key}");
            let got: Option<u64> = ctx.try_get(&key).expect("read an output");
            assert_eq!(got, want, "output of {key}");
        }
    }
}

#[test]
fn two_workers_execute_each_task_exactly_once() {
    let _serial = serial();
    let Some(url) = common::pg::pg_url("two_workers_execute_each_task_exactly_once") else {
        return;
    };
    let schema = common::pg::fresh_schema("workers_once");
    let a = Worker::start(&url, &schema, &[]);
    let b = Worker::start(&url, &schema, &[]);
    let (a, b) = (a.finish(), b.finish());
    assert!(a.finished && b.finished, "both workers finished their run");
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for key in a.executed.iter().chain(&b.executed) {
        *count.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "executed more than once: {twice:?}");
    assert_eq!(count.len(), TASKS, "every task executed once");
    assert!(
        !a.executed.is_empty() && !b.executed.is_empty(),
        "both workers executed tasks ({} and {})",
        a.executed.len(),
        b.executed.len()
    );
    assert_outputs(&url, &schema);
}

#[test]
fn a_worker_killed_at_random_moments_and_restarted_never_reexecutes_a_reported_task() {
    let _serial = serial();
    let Some(url) = common::pg::pg_url("a_worker_killed_at_random_moments") else {
        return;
    };
    let schema = common::pg::fresh_schema("workers_killed");
    const ROUNDS: usize = 12;
    let mut rng = fastrand::Rng::with_seed(0x6b11_1ed5);
    let mut killed: Vec<Worker> = Vec::new();
    let mut rounds = 0;
    while rounds < ROUNDS {
        let mut worker = Worker::start(&url, &schema, &[]);
        worker.until(|line| line == "ready");
        // Killed after 1..=6 tasks it executed were reported done.
        let after = rng.usize(1..=6);
        let (mut mine, mut seen) = (BTreeSet::new(), 0);
        let ended = worker
            .until(|line| {
                if let Some(key) = line.strip_prefix("exec ") {
                    mine.insert(key.to_owned());
                }
                if line
                    .strip_prefix("done ")
                    .is_some_and(|key| mine.contains(key))
                {
                    seen += 1;
                }
                seen >= after || line.starts_with("finished ")
            })
            .is_none_or(|line| line.starts_with("finished "));
        if ended {
            // The DAG is done: nothing left to kill.
            killed.push(worker.finish());
            break;
        }
        worker.signal(SIGKILL);
        killed.push(worker.finish());
        rounds += 1;
    }
    assert!(
        rounds >= 10,
        "only {rounds} kills landed before the DAG was done"
    );
    // A last worker completes the DAG.
    let last = Worker::start(&url, &schema, &[]).finish();
    assert!(last.finished, "the last worker finished the run");
    // No task reported done by a process executes in a later process; none executes twice
    // in one process.
    let mut processes: Vec<&Worker> = killed.iter().collect();
    processes.push(&last);
    let mut reported: BTreeSet<&str> = BTreeSet::new();
    for worker in &processes {
        let mut mine = BTreeSet::new();
        for key in &worker.executed {
            assert!(
                mine.insert(key.as_str()),
                "{key} executed twice in one process"
            );
            assert!(
                !reported.contains(key.as_str()),
                "{key} was reported done, then executed again"
            );
        }
        reported.extend(worker.done.iter().map(String::as_str));
    }
    assert_outputs(&url, &schema);
    common::multi_thread_rt().block_on(async {
        // The killed workers' attempts ended Interrupted: none is left Running.
        let store = connect(&url, &schema, Duration::from_secs(10)).await;
        let history = store.history().expect("PgStore keeps a history");
        for run in history.runs().await.expect("runs") {
            let details = history.run(run.id).await.expect("run").expect("listed run");
            for attempt in details.attempts {
                assert_ne!(
                    attempt.outcome,
                    AttemptOutcome::Running,
                    "attempt left Running: {attempt:?}"
                );
            }
        }
    });
}

#[test]
fn a_hung_workers_lease_expires_and_its_late_commit_is_fenced() {
    let _serial = serial();
    let Some(url) = common::pg::pg_url("a_hung_workers_lease_expires") else {
        return;
    };
    let schema = common::pg::fresh_schema("workers_fenced");
    let slow = |value: u64, ms: u64| {
        [
            (MODE_ENV, "slow".to_owned()),
            (SLOW_VALUE_ENV, value.to_string()),
            (SLOW_MS_ENV, ms.to_string()),
        ]
    };
    let mut hung = Worker::start(&url, &schema, &slow(1, 3_000));
    hung.until(|line| line == "exec slow")
        .expect("the first worker starts the task");
    hung.signal(SIGSTOP);
    // The other worker waits for the lease, takes it once it expires, and stores its output.
    let mut other = Worker::start(&url, &schema, &slow(2, 0));
    let stored = other.until(|line| line.starts_with("stored ") || line.starts_with("error "));
    let other = other.finish();
    hung.signal(SIGCONT);
    let outcome = hung.until(|line| {
        line.starts_with("stored ") || line.starts_with("fenced ") || line.starts_with("error ")
    });
    let hung = hung.finish();
    assert_eq!(stored.as_deref(), Some("stored 2"));
    assert_eq!(other.executed, ["slow"]);
    assert!(
        outcome.as_deref().is_some_and(|l| l.starts_with("fenced ")),
        "the late commit was {outcome:?}"
    );
    assert_eq!(hung.executed, ["slow"]);
    let store = common::multi_thread_rt().block_on(connect(&url, &schema, Duration::from_secs(10)));
    let got: Option<u64> = Context::new(store).try_get("slow").expect("read");
    assert_eq!(got, Some(2), "the newer attempt's output stays");
}

#[test]
fn a_server_restarted_mid_run_gives_a_typed_error_or_a_resumed_run_and_loses_nothing() {
    let _serial = serial();
    let Some(url) = common::pg::pg_url("a_server_restarted_mid_run") else {
        return;
    };
    let Ok(pg_ctl) = std::env::var("DURAFLOW_PG_CTL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but DURAFLOW_PG_CTL is not"
        );
        eprintln!("a_server_restarted_mid_run: DURAFLOW_PG_CTL is not set; skipped");
        return;
    };
    let schema = common::pg::fresh_schema("workers_restart");
    let mut worker = Worker::start(&url, &schema, &[(TASK_MS_ENV, "20".to_owned())]);
    let mut dones = 0;
    let early = worker.until(|line| {
        dones += usize::from(line.starts_with("done "));
        dones >= 40 || line.starts_with("finished ") || line.starts_with("failed ")
    });
    assert!(
        early.as_deref().is_some_and(|l| l.starts_with("done ")),
        "the run ended before the restart: {early:?}"
    );
    let restarted = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{pg_ctl} -m fast -w restart"))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run pg_ctl");
    assert!(restarted.success(), "pg_ctl restart failed");
    // The worker resumes its run or ends it with an error; it does not hang.
    let ended = worker.until(|line| line.starts_with("finished ") || line.starts_with("failed "));
    let worker = worker.finish();
    let ended = ended.expect("the worker reported how its run ended");
    if let Some(error) = ended.strip_prefix("failed ") {
        assert!(!error.is_empty(), "the failed run says why");
    }
    // A new worker completes the DAG; no task reported done before executes again.
    let last = Worker::start(&url, &schema, &[]).finish();
    assert!(last.finished, "the last worker finished the run");
    for key in &last.executed {
        assert!(
            !worker.done.contains(key),
            "{key} was reported done, then executed again"
        );
    }
    assert_outputs(&url, &schema);
}
