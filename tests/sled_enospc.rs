//! Promise: when the disk is full, persisting a task's output is `DuraflowError::Persist`
//! naming its key (with the disk's error, `StorageFull`, as its source; when sled's own
//! periodic flush met the full disk first, a DAG task's cache check fails before it runs, with
//! `Io` naming the store's directory and the same source); a new process reads
//! back every acknowledged value once the disk has room (for the failed write's key, its
//! previous value, or the value that failed if sled had written it before the disk refused
//! the rest); the failed store itself never returns the value that failed; once sled has
//! refused a write, later writes fail at once; and nothing hangs: not the failing write, not
//! later ones, not dropping the store.
//!
//! The disk is a 4 MiB tmpfs, so these tests need root (to mount it) and Linux; without
//! either, each prints why it is skipped and passes. Two sizes of output are written until
//! the disk is full: small ones (sled's log write fails), and 64 KiB ones (over the store's
//! blob threshold: each is a file of its own, whose failed write leaves sled's trees as
//! they were, so later writes may succeed).
//!
//! The filling runs in a child process (this test binary, re-run with `--ignored --exact
//! enospc_child`) under a watchdog: a hang is a test failure with a message, not a test
//! that never ends.
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::error::Error as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::current_thread_rt;
use dagx::{task, Task};
use duraflow_rs::{Context, Durable, DuraflowError, SledStore, Storage};

/// The directory the child's store is in (a mounted tmpfs); the child does nothing without.
const DIR_ENV: &str = "DURAFLOW_ENOSPC_DIR";
/// The size of the outputs the child writes.
const SIZE_ENV: &str = "DURAFLOW_ENOSPC_SIZE";
const CHILD_TEST: &str = "enospc_child";
/// Every line the child reports starts with this (libtest prints `test NAME ... ` first).
const MARKER: &str = "@@ ";
/// How long the child may take: filling 4 MiB takes a few seconds in a debug build.
const WATCHDOG: Duration = Duration::from_secs(120);
/// Keys written first, then overwritten while the disk fills.
const KEYS: usize = 8;
/// The most writes the child tries before giving up on filling the disk.
const MAX_WRITES: usize = 100_000;

/// A task returning the value for `key` at `version`.
#[derive(Clone)]
struct Versioned {
    key: String,
    version: usize,
    size: usize,
}

#[task]
impl Versioned {
    async fn run(&self) -> String {
        value(&self.key, self.version, self.size)
    }
}

/// The value of `key` at `version`: recognisable, `size` bytes long.
fn value(key: &str, version: usize, size: usize) -> String {
    let mut v = format!("{key}@{version}:");
    while v.len() < size {
        v.push_str("0123456789abcdef");
    }
    v.truncate(size.max(v.find(':').map_or(0, |i| i + 1)));
    v
}

fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER}{line}").expect("enospc_child: report");
    out.flush().expect("enospc_child: flush report");
}

/// Checks `e` is `Persist` for `key`, caused by a full disk; for a DAG task's output (`task`),
/// `Io` at the store's path `store` is right too: sled's own periodic flush met the full
/// disk first, and the task's cache check, a read, reported it before the task ran.
fn assert_disk_full(e: &DuraflowError, key: &str, task: bool, store: &Path) {
    match e {
        DuraflowError::Persist { key: k, .. } => assert_eq!(k, key, "{e}"),
        DuraflowError::Io { path, .. } if task => assert_eq!(path, store, "{e}"),
        other => panic!("expected Persist for {key:?}, got {other:?}"),
    }
    let mut source = e.source();
    let mut full = false;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            full |= io.kind() == std::io::ErrorKind::StorageFull;
        }
        source = s.source();
    }
    assert!(full, "the cause is a full disk: {e} ({e:?})");
}

