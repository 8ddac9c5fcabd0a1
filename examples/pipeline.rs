//! The main example: a resumable multi-stage pipeline.
//!
//! generate → 32 × transform (in parallel) → a tree of merges → report
//!
//! Every task's output is persisted under its id in a sled store (`./duraflow.db` by
//! default), flushed before its progress line is printed. Run it, interrupt it (Ctrl-C, or
//! `--crash-after N` to abort the process after N tasks), run it again: finished tasks are
//! not executed again, and the interrupted run is recorded as such.
//!
//! The tasks are added with `DurableDag::add_keyed`: a stored output is reused only while
//! the task's parameters (its serialised fields) and the outputs it consumes are the ones
//! it was made from. `--min-len SHARD=N` changes one parameter of one shard (it then counts
//! only words of N letters or more): only that shard's branch (its transform, the merges
//! above it and the report) runs again, everything else stays cached. Before running, the
//! example asks `DurableDag::explain` what will run: one line of counts, or with
//! `--min-len` or `--explain` one line per task with its reason. After the run it lists
//! what executed and why, from the run's attempt records. The store keeps one output per
//! task, so the next run without the flag makes that branch again, back at the default.
//!
//! On a terminal the run shows a live progress bar; when stdout is not a terminal (piped,
//! redirected, CI) it prints one plain line per completed task instead. Both are fed by
//! `DurableDag::with_progress`, which needs no `tracing` subscriber (`ProgressLayer` is the
//! alternative for programs that have one: see the README's "Tracing and progress").
//!
//! ```sh
//! cargo run --example pipeline                     # first run: everything executes
//! cargo run --example pipeline                     # second run: everything is cached
//! cargo run --example pipeline -- --min-len 5=4    # shard 5's branch runs: 7 executed
//! cargo run --example pipeline -- --fresh --crash-after 20
//! cargo run --example pipeline                     # resumes: 20 or more cached, the rest run
//! ```

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagx::{task, DagRunner, Task, TaskHandle};
use duraflow_rs::{AttemptOutcome, Context, DurableDag, Explanation, RunHistory, SledStore};
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
/// Keyed tasks are `Serialize`: their fields are their parameters (this one has none).
#[derive(Serialize)]
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

/// Stage 2: one shard of the corpus → its statistics of the words of `min_len` letters or
/// more (1 by default: every word). `shard` and `min_len` are parameters; `work` simulates
/// a slow step (an API call, a model) so there is time to interrupt the run, and is
/// skipped: it does not change the output, so `--work-ms` leaves the outputs cached.
#[derive(Serialize)]
struct Transform {
    shard: usize,
    min_len: usize,
    #[serde(skip)]
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
            let words = || doc.split(' ').filter(|w| w.len() >= self.min_len);
            let longest = words().max_by_key(|w| w.len()).unwrap_or("");
            acc.merge(&Stats {
                docs: 1,
                words: words().count() as u64,
                longest_word: longest.to_owned(),
            })
        })
    }
}

/// Stage 3: merge two partial results.
#[derive(Serialize)]
struct Merge;
#[task]
impl Merge {
    async fn run(&self, a: &Stats, b: &Stats) -> Stats {
        a.merge(b)
    }
}

/// Stage 4: the report.
#[derive(Serialize)]
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
    /// `--min-len SHARD=N`: shard SHARD counts only words of N letters or more.
    min_len: Option<(usize, usize)>,
    explain: bool,
}

const USAGE: &str = "\
usage: pipeline [--store PATH] [--fresh] [--crash-after N] [--work-ms MS]
                [--min-len SHARD=N] [--explain]

  --store PATH        the sled store (default duraflow.db)
  --fresh             delete the store first
  --crash-after N     abort the process once N tasks have completed
  --work-ms MS        how long each transform pretends to work (default 50)
  --min-len SHARD=N   shard SHARD (0-31) counts only words of N letters or more (default 1
                      for every shard): one parameter of one task changes, so only that
                      shard's branch runs again; prints the plan in full
  --explain           print the plan one line per task: will run or cached, and why";

