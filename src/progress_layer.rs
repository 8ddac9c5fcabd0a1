//! [`ProgressLayer`]: progress reporting from the `duraflow.task` spans, as a
//! `tracing_subscriber::Layer`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

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
/// Both report each task of a run that completes (executed, or cached) exactly once, after
/// its output is persisted, with its id and the run's running count (`1..=n`); failed tasks
/// are not reported. [`DurableDag::with_progress`](crate::DurableDag::with_progress) serves
/// one run and needs no subscriber; `ProgressLayer` serves every run its
/// [`Registry`](tracing_subscriber::Registry)-based subscriber sees, beside its other layers.
///
/// # What it needs
/// - The layer must be in the subscriber current where the `DurableDag` (or standalone
///   `Durable`) is created (the global default, or a scoped one): each task is polled with
///   that subscriber on whichever worker thread runs it.
/// - Both spans are `INFO`, with a target under `duraflow_rs`: a global filter that disables
///   them hides them from this layer too (filter the other layers instead). A task whose
///   `duraflow.run` span is hidden counts in one counter shared by every such task.
/// - The callback runs inside the subscriber, on the thread that closed the span: keep it
///   short, and do not let it panic.
pub struct ProgressLayer {
    callback: ProgressFn,
    /// This layer's number among every `ProgressLayer` of the process: its key in the
    /// counts a run span carries, so two layers in one subscriber count apart.
    serial: u64,
    /// The count of tasks whose `duraflow.run` span this layer does not see.
    unattached: AtomicUsize,
}

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
        }
    }
}

impl std::fmt::Debug for ProgressLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressLayer").finish_non_exhaustive()
    }
}

/// In a `duraflow.run` span's extensions: the count of its reported tasks, per layer.
#[derive(Default)]
struct RunCounts(Vec<(u64, AtomicUsize)>);

/// In a `duraflow.task` span's extensions: what it says of its task (the same for every
/// layer, which may each record it).
#[derive(Default)]
struct TaskFields {
    id: Option<Box<str>>,
    /// Whether `outcome` is `executed` or `cached`.
    completed: Option<bool>,
}

impl Visit for TaskFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "task.id" => self.id = Some(value.into()),
            "outcome" => self.completed = Some(matches!(value, "executed" | "cached")),
            _ => {}
        }
    }

    /// duraflow records both fields as `&str`: nothing else is read.
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
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
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if is(attrs.metadata(), TASK_SPAN) {
            let mut fields = TaskFields::default();
            attrs.record(&mut fields);
            extensions.replace(fields);
        } else if is(attrs.metadata(), RUN_SPAN) {
            if extensions.get_mut::<RunCounts>().is_none() {
                extensions.insert(RunCounts::default());
            }
            if let Some(counts) = extensions.get_mut::<RunCounts>() {
                counts.0.push((self.serial, AtomicUsize::new(0)));
            }
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if !is(span.metadata(), TASK_SPAN) {
            return;
        }
        let mut recorded = TaskFields::default();
        values.record(&mut recorded);
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<TaskFields>() {
            fields.id = recorded.id.or(fields.id.take());
            fields.completed = recorded.completed.or(fields.completed);
        }
    }

    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let task = match span.extensions().get::<TaskFields>() {
            Some(TaskFields {
                id: Some(task),
                completed: Some(true),
            }) => task.clone(),
            _ => return,
        };
        // A task's run span is open while the task's span closes: the task holds it.
        let count = span
            .parent()
            .filter(|run| is(run.metadata(), RUN_SPAN))
            .and_then(|run| {
                let extensions = run.extensions();
                let counts = &extensions.get::<RunCounts>()?.0;
                let (_, count) = counts.iter().find(|(layer, _)| *layer == self.serial)?;
                Some(count.fetch_add(1, Ordering::SeqCst) + 1)
            });
        let completed = count.unwrap_or_else(|| self.unattached.fetch_add(1, Ordering::SeqCst) + 1);
        (self.callback)(&task, completed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
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
