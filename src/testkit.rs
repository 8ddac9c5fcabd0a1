//! The conformance kit for [`Storage`] implementations (feature `testkit`): the checks that
//! every store must pass, as async functions that a store's own tests call.
//!
//! [`MemoryStore`](crate::MemoryStore), [`FileStore`](crate::FileStore) and
//! [`SledStore`](crate::SledStore) run the whole kit in this crate's `tests/conformance.rs`;
//! the author of another store adds the feature to their dev-dependencies
//! (`duraflow-rs = { version = "2", features = ["testkit"] }`) and runs it too.
//!
//! A check never panics: it returns [`Outcome::Passed`], [`Outcome::Skipped`] (the store
//! lacks an optional capability, and says so), or a [`Failure`] naming the check, the
//! store, the key, the step, and what was expected and found. A test `.unwrap()`s it (a
//! `Failure`'s `Debug` is its message) or prints it.
//!
//! | check | promise |
//! |---|---|
//! | [`tricky_keys_round_trip`] | every key of 1..=4096 bytes ([`tricky_keys`]: separators, dots, NUL, case, Unicode forms, the stores' own file names, SQL) is its own key, and [`keys`](Storage::keys) lists each once |
//! | [`overwrite_is_atomic`] | an overwrite replaces the value whole (a shorter value leaves no tail of a longer one); an encoder that fails partway leaves the previous value; readers during overwrites see an old value or a new one, whole |
//! | [`typed_errors`] | a missing key is `Ok(None)`; the empty key and a key over [`MAX_KEY_LEN`] are [`DuraflowError::InvalidKey`] naming the key from every method, and store nothing |
//! | [`large_values_stream`] | values of 0 bytes to over 1 MiB, around the 64 KiB at which stores switch to streaming, round-trip written whole or streamed and read whole or as a reader; the encoder is dropped before the write resolves; a reader taken before an overwrite yields one value whole |
//! | [`remove_and_keys`] | `remove` says whether the key was there and removes only it; `keys` lists exactly what is stored (each skipped when the store says [`Unsupported`](DuraflowError::Unsupported)) |
//! | [`concurrent_writers`] | many writes at once, to distinct keys and to one key, each whole: every key holds its value, the shared one a value one of its writers wrote |
//! | [`run_records`] | with a [`RunLog`] and a [`RunHistory`]: run ids increase, commits store the value with its attempt (and its size), and `runs`, `run`, `attempts_of` and `gc` agree with what was recorded |
//! | [`reopen`] | for durable stores: values, removals, runs and attempts survive closing and opening the store again, twice; a run left unfinished is not reported finished, and ids are not reused |
//!
//! [`check_store`] runs every check but [`reopen`] over one store; [`check_durable_store`]
//! opens a store, runs [`check_store`] over it, closes it and runs [`reopen`].
//!
//! # What the checks write
//! Give the kit a store made for the test. The checks write, overwrite and remove the
//! [`tricky_keys`] and keys under `testkit/`; [`run_records`] begins and finishes runs and
//! then removes the records of every run but the newest with [`RunHistory::gc`], and
//! [`reopen`] leaves a run unfinished. The checks do not need an empty store, nor clean up.
//!
//! # Executors
//! The checks use no runtime of their own: await them under tokio (`#[tokio::test]`) or any
//! executor, or block on them (`futures::executor::block_on`). Concurrent operations are
//! futures of the store joined on the calling task, so a store whose futures need the
//! caller's runtime (an async database client, say) works; a store that does its work on
//! threads of its own (as the stores of this crate do, inside [`unblock`]) works on it in
//! parallel. A [`Stored::Reader`] is read inside [`unblock`]. [`reopen`]'s `open` is called
//! on the calling thread.
//!
//! # Example
//! The test of a third-party store, here over a `MemoryStore` (a store without run records,
//! whose `run_records` check is skipped):
//! ```
//! use duraflow_rs::{testkit, MemoryStore};
//!
//! // #[test]
//! fn my_store_conforms() {
//!     let store = MemoryStore::new(); // MyStore::new(...)
//!     let report = futures::executor::block_on(testkit::check_store(&store)).unwrap();
//!     println!("{report}");
//!     assert_eq!(report.skipped().count(), 1); // run_records: no run log
//! }
//! # my_store_conforms();
//! ```
//! A durable store is opened by a closure, so that [`reopen`] can close it and open it again,
//! here a `FileStore` (a durable store without run records):
//! ```
//! use duraflow_rs::{testkit, FileStore};
//!
//! // #[tokio::test]
//! async fn my_durable_store_conforms() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let root = dir.path().join("store");
//!     // || MyStore::open(&root)
//!     let report = testkit::check_durable_store(|| FileStore::new(&root)).await.unwrap();
//!     let skipped: Vec<_> = report.skipped().map(|(check, _)| check).collect();
//!     assert_eq!(skipped, [testkit::RUN_RECORDS], "{report}");
//! }
//! # futures::executor::block_on(my_durable_store_conforms());
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::Arc;

use futures::future::try_join_all;

use crate::store::value::carried;
use crate::{
    unblock, AttemptOutcome, AttemptRecord, DuraflowError, RunHistory, RunId, RunLog, RunRecord,
    RunStatus, Storage, Stored, Value, MAX_KEY_LEN,
};

/// The name of [`tricky_keys_round_trip`], as [`Failure::check`] and [`Report`] give it.
pub const TRICKY_KEYS_ROUND_TRIP: &str = "tricky_keys_round_trip";
/// The name of [`overwrite_is_atomic`].
pub const OVERWRITE_IS_ATOMIC: &str = "overwrite_is_atomic";
/// The name of [`typed_errors`].
pub const TYPED_ERRORS: &str = "typed_errors";
/// The name of [`large_values_stream`].
pub const LARGE_VALUES_STREAM: &str = "large_values_stream";
/// The name of [`remove_and_keys`].
pub const REMOVE_AND_KEYS: &str = "remove_and_keys";
/// The name of [`concurrent_writers`].
pub const CONCURRENT_WRITERS: &str = "concurrent_writers";
/// The name of [`run_records`].
pub const RUN_RECORDS: &str = "run_records";
/// The name of [`reopen`].
pub const REOPEN: &str = "reopen";

/// Outputs up to this size travel whole between a DAG and its store; the kit's large values
/// lie on both sides of it.
const WHOLE: usize = 64 * 1024;
/// The piece size of the kit's streamed values: uneven, so that pieces straddle any
/// buffer a store uses.
const PIECE: usize = 7919;
/// The start time of the kit's runs and attempts, in milliseconds since the Unix epoch.
const T0: u64 = 1_700_000_000_000;

/// What a check found wrong: which check, on which store, at which key and step, and what
/// was expected and found instead.
///
/// Its `Display` (and its `Debug`, so that `.unwrap()` prints it) is one message:
/// ``check `typed_errors` failed on the file store, key "": write of the empty key: expected
/// InvalidKey naming the key; found Ok``.
pub struct Failure {
    details: Box<Details>,
}

/// What a [`Failure`] says, boxed: a `Result` of the kit's stays small.
struct Details {
    check: &'static str,
    store: &'static str,
    key: Option<String>,
    step: String,
    expected: String,
    found: String,
    error: Option<DuraflowError>,
}

impl Failure {
    /// The check that failed ([`TYPED_ERRORS`], …).
    pub fn check(&self) -> &'static str {
        self.details.check
    }

    /// The store's [`kind`](Storage::kind).
    pub fn store(&self) -> &'static str {
        self.details.store
    }

    /// The key concerned, if the failure concerns one.
    pub fn key(&self) -> Option<&str> {
        self.details.key.as_deref()
    }

    /// What the check was doing.
    pub fn step(&self) -> &str {
        &self.details.step
    }

    /// What the check expected.
    pub fn expected(&self) -> &str {
        &self.details.expected
    }

    /// What it found instead.
    pub fn found(&self) -> &str {
        &self.details.found
    }

    /// The store's error, when it returned one that the check did not expect (also the
    /// failure's [`source`](std::error::Error::source)).
    pub fn error(&self) -> Option<&DuraflowError> {
        self.details.error.as_ref()
    }

    fn with(mut self, e: DuraflowError) -> Failure {
        self.details.error = Some(e);
        self
    }

    fn of_run(mut self, run: RunId) -> Failure {
        self.details.step = format!("{} (run {run})", self.details.step);
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.details;
        write!(f, "check `{}` failed on the {} store", d.check, d.store)?;
        if let Some(key) = &d.key {
            write!(f, ", key {}", key_preview(key))?;
        }
        write!(
            f,
            ": {}: expected {}; found {}",
            d.step, d.expected, d.found
        )
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.details
            .error
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// How a check that found nothing wrong ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Everything the check looks at is as promised.
    Passed,
    /// The store lacks what the check looks at (it answers
    /// [`DuraflowError::Unsupported`], or has no run log), so nothing was checked.
    Skipped {
        /// What the store lacks.
        reason: String,
    },
}

