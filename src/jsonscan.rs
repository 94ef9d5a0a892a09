//! A JSON object's top level split into its members, each value kept as its raw text.
//!
//! How the relay reads every request and response frame, and the bridge every frame: routing
//! needs a few small fields, while the body (up to 16 MiB of base64 in one string) is only
//! checked and passed on. `serde_json` checks a string 8 bytes per step; the scan here checks
//! it 64 bytes per step in a loop the compiler vectorises, about 3× faster on 16 MiB
//! (docs/PERFORMANCE.md, stop 17), and needs no parser state per member. Strings are scanned
//! here; any other value (an object of headers, a number, `true`) is small and handed to
//! `serde_json` to check and measure. What is accepted is exactly what `serde_json` accepts
//! when it decodes the whole object, its nesting limit included (`tests/fuzz.rs` compares the
//! two on mutated frames).

use std::borrow::Cow;

/// Calls `each(name, value)` for every member of the JSON object `text`, in order: `name`
/// decoded (borrowed unless written with escapes), `value` the member's raw JSON text, a slice
/// of `text`. Stops at the first error, from the scan or from `each`.
pub fn members<'a>(
    text: &'a str,
    mut each: impl FnMut(Cow<'a, str>, &'a str) -> Result<(), String>,
) -> Result<(), String> {
    let b = text.as_bytes();
    let mut at = skip_ws(b, 0);
    if b.get(at) != Some(&b'{') {
        return Err(expected("a JSON object", b, at));
    }
    at = skip_ws(b, at + 1);
    if b.get(at) == Some(&b'}') {
        return nothing_after(b, at + 1);
    }
    loop {
        if b.get(at) != Some(&b'"') {
            return Err(expected("a field name", b, at));
        }
        let (name_end, escaped) = string_end(b, at)?;
        let name = if escaped {
            let decoded = serde_json::from_str::<String>(&text[at..name_end])
                .map_err(|e| format!("field name: {}", located(&e, text, at)))?;
            Cow::Owned(decoded)
        } else {
            Cow::Borrowed(&text[at + 1..name_end - 1])
        };
        at = skip_ws(b, name_end);
        if b.get(at) != Some(&b':') {
            return Err(expected("`:`", b, at));
        }
        at = skip_ws(b, at + 1);
        let value_end = match b.get(at) {
            Some(b'"') => string_end(b, at)?.0,
            Some(_) => other_value_end(text, at, &name)?,
            None => return Err(END.into()),
        };
        each(name, &text[at..value_end])?;
        at = skip_ws(b, value_end);
        match b.get(at) {
            Some(b',') => at = skip_ws(b, at + 1),
            Some(b'}') => return nothing_after(b, at + 1),
            _ => return Err(expected("`,` or `}`", b, at)),
        }
    }
}

/// The message for text that ends inside the object.
const END: &str = "the frame ends inside its JSON object";

/// "expected …", naming where; or [`END`] when the text ended there.
fn expected(what: &str, b: &[u8], at: usize) -> String {
    if at >= b.len() { END.to_owned() } else { format!("expected {what} at byte {at}") }
}

