//! [`MemoryStore`]: a process-local map, for tests and examples.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{validate_key, DuraflowError, Storage};

/// A [`Storage`] that keeps values in memory.
///
/// Values are visible to every reader as soon as `write` returns and are gone when the
/// process ends: nothing survives a crash. Never blocks on I/O.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of stored keys.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-updated (every critical
        // section is a single map call), so a poisoned lock is safe to use.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Storage for MemoryStore {
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        validate_key(key)?;
        Ok(self.map().get(key).cloned())
    }

    fn write(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError> {
        validate_key(key)?;
        self.map().insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<bool, DuraflowError> {
        validate_key(key)?;
        Ok(self.map().remove(key).is_some())
    }

    fn keys(&self) -> Result<Vec<String>, DuraflowError> {
        Ok(self.map().keys().cloned().collect())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn may_block(&self) -> bool {
        false
    }
}
