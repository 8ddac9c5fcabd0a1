//! Promise: reading a run's stored outputs ahead of its tasks changes no result. A run sees
//! the outputs stored when its first task starts (a `save` between `add` and `run` counts),
//! every key is read once per run, and outputs larger than the read-ahead budget still
//! arrive intact.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::{multi_thread_rt, Inc, Val};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, DuraflowError, MemoryStore, Storage};

/// A store that may block and asks for read-ahead, and counts reads per key.
#[derive(Default)]
struct Counting {
    inner: MemoryStore,
    reads: Mutex<HashMap<String, usize>>,
}
impl Storage for Counting {
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        *self
            .reads
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default() += 1;
        self.inner.read(key)
    }
    fn write(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError> {
        self.inner.write(key, value)
    }
    fn read_ahead(&self) -> bool {
        true
    }
}

fn context(store: &Arc<Counting>) -> Arc<Context> {
    Arc::new(Context {
        db: store.clone(),
        completed_count: Arc::default(),
    })
}

fn run(dag: &DagRunner) {
    multi_thread_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
}

#[test]
fn a_value_saved_after_add_and_before_run_is_the_one_returned() {
    let store = Arc::new(Counting::default());
    let ctx = context(&store);
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let a = d.add("a", Val(1));
    let b = d.add("b", Inc).depends_on(&a);
    ctx.save("a", &41u64).unwrap();
    run(&dag);
    assert_eq!(dag.get(a).unwrap(), 41, "the saved value, not a re-run");
    assert_eq!(dag.get(b).unwrap(), 42);
    assert_eq!((d.stats().cached, d.stats().executed), (1, 1));
}

#[test]
fn every_key_is_read_once_per_run_and_cached_values_match() {
    const N: u64 = 300;
    let store = Arc::new(Counting::default());
    let ctx = context(&store);
    for round in 1..=2usize {
        let dag = DagRunner::new();
        let d = DurableDag::new(&dag, ctx.clone());
        let roots: Vec<_> = (0..N).map(|i| d.add(&format!("v{i}"), Val(i))).collect();
        let incs: Vec<_> = roots
            .iter()
            .enumerate()
            .map(|(i, r)| d.add(&format!("inc{i}"), Inc).depends_on(r))
            .collect();
        run(&dag);
        for (i, inc) in incs.into_iter().enumerate() {
            assert_eq!(dag.get(inc).unwrap(), i as u64 + 1);
        }
        let reads = store.reads.lock().unwrap();
        assert_eq!(reads.len(), 2 * N as usize);
        assert!(
            reads.values().all(|&n| n == round),
            "round {round}: some key was read more or less than once per run"
        );
    }
}

/// A task returning `len` copies of the character `fill` (a string: msgpack stores it as
/// raw bytes, quick to encode even in a debug build).
struct Blob {
    len: usize,
    fill: u8,
}
#[task]
impl Blob {
    async fn run(&self) -> String {
        char::from(self.fill).to_string().repeat(self.len)
    }
}

#[test]
fn outputs_beyond_the_read_ahead_budget_arrive_intact() {
    // 48 outputs of 1 MiB: more than the 32 MiB the read-ahead holds at once.
    let store = Arc::new(Counting::default());
    let ctx = context(&store);
    for _round in 0..2 {
        let dag = DagRunner::new();
        let d = DurableDag::new(&dag, ctx.clone());
        let blobs: Vec<_> = (0..48u8)
            .map(|i| {
                d.add(
                    &format!("blob{i}"),
                    Blob {
                        len: 1 << 20,
                        fill: b'A' + i,
                    },
                )
            })
            .collect();
        run(&dag);
        for (i, blob) in blobs.into_iter().enumerate() {
            let text = dag.get(blob).unwrap();
            assert_eq!(text.len(), 1 << 20);
            assert!(text.bytes().all(|b| b == b'A' + i as u8));
        }
    }
    assert!(store.reads.lock().unwrap().values().all(|&n| n == 2));
}
