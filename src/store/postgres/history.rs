//! [`RunHistory`](crate::RunHistory) over PgStore's runs and attempts tables, and how
//! records map to rows.
//!
//! A run is `Running` until its final record; one still `Running` whose worker's liveness
//! expired (the worker stopped extending it: its process died or dropped the store) is
//! `Interrupted`, and so are that worker's `Running` attempts. That is written when it is
//! found: at connect and before every query of the history.

use tokio_postgres::Row;

use super::{col, digest, Shared};
use crate::record::{
    now_ms, AttemptOutcome, AttemptRecord, GcStats, RunDetails, RunId, RunRecord, RunStatus,
};
use crate::DuraflowError;

/// An attempt record as the attempts table's columns.
pub(crate) struct AttemptRow {
    pub(crate) run: i64,
    pub(crate) hash: Vec<u8>,
    pub(crate) attempt: i32,
    pub(crate) key: Vec<u8>,
    pub(crate) started_ms: i64,
    pub(crate) finished_ms: Option<i64>,
    pub(crate) outcome: &'static str,
    pub(crate) error: Option<String>,
    pub(crate) duration_us: Option<i64>,
    pub(crate) output_size: Option<i64>,
    pub(crate) reason: Option<String>,
}

impl AttemptRow {
    /// The row of `attempt`; `size` (the committed value's length) replaces its
    /// `output_size`.
    pub(crate) fn new(attempt: &AttemptRecord, size: Option<usize>) -> AttemptRow {
        let (outcome, error) = match &attempt.outcome {
            AttemptOutcome::Running => ("running", None),
            AttemptOutcome::Succeeded => ("succeeded", None),
            AttemptOutcome::Cached => ("cached", None),
            AttemptOutcome::Failed { error } => ("failed", Some(error.clone())),
            AttemptOutcome::Interrupted => ("interrupted", None),
        };
        let size = size.map(|s| s as u64).or(attempt.output_size);
        AttemptRow {
            run: attempt.run as i64,
            hash: digest(&attempt.key),
            attempt: attempt.attempt as i32,
            key: attempt.key.as_bytes().to_vec(),
            started_ms: attempt.started_ms as i64,
            finished_ms: attempt.finished_ms.map(|ms| ms as i64),
            outcome,
            error,
            duration_us: attempt.duration_us.map(|us| us as i64),
            output_size: size.map(|s| s as i64),
            reason: attempt.reason.clone(),
        }
    }
}

/// A run status as stored.
pub(crate) fn status_text(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Running => "running",
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Interrupted => "interrupted",
    }
}

/// A stored key's bytes as a key.
pub(crate) fn key_of(bytes: Vec<u8>) -> Result<String, DuraflowError> {
    String::from_utf8(bytes).map_err(|e| DuraflowError::Corrupt {
        key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        path: None,
        reason: "the stored key is not UTF-8".to_owned(),
    })
}

const RUN_COLUMNS: &str = "id, started_ms, finished_ms, status, executed, cached, failed, version";
const ATTEMPT_COLUMNS: &str =
    "run, key, attempt, started_ms, finished_ms, outcome, error, duration_us, output_size, reason";

fn run_of(row: &Row) -> Result<RunRecord, DuraflowError> {
    let id = col::<i64>(row, 0)? as u64;
    let status = match col::<&str>(row, 3)? {
        "running" => RunStatus::Running,
        "succeeded" => RunStatus::Succeeded,
        "failed" => RunStatus::Failed,
        "interrupted" => RunStatus::Interrupted,
        other => {
            return Err(DuraflowError::Corrupt {
                key: String::new(),
                path: None,
                reason: format!("run {id} has the unknown status {other:?}"),
            })
        }
    };
    Ok(RunRecord {
        id,
        started_ms: col::<i64>(row, 1)? as u64,
        finished_ms: col::<Option<i64>>(row, 2)?.map(|ms| ms as u64),
        status,
        executed: col::<i64>(row, 4)? as u64,
        cached: col::<i64>(row, 5)? as u64,
        failed: col::<i64>(row, 6)? as u64,
        version: col(row, 7)?,
    })
}

fn attempt_of(row: &Row) -> Result<AttemptRecord, DuraflowError> {
    let key = key_of(col(row, 1)?)?;
    let outcome = match col::<&str>(row, 5)? {
        "running" => AttemptOutcome::Running,
        "succeeded" => AttemptOutcome::Succeeded,
        "cached" => AttemptOutcome::Cached,
        "failed" => AttemptOutcome::Failed {
            error: col::<Option<String>>(row, 6)?.unwrap_or_default(),
        },
        "interrupted" => AttemptOutcome::Interrupted,
        other => {
            return Err(DuraflowError::Corrupt {
                key,
                path: None,
                reason: format!("an attempt has the unknown outcome {other:?}"),
            })
        }
    };
    Ok(AttemptRecord {
        run: col::<i64>(row, 0)? as u64,
        key,
        attempt: col::<i32>(row, 2)? as u32,
        started_ms: col::<i64>(row, 3)? as u64,
        finished_ms: col::<Option<i64>>(row, 4)?.map(|ms| ms as u64),
        outcome,
        duration_us: col::<Option<i64>>(row, 7)?.map(|us| us as u64),
        output_size: col::<Option<i64>>(row, 8)?.map(|s| s as u64),
        reason: col(row, 9)?,
    })
}

