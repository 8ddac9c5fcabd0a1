//! The `duraflow.run` and `duraflow.task` spans, and the subscriber a run's tasks are
//! polled with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tracing::level_filters::LevelFilter;

use crate::RunStats;

/// The spans of one run: its own, and what its task spans need.
pub(crate) struct RunSpans {
    /// The run's id in spans.
    run_id: u64,
    /// The `duraflow.run` span (the parent of its tasks'), taken out when the run ends.
    span: Mutex<Option<tracing::Span>>,
    parent: Option<tracing::Id>,
    /// The subscriber that was current when the run was made, if any: every task's future
    /// is polled with it as the default, so spans reach it from whatever worker thread runs
    /// the task.
    pub(crate) dispatch: Option<tracing::Dispatch>,
    /// Set once the run had tracing's interest cache rebuilt (see [`fresh_span`]).
    rebuilt: AtomicBool,
}

impl RunSpans {
    /// Opens the `duraflow.run` span of run `run_id` over a store of kind `store`.
    pub(crate) fn new(run_id: u64, store: &'static str) -> RunSpans {
        let dispatch = tracing::dispatcher::get_default(|d| {
            (!d.is::<tracing::subscriber::NoSubscriber>()).then(|| d.clone())
        });
        let make = || {
            tracing::info_span!(
                "duraflow.run",
                run.id = run_id,
                store,
                executed = tracing::field::Empty,
                cached = tracing::field::Empty,
                failed = tracing::field::Empty,
            )
        };
        let rebuilt = AtomicBool::new(false);
        let span = fresh_span(make, &rebuilt);
        RunSpans {
            run_id,
            parent: span.id(),
            span: Mutex::new(Some(span)),
            dispatch,
            rebuilt,
        }
    }

    /// A span for attempt `attempt` at task `id`, a child of the run's span. Made inside the
    /// task's future, which is polled with [`dispatch`](Self::dispatch) as the default.
    pub(crate) fn task(&self, id: &str, attempt: u32) -> tracing::Span {
        let make = || {
            tracing::info_span!(
                parent: self.parent.clone(),
                "duraflow.task",
                task.id = id,
                run.id = self.run_id,
                attempt,
                outcome = tracing::field::Empty,
            )
        };
        fresh_span(make, &self.rebuilt)
    }

    /// Records the run's counts on its span and lets it close. Later calls do nothing.
    pub(crate) fn close(&self, stats: RunStats) {
        let span = self
            .span
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(span) = span {
            span.record("executed", stats.executed);
            span.record("cached", stats.cached);
            span.record("failed", stats.failed);
        }
    }
}

/// A span from `make`, made again after rebuilding tracing's interest cache (at most once
/// per run: `rebuilt`) if it came out disabled although tracing's level filter takes `INFO`:
/// a call site first reached outside a scoped subscriber keeps the "no" it cached there
/// while one `Dispatch` is all there is (tokio-rs/tracing#3611).
fn fresh_span(make: impl Fn() -> tracing::Span, rebuilt: &AtomicBool) -> tracing::Span {
    let span = make();
    let stale = span.is_disabled() && LevelFilter::current() >= LevelFilter::INFO;
    if stale && !rebuilt.swap(true, Ordering::Relaxed) {
        tracing::callsite::rebuild_interest_cache();
        return make();
    }
    span
}
