//! Promise: a `SledStore` pipeline survives SIGKILL. A real child process runs a DAG of
//! [`TASKS`] tasks over one sled database and is killed at random moments, again and again;
//! after every kill:
//! - no task whose progress was reported (or whose output is stored) runs again in a later
//!   process, and no task runs twice within one process;
//! - the killed run is recorded `Interrupted`, none of its attempts is left `Running`, every
//!   attempt `Succeeded` in it is a task the child executed, and every task the child
//!   executed and reported done has one;
//! - a stored output and its `Succeeded` attempt exist together, and every stored output
//!   equals what a clean run computes;
//! - finally an unkilled child completes the run (`Succeeded`, executed + cached = all tasks)
//!   and every output equals a clean in-process run's over a `MemoryStore`.
//!
//! The test binary re-executes itself as the child: `sled_child` is an ignored test that
//! only does work when the parent passes the store directory in an environment variable.

#![cfg(unix)]

mod common;

use common::wait;
use duraflow_rs::RunHistory;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Lines, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagx::{task, DagRunner, Task, TaskHandle};
use duraflow_rs::{
    AttemptOutcome, Context, DurableDag, MemoryStore, RunRecord, RunStatus, SledStore, Storage,
};
use serde::{Deserialize, Serialize};

/// Store directory for the child; the child does nothing without it.
const DIR_ENV: &str = "DURAFLOW_SLED_CRASH_DIR";
/// Seeds the child's simulated work durations (derived from the parent's seed).
const CHILD_SEED_ENV: &str = "DURAFLOW_SLED_CRASH_CHILD_SEED";
/// Overrides [`DEFAULT_SEED`] to replay or explore other kill schedules.
const SEED_ENV: &str = "DURAFLOW_SLED_CRASH_SEED";
const DEFAULT_SEED: u64 = 0x5eed_0fd1_5c0c_4a17;
/// The name of the child test, as libtest selects it.
const CHILD_TEST: &str = "sled_child";
/// Children are killed mid-run until this many kills landed while a child was executing
/// tasks (the test needs at least [`MIN_MIDRUN_KILLS`])...
const TARGET_MIDRUN_KILLS: usize = 36;
const MIN_MIDRUN_KILLS: usize = 30;
/// ...or until this many children were started (a safety bound).
const MAX_ITERATIONS: usize = 80;
/// A child is killed after 1..=MAX_NEW_DONE progress reports of tasks it executed.
const MAX_NEW_DONE: usize = 2;
/// Every EARLY_KILL_EVERY-th child is instead killed at a random moment within
/// [`EARLY_KILL_WINDOW_US`] of its start: while it starts, opens the store (which marks the
/// previous run Interrupted) or begins its run.
const EARLY_KILL_EVERY: usize = 5;
const EARLY_KILL_WINDOW_US: u64 = 40_000;
const SIGKILL: i32 = 9;
/// Every line the child reports starts with this marker; libtest prints `test NAME ... `
/// without a newline before the first one, so lines are split on it.
const MARKER: &str = "@@ ";

/// Sources (and squares and pairs); groups take 4 pairs each.
const WIDTH: usize = 32;
const GROUPS: usize = WIDTH / 4;
/// Two independent chains (each link depends on the previous one) of CHAIN links: ~0.45 s
/// of simulated work on the run's critical path, so each kill ends only a few links and the
/// kills do not run out of unfinished work even when the parent reacts late. Two of them, so
/// that while a link runs the other chain's commits flush its `Running` attempt record and a
/// kill can leave it `Interrupted`.
const CHAIN: usize = 64;
const SUPERS: usize = GROUPS / 4;
/// src + sq + pair + grp + label + chains + super + total.
const TASKS: usize = 3 * WIDTH + 2 * GROUPS + 2 * CHAIN + SUPERS + 1;

// ---------------------------------------------------------------------------------------
// The pipeline.

