//! The envelope every stored value travels in, whatever the store.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "DF"
//! 2       1     envelope version (1)
//! 3       1     flags: bit 0 = the payload is JSON text (a value migrated from a
//!               duraflow-rs 1.x store), not MessagePack; bit 1 = a "made" block follows
//!               the type name; other bits reserved (0)
//! 4       2     type-name length N (u16, little endian)
//! 6       N     type name (UTF-8, `std::any::type_name` of the value; empty = untyped)
//!               with bit 1: M (u32, little endian), then M bytes: what a keyed output was
//!               made from (`fingerprint::block`)
//! …       4     payload length P (u32, little endian; u32::MAX: 4 GiB or more, the
//!               payload then fills the envelope up to its trailer)
//! …       P     payload: the value in MessagePack, named (map) form, via rmp-serde
//! …       4     CRC-32 of every byte before it (u32, little endian)
//! ```
//!
//! The named form keeps old values readable when a struct gains a `#[serde(default)]` field
//! or loses one. The checksum makes a flipped or truncated byte a [`DuraflowError::Corrupt`]
//! instead of a wrong value.

use std::io::{self, BufRead, BufReader, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::store::value::carried;
use crate::DuraflowError;

const MAGIC: &[u8; 2] = b"DF";
const VERSION: u8 = 1;
const HEADER: usize = 6;
const TRAILER: usize = 4;
/// Flag: the payload is the JSON text duraflow-rs 1.x stored, kept as it was so that every
/// type reads back exactly what 1.x's `serde_json::from_str` returned.
const FLAG_JSON: u8 = 1;
/// Flag: a "made" block (what a keyed output was made from) follows the type name.
const FLAG_MADE: u8 = 2;
/// The largest "made" block a reader accepts.
const MAX_MADE: u32 = 1 << 20;
/// The payload length field of a payload of 4 GiB or more: the payload then fills the
/// envelope up to its trailer.
const LONG: u32 = u32::MAX;
/// The buffer between a streamed value and the store's file.
const BUFFER: usize = 256 * 1024;

/// How strictly a read compares the stored type name with the requested type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TypeCheck {
    /// The stored type name must equal the requested one (untyped values excepted): what a
    /// DAG uses, so a task never receives a value another type wrote.
    Exact,
    /// Any type that decodes the payload is accepted (e.g. `i64` reading an `i32`).
    Structural,
}

/// The type name of `T` as the envelope records it: cut to `u16::MAX` bytes (the name is a
/// label, not the type's identity).
fn type_name_of<T: ?Sized>() -> (&'static str, &'static [u8]) {
    let name = std::any::type_name::<T>();
    (name, &name.as_bytes()[..name.len().min(u16::MAX as usize)])
}

/// The envelope's header, up to and including its payload length field, in a buffer with
/// room for `spare` bytes more; with `made`, its block.
fn header(name: &[u8], made: Option<&[u8]>, flags: u8, payload_len: u64, spare: usize) -> Vec<u8> {
    let made_len = made.map_or(0, |m| 4 + m.len());
    let mut out = Vec::with_capacity(HEADER + name.len() + made_len + 4 + spare);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(flags | if made.is_some() { FLAG_MADE } else { 0 });
    // At most u16::MAX bytes (see `type_name_of`).
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    if let Some(made) = made {
        // A block the crate made: far below 4 GiB.
        out.extend_from_slice(&(made.len() as u32).to_le_bytes());
        out.extend_from_slice(made);
    }
    let field = u32::try_from(payload_len).ok().filter(|&n| n != LONG);
    out.extend_from_slice(&field.unwrap_or(LONG).to_le_bytes());
    out
}

/// Encodes `value` into an envelope, in memory.
///
/// # Errors
/// [`DuraflowError::Encode`] when serde cannot serialise the value.
pub(crate) fn encode<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
) -> Result<Vec<u8>, DuraflowError> {
    // Nothing is over a limit of `usize::MAX` bytes.
    Ok(encode_within(key, value, None, usize::MAX)?.unwrap_or_default())
}

