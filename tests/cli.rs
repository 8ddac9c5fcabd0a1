//! The `duraflow` binary (feature `cli`), run against stores made here with the library:
//! a sled store with a clean run, a failed run (a panicking task, and a fallible task that
//! fails once and succeeds on its retry) and a run killed by SIGKILL in a child process; and
//! a FileStore directory (and, for `show`'s WHY column, reasons given to some attempts of
//! the failed run). Checks stdout, the one-line stderr and the exit codes (0 ok,
//! 1 error, 2 usage), a locked store and a missing path, `rm` and `gc` by their effect on
//! the store (and `rm --prefix` failing, naming it, on a key entry it cannot read), and the HTML report as headless Chromium renders it: one bar per attempt.
//!
//! The browser test needs Debian's `chromium` (`.ci/run` installs it); without it the test
//! says so and skips, unless the environment variable `CI` is set, when it fails.
//!
//! `DURAFLOW_README_SCREENSHOT=examples/report.png cargo test --features cli --test cli --
//! --ignored readme_screenshot` writes the README's screenshot of a report.
#![cfg(all(unix, feature = "cli"))]

mod common;

use common::wait;
use duraflow_rs::RunHistory;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use dagx::{task, DagRunner, Task, TaskHandle};
use duraflow_rs::{
    AttemptOutcome, Context, DurableDag, FileStore, RetryPolicy, RunLog, RunStats, RunStatus,
    SledStore, Storage,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------
// The pipeline the stores are made with.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Table {
    name: String,
    rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Summary {
    orders: u64,
    customers: u64,
    products: u64,
}

async fn work(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[derive(Clone)]
struct Fetch {
    name: &'static str,
    rows: u64,
    ms: u64,
}
#[task]
impl Fetch {
    async fn run(&self) -> Table {
        work(self.ms).await;
        Table {
            name: self.name.to_owned(),
            rows: self.rows,
        }
    }
}

struct Clean;
#[task]
impl Clean {
    async fn run(&self, t: &Table) -> Table {
        work(15).await;
        Table {
            name: format!("clean {}", t.name),
            rows: t.rows - 3,
        }
    }
}

struct Join;
#[task]
impl Join {
    async fn run(&self, orders: &Table, customers: &Table, products: &Table) -> Summary {
        work(25).await;
        Summary {
            orders: orders.rows,
            customers: customers.rows,
            products: products.rows,
        }
    }
}

struct Report;
#[task]
impl Report {
    async fn run(&self, s: &Summary) -> String {
        work(10).await;
        format!("{} orders from {} customers", s.orders, s.customers)
    }
}

/// Fails its first call, then succeeds: one failed attempt and one executed.
#[derive(Clone)]
struct Export {
    calls: Arc<AtomicU32>,
}
#[task]
impl Export {
    async fn run(&self, s: &Summary) -> Result<u64, String> {
        work(20).await;
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(EXPORT_ERROR.to_owned())
        } else {
            Ok(s.orders)
        }
    }
}
const EXPORT_ERROR: &str = "upload to <warehouse> failed: connection reset";

struct Notify;
#[task]
impl Notify {
    #[allow(clippy::ptr_arg)]
    async fn run(&self, _report: &String) -> u64 {
        work(5).await;
        panic!("{NOTIFY_PANIC}")
    }
}
const NOTIFY_PANIC: &str = "smtp: <b>550</b> mailbox \"ops\" & friends unavailable";

#[derive(Clone)]
struct Sleep(u64);
#[task]
impl Sleep {
    async fn run(&self) -> u64 {
        work(self.0).await;
        self.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Six tasks, all executed.
    Clean,
    /// The six cached, `export` failing once then executed, `notify` panicking.
    Failing,
    /// The child's run: `index` executed, `slow` killed mid-run; the three fetches of their
    /// layer cached (dagx starts the next layer once a layer is done, which never happens).
    Killed,
}

const TASKS: [&str; 6] = [
    "fetch/orders",
    "fetch/customers",
    "fetch/products",
    "clean/orders",
    "join",
    "report",
];

fn pipeline(store: SledStore, round: Round, progress: impl Fn(&str) + Send + Sync + 'static) {
    let ctx = Arc::new(Context::new(store));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone()).with_progress(move |id, _| progress(id));
    let orders = d.add(
        "fetch/orders",
        Fetch {
            name: "orders",
            rows: 1200,
            ms: 40,
        },
    );
    let customers: TaskHandle<Table> = d
        .add(
            "fetch/customers",
            Fetch {
                name: "customers",
                rows: 310,
                ms: 25,
            },
        )
        .into();
    let products: TaskHandle<Table> = d
        .add(
            "fetch/products",
            Fetch {
                name: "products",
                rows: 75,
                ms: 30,
            },
        )
        .into();
    let clean = d.add("clean/orders", Clean).depends_on(&orders);
    let join = d
        .add("join", Join)
        .depends_on((&clean, &customers, &products));
    let report = d.add("report", Report).depends_on(join);
    if round != Round::Clean {
        let retry = RetryPolicy::attempts(2)
            .backoff(Duration::from_millis(10), Duration::from_millis(10))
            .jitter(false);
        let export = Export {
            calls: Arc::default(),
        };
        d.add_fallible_with("export", export, retry)
            .depends_on(join);
    }
    if round == Round::Failing {
        d.add("notify", Notify).depends_on(report);
    }
    if round == Round::Killed {
        d.add("index", Sleep(150));
        d.add("slow", Sleep(60_000));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _ = rt.block_on(dag.run(|f| {
        tokio::spawn(f);
    }));
    let stats: RunStats = d.stats();
    let expected = match round {
        Round::Clean => (6, 0, 0),
        Round::Failing => (1, 6, 1),
        Round::Killed => unreachable!("the killed run never ends"),
    };
    assert_eq!((stats.executed, stats.cached, stats.failed), expected);
}

// ---------------------------------------------------------------------------------------
// Fixtures.

/// The child of the killed run: runs [`Round::Killed`] over the store in this variable.
const CHILD_ENV: &str = "DURAFLOW_CLI_TEST_CHILD_STORE";
const DONE: &str = "@@ done ";

/// Not a test of its own: the process `fixture` kills mid-run.
#[test]
#[ignore = "helper: run only as a child process by the fixture"]
fn killed_run_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    pipeline(SledStore::open(path).unwrap(), Round::Killed, |id| {
        println!("\n{DONE}{id}");
    });
}

/// Serialises the tests: a child spawned by one test shares, until it execs, every open
/// file of this process, the lock of a store another test has just dropped included, and
/// the binary would find that store locked.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fixture's sled store, made once: run 1 clean, run 2 failed, run 3 killed.
fn fixture() -> &'static Path {
    static FIXTURE: OnceLock<PathBuf> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pipeline.db");
        pipeline(SledStore::open(&path).unwrap(), Round::Clean, |_| {});
        pipeline(SledStore::open(&path).unwrap(), Round::Failing, |_| {});

        let mut child = common::child_test("killed_run_child")
            .env(CHILD_ENV, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut done = Vec::new();
        for line in lines {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix(DONE) {
                done.push(id.to_owned());
                if id == "index" {
                    break;
                }
            }
        }
        assert!(
            done.iter().any(|d| d == "index"),
            "the child ended early: {done:?}"
        );
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");

        // Reopening marks the killed run interrupted.
        let store = SledStore::open(&path).unwrap();
        let runs = wait(store.runs()).unwrap();
        let statuses: Vec<_> = runs.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            [
                RunStatus::Succeeded,
                RunStatus::Failed,
                RunStatus::Interrupted
            ]
        );
        let killed = wait(store.run(3)).unwrap().unwrap();
        let slow = killed.attempts.iter().find(|a| a.key == "slow");
        assert_eq!(
            slow.map(|a| &a.outcome),
            Some(&AttemptOutcome::Interrupted),
            "{killed:?}"
        );
        drop(store);
        path
    })
}