/// Set only in the child: report executions and simulate work there.
static CHILD_SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Called first thing in every task body, i.e. only when the task really executes: in the
/// child, prints `exec <id>` and simulates 2..=12 ms of work (a timer, so many tasks are in
/// flight at once and the workers stay free to report progress as soon as it is durable).
async fn work(id: &str) {
    let Some(seed) = CHILD_SEED.get() else { return };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{MARKER}exec {id}").expect("sled_child: print exec");
        out.flush().expect("sled_child: flush exec");
    }
    let mut rng = fastrand::Rng::with_seed(seed ^ hash(id));
    tokio::time::sleep(Duration::from_micros(rng.u64(2_000..=12_000))).await;
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser: values that differ everywhere.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Group {
    members: Vec<u64>,
    sum: u64,
}

#[derive(Clone)]
struct Source {
    id: String,
    i: u64,
}
#[task]
impl Source {
    async fn run(&self) -> u64 {
        work(&self.id).await;
        mix(self.i)
    }
}

#[derive(Clone)]
struct Square {
    id: String,
}
#[task]
impl Square {
    async fn run(&self, x: &u64) -> u64 {
        work(&self.id).await;
        x.wrapping_mul(*x) ^ (x >> 7)
    }
}

#[derive(Clone)]
struct Pair {
    id: String,
}
#[task]
impl Pair {
    async fn run(&self, a: &u64, b: &u64) -> u64 {
        work(&self.id).await;
        mix(a.wrapping_add(b.rotate_left(17)))
    }
}

#[derive(Clone)]
struct Gather {
    id: String,
}
#[task]
impl Gather {
    async fn run(&self, a: &u64, b: &u64, c: &u64, d: &u64) -> Group {
        work(&self.id).await;
        let members = vec![*a, *b, *c, *d];
        let sum = members.iter().fold(0u64, |s, m| s.wrapping_add(*m));
        Group { members, sum }
    }
}

#[derive(Clone)]
struct Label {
    id: String,
}
#[task]
impl Label {
    async fn run(&self, g: &Group, x: &u64) -> String {
        work(&self.id).await;
        format!("{}:{:x}:{}", self.id, g.sum ^ x, g.members.len())
    }
}

#[derive(Clone)]
struct Link {
    id: String,
}
#[task]
impl Link {
    async fn run(&self, prev: &u64, x: &u64) -> u64 {
        work(&self.id).await;
        mix(prev ^ x)
    }
}

#[derive(Clone)]
struct Super {
    id: String,
}
#[task]
impl Super {
    async fn run(&self, a: &Group, b: &Group, c: &Group, d: &Group) -> Vec<u64> {
        work(&self.id).await;
        let mut v: Vec<u64> = [a, b, c, d].iter().map(|g| g.sum).collect();
        v.push(v.iter().fold(1u64, |p, s| p.wrapping_mul(s | 1)));
        v
    }
}

#[derive(Clone)]
struct Total {
    id: String,
}
#[task]
impl Total {
    // Eight dependencies of four types (dagx's largest arity); the macro hands each over by
    // reference to its output type.
    #[allow(clippy::too_many_arguments, clippy::ptr_arg)]
    async fn run(
        &self,
        s0: &Vec<u64>,
        s1: &Vec<u64>,
        chain_a: &u64,
        chain_b: &u64,
        l0: &String,
        l1: &String,
        g: &Group,
        sq: &u64,
    ) -> String {
        work(&self.id).await;
        let sums: u64 = s0.iter().chain(s1).fold(0u64, |a, b| a.wrapping_add(*b));
        format!(
            "{sums:x}|{chain_a:x}|{chain_b:x}|{l0}|{l1}|{:x}|{sq:x}",
            g.sum
        )
    }
}

/// The type a task's output is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    U64,
    Group,
    Str,
    Vec,
}

