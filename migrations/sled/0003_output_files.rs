//! SledStore step 3: outputs over the store's blob threshold move to files of their own.
//!
//! **What format 2 is.** Every output in the `outputs` tree, with a witness (length, CRC-32,
//! commit number) in `witnesses`.
//!
//! **What format 3 changes.** An output larger than the blob threshold
//! ([`SledConfig::blob_threshold`](crate::SledConfig::blob_threshold), 64 KiB by default)
//! is a file under `outputs/` named by the BLAKE3 hash of its bytes; its witness carries
//! that digest, and the `outputs` tree has no entry for it.
//!
//! **Why.** sled keeps a value whole in its page cache and writes it again whenever its
//! page is rewritten; a page over about 128 KiB goes to a blob file of sled's that sled
//! never fsyncs and silently skips when it is missing. Large outputs cost less, and are
//! checked better, as files of the store's own.
//!
//! **How, crash-safely.** For each large output that matches its witness (one that does not
//! is damage, and stays where reading it reports it): its file is written durably (a
//! temporary file, fsynced, renamed, the directory fsynced); then one transaction removes
//! it from `outputs` and gives its witness the digest. The format number is written last, and the
//! open then makes everything durable. A kill at any moment leaves format 2 with some
//! outputs moved (each whole, in its file or in the tree), which the next open moves on
//! from, and perhaps a file no output refers to yet, which gc removes.

use std::path::Path;
use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::DuraflowError;

use super::super::blob::Blobs;
use super::super::layout::{Trees, Witness, FORMAT_KEY};
use super::super::sled_error;

/// Moves every output over `threshold` bytes whose witness it matches to a file of its own,
/// then writes format 3. An output that does not match its witness is damage (sled opened
/// an older page of it): it stays in the tree, where reading it reports the damage.
pub(super) fn upgrade(
    trees: &Trees,
    blobs: &Arc<Blobs>,
    threshold: usize,
    path: &Path,
) -> Result<(), DuraflowError> {
    let io = |e| sled_error(path, e);
    let mut large = Vec::new();
    for entry in trees.outputs.iter() {
        let (key, value) = entry.map_err(io)?;
        if value.len() > threshold {
            large.push(key);
        }
    }
    for key in large {
        let Some(value) = trees.outputs.get(&key).map_err(io)? else {
            continue;
        };
        let witnessed = trees.witnesses.get(&key).map_err(io)?;
        let Some(old) = witnessed
            .as_deref()
            .and_then(Witness::decode)
            .filter(|w| w.blob.is_none() && w.matches(&value))
        else {
            continue;
        };
        let held = blobs
            .put(&value)
            .map_err(|e| DuraflowError::io(path, e))?
            .held;
        let witness = Witness {
            blob: Some(held.digest),
            ..old
        }
        .encode();
        let moved = (&trees.outputs, &trees.witnesses).transaction(|(outputs, witnesses)| {
            outputs.remove(&key)?;
            witnesses.insert(&key, witness.as_slice())?;
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        moved.map_err(|e| match e {
            TransactionError::Storage(e) => io(e),
            TransactionError::Abort(()) => {
                DuraflowError::io(path, std::io::Error::other("transaction aborted"))
            }
        })?;
    }
    trees
        .meta
        .insert(FORMAT_KEY, &3u64.to_be_bytes())
        .map_err(io)?;
    Ok(())
}