/// A copy of the fixture's store in `dir`, for a test to open, change or lock.
fn sled_copy(dir: &Path) -> PathBuf {
    let to = dir.join("pipeline.db");
    copy_dir(fixture(), &to);
    to
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A FileStore directory with three values, in `dir`.
fn file_store(dir: &Path) -> PathBuf {
    let path = dir.join("files");
    let ctx = Context::new(FileStore::new(&path).unwrap());
    ctx.save(
        "fetch/orders",
        &Table {
            name: "orders".to_owned(),
            rows: 12,
        },
    )
    .unwrap();
    ctx.save("fetch/users", &vec![1u32, 2, 3]).unwrap();
    ctx.save("total", &42u64).unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// Running the binary.

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
    raw: Vec<u8>,
}

fn duraflow<I, S>(args: I) -> Ran
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    duraflow_in(Path::new("."), args)
}

/// Runs the binary in the directory `cwd`.
fn duraflow_in<I, S>(cwd: &Path, args: I) -> Ran
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_duraflow"))
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Ran {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        raw: stdout,
    }
}

impl Ran {
    /// Exit 0 and nothing on stderr; returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert_eq!(self.stderr, "", "nothing on stderr");
        &self.stdout
    }

    /// Exit 1 with one line on stderr containing `text`, nothing on stdout.
    fn fails_with(&self, text: &str) {
        assert_eq!(
            self.code, 1,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "one line: {:?}",
            self.stderr
        );
        assert!(self.stderr.starts_with("duraflow: "), "{:?}", self.stderr);
        assert!(
            self.stderr.contains(text),
            "{:?} in {:?}",
            text,
            self.stderr
        );
        assert_eq!(self.stdout, "", "nothing on stdout");
    }
}

