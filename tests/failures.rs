//! Promises: a panicking task persists nothing and its panic reaches dagx unchanged; a
//! persist failure is `Persist` from `run_result`, an error from dagx's run, and a
//! `tracing::error!` on the plain `Task::run` path; duplicate ids are refused by name.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{capture, current_thread_rt, multi_thread_rt, Boom, Val};
use dagx::{DagError, DagRunner, Task};
use duraflow_rs::{Context, Durable, DurableDag, DuraflowError, MemoryStore, Storage, StoreFuture};

#[test]
fn a_lone_panicking_task_fails_the_run_exactly_as_without_the_wrapper() {
    let raw = DagRunner::new();
    raw.add_task(Boom);
    let raw_err = current_thread_rt().block_on(raw.run(|f| {
        tokio::spawn(f);
    }));

    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    d.add("boom", Boom);
    let (_guard, cap) = capture();
    let err = current_thread_rt().block_on(dag.run(|f| {
        tokio::spawn(f);
    }));

    match (&raw_err, &err) {
        (
            Err(DagError::TaskPanicked {
                panic_message: a, ..
            }),
            Err(DagError::TaskPanicked {
                panic_message: b, ..
            }),
        ) => assert_eq!((a.as_str(), b.as_str()), ("boom", "boom")),
        other => panic!("expected TaskPanicked twice, got {other:?}"),
    }
    assert_eq!(
        ctx.try_get::<u64>("boom").unwrap(),
        None,
        "nothing persisted"
    );
    assert_eq!(d.stats().failed, 1);
    let errors = cap.at(tracing::Level::ERROR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field("key"), Some("boom"));
    assert_eq!(errors[0].field("panic"), Some("boom"));
}

#[test]
fn a_panicking_task_among_many_leaves_the_others_persisted() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let dag = DagRunner::new();
    let progress = Arc::new(AtomicUsize::new(0));
    let p = progress.clone();
    let d = DurableDag::new(&dag, ctx.clone()).with_progress(move |_, _| {
        p.fetch_add(1, Ordering::SeqCst);
    });
    d.add("boom", Boom);
    for i in 0..8 {
        d.add(&format!("ok-{i}"), Val(i));
    }
    // dagx loses panics of spawned tasks no one depends on: the run itself is Ok, as it is
    // without the wrapper. The wrapper still records the failure.
    multi_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
    assert_eq!(ctx.try_get::<u64>("boom").unwrap(), None);
    for i in 0..8 {
        assert_eq!(ctx.try_get::<u64>(&format!("ok-{i}")).unwrap(), Some(i));
    }
    let stats = d.stats();
    assert_eq!((stats.executed, stats.failed), (8, 1));
    assert_eq!(
        progress.load(Ordering::SeqCst),
        8,
        "no progress for the panicked task"
    );
}

/// A store whose writes always fail, as a full disk would.
struct FullDisk;
impl Storage for FullDisk {
    fn read<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async { Ok(None) })
    }
    fn write<'a>(&'a self, key: &'a str, _value: Vec<u8>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            Err(DuraflowError::Io {
                path: format!("/full/{key}").into(),
                source: std::io::Error::other("No space left on device"),
            })
        })
    }
}

#[test]
fn persist_failure_is_a_typed_error_from_run_result() {
    let ctx = Arc::new(Context::new(FullDisk));
    let durable = Durable::new("k", ctx.clone(), Val(1), None);
    match current_thread_rt().block_on(durable.run_result(())) {
        Err(DuraflowError::Persist { key, source }) => {
            assert_eq!(key, "k");
            assert!(source.to_string().contains("/full/k"), "{source}");
        }
        other => panic!("expected Persist, got {other:?}"),
    }
    assert_eq!(ctx.completed_count.load(Ordering::SeqCst), 0);
}

#[test]
fn persist_failure_on_the_plain_run_path_is_logged_and_the_value_returned() {
    let ctx = Arc::new(Context::new(FullDisk));
    let durable = Durable::new("k", ctx.clone(), Val(5), None);
    let (_guard, cap) = capture();
    let value = current_thread_rt().block_on(Task::run(durable, ()));
    assert_eq!(value, 5);
    let errors = cap.at(tracing::Level::ERROR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field("key"), Some("k"));
    assert!(errors[0].field("error").unwrap().contains("No space left"));
}

#[test]
fn persist_failure_inside_a_dag_fails_the_run_and_reports_no_progress() {
    let ctx = Arc::new(Context::new(FullDisk));
    let dag = DagRunner::new();
    let progress = Arc::new(AtomicUsize::new(0));
    let p = progress.clone();
    let d = DurableDag::new(&dag, ctx.clone()).with_progress(move |_, _| {
        p.fetch_add(1, Ordering::SeqCst);
    });
    d.add("k", Val(1));
    let (_guard, cap) = capture();
    let result = current_thread_rt().block_on(dag.run(|f| {
        tokio::spawn(f);
    }));
    assert!(
        matches!(result, Err(DagError::InvalidDependency { .. })),
        "{result:?}"
    );
    assert_eq!(progress.load(Ordering::SeqCst), 0);
    assert_eq!(d.stats().failed, 1);
    assert_eq!(cap.at(tracing::Level::ERROR).len(), 1);
}

#[test]
fn duplicate_and_invalid_ids_are_refused_by_name() {
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx);
    d.add("same-id", Val(1));
    match d.try_add("same-id", Val(2)) {
        Err(DuraflowError::DuplicateTaskId { id }) => assert_eq!(id, "same-id"),
        other => panic!("expected DuplicateTaskId, got {:?}", other.err()),
    }
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        d.add("same-id", Val(3));
    }))
    .expect_err("add panics on a duplicate id");
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("\"same-id\""), "{message}");
    assert!(matches!(
        d.try_add("", Val(1)),
        Err(DuraflowError::InvalidKey { .. })
    ));
    // Refusals do not poison the DurableDag: other ids can still be added.
    assert!(d.try_add("other", Val(1)).is_ok());
}
