//! Shared by the benchmarks: the trivial task, runtime and ids every one uses, reading back
//! the estimates criterion wrote in this run, and interleaved timing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use dagx::{DagRunner, Task};

/// Where criterion writes its results: `$CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion`, or
/// the `criterion` directory of the target directory this benchmark was built in.
pub fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .map(|dir| dir.join("criterion"))
        .find(|dir| dir.is_dir())
}

/// Mean time per iteration of `id` and its 95 % confidence interval, in seconds, if criterion
/// wrote it after `since`.
pub fn estimate(dir: &Path, group: &str, id: &str, since: SystemTime) -> Option<(f64, f64, f64)> {
    estimate_in(dir, group, id, "new", since)
}

/// Like [`estimate`], from the results criterion keeps under `name`: `new` for the latest
/// run, or a baseline saved with `--save-baseline NAME`.
pub fn estimate_in(
    dir: &Path,
    group: &str,
    id: &str,
    name: &str,
    since: SystemTime,
) -> Option<(f64, f64, f64)> {
    let path = dir.join(group).join(id).join(name).join("estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < since {
        return None; // left over from an earlier run (e.g. filtered out of this one)
    }
    let json = std::fs::read_to_string(&path).ok()?;
    // {"mean":{"confidence_interval":{..,"lower_bound":L,"upper_bound":U},"point_estimate":P,..},"median":..}
    let mean = json
        .split("\"mean\":")
        .nth(1)?
        .split("\"median\":")
        .next()?;
    let number = |field: &str| -> Option<f64> {
        let rest = mean.split(&format!("\"{field}\":")).nth(1)?;
        let end = rest.find([',', '}'])?;
        rest[..end].trim().parse::<f64>().ok()
    };
    let ns = 1e-9;
    Some((
        number("point_estimate")? * ns,
        number("lower_bound")? * ns,
        number("upper_bound")? * ns,
    ))
}

/// Prints every estimate of `ids` criterion wrote in this run (since `since`) and the
/// `(numerator, denominator, target)` ratios between them.
pub fn print_summary(
    group: &str,
    tasks: usize,
    ids: &[&str],
    ratios: &[(&str, &str, Option<f64>)],
    since: SystemTime,
) {
    let Some(dir) = criterion_dir() else {
        return;
    };
    let found: Vec<(&str, (f64, f64, f64))> = ids
        .iter()
        .filter_map(|id| Some((*id, estimate(&dir, group, id, since)?)))
        .collect();
    if found.is_empty() {
        return;
    }
    let get = |id: &str| found.iter().find(|(i, _)| *i == id).map(|(_, e)| *e);

    println!("\n== {group}: mean time per run of {tasks} tasks (95% CI) ==");
    for (id, (mean, lo, hi)) in &found {
        println!(
            "{id:<24} {:>10.3} ms  [{:.3} .. {:.3}]  {:>7.3} us/task",
            mean * 1e3,
            lo * 1e3,
            hi * 1e3,
            mean * 1e6 / tasks as f64
        );
    }

    println!("\n== ratios (point estimate; range from the CI bounds) ==");
    for &(num, den, target) in ratios {
        let (Some((a, a_lo, a_hi)), Some((b, b_lo, b_hi))) = (get(num), get(den)) else {
            continue;
        };
        let verdict = verdict(a / b, target);
        println!(
            "{:<42} {:>7.3}x  [{:.3} .. {:.3}]  {verdict}",
            format!("{num} / {den}"),
            a / b,
            a_lo / b_hi,
            a_hi / b_lo
        );
    }
}

/// Whether criterion runs every benchmark once as a test (`cargo test --benches`, or
/// `-- --test`): no `--bench`, or `--test` given.
pub fn smoke_test() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    !has("--bench") || has("--test")
}

/// Whether the command line's filter (criterion's first free argument, a regex; matched
/// here as a plain substring or `a|b` alternatives, which is how these benchmarks' ids are
/// selected) leaves `group/id` in.
pub fn selected(group: &str, id: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut free = args.iter().filter(|a| !a.starts_with('-'));
    match free.next() {
        None => true,
        Some(filter) => filter.split('|').any(|alt| {
            format!("{group}/{id}").contains(alt.trim_matches(|c| c == '^' || c == '$'))
        }),
    }
}

