//! [`PgStore`]: a store in a PostgreSQL database that several processes (on one machine or
//! many) share, each task of a DAG executed by one of them at a time (feature `postgres`).
//!
//! The store's work runs on a small tokio runtime of its own (2 threads), whatever executor
//! awaits its futures: a DAG under another runtime, or `Context::get` waiting on the calling
//! thread, works as it does with the other stores. Its pieces:
//! - `config`: [`PgConfig`];
//! - `schema`: the tables, created and upgraded by the SQL steps of `migrations/postgres/`;
//! - `writer`: the committer, which writes whatever commits and records are queued in one
//!   transaction (group commit) and answers each;
//! - `leases`: who runs a task, heartbeats, waiting for another process, fencing tokens;
//! - `history`: [`RunHistory`] over the runs and attempts tables.

mod config;
mod history;
mod leases;
mod schema;
mod writer;

pub use config::PgConfig;

use std::collections::HashMap;
use std::future::Future;
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use deadpool_postgres::{Manager, Object, Pool};
use futures::channel::oneshot;
use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use self::config::valid_schema;
use self::writer::Job;
use super::{ready, unblock};
use crate::record::{AttemptRecord, GcStats, RunDetails, RunId, RunRecord};
use crate::store::location::redacted;
use crate::{
    validate_key, BoxError, DuraflowError, Lease, RunHistory, RunLog, Storage, StoreFuture, Value,
};

/// Run ids are `(worker << RUN_BITS) | n`: `n` counts the runs of one connected store.
const RUN_BITS: u32 = 24;

/// A store in a PostgreSQL database (feature `postgres`), shared by every process connected
/// to the same database and schema: a DAG run by several processes at once executes each
/// task in one of them at a time, and the others take its stored output.
///
/// ```no_run
/// # async fn example() -> Result<(), duraflow_rs::DuraflowError> {
/// use std::sync::Arc;
/// use duraflow_rs::{Context, PgStore};
///
/// let ctx = Arc::new(Context::new(PgStore::connect("postgres://me@db.local/jobs").await?));
/// # Ok(()) }
/// ```
///
/// # Guarantees
/// - **Durable**: a task's output and its `Succeeded` attempt are written in one
///   transaction, committed with `synchronous_commit = on` before
///   [`commit`](RunLog::commit) (or [`write`](Storage::write)) resolves. Commits made at
///   the same time share one transaction (group commit); one that is fenced does not fail
///   the others.
/// - **One executor per task**: before a task runs, its process takes the key's lease (a
///   row with the key's *fencing token*, the number of leases the key has had). While the
///   lease's holder lives (it extends the lease every third of [`PgConfig::lease`]), another
///   process waits, woken by a notification when the holder commits or gives the lease up
///   (and looking again at least every second), then takes the stored output
///   ([`Lease::Stored`]) or the lease. A lease not extended for its whole duration (its
///   holder died or stalled) is taken over as the key's next attempt, and the old holder's
///   `Running` attempts at the key are marked `Interrupted`; a commit under a lease that
///   passed on writes nothing and is [`DuraflowError::Fenced`]. Callers in one process that need one key take turns: a lease this store
///   holds is never taken over by it, however late its heartbeats. Statements that lock
///   several rows lock them in key-digest order, so processes wait for one another but
///   never deadlock. A commit or write of a key this process holds no lease on just
///   writes.
/// - **Run ids**: at connect the store takes a worker number `w` from a sequence; its runs
///   get ids `(w << 24) | n` for `n = 1, 2, …`: unique across processes, increasing within
///   one store and from one connect to the next. [`begin_run`](RunLog::begin_run) answers at
///   once and writes the run's row in the background; [`record`](RunLog::record) queues its
///   record; both are durable no later than the next commit or finished run resolves.
/// - **Interrupted runs**: each store extends its worker's liveness with its leases. A run
///   still `Running` whose worker's liveness expired (the process died, or dropped the
///   store) is reported `Interrupted`, with its `Running` attempts, by the history.
/// - **Values**: at most [`PgConfig::max_value_size`] bytes (512 MiB by default, half of
///   PostgreSQL's 1 GB limit on one value); a larger one is [`DuraflowError::Persist`]
///   naming the key and the limit. Values are the crate's checksummed envelopes: one that
///   fails its check reads as [`DuraflowError::Corrupt`] naming the key.
/// - **Errors**: a connection that cannot be made, lost, refused or timed out is
///   [`DuraflowError::Database`] naming the URL with its password replaced by `***`.
pub struct PgStore {
    shared: Arc<Shared>,
    /// The store's runtime; shut down in the background when the store is dropped (after
    /// `shared`'s handle, declared first).
    _runtime: OwnedRuntime,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.shared.url)
            .field("schema", &self.shared.config.schema)
            .field("worker", &self.shared.worker)
            .finish_non_exhaustive()
    }
}

