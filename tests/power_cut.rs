//! Promise: with `Durability::Immediate`, everything a task's commit wrote is on stable
//! storage before its progress is reported, and everything a run wrote before its DAG's run
//! returns — in SledStore and in FileStore.
//!
//! Method: a child process runs a chain of tasks (each depends on the one before, so no
//! other commit is in flight when one is reported) under `strace -f -y`, and prints a line
//! from its progress callback and when its run returns. From the trace, at each of those
//! lines: every file of the store written before it was fsynced/fdatasynced afterwards, and
//! before the line; every directory that gained an entry (a file created, a directory made,
//! a file renamed into it) was fsynced afterwards, and before the line. `sync_file_range`
//! does not count: it flushes neither the device's cache nor the file's size. In SledStore,
//! each commit number written to the marker follows an fdatasync of the database that came
//! after the database's last write. A third of the outputs are over 128 KiB, which sled
//! keeps in files of their own under `blobs/`.
//!
//! Without `strace` the tests say they skipped, unless `CI` is set.

#![cfg(target_os = "linux")]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, FileStore, SledStore};
use serde::{Deserialize, Serialize};

const DIR_ENV: &str = "DURAFLOW_POWER_CUT_DIR";
const STORE_ENV: &str = "DURAFLOW_POWER_CUT_STORE";
const CHILD_TEST: &str = "power_cut_child";
const MARKER: &str = "@@ ";
const LINKS: usize = 24;
/// Every third output is this large: sled writes it to a blob file.
const LARGE: usize = 200 * 1024;

/// An output: text of some length.
#[derive(Clone, Serialize, Deserialize)]
struct Text(String);

#[derive(Clone)]
struct Seed;
#[task]
impl Seed {
    async fn run(&self) -> Text {
        Text("seed".to_owned())
    }
}

#[derive(Clone)]
struct Link(usize);
#[task]
impl Link {
    async fn run(&self, before: &Text) -> Text {
        let size = if self.0.is_multiple_of(3) { LARGE } else { 100 };
        let mut out = format!("{}:{}", self.0, before.0.len());
        let mut x = self.0 as u32 + 1;
        while out.len() < size {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push(char::from(b'a' + (x % 26) as u8));
        }
        Text(out)
    }
}

/// Writes one report line with a single `write` call.
fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{MARKER}{line}\n").as_bytes())
        .and_then(|()| out.flush())
        .expect("power_cut_child: report");
}

#[test]
#[ignore = "helper: run only as a child process, under strace, by the tests below"]
fn power_cut_child() {
    let Some(dir) = common::child_dir(DIR_ENV, CHILD_TEST) else {
        return;
    };
    let ctx = match std::env::var(STORE_ENV).as_deref() {
        Ok("sled") => Context::new(SledStore::open(&dir).expect("child: open sled")),
        Ok("file") => Context::new(FileStore::new(&dir).expect("child: open files")),
        other => panic!("{STORE_ENV} is {other:?}"),
    };
    let dag = DagRunner::new();
    let d =
        DurableDag::new(&dag, Arc::new(ctx)).with_progress(|id, _| report(&format!("done {id}")));
    let seed = d.add("seed", Seed);
    let mut last = d.add("link-1", Link(1)).depends_on(&seed);
    for i in 2..=LINKS {
        last = d.add(&format!("link-{i}"), Link(i)).depends_on(last);
    }
    common::current_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .expect("child: the run succeeds");
    report("returned");
}

/// What the trace shows a system call did.
#[derive(Debug)]
enum Effect {
    /// Data (or the size) of this file changed.
    Wrote(PathBuf),
    /// This file or directory was fsynced or fdatasynced.
    Synced(PathBuf),
    /// This directory gained an entry.
    Entry(PathBuf),
    /// The child reported this.
    Report(String),
}

/// One system call: the trace lines of its start and its end, and what it did.
#[derive(Debug)]
struct Call {
    start: usize,
    end: usize,
    effect: Effect,
}

