//! Promise: a damaged SledStore never opens silently emptier or older, and never panics.
//! These stores keep every output in sled's trees (no blob threshold), where sled keeps
//! large pages in blob files of its own; damage to the store's own output files is in
//! `tests/sled_store.rs`.
//! Each of 55 copies (57 when sled wrote a snapshot) of a store holding 60 acknowledged
//! outputs (each overwritten once, a fifth of them large enough for sled's blob files) is
//! damaged once — a flipped bit in `db`, in a blob, in a snapshot or in the marker, `db` or a
//! blob truncated, a blob, `conf` or the marker deleted — and then either fails to open with
//! a typed error, or opens with every output equal to its last acknowledged value or
//! reported `Corrupt` under its own key.
//! Such a store then takes no writes, and a DAG over it fails the task whose output is
//! unreadable rather than run it again.

mod common;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::wait;
use dagx::{task, Task};
use duraflow_rs::{Context, Durable, DuraflowError, SledConfig, SledStore, Storage};

const KEYS: usize = 60;
const SEED: u64 = 0xda4a_6e5e_ed00_0015;

fn key(i: usize) -> String {
    format!("output-{i}")
}

/// Value `version` of output `i`: every fifth is 150 KiB (a blob file of sled's own).
fn value(i: usize, version: u8) -> Vec<u8> {
    let len = if i.is_multiple_of(5) {
        150 * 1024
    } else {
        64 + i
    };
    let mut rng = fastrand::Rng::with_seed(i as u64 * 31 + u64::from(version));
    (0..len).map(|_| rng.u8(..)).collect()
}

/// A store kept whole in sled's trees: no output in a file of the store's own.
fn inline(dir: &Path) -> SledStore {
    SledConfig::new(dir)
        .blob_threshold(usize::MAX)
        .open()
        .unwrap()
}

/// A store whose every output was written, then overwritten, each write acknowledged.
fn build(dir: &Path) {
    let store = inline(dir);
    for version in [1, 2] {
        for i in 0..KEYS {
            wait(store.write(&key(i), value(i, version))).unwrap();
        }
    }
}

/// One way to damage a store.
#[derive(Debug, Clone)]
enum Damage {
    FlipBit { file: PathBuf, bit: u64 },
    Truncate { file: PathBuf, len: u64 },
    Delete { file: PathBuf },
}

impl Damage {
    fn apply(&self, store: &Path) {
        match self {
            Damage::FlipBit { file, bit } => {
                let path = store.join(file);
                let mut bytes = fs::read(&path).unwrap();
                bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
                fs::write(&path, bytes).unwrap();
            }
            Damage::Truncate { file, len } => {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(store.join(file))
                    .unwrap();
                f.set_len(*len).unwrap();
            }
            Damage::Delete { file } => fs::remove_file(store.join(file)).unwrap(),
        }
    }
}

fn files_in(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().starts_with(prefix))
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// The matrix: every kind of damage, at offsets and files drawn from `SEED`.
fn matrix(store: &Path) -> Vec<Damage> {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let db = PathBuf::from("db");
    let db_len = len(&store.join(&db));
    // Blob files are named by the log position of their page: the newest hold the
    // outputs' last values (sled removes the others lazily).
    let mut blobs: Vec<(u64, PathBuf)> = files_in(&store.join("blobs"), "")
        .into_iter()
        .filter_map(|b| Some((b.to_str()?.parse().ok()?, Path::new("blobs").join(b))))
        .collect();
    blobs.sort();
    assert!(
        blobs.len() >= 12,
        "the store has {} blob files",
        blobs.len()
    );
    let blobs: Vec<PathBuf> = blobs
        .split_off(blobs.len() - 12)
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    let mut damages = Vec::new();
    for _ in 0..20 {
        let bit = rng.u64(..db_len * 8);
        damages.push(Damage::FlipBit {
            file: db.clone(),
            bit,
        });
    }
    for len in [0, 1, db_len / 2, db_len - 1] {
        damages.push(Damage::Truncate {
            file: db.clone(),
            len,
        });
    }
    for _ in 0..6 {
        let len = rng.u64(..db_len);
        damages.push(Damage::Truncate {
            file: db.clone(),
            len,
        });
    }
    for _ in 0..8 {
        let file = blobs[rng.usize(..blobs.len())].clone();
        let bit = rng.u64(..len(&store.join(&file)) * 8);
        damages.push(Damage::FlipBit { file, bit });
    }
    for _ in 0..3 {
        let file = blobs[rng.usize(..blobs.len())].clone();
        let len = rng.u64(..len(&store.join(&file)));
        damages.push(Damage::Truncate { file, len });
    }
    for _ in 0..6 {
        let file = blobs[rng.usize(..blobs.len())].clone();
        damages.push(Damage::Delete { file });
    }
    let conf = PathBuf::from("conf");
    damages.push(Damage::Delete { file: conf.clone() });
    let bit = rng.u64(..len(&store.join(&conf)) * 8);
    damages.push(Damage::FlipBit { file: conf, bit });
    let marker = PathBuf::from("duraflow-store");
    damages.push(Damage::Delete {
        file: marker.clone(),
    });
    // The format's digit, a digit of each commit slot, a checksum digit of each.
    let format_digit = "duraflow-rs store, format ".len() as u64;
    for byte in [format_digit, 512 + 20, 1024 + 26, 512 + 30, 1024 + 34] {
        let bit = byte * 8;
        damages.push(Damage::FlipBit {
            file: marker.clone(),
            bit,
        });
    }
    for file in files_in(store, "snap.").into_iter().take(1) {
        let bit = rng.u64(..len(&store.join(&file)) * 8);
        damages.push(Damage::FlipBit {
            file: file.clone(),
            bit,
        });
        damages.push(Damage::Truncate { file, len: 0 });
    }
    damages
}

