//! Promises about spans and `ProgressLayer`:
//!
//! - every durable task gets one `duraflow.task` span, closed with its `task.id`, `run.id`,
//!   `attempt` and `outcome` (`executed`, `cached` or `failed`), a child of its run's
//!   `duraflow.run` span, which carries `run.id`, `store` and, by the time it closes, the
//!   run's `executed` / `cached` / `failed` counts;
//! - those spans reach a subscriber that is the default of the thread that created the
//!   `DurableDag` only (not a global one), although dagx runs the tasks on tokio worker
//!   threads;
//! - `ProgressLayer` reports what `DurableDag::with_progress` reports: the same ids, each
//!   once, and the counts `1..=n` of the run;
//! - a task retried after a failed attempt has one span per attempt and is reported once;
//! - `with_progress` needs no subscriber at all.
//!
//! Each test installs its own subscriber for its own thread (`set_default`). The tests of
//! this binary run one at a time ([`serial`]): tracing caches per callsite whether any
//! subscriber is interested, and a callsite first hit on one thread while another thread
//! installs its subscriber can cache the answer without that subscriber
//! (tracing-core registers the callsite and the subscriber without a common lock), which
//! would drop spans at random.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use common::{multi_thread_rt, Boom, Meet, Val};
use dagx::{task, DagRunner, Task};
use duraflow_rs::{Context, DurableDag, MemoryStore, ProgressLayer, RetryPolicy, SledStore};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Tasks per run: wide enough that both workers of the runtime take tasks.
const WIDTH: usize = 200;

/// Serialises the tests of this binary (see the module docs).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// A layer that records every span: its fields, its parent, the threads it was used on.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SpanRec {
    name: &'static str,
    /// Index (in [`Spans::all`]) of the parent span, if any.
    parent: Option<usize>,
    fields: BTreeMap<String, String>,
    /// Threads the span was created, recorded, entered or closed on.
    threads: HashSet<ThreadId>,
    closed: bool,
    /// Whether its parent was still open when it closed.
    parent_open_at_close: bool,
}

impl SpanRec {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct Spans {
    all: Vec<SpanRec>,
    /// Open spans: registry ids are reused once a span closes, indices are not.
    live: HashMap<u64, usize>,
}

#[derive(Clone, Default)]
struct SpanCapture(Arc<Mutex<Spans>>);

impl SpanCapture {
    fn spans(&self) -> Vec<SpanRec> {
        self.0.lock().unwrap().all.clone()
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanCapture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let parent = ctx.span(id).and_then(|s| s.parent()).map(|p| p.id());
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.0.lock().unwrap();
        let parent = parent.and_then(|p| spans.live.get(&p.into_u64()).copied());
        let index = spans.all.len();
        spans.all.push(SpanRec {
            name: attrs.metadata().name(),
            parent,
            fields,
            threads: HashSet::from([std::thread::current().id()]),
            closed: false,
            parent_open_at_close: false,
        });
        spans.live.insert(id.into_u64(), index);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: LayerContext<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        let index = spans.live[&id.into_u64()];
        let span = &mut spans.all[index];
        values.record(&mut Fields(&mut span.fields));
        span.threads.insert(std::thread::current().id());
    }

    fn on_enter(&self, id: &Id, _ctx: LayerContext<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        let index = spans.live[&id.into_u64()];
        spans.all[index].threads.insert(std::thread::current().id());
    }

