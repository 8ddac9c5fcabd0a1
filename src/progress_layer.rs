//! [`ProgressLayer`]: progress reporting from the `duraflow.task` spans, as a
//! `tracing_subscriber::Layer`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Metadata, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::ProgressFn;

/// The span of one run (one `DurableDag`, or one standalone `Durable`).
const RUN_SPAN: &str = "duraflow.run";
/// The span of one task of a run, a child of its run's span.
const TASK_SPAN: &str = "duraflow.task";

/// A [`tracing_subscriber::Layer`] that reports progress from duraflow's spans: it calls its
/// callback once for every `duraflow.task` span that closes with `outcome` `executed` or
/// `cached`, with the task's id and how many tasks of that span's run have been reported so
/// far, this one included.
///
/// ```
/// use duraflow_rs::ProgressLayer;
/// use tracing_subscriber::layer::SubscriberExt;
///
/// let subscriber = tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer())
///     .with(ProgressLayer::new(|id: &str, completed: usize| {
///         eprintln!("[{completed}] {id}");
///     }));
/// // tracing::subscriber::set_global_default(subscriber), or `set_default` / `with_default`
/// // around the code that creates the `DurableDag`s.
/// # drop(subscriber);
/// ```
///
/// # `ProgressLayer` or `DurableDag::with_progress`: use one
///
/// Both report the same thing, with the same contract: each task of a run that completes
/// (executed, or cached) is reported exactly once, only after its output is persisted, with
/// its id and the run's running count of reported tasks (this one included); the counts of
/// one run are `1..=n`, each once; failed tasks are not reported. They differ in where they
/// are attached and what they need:
///
/// | | [`DurableDag::with_progress`](crate::DurableDag::with_progress) | `ProgressLayer` |
/// |---|---|---|
/// | attached to | one `DurableDag` (one run) | a subscriber: every run it sees |
/// | needs a subscriber | no: works with none installed | a [`Registry`](tracing_subscriber::Registry)-based one, current where the `DurableDag` is created |
/// | called | by the task, right after its output is persisted | when the task's span closes, just after that |
/// | count | the run's completed tasks | the run's tasks reported by this layer |
///
/// A program needs only one of them; with both, each reports every task. `with_progress`
/// is the direct path (it keeps working with no subscriber, under any filter, and in a build
/// without spans); `ProgressLayer` suits a program that already configures `tracing`
/// and wants progress for every pipeline it runs from one place, next to its other layers.
///
/// # What it needs
/// - The span of each task is polled with the subscriber that was current when its
///   `DurableDag` (or standalone `Durable`) was created, on whichever worker thread runs it,
///   so the layer must be in the subscriber current at that point (the global default, or a
///   scoped one around the creation).
/// - Both spans are at level `INFO`, with a target under `duraflow_rs`: a global filter that
///   disables them (an `EnvFilter` layer at `warn`, say) hides them from this layer too. Put
///   such filters on the other layers (`fmt::layer().with_filter(..)`) instead. If a task's
///   `duraflow.run` span is hidden while its own span is not, its count falls back to one
///   counter shared by every such task of this layer.
/// - A scoped subscriber works even when it is the process's only one and runs without it
///   reached duraflow's call sites first: tracing would keep the "no" it cached there for a
///   thread without the subscriber (tokio-rs/tracing#3611), so a run made in a scope whose
///   span (or a task's) comes out disabled while `INFO` is enabled has tracing re-ask every
///   call site, at most once per run. A site first reached elsewhere during that run (by a
///   concurrent run outside the scope) is re-asked by the next such run.
/// - The callback runs inside the subscriber, on the thread that closed the span: keep it
///   short, and do not let it panic.
pub struct ProgressLayer {
    callback: ProgressFn,
    /// This layer's number among every `ProgressLayer` of the process (see [`LAST_RUN`]).
    serial: u64,
    /// The count of tasks whose `duraflow.run` span this layer does not see.
    unattached: AtomicUsize,
    /// The open `duraflow.task` and `duraflow.run` spans this layer saw, by span id, in
    /// shards. Kept here rather than in each span's extensions: a shard is one uncontended
    /// lock and a small map, where the registry's extensions cost a span lookup and a boxed
    /// entry per span, three times over a task's life; and the extensions are shared by
    /// every layer, so two `ProgressLayer`s in one subscriber would collide there.
    open: Box<[SpanShard]>,
}

/// Shards of [`ProgressLayer::open`]: tasks ending on different threads rarely share one.
const SHARDS: usize = 16;

