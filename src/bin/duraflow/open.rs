//! Opening the store a command names, through the library's one entry point for that.

use std::path::Path;
use std::sync::Arc;

use duraflow_rs::{Context, DuraflowError, RunHistory, Storage};

use crate::Failure;

/// How messages show the store at `path`: as given, but a URL's password as `***`.
pub fn shown(path: &Path) -> String {
    duraflow_rs::redacted(&path.to_string_lossy())
}

/// An open store, whichever kind it is.
pub struct Store {
    storage: Arc<dyn Storage>,
}

impl Store {
    /// Opens the store at `path` with [`duraflow_rs::open_existing`]: nothing is created.
    pub fn open(path: &Path) -> Result<Store, Failure> {
        let Some(location) = path.to_str() else {
            return Err(Failure::new(format!("{} is not a UTF-8 path", shown(path))));
        };
        match futures::executor::block_on(duraflow_rs::open_existing(location)) {
            Ok(storage) => Ok(Store { storage }),
            Err(DuraflowError::StoreLocked { .. }) => Err(Failure::new(format!(
                "store at {} is locked: a pipeline (or another duraflow command) has it open; \
                 try again once it has finished",
                shown(path)
            ))),
            Err(other) => Err(Failure::from(other)),
        }
    }

    /// The store itself.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// A context over the store, for [`Context::inspect`].
    pub fn context(&self) -> Context {
        Context::new(Arc::clone(&self.storage))
    }

    /// The store's run history, for commands that need run records; a store that keeps
    /// none is an error that says so.
    pub fn history(&self, path: &Path) -> Result<&dyn RunHistory, Failure> {
        self.storage.history().ok_or_else(|| {
            Failure::new(format!(
                "{} is a {} store, which keeps no run records; its outputs can be read with \
                 `duraflow get` and removed with `duraflow rm`",
                shown(path),
                self.storage.kind()
            ))
        })
    }
}

/// Waits for a store's answer: the command-line tool does one thing at a time.
pub fn wait<T>(
    future: impl std::future::Future<Output = Result<T, DuraflowError>>,
) -> Result<T, Failure> {
    futures::executor::block_on(future).map_err(Failure::from)
}
