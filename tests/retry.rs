//! Promises about fallible tasks and retries:
//!
//! - only `Ok` outputs are persisted; an `Err` is a failed attempt, never cached, and a later
//!   run executes the task again;
//! - a failing task is attempted again under its `RetryPolicy`, each attempt recorded (one
//!   attempt record, one `duraflow.task` span with its `attempt` number), progress reported
//!   once;
//! - panics and timeouts are failed attempts under the same policy;
//! - backoff doubles from the initial wait (measured on tokio's paused clock, no real sleep).

mod common;

use common::wait;
use duraflow_rs::RunHistory;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dagx::{task, DagRunner, Task};
use duraflow_rs::{
    AttemptOutcome, Context, DurableDag, RetryPolicy, RunStatus, SledStore, Storage,
};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Fails (returns `Err`) on its first `fail_first` calls, then returns `Ok(42)`. Clones
/// share the call log, which holds the (paused) tokio time of every call.
#[derive(Clone)]
struct Flaky {
    fail_first: u32,
    calls: Arc<Mutex<Vec<tokio::time::Instant>>>,
}
#[task]
impl Flaky {
    async fn run(&self) -> Result<u64, String> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(tokio::time::Instant::now());
            calls.len() as u32
        };
        if n <= self.fail_first {
            Err(format!("flake {n}"))
        } else {
            Ok(42)
        }
    }
}

impl Flaky {
    fn new(fail_first: u32) -> Flaky {
        Flaky {
            fail_first,
            calls: Arc::default(),
        }
    }
    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

/// Panics on its first `panic_first` calls, then returns 7.
#[derive(Clone)]
struct Shaky {
    panic_first: u32,
    calls: Arc<AtomicU32>,
}
#[task]
impl Shaky {
    async fn run(&self) -> u64 {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= self.panic_first {
            panic!("shaky {n}");
        }
        7
    }
}

/// Never finishes on its first `hang_first` calls, then returns 9.
#[derive(Clone)]
struct Hangs {
    hang_first: u32,
    calls: Arc<AtomicU32>,
}
#[task]
impl Hangs {
    async fn run(&self) -> u64 {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= self.hang_first {
            futures::future::pending::<()>().await;
        }
        9
    }
}

/// Depends on a fallible task and propagates its error: a fallible dependent.
#[derive(Clone)]
struct PlusOne;
#[task]
impl PlusOne {
    async fn run(&self, upstream: &Result<u64, String>) -> Result<u64, String> {
        upstream.clone().map(|v| v + 1)
    }
}

/// A current-thread runtime whose clock is paused: timers fire as soon as the runtime is
/// idle, so backoff and timeouts take no real time and their lengths are exact.
fn paused_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

fn sled_context(dir: &tempfile::TempDir) -> (Arc<SledStore>, Arc<Context>) {
    let store = Arc::new(SledStore::open(dir.path().join("db")).unwrap());
    let ctx = Arc::new(Context {
        db: store.clone() as Arc<dyn Storage + Send + Sync>,
        completed_count: Arc::default(),
    });
    (store, ctx)
}

fn no_wait(attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(attempts)
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .jitter(false)
}

/// Records `(task.id, attempt, outcome)` of every closed `duraflow.task` span.
#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<Vec<(String, u64, String)>>>);

#[derive(Default)]
struct Fields {
    id: String,
    attempt: u64,
    outcome: String,
}
impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "attempt" {
            self.attempt = value;
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "task.id" => self.id = value.to_owned(),
            "outcome" => self.outcome = value.to_owned(),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "task.id" {
            self.id = format!("{value:?}").trim_matches('"').to_owned();
        }
    }
}
impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Attempts {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        if attrs.metadata().name() == "duraflow.task" {
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            ctx.span(id).unwrap().extensions_mut().insert(fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        if let Some(fields) = ctx.span(id).unwrap().extensions_mut().get_mut::<Fields>() {
            values.record(fields);
        }
    }
    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        if let Some(f) = ctx.span(&id).unwrap().extensions_mut().remove::<Fields>() {
            self.0.lock().unwrap().push((f.id, f.attempt, f.outcome));
        }
    }
}