/// An open span the layer keeps track of.
enum Open {
    Task(TaskProgress),
    Run(Arc<RunProgress>),
}

/// The map of one shard.
type SpanMap = HashMap<u64, Open, foldhash::fast::RandomState>;

/// One shard of open spans, on its own cache line(s).
#[repr(align(128))]
#[derive(Default)]
struct SpanShard(Mutex<SpanMap>);

impl ProgressLayer {
    /// A layer calling `callback(task_id, completed)` once per completed task, as described
    /// on [`ProgressLayer`].
    pub fn new<F>(callback: F) -> ProgressLayer
    where
        F: Fn(&str, usize) + Send + Sync + 'static,
    {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        ProgressLayer {
            callback: Arc::new(callback),
            serial: NEXT.fetch_add(1, Ordering::Relaxed),
            unattached: AtomicUsize::new(0),
            open: (0..SHARDS).map(|_| SpanShard::default()).collect(),
        }
    }

    /// The shard holding span `id`, locked. Every critical section is one map call, so a
    /// poisoned lock holds a consistent map.
    fn shard(&self, id: &Id) -> MutexGuard<'_, SpanMap> {
        let shard = &self.open[(id.into_u64() % SHARDS as u64) as usize];
        shard.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for ProgressLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressLayer").finish_non_exhaustive()
    }
}

/// The count of a run's reported tasks, kept while its `duraflow.run` span is open.
#[derive(Default)]
struct RunProgress {
    count: AtomicUsize,
    /// Set when the run's span closes, after which its span id may name another span.
    closed: AtomicBool,
}

thread_local! {
    /// The run this thread last counted a task of, for one layer: `(layer serial, run span
    /// id, its progress)`. A task's run span is open while the task's span closes (the task
    /// holds it), and ids are unique among open spans; so while the cached run is not closed,
    /// a task whose parent has the cached id belongs to it. That spares all but a thread's
    /// first task of each run the lookup of the run in the layer's map: a lock of the one
    /// shard every task of the run would share between the worker threads.
    static LAST_RUN: RefCell<Option<(u64, u64, Arc<RunProgress>)>> = const { RefCell::new(None) };
}

/// What the layer keeps of one open `duraflow.task` span.
struct TaskProgress {
    id: Box<str>,
    /// Set when `outcome` is recorded as `executed` or `cached`.
    completed: bool,
    /// The span's parent (its run's span, for duraflow's own).
    parent: Option<Id>,
}

/// The fields of a `duraflow.task` span this layer reads.
#[derive(Default)]
struct TaskFields {
    id: Option<Box<str>>,
    outcome: Option<bool>,
}

impl Visit for TaskFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "task.id" => self.id = Some(value.into()),
            "outcome" => self.outcome = Some(matches!(value, "executed" | "cached")),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // duraflow records both as `&str`; this only serves a value recorded otherwise.
        if matches!(field.name(), "task.id" | "outcome") {
            let text = format!("{value:?}");
            self.record_str(field, text.trim_matches('"'));
        }
    }

    // The other fields (`run.id`, `attempt`) are numbers: skip them without the default
    // detour through `record_debug`.
    fn record_u64(&mut self, _: &Field, _: u64) {}
    fn record_i64(&mut self, _: &Field, _: i64) {}
    fn record_bool(&mut self, _: &Field, _: bool) {}
}

/// Whether `metadata` is the duraflow span `name` (not a user's span of the same name).
fn is(metadata: &Metadata<'_>, name: &str) -> bool {
    metadata.name() == name && metadata.target().starts_with("duraflow_rs")
}

impl<S> Layer<S> for ProgressLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let metadata = attrs.metadata();
        if is(metadata, TASK_SPAN) {
            let mut fields = TaskFields::default();
            attrs.record(&mut fields);
            let parent = match attrs.parent() {
                Some(parent) => Some(parent.clone()),
                None if attrs.is_contextual() => ctx.current_span().id().cloned(),
                None => None,
            };
            let task = TaskProgress {
                id: fields.id.unwrap_or_default(),
                completed: fields.outcome.unwrap_or(false),
                parent,
            };
            self.shard(id).insert(id.into_u64(), Open::Task(task));
        } else if is(metadata, RUN_SPAN) {
            let run = Open::Run(Arc::new(RunProgress::default()));
            self.shard(id).insert(id.into_u64(), run);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: LayerContext<'_, S>) {
        // The fields first: most records (any span's but a task's `outcome`) need no lock.
        let mut fields = TaskFields::default();
        values.record(&mut fields);
        if fields.id.is_none() && fields.outcome.is_none() {
            return;
        }
        if let Some(Open::Task(task)) = self.shard(id).get_mut(&id.into_u64()) {
            if let Some(id) = fields.id {
                task.id = id;
            }
            if let Some(completed) = fields.outcome {
                task.completed = completed;
            }
        }
    }

    fn on_close(&self, id: Id, _ctx: LayerContext<'_, S>) {
        // Taken out first, so no lock is held while the callback runs.
        let task = match self.shard(&id).remove(&id.into_u64()) {
            Some(Open::Task(task)) => task,
            Some(Open::Run(run)) => {
                run.closed.store(true, Ordering::Release);
                return;
            }
            None => return,
        };
        if !task.completed {
            return;
        }
        let count = task.parent.as_ref().and_then(|run| self.count_in(run));
        let completed = count.unwrap_or_else(|| self.unattached.fetch_add(1, Ordering::SeqCst) + 1);
        (self.callback)(&task.id, completed);
    }
}

