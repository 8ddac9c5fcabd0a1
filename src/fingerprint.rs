//! What a keyed output was made from ([`Made`]), its fingerprint, and why a keyed task runs
//! or is cached ([`Why`]): the one decision both a run and
//! [`DurableDag::explain`](crate::DurableDag::explain) take.
//!
//! The hashes and their encodings are documented at
//! [`DurableDag::add_keyed`](crate::DurableDag::add_keyed), and pinned by the golden test
//! below.

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::DuraflowError;

/// A BLAKE3 hash.
pub(crate) type Digest = [u8; 32];

/// What a keyed output was made from, stored with it (the envelope's "made" block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Made {
    /// `std::any::type_name` of the task.
    pub(crate) task_type: String,
    /// The digest of the task's parameters.
    pub(crate) params: Digest,
    /// The code version the task ran under.
    pub(crate) code_version: String,
    /// Each consumed output, in input order: its task id and its digest.
    pub(crate) inputs: Vec<(String, Digest)>,
    /// When the output was stored, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub(crate) stored_ms: u64,
}

impl Made {
    /// The fingerprint (see the module's docs).
    pub(crate) fn fingerprint(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"duraflow-rs fingerprint 1\n");
        let text = |h: &mut blake3::Hasher, s: &str| {
            h.update(&(s.len() as u32).to_le_bytes());
            h.update(s.as_bytes());
        };
        text(&mut h, &self.task_type);
        h.update(&self.params);
        text(&mut h, &self.code_version);
        h.update(&(self.inputs.len() as u32).to_le_bytes());
        for (id, digest) in &self.inputs {
            text(&mut h, id);
            h.update(digest);
        }
        *h.finalize().as_bytes()
    }

    /// The block stored with the output.
    pub(crate) fn encode(&self) -> Vec<u8> {
        // Plain data of the crate's own: it always serialises.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// The block `bytes`, or `None` when it does not decode.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Made> {
        rmp_serde::from_slice(bytes).ok()
    }
}

/// The digest of `value` in MessagePack, named form (see the module's docs): of a task's
/// parameters, or of an output.
///
/// # Errors
/// [`DuraflowError::Encode`] naming `key` when serde cannot serialise it.
pub(crate) fn digest<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Digest, DuraflowError> {
    let mut hasher = Hashing(blake3::Hasher::new());
    let mut buffered = io::BufWriter::with_capacity(64 * 1024, &mut hasher);
    rmp_serde::encode::write_named(&mut buffered, value).map_err(|source| {
        DuraflowError::Encode {
            key: key.to_owned(),
            type_name: std::any::type_name::<T>(),
            source,
        }
    })?;
    // Into a hasher, which takes every byte: the flush cannot fail.
    let _ = buffered.flush();
    drop(buffered);
    Ok(*hasher.0.finalize().as_bytes())
}

/// A writer into a hasher.
struct Hashing(blake3::Hasher);

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a task runs, or is cached: what [`DurableDag::explain`](crate::DurableDag::explain)
/// says, and what a run records in the attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Why {
    /// A stored output made from the same things, within its maximum age.
    Cached,
    /// A task added with `add`, whose output is stored: cached by id.
    ById,
    /// Nothing is stored under the id.
    NeverStored,
    /// The stored value cannot be read as the task's output.
    Unreadable(String),
    /// The stored output has no fingerprint (it was stored by `add`).
    NoFingerprint,
    /// The task's type changed.
    TaskType,
    /// The task's parameters changed.
    Params,
    /// The code version changed.
    CodeVersion { from: String, to: String },
    /// A consumed output will be made again in this run.
    UpstreamRuns(String),
    /// A consumed output changed.
    UpstreamChanged(String),
    /// A consumed output comes from a task of no `DurableDag`: nothing tells whether it
    /// changed.
    UpstreamUnknown,
    /// The stored output is older than the maximum age.
    Expired { age: Duration, max: Duration },
    /// The task's parameters cannot be serialised: the task fails.
    BadParams(String),
}

impl Why {
    /// Whether the task runs.
    pub(crate) fn runs(&self) -> bool {
        !matches!(self, Why::Cached | Why::ById)
    }
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Cached => write!(f, "cached"),
            Why::ById => write!(f, "no fingerprint (added with `add`: cached by id)"),
            Why::NeverStored => write!(f, "never stored"),
            Why::Unreadable(reason) => write!(f, "stored value unreadable: {reason}"),
            Why::NoFingerprint => write!(f, "stored without a fingerprint (by `add`)"),
            Why::TaskType => write!(f, "task type changed"),
            Why::Params => write!(f, "parameters changed"),
            Why::CodeVersion { from, to } => write!(f, "code version {from:?} → {to:?}"),
            Why::UpstreamRuns(id) => write!(
                f,
                "upstream `{id}` will run (this task may stay cached by early cutoff)"
            ),
            Why::UpstreamChanged(id) => write!(f, "upstream `{id}` changed"),
            Why::UpstreamUnknown => write!(f, "an upstream task is not durable"),
            Why::BadParams(reason) => write!(f, "parameters cannot be serialised: {reason}"),
            Why::Expired { age, max } => write!(
                f,
                "expired (stored {}s ago, max age {}s)",
                age.as_secs(),
                max.as_secs()
            ),
        }
    }
}

