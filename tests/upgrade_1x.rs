//! Promises about store formats and the upgrade of duraflow-rs 1.x directories:
//!
//! - `FileStore::new` on a directory written by the real duraflow-rs 1.0.1 upgrades it in
//!   place, and `Context::get::<T>` then returns what 1.0.1's `get` returned, for every kind
//!   of value; the 1.x files are kept, byte for byte, in `ROOT/.duraflow-1x/`;
//! - a directory holding anything 1.x could not have written (a subdirectory, a dot file, a
//!   link, a name 1.x could not make, a file that is not JSON) is `NotAStore` naming it, and
//!   left byte for byte as it was, not even a lock file made;
//! - the upgrade survives SIGKILL at any moment: the next open finishes it, nothing lost;
//! - a store of a newer format is `UnsupportedFormat` and left byte for byte as it was;
//! - `copy` moves every output between stores.

mod common;

use common::wait;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, DuraflowError, FileStore, MemoryStore, SledStore, Storage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    name: String,
    weights: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Outer {
    id: u64,
    inner: Inner,
    tags: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Empty,
    Circle(f64),
    Rect { w: u32, h: u32 },
}

fn v1_context(dir: &Path) -> duraflow_v1::Context {
    duraflow_v1::Context {
        db: Arc::new(duraflow_v1::FileStore::new(dir).unwrap()),
        completed_count: Arc::default(),
    }
}

fn outer() -> Outer {
    Outer {
        id: 7,
        inner: Inner {
            name: "x".into(),
            weights: vec![0.5, -1.25, 3.0],
        },
        tags: Some(vec!["a".into(), "b".into()]),
    }
}

/// Writes one value of every kind with duraflow-rs 1.0.1 itself.
fn write_v1_fixture(dir: &Path) {
    let v1 = v1_context(dir);
    v1.save("int", &-42i32).unwrap();
    v1.save("big", &u64::MAX).unwrap();
    v1.save("float", &1.5f64).unwrap();
    v1.save("whole-float", &2.0f64).unwrap();
    v1.save("string", &"héllo \"quoted\"".to_string()).unwrap();
    v1.save("bool", &true).unwrap();
    v1.save("none", &None::<i32>).unwrap();
    v1.save("some", &Some(5i32)).unwrap();
    v1.save("vec", &vec!["a".to_string(), "b".to_string()])
        .unwrap();
    let map: HashMap<String, i32> = [("one".into(), 1), ("two".into(), 2)].into();
    v1.save("map", &map).unwrap();
    let int_map: HashMap<u32, String> = [(1, "a".into()), (20, "b".into())].into();
    v1.save("int-map", &int_map).unwrap();
    v1.save("nested", &outer()).unwrap();
    v1.save("unit-variant", &Shape::Empty).unwrap();
    v1.save("newtype-variant", &Shape::Circle(2.5)).unwrap();
    v1.save("struct-variant", &Shape::Rect { w: 3, h: 4 })
        .unwrap();
    // 1.x folded every character outside [A-Za-z0-9_-] to '_': this lands in file "a_b".
    v1.save("a/b", &99u8).unwrap();
}

/// Typed reads, as 1.0.1's `Context::get` and ours offer them.
trait TypedGet {
    fn typed<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T>;
}
impl TypedGet for duraflow_v1::Context {
    fn typed<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.get(key)
    }
}
impl TypedGet for Context {
    fn typed<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.get(key)
    }
}

/// Checks every value of the fixture reads back through `get` as expected: run on 1.0.1's
/// context before the upgrade, and on ours after it, it shows both read the same.
fn check_values(ctx: &impl TypedGet) {
    macro_rules! same {
        ($key:expr, $t:ty, $expected:expr) => {{
            let expected: $t = $expected;
            assert_eq!(ctx.typed::<$t>($key), Some(expected), "reading {}", $key);
        }};
    }
    same!("int", i32, -42);
    same!("int", i64, -42);
    same!("big", u64, u64::MAX);
    same!("float", f64, 1.5);
    same!("whole-float", f64, 2.0);
    same!("string", String, "héllo \"quoted\"".into());
    same!("bool", bool, true);
    same!("none", Option<i32>, None);
    same!("some", Option<i32>, Some(5));
    same!("vec", Vec<String>, vec!["a".into(), "b".into()]);
    same!(
        "map",
        HashMap<String, i32>,
        [("one".into(), 1), ("two".into(), 2)].into()
    );
    same!(
        "int-map",
        BTreeMap<u32, String>,
        [(1, "a".into()), (20, "b".into())].into()
    );
    same!("nested", Outer, outer());
    same!("unit-variant", Shape, Shape::Empty);
    same!("newtype-variant", Shape, Shape::Circle(2.5));
    same!("struct-variant", Shape, Shape::Rect { w: 3, h: 4 });
    same!("a_b", u8, 99);
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_1x_directory_is_upgraded_in_place_and_reads_as_1x_did() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    write_v1_fixture(dir.path());
    check_values(&v1_context(dir.path()));
    let originals = snapshot(dir.path());

    let ctx = Context::new(FileStore::new(dir.path()).unwrap());
    check_values(&ctx);
    // Only our layout is left, and the 1.x files kept aside as they were.
    let names = names_in(dir.path());
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("k-") || n.starts_with('.')),
        "{names:?}"
    );
    assert_eq!(snapshot(&dir.path().join(".duraflow-1x")), originals);
    drop(ctx);

    // Opening again changes nothing and reads the same.
    let ctx = Context::new(FileStore::new(dir.path()).unwrap());
    check_values(&ctx);
    assert_eq!(snapshot(&dir.path().join(".duraflow-1x")), originals);
}

