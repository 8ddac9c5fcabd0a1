//! Promise: one writer per FileStore root. A second opener, in this process or another,
//! gets `StoreLocked`, even after `ROOT/.lock` was deleted under the first; a bad root is an
//! `Io` error naming the path.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use duraflow_rs::{DuraflowError, FileStore};

const ROOT_VAR: &str = "DURAFLOW_LOCK_HOLDER_ROOT";

/// Serialises the tests of this file. Spawning a child forks this process, and until the
/// child execs it shares every open file of the parent, the lock file of a store another
/// test has just dropped included: `flock` locks belong to the open file, so for that
/// instant the store still reads as locked.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
const LOCKED: &str = "duraflow-lock-holder: locked";

#[test]
fn a_second_store_in_the_same_process_is_refused_until_the_first_is_dropped() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let first = FileStore::new(dir.path()).unwrap();
    match FileStore::new(dir.path()) {
        Err(DuraflowError::StoreLocked { path }) => assert_eq!(path, first.root()),
        other => panic!("expected StoreLocked, got {other:?}"),
    }
    drop(first);
    FileStore::new(dir.path()).expect("the lock is released on drop");
}

/// Not a test of its own: the child process of
/// `a_store_held_by_another_process_is_refused_and_released_when_it_dies`.
#[test]
#[ignore = "helper: run only as a child process by the cross-process lock test"]
fn lock_holder() {
    let root = std::env::var(ROOT_VAR).expect("run by the cross-process lock test");
    let _store = FileStore::new(root).unwrap();
    println!("\n{LOCKED}");
    // Hold the lock until the parent closes our stdin.
    let _ = std::io::stdin().read_line(&mut String::new());
}

/// A child process holding the store at `root` open, once it has taken the lock.
fn holder(root: &std::path::Path) -> std::process::Child {
    let mut child = common::child_test("lock_holder")
        .env(ROOT_VAR, root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let locked = stdout
        .lines()
        .map(|l| l.unwrap())
        .any(|l| l.contains(LOCKED));
    assert!(locked, "child never took the lock");
    child
}

#[test]
fn a_store_held_by_another_process_is_refused_and_released_when_it_dies() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut child = holder(dir.path());
    assert!(matches!(
        FileStore::new(dir.path()),
        Err(DuraflowError::StoreLocked { .. })
    ));
    child.kill().unwrap(); // SIGKILL: the kernel releases the flock
    child.wait().unwrap();
    FileStore::new(dir.path()).expect("the lock dies with the process");
}

#[test]
fn deleting_the_lock_file_does_not_release_the_lock() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let first = FileStore::new(dir.path()).unwrap();
    std::fs::remove_file(first.root().join(".lock")).unwrap();
    match FileStore::new(dir.path()) {
        Err(DuraflowError::StoreLocked { path }) => assert_eq!(path, first.root()),
        other => panic!("in-process: expected StoreLocked, got {other:?}"),
    }
    drop(first);
    drop(FileStore::new(dir.path()).expect("the lock is released on drop"));

    let mut child = holder(dir.path());
    std::fs::remove_file(dir.path().join(".lock")).unwrap();
    match FileStore::new(dir.path()) {
        Err(DuraflowError::StoreLocked { .. }) => {}
        other => panic!("across processes: expected StoreLocked, got {other:?}"),
    }
    child.kill().unwrap();
    child.wait().unwrap();
    FileStore::new(dir.path()).expect("the lock dies with the process");
}

#[test]
fn a_plain_file_as_root_is_an_io_error_naming_it_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"precious").unwrap();
    match FileStore::new(&file) {
        Err(DuraflowError::Io { path, .. }) => assert_eq!(path, file),
        other => panic!("expected Io, got {other:?}"),
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}
