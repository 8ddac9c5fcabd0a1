//! Promise: a SledStore of format 1 opens as format 2 with every output it held, and its
//! outputs are then checked against their witnesses like any other; a kill during the
//! upgrade leaves a store the next open upgrades.
//!
//! A child process writes the format-1 store with sled itself (trees `meta` and `outputs`,
//! and the one-line marker of format 1), so that sled's lock is gone when it exits.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use common::wait;
use duraflow_rs::{SledStore, Storage};

const DIR_ENV: &str = "DURAFLOW_UPGRADE_DIR";
const CHILD_TEST: &str = "format_1_writer";
const OPENER_TEST: &str = "upgrading_opener";
/// Every line the child reports starts with this (libtest prints its own text first).
const MARKER: &str = "@@ ";
/// More than one batch of the upgrade.
const OUTPUTS: usize = 2500;

fn key(i: usize) -> String {
    format!("out/{i}")
}

fn value(i: usize) -> Vec<u8> {
    // Every hundredth output is large enough for a blob file of sled's.
    let len = if i.is_multiple_of(100) {
        140 * 1024
    } else {
        40
    };
    (0..len).map(|b| (b * 7 + i) as u8).collect()
}

#[test]
#[ignore = "helper: run only as a child process by the tests below"]
fn format_1_writer() {
    let Some(dir) = common::child_dir(DIR_ENV, CHILD_TEST) else {
        return;
    };
    let db = sled::open(&dir).expect("child: open sled");
    let meta = db.open_tree("meta").unwrap();
    meta.insert("duraflow.format", &1u64.to_be_bytes()).unwrap();
    let outputs = db.open_tree("outputs").unwrap();
    for i in 0..OUTPUTS {
        outputs.insert(key(i), value(i)).unwrap();
    }
    db.open_tree("runs").unwrap();
    db.open_tree("attempts").unwrap();
    db.flush().unwrap();
    let marker = "duraflow-rs store, format 1; the data is in sled's files\n";
    fs::write(dir.join("duraflow-store"), marker).unwrap();
}

fn write_format_1(dir: &Path) {
    let status = common::child_test(CHILD_TEST)
        .env(DIR_ENV, dir)
        .stdout(Stdio::null())
        .status()
        .expect("run the child");
    assert!(status.success(), "the child failed: {status}");
}

#[test]
fn a_format_1_store_is_upgraded_with_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    write_format_1(&path);
    {
        let store = SledStore::open(&path).unwrap();
        for i in 0..OUTPUTS {
            assert_eq!(
                wait(store.read(&key(i))).unwrap(),
                Some(value(i)),
                "{}",
                key(i)
            );
        }
        let mut keys = wait(store.keys()).unwrap();
        keys.sort();
        assert_eq!(keys.len(), OUTPUTS);
    }
    let marker = fs::read_to_string(path.join("duraflow-store")).unwrap();
    assert!(
        marker.starts_with("duraflow-rs store, format 2;"),
        "{marker}"
    );
    // Upgraded outputs have witnesses: one rolled back by a missing blob is reported.
    for blob in fs::read_dir(path.join("blobs")).unwrap() {
        fs::remove_file(blob.unwrap().path()).unwrap();
    }
    let store = SledStore::open(&path).unwrap();
    let damaged = (0..OUTPUTS)
        .filter(|&i| wait(store.read(&key(i))).is_err())
        .count();
    assert!(damaged > 0, "no output reported damaged without its blob");
}

#[test]
#[ignore = "helper: run only as a child process, to be killed, by the test below"]
fn upgrading_opener() {
    let Some(dir) = common::child_dir(DIR_ENV, OPENER_TEST) else {
        return;
    };
    println!("{MARKER}opening");
    let _store = SledStore::open(&dir).expect("child: open");
    println!("{MARKER}opened");
    // Wait to be killed.
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
}

/// Starts the opener over `path`; returns it, with its later reports, once it says it is
/// opening.
fn start_opener(path: &Path) -> (std::process::Child, impl Iterator<Item = String>) {
    let mut child = common::child_test(OPENER_TEST)
        .env(DIR_ENV, path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("the child's stdout");
    let mut reports = BufReader::new(stdout)
        .lines()
        .map(|l| l.expect("read the child's stdout"))
        .filter_map(|l| l.split_once(MARKER).map(|(_, r)| r.to_owned()));
    assert_eq!(reports.next().as_deref(), Some("opening"));
    (child, reports)
}

/// The format sled's `meta` tree records in (a copy of) the store at `path`.
fn format_on_disk(path: &Path) -> u64 {
    let copy = tempfile::tempdir().unwrap();
    for entry in walk(path) {
        let target = copy.path().join(entry.strip_prefix(path).unwrap());
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::copy(&entry, target).unwrap();
    }
    let db = sled::open(copy.path()).unwrap();
    let format = db
        .open_tree("meta")
        .unwrap()
        .get("duraflow.format")
        .unwrap();
    u64::from_be_bytes(format.unwrap().as_ref().try_into().unwrap())
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn an_upgrade_killed_at_any_moment_is_finished_by_the_next_open() {
    // How long an open that upgrades takes here.
    let took = {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("store");
        write_format_1(&path);
        let (mut child, mut reports) = start_opener(&path);
        let start = Instant::now();
        assert_eq!(reports.next().as_deref(), Some("opened"));
        let took = start.elapsed();
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        took
    };
    let mut rng = fastrand::Rng::with_seed(0x0b9a_de00_0002);
    let mut interrupted = 0;
    for round in 0..8 {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("store");
        write_format_1(&path);
        let (mut child, _reports) = start_opener(&path);
        // A kill at a random moment of the open.
        std::thread::sleep(took.mul_f64(rng.f64()));
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        if format_on_disk(&path) == 1 {
            interrupted += 1;
        }
        let store = SledStore::open(&path).unwrap();
        for i in 0..OUTPUTS {
            let found = wait(store.read(&key(i))).unwrap();
            assert_eq!(found, Some(value(i)), "round {round}: {}", key(i));
        }
    }
    assert!(
        interrupted > 0,
        "no kill landed before the upgrade was durable"
    );
}