/// What the store's methods and background tasks share.
pub(crate) struct Shared {
    /// Connections for reads, history queries and leases.
    pub(crate) pool: Pool,
    /// Two connections, one for the committer and one for the heartbeat (each uses one at
    /// a time), so that neither waits behind the pool's work.
    pub(crate) own: Pool,
    /// The URL, password redacted.
    pub(crate) url: String,
    pub(crate) config: PgConfig,
    /// This store's worker number (the owner of its leases, the high bits of its run ids).
    pub(crate) worker: i64,
    next_run: AtomicU64,
    /// To the committer.
    pub(crate) queue: mpsc::UnboundedSender<Job>,
    /// To the reader.
    pub(crate) reads: mpsc::UnboundedSender<ReadRequest>,
    /// To the leaser.
    pub(crate) takes: mpsc::UnboundedSender<leases::TakeRequest>,
    /// The leases this store holds: key → its token and digest.
    pub(crate) held: Mutex<HashMap<String, Held>>,
    /// Woken on every notification of the store's channel (a commit or a release).
    pub(crate) notify: Arc<leases::Waiters>,
    /// The NOTIFY channel of the store's schema.
    pub(crate) channel: String,
    pub(crate) handle: Handle,
    /// Set by [`PgStore::stop_heartbeats`].
    pub(crate) heartbeats_stopped: AtomicBool,
}

/// A lease this store holds.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) token: i64,
    pub(crate) hash: Vec<u8>,
}

impl Shared {
    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<Object, DuraflowError> {
        self.pool.get().await.map_err(|e| self.failed().db(e))
    }

    /// The committer's or the heartbeat's connection.
    pub(crate) async fn own_client(&self) -> Result<Object, DuraflowError> {
        self.own.get().await.map_err(|e| self.failed().db(e))
    }

    pub(crate) fn failed(&self) -> Failed<'_> {
        Failed(&self.url)
    }

    pub(crate) fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `work` on the store's runtime; the future answers wherever it is awaited. A
    /// panic in `work` is resumed there.
    pub(crate) fn spawn<T, F>(&self, key: &str, work: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, DuraflowError>> + Send + 'static,
    {
        let (to, answer) = oneshot::channel();
        self.handle.spawn(async move {
            let _ = to.send(AssertUnwindSafe(work).catch_unwind().await);
        });
        let key = key.to_owned();
        Box::pin(async move {
            match answer.await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => resume_unwind(panic),
                Err(_) => Err(DuraflowError::RuntimeShutdown { key }),
            }
        })
    }

    /// Queues `job` for the committer.
    pub(crate) fn queue(&self, job: Job, key: &str) -> Result<(), DuraflowError> {
        self.queue
            .send(job)
            .map_err(|_| DuraflowError::RuntimeShutdown {
                key: key.to_owned(),
            })
    }
}

/// Makes [`DuraflowError::Database`] errors naming a (redacted) URL.
#[derive(Clone, Copy)]
pub(crate) struct Failed<'a>(pub(crate) &'a str);

impl Failed<'_> {
    /// The error, with the messages of its whole chain of sources (a driver error's own
    /// message is often only "db error"; its source says which).
    pub(crate) fn db(self, source: impl Into<BoxError>) -> DuraflowError {
        let source: BoxError = source.into();
        let mut text = source.to_string();
        let mut cause = source.source();
        while let Some(inner) = cause {
            let more = inner.to_string();
            if !text.contains(&more) {
                text = format!("{text}: {more}");
            }
            cause = inner.source();
        }
        DuraflowError::Database {
            url: self.0.to_owned(),
            source: text.into(),
        }
    }
}

