//! Promise: every store of the crate passes the conformance kit (`duraflow_rs::testkit`,
//! feature `testkit`), as a third-party store's tests would run it: `MemoryStore` every check
//! but those it cannot have (run records, reopening), `FileStore` and `SledStore` every
//! check, reopened too, under any executor. And the kit reports a store that breaks a
//! promise as a `Failure` naming the check and the key, without panicking.

#![cfg(feature = "testkit")]

mod common;

use common::wait;

use std::time::Duration;

use duraflow_rs::testkit::{self, Failure, Report};
use duraflow_rs::{
    Durability, DuraflowError, FileStore, MemoryStore, SledConfig, SledStore, Storage, StoreFuture,
    Stored, Value,
};

/// Every check of the kit, in the order `check_durable_store` runs them.
const ALL: [&str; 8] = [
    testkit::TRICKY_KEYS_ROUND_TRIP,
    testkit::OVERWRITE_IS_ATOMIC,
    testkit::TYPED_ERRORS,
    testkit::LARGE_VALUES_STREAM,
    testkit::REMOVE_AND_KEYS,
    testkit::CONCURRENT_WRITERS,
    testkit::RUN_RECORDS,
    testkit::REOPEN,
];

/// Fails unless `report` lists `passed` as passed and nothing else but `skipped`.
fn assert_outcomes(report: &Report, passed: &[&str], skipped: &[&str]) {
    let got: Vec<_> = report.passed().collect();
    assert_eq!(got, passed, "{report}");
    let got: Vec<_> = report.skipped().map(|(check, _)| check).collect();
    assert_eq!(got, skipped, "{report}");
}

#[test]
fn memory_store_passes_every_check_but_run_records_without_a_runtime() {
    let report = wait(testkit::check_store(&MemoryStore::new())).unwrap();
    assert_outcomes(&report, &ALL[..6], &[testkit::RUN_RECORDS]);
    let (_, reason) = report.skipped().next().unwrap();
    assert!(reason.contains("no run log"), "{reason}");

    // Through `dyn Storage`, as a store behind a trait object is checked; the kit's futures
    // are Send, so a test may spawn them.
    let store: Box<dyn Storage> = Box::new(MemoryStore::new());
    let check = testkit::check_store(&*store);
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&check);
    assert_eq!(wait(check).unwrap(), report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_passes_every_check_and_keeps_its_values_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let report = testkit::check_durable_store(|| FileStore::new(&root))
        .await
        .unwrap();
    let mut passed = ALL.to_vec();
    passed.retain(|c| *c != testkit::RUN_RECORDS);
    assert_outcomes(&report, &passed, &[testkit::RUN_RECORDS]);
}

// Not checked by the kit: `RunDetails::attempts` is documented "ordered by key, then attempt
// number", and SledStore orders a key after the keys it is a prefix of (`a/b`, `ab`, `a`:
// `record_order` in src/store/sled/layout.rs sorts by the key and a 0xFF separator). The
// kit's `run_records` asks only that each key's attempts come together and by number.
#[tokio::test(flavor = "current_thread")]
async fn sled_store_passes_every_check_and_keeps_its_values_and_runs_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let report = testkit::check_durable_store(|| SledStore::open(&path))
        .await
        .unwrap();
    assert_outcomes(&report, &ALL, &[]);
}

/// Small outputs in files of their own, and commits acknowledged before they are synced:
/// the kit's values cross the blob threshold at other sizes, and its runs are read back
/// through a store that syncs in the background.
#[test]
fn sled_store_with_a_small_blob_threshold_and_periodic_durability_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let open = || {
        SledConfig::new(&path)
            .blob_threshold(1000)
            .durability(Durability::Periodic(Duration::from_millis(20)))
            .open()
    };
    let report = wait(testkit::check_durable_store(open)).unwrap();
    assert_outcomes(&report, &ALL, &[]);
}

/// A store that breaks one promise of the kit's, over a `MemoryStore`.
struct Broken {
    inner: MemoryStore,
    flaw: Flaw,
}

#[derive(Clone, Copy, PartialEq)]
enum Flaw {
    /// Keys are stored lower-cased: `A` and `a` are one key.
    FoldsCase,
    /// A stream keeps only its first 64 KiB.
    TruncatesStreams,
    /// The empty key is stored like any other.
    TakesTheEmptyKey,
}