    fn on_close(&self, id: Id, _ctx: LayerContext<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        let index = spans.live.remove(&id.into_u64()).unwrap();
        let parent_open = spans.all[index]
            .parent
            .is_some_and(|p| !spans.all[p].closed);
        let span = &mut spans.all[index];
        span.closed = true;
        span.parent_open_at_close = parent_open;
        span.threads.insert(std::thread::current().id());
    }
}

// ---------------------------------------------------------------------------------------
// The DAG.
// ---------------------------------------------------------------------------------------

/// The ids of a run of [`run_dag`]: `meet/0`, `meet/1`, then `val/2` .. `val/199`, and
/// `boom` when it has a panicking task.
fn ids(with_boom: bool) -> Vec<String> {
    let mut ids: Vec<String> = (0..WIDTH)
        .map(|i| match i {
            0 | 1 => format!("meet/{i}"),
            _ => format!("val/{i}"),
        })
        .collect();
    if with_boom {
        ids.push("boom".into());
    }
    ids
}

type Calls = Arc<Mutex<Vec<(String, usize)>>>;

/// Runs the wide DAG over `ctx` with `subscriber` as this thread's default (not global) on
/// a 2-worker runtime; `with_progress` calls go to `progress`. Returns whether `dag.run`
/// returned Ok.
fn run_dag(
    ctx: &Arc<Context>,
    subscriber: Option<tracing::Dispatch>,
    with_boom: bool,
    progress: Option<Calls>,
) -> bool {
    let _default = subscriber.as_ref().map(tracing::dispatcher::set_default);
    let rt = multi_thread_rt();
    let dag = DagRunner::new();
    let mut d = DurableDag::new(&dag, ctx.clone());
    if let Some(calls) = progress {
        d = d.with_progress(move |id, n| calls.lock().unwrap().push((id.to_owned(), n)));
    }
    let meet = Meet::default();
    for (i, id) in ids(with_boom).iter().enumerate() {
        match id.as_str() {
            "boom" => {
                d.add(id, Boom);
            }
            _ if i < 2 => {
                d.add(id, meet.clone());
            }
            _ => {
                d.add(id, Val(i as u64));
            }
        }
    }
    let ok = rt
        .block_on(dag.run(|f| {
            tokio::spawn(f);
        }))
        .is_ok();
    drop(d);
    ok
}

// ---------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------

/// Checks the spans of exactly one run: one closed `duraflow.run` with `store` and the given
/// counts, and one closed `duraflow.task` per id of `expected` (id → outcome), each its child
/// with the run's `run.id`. Returns the run's `run.id` and the threads its task spans used.
fn check_run(
    spans: &[SpanRec],
    store: &str,
    expected: &BTreeMap<String, &str>,
) -> (String, HashSet<ThreadId>) {
    let runs: Vec<usize> = (0..spans.len())
        .filter(|&i| spans[i].name == "duraflow.run")
        .collect();
    assert_eq!(runs.len(), 1, "one duraflow.run span per run");
    let run = &spans[runs[0]];
    assert!(run.closed, "the run span closed");
    let run_id = run.field("run.id").expect("run.id").to_owned();
    assert_eq!(run.field("store"), Some(store));
    let count = |outcome: &str| expected.values().filter(|o| **o == outcome).count();
    for counted in ["executed", "cached", "failed"] {
        assert_eq!(
            run.field(counted),
            Some(count(counted).to_string().as_str()),
            "the run span's {counted} count"
        );
    }

    let tasks: Vec<&SpanRec> = spans.iter().filter(|s| s.name == "duraflow.task").collect();
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut threads = HashSet::new();
    for task in &tasks {
        let id = task.field("task.id").expect("task.id");
        assert!(task.closed, "{id}: span closed");
        assert_eq!(task.parent, Some(runs[0]), "{id}: a child of the run span");
        assert!(task.parent_open_at_close, "{id}: closed before its run");
        assert_eq!(task.field("run.id"), Some(run_id.as_str()), "{id}: run.id");
        assert_eq!(task.field("attempt"), Some("1"), "{id}: attempt");
        let outcome = task.field("outcome").expect("outcome recorded");
        assert!(
            seen.insert(id.to_owned(), outcome).is_none(),
            "{id}: one span per task"
        );
        threads.extend(task.threads.iter().copied());
    }
    assert_eq!(&seen, expected, "task ids and outcomes");
    (run_id, threads)
}

fn all(outcome: &'static str, with_boom: bool) -> BTreeMap<String, &'static str> {
    ids(with_boom)
        .into_iter()
        .map(|id| {
            let o = if id == "boom" { "failed" } else { outcome };
            (id, o)
        })
        .collect()
}

/// Three runs over one store: all executed, all cached, all cached but one panicking task.
/// Each run's spans go to a fresh capture layer, the default of this thread only.
fn spans_over(ctx: Arc<Context>, store: &str) {
    let _serial = serial();
    let test_thread = std::thread::current().id();
    let mut run_ids = Vec::new();
    for (round, (outcome, with_boom)) in [("executed", false), ("cached", false), ("cached", true)]
        .into_iter()
        .enumerate()
    {
        let capture = SpanCapture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        // dagx drops the panic of a spawned task no other task depends on: `dag.run` is Ok
        // then too, as without duraflow (see tests/failures.rs). The span says "failed".
        run_dag(&ctx, Some(subscriber.into()), with_boom, None);
        let (run_id, threads) = check_run(&capture.spans(), store, &all(outcome, with_boom));
        run_ids.push(run_id);
        assert!(
            !threads.contains(&test_thread),
            "round {round}: task spans used only worker threads"
        );
        if round == 0 {
            // The Meet tasks ran at once on two workers, inside their spans.
            assert!(
                threads.len() >= 2,
                "round {round}: task spans reached the subscriber from both workers"
            );
        }
    }
    let distinct: HashSet<&String> = run_ids.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "each run has its own run.id: {run_ids:?}"
    );
}

#[test]
fn spans_memory_store_executed_cached_failed_across_worker_threads() {
    spans_over(Arc::new(Context::new(MemoryStore::new())), "memory");
}

#[test]
fn spans_sled_store_executed_cached_failed_across_worker_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path().join("db")).unwrap();
    spans_over(Arc::new(Context::new(store)), "sled");
}

