//! PgStore's schema: created and upgraded by the ordered SQL steps of
//! `migrations/postgres/`, under a transaction-scoped advisory lock so that processes
//! connecting at once do not race.

use tokio_postgres::Client;

use super::{col, Failed};
use crate::DuraflowError;

/// The migration steps, in order: step `n` (1-based) brings the schema to version `n`.
const MIGRATIONS: &[&str] = &[include_str!("../../../migrations/postgres/0001_tables.sql")];

/// The newest schema version this crate knows.
pub(crate) const VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings `schema` to [`VERSION`] in one transaction: creates the schema and the version
/// table if absent (when `create`) and applies the missing steps. A schema of a newer
/// version is left as it was (the transaction is rolled back).
///
/// # Errors
/// [`DuraflowError::UnsupportedFormat`] for a newer schema; [`DuraflowError::NotAStore`]
/// for an absent one, unless `create`; a database error otherwise.
pub(crate) async fn migrate(
    client: &mut Client,
    schema: &str,
    url: &str,
    create: bool,
) -> Result<(), DuraflowError> {
    let failed = Failed(url);
    let tx = client.transaction().await.map_err(|e| failed.db(e))?;
    // One lock per schema name: 'duraflow' in the high half, a digest of the name below.
    let lock = advisory_key(schema);
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await
        .map_err(|e| failed.db(e))?;
    let exists: bool = tx
        .query_one(
            "SELECT to_regclass(format('%I.schema_version', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(|e| failed.db(e))
        .and_then(|row| col(&row, 0))?;
    let found: u32 = if exists {
        let row = tx
            .query_one(
                &format!("SELECT coalesce(max(version), 0) FROM \"{schema}\".schema_version"),
                &[],
            )
            .await
            .map_err(|e| failed.db(e))?;
        u32::try_from(col::<i32>(&row, 0)?).unwrap_or(0)
    } else {
        0
    };
    if !exists && !create {
        let _ = tx.rollback().await;
        return Err(DuraflowError::NotAStore {
            path: format!("{url} (schema {schema})").into(),
            reason: "no duraflow schema is there".to_owned(),
        });
    }
    if found > VERSION {
        // Nothing was written; the rollback releases the lock.
        let _ = tx.rollback().await;
        return Err(DuraflowError::UnsupportedFormat {
            path: format!("{url} (schema {schema})").into(),
            found,
            supported: VERSION,
        });
    }
    if !exists {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE \"{schema}\".schema_version (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(|e| failed.db(e))?;
    }
    tx.batch_execute(&format!("SET LOCAL search_path TO \"{schema}\""))
        .await
        .map_err(|e| failed.db(e))?;
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = step as i32 + 1;
        tx.batch_execute(sql).await.map_err(|e| failed.db(e))?;
        tx.execute(
            &format!("INSERT INTO \"{schema}\".schema_version (version) VALUES ($1)"),
            &[&version],
        )
        .await
        .map_err(|e| failed.db(e))?;
    }
    tx.commit().await.map_err(|e| failed.db(e))
}

/// The advisory lock key of `schema`'s migrations.
fn advisory_key(schema: &str) -> i64 {
    let digest = crc32fast::hash(schema.as_bytes());
    (0x6475_7261_i64 << 32) | i64::from(digest)
}
