//! What `PgStore` costs, on the server `DURAFLOW_PG_URL` names (skipped without it):
//!
//! - `durable_dag_1`: a wide DAG of 2,000 independent trivial tasks over a fresh `PgStore`
//!   schema, one worker: every task takes its key's lease, executes, and commits its output
//!   with its attempt record (commits of concurrent tasks are grouped into one transaction);
//! - `durable_dag_2`: the same DAG run by two workers at once (two `PgStore` connections to
//!   one fresh schema, each with its own `DagRunner`), until both runs are done: each task
//!   executes once, in one of them, and the other finds its output;
//! - against `serial_insert_commit`: 2,000 × (`BEGIN`, `INSERT` of a value of the same size,
//!   `COMMIT`) through tokio-postgres on one connection to the same server, one after the
//!   other: what a store without group commit would pay;
//! - `chain_1ms_pg` against `chain_1ms_raw`: a chain of 200 tasks that each take 1 ms (a tokio
//!   sleep), over `PgStore` and in raw dagx: the per-task overhead of a lease, a commit and a
//!   cache check on a task that does real work is (pg - raw) / 200.
//!
//! Guard: `durable_dag_1` and `durable_dag_2` <= 0.2 × `serial_insert_commit`.
//!
//! Each figure is the median of [`ROUNDS`] rounds; in each round the variants run back to
//! back, so a burst of load lands on all of them. Not timed: creating and dropping schemas
//! and tables, and making the task ids.
//!
//! ```sh
//! DURAFLOW_PG_URL=postgres://… cargo bench --features postgres --bench postgres
//! ```

// Criterion's helpers are for the other benches: this one prints its own medians.
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dagx::{task, DagRunner, Task, TaskHandle};
use duraflow_rs::{Context, DurableDag, PgConfig, PgStore, RunStats};
use tokio::runtime::Runtime;

use support::Val;

/// Tasks in the wide DAG.
const N: usize = 2_000;
/// Links of the 1 ms chain.
const CHAIN: usize = 200;
const ROUNDS: usize = 5;

/// Sleeps 1 ms, then returns its input plus one.
struct Step;

#[task]
impl Step {
    async fn run(&self, x: &u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        x + 1
    }
}

/// The first link of the chain.
struct First;

#[task]
impl First {
    async fn run(&self) -> u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        0
    }
}

async fn connect(url: &str, schema: &str) -> PgStore {
    PgStore::connect_with(url, PgConfig::default().schema(schema))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// A fresh schema name (dropped again by [`drop_schema`]).
fn schema(what: &str, round: usize) -> String {
    format!("bench_{what}_{}_{round}", std::process::id())
}

async fn drop_schema(client: &tokio_postgres::Client, schema: &str) {
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("drop the bench schema");
}

/// One wide-DAG run over `ctx`; returns its stats.
async fn wide(ctx: Arc<Context>, ids: &[String]) -> RunStats {
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx);
    for (i, id) in ids.iter().enumerate() {
        d.add(id, Val(i as u64));
    }
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await
    .expect("the wide run");
    d.stats()
}

/// `workers` workers run the wide DAG over one fresh schema; the time until all are done.
async fn durable_dag(url: &str, workers: usize, round: usize, ids: &[String]) -> Duration {
    let name = schema(&format!("dag{workers}"), round);
    let mut contexts = Vec::new();
    for _ in 0..workers {
        contexts.push(Arc::new(Context::new(connect(url, &name).await)));
    }
    let start = Instant::now();
    let runs = contexts.iter().map(|ctx| wide(Arc::clone(ctx), ids));
    let stats = futures::future::join_all(runs).await;
    let took = start.elapsed();
    let executed: usize = stats.iter().map(|s| s.executed).sum();
    assert_eq!(executed, N, "each task executed once across the workers");
    took
}

/// 2,000 serial BEGIN + INSERT + COMMIT.
async fn serial_insert_commit(client: &mut tokio_postgres::Client, round: usize) -> Duration {
    let table = schema("serial", round);
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (key text PRIMARY KEY, value bytea NOT NULL)"
        ))
        .await
        .expect("create the serial table");
    let insert = client
        .prepare(&format!("INSERT INTO {table} (key, value) VALUES ($1, $2)"))
        .await
        .expect("prepare");
    // About the size of a stored u64 in its envelope.
    let value = vec![7u8; 40];
    let start = Instant::now();
    for i in 0..N {
        let tx = client.transaction().await.expect("begin");
        tx.execute(&insert, &[&format!("task-{i}"), &value])
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
    }
    let took = start.elapsed();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop the serial table");
    took
}

/// The 1 ms chain, in raw dagx or over `ctx`.
async fn chain(ctx: Option<Arc<Context>>) -> Duration {
    let dag = DagRunner::new();
    let start = Instant::now();
    let last = match &ctx {
        None => {
            let mut prev: TaskHandle<u64> = dag.add_task(First).into();
            for _ in 1..CHAIN {
                prev = dag.add_task(Step).depends_on(prev);
            }
            prev
        }
        Some(ctx) => {
            let d = DurableDag::new(&dag, Arc::clone(ctx));
            let mut prev: TaskHandle<u64> = d.add("link-0", First).into();
            for i in 1..CHAIN {
                prev = d.add(&format!("link-{i}"), Step).depends_on(prev);
            }
            prev
        }
    };
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await
    .expect("the chain");
    assert_eq!(dag.get(last).expect("the chain's end"), CHAIN as u64 - 1);
    start.elapsed()
}

fn main() {
    let Ok(url) = std::env::var("DURAFLOW_PG_URL") else {
        println!("postgres bench: DURAFLOW_PG_URL is not set; skipped");
        return;
    };
    let rt: Runtime = support::runtime();
    let ids: Vec<String> = (0..N).map(|i| format!("task-{i}")).collect();
    let (mut client, connection) = rt
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .expect("connect with tokio-postgres");
    rt.spawn(connection);
    let mut times: [Vec<Duration>; 5] = Default::default();
    for round in 0..ROUNDS {
        rt.block_on(async {
            times[0].push(serial_insert_commit(&mut client, round).await);
            times[1].push(durable_dag(&url, 1, round, &ids).await);
            times[2].push(durable_dag(&url, 2, round, &ids).await);
            times[3].push(chain(None).await);
            let name = schema("chain", round);
            let ctx = Arc::new(Context::new(connect(&url, &name).await));
            times[4].push(chain(Some(ctx)).await);
            for what in ["dag1", "dag2", "chain"] {
                drop_schema(&client, &schema(what, round)).await;
            }
        });
    }
    let [serial, dag1, dag2, raw, pg] = times.each_mut().map(|t| support::median_ms(t));
    println!("\n== postgres: medians of {ROUNDS} rounds ==");
    println!("{:<24} {serial:>10.1} ms", "serial_insert_commit");
    println!("{:<24} {dag1:>10.1} ms", "durable_dag_1");
    println!("{:<24} {dag2:>10.1} ms", "durable_dag_2");
    println!("{:<24} {raw:>10.1} ms", "chain_1ms_raw");
    println!("{:<24} {pg:>10.1} ms", "chain_1ms_pg");
    for (name, t) in [("durable_dag_1", dag1), ("durable_dag_2", dag2)] {
        let ratio = t / serial;
        let verdict = if ratio <= 0.2 { "MET" } else { "MISSED" };
        println!(
            "{:<42} {ratio:>7.3}x  target <= 0.20: {verdict}",
            format!("{name} / serial_insert_commit")
        );
    }
    println!(
        "per-task overhead on 1 ms tasks: {:.3} ms",
        (pg - raw) / CHAIN as f64
    );
}