/// The outcomes of the checks [`check_store`] or [`check_durable_store`] ran, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The store's [`kind`](Storage::kind).
    pub store: &'static str,
    /// Each check's name and outcome, in the order they ran.
    pub checks: Vec<(&'static str, Outcome)>,
}

impl Report {
    fn new(store: &'static str) -> Report {
        Report {
            store,
            checks: Vec::new(),
        }
    }

    /// The checks that passed.
    pub fn passed(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.checks
            .iter()
            .filter(|(_, outcome)| *outcome == Outcome::Passed)
            .map(|(check, _)| *check)
    }

    /// The checks that were skipped, with the reason.
    pub fn skipped(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        self.checks
            .iter()
            .filter_map(|(check, outcome)| match outcome {
                Outcome::Skipped { reason } => Some((*check, reason.as_str())),
                Outcome::Passed => None,
            })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conformance of the {} store:", self.store)?;
        for (check, outcome) in &self.checks {
            match outcome {
                Outcome::Passed => write!(f, "\n  {check}: passed")?,
                Outcome::Skipped { reason } => write!(f, "\n  {check}: skipped ({reason})")?,
            }
        }
        Ok(())
    }
}

/// Runs every check but [`reopen`] over `store`, in the order of the table in the
/// [module docs](self), and stops at the first failure.
///
/// # Errors
/// The first [`Failure`].
pub async fn check_store<S: Storage + ?Sized>(store: &S) -> Result<Report, Failure> {
    let mut report = Report::new(store.kind());
    report
        .checks
        .push((TRICKY_KEYS_ROUND_TRIP, tricky_keys_round_trip(store).await?));
    report
        .checks
        .push((OVERWRITE_IS_ATOMIC, overwrite_is_atomic(store).await?));
    report
        .checks
        .push((TYPED_ERRORS, typed_errors(store).await?));
    report
        .checks
        .push((LARGE_VALUES_STREAM, large_values_stream(store).await?));
    report
        .checks
        .push((REMOVE_AND_KEYS, remove_and_keys(store).await?));
    report
        .checks
        .push((CONCURRENT_WRITERS, concurrent_writers(store).await?));
    report.checks.push((RUN_RECORDS, run_records(store).await?));
    Ok(report)
}

/// Opens a store with `open`, runs [`check_store`] over it, closes (drops) it, and runs
/// [`reopen`] with `open`: the whole kit, for a store that keeps its values across opens.
///
/// # Errors
/// The first [`Failure`]; a failed open is one too (of [`REOPEN`]).
pub async fn check_durable_store<S, F>(mut open: F) -> Result<Report, Failure>
where
    S: Storage,
    F: FnMut() -> Result<S, DuraflowError>,
{
    let mut ctx = Ctx::new(REOPEN, "unopened");
    let store = ctx.open(&mut open, "the first open, for check_store")?;
    let mut report = check_store(&store).await?;
    drop(store);
    report.checks.push((REOPEN, reopen(open).await?));
    Ok(report)
}

/// Keys that stores have trouble with, every one valid ([`validate_key`](crate::validate_key)):
/// path separators and dots, NUL and control characters, case and Unicode normalisation
/// pairs, names the stores of this crate use for their own files, the escapes of their
/// encodings, SQL, keys that are prefixes of others, and keys of [`MAX_KEY_LEN`] bytes.
pub fn tricky_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        // Separators and dots.
        "a/b",
        "a_b",
        "a.b",
        "a\\b",
        "a/b/",
        "a//b",
        "/abs",
        "./a",
        "a/./b",
        "..",
        ".",
        "../../escape",
        "~",
        "-",
        // Control characters and white space.
        "a\0b",
        "\0",
        "tab\tkey",
        "line\nbreak",
        "cr\r\n",
        "\u{7f}",
        " ",
        "with space",
        " leading",
        "trailing ",
        // Case, Unicode and its normal forms.
        "A",
        "a",
        "é",
        "e\u{301}",
        "ü",
        "Å",
        "\u{212b}",
        "ß",
        "SS",
        "\u{feff}bom",
        "😀",
        "\u{10ffff}",
        // The stores' own names and encodings.
        "k-a",
        "h-a",
        "k-",
        "_2f",
        "a%2Fb",
        "%",
        "_",
        "*",
        "?",
        "value",
        "value.tmp",
        ".lock",
        ".duraflow-format",
        ".duraflow-1x",
        "outputs",
        "db",
        "conf",
        "duraflow-store",
        "snap.0000000000000000",
        "CON",
        "nul",
        "COM1",
        "aux.txt",
        // SQL and quoting.
        "'",
        "a'b",
        "\"",
        "'; DROP TABLE outputs; --",
        "$1",
        // Prefixes of one another.
        "p",
        "pq",
        "p/q",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    keys.push("x".repeat(MAX_KEY_LEN));
    keys.push("é".repeat(MAX_KEY_LEN / 2));
    keys.push(format!("{}x", "€".repeat(MAX_KEY_LEN / 3)));
    keys.push(format!("{}/{}", "y".repeat(150), "z".repeat(150)));
    // Around the 200 bytes at which a FileStore name becomes a hash.
    keys.push("n".repeat(198));
    keys.push("n".repeat(199));
    keys
}

/// Promise: every one of the [`tricky_keys`] is a key of its own: written with a value of
/// its own, each reads back its value with [`read`](Storage::read) and
/// [`read_value`](Storage::read_value), and [`keys`](Storage::keys) (unless the store says
/// `Unsupported`) lists each exactly once.
///
/// # Errors
/// A [`Failure`] naming the key.
pub async fn tricky_keys_round_trip<S: Storage + ?Sized>(store: &S) -> Result<Outcome, Failure> {
    let ctx = Ctx::new(TRICKY_KEYS_ROUND_TRIP, store.kind());
    let keys = tricky_keys();
    let value = |key: &str| format!("the value of {key:?}").into_bytes();
    for key in &keys {
        ctx.ok(key, "write", store.write(key, value(key))).await?;
    }
    for key in &keys {
        ctx.holds(store, key, &value(key), "read after every key was written")
            .await?;
    }
    if let Some(listed) = ctx.listed(store, "keys after the writes").await? {
        for key in &keys {
            ctx.listed_once(&listed, key, true, "keys after the writes")?;
        }
    }
    ctx.healthy(store)?;
    Ok(Outcome::Passed)
}

/// Promise: an overwrite replaces a value whole, whatever the sizes and forms of the old and
/// the new ([`write`](Storage::write), [`write_value`](Storage::write_value) of bytes or of a
/// stream, small or over 64 KiB; a shorter value leaves no tail of a longer one); a stream
/// whose encoder fails partway (after 1 KiB, and after 100 KiB) fails the write, naming the
/// key, and leaves the previous value; and readers that read while values are overwritten
/// find an old value or a new one, whole, never a mix or nothing.
///
/// # Errors
/// A [`Failure`] naming the key.
pub async fn overwrite_is_atomic<S: Storage + ?Sized>(store: &S) -> Result<Outcome, Failure> {
    let ctx = Ctx::new(OVERWRITE_IS_ATOMIC, store.kind());
    let key = "testkit/overwrite";
    let steps: [(usize, Form); 8] = [
        (10, Form::Write),
        (300 * 1024, Form::Write),
        (3, Form::Write),
        (200 * 1024, Form::Stream),
        (1, Form::Bytes),
        (100, Form::Stream),
        (WHOLE + 1, Form::Bytes),
        (WHOLE - 1, Form::Stream),
    ];
    let mut last = Vec::new();
    for (i, (len, form)) in steps.into_iter().enumerate() {
        let bytes = pattern(100 + i as u64, len);
        let step = format!("overwrite {} with {len} bytes by {form}", i + 1);
        ctx.put(store, key, &bytes, form, &step).await?;
        ctx.holds(store, key, &bytes, &format!("read after {step}"))
            .await?;
        last = bytes;
    }
    for written in [1024, 100 * 1024] {
        let step = format!("write_value of a stream that fails after {written} bytes");
        let token = Arc::new(());
        let encoder = failing(key, pattern(7, written), Arc::clone(&token));
        match store.write_value(key, Value::Stream(encoder)).await {
            Ok(()) => {
                return Err(ctx.fail(key, &step, "an error naming the key (the encoder's)", "Ok"))
            }
            Err(e) if names_key(&e, key) => {}
            Err(e) => {
                return Err(ctx.error(
                    key,
                    &step,
                    "the encoder's error, or Persist naming the key",
                    e,
                ))
            }
        }
        ctx.dropped(&token, key, &step)?;
        ctx.holds(store, key, &last, &format!("read after the {step}"))
            .await?;
    }

    // Readers while values are overwritten, the old ones small and large.
    let key = "testkit/overwrite/concurrent";
    let initial = pattern(200, WHOLE + 100);
    ctx.ok(
        key,
        "write the initial value",
        store.write(key, initial.clone()),
    )
    .await?;
    let values: Vec<(Vec<u8>, Form)> = (0..8)
        .map(|i| {
            let len = if i % 2 == 0 { 100 + i } else { 150 * 1024 + i };
            (pattern(201 + i as u64, len), Form::ALL[i % 3])
        })
        .collect();
    let mut candidates = vec![initial];
    candidates.extend(values.iter().map(|(v, _)| v.clone()));
    let candidates = &candidates;
    let mut work: Vec<Job<'_>> = Vec::new();
    for (i, (bytes, form)) in values.iter().enumerate() {
        let step = format!("concurrent overwrite {i} ({} bytes by {form})", bytes.len());
        work.push(Box::pin(async move {
            ctx.put(store, key, bytes, *form, &step).await
        }));
    }
    for reader in 0..8 {
        work.push(Box::pin(async move {
            for round in 0..6 {
                let step = format!("concurrent read {round} of reader {reader}");
                let found = if (reader + round) % 2 == 0 {
                    ctx.read(store, key, &step).await?
                } else {
                    ctx.read_value(store, key, &step).await?
                };
                ctx.one_of(key, found, candidates, &step)?;
            }
            Ok(())
        }));
    }
    try_join_all(work).await?;
    let found = ctx.read(store, key, "read after the overwrites").await?;
    ctx.one_of(key, found, &candidates[1..], "read after the overwrites")?;
    ctx.healthy(store)?;
    Ok(Outcome::Passed)
}

