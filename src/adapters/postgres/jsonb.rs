//! JSON text on its way into `jsonb` columns: the bind wrapper and the checks that keep one bad
//! value from failing a whole flush.

use std::borrow::Cow;
use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// JSON text bound as a `jsonb` parameter without building a `serde_json::Value`.
///
/// tokio-postgres binds `&str` only as `text`, and `serde_json::Value` costs a parse and a
/// re-serialization per row. The binary `jsonb` format is a version byte (1) followed by the JSON
/// text, so the text is copied as it is. The text must be valid JSON: PostgreSQL parses it and
/// rejects the statement otherwise.
#[derive(Clone, Copy, Debug)]
pub struct Jsonb<'a>(pub &'a str);

/// Version of the binary `jsonb` format that PostgreSQL reads and writes.
const JSONB_FORMAT_VERSION: u8 = 1;

impl ToSql for Jsonb<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.reserve(1 + self.0.len());
        out.put_u8(JSONB_FORMAT_VERSION);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// Maximum length of an accepted number literal, in characters.
const MAX_NUMBER_CHARS: usize = 1_000;

/// Maximum absolute decimal exponent of an accepted number literal.
///
/// Together with [`MAX_NUMBER_CHARS`] this keeps every accepted number far inside the range of
/// PostgreSQL's `numeric` (131072 digits before the point and 16383 after it, PostgreSQL 15),
/// which `jsonb` uses for numbers. Discord sends no number anywhere near either limit.
const MAX_EXPONENT: u32 = 1_000;

/// Makes JSON text storable as `jsonb`, or returns why it cannot be stored.
///
/// PostgreSQL 15 rejects three things that valid JSON may contain:
/// - the escape `\u0000` (SQLSTATE 22P05, "unsupported Unicode escape sequence"). It is
///   stripped: NUL carries no meaning in any Discord string, and stripping keeps the rest of the
///   string exact.
/// - a `\uD800`–`\uDFFF` escape that is not part of a surrogate pair. It is replaced by
///   `\uFFFD`, the replacement character, as a UTF-8 decoder would.
/// - a number outside the range of `numeric`. This is an error, because no replacement keeps its
///   meaning.
///
/// The text is scanned once. It is copied only when something is changed, which is rare.
pub(crate) fn storable_json(json: &str) -> Result<Cow<'_, str>, String> {
    let bytes = json.as_bytes();
    let mut edits = Edits::new(json);
    let mut index = 0;

    while index < bytes.len() {
        match bytes[index] {
            b'"' => index = scan_string(bytes, index + 1, &mut edits),
            b'-' | b'0'..=b'9' => index = check_number(json, index)?,
            _ => index += 1,
        }
    }

    Ok(edits.finish())
}

/// Scans a string from the byte after its opening quote to its closing quote, recording edits
/// for the escapes that `jsonb` rejects. Returns the index after the closing quote.
fn scan_string(bytes: &[u8], mut index: usize, edits: &mut Edits<'_>) -> usize {
    while index < bytes.len() {
        match bytes[index] {
            b'"' => return index + 1,
            b'\\' if bytes.get(index + 1) == Some(&b'u') => {
                index = scan_unicode_escape(bytes, index, edits);
            }
            // Any other escape is two bytes; skipping both keeps `\"` and `\\` from being read
            // as a quote or as the start of an escape.
            b'\\' => index += 2,
            _ => index += 1,
        }
    }
    index
}

/// Handles the `\uXXXX` escape at `start`. Returns the index after the escape (after both halves
/// of a surrogate pair).
fn scan_unicode_escape(bytes: &[u8], start: usize, edits: &mut Edits<'_>) -> usize {
    let Some(code) = hex4(bytes, start + 2) else {
        // Not valid JSON; PostgreSQL reports it and the row is dropped on its own.
        return start + 2;
    };
    let end = start + 6;

    match code {
        0 => {
            edits.replace(start, end, "");
            end
        }
        0xD800..=0xDBFF => {
            let low = (bytes.get(end) == Some(&b'\\') && bytes.get(end + 1) == Some(&b'u'))
                .then(|| hex4(bytes, end + 2))
                .flatten();
            match low {
                Some(0xDC00..=0xDFFF) => end + 6,
                _ => {
                    edits.replace(start, end, "\\uFFFD");
                    end
                }
            }
        }
        0xDC00..=0xDFFF => {
            edits.replace(start, end, "\\uFFFD");
            end
        }
        _ => end,
    }
}

