//! Leases: which process runs a task. A key's row in `leases` holds its fencing token (how
//! many leases the key has had), the worker holding it, until when, and whether its output
//! was committed under it (`done`, with `expires_at` infinity). A released lease has
//! `expires_at` minus infinity. The committer notifies the schema's channel when a leased
//! output is committed, and so does a release; processes waiting for a key listen to it.
//!
//! A statement that locks several lease rows (a batch of takes, a batch's leased commits, a
//! heartbeat) locks them in digest order, as a batch's outputs are written: so the
//! statements of several processes wait for one another but never deadlock.

use std::collections::HashMap;
use std::future::Future;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::channel::oneshot;
use futures::{FutureExt, StreamExt};
use tokio_postgres::{AsyncMessage, NoTls};

use super::writer::Job;
use super::{col, digest, Held, Shared};
use crate::record::now_ms;
use crate::{validate_key, DuraflowError, Lease, StoreFuture};

/// Takes the lease on `key` if it is free or expired, or done under token `$5` (NULL: not
/// a done one), as the key's next token. Answers the token taken (or NULL), the previous owner, and whether
/// the previous lease was live-or-expired rather than released or done.
const TAKE_SQL: &str =
    "WITH prev AS (SELECT owner, NOT done AND expires_at <> '-infinity' AS lapsed \
         FROM leases WHERE key_hash = $1), \
     take AS (INSERT INTO leases AS l (key_hash, key, token, owner, expires_at, done) \
         VALUES ($1, $2, 1, $3, now() + $4::float8 * interval '1 second', false) \
         ON CONFLICT (key_hash) DO UPDATE SET token = l.token + 1, owner = EXCLUDED.owner, \
             expires_at = EXCLUDED.expires_at, done = false \
         WHERE l.expires_at < now() OR (l.done AND l.token = $5::bigint) \
         RETURNING token) \
     SELECT (SELECT token FROM take), (SELECT owner FROM prev), (SELECT lapsed FROM prev)";

/// A key's lease: committed under, whether it lapsed (expired or released), its token.
const STATE_SQL: &str = "SELECT done, expires_at < now(), token FROM leases WHERE key_hash = $1";

/// The attempts a dead worker left `Running` at a key it held (one it writes meanwhile, as
/// a worker presumed dead too soon does, is skipped rather than waited for).
const INTERRUPT_SQL: &str = "WITH at AS MATERIALIZED (SELECT run, attempt FROM attempts \
         WHERE key_hash = $1 AND outcome = 'running' AND (run >> 24) = $2 \
         FOR UPDATE SKIP LOCKED) \
     UPDATE attempts SET outcome = 'interrupted', finished_ms = $3 FROM at \
     WHERE attempts.key_hash = $1 AND attempts.run = at.run AND attempts.attempt = at.attempt \
         AND attempts.outcome = 'running'";

/// Ends lease `$2` of key `$1` if owner `$3` still holds it and it is not done, and
/// notifies channel `$4`.
pub(crate) const RELEASE_SQL: &str = "WITH r AS (UPDATE leases SET expires_at = '-infinity' \
         WHERE key_hash = $1 AND token = $2 AND owner = $3 AND NOT done RETURNING 1) \
     SELECT pg_notify($4, 'r:' || encode($1, 'hex')) FROM r";

/// [`RunLog::lease`](crate::RunLog::lease): see [`PgStore`](super::PgStore). The work runs
/// on the store's runtime; a lease taken for a caller that stopped waiting is released.
pub(crate) fn lease(
    shared: &Arc<Shared>,
    key: &str,
    seen: Option<u64>,
) -> StoreFuture<'static, Lease> {
    if let Err(error) = validate_key(key) {
        return Box::pin(std::future::ready(Err(error)));
    }
    let (to, answer) = oneshot::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let work = {
        let (shared, key, cancel) = (Arc::clone(shared), key.to_owned(), Arc::clone(&cancel));
        async move {
            let seen = seen.map(|token| token as i64);
            let taken = std::panic::AssertUnwindSafe(acquire(&shared, &key, seen, &cancel))
                .catch_unwind()
                .await;
            let held = matches!(taken, Ok(Ok(Lease::Held)));
            if to.send(taken).is_err() && held {
                release(&shared, &key);
            }
        }
    };
    shared.handle.spawn(work);
    Box::pin(Leasing {
        answer,
        shared: Arc::clone(shared),
        key: key.to_owned(),
        cancel,
        done: false,
    })
}