/// Marks the `Running` runs and attempts of workers whose liveness expired `Interrupted`.
/// A row being written meanwhile (its worker was presumed dead too soon) is skipped, not
/// waited for: the next reap sees it, and no lock of the writer's is waited on.
///
/// # Errors
/// A database error.
pub(crate) async fn reap(shared: &Shared) -> Result<(), DuraflowError> {
    let failed = shared.failed();
    let client = shared.client().await?;
    let now = now_ms() as i64;
    let statement = client
        .prepare_cached(
            "WITH dead AS (SELECT id FROM workers WHERE expires_at < now()), \
             rs AS MATERIALIZED (SELECT id FROM runs \
                 WHERE status = 'running' AND worker IN (SELECT id FROM dead) \
                 FOR UPDATE SKIP LOCKED), \
             r AS (UPDATE runs SET status = 'interrupted', finished_ms = $1 FROM rs \
                 WHERE runs.id = rs.id AND runs.status = 'running'), \
             at AS MATERIALIZED (SELECT run, key_hash, attempt FROM attempts \
                 WHERE outcome = 'running' AND (run >> 24) IN (SELECT id FROM dead) \
                 FOR UPDATE SKIP LOCKED) \
             UPDATE attempts SET outcome = 'interrupted', finished_ms = $1 FROM at \
             WHERE (attempts.run, attempts.key_hash, attempts.attempt) \
                 = (at.run, at.key_hash, at.attempt) AND attempts.outcome = 'running'",
        )
        .await
        .map_err(|e| failed.db(e))?;
    client
        .execute(&statement, &[&now])
        .await
        .map_err(|e| failed.db(e))?;
    Ok(())
}

/// Every run, by id.
pub(crate) async fn runs(shared: &Shared) -> Result<Vec<RunRecord>, DuraflowError> {
    reap(shared).await?;
    let client = shared.client().await?;
    let rows = client
        .query(&format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id"), &[])
        .await
        .map_err(|e| shared.failed().db(e))?;
    rows.iter().map(run_of).collect()
}

/// Run `id` with its attempts, by key and attempt number.
pub(crate) async fn run(shared: &Shared, id: RunId) -> Result<Option<RunDetails>, DuraflowError> {
    reap(shared).await?;
    let failed = shared.failed();
    let client = shared.client().await?;
    let Ok(id) = i64::try_from(id) else {
        return Ok(None);
    };
    let row = client
        .query_opt(
            &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(|e| failed.db(e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let run = run_of(&row)?;
    let rows = client
        .query(
            &format!("SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE run = $1 ORDER BY key, attempt"),
            &[&id],
        )
        .await
        .map_err(|e| failed.db(e))?;
    let attempts = rows.iter().map(attempt_of).collect::<Result<_, _>>()?;
    Ok(Some(RunDetails { run, attempts }))
}

/// Every attempt at `key`, by run and attempt number.
pub(crate) async fn attempts_of(
    shared: &Shared,
    key: &str,
) -> Result<Vec<AttemptRecord>, DuraflowError> {
    reap(shared).await?;
    let client = shared.client().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE key_hash = $1 ORDER BY run, attempt"
            ),
            &[&digest(key)],
        )
        .await
        .map_err(|e| shared.failed().db(e))?;
    rows.iter().map(attempt_of).collect()
}

/// Removes every run but the newest `keep_runs` and those still `Running`, with their
/// attempts, in one transaction.
pub(crate) async fn gc(shared: &Shared, keep_runs: usize) -> Result<GcStats, DuraflowError> {
    reap(shared).await?;
    let client = shared.client().await?;
    let keep = i64::try_from(keep_runs).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            "WITH keep AS (SELECT id FROM runs ORDER BY id DESC LIMIT $1), \
             gone AS (DELETE FROM runs WHERE id NOT IN (SELECT id FROM keep) \
                 AND status <> 'running' RETURNING id, pg_column_size(runs.*) AS size), \
             atts AS (DELETE FROM attempts WHERE run IN (SELECT id FROM gone) \
                 RETURNING pg_column_size(attempts.*) AS size) \
             SELECT coalesce((SELECT array_agg(id ORDER BY id) FROM gone), '{}'::bigint[]), \
                 (SELECT count(*) FROM atts), \
                 (SELECT coalesce(sum(size), 0)::bigint FROM gone) \
                     + (SELECT coalesce(sum(size), 0)::bigint FROM atts)",
            &[&keep],
        )
        .await
        .map_err(|e| shared.failed().db(e))?;
    let removed: Vec<i64> = col(&row, 0)?;
    let attempts = col::<i64>(&row, 1)? as u64;
    Ok(GcStats {
        runs_removed: removed.into_iter().map(|id| id as u64).collect(),
        attempts_removed: attempts,
        records_removed: attempts + col::<Vec<i64>>(&row, 0)?.len() as u64,
        bytes_reclaimed: col::<i64>(&row, 2)? as u64,
        output_files_removed: 0,
    })
}
