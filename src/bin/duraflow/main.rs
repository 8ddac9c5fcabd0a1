//! `duraflow`: answers about a duraflow-rs store from the shell — which run, which task,
//! which attempt, what error, what was cached — and the means to invalidate outputs,
//! collect old run records and write an HTML report of a run.
//!
//! Exit codes: 0 success, 1 an error (one line on stderr), 2 a usage error.

mod open;
mod report;
mod text;

use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::{Parser, Subcommand};
use duraflow_rs::{DuraflowError, RunDetails, RunHistory, RunId, RunStatus, Stored};

use open::{shown, wait, Store};
use text::Align;

/// Look into a duraflow-rs store: runs, task attempts, stored values; invalidate outputs,
/// drop old run records, write an HTML report of a run.
///
/// STORE is a sled store (a directory made by `SledStore::open`) or a FileStore directory,
/// the kind detected, or a `postgres://` URL with `#SCHEMA` at its end for a schema other
/// than `duraflow` (when built with feature `postgres`). Run records (runs, show, gc,
/// report) exist in stores that keep a run history (sled and PostgreSQL stores).
/// Exit status: 0 success, 1 error (one line on stderr), 2 usage error.
#[derive(Parser)]
#[command(name = "duraflow", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the runs: id, start (UTC), duration, status, executed/cached/failed tasks.
    Runs {
        /// The store's directory.
        store: PathBuf,
    },
    /// A run's task attempts: key, outcome, attempt, duration, why, error.
    ///
    /// WHY says why a task ran or was cached, as recorded for tasks added with `add_keyed`
    /// (`parameters changed`, `cached`, …); `cached by id` for a cached task added with
    /// `add`, which records no reason; `-` when there is none.
    Show {
        /// The store's directory.
        store: PathBuf,
        /// The run's id (see `duraflow runs`); the latest run by default.
        run: Option<RunId>,
        /// Only the attempts that failed or were interrupted.
        #[arg(long)]
        failed: bool,
    },
    /// A stored value as JSON, with the name of the type that wrote it.
    Get {
        /// The store's directory.
        store: PathBuf,
        /// The task id the value is stored under.
        key: String,
        /// Print only the JSON (no type line), for other programs.
        #[arg(long, conflicts_with = "raw")]
        json: bool,
        /// Write the stored bytes as they are (envelope included) to stdout.
        #[arg(long)]
        raw: bool,
    },
    /// Remove stored outputs, so the next run computes those tasks again.
    Rm {
        /// The store's directory.
        store: PathBuf,
        /// Task ids whose outputs to remove.
        #[arg(required_unless_present = "prefix")]
        keys: Vec<String>,
        /// Remove every output whose task id starts with this.
        #[arg(long, value_parser = NonEmptyStringValueParser::new())]
        prefix: Option<String>,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop the run and attempt records of all but the newest N runs (outputs stay).
    Gc {
        /// The store's directory (a sled store).
        store: PathBuf,
        /// How many of the newest runs to keep (at least 1: the newest run's id numbers
        /// the next).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep_runs: u64,
    },
    /// Write a self-contained HTML page of a run: a timeline of its task attempts and a
    /// table of them.
    Report {
        /// The store's directory (a sled store).
        store: PathBuf,
        /// The run's id; the latest run by default.
        run: Option<RunId>,
        /// Where to write the page (`-` for stdout); `run-ID.html` by default.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// Why a command failed: a message for stderr, or stdout failing.
pub enum Failure {
    /// What went wrong, for the user.
    Message(String),
    /// Writing the output failed.
    Output(io::Error),
}

impl Failure {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure::Message(message.into())
    }
}

impl From<DuraflowError> for Failure {
    fn from(e: DuraflowError) -> Failure {
        Failure::Message(e.to_string())
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Output(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Message(m) => f.write_str(m),
            Failure::Output(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse(); // usage errors exit with 2, --help and --version with 0
    let mut out = BufWriter::new(io::stdout().lock());
    let result = run(cli.command, &mut out).and_then(|()| out.flush().map_err(Failure::Output));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `duraflow show … | head`: the reader has seen what it wanted.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(failure) => {
            let _ = out.flush();
            let message = failure.to_string().replace(['\n', '\r'], " ");
            eprintln!("duraflow: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command, out: &mut dyn Write) -> Result<(), Failure> {
    match command {
        Command::Runs { store } => runs(&store, out),
        Command::Show { store, run, failed } => show(&store, run, failed, out),
        Command::Get {
            store,
            key,
            json,
            raw,
        } => get(&store, &key, json, raw, out),
        Command::Rm {
            store,
            keys,
            prefix,
            dry_run,
        } => rm(&store, &keys, prefix.as_deref(), dry_run, out),
        Command::Gc { store, keep_runs } => gc(&store, keep_runs, out),
        Command::Report { store, run, output } => report(&store, run, output, out),
    }
}

/// `duraflow runs`.
fn runs(path: &Path, out: &mut dyn Write) -> Result<(), Failure> {
    let store = Store::open(path)?;
    let history = store.history(path)?;
    let runs = wait(history.runs())?;
    if runs.is_empty() {
        writeln!(out, "no runs recorded in {}", shown(path))?;
        return Ok(());
    }
    let mut rows = Vec::with_capacity(runs.len());
    let mut lower_bounds = false;
    for run in &runs {
        let (ms, at_least) = if matches!(run.status, RunStatus::Succeeded | RunStatus::Failed) {
            text::run_duration(run, &[])
        } else {
            // The end of an interrupted run is its last recorded activity.
            let details = wait(history.run(run.id))?;
            let attempts = details.map(|d| d.attempts).unwrap_or_default();
            text::run_duration(run, &attempts)
        };
        lower_bounds |= at_least;
        rows.push(vec![
            run.id.to_string(),
            text::utc(run.started_ms),
            format!(
                "{}{}",
                if at_least { "≥" } else { "" },
                text::duration_ms(ms)
            ),
            text::status(run.status).to_owned(),
            run.executed.to_string(),
            run.cached.to_string(),
            run.failed.to_string(),
        ]);
    }
    use Align::{Left, Right};
    text::table(
        out,
        &[
            "RUN",
            "STARTED (UTC)",
            "DURATION",
            "STATUS",
            "EXECUTED",
            "CACHED",
            "FAILED",
        ],
        &[Right, Left, Right, Left, Right, Right, Right],
        &rows,
    )?;
    if lower_bounds {
        writeln!(
            out,
            "≥: the run did not finish; its duration runs up to its last recorded attempt"
        )?;
    }
    Ok(())
}

/// The run `id`, or the latest; an error naming the runs there are otherwise.
fn find_run(
    history: &dyn RunHistory,
    path: &Path,
    id: Option<RunId>,
) -> Result<RunDetails, Failure> {
    let runs = wait(history.runs())?;
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Err(Failure::new(format!("no runs recorded in {}", shown(path))));
    };
    let id = id.unwrap_or(last.id);
    wait(history.run(id))?.ok_or_else(|| {
        Failure::new(format!(
            "no run {id} in {} ({})",
            shown(path),
            if runs.len() == 1 {
                format!("its only run is {}", first.id)
            } else {
                format!(
                    "it has {} runs, ids {} to {}",
                    runs.len(),
                    first.id,
                    last.id
                )
            }
        ))
    })
}

/// One line about a run: id, status, start, duration, counts.
fn run_summary(d: &RunDetails) -> String {
    let run = &d.run;
    let (ms, at_least) = text::run_duration(run, &d.attempts);
    let version = if run.version.is_empty() {
        String::new()
    } else {
        format!(" (duraflow-rs {})", run.version)
    };
    format!(
        "run {} {}: started {}, took {}{}; {} executed, {} cached, {} failed{version}",
        run.id,
        text::status(run.status),
        text::utc(run.started_ms),
        if at_least { "at least " } else { "" },
        text::duration_ms(ms),
        run.executed,
        run.cached,
        run.failed,
    )
}

/// `duraflow show`.
fn show(
    path: &Path,
    id: Option<RunId>,
    only_failed: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let store = Store::open(path)?;
    let details = find_run(store.history(path)?, path, id)?;
    writeln!(out, "{}", run_summary(&details))?;
    let mut attempts: Vec<_> = details
        .attempts
        .iter()
        .filter(|a| !only_failed || !matches!(text::outcome(&a.outcome), "executed" | "cached"))
        .collect();
    if attempts.is_empty() {
        let what = if only_failed {
            "no attempt failed or was interrupted"
        } else {
            "no attempts recorded"
        };
        writeln!(out, "{what}")?;
        return Ok(());
    }
    attempts.sort_by(|a, b| a.key.cmp(&b.key).then(a.attempt.cmp(&b.attempt)));
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .map(|a| {
            vec![
                text::printable(&a.key),
                text::outcome(&a.outcome).to_owned(),
                a.attempt.to_string(),
                text::attempt_duration_us(a).map_or_else(|| "-".to_owned(), text::duration_us),
                text::why(a).map_or_else(|| "-".to_owned(), text::printable),
                text::error(&a.outcome)
                    .map(text::printable)
                    .unwrap_or_default(),
            ]
        })
        .collect();
    writeln!(out)?;
    use Align::{Left, Right};
    text::table(
        out,
        &["KEY", "OUTCOME", "ATTEMPT", "DURATION", "WHY", "ERROR"],
        &[Left, Left, Right, Right, Left, Left],
        &rows,
    )?;
    Ok(())
}

/// `duraflow get`: the value is written as it is read, never held in memory whole.
fn get(path: &Path, key: &str, json: bool, raw: bool, out: &mut dyn Write) -> Result<(), Failure> {
    let store = Store::open(path)?;
    let missing = || Failure::new(format!("no value stored under key {key:?}"));
    // An error of `out` is told apart from one of the store (`… | head` is no failure).
    let mut out = Watched { out, failed: None };
    let written = if raw {
        let found = wait(store.storage().read_value(key))?.ok_or_else(missing)?;
        match found {
            Stored::Bytes(bytes) => out.write_all(&bytes).map_err(Failure::Output),
            Stored::Reader { mut reader, .. } => match io::copy(&mut reader, &mut out) {
                Ok(_) => Ok(()),
                Err(e) => Err(
                    match e.into_inner().map(|e| e.downcast::<DuraflowError>()) {
                        Some(Ok(error)) => Failure::from(*error),
                        Some(Err(e)) => Failure::new(format!("reading {key:?}: {e}")),
                        None => Failure::new(format!("reading {key:?} failed")),
                    },
                ),
            },
        }
    } else {
        let head = |type_name: &str, size: u64, out: &mut dyn Write| {
            if json {
                return Ok(());
            }
            let type_name = if type_name.is_empty() {
                "(unknown: a value from duraflow-rs 1.x)"
            } else {
                type_name
            };
            writeln!(out, "type: {type_name}")?;
            writeln!(out, "size: {}", text::bytes(size))
        };
        match store.context().write_json(key, &mut out, head) {
            Ok(true) => Ok(()),
            Ok(false) => Err(missing()),
            Err(e) => Err(Failure::from(e)),
        }
    };
    match out.failed {
        Some(e) => Err(Failure::Output(e)),
        None => written,
    }
}

/// A writer that keeps the first error of `out`.
struct Watched<'a> {
    out: &'a mut dyn Write,
    failed: Option<io::Error>,
}

impl Write for Watched<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf).map_err(|e| self.keep(e))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush().map_err(|e| self.keep(e))
    }
}

impl Watched<'_> {
    fn keep(&mut self, e: io::Error) -> io::Error {
        let stand_in = io::Error::new(e.kind(), "writing the output failed");
        self.failed.get_or_insert(e);
        stand_in
    }
}

