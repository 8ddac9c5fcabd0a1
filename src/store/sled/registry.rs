//! The stores this process has open, so that a second open of the same store fails at
//! once, and a store this process closed can be opened again at once.
//!
//! sled 0.34 holds an exclusive lock (`flock`) on its `db` file until its last background
//! thread lets go of the database, which can be a little after the `sled::Db` was dropped:
//! an open right after a drop could find the store locked although no handle is open. So
//! - dropping a [`Claim`] (the last thing a `SledStore` drops) waits, up to
//!   [`RELEASE_WAIT`], until the lock is free, so that whoever opens the store next (this
//!   process or another) finds it free;
//! - should that wait have timed out, [`claim`] tells an opener in this process that the
//!   store was closed a moment ago, and the opener retries sled's lock error until then. A
//!   lock held by another process is still reported at once.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long after this process closed a store sled may still hold its lock (it is usually
/// gone within milliseconds).
pub(super) const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// What this process knows of one store.
#[derive(Clone, Copy)]
enum Slot {
    /// A handle is open.
    Open,
    /// The last handle was closed at this instant.
    Closed(Instant),
}

fn slots() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Slot>> {
    static SLOTS: OnceLock<Mutex<HashMap<PathBuf, Slot>>> = OnceLock::new();
    SLOTS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// This process's claim on one store, from [`claim`]. Until [`Claim::opened`] is called,
/// dropping it gives the claim up (sled never opened the store); after, dropping it records
/// that the store was closed, so that the next open waits for sled's lock.
pub(super) struct Claim {
    path: PathBuf,
    /// sled's lock file (`db` in the store's directory).
    lock_file: PathBuf,
    /// The slot before the claim, put back if the open fails.
    before: Option<Slot>,
    opened: bool,
}

/// Claims the store at `canonical` (a canonical path) for one open.
///
/// Returns `None` when this process has it open already; otherwise the claim and, when
/// this process closed the store less than [`RELEASE_WAIT`] ago, until when sled's lock
/// may still be held.
pub(super) fn claim(canonical: &Path) -> Option<(Claim, Option<Instant>)> {
    let mut slots = slots();
    let before = slots.get(canonical).copied();
    let release_by = match before {
        Some(Slot::Open) => return None,
        Some(Slot::Closed(at)) => Some(at + RELEASE_WAIT).filter(|&by| by > Instant::now()),
        None => None,
    };
    slots.insert(canonical.to_owned(), Slot::Open);
    // Forget stores closed long ago, so the map stays as small as the set of recent stores.
    let now = Instant::now();
    slots.retain(|_, slot| match slot {
        Slot::Open => true,
        Slot::Closed(at) => now.duration_since(*at) < RELEASE_WAIT,
    });
    Some((
        Claim {
            path: canonical.to_owned(),
            lock_file: canonical.join("db"),
            before,
            opened: false,
        },
        release_by,
    ))
}

impl Claim {
    /// sled has opened the store: dropping the claim now means it was closed.
    pub(super) fn opened(&mut self) {
        self.opened = true;
    }

    /// sled's database is left open for the rest of the process (after a failure): dropping
    /// the claim forgets the store, without waiting for a lock that stays held. A later open
    /// in this process is then refused at once, as one in another process is.
    pub(super) fn leaked(&mut self) {
        self.opened = false;
        self.before = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.opened {
            wait_for_release(&self.lock_file, Instant::now() + RELEASE_WAIT);
        }
        let mut slots = slots();
        match (self.opened, self.before) {
            (true, _) => {
                slots.insert(self.path.clone(), Slot::Closed(Instant::now()));
            }
            (false, Some(before)) => {
                slots.insert(self.path.clone(), before);
            }
            (false, None) => {
                slots.remove(&self.path);
            }
        }
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
                pause = (pause * 2).min(super::open::MAX_LOCK_BACKOFF);
            }
            Err(_) => return,
        }
    }
}
