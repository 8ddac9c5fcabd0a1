//! SledStore step 2: every output gets a witness.
//!
//! **What format 1 is.** Trees `meta`, `outputs`, `runs` and `attempts` (see
//! `src/store/sled/layout.rs`).
//!
//! **What format 2 adds.** The tree `witnesses`: task id → the length and CRC-32 of its
//! output and a commit number (0 here), written in the same transaction as the output.
//! Nothing else changes.
//!
//! **Why.** sled 0.34 keeps a page over about 128 KiB in a file of its own under `blobs/`,
//! and when it finds that file missing while it recovers, it skips the log entry and opens
//! the page as it was before: an output silently replaced by its previous value, or gone.
//! The witness is in another tree, whose pages are small and stay in the log: a read that
//! finds an output not matching its witness reports it damaged instead.
//!
//! **How, crash-safely.** The witness of every output is written as it is found (in batches,
//! each atomic), then the format number; the open then makes it durable. The step only adds
//! what it can compute again from the outputs: a kill at any moment leaves format 1 (the next
//! open runs the step again, writing the same witnesses) or format 2. A format-1 reader
//! ignores the new tree. The witnesses describe the outputs as sled opens them: damage
//! from before the upgrade is not found by them.

use crate::DuraflowError;

use super::super::layout::{Trees, Witness, FORMAT_KEY};
use super::super::sled_error;

/// Outputs whose witnesses one batch writes.
const BATCH: usize = 1024;

/// Writes the witness of every output in `trees`, then format 2 into `meta`.
pub(super) fn upgrade(trees: &Trees, path: &std::path::Path) -> Result<(), DuraflowError> {
    let io = |e| sled_error(path, e);
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for entry in trees.outputs.iter() {
        let (key, value) = entry.map_err(io)?;
        batch.insert(key, Witness::of(&value, 0, None).encode());
        in_batch += 1;
        if in_batch == BATCH {
            trees
                .witnesses
                .apply_batch(std::mem::take(&mut batch))
                .map_err(io)?;
            in_batch = 0;
        }
    }
    trees.witnesses.apply_batch(batch).map_err(io)?;
    trees
        .meta
        .insert(FORMAT_KEY, &2u64.to_be_bytes())
        .map_err(io)?;
    Ok(())
}