/// The line of a table whose first column is `first`, split into its columns.
fn row<'a>(out: &'a str, first: &str) -> Vec<&'a str> {
    out.lines()
        .map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()))
        .map(Iterator::collect::<Vec<_>>)
        .find(|cols| cols.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{out}"))
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn runs_lists_every_run_with_its_status_and_counts() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = sled_copy(dir.path());
    let out = duraflow(["runs".as_ref(), store.as_os_str()]);
    let out = out.ok();
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("RUN  STARTED (UTC)") && header.ends_with("EXECUTED  CACHED  FAILED"),
        "{out}"
    );
    let clean = row(out, "1");
    assert_eq!(clean[3..], ["succeeded", "6", "0", "0"], "{out}");
    assert!(clean[1].ends_with('Z') && clean[1].len() == 20, "{out}");
    assert_eq!(row(out, "2")[3..], ["failed", "1", "6", "1"], "{out}");
    let killed = row(out, "3");
    assert_eq!(killed[3..], ["interrupted", "1", "3", "0"], "{out}");
    assert!(killed[2].starts_with('≥'), "a lower bound: {out}");
    assert!(out.contains("≥: the run did not finish"), "{out}");
}

#[test]
fn show_lists_a_runs_attempts_latest_by_default() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = sled_copy(dir.path());

    let latest = duraflow(["show".as_ref(), store.as_os_str()]);
    let latest = latest.ok();
    assert!(
        latest.starts_with("run 3 interrupted: started "),
        "{latest}"
    );
    assert!(
        latest.contains("1 executed, 3 cached, 0 failed"),
        "{latest}"
    );
    assert_eq!(
        row(latest, "slow")[1..],
        ["interrupted", "1", "-", "-"],
        "{latest}"
    );
    assert_eq!(row(latest, "index")[1..3], ["executed", "1"], "{latest}");
    assert_eq!(
        row(latest, "fetch/orders")[1..3],
        ["cached", "1"],
        "{latest}"
    );
    // dagx starts a task once its whole layer is done: the killed run never got past the
    // layer `slow` is in.
    assert!(!latest.contains("join"), "{latest}");

    let failed = duraflow(["show".as_ref(), store.as_os_str(), "2".as_ref()]);
    let failed = failed.ok();
    assert!(failed.starts_with("run 2 failed: started "), "{failed}");
    let notify = row(failed, "notify");
    assert_eq!(notify[1..3], ["failed", "1"], "{failed}");
    assert!(
        notify[5].contains(NOTIFY_PANIC),
        "the panic message: {failed}"
    );
    // The retried task: a failed attempt, then an executed one.
    let export: Vec<_> = failed
        .lines()
        .filter(|l| l.starts_with("export "))
        .collect();
    assert_eq!(export.len(), 2, "{failed}");
    assert!(
        export[0].contains("failed") && export[0].contains(EXPORT_ERROR),
        "{failed}"
    );
    assert!(export[1].contains("executed"), "{failed}");
    for key in TASKS {
        assert_eq!(row(failed, key)[1], "cached", "{failed}");
    }

    let only_failed = duraflow(["show", store.to_str().unwrap(), "2", "--failed"]);
    let only_failed = only_failed.ok();
    let keys: Vec<_> = only_failed
        .lines()
        .skip(3)
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(keys, ["export", "notify"], "{only_failed}");

    duraflow(["show", store.to_str().unwrap(), "42"]).fails_with("no run 42 in ");
}

/// A reason with markup in it, for the report to escape.
const MARKUP_REASON: &str = "code version \"<1>\" → \"2\" & parameters changed";

