//! What a storage key may be, checked in one place for every store.

use crate::DuraflowError;

/// The longest key, in bytes, that any store accepts (4 KiB).
///
/// The limit is the same for every store, so moving a pipeline from one store to another
/// never changes which task ids are valid.
pub const MAX_KEY_LEN: usize = 4096;

/// Checks that `key` is usable by every store: not empty and at most [`MAX_KEY_LEN`] bytes.
/// Any other content (slashes, dots, NUL, any Unicode) is allowed; stores encode it safely.
///
/// # Errors
/// [`DuraflowError::InvalidKey`] naming the key and the rule it breaks.
pub fn validate_key(key: &str) -> Result<(), DuraflowError> {
    let reason = if key.is_empty() {
        "the key is empty".to_owned()
    } else if key.len() > MAX_KEY_LEN {
        format!(
            "{} bytes is longer than the limit of {MAX_KEY_LEN}",
            key.len()
        )
    } else {
        return Ok(());
    };
    Err(DuraflowError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_overlong_keys_are_refused_with_the_key() {
        assert!(
            matches!(validate_key(""), Err(DuraflowError::InvalidKey { key, .. }) if key.is_empty())
        );
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert!(
            matches!(validate_key(&long), Err(DuraflowError::InvalidKey { key, .. }) if key == long)
        );
        assert!(validate_key(&"x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(validate_key("../\0/é").is_ok());
    }
}
