//! The main example: a resumable multi-stage pipeline.
//!
//! generate → 32 × transform (in parallel) → a tree of merges → report
//!
//! Every task's output is persisted under its id in a sled store (`./duraflow.db` by
//! default), flushed before its progress line is printed. Run it, interrupt it (Ctrl-C, or
//! `--crash-after N` to abort the process after N tasks), run it again: finished tasks are
//! not executed again, and the interrupted run is recorded as such.
//!
//! On a terminal the run shows a live progress bar; when stdout is not a terminal (piped,
//! redirected, CI) it prints one plain line per completed task instead. Both are fed by
//! `DurableDag::with_progress`, which needs no `tracing` subscriber (`ProgressLayer` is the
//! alternative for programs that have one: see the README's "Tracing and progress").
//!
//! ```sh
//! cargo run --example pipeline                     # first run: everything executes
//! cargo run --example pipeline                     # second run: everything is cached
//! cargo run --example pipeline -- --fresh --crash-after 20
//! cargo run --example pipeline                     # resumes: 20 cached, the rest executed
//! ```

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagx::{task, DagRunner, Task, TaskHandle};
use duraflow_rs::{Context, DurableDag, RunHistory, SledStore};
use serde::{Deserialize, Serialize};

const SHARDS: usize = 32;
const DOCS_PER_SHARD: usize = 200;

/// Word statistics of some documents.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Stats {
    docs: u64,
    words: u64,
    longest_word: String,
}

impl Stats {
    fn merge(&self, other: &Stats) -> Stats {
        let longest_word = if other.longest_word.len() > self.longest_word.len() {
            other.longest_word.clone()
        } else {
            self.longest_word.clone()
        };
        Stats {
            docs: self.docs + other.docs,
            words: self.words + other.words,
            longest_word,
        }
    }
}

/// Stage 1: produce the corpus (deterministic, so every run computes the same answer).
struct Generate;
#[task]
impl Generate {
    async fn run(&self) -> Vec<String> {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        (0..SHARDS * DOCS_PER_SHARD)
            .map(|_| {
                let words = 5 + next() % 40;
                (0..words)
                    .map(|_| {
                        let len = 1 + next() % 12;
                        (0..len)
                            .map(|_| char::from(b'a' + (next() % 26) as u8))
                            .collect::<String>()
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }
}

/// Stage 2: one shard of the corpus → its statistics. `work` simulates a slow step (an
/// API call, a model) so there is time to interrupt the run.
struct Transform {
    shard: usize,
    work: Duration,
}
#[task]
impl Transform {
    // dagx's #[task] hands a dependency's output over as `&Output`, here `&Vec<String>`.
    #[allow(clippy::ptr_arg)]
    async fn run(&self, corpus: &Vec<String>) -> Stats {
        tokio::time::sleep(self.work).await;
        let docs = &corpus[self.shard * DOCS_PER_SHARD..(self.shard + 1) * DOCS_PER_SHARD];
        docs.iter().fold(Stats::default(), |acc, doc| {
            let longest = doc.split(' ').max_by_key(|w| w.len()).unwrap_or("");
            acc.merge(&Stats {
                docs: 1,
                words: doc.split(' ').count() as u64,
                longest_word: longest.to_owned(),
            })
        })
    }
}

/// Stage 3: merge two partial results.
struct Merge;
#[task]
impl Merge {
    async fn run(&self, a: &Stats, b: &Stats) -> Stats {
        a.merge(b)
    }
}

/// Stage 4: the report.
struct Report;
#[task]
impl Report {
    async fn run(&self, stats: &Stats) -> String {
        format!(
            "{} documents, {} words, longest word {:?}",
            stats.docs, stats.words, stats.longest_word
        )
    }
}

/// How progress is shown: a live bar on a terminal, plain lines otherwise.
#[derive(Clone)]
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { total: usize },
}

impl Progress {
    fn new(total: usize) -> Progress {
        if !std::io::stdout().is_terminal() {
            return Progress::Lines { total };
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total as u64),
            indicatif::ProgressDrawTarget::stdout(),
        );
        let style = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40.cyan/blue}] {pos:>3}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        Progress::Bar(bar)
    }