#[test]
fn show_and_report_say_why_each_attempt_ran_or_was_cached() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = sled_copy(dir.path());
    {
        // The fixture's tasks are added with `add`: they record no reason. Two of run 2's
        // attempts are given one, as `add_keyed` records it; the same run, key and attempt
        // replace the record.
        let store = SledStore::open(&path).unwrap();
        let attempts = wait(store.run(2)).unwrap().unwrap().attempts;
        assert!(attempts.iter().all(|a| a.reason.is_none()), "{attempts:?}");
        for (key, attempt, reason) in [
            ("export", 2, "parameters changed"),
            ("notify", 1, MARKUP_REASON),
        ] {
            let mut record = attempts
                .iter()
                .find(|a| a.key == key && a.attempt == attempt)
                .unwrap_or_else(|| panic!("no attempt {attempt} of {key}: {attempts:?}"))
                .clone();
            record.reason = Some(reason.into());
            RunLog::record(&store, record).unwrap();
        }
    }

    let out = duraflow(["show".as_ref(), path.as_os_str(), "2".as_ref()]);
    let out = out.ok();
    assert_eq!(
        row(out, "KEY"),
        ["KEY", "OUTCOME", "ATTEMPT", "DURATION", "WHY", "ERROR"],
        "{out}"
    );
    let export: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("export "))
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(export.len(), 2, "replaced, not added: {out}");
    assert_eq!(export[0][1..3], ["failed", "1"], "{out}");
    assert_eq!(export[0][4..], ["-", EXPORT_ERROR], "no reason: {out}");
    assert_eq!(export[1][1..3], ["executed", "2"], "{out}");
    assert_eq!(export[1][4..], ["parameters changed"], "{out}");
    let notify = row(out, "notify");
    assert_eq!(notify[4], MARKUP_REASON, "{out}");
    assert!(notify[5].contains(NOTIFY_PANIC), "{out}");
    for key in TASKS {
        let cached = row(out, key);
        assert_eq!(
            (cached[1], &cached[4..]),
            ("cached", &["cached by id"][..]),
            "{out}"
        );
    }

    let page = dir.path().join("run-2.html");
    duraflow([
        "report".as_ref(),
        path.as_os_str(),
        "2".as_ref(),
        "-o".as_ref(),
        page.as_os_str(),
    ])
    .ok();
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<th>why</th><th>error</th>"), "{html}");
    let escaped = "code version &quot;&lt;1&gt;&quot; → &quot;2&quot; &amp; parameters changed";
    assert!(!html.contains("\"<1>\""), "the reason's markup is escaped");
    // In the table, and in the bar's tooltip.
    assert!(
        html.contains(&format!("<td class=\"why\">{escaped}</td>")),
        "{html}"
    );
    assert!(
        html.contains(&format!("\nwhy: {escaped}\nerror: ")),
        "{html}"
    );
    assert!(
        html.contains("<td class=\"why\">parameters changed</td>"),
        "{html}"
    );
    assert_eq!(
        html.matches("<td class=\"why\">cached by id</td>").count(),
        TASKS.len(),
        "{html}"
    );
    assert_eq!(
        html.matches("\nwhy: cached by id").count(),
        TASKS.len(),
        "{html}"
    );
    // The first attempt of `export`, which has no reason.
    assert_eq!(
        html.matches("<td class=\"why\">–</td>").count(),
        1,
        "{html}"
    );
}

#[test]
fn get_prints_the_type_and_the_value_as_json() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = sled_copy(dir.path());
    let path = store.to_str().unwrap();

    let out = duraflow(["get", path, "join"]);
    let out = out.ok();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("type: cli::Summary"), "{out}");
    assert!(lines.next().unwrap().starts_with("size: "), "{out}");
    let json: serde_json::Value = serde_json::from_str(&lines.collect::<Vec<_>>().join("\n"))
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        json,
        serde_json::json!({"orders": 1197, "customers": 310, "products": 75})
    );

    let only_json = duraflow(["get", path, "fetch/orders", "--json"]);
    let value: serde_json::Value = serde_json::from_str(only_json.ok()).unwrap();
    assert_eq!(value, serde_json::json!({"name": "orders", "rows": 1200}));

    let raw = duraflow(["get", path, "report", "--raw"]);
    raw.ok();
    let stored = wait(SledStore::open(&store).unwrap().read("report"))
        .unwrap()
        .unwrap();
    assert_eq!(raw.raw, stored, "the stored bytes, unchanged");

    duraflow(["get", path, "notify"]).fails_with("no value stored under key \"notify\"");
    duraflow(["get", path, ""]).fails_with("invalid key");
}