/// `duraflow rm`.
fn rm(
    path: &Path,
    keys: &[String],
    prefix: Option<&str>,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let store = Store::open(path)?;
    let storage = store.storage();
    let mut targets: Vec<String> = Vec::new();
    for key in keys {
        if wait(storage.read(key))?.is_some() {
            targets.push(key.clone());
        } else {
            writeln!(out, "not stored: {}", text::printable(key))?;
        }
    }
    if let Some(prefix) = prefix {
        let mut matching: Vec<String> = wait(storage.keys())?
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect();
        matching.sort();
        if matching.is_empty() {
            writeln!(
                out,
                "no stored output's key starts with {}",
                text::printable(&format!("{prefix:?}"))
            )?;
        }
        targets.extend(matching);
    }
    let mut seen = std::collections::HashSet::new();
    targets.retain(|k| seen.insert(k.clone()));
    let mut removed = 0u64;
    for key in &targets {
        if dry_run {
            writeln!(out, "would remove {}", text::printable(key))?;
            removed += 1;
        } else if wait(storage.remove(key))? {
            writeln!(out, "removed {}", text::printable(key))?;
            removed += 1;
        }
    }
    if dry_run {
        writeln!(
            out,
            "would remove {} (dry run: nothing was removed)",
            text::count(removed, "output")
        )?;
    } else if removed > 0 {
        writeln!(
            out,
            "removed {}; the next run computes {} again",
            text::count(removed, "output"),
            if removed == 1 { "it" } else { "them" }
        )?;
    } else {
        writeln!(out, "nothing removed")?;
    }
    Ok(())
}

