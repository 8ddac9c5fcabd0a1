//! What duraflow's spans look like: a small DAG run twice over one store, with a `fmt`
//! subscriber that prints every span as it closes (`FmtSpan::CLOSE`) with its busy and idle
//! time.
//!
//! ```sh
//! cargo run --example inspect_tracing            # human-readable
//! cargo run --example inspect_tracing -- --json  # one JSON object per line
//! ```
//!
//! The first run executes every task (`outcome="executed"`): each span is open for the
//! milliseconds its task works, which here is an async sleep, so it shows as `time.idle`
//! (`time.busy` is the time spent polling). The second run finds every output in the store
//! (`outcome="cached"`): microseconds. Each `duraflow.task` span is a child of its run's `duraflow.run` span, which
//! closes last with the run's `executed` / `cached` / `failed` counts.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use dagx::{task, DagRunner, Task, TaskHandle};
use duraflow_rs::{Context, DurableDag, MemoryStore};
use tracing_subscriber::fmt::format::FmtSpan;

/// Loads the input.
struct Load(u64);
#[task]
impl Load {
    async fn run(&self) -> u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.0
    }
}

/// Some work on the input (simulated by a short sleep).
struct Scale(u64);
#[task]
impl Scale {
    async fn run(&self, x: &u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(10 * self.0)).await;
        x * self.0
    }
}

/// Adds up three results.
struct Sum;
#[task]
impl Sum {
    async fn run(&self, a: &u64, b: &u64, c: &u64) -> u64 {
        a + b + c
    }
}

/// Builds load → 3 × scale → sum over `ctx`, runs it, and returns the sum.
async fn run_once(ctx: &Arc<Context>) -> Result<u64, Box<dyn std::error::Error>> {
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let input: TaskHandle<u64> = d.add("load", Load(7)).into();
    let scaled: Vec<TaskHandle<u64>> = (1..=3)
        .map(|k| d.add(&format!("scale/{k}"), Scale(k)).depends_on(input))
        .collect();
    let sum = d
        .add("sum", Sum)
        .depends_on((&scaled[0], &scaled[1], &scaled[2]));
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await?;
    Ok(dag.get(sum)?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let json = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--json") => true,
        Some(_) => {
            eprintln!("usage: inspect_tracing [--json]");
            std::process::exit(2);
        }
    };
    // INFO shows the spans (and any warning); TRACE would add a line per persisted output.
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_span_events(FmtSpan::CLOSE)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    // Headers go to stderr with --json, so stdout stays one JSON object per line.
    let say = |line: &str| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };

    let ctx = Arc::new(Context::new(MemoryStore::new()));
    say("== run 1: empty store, every task executes ==");
    let first = run_once(&ctx).await?;
    say("\n== run 2: same store, every task is cached ==");
    let second = run_once(&ctx).await?;
    say(&format!("\nsum: {first} (run 1), {second} (run 2)"));
    Ok(())
}