#[test]
fn get_streams_a_large_value_and_fails_on_damage_found_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.db");
    let values: Vec<u64> = (0..100_000u64).map(|i| i * 7919).collect();
    Context::new(SledStore::open(&path).unwrap())
        .save("big", &values)
        .unwrap();
    let store = path.to_str().unwrap();

    let out = duraflow(["get", store, "big"]);
    let mut lines = out.ok().lines();
    assert_eq!(lines.next(), Some("type: alloc::vec::Vec<u64>"));
    assert!(lines.next().unwrap().starts_with("size: "));
    let json: Vec<u64> = serde_json::from_str(&lines.collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(json, values);
    let only_json = duraflow(["get", store, "big", "--json"]);
    assert_eq!(
        serde_json::from_str::<Vec<u64>>(only_json.ok()).unwrap(),
        values
    );
    let raw = duraflow(["get", store, "big", "--raw"]);
    raw.ok();
    let stored = wait(SledStore::open(&path).unwrap().read("big")).unwrap();
    assert_eq!(Some(raw.raw), stored, "the stored bytes, unchanged");

    // `duraflow get … | head`: a reader that has seen enough is no failure.
    for args in [
        vec!["get", store, "big"],
        vec!["get", store, "big", "--raw"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_duraflow"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0; 10];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
        drop(child.stdout.take());
        let ended = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&ended.stderr);
        assert_eq!(ended.status.code(), Some(0), "{args:?}: {stderr}");
    }

    // A byte flipped near the end of its file: found once most of the value is printed.
    let file = std::fs::read_dir(path.join("outputs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 50;
    bytes[at] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    for args in [
        vec!["get", store, "big"],
        vec!["get", store, "big", "--raw"],
    ] {
        let ran = duraflow(&args);
        assert_eq!(ran.code, 1, "{args:?}: {}", ran.stderr);
        assert!(
            ran.stderr.contains("corrupt") && ran.stderr.contains(&file.display().to_string()),
            "{args:?}: {}",
            ran.stderr
        );
    }
}

#[test]
fn rm_removes_outputs_so_the_next_run_recomputes_them() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = sled_copy(dir.path());
    let path = store.to_str().unwrap();

    let dry = duraflow(["rm", path, "--prefix", "fetch/", "--dry-run"]);
    assert_eq!(
        dry.ok(),
        "would remove fetch/customers\nwould remove fetch/orders\nwould remove fetch/products\n\
         would remove 3 outputs (dry run: nothing was removed)\n"
    );
    duraflow(["get", path, "fetch/orders"]).ok();

    let one = duraflow(["rm", path, "fetch/orders", "no-such-task"]);
    assert_eq!(
        one.ok(),
        "not stored: no-such-task\nremoved fetch/orders\nremoved 1 output; the next run \
         computes it again\n"
    );
    duraflow(["get", path, "fetch/orders"]).fails_with("no value stored");

    // The next run executes the removed task (and only it: outputs of its dependents stay).
    assert_eq!(rerun(&store), ["fetch/orders"]);

    let prefix = duraflow(["rm", path, "--prefix", "fetch/"]);
    let prefix = prefix.ok();
    assert!(prefix.ends_with("removed 3 outputs; the next run computes them again\n"));
    let keys = wait(SledStore::open(&store).unwrap().keys()).unwrap();
    assert!(!keys.iter().any(|k| k.starts_with("fetch/")), "{keys:?}");
    assert!(keys.iter().any(|k| k == "join"), "{keys:?}");

    let none = duraflow(["rm", path, "--prefix", "fetch/"]);
    assert_eq!(
        none.ok(),
        "no stored output's key starts with \"fetch/\"\nnothing removed\n"
    );
}

/// Runs `fetch/orders` and `clean/orders` over the store at `path`; returns the keys the
/// run executed.
fn rerun(path: &Path) -> Vec<String> {
    let store = Arc::new(SledStore::open(path).unwrap());
    let ctx = Arc::new(Context {
        db: store.clone(),
        completed_count: Arc::default(),
    });
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx);
    let orders = d.add(
        "fetch/orders",
        Fetch {
            name: "orders",
            rows: 1200,
            ms: 1,
        },
    );
    d.add("clean/orders", Clean).depends_on(&orders);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(dag.run(|f| {
        tokio::spawn(f);
    }))
    .unwrap();
    let latest = wait(store.runs()).unwrap().last().unwrap().id;
    let attempts = wait(store.run(latest)).unwrap().unwrap().attempts;
    attempts
        .into_iter()
        .filter(|a| a.outcome == AttemptOutcome::Succeeded)
        .map(|a| a.key)
        .collect()
}

#[test]
fn gc_keeps_the_newest_runs_and_every_output() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = sled_copy(dir.path());
    let path = store.to_str().unwrap();
    let (keys_before, attempts_before) = {
        let s = SledStore::open(&store).unwrap();
        let attempts: usize = [1, 2]
            .iter()
            .map(|&id| wait(s.run(id)).unwrap().unwrap().attempts.len())
            .sum();
        (sorted(wait(s.keys()).unwrap()), attempts)
    };

    let out = duraflow(["gc", path, "--keep-runs", "1"]);
    let out = out.ok();
    assert!(
        out.starts_with(&format!(
            "removed 2 runs (1, 2) and {attempts_before} attempts of them: "
        )),
        "{out}"
    );
    assert!(
        out.contains(" reclaimed\nkept the newest 1 run and every output"),
        "{out}"
    );

    let s = SledStore::open(&store).unwrap();
    let runs: Vec<_> = wait(s.runs()).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(runs, [3]);
    assert!(wait(s.run(1)).unwrap().is_none() && wait(s.run(2)).unwrap().is_none());
    let history: Vec<_> = wait(s.attempts_of("fetch/orders"))
        .unwrap()
        .iter()
        .map(|a| a.run)
        .collect();
    assert_eq!(history, [3], "the attempts of runs 1 and 2 are gone");
    assert_eq!(
        sorted(wait(s.keys()).unwrap()),
        keys_before,
        "outputs untouched"
    );
    drop(s);

    let again = duraflow(["gc", path, "--keep-runs", "1"]);
    assert_eq!(
        again.ok(),
        "nothing to remove: the store has 1 run, keeping the newest 1\n"
    );
    let after = duraflow(["show", path]);
    assert!(after.ok().starts_with("run 3 interrupted"));
}