/// What a damaged copy did.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    /// Opened, every output its last value.
    Intact,
    /// Opened; some outputs reported `Corrupt` under their own keys, the rest intact.
    KeysReportedDamaged,
    /// Refused to open with this typed error.
    Refused(&'static str),
}

fn error_kind(e: &DuraflowError) -> &'static str {
    match e {
        DuraflowError::Corrupt { .. } => "Corrupt",
        DuraflowError::NotAStore { .. } => "NotAStore",
        DuraflowError::UnsupportedFormat { .. } => "UnsupportedFormat",
        DuraflowError::Io { .. } => "Io",
        _ => "other",
    }
}

/// Opens the damaged copy at `dir` and judges it; `Err` says how it broke a promise.
fn judge(dir: &Path) -> Result<Verdict, String> {
    let store = match SledStore::open(dir) {
        Ok(store) => store,
        Err(e) => {
            let kind = error_kind(&e);
            if kind == "other" {
                return Err(format!("refused with an untyped error: {e}"));
            }
            return Ok(Verdict::Refused(kind));
        }
    };
    let mut damaged = 0;
    for i in 0..KEYS {
        let k = key(i);
        match wait(store.read(&k)) {
            Ok(Some(v)) if v == value(i, 2) => {}
            Ok(Some(v)) if v == value(i, 1) => return Err(format!("{k} has its older value")),
            Ok(Some(_)) => return Err(format!("{k} has a value never written")),
            Ok(None) => return Err(format!("{k} is missing")),
            Err(DuraflowError::Corrupt { key, .. }) if key == k => damaged += 1,
            Err(e) => return Err(format!("reading {k}: {e}")),
        }
    }
    if damaged > 0 {
        // The store stopped: nothing more is written to a damaged tree.
        let write = wait(store.write(&key(0), b"after".to_vec()));
        if write.is_ok() || store.health().is_ok() {
            return Err("a store with damaged outputs still takes writes".to_owned());
        }
        return Ok(Verdict::KeysReportedDamaged);
    }
    Ok(Verdict::Intact)
}

