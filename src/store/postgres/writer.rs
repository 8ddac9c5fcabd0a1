//! The committer: one task that drains whatever commits, writes and records are queued and
//! writes them in one transaction (its statements pipelined), then answers each (group
//! commit). Queued in order, applied in order: a record is durable no later than the next
//! commit or finished run resolves.

use std::sync::{Arc, LazyLock};

use futures::channel::oneshot;
use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;

use super::history::AttemptRow;
use super::Shared;
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
const ATTEMPT_VALUES: &str = "$1::bigint, $2::bytea, $3::integer, $4::bytea, $5::bigint, \
     $6::bigint, $7::text, $8::text, $9::bigint, $10::bigint, $11::text";
const ATTEMPT_UPDATE: &str = "key = EXCLUDED.key, started_ms = EXCLUDED.started_ms, \
     finished_ms = EXCLUDED.finished_ms, outcome = EXCLUDED.outcome, error = EXCLUDED.error, \
     duration_us = EXCLUDED.duration_us, output_size = EXCLUDED.output_size, \
     reason = EXCLUDED.reason";

static RECORD_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO attempts AS a ({ATTEMPT_COLUMNS}) VALUES ({ATTEMPT_VALUES}) \
         ON CONFLICT (run, key_hash, attempt) DO UPDATE SET {ATTEMPT_UPDATE} \
         WHERE a.outcome <> 'interrupted'"
    )
});

static COMMIT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH o AS (INSERT INTO outputs (key_hash, key, value) VALUES ($2, $4, $12) \
             ON CONFLICT (key_hash) DO UPDATE SET key = EXCLUDED.key, value = EXCLUDED.value) \
         INSERT INTO attempts ({ATTEMPT_COLUMNS}) VALUES ({ATTEMPT_VALUES}) \
         ON CONFLICT (run, key_hash, attempt) DO UPDATE SET {ATTEMPT_UPDATE}"
    )
});

/// The commit of a leased key: everything only if the lease's token is still ours; the
/// lease is then done (`expires_at` infinity), and waiting processes are notified. Answers
/// whether it was written and the key's token.
static LEASED_COMMIT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH l AS (UPDATE leases SET done = true, expires_at = 'infinity' \
             WHERE key_hash = $2 AND token = $13 AND owner = $14 RETURNING token), \
         o AS (INSERT INTO outputs (key_hash, key, value) \
             SELECT $2::bytea, $4::bytea, $12::bytea WHERE EXISTS (SELECT 1 FROM l) \
             ON CONFLICT (key_hash) DO UPDATE SET key = EXCLUDED.key, value = EXCLUDED.value), \
         a AS (INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT {ATTEMPT_VALUES} \
             WHERE EXISTS (SELECT 1 FROM l) \
             ON CONFLICT (run, key_hash, attempt) DO UPDATE SET {ATTEMPT_UPDATE}), \
         n AS (SELECT pg_notify($15, encode($2::bytea, 'hex')) FROM l) \
         SELECT (SELECT count(*) FROM l), (SELECT token FROM leases WHERE key_hash = $2), \
             (SELECT count(*) FROM n)"
    )
});

const WRITE_SQL: &str = "INSERT INTO outputs (key_hash, key, value) VALUES ($1, $2, $3) \
     ON CONFLICT (key_hash) DO UPDATE SET key = EXCLUDED.key, value = EXCLUDED.value";
const BEGIN_SQL: &str = "INSERT INTO runs (id, worker, started_ms, status, version) \
     VALUES ($1, $2, $3, 'running', $4) ON CONFLICT (id) DO NOTHING";
const FINISH_SQL: &str = "INSERT INTO runs AS r \
     (id, worker, started_ms, finished_ms, status, executed, cached, failed, version) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO UPDATE SET \
     started_ms = EXCLUDED.started_ms, finished_ms = EXCLUDED.finished_ms, \
     status = EXCLUDED.status, executed = EXCLUDED.executed, cached = EXCLUDED.cached, \
     failed = EXCLUDED.failed, version = EXCLUDED.version";

