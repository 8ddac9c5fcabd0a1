//! The envelope every stored value travels in, whatever the store.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "DF"
//! 2       1     envelope version (1)
//! 3       1     flags: bit 0 = the payload is JSON text (a value migrated from a
//!               duraflow-rs 1.x store), not MessagePack; other bits reserved (0)
//! 4       2     type-name length N (u16, little endian)
//! 6       N     type name (UTF-8, `std::any::type_name` of the value; empty = untyped)
//! 6+N     4     payload length P (u32, little endian)
//! 10+N    P     payload: the value in MessagePack, named (map) form, via rmp-serde
//! 10+N+P  4     CRC-32 of every byte before it (u32, little endian)
//! ```
//!
//! The named form keeps old values readable when a struct gains a `#[serde(default)]` field
//! or loses one. The checksum makes a flipped or truncated byte a [`DuraflowError::Corrupt`]
//! instead of a wrong value.

use serde::{de::DeserializeOwned, Serialize};

use crate::DuraflowError;

const MAGIC: &[u8; 2] = b"DF";
const VERSION: u8 = 1;
const HEADER: usize = 6;
const TRAILER: usize = 4;
/// Flag: the payload is the JSON text duraflow-rs 1.x stored, kept as it was so that every
/// type reads back exactly what 1.x's `serde_json::from_str` returned.
const FLAG_JSON: u8 = 1;

/// How strictly [`decode`] compares the stored type name with the requested type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TypeCheck {
    /// The stored type name must equal the requested one (untyped values excepted): what a
    /// DAG uses, so a task never receives a value another type wrote.
    Exact,
    /// Any type that decodes the payload is accepted (e.g. `i64` reading an `i32`).
    Structural,
}

/// Encodes `value` into an envelope.
///
/// # Errors
/// [`DuraflowError::Encode`] when serde cannot serialise the value.
pub(crate) fn encode<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
) -> Result<Vec<u8>, DuraflowError> {
    let type_name = std::any::type_name::<T>();
    // Type names longer than u16::MAX are cut: the name is a label, not the type's identity.
    let name = type_name.as_bytes();
    let name = &name[..name.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(HEADER + name.len() + 4 + 16 + TRAILER);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(0);
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    let len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    // The payload is encoded in place, then its length patched in: one buffer per value.
    rmp_serde::encode::write_named(&mut out, value).map_err(|source| DuraflowError::Encode {
        key: key.to_owned(),
        type_name,
        source,
    })?;
    let payload_len = out.len() - len_at - 4;
    let payload_len = u32::try_from(payload_len).map_err(|_| DuraflowError::Persist {
        key: key.to_owned(),
        source: format!("encoded value is {payload_len} bytes; the limit is 4 GiB").into(),
    })?;
    out[len_at..len_at + 4].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Wraps `json` (a value as duraflow-rs 1.x stored it) in an untyped envelope whose payload
/// is read with `serde_json`.
pub(crate) fn encode_json(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 4 + json.len() + TRAILER);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(FLAG_JSON);
    out.extend_from_slice(&0u16.to_le_bytes());
    // 1.x values are files read whole into memory: far below 4 GiB.
    out.extend_from_slice(&(json.len().min(u32::MAX as usize) as u32).to_le_bytes());
    out.extend_from_slice(json);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A checked envelope: the type name it records and its payload.
#[derive(Debug)]
pub(crate) struct Envelope<'a> {
    pub type_name: &'a str,
    pub payload: &'a [u8],
    /// Whether the payload is JSON (see [`encode_json`]) rather than MessagePack.
    pub json: bool,
}

/// Checks framing and checksum of `bytes` and returns the envelope's parts.
///
/// # Errors
/// [`DuraflowError::Corrupt`] naming `key` when anything does not add up.
pub(crate) fn open<'a>(key: &str, bytes: &'a [u8]) -> Result<Envelope<'a>, DuraflowError> {
    let corrupt = |reason: &str| DuraflowError::Corrupt {
        key: key.to_owned(),
        path: None,
        reason: reason.to_owned(),
    };
    if bytes.len() < HEADER + 4 + TRAILER || &bytes[..2] != MAGIC {
        return Err(corrupt("not a duraflow envelope (bad magic or too short)"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - TRAILER);
    let stored_crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != stored_crc {
        return Err(corrupt("checksum mismatch"));
    }
    if body[2] != VERSION {
        return Err(corrupt(&format!("unknown envelope version {}", body[2])));
    }
    let name_len = u16::from_le_bytes([body[4], body[5]]) as usize;
    let rest = &body[HEADER..];
    if rest.len() < name_len + 4 {
        return Err(corrupt("truncated type name"));
    }
    let (name, rest) = rest.split_at(name_len);
    let type_name = std::str::from_utf8(name).map_err(|_| corrupt("type name is not UTF-8"))?;
    let (len, payload) = rest.split_at(4);
    let payload_len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if payload.len() != payload_len {
        return Err(corrupt("payload length does not match"));
    }
    if body[3] & !FLAG_JSON != 0 {
        return Err(corrupt(&format!("unknown envelope flags {:#04x}", body[3])));
    }
    Ok(Envelope {
        type_name,
        payload,
        json: body[3] & FLAG_JSON != 0,
    })
}

/// Decodes the value stored under `key` as a `T`.
///
/// # Errors
/// [`DuraflowError::Corrupt`] for damaged bytes; [`DuraflowError::TypeMismatch`] when the
/// payload does not decode as `T` (or, with [`TypeCheck::Exact`], was written by another type).
pub(crate) fn decode<T: DeserializeOwned>(
    key: &str,
    bytes: &[u8],
    check: TypeCheck,
) -> Result<T, DuraflowError> {
    let env = open(key, bytes)?;
    let requested = std::any::type_name::<T>();
    let mismatch = |reason: String| DuraflowError::TypeMismatch {
        key: key.to_owned(),
        stored: env.type_name.to_owned(),
        requested,
        reason,
    };
    if check == TypeCheck::Exact && !env.type_name.is_empty() && env.type_name != requested {
        return Err(mismatch("written by another type".to_owned()));
    }
    if env.json {
        return serde_json::from_slice(env.payload).map_err(|e| mismatch(e.to_string()));
    }
    let mut cursor = std::io::Cursor::new(env.payload);
    let value = {
        let mut de = rmp_serde::Deserializer::new(&mut cursor);
        T::deserialize(&mut de).map_err(|e| mismatch(e.to_string()))?
    };
    if cursor.position() as usize != env.payload.len() {
        return Err(mismatch(
            "the value does not use all stored bytes".to_owned(),
        ));
    }
    Ok(value)
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
    let env = open(key, bytes)?;
    let corrupt = |reason: String| DuraflowError::Corrupt {
        key: key.to_owned(),
        path: None,
        reason,
    };
    let value = if env.json {
        serde_json::from_slice(env.payload).map_err(|e| corrupt(e.to_string()))?
    } else {
        rmp_serde::from_slice(env.payload).map_err(|e| corrupt(e.to_string()))?
    };
    Ok((env.type_name.to_owned(), value))
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
        assert_eq!(
            open("k", &bytes).unwrap().type_name,
            std::any::type_name::<V1>()
        );
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
        }
        assert!(matches!(
            decode::<Vec<u64>>("k", &bytes[..bytes.len() - 1], TypeCheck::Exact),
            Err(DuraflowError::Corrupt { .. })
        ));
    }
}