/// Encodes `value` into an envelope in memory if it takes at most `limit` bytes; `None`
/// (after encoding at most `limit` bytes of it) if it takes more.
///
/// # Errors
/// [`DuraflowError::Encode`] when serde cannot serialise the value.
pub(crate) fn encode_within<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    made: Option<&[u8]>,
    limit: usize,
) -> Result<Option<Vec<u8>>, DuraflowError> {
    let (type_name, name) = type_name_of::<T>();
    // Room for a small payload and the trailer.
    let out = header(name, made, 0, 0, 16 + TRAILER);
    let len_at = out.len() - 4;
    // The payload is encoded in place, then its length patched in: one pass, one buffer.
    let mut bounded = Bounded {
        out,
        limit: limit.saturating_sub(TRAILER),
        over: false,
    };
    match rmp_serde::encode::write_named(&mut bounded, value) {
        Ok(()) => {}
        Err(_) if bounded.over => return Ok(None),
        Err(source) => {
            return Err(DuraflowError::Encode {
                key: key.to_owned(),
                type_name,
                source,
            })
        }
    }
    let mut out = bounded.out;
    let payload_len = (out.len() - len_at - 4) as u64;
    let field = u32::try_from(payload_len).ok().filter(|&n| n != LONG);
    out[len_at..len_at + 4].copy_from_slice(&field.unwrap_or(LONG).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(Some(out))
}

/// A buffer that refuses to grow past `limit` bytes.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
    over: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.over = true;
            return Err(io::Error::other("over the limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the envelope of `value` into `out` as it is encoded: a first pass counts the
/// payload's bytes (for the length field), the second writes them, through a buffer, with
/// the checksum computed on the way. Nothing is held in memory but the buffer.
///
/// # Errors
/// [`DuraflowError::Encode`] when serde cannot serialise the value (found by the first
/// pass, before anything is written); an error of `out` as the `DuraflowError` it carries
/// (see [`Encoder`](crate::Encoder)), or as [`DuraflowError::Persist`] naming `key`.
pub(crate) fn write<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    made: Option<&[u8]>,
    out: &mut dyn Write,
) -> Result<(), DuraflowError> {
    let (type_name, name) = type_name_of::<T>();
    let encode_error = |source| DuraflowError::Encode {
        key: key.to_owned(),
        type_name,
        source,
    };
    let mut counter = Counter(0);
    rmp_serde::encode::write_named(&mut counter, value).map_err(encode_error)?;
    let mut checked = Checked {
        inner: out,
        crc: crc32fast::Hasher::new(),
        error: None,
        len: 0,
    };
    let header = header(name, made, 0, counter.0, 0);
    let written = {
        let mut buffered = io::BufWriter::with_capacity(BUFFER, &mut checked);
        buffered
            .write_all(&header)
            .map_err(|_| None)
            .and_then(|()| rmp_serde::encode::write_named(&mut buffered, value).map_err(Some))
            .and_then(|()| buffered.flush().map_err(|_| None))
    };
    let Checked {
        inner,
        crc,
        error,
        len,
    } = checked;
    match (written, error) {
        (Ok(()), _) => {}
        // The writer's error, whatever serde made of it.
        (Err(_), Some(e)) => return Err(write_error(key, e)),
        (Err(Some(e)), None) => return Err(encode_error(e)),
        (Err(None), None) => return Err(write_error(key, io::Error::other("the write failed"))),
    }
    // A value whose serde form changed between the passes would be stored with a wrong
    // length: refused, so the store keeps its previous value.
    let expected = header.len() as u64 + counter.0;
    if len != expected {
        return Err(DuraflowError::Persist {
            key: key.to_owned(),
            source: format!(
                "the value serialised to {} bytes, then to {}: its `Serialize` gives a \
                 different result each time",
                counter.0,
                len.saturating_sub(header.len() as u64)
            )
            .into(),
        });
    }
    inner
        .write_all(&crc.finalize().to_le_bytes())
        .map_err(|e| write_error(key, e))
}

/// An error of the writer a value is encoded into.
fn write_error(key: &str, e: io::Error) -> DuraflowError {
    carried(e).unwrap_or_else(|e| DuraflowError::Persist {
        key: key.to_owned(),
        source: Box::new(e),
    })
}

/// Counts the bytes written to it.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes bytes on to `inner`, computing their CRC-32 and count, and keeping the first
/// error of `inner` (but `Interrupted`, which is retried).
struct Checked<T> {
    inner: T,
    crc: crc32fast::Hasher,
    error: Option<io::Error>,
    len: u64,
}

impl<W: Write> Write for Checked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.crc.update(&buf[..n]);
                self.len += n as u64;
                Ok(n)
            }
            Err(e) => Err(self.keep(e)),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(|e| self.keep(e))
    }
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.crc.update(&buf[..n]);
                self.len += n as u64;
                Ok(n)
            }
            Err(e) => Err(self.keep(e)),
        }
    }
}