impl ProgressLayer {
    /// Counts one reported task of the run whose span is `run` (the task's parent, open
    /// while the task's span closes), and returns that run's count so far; `None` if `run`
    /// is not a `duraflow.run` span this layer saw open.
    fn count_in(&self, run: &Id) -> Option<usize> {
        let key = (self.serial, run.into_u64());
        // `try_with`: a span may close while the thread's locals are being destroyed.
        let cached = LAST_RUN
            .try_with(|last| match &*last.borrow() {
                Some((serial, id, progress))
                    if (*serial, *id) == key && !progress.closed.load(Ordering::Acquire) =>
                {
                    Some(progress.count.fetch_add(1, Ordering::SeqCst) + 1)
                }
                _ => None,
            })
            .ok()
            .flatten();
        if cached.is_some() {
            return cached;
        }
        let progress = match self.shard(run).get(&key.1) {
            Some(Open::Run(progress)) => Arc::clone(progress),
            Some(Open::Task(_)) | None => return None,
        };
        let count = progress.count.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = LAST_RUN.try_with(|last| *last.borrow_mut() = Some((key.0, key.1, progress)));
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// Opens a task span of `run` (made here, so its target is under `duraflow_rs`), records
    /// it as executed and closes it.
    fn task(run: &tracing::Span, id: &str) {
        let span = tracing::info_span!(parent: run, "duraflow.task", task.id = id, outcome = tracing::field::Empty);
        span.record("outcome", "executed");
    }

    #[test]
    fn counts_restart_per_run_and_stay_apart_for_runs_open_at_once() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let layer = ProgressLayer::new(move |id: &str, n: usize| {
            seen.lock().unwrap().push((id.to_owned(), n));
        });
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            // Runs one after another: each closes before the next opens (the registry may
            // give the next one a recycled slot), and each counts from 1.
            for _ in 0..20 {
                let run = tracing::info_span!("duraflow.run");
                task(&run, "a");
                task(&run, "b");
            }
            // Two runs open at once, their tasks alternating on this thread.
            let (x, y) = (
                tracing::info_span!("duraflow.run"),
                tracing::info_span!("duraflow.run"),
            );
            for _ in 0..3 {
                task(&x, "x");
                task(&y, "y");
            }
        });
        let calls = calls.lock().unwrap();
        let mut expected: Vec<(String, usize)> = (0..20)
            .flat_map(|_| [("a".to_owned(), 1), ("b".to_owned(), 2)])
            .collect();
        expected.extend((1..=3).flat_map(|n| [("x".to_owned(), n), ("y".to_owned(), n)]));
        assert_eq!(*calls, expected);
    }

    #[test]
    fn two_layers_in_one_subscriber_each_count_every_task() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let layer = |name: &'static str| {
            let seen = Arc::clone(&calls);
            ProgressLayer::new(move |id: &str, n: usize| {
                seen.lock().unwrap().push((name, id.to_owned(), n));
            })
        };
        let subscriber = tracing_subscriber::registry()
            .with(layer("first"))
            .with(layer("second"));
        tracing::subscriber::with_default(subscriber, || {
            let run = tracing::info_span!("duraflow.run");
            task(&run, "a");
            task(&run, "b");
        });
        let mut calls = calls.lock().unwrap().clone();
        calls.sort();
        let call = |layer, id: &str, n| (layer, id.to_owned(), n);
        assert_eq!(
            calls,
            [
                call("first", "a", 1),
                call("first", "b", 2),
                call("second", "a", 1),
                call("second", "b", 2)
            ]
        );
    }
}