#[test]
fn failing_twice_then_succeeding_is_persisted_once_with_three_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ctx) = sled_context(&dir);
    let flaky = Flaky::new(2);
    let progress = Arc::new(Mutex::new(Vec::new()));
    let spans = Attempts::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _default = tracing::subscriber::set_default(subscriber);

    let dag = DagRunner::new();
    let p = progress.clone();
    let d = DurableDag::new(&dag, ctx.clone())
        .with_progress(move |id, n| p.lock().unwrap().push((id.to_owned(), n)));
    let h = d.add_fallible_with("flaky", flaky.clone(), no_wait(3));
    paused_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();

    assert_eq!(dag.get(h).unwrap(), Ok(42));
    assert_eq!(flaky.calls(), 3);
    assert_eq!(ctx.get::<u64>("flaky"), Some(42), "Ok(T) stored as a T");
    assert_eq!(*progress.lock().unwrap(), vec![("flaky".to_owned(), 1)]);
    assert_eq!(
        (d.stats().executed, d.stats().failed),
        (1, 0),
        "a task that succeeds on a retry is executed, not failed"
    );

    let attempts = wait(store.attempts_of("flaky")).unwrap();
    let summary: Vec<(u32, AttemptOutcome)> = attempts
        .iter()
        .map(|a| (a.attempt, a.outcome.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                1,
                AttemptOutcome::Failed {
                    error: "flake 1".into()
                }
            ),
            (
                2,
                AttemptOutcome::Failed {
                    error: "flake 2".into()
                }
            ),
            (3, AttemptOutcome::Succeeded),
        ]
    );
    assert!(attempts.iter().all(|a| a.duration_us.is_some()));
    let mut spans = spans.0.lock().unwrap().clone();
    spans.sort();
    assert_eq!(
        spans,
        vec![
            ("flaky".to_owned(), 1, "failed".to_owned()),
            ("flaky".to_owned(), 2, "failed".to_owned()),
            ("flaky".to_owned(), 3, "executed".to_owned()),
        ]
    );
}

#[test]
fn a_task_failing_every_time_is_never_cached_and_runs_again_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ctx) = sled_context(&dir);
    // Fails both attempts of rounds 1 and 2, succeeds in round 3.
    let flaky = Flaky::new(4);
    for round in 1..=3u32 {
        let dag = DagRunner::new();
        let d = DurableDag::new(&dag, ctx.clone());
        let up = d.add_fallible_with("up", flaky.clone(), no_wait(2));
        let down = d
            .add_fallible_with("down", PlusOne, no_wait(2))
            .depends_on(&up);
        paused_rt()
            .block_on(dag.run(|f| {
                tokio::spawn(f);
            }))
            .unwrap();
        let (up, down) = (dag.get(up).unwrap(), dag.get(down).unwrap());
        if round < 3 {
            assert_eq!(up, Err(format!("flake {}", 2 * round)));
            assert_eq!(down, up, "the dependent got this run's error");
            assert_eq!(ctx.try_get::<u64>("up").unwrap(), None, "nothing persisted");
            assert_eq!(ctx.try_get::<u64>("down").unwrap(), None);
            assert_eq!(
                flaky.calls(),
                2 * round as usize,
                "executed again in round {round}"
            );
            assert_eq!(d.stats().failed, 2);
        } else {
            // Not a stale error: both run and succeed on this run's value.
            assert_eq!((up, down), (Ok(42), Ok(43)));
            assert_eq!(flaky.calls(), 5);
            assert_eq!((d.stats().executed, d.stats().failed), (2, 0));
        }
    }
    let status: Vec<RunStatus> = wait(store.runs())
        .unwrap()
        .into_iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        status,
        [RunStatus::Failed, RunStatus::Failed, RunStatus::Succeeded]
    );
    assert_eq!(wait(store.attempts_of("up")).unwrap().len(), 5);
}

