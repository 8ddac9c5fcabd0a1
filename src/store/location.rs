//! [`redacted`]: a store's location as messages show it, without its password.

/// A store's location as messages show it: `location` with any password replaced by `***`,
/// in a URL's user info (`postgres://user:secret@host`), as a `password=` query parameter,
/// or as a `password=` setting of a key/value connection string. A path is unchanged.
/// Every error of the crate that names a URL names it so.
pub fn redacted(location: &str) -> String {
    let url = location;
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let start = scheme_end + 3;
        let authority_end = out[start..]
            .find(['/', '?'])
            .map_or(out.len(), |end| start + end);
        if let Some(at) = out[start..authority_end].rfind('@') {
            let userinfo = &out[start..start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(start + colon + 1..start + at, "***");
            }
        }
    }
    redact_setting(&out)
}

/// Replaces the value of every `password=` (after `?`, `&`, a space or the start) with `***`.
fn redact_setting(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find("password") {
        let at = search + found;
        search = at + "password".len();
        let before_ok = at == 0
            || matches!(
                text.as_bytes()[at - 1],
                b'?' | b'&' | b' ' | b'\t' | b'\n' | b';'
            );
        let rest = &text[search..];
        let trimmed = rest.trim_start();
        if !before_ok || !trimmed.starts_with('=') {
            continue;
        }
        let eq = search + (rest.len() - trimmed.len()) + 1;
        let spaces = text[eq..].len() - text[eq..].trim_start().len();
        let value_start = eq + spaces;
        let after_eq = &text[value_start..];
        let value_len = if let Some(quoted) = after_eq.strip_prefix('\'') {
            quoted.find('\'').map_or(after_eq.len(), |end| end + 2)
        } else {
            after_eq
                .find(|c: char| c == '&' || c.is_whitespace())
                .unwrap_or(after_eq.len())
        };
        out.push_str(&text[copied..value_start]);
        out.push_str("***");
        copied = value_start + value_len;
        search = copied;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_in_every_form() {
        let cases = [
            (
                "postgres://u:s3cret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://u@h/db?password=s3cret&sslmode=disable",
                "postgresql://u@h/db?password=***&sslmode=disable",
            ),
            (
                "host=h user=u password=s3cret dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
            (
                "host=h password = 'a b' user=u",
                "host=h password = *** user=u",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }

    #[test]
    fn paths_are_unchanged() {
        assert_eq!(redacted("/srv/pipeline.db"), "/srv/pipeline.db");
        assert_eq!(redacted("password"), "password");
    }
}