/// The committer's loop: runs until the store is dropped.
pub(crate) async fn committer(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < MAX_JOBS && bytes < MAX_BYTES {
            match jobs.try_recv() {
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
                key, token, reply, ..
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

/// Writes `batch` in one transaction; answers how each job went once it committed.
async fn apply(shared: &Shared, batch: &[Job]) -> Result<Vec<Applied>, Refused> {
    let failed = shared.failed();
    let refused = |e: tokio_postgres::Error| {
        if e.as_db_error().is_some() {
            Refused::Statement(failed.db(e))
        } else {
            Refused::Connection(failed.db(e))
        }
    };
    let mut client = shared.client().await.map_err(Refused::Connection)?;
    let transaction = client.transaction().await.map_err(refused)?;
    // Prepared before any statement is sent (each once per connection): the statements
    // then reach the server in the order of the batch, the order they were queued in (a
    // record before the commit that follows it).
    let prepare = |sql: &'static str| {
        let transaction = &transaction;
        async move { transaction.prepare_cached(sql).await }
    };
    let begin_st = prepare(BEGIN_SQL).await.map_err(refused)?;
    let record_st = prepare(RECORD_SQL.as_str()).await.map_err(refused)?;
    let write_st = prepare(WRITE_SQL).await.map_err(refused)?;
    let commit_st = prepare(COMMIT_SQL.as_str()).await.map_err(refused)?;
    let leased_st = prepare(LEASED_COMMIT_SQL.as_str()).await.map_err(refused)?;
    let finish_st = prepare(FINISH_SQL).await.map_err(refused)?;
    let (begin_st, record_st, write_st) = (&begin_st, &record_st, &write_st);
    let (commit_st, leased_st, finish_st) = (&commit_st, &leased_st, &finish_st);
    let rows: Vec<Option<AttemptRow>> = batch
        .iter()
        .map(|job| match job {
            Job::Record(attempt) => Some(AttemptRow::new(attempt, None)),
            Job::Commit {
                attempt: Some(attempt),
                value,
                ..
            } => Some(AttemptRow::new(attempt, Some(value.len()))),
            _ => None,
        })
        .collect();
    let worker = shared.worker;
    let channel = shared.channel.as_str();
    let tx = &transaction;
    let work = batch.iter().zip(&rows).map(|(job, row)| async move {
        match (job, row) {
            (
                Job::Begin {
                    id,
                    worker,
                    started_ms,
                },
                _,
            ) => {
                let version = env!("CARGO_PKG_VERSION");
                let statement = begin_st;
                let params: [&(dyn ToSql + Sync); 4] = [id, worker, started_ms, &version];
                tx.execute(statement, &params).await?;
                Ok(Applied::Done)
            }
            (Job::Record(_), Some(row)) => {
                let statement = record_st;
                tx.execute(statement, &row.params()).await?;
                Ok(Applied::Done)
            }
            (
                Job::Commit {
                    hash,
                    key,
                    value,
                    token: None,
                    ..
                },
                None,
            ) => {
                let statement = write_st;
                let key = key.as_bytes();
                let params: [&(dyn ToSql + Sync); 3] = [hash, &key, value];
                tx.execute(statement, &params).await?;
                Ok(Applied::Done)
            }
            (
                Job::Commit {
                    value, token: None, ..
                },
                Some(row),
            ) => {
                let statement = commit_st;
                let mut params = row.params();
                params.push(value as &(dyn ToSql + Sync));
                tx.execute(statement, &params).await?;
                Ok(Applied::Done)
            }
            (
                Job::Commit {
                    value,
                    token: Some(token),
                    ..
                },
                Some(row),
            ) => {
                let statement = leased_st;
                let mut params = row.params();
                let more: [&(dyn ToSql + Sync); 4] = [value, token, &worker, &channel];
                params.extend(more);
                let answer = tx.query_one(statement, &params).await?;
                let (written, now): (i64, Option<i64>) = (answer.get(0), answer.get(1));
                Ok(if written > 0 {
                    Applied::Done
                } else {
                    Applied::Fenced(now.unwrap_or(0))
                })
            }
            (Job::Finish { run, .. }, _) => {
                let statement = finish_st;
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
                tx.execute(statement, &params).await?;
                Ok(Applied::Done)
            }
            // Not reached: every commit with an attempt has its row, and only those.
            (Job::Record(_) | Job::Commit { .. }, _) => Ok(Applied::Done),
        }
    });
    let results: Vec<Result<Applied, tokio_postgres::Error>> = join_all(work).await;
    let mut applied = Vec::with_capacity(results.len());
    for result in results {
        applied.push(result.map_err(refused)?);
    }
    transaction.commit().await.map_err(refused)?;
    Ok(applied)
}