/// The path strace `-y` prints after a file descriptor: `7</tmp/x/db>` → `/tmp/x/db`.
fn fd_path(text: &str) -> Option<PathBuf> {
    let open = text.find('<')?;
    if !text[..open].trim().bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let close = text[open..].find('>')? + open;
    Some(PathBuf::from(&text[open + 1..close]))
}

/// The string arguments of a call: `"…"` pieces (paths here hold no quotes).
fn strings(args: &str) -> Vec<&str> {
    args.split('"').skip(1).step_by(2).collect()
}

/// What one finished call did, given its name, its arguments and what it returned.
fn effect(name: &str, args: &str, ret: &str) -> Option<Effect> {
    if ret.starts_with('-') {
        return None; // failed
    }
    let parent = |p: &str| Path::new(p).parent().map(Path::to_owned);
    match name {
        "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" | "ftruncate" | "fallocate" => {
            if args.starts_with("1<") {
                let text = strings(args).first().copied().unwrap_or_default();
                let line = text.split_once(MARKER)?.1.trim_end_matches("\\n");
                return Some(Effect::Report(line.to_owned()));
            }
            fd_path(args).map(Effect::Wrote)
        }
        "fsync" | "fdatasync" => fd_path(args).map(Effect::Synced),
        "openat" | "open" | "creat" if name == "creat" || args.contains("O_CREAT") => {
            let path = fd_path(ret)?;
            path.parent().map(|p| Effect::Entry(p.to_owned()))
        }
        "mkdir" | "mkdirat" => strings(args)
            .first()
            .and_then(|p| parent(p))
            .map(Effect::Entry),
        "rename" | "renameat" | "renameat2" | "link" | "linkat" => strings(args)
            .get(1)
            .and_then(|p| parent(p))
            .map(Effect::Entry),
        _ => None,
    }
}

/// Parses `strace -f -y` output into the calls that matter here.
fn parse(trace: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    // Calls another thread interrupted: by pid, their start line, name and arguments.
    let mut pending: HashMap<&str, (usize, String, String)> = HashMap::new();
    for (i, line) in trace.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let (start, name, text) = if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            let Some((start, _, head)) = pending.remove(pid) else {
                continue;
            };
            (start, name.to_owned(), format!("{head}{tail}"))
        } else {
            let Some((name, args)) = rest.split_once('(') else {
                continue;
            };
            if let Some(head) = args.strip_suffix(" <unfinished ...>") {
                pending.insert(pid, (i, name.to_owned(), head.to_owned()));
                continue;
            }
            (i, name.to_owned(), args.to_owned())
        };
        // strace pads short calls: `fsync(3</d>)         = 0`.
        let Some((args, ret)) = text.rsplit_once(')') else {
            continue;
        };
        let Some(ret) = ret.trim_start().strip_prefix("= ") else {
            continue;
        };
        if let Some(effect) = effect(&name, args, ret.trim()) {
            calls.push(Call {
                start,
                end: i,
                effect,
            });
        }
    }
    calls
}

/// The first report at which something of the store written or created before it had not
/// been synced since: `(report, what, the trace lines from that change to the report)`.
fn first_unsynced(calls: &[Call], store: &Path) -> Option<(String, String, (usize, usize))> {
    let ours = |p: &Path| p.starts_with(store) || Some(p) == store.parent();
    let mut reports = 0;
    for report in calls {
        let Effect::Report(line) = &report.effect else {
            continue;
        };
        reports += 1;
        let before = |c: &&Call| c.end < report.start;
        for change in calls.iter().filter(before) {
            let (path, what) = match &change.effect {
                Effect::Wrote(p) if ours(p) => (p, "written"),
                Effect::Entry(p) if ours(p) => (p, "given an entry"),
                _ => continue,
            };
            let synced = calls.iter().filter(before).any(|s| {
                matches!(&s.effect, Effect::Synced(p) if p == path) && s.start > change.end
            });
            if !synced {
                let what = format!(
                    "{} was {what} by trace line {} and not synced since",
                    path.display(),
                    change.end + 1
                );
                return Some((line.clone(), what, (change.start, report.start)));
            }
        }
    }
    assert!(reports > LINKS, "the trace shows only {reports} reports");
    None
}