type Answer = Result<Result<Lease, DuraflowError>, Box<dyn std::any::Any + Send>>;

/// The caller's side of a lease being taken: dropped before it answered, it stops the wait
/// and gives up a lease that was taken meanwhile.
struct Leasing {
    answer: oneshot::Receiver<Answer>,
    shared: Arc<Shared>,
    key: String,
    cancel: Arc<AtomicBool>,
    done: bool,
}

impl Future for Leasing {
    type Output = Result<Lease, DuraflowError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = match self.answer.poll_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(answer) => answer,
        };
        self.done = true;
        Poll::Ready(match answer {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => Err(DuraflowError::RuntimeShutdown {
                key: self.key.clone(),
            }),
        })
    }
}

impl Drop for Leasing {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.cancel.store(true, Ordering::SeqCst);
        // Closed first: an answer sent from now on fails to send (its sender then gives the
        // lease up), and one sent before is here.
        self.answer.close();
        if let Ok(Some(Ok(Ok(Lease::Held)))) = self.answer.try_recv() {
            release(&self.shared, &self.key);
        }
    }
}

/// Takes the lease on `key`, waiting while another live worker, or another caller in this
/// process, holds it.
///
/// A done lease (the key's output committed under it) is `Stored`, since the caller may
/// have checked the store before that commit; only a caller told so, which checked again
/// and still asks (`seen`: that lease's token), takes over that same lease (say, a keyed
/// output made from other inputs). So no output committed after a caller's check is ever
/// run again by it.
async fn acquire(
    shared: &Shared,
    key: &str,
    seen: Option<i64>,
    cancel: &AtomicBool,
) -> Result<Lease, DuraflowError> {
    let hash = digest(key);
    let waiter = shared.notify.of(&hash);
    let leased = acquire_waking(shared, key, &hash, seen, &waiter, cancel).await;
    shared.notify.forget(&hash, waiter);
    leased
}