/// A folder of settings, each file one JSON value: 1.x could have written it, so it is
/// upgraded, and its files are kept.
fn config_folder(dir: &Path) {
    std::fs::write(dir.join("port"), b"8080\n").unwrap();
    std::fs::write(dir.join("pid"), b"4242\n").unwrap();
    std::fs::write(dir.join("enabled"), b"true\n").unwrap();
}

#[test]
fn a_folder_of_json_files_is_upgraded_with_its_files_kept_aside() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    config_folder(dir.path());
    let originals = snapshot(dir.path());
    let ctx = Context::new(FileStore::new(dir.path()).unwrap());
    assert_eq!(ctx.get::<u16>("port"), Some(8080));
    assert_eq!(ctx.get::<bool>("enabled"), Some(true));
    let kept = dir.path().join(".duraflow-1x");
    assert_eq!(snapshot(&kept), originals, "every file kept, byte for byte");
    for name in ["port", "pid", "enabled"] {
        assert!(!dir.path().join(name).exists(), "{name} moved aside");
    }
}

#[test]
fn a_directory_holding_what_1x_never_wrote_is_not_a_store_and_left_untouched() {
    let _serial = serial();
    type Plant = fn(&Path);
    let cases: [(&str, Plant); 8] = [
        ("plugins", |d| {
            std::fs::create_dir(d.join("plugins")).unwrap();
            std::fs::write(d.join("plugins").join("a"), b"1").unwrap();
        }),
        ("k-abc", |d| std::fs::create_dir(d.join("k-abc")).unwrap()),
        (".env", |d| std::fs::write(d.join(".env"), b"1").unwrap()),
        ("notes.txt", |d| {
            std::fs::write(d.join("notes.txt"), b"1").unwrap()
        }),
        ("port", |d| {
            std::fs::write(d.join("port"), b"port=8080\n").unwrap()
        }),
        ("pid", |d| std::fs::write(d.join("pid"), b"").unwrap()),
        ("current", |d| {
            std::os::unix::fs::symlink(d.join("port"), d.join("current")).unwrap()
        }),
        // JSON under a 1.x name, but the name of the directory that key `port` goes to.
        ("k-port", |d| {
            std::fs::write(d.join("k-port"), b"1").unwrap()
        }),
    ];
    for (entry, plant) in cases {
        let dir = tempfile::tempdir().unwrap();
        config_folder(dir.path());
        plant(dir.path());
        let before = tree(dir.path());
        match FileStore::new(dir.path()) {
            Err(DuraflowError::NotAStore { path, reason }) => {
                assert_eq!(path, std::fs::canonicalize(dir.path()).unwrap(), "{entry}");
                assert!(reason.contains(&format!("{entry:?}")), "{entry}: {reason}");
            }
            other => panic!("{entry}: expected NotAStore, got {other:?}"),
        }
        assert_eq!(
            tree(dir.path()),
            before,
            "{entry}: nothing changed, nothing made"
        );
    }
}

/// A task returning a fixed number.
struct Count(i32);
#[task]
impl Count {
    async fn run(&self) -> i32 {
        self.0
    }
}

#[test]
fn a_dag_reuses_outputs_upgraded_from_1x() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    v1_context(dir.path()).save("count", &41i32).unwrap();
    let ctx = Arc::new(Context::new(FileStore::new(dir.path()).unwrap()));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx);
    let h = d.add("count", Count(0));
    common::multi_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
    assert_eq!(dag.get(h).unwrap(), 41, "the 1.x output, not a re-run");
    assert_eq!(d.stats().cached, 1);
}

#[test]
fn a_first_open_killed_before_its_manifest_leaves_a_directory_that_opens() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // What a kill while the manifest was being written leaves.
    std::fs::write(dir.path().join(".duraflow-format.tmp"), b"duraflow files").unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    wait(store.write("k", b"v".to_vec())).unwrap();
    drop(store);
    assert_eq!(
        std::fs::read_to_string(dir.path().join(".duraflow-format")).unwrap(),
        "duraflow filestore format 1\n"
    );
    assert!(!dir.path().join(".duraflow-format.tmp").exists());
    assert_eq!(
        wait(FileStore::new(dir.path()).unwrap().read("k")).unwrap(),
        Some(b"v".to_vec())
    );
}

/// What an entry is, as `tree` records it.
#[derive(Debug, PartialEq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