/// `duraflow gc`.
fn gc(path: &Path, keep_runs: u64, out: &mut dyn Write) -> Result<(), Failure> {
    let store = Store::open(path)?;
    let history = store.history(path)?;
    let keep = usize::try_from(keep_runs).unwrap_or(usize::MAX);
    let stats = wait(history.gc(keep))?;
    if stats.output_files_removed > 0 {
        writeln!(
            out,
            "removed {} that no stored output refers to",
            text::count(stats.output_files_removed, "output file"),
        )?;
    }
    if stats.runs_removed.is_empty() {
        let runs = wait(history.runs())?.len();
        writeln!(
            out,
            "nothing to remove: the store has {}, keeping the newest {keep_runs}",
            text::count(runs as u64, "run")
        )?;
        return Ok(());
    }
    let ids: Vec<String> = stats.runs_removed.iter().map(|id| id.to_string()).collect();
    writeln!(
        out,
        "removed {} ({}) and {} of them: {}, {} reclaimed",
        text::count(stats.runs_removed.len() as u64, "run"),
        ids.join(", "),
        text::count(stats.attempts_removed, "attempt"),
        text::count(stats.records_removed, "record"),
        text::bytes(stats.bytes_reclaimed),
    )?;
    writeln!(
        out,
        "kept the newest {} and every output",
        text::count(keep_runs, "run"),
    )?;
    Ok(())
}

/// `duraflow report`.
fn report(
    path: &Path,
    id: Option<RunId>,
    output: Option<PathBuf>,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let store = Store::open(path)?;
    let details = find_run(store.history(path)?, path, id)?;
    let html = report::html(path, &details);
    let output = output.unwrap_or_else(|| PathBuf::from(format!("run-{}.html", details.run.id)));
    if output.as_os_str() == "-" {
        out.write_all(html.as_bytes())?;
        return Ok(());
    }
    fs::write(&output, html.as_bytes())
        .map_err(|e| Failure::new(format!("cannot write {}: {e}", output.display())))?;
    let tasks: std::collections::BTreeSet<&str> =
        details.attempts.iter().map(|a| a.key.as_str()).collect();
    writeln!(
        out,
        "wrote {}: run {} ({}), {}, {}",
        output.display(),
        details.run.id,
        text::status(details.run.status),
        text::count(tasks.len() as u64, "task"),
        text::count(details.attempts.len() as u64, "attempt"),
    )?;
    Ok(())
}
