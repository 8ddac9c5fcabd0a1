//! The committer: one task that drains whatever commits, writes and records are queued and
//! writes them in one transaction (its statements pipelined), then answers each (group
//! commit). Queued in order, applied in order: a record is durable no later than the next
//! commit or finished run resolves.

use std::sync::{Arc, LazyLock};

use futures::channel::oneshot;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;

use super::history::AttemptRow;
use super::{col, Shared};
use crate::record::{AttemptRecord, RunRecord};
use crate::DuraflowError;

/// A batch holds at most this many jobs…
const MAX_JOBS: usize = 1024;
/// …and values of at most this many bytes (past the first job's).
const MAX_BYTES: usize = 64 * 1024 * 1024;

/// Work for the committer.
pub(crate) enum Job {
    /// A run's row, written when it begins.
    Begin {
        id: i64,
        worker: i64,
        started_ms: i64,
    },
    /// An attempt record (stores or replaces it, unless it was found `Interrupted`).
    Record(AttemptRecord),
    /// A value, with its `Succeeded` attempt when it is a commit, under the lease `token`
    /// when this store holds one.
    Commit {
        key: String,
        hash: Vec<u8>,
        value: Vec<u8>,
        attempt: Option<AttemptRecord>,
        token: Option<i64>,
        reply: oneshot::Sender<Result<(), DuraflowError>>,
    },
    /// A run's final record.
    Finish {
        run: RunRecord,
        reply: oneshot::Sender<Result<(), DuraflowError>>,
    },
    /// The end of this store's lease `token` on `key`, unless it is done.
    Release {
        key: String,
        hash: Vec<u8>,
        token: i64,
    },
}

impl Job {
    fn size(&self) -> usize {
        match self {
            Job::Commit { value, .. } => value.len(),
            _ => 0,
        }
    }
}

/// How one job of a batch went.
enum Applied {
    Done,
    /// The lease passed to the token given.
    Fenced(i64),
}

const ATTEMPT_COLUMNS: &str =
    "run, key_hash, attempt, key, started_ms, finished_ms, outcome, error, duration_us, output_size, reason";
const ATTEMPT_UPDATE: &str = "key = EXCLUDED.key, started_ms = EXCLUDED.started_ms, \
     finished_ms = EXCLUDED.finished_ms, outcome = EXCLUDED.outcome, error = EXCLUDED.error, \
     duration_us = EXCLUDED.duration_us, output_size = EXCLUDED.output_size, \
     reason = EXCLUDED.reason";

/// The attempt records of a batch (the last of each attempt), in one statement.
static RECORDS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO attempts AS a ({ATTEMPT_COLUMNS}) SELECT * FROM {ATTEMPT_ARRAYS} \
         ON CONFLICT (run, key_hash, attempt) DO UPDATE SET {ATTEMPT_UPDATE} \
         WHERE a.outcome <> 'interrupted'"
    )
});

/// The attempt columns as arrays `$1`..`$11`, unnested.
const ATTEMPT_ARRAYS: &str = "unnest($1::bigint[], $2::bytea[], $3::integer[], $4::bytea[], \
     $5::bigint[], $6::bigint[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], \
     $11::text[]) AS r(run, key_hash, attempt, key, started_ms, finished_ms, outcome, error, \
     duration_us, output_size, reason)";

/// A plain write or commit (no lease): the value, and its attempt if any.
static COMMIT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH o AS (INSERT INTO outputs (key_hash, key, value) \
             SELECT * FROM unnest($12::bytea[], $13::bytea[], $14::bytea[]) ORDER BY 1 \
             ON CONFLICT (key_hash) DO UPDATE SET key = EXCLUDED.key, value = EXCLUDED.value) \
         INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT * FROM {ATTEMPT_ARRAYS} \
         ON CONFLICT (run, key_hash, attempt) DO UPDATE SET {ATTEMPT_UPDATE}"
    )
});

