#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

mod codec;
mod context;
mod copy;
mod dag;
mod durable;
mod error;
mod fingerprint;
mod key;
mod output;
mod progress_layer;
mod record;
mod retry;
mod run;
mod runlog;
mod slot;
mod spans;
mod store;
mod task;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use context::{Context, StoredValue};
pub use copy::copy;
pub use dag::{DurableDag, Explanation};
pub use durable::Durable;
pub use error::{BoxError, DuraflowError};
pub use key::{validate_key, MAX_KEY_LEN};
pub use output::{Fallible, OutputKind, Plain};
pub use progress_layer::ProgressLayer;
pub use record::{
    AttemptOutcome, AttemptRecord, GcStats, RunDetails, RunHistory, RunId, RunRecord, RunStatus,
};
pub use retry::RetryPolicy;
pub use run::{ProgressFn, RunStats};
pub use runlog::{Lease, RunLog};
pub use store::{
    open_existing, redacted, unblock, Durability, Encoder, FileStore, MemoryStore, SledConfig,
    SledStore, Storage, StoreFuture, Stored, Value,
};
#[cfg(feature = "postgres")]
pub use store::{PgConfig, PgStore};
pub use task::{Deps, DurableTask};