/// Index of the first byte at or after `at` that is not JSON whitespace.
fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while matches!(b.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Only whitespace may follow the object.
fn nothing_after(b: &[u8], at: usize) -> Result<(), String> {
    let at = skip_ws(b, at);
    if at == b.len() { Ok(()) } else { Err(format!("trailing characters at byte {at}")) }
}

/// The end (just past the closing quote) of the string opening at `open`, and whether it holds
/// escapes. Each escape is checked as `serde_json` checks it when it decodes a string: one of
/// `"\/bfnrt`, or `u` and four hex digits, a UTF-16 surrogate only as a high one followed by
/// an escaped low one; a control character (below U+0020) is refused.
fn string_end(b: &[u8], open: usize) -> Result<(usize, bool), String> {
    let mut at = open + 1;
    let mut escaped = false;
    loop {
        at = string_stop(b, at).ok_or(END)?;
        match b[at] {
            b'"' => return Ok((at + 1, escaped)),
            b'\\' => {
                escaped = true;
                at += match b.get(at + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 2,
                    Some(b'u') => unicode_escape_len(b, at)?,
                    Some(_) => return Err(format!("invalid escape at byte {at}")),
                    None => return Err(END.into()),
                };
            }
            _ => return Err(format!("control character in a string at byte {at}")),
        }
    }
}

/// The length of the `\u` escape at `at`: 6 bytes, or 12 for a surrogate pair.
fn unicode_escape_len(b: &[u8], at: usize) -> Result<usize, String> {
    let unit = |at: usize| -> Result<u16, String> {
        let hex = b.get(at + 2..at + 6).ok_or(END)?;
        let text =
            std::str::from_utf8(hex).ok().filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
        text.and_then(|h| u16::from_str_radix(h, 16).ok())
            .ok_or_else(|| format!("invalid escape at byte {at}"))
    };
    let lone = || format!("unpaired UTF-16 surrogate escape at byte {at}");
    match unit(at)? {
        0xDC00..=0xDFFF => Err(lone()),
        0xD800..=0xDBFF => {
            if b.get(at + 6..at + 8).ok_or(END)? != b"\\u" {
                return Err(lone());
            }
            match unit(at + 6)? {
                0xDC00..=0xDFFF => Ok(12),
                _ => Err(lone()),
            }
        }
        _ => Ok(6),
    }
}

/// Index of the first `"`, `\` or control character at or after `at`. Whole 64-byte blocks are
/// tested with a branch-free fold (vectorised) and only the block that holds a stop is
/// searched byte by byte.
fn string_stop(b: &[u8], mut at: usize) -> Option<usize> {
    const BLOCK: usize = 64;
    let stops = |c: u8| c == b'"' || c == b'\\' || c < 0x20;
    while let Some(block) = b.get(at..at + BLOCK) {
        if block.iter().fold(false, |seen, &c| seen | (c == b'"') | (c == b'\\') | (c < 0x20)) {
            break;
        }
        at += BLOCK;
    }
    b.get(at..)?.iter().position(|&c| stops(c)).map(|i| at + i)
}

/// The end of the non-string value starting at `at` (an object, an array, a number or a
/// literal), read by `serde_json` as a decoder reads it: numbers in range, strings with paired
/// surrogates, at most [`MAX_NESTING`] arrays and objects deep. So a frame that one of our
/// parsers decodes whole and another only scans is accepted by both or by neither.
fn other_value_end(text: &str, at: usize, name: &str) -> Result<usize, String> {
    let mut values = serde_json::Deserializer::from_str(&text[at..]).into_iter::<Checked>();
    match values.next() {
        Some(Ok(Checked)) => Ok(at + values.byte_offset()),
        Some(Err(e)) => Err(format!("field {}: {}", shown_name(name), located(&e, text, at))),
        None => Err(END.into()),
    }
}

/// How many arrays and objects deep a member's value may go: `serde_json` refuses a document
/// nested 128 deep, and the frame's own object is one of those.
pub const MAX_NESTING: usize = 126;

/// `e`, from reading the value at `at` of `text`, with its position given as a byte of `text`
/// (`serde_json` counts lines and columns from the start of the value).
fn located(e: &serde_json::Error, text: &str, at: usize) -> String {
    let message = e.to_string();
    let message = match message.rsplit_once(" at line ") {
        Some((m, _)) => m.to_owned(),
        None => return message,
    };
    let value = &text[at..];
    let line_start = match e.line() {
        0 | 1 => Some(0),
        n => value.match_indices('\n').nth(n - 2).map(|(i, _)| i + 1),
    };
    match line_start {
        Some(start) => format!("{message} at byte {}", at + start + e.column().saturating_sub(1)),
        None => message,
    }
}

/// A field name as error messages show it: in backticks, cut to 64 bytes (a name can be as
/// long as the frame, and the message goes back to the sender).
pub fn shown_name(name: &str) -> String {
    const SHOWN: usize = 64;
    if name.len() <= SHOWN {
        return format!("`{name}`");
    }
    let cut = (0..=SHOWN).rev().find(|&i| name.is_char_boundary(i)).unwrap_or(0);
    format!("`{}…` ({} bytes)", &name[..cut], name.len())
}

/// Any JSON value, checked and thrown away. Unlike [`serde::de::IgnoredAny`], which `serde_json`
/// skips without decoding, it asks for every value as it is (`deserialize_any`): strings are
/// decoded (borrowed when they have no escapes), numbers parsed, and the nesting counted.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(CheckedVisitor { open: 0 })
    }
}

/// A value inside `open` arrays and objects, checked as [`Checked`] is.
#[derive(Clone, Copy)]
struct CheckedVisitor {
    open: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for CheckedVisitor {
    type Value = Checked;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(self)
    }
}

