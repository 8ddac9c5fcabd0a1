//! The marker file beside sled's own: it says that a duraflow store lives here, in which
//! format, and the number of the last commit the store acknowledged.
//!
//! sled reads a damaged log as the end of its log and opens what precedes it: without a
//! record kept outside sled, a damaged store would open silently older. The marker keeps
//! that record.
//!
//! # Layout
//! 1,536 bytes of ASCII in three 512-byte blocks:
//! - block 0: `duraflow-rs store, format N; …`, padded with spaces, ending in a newline;
//! - blocks 1 and 2: two slots, each `commit NNNNNNNNNNNNNNNNNNNN CCCCCCCC` (the commit
//!   number in 20 decimal digits and the CRC-32 of those 27 bytes in hex), padded likewise.
//!
//! Commit `n` is written to slot `n % 2` with one aligned write and made durable with
//! `fdatasync`, after the database holding it is durable. A write torn by a power cut fails
//! its checksum and the other slot, an older commit, stands: the marker never claims a
//! commit the database may not hold.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::sync::{sync_dir, with_path};
use crate::DuraflowError;

/// The marker's file name, in the store's directory.
pub(super) const MARKER_FILE: &str = "duraflow-store";
const BLOCK: usize = 512;
const LEN: usize = 3 * BLOCK;
const SLOT_PREFIX: &str = "commit ";

/// What a marker file says; every part is `None` where the file is damaged or older than
/// this layout.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Marker {
    /// The store's format.
    pub(super) format: Option<u64>,
    /// The last acknowledged commit.
    pub(super) commit: Option<u64>,
    /// Whether the file has this layout, intact: otherwise it is written anew on open.
    pub(super) current: bool,
}

/// Reads the marker in the store at `dir`: `None` when there is none.
///
/// # Errors
/// [`DuraflowError::Io`] naming the file when it exists but cannot be read.
pub(super) fn read(dir: &Path) -> Result<Option<Marker>, DuraflowError> {
    let path = dir.join(MARKER_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(DuraflowError::io(&path, e)),
    };
    Ok(Some(parse(&bytes)))
}

/// Parses a marker file's bytes; damage (including bytes that are not UTF-8) only makes
/// parts of it unknown.
fn parse(bytes: &[u8]) -> Marker {
    let header = &bytes[..bytes.len().min(BLOCK)];
    let format = std::str::from_utf8(header)
        .ok()
        .and_then(|text| text.split_once("format "))
        .and_then(|(_, rest)| {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            rest[..digits].parse().ok()
        });
    let slot = |i: usize| bytes.get(i * BLOCK..(i + 1) * BLOCK).and_then(parse_slot);
    let (a, b) = (slot(1), slot(2));
    let commit = a.max(b);
    let current = bytes.len() == LEN && format.is_some() && a.is_some() && b.is_some();
    Marker {
        format,
        commit,
        current,
    }
}

fn parse_slot(block: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(block).ok()?;
    let rest = text.strip_prefix(SLOT_PREFIX)?;
    let (digits, rest) = rest.split_at_checked(20)?;
    let crc = rest.strip_prefix(' ')?.get(..8)?;
    let signed = &text[..SLOT_PREFIX.len() + 20];
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(signed.as_bytes()) {
        return None;
    }
    digits.parse().ok()
}

/// One 512-byte block: `text`, padded with spaces, ending in a newline.
fn block(text: &str) -> [u8; BLOCK] {
    let mut block = [b' '; BLOCK];
    block[..text.len()].copy_from_slice(text.as_bytes());
    block[BLOCK - 1] = b'\n';
    block
}

fn slot(commit: u64) -> [u8; BLOCK] {
    let signed = format!("{SLOT_PREFIX}{commit:020}");
    block(&format!(
        "{signed} {:08x}",
        crc32fast::hash(signed.as_bytes())
    ))
}

/// The marker file of a store, open for recording commits.
pub(super) struct MarkerFile {
    path: PathBuf,
    file: File,
}

impl MarkerFile {
    /// Writes the marker of the store at `dir` anew, saying `format` and `commit` (in both
    /// slots): a temp file, fsynced, renamed over the marker, and the directory fsynced.
    /// Returns it open.
    ///
    /// # Errors
    /// The I/O error, with the file's path in its text.
    pub(super) fn create(dir: &Path, format: u64, commit: u64) -> io::Result<MarkerFile> {
        let path = dir.join(MARKER_FILE);
        let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
        let header = format!(
            "duraflow-rs store, format {format}; the data is in sled's files, and \
             this file numbers the last acknowledged commit"
        );
        let _ = fs::remove_file(&tmp);
        let slot = slot(commit);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| with_path(&tmp, e))?;
        file.write_all(&block(&header))
            .and_then(|()| file.write_all(&slot))
            .and_then(|()| file.write_all(&slot))
            .and_then(|()| file.sync_all())
            .map_err(|e| with_path(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| with_path(&path, e))?;
        sync_dir(dir)?;
        Ok(MarkerFile { path, file })
    }

    /// Opens the marker of the store at `dir`, which has this layout, for recording.
    ///
    /// # Errors
    /// [`DuraflowError::Io`] naming the file.
    pub(super) fn open(dir: &Path) -> Result<MarkerFile, DuraflowError> {
        let path = dir.join(MARKER_FILE);
        match OpenOptions::new().write(true).open(&path) {
            Ok(file) => Ok(MarkerFile { path, file }),
            Err(e) => Err(DuraflowError::io(path, e)),
        }
    }

    /// Records `commit` as the last acknowledged one, durably (`fdatasync`), in slot
    /// `commit % 2`.
    ///
    /// # Errors
    /// The I/O error, with the file's path in its text.
    pub(super) fn record(&self, commit: u64) -> io::Result<()> {
        let offset = BLOCK as u64 * (1 + commit % 2);
        self.file
            .write_all_at(&slot(commit), offset)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| with_path(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(commits: [u64; 2]) -> Vec<u8> {
        let mut bytes = block("duraflow-rs store, format 1; x").to_vec();
        bytes.extend_from_slice(&slot(commits[0]));
        bytes.extend_from_slice(&slot(commits[1]));
        bytes
    }

    #[test]
    fn the_newer_intact_slot_is_the_last_commit() {
        let marker = parse(&bytes([8, 7]));
        assert_eq!(marker.format, Some(1));
        assert_eq!(marker.commit, Some(8));
        assert!(marker.current);
    }

    #[test]
    fn a_torn_slot_leaves_the_older_commit() {
        let mut damaged = bytes([8, 7]);
        damaged[BLOCK + 12] ^= 1;
        let marker = parse(&damaged);
        assert_eq!(marker.commit, Some(7));
        assert!(!marker.current);
    }

    #[test]
    fn a_marker_of_one_line_has_a_format_and_no_commit() {
        let old = b"duraflow-rs store, format 1; the data is in sled's files\n";
        let marker = parse(old);
        assert_eq!((marker.format, marker.commit), (Some(1), None));
        assert!(!marker.current);
    }

    #[test]
    fn bytes_that_are_not_utf8_are_damage_not_an_error() {
        let mut damaged = bytes([3, 4]);
        damaged[5] = 0xFF;
        let marker = parse(&damaged);
        assert_eq!((marker.format, marker.commit), (None, Some(4)));
    }
}