// ---------------------------------------------------------------------------------------
// ProgressLayer against with_progress.
// ---------------------------------------------------------------------------------------

fn sorted_ids(calls: &[(String, usize)]) -> Vec<String> {
    let mut ids: Vec<String> = calls.iter().map(|c| c.0.clone()).collect();
    ids.sort();
    ids
}

fn sorted_counts(calls: &[(String, usize)]) -> Vec<usize> {
    let mut counts: Vec<usize> = calls.iter().map(|c| c.1).collect();
    counts.sort_unstable();
    counts
}

/// Three runs over one store (executed, cached, cached + a panicking task), each with both a
/// `with_progress` callback and a `ProgressLayer` (composed with a fmt layer) in this
/// thread's default subscriber: they report the same ids, each once, and the counts 1..=n.
fn layer_matches_with_progress(ctx: Arc<Context>) {
    let _serial = serial();
    for with_boom in [false, false, true] {
        let direct: Calls = Arc::default();
        let layered: Calls = Arc::default();
        let sink = layered.clone();
        let fmt_out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let fmt_sink = fmt_out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
                    .with_writer(move || Sink(fmt_sink.clone()))
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .with(ProgressLayer::new(move |id: &str, n: usize| {
                sink.lock().unwrap().push((id.to_owned(), n))
            }));
        run_dag(
            &ctx,
            Some(subscriber.into()),
            with_boom,
            Some(direct.clone()),
        );

        let direct = direct.lock().unwrap().clone();
        let layered = layered.lock().unwrap().clone();
        let n = WIDTH; // `boom` is never reported
        let mut expected_ids = ids(false);
        expected_ids.sort();
        assert_eq!(
            sorted_ids(&direct),
            expected_ids,
            "with_progress: each id once"
        );
        assert_eq!(
            sorted_ids(&layered),
            expected_ids,
            "ProgressLayer: each id once"
        );
        assert_eq!(sorted_counts(&direct), (1..=n).collect::<Vec<_>>());
        assert_eq!(sorted_counts(&layered), (1..=n).collect::<Vec<_>>());

        let fmt_out = String::from_utf8(fmt_out.lock().unwrap().clone()).unwrap();
        let task_closes = fmt_out
            .lines()
            .filter(|l| l.contains("duraflow.task{") && l.contains(": close "))
            .count();
        assert_eq!(
            task_closes,
            WIDTH + usize::from(with_boom),
            "the fmt layer beside ProgressLayer saw every task span close"
        );
    }
}

struct Sink(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn progress_layer_reports_like_with_progress_memory_store() {
    layer_matches_with_progress(Arc::new(Context::new(MemoryStore::new())));
}

#[test]
fn progress_layer_reports_like_with_progress_sled_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path().join("db")).unwrap();
    layer_matches_with_progress(Arc::new(Context::new(store)));
}