/// In a SledStore, the commit numbers written to the marker: each must follow an fdatasync
/// of the database that came after its last write, so that the marker never numbers a
/// commit the database may not hold. Returns how many there were, or what went wrong.
fn marker_after_data(calls: &[Call], store: &Path) -> Result<usize, String> {
    let (db, marker) = (store.join("db"), store.join("duraflow-store"));
    let mut records = 0;
    for record in calls {
        if !matches!(&record.effect, Effect::Wrote(p) if *p == marker) {
            continue;
        }
        records += 1;
        let before = |c: &&Call| c.end < record.start;
        let last_write = calls
            .iter()
            .filter(before)
            .filter(|c| matches!(&c.effect, Effect::Wrote(p) if *p == db))
            .map(|c| c.end)
            .max();
        let synced = calls.iter().filter(before).any(|s| {
            matches!(&s.effect, Effect::Synced(p) if *p == db)
                && last_write.is_none_or(|w| s.start > w)
        });
        if !synced {
            return Err(format!(
                "the marker was written at trace line {} before the database was synced",
                record.start + 1
            ));
        }
    }
    Ok(records)
}

fn strace() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("strace"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but strace is not installed"
        );
        eprintln!("skipped: strace is not installed");
    }
    found
}

/// Runs the child over a new store of `kind` in `dir` under strace and returns the trace.
fn traced_run(kind: &str, dir: &Path) -> Option<String> {
    let strace = strace()?;
    let log = dir.join("trace");
    let store = dir.join("store");
    let child = common::child_test(CHILD_TEST);
    let status = Command::new(strace)
        .args(["-f", "-y", "-qq", "-s", "256", "-o"])
        .arg(&log)
        .args([
            "-e",
            "trace=write,pwrite64,writev,pwritev,pwritev2,ftruncate,fallocate,fsync,fdatasync,\
             open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat",
        ])
        .arg(child.get_program())
        .args(child.get_args())
        .env(DIR_ENV, &store)
        .env(STORE_ENV, kind)
        .stdout(Stdio::null())
        .status()
        .expect("run strace");
    assert!(status.success(), "the traced child failed: {status}");
    Some(std::fs::read_to_string(&log).expect("read the trace"))
}

fn check(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let Some(trace) = traced_run(kind, dir.path()) else {
        return;
    };
    let calls = parse(&trace);
    let store = dir.path().join("store");
    let syncs = calls
        .iter()
        .filter(|c| matches!(c.effect, Effect::Synced(_)))
        .count();
    assert!(syncs > 0, "the trace shows no sync at all");
    if let Some((report, what, (from, to))) = first_unsynced(&calls, &store) {
        let lines: Vec<&str> = trace.lines().skip(from).take(to + 1 - from).collect();
        let shown = lines
            .iter()
            .take(40)
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("when the child reported {report:?}, {what}; the trace from there:\n{shown}");
    }
    if kind == "sled" {
        match marker_after_data(&calls, &store) {
            Ok(records) => assert!(records > LINKS, "only {records} commits numbered"),
            Err(why) => panic!("{why}"),
        }
    }
    // The store holds what was reported.
    let ctx = match kind {
        "sled" => Context::new(SledStore::open(&store).unwrap()),
        _ => Context::new(FileStore::new(&store).unwrap()),
    };
    let last = ctx
        .get::<String>(&format!("link-{LINKS}"))
        .expect("the last output");
    assert!(last.starts_with(&format!("{LINKS}:")), "{}", &last[..20]);
}

#[test]
fn sled_commits_are_on_stable_storage_when_reported() {
    check("sled");
}

#[test]
fn filestore_writes_are_on_stable_storage_when_reported() {
    check("file");
}