/// Adds the pipeline's [`TASKS`] tasks to `d`; returns every id with its output type.
fn build(d: &DurableDag<'_>) -> Vec<(String, Kind)> {
    let mut ids = Vec::with_capacity(TASKS);
    let mut id = |name: String, kind: Kind| {
        ids.push((name.clone(), kind));
        name
    };
    let src: Vec<TaskHandle<u64>> = (0..WIDTH)
        .map(|i| {
            let id = id(format!("src/{i}"), Kind::U64);
            d.add(
                &id,
                Source {
                    id: id.clone(),
                    i: i as u64,
                },
            )
            .into()
        })
        .collect();
    let sq: Vec<TaskHandle<u64>> = (0..WIDTH)
        .map(|i| {
            let id = id(format!("sq/{i}"), Kind::U64);
            d.add(&id, Square { id: id.clone() }).depends_on(src[i])
        })
        .collect();
    let pair: Vec<TaskHandle<u64>> = (0..WIDTH)
        .map(|i| {
            let id = id(format!("pair/{i}"), Kind::U64);
            d.add(&id, Pair { id: id.clone() })
                .depends_on((&sq[i], &sq[(i + 1) % WIDTH]))
        })
        .collect();
    let grp: Vec<TaskHandle<Group>> = (0..GROUPS)
        .map(|j| {
            let id = id(format!("grp/{j}"), Kind::Group);
            let p = &pair[4 * j..4 * j + 4];
            d.add(&id, Gather { id: id.clone() })
                .depends_on((&p[0], &p[1], &p[2], &p[3]))
        })
        .collect();
    let label: Vec<TaskHandle<String>> = (0..GROUPS)
        .map(|j| {
            let id = id(format!("label/{j}"), Kind::Str);
            d.add(&id, Label { id: id.clone() })
                .depends_on((&grp[j], &src[(5 * j) % WIDTH]))
        })
        .collect();
    // Chain "a" also reads squares, chain "b" pairs.
    let mut chains: Vec<Vec<TaskHandle<u64>>> = Vec::with_capacity(2);
    for (name, side) in [("a", &sq), ("b", &pair)] {
        let mut chain: Vec<TaskHandle<u64>> = Vec::with_capacity(CHAIN);
        for k in 0..CHAIN {
            let id = id(format!("chain/{name}/{k}"), Kind::U64);
            let prev = if k == 0 { src[0] } else { chain[k - 1] };
            let h = d
                .add(&id, Link { id: id.clone() })
                .depends_on((&prev, &side[(2 * k + 1) % WIDTH]));
            chain.push(h);
        }
        chains.push(chain);
    }
    let sup: Vec<TaskHandle<Vec<u64>>> = (0..SUPERS)
        .map(|s| {
            let id = id(format!("super/{s}"), Kind::Vec);
            let g = &grp[4 * s..4 * s + 4];
            d.add(&id, Super { id: id.clone() })
                .depends_on((&g[0], &g[1], &g[2], &g[3]))
        })
        .collect();
    let total = id("total".to_owned(), Kind::Str);
    d.add(&total, Total { id: total.clone() }).depends_on((
        &sup[0],
        &sup[1],
        &chains[0][CHAIN - 1],
        &chains[1][CHAIN - 1],
        &label[0],
        &label[GROUPS - 1],
        &grp[5],
        &sq[WIDTH - 1],
    ));
    assert_eq!(ids.len(), TASKS, "the pipeline has TASKS tasks");
    ids
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// Every task's stored output, decoded with its type and printed (`None`: not stored).
fn snapshot(ctx: &Context, ids: &[(String, Kind)]) -> BTreeMap<String, Option<String>> {
    ids.iter()
        .map(|(id, kind)| {
            let shown = match kind {
                Kind::U64 => ctx.try_get::<u64>(id).map(|v| v.map(|v| format!("{v}"))),
                Kind::Group => ctx
                    .try_get::<Group>(id)
                    .map(|v| v.map(|v| format!("{v:?}"))),
                Kind::Str => ctx
                    .try_get::<String>(id)
                    .map(|v| v.map(|v| format!("{v:?}"))),
                Kind::Vec => ctx
                    .try_get::<Vec<u64>>(id)
                    .map(|v| v.map(|v| format!("{v:?}"))),
            };
            let shown = shown.unwrap_or_else(|e| panic!("output of {id} does not decode: {e}"));
            (id.clone(), shown)
        })
        .collect()
}

/// The outputs of a clean, uninterrupted in-process run over a `MemoryStore`.
fn clean_run() -> (Vec<(String, Kind)>, BTreeMap<String, String>) {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let ids = build(&d);
    runtime()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .expect("the clean run succeeds");
    let stats = d.stats();
    assert_eq!(
        (stats.executed, stats.cached, stats.failed),
        (TASKS, 0, 0),
        "clean run"
    );
    let values = snapshot(&ctx, &ids)
        .into_iter()
        .map(|(id, v)| {
            let v = v.unwrap_or_else(|| panic!("the clean run stored no output for {id}"));
            (id, v)
        })
        .collect();
    (ids, values)
}

#[test]
#[ignore = "helper: run only as a child process by sigkill_during_sled_runs_never_reruns_reported_tasks"]
fn sled_child() {
    let Some(dir) = common::child_dir(DIR_ENV, CHILD_TEST) else {
        return;
    };
    let seed: u64 = common::env_number(CHILD_SEED_ENV);
    CHILD_SEED.set(seed).expect("sled_child: seed set once");
    let store = open_store(Path::new(&dir), "sled_child");
    let ctx = Arc::new(Context::new(store));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone()).with_progress(|id, completed| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{MARKER}done {id} {completed}").expect("sled_child: print done");
        out.flush().expect("sled_child: flush done");
    });
    build(&d);
    runtime()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .expect("sled_child: the run succeeds");
    let stats = d.stats();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{MARKER}summary {} {} {}",
        stats.executed, stats.cached, stats.failed
    )
    .expect("sled_child: print summary");
    out.flush().expect("sled_child: flush summary");
}

