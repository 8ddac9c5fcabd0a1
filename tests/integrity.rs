//! Promise: a damaged value is `Corrupt`, a value of another type is `TypeMismatch`, and
//! inside a DAG neither is ever returned: the task runs again, overwrites it, and a warning
//! says why.

mod common;

use common::wait;

use std::sync::Arc;

use common::{capture, current_thread_rt, Val};
use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, DuraflowError, FileStore};

fn flip_byte(path: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at % bytes.len();
    bytes[i] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_byte_anywhere_in_a_stored_file_is_corrupt_naming_key_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let path = store.value_path("k").unwrap();
    let ctx = Context::new(store);
    ctx.save("k", &String::from("a value worth keeping"))
        .unwrap();
    let len = std::fs::read(&path).unwrap().len();
    for at in 0..len {
        ctx.save("k", &String::from("a value worth keeping"))
            .unwrap();
        flip_byte(&path, at);
        match ctx.try_get::<String>("k") {
            Err(DuraflowError::Corrupt {
                key, path: Some(p), ..
            }) => {
                assert_eq!(key, "k");
                assert_eq!(p, path);
            }
            other => panic!("flip at {at}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(ctx.get::<String>("k"), None);
    }
}

#[test]
fn reading_with_another_type_is_a_type_mismatch_naming_both() {
    let ctx = Context::new(duraflow_rs::MemoryStore::new());
    ctx.save("k", &vec![String::from("x")]).unwrap();
    match ctx.try_get::<u32>("k") {
        Err(DuraflowError::TypeMismatch {
            key,
            stored,
            requested,
            ..
        }) => {
            assert_eq!(key, "k");
            assert!(
                stored.contains("Vec") && stored.contains("String"),
                "{stored}"
            );
            assert_eq!(requested, "u32");
        }
        other => panic!("expected TypeMismatch, got {other:?}"),
    }
    assert_eq!(ctx.get::<u32>("k"), None);
    // A compatible type still reads (structural typing outside a DAG).
    assert_eq!(ctx.get::<Vec<Box<str>>>("k"), Some(vec![Box::from("x")]));
    assert_eq!(ctx.try_get::<u8>("missing").unwrap(), None);
}

/// Runs one `Val(fresh)` task under `id` and returns what dagx got.
fn run_val(ctx: &Arc<Context>, id: &str, fresh: u64) -> u64 {
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let h = d.add(id, Val(fresh));
    current_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
    dag.get(h).unwrap()
}

#[test]
fn inside_a_dag_a_corrupt_value_is_recomputed_overwritten_and_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let path = store.value_path("task").unwrap();
    let ctx = Arc::new(Context::new(store));
    assert_eq!(run_val(&ctx, "task", 1), 1);
    flip_byte(&path, 20);

    let (_guard, cap) = capture();
    assert_eq!(
        run_val(&ctx, "task", 2),
        2,
        "the corrupt value is never returned"
    );
    let warns = cap.at(tracing::Level::WARN);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert_eq!(warns[0].field("key"), Some("task"));
    assert!(
        warns[0].field("error").unwrap().contains("corrupt"),
        "{warns:?}"
    );
    assert_eq!(ctx.try_get::<u64>("task").unwrap(), Some(2), "overwritten");
    assert_eq!(run_val(&ctx, "task", 3), 2, "and cached again");
}

#[test]
fn inside_a_dag_a_value_of_another_type_is_recomputed_even_if_it_decodes() {
    let ctx = Arc::new(Context::new(duraflow_rs::MemoryStore::new()));
    // u32 decodes as u64 structurally, but a task must never receive another type's value.
    ctx.save("task", &7u32).unwrap();
    let (_guard, cap) = capture();
    assert_eq!(run_val(&ctx, "task", 9), 9);
    let warns = cap.at(tracing::Level::WARN);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(
        warns[0].field("error").unwrap().contains("u32"),
        "{warns:?}"
    );
    assert_eq!(ctx.try_get::<u64>("task").unwrap(), Some(9));
    // Garbage bytes written by someone else are treated the same way.
    wait(ctx.db.write("task", b"not an envelope".to_vec())).unwrap();
    assert_eq!(run_val(&ctx, "task", 10), 10);
    assert_eq!(run_val(&ctx, "task", 11), 10);
}