/// Reads four hex digits at `index`.
fn hex4(bytes: &[u8], index: usize) -> Option<u32> {
    let digits = bytes.get(index..index + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(text, 16).ok()
}

/// Checks the number literal at `start` against the range of `numeric`. Returns the index after
/// the literal.
fn check_number(json: &str, start: usize) -> Result<usize, String> {
    let bytes = json.as_bytes();
    let mut end = start;
    while end < bytes.len() && matches!(bytes[end], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
    {
        end += 1;
    }
    let literal = &json[start..end];

    let exponent = literal
        .find(['e', 'E'])
        .map(|at| literal[at + 1..].trim_start_matches(['+', '-']))
        .map(|digits| digits.parse::<u32>().unwrap_or(u32::MAX))
        .unwrap_or(0);
    if literal.len() > MAX_NUMBER_CHARS || exponent > MAX_EXPONENT {
        let prefix: String = literal.chars().take(24).collect();
        return Err(format!(
            "number {prefix}{} is out of the range stored as jsonb",
            if literal.len() > 24 { "…" } else { "" }
        ));
    }
    Ok(end)
}

/// Replacements in a text, copied into a new string on the first one.
struct Edits<'a> {
    source: &'a str,
    output: Option<String>,
    /// Bytes of `source` before this index are in `output`.
    copied: usize,
}

impl<'a> Edits<'a> {
    fn new(source: &'a str) -> Self {
        Self {
            source,
            output: None,
            copied: 0,
        }
    }

    /// Replaces `source[start..end]`. Calls come in increasing, non-overlapping order.
    fn replace(&mut self, start: usize, end: usize, replacement: &str) {
        let output = self
            .output
            .get_or_insert_with(|| String::with_capacity(self.source.len()));
        output.push_str(&self.source[self.copied..start]);
        output.push_str(replacement);
        self.copied = end;
    }

    fn finish(self) -> Cow<'a, str> {
        match self.output {
            Some(mut output) => {
                output.push_str(&self.source[self.copied..]);
                Cow::Owned(output)
            }
            None => Cow::Borrowed(self.source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(json: &str) -> String {
        storable_json(json).expect("accepted").into_owned()
    }

    #[test]
    fn clean_text_is_borrowed() {
        let json = r#"{"name":"caf\u00e9 😀","n":-1.5e3,"ok":true}"#;
        assert!(matches!(storable_json(json), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn nul_escape_stripped() {
        assert_eq!(stored(r#"{"a":"x\u0000y"}"#), r#"{"a":"xy"}"#);
        assert_eq!(stored(r#"{"a\u0000":"\u0000"}"#), r#"{"a":""}"#);
    }

    #[test]
    fn escaped_backslash_before_u_kept() {
        // `\\u0000` is a backslash followed by the text "u0000", which jsonb stores.
        let json = r#"{"a":"\\u0000","b":"\"\\"}"#;
        assert_eq!(stored(json), json);
    }

    #[test]
    fn lone_surrogates_replaced() {
        assert_eq!(stored(r#"["\ud800"]"#), r#"["\uFFFD"]"#);
        assert_eq!(stored(r#"["\udc00x"]"#), r#"["\uFFFDx"]"#);
        assert_eq!(stored(r#"["\ud800\u0041"]"#), r#"["\uFFFD\u0041"]"#);
        let pair = r#"["\ud83d\ude00"]"#;
        assert_eq!(stored(pair), pair);
    }

    #[test]
    fn numbers_out_of_range_rejected() {
        for json in [r#"{"a":1e1001}"#, r#"[1E-5000]"#, r#"[2e99999999999]"#] {
            let error = storable_json(json).expect_err(json);
            assert!(error.contains("out of the range"), "{error}");
        }
        let long = format!("[{}]", "9".repeat(1_001));
        assert!(storable_json(&long).is_err());
        assert!(storable_json(r#"[1e1000, -0.5E+10, 123456789]"#).is_ok());
    }

    #[test]
    fn digits_inside_strings_not_numbers() {
        let json = format!(r#"{{"a":"{}e99999"}}"#, "9".repeat(2_000));
        assert!(storable_json(&json).is_ok());
    }
}
