//! Promise: any key of 1..=4096 bytes is stored under its own name, inside the store's root,
//! and reads back after a reopen; the empty key is `InvalidKey`.

mod common;

use common::wait;

use std::path::Path;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dagx::{task, Task};
use duraflow_rs::{Context, DuraflowError, FileStore, MemoryStore, Storage, MAX_KEY_LEN};

/// A task that counts its runs.
struct Counted(Arc<AtomicUsize>);
#[task]
impl Counted {
    async fn run(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst);
        1
    }
}

fn tricky_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "a/b",
        "a_b",
        "a.b",
        "é",
        "ü",
        "e\u{301}",
        "..",
        ".",
        "/abs",
        "a\\b",
        "a\0b",
        "A",
        "a",
        "k-a",
        "h-a",
        "value",
        ".lock",
        "../../escape",
        "CON",
        "with space",
        "tab\tkey",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.push("x".repeat(MAX_KEY_LEN));
    keys.push("é".repeat(MAX_KEY_LEN / 2));
    keys.push(format!("{}/{}", "y".repeat(150), "z".repeat(150)));
    keys
}

fn all_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn tricky_keys_round_trip_distinctly_after_reopen() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("store");
    let keys = tricky_keys();
    {
        let ctx = Context::new(FileStore::new(&root).unwrap());
        for (i, key) in keys.iter().enumerate() {
            ctx.save(key, &(i as u64, key.clone())).unwrap();
        }
    }
    let store = FileStore::new(&root).unwrap();
    let mut listed = wait(store.keys()).unwrap();
    let ctx = Context::new(store);
    for (i, key) in keys.iter().enumerate() {
        let got: (u64, String) = ctx.try_get(key).unwrap().expect("key present after reopen");
        assert_eq!(got, (i as u64, key.clone()), "key {key:?}");
    }
    let mut expected = keys.clone();
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected, "keys() lists exactly the stored keys");

    // Nothing outside the root: the parent holds only the store directory.
    let siblings: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
    assert_eq!(siblings.len(), 1);
    let mut files = Vec::new();
    all_files(&root, &mut files);
    let canonical = std::fs::canonicalize(&root).unwrap();
    for f in &files {
        assert!(f.starts_with(&root) || f.starts_with(&canonical), "{f:?}");
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            name == "value" || name == ".lock" || name == ".duraflow-format",
            "unexpected file {f:?}"
        );
    }
    assert_eq!(
        files.len(),
        keys.len() + 2,
        "one value file per key plus the lock and the format manifest"
    );
}

#[test]
fn every_key_directory_is_a_direct_child_of_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let root = store.root().to_owned();
    for key in tricky_keys() {
        let path = store.value_path(&key).unwrap();
        assert_eq!(path.parent().unwrap().parent().unwrap(), root, "{key:?}");
        assert!(path.parent().unwrap().file_name().unwrap().len() <= 200);
    }
}

#[test]
fn empty_and_overlong_keys_are_invalid_in_every_store_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<Box<dyn Storage>> = vec![
        Box::new(MemoryStore::new()),
        Box::new(FileStore::new(dir.path()).unwrap()),
    ];
    let long = "k".repeat(MAX_KEY_LEN + 1);
    for store in &stores {
        for key in ["", long.as_str()] {
            match wait(store.write(key, b"x".to_vec())) {
                Err(DuraflowError::InvalidKey { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{}: expected InvalidKey, got {other:?}", store.kind()),
            }
            assert!(matches!(
                wait(store.read(key)),
                Err(DuraflowError::InvalidKey { .. })
            ));
        }
        assert!(wait(store.keys()).unwrap().is_empty());
    }
    let ctx = Context::new(MemoryStore::new());
    match ctx.save("", &1u8) {
        Err(DuraflowError::InvalidKey { key, reason }) => {
            assert_eq!(key, "");
            assert!(reason.contains("empty"), "{reason}");
        }
        other => panic!("expected InvalidKey, got {other:?}"),
    }
    let ctx = Arc::new(ctx);
    // The task itself never runs under an id no store takes.
    let runs = Arc::new(AtomicUsize::new(0));
    let durable = duraflow_rs::Durable::new("", ctx.clone(), Counted(runs.clone()), None);
    assert!(matches!(
        wait(durable.run_result(())),
        Err(DuraflowError::InvalidKey { .. })
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the task ran");
    assert!(matches!(
        ctx.try_get::<u8>(""),
        Err(DuraflowError::InvalidKey { .. })
    ));
}

#[test]
fn remove_deletes_durably_and_reports_presence() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::new(dir.path()).unwrap();
        wait(store.write("a/b", b"1".to_vec())).unwrap();
        assert!(wait(store.remove("a/b")).unwrap());
        assert!(!wait(store.remove("a/b")).unwrap());
        assert_eq!(wait(store.read("a/b")).unwrap(), None);
    }
    let store = FileStore::new(dir.path()).unwrap();
    assert_eq!(wait(store.read("a/b")).unwrap(), None);
    assert!(wait(store.keys()).unwrap().is_empty());
}