/// Every entry under `dir`, recursively, links not followed.
fn tree(dir: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let (name, path) = (entry.file_name().into_string().unwrap(), entry.path());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            out.insert(name, Entry::Link(std::fs::read_link(&path).unwrap()));
        } else if kind.is_dir() {
            for (k, v) in tree(&path) {
                out.insert(format!("{name}/{k}"), v);
            }
            out.insert(name, Entry::Dir);
        } else {
            out.insert(name, Entry::File(std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// Every file's name and bytes under `dir`, recursively.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {dir:?}: {e}"));
    for entry in entries {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            for (k, v) in snapshot(&path) {
                out.insert(format!("{}/{k}", entry.file_name().to_string_lossy()), v);
            }
        } else {
            out.insert(
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            );
        }
    }
    out
}

#[test]
fn a_store_of_a_newer_format_is_refused_and_left_untouched() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::new(dir.path()).unwrap();
        wait(store.write("k", b"not read".to_vec())).unwrap();
    }
    std::fs::write(
        dir.path().join(".duraflow-format"),
        "duraflow filestore format 99\n",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join(".lock")).unwrap();
    let before = snapshot(dir.path());
    match FileStore::new(dir.path()) {
        Err(DuraflowError::UnsupportedFormat {
            found, supported, ..
        }) => assert_eq!((found, supported), (99, 1)),
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "nothing modified, no lock file made"
    );
}

const UPGRADE_VAR: &str = "DURAFLOW_UPGRADE_DIR";

/// Serialises the tests of this file: a child spawned by one test shares, until it execs,
/// every open file of this process, the lock file of a store another test just dropped
/// included (`flock` locks belong to the open file), which would make a reopen flaky.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Not a test of its own: the child process of `the_upgrade_survives_sigkill_at_any_moment`.
#[test]
#[ignore = "helper: run only as a child process by the killed-upgrade test"]
fn upgrade_child() {
    let dir = std::env::var(UPGRADE_VAR).expect("run by the killed-upgrade test");
    FileStore::new(dir).unwrap();
}

fn spawn_upgrade(dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "upgrade_child", "--ignored", "--test-threads=1"])
        .env(UPGRADE_VAR, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// How many keys the upgrade has written so far (directories of our layout).
fn converted(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("k-"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_upgrade_survives_sigkill_at_any_moment() {
    let _serial = serial();
    const FILES: usize = 300;
    const ROUNDS: usize = 4;
    let mut rng = fastrand::Rng::with_seed(0x1f_2024);
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let v1 = v1_context(dir.path());
        for i in 0..FILES {
            v1.save(&format!("key-{i}"), &(i as u64 * 3)).unwrap();
        }
        let originals = snapshot(dir.path());
        // One or two children killed in mid-upgrade, at a random number of converted keys.
        for kill in 0..=(round % 2) {
            let target = rng.usize(1..FILES);
            let mut child = spawn_upgrade(dir.path());
            let deadline = Instant::now() + Duration::from_secs(60);
            while converted(dir.path()) < target
                && child.try_wait().unwrap().is_none()
                && Instant::now() < deadline
            {
                std::thread::yield_now();
            }
            child.kill().unwrap();
            let status = child.wait().unwrap();
            eprintln!(
                "round {round} kill {kill}: at {} of {FILES} converted ({status})",
                converted(dir.path())
            );
        }
        let ctx = Context::new(FileStore::new(dir.path()).unwrap());
        for i in 0..FILES {
            assert_eq!(
                ctx.get::<u64>(&format!("key-{i}")),
                Some(i as u64 * 3),
                "round {round}: key-{i}"
            );
        }
        let leftovers: Vec<String> = names_in(dir.path())
            .into_iter()
            .filter(|n| !n.starts_with("k-") && !n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
        assert!(!dir.path().join(".duraflow-upgrade").exists());
        assert!(
            snapshot(&dir.path().join(".duraflow-1x")) == originals,
            "round {round}: the 1.x files are kept, byte for byte"
        );
    }
}

#[test]
fn copy_moves_every_output_between_stores() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    write_v1_fixture(dir.path());
    let file = FileStore::new(dir.path()).unwrap();
    let sled_dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(sled_dir.path().join("db")).unwrap();
    let copied = wait(duraflow_rs::copy(&file, &sled)).unwrap();
    assert_eq!(copied, wait(file.keys()).unwrap().len());
    assert_eq!(copied, 16);
    check_values(&Context::new(sled));

    // And from memory into a file store, typed values included.
    let mem = MemoryStore::new();
    let ctx = Context::new(MemoryStore::new());
    ctx.save("n", &5u32).unwrap();
    wait(duraflow_rs::copy(ctx.db.as_ref(), &mem)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let out_store = FileStore::new(out.path()).unwrap();
    assert_eq!(wait(duraflow_rs::copy(&mem, &out_store)).unwrap(), 1);
    assert_eq!(Context::new(out_store).get::<u32>("n"), Some(5));
}