/// Not a test of its own: the child process of the tests below. Fills the disk and checks
/// what the failing store does; reports every acknowledged value, then drops the store.
#[test]
#[ignore = "helper: run only as a child process by the ENOSPC tests"]
fn enospc_child() {
    let Some(dir) = common::child_dir(DIR_ENV, CHILD_TEST) else {
        return;
    };
    let size: usize = common::env_number(SIZE_ENV);
    let path = Path::new(&dir).join("store");
    let store = Arc::new(SledStore::open(&path).expect("open the store"));
    let ctx = Arc::new(Context {
        db: store.clone(),
        completed_count: Arc::new(AtomicUsize::new(0)),
    });
    let rt = current_thread_rt();
    // What the store acknowledged: key -> version.
    let mut model: BTreeMap<String, usize> = BTreeMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        ctx.save(&key, &value(&key, 0, 16))
            .expect("the first values fit");
        model.insert(key, 0);
    }
    // Alternately a new task's output (through a DAG task's commit) and an overwrite
    // (through `Context::save`), until the disk is full.
    let started = Instant::now();
    let mut failure = None;
    for i in 1..MAX_WRITES {
        let (key, version, result) = if i % 2 == 0 {
            let key = format!("new{i}");
            let task = Versioned {
                key: key.clone(),
                version: 1,
                size,
            };
            let result = rt
                .block_on(Durable::new(key.clone(), ctx.clone(), task, None).run_result(()))
                .map(drop);
            (key, 1, result)
        } else {
            let key = format!("k{}", i % KEYS);
            let version = model[&key] + 1;
            let result = ctx.save(&key, &value(&key, version, size));
            (key, version, result)
        };
        match result {
            Ok(()) => {
                model.insert(key, version);
            }
            Err(e) => {
                failure = Some((key, version, e));
                break;
            }
        }
    }
    let Some((key, version, error)) = failure else {
        panic!("{MAX_WRITES} writes of {size} bytes fit on the disk");
    };
    report(&format!(
        "failed {key} after {:?}: {error}",
        started.elapsed()
    ));
    report(&format!("attempted {key} {version}"));
    assert_disk_full(&error, &key, key.starts_with("new"), &path);
    // This store never returns the value that failed: a read answers the previous value,
    // or an I/O error where sled cannot read the page after its failed write.
    let previous = model
        .get(&key)
        .map(|&v| value(&key, v, if v == 0 { 16 } else { size }));
    match ctx.try_get::<String>(&key) {
        Ok(read) => {
            assert_eq!(read, previous, "read after the failure");
            report("read previous");
        }
        Err(e @ DuraflowError::Io { .. }) => report(&format!("read error {e}")),
        Err(e) => panic!("read after the failure: {e:?}"),
    }
    // Later writes fail at once, naming their keys, when sled refused the write (the store
    // has stopped); after an output's own file could not be written, sled's trees are
    // untouched and a later write fails for want of room or succeeds. None hangs.
    let stopped = store.health().is_err();
    for k in 0..3 {
        let key = format!("k{k}");
        match ctx.save(&key, &"small".to_owned()) {
            Err(e) => assert!(
                matches!(&e, DuraflowError::Persist { key: k, .. } if *k == key),
                "{e}"
            ),
            Ok(()) if !stopped => report(&format!("saved {key}")),
            Ok(()) => panic!("the store accepted a write after sled failed"),
        }
    }
    report(&format!("stopped {stopped}"));
    for (key, version) in &model {
        report(&format!("model {key} {version}"));
    }
    drop(ctx);
    let dropped = Instant::now();
    drop(store);
    report(&format!("dropped in {:?}", dropped.elapsed()));
}