/// The commits of leased keys, in one statement: each key's output and attempt only if its
/// lease's token (`$15`) is still ours (owner `$16`); its lease is then
/// done (`expires_at` infinity), and waiting processes are notified (channel `$17`). Lease
/// rows are locked first, in digest order. Answers, per key, whether it was written and the
/// key's token.
static LEASED_COMMIT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH u AS (SELECT * FROM unnest($12::bytea[], $13::bytea[], $14::bytea[], \
             $15::bigint[]) AS u(h, k, v, t)), \
         lk AS MATERIALIZED (SELECT key_hash, token FROM leases \
             WHERE key_hash IN (SELECT h FROM u) \
             ORDER BY key_hash FOR UPDATE), \
         l AS (UPDATE leases SET done = true, expires_at = 'infinity' FROM u, lk \
             WHERE leases.key_hash = u.h AND lk.key_hash = u.h AND leases.token = u.t \
             AND leases.owner = $16 RETURNING leases.key_hash, leases.token), \
         o AS (INSERT INTO outputs (key_hash, key, value) \
             SELECT u.h, u.k, u.v FROM u JOIN l ON l.key_hash = u.h ORDER BY u.h \
             ON CONFLICT (key_hash) DO UPDATE SET key = EXCLUDED.key, value = EXCLUDED.value), \
         a AS (INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT r.* FROM {ATTEMPT_ARRAYS} \
             JOIN l ON l.key_hash = r.key_hash \
             ON CONFLICT (run, key_hash, attempt) DO UPDATE SET {ATTEMPT_UPDATE}), \
         n AS MATERIALIZED \
             (SELECT pg_notify($17, 'd' || token || ':' || encode(key_hash, 'hex')) FROM l) \
         SELECT u.h, l.key_hash IS NOT NULL, now.token, (SELECT count(*) FROM n) \
         FROM u LEFT JOIN l ON l.key_hash = u.h LEFT JOIN lk now ON now.key_hash = u.h"
    )
});

const BEGIN_SQL: &str = "INSERT INTO runs (id, worker, started_ms, status, version) \
     VALUES ($1, $2, $3, 'running', $4) ON CONFLICT (id) DO NOTHING";
const FINISH_SQL: &str = "INSERT INTO runs AS r \
     (id, worker, started_ms, finished_ms, status, executed, cached, failed, version) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO UPDATE SET \
     started_ms = EXCLUDED.started_ms, finished_ms = EXCLUDED.finished_ms, \
     status = EXCLUDED.status, executed = EXCLUDED.executed, cached = EXCLUDED.cached, \
     failed = EXCLUDED.failed, version = EXCLUDED.version";

