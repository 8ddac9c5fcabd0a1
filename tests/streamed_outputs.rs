//! Promise: an output over 64 KiB is written to its store as it is encoded and read back as
//! it is decoded, through a DAG, `Context::try_get` and `copy` alike; it is checked as it is
//! read, so a flipped byte anywhere in its file is `Corrupt` naming the key and the file
//! (never a wrong value, nor a type mismatch), and `copy` stops at it, leaving the target's
//! previous value. The 256 MiB round trip in a release build is `tests/large_output.rs`.

mod common;

use common::{multi_thread_rt, wait};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dagx::{task, DagRunner, Task};
use duraflow_rs::{
    copy, Context, DurableDag, DuraflowError, FileStore, RunHistory, RunStats, SledStore, Storage,
};

/// Elements of the large output: about 1.8 MB in MessagePack.
const LEN: u64 = 200_000;

fn expected() -> Vec<u64> {
    (0..LEN).map(|i| i * 0x9e37_79b9).collect()
}

struct Produce;
#[task]
impl Produce {
    async fn run(&self) -> Vec<u64> {
        expected()
    }
}

struct Consume;
#[task]
impl Consume {
    // `#[task]` takes the input type from the parameter, so it must be `&Vec<u64>`.
    #[allow(clippy::ptr_arg)]
    async fn run(&self, values: &Vec<u64>) -> (u64, u64) {
        let sum = values.iter().fold(0u64, |s, v| s.wrapping_add(*v));
        (values.len() as u64, sum)
    }
}

fn summary() -> (u64, u64) {
    let values = expected();
    let sum = values.iter().fold(0u64, |s, v| s.wrapping_add(*v));
    (LEN, sum)
}

/// Runs `produce` and a `consume` with id `consume_id` over `ctx`.
fn run(ctx: &Arc<Context>, consume_id: &str) -> (RunStats, Option<(u64, u64)>) {
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let produce = d.add("produce", Produce);
    let consume = d.add(consume_id, Consume).depends_on(&produce);
    multi_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
    (d.stats(), dag.get(consume).ok())
}

/// The one file under `outputs/` of a sled store.
fn sled_file(path: &Path) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(path.join("outputs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}

#[test]
fn a_large_output_round_trips_through_a_dag_over_sled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let ctx = Arc::new(Context::new(SledStore::open(&path).unwrap()));
    let (stats, out) = run(&ctx, "consume/1");
    assert_eq!((stats.executed, out), (2, Some(summary())));
    drop(ctx);

    let store = Arc::new(SledStore::open(&path).unwrap());
    let ctx = Arc::new(Context::new(store.clone()));
    let (stats, out) = run(&ctx, "consume/2");
    assert_eq!(
        (stats.cached, stats.executed),
        (1, 1),
        "produce is read back"
    );
    assert_eq!(out, Some(summary()));
    assert_eq!(
        ctx.try_get::<Vec<u64>>("produce").unwrap(),
        Some(expected())
    );
    // The attempt that stored it records the stored size: its file's.
    let attempts = wait(store.attempts_of("produce")).unwrap();
    let size = std::fs::metadata(sled_file(&path)).unwrap().len();
    assert_eq!(attempts[0].output_size, Some(size));
    assert!(size > 1_000_000, "{size}");
}

#[test]
fn a_large_output_round_trips_through_a_dag_over_a_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Arc::new(Context::new(FileStore::new(dir.path()).unwrap()));
    let (stats, out) = run(&ctx, "consume/1");
    assert_eq!((stats.executed, out), (2, Some(summary())));
    drop(ctx);

    let ctx = Arc::new(Context::new(FileStore::new(dir.path()).unwrap()));
    let (stats, out) = run(&ctx, "consume/2");
    assert_eq!(
        (stats.cached, stats.executed),
        (1, 1),
        "produce is read back"
    );
    assert_eq!(out, Some(summary()));
    assert_eq!(
        ctx.try_get::<Vec<u64>>("produce").unwrap(),
        Some(expected())
    );
}

/// Flips one byte at each of many offsets of `file` (both ends, and evenly between), and
/// checks that reading `produce` is `Corrupt` naming it and `file`; restores it each time.
fn every_flip_is_corrupt(ctx: &Context, file: &Path) {
    let original = std::fs::read(file).unwrap();
    let len = original.len();
    let offsets = (0..64)
        .chain(len - 64..len)
        .chain((0..len).step_by(len / 97));
    for at in offsets {
        let mut bytes = original.clone();
        bytes[at] ^= 0x10;
        std::fs::write(file, &bytes).unwrap();
        match ctx.try_get::<Vec<u64>>("produce") {
            Err(DuraflowError::Corrupt { key, path, .. }) => {
                assert_eq!(
                    (key.as_str(), path.as_deref()),
                    ("produce", Some(file)),
                    "{at}"
                )
            }
            other => panic!(
                "flip at {at} of {len}: expected Corrupt, got {:?}",
                other.map(|v| v.map(|v| v.len()))
            ),
        }
    }
    std::fs::write(file, &original).unwrap();
    assert_eq!(
        ctx.try_get::<Vec<u64>>("produce").unwrap(),
        Some(expected())
    );
}

#[test]
fn a_flipped_byte_in_a_large_output_of_sled_is_corrupt_naming_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let ctx = Arc::new(Context::new(SledStore::open(&path).unwrap()));
    run(&ctx, "consume");
    every_flip_is_corrupt(&ctx, &sled_file(&path));
    // The store keeps working: a DAG runs the damaged task again, which repairs it.
    std::fs::write(sled_file(&path), b"damaged").unwrap();
    let (stats, out) = run(&ctx, "consume/again");
    assert_eq!((stats.executed, out), (2, Some(summary())));
    assert_eq!(
        ctx.try_get::<Vec<u64>>("produce").unwrap(),
        Some(expected())
    );
}

#[test]
fn a_flipped_byte_in_a_large_output_of_a_file_store_is_corrupt_naming_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let file = store.value_path("produce").unwrap();
    let ctx = Arc::new(Context::new(store));
    run(&ctx, "consume");
    every_flip_is_corrupt(&ctx, &file);
}

#[test]
fn copy_streams_large_outputs_and_stops_at_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let from = FileStore::new(dir.path().join("from")).unwrap();
    let file = from.value_path("produce").unwrap();
    let from = Arc::new(from);
    run(&Arc::new(Context::new(from.clone())), "consume");
    let to = Arc::new(SledStore::open(dir.path().join("to")).unwrap());
    assert_eq!(wait(copy(&*from, &*to)).unwrap(), 2);
    let copied = Context::new(to.clone());
    assert_eq!(
        copied.try_get::<Vec<u64>>("produce").unwrap(),
        Some(expected())
    );
    let stored = wait(from.read("produce")).unwrap();
    assert_eq!(
        wait(to.read("produce")).unwrap(),
        stored,
        "copied as stored"
    );

    // A byte flipped near the end of the source: the copy has written most of it by then.
    wait(to.write("produce", b"previous".to_vec())).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    match wait(copy(&*from, &*to)) {
        Err(DuraflowError::Corrupt { key, path, .. }) => {
            assert_eq!((key.as_str(), path.as_deref()), ("produce", Some(&*file)))
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let kept = wait(to.read("produce")).unwrap();
    assert_eq!(
        kept.as_deref(),
        Some(&b"previous"[..]),
        "the target keeps its value"
    );
}