/// The digest a key is found by.
/// Column `i` of `row`, a row of this store's own tables: a column of another type than
/// the schema's migrations made (a schema altered by hand) is `Corrupt`, not a panic.
pub(crate) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, DuraflowError> {
    row.try_get(i).map_err(|e| DuraflowError::Corrupt {
        key: String::new(),
        path: None,
        reason: format!("column {i} of a row of the store's tables: {e}"),
    })
}

pub(crate) fn digest(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A runtime shut down in the background when dropped: never blocks, and may be dropped
/// inside another runtime.
struct OwnedRuntime(Option<Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl PgStore {
    /// Connects to the PostgreSQL database at `url` (`postgres://user:password@host/db`, or
    /// a key/value connection string) with [`PgConfig::default`]: see
    /// [`connect_with`](PgStore::connect_with).
    ///
    /// # Errors
    /// As [`connect_with`](PgStore::connect_with).
    pub async fn connect(url: &str) -> Result<PgStore, DuraflowError> {
        PgStore::connect_with(url, PgConfig::default()).await
    }

    /// Connects to the PostgreSQL database at `url` with `config`: creates the configured
    /// schema and its tables if absent (or upgrades them), under a lock that makes processes
    /// connecting at once wait for each other, and takes this store's worker number. May be
    /// awaited under any executor, or none (`pollster::block_on`); gives up after
    /// [`PgConfig::connect_timeout`].
    ///
    /// # Errors
    /// [`DuraflowError::Database`] naming the URL (password redacted) for a URL that does not
    /// parse, an invalid schema name, a server that cannot be reached or refuses the
    /// credentials, or a connect that took longer than the timeout;
    /// [`DuraflowError::UnsupportedFormat`] when the schema was made by a newer duraflow-rs
    /// (nothing in it is changed).
    pub async fn connect_with(url: &str, config: PgConfig) -> Result<PgStore, DuraflowError> {
        let shown = redacted(url);
        let failed = Failed(&shown);
        if !valid_schema(&config.schema) {
            return Err(failed.db(format!(
                "invalid schema name {:?}: lowercase ASCII letters, digits and `_`, 1 to 63 bytes, \
                 not starting with a digit",
                config.schema
            )));
        }
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| failed.db(format!("not a PostgreSQL connection string: {e}")))?;
        pg.connect_timeout(config.connect_timeout)
            .keepalives(true)
            .keepalives_idle(std::time::Duration::from_secs(15))
            .application_name("duraflow")
            .options(format!(
                "-c synchronous_commit=on -c search_path={}",
                config.schema
            ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("duraflow-pg")
            .enable_all()
            .build()
            .map_err(|e| failed.db(format!("could not start the store's runtime: {e}")))?;
        let runtime = OwnedRuntime(Some(runtime));
        let handle = match &runtime.0 {
            Some(runtime) => runtime.handle().clone(),
            None => return Err(failed.db("the store's runtime is gone")),
        };
        let timeout = config.connect_timeout;
        let (to, answer) = oneshot::channel();
        let started = {
            let (shown, handle) = (shown.clone(), handle.clone());
            async move {
                let started = tokio::time::timeout(timeout, start(pg, config, shown, handle));
                let _ = to.send(started.await);
            }
        };
        handle.spawn(started);
        match answer.await {
            Ok(Ok(Ok(shared))) => Ok(PgStore {
                shared,
                _runtime: runtime,
            }),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(failed.db(format!("could not connect within {timeout:?}"))),
            Err(_) => Err(failed.db("the store's runtime stopped while connecting")),
        }
    }

    /// This store's worker number: the owner of its leases, and the high bits of its run
    /// ids (`id >> 24`).
    pub fn worker(&self) -> u64 {
        self.shared.worker as u64
    }

    /// Stops this store's heartbeats for good while it goes on, as when its process stalls
    /// or loses the database for longer than a lease: its leases, and its worker's liveness,
    /// expire after [`PgConfig::lease`], so another process takes its keys over and this
    /// store's later commits of them are [`DuraflowError::Fenced`]. For tests of takeover
    /// and fencing.
    pub fn stop_heartbeats(&self) {
        self.shared.heartbeats_stopped.store(true, Ordering::SeqCst);
    }

    /// Checks `key` and the size of `bytes`, as every write does.
    fn check_value(&self, key: &str, len: usize) -> Result<(), DuraflowError> {
        validate_key(key)?;
        too_large(key, len, self.shared.config.max_value_size)
    }

    /// `value` in memory within the size limit (a stream is encoded on duraflow's I/O
    /// threads, and stops at the limit), then queued as `job`.
    fn queue_value(
        &self,
        key: &str,
        value: Value,
        attempt: Option<AttemptRecord>,
    ) -> StoreFuture<'static, ()> {
        if let Err(error) = validate_key(key) {
            return ready(Err(error));
        }
        let shared = Arc::clone(&self.shared);
        let key = key.to_owned();
        Box::pin(async move {
            let limit = shared.config.max_value_size;
            let bytes = match value {
                Value::Bytes(bytes) => bytes,
                Value::Stream(encoder) => {
                    let stream_key = key.clone();
                    unblock(move || {
                        let mut out = Limited {
                            bytes: Vec::new(),
                            limit,
                            over: false,
                        };
                        match encoder.write_to(&mut out) {
                            Ok(()) => Ok(out.bytes),
                            Err(_) if out.over => Err(too_large_error(&stream_key, limit)),
                            Err(error) => Err(error),
                        }
                    })
                    .await?
                }
            };
            too_large(&key, bytes.len(), limit)?;
            let (reply, answer) = oneshot::channel();
            let token = shared.held().get(&key).map(|held| held.token);
            let token = token.filter(|_| attempt.is_some());
            let job = Job::Commit {
                hash: digest(&key),
                key: key.clone(),
                value: bytes,
                attempt,
                token,
                reply,
            };
            shared.queue(job, &key)?;
            match answer.await {
                Ok(result) => result,
                Err(_) => Err(DuraflowError::RuntimeShutdown { key }),
            }
        })
    }
}

/// Fails when `len` bytes are over `limit`.
fn too_large(key: &str, len: usize, limit: usize) -> Result<(), DuraflowError> {
    if len > limit {
        return Err(too_large_error(key, limit));
    }
    Ok(())
}

fn too_large_error(key: &str, limit: usize) -> DuraflowError {
    DuraflowError::Persist {
        key: key.to_owned(),
        source: format!("the value is larger than PgStore's max_value_size of {limit} bytes")
            .into(),
    }
}

/// A writer into memory that fails once more than `limit` bytes were written.
struct Limited {
    bytes: Vec<u8>,
    limit: usize,
    /// Whether a write went past the limit.
    over: bool,
}

impl std::io::Write for Limited {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.over = true;
            return Err(std::io::Error::other(format!(
                "the value is larger than PgStore's max_value_size of {} bytes",
                self.limit
            )));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects the pool, migrates, registers the worker and starts the background tasks.
async fn start(
    pg: tokio_postgres::Config,
    config: PgConfig,
    url: String,
    handle: Handle,
) -> Result<Arc<Shared>, DuraflowError> {
    let failed = Failed(&url);
    let timeout = Some(config.connect_timeout);
    let pool_of = |size| {
        Pool::builder(Manager::new(pg.clone(), NoTls))
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| failed.db(e))
    };
    let pool = pool_of(config.pool_size)?;
    let own = pool_of(2)?;
    let mut client = pool.get().await.map_err(|e| failed.db(e))?;
    schema::migrate(&mut client, &config.schema, &url, !config.existing).await?;
    let lease_s = config.lease.as_secs_f64();
    let worker: i64 = client
        .query_one(
            "INSERT INTO workers (expires_at) VALUES (now() + $1::float8 * interval '1 second') \
             RETURNING id",
            &[&lease_s],
        )
        .await
        .map_err(|e| failed.db(e))
        .and_then(|row| col(&row, 0))?;
    drop(client);
    let channel = format!("duraflow_{:08x}", crc32fast::hash(config.schema.as_bytes()));
    let (queue, jobs) = mpsc::unbounded_channel();
    let (takes, requests) = mpsc::unbounded_channel();
    let (reads, read_requests) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        pool,
        own,
        url,
        config,
        worker,
        next_run: AtomicU64::new(0),
        queue,
        takes,
        reads,
        held: Mutex::new(HashMap::new()),
        notify: Arc::default(),
        channel,
        handle,
        heartbeats_stopped: AtomicBool::new(false),
    });
    history::reap(&shared).await?;
    leases::start_listener(&shared, pg).await?;
    tokio::spawn(writer::committer(Arc::clone(&shared), jobs));
    tokio::spawn(leases::heartbeat(Arc::clone(&shared)));
    tokio::spawn(leases::leaser(Arc::clone(&shared), requests));
    tokio::spawn(reader(Arc::clone(&shared), read_requests));
    Ok(shared)
}

