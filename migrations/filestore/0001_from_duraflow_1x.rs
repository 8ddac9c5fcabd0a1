//! FileStore step 1: a duraflow-rs 1.x directory becomes a format-1 store.
//!
//! **What 1.x wrote.** One file per key directly in the directory, named after the key
//! with every character outside `[A-Za-z0-9_-]` replaced by `_`, holding the value as JSON
//! (`serde_json::to_string`). Nothing else: no lock, no manifest, no checksum.
//!
//! **What format 1 is.** One directory per key (`k-…`/`h-…`, see `FileStore`), each value
//! in a checksummed record around the crate's envelope, and the manifest
//! `.duraflow-format` saying `duraflow filestore format 1`.
//!
//! **Why.** 1.x's flat names fold distinct keys together (`a/b` and `a_b` shared a file),
//! its writes were not atomic or durable, and nothing detected a damaged file.
//!
//! **How, crash-safely.** Every 1.x file that holds valid JSON is re-encoded (the JSON kept
//! as the payload of an untyped envelope, so `Context::get::<T>` returns exactly what 1.x's
//! `serde_json::from_str` returned) and written durably under the key named by the file
//! name; a file that is not JSON is reported with `warn!` and left alone. Only then is the
//! list of converted files written, then the manifest: the commit point. Only after the
//! manifest is durable are the converted 1.x files deleted, and the list last. A kill at any
//! moment leaves either the 1.x files all in place (no manifest: the next open converts
//! again, overwriting the same values) or the manifest with a list of files still to delete
//! (the next open deletes them).
//!
//! The original keys of 1.x values whose names were folded cannot be recovered: such a
//! value is found under the folded name (`a/b` → `a_b`).

use std::fs;
use std::path::Path;

use crate::{codec, DuraflowError};

use super::{write_small_file, Dir, UPGRADE_LIST};

/// The names of the 1.x value files in `root`: regular files whose names 1.x could have
/// made (non-empty, only `[A-Za-z0-9_-]`).
pub(super) fn legacy_files(root: &Path) -> Result<Vec<String>, DuraflowError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| DuraflowError::io(root, e))? {
        let entry = entry.map_err(|e| DuraflowError::io(root, e))?;
        let is_file = entry
            .file_type()
            .map_err(|e| DuraflowError::io(entry.path(), e))?
            .is_file();
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if is_file && is_legacy_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Whether 1.x could have named a value file `name`: non-empty, only `[A-Za-z0-9_-]`. Such
/// a name never leaves the directory.
fn is_legacy_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Converts the 1.x files `names` of `store`, then commits format 1 with `commit` (which
/// writes the manifest) and deletes the converted files.
pub(super) fn upgrade(
    store: &Dir,
    names: &[String],
    commit: impl FnOnce() -> Result<(), DuraflowError>,
) -> Result<(), DuraflowError> {
    let mut converted = Vec::new();
    for name in names {
        let path = store.root.join(name);
        let json = fs::read(&path).map_err(|e| DuraflowError::io(&path, e))?;
        if let Err(error) = serde_json::from_slice::<serde_json::Value>(&json) {
            tracing::warn!(file = %path.display(), %error, "duraflow-rs 1.x file is not valid JSON: left as it is, not imported");
            continue;
        }
        store.write(name, &codec::encode_json(&json))?;
        converted.push(name.as_str());
    }
    let list = store.root.join(UPGRADE_LIST);
    write_small_file(&list, converted.join("\n").as_bytes())?;
    commit()?;
    finish(&store.root)
}

/// Deletes the 1.x files the list left by [`upgrade`] names, then the list. Does nothing
/// when there is no list.
pub(super) fn finish(root: &Path) -> Result<(), DuraflowError> {
    let list = root.join(UPGRADE_LIST);
    let names = match fs::read_to_string(&list) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DuraflowError::io(&list, e)),
    };
    // Names not of 1.x's making (a damaged list) are never deleted.
    for name in names.lines().filter(|n| is_legacy_name(n)) {
        let path = root.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DuraflowError::io(&path, e)),
        }
    }
    super::sync_dir(root)?;
    fs::remove_file(&list).map_err(|e| DuraflowError::io(&list, e))?;
    super::sync_dir(root)
}
