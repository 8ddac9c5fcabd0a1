//! [`copy`]: moving every output from one store to another.

use std::sync::{Arc, Mutex, PoisonError};

use crate::codec::{self, CopyError};
use crate::{DuraflowError, Encoder, Storage, Stored, Value};

/// Copies every output stored in `from` into `to` (a [`FileStore`](crate::FileStore) into a
/// [`SledStore`](crate::SledStore), say), in key order, replacing what `to` holds under the
/// same keys, and returns how many outputs were copied. Values travel as stored — type name,
/// payload and checksum — so `to` returns exactly what `from` did; a large value is streamed
/// from one store to the other, never held in memory. Each is checked as it is copied: a
/// damaged value stops the copy instead of spreading (`to` keeps what it held under that
/// key), and so does an entry `from` cannot list (a FileStore key directory it cannot read,
/// say): no output is skipped silently. Each write has `to`'s own durability; outputs
/// already copied stay copied if a later one fails.
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
        let Some(found) = from.read_value(&key).await? else {
            continue;
        };
        // A value `from` hands out as a reader is checked as it is written: damage found on
        // the way fails the write (`to` keeps its previous value) and is kept here.
        let damage = Arc::new(Mutex::new(None));
        let value = match found {
            Stored::Bytes(bytes) => {
                codec::check(&key, &bytes)?;
                Value::Bytes(bytes)
            }
            Stored::Reader { len, mut reader } => {
                let (found, key) = (Arc::clone(&damage), key.clone());
                Value::Stream(Encoder::new(move |out| {
                    match codec::copy(&key, &mut reader, len, out) {
                        Ok(()) => Ok(()),
                        Err(CopyError::Target(e)) => Err(e),
                        Err(CopyError::Source(e)) => {
                            *found.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                            Err(DuraflowError::Persist {
                                key,
                                source: "the value being copied is damaged".into(),
                            })
                        }
                    }
                }))
            }
        };
        let written = to.write_value(&key, value).await;
        if let Some(e) = damage.lock().unwrap_or_else(PoisonError::into_inner).take() {
            return Err(e);
        }
        written.map_err(|e| e.into_persist(&key))?;
        copied += 1;
    }
    Ok(copied)
}