/// A read for the reader: the value of the key whose digest is `hash`.
pub(crate) struct ReadRequest {
    hash: Vec<u8>,
    reply: oneshot::Sender<Result<Option<Vec<u8>>, DuraflowError>>,
}

/// The reader's loop: reads whatever reads are queued (up to 256, and a few at once) in one
/// query each, then answers them. Runs until the store is dropped.
async fn reader(shared: Arc<Shared>, mut requests: mpsc::UnboundedReceiver<ReadRequest>) {
    /// Batches read at once, each on a connection of its own.
    const AT_ONCE: usize = 4;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    while let Some(first) = requests.recv().await {
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < 256 {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let read = async {
                let client = shared.client().await?;
                let statement = client
                    .prepare_cached(
                        "SELECT key_hash, value FROM outputs WHERE key_hash = ANY($1::bytea[])",
                    )
                    .await
                    .map_err(|e| shared.failed().db(e))?;
                let hashes: Vec<&[u8]> = batch.iter().map(|r| r.hash.as_slice()).collect();
                let rows = client
                    .query(&statement, &[&hashes])
                    .await
                    .map_err(|e| shared.failed().db(e))?;
                let mut found = HashMap::with_capacity(rows.len());
                for row in rows {
                    found.insert(col::<Vec<u8>>(&row, 0)?, col::<Vec<u8>>(&row, 1)?);
                }
                Ok::<_, DuraflowError>(found)
            };
            match read.await {
                Ok(found) => {
                    for request in batch {
                        let _ = request.reply.send(Ok(found.get(&request.hash).cloned()));
                    }
                }
                Err(error) => {
                    for request in batch {
                        let again = shared.failed().db(error.to_string());
                        let _ = request.reply.send(Err(again));
                    }
                }
            }
            drop(permit);
        });
    }
}

