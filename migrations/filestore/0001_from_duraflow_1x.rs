//! FileStore step 1: a duraflow-rs 1.x directory becomes a format-1 store.
//!
//! **What 1.x wrote.** One file per key directly in the directory, named after the key
//! with every character outside `[A-Za-z0-9_-]` replaced by `_`, holding the value as JSON
//! (`serde_json::to_string`). Nothing else: no subdirectory, no dot file, no lock, no
//! manifest, no checksum.
//!
//! **What format 1 is.** One directory per key (`k-…`/`h-…`, see `FileStore`), each value
//! in a checksummed record around the crate's envelope, and the manifest
//! `.duraflow-format` saying `duraflow filestore format 1`.
//!
//! **Why.** 1.x's flat names fold distinct keys together (`a/b` and `a_b` shared a file),
//! its writes were not atomic or durable, and nothing detected a damaged file.
//!
//! **Which directories.** Only a directory without a manifest that 1.x could have written
//! is upgraded: nothing but regular files with names 1.x could make, each holding one JSON
//! value. Anything else in it (a subdirectory, a link, a dot file, another name, a file that
//! is not JSON) makes it [`DuraflowError::NotAStore`], refused before anything in it is
//! written. An empty directory is a new store, not an upgrade.
//!
//! **How, crash-safely.** First the directory `.duraflow-1x` is made (and the root synced):
//! it marks the upgrade as begun, so that a later open accepts the upgrade's own files.
//! Then every 1.x file is re-encoded (the JSON kept as the payload of an untyped envelope,
//! so `Context::get::<T>` returns exactly what 1.x's `serde_json::from_str` returned) and
//! written durably under the key named by the file name. Only then is the list of
//! converted files written, then the manifest: the commit point. Only after the manifest is
//! durable are the 1.x files moved, as they are, into `.duraflow-1x/` (which is synced, then
//! the root), and the list removed last. A kill at any moment leaves either the 1.x files
//! all in place and no manifest (the next open converts again, overwriting the same values)
//! or the manifest with a list of files still to move (the next open moves them). Nothing
//! is deleted: `.duraflow-1x/` holds the 1.x directory as it was and can be removed once the
//! upgrade has been checked.
//!
//! The original keys of 1.x values whose names were folded cannot be recovered: such a
//! value is found under the folded name (`a/b` → `a_b`).

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::{codec, DuraflowError, Value};

use super::{holds, sync_dir, write_small_file, Dir, Want, LOCK_FILE, MANIFEST, UPGRADE_LIST};

/// Where the upgrade keeps the 1.x files, as they were; its presence in a directory without a
/// manifest says an upgrade has begun there.
const KEPT_DIR: &str = ".duraflow-1x";