/// Parses `SHARD=N` for `--min-len`.
fn parse_min_len(value: &str) -> Result<(usize, usize), String> {
    let bad = || {
        format!(
            "--min-len wants SHARD=N (SHARD 0-{}, N ≥ 1), not {value:?}",
            SHARDS - 1
        )
    };
    let (shard, n) = value.split_once('=').ok_or_else(bad)?;
    let shard: usize = shard.parse().map_err(|_| bad())?;
    let n: usize = n.parse().map_err(|_| bad())?;
    if shard >= SHARDS || n == 0 {
        return Err(bad());
    }
    Ok((shard, n))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        store: "duraflow.db".to_owned(),
        fresh: false,
        crash_after: None,
        work: Duration::from_millis(50),
        min_len: None,
        explain: false,
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
            "--min-len" => args.min_len = Some(parse_min_len(&value("--min-len")?)?),
            "--explain" => args.explain = true,
            "-h" | "--help" => return Err(USAGE.into()),
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

    // Keyed: each output is reused only while the task's parameters and its inputs match.
    let corpus = d.add_keyed("generate", Generate);
    let corpus: TaskHandle<Vec<String>> = corpus.into();
    let mut level: Vec<TaskHandle<Stats>> = (0..SHARDS)
        .map(|shard| {
            let min_len = match args.min_len {
                Some((changed, n)) if changed == shard => n,
                _ => 1,
            };
            d.add_keyed(
                &format!("transform/{shard:02}"),
                Transform {
                    shard,
                    min_len,
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
                    .add_keyed(&format!("merge/{depth}/{i:02}"), Merge)
                    .depends_on((a, b)),
                [a] => *a,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    let report = d.add_keyed("report", Report).depends_on(level[0]);

    // What will run and why, before running anything.
    let plan = d.explain().await?;
    print_plan(&progress, &plan, args.explain || args.min_len.is_some());

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
    drop(d); // closes the run's record
    let runs = store.runs().await?; // oldest first: this run is the last
    if let Some(this_run) = runs.last() {
        if let Some(details) = store.run(this_run.id).await? {
            print_executed(&plan, &details.attempts);
        }
    }
    if let Ok(summary) = dag.get(report) {
        println!("result: {summary}");
    }
    println!("\nruns recorded in {}:", args.store);
    for run in runs {
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

/// The plan `explain` made: a line of counts, or (`full`) one line per task.
fn print_plan(progress: &Progress, plan: &[Explanation], full: bool) {
    let running = plan.iter().filter(|task| task.will_run()).count();
    progress.line(&format!(
        "plan: {running} of {} tasks will run, {} cached{}",
        plan.len(),
        plan.len() - running,
        if full { ":" } else { " (--explain says why)" }
    ));
    if full {
        for task in plan {
            let (mark, why) = match task.will_run() {
                true => ("will run", task.to_string()),
                false => ("cached", String::new()),
            };
            progress.line(format!("  {:<13} {mark:<8}  {why}", task.id()).trim_end());
        }
    }
}

/// What this run executed, and why (the reason recorded in each attempt): each task when
/// there are a few, else how many for each reason.
fn print_executed(plan: &[Explanation], attempts: &[duraflow_rs::AttemptRecord]) {
    let executed: BTreeMap<&str, &str> = attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Succeeded)
        .map(|a| (a.key.as_str(), a.reason.as_deref().unwrap_or("?")))
        .collect();
    if executed.is_empty() {
        println!("executed: nothing");
    } else if executed.len() <= 12 {
        println!("executed:");
        for task in plan {
            if let Some(why) = executed.get(task.id()) {
                println!("  {:<13} {why}", task.id());
            }
        }
    } else {
        // How many for each reason, the commonest first; reasons that name a task (an
        // unreadable value, say) are each their own, so at most three are shown.
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for why in executed.values() {
            *reasons.entry(why).or_default() += 1;
        }
        let mut reasons: Vec<(&str, usize)> = reasons.into_iter().collect();
        reasons.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let mut shown: Vec<String> = reasons
            .iter()
            .take(3)
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        let others: usize = reasons.iter().skip(3).map(|(_, n)| n).sum();
        if others > 0 {
            shown.push(format!("{others} for other reasons"));
        }
        println!("executed: {} tasks ({})", executed.len(), shown.join("; "));
    }
}