/// Promise: a key never written reads as `Ok(None)` ([`read`](Storage::read) and
/// [`read_value`](Storage::read_value)); the empty key and a key of [`MAX_KEY_LEN`]` + 1`
/// bytes are [`DuraflowError::InvalidKey`] naming the key from `read`, `read_value`,
/// `write`, `write_value` (bytes and stream, whose encoder is dropped),
/// [`remove`](Storage::remove) (or `Unsupported`) and [`RunHistory::attempts_of`]; none of
/// them stores anything ([`keys`](Storage::keys) lists neither), and the store stays
/// [`health`](Storage::health)y.
///
/// # Errors
/// A [`Failure`] naming the key.
pub async fn typed_errors<S: Storage + ?Sized>(store: &S) -> Result<Outcome, Failure> {
    let ctx = Ctx::new(TYPED_ERRORS, store.kind());
    let missing = "testkit/typed/never-written";
    let found = ctx
        .read(store, missing, "read of a key never written")
        .await?;
    ctx.absent(missing, found, "read of a key never written")?;
    let found = ctx
        .read_value(store, missing, "read_value of a key never written")
        .await?;
    ctx.absent(missing, found, "read_value of a key never written")?;
    match store.remove(missing).await {
        Ok(false) | Err(DuraflowError::Unsupported { .. }) => {}
        Ok(true) => {
            let step = "remove of a key never written";
            return Err(ctx.fail(missing, step, "false", "true"));
        }
        Err(e) => {
            let step = "remove of a key never written";
            return Err(ctx.error(missing, step, "Ok(false) or Unsupported", e));
        }
    }

    let long = "k".repeat(MAX_KEY_LEN + 1);
    for key in ["", long.as_str()] {
        let what = if key.is_empty() {
            "the empty key".to_owned()
        } else {
            format!("a key of {} bytes", key.len())
        };
        let step = format!("write of {what}");
        ctx.invalid(key, &step, store.write(key, b"x".to_vec()), false)
            .await?;
        let step = format!("write_value of bytes under {what}");
        let bytes = Value::Bytes(b"x".to_vec());
        ctx.invalid(key, &step, store.write_value(key, bytes), false)
            .await?;
        let step = format!("write_value of a stream under {what}");
        let token = Arc::new(());
        let stream = Value::Stream(streamed(key, Arc::new(pattern(8, 10)), Arc::clone(&token)));
        ctx.invalid(key, &step, store.write_value(key, stream), false)
            .await?;
        ctx.dropped(&token, key, &step)?;
        let step = format!("read of {what}");
        ctx.invalid(key, &step, store.read(key), false).await?;
        let step = format!("read_value of {what}");
        ctx.invalid(key, &step, store.read_value(key), false)
            .await?;
        let step = format!("remove of {what}");
        ctx.invalid(key, &step, store.remove(key), true).await?;
        if let Some(history) = store.history() {
            let step = format!("attempts_of {what}");
            ctx.invalid(key, &step, history.attempts_of(key), false)
                .await?;
        }
    }
    if let Some(listed) = ctx.listed(store, "keys after the invalid keys").await? {
        for key in ["", long.as_str()] {
            ctx.listed_once(&listed, key, false, "keys after the invalid keys")?;
        }
    }
    ctx.healthy(store)?;
    Ok(Outcome::Passed)
}

/// Promise: values of 0 bytes to over 1 MiB (around 64 KiB, where stores start to hand
/// values out as readers) read back as written, whatever the ways of writing and reading:
/// written whole ([`write`](Storage::write)), as bytes or as a stream in pieces
/// ([`write_value`](Storage::write_value)), and read whole ([`read`](Storage::read)) or as
/// [`read_value`](Storage::read_value) hands it out (a [`Stored::Reader`] yields exactly its
/// `len` bytes); a stream's encoder is dropped before its write resolves (a DAG waits for
/// that); and a reader taken before the value is overwritten (and, with a
/// [`RunHistory`], a [`gc`](RunHistory::gc) that removes no run but collects the files
/// of overwritten outputs) yields the old value or the new one, whole.
///
/// # Errors
/// A [`Failure`] naming the key.
pub async fn large_values_stream<S: Storage + ?Sized>(store: &S) -> Result<Outcome, Failure> {
    let ctx = Ctx::new(LARGE_VALUES_STREAM, store.kind());
    let sizes = [
        0,
        1,
        PIECE,
        WHOLE - 1,
        WHOLE,
        WHOLE + 1,
        256 * 1024 + 7,
        1024 * 1024 + 3,
    ];
    for (i, len) in sizes.into_iter().enumerate() {
        for form in Form::ALL {
            let key = format!("testkit/large/{len}/{}", form.name());
            let bytes = pattern(300 + 3 * i as u64 + form as u64, len);
            let step = format!("{form} of {len} bytes");
            ctx.put(store, &key, &bytes, form, &step).await?;
            ctx.holds(store, &key, &bytes, &format!("read after {step}"))
                .await?;
            let step = format!("the len of read_value after {step}");
            let stored = ctx.ok(&key, &step, store.read_value(&key)).await?;
            let len = stored.as_ref().map(Stored::len);
            if len != Some(bytes.len() as u64) {
                return Err(ctx.fail(&key, &step, bytes.len(), format!("{len:?}")));
            }
        }
    }

    // A reader taken, then the value overwritten, then the reader read.
    let key = "testkit/large/reader-then-overwrite";
    let (old, new) = (pattern(400, 300 * 1024), pattern(401, 200 * 1024 + 1));
    ctx.ok(key, "write the old value", store.write(key, old.clone()))
        .await?;
    let step = "read_value of the old value";
    let taken = ctx.ok(key, step, store.read_value(key)).await?;
    let step = "overwrite while a read_value of the old value is held";
    ctx.ok(key, step, store.write(key, new.clone())).await?;
    if let Some(history) = store.history() {
        // Collects the files of overwritten outputs, and removes no run.
        let step = "gc(usize::MAX) while a read_value of an overwritten value is held";
        ctx.ok(key, step, history.gc(usize::MAX)).await?;
    }
    let step = "read of the value read_value gave before the overwrite";
    let found = match taken {
        Some(taken) => Some(ctx.stored(key, taken, step).await?),
        None => None,
    };
    ctx.one_of(key, found, &[old, new.clone()], step)?;
    ctx.holds(store, key, &new, "read after the overwrite")
        .await?;
    ctx.healthy(store)?;
    Ok(Outcome::Passed)
}