/// The committer's loop: runs until the store is dropped.
///
/// A batch's commits are all leased or all plain: [`apply`] writes each way in one
/// statement, which keeps the queue's order of writes of one key only within a batch of
/// one way, and locks its rows in digest order, which keeps two processes' batches from
/// deadlocking only if no transaction locks outputs before leases.
pub(crate) async fn committer(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut bytes = first.size();
        let mut way = None;
        let _ = crosses(&mut way, &first);
        let mut batch = vec![first];
        while batch.len() < MAX_JOBS && bytes < MAX_BYTES {
            match jobs.try_recv() {
                Ok(job) if crosses(&mut way, &job) => {
                    carried = Some(job);
                    break;
                }
                Ok(job) => {
                    bytes += job.size();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        match apply(&shared, &batch).await {
            Ok(applied) => answer(&shared, batch, applied.into_iter().map(Ok).collect()),
            // A statement the server refused aborts the whole transaction: apply each job
            // alone, so that one bad job fails alone.
            Err(Refused::Statement(_)) if batch.len() > 1 => {
                let mut results = Vec::with_capacity(batch.len());
                for job in &batch {
                    let one = apply(&shared, std::slice::from_ref(job)).await;
                    results.push(match one {
                        Ok(mut applied) => Ok(applied.pop().unwrap_or(Applied::Done)),
                        Err(refused) => Err(refused.into_error()),
                    });
                }
                answer(&shared, batch, results);
            }
            Err(refused) => {
                let error = refused.into_error();
                let results = batch.iter().map(|_| Err(copy(&error))).collect();
                answer(&shared, batch, results);
            }
        }
    }
}

/// Notes in `way` how the batch's commits write (leased or not); whether `job` writes the
/// other way.
fn crosses(way: &mut Option<bool>, job: &Job) -> bool {
    match job {
        Job::Commit { token, .. } => *way.get_or_insert(token.is_some()) != token.is_some(),
        _ => false,
    }
}

/// Why a batch was not written.
enum Refused {
    /// The server refused a statement (the connection is fine).
    Statement(DuraflowError),
    /// No connection, or it was lost.
    Connection(DuraflowError),
}

impl Refused {
    fn into_error(self) -> DuraflowError {
        match self {
            Refused::Statement(e) | Refused::Connection(e) => e,
        }
    }
}

/// The same error again (for every job of a failed batch).
fn copy(error: &DuraflowError) -> DuraflowError {
    match error {
        DuraflowError::Database { url, source } => DuraflowError::Database {
            url: url.clone(),
            source: source.to_string().into(),
        },
        other => DuraflowError::Persist {
            key: String::new(),
            source: other.to_string().into(),
        },
    }
}

/// Sends each job's result; a commit that was written or fenced ends this store's lease.
fn answer(shared: &Shared, batch: Vec<Job>, results: Vec<Result<Applied, DuraflowError>>) {
    for (job, result) in batch.into_iter().zip(results) {
        match job {
            Job::Commit {
                key,
                hash,
                token,
                reply,
                ..
            } => {
                let result = match result {
                    Ok(Applied::Done) => Ok(()),
                    Ok(Applied::Fenced(newer)) => Err(DuraflowError::Fenced {
                        key: key.clone(),
                        newer: newer as u64,
                    }),
                    Err(error) => Err(with_key(error, &key)),
                };
                if let (Some(token), true) = (token, result.is_ok() || fenced(&result)) {
                    let mut held = shared.held();
                    if held.get(&key).is_some_and(|h| h.token == token) {
                        held.remove(&key);
                        drop(held);
                        // Callers here waiting for the key look again (a fenced commit
                        // notifies no one).
                        shared.notify.wake_key(&hash);
                    }
                }
                let _ = reply.send(result);
            }
            Job::Finish { reply, .. } => {
                let _ = reply.send(result.map(|_| ()));
            }
            Job::Begin { id, .. } => {
                if let Err(error) = result {
                    tracing::warn!(run = id, %error, "run not recorded");
                }
            }
            Job::Record(attempt) => {
                if let Err(error) = result {
                    tracing::warn!(key = attempt.key, %error, "attempt not recorded");
                }
            }
            Job::Release { key, .. } => {
                if let Err(error) = result {
                    tracing::warn!(key, %error, "lease not released; it expires");
                }
            }
        }
    }
}

fn fenced(result: &Result<(), DuraflowError>) -> bool {
    matches!(result, Err(DuraflowError::Fenced { .. }))
}

/// A failure of a commit of `key`, naming it.
fn with_key(error: DuraflowError, key: &str) -> DuraflowError {
    error.into_persist(key)
}

/// Writes `batch` in one transaction, one statement per kind of job, in the order that
/// keeps the queue's order where it matters: runs begun, attempt records (the last of each
/// attempt), plain writes and commits, leased commits, releases (one statement each: a
/// lease committed before its release stays done), finished runs. (A batch never holds
/// both plain writes and leased commits: see [`committer`].) Answers how each job
/// went once the transaction committed.
async fn apply(shared: &Shared, batch: &[Job]) -> Result<Vec<Applied>, Refused> {
    let failed = shared.failed();
    let refused = |e: tokio_postgres::Error| {
        if e.as_db_error().is_some() {
            Refused::Statement(failed.db(e))
        } else {
            Refused::Connection(failed.db(e))
        }
    };
    // The rows of each statement.
    let mut records: Vec<AttemptRow> = Vec::new();
    let mut plain = Columns::default();
    let mut plain_attempts: Vec<AttemptRow> = Vec::new();
    let mut leased = Columns::default();
    let mut leased_attempts: Vec<AttemptRow> = Vec::new();
    let mut latest = std::collections::HashMap::new();
    for job in batch {
        match job {
            Job::Record(attempt) => {
                let row = AttemptRow::new(attempt, None);
                let at = (row.run, row.hash.clone(), row.attempt);
                match latest.get(&at) {
                    Some(&i) => records[i] = row,
                    None => {
                        latest.insert(at, records.len());
                        records.push(row);
                    }
                }
            }
            Job::Commit {
                key,
                hash,
                value,
                attempt,
                token,
                ..
            } => {
                let (columns, attempts) = match token {
                    Some(_) => (&mut leased, &mut leased_attempts),
                    None => (&mut plain, &mut plain_attempts),
                };
                columns.push(hash, key, value, *token);
                if let Some(attempt) = attempt {
                    attempts.push(AttemptRow::new(attempt, Some(value.len())));
                }
            }
            Job::Begin { .. } | Job::Finish { .. } | Job::Release { .. } => {}
        }
    }
    let mut client = shared.own_client().await.map_err(Refused::Connection)?;
    let tx = client.transaction().await.map_err(refused)?;
    // Records alone need not wait for the log's sync: the next commit or finished run of
    // this store syncs the log past them before it answers.
    let answers = batch
        .iter()
        .any(|job| matches!(job, Job::Commit { .. } | Job::Finish { .. }));
    if !answers {
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await
            .map_err(refused)?;
    }
    for job in batch {
        if let Job::Begin {
            id,
            worker,
            started_ms,
        } = job
        {
            let version = env!("CARGO_PKG_VERSION");
            let params: [&(dyn ToSql + Sync); 4] = [id, worker, started_ms, &version];
            let statement = tx.prepare_cached(BEGIN_SQL).await.map_err(refused)?;
            tx.execute(&statement, &params).await.map_err(refused)?;
        }
    }
    if !records.is_empty() {
        let columns = AttemptColumns::of(&records);
        let statement = tx.prepare_cached(&RECORDS_SQL).await.map_err(refused)?;
        tx.execute(&statement, &columns.params())
            .await
            .map_err(refused)?;
    }
    if !plain.hashes.is_empty() {
        let columns = AttemptColumns::of(&plain_attempts);
        let mut params = columns.params();
        params.extend(plain.params());
        let statement = tx.prepare_cached(&COMMIT_SQL).await.map_err(refused)?;
        tx.execute(&statement, &params).await.map_err(refused)?;
    }
    let mut outcomes = std::collections::HashMap::new();
    if !leased.hashes.is_empty() {
        let columns = AttemptColumns::of(&leased_attempts);
        let mut params = columns.params();
        params.extend(leased.params());
        params.push(&leased.tokens);
        params.push(&shared.worker);
        params.push(&shared.channel);
        let statement = tx
            .prepare_cached(&LEASED_COMMIT_SQL)
            .await
            .map_err(refused)?;
        let rows = tx.query(&statement, &params).await.map_err(refused)?;
        for row in rows {
            let hash: Vec<u8> = col(&row, 0).map_err(Refused::Statement)?;
            let written: bool = col(&row, 1).map_err(Refused::Statement)?;
            let now: Option<i64> = col(&row, 2).map_err(Refused::Statement)?;
            let applied = match written {
                true => Applied::Done,
                false => Applied::Fenced(now.unwrap_or(0)),
            };
            outcomes.insert(hash, applied);
        }
    }
    for job in batch {
        if let Job::Release { hash, token, .. } = job {
            let params: [&(dyn ToSql + Sync); 4] = [hash, token, &shared.worker, &shared.channel];
            let statement = tx
                .prepare_cached(super::leases::RELEASE_SQL)
                .await
                .map_err(refused)?;
            tx.query(&statement, &params).await.map_err(refused)?;
        }
    }
    for job in batch {
        if let Job::Finish { run, .. } = job {
            let id = run.id as i64;
            let worker = id >> super::RUN_BITS;
            let started = run.started_ms as i64;
            let finished = run.finished_ms.map(|ms| ms as i64);
            let status = super::history::status_text(run.status);
            let counts = [run.executed as i64, run.cached as i64, run.failed as i64];
            let params: [&(dyn ToSql + Sync); 9] = [
                &id,
                &worker,
                &started,
                &finished,
                &status,
                &counts[0],
                &counts[1],
                &counts[2],
                &run.version,
            ];
            let statement = tx.prepare_cached(FINISH_SQL).await.map_err(refused)?;
            tx.execute(&statement, &params).await.map_err(refused)?;
        }
    }
    tx.commit().await.map_err(refused)?;
    Ok(batch
        .iter()
        .map(|job| match job {
            Job::Commit {
                hash,
                token: Some(_),
                ..
            } => outcomes.remove(hash).unwrap_or(Applied::Fenced(0)),
            _ => Applied::Done,
        })
        .collect())
}

/// The output columns of a statement's commits, as arrays.
#[derive(Default)]
struct Columns<'a> {
    hashes: Vec<&'a [u8]>,
    keys: Vec<&'a [u8]>,
    values: Vec<&'a [u8]>,
    tokens: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, hash: &'a [u8], key: &'a str, value: &'a [u8], token: Option<i64>) {
        self.hashes.push(hash);
        self.keys.push(key.as_bytes());
        self.values.push(value);
        self.tokens.push(token.unwrap_or(0));
    }

    /// `$12`..`$14` of the commit statements.
    fn params(&self) -> [&(dyn ToSql + Sync); 3] {
        [&self.hashes, &self.keys, &self.values]
    }
}