#[test]
fn gc_directly_reports_what_it_removed_and_spares_a_running_run() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(sled_copy(dir.path())).unwrap();
    let attempts: usize = [1, 2, 3]
        .iter()
        .map(|&id| wait(store.run(id)).unwrap().unwrap().attempts.len())
        .sum();
    let keys = sorted(wait(store.keys()).unwrap());

    // A run of this process, still running.
    let running = store.begin_run(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while wait(store.run(running)).unwrap().is_none() {
        assert!(Instant::now() < deadline, "the run record never landed");
        std::thread::sleep(Duration::from_millis(5));
    }

    let nothing = wait(store.gc(10)).unwrap();
    assert!(nothing.runs_removed.is_empty() && nothing.bytes_reclaimed == 0);

    let stats = wait(store.gc(0)).unwrap();
    assert_eq!(stats.runs_removed, [1, 2, 3]);
    assert_eq!(stats.attempts_removed, attempts as u64);
    assert!(
        stats.records_removed > 3 && stats.records_removed <= 3 + attempts as u64,
        "{stats:?}"
    );
    // Every record is a key of a dozen bytes or more and a named MessagePack value.
    assert!(
        stats.bytes_reclaimed >= 50 * stats.records_removed,
        "{stats:?}"
    );
    let left: Vec<_> = wait(store.runs()).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(left, [running], "the running run stays, whatever its age");
    assert!(wait(store.attempts_of("fetch/orders")).unwrap().is_empty());
    assert_eq!(sorted(wait(store.keys()).unwrap()), keys);
}

#[test]
fn gc_removes_the_files_of_outputs_no_longer_stored() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("files.db");
    {
        let store = SledStore::open(&path).unwrap();
        wait(store.write("big", vec![1; 100 * 1024])).unwrap();
        wait(store.write("big", vec![2; 100 * 1024])).unwrap();
    }
    let ran = duraflow([
        OsStr::new("gc"),
        path.as_os_str(),
        OsStr::new("--keep-runs"),
        OsStr::new("1"),
    ]);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(
        ran.stdout
            .starts_with("removed 1 output file that no stored output refers to\n"),
        "{}",
        ran.stdout
    );
    let store = SledStore::open(&path).unwrap();
    assert_eq!(wait(store.read("big")).unwrap(), Some(vec![2; 100 * 1024]));
}

#[test]
fn file_stores_have_values_but_no_run_records() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let path = store.to_str().unwrap();
    for args in [
        vec!["runs", path],
        vec!["show", path],
        vec!["gc", path, "--keep-runs", "1"],
        vec!["report", path],
    ] {
        duraflow(&args).fails_with("is a file store, which keeps no run records");
    }
    let out = duraflow(["get", path, "fetch/users"]);
    assert_eq!(
        out.ok(),
        "type: alloc::vec::Vec<u32>\nsize: 38 B\n[\n  1,\n  2,\n  3\n]\n"
    );
    let rm = duraflow(["rm", path, "--prefix", "fetch/"]);
    assert_eq!(
        rm.ok(),
        "removed fetch/orders\nremoved fetch/users\nremoved 2 outputs; the next run computes \
         them again\n"
    );
    let left = wait(FileStore::new(&store).unwrap().keys()).unwrap();
    assert_eq!(left, ["total"]);
}

#[test]
fn rm_prefix_fails_naming_a_key_entry_it_cannot_read() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let path = store.to_str().unwrap();
    // Where the output of `fetch/x` would live, a link to nowhere: not a key to skip.
    let planted = std::fs::canonicalize(&store).unwrap().join("k-fetch_2fx");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &planted).unwrap();
    for dry_run in [true, false] {
        let mut args = vec!["rm", path, "--prefix", "fetch/"];
        if dry_run {
            args.push("--dry-run");
        }
        duraflow(&args).fails_with(&planted.display().to_string());
    }
    std::fs::remove_file(&planted).unwrap();
    let mut left = wait(FileStore::new(&store).unwrap().keys()).unwrap();
    left.sort();
    assert_eq!(
        left,
        ["fetch/orders", "fetch/users", "total"],
        "nothing removed"
    );
}

#[test]
fn a_locked_store_is_an_error_that_says_so() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let sled = sled_copy(dir.path());
    let files = file_store(dir.path());
    {
        let _held = SledStore::open(&sled).unwrap();
        for command in ["runs", "show"] {
            let start = Instant::now();
            duraflow([command.as_ref(), sled.as_os_str()]).fails_with("is locked");
            assert!(start.elapsed() < Duration::from_secs(5));
        }
        duraflow(["get".as_ref(), sled.as_os_str(), "join".as_ref()]).fails_with(
            "is locked: a pipeline (or another duraflow command) has it open; try again once \
             it has finished",
        );
    }
    {
        let _held = FileStore::new(&files).unwrap();
        duraflow(["get".as_ref(), files.as_os_str(), "total".as_ref()]).fails_with("is locked");
    }
    // Released: both open again.
    duraflow(["runs".as_ref(), sled.as_os_str()]).ok();
    duraflow(["get".as_ref(), files.as_os_str(), "total".as_ref()]).ok();
}

