//! Promise: where processes share a store (`RunLog::lease`), a task runs only in the process
//! that holds its key's lease. A task whose output another process stored while this one
//! waited is not run here: its stored output is its output, unless it cannot use it (a keyed
//! task's output made from other inputs): it then asks again, naming the lease that output
//! was stored under, and runs. A task that ends without a committed output gives its lease
//! up; a committed one's commit ended it, and it is not given up again. A store that cannot
//! take the lease fails the task without running it.
//!
//! The store here is a `MemoryStore` with a run log whose `lease` plays the other process:
//! for the keys it is told to, it stores an output itself, as another worker would have
//! while this one waited, and answers `Lease::Stored { done: 1 }`; asked again with
//! `seen: Some(1)` (the caller could not use that output), it answers `Held`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dagx::{task, DagRunner, Task, TaskHandle};
use duraflow_rs::{
    AttemptRecord, Context, DurableDag, DuraflowError, Lease, MemoryStore, RunId, RunLog,
    RunRecord, Storage, StoreFuture, Value,
};

/// A `MemoryStore` with a run log that leases keys as a shared store would.
#[derive(Default)]
struct Shared {
    values: MemoryStore,
    /// Keys whose output "another process" stores while this one waits for the lease.
    stored_elsewhere: HashSet<String>,
    /// Keys whose lease cannot be taken (the store fails).
    failing: HashSet<String>,
    leased: Mutex<Vec<String>>,
    /// The `seen` of every `lease` call, by key.
    seen: Mutex<Vec<(String, Option<u64>)>>,
    released: Mutex<Vec<String>>,
    committed: Mutex<Vec<String>>,
}

impl Storage for Shared {
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        self.values.read(key)
    }
    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        self.values.write(key, value)
    }
    fn kind(&self) -> &'static str {
        "shared"
    }
    fn run_log(&self) -> Option<&dyn RunLog> {
        Some(self)
    }
}

impl RunLog for Shared {
    fn begin_run(&self, _started_ms: u64) -> Result<RunId, DuraflowError> {
        Ok(1)
    }
    fn record(&self, _attempt: AttemptRecord) -> Result<(), DuraflowError> {
        Ok(())
    }
    fn commit<'a>(
        &'a self,
        key: &'a str,
        value: Value,
        _attempt: AttemptRecord,
    ) -> StoreFuture<'a, ()> {
        self.committed.lock().unwrap().push(key.to_owned());
        self.values.write_value(key, value)
    }
    fn finish_run(&self, _run: RunRecord) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn lease<'a>(&'a self, key: &'a str, seen: Option<u64>) -> StoreFuture<'a, Lease> {
        self.leased.lock().unwrap().push(key.to_owned());
        self.seen.lock().unwrap().push((key.to_owned(), seen));
        Box::pin(async move {
            if self.failing.contains(key) {
                return Err(DuraflowError::Unsupported {
                    store: "shared",
                    operation: "lease",
                });
            }
            if !self.stored_elsewhere.contains(key) || seen == Some(1) {
                return Ok(Lease::Held);
            }
            // The other process's output, as it would have stored it.
            let theirs = Context::new(MemoryStore::new());
            theirs.save(key, &1000u64).expect("encode");
            let bytes = theirs.db.read(key).await?.expect("just saved");
            self.values.write(key, bytes).await?;
            Ok(Lease::Stored { done: 1 })
        })
    }
    fn release(&self, key: &str) {
        self.released.lock().unwrap().push(key.to_owned());
    }
}

/// A keyed task that counts its runs.
#[derive(Clone, serde::Serialize)]
struct KeyedCount {
    value: u64,
    #[serde(skip)]
    runs: Arc<AtomicUsize>,
}

#[task]
impl KeyedCount {
    async fn run(&self) -> u64 {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.value
    }
}

/// A task that counts its runs.
#[derive(Clone)]
struct Count(u64, Arc<AtomicUsize>);

#[task]
impl Count {
    async fn run(&self) -> u64 {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0
    }
}

#[derive(Clone)]
struct Boom;