/// Promise: [`remove`](Storage::remove) resolves to whether the key was present, removes
/// that key only (not one it is a prefix of, nor one that is a prefix of it), a large value
/// too, and a removed key can be written again; [`keys`](Storage::keys) lists exactly the
/// keys stored, each once: what it listed before, and the check's keys while they are
/// stored. Each half is skipped when the store answers
/// [`Unsupported`](DuraflowError::Unsupported).
///
/// # Errors
/// A [`Failure`] naming the key.
pub async fn remove_and_keys<S: Storage + ?Sized>(store: &S) -> Result<Outcome, Failure> {
    let ctx = Ctx::new(REMOVE_AND_KEYS, store.kind());
    let before = ctx.listed(store, "keys before the check").await?;
    let keys = [
        "testkit/remove/a",
        "testkit/remove/a/b",
        "testkit/remove/ab",
        "testkit/remove/large",
    ];
    let value = |i: usize| pattern(500 + i as u64, if i == 3 { 200 * 1024 } else { 20 });
    for (i, key) in keys.iter().enumerate() {
        ctx.ok(key, "write", store.write(key, value(i))).await?;
    }
    ctx.keys_are(store, &before, &keys, "keys after the writes")
        .await?;

    let [a, ab_child, ab, large] = keys;
    let removed = match store.remove(a).await {
        Err(DuraflowError::Unsupported { .. }) => false,
        Ok(true) => true,
        Ok(false) => {
            let step = "remove of a stored key";
            return Err(ctx.fail(a, step, "true (it was present)", "false"));
        }
        Err(e) => return Err(ctx.error(a, "remove of a stored key", "Ok(true)", e)),
    };
    if removed {
        let step = "remove of a key just removed";
        let again = ctx.ok(a, step, store.remove(a)).await?;
        if again {
            return Err(ctx.fail(a, step, "false (it was removed)", "true"));
        }
        let found = ctx.read(store, a, "read after remove").await?;
        ctx.absent(a, found, "read after remove")?;
        let found = ctx.read_value(store, a, "read_value after remove").await?;
        ctx.absent(a, found, "read_value after remove")?;
        for (i, key) in [(1, ab_child), (2, ab), (3, large)] {
            ctx.holds(
                store,
                key,
                &value(i),
                &format!("read after the remove of {a:?}"),
            )
            .await?;
        }
        ctx.keys_are(
            store,
            &before,
            &[ab_child, ab, large],
            "keys after a remove",
        )
        .await?;

        let step = "remove of a large value";
        if !ctx.ok(large, step, store.remove(large)).await? {
            return Err(ctx.fail(large, step, "true (it was present)", "false"));
        }
        let found = ctx
            .read_value(store, large, "read_value after remove")
            .await?;
        ctx.absent(large, found, "read_value after remove")?;

        let again = pattern(510, 33);
        ctx.ok(a, "write after remove", store.write(a, again.clone()))
            .await?;
        ctx.holds(store, a, &again, "read after a write after remove")
            .await?;
        ctx.keys_are(
            store,
            &before,
            &[a, ab_child, ab],
            "keys after a write after remove",
        )
        .await?;
        for key in [a, ab_child, ab] {
            ctx.ok(key, "remove (clean up)", store.remove(key)).await?;
        }
        let step = "keys after every key of the check was removed";
        ctx.keys_are(store, &before, &[], step).await?;
    }
    ctx.healthy(store)?;
    if !removed && before.is_none() {
        return Ok(skipped("the store supports neither remove nor keys"));
    }
    Ok(Outcome::Passed)
}

/// Promise: many writes at once (48 to distinct keys, 24 to one key; small and large, by
/// [`write`](Storage::write) and [`write_value`](Storage::write_value) of bytes and
/// streams) all succeed; afterwards each distinct key holds its value, read concurrently
/// too, and the shared key holds one of the values written to it, whole.
///
/// # Errors
/// A [`Failure`] naming the key.
pub async fn concurrent_writers<S: Storage + ?Sized>(store: &S) -> Result<Outcome, Failure> {
    let ctx = Ctx::new(CONCURRENT_WRITERS, store.kind());
    let lens = [16, 70 * 1024, 1024, 130 * 1024, 0, WHOLE];
    let distinct: Vec<(String, Vec<u8>, Form)> = (0..48)
        .map(|i| {
            let key = format!("testkit/concurrent/distinct/{i}");
            (
                key,
                pattern(600 + i as u64, lens[i % lens.len()] + i),
                Form::ALL[i % 3],
            )
        })
        .collect();
    let shared = "testkit/concurrent/shared";
    let same: Vec<(Vec<u8>, Form)> = (0..24)
        .map(|i| {
            (
                pattern(700 + i as u64, lens[i % lens.len()] + i),
                Form::ALL[(i / 2) % 3],
            )
        })
        .collect();
    let mut work: Vec<Job<'_>> = Vec::new();
    for (n, (key, bytes, form)) in distinct.iter().enumerate() {
        let step = format!("concurrent write {n} ({} bytes by {form})", bytes.len());
        work.push(Box::pin(async move {
            ctx.put(store, key, bytes, *form, &step).await
        }));
        // Interleaved with the writers of the shared key.
        if let Some((bytes, form)) = same.get(n / 2).filter(|_| n % 2 == 0) {
            let step = format!(
                "concurrent write {} to the shared key ({} bytes by {form})",
                n / 2,
                bytes.len()
            );
            work.push(Box::pin(async move {
                ctx.put(store, shared, bytes, *form, &step).await
            }));
        }
    }
    try_join_all(work).await?;
    let reads = distinct.iter().map(|(key, bytes, _)| {
        ctx.holds(
            store,
            key,
            bytes,
            "concurrent read after the concurrent writes",
        )
    });
    try_join_all(reads).await?;
    let candidates: Vec<Vec<u8>> = same.into_iter().map(|(bytes, _)| bytes).collect();
    let step = "read of the shared key after the concurrent writes";
    let found = ctx.read(store, shared, step).await?;
    ctx.one_of(shared, found.clone(), &candidates, step)?;
    let step = "read_value of the shared key after the concurrent writes";
    let again = ctx.read_value(store, shared, step).await?;
    if again != found {
        let expected = describe_opt(found.as_deref());
        return Err(ctx.fail(shared, step, expected, describe_opt(again.as_deref())));
    }
    ctx.healthy(store)?;
    Ok(Outcome::Passed)
}