impl Storage for PgStore {
    /// Reads made at the same time share one query.
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        if let Err(error) = validate_key(key) {
            return ready(Err(error));
        }
        let (reply, answer) = oneshot::channel();
        let request = ReadRequest {
            hash: digest(key),
            reply,
        };
        let key = key.to_owned();
        if self.shared.reads.send(request).is_err() {
            return ready(Err(DuraflowError::RuntimeShutdown { key }));
        }
        Box::pin(async move {
            match answer.await {
                Ok(result) => result,
                Err(_) => Err(DuraflowError::RuntimeShutdown { key }),
            }
        })
    }

    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        if let Err(error) = self.check_value(key, value.len()) {
            return ready(Err(error));
        }
        self.queue_value(key, Value::Bytes(value), None)
    }

    fn write_value<'a>(&'a self, key: &'a str, value: Value) -> StoreFuture<'a, ()> {
        self.queue_value(key, value, None)
    }

    fn remove<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        if let Err(error) = validate_key(key) {
            return ready(Err(error));
        }
        let shared = Arc::clone(&self.shared);
        let hash = digest(key);
        self.shared.spawn(key, async move {
            let client = shared.client().await?;
            let removed = client
                .execute("DELETE FROM outputs WHERE key_hash = $1", &[&hash])
                .await
                .map_err(|e| shared.failed().db(e))?;
            Ok(removed > 0)
        })
    }

    fn keys(&self) -> StoreFuture<'_, Vec<String>> {
        let shared = Arc::clone(&self.shared);
        self.shared.spawn("<keys>", async move {
            let client = shared.client().await?;
            let rows = client
                .query("SELECT key FROM outputs", &[])
                .await
                .map_err(|e| shared.failed().db(e))?;
            rows.into_iter()
                .map(|row| history::key_of(col::<Vec<u8>>(&row, 0)?))
                .collect()
        })
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    /// `Ok` while the store's committer runs (until the store is dropped).
    fn health(&self) -> Result<(), DuraflowError> {
        if self.shared.queue.is_closed() {
            return Err(DuraflowError::RuntimeShutdown { key: String::new() });
        }
        Ok(())
    }

    fn run_log(&self) -> Option<&dyn RunLog> {
        Some(self)
    }

    fn history(&self) -> Option<&dyn RunHistory> {
        Some(self)
    }
}

