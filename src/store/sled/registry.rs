//! The stores this process has open, so that a second open of the same store fails at
//! once, and a store this process closed can be opened again at once.
//!
//! sled 0.34 holds an exclusive lock (`flock`) on its `db` file until its last background
//! thread lets go of the database, which can be a little after the `sled::Db` was dropped.
//! Dropping a [`Claim`] (the last thing a `SledStore` drops) therefore waits, up to
//! [`RELEASE_WAIT`], until the lock is free, so that whoever opens the store next (this
//! process or another) finds it free.

use std::collections::HashSet;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long after this process closed a store sled may still hold its lock (it is usually
/// gone within milliseconds).
const RELEASE_WAIT: Duration = Duration::from_secs(2);
/// The longest pause between two looks at the lock.
const MAX_PAUSE: Duration = Duration::from_millis(50);

fn open_stores() -> MutexGuard<'static, HashSet<PathBuf>> {
    static OPEN: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    OPEN.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// This process's claim on one store, from [`claim`]. Dropping it gives the claim up, once
/// sled's lock is free if sled had opened the store ([`Claim::opened`]).
pub(super) struct Claim {
    path: PathBuf,
    opened: bool,
    /// Never given up (see [`Claim::leaked`]).
    leaked: bool,
}

/// Claims the store at `canonical` (a canonical path) for one open; `None` when this
/// process has it open already.
pub(super) fn claim(canonical: &Path) -> Option<Claim> {
    open_stores().insert(canonical.to_owned()).then(|| Claim {
        path: canonical.to_owned(),
        opened: false,
        leaked: false,
    })
}

impl Claim {
    /// sled has opened the store: dropping the claim now waits for sled's lock.
    pub(super) fn opened(&mut self) {
        self.opened = true;
    }

    /// sled's database is left open for the rest of the process (after a failure): the
    /// claim is never given up, so a later open in this process is refused at once, as one
    /// in another process is.
    pub(super) fn leaked(&mut self) {
        self.leaked = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        if self.opened {
            wait_for_release(&self.path.join("db"), Instant::now() + RELEASE_WAIT);
        }
        open_stores().remove(&self.path);
    }
}

/// Waits until nobody holds the `flock` on `lock_file` (sled's lock), or until `deadline`:
/// tries to take the lock itself, with growing pauses, and lets go of it at once.
fn wait_for_release(lock_file: &Path, deadline: Instant) {
    let Ok(file) = File::open(lock_file) else {
        return; // no lock file, no lock
    };
    let mut pause = Duration::from_micros(100);
    loop {
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                return;
            }
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(_) => return,
        }
    }
}