#[test]
fn a_missing_path_is_an_error_and_is_not_created() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no").join("such.db");
    let m = missing.to_str().unwrap();
    for args in [
        vec!["runs", m],
        vec!["show", m],
        vec!["get", m, "k"],
        vec!["rm", m, "k"],
        vec!["gc", m, "--keep-runs", "2"],
        vec!["report", m, "-o", "-"],
    ] {
        duraflow(&args).fails_with(&format!("{m} is not a duraflow store: nothing is there"));
    }
    assert!(!dir.path().join("no").exists(), "nothing created");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    duraflow(["runs".as_ref(), empty.as_os_str()])
        .fails_with("is not a duraflow store: an empty directory");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "still empty");

    let foreign = dir.path().join("photos");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("cat.jpg"), b"meow").unwrap();
    duraflow(["get".as_ref(), foreign.as_os_str(), "k".as_ref()])
        .fails_with("is not a duraflow store");
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    duraflow(["runs".as_ref(), file.as_os_str()])
        .fails_with("is not a duraflow store: a file, not a directory");
}

#[test]
fn usage_errors_exit_with_2() {
    let _serial = serial();
    let store = "/nonexistent/store";
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["runs"],
        vec!["show", store, "latest"],
        vec!["get", store],
        vec!["get", store, "k", "--json", "--raw"],
        vec!["rm", store],
        vec!["rm", store, "--prefix", ""],
        vec!["gc", store],
        vec!["gc", store, "--keep-runs", "0"],
        vec!["report", store, "-o"],
    ] {
        let ran = duraflow(&args);
        assert_eq!(ran.code, 2, "{args:?}: {}", ran.stderr);
        assert!(
            ran.stderr.starts_with("error: ") || ran.stderr.contains("Usage: duraflow"),
            "{args:?}: {}",
            ran.stderr
        );
        assert_eq!(ran.stdout, "", "{args:?}");
    }
    let help = duraflow(["--help"]);
    for command in ["runs", "show", "get", "rm", "gc", "report"] {
        assert!(help.ok().contains(command), "{}", help.stdout);
    }
}

#[test]
fn report_writes_a_self_contained_page_with_escaped_text() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = sled_copy(dir.path());
    let page = dir.path().join("run.html");
    let out = duraflow([
        "report".as_ref(),
        store.as_os_str(),
        "2".as_ref(),
        "-o".as_ref(),
        page.as_os_str(),
    ]);
    assert_eq!(
        out.ok(),
        format!(
            "wrote {}: run 2 (failed), 8 tasks, 9 attempts\n",
            page.display()
        )
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<rect class=\"bar ").count(), 9);
    assert_eq!(html.matches("<div class=\"row\">").count(), 8);
    for outcome in ["executed", "cached", "failed"] {
        assert!(html.contains(&format!("data-outcome=\"{outcome}\"")));
    }
    // User text is escaped everywhere: no markup of it survives.
    assert!(!html.contains("<b>550</b>") && !html.contains("<warehouse>"));
    assert!(html.contains("smtp: &lt;b&gt;550&lt;/b&gt; mailbox &quot;ops&quot; &amp; friends"));
    // Nothing is fetched: no external URL, no link or external script.
    for needle in ["http://", "https://", "<link", "src="] {
        assert!(!html.contains(needle), "{needle}");
    }
    // `-` writes to stdout; the latest run by default.
    let stdout = duraflow([
        "report".as_ref(),
        store.as_os_str(),
        "-o".as_ref(),
        "-".as_ref(),
    ]);
    assert!(stdout.ok().starts_with("<!DOCTYPE html>"));
    assert!(stdout
        .stdout
        .contains("<title>duraflow run 3 — interrupted</title>"));
    duraflow(["report".as_ref(), store.as_os_str(), "9".as_ref()]).fails_with("no run 9");
}

#[test]
fn the_report_renders_one_bar_per_attempt_in_chromium() {
    let _serial = serial();
    let Some(chromium) = browser() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = sled_copy(dir.path());
    for (run, attempts, tasks) in [("2", 9, 8), ("3", 5, 5)] {
        let page = dir.path().join(format!("run-{run}.html"));
        duraflow([
            "report".as_ref(),
            store.as_os_str(),
            run.as_ref(),
            "-o".as_ref(),
            page.as_os_str(),
        ])
        .ok();
        let dom = headless(&chromium, dir.path(), &["--dump-dom"], &page);
        let rendered = dom
            .lines()
            .find(|l| l.contains("id=\"rendered\""))
            .unwrap_or_else(|| panic!("no #rendered in the DOM:\n{dom}"));
        let attr = |name: &str| -> usize {
            let start = rendered
                .find(&format!("{name}=\""))
                .unwrap_or_else(|| panic!("no {name} (did the script run?): {rendered}"))
                + name.len()
                + 2;
            let len = rendered[start..].find('"').unwrap();
            rendered[start..start + len].parse().unwrap()
        };
        assert_eq!(attr("data-total"), attempts, "run {run}: {rendered}");
        assert_eq!(
            attr("data-bars"),
            attempts,
            "run {run}: every bar has a size"
        );
        assert_eq!(attr("data-rows"), tasks, "run {run}: one row per task");
    }
}