/// Promise, for a store with both a [`RunLog`] and a [`RunHistory`] (skipped otherwise):
/// - [`begin_run`](RunLog::begin_run) gives ids greater than those of every run recorded
///   before, increasing;
/// - [`commit`](RunLog::commit) stores the value (bytes, and a stream over 64 KiB) with its
///   attempt, filling in the attempt's `output_size` with the value's length, and replaces
///   the `Running` record of the same attempt; [`record`](RunLog::record) keeps `Cached`
///   and `Failed` attempts (`reason` included) as given;
/// - once [`finish_run`](RunLog::finish_run) resolves, [`runs`](RunHistory::runs) lists the
///   run as finished, oldest first; [`run`](RunHistory::run) gives it with exactly its
///   attempts, each key's attempts together and by number (the order of the keys among
///   themselves is left to the store: [`SledStore`](crate::SledStore) puts a key after
///   those it is a prefix of, `a/b` and `ab` before `a`); and
///   [`attempts_of`](RunHistory::attempts_of) gives a key's attempts over the runs, oldest
///   first; an unknown run is `None`;
/// - a commit under an invalid key is [`DuraflowError::InvalidKey`];
/// - [`gc`](RunHistory::gc)`(1)` removes the older run's records (reporting its id and at
///   least its attempts) and keeps the newer run's, and every output stays readable.
///
/// # Errors
/// A [`Failure`] naming the key or the step.
pub async fn run_records<S: Storage + ?Sized>(store: &S) -> Result<Outcome, Failure> {
    let ctx = Ctx::new(RUN_RECORDS, store.kind());
    let (Some(log), Some(history)) = (store.run_log(), store.history()) else {
        return Ok(skipped(match (store.run_log(), store.history()) {
            (None, None) => "the store has no run log",
            (None, Some(_)) => "the store has a run history but no run log",
            _ => "the store has a run log but no run history to read it back",
        }));
    };
    let before = ctx.runs(history, "runs before the check").await?;
    let first = ctx.begin(log, T0, "begin_run")?;
    if let Some(last) = before
        .iter()
        .map(|r| r.id)
        .max()
        .filter(|&last| last >= first)
    {
        let expected = format!("an id above {last}, the last run's");
        return Err(ctx.fail_run(first, "begin_run", expected, first));
    }

    let (a, ab, c) = ("testkit/runs/a", "testkit/runs/ab", "testkit/runs/c");
    let (va, vab, vc) = (pattern(800, 40), pattern(801, 30), pattern(802, 100 * 1024));
    let running = attempt(first, a, 1, AttemptOutcome::Running, None);
    ctx.record(log, running, "record of a Running attempt")?;
    let succeeded = attempt(first, a, 1, AttemptOutcome::Succeeded, None);
    let step = "commit of bytes with its Succeeded attempt";
    let commit = log.commit(a, Value::Bytes(va.clone()), succeeded.clone());
    ctx.ok(a, step, commit).await?;
    ctx.holds(store, a, &va, "read after commit").await?;

    ctx.ok(ab, "write", store.write(ab, vab.clone())).await?;
    let cached = attempt(first, ab, 1, AttemptOutcome::Cached, Some(vab.len() as u64));
    ctx.record(log, cached.clone(), "record of a Cached attempt")?;
    let error = "testkit: the first attempt fails".to_owned();
    let failed = attempt(first, c, 1, AttemptOutcome::Failed { error }, None);
    ctx.record(log, failed.clone(), "record of a Failed attempt")?;
    let running = attempt(first, c, 2, AttemptOutcome::Running, None);
    ctx.record(log, running, "record of a Running second attempt")?;
    let retried = attempt(first, c, 2, AttemptOutcome::Succeeded, None);
    let token = Arc::new(());
    let stream = Value::Stream(streamed(c, Arc::new(vc.clone()), Arc::clone(&token)));
    let step = "commit of a 100 KiB stream with its Succeeded second attempt";
    ctx.ok(c, step, log.commit(c, stream, retried.clone()))
        .await?;
    ctx.dropped(&token, c, step)?;
    ctx.holds(store, c, &vc, "read after commit").await?;
    let first_run = run_record(first, RunStatus::Succeeded, (2, 1, 0));
    let step = "finish_run";
    ctx.ok("", step, log.finish_run(first_run.clone()))
        .await
        .map_err(|f| f.of_run(first))?;

    let sized = |mut a: AttemptRecord, len: usize| {
        a.output_size = Some(len as u64);
        a
    };
    let first_attempts = vec![
        sized(succeeded, va.len()),
        cached,
        failed.clone(),
        sized(retried.clone(), vc.len()),
    ];
    let runs = ctx.runs(history, "runs after finish_run").await?;
    ctx.run_listed(&runs, &first_run, "runs after finish_run")?;
    let step = "run after finish_run";
    ctx.run_details(history, &first_run, &first_attempts, step)
        .await?;
    let ours = [first];
    let step = "attempts_of after finish_run";
    ctx.attempts_of(
        history,
        c,
        &ours,
        &[failed, first_attempts[3].clone()],
        step,
    )
    .await?;
    ctx.attempts_of(history, "testkit/runs/none", &ours, &[], step)
        .await?;
    let step = "run of an id no run has";
    match ctx.ok("", step, history.run(RunId::MAX)).await? {
        None => {}
        Some(found) => return Err(ctx.fail_run(RunId::MAX, step, "None", found.run)),
    }

    let second = ctx.begin(log, T0 + 1000, "begin_run of a second run")?;
    if second <= first {
        let expected = format!("an id above {first}, the first run's");
        return Err(ctx.fail_run(second, "begin_run", expected, second));
    }
    let va2 = pattern(803, 70 * 1024);
    let again = attempt(second, a, 1, AttemptOutcome::Succeeded, None);
    let step = "commit of a large value in the second run";
    ctx.ok(
        a,
        step,
        log.commit(a, Value::Bytes(va2.clone()), again.clone()),
    )
    .await?;
    let invalid = attempt(second, "", 1, AttemptOutcome::Succeeded, None);
    let step = "commit under the empty key";
    let commit = log.commit("", Value::Bytes(b"x".to_vec()), invalid);
    ctx.invalid("", step, commit, false).await?;
    let second_run = run_record(second, RunStatus::Failed, (1, 0, 1));
    ctx.ok(
        "",
        "finish_run of the second run",
        log.finish_run(second_run.clone()),
    )
    .await
    .map_err(|f| f.of_run(second))?;
    let runs = ctx.runs(history, "runs after the second run").await?;
    ctx.run_listed(&runs, &first_run, "runs after the second run")?;
    ctx.run_listed(&runs, &second_run, "runs after the second run")?;
    let again = sized(again, va2.len());
    let step = "run of the second run";
    ctx.run_details(history, &second_run, std::slice::from_ref(&again), step)
        .await?;
    let ours = [first, second];
    let step = "attempts_of a key with attempts in two runs";
    let expected = [first_attempts[0].clone(), again.clone()];
    ctx.attempts_of(history, a, &ours, &expected, step).await?;
    ctx.holds(store, a, &va2, "read after the second run's commit")
        .await?;

    let step = "gc keeping 1 run";
    let stats = ctx.ok("", step, history.gc(1)).await?;
    if !stats.runs_removed.contains(&first) || stats.runs_removed.contains(&second) {
        let expected = format!("runs_removed holding run {first} and not run {second}");
        return Err(ctx.fail_run(first, step, expected, format!("{stats:?}")));
    }
    if stats.attempts_removed < first_attempts.len() as u64 {
        let expected = format!("attempts_removed of at least {}", first_attempts.len());
        return Err(ctx.fail_run(first, step, expected, format!("{stats:?}")));
    }
    let step = "run of a run gc removed";
    if let Some(found) = ctx.ok("", step, history.run(first)).await? {
        return Err(ctx.fail_run(first, step, "None", found.run));
    }
    let step = "run of the run gc kept";
    ctx.run_details(history, &second_run, std::slice::from_ref(&again), step)
        .await?;
    let step = "attempts_of after gc";
    ctx.attempts_of(history, a, &ours, std::slice::from_ref(&again), step)
        .await?;
    ctx.holds(store, a, &va2, "read after gc (gc never removes outputs)")
        .await?;
    ctx.holds(store, ab, &vab, "read after gc (gc never removes outputs)")
        .await?;
    ctx.holds(store, c, &vc, "read after gc (gc never removes outputs)")
        .await?;
    ctx.healthy(store)?;
    Ok(Outcome::Passed)
}