// ---------------------------------------------------------------------------------------
// The parent.

/// Kills (SIGKILL) and reaps the child if the parent panics before killing it itself.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one child reported, checked line by line as it arrives.
struct Observed<'a> {
    ctx: &'a str,
    /// Outputs stored before this child started: none of them may execute.
    stored_before: &'a BTreeSet<String>,
    /// Every id reported done by any child so far (this one included).
    ever_done: &'a mut BTreeSet<String>,
    exec: BTreeSet<String>,
    done: BTreeSet<String>,
    /// Done reports of tasks whose output was not stored before this child.
    new_done: usize,
    summary: Option<(usize, usize, usize)>,
}

impl Observed<'_> {
    /// Reads and checks the child's next report; `false` once its stdout has ended.
    fn next(&mut self, lines: &mut Lines<BufReader<ChildStdout>>) -> bool {
        let ctx = self.ctx;
        for line in lines.by_ref() {
            let line = line.unwrap_or_else(|e| panic!("{ctx}: read the child's stdout: {e}"));
            let Some((_, report)) = line.split_once(MARKER) else {
                continue; // libtest's own lines
            };
            let mut parts = report.split(' ');
            match (parts.next(), parts.next()) {
                (Some("exec"), Some(id)) => {
                    assert!(
                        !self.ever_done.contains(id),
                        "{ctx}: {id} executed again although a child reported its progress"
                    );
                    assert!(
                        !self.stored_before.contains(id),
                        "{ctx}: {id} executed again although its output was stored"
                    );
                    assert!(
                        self.exec.insert(id.to_owned()),
                        "{ctx}: {id} executed twice in one child"
                    );
                }
                (Some("done"), Some(id)) => {
                    assert!(
                        self.done.insert(id.to_owned()),
                        "{ctx}: {id} reported done twice in one child"
                    );
                    assert_eq!(
                        self.exec.contains(id),
                        !self.stored_before.contains(id),
                        "{ctx}: {id} reported done: executed in this child iff not stored before"
                    );
                    self.ever_done.insert(id.to_owned());
                    if !self.stored_before.contains(id) {
                        self.new_done += 1;
                    }
                }
                (Some("summary"), Some(executed)) => {
                    let n = |s: Option<&str>| -> usize {
                        s.and_then(|s| s.parse().ok())
                            .unwrap_or_else(|| panic!("{ctx}: bad summary line {line:?}"))
                    };
                    self.summary = Some((n(Some(executed)), n(parts.next()), n(parts.next())));
                }
                _ => panic!("{ctx}: unexpected line from the child: {line:?}"),
            }
            return true;
        }
        false
    }
}

