//! Promises about a FileStore whose root holds entries it did not make:
//!
//! - a link inside the root is never followed: a link where a key's directory or value
//!   file, or the store's own file, should be is `Corrupt` naming it, for reads, writes,
//!   removes and listing, and nothing outside the root is read as a value or written;
//! - a link or a stale file at a temporary file's name is removed, never written through;
//! - `keys()` and `copy` fail naming a key entry they cannot read, instead of skipping it
//!   (`keys()` reads a value file's header, `copy` the whole file);
//!   a key directory that holds no value yet (a first write killed before its rename) is
//!   simply not a key.
#![cfg(unix)]

mod common;

use common::wait;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use duraflow_rs::{Context, DuraflowError, FileStore, MemoryStore, Storage};

/// `text` as `Context::save` stores it, so that `copy` accepts it.
fn value(text: &str) -> Vec<u8> {
    let ctx = Context::new(MemoryStore::new());
    ctx.save("v", &text.to_owned()).unwrap();
    wait(ctx.db.read("v")).unwrap().unwrap()
}

/// Asserts `result` is `Corrupt` naming `path`.
fn assert_corrupt_at<T: std::fmt::Debug>(
    result: Result<T, DuraflowError>,
    path: &Path,
    what: &str,
) {
    match result {
        Err(DuraflowError::Corrupt { path: Some(p), .. }) if p == path => {}
        other => panic!("{what}: expected Corrupt naming {path:?}, got {other:?}"),
    }
}

/// Asserts `result` is an error whose message names `path`.
fn assert_fails_naming<T: std::fmt::Debug>(
    result: Result<T, DuraflowError>,
    path: &Path,
    what: &str,
) {
    match result {
        Err(e) => assert!(
            e.to_string().contains(&path.display().to_string()),
            "{what}: the error does not name {path:?}: {e}"
        ),
        Ok(v) => panic!("{what}: expected an error naming {path:?}, got Ok({v:?})"),
    }
}

/// A store in `dir/store` holding `good` and `k`, and a directory `dir/elsewhere` outside
/// it that holds a copy of `k`'s directory (a valid value of `k`).
fn store_and_elsewhere(dir: &Path) -> (FileStore, PathBuf) {
    let store = FileStore::new(dir.join("store")).unwrap();
    wait(store.write("good", value("good"))).unwrap();
    wait(store.write("k", b"old".to_vec())).unwrap();
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let value = store.value_path("k").unwrap();
    std::fs::copy(&value, elsewhere.join("value")).unwrap();
    (store, elsewhere)
}

#[test]
fn a_key_directory_replaced_by_a_link_is_corrupt_and_nothing_goes_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, elsewhere) = store_and_elsewhere(dir.path());
    let key_dir = store.value_path("k").unwrap().parent().unwrap().to_owned();
    std::fs::remove_dir_all(&key_dir).unwrap();
    symlink(&elsewhere, &key_dir).unwrap();
    let outside = std::fs::read(elsewhere.join("value")).unwrap();

    assert_corrupt_at(wait(store.read("k")), &key_dir, "read");
    assert_corrupt_at(wait(store.write("k", b"new".to_vec())), &key_dir, "write");
    assert_corrupt_at(wait(store.remove("k")), &key_dir, "remove");
    assert_corrupt_at(wait(store.keys()), &key_dir, "keys");
    assert_eq!(
        std::fs::read(elsewhere.join("value")).unwrap(),
        outside,
        "the value outside the root is untouched"
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        1,
        "nothing added outside"
    );
    // A dangling link is no better than a live one.
    std::fs::remove_file(&key_dir).unwrap();
    symlink(dir.path().join("missing"), &key_dir).unwrap();
    assert_corrupt_at(
        wait(store.read("k")),
        &key_dir,
        "read through a dangling link",
    );
    assert_corrupt_at(
        wait(store.write("k", b"new".to_vec())),
        &key_dir,
        "write through a dangling link",
    );
    assert!(
        !dir.path().join("missing").exists(),
        "nothing created outside"
    );
    // Other keys are unaffected.
    assert_eq!(wait(store.read("good")).unwrap(), Some(value("good")));
}

#[test]
fn a_link_a_directory_or_a_fifo_where_the_value_file_should_be_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, elsewhere) = store_and_elsewhere(dir.path());
    let value = store.value_path("k").unwrap();
    let outside = elsewhere.join("value");
    let outside_bytes = std::fs::read(&outside).unwrap();

    std::fs::remove_file(&value).unwrap();
    symlink(&outside, &value).unwrap();
    assert_corrupt_at(wait(store.read("k")), &value, "read a linked value");
    assert_corrupt_at(wait(store.write("k", b"new".to_vec())), &value, "write");
    assert_corrupt_at(wait(store.remove("k")), &value, "remove");
    assert_corrupt_at(wait(store.keys()), &value, "keys");
    assert_eq!(std::fs::read(&outside).unwrap(), outside_bytes);

    std::fs::remove_file(&value).unwrap();
    std::fs::create_dir(&value).unwrap();
    assert_corrupt_at(wait(store.read("k")), &value, "read a directory");
    assert_corrupt_at(wait(store.write("k", b"new".to_vec())), &value, "write");
    assert_corrupt_at(wait(store.keys()), &value, "keys");

    // A FIFO: reading it neither waits for a writer nor reads from one.
    std::fs::remove_dir(&value).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&value)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    assert_corrupt_at(wait(store.read("k")), &value, "read a FIFO");
    assert_corrupt_at(wait(store.keys()), &value, "keys");
}