/// Promise, for a store that keeps its values across opens: `open` opens the store, and
/// what one handle stored, the next one opened after it was dropped reads, over three
/// opens: the [`tricky_keys`], an overwritten value (the last), a large one, one that
/// shrank, removals (when supported), and what [`keys`](Storage::keys) lists. With a run
/// log and a history, a finished run and its attempts, and a run left unfinished (after a
/// commit) whose records are there and which is not reported finished: `Running`, or
/// `Interrupted` with its running attempt `Interrupted`; the next run's id is above both.
///
/// `open` is called on the calling thread, each time after the previous handle was
/// dropped.
///
/// # Errors
/// A [`Failure`] naming the key or the step; a failed open is one.
pub async fn reopen<S, F>(mut open: F) -> Result<Outcome, Failure>
where
    S: Storage,
    F: FnMut() -> Result<S, DuraflowError>,
{
    let mut ctx = Ctx::new(REOPEN, "unopened");
    let tricky = tricky_keys();
    let value = |key: &str, round: u32| format!("round {round}: the value of {key:?}").into_bytes();
    let (overwritten, large, shrunk, removed, fresh) = (
        "testkit/reopen/overwritten",
        "testkit/reopen/large",
        "testkit/reopen/shrunk",
        "testkit/reopen/removed",
        "testkit/reopen/fresh",
    );
    let (committed, unfinished, interrupted) = (
        "testkit/reopen/run/committed",
        "testkit/reopen/run/unfinished",
        "testkit/reopen/run/interrupted",
    );
    let v_over = pattern(901, 150 * 1024);
    let v_large = pattern(902, 1024 * 1024 + 3);
    let v_shrunk = pattern(904, 5);
    let v_committed = pattern(905, 90 * 1024);
    let v_unfinished = pattern(906, 100);

    // First open: write.
    let store = ctx.open(&mut open, "the first open")?;
    for key in &tricky {
        ctx.ok(key, "write", store.write(key, value(key, 1)))
            .await?;
    }
    ctx.ok(
        overwritten,
        "write",
        store.write(overwritten, pattern(900, 10)),
    )
    .await?;
    ctx.put(&store, overwritten, &v_over, Form::Stream, "overwrite")
        .await?;
    ctx.ok(large, "write", store.write(large, v_large.clone()))
        .await?;
    ctx.ok(
        shrunk,
        "write",
        store.write(shrunk, pattern(903, 200 * 1024)),
    )
    .await?;
    ctx.ok(shrunk, "overwrite", store.write(shrunk, v_shrunk.clone()))
        .await?;
    ctx.ok(
        removed,
        "write",
        store.write(removed, pattern(907, 70 * 1024)),
    )
    .await?;
    let removes = match store.remove(removed).await {
        Ok(true) => true,
        Err(DuraflowError::Unsupported { .. }) => false,
        Ok(false) => {
            return Err(ctx.fail(removed, "remove", "true (it was present)", "false"));
        }
        Err(e) => return Err(ctx.error(removed, "remove", "Ok(true)", e)),
    };
    let records = match (store.run_log(), store.history()) {
        (Some(log), Some(_)) => {
            let finished = ctx.begin(log, T0 + 5000, "begin_run")?;
            let attempt_1 = attempt(finished, committed, 1, AttemptOutcome::Succeeded, None);
            let token = Arc::new(());
            let bytes = Arc::new(v_committed.clone());
            let stream = Value::Stream(streamed(committed, bytes, Arc::clone(&token)));
            let commit = log.commit(committed, stream, attempt_1.clone());
            ctx.ok(committed, "commit", commit).await?;
            ctx.dropped(&token, committed, "commit")?;
            let len = v_large.len() as u64;
            let cached = attempt(finished, large, 1, AttemptOutcome::Cached, Some(len));
            ctx.record(log, cached.clone(), "record of a Cached attempt")?;
            let finished_run = run_record(finished, RunStatus::Succeeded, (1, 1, 0));
            ctx.ok("", "finish_run", log.finish_run(finished_run.clone()))
                .await
                .map_err(|f| f.of_run(finished))?;

            let left = ctx.begin(log, T0 + 6000, "begin_run of the run left unfinished")?;
            let running = attempt(left, interrupted, 1, AttemptOutcome::Running, None);
            ctx.record(log, running.clone(), "record of a Running attempt")?;
            let attempt_2 = attempt(left, unfinished, 1, AttemptOutcome::Succeeded, None);
            let bytes = Value::Bytes(v_unfinished.clone());
            let commit = log.commit(unfinished, bytes, attempt_2.clone());
            ctx.ok(unfinished, "commit in the run left unfinished", commit)
                .await?;
            let mut attempt_1 = attempt_1;
            attempt_1.output_size = Some(v_committed.len() as u64);
            let mut attempt_2 = attempt_2;
            attempt_2.output_size = Some(v_unfinished.len() as u64);
            Some((
                finished_run,
                vec![attempt_1, cached],
                left,
                running,
                attempt_2,
            ))
        }
        _ => None,
    };
    drop(store);

    // Second open: read it all back, then change some of it.
    let store = ctx.open(&mut open, "the second open")?;
    let step = "read after a reopen";
    for key in &tricky {
        ctx.holds(&store, key, &value(key, 1), step).await?;
    }
    ctx.holds(&store, overwritten, &v_over, step).await?;
    ctx.holds(&store, large, &v_large, step).await?;
    ctx.holds(&store, shrunk, &v_shrunk, step).await?;
    if removes {
        let found = ctx.read(&store, removed, step).await?;
        ctx.absent(removed, found, "read after a remove and a reopen")?;
    }
    let mut ours: Vec<&str> = tricky.iter().map(String::as_str).collect();
    ours.extend([overwritten, large, shrunk]);
    if records.is_some() {
        ours.extend([committed, unfinished]);
    }
    if let Some(listed) = ctx.listed(&store, "keys after a reopen").await? {
        for key in &ours {
            ctx.listed_once(&listed, key, true, "keys after a reopen")?;
        }
        if removes {
            ctx.listed_once(&listed, removed, false, "keys after a remove and a reopen")?;
        }
    }
    let mut last_run = None;
    if let (Some((finished_run, attempts, left, running, attempt_2)), Some(log), Some(history)) =
        (&records, store.run_log(), store.history())
    {
        let step = "runs after a reopen";
        let runs = ctx.runs(history, step).await?;
        ctx.run_listed(&runs, finished_run, step)?;
        let step = "run of a finished run after a reopen";
        ctx.run_details(history, finished_run, attempts, step)
            .await?;
        let step = "run of a run left unfinished, after a reopen";
        let Some(details) = ctx.ok("", step, history.run(*left)).await? else {
            return Err(ctx.fail_run(*left, step, "the run", "None"));
        };
        let marked = match details.run.status {
            RunStatus::Running => AttemptOutcome::Running,
            RunStatus::Interrupted => AttemptOutcome::Interrupted,
            _ => {
                let expected = "Running or Interrupted";
                return Err(ctx.fail_run(*left, step, expected, details.run));
            }
        };
        let mut running = running.clone();
        if running.outcome != marked {
            running.outcome = marked;
            // When the store found it: any time after it started.
            running.finished_ms = details
                .attempts
                .iter()
                .find(|a| a.key == running.key)
                .and_then(|a| a.finished_ms)
                .filter(|&at| at >= running.started_ms);
        }
        let mut expected = vec![attempt_2.clone(), running];
        expected.sort_by(|x, y| x.key.cmp(&y.key));
        ctx.same_attempts(&details.attempts, &expected, *left, step)?;
        let step = "begin_run after a reopen";
        let next = ctx.begin(log, T0 + 7000, step)?;
        if next <= *left {
            let expected = format!("an id above {left}, the last run's");
            return Err(ctx.fail_run(next, step, expected, next));
        }
        let next_run = run_record(next, RunStatus::Succeeded, (0, 0, 0));
        ctx.ok(
            "",
            "finish_run after a reopen",
            log.finish_run(next_run.clone()),
        )
        .await
        .map_err(|f| f.of_run(next))?;
        last_run = Some(next_run);
    }
    let (changed, kept) = tricky.split_at(tricky.len() / 2);
    for key in changed {
        ctx.ok(
            key,
            "overwrite after a reopen",
            store.write(key, value(key, 2)),
        )
        .await?;
    }
    let step = "write after a reopen";
    ctx.ok(fresh, step, store.write(fresh, pattern(908, 3000)))
        .await?;
    let over_removed = removes
        && ctx
            .ok(
                overwritten,
                "remove after a reopen",
                store.remove(overwritten),
            )
            .await?;
    drop(store);

    // Third open: the second handle's changes.
    let store = ctx.open(&mut open, "the third open")?;
    let step = "read after a second reopen";
    for key in changed {
        ctx.holds(&store, key, &value(key, 2), step).await?;
    }
    for key in kept {
        ctx.holds(&store, key, &value(key, 1), step).await?;
    }
    ctx.holds(&store, fresh, &pattern(908, 3000), step).await?;
    ctx.holds(&store, large, &v_large, step).await?;
    if over_removed {
        let found = ctx.read(&store, overwritten, step).await?;
        ctx.absent(overwritten, found, "read after a remove and a reopen")?;
    }
    if let (Some(next_run), Some(history)) = (&last_run, store.history()) {
        let step = "runs after a second reopen";
        let runs = ctx.runs(history, step).await?;
        ctx.run_listed(&runs, next_run, step)?;
        if let Some((finished_run, ..)) = &records {
            ctx.run_listed(&runs, finished_run, step)?;
        }
    }
    ctx.healthy(&store)?;
    Ok(Outcome::Passed)
}

// ---------------------------------------------------------------------------------------
// The checks' tools.

/// One of a check's concurrent jobs.
type Job<'a> = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send + 'a>>;

/// How a value is handed to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// [`Storage::write`].
    Write,
    /// [`Storage::write_value`] of [`Value::Bytes`].
    Bytes,
    /// [`Storage::write_value`] of a [`Value::Stream`] that writes in pieces.
    Stream,
}

impl Form {
    const ALL: [Form; 3] = [Form::Write, Form::Bytes, Form::Stream];

    fn name(self) -> &'static str {
        match self {
            Form::Write => "write",
            Form::Bytes => "bytes",
            Form::Stream => "stream",
        }
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Form::Write => "write",
            Form::Bytes => "write_value of bytes",
            Form::Stream => "write_value of a stream",
        })
    }
}

/// The check being run and the store it runs on, for its failures.
#[derive(Clone, Copy)]
struct Ctx {
    check: &'static str,
    store: &'static str,
}

impl Ctx {
    fn new(check: &'static str, store: &'static str) -> Ctx {
        Ctx { check, store }
    }

    fn failure(
        &self,
        key: Option<&str>,
        step: &str,
        expected: impl fmt::Display,
        found: impl fmt::Display,
    ) -> Failure {
        let details = Details {
            check: self.check,
            store: self.store,
            key: key.map(str::to_owned),
            step: step.to_owned(),
            expected: expected.to_string(),
            found: found.to_string(),
            error: None,
        };
        Failure {
            details: Box::new(details),
        }
    }

    /// A failure about `key` (`""`: about none).
    fn fail(
        &self,
        key: &str,
        step: &str,
        expected: impl fmt::Display,
        found: impl fmt::Display,
    ) -> Failure {
        self.failure((!key.is_empty()).then_some(key), step, expected, found)
    }

    /// A failure about run `run`.
    fn fail_run(
        &self,
        run: RunId,
        step: &str,
        expected: impl fmt::Display,
        found: impl fmt::Debug,
    ) -> Failure {
        self.failure(
            None,
            &format!("{step} (run {run})"),
            expected,
            format!("{found:?}"),
        )
    }

    /// A failure for the unexpected error `e` of the store.
    fn error(
        &self,
        key: &str,
        step: &str,
        expected: impl fmt::Display,
        e: DuraflowError,
    ) -> Failure {
        self.fail(key, step, expected, describe_error(&e)).with(e)
    }

    /// What `work` resolves to, or a failure naming its error.
    async fn ok<T>(
        &self,
        key: &str,
        step: &str,
        work: impl Future<Output = Result<T, DuraflowError>>,
    ) -> Result<T, Failure> {
        work.await.map_err(|e| self.error(key, step, "success", e))
    }

    /// Opens the store with `open` and takes its kind for the failures that follow.
    fn open<S: Storage>(
        &mut self,
        open: &mut impl FnMut() -> Result<S, DuraflowError>,
        step: &str,
    ) -> Result<S, Failure> {
        let store = open().map_err(|e| self.error("", step, "an open store", e))?;
        self.store = store.kind();
        store
            .health()
            .map_err(|e| self.error("", &format!("health after {step}"), "Ok", e))?;
        Ok(store)
    }

    fn healthy<S: Storage + ?Sized>(&self, store: &S) -> Result<(), Failure> {
        store
            .health()
            .map_err(|e| self.error("", "health at the end of the check", "Ok", e))
    }

    /// Writes `bytes` under `key` in the way `form` says; a stream's encoder must be dropped
    /// by the time the write resolves.
    async fn put<S: Storage + ?Sized>(
        &self,
        store: &S,
        key: &str,
        bytes: &[u8],
        form: Form,
        step: &str,
    ) -> Result<(), Failure> {
        match form {
            Form::Write => self.ok(key, step, store.write(key, bytes.to_vec())).await,
            Form::Bytes => {
                let value = Value::Bytes(bytes.to_vec());
                self.ok(key, step, store.write_value(key, value)).await
            }
            Form::Stream => {
                let token = Arc::new(());
                let encoder = streamed(key, Arc::new(bytes.to_vec()), Arc::clone(&token));
                let written = store.write_value(key, Value::Stream(encoder));
                self.ok(key, step, written).await?;
                self.dropped(&token, key, step)
            }
        }
    }

