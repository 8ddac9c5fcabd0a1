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
///   reached duraflow's call sites first: a run made in a scope has tracing re-ask every
///   call site whether it is enabled (tracing would otherwise keep the "no" it cached for a
///   thread without the subscriber, tokio-rs/tracing#3611).
/// - The callback runs inside the subscriber, on the thread that closed the span: keep it
///   short, and do not let it panic.
pub struct ProgressLayer {
    callback: ProgressFn,
    /// This layer's number among every `ProgressLayer` of the process (see [`LAST_RUN`]).
    serial: u64,
    /// The count of tasks whose `duraflow.run` span this layer does not see.
    unattached: AtomicUsize,
    /// The open `duraflow.task` spans, by span id, in shards. Kept here rather than in each
    /// span's extensions: a shard is one uncontended lock and a small map, where the
    /// registry's extensions cost a span lookup and a boxed entry per span, three times
    /// over a task's life.
    tasks: Box<[TaskShard]>,
}

/// Shards of [`ProgressLayer::tasks`]: tasks ending on different threads rarely share one.
const TASK_SHARDS: usize = 16;

/// One shard of open task spans, on its own cache line(s).
#[repr(align(128))]
#[derive(Default)]
struct TaskShard(Mutex<HashMap<u64, TaskProgress, foldhash::fast::RandomState>>);

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
            tasks: (0..TASK_SHARDS).map(|_| TaskShard::default()).collect(),
        }
    }

    /// The shard holding task span `id`, locked. Every critical section is one map call, so
    /// a poisoned lock holds a consistent map.
    fn shard(
        &self,
        id: &Id,
    ) -> MutexGuard<'_, HashMap<u64, TaskProgress, foldhash::fast::RandomState>> {
        let shard = &self.tasks[(id.into_u64() % TASK_SHARDS as u64) as usize];
        shard.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for ProgressLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressLayer").finish_non_exhaustive()
    }
}

/// The count of a run's reported tasks, kept in its `duraflow.run` span's extensions.
#[derive(Default)]
struct RunProgress {
    count: AtomicUsize,
    /// Set when the run's span closes, after which its span id may name another span.
    closed: AtomicBool,
}

/// A `duraflow.run` span's [`RunProgress`], as its extensions hold it.
struct RunCounter(Arc<RunProgress>);

thread_local! {
    /// The run this thread last counted a task of, for one layer: `(layer serial, run span
    /// id, its progress)`. A task's run span is open while the task's span closes (the task
    /// holds it), and ids are unique among open spans; so while the cached run is not closed,
    /// a task whose parent has the cached id belongs to it. That spares the lookup of the run
    /// span and of its extensions (atomic operations on cache lines every worker shares) for
    /// all but a thread's first task of each run.
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
            self.shard(id).insert(id.into_u64(), task);
        } else if is(metadata, RUN_SPAN) {
            if let Some(span) = ctx.span(id) {
                span.extensions_mut()
                    .insert(RunCounter(Arc::new(RunProgress::default())));
            }
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: LayerContext<'_, S>) {
        // The fields first: most records (any span's but a task's `outcome`) need no lock.
        let mut fields = TaskFields::default();
        values.record(&mut fields);
        if fields.id.is_none() && fields.outcome.is_none() {
            return;
        }
        if let Some(task) = self.shard(id).get_mut(&id.into_u64()) {
            if let Some(id) = fields.id {
                task.id = id;
            }
            if let Some(completed) = fields.outcome {
                task.completed = completed;
            }
        }
    }

    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        // Taken out first, so no lock is held while the callback runs.
        let Some(task) = self.shard(&id).remove(&id.into_u64()) else {
            self.closing_run(&id, &ctx);
            return;
        };
        if !task.completed {
            return;
        }
        let count = task
            .parent
            .as_ref()
            .and_then(|run| self.count_in(run, &ctx));
        let completed = count.unwrap_or_else(|| self.unattached.fetch_add(1, Ordering::SeqCst) + 1);
        (self.callback)(&task.id, completed);
    }
}

impl ProgressLayer {
    /// Counts one reported task of the run whose span is `run` (the task's open parent), and
    /// returns that run's count so far; `None` if `run` is not a `duraflow.run` span this
    /// layer saw open.
    fn count_in<S>(&self, run: &Id, ctx: &LayerContext<'_, S>) -> Option<usize>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let key = (self.serial, run.into_u64());
        let cached = LAST_RUN.with(|last| match &*last.borrow() {
            Some((serial, id, progress))
                if (*serial, *id) == key && !progress.closed.load(Ordering::Acquire) =>
            {
                Some(progress.count.fetch_add(1, Ordering::SeqCst) + 1)
            }
            _ => None,
        });
        if cached.is_some() {
            return cached;
        }
        let span = ctx.span(run).filter(|span| is(span.metadata(), RUN_SPAN))?;
        let progress = Arc::clone(&span.extensions().get::<RunCounter>()?.0);
        let count = progress.count.fetch_add(1, Ordering::SeqCst) + 1;
        LAST_RUN.with(|last| *last.borrow_mut() = Some((key.0, key.1, progress)));
        Some(count)
    }

    /// Marks the run whose span `id` is closing as closed, if it is a `duraflow.run` span.
    fn closing_run<S>(&self, id: &Id, ctx: &LayerContext<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if let Some(span) = ctx.span(id).filter(|span| is(span.metadata(), RUN_SPAN)) {
            if let Some(counter) = span.extensions().get::<RunCounter>() {
                counter.0.closed.store(true, Ordering::Release);
            }
        }
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
}