fn spawn_child(dir: &Path, child_seed: u64, stderr: &Path, ctx: &str) -> KillOnDrop {
    let stderr = File::create(stderr).unwrap_or_else(|e| panic!("{ctx}: create stderr file: {e}"));
    KillOnDrop(
        common::child_test(CHILD_TEST)
            .env(DIR_ENV, dir)
            .env(CHILD_SEED_ENV, child_seed.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{ctx}: spawn the child: {e}")),
    )
}

/// Opens the store. Right after the parent dropped its handle (the child's open) or after a
/// child was killed (the parent's): neither may find it locked, since dropping a `SledStore`
/// returns only once sled has released the database's lock, and a killed child's lock is
/// gone once `wait` returns.
fn open_store(dir: &Path, ctx: &str) -> SledStore {
    SledStore::open(dir).unwrap_or_else(|e| panic!("{ctx}: open the store {dir:?}: {e}"))
}

fn read_stderr(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Checks that hold in the store at any time between processes: no run or attempt is left
/// `Running` (reopening marks them `Interrupted`), every stored output has a `Succeeded`
/// attempt (they are committed together), and every stored output equals the clean run's.
/// Returns the runs and the stored ids.
fn check_store(
    store: &SledStore,
    ids: &[(String, Kind)],
    clean: &BTreeMap<String, String>,
    ctx: &str,
) -> (Vec<RunRecord>, BTreeSet<String>) {
    let runs = wait(store.runs()).unwrap_or_else(|e| panic!("{ctx}: list runs: {e}"));
    for pair in runs.windows(2) {
        assert!(pair[0].id < pair[1].id, "{ctx}: run ids not increasing");
    }
    for run in &runs {
        assert_ne!(
            run.status,
            RunStatus::Running,
            "{ctx}: run left Running: {run:?}"
        );
    }
    let mut stored = BTreeSet::new();
    for (id, _) in ids {
        let present = wait(store.read(id))
            .unwrap_or_else(|e| panic!("{ctx}: read {id}: {e}"))
            .is_some();
        let attempts =
            wait(store.attempts_of(id)).unwrap_or_else(|e| panic!("{ctx}: attempts of {id}: {e}"));
        let succeeded = attempts
            .iter()
            .filter(|a| a.outcome == AttemptOutcome::Succeeded)
            .count();
        assert!(
            attempts
                .iter()
                .all(|a| a.outcome != AttemptOutcome::Running),
            "{ctx}: {id} has an attempt left Running: {attempts:?}"
        );
        assert!(
            succeeded <= 1,
            "{ctx}: {id} succeeded {succeeded} times (executed again?): {attempts:?}"
        );
        assert_eq!(
            present,
            succeeded == 1,
            "{ctx}: {id}: output stored = {present} but Succeeded attempts = {succeeded} \
             (output and attempt are committed together): {attempts:?}"
        );
        if present {
            stored.insert(id.clone());
        }
    }
    // Decode every stored output with its type; each must equal the clean run's.
    let snap = {
        // `Context` needs the store by value; read the bytes through a MemoryStore copy.
        let copy = MemoryStore::new();
        for id in &stored {
            let bytes = wait(store.read(id))
                .unwrap_or_else(|e| panic!("{ctx}: read {id}: {e}"))
                .unwrap_or_else(|| panic!("{ctx}: {id} vanished"));
            wait(copy.write(id, bytes.to_vec()))
                .unwrap_or_else(|e| panic!("{ctx}: copy {id}: {e}"));
        }
        snapshot(&Context::new(copy), ids)
    };
    for (id, value) in &snap {
        if let Some(value) = value {
            assert_eq!(
                Some(value),
                clean.get(id),
                "{ctx}: stored output of {id} differs from the clean run's"
            );
        }
    }
    (runs, stored)
}

#[test]
fn sigkill_during_sled_runs_never_reruns_reported_tasks() {
    let seed: u64 = match std::env::var(SEED_ENV) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_ENV}={s:?} is not a u64: {e}")),
        Err(_) => DEFAULT_SEED,
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let began = Instant::now();
    let (ids, clean) = clean_run();
    let tmp = tempfile::tempdir().expect("create a temp dir");
    let dir = tmp.path().join("store.sled");
    let stderr_path = tmp.path().join("child.stderr");

    let mut ever_done: BTreeSet<String> = BTreeSet::new();
    let mut stored: BTreeSet<String> = BTreeSet::new();
    let mut runs: Vec<RunRecord> = Vec::new();
    let mut executions = 0usize;
    let mut ever_exec: BTreeSet<String> = BTreeSet::new();
    // Kills that landed while the child was executing tasks, and kills before it executed
    // any (early kills, or a child that found nothing left to do).
    let mut midrun_kills = 0usize;
    let mut startup_kills = 0usize;
    let mut finished_before_kill = 0usize;
    let mut interrupted_attempts = 0usize;
    let mut iteration = 0usize;

    while midrun_kills < TARGET_MIDRUN_KILLS && iteration < MAX_ITERATIONS && stored.len() < TASKS {
        iteration += 1;
        let ctx = format!("seed {seed} (set {SEED_ENV} to replay), child {iteration}");
        let early = iteration.is_multiple_of(EARLY_KILL_EVERY);
        let target = if early {
            0
        } else {
            rng.usize(1..=MAX_NEW_DONE)
        };
        let spin = rng.usize(0..200_000);
        let child_seed = rng.u64(..);

        let mut child = spawn_child(&dir, child_seed, &stderr_path, &ctx);
        let child = &mut child.0;
        let stdout = child.stdout.take().expect("child stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let stored_before = stored.clone();
        let mut seen = Observed {
            ctx: &ctx,
            stored_before: &stored_before,
            ever_done: &mut ever_done,
            exec: BTreeSet::new(),
            done: BTreeSet::new(),
            new_done: 0,
            summary: None,
        };
        if early {
            std::thread::sleep(Duration::from_micros(rng.u64(0..EARLY_KILL_WINDOW_US)));
        } else {
            while seen.new_done < target && seen.next(&mut lines) {}
        }
        // A random extra delay (busy, not a sleep) so the kill lands anywhere in a task.
        for _ in 0..spin {
            std::hint::spin_loop();
        }
        child
            .kill()
            .unwrap_or_else(|e| panic!("{ctx}: SIGKILL the child: {e}"));
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("{ctx}: wait for the child: {e}"));
        // The child kept running while we stopped reading: its later reports are still in
        // the pipe, and they too are promises the store must keep.
        while seen.next(&mut lines) {}
        let Observed {
            exec,
            done,
            summary,
            new_done,
            ..
        } = seen;
        let finished = summary.is_some();
        if finished {
            assert!(
                status.success() || status.signal() == Some(SIGKILL),
                "{ctx}: the child failed ({status}); stderr:\n{}",
                read_stderr(&stderr_path)
            );
            finished_before_kill += 1;
        } else {
            assert_eq!(
                status.signal(),
                Some(SIGKILL),
                "{ctx}: the child ended ({status}) without finishing its run; stderr:\n{}",
                read_stderr(&stderr_path)
            );
            if exec.is_empty() {
                startup_kills += 1;
            } else {
                midrun_kills += 1;
            }
        }
        if !early && !finished {
            assert!(new_done >= target, "{ctx}: target not reached");
        }
        executions += exec.len();
        ever_exec.extend(exec.iter().cloned());

        // The child is dead, so its lock is released: open, check, drop.
        let store = open_store(&dir, &ctx);
        let (now_runs, now_stored) = check_store(&store, &ids, &clean, &ctx);
        assert!(
            now_runs.starts_with(&runs),
            "{ctx}: earlier run records changed"
        );
        assert!(
            now_runs.len() <= runs.len() + 1,
            "{ctx}: one child added more than one run"
        );
        // Progress of an executed task is reported after its commit's flush, which also made
        // the run's first record durable, and a run that returned is durable; cached tasks
        // report progress without a flush, so a child killed before its first commit (and
        // before its run returned) may leave no record.
        if new_done > 0 || finished {
            assert_eq!(
                now_runs.len(),
                runs.len() + 1,
                "{ctx}: the child reported progress but its run is not recorded"
            );
        }
        for id in &done {
            assert!(
                now_stored.contains(id),
                "{ctx}: {id} was reported done but its output is not stored"
            );
        }
        assert!(
            now_stored.is_superset(&stored),
            "{ctx}: stored outputs disappeared"
        );
        for id in now_stored.difference(&stored) {
            assert!(
                exec.contains(id),
                "{ctx}: {id} was stored by this child without being executed"
            );
        }
        if let Some(last) = now_runs.get(runs.len()) {
            let details = wait(store.run(last.id))
                .unwrap_or_else(|e| panic!("{ctx}: run {}: {e}", last.id))
                .unwrap_or_else(|| panic!("{ctx}: run {} not found", last.id));
            match last.status {
                RunStatus::Interrupted => {}
                RunStatus::Succeeded => assert_eq!(
                    done.len(),
                    TASKS,
                    "{ctx}: the run is Succeeded, so every task reported progress"
                ),
                other => panic!("{ctx}: the killed run is {other:?}: {last:?}"),
            }
            if finished {
                assert_eq!(last.status, RunStatus::Succeeded, "{ctx}: finished run");
            }
            for a in &details.attempts {
                assert_eq!(a.run, last.id, "{ctx}: attempt of another run listed");
                assert_eq!(a.attempt, 1, "{ctx}: one attempt per task per run: {a:?}");
                match &a.outcome {
                    AttemptOutcome::Running => {
                        panic!("{ctx}: attempt of the killed run left Running: {a:?}")
                    }
                    AttemptOutcome::Interrupted => interrupted_attempts += 1,
                    AttemptOutcome::Succeeded => assert!(
                        exec.contains(&a.key) && !stored_before.contains(&a.key),
                        "{ctx}: {} Succeeded in this run but was not executed by it",
                        a.key
                    ),
                    AttemptOutcome::Cached => assert!(
                        stored_before.contains(&a.key),
                        "{ctx}: {} Cached in this run but was not stored before it",
                        a.key
                    ),
                    AttemptOutcome::Failed { error } => {
                        panic!("{ctx}: {} failed: {error}", a.key)
                    }
                    other => panic!("{ctx}: unknown outcome {other:?}"),
                }
            }
            // An executed task reported done has its Succeeded attempt (committed with the
            // output, flushed before the report).
            for id in done.intersection(&exec) {
                assert!(
                    details
                        .attempts
                        .iter()
                        .any(|a| &a.key == id && a.outcome == AttemptOutcome::Succeeded),
                    "{ctx}: {id} reported done but has no Succeeded attempt in run {}",
                    last.id
                );
            }
        }
        {
            let last = now_runs.get(runs.len()).cloned();
            let att = last
                .as_ref()
                .map(|l| wait(store.run(l.id)).unwrap().unwrap().attempts)
                .unwrap_or_default();
            let mut c = std::collections::BTreeMap::<String, usize>::new();
            for a in &att {
                *c.entry(format!("{:?}", a.outcome)).or_default() += 1;
            }
        }
        drop(store); // release the lock before the next child opens the store
        runs = now_runs;
        stored = now_stored;
    }

    assert!(
        midrun_kills >= MIN_MIDRUN_KILLS,
        "seed {seed}: only {midrun_kills} kills landed mid-run in {iteration} children \
         ({startup_kills} before any task ran, {finished_before_kill} children finished first, \
         {} of {TASKS} tasks stored)",
        stored.len()
    );
    // Attempt records of started-but-unfinished tasks are queued without a flush, so one
    // kill may leave none on disk (nor an Interrupted attempt); over all kills some must.
    assert!(
        interrupted_attempts > 0,
        "seed {seed}: no Interrupted attempt recorded over {midrun_kills} kills"
    );

    // A last child, not killed, completes the run.
    let ctx = format!("seed {seed} (set {SEED_ENV} to replay), final run");
    let mut child = spawn_child(&dir, rng.u64(..), &stderr_path, &ctx);
    let child = &mut child.0;
    let stdout = child.stdout.take().expect("child stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let stored_before = stored.clone();
    let mut seen = Observed {
        ctx: &ctx,
        stored_before: &stored_before,
        ever_done: &mut ever_done,
        exec: BTreeSet::new(),
        done: BTreeSet::new(),
        new_done: 0,
        summary: None,
    };
    while seen.next(&mut lines) {}
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("{ctx}: wait for the child: {e}"));
    assert!(
        status.success(),
        "{ctx}: the child failed ({status}); stderr:\n{}",
        read_stderr(&stderr_path)
    );
    let (exec, done, summary) = (seen.exec, seen.done, seen.summary);
    let missing: BTreeSet<String> = ids
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| !stored.contains(id))
        .collect();
    assert_eq!(
        exec, missing,
        "{ctx}: executed exactly the tasks not stored"
    );
    assert_eq!(done.len(), TASKS, "{ctx}: every task reported progress");
    assert_eq!(
        summary,
        Some((missing.len(), TASKS - missing.len(), 0)),
        "{ctx}: the child's stats"
    );
    executions += exec.len();
    ever_exec.extend(exec.iter().cloned());

    let store = open_store(&dir, &ctx);
    let (final_runs, final_stored) = check_store(&store, &ids, &clean, &ctx);
    assert_eq!(final_stored.len(), TASKS, "{ctx}: every output is stored");
    let last = final_runs.last().expect("the final run is recorded");
    assert_eq!(last.status, RunStatus::Succeeded, "{ctx}: {last:?}");
    assert_eq!(
        (last.executed as usize, last.cached as usize, last.failed),
        (missing.len(), TASKS - missing.len(), 0),
        "{ctx}: the final run record's counts"
    );
    assert_eq!(
        last.executed + last.cached,
        TASKS as u64,
        "{ctx}: every task executed or cached"
    );
    assert!(
        last.finished_ms.is_some(),
        "{ctx}: the final run has an end"
    );
    // Every output through the public API, typed, equals the clean run's.
    let sled_ctx = Context::new(store);
    let got = snapshot(&sled_ctx, &ids);
    for (id, value) in &got {
        assert_eq!(
            value.as_ref(),
            clean.get(id),
            "{ctx}: final output of {id} differs from the clean run's"
        );
    }
    drop(sled_ctx);
    assert_eq!(
        ever_exec.len(),
        TASKS,
        "seed {seed}: every task executed somewhere"
    );
    eprintln!(
        "sled kill -9 test: {TASKS} tasks, {iteration} children killed ({midrun_kills} mid-run, \
         {startup_kills} before any task ran, {finished_before_kill} after the run finished), {} runs, \
         {executions} executions ({} re-executions of unfinished tasks), \
         {interrupted_attempts} Interrupted attempts, {} left for the final run, \
         seed {seed}, {:?}",
        final_runs.len(),
        executions - TASKS,
        missing.len(),
        began.elapsed()
    );
}