    /// Fails unless the encoder that held `token` has been dropped.
    fn dropped(&self, token: &Arc<()>, key: &str, step: &str) -> Result<(), Failure> {
        if Arc::strong_count(token) == 1 {
            return Ok(());
        }
        let expected = "the encoder dropped before the write resolved (a DAG waits for that)";
        Err(self.fail(key, step, expected, "the store still holds it"))
    }

    /// [`Storage::read`]'s value.
    async fn read<S: Storage + ?Sized>(
        &self,
        store: &S,
        key: &str,
        step: &str,
    ) -> Result<Option<Vec<u8>>, Failure> {
        self.ok(key, &format!("{step} (read)"), store.read(key))
            .await
    }

    /// [`Storage::read_value`]'s value, read to its end.
    async fn read_value<S: Storage + ?Sized>(
        &self,
        store: &S,
        key: &str,
        step: &str,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let step = format!("{step} (read_value)");
        match self.ok(key, &step, store.read_value(key)).await? {
            None => Ok(None),
            Some(stored) => self.stored(key, stored, &step).await.map(Some),
        }
    }

    /// The bytes of `stored`; a reader is read inside [`unblock`], and must yield its `len`.
    async fn stored(&self, key: &str, stored: Stored, step: &str) -> Result<Vec<u8>, Failure> {
        let (len, mut reader) = match stored {
            Stored::Bytes(bytes) => return Ok(bytes),
            Stored::Reader { len, reader } => (len, reader),
        };
        let of = key.to_owned();
        let read = unblock(move || {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map_err(|e| {
                carried(e).unwrap_or_else(|e| DuraflowError::Corrupt {
                    key: of,
                    path: None,
                    reason: format!("reading it failed: {e}"),
                })
            })?;
            Ok(bytes)
        });
        let step = format!("{step}, reading the Stored::Reader");
        let bytes = self.ok(key, &step, read).await?;
        if bytes.len() as u64 != len {
            let expected = format!("the {len} bytes its len says");
            return Err(self.fail(key, &step, expected, format!("{} bytes", bytes.len())));
        }
        Ok(bytes)
    }

    /// Fails unless both [`Storage::read`] and [`Storage::read_value`] give `expected`.
    async fn holds<S: Storage + ?Sized>(
        &self,
        store: &S,
        key: &str,
        expected: &[u8],
        step: &str,
    ) -> Result<(), Failure> {
        let found = self.read(store, key, step).await?;
        self.same(key, expected, found, &format!("{step} (read)"))?;
        let found = self.read_value(store, key, step).await?;
        self.same(key, expected, found, &format!("{step} (read_value)"))
    }

    fn same(
        &self,
        key: &str,
        expected: &[u8],
        found: Option<Vec<u8>>,
        step: &str,
    ) -> Result<(), Failure> {
        match found {
            Some(found) if found == expected => Ok(()),
            Some(found) => Err(self.fail(
                key,
                step,
                describe(expected),
                format!(
                    "{}, {}",
                    describe(&found),
                    first_difference(expected, &found)
                ),
            )),
            None => Err(self.fail(key, step, describe(expected), "no value")),
        }
    }