/// Writes the README's screenshot of a report (see the module's doc).
#[test]
#[ignore = "writes examples/report.png; run with DURAFLOW_README_SCREENSHOT set"]
fn readme_screenshot() {
    let Ok(target) = std::env::var("DURAFLOW_README_SCREENSHOT") else {
        return;
    };
    let _serial = serial();
    let chromium = browser().expect("chromium");
    let dir = tempfile::tempdir().unwrap();
    sled_copy(dir.path());
    let page = dir.path().join("run.html");
    // A relative path, as a user would type it: the page shows it.
    duraflow_in(dir.path(), ["report", "pipeline.db", "2", "-o", "run.html"]).ok();
    let png = dir.path().join("shot.png");
    headless(
        &chromium,
        dir.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1100,760",
            "--hide-scrollbars",
        ],
        &page,
    );
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join(target);
    std::fs::copy(&png, &target).unwrap();
    println!("wrote {}", target.display());
}

/// Debian's `chromium`; `None` (the test skips) when there is none, unless `CI` is set: CI
/// must run the test, so there a missing browser fails it.
fn browser() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("chromium"))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => Some(path),
        None if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipped: this test renders the HTML report in headless Chromium, and there is \
                 no `chromium` on PATH (install it, e.g. `apt-get install chromium`; with `CI` \
                 set the test fails instead of skipping)"
            );
            None
        }
        None => panic!(
            "CI is set and this test renders the HTML report in headless Chromium, but there \
             is no `chromium` on PATH: install it (`apt-get install chromium`, as .ci/run does)"
        ),
    }
}

/// Runs headless `chromium` with `args` on `page`; returns its stdout. Fails after 60 s.
fn headless(chromium: &Path, scratch: &Path, args: &[&str], page: &Path) -> String {
    let profile = scratch.join("chromium-profile");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--allow-file-access-from-files",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let drain = |mut from: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = from.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "chromium failed ({status}): {err}");
    out
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A `postgres://` URL (with `#SCHEMA`) is a store: its runs, attempts and values are
/// listed as a sled store's are; a schema that is not there is `NotAStore` and is not
/// created; no message shows the password.
#[cfg(feature = "postgres")]
#[test]
fn a_postgres_url_is_a_store_and_no_message_shows_its_password() {
    use duraflow_rs::{PgConfig, PgStore};
    let Some(url) = common::pg::pg_url("a_postgres_url_is_a_store") else {
        return;
    };
    let password = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.rsplit_once('@'))
        .and_then(|(user, _)| user.split_once(':'))
        .map(|(_, password)| password.to_owned())
        .expect("the test server's URL has a password");
    let schema = common::pg::fresh_schema("cli");
    let rt = common::multi_thread_rt();
    rt.block_on(async {
        let config = PgConfig::default().schema(schema.as_str());
        let store = PgStore::connect_with(&url, config).await.unwrap();
        let dag = DagRunner::new();
        let d = DurableDag::new(&dag, Arc::new(Context::new(store)));
        d.add(
            "fetch/orders",
            Fetch {
                name: "orders",
                rows: 1200,
                ms: 0,
            },
        );
        dag.run(|f| {
            tokio::spawn(f);
        })
        .await
        .unwrap();
    });
    let location = format!("{url}#{schema}");
    let ran = duraflow(["runs", &location]);
    let out = ran.ok();
    let runs: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(runs.len(), 1, "{out}");
    assert_eq!(runs[0][3..], ["succeeded", "1", "0", "0"], "{out}");
    let shown = duraflow(["show", &location]);
    assert_eq!(
        row(shown.ok(), "fetch/orders")[1],
        "executed",
        "{}",
        shown.stdout
    );
    let value = duraflow(["get", &location, "fetch/orders", "--json"]);
    let value: serde_json::Value = serde_json::from_str(value.ok()).unwrap();
    assert_eq!(value, serde_json::json!({"name": "orders", "rows": 1200}));

    let absent = format!("{url}#no_such_schema_{}", std::process::id());
    let ran = duraflow(["runs", &absent]);
    ran.fails_with("is not a duraflow store: no duraflow schema is there");
    assert!(ran.stderr.contains(":***@"), "{}", ran.stderr);
    let wrong = url.replacen(&format!(":{password}@"), ":not-the-password@", 1);
    let ran = duraflow(["runs", &format!("{wrong}#{schema}")]);
    ran.fails_with("password authentication failed");
    for ran in [&ran, &duraflow(["runs", &absent])] {
        assert!(!ran.stderr.contains(&password), "{}", ran.stderr);
        assert!(!ran.stderr.contains("not-the-password"), "{}", ran.stderr);
    }
    // The absent schema was not created.
    let created = rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                &[&absent.rsplit_once('#').unwrap().1],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    });
    assert_eq!(created, 0, "the absent schema was not created");
}
