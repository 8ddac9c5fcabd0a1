//! With a *global* default subscriber, a run does not poll its tasks in a scope of its own
//! (every thread sees the global default): the spans must still all arrive, from both worker
//! threads, each task span a child of its run's span, and the run's span must close with the
//! run's counts once its last task is done. `ProgressLayer` in the same subscriber reports
//! every completed task once.
//!
//! The global default can be set once per process, so this binary holds one test.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use common::{multi_thread_rt, Boom, Meet, Val};
use dagx::DagRunner;
use duraflow_rs::{Context, DurableDag, MemoryStore, ProgressLayer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

const WIDTH: usize = 200;

/// One span as the capture layer saw it.
#[derive(Debug, Clone, Default)]
struct Seen {
    name: &'static str,
    parent: Option<u64>,
    fields: HashMap<String, String>,
    closed_on: Option<ThreadId>,
}

/// Every span seen, and the open ones by registry id (ids are reused once a span closes).
type SeenSpans = (Vec<Seen>, HashMap<u64, usize>);

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<SeenSpans>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map(|p| p.id().into_u64());
        let mut seen = Seen {
            name: attrs.metadata().name(),
            parent,
            ..Seen::default()
        };
        attrs.record(&mut Fields(&mut seen.fields));
        let mut all = self.0.lock().unwrap();
        let index = all.0.len();
        all.0.push(seen);
        all.1.insert(id.into_u64(), index);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: LayerContext<'_, S>) {
        let mut all = self.0.lock().unwrap();
        let index = all.1[&id.into_u64()];
        values.record(&mut Fields(&mut all.0[index].fields));
    }

    fn on_close(&self, id: Id, _ctx: LayerContext<'_, S>) {
        let mut all = self.0.lock().unwrap();
        let index = all.1.remove(&id.into_u64()).unwrap();
        all.0[index].closed_on = Some(std::thread::current().id());
    }
}

#[test]
fn spans_reach_a_global_subscriber_from_every_worker() {
    let capture = Capture::default();
    let reported = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reported);
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(ProgressLayer::new(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let rt = multi_thread_rt();
    let ctx = Arc::new(Context::new(MemoryStore::new()));
    let meet = Meet::default();
    let dag = DagRunner::new();
    {
        let d = DurableDag::new(&dag, ctx.clone());
        d.add("meet/0", meet.clone());
        d.add("meet/1", meet);
        for i in 2..WIDTH {
            d.add(&format!("val/{i}"), Val(i as u64));
        }
        d.add("boom", Boom);
        // A panicking task no one depends on leaves `run` Ok (dagx).
        let _ = rt.block_on(dag.run(|f| {
            tokio::spawn(f);
        }));
    }
    drop(dag);

    let (spans, open) = capture.0.lock().unwrap().clone();
    assert!(open.is_empty(), "spans never closed: {open:?}");
    let runs: Vec<_> = spans.iter().filter(|s| s.name == "duraflow.run").collect();
    assert_eq!(runs.len(), 1);
    let run = runs[0];
    assert_eq!(run.fields.get("executed").map(String::as_str), Some("200"));
    assert_eq!(run.fields.get("failed").map(String::as_str), Some("1"));
    let run_id = run.fields["run.id"].clone();

    let tasks: Vec<_> = spans.iter().filter(|s| s.name == "duraflow.task").collect();
    assert_eq!(tasks.len(), WIDTH + 1);
    let ids: HashSet<_> = tasks.iter().map(|t| t.fields["task.id"].clone()).collect();
    assert_eq!(ids.len(), WIDTH + 1, "one span per task");
    for task in &tasks {
        assert_eq!(task.fields["run.id"], run_id);
        let expected = if task.fields["task.id"] == "boom" {
            "failed"
        } else {
            "executed"
        };
        assert_eq!(task.fields["outcome"], expected, "{task:?}");
        // The parent is the run span: the one span with no parent of its own.
        assert!(task.parent.is_some(), "{task:?} has no parent");
    }
    let threads: HashSet<_> = tasks.iter().filter_map(|t| t.closed_on).collect();
    assert!(threads.len() >= 2, "task spans closed on {threads:?} only");
    assert_eq!(reported.load(Ordering::SeqCst), WIDTH);
}
