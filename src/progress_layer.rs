//! [`ProgressLayer`]: progress reporting from the `duraflow.task` spans, as a
//! `tracing_subscriber::Layer`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
        ProgressLayer {
            callback: Arc::new(callback),
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
struct RunProgress(AtomicUsize);

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
                    .insert(RunProgress(AtomicUsize::new(0)));
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
            return;
        };
        if !task.completed {
            return;
        }
        let count = task
            .parent
            .as_ref()
            .and_then(|parent| ctx.span(parent))
            .filter(|run| is(run.metadata(), RUN_SPAN))
            .and_then(|run| {
                let extensions = run.extensions();
                let progress = extensions.get::<RunProgress>()?;
                Some(progress.0.fetch_add(1, Ordering::SeqCst) + 1)
            });
        let completed = count.unwrap_or_else(|| self.unattached.fetch_add(1, Ordering::SeqCst) + 1);
        (self.callback)(&task.id, completed);
    }
}
