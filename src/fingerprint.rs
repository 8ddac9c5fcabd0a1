//! What a keyed output was made from (its stored [`block`]), its fingerprint, and why a keyed task runs
//! or is cached ([`Why`]): the one decision both a run and
//! [`DurableDag::explain`](crate::DurableDag::explain) take.
//!
//! The hashes and their encodings are documented at
//! [`DurableDag::add_keyed`](crate::DurableDag::add_keyed), and pinned by the golden test
//! below.

use std::fmt;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::slot::Key;
use crate::DuraflowError;

/// A BLAKE3 hash.
pub(crate) type Digest = [u8; 32];

/// The fingerprint of a keyed task (see [`DurableDag::add_keyed`](crate::DurableDag::add_keyed)).
pub(crate) fn fingerprint(
    task_type: &str,
    params: &Digest,
    code_version: &str,
    inputs: &[(Arc<str>, Digest)],
) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"duraflow-rs fingerprint 1\n");
    let text = |h: &mut blake3::Hasher, s: &str| {
        h.update(&(s.len() as u32).to_le_bytes());
        h.update(s.as_bytes());
    };
    text(&mut h, task_type);
    h.update(params);
    text(&mut h, code_version);
    h.update(&(inputs.len() as u32).to_le_bytes());
    for (id, digest) in inputs {
        text(&mut h, id);
        h.update(digest);
    }
    *h.finalize().as_bytes()
}

/// The block stored with a keyed output (the envelope's "made" block), all integers little
/// endian: its fingerprint (32 bytes); when it was stored (u64, milliseconds since the Unix
/// epoch); then what it was made from, to say which part changed: the parameters' digest
/// (32 bytes), the task's type name and the code version (each a u32 length and UTF-8
/// bytes), the number of consumed outputs (u32) and for each its task id (a u32 length and
/// UTF-8 bytes) and its digest (32 bytes).
pub(crate) fn block(key: &Key, task_type: &str, code_version: &str, stored_ms: u64) -> Vec<u8> {
    let inputs: usize = key.inputs.iter().map(|(id, _)| 4 + id.len() + 32).sum();
    let mut block =
        Vec::with_capacity(32 + 8 + 32 + 12 + task_type.len() + code_version.len() + inputs);
    let text = |block: &mut Vec<u8>, s: &str| {
        block.extend_from_slice(&(s.len() as u32).to_le_bytes());
        block.extend_from_slice(s.as_bytes());
    };
    block.extend_from_slice(&key.fingerprint);
    block.extend_from_slice(&stored_ms.to_le_bytes());
    block.extend_from_slice(&key.params);
    text(&mut block, task_type);
    text(&mut block, code_version);
    block.extend_from_slice(&(key.inputs.len() as u32).to_le_bytes());
    for (id, digest) in &key.inputs {
        text(&mut block, id);
        block.extend_from_slice(digest);
    }
    block
}

/// A stored [`block`], read.
struct Stored<'a> {
    fingerprint: &'a [u8],
    stored_ms: u64,
    params: &'a [u8],
    task_type: &'a [u8],
    code_version: &'a [u8],
    inputs: Vec<(&'a [u8], &'a [u8])>,
}

/// Reads a stored [`block`], or `None` when it is cut short.
fn parse(block: &[u8]) -> Option<Stored<'_>> {
    let mut at = Cursor(block);
    let fingerprint = at.take(32)?;
    let stored_ms = u64::from_le_bytes(at.take(8)?.try_into().ok()?);
    let params = at.take(32)?;
    let task_type = at.text()?;
    let code_version = at.text()?;
    let count = at.u32()?;
    let mut inputs = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        inputs.push((at.text()?, at.take(32)?));
    }
    Some(Stored {
        fingerprint,
        stored_ms,
        params,
        task_type,
        code_version,
        inputs,
    })
}

/// What is left of a block being read.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(taken)
    }

    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }

    /// A u32 length, then that many bytes.
    fn text(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()?;
        self.take(len)
    }
}

/// The digest of `value` in MessagePack, named form (see the module's docs): of a task's
/// parameters, or of an output.
///
/// # Errors
/// [`DuraflowError::Encode`] naming `key` when serde cannot serialise it.
pub(crate) fn digest<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Digest, DuraflowError> {
    let mut hashing = Hashing {
        hasher: blake3::Hasher::new(),
        buffer: [0; 4096],
        len: 0,
    };
    rmp_serde::encode::write_named(&mut hashing, value).map_err(|source| {
        DuraflowError::Encode {
            key: key.to_owned(),
            type_name: std::any::type_name::<T>(),
            source,
        }
    })?;
    let Hashing {
        mut hasher,
        buffer,
        len,
    } = hashing;
    hasher.update(&buffer[..len]);
    Ok(*hasher.finalize().as_bytes())
}

