//! Promise: store work never runs on the async executor's threads.

mod common;

use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use common::{current_thread_rt, Inc, Val};
use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, DuraflowError, MemoryStore, Storage};

/// A store that may block (the default) and records the thread of every call.
#[derive(Default)]
struct Recording {
    inner: MemoryStore,
    threads: Mutex<Vec<ThreadId>>,
}
impl Storage for Recording {
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        self.inner.read(key)
    }
    fn write(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError> {
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        self.inner.write(key, value)
    }
}

#[test]
fn blocking_stores_are_called_off_the_executor_thread() {
    let store = Arc::new(Recording::default());
    let ctx = Arc::new(Context {
        db: store.clone(),
        completed_count: Arc::default(),
    });
    // A current-thread runtime: the executor is this very thread.
    let executor = std::thread::current().id();
    for _round in 0..2 {
        let dag = DagRunner::new();
        let d = DurableDag::new(&dag, ctx.clone());
        let a = d.add("a", Val(1));
        let b = d.add("b", Inc).depends_on(&a);
        d.add("c", Val(3));
        current_thread_rt()
            .block_on(dag.run(|f| {
                tokio::spawn(f);
            }))
            .unwrap();
        assert_eq!(dag.get(b).unwrap(), 2);
    }
    let threads = store.threads.lock().unwrap();
    assert_eq!(
        threads.len(),
        3 * 2 + 3,
        "3 reads + 3 writes, then 3 cached reads"
    );
    assert!(
        threads.iter().all(|t| *t != executor),
        "a store call ran on the executor"
    );
}

#[test]
fn without_a_tokio_runtime_store_calls_still_leave_the_calling_thread() {
    let store = Arc::new(Recording::default());
    let ctx = Arc::new(Context {
        db: store.clone(),
        completed_count: Arc::default(),
    });
    let durable = duraflow_rs::Durable::new("x", ctx, Val(8), None);
    let value = futures::executor::block_on(durable.run_result(())).unwrap();
    assert_eq!(value, 8);
    let here = std::thread::current().id();
    let threads = store.threads.lock().unwrap();
    assert_eq!(threads.len(), 2);
    assert!(threads.iter().all(|t| *t != here));
}