/// The median of `times`, in milliseconds.
pub fn median_ms(times: &mut [std::time::Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

/// Times `a` and `b` back to back for `rounds` rounds (alternating which goes first, after
/// a few warm-up rounds) and returns their median times in milliseconds: a burst of load
/// then hits both sides of a ratio, unlike criterion's one-variant-after-another runs.
pub fn interleaved(
    rounds: usize,
    mut a: impl FnMut() -> std::time::Duration,
    mut b: impl FnMut() -> std::time::Duration,
) -> (f64, f64) {
    for _ in 0..3 {
        a();
        b();
    }
    let (mut ta, mut tb) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for round in 0..rounds {
        if round % 2 == 0 {
            ta.push(a());
            tb.push(b());
        } else {
            tb.push(b());
            ta.push(a());
        }
    }
    (median_ms(&mut ta), median_ms(&mut tb))
}

/// Prints an interleaved pair and their ratio against `target`, if any.
pub fn print_interleaved(a: (&str, f64), b: (&str, f64), target: Option<f64>) {
    println!("{:<24} {:>10.3} ms  (median)", b.0, b.1);
    let ratio = a.1 / b.1;
    let verdict = verdict(ratio, target);
    println!(
        "{:<42} {ratio:>7.3}x  {verdict}",
        format!("{} / {}", a.0, b.0)
    );
}

/// A trivial task: returns the number it holds.
pub struct Val(pub u64);

#[dagx::task]
impl Val {
    async fn run(&self) -> u64 {
        self.0
    }
}

/// A multi-thread tokio runtime with 2 workers, as every benchmark runs its DAG on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The ids `task-0`, `task-1`, …: `n` of them when benchmarking, `n_smoke` in criterion's
/// test mode (see [`smoke_test`]).
pub fn task_ids<T: From<String>>(n: usize, n_smoke: usize) -> Vec<T> {
    let n = if smoke_test() { n_smoke } else { n };
    (0..n).map(|i| T::from(format!("task-{i}"))).collect()
}

/// A fresh temporary directory, named after the benchmark.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

/// `ratio` against `target`, as the benches print it (empty without a target).
pub fn verdict(ratio: f64, target: Option<f64>) -> String {
    match target {
        Some(t) if ratio <= t => format!("target <= {t:.2}: MET"),
        Some(t) => format!("target <= {t:.2}: MISSED"),
        None => String::new(),
    }
}

/// Raw dagx: builds and runs the wide DAG of `n` trivial tasks on `rt`. Returns the time
/// taken and the runner, to be dropped untimed.
pub fn run_raw(rt: &tokio::runtime::Runtime, n: usize) -> (Duration, DagRunner) {
    let start = Instant::now();
    let dag = rt.block_on(async {
        let dag = DagRunner::new();
        for i in 0..n {
            dag.add_task(Val(i as u64));
        }
        run_spawned(&dag, "raw dagx").await;
        dag
    });
    (start.elapsed(), dag)
}

/// Runs `dag` with every task spawned on the current tokio runtime, as every benchmark
/// does; panics (naming `what`) if dagx reports an error.
pub async fn run_spawned(dag: &DagRunner, what: &str) {
    if let Err(e) = dag
        .run(|f| {
            tokio::spawn(f);
        })
        .await
    {
        panic!("{what} run: {e}");
    }
}

/// A field of `/proc/self/status` in KiB (`VmHWM`, `VmRSS`), if readable.
#[allow(dead_code)] // used by the examples that report their peak RSS
pub fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The example `name`, built in release (`cargo build --release --example NAME`) in the
/// target directory cargo uses here (`CARGO_TARGET_DIR`, or the package's `target`).
#[allow(dead_code)] // used by the benches and tests that run an example as a child
pub fn release_example(name: &str) -> std::path::PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(manifest)
        .args(["build", "--release", "--example", name, "--quiet"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build of example {name}: {status}");
    // Relative to the directory cargo ran in, as cargo takes it.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| manifest.join("target"), |dir| manifest.join(dir));
    target.join("release/examples").join(name)
}
