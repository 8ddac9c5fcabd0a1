//! [`copy`]: moving every output from one store to another.

use crate::{codec, DuraflowError, Storage};

/// Copies every output stored in `from` into `to` (a [`FileStore`](crate::FileStore) into a
/// [`SledStore`](crate::SledStore), say), in key order, replacing what `to` holds under the
/// same keys, and returns how many outputs were copied. Values travel as stored — type name,
/// payload and checksum — so `to` returns exactly what `from` did, and each is checked
/// before it is written: a damaged value stops the copy instead of spreading, and so does an
/// entry `from` cannot list (a FileStore key directory it cannot read, say): no output is
/// skipped silently. Each write has `to`'s own durability; outputs already copied stay
/// copied if a later one fails.
///
/// # Errors
/// [`DuraflowError::Unsupported`] when `from` cannot list its keys;
/// [`DuraflowError::Corrupt`] naming the key of a damaged value (and, for a FileStore, the
/// entry that cannot be read); any error of either store (a failed write as
/// [`DuraflowError::Persist`] naming the key).
pub async fn copy(from: &dyn Storage, to: &dyn Storage) -> Result<usize, DuraflowError> {
    let mut keys = from.keys().await?;
    keys.sort();
    let mut copied = 0;
    for key in keys {
        // A key removed since it was listed is simply not copied.
        let Some(bytes) = from.read(&key).await? else {
            continue;
        };
        codec::open(&key, &bytes)?;
        to.write(&key, bytes)
            .await
            .map_err(|e| e.into_persist(&key))?;
        copied += 1;
    }
    Ok(copied)
}