/// [`acquire`], woken by `waker` when the key's lease is committed or released.
async fn acquire_waking(
    shared: &Shared,
    key: &str,
    hash: &Vec<u8>,
    seen: Option<i64>,
    waiter: &Waiter,
    cancel: &AtomicBool,
) -> Result<Lease, DuraflowError> {
    let failed = shared.failed();
    let key_bytes = key.as_bytes();
    let lease_s = shared.config.lease.as_secs_f64();
    let mut first = true;
    loop {
        if cancel.load(Ordering::SeqCst) {
            // Nobody waits for the answer.
            return Ok(stored(0));
        }
        // A notification that the key's output was committed: no need to look.
        if let Some(token) = waiter.committed() {
            if seen != Some(token) {
                return Ok(stored(token));
            }
        }
        // Armed before looking, so that a notification after the look is not missed.
        let notified = waiter.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let mut look_now = false;
        let taken = if shared.held().contains_key(key) {
            // Another caller in this process holds the lease: it is alive, so wait for its
            // commit or release, whatever the lease's expiry says.
            None
        } else if first && seen.is_none() {
            // With the other leases this store is taking now, in one statement; alone if
            // that failed (and then a look at the lease at once: it may be done).
            match take_batched(shared, key, hash).await {
                Ok(Tried {
                    done: Some(token), ..
                }) => return Ok(stored(token)),
                Ok(Tried { taken, .. }) => taken,
                Err(_) => {
                    look_now = true;
                    take_one(shared, hash, key_bytes, lease_s, None).await?
                }
            }
        } else {
            let client = shared.client().await?;
            let state = client
                .prepare_cached(STATE_SQL)
                .await
                .map_err(|e| failed.db(e))?;
            let row = client
                .query_opt(&state, &[hash])
                .await
                .map_err(|e| failed.db(e))?;
            drop(client);
            let (take, done) = match row {
                Some(row) if col::<bool>(&row, 0)? => {
                    let token: i64 = col(&row, 2)?;
                    if seen != Some(token) {
                        return Ok(stored(token));
                    }
                    (true, Some(token))
                }
                Some(row) => (col::<bool>(&row, 1)?, None),
                None => (true, None),
            };
            match take {
                true => take_one(shared, hash, key_bytes, lease_s, done).await?,
                false => None,
            }
        };
        if let Some(Taken {
            token,
            owner,
            lapsed,
        }) = taken
        {
            // A lease that expired under another worker: that worker is presumed dead, and
            // its attempt at the key with it.
            if let (Some(owner), Some(true)) = (owner, lapsed) {
                if owner != shared.worker {
                    let now = now_ms() as i64;
                    let interrupted = async {
                        let client = shared.client().await?;
                        client
                            .execute(INTERRUPT_SQL, &[&hash, &owner, &now])
                            .await
                            .map_err(|e| failed.db(e))
                    };
                    if let Err(error) = interrupted.await {
                        tracing::warn!(key, %error, "the dead worker's attempt not marked");
                    }
                }
            }
            let held = Held {
                token,
                hash: hash.clone(),
            };
            shared.held().insert(key.to_owned(), held);
            return Ok(Lease::Held);
        }
        first = false;
        if look_now {
            continue;
        }
        let _ = tokio::time::timeout(shared.config.poll(), notified).await;
    }
}

/// `Stored` under the lease of `token`.
fn stored(token: i64) -> Lease {
    Lease::Stored { done: token as u64 }
}

/// The leases this store waits for, by key digest: each woken by a notification naming its
/// key, and all of them when the listener reconnects (it may have missed some).
#[derive(Default)]
pub(crate) struct Waiters(Mutex<HashMap<Vec<u8>, Arc<Waiter>>>);

/// What a wait for one key is woken by.
#[derive(Default)]
pub(crate) struct Waiter {
    notify: tokio::sync::Notify,
    /// The token of the lease the key's output was committed under, once a notification
    /// said so.
    committed: Mutex<Option<i64>>,
}