impl<T> Checked<T> {
    /// Keeps `e` (the first error only) and returns a stand-in for the layers above.
    fn keep(&mut self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::Interrupted {
            return e;
        }
        let stand_in = io::Error::new(e.kind(), "the store's reader or writer failed");
        self.error.get_or_insert(e);
        stand_in
    }
}

/// Wraps `json` (a value as duraflow-rs 1.x stored it) in an untyped envelope whose payload
/// is read with `serde_json`.
pub(crate) fn encode_json(json: &[u8]) -> Vec<u8> {
    let mut out = header(
        b"",
        None,
        FLAG_JSON,
        json.len() as u64,
        json.len() + TRAILER,
    );
    out.extend_from_slice(json);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// What an envelope's header says.
#[derive(Debug)]
pub(crate) struct Header {
    /// The type name it records (empty: untyped).
    pub type_name: String,
    /// Whether the payload is JSON (see [`encode_json`]) rather than MessagePack.
    pub json: bool,
    /// The "made" block, if the envelope has one.
    pub made: Option<Vec<u8>>,
}

/// The payload of an envelope being read: exactly its bytes.
pub(crate) type Payload<'a> = io::Take<&'a mut dyn BufRead>;

/// A payload being decoded: from a reader ([`Payload`]) or in memory (the slice of exactly
/// its bytes), read by the decoder without a dynamic call per read.
trait PayloadRead: Read {
    /// How many of the payload's bytes are left unread.
    fn left(&self) -> u64;
}

impl PayloadRead for Payload<'_> {
    fn left(&self) -> u64 {
        self.limit()
    }
}

impl PayloadRead for &[u8] {
    fn left(&self) -> u64 {
        self.len() as u64
    }
}

/// Reads the envelope of `len` bytes that `reader` yields, handing its header and payload
/// to `body`, and checks it whole: framing, the checksum, and that `reader` ends where `len`
/// says (which lets a store's reader check its own digest). Nothing but a buffer is held in
/// memory beyond what `body` keeps.
///
/// An error of `reader` comes first, then damage (the envelope's framing and checksum),
/// then `body`'s error: `body` may fail on bytes that are damaged, and damage must be
/// reported as such.
///
/// # Errors
/// The `DuraflowError` an error of `reader` carries (see [`Stored`](crate::Stored)), or
/// [`DuraflowError::Corrupt`] naming `key` for any other error of it and for damage; the
/// error of `body`.
pub(crate) fn read_with<R>(
    key: &str,
    reader: &mut dyn Read,
    len: u64,
    body: impl FnOnce(&Header, &mut Payload<'_>) -> Result<R, DuraflowError>,
) -> Result<R, DuraflowError> {
    let corrupt = |reason: &str| DuraflowError::Corrupt {
        key: key.to_owned(),
        path: None,
        reason: reason.to_owned(),
    };
    let mut checked = Checked {
        inner: reader.take(len.saturating_sub(TRAILER as u64)),
        crc: crc32fast::Hasher::new(),
        error: None,
        len: 0,
    };
    let result = {
        let capacity = usize::try_from(len).unwrap_or(BUFFER).clamp(64, BUFFER);
        let mut buffered = BufReader::with_capacity(capacity, &mut checked);
        let result = read_header(&mut buffered, len).map(|(header, payload_len)| {
            let mut payload = (&mut buffered as &mut dyn BufRead).take(payload_len);
            body(&header, &mut payload)
        });
        // Whatever `body` left is read too, so that the checksum covers every byte (an
        // error of the reader is kept in `checked`).
        let _ = io::copy(&mut buffered, &mut io::sink());
        result
    };
    let Checked {
        inner, crc, error, ..
    } = checked;
    let store_error =
        |e: io::Error| carried(e).unwrap_or_else(|e| corrupt(&format!("reading it failed: {e}")));
    if let Some(e) = error {
        return Err(store_error(e));
    }
    if inner.limit() > 0 || len < (HEADER + 4 + TRAILER) as u64 {
        return Err(corrupt("truncated: shorter than its stored length"));
    }
    let reader = inner.into_inner();
    let mut trailer = [0; TRAILER];
    match reader.read_exact(&mut trailer) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(corrupt("truncated: shorter than its stored length"))
        }
        Err(e) => return Err(store_error(e)),
    }
    // The end of the reader, where a store's reader checks its digest.
    match reader.read(&mut [0]) {
        Ok(0) => {}
        Ok(_) => return Err(corrupt("longer than its stored length")),
        Err(e) => return Err(store_error(e)),
    }
    if crc.finalize() != u32::from_le_bytes(trailer) {
        return Err(corrupt("checksum mismatch"));
    }
    match result {
        Ok(result) => result,
        Err(reason) => Err(corrupt(&reason)),
    }
}

