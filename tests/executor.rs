//! Promise: the built-in stores' file and sled work never runs on the async executor's
//! threads, and neither does a custom store's blocking work wrapped in `unblock`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use common::{current_thread_rt, Inc, Val};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{
    unblock, Context, DurableDag, DuraflowError, FileStore, SledStore, Storage, StoreFuture,
};

/// A blocking store in the way the docs advise: its work inside `unblock`. It records the
/// thread of every call.
#[derive(Default)]
struct Recording {
    map: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    threads: Arc<Mutex<Vec<ThreadId>>>,
}

impl Storage for Recording {
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        let (map, threads, key) = (self.map.clone(), self.threads.clone(), key.to_owned());
        unblock(move || {
            threads.lock().unwrap().push(std::thread::current().id());
            Ok(map.lock().unwrap().get(&key).cloned())
        })
    }
    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        let (map, threads, key) = (self.map.clone(), self.threads.clone(), key.to_owned());
        unblock(move || {
            threads.lock().unwrap().push(std::thread::current().id());
            map.lock().unwrap().insert(key, value);
            Ok::<(), DuraflowError>(())
        })
    }
}

#[test]
fn unblocked_store_work_runs_off_the_executor_thread() {
    let store = Arc::new(Recording::default());
    let ctx = Arc::new(Context::new(store.clone()));
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
    let ctx = Arc::new(Context::new(store.clone()));
    let durable = duraflow_rs::Durable::new("x", ctx, Val(8), None);
    let value = futures::executor::block_on(durable.run_result(())).unwrap();
    assert_eq!(value, 8);
    let here = std::thread::current().id();
    let threads = store.threads.lock().unwrap();
    assert_eq!(threads.len(), 2);
    assert!(threads.iter().all(|t| *t != here));
}

/// A task whose output is 64 KiB.
#[derive(Clone)]
struct Big(u8);
#[task]
impl Big {
    async fn run(&self) -> Vec<u8> {
        vec![self.0; 64 * 1024]
    }
}

/// Bytes this thread has written and read through system calls, from Linux's per-thread
/// I/O accounting.
fn thread_io() -> (u64, u64) {
    let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .expect("an I/O counter")
    };
    (field("wchar:"), field("rchar:"))
}

/// Runs 32 tasks of 64 KiB outputs over `ctx` twice (executed, then cached) on a
/// current-thread runtime, and returns the bytes this (the executor's) thread wrote and read
/// meanwhile.
fn executor_io(ctx: Arc<Context>) -> (u64, u64) {
    let rt = current_thread_rt();
    let (w0, r0) = thread_io();
    for _round in 0..2 {
        let dag = DagRunner::new();
        let d = DurableDag::new(&dag, ctx.clone());
        let mut handles: Vec<_> = (0..32)
            .map(|i| d.add(&format!("big/{i}"), Big(i)))
            .collect();
        rt.block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
        assert_eq!(dag.get(handles.swap_remove(5)).unwrap()[0], 5);
    }
    let (w1, r1) = thread_io();
    (w1 - w0, r1 - r0)
}

#[test]
fn file_and_sled_stores_write_and_read_on_other_threads() {
    // 2 MiB is written once and read once by each store; the executor's own I/O stays far
    // below that.
    const LIMIT: u64 = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let file = Context::new(FileStore::new(dir.path().join("files")).unwrap());
    let (written, read) = executor_io(Arc::new(file));
    assert!(
        written < LIMIT && read < LIMIT,
        "FileStore: executor wrote {written} B, read {read} B"
    );
    let sled = Context::new(SledStore::open(dir.path().join("sled")).unwrap());
    let (written, read) = executor_io(Arc::new(sled));
    assert!(
        written < LIMIT && read < LIMIT,
        "SledStore: executor wrote {written} B, read {read} B"
    );
}
