//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod pg;

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use dagx::{task, Task};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::Layer;

/// A task returning its value.
#[derive(Clone)]
pub struct Val(pub u64);
#[task]
impl Val {
    async fn run(&self) -> u64 {
        self.0
    }
}

/// A task adding one to its input.
#[derive(Clone)]
pub struct Inc;
#[task]
impl Inc {
    async fn run(&self, x: &u64) -> u64 {
        x + 1
    }
}

/// A task that panics.
#[derive(Clone)]
pub struct Boom;
#[task]
impl Boom {
    async fn run(&self) -> u64 {
        panic!("boom")
    }
}

/// Two of these meet: each waits (up to 10 s) until both have started. A worker thread
/// blocked in one cannot start the other, so once both have met they ran on two different
/// worker threads, at the same time.
#[derive(Clone, Default)]
pub struct Meet(pub Arc<(Mutex<usize>, Condvar)>);

#[task]
impl Meet {
    async fn run(&self) -> u64 {
        let (arrived, cv) = &*self.0;
        let mut n = arrived.lock().unwrap();
        *n += 1;
        cv.notify_all();
        let (n, _) = cv
            .wait_timeout_while(n, Duration::from_secs(10), |n| *n < 2)
            .unwrap();
        assert_eq!(*n, 2, "the two Meet tasks never ran at the same time");
        0
    }
}

/// A tracing event as the capture layer saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: tracing::Level,
    pub fields: Vec<(String, String)>,
}

impl Captured {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<Captured>>>);

impl Capture {
    pub fn events(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }
    pub fn at(&self, level: tracing::Level) -> Vec<Captured> {
        self.events()
            .into_iter()
            .filter(|e| e.level == level)
            .collect()
    }
}

struct FieldsVisitor<'a>(&'a mut Vec<(String, String)>);
impl Visit for FieldsVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Capture>> = const { RefCell::new(None) };
}

/// Routes each event to the capture of the thread that emitted it.
struct Router;

impl<S: tracing::Subscriber> Layer<S> for Router {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: LayerContext<'_, S>) {
        CURRENT.with(|current| {
            if let Some(cap) = current.borrow().as_ref() {
                let mut fields = Vec::new();
                event.record(&mut FieldsVisitor(&mut fields));
                cap.0.lock().unwrap().push(Captured {
                    level: *event.metadata().level(),
                    fields,
                });
            }
        });
    }
}

pub struct CaptureGuard;
impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
    }
}

/// Captures the events emitted on the current thread until the guard drops (use a
/// current-thread runtime). One global subscriber serves every test of the binary: with
/// per-thread default subscribers, tests running in parallel race on tracing's per-callsite
/// interest cache and events go missing.
pub fn capture() -> (CaptureGuard, Capture) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Router))
            .unwrap();
    });
    let cap = Capture::default();
    CURRENT.with(|current| *current.borrow_mut() = Some(cap.clone()));
    (CaptureGuard, cap)
}

pub fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn multi_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The directory a child-process test was handed in the environment variable `var`, or
/// `None` (saying so) when the test runs on its own, as under `cargo test -- --ignored`:
/// it then has nothing to do.
pub fn child_dir(var: &str, who: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os(var).map(std::path::PathBuf::from);
    if dir.is_none() {
        eprintln!("{who}: {var} is not set; nothing to do");
    }
    dir
}

/// The number a child-process test was handed in the environment variable `var`. Panics
/// (failing the child, which its parent reports) when it is missing or not a number.
pub fn env_number<T: std::str::FromStr>(var: &str) -> T {
    let text = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set"));
    text.parse()
        .unwrap_or_else(|_| panic!("{var} is not a number: {text:?}"))
}

/// A command that runs `test`, an ignored test of this same test binary, as a child
/// process: alone, with its output not captured (the parent reads it).
pub fn child_test(test: &str) -> std::process::Command {
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut command = std::process::Command::new(exe);
    command.args([
        "--exact",
        test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    command
}

/// Waits for a store future on this thread.
pub fn wait<F: std::future::Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}

/// Every line a child process reports starts with this (libtest prints its own text, without
/// a newline, before the first one).
pub const MARKER: &str = "@@ ";

/// Spawns `command` with its stdout piped; returns the child and the reports it prints (the
/// text after [`MARKER`] on each line that has it), as they come.
pub fn spawn_reporting(
    mut command: std::process::Command,
) -> (std::process::Child, impl Iterator<Item = String>) {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("the child's stdout");
    let reports = std::io::BufReader::new(stdout)
        .lines()
        .map(|l| l.expect("read the child's stdout"))
        .filter_map(|l| l.split_once(MARKER).map(|(_, r)| r.to_owned()));
    (child, reports)
}