#[task]
impl Boom {
    async fn run(&self) -> u64 {
        panic!("boom")
    }
}

fn sorted(list: &Mutex<Vec<String>>) -> Vec<String> {
    let mut list = list.lock().unwrap().clone();
    list.sort();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_another_process_stored_while_this_one_waited_is_not_run_here() {
    let store = Arc::new(Shared {
        stored_elsewhere: ["theirs".to_owned()].into(),
        ..Shared::default()
    });
    let ctx = Arc::new(Context::new(Arc::clone(&store)));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, Arc::clone(&ctx));
    let runs = Arc::new(AtomicUsize::new(0));
    let theirs = d.add("theirs", Count(1, Arc::clone(&runs)));
    let ours = d.add("ours", Count(2, Arc::clone(&runs)));
    let (theirs, ours): (TaskHandle<u64>, TaskHandle<u64>) = (theirs.into(), ours.into());
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await
    .unwrap();
    // Only "ours" ran here; "theirs" is the other process's output.
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(dag.get(theirs).unwrap(), 1000);
    assert_eq!(dag.get(ours).unwrap(), 2);
    let stats = d.stats();
    assert_eq!((stats.executed, stats.cached, stats.failed), (1, 1, 0));
    assert_eq!(sorted(&store.leased), ["ours", "theirs"]);
    assert_eq!(sorted(&store.committed), ["ours"]);
    // A second run finds both outputs: nothing is leased again.
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, Arc::clone(&ctx));
    d.add("theirs", Count(1, Arc::clone(&runs)));
    d.add("ours", Count(2, Arc::clone(&runs)));
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await
    .unwrap();
    assert_eq!(d.stats().cached, 2);
    assert_eq!(sorted(&store.leased), ["ours", "theirs"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_without_a_committed_output_gives_its_lease_up() {
    let store = Arc::new(Shared::default());
    let ctx = Arc::new(Context::new(Arc::clone(&store)));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, Arc::clone(&ctx));
    d.add("fine", Count(3, Arc::default()));
    d.add("boom", Boom);
    let _ = dag
        .run(|f| {
            tokio::spawn(f);
        })
        .await;
    assert_eq!(sorted(&store.leased), ["boom", "fine"]);
    assert_eq!(sorted(&store.committed), ["fine"]);
    // The failed task's lease is given up; the committed one's commit ended it.
    assert_eq!(sorted(&store.released), ["boom"]);
    assert_eq!(ctx.get::<u64>("boom"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_the_store_cannot_take_fails_the_task_without_running_it() {
    let store = Arc::new(Shared {
        failing: ["refused".to_owned()].into(),
        ..Shared::default()
    });
    let ctx = Arc::new(Context::new(Arc::clone(&store)));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, Arc::clone(&ctx));
    let runs = Arc::new(AtomicUsize::new(0));
    let refused = d.add("refused", Count(4, Arc::clone(&runs)));
    let durable: TaskHandle<u64> = refused.into();
    let _ = dag
        .run(|f| {
            tokio::spawn(f);
        })
        .await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!(dag.get(durable).is_err());
    assert_eq!(d.stats().failed, 1);
    assert!(store.committed.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_stored_elsewhere_that_a_keyed_task_cannot_use_is_run_here_under_that_lease() {
    let store = Arc::new(Shared {
        stored_elsewhere: ["stale".to_owned()].into(),
        ..Shared::default()
    });
    let ctx = Arc::new(Context::new(Arc::clone(&store)));
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, Arc::clone(&ctx));
    let runs = Arc::new(AtomicUsize::new(0));
    let task = KeyedCount {
        value: 7,
        runs: Arc::clone(&runs),
    };
    let stale: TaskHandle<u64> = d.add_keyed("stale", task).into();
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await
    .unwrap();
    // The other process's output has no fingerprint: the task asks again, naming the lease
    // it was answered with, and runs here.
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(dag.get(stale).unwrap(), 7);
    let seen = store.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [("stale".to_owned(), None), ("stale".to_owned(), Some(1))]
    );
    assert_eq!(sorted(&store.committed), ["stale"]);
}
