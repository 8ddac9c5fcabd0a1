//! [`PgConfig`]: how a [`PgStore`](super::PgStore) connects, and the URL as messages show it.

use std::time::Duration;

/// See [`PgConfig::DEFAULT_MAX_VALUE_SIZE`].
const DEFAULT_MAX_VALUE_SIZE: usize = 512 * 1024 * 1024;

/// How a [`PgStore`](super::PgStore) connects and leases: built from [`PgConfig::default`]
/// with the builder methods.
///
/// ```
/// use std::time::Duration;
/// use duraflow_rs::PgConfig;
///
/// let config = PgConfig::default()
///     .pool_size(4)
///     .lease(Duration::from_secs(5))
///     .schema("pipeline_a");
/// assert_eq!(config.lease_duration(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PgConfig {
    pub(crate) pool_size: usize,
    pub(crate) lease: Duration,
    pub(crate) schema: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_value_size: usize,
    /// Only open a schema that exists ([`open_existing`](crate::open_existing)).
    pub(crate) existing: bool,
}

impl Default for PgConfig {
    /// A pool of 8 connections, leases of 10 s, schema `duraflow`, a connect timeout of 5 s
    /// and values of at most [`PgConfig::DEFAULT_MAX_VALUE_SIZE`] bytes.
    fn default() -> PgConfig {
        PgConfig {
            pool_size: 8,
            lease: Duration::from_secs(10),
            schema: "duraflow".to_owned(),
            connect_timeout: Duration::from_secs(5),
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            existing: false,
        }
    }
}

impl PgConfig {
    /// The default (and largest) [`max_value_size`](PgConfig::max_value_size): 512 MiB,
    /// half of PostgreSQL's 1 GB limit on one `bytea` value, so that a value, its escaping
    /// and the protocol's framing of it always fit.
    pub const DEFAULT_MAX_VALUE_SIZE: usize = DEFAULT_MAX_VALUE_SIZE;

    /// How many connections the store keeps at most for reads, history queries and leases
    /// (at least 1). The store has three more of its own: its committer's, its heartbeat's
    /// and its listener's.
    pub fn pool_size(mut self, connections: usize) -> PgConfig {
        self.pool_size = connections.max(1);
        self
    }

    /// How long a lease on a task's key lasts without a heartbeat (at least 100 ms): the
    /// store extends the leases it holds every third of it, and another process takes over a
    /// key whose lease this long went without one (its holder is presumed dead). A process
    /// that dies holding a lease delays that task by at most this much.
    pub fn lease(mut self, duration: Duration) -> PgConfig {
        self.lease = duration.max(Duration::from_millis(100));
        self
    }

    /// The PostgreSQL schema the store's tables live in, created if absent: stores with
    /// different schemas in one database are independent. Lowercase ASCII letters, digits
    /// and `_`, 1 to 63 bytes, not starting with a digit (so that the name means the same
    /// quoted and unquoted); another name makes
    /// [`PgStore::connect_with`](super::PgStore::connect_with) fail.
    pub fn schema(mut self, schema: impl Into<String>) -> PgConfig {
        self.schema = schema.into();
        self
    }

    /// How long connecting (and each later wait for a connection) may take before it fails
    /// with [`DuraflowError::Database`](crate::DuraflowError::Database).
    pub fn connect_timeout(mut self, timeout: Duration) -> PgConfig {
        self.connect_timeout = timeout;
        self
    }

    /// The largest value the store takes, in bytes: a larger one is
    /// [`DuraflowError::Persist`](crate::DuraflowError::Persist) naming the key and this
    /// limit, and nothing is written. Capped at [`PgConfig::DEFAULT_MAX_VALUE_SIZE`], the most one
    /// PostgreSQL value safely holds.
    pub fn max_value_size(mut self, bytes: usize) -> PgConfig {
        self.max_value_size = bytes.min(DEFAULT_MAX_VALUE_SIZE);
        self
    }

    /// The lease duration this configuration gives (see [`lease`](PgConfig::lease)).
    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// The schema name this configuration gives (see [`schema`](PgConfig::schema)).
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// This configuration, opening only a schema that exists (it is then upgraded as usual).
    pub(crate) fn existing_only(mut self) -> PgConfig {
        self.existing = true;
        self
    }

    /// How often a held lease (and this process's liveness) is extended.
    pub(crate) fn heartbeat(&self) -> Duration {
        self.lease / 3
    }

    /// How long a process waiting for another's lease sleeps between looks when no
    /// notification comes: a quarter of the lease, at most 1 s.
    pub(crate) fn poll(&self) -> Duration {
        (self.lease / 4).min(Duration::from_secs(1))
    }
}

/// Whether `schema` is a name the store accepts (see [`PgConfig::schema`]).
pub(crate) fn valid_schema(schema: &str) -> bool {
    let bytes = schema.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && !bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(valid_schema("duraflow"));
        assert!(valid_schema("t_1"));
        assert!(!valid_schema(""));
        assert!(!valid_schema("1a"));
        assert!(!valid_schema("a-b"));
        assert!(!valid_schema("Pipeline"));
        assert!(!valid_schema("a\"b"));
        assert!(!valid_schema(&"a".repeat(64)));
    }
}