#[test]
fn progress_layer_reports_a_standalone_durable_as_a_run_of_one() {
    let _serial = serial();
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let calls: Calls = Arc::default();
    let sink = calls.clone();
    let subscriber =
        tracing_subscriber::registry().with(ProgressLayer::new(move |id: &str, n: usize| {
            sink.lock().unwrap().push((id.to_owned(), n))
        }));
    let _default = tracing::subscriber::set_default(subscriber);
    let rt = multi_thread_rt();
    for _ in 0..2 {
        let durable = duraflow_rs::Durable::new("solo", ctx.clone(), Val(4), None);
        assert_eq!(rt.block_on(durable.run_result(())).unwrap(), 4);
    }
    assert_eq!(
        *calls.lock().unwrap(),
        vec![("solo".to_owned(), 1), ("solo".to_owned(), 1)]
    );
}

/// Fails (returns `Err`) on its first call, then returns `Ok(5)`; clones share the count.
#[derive(Clone, Default)]
struct FailsOnce(Arc<AtomicUsize>);

#[task]
impl FailsOnce {
    async fn run(&self) -> Result<u64, String> {
        match self.0.fetch_add(1, Ordering::SeqCst) {
            0 => Err("first call fails".into()),
            _ => Ok(5),
        }
    }
}

#[test]
fn a_retried_task_has_a_span_per_attempt_and_is_reported_once() {
    let _serial = serial();
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let direct: Calls = Arc::default();
    let layered: Calls = Arc::default();
    let capture = SpanCapture::default();
    let sink = layered.clone();
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(ProgressLayer::new(move |id: &str, n: usize| {
            sink.lock().unwrap().push((id.to_owned(), n))
        }));
    let _default = tracing::subscriber::set_default(subscriber);
    let rt = multi_thread_rt();
    let dag = DagRunner::new();
    let sink = direct.clone();
    let d = DurableDag::new(&dag, ctx.clone())
        .with_progress(move |id, n| sink.lock().unwrap().push((id.to_owned(), n)));
    let policy = RetryPolicy::attempts(2)
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .jitter(false);
    let flaky = d.add_fallible_with("flaky", FailsOnce::default(), policy);
    for i in 0..10 {
        d.add(&format!("val/{i}"), Val(i));
    }
    rt.block_on(dag.run(|f| {
        tokio::spawn(f);
    }))
    .unwrap();
    assert_eq!(dag.get(flaky).unwrap(), Ok(5));
    drop(d);

    let attempts: Vec<(String, String)> = capture
        .spans()
        .iter()
        .filter(|s| s.name == "duraflow.task" && s.field("task.id") == Some("flaky"))
        .map(|s| {
            let field = |name| s.field(name).unwrap_or_default().to_owned();
            (field("attempt"), field("outcome"))
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("1".into(), "failed".into()),
            ("2".into(), "executed".into())
        ],
        "one span per attempt"
    );
    let direct = direct.lock().unwrap().clone();
    let layered = layered.lock().unwrap().clone();
    assert_eq!(sorted_ids(&layered), sorted_ids(&direct));
    assert_eq!(sorted_ids(&layered).len(), 11, "flaky reported once");
    assert_eq!(sorted_counts(&layered), (1..=11).collect::<Vec<_>>());
    assert_eq!(sorted_counts(&direct), (1..=11).collect::<Vec<_>>());
}

#[test]
fn with_progress_needs_no_subscriber() {
    let _serial = serial();
    let no_subscriber =
        tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>());
    assert!(no_subscriber, "this test runs with no subscriber at all");
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    for round in 0..2 {
        let calls: Calls = Arc::default();
        assert!(run_dag(&ctx, None, false, Some(calls.clone())));
        let calls = calls.lock().unwrap().clone();
        let mut expected = ids(false);
        expected.sort();
        assert_eq!(sorted_ids(&calls), expected, "round {round}");
        assert_eq!(sorted_counts(&calls), (1..=WIDTH).collect::<Vec<_>>());
    }
    assert_eq!(ctx.completed_count.load(Ordering::SeqCst), 2 * WIDTH);
}