    /// Task `id` completed (executed or cached); `completed` tasks of this run have.
    fn task_done(&self, id: &str, completed: usize) {
        match self {
            // Calls can arrive out of order from two workers: the bar counts them itself.
            Progress::Bar(bar) => {
                bar.inc(1);
                bar.set_message(id.to_owned());
            }
            Progress::Lines { total } => println!("[{completed:>3}/{total}] {id}"),
        }
    }

    /// Prints a line without tearing the bar.
    fn line(&self, text: &str) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Lines { .. } => println!("{text}"),
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_with_message("done");
        }
    }
}

struct Args {
    store: String,
    fresh: bool,
    crash_after: Option<usize>,
    work: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        store: "duraflow.db".to_owned(),
        fresh: false,
        crash_after: None,
        work: Duration::from_millis(50),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--store" => args.store = value("--store")?,
            "--fresh" => args.fresh = true,
            "--crash-after" => {
                let n = value("--crash-after")?;
                args.crash_after = Some(n.parse().map_err(|_| format!("bad number {n:?}"))?);
            }
            "--work-ms" => {
                let n = value("--work-ms")?;
                args.work =
                    Duration::from_millis(n.parse().map_err(|_| format!("bad number {n:?}"))?);
            }
            "-h" | "--help" => {
                return Err(
                    "usage: pipeline [--store PATH] [--fresh] [--crash-after N] [--work-ms MS]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if args.fresh {
        let _ = std::fs::remove_dir_all(&args.store);
    }
    let store = Arc::new(SledStore::open(&args.store)?);
    let ctx = Arc::new(Context {
        db: store.clone(),
        completed_count: Default::default(),
    });

    let dag = DagRunner::new();
    let total = 1 + SHARDS + (SHARDS - 1) + 1;
    let crash_after = args.crash_after;
    let progress = Progress::new(total);
    let report = progress.clone();
    let d = DurableDag::new(&dag, ctx.clone()).with_progress(move |id, completed| {
        report.task_done(id, completed);
        if crash_after == Some(completed) {
            report.line(&format!(
                "--crash-after {completed}: aborting the process now"
            ));
            std::process::abort();
        }
    });

    let corpus = d.add("generate", Generate);
    let corpus: TaskHandle<Vec<String>> = corpus.into();
    let mut level: Vec<TaskHandle<Stats>> = (0..SHARDS)
        .map(|shard| {
            d.add(
                &format!("transform/{shard:02}"),
                Transform {
                    shard,
                    work: args.work,
                },
            )
            .depends_on(corpus)
        })
        .collect();
    let mut depth = 0;
    while level.len() > 1 {
        depth += 1;
        level = level
            .chunks(2)
            .enumerate()
            .map(|(i, pair)| match pair {
                [a, b] => d
                    .add(&format!("merge/{depth}/{i:02}"), Merge)
                    .depends_on((a, b)),
                [a] => *a,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    let report = d.add("report", Report).depends_on(level[0]);

    let started = Instant::now();
    dag.run(|f| {
        tokio::spawn(f);
    })
    .await?;
    progress.finish();
    let stats = d.stats();
    println!(
        "\nrun finished in {:.2?}: {} executed, {} cached, {} failed (store: {})",
        started.elapsed(),
        stats.executed,
        stats.cached,
        stats.failed,
        args.store
    );
    if let Ok(summary) = dag.get(report) {
        println!("result: {summary}");
    }
    drop(d);
    println!("\nruns recorded in {}:", args.store);
    for run in store.runs().await? {
        println!(
            "  run {:>3}  {:<12} {:>3} executed {:>3} cached {:>3} failed  {} ms",
            run.id,
            format!("{:?}", run.status),
            run.executed,
            run.cached,
            run.failed,
            run.finished_ms.unwrap_or(run.started_ms) - run.started_ms
        );
    }
    Ok(())
}