#[test]
fn a_panicking_task_is_retried_under_the_same_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ctx) = sled_context(&dir);
    let shaky = Shaky {
        panic_first: 1,
        calls: Arc::default(),
    };
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let h = d.add_with_retry("shaky", shaky.clone(), no_wait(2));
    paused_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
    assert_eq!(dag.get(h).unwrap(), 7);
    assert_eq!(shaky.calls.load(Ordering::SeqCst), 2);
    let outcomes: Vec<AttemptOutcome> = wait(store.attempts_of("shaky"))
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec![
            AttemptOutcome::Failed {
                error: "panicked: shaky 1".into()
            },
            AttemptOutcome::Succeeded
        ]
    );
}

#[test]
fn a_hanging_attempt_is_cut_off_by_its_timeout_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ctx) = sled_context(&dir);
    let hangs = Hangs {
        hang_first: 2,
        calls: Arc::default(),
    };
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let policy = no_wait(3).timeout(Duration::from_secs(60));
    let h = d.add_with_retry("hangs", hangs.clone(), policy);
    let rt = paused_rt();
    let started = rt.block_on(async { tokio::time::Instant::now() });
    rt.block_on(dag.run(|f| {
        tokio::spawn(f);
    }))
    .unwrap();
    let elapsed = rt.block_on(async move { started.elapsed() });
    assert_eq!(dag.get(h).unwrap(), 9);
    assert_eq!(hangs.calls.load(Ordering::SeqCst), 3);
    // Two timeouts of 60 s and two waits of 10 ms, on the paused clock.
    assert!(
        elapsed >= Duration::from_millis(120_020) && elapsed < Duration::from_secs(121),
        "{elapsed:?}"
    );
    let attempts = wait(store.attempts_of("hangs")).unwrap();
    assert_eq!(attempts.len(), 3);
    for a in &attempts[..2] {
        assert_eq!(
            a.outcome,
            AttemptOutcome::Failed {
                error: "timed out after 60s".into()
            }
        );
    }
}

#[test]
fn a_task_whose_every_attempt_times_out_has_no_output_and_fails_the_run() {
    let ctx = Arc::new(Context::new(duraflow_rs::MemoryStore::new()));
    let hangs = Hangs {
        hang_first: u32::MAX,
        calls: Arc::default(),
    };
    let dag = DagRunner::new();
    let d = DurableDag::new(&dag, ctx.clone());
    let policy = no_wait(2).timeout(Duration::from_secs(5));
    d.add_with_retry("stuck", hangs.clone(), policy);
    let result = paused_rt().block_on(dag.run(|f| {
        tokio::spawn(f);
    }));
    // dagx reports a task without output as an error of the run.
    assert!(result.is_err(), "{result:?}");
    assert_eq!(hangs.calls.load(Ordering::SeqCst), 2);
    assert_eq!(ctx.try_get::<u64>("stuck").unwrap(), None);
    assert_eq!(d.stats().failed, 1);
}

#[test]
fn backoff_doubles_between_attempts_on_the_paused_clock() {
    let ctx = Arc::new(Context::new(duraflow_rs::MemoryStore::new()));
    let flaky = Flaky::new(3);
    let dag = DagRunner::new();
    let policy = RetryPolicy::attempts(4)
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .jitter(false);
    let d = DurableDag::new(&dag, ctx);
    d.add_fallible_with("flaky", flaky.clone(), policy);
    paused_rt()
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .unwrap();
    let calls = flaky.calls.lock().unwrap().clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [1, 2, 4].map(Duration::from_secs),
        "waits of 1 s, 2 s, 4 s between the four attempts"
    );
}