/// Why the tests cannot run here, if they cannot: not root, or no tmpfs mount.
fn uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A tmpfs mounted for one test; unmounted (lazily, whatever still holds it) on drop.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) at a fresh directory, or says
    /// why it cannot.
    fn new(parent: &Path, size: &str) -> Result<Mount, String> {
        match uid() {
            Some(0) => {}
            Some(uid) => {
                return Err(format!(
                    "needs root to mount a tmpfs (running as uid {uid})"
                ))
            }
            None => return Err("cannot tell the user id from /proc/self/status".to_owned()),
        }
        let dir = parent.join("mnt");
        std::fs::create_dir(&dir).map_err(|e| format!("create {dir:?}: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Mount { dir })
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .expect("run mount -o remount");
        assert!(
            out.status.success(),
            "remount {:?}: {}",
            self.dir,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Runs the child over the store in `dir` writing outputs of `size` bytes; returns its
/// reports. Fails the test if the child fails or outlives [`WATCHDOG`].
fn run_child(dir: &Path, size: usize) -> Vec<String> {
    let child = common::child_test(CHILD_TEST)
        .env(DIR_ENV, dir)
        .env(SIZE_ENV, size.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(WATCHDOG) {
        Ok(output) => output.expect("wait for the child"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the child writing {size}-byte outputs onto a full disk hung (killed after {WATCHDOG:?})");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the child failed ({}); stdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .split(MARKER)
        .skip(1)
        .map(|l| l.lines().next().unwrap_or_default().to_owned())
        .collect()
}

/// Fills a 4 MiB disk with `size`-byte outputs in a child, then checks from this process,
/// once the disk has room, that every acknowledged value is there and the store works.
fn full_disk(size: usize) {
    let parent = tempfile::tempdir().expect("temp dir");
    let mount = match Mount::new(parent.path(), "4m") {
        Ok(mount) => mount,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let reports = run_child(&mount.dir, size);
    let failed = reports
        .iter()
        .find_map(|r| r.strip_prefix("failed "))
        .expect("the child reports the failed write");
    let read = reports
        .iter()
        .find(|r| r.starts_with("read "))
        .expect("the child reports its read of the failed key");
    println!("{size}-byte outputs: {failed}; then {read}");
    let dropped = reports.iter().find(|r| r.starts_with("dropped"));
    assert!(
        dropped.is_some(),
        "the child dropped its store: {reports:?}"
    );
    let model: Vec<(String, usize)> = reports
        .iter()
        .filter_map(|r| r.strip_prefix("model "))
        .map(|r| {
            let (key, version) = r.split_once(' ').expect("model line");
            (key.to_owned(), version.parse().expect("model version"))
        })
        .collect();
    assert!(model.len() > KEYS, "some outputs were written: {reports:?}");

    let (failed_key, failed_version) = reports
        .iter()
        .find_map(|r| r.strip_prefix("attempted "))
        .and_then(|r| r.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse::<usize>().expect("a version")))
        .expect("the child reports the write that failed");

    // The disk has room again: a new process (this one) reads back every acknowledged
    // value and can write. The write that failed left its previous value, or (when sled
    // had written it before the disk refused the rest of the sync) the value it wrote.
    mount.resize("64m");
    let store = SledStore::open(mount.dir.join("store")).expect("reopen once the disk has room");
    let ctx = Context::new(store);
    let value_of = |key: &str, version: usize| {
        let size = if version == 0 { 16 } else { size };
        Some(value(key, version, size))
    };
    let saved: Vec<&str> = reports
        .iter()
        .filter_map(|r| r.strip_prefix("saved "))
        .collect();
    for (key, version) in &model {
        let found = ctx.try_get::<String>(key).expect("read back");
        if *key == failed_key && found == value_of(key, failed_version) {
            continue;
        }
        if saved.contains(&key.as_str()) {
            assert_eq!(found.as_deref(), Some("small"), "{key}");
            continue;
        }
        assert_eq!(found, value_of(key, *version), "{key}");
    }
    if !model.iter().any(|(k, _)| *k == failed_key) {
        let found = ctx.try_get::<String>(&failed_key).expect("read back");
        assert!(
            found.is_none() || found == value_of(&failed_key, failed_version),
            "{failed_key}: {found:?}"
        );
    }
    ctx.save("after", &"room again".to_owned())
        .expect("the store works once the disk has room");
}

#[test]
fn a_full_disk_fails_small_outputs_with_persist_and_keeps_the_previous_value() {
    full_disk(1000);
}

#[test]
fn a_full_disk_fails_large_outputs_with_persist_and_keeps_the_previous_value() {
    full_disk(64 * 1024);
}
