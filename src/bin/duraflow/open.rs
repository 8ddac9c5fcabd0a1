//! Finding out what kind of store a path holds, and opening it without creating anything.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use duraflow_rs::{Context, DuraflowError, FileStore, SledStore, Storage};

use crate::Failure;

/// An open store of either kind.
pub enum Store {
    /// A sled store: outputs, runs and attempts.
    Sled(Arc<SledStore>),
    /// A FileStore directory: outputs only.
    File(Arc<FileStore>),
}

/// What a directory looks like.
enum Kind {
    Sled,
    File,
}

impl Store {
    /// Opens the store at `path`, whichever kind it is. Nothing is created: a missing path,
    /// an empty directory or a foreign one is an error.
    pub fn open(path: &Path) -> Result<Store, Failure> {
        let opened = match detect(path)? {
            Kind::Sled => SledStore::open(path).map(|s| Store::Sled(Arc::new(s))),
            Kind::File => FileStore::new(path).map(|s| Store::File(Arc::new(s))),
        };
        opened.map_err(|e| match e {
            DuraflowError::StoreLocked { .. } => Failure::new(format!(
                "store at {} is locked: a pipeline (or another duraflow command) has it open; \
                 try again once it has finished",
                path.display()
            )),
            other => Failure::from(other),
        })
    }

    /// The store as a [`Storage`].
    pub fn storage(&self) -> Arc<dyn Storage + Send + Sync> {
        match self {
            Store::Sled(s) => s.clone(),
            Store::File(s) => s.clone(),
        }
    }

    /// A context over the store, for [`Context::inspect`].
    pub fn context(&self) -> Context {
        Context {
            db: self.storage(),
            completed_count: Arc::default(),
        }
    }

    /// The sled store, for commands that need run records; a FileStore is an error that
    /// says so.
    pub fn runs(&self, path: &Path) -> Result<&SledStore, Failure> {
        match self {
            Store::Sled(s) => Ok(s),
            Store::File(_) => Err(Failure::new(format!(
                "{} is a FileStore directory, which keeps no run records (only a sled store \
                 does); its outputs can be read with `duraflow get` and removed with \
                 `duraflow rm`",
                path.display()
            ))),
        }
    }
}

/// Which kind of store `path` holds, from the files in it.
fn detect(path: &Path) -> Result<Kind, Failure> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Failure::new(format!("no store at {}", path.display())))
        }
        Err(e) => return Err(Failure::new(format!("cannot read {}: {e}", path.display()))),
    };
    if !meta.is_dir() {
        return Err(Failure::new(format!(
            "{} is a file, not a store (a store is a directory)",
            path.display()
        )));
    }
    let has = |name: &str| path.join(name).exists();
    // `duraflow-store` is the marker SledStore writes; `conf` and `db` are sled's files.
    if has("duraflow-store") || (has("conf") && has("db")) {
        return Ok(Kind::Sled);
    }
    if has(".duraflow-format") {
        return Ok(Kind::File);
    }
    let entries = fs::read_dir(path)
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", path.display())))?;
    let names: Vec<String> = entries
        .iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names
        .iter()
        .zip(&entries)
        .any(|(n, e)| (n.starts_with("k-") || n.starts_with("h-")) && e.path().is_dir())
    {
        return Ok(Kind::File);
    }
    if names.is_empty() {
        return Err(Failure::new(format!(
            "no store at {} (an empty directory)",
            path.display()
        )));
    }
    let hint = if names.iter().any(|n| n.ends_with(".json")) {
        " (a duraflow-rs 1.x directory? opening it with FileStore::new upgrades it)"
    } else {
        ""
    };
    Err(Failure::new(format!(
        "{} is not a duraflow store: neither a sled store nor a FileStore directory{hint}",
        path.display()
    )))
}