/// Reads an envelope's header from `reader`, for an envelope of `len` bytes; returns it with
/// the payload's length, or what is wrong with it.
fn read_header(reader: &mut dyn Read, len: u64) -> Result<(Header, u64), String> {
    let mut fixed = [0; HEADER];
    reader
        .read_exact(&mut fixed)
        .map_err(|_| "not a duraflow envelope (too short)".to_owned())?;
    if &fixed[..2] != MAGIC {
        return Err("not a duraflow envelope (bad magic)".to_owned());
    }
    if fixed[2] != VERSION {
        return Err(format!("unknown envelope version {}", fixed[2]));
    }
    if fixed[3] & !(FLAG_JSON | FLAG_MADE) != 0 {
        return Err(format!("unknown envelope flags {:#04x}", fixed[3]));
    }
    let name_len = u16::from_le_bytes([fixed[4], fixed[5]]) as usize;
    let mut name = vec![0; name_len];
    reader
        .read_exact(&mut name)
        .map_err(|_| "truncated type name".to_owned())?;
    let type_name = String::from_utf8(name).map_err(|_| "type name is not UTF-8".to_owned())?;
    let mut made = None;
    let mut made_len = 0;
    if fixed[3] & FLAG_MADE != 0 {
        let block = read_u32(reader).ok_or("truncated made block")?;
        if block > MAX_MADE {
            return Err(format!("a made block of {block} bytes"));
        }
        let mut bytes = vec![0; block as usize];
        reader
            .read_exact(&mut bytes)
            .map_err(|_| "truncated made block".to_owned())?;
        made_len = 4 + block as usize;
        made = Some(bytes);
    }
    let field = read_u32(reader).ok_or("truncated payload length")?;
    let framing = (HEADER + name_len + made_len + 4 + TRAILER) as u64;
    let payload_len = len.saturating_sub(framing);
    let fits = match field {
        LONG => payload_len >= u64::from(LONG),
        n => payload_len == u64::from(n),
    };
    if !fits || len < framing {
        return Err("payload length does not match".to_owned());
    }
    let json = fixed[3] & FLAG_JSON != 0;
    Ok((
        Header {
            type_name,
            json,
            made,
        },
        payload_len,
    ))
}