/// What the directory `root`, which has no manifest, holds, read without writing anything:
/// `None` when nothing (a new store), or the names of the 1.x files to upgrade, sorted.
/// Besides 1.x files, only what an interrupted open of this store leaves is accepted: a
/// manifest's temporary file and, once an upgrade has begun, the upgrade's own files.
///
/// # Errors
/// [`DuraflowError::NotAStore`] naming `root` and the entry 1.x could not have written.
pub(super) fn classify(root: &Path) -> Result<Option<Vec<String>>, DuraflowError> {
    let refuse = |what: String| DuraflowError::NotAStore {
        path: root.to_owned(),
        reason: format!(
            "it holds {what}, which duraflow-rs 1.x (one JSON file per key, named \
             [A-Za-z0-9_-]+) could not have written; nothing was changed"
        ),
    };
    // Only a real directory: a link of that name is refused below like any other link.
    let begun = fs::symlink_metadata(root.join(KEPT_DIR)).is_ok_and(|m| m.is_dir());
    let own = |name: &str| {
        [LOCK_FILE, UPGRADE_LIST, KEPT_DIR].contains(&name)
            || name.strip_suffix(".tmp") == Some(UPGRADE_LIST)
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| DuraflowError::io(root, e))? {
        let entry = entry.map_err(|e| DuraflowError::io(root, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(refuse(format!("{name:?}")));
        };
        let kind = entry
            .file_type()
            .map_err(|e| DuraflowError::io(entry.path(), e))?;
        let key_dir = kind.is_dir() && (name.starts_with("k-") || name.starts_with("h-"));
        let manifest_tmp = kind.is_file() && name.strip_suffix(".tmp") == Some(MANIFEST);
        if manifest_tmp || (begun && (own(name) || key_dir)) {
            continue;
        }
        if kind.is_symlink() {
            return Err(refuse(format!("the symbolic link {name:?}")));
        }
        if kind.is_dir() {
            return Err(refuse(format!("the directory {name:?}")));
        }
        if !kind.is_file() {
            return Err(refuse(format!("{name:?} (a special file)")));
        }
        if !is_legacy_name(name) {
            return Err(refuse(format!("{name:?}")));
        }
        let path = entry.path();
        let file = File::open(&path).map_err(|e| DuraflowError::io(&path, e))?;
        // Checked as it is read: a large file that is not JSON is refused at its first bytes.
        match serde_json::from_reader::<_, serde::de::IgnoredAny>(BufReader::new(file)) {
            Ok(_) => names.push(name.to_owned()),
            Err(e) if e.is_io() => return Err(DuraflowError::io(&path, e.into())),
            Err(e) => return Err(refuse(format!("{name:?} (not JSON: {e})"))),
        }
    }
    names.sort();
    // The upgrade keeps key `a` in the directory `k-a`: a 1.x file of that name is in the way.
    for name in &names {
        let dir = super::dir_name(name);
        if names.binary_search(&dir).is_ok() {
            return Err(refuse(format!(
                "both {name:?} and {dir:?} (the upgrade keeps the first in a directory named \
                 as the second)"
            )));
        }
    }
    Ok((begun || !names.is_empty()).then_some(names))
}

/// Whether 1.x could have named a value file `name`: non-empty, only `[A-Za-z0-9_-]`. Such
/// a name never leaves the directory.
fn is_legacy_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Marks an upgrade of `root` as begun: makes `.duraflow-1x` durably, before anything else
/// of the upgrade is written.
pub(super) fn begin(root: &Path) -> Result<(), DuraflowError> {
    kept_dir(root).map(drop)
}

/// `ROOT/.duraflow-1x`, made (and the root synced) if it is not there yet.
fn kept_dir(root: &Path) -> Result<PathBuf, DuraflowError> {
    let kept = root.join(KEPT_DIR);
    match fs::create_dir(&kept) {
        Ok(()) => sync_dir(root)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            holds(&kept, Want::Dir, "")?;
        }
        Err(e) => return Err(DuraflowError::io(&kept, e)),
    }
    Ok(kept)
}

/// Converts the 1.x files `names` of `store` (found by [`classify`], the upgrade marked as
/// begun by [`begin`]), then commits format 1 with `commit` (which writes the manifest) and
/// moves the 1.x files aside.
pub(super) fn upgrade(
    store: &Dir,
    names: &[String],
    commit: impl FnOnce() -> Result<(), DuraflowError>,
) -> Result<(), DuraflowError> {
    for name in names {
        let path = store.root.join(name);
        let json = fs::read(&path).map_err(|e| DuraflowError::io(&path, e))?;
        store.write(name, Value::Bytes(codec::encode_json(&json)))?;
    }
    let list = store.root.join(UPGRADE_LIST);
    write_small_file(&list, names.join("\n").as_bytes())?;
    commit()?;
    finish(&store.root)
}

/// Moves the 1.x files the list left by [`upgrade`] names into `.duraflow-1x/`, then removes
/// the list. Does nothing when there is no list.
pub(super) fn finish(root: &Path) -> Result<(), DuraflowError> {
    let list = root.join(UPGRADE_LIST);
    if !holds(&list, Want::File, "")? {
        return Ok(());
    }
    let names = fs::read_to_string(&list).map_err(|e| DuraflowError::io(&list, e))?;
    let kept = kept_dir(root)?;
    // Names not of 1.x's making (a damaged list) are never touched.
    for name in names.lines().filter(|n| is_legacy_name(n)) {
        let path = root.join(name);
        // Moved by an earlier, interrupted finish when it is no longer there.
        if holds(&path, Want::File, "")? {
            fs::rename(&path, kept.join(name)).map_err(|e| DuraflowError::io(&path, e))?;
        }
    }
    sync_dir(&kept)?;
    sync_dir(root)?;
    fs::remove_file(&list).map_err(|e| DuraflowError::io(&list, e))?;
    sync_dir(root)
}