/// Attempt rows as the arrays `$1`..`$11` of [`ATTEMPT_ARRAYS`].
struct AttemptColumns<'a> {
    run: Vec<i64>,
    hash: Vec<&'a [u8]>,
    attempt: Vec<i32>,
    key: Vec<&'a [u8]>,
    started_ms: Vec<i64>,
    finished_ms: Vec<Option<i64>>,
    outcome: Vec<&'a str>,
    error: Vec<Option<&'a str>>,
    duration_us: Vec<Option<i64>>,
    output_size: Vec<Option<i64>>,
    reason: Vec<Option<&'a str>>,
}

impl<'a> AttemptColumns<'a> {
    fn of(rows: &'a [AttemptRow]) -> AttemptColumns<'a> {
        AttemptColumns {
            run: rows.iter().map(|r| r.run).collect(),
            hash: rows.iter().map(|r| r.hash.as_slice()).collect(),
            attempt: rows.iter().map(|r| r.attempt).collect(),
            key: rows.iter().map(|r| r.key.as_slice()).collect(),
            started_ms: rows.iter().map(|r| r.started_ms).collect(),
            finished_ms: rows.iter().map(|r| r.finished_ms).collect(),
            outcome: rows.iter().map(|r| r.outcome).collect(),
            error: rows.iter().map(|r| r.error.as_deref()).collect(),
            duration_us: rows.iter().map(|r| r.duration_us).collect(),
            output_size: rows.iter().map(|r| r.output_size).collect(),
            reason: rows.iter().map(|r| r.reason.as_deref()).collect(),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.run,
            &self.hash,
            &self.attempt,
            &self.key,
            &self.started_ms,
            &self.finished_ms,
            &self.outcome,
            &self.error,
            &self.duration_us,
            &self.output_size,
            &self.reason,
        ]
    }
}