impl Broken {
    fn key<'a>(&self, key: &'a str) -> std::borrow::Cow<'a, str> {
        match self.flaw {
            Flaw::FoldsCase => key.to_lowercase().into(),
            _ => key.into(),
        }
    }
}

impl Storage for Broken {
    fn read<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        if self.flaw == Flaw::TakesTheEmptyKey && key.is_empty() {
            return Box::pin(async { Ok(None) });
        }
        let key = self.key(key).into_owned();
        Box::pin(async move { self.inner.read(&key).await })
    }

    fn write<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, ()> {
        if self.flaw == Flaw::TakesTheEmptyKey && key.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let key = self.key(key).into_owned();
        Box::pin(async move { self.inner.write(&key, value).await })
    }

    fn write_value<'a>(&'a self, key: &'a str, value: Value) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut bytes = value.into_bytes()?;
            if self.flaw == Flaw::TruncatesStreams {
                bytes.truncate(64 * 1024);
            }
            self.write(key, bytes).await
        })
    }

    fn read_value<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Stored>> {
        Box::pin(async move { Ok(self.read(key).await?.map(Stored::Bytes)) })
    }

    fn kind(&self) -> &'static str {
        "broken"
    }
}

fn failure_of(flaw: Flaw) -> Failure {
    let store = Broken {
        inner: MemoryStore::new(),
        flaw,
    };
    wait(testkit::check_store(&store)).expect_err("the kit passed a broken store")
}

#[test]
fn a_store_that_breaks_a_promise_is_a_failure_naming_the_check_and_the_key() {
    let failure = failure_of(Flaw::FoldsCase);
    assert_eq!(
        failure.check(),
        testkit::TRICKY_KEYS_ROUND_TRIP,
        "{failure}"
    );
    assert_eq!(failure.store(), "broken");
    // "A" was overwritten by "a", or "SS" by "ß"'s neighbour: a key of two spellings.
    let key = failure.key().unwrap().to_owned();
    assert_ne!(key.to_lowercase(), key, "{failure}");
    let message = failure.to_string();
    assert!(
        message.starts_with("check `tricky_keys_round_trip` failed on the broken store, key "),
        "{message}"
    );
    assert_eq!(format!("{failure:?}"), message, "unwrap prints the message");

    let failure = failure_of(Flaw::TruncatesStreams);
    assert_eq!(failure.check(), testkit::OVERWRITE_IS_ATOMIC, "{failure}");
    assert_eq!(failure.key(), Some("testkit/overwrite"));
    assert!(failure.expected().starts_with("204800 bytes"), "{failure}");
    assert!(failure.found().starts_with("65536 bytes"), "{failure}");

    let failure = failure_of(Flaw::TakesTheEmptyKey);
    assert_eq!(failure.check(), testkit::TYPED_ERRORS, "{failure}");
    assert_eq!(failure.key(), Some(""));
    assert_eq!(failure.found(), "Ok", "{failure}");
    assert!(failure.error().is_none());
}

#[test]
fn an_unexpected_error_is_the_failure_s_source() {
    /// Every write fails.
    struct Full;
    impl Storage for Full {
        fn read<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
            Box::pin(async { Ok(None) })
        }
        fn write<'a>(&'a self, key: &'a str, _: Vec<u8>) -> StoreFuture<'a, ()> {
            let error = DuraflowError::Persist {
                key: key.to_owned(),
                source: "the disk is full".into(),
            };
            Box::pin(async { Err(error) })
        }
    }
    let failure = wait(testkit::check_store(&Full)).unwrap_err();
    assert_eq!(failure.check(), testkit::TRICKY_KEYS_ROUND_TRIP);
    assert_eq!(failure.store(), "custom");
    assert_eq!(failure.key(), Some("a/b"), "the first tricky key");
    assert!(failure.found().starts_with("Persist error: "), "{failure}");
    let source = std::error::Error::source(&failure).unwrap();
    assert!(source.to_string().contains("the disk is full"), "{source}");
    assert!(matches!(
        failure.error(),
        Some(DuraflowError::Persist { .. })
    ));
}
