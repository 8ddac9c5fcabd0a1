//! [`open_existing`]: opening whatever store a location holds, for tools that inspect stores.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::unblock;
use crate::{DuraflowError, FileStore, SledStore, Storage};

/// Opens the store at `location`, whichever kind it is, without creating anything: the
/// `duraflow` command-line tool opens every store through this. A directory with
/// SledStore's marker or sled's files is a [`SledStore`]; one with a FileStore manifest or
/// key directories is a [`FileStore`] (a duraflow-rs 1.x directory is refused rather than
/// upgraded). A `postgres://` or `postgresql://` URL is a `PgStore` (feature `postgres`),
/// in the schema `#SCHEMA` at the URL's end names (by default `duraflow`), which must
/// exist. The blocking open runs inside [`unblock`].
///
/// # Errors
/// [`DuraflowError::NotAStore`] naming the path (or the URL, password redacted) when
/// nothing is there, or something that is neither kind of store; any error of the store's
/// own open ([`DuraflowError::StoreLocked`] while a pipeline has a directory open, say);
/// [`DuraflowError::Unsupported`] for a URL when the crate was built without `postgres`.
pub async fn open_existing(location: &str) -> Result<Arc<dyn Storage>, DuraflowError> {
    if ["postgres://", "postgresql://"]
        .iter()
        .any(|scheme| location.starts_with(scheme))
    {
        return open_postgres(location).await;
    }
    let path = PathBuf::from(location);
    unblock(move || {
        Ok(match detect(&path)? {
            Kind::Sled => Arc::new(SledStore::open(&path)?) as Arc<dyn Storage>,
            Kind::File => Arc::new(FileStore::new(&path)?),
        })
    })
    .await
}

/// The `PgStore` at `location`, a URL with an optional `#SCHEMA` at its end.
#[cfg(feature = "postgres")]
async fn open_postgres(location: &str) -> Result<Arc<dyn Storage>, DuraflowError> {
    let (url, schema) = location.rsplit_once('#').unwrap_or((location, "duraflow"));
    let config = crate::PgConfig::default().schema(schema).existing_only();
    Ok(Arc::new(crate::PgStore::connect_with(url, config).await?))
}

/// Without feature `postgres`, a URL is not a store this build can open.
#[cfg(not(feature = "postgres"))]
async fn open_postgres(_: &str) -> Result<Arc<dyn Storage>, DuraflowError> {
    Err(DuraflowError::Unsupported {
        store: "postgres",
        operation: "open (this build has no `postgres` feature)",
    })
}

/// The kinds of store a directory can hold.
enum Kind {
    Sled,
    File,
}

/// Which kind of store `path` holds, from the files in it.
fn detect(path: &Path) -> Result<Kind, DuraflowError> {
    let not_a_store = |reason: &str| DuraflowError::NotAStore {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries.collect::<Result<Vec<_>, _>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(not_a_store("nothing is there"))
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            return Err(not_a_store("a file, not a directory"))
        }
        Err(e) => Err(e),
    };
    let entries = entries.map_err(|e| DuraflowError::io(path, e))?;
    let has = |name: &str| entries.iter().any(|e| e.file_name() == name);
    // `duraflow-store` is the marker SledStore writes; `conf` and `db` are sled's files.
    if has("duraflow-store") || (has("conf") && has("db")) {
        return Ok(Kind::Sled);
    }
    let key_dir = |e: &fs::DirEntry| {
        let name = e.file_name().to_string_lossy().into_owned();
        (name.starts_with("k-") || name.starts_with("h-")) && e.path().is_dir()
    };
    if has(".duraflow-format") || entries.iter().any(key_dir) {
        return Ok(Kind::File);
    }
    Err(not_a_store(if entries.is_empty() {
        "an empty directory"
    } else {
        "neither a sled store nor a FileStore directory"
    }))
}