impl CheckedVisitor {
    /// The visitor for the values of an array or object opened inside this one.
    fn inner<E: serde::de::Error>(self) -> Result<CheckedVisitor, E> {
        let open = self.open + 1;
        if open > MAX_NESTING {
            return Err(E::custom(format!("nested more than {MAX_NESTING} deep")));
        }
        Ok(CheckedVisitor { open })
    }
}

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        let inner = self.inner()?;
        while map.next_entry_seed(inner, inner)?.is_some() {}
        Ok(Checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> Result<Vec<(String, &str)>, String> {
        let mut out = Vec::new();
        members(text, |n, v| {
            out.push((n.into_owned(), v));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn members_keep_their_raw_text_and_order() {
        let text =
            " {\"type\" : \"request\",\"n\":-1.5e3,\"h\":{\"a\":[1,{}]},\"b\":true,\"z\":null } \n";
        let got = scan(text).unwrap();
        let want = [
            ("type", "\"request\""),
            ("n", "-1.5e3"),
            ("h", "{\"a\":[1,{}]}"),
            ("b", "true"),
            ("z", "null"),
        ];
        assert_eq!(got.len(), want.len());
        for ((n, v), (wn, wv)) in got.iter().zip(want) {
            assert_eq!((n.as_str(), *v), (wn, wv));
        }
        assert!(scan("{}").unwrap().is_empty());
        assert!(scan(" { } ").unwrap().is_empty());
    }

    #[test]
    fn escaped_names_are_decoded_and_escapes_in_values_kept() {
        let got = scan(r#"{"\u0069d":"a\"b\\c\/\n\u00e9\ud83d\ude00","x\ty":1}"#).unwrap();
        assert_eq!(got[0], ("id".to_owned(), r#""a\"b\\c\/\n\u00e9\ud83d\ude00""#));
        assert_eq!(got[1], ("x\ty".to_owned(), "1"));
    }

    #[test]
    fn long_strings_stop_at_the_right_byte_in_every_block_position() {
        // A quote, a backslash or a control character at each offset of a 64-byte block,
        // and at each distance from the end of the text.
        for len in 0..200 {
            let body = "A".repeat(len);
            let text = format!("{{\"body\":\"{body}\"}}");
            assert_eq!(scan(&text).unwrap()[0].1.len(), len + 2, "{len}");
            let escaped = format!("{{\"body\":\"{body}\\\"{body}\"}}");
            assert_eq!(scan(&escaped).unwrap()[0].1.len(), 2 * len + 4, "{len}");
            let control = format!("{{\"body\":\"{body}\u{1f}{body}\"}}");
            assert!(scan(&control).unwrap_err().contains("control character"), "{len}");
            let open = format!("{{\"body\":\"{body}");
            assert_eq!(scan(&open).unwrap_err(), END, "{len}");
        }
    }

    #[test]
    fn malformed_objects_are_refused_with_the_cause() {
        let cases = [
            ("", END),
            ("[]", "expected a JSON object at byte 0"),
            ("{", END),
            ("{,}", "expected a field name at byte 1"),
            (r#"{"a":1,}"#, "expected a field name at byte 7"),
            (r#"{"a" 1}"#, "expected `:` at byte 5"),
            (r#"{"a":}"#, "field `a`: expected value at byte 5"),
            (r#"{"a":1 "b":2}"#, "expected `,` or `}` at byte 7"),
            (r#"{"a":1}x"#, "trailing characters at byte 7"),
            (r#"{"a":"\x"}"#, "invalid escape at byte 6"),
            (r#"{"a":"\u12g4"}"#, "invalid escape at byte 6"),
            (r#"{"a":"\u12"#, END),
            (r#"{"a":tru}"#, "field `a`: expected ident at byte 8"),
            (r#"{"a":1.}"#, "field `a`: invalid number at byte 7"),
            ("{\"a\":{\n\"b\":\n tru}}", "field `a`: expected ident at byte 16"),
            (r#"{"\ud800":1}"#, "unpaired UTF-16 surrogate escape at byte 2"),
            (r#"{"a":"\udc00"}"#, "unpaired UTF-16 surrogate escape at byte 6"),
            (r#"{"a":"\ud800\n"}"#, "unpaired UTF-16 surrogate escape at byte 6"),
            (r#"{"a":"\ud800\ud800"}"#, "unpaired UTF-16 surrogate escape at byte 6"),
            (r#"{"a":"\ud800"#, END),
            (r#"{"a":1e999}"#, "field `a`: number out of range at byte 9"),
            (r#"{"a":{"b":"\ud800"}}"#, "field `a`: unexpected end of hex escape at byte 17"),
            (r#"{"a":[1e999]}"#, "field `a`: number out of range at byte 10"),
        ];
        for (text, want) in cases {
            let err = scan(text).unwrap_err();
            assert!(err.starts_with(want), "{text}: {err}");
        }
    }

    #[test]
    fn nesting_is_limited_as_serde_json_limits_a_whole_object() {
        for depth in MAX_NESTING - 1..=MAX_NESTING + 2 {
            for (open, close) in [("[", "]"), ("{\"k\":", "}")] {
                let text = format!("{{\"a\":{}1{}}}", open.repeat(depth), close.repeat(depth));
                let whole = serde_json::from_str::<serde_json::Value>(&text);
                assert_eq!(scan(&text).is_ok(), whole.is_ok(), "{depth} {open}");
                assert_eq!(whole.is_ok(), depth <= MAX_NESTING, "{depth} {open}");
            }
        }
        let deep = format!("{{\"a\":{}", "[".repeat(MAX_NESTING + 1));
        assert!(scan(&deep).unwrap_err().contains("nested more than 126 deep"));
    }

    #[test]
    fn long_names_are_cut_in_messages() {
        let name = "é".repeat(100);
        let err = scan(&format!("{{\"{name}\":tru}}")).unwrap_err();
        assert!(err.starts_with(&format!("field `{}…` (200 bytes): ", "é".repeat(32))), "{err}");
        assert!(err.len() < 150, "{err}");
    }

    #[test]
    fn an_error_from_the_caller_stops_the_scan() {
        let mut seen = 0;
        let err = members(r#"{"a":1,"b":2,"c":3}"#, |n, _| {
            seen += 1;
            if n == "b" { Err("no b".into()) } else { Ok(()) }
        });
        assert_eq!((err, seen), (Err("no b".to_owned()), 2));
    }
}