#[test]
fn a_damaged_store_opens_intact_or_reports_the_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    build(&original);
    let damages = matrix(&original);
    assert!(damages.len() >= 50, "{} variants", damages.len());
    let mut verdicts = Vec::new();
    let mut broken = Vec::new();
    for (n, damage) in damages.iter().enumerate() {
        let copy = tmp.path().join(format!("copy-{n}"));
        copy_dir(&original, &copy);
        damage.apply(&copy);
        match catch_unwind(AssertUnwindSafe(|| judge(&copy))) {
            // sled reads a truncated log as a shorter one: only the marker tells.
            Ok(Ok(verdict))
                if matches!(damage, Damage::Truncate { file, .. } if file == Path::new("db"))
                    && verdict != Verdict::Refused("Corrupt") =>
            {
                broken.push(format!("{damage:?}: {verdict:?}, not refused as Corrupt"));
            }
            Ok(Ok(verdict)) => verdicts.push(verdict),
            Ok(Err(why)) => broken.push(format!("{damage:?}: {why}")),
            Err(_) => broken.push(format!("{damage:?}: panicked")),
        }
        let _ = fs::remove_dir_all(&copy);
    }
    verdicts.sort();
    let mut counts: Vec<(String, usize)> = Vec::new();
    for v in &verdicts {
        let name = format!("{v:?}");
        match counts.last_mut() {
            Some((last, n)) if *last == name => *n += 1,
            _ => counts.push((name, 1)),
        }
    }
    eprintln!("{} variants: {counts:?}", damages.len());
    assert!(broken.is_empty(), "promises broken:\n{}", broken.join("\n"));
    // The matrix reaches the checks it is for.
    assert!(
        verdicts.contains(&Verdict::Refused("Corrupt")),
        "{counts:?}"
    );
    assert!(
        verdicts.contains(&Verdict::KeysReportedDamaged),
        "{counts:?}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A task whose output sled keeps in a blob file; counts its runs.
#[derive(Clone)]
struct Big(Arc<AtomicUsize>);
#[task]
impl Big {
    async fn run(&self) -> Vec<u8> {
        self.0.fetch_add(1, Ordering::SeqCst);
        vec![7; 200 * 1024]
    }
}

#[test]
fn a_dag_over_a_damaged_store_fails_the_unreadable_task_instead_of_running_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    let runs = Arc::new(AtomicUsize::new(0));
    {
        let ctx = Arc::new(Context::new(inline(&path)));
        wait(Durable::new("big", ctx, Big(runs.clone()), None).run_result(())).unwrap();
    }
    for blob in fs::read_dir(path.join("blobs")).unwrap() {
        fs::remove_file(blob.unwrap().path()).unwrap();
    }
    let store = Arc::new(SledStore::open(&path).unwrap());
    let ctx = Arc::new(Context::new(store.clone()));
    match wait(Durable::new("big", ctx, Big(runs.clone()), None).run_result(())) {
        Err(DuraflowError::Corrupt { key, .. }) => assert_eq!(key, "big"),
        other => panic!(
            "expected Corrupt naming the key, got {:?}",
            other.map(|v| v.len())
        ),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the task ran again");
    assert!(store.health().is_err(), "the store still takes writes");
}

#[test]
fn a_missing_marker_is_corrupt_unless_the_database_is_trusted_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    {
        let store = SledStore::open(&path).unwrap();
        wait(store.write("k", b"v".to_vec())).unwrap();
    }
    fs::remove_file(path.join("duraflow-store")).unwrap();
    match SledStore::open(&path) {
        Err(DuraflowError::Corrupt { reason, .. }) => {
            assert!(reason.contains("rebuild_marker"), "{reason}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    {
        let store = SledConfig::new(&path).rebuild_marker(true).open().unwrap();
        assert_eq!(wait(store.read("k")).unwrap(), Some(b"v".to_vec()));
    }
    let store = SledStore::open(&path).expect("the marker was written anew");
    assert_eq!(wait(store.read("k")).unwrap(), Some(b"v".to_vec()));
}

/// The blob files of the store at `path`, oldest first.
fn blobs_of(path: &Path) -> Vec<PathBuf> {
    let mut blobs: Vec<(u64, PathBuf)> = fs::read_dir(path.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some((p.file_name()?.to_str()?.parse().ok()?, p)))
        .collect();
    blobs.sort();
    blobs.into_iter().map(|(_, p)| p).collect()
}

#[test]
fn a_write_lost_before_it_was_acknowledged_is_absent_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    let marker = path.join("duraflow-store");
    let large = |byte| vec![byte; 200 * 1024];
    let acknowledged = {
        let store = inline(&path);
        wait(store.write("big", large(1))).unwrap();
        // What the marker says before the second write.
        fs::read(&marker).unwrap()
    };
    {
        let store = inline(&path);
        wait(store.write("big", large(2))).unwrap();
    }
    // A power cut that kept sled's log entry of the second write but neither its blob file
    // nor the marker's record of it: as if it had never been acknowledged.
    fs::remove_file(blobs_of(&path).last().unwrap()).unwrap();
    let damaged = tmp.path().join("damaged");
    copy_dir(&path, &damaged);
    fs::write(&marker, acknowledged).unwrap();
    let store = SledStore::open(&path).unwrap();
    assert_eq!(
        wait(store.read("big")).unwrap(),
        None,
        "absent: run it again"
    );
    assert!(store.health().is_ok());
    // With the marker that acknowledged the write, the same files are damage.
    let store = SledStore::open(&damaged).unwrap();
    assert!(matches!(
        wait(store.read("big")),
        Err(DuraflowError::Corrupt { .. })
    ));
}