impl Waiter {
    fn committed(&self) -> Option<i64> {
        *self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Waiters {
    fn map(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Arc<Waiter>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The waiter of the key of digest `hash`.
    fn of(&self, hash: &[u8]) -> Arc<Waiter> {
        Arc::clone(self.map().entry(hash.to_vec()).or_default())
    }

    /// Forgets `waiter`, that of `hash`, unless another wait holds it too.
    fn forget(&self, hash: &[u8], waiter: Arc<Waiter>) {
        let mut map = self.map();
        // The map's and this one.
        if Arc::strong_count(&waiter) <= 2 {
            map.remove(hash);
        }
    }

    /// Wakes the waits a notification names: `d<token>:<hex digest>` when a key's output
    /// was committed under lease `token`, `r:<hex digest>` when its lease was released.
    fn wake(&self, payload: &str) {
        let Some((what, hex)) = payload.split_once(':') else {
            return;
        };
        let hash: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect();
        let Some(waiter) = hash.and_then(|hash| self.map().get(&hash).cloned()) else {
            return;
        };
        if let Some(token) = what.strip_prefix('d').and_then(|t| t.parse().ok()) {
            *waiter
                .committed
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(token);
        }
        waiter.notify.notify_waiters();
    }

    /// Wakes the waits for the key of digest `hash` (to look again).
    pub(crate) fn wake_key(&self, hash: &[u8]) {
        if let Some(waiter) = self.map().get(hash) {
            waiter.notify.notify_waiters();
        }
    }

    /// Wakes every wait.
    fn wake_all(&self) {
        for waiter in self.map().values() {
            waiter.notify.notify_waiters();
        }
    }
}

/// A lease just taken: its token, and the previous lease's owner and whether it lapsed
/// (expired while live, rather than released or done).
pub(crate) struct Taken {
    token: i64,
    owner: Option<i64>,
    lapsed: Option<bool>,
}

/// What the leaser found at a key: the lease taken, or (not taken) the token of the done
/// lease that stays there, if the key's output was committed under it.
#[derive(Default)]
pub(crate) struct Tried {
    taken: Option<Taken>,
    done: Option<i64>,
}

/// A request to the leaser: take the lease on `key` if it is free or expired.
pub(crate) struct TakeRequest {
    key: String,
    hash: Vec<u8>,
    reply: oneshot::Sender<Result<Tried, DuraflowError>>,
}

/// Takes the lease on `key` (`hash`) alone, as [`TAKE_SQL`] does.
async fn take_one(
    shared: &Shared,
    hash: &Vec<u8>,
    key: &[u8],
    lease_s: f64,
    done_token: Option<i64>,
) -> Result<Option<Taken>, DuraflowError> {
    let failed = shared.failed();
    let mut client = shared.client().await?;
    let tx = client.transaction().await.map_err(|e| failed.db(e))?;
    // A lease lost with a crash of the server is only taken again (commits check the owner
    // as well as the token); the commit that follows syncs the log anyway.
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .map_err(|e| failed.db(e))?;
    let statement = tx
        .prepare_cached(TAKE_SQL)
        .await
        .map_err(|e| failed.db(e))?;
    let row = tx
        .query_one(
            &statement,
            &[hash, &key, &shared.worker, &lease_s, &done_token],
        )
        .await
        .map_err(|e| failed.db(e))?;
    tx.commit().await.map_err(|e| failed.db(e))?;
    let (owner, lapsed) = (col(&row, 1)?, col(&row, 2)?);
    Ok(col::<Option<i64>>(&row, 0)?.map(|token| Taken {
        token,
        owner,
        lapsed,
    }))
}

/// Asks the leaser to take the lease on `key` with the others being taken now.
async fn take_batched(shared: &Shared, key: &str, hash: &[u8]) -> Result<Tried, DuraflowError> {
    let (reply, answer) = oneshot::channel();
    let request = TakeRequest {
        key: key.to_owned(),
        hash: hash.to_vec(),
        reply,
    };
    let shutdown = || DuraflowError::RuntimeShutdown {
        key: key.to_owned(),
    };
    shared.takes.send(request).map_err(|_| shutdown())?;
    answer.await.map_err(|_| shutdown())?
}

/// Takes many free or expired leases in one statement, keys in digest order (the order
/// every worker locks them in, so that two batches do not deadlock).
const TAKE_MANY_SQL: &str =
    "WITH t AS (SELECT * FROM unnest($1::bytea[], $2::bytea[]) AS t(h, k)), \
     prev AS (SELECT key_hash, owner, NOT done AND expires_at <> '-infinity' AS lapsed, \
         done, token FROM leases WHERE key_hash IN (SELECT h FROM t)), \
     take AS (INSERT INTO leases AS l (key_hash, key, token, owner, expires_at, done) \
         SELECT h, k, 1, $3, now() + $4::float8 * interval '1 second', false FROM t ORDER BY h \
         ON CONFLICT (key_hash) DO UPDATE SET token = l.token + 1, owner = EXCLUDED.owner, \
             expires_at = EXCLUDED.expires_at, done = false \
         WHERE l.expires_at < now() \
         RETURNING key_hash, token) \
     SELECT t.h, take.token, prev.owner, prev.lapsed, prev.done, prev.token \
     FROM t LEFT JOIN take ON take.key_hash = t.h LEFT JOIN prev ON prev.key_hash = t.h";

/// The leaser's loop: takes whatever first tries at leases are queued in one transaction,
/// then answers each (a key asked for twice at once is taken for one of them). Runs until
/// the store is dropped.
pub(crate) async fn leaser(
    shared: Arc<Shared>,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<TakeRequest>,
) {
    let lease_s = shared.config.lease.as_secs_f64();
    while let Some(first) = requests.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        batch.sort_by(|a, b| a.hash.cmp(&b.hash));
        let mut unique: Vec<TakeRequest> = Vec::with_capacity(batch.len());
        let mut again = Vec::new();
        for request in batch {
            match unique.last() {
                Some(last) if last.hash == request.hash => again.push(request),
                _ => unique.push(request),
            }
        }
        let taken = async {
            let failed = shared.failed();
            let mut client = shared.client().await?;
            let tx = client.transaction().await.map_err(|e| failed.db(e))?;
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await
                .map_err(|e| failed.db(e))?;
            let hashes: Vec<&[u8]> = unique.iter().map(|r| r.hash.as_slice()).collect();
            let keys: Vec<&[u8]> = unique.iter().map(|r| r.key.as_bytes()).collect();
            let statement = tx
                .prepare_cached(TAKE_MANY_SQL)
                .await
                .map_err(|e| failed.db(e))?;
            let rows = tx
                .query(&statement, &[&hashes, &keys, &shared.worker, &lease_s])
                .await
                .map_err(|e| failed.db(e))?;
            tx.commit().await.map_err(|e| failed.db(e))?;
            let mut taken = std::collections::HashMap::with_capacity(rows.len());
            for row in rows {
                let token: Option<i64> = col(&row, 1)?;
                let done: Option<bool> = col(&row, 4)?;
                let tried = Tried {
                    taken: match token {
                        Some(token) => Some(Taken {
                            token,
                            owner: col(&row, 2)?,
                            lapsed: col(&row, 3)?,
                        }),
                        None => None,
                    },
                    done: match (token, done) {
                        (None, Some(true)) => col(&row, 5)?,
                        _ => None,
                    },
                };
                taken.insert(col::<Vec<u8>>(&row, 0)?, tried);
            }
            Ok::<_, DuraflowError>(taken)
        };
        match taken.await {
            Ok(mut taken) => {
                // A key asked for twice: the second is not taken, but learns of a done lease.
                for request in again {
                    let done = taken.get(&request.hash).and_then(|tried| tried.done);
                    let _ = request.reply.send(Ok(Tried { taken: None, done }));
                }
                for request in unique {
                    let tried = taken.remove(&request.hash).unwrap_or_default();
                    let _ = request.reply.send(Ok(tried));
                }
            }
            Err(error) => {
                for request in again {
                    let _ = request.reply.send(Ok(Tried::default()));
                }
                for request in unique {
                    let again = DuraflowError::Database {
                        url: shared.url.clone(),
                        source: error.to_string().into(),
                    };
                    let _ = request.reply.send(Err(again));
                }
            }
        }
    }
}

/// [`RunLog::release`](crate::RunLog::release): stops extending the lease and queues its
/// end behind any commit of the key already queued (so a commit in flight lands first, and
/// the release then changes nothing), which notifies the waiting processes. Callers in this
/// process waiting for the key look again at once.
pub(crate) fn release(shared: &Arc<Shared>, key: &str) {
    let Some(held) = shared.held().remove(key) else {
        return;
    };
    shared.notify.wake_key(&held.hash);
    let job = Job::Release {
        key: key.to_owned(),
        hash: held.hash,
        token: held.token,
    };
    if shared.queue(job, key).is_err() {
        tracing::warn!(key, "lease not released (the store is closing); it expires");
    }
}

/// Extends the live leases of owner `$1` among keys `$2` by `$3` seconds, locking them in
/// digest order.
const EXTEND_SQL: &str = "WITH lk AS MATERIALIZED (SELECT key_hash FROM leases \
         WHERE owner = $1 AND key_hash = ANY($2) AND NOT done AND expires_at > now() \
         ORDER BY key_hash FOR UPDATE) \
     UPDATE leases SET expires_at = now() + $3::float8 * interval '1 second' FROM lk \
     WHERE leases.key_hash = lk.key_hash AND owner = $1 AND NOT done AND expires_at > now()";

/// Extends, every third of a lease, this worker's liveness and the leases it holds.
pub(crate) async fn heartbeat(shared: Arc<Shared>) {
    let every = shared.config.heartbeat();
    let lease_s = shared.config.lease.as_secs_f64();
    loop {
        tokio::time::sleep(every).await;
        if shared.heartbeats_stopped.load(Ordering::SeqCst) {
            continue;
        }
        let hashes: Vec<Vec<u8>> = shared.held().values().map(|h| h.hash.clone()).collect();
        let beat = async {
            let client = shared.own_client().await?;
            let failed = shared.failed();
            client
                .execute(
                    "UPDATE workers SET expires_at = now() + $2::float8 * interval '1 second' \
                     WHERE id = $1",
                    &[&shared.worker, &lease_s],
                )
                .await
                .map_err(|e| failed.db(e))?;
            if !hashes.is_empty() {
                client
                    .execute(EXTEND_SQL, &[&shared.worker, &hashes, &lease_s])
                    .await
                    .map_err(|e| failed.db(e))?;
            }
            Ok::<(), DuraflowError>(())
        };
        if let Err(error) = beat.await {
            tracing::warn!(%error, "heartbeat failed; leases expire unless the next one lands");
        }
    }
}

/// Connects the listener: a connection of its own that LISTENs on the store's channel and
/// wakes the waits for the key each notification names. Reconnects (every second) when it
/// is lost, waking every wait (notifications may have been missed meanwhile).
///
/// # Errors
/// A database error of the first connection.
pub(crate) async fn start_listener(
    shared: &Arc<Shared>,
    pg: tokio_postgres::Config,
) -> Result<(), DuraflowError> {
    let failed = shared.failed();
    let first = listen(&pg, &shared.channel, &shared.notify)
        .await
        .map_err(|e| failed.db(e))?;
    let (notify, channel) = (Arc::clone(&shared.notify), shared.channel.clone());
    tokio::spawn(async move {
        let mut listening = Some(first);
        loop {
            if let Some(connection) = listening.take() {
                let _ = connection.await;
            }
            notify.wake_all();
            tokio::time::sleep(Duration::from_secs(1)).await;
            listening = listen(&pg, &channel, &notify).await.ok();
        }
    });
    Ok(())
}

/// One listening connection: resolves once `LISTEN` took effect, to a handle that ends when
/// the connection does.
async fn listen(
    pg: &tokio_postgres::Config,
    channel: &str,
    notify: &Arc<Waiters>,
) -> Result<tokio::task::JoinHandle<()>, tokio_postgres::Error> {
    let (client, mut connection) = pg.connect(NoTls).await?;
    let wake = Arc::clone(notify);
    let (stop, stopped) = oneshot::channel::<()>();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let mut stopped = stopped.fuse();
        loop {
            futures::select! {
                message = messages.next().fuse() => match message {
                    Some(Ok(AsyncMessage::Notification(note))) => wake.wake(note.payload()),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                _ = stopped => break,
            }
        }
    });
    let listened = client.batch_execute(&format!("LISTEN {channel}")).await;
    if let Err(error) = listened {
        let _ = stop.send(());
        return Err(error);
    }
    // The client lives as long as the connection is driven (dropping it would close it).
    Ok(tokio::spawn(async move {
        let _client = client;
        let _stop = stop;
        let _ = driver.await;
    }))
}
