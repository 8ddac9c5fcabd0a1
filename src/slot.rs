//! [`Slot`]: what a run knows of one of its tasks for keyed tasks — whether it is keyed,
//! the tasks whose outputs it consumes, and its output's digest once it has one. Edges are
//! `Arc`s between slots, set while the DAG is built, so a run reads them without a lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{de::DeserializeOwned, Serialize};

use crate::fingerprint::{self, Digest, Why};
use crate::run::load;
use crate::{Context, StoreFuture};

/// One task of a run.
pub(crate) struct Slot {
    pub(crate) id: Arc<str>,
    /// How to look at its stored output (for `explain`); `None` for a standalone task.
    pub(crate) probe: Option<Probe>,
    /// For a keyed task: what its fingerprint is made of, besides its inputs.
    pub(crate) keyed: Option<KeyedSpec>,
    /// A keyed task's own code version, over the run's.
    pub(crate) code_version: OnceLock<String>,
    /// The tasks whose outputs it consumes, in input order (`None`: a task of no
    /// `DurableDag`); set once, by `depends_on`.
    pub(crate) deps: OnceLock<Vec<Option<Arc<Slot>>>>,
    /// Whether a keyed task consumes its output (its digest is then taken).
    pub(crate) needed: AtomicBool,
    /// Its output's digest, once it has an output in this run and it is needed.
    pub(crate) digest: OnceLock<Digest>,
}

/// What makes a keyed task's fingerprint, besides its inputs and code version.
pub(crate) struct KeyedSpec {
    pub(crate) task_type: &'static str,
    /// The digest of its parameters, or why they could not be serialised.
    pub(crate) params: Result<Digest, String>,
}

/// Looks at a task's stored output, for `explain`: its made block, and its digest when
/// asked.
pub(crate) type Probe = fn(Arc<Context>, Arc<str>, bool) -> StoreFuture<'static, Probed>;

/// What a [`Probe`] found.
pub(crate) enum Probed {
    Absent,
    Unreadable(String),
    Stored {
        block: Option<Vec<u8>>,
        digest: Option<Digest>,
    },
}

/// A task's fingerprint in this run, with what it is made of.
pub(crate) struct Key {
    pub(crate) fingerprint: Digest,
    pub(crate) params: Digest,
    pub(crate) inputs: Vec<(Arc<str>, Digest)>,
}

impl Slot {
    pub(crate) fn new(id: Arc<str>, probe: Option<Probe>, keyed: Option<KeyedSpec>) -> Slot {
        Slot {
            id,
            probe,
            keyed,
            code_version: OnceLock::new(),
            deps: OnceLock::new(),
            needed: AtomicBool::new(false),
            digest: OnceLock::new(),
        }
    }

    /// Records the tasks whose outputs this one consumes; a keyed task needs their digests.
    pub(crate) fn depends(&self, upstream: Vec<Option<Arc<Slot>>>) {
        if self.keyed.is_some() {
            for up in upstream.iter().flatten() {
                up.needed.store(true, Ordering::SeqCst);
            }
        }
        let _ = self.deps.set(upstream);
    }

    /// This keyed task's fingerprint, from `digest_of` each consumed output (this run's,
    /// or as stored, for `explain`): `None` for a task that is not keyed; `Err` with why it
    /// runs when it cannot be known.
    pub(crate) fn key(
        &self,
        run_code_version: &str,
        digest_of: impl Fn(&Slot) -> Result<Digest, Why>,
    ) -> Option<Result<Key, Why>> {
        let spec = self.keyed.as_ref()?;
        let params = match &spec.params {
            Ok(params) => *params,
            Err(reason) => return Some(Err(Why::BadParams(reason.clone()))),
        };
        let mut inputs = Vec::new();
        for up in self.deps.get().into_iter().flatten() {
            let Some(up) = up else {
                return Some(Err(Why::UpstreamUnknown));
            };
            match digest_of(up) {
                Ok(digest) => inputs.push((Arc::clone(&up.id), digest)),
                Err(why) => return Some(Err(why)),
            }
        }
        let code_version = self.code_version(run_code_version);
        let fingerprint = fingerprint::fingerprint(spec.task_type, &params, code_version, &inputs);
        Some(Ok(Key {
            fingerprint,
            params,
            inputs,
        }))
    }

    /// This task's code version: its own, or the run's.
    pub(crate) fn code_version<'a>(&'a self, run_code_version: &'a str) -> &'a str {
        self.code_version
            .get()
            .map_or(run_code_version, String::as_str)
    }

    /// Keeps the digest of `value`, this task's output, if a keyed task consumes it.
    pub(crate) fn note<T: Serialize>(&self, value: &T) {
        if !self.needed.load(Ordering::SeqCst) {
            return;
        }
        match fingerprint::digest(&self.id, value) {
            Ok(digest) => {
                let _ = self.digest.set(digest);
            }
            Err(error) => tracing::warn!(key = &*self.id, %error, "output digest not taken"),
        }
    }
}

/// The [`Probe`] of a task whose stored type is `T`.
pub(crate) fn probe<T: Serialize + DeserializeOwned + Send + 'static>(
    ctx: Arc<Context>,
    id: Arc<str>,
    want_digest: bool,
) -> StoreFuture<'static, Probed> {
    Box::pin(async move {
        Ok(match load::<T>(&ctx, &id).await {
            Ok(None) => Probed::Absent,
            Ok(Some(loaded)) => Probed::Stored {
                digest: match want_digest {
                    true => Some(fingerprint::digest(&id, &loaded.value)?),
                    false => None,
                },
                block: loaded.block,
            },
            Err(error) if ctx.db.health().is_ok() => Probed::Unreadable(error.to_string()),
            Err(error) => return Err(error),
        })
    })
}
