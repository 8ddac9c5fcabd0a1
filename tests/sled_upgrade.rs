//! Promise: a SledStore of format 1 or 2 opens as format 3 with every output it held, its
//! large outputs moved to files of their own, and its outputs are then checked like any
//! other; a kill during the upgrade leaves a store the next open upgrades.
//!
//! A child process writes the old store with sled itself, as those formats are laid out
//! (format 1: trees `meta` and `outputs` and a one-line marker; format 2: also `witnesses`,
//! and the marker that numbers commits), so that sled's lock is gone when it exits.

mod common;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use common::{wait, MARKER};
use duraflow_rs::{SledStore, Storage};

const DIR_ENV: &str = "DURAFLOW_UPGRADE_DIR";
const FORMAT_ENV: &str = "DURAFLOW_UPGRADE_FORMAT";
const DAMAGED_ENV: &str = "DURAFLOW_UPGRADE_DAMAGED";
const CHILD_TEST: &str = "old_format_writer";
const OPENER_TEST: &str = "upgrading_opener";
/// More than one batch of the upgrade.
const OUTPUTS: usize = 2500;

fn key(i: usize) -> String {
    format!("out/{i}")
}

fn value(i: usize) -> Vec<u8> {
    // Every hundredth output is over the blob threshold.
    let len = if i.is_multiple_of(100) {
        140 * 1024
    } else {
        40
    };
    (0..len).map(|b| (b * 7 + i) as u8).collect()
}

#[test]
#[ignore = "helper: run only as a child process by the tests below"]
fn old_format_writer() {
    let Some(dir) = common::child_dir(DIR_ENV, CHILD_TEST) else {
        return;
    };
    let format: u64 = common::env_number(FORMAT_ENV);
    let db = sled::open(&dir).expect("child: open sled");
    let meta = db.open_tree("meta").unwrap();
    meta.insert("duraflow.format", &format.to_be_bytes())
        .unwrap();
    let outputs = db.open_tree("outputs").unwrap();
    let witnesses = db.open_tree("witnesses").unwrap();
    for i in 0..OUTPUTS {
        outputs.insert(key(i), value(i)).unwrap();
        if format == 2 {
            // length (u64 BE) | CRC-32 (u32 BE) | commit (u64 BE)
            let v = value(i);
            let mut w = (v.len() as u64).to_be_bytes().to_vec();
            // A damaged store: the large output `out/0` is not the value its witness names
            // (as when sled opened an older page of it).
            let damaged = i == 0 && std::env::var_os(DAMAGED_ENV).is_some();
            let crc = crc32fast::hash(&v) ^ u32::from(damaged);
            w.extend_from_slice(&crc.to_be_bytes());
            w.extend_from_slice(&1u64.to_be_bytes());
            witnesses.insert(key(i), w).unwrap();
        }
    }
    if format == 2 {
        meta.insert("duraflow.commit", &1u64.to_be_bytes()).unwrap();
    }
    db.open_tree("runs").unwrap();
    db.open_tree("attempts").unwrap();
    db.flush().unwrap();
    let marker = match format {
        1 => "duraflow-rs store, format 1; the data is in sled's files\n".to_owned(),
        _ => {
            let pad = |text: String| format!("{text:<511}\n");
            let signed = format!("commit {:020}", 1);
            let slot = pad(format!(
                "{signed} {:08x}",
                crc32fast::hash(signed.as_bytes())
            ));
            let header = pad("duraflow-rs store, format 2; the data is in sled's files".to_owned());
            format!("{header}{slot}{slot}")
        }
    };
    fs::write(dir.join("duraflow-store"), marker).unwrap();
}

fn write_format(dir: &Path, format: u64) {
    let status = common::child_test(CHILD_TEST)
        .env(DIR_ENV, dir)
        .env(FORMAT_ENV, format.to_string())
        .stdout(Stdio::null())
        .status()
        .expect("run the child");
    assert!(status.success(), "the child failed: {status}");
}

fn write_format_1(dir: &Path) {
    write_format(dir, 1)
}

/// Opens the store of an older format at `path` and checks that it is format 3 with every
/// output, the large ones in files of their own.
fn check_upgraded(path: &Path) {
    {
        let store = SledStore::open(path).unwrap();
        for i in 0..OUTPUTS {
            let found = wait(store.read(&key(i))).unwrap();
            assert!(found == Some(value(i)), "{}", key(i));
        }
        let mut keys = wait(store.keys()).unwrap();
        keys.sort();
        assert_eq!(keys.len(), OUTPUTS);
    }
    let marker = fs::read_to_string(path.join("duraflow-store")).unwrap();
    assert!(
        marker.starts_with("duraflow-rs store, format 3;"),
        "{marker}"
    );
    let files: Vec<_> = fs::read_dir(path.join("outputs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), OUTPUTS / 100, "one file per large output");
    // A moved output is checked against its file.
    fs::remove_file(&files[0]).unwrap();
    let store = SledStore::open(path).unwrap();
    let damaged = (0..OUTPUTS)
        .filter(|&i| wait(store.read(&key(i))).is_err())
        .count();
    assert_eq!(damaged, 1);
}

#[test]
fn an_upgrade_keeps_reporting_damage_it_finds() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    let status = common::child_test(CHILD_TEST)
        .env(DIR_ENV, &path)
        .env(FORMAT_ENV, "2")
        .env(DAMAGED_ENV, "1")
        .stdout(Stdio::null())
        .status()
        .expect("run the child");
    assert!(status.success());
    let store = SledStore::open(&path).unwrap();
    match wait(store.read(&key(0))) {
        Err(duraflow_rs::DuraflowError::Corrupt { key: k, .. }) => assert_eq!(k, key(0)),
        other => panic!(
            "expected Corrupt, got {:?}",
            other.map(|v| v.map(|v| v.len()))
        ),
    }
}

#[test]
fn a_format_2_store_is_upgraded_with_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    write_format(&path, 2);
    check_upgraded(&path);
}

#[test]
fn a_format_1_store_is_upgraded_with_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    write_format_1(&path);
    check_upgraded(&path);
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
    let mut opener = common::child_test(OPENER_TEST);
    opener.env(DIR_ENV, path).stdin(Stdio::piped());
    let (child, mut reports) = common::spawn_reporting(opener);
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
    for round in 0..10 {
        // From format 1 and from format 2, in turn.
        let from = 1 + round % 2;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("store");
        write_format(&path, from);
        let (mut child, _reports) = start_opener(&path);
        // A kill at a random moment of the open.
        std::thread::sleep(took.mul_f64(rng.f64()));
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        if format_on_disk(&path) < 3 {
            interrupted += 1;
        }
        let store = SledStore::open(&path).unwrap();
        for i in 0..OUTPUTS {
            let found = wait(store.read(&key(i))).unwrap();
            assert!(
                found == Some(value(i)),
                "round {round} (format {from}): {}",
                key(i)
            );
        }
    }
    assert!(
        interrupted > 0,
        "no kill landed before the upgrade was durable"
    );
}
