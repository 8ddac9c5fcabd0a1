//! The PostgreSQL server the tests of `PgStore` use: `DURAFLOW_PG_URL` (set by
//! `eval "$(.ci/pg-cluster start DIR)"`, as `.ci/run` does), and a fresh schema per test so
//! that tests sharing the server do not see each other.

use std::sync::atomic::{AtomicU32, Ordering};

/// The server's URL; `None` (saying the test skipped) when `DURAFLOW_PG_URL` is unset
/// outside CI. Under CI (`CI` set) a missing URL fails the test: the server must be there.
pub fn pg_url(test: &str) -> Option<String> {
    match std::env::var("DURAFLOW_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{test}: DURAFLOW_PG_URL is not set under CI (.ci/run starts a server)")
        }
        _ => {
            eprintln!(
                "{test}: skipped: DURAFLOW_PG_URL is not set \
                 (eval \"$(.ci/pg-cluster start /tmp/pg)\" starts a server)"
            );
            None
        }
    }
}

/// A schema name no other test (of this or another run) uses: `t_`, a short form of
/// `test`, the process id, the time and a counter.
pub fn fresh_schema(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let short: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect::<String>()
        .to_ascii_lowercase();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!(
        "t_{short}_{}_{:x}_{n}",
        std::process::id(),
        nanos & 0xffff_ffff
    )
}
