//! [`MemoryStore`]: a process-local map, for tests and examples.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use foldhash::fast::RandomState;

use crate::{validate_key, DuraflowError, Storage};

/// Independent locks, so tasks finishing on different worker threads rarely contend.
const SHARDS: usize = 16;

/// Keys are shared with the run that wrote them (see [`Storage::write_shared`]).
type Map = HashMap<Arc<str>, Vec<u8>, RandomState>;

/// One shard on its own cache line(s), so two shards' locks never share one.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Map>);

/// A [`Storage`] that keeps values in memory.
///
/// Values are visible to every reader as soon as `write` returns and are gone when the
/// process ends: nothing survives a crash. Never blocks on I/O.
pub struct MemoryStore {
    hasher: RandomState,
    shards: Box<[Shard]>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            hasher: RandomState::default(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of stored keys.
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| lock(&self.shards[i]).len()).sum()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Map> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[i])
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, Map> {
    // Every critical section is a single map call, so a panic cannot leave a shard
    // half-updated and a poisoned lock is safe to use.
    shard.0.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Storage for MemoryStore {
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, DuraflowError> {
        validate_key(key)?;
        Ok(self.shard(key).get(key).cloned())
    }

    fn write(&self, key: &str, value: &[u8]) -> Result<(), DuraflowError> {
        self.write_owned(key, value.to_vec())
    }

    fn write_owned(&self, key: &str, value: Vec<u8>) -> Result<(), DuraflowError> {
        self.write_shared(&Arc::from(key), value)
    }

    fn write_shared(&self, key: &Arc<str>, value: Vec<u8>) -> Result<(), DuraflowError> {
        validate_key(key)?;
        // The old value is dropped after the lock is released.
        let old = self.shard(key).insert(Arc::clone(key), value);
        drop(old);
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<bool, DuraflowError> {
        validate_key(key)?;
        Ok(self.shard(key).remove(key).is_some())
    }

    fn keys(&self) -> Result<Vec<String>, DuraflowError> {
        Ok(self
            .shards
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .keys()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn may_block(&self) -> bool {
        false
    }
}