impl RunLog for PgStore {
    /// A run id of this store's worker (see [`PgStore`]); the run's row is written in the
    /// background.
    ///
    /// # Errors
    /// [`DuraflowError::Database`] once this store gave 2^24 − 1 run ids (connect again);
    /// [`DuraflowError::RuntimeShutdown`] when the store's committer has stopped.
    fn begin_run(&self, started_ms: u64) -> Result<RunId, DuraflowError> {
        let n = self.shared.next_run.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= 1 << RUN_BITS {
            return Err(self
                .shared
                .failed()
                .db("this store's run ids are used up: connect again for more"));
        }
        let id = (self.worker() << RUN_BITS) | n;
        let job = Job::Begin {
            id: id as i64,
            worker: self.shared.worker,
            started_ms: started_ms as i64,
        };
        self.shared.queue(job, "")?;
        Ok(id)
    }

    fn record(&self, attempt: AttemptRecord) -> Result<(), DuraflowError> {
        validate_key(&attempt.key)?;
        let key = attempt.key.clone();
        self.shared.queue(Job::Record(attempt), &key)
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        value: Value,
        attempt: AttemptRecord,
    ) -> StoreFuture<'a, ()> {
        if let Value::Bytes(bytes) = &value {
            if let Err(error) = self.check_value(key, bytes.len()) {
                return ready(Err(error));
            }
        }
        self.queue_value(key, value, Some(attempt))
    }

    fn finish_run(&self, run: RunRecord) -> StoreFuture<'_, ()> {
        let (reply, answer) = oneshot::channel();
        if let Err(error) = self.shared.queue(Job::Finish { run, reply }, "") {
            return ready(Err(error));
        }
        Box::pin(async move {
            match answer.await {
                Ok(result) => result,
                Err(_) => Err(DuraflowError::RuntimeShutdown { key: String::new() }),
            }
        })
    }

    fn lease<'a>(&'a self, key: &'a str, seen: Option<u64>) -> StoreFuture<'a, Lease> {
        leases::lease(&self.shared, key, seen)
    }

    fn release(&self, key: &str) {
        leases::release(&self.shared, key);
    }
}

impl RunHistory for PgStore {
    fn runs(&self) -> StoreFuture<'_, Vec<RunRecord>> {
        let shared = Arc::clone(&self.shared);
        self.shared
            .spawn("<runs>", async move { history::runs(&shared).await })
    }

    fn run(&self, id: RunId) -> StoreFuture<'_, Option<RunDetails>> {
        let shared = Arc::clone(&self.shared);
        self.shared
            .spawn("<run>", async move { history::run(&shared, id).await })
    }

    fn attempts_of<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Vec<AttemptRecord>> {
        if let Err(error) = validate_key(key) {
            return ready(Err(error));
        }
        let shared = Arc::clone(&self.shared);
        let owned = key.to_owned();
        self.shared.spawn(
            key,
            async move { history::attempts_of(&shared, &owned).await },
        )
    }

    fn gc(&self, keep_runs: usize) -> StoreFuture<'_, GcStats> {
        let shared = Arc::clone(&self.shared);
        self.shared
            .spawn("<gc>", async move { history::gc(&shared, keep_runs).await })
    }
}