    /// Fails unless `found` is one of `candidates`.
    fn one_of(
        &self,
        key: &str,
        found: Option<Vec<u8>>,
        candidates: &[Vec<u8>],
        step: &str,
    ) -> Result<(), Failure> {
        if found
            .as_ref()
            .is_some_and(|found| candidates.contains(found))
        {
            return Ok(());
        }
        let expected = format!(
            "one of the {} values written, whole ({})",
            candidates.len(),
            candidates
                .iter()
                .map(|c| format!("{} bytes", c.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let found = match found {
            None => "no value".to_owned(),
            Some(found) => {
                let nearest = candidates.iter().find(|c| c.len() == found.len());
                match nearest {
                    Some(c) => format!("{}, {}", describe(&found), first_difference(c, &found)),
                    None => describe(&found),
                }
            }
        };
        Err(self.fail(key, step, expected, found))
    }

    fn absent(&self, key: &str, found: Option<Vec<u8>>, step: &str) -> Result<(), Failure> {
        match found {
            None => Ok(()),
            Some(found) => Err(self.fail(key, step, "no value", describe(&found))),
        }
    }

    /// Fails unless `work` is [`DuraflowError::InvalidKey`] naming `key` (or `Unsupported`,
    /// when `unsupported` allows it).
    async fn invalid<T>(
        &self,
        key: &str,
        step: &str,
        work: impl Future<Output = Result<T, DuraflowError>>,
        unsupported: bool,
    ) -> Result<(), Failure> {
        let expected = "InvalidKey naming the key";
        match work.await {
            Err(DuraflowError::InvalidKey { key: named, .. }) if named == key => Ok(()),
            Err(DuraflowError::Unsupported { .. }) if unsupported => Ok(()),
            Err(e) => Err(self
                .failure(Some(key), step, expected, describe_error(&e))
                .with(e)),
            Ok(_) => Err(self.failure(Some(key), step, expected, "Ok")),
        }
    }

    /// [`Storage::keys`], or `None` when the store answers `Unsupported`; fails if it lists
    /// a key twice.
    async fn listed<S: Storage + ?Sized>(
        &self,
        store: &S,
        step: &str,
    ) -> Result<Option<Vec<String>>, Failure> {
        let mut keys = match store.keys().await {
            Ok(keys) => keys,
            Err(DuraflowError::Unsupported { .. }) => return Ok(None),
            Err(e) => return Err(self.error("", step, "the stored keys", e)),
        };
        keys.sort();
        if let Some(twice) = keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(self.fail(&twice[0], step, "each key listed once", "it listed twice"));
        }
        Ok(Some(keys))
    }

    /// Fails unless the sorted `listed` holds `key` (once) or, when `stored` is false, not.
    fn listed_once(
        &self,
        listed: &[String],
        key: &str,
        stored: bool,
        step: &str,
    ) -> Result<(), Failure> {
        let found = listed.binary_search_by(|k| k.as_str().cmp(key)).is_ok();
        if found == stored {
            return Ok(());
        }
        let (expected, found) = match stored {
            true => ("the key listed", "it missing"),
            false => ("the key not listed", "it listed"),
        };
        Err(self.failure(Some(key), step, expected, found))
    }

    /// Fails unless [`Storage::keys`] lists exactly the keys of `before` and `stored`
    /// (nothing to check when `before` is `None`: the store does not list keys).
    async fn keys_are<S: Storage + ?Sized>(
        &self,
        store: &S,
        before: &Option<Vec<String>>,
        stored: &[&str],
        step: &str,
    ) -> Result<(), Failure> {
        let Some(before) = before else {
            return Ok(());
        };
        let listed = self.listed(store, step).await?.unwrap_or_default();
        let mut expected = before.clone();
        expected.extend(stored.iter().map(|k| (*k).to_owned()));
        self.same_keys(listed, expected, step)
    }

    /// Fails unless `listed` and `expected` hold the same keys.
    fn same_keys(
        &self,
        listed: Vec<String>,
        mut expected: Vec<String>,
        step: &str,
    ) -> Result<(), Failure> {
        expected.sort();
        if let Some(missing) = expected.iter().find(|k| listed.binary_search(k).is_err()) {
            return Err(self.failure(Some(missing), step, "the key listed", "it missing"));
        }
        if let Some(extra) = listed.iter().find(|k| expected.binary_search(k).is_err()) {
            let expected = "only the keys stored";
            return Err(self.failure(Some(extra), step, expected, "this key listed too"));
        }
        Ok(())
    }

    fn begin(&self, log: &dyn RunLog, started_ms: u64, step: &str) -> Result<RunId, Failure> {
        log.begin_run(started_ms)
            .map_err(|e| self.error("", step, "a run id", e))
    }

    fn record(&self, log: &dyn RunLog, attempt: AttemptRecord, step: &str) -> Result<(), Failure> {
        let key = attempt.key.clone();
        log.record(attempt)
            .map_err(|e| self.error(&key, step, "Ok", e))
    }

    /// [`RunHistory::runs`]; fails unless they are oldest first.
    async fn runs(&self, history: &dyn RunHistory, step: &str) -> Result<Vec<RunRecord>, Failure> {
        let runs = self.ok("", step, history.runs()).await?;
        if let Some(pair) = runs.windows(2).find(|w| w[0].id >= w[1].id) {
            let found = format!("run {} listed before run {}", pair[0].id, pair[1].id);
            return Err(self.fail("", step, "the runs oldest first", found));
        }
        Ok(runs)
    }

    /// Fails unless `runs` holds `run` as it was finished.
    fn run_listed(&self, runs: &[RunRecord], run: &RunRecord, step: &str) -> Result<(), Failure> {
        match runs.iter().find(|r| r.id == run.id) {
            Some(found) if found == run => Ok(()),
            Some(found) => Err(self.fail_run(run.id, step, format!("{run:?}"), found)),
            None => Err(self.fail_run(run.id, step, format!("{run:?}"), "no such run")),
        }
    }

    /// Fails unless [`RunHistory::run`] gives `run` with exactly `attempts`.
    async fn run_details(
        &self,
        history: &dyn RunHistory,
        run: &RunRecord,
        attempts: &[AttemptRecord],
        step: &str,
    ) -> Result<(), Failure> {
        let Some(details) = self.ok("", step, history.run(run.id)).await? else {
            return Err(self.fail_run(run.id, step, format!("{run:?}"), "None"));
        };
        if details.run != *run {
            return Err(self.fail_run(run.id, step, format!("{run:?}"), details.run));
        }
        self.same_attempts(&details.attempts, attempts, run.id, step)
    }

    /// Fails unless `found` holds exactly the `expected` attempts, each key's attempts
    /// together and by number (the order of the keys is the store's).
    fn same_attempts(
        &self,
        found: &[AttemptRecord],
        expected: &[AttemptRecord],
        run: RunId,
        step: &str,
    ) -> Result<(), Failure> {
        for wanted in expected {
            let matching = found.iter().filter(|a| *a == wanted).count();
            if matching != 1 {
                let same_attempt: Vec<_> = found
                    .iter()
                    .filter(|a| a.key == wanted.key && a.attempt == wanted.attempt)
                    .collect();
                let found = match matching {
                    0 => format!("{same_attempt:?}"),
                    n => format!("it {n} times"),
                };
                let step = format!("{step} (run {run})");
                return Err(self.failure(Some(&wanted.key), &step, format!("{wanted:?}"), found));
            }
        }
        if let Some(extra) = found.iter().find(|a| !expected.contains(a)) {
            let step = format!("{step} (run {run})");
            let expected = "only the attempts recorded";
            return Err(self.failure(Some(&extra.key), &step, expected, format!("{extra:?}")));
        }
        let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
        let mut last: Option<&str> = None;
        for a in found {
            let key = a.key.as_str();
            match seen.get(key) {
                Some(&number) if last == Some(key) && number < a.attempt => {}
                Some(&number) => {
                    let step = format!("{step} (run {run})");
                    let expected = "each key's attempts together, by attempt number";
                    let found = format!(
                        "attempt {} after attempt {number} and other keys' or a later one",
                        a.attempt
                    );
                    return Err(self.failure(Some(key), &step, expected, found));
                }
                None => {}
            }
            seen.insert(key, a.attempt);
            last = Some(key);
        }
        Ok(())
    }

    /// Fails unless [`RunHistory::attempts_of`] gives exactly `expected` (in this order)
    /// among the attempts of the runs `runs`.
    async fn attempts_of(
        &self,
        history: &dyn RunHistory,
        key: &str,
        runs: &[RunId],
        expected: &[AttemptRecord],
        step: &str,
    ) -> Result<(), Failure> {
        let found = self.ok(key, step, history.attempts_of(key)).await?;
        let ours: Vec<&AttemptRecord> = found.iter().filter(|a| runs.contains(&a.run)).collect();
        let expected: Vec<&AttemptRecord> = expected.iter().collect();
        if ours != expected {
            let expected = format!("{expected:?}, oldest first");
            return Err(self.failure(Some(key), step, expected, format!("{ours:?}")));
        }
        if let Some(other) = found.iter().find(|a| a.key != key) {
            let found = format!("an attempt of {:?}", other.key);
            return Err(self.failure(Some(key), step, "only the key's attempts", found));
        }
        Ok(())
    }
}

fn skipped(reason: &str) -> Outcome {
    Outcome::Skipped {
        reason: reason.to_owned(),
    }
}

/// Whether `e` is an error of a write of `key` that names it.
fn names_key(e: &DuraflowError, key: &str) -> bool {
    matches!(e, DuraflowError::Encode { key: k, .. } | DuraflowError::Persist { key: k, .. } if k == key)
}

/// An attempt of the kit's, with a reason, timed if it has ended.
fn attempt(
    run: RunId,
    key: &str,
    number: u32,
    outcome: AttemptOutcome,
    output_size: Option<u64>,
) -> AttemptRecord {
    let started_ms = T0 + run.saturating_mul(10) + u64::from(number);
    let ended = outcome != AttemptOutcome::Running;
    AttemptRecord {
        run,
        key: key.to_owned(),
        attempt: number,
        started_ms,
        finished_ms: ended.then_some(started_ms + 7),
        outcome,
        duration_us: ended.then_some(7_000),
        output_size,
        reason: Some(format!("testkit: attempt {number} of {key:?}")),
    }
}

/// The final record of a run of the kit's, with its (executed, cached, failed) counts.
fn run_record(
    id: RunId,
    status: RunStatus,
    (executed, cached, failed): (u64, u64, u64),
) -> RunRecord {
    let started_ms = T0 + id;
    RunRecord {
        id,
        started_ms,
        finished_ms: Some(started_ms + 50),
        status,
        executed,
        cached,
        failed,
        version: "testkit".to_owned(),
    }
}

/// `len` bytes that depend on `seed` throughout (xorshift), so that no two of the kit's
/// values share a run of bytes and a mix of two is told from either.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// An encoder that writes `bytes` in pieces of [`PIECE`] bytes, holding `token` until it is
/// dropped.
fn streamed(key: &str, bytes: Arc<Vec<u8>>, token: Arc<()>) -> crate::Encoder {
    let key = key.to_owned();
    crate::Encoder::new(move |out: &mut dyn Write| {
        let _token = token;
        for piece in bytes.chunks(PIECE) {
            out.write_all(piece).map_err(|e| out_error(&key, e))?;
        }
        Ok(())
    })
}

/// An encoder that writes `bytes` in pieces and then fails with [`DuraflowError::Encode`],
/// as a value that cannot be serialised partway does.
fn failing(key: &str, bytes: Vec<u8>, token: Arc<()>) -> crate::Encoder {
    let key = key.to_owned();
    crate::Encoder::new(move |out: &mut dyn Write| {
        let _token = token;
        for piece in bytes.chunks(PIECE) {
            out.write_all(piece).map_err(|e| out_error(&key, e))?;
        }
        Err(DuraflowError::Encode {
            key,
            type_name: "duraflow_rs::testkit::Failing",
            source: rmp_serde::encode::Error::Syntax("the testkit's encoder fails here".to_owned()),
        })
    })
}

/// The error of an encoder whose output failed (see [`Encoder::write_to`](crate::Encoder::write_to)).
fn out_error(key: &str, e: std::io::Error) -> DuraflowError {
    carried(e).unwrap_or_else(|e| DuraflowError::Persist {
        key: key.to_owned(),
        source: Box::new(e),
    })
}

/// `bytes` in a failure message: the length and the first bytes.
fn describe(bytes: &[u8]) -> String {
    const SHOWN: usize = 24;
    let head = bytes[..bytes.len().min(SHOWN)].escape_ascii();
    let more = if bytes.len() > SHOWN { "…" } else { "" };
    format!("{} bytes \"{head}{more}\"", bytes.len())
}

fn describe_opt(bytes: Option<&[u8]>) -> String {
    bytes.map_or_else(|| "no value".to_owned(), describe)
}

/// Where `found` first differs from `expected`.
fn first_difference(expected: &[u8], found: &[u8]) -> String {
    match expected.iter().zip(found).position(|(e, f)| e != f) {
        Some(at) => format!("first differing at byte {at}"),
        None if found.len() > expected.len() => {
            format!(
                "the value expected followed by {} more bytes",
                found.len() - expected.len()
            )
        }
        None => format!("the first {} bytes of the value expected", found.len()),
    }
}

/// `e` in a failure message: its variant and its message.
fn describe_error(e: &DuraflowError) -> String {
    let variant = match e {
        DuraflowError::Persist { .. } => "Persist",
        DuraflowError::TypeMismatch { .. } => "TypeMismatch",
        DuraflowError::Corrupt { .. } => "Corrupt",
        DuraflowError::InvalidKey { .. } => "InvalidKey",
        DuraflowError::StoreLocked { .. } => "StoreLocked",
        DuraflowError::NotAStore { .. } => "NotAStore",
        DuraflowError::Io { .. } => "Io",
        DuraflowError::Encode { .. } => "Encode",
        DuraflowError::Unsupported { .. } => "Unsupported",
        DuraflowError::UnsupportedFormat { .. } => "UnsupportedFormat",
        DuraflowError::RuntimeShutdown { .. } => "RuntimeShutdown",
        _ => "error",
    };
    format!("{variant} error: {e}")
}

/// Keys can be 4 KiB; a message shows the first 60 characters and the length.
fn key_preview(key: &str) -> String {
    const SHOWN: usize = 60;
    if key.chars().count() <= SHOWN {
        format!("{key:?}")
    } else {
        let head: String = key.chars().take(SHOWN).collect();
        format!("{head:?}… ({} bytes)", key.len())
    }
}