/// Whether the output made as `now` says may be the stored one, made as `stored` says
/// (`None`: stored without a fingerprint), at `now_ms`, under `max_age`.
pub(crate) fn decide(
    now: &Made,
    stored: Option<&Made>,
    now_ms: u64,
    max_age: Option<Duration>,
) -> Why {
    let Some(stored) = stored else {
        return Why::NoFingerprint;
    };
    if stored.fingerprint() == now.fingerprint() {
        let age = Duration::from_millis(now_ms.saturating_sub(stored.stored_ms));
        return match max_age {
            Some(max) if age > max => Why::Expired { age, max },
            _ => Why::Cached,
        };
    }
    // Which part differs, in the order they are hashed.
    if stored.task_type != now.task_type {
        return Why::TaskType;
    }
    if stored.params != now.params {
        return Why::Params;
    }
    if stored.code_version != now.code_version {
        return Why::CodeVersion {
            from: stored.code_version.clone(),
            to: now.code_version.clone(),
        };
    }
    if stored.inputs.len() != now.inputs.len() {
        return Why::Params;
    }
    for ((id, was), (is_id, is)) in stored.inputs.iter().zip(&now.inputs) {
        if was != is || id != is_id {
            return Why::UpstreamChanged(is_id.clone());
        }
    }
    Why::Params
}

/// Milliseconds since the Unix epoch, on tokio's clock (which a test can pause and advance):
/// the system time when first asked, plus the time tokio has seen pass since.
pub(crate) fn now_ms() -> u64 {
    use std::sync::OnceLock;
    static ANCHOR: OnceLock<(u64, tokio::time::Instant)> = OnceLock::new();
    let (at, then) = ANCHOR.get_or_init(|| (crate::record::now_ms(), tokio::time::Instant::now()));
    at.saturating_add(then.elapsed().as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Load {
        id: u32,
        path: &'static str,
    }

    fn hex(d: &Digest) -> String {
        hex_bytes(d)
    }

    fn hex_bytes(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Fixed inputs give fixed bytes, on every platform and in every version: a change here
    /// recomputes every keyed output of every user. (The digests were also computed apart,
    /// from the bytes below, with Python's `blake3`.)
    #[test]
    fn golden_fingerprint() {
        let load = Load {
            id: 7,
            path: "a.csv",
        };
        let named = rmp_serde::to_vec_named(&load).unwrap();
        assert_eq!(hex_bytes(&named), "82a2696407a470617468a5612e637376");
        let params = digest("k", &load).unwrap();
        assert_eq!(
            hex(&params),
            "7727697051cb6e1eeaa52a22494fb73d9fd89a654c22d6c87bfe8cbda1d37b39"
        );
        let made = Made {
            task_type: "app::Load".to_owned(),
            params,
            code_version: "1".to_owned(),
            inputs: vec![("fetch".to_owned(), [7; 32])],
            stored_ms: 1_700_000_000_000,
        };
        assert_eq!(
            hex(&made.fingerprint()),
            "5c0f5fc90678fb92b3d01367818212290190de749d4d30bd9177219e6c7fb94b"
        );
        // The time it was stored is no part of it.
        let later = Made {
            stored_ms: 0,
            ..made.clone()
        };
        assert_eq!(later.fingerprint(), made.fingerprint());
        assert_eq!(Made::decode(&made.encode()), Some(made));
    }

    #[test]
    fn each_change_has_its_reason() {
        let made = Made {
            task_type: "T".to_owned(),
            params: [1; 32],
            code_version: "1".to_owned(),
            inputs: vec![("up".to_owned(), [2; 32])],
            stored_ms: 1000,
        };
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(decide(&made, Some(&made), 2000, day), Why::Cached);
        assert_eq!(decide(&made, None, 2000, day), Why::NoFingerprint);
        let params = Made {
            params: [3; 32],
            ..made.clone()
        };
        assert_eq!(decide(&params, Some(&made), 2000, day), Why::Params);
        let code = Made {
            code_version: "2".to_owned(),
            ..made.clone()
        };
        assert_eq!(
            decide(&code, Some(&made), 2000, day).to_string(),
            "code version \"1\" → \"2\""
        );
        let up = Made {
            inputs: vec![("up".to_owned(), [4; 32])],
            ..made.clone()
        };
        assert_eq!(
            decide(&up, Some(&made), 2000, day),
            Why::UpstreamChanged("up".into())
        );
        let late = 1000 + 86_401_000;
        assert!(matches!(
            decide(&made, Some(&made), late, day),
            Why::Expired { .. }
        ));
        assert_eq!(decide(&made, Some(&made), late, None), Why::Cached);
    }
}
