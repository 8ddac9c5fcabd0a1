//! [`MemoryStore`]: a process-local map, for tests and examples.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{ready, StoreFuture};
use crate::{validate_key, DuraflowError, Storage};

/// A [`Storage`] that keeps values in a map in memory.
///
/// A value is visible to every reader as soon as its write resolves, and gone when the
/// process ends: nothing survives a crash. Never waits on I/O: every future it returns is
/// ready at once.
#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // Every critical section is a single map call, so a panic cannot leave the map
        // half-updated and a poisoned lock is safe to use.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Storage for MemoryStore {
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        ready(validate_key(key).map(|()| self.map().get(key).cloned()))
    }

    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        ready(validate_key(key).map(|()| {
            // The old value is dropped after the lock is released.
            let old = self.map().insert(key.to_owned(), value);
            drop(old);
        }))
    }

    fn remove<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        ready(validate_key(key).map(|()| self.map().remove(key).is_some()))
    }

    fn keys(&self) -> StoreFuture<'_, Vec<String>> {
        ready(Ok::<_, DuraflowError>(self.map().keys().cloned().collect()))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