#[test]
fn a_link_at_the_temporary_file_is_removed_and_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("store")).unwrap();
    wait(store.write("k", b"old".to_vec())).unwrap();
    let tmp = store.value_path("k").unwrap().with_file_name("value.tmp");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let missing = dir.path().join("missing");
    for (target, round) in [(&victim, "new 1"), (&missing, "new 2")] {
        symlink(target, &tmp).unwrap();
        wait(store.write("k", round.as_bytes().to_vec())).unwrap();
        assert_eq!(
            wait(store.read("k")).unwrap().as_deref(),
            Some(round.as_bytes())
        );
        assert!(
            !std::fs::symlink_metadata(store.value_path("k").unwrap())
                .unwrap()
                .file_type()
                .is_symlink(),
            "the value is a file of the store's own"
        );
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!missing.exists(), "nothing created outside the root");
    // A stale temporary file that is a plain file is replaced, not appended to.
    std::fs::write(&tmp, vec![b'x'; 100_000]).unwrap();
    wait(store.write("k", b"new 3".to_vec())).unwrap();
    assert_eq!(
        wait(store.read("k")).unwrap().as_deref(),
        Some(&b"new 3"[..])
    );
}

#[test]
fn links_in_place_of_the_stores_own_files_are_refused_on_open() {
    for own in [".lock", ".duraflow-format"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        drop(FileStore::new(&root).unwrap());
        let root = std::fs::canonicalize(&root).unwrap();
        let planted = root.join(own);
        let outside = dir.path().join(format!("outside{own}"));
        std::fs::rename(&planted, &outside).unwrap();
        let before = std::fs::read(&outside).unwrap();
        symlink(&outside, &planted).unwrap();
        assert_corrupt_at(FileStore::new(&root), &planted, own);
        assert_eq!(std::fs::read(&outside).unwrap(), before, "{own}");
        // Dangling: nothing is created outside.
        std::fs::remove_file(&outside).unwrap();
        assert_corrupt_at(FileStore::new(&root), &planted, own);
        assert!(!outside.exists(), "{own}: nothing created outside the root");
    }
}

/// Every entry that is not a readable key: planted as `name` next to a good key, each must
/// make `keys()` and `copy` fail naming it.
#[test]
fn keys_and_copy_fail_naming_an_entry_they_cannot_read() {
    type Plant = fn(&Path, &Path);
    let cases: [(&str, Plant); 6] = [
        ("a file where a key directory should be", |entry, _| {
            std::fs::write(entry, b"x").unwrap()
        }),
        ("a link to a directory holding a value", |entry, outside| {
            symlink(outside, entry).unwrap()
        }),
        ("a dangling link", |entry, outside| {
            symlink(outside.join("missing"), entry).unwrap()
        }),
        ("a directory where the value file should be", |entry, _| {
            std::fs::create_dir_all(entry.join("value")).unwrap()
        }),
        ("a link where the value file should be", |entry, outside| {
            std::fs::create_dir(entry).unwrap();
            symlink(outside.join("value"), entry.join("value")).unwrap();
        }),
        ("a damaged value file", |entry, outside| {
            std::fs::create_dir(entry).unwrap();
            let mut bytes = std::fs::read(outside.join("value")).unwrap();
            bytes[10] ^= 1;
            std::fs::write(entry.join("value"), bytes).unwrap();
        }),
    ];
    for (what, plant) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (store, elsewhere) = store_and_elsewhere(dir.path());
        // Outside, a valid value of key "x" (not "k"), so that a followed link to it would
        // pass the check of the key recorded in the file.
        let other = tempfile::tempdir().unwrap();
        let scratch = FileStore::new(other.path()).unwrap();
        wait(scratch.write("x", value("outside"))).unwrap();
        std::fs::copy(scratch.value_path("x").unwrap(), elsewhere.join("value")).unwrap();
        let entry = store.value_path("x").unwrap().parent().unwrap().to_owned();
        plant(&entry, &elsewhere);
        // Named either as the entry or as the value file inside it. A value file whose
        // header is intact is listed (its value is checked when it is read, as by `copy`).
        if what == "a damaged value file" {
            // `k` holds bytes that are no envelope, which `copy` would stop at first.
            wait(store.remove("k")).unwrap();
            let keys = wait(store.keys()).unwrap();
            assert!(keys.contains(&"x".to_owned()), "{what}: {keys:?}");
        } else {
            assert_fails_naming(wait(store.keys()), &entry, what);
        }
        let to = MemoryStore::new();
        assert_fails_naming(wait(duraflow_rs::copy(&store, &to)), &entry, what);
    }
}

#[test]
fn a_key_directory_without_a_value_yet_is_not_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    wait(store.write("good", value("good"))).unwrap();
    // What a first write killed before its rename leaves: the directory and a temp file.
    let entry = store
        .value_path("half")
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    std::fs::create_dir(&entry).unwrap();
    std::fs::write(entry.join("value.tmp"), b"torn").unwrap();
    assert_eq!(wait(store.keys()).unwrap(), ["good"]);
    assert_eq!(wait(store.read("half")).unwrap(), None);
    let to = MemoryStore::new();
    assert_eq!(wait(duraflow_rs::copy(&store, &to)).unwrap(), 1);
    wait(store.write("half", b"whole".to_vec())).unwrap();
    let mut keys = wait(store.keys()).unwrap();
    keys.sort();
    assert_eq!(keys, ["good", "half"]);
}