/// Reads a u32 (little endian), `None` at the end.
fn read_u32(reader: &mut dyn Read) -> Option<u32> {
    let mut bytes = [0; 4];
    reader.read_exact(&mut bytes).ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Decodes the value stored under `key` as a `T`, from the `len` bytes `reader` yields.
///
/// # Errors
/// [`DuraflowError::Corrupt`] for damaged bytes; [`DuraflowError::TypeMismatch`] when the
/// payload does not decode as `T` (or, with [`TypeCheck::Exact`], was written by another
/// type); an error of `reader` as [`read_with`] says.
pub(crate) fn read<T: DeserializeOwned>(
    key: &str,
    reader: &mut dyn Read,
    len: u64,
    check: TypeCheck,
) -> Result<T, DuraflowError> {
    read_with(key, reader, len, |header, payload| {
        decode_payload(key, header, payload, check)
    })
}

/// Decodes the envelope `bytes` as a `T`, as [`read`] does.
///
/// # Errors
/// As [`read`].
pub(crate) fn decode<T: DeserializeOwned>(
    key: &str,
    bytes: &[u8],
    check: TypeCheck,
) -> Result<T, DuraflowError> {
    read_bytes(key, bytes, |header, payload| {
        decode_payload(key, header, payload, check)
    })
}

/// [`decode`], with the envelope's "made" block.
///
/// # Errors
/// As [`read`].
pub(crate) fn decode_made<T: DeserializeOwned>(
    key: &str,
    bytes: &[u8],
    check: TypeCheck,
) -> Result<(T, Option<Vec<u8>>), DuraflowError> {
    read_bytes(key, bytes, |header, payload| {
        let value = decode_payload(key, header, payload, check)?;
        Ok((value, header.made.clone()))
    })
}

/// [`read`], with the envelope's "made" block.
///
/// # Errors
/// As [`read`].
pub(crate) fn read_made<T: DeserializeOwned>(
    key: &str,
    reader: &mut dyn Read,
    len: u64,
    check: TypeCheck,
) -> Result<(T, Option<Vec<u8>>), DuraflowError> {
    read_with(key, reader, len, |header, payload| {
        let value = decode_payload(key, header, payload, check)?;
        Ok((value, header.made.clone()))
    })
}

/// Decodes `payload`, whose envelope's header is `header`, as a `T`.
fn decode_payload<T: DeserializeOwned, P: PayloadRead>(
    key: &str,
    header: &Header,
    payload: &mut P,
    check: TypeCheck,
) -> Result<T, DuraflowError> {
    let requested = std::any::type_name::<T>();
    let mismatch = |reason: String| DuraflowError::TypeMismatch {
        key: key.to_owned(),
        stored: header.type_name.clone(),
        requested,
        reason,
    };
    let untyped = header.type_name.is_empty();
    if check == TypeCheck::Exact && !untyped && header.type_name != requested {
        return Err(mismatch("written by another type".to_owned()));
    }
    let value = if header.json {
        serde_json::from_reader(&mut *payload).map_err(|e| mismatch(e.to_string()))?
    } else {
        let mut de = rmp_serde::Deserializer::new(&mut *payload);
        T::deserialize(&mut de).map_err(|e| mismatch(e.to_string()))?
    };
    if payload.left() != 0 {
        return Err(mismatch(
            "the value does not use all stored bytes".to_owned(),
        ));
    }
    Ok(value)
}

/// [`read_with`] over an envelope in memory: framing and checksum are checked first, in one
/// pass over the bytes, then `body` reads the payload in place.
///
/// # Errors
/// [`DuraflowError::Corrupt`] naming `key` for damage; the error of `body`.
fn read_bytes<R>(
    key: &str,
    bytes: &[u8],
    body: impl FnOnce(&Header, &mut &[u8]) -> Result<R, DuraflowError>,
) -> Result<R, DuraflowError> {
    let corrupt = |reason: String| DuraflowError::Corrupt {
        key: key.to_owned(),
        path: None,
        reason,
    };
    if bytes.len() < HEADER + 4 + TRAILER {
        return Err(corrupt(
            "truncated: shorter than its stored length".to_owned(),
        ));
    }
    let (content, trailer) = bytes.split_at(bytes.len() - TRAILER);
    if crc32fast::hash(content)
        != u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]])
    {
        return Err(corrupt("checksum mismatch".to_owned()));
    }
    let mut rest = content;
    let (header, payload_len) = read_header(&mut rest, bytes.len() as u64).map_err(corrupt)?;
    // The header checked the payload's length against the envelope's.
    let mut payload = rest.get(..payload_len as usize).unwrap_or(rest);
    body(&header, &mut payload)
}

/// Checks the envelope `bytes` (framing and checksum) without decoding its payload.
///
/// # Errors
/// [`DuraflowError::Corrupt`] naming `key` for damage.
pub(crate) fn check(key: &str, bytes: &[u8]) -> Result<(), DuraflowError> {
    read_bytes(key, bytes, |_, _| Ok(()))
}

/// Reads what is left of `payload`.
fn drain(_: &Header, payload: &mut Payload<'_>) -> Result<(), DuraflowError> {
    let _ = io::copy(payload, &mut io::sink());
    Ok(())
}

/// Where a [`copy`] failed.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// Reading the envelope: the reader's error, or damage.
    Source(DuraflowError),
    /// Writing it.
    Target(DuraflowError),
}

