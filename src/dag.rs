//! [`DurableDag`]: adds durable tasks to a dagx [`DagRunner`].

use std::sync::Arc;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dagx::{DagRunner, Task};
use serde::{de::DeserializeOwned, Serialize};

use crate::fingerprint::{self, Digest, Why};
use crate::run::{RunState, RunStats};
use crate::slot::{probe, KeyedSpec, Probed, Slot};
use crate::task::DurableTask;
use std::fmt::Display;

use crate::retry::Retry;
use crate::{
    validate_key, Context, Durable, DuraflowError, Fallible, OutputKind, Plain, RetryPolicy,
};

/// Adds tasks to a dagx [`DagRunner`] so that each one's output is persisted in a
/// [`Context`] under the id it is given, and reused instead of recomputed on a later run.
///
/// One `DurableDag` is one run: its tasks share one progress callback and one set of
/// counters ([`stats`](DurableDag::stats)). Task ids must be unique within it.
pub struct DurableDag<'a> {
    dag: &'a DagRunner,
    run: Arc<RunState>,
}

impl std::fmt::Debug for DurableDag<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableDag")
            .field("ctx", &self.run.ctx)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<'a> DurableDag<'a> {
    /// A durable view of `dag` persisting into `ctx`.
    pub fn new(dag: &'a DagRunner, ctx: Arc<Context>) -> Self {
        DurableDag {
            dag,
            run: Arc::new(RunState::new(ctx, None)),
        }
    }

    /// Calls `handler(id, completed)` once per task of this run, executed or cached, after
    /// its output is persisted; `completed` counts this run's completed tasks, this one
    /// included. Tasks that fail are not reported.
    ///
    /// A run has one handler: a second call leaves the first in place (a `tracing::warn!`
    /// says so). A panic in the handler is caught and logged, and the run goes on.
    pub fn with_progress<F>(self, handler: F) -> Self
    where
        F: Fn(&str, usize) + Send + Sync + 'static,
    {
        if self.run.progress.set(Arc::new(handler)).is_err() {
            tracing::warn!("with_progress called twice: the first handler stays");
        }
        self
    }

    /// Adds `task` under `id`: its output is reused by any later run while one is stored
    /// under `id`, whatever the task's parameters or inputs (see
    /// [`add_keyed`](DurableDag::add_keyed) for outputs that follow them). `.depends_on(..)`
    /// and `dag.get(..)` work on what it returns as on dagx's builder.
    ///
    /// # Panics
    /// When `id` is already used in this `DurableDag` or is not a valid key (empty or over
    /// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes); the message names the id. Use
    /// [`try_add`](DurableDag::try_add) to get the error instead.
    pub fn add<Tk>(&self, id: &str, task: Tk) -> DurableTask<'a, Tk, Plain>
    where
        Tk: Task + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        or_panic("DurableDag::add", self.try_add(id, task))
    }

    /// Like [`add`](DurableDag::add), returning an error instead of panicking.
    ///
    /// # Errors
    /// [`DuraflowError::DuplicateTaskId`] when `id` is already used in this `DurableDag`;
    /// [`DuraflowError::InvalidKey`] when `id` is empty or too long.
    pub fn try_add<Tk>(
        &self,
        id: &str,
        task: Tk,
    ) -> Result<DurableTask<'a, Tk, Plain>, DuraflowError>
    where
        Tk: Task + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.add_task(id, task, None, None)
    }

    /// Adds a task whose output is a `Result`: `Ok(T)` is persisted (as a `T`, so
    /// `Context::get::<T>` reads it) and reused by later runs; an `Err` is recorded as a
    /// failed attempt with the error's text, never persisted, and handed to dependents as
    /// dagx would. A panic is a failed attempt too. The task is attempted once per run (see
    /// [`add_fallible_with`](DurableDag::add_fallible_with) to retry it); a later run executes
    /// a task that ended in `Err` again.
    ///
    /// A dependent receives the `Result` itself. Make dependents fallible too and propagate
    /// the error (as `Result::map` does): a dependent that turns an upstream `Err` into an
    /// `Ok` output has that output stored and reused like any other.
    ///
    /// # Panics
    /// As [`add`](DurableDag::add), when `id` is used already or is not a valid key.
    pub fn add_fallible<Tk, T, E>(&self, id: &str, task: Tk) -> DurableTask<'a, Tk, Fallible>
    where
        Tk: Task<Output = Result<T, E>> + 'static,
        Tk::Input: Clone + 'static,
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Display + Clone + Send + Sync + 'static,
    {
        or_panic(
            "DurableDag::add_fallible",
            self.add_task(id, task, None, None),
        )
    }

    /// [`add_fallible`](DurableDag::add_fallible), attempted again under `policy` while it
    /// fails (returns `Err`, panics or times out) and attempts are left; once they are spent,
    /// the last `Err` goes to dependents.
    ///
    /// Retrying runs a fresh clone of the task on a clone of its input, hence the `Clone`
    /// bounds. dagx hands a task with two or more dependencies its inputs in a form only the
    /// task itself can unpack: such a task is attempted once (a `warn!` says so); give it
    /// one dependency (a task that combines the others) to have it retried.
    ///
    /// # Panics
    /// As [`add`](DurableDag::add).
    pub fn add_fallible_with<Tk, T, E>(
        &self,
        id: &str,
        task: Tk,
        policy: RetryPolicy,
    ) -> DurableTask<'a, Tk, Fallible>
    where
        Tk: Task<Output = Result<T, E>> + Clone + 'static,
        Tk::Input: Clone + Sync + 'static,
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        E: Display + Clone + Send + Sync + 'static,
    {
        let retry = Retry::of(task.clone(), policy);
        or_panic(
            "DurableDag::add_fallible",
            self.add_task(id, task, Some(retry), None),
        )
    }

    /// Adds an infallible task that is attempted again, under `policy`, when it panics or
    /// times out; otherwise as [`add`](DurableDag::add). Retrying runs a fresh clone of the
    /// task on a clone of its input (see [`add_fallible_with`](DurableDag::add_fallible_with)
    /// for tasks with several dependencies).
    ///
    /// # Panics
    /// As [`add`](DurableDag::add).
    pub fn add_with_retry<Tk>(
        &self,
        id: &str,
        task: Tk,
        policy: RetryPolicy,
    ) -> DurableTask<'a, Tk, Plain>
    where
        Tk: Task + Clone + 'static,
        Tk::Input: Clone + Sync + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let retry = Retry::of(task.clone(), policy);
        or_panic(
            "DurableDag::add_with_retry",
            self.add_task(id, task, Some(retry), None),
        )
    }

    /// Adds `task` under `id`, keyed: its stored output is reused only while it was made from
    /// the same things (its fingerprint): the task's parameters (its serialised value), its
    /// type, the code version ([`with_code_version`](DurableDag::with_code_version)) and the
    /// outputs it consumes, and while it is younger than the maximum age
    /// ([`with_max_age`](DurableDag::with_max_age)), if one is set. Otherwise it runs, and
    /// the attempt records why. A task that runs because a consumed output changed, and
    /// produces the same value as before, leaves its own dependents cached (early cutoff).
    /// An output stored by [`add`](DurableDag::add) has no fingerprint: the task runs once.
    ///
    /// # Fingerprints
    /// Stable across processes, platforms and versions of the crate (a test pins them):
    /// - the parameters' digest: BLAKE3 of the task value in MessagePack, named (map) form
    ///   (rmp-serde's `encode::write_named`); an output's digest: the same, of the output;
    /// - the fingerprint: BLAKE3 of `duraflow-rs fingerprint 1\n`, then the task's type
    ///   name (`std::any::type_name`, which moving or renaming the type changes), the
    ///   parameters' digest, the code version, and for each consumed output, in input
    ///   order, its task id and output digest; each string as its length (u32, little
    ///   endian) then its UTF-8 bytes, the number of outputs as a u32 (little endian).
    ///
    /// What the output was made from is stored with it, in its envelope: `explain` and the
    /// attempt records say which part changed.
    ///
    /// Parameters that cannot be serialised fail the task when it runs, and
    /// [`explain`](DurableDag::explain) with the error; [`try_add_keyed`](DurableDag::try_add_keyed)
    /// returns it at once.
    ///
    /// # Panics
    /// As [`add`](DurableDag::add), when `id` is used already or is not a valid key.
    pub fn add_keyed<Tk>(&self, id: &str, task: Tk) -> DurableTask<'a, Tk, Plain>
    where
        Tk: Task + Serialize + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let params = fingerprint::digest(id, &task).map_err(|e| e.to_string());
        or_panic(
            "DurableDag::add_keyed",
            self.add_keyed_with(id, task, params),
        )
    }

    /// Like [`add_keyed`](DurableDag::add_keyed), returning an error instead of panicking.
    ///
    /// # Errors
    /// [`DuraflowError::Encode`] when the task's parameters cannot be serialised;
    /// [`DuraflowError::DuplicateTaskId`]; [`DuraflowError::InvalidKey`].
    pub fn try_add_keyed<Tk>(
        &self,
        id: &str,
        task: Tk,
    ) -> Result<DurableTask<'a, Tk, Plain>, DuraflowError>
    where
        Tk: Task + Serialize + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let params = fingerprint::digest(id, &task)?;
        self.add_keyed_with(id, task, Ok(params))
    }

    fn add_keyed_with<Tk>(
        &self,
        id: &str,
        task: Tk,
        params: Result<Digest, String>,
    ) -> Result<DurableTask<'a, Tk, Plain>, DuraflowError>
    where
        Tk: Task + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let spec = KeyedSpec {
            task_type: std::any::type_name::<Tk>(),
            params,
        };
        self.add_task(id, task, None, Some(spec))
    }

    /// Sets the code version of this DAG's keyed tasks (empty by default): bump it when
    /// their code changes, and their outputs are made again. To follow every release,
    /// pass `env!("CARGO_PKG_VERSION")`; to follow every build, a hash of the sources or
    /// the commit set by a build script (`option_env!("GIT_HASH")`).
    ///
    /// A run has one code version: a second call leaves the first in place (a
    /// `tracing::warn!` says so).
    pub fn with_code_version(self, version: impl Into<String>) -> Self {
        if self.run.code_version.set(version.into()).is_err() {
            tracing::warn!("with_code_version called twice: the first version stays");
        }
        self
    }

    /// Keyed outputs older than `max_age` are made again (by tokio's clock, so a test can
    /// pause and advance it).
    ///
    /// A second call leaves the first in place (a `tracing::warn!` says so).
    pub fn with_max_age(self, max_age: Duration) -> Self {
        if self.run.max_age.set(max_age).is_err() {
            tracing::warn!("with_max_age called twice: the first stays");
        }
        self
    }

    /// What the run would do, before it runs: for every task, in the order added, whether
    /// it will run and why ([`Explanation`]). Reads each stored output once; runs nothing.
    /// A task whose consumed output will be made again is reported as running, although it
    /// may stay cached by early cutoff (if the output comes out the same).
    ///
    /// # Errors
    /// [`DuraflowError::Encode`] for a keyed task whose parameters cannot be serialised; an
    /// error of the store once it has stopped ([`Storage::health`](crate::Storage::health)).
    pub async fn explain(&self) -> Result<Vec<Explanation>, DuraflowError> {
        let max_age = self.run.max_age.get().copied();
        let now_ms = fingerprint::now_ms();
        // What each task explained so far will do, and its stored output's digest.
        let mut runs: HashMap<Arc<str>, bool> = HashMap::new();
        let mut digests: HashMap<Arc<str>, Digest> = HashMap::new();
        let mut explained = Vec::new();
        for slot in self.run.slots() {
            let digest_of = |up: &Slot| match runs.get(&up.id) {
                Some(false) => digests.get(&up.id).copied().ok_or(Why::UpstreamUnknown),
                _ => Err(Why::UpstreamRuns(up.id.to_string())),
            };
            let keyed = slot.key(self.run.code_version(), digest_of);
            let task_type = slot.keyed.as_ref().map_or("", |spec| spec.task_type);
            if let Some(Err(Why::BadParams(message))) = &keyed {
                return Err(DuraflowError::Encode {
                    key: slot.id.to_string(),
                    type_name: task_type,
                    source: rmp_serde::encode::Error::Syntax(message.clone()),
                });
            }
            let probed = match slot.probe {
                Some(probe) => {
                    let needed = slot.needed.load(Ordering::SeqCst);
                    probe(Arc::clone(&self.run.ctx), Arc::clone(&slot.id), needed).await?
                }
                None => Probed::Absent,
            };
            let why = match (keyed, &probed) {
                (_, Probed::Absent) => Why::NeverStored,
                (_, Probed::Unreadable(reason)) => Why::Unreadable(reason.clone()),
                (None, Probed::Stored { .. }) => Why::ById,
                (Some(Err(why)), _) => why,
                (Some(Ok(now)), Probed::Stored { block, .. }) => {
                    let version = slot.code_version(self.run.code_version());
                    let block = block.as_deref();
                    fingerprint::decide(&now, task_type, version, block, now_ms, max_age)
                }
            };
            if let Probed::Stored {
                digest: Some(digest),
                ..
            } = probed
            {
                digests.insert(Arc::clone(&slot.id), digest);
            }
            runs.insert(Arc::clone(&slot.id), why.runs());
            explained.push(Explanation {
                id: slot.id.to_string(),
                why,
            });
        }
        Ok(explained)
    }

    /// Claims `id`, registers the task (keyed if `keyed` says how) and hands the wrapped
    /// task to dagx: the one place tasks are added.
    fn add_task<Tk, K>(
        &self,
        id: &str,
        task: Tk,
        retry: Option<Box<Retry<Tk::Input, Tk::Output>>>,
        keyed: Option<KeyedSpec>,
    ) -> Result<DurableTask<'a, Tk, K>, DuraflowError>
    where
        Tk: Task + 'static,
        Tk::Input: Clone + 'static,
        Tk::Output: Clone + Send + Sync + 'static,
        K: OutputKind<Tk::Output>,
    {
        validate_key(id)?;
        let id = self.run.claim(id)?;
        let slot = Arc::new(Slot::new(id, Some(probe::<K::Stored>), keyed));
        self.run.add_slot(&slot);
        let durable = Durable::in_run(Arc::clone(&slot), task, self.run.clone(), retry);
        let builder = self.dag.add_task(durable);
        Ok(DurableTask::new(builder, self.dag, slot, self.run.clone()))
    }

    /// How this run's tasks have ended so far.
    pub fn stats(&self) -> RunStats {
        self.run.stats()
    }

    /// The context outputs are persisted in.
    pub fn context(&self) -> &Arc<Context> {
        &self.run.ctx
    }
}

/// What [`DurableDag::explain`] says of one task: whether it will run, and why
/// (`Display`: cached; never stored; parameters changed; code version "1" → "2"; upstream
/// `load` will run; expired; stored value unreadable; no fingerprint (added with `add`:
/// cached by id); …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    id: String,
    why: Why,
}

impl Explanation {
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the task will run (a task whose consumed output will be made again may
    /// still stay cached, by early cutoff).
    pub fn will_run(&self) -> bool {
        self.why.runs()
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.why.fmt(f)
    }
}

/// The builder, or a panic naming the method and the error (the panicking `add`s).
fn or_panic<T>(method: &str, added: Result<T, DuraflowError>) -> T {
    added.unwrap_or_else(|error| panic!("{method}: {error}"))
}