/// A writer into a hasher, through a buffer on the stack (MessagePack comes in pieces of a
/// few bytes; the hasher is fastest on large ones).
struct Hashing {
    hasher: blake3::Hasher,
    buffer: [u8; 4096],
    len: usize,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() > self.buffer.len() {
            self.hasher.update(&self.buffer[..self.len]);
            self.len = 0;
            if buf.len() > self.buffer.len() {
                self.hasher.update(buf);
                return Ok(buf.len());
            }
        }
        self.buffer[self.len..self.len + buf.len()].copy_from_slice(buf);
        self.len += buf.len();
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

/// Whether the stored output whose block is `stored` (`None`: stored without one) may be
/// the output of the task keyed `now` (of type `task_type`, under `code_version`), at
/// `now_ms`, under `max_age`.
pub(crate) fn decide(
    now: &Key,
    task_type: &str,
    code_version: &str,
    stored: Option<&[u8]>,
    now_ms: u64,
    max_age: Option<Duration>,
) -> Why {
    let Some(stored) = stored else {
        return Why::NoFingerprint;
    };
    let Some(stored) = parse(stored) else {
        return Why::Unreadable("what it was made from is cut short".to_owned());
    };
    if stored.fingerprint == now.fingerprint {
        let age = Duration::from_millis(now_ms.saturating_sub(stored.stored_ms));
        return match max_age {
            Some(max) if age > max => Why::Expired { age, max },
            _ => Why::Cached,
        };
    }
    // Which part differs, in the order they are hashed.
    if stored.task_type != task_type.as_bytes() {
        return Why::TaskType;
    }
    if stored.params != now.params || stored.inputs.len() != now.inputs.len() {
        return Why::Params;
    }
    if stored.code_version != code_version.as_bytes() {
        return Why::CodeVersion {
            from: String::from_utf8_lossy(stored.code_version).into_owned(),
            to: code_version.to_owned(),
        };
    }
    for ((id, was), (is_id, is)) in stored.inputs.iter().zip(&now.inputs) {
        if *was != is || *id != is_id.as_bytes() {
            return Why::UpstreamChanged(is_id.to_string());
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

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn key(params: Digest, code_version: &str, input: Digest) -> Key {
        let inputs = vec![(Arc::from("fetch"), input)];
        Key {
            fingerprint: fingerprint("app::Load", &params, code_version, &inputs),
            params,
            inputs,
        }
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
        assert_eq!(hex(&named), "82a2696407a470617468a5612e637376");
        let params = digest("k", &load).unwrap();
        assert_eq!(
            hex(&params),
            "7727697051cb6e1eeaa52a22494fb73d9fd89a654c22d6c87bfe8cbda1d37b39"
        );
        assert_eq!(
            hex(&key(params, "1", [7; 32]).fingerprint),
            "5c0f5fc90678fb92b3d01367818212290190de749d4d30bd9177219e6c7fb94b"
        );
    }

    #[test]
    fn each_change_has_its_reason() {
        let now = key([1; 32], "1", [2; 32]);
        let stored = block(&now, "app::Load", "1", 1000);
        let day = Some(Duration::from_secs(86_400));
        let decide =
            |now: &Key, version, at| decide(now, "app::Load", version, Some(&stored), at, day);
        assert_eq!(decide(&now, "1", 2000), Why::Cached);
        assert_eq!(
            super::decide(&now, "app::Load", "1", None, 2000, day),
            Why::NoFingerprint
        );
        assert_eq!(decide(&key([3; 32], "1", [2; 32]), "1", 2000), Why::Params);
        assert_eq!(
            decide(&key([1; 32], "2", [2; 32]), "2", 2000).to_string(),
            "code version \"1\" → \"2\""
        );
        assert_eq!(
            decide(&key([1; 32], "1", [4; 32]), "1", 2000),
            Why::UpstreamChanged("fetch".into())
        );
        assert!(matches!(
            decide(&now, "1", 1000 + 86_401_000),
            Why::Expired { .. }
        ));
        assert_eq!(
            super::decide(
                &now,
                "app::Load",
                "1",
                Some(&stored),
                1000 + 86_401_000,
                None
            ),
            Why::Cached
        );
        for cut in [0, 20, 100, stored.len() - 1] {
            let short = super::decide(&now, "app::Load", "1", Some(&stored[..cut]), 2000, None);
            assert!(matches!(short, Why::Unreadable(_)), "{cut}: {short:?}");
        }
        // The layout: fingerprint, time, parameters, type, version, inputs.
        assert_eq!(&stored[..32], &now.fingerprint);
        assert_eq!(stored[32..40], 1000u64.to_le_bytes());
        assert_eq!(stored.len(), 32 + 8 + 32 + 4 + 9 + 4 + 1 + 4 + 4 + 5 + 32);
    }
}