/// Copies the envelope of `len` bytes that `reader` yields into `out` as it is read,
/// checking it whole on the way (as [`read_with`] does).
///
/// # Errors
/// [`CopyError::Source`] with what [`read_with`] returns; [`CopyError::Target`] with the
/// error of `out` (as [`write`] reports it).
pub(crate) fn copy(
    key: &str,
    reader: &mut dyn Read,
    len: u64,
    out: &mut dyn Write,
) -> Result<(), CopyError> {
    let mut tee = Tee {
        reader,
        out,
        failed: None,
    };
    let checked = read_with(key, &mut tee, len, drain);
    match tee.failed {
        Some(e) => Err(CopyError::Target(write_error(key, e))),
        None => checked.map_err(CopyError::Source),
    }
}

/// Writes what it reads from `reader` to `out`, keeping the error of `out`.
struct Tee<'a> {
    reader: &'a mut dyn Read,
    out: &'a mut dyn Write,
    failed: Option<io::Error>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        if let Err(e) = self.out.write_all(&buf[..n]) {
            self.failed = Some(e);
            return Err(io::Error::other("the copy's writer failed"));
        }
        Ok(n)
    }
}

/// Decodes the value stored under `key` without knowing its type: the type name it was
/// written with and the value as JSON (MessagePack is self-describing; binary strings become
/// arrays of numbers).
///
/// # Errors
/// [`DuraflowError::Corrupt`] for damaged bytes or a payload that is not MessagePack.
pub(crate) fn inspect(
    key: &str,
    bytes: &[u8],
) -> Result<(String, serde_json::Value), DuraflowError> {
    read_bytes(key, bytes, |header, payload| {
        let corrupt = |reason: String| DuraflowError::Corrupt {
            key: key.to_owned(),
            path: None,
            reason,
        };
        let value = if header.json {
            serde_json::from_reader(&mut *payload).map_err(|e| corrupt(e.to_string()))?
        } else {
            rmp_serde::from_read(&mut *payload).map_err(|e| corrupt(e.to_string()))?
        };
        Ok((header.type_name.clone(), value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V1 {
        a: u32,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V2 {
        a: u32,
        #[serde(default)]
        b: String,
    }

    #[test]
    fn inspect_reads_any_value_as_json_with_its_type_name() {
        let bytes = encode(
            "k",
            &V2 {
                a: 3,
                b: "x".into(),
            },
        )
        .unwrap();
        let (name, value) = inspect("k", &bytes).unwrap();
        assert_eq!(name, std::any::type_name::<V2>());
        assert_eq!(value, serde_json::json!({"a": 3, "b": "x"}));
        let (name, value) = inspect("k", &encode_json(br#"[1,"two"]"#)).unwrap();
        assert_eq!((name.as_str(), value), ("", serde_json::json!([1, "two"])));
        let mut damaged = bytes.clone();
        damaged[10] ^= 1;
        assert!(matches!(
            inspect("k", &damaged),
            Err(DuraflowError::Corrupt { .. })
        ));
    }

    #[test]
    fn round_trip_and_type_name() {
        let bytes = encode("k", &V1 { a: 7 }).unwrap();
        let name = read_with("k", &mut &bytes[..], bytes.len() as u64, |header, _| {
            Ok(header.type_name.clone())
        });
        assert_eq!(name.unwrap(), std::any::type_name::<V1>());
        assert_eq!(
            decode::<V1>("k", &bytes, TypeCheck::Exact).unwrap(),
            V1 { a: 7 }
        );
    }

    #[test]
    fn named_form_reads_old_values_with_new_default_fields() {
        let bytes = encode("k", &V1 { a: 7 }).unwrap();
        let v: V2 = decode("k", &bytes, TypeCheck::Structural).unwrap();
        assert_eq!(
            v,
            V2 {
                a: 7,
                b: String::new()
            }
        );
        assert!(matches!(
            decode::<V2>("k", &bytes, TypeCheck::Exact),
            Err(DuraflowError::TypeMismatch { .. })
        ));
    }

    #[test]
    fn wrong_type_is_a_mismatch_naming_both_types() {
        let bytes = encode("k", &"text").unwrap();
        match decode::<i32>("k", &bytes, TypeCheck::Structural) {
            Err(DuraflowError::TypeMismatch {
                key,
                stored,
                requested,
                ..
            }) => {
                assert_eq!(key, "k");
                assert_eq!(stored, "&str");
                assert_eq!(requested, "i32");
            }
            other => panic!("expected TypeMismatch, got {other:?}"),
        }
    }

    #[test]
    fn every_flipped_byte_is_corrupt() {
        let bytes = encode("k", &vec![1u64, 2, 3]).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                matches!(
                    decode::<Vec<u64>>("k", &b, TypeCheck::Exact),
                    Err(DuraflowError::Corrupt { .. })
                ),
                "flip at {i} not detected"
            );
            let streamed = read::<Vec<u64>>("k", &mut &b[..], b.len() as u64, TypeCheck::Exact);
            assert!(
                matches!(streamed, Err(DuraflowError::Corrupt { .. })),
                "flip at {i} not detected when streamed"
            );
        }
        assert!(matches!(
            decode::<Vec<u64>>("k", &bytes[..bytes.len() - 1], TypeCheck::Exact),
            Err(DuraflowError::Corrupt { .. })
        ));
    }

    #[test]
    fn streamed_whole_and_bounded_encodings_are_the_same_bytes() {
        let value = V2 {
            a: 9,
            b: "x".repeat(1000),
        };
        let whole = encode("k", &value).unwrap();
        let mut streamed = Vec::new();
        write("k", &value, None, &mut streamed).unwrap();
        assert_eq!(streamed, whole);
        let within = encode_within("k", &value, None, whole.len()).unwrap();
        assert_eq!(within.as_deref(), Some(&whole[..]));
        assert_eq!(
            encode_within("k", &value, None, whole.len() - 1).unwrap(),
            None
        );
        // With a made block, streamed and whole agree too, and it reads back.
        let made = encode_within("k", &value, Some(b"made"), usize::MAX)
            .unwrap()
            .unwrap();
        let mut streamed = Vec::new();
        write("k", &value, Some(b"made"), &mut streamed).unwrap();
        assert_eq!(streamed, made);
        let (back, block) = decode_made::<V2>("k", &made, TypeCheck::Exact).unwrap();
        assert_eq!((back, block.as_deref()), (value, Some(&b"made"[..])));
    }

    #[test]
    fn the_long_length_field_is_refused_on_a_payload_under_4_gib() {
        let mut bytes = header(b"", None, 0, u64::from(LONG), 0);
        rmp_serde::encode::write_named(&mut bytes, &7u8).unwrap();
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        match decode::<u8>("k", &bytes, TypeCheck::Exact) {
            Err(DuraflowError::Corrupt { reason, .. }) => {
                assert!(reason.contains("payload length"), "{reason}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// Yields `bytes`, then fails as a store's reader fails on damage it finds at the end.
    struct FailsAtEnd<'a>(&'a [u8]);

    impl Read for FailsAtEnd<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf)?;
            if n == 0 && !buf.is_empty() {
                return Err(crate::store::value::carry(DuraflowError::Corrupt {
                    key: "k".to_owned(),
                    path: Some("the/file".into()),
                    reason: "digest".to_owned(),
                }));
            }
            Ok(n)
        }
    }

    #[test]
    fn the_error_of_the_stores_reader_comes_before_any_other() {
        let bytes = encode("k", &vec![1u64, 2, 3]).unwrap();
        let mut damaged = bytes.clone();
        damaged[12] ^= 0x40;
        for bytes in [&bytes, &damaged] {
            let read = read::<String>(
                "k",
                &mut FailsAtEnd(bytes),
                bytes.len() as u64,
                TypeCheck::Exact,
            );
            match read {
                Err(DuraflowError::Corrupt { path, .. }) => {
                    assert_eq!(path.as_deref(), Some(std::path::Path::new("the/file")))
                }
                other => panic!("expected the reader's Corrupt, got {other:?}"),
            }
        }
    }

    /// Serialises to one more element each time.
    struct Growing(std::sync::atomic::AtomicUsize);

    impl Serialize for Growing {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            s.collect_seq(0..n)
        }
    }

    #[test]
    fn a_value_serialised_differently_by_each_pass_is_refused() {
        let mut out = Vec::new();
        match write("k", &Growing(1.into()), None, &mut out) {
            Err(DuraflowError::Persist { key, source }) => {
                assert_eq!(key, "k");
                assert!(source.to_string().contains("different result"), "{source}");
            }
            other => panic!("expected Persist, got {other:?}"),
        }
    }
}
