//! Small encodings the gateway needs: base64 (standard and URL-safe),
//! `application/x-www-form-urlencoded` and percent-encoding (the `form_urlencoded` and
//! `percent-encoding` crates), and PEM.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// What a URL path segment or query value keeps as it is: RFC 3986's unreserved characters.
pub const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Appends `value` to `out`, every byte but [`UNRESERVED`]'s percent-encoded (`%XX`, upper case).
pub fn push_percent_encoded(out: &mut String, value: &str) {
    out.extend(percent_encoding::utf8_percent_encode(value, UNRESERVED));
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn encode_with(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    push_encoded(&mut out, bytes, alphabet, pad);
    out
}

fn push_encoded(out: &mut String, bytes: &[u8], alphabet: &[u8; 64], pad: bool) {
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
}

/// Appends `bytes` in standard base64 with padding to `out` (no string of its own on the way).
pub fn push_base64(out: &mut String, bytes: &[u8]) {
    push_encoded(out, bytes, STANDARD, true);
}

/// The length of `n` bytes in padded base64.
pub fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Standard base64 with padding (RFC 4648 §4), as HTTP Basic and PEM use.
/// An HTTP field name (RFC 9110 `token`).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Byte tests on eight bytes at once (a `u64` read little-endian), for the scans that run over
/// every header value, URL and JSON string of a request. Each says whether *any* byte matches,
/// exactly (a borrow across bytes only starts at a byte that matches).
pub(crate) mod word {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;

    /// The words of `bytes`, and the bytes after the last whole word.
    pub fn split(bytes: &[u8]) -> (impl Iterator<Item = (u64, &[u8])>, &[u8]) {
        let words = bytes.chunks_exact(8);
        let rest = words.remainder();
        let words = words.map(|chunk| {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            (u64::from_le_bytes(w), chunk)
        });
        (words, rest)
    }

    /// A byte of 0x80 or more.
    pub fn any_high(x: u64) -> bool {
        x & HIGHS != 0
    }

    /// A byte below `n` among the bytes under 0x80 (`n` at most 0x80).
    pub fn any_below(x: u64, n: u8) -> bool {
        x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS != 0
    }

    /// A byte equal to `b`.
    pub fn any_equal(x: u64, b: u8) -> bool {
        let y = x ^ (ONES * u64::from(b));
        y.wrapping_sub(ONES) & !y & HIGHS != 0
    }
}

/// Whether every byte is in `lowest..0x7f` (printable ASCII from `lowest` on) or is `also`.
/// Eight bytes at a time ([`word`]); only a word holding another byte is looked at byte by byte.
pub fn bytes_within(bytes: &[u8], lowest: u8, also: u8) -> bool {
    let ok = |b: u8| (lowest..0x7f).contains(&b) || b == also;
    let (words, rest) = word::split(bytes);
    for (x, chunk) in words {
        let suspect = word::any_high(x) || word::any_below(x, lowest) || word::any_equal(x, 0x7f);
        if suspect && !chunk.iter().all(|&b| ok(b)) {
            return false;
        }
    }
    rest.iter().all(|&b| ok(b))
}

pub fn base64(bytes: &[u8]) -> String {
    encode_with(bytes, STANDARD, true)
}

/// URL-safe base64 without padding (RFC 4648 §5), as JWTs use.
pub fn base64url(bytes: &[u8]) -> String {
    encode_with(bytes, URL_SAFE, false)
}

/// Each byte's base64 value (both alphabets), or what to do with it: skip (`=`, ASCII
/// whitespace) or refuse.
const SKIP: u8 = 0xFE;
const BAD: u8 = 0xFF;
const DECODE: [u8; 256] = {
    let mut table = [BAD; 256];
    let mut i = 0;
    while i < 64 {
        table[STANDARD[i] as usize] = i as u8;
        table[URL_SAFE[i] as usize] = i as u8;
        i += 1;
    }
    let skipped = *b"= \t\n\x0c\r";
    let mut k = 0;
    while k < skipped.len() {
        table[skipped[k] as usize] = SKIP;
        k += 1;
    }
    table
};

/// Decodes standard or URL-safe base64, padded or not, ignoring ASCII whitespace.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text.as_bytes() {
        let v = DECODE[c as usize];
        if v >= SKIP {
            if v == BAD {
                return None;
            }
            continue;
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Percent-encodes a value for an `application/x-www-form-urlencoded` body.
pub fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A form body from name/value pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    // The crate passes a `%` without two hex digits after it through as it is: here it is an
    // error, checked first.
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode(bytes)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// The name/value pairs of a query string (`a=1&b=x+y`), `+` and `%XX` decoded. A pair
/// that does not decode to UTF-8 is left out.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| percent_decode(&s.replace('+', " "));
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

/// `text` escaped for XML 1.0, in an element's content or an attribute value: `&`, `<`, `>`,
/// `"`, `'` as entities and `\r` as `&#xD;` (a parser would turn a raw `\r\n` into `\n`, and
/// the text read back would differ). A character XML 1.0 cannot carry even escaped (control
/// characters but tab and line feed, U+FFFE, U+FFFF) is refused with its byte offset.
pub fn xml_escape(text: &str, out: &mut String) -> Result<(), (usize, char)> {
    for (at, ch) in text.char_indices() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#xD;"),
            '\t' | '\n' => out.push(ch),
            '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'.. => out.push(ch),
            _ => return Err((at, ch)),
        }
    }
    Ok(())
}

/// A JSON object, or `None` for anything else. The wasm reads JSON only as a `Value` and
/// matches it: a typed read (into a struct, a tuple, a `Map` or a `Vec`) links serde_json's
/// type-mismatch messages, and with them core's float formatting, into the upload
/// (docs/development.md, "The upload's size").
pub fn json_object(json: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(json).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// The text of the first `<name>…</name>` element in `xml` (Storage's answers: a receipt's
/// fields, an error's code, a key's fields, a list's marker), as it stands (entities not
/// decoded); `None` without one. A reader of known, flat answers, not an XML parser.
pub fn xml_element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = xml.match_indices('<').find_map(|(at, _)| {
        let rest = xml[at + 1..].strip_prefix(name)?;
        rest.starts_with('>').then_some(at + 1 + name.len() + 1)
    })?;
    let inner = &xml[open..];
    let close = inner.match_indices("</").find_map(|(at, _)| {
        let rest = inner[at + 2..].strip_prefix(name)?;
        rest.starts_with('>').then_some(at)
    })?;
    Some(&inner[..close])
}

/// A JSON object written member by member, byte for byte as `serde_json` writes the same
/// values (strings escaped as it escapes them, floats as it formats them), without a map or a
/// serializer on the way: the log line of every request is written with it. Names are the
/// caller's constants and are not escaped.
pub struct JsonObject(String);

impl JsonObject {
    pub fn with_capacity(capacity: usize) -> JsonObject {
        let mut out = String::with_capacity(capacity);
        out.push('{');
        JsonObject(out)
    }

    fn name(&mut self, name: &str) -> &mut String {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push('"');
        self.0.push_str(name);
        self.0.push_str("\":");
        &mut self.0
    }

    pub fn str(&mut self, name: &str, value: &str) -> &mut JsonObject {
        push_json_str(self.name(name), value);
        self
    }

    /// A string, or `null`.
    pub fn str_or_null(&mut self, name: &str, value: Option<&str>) -> &mut JsonObject {
        match value {
            Some(v) => self.str(name, v),
            None => {
                self.name(name).push_str("null");
                self
            }
        }
    }

    /// A string when there is one; nothing otherwise.
    pub fn opt_str(&mut self, name: &str, value: Option<&str>) -> &mut JsonObject {
        if let Some(v) = value {
            self.str(name, v);
        }
        self
    }

    pub fn uint(&mut self, name: &str, value: u64) -> &mut JsonObject {
        use std::fmt::Write;
        let _ = write!(self.name(name), "{value}");
        self
    }

    pub fn float(&mut self, name: &str, value: f64) -> &mut JsonObject {
        use std::fmt::Write;
        let out = self.name(name);
        // Whole numbers (milliseconds, seconds) as serde_json writes them (`12.0`) without its
        // float formatter; anything else through it.
        if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 && value != 0.0
            || value == 0.0 && value.is_sign_positive()
        {
            let _ = write!(out, "{}.0", value as i64);
        } else {
            out.push_str(&serde_json::to_string(&value).unwrap_or_else(|_| "null".into()));
        }
        self
    }

    /// Any JSON value, under a name that is escaped (it may come from data).
    pub fn json(&mut self, name: &str, value: &serde_json::Value) -> &mut JsonObject {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        push_json_str(&mut self.0, name);
        self.0.push(':');
        self.0
            .push_str(&serde_json::to_string(value).unwrap_or_else(|_| "null".into()));
        self
    }

    /// A JSON text another [`JsonObject`] wrote (a nested object).
    pub fn object(&mut self, name: &str, value: JsonObject) -> &mut JsonObject {
        let text = value.finish();
        self.name(name).push_str(&text);
        self
    }

    pub fn bool(&mut self, name: &str, value: bool) -> &mut JsonObject {
        self.name(name)
            .push_str(if value { "true" } else { "false" });
        self
    }

    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// Whether a JSON string of these bytes escapes any: a control character, `"` or `\\` (eight
/// bytes at a time, [`word`]).
fn needs_json_escape(bytes: &[u8]) -> bool {
    let (mut words, rest) = word::split(bytes);
    words.any(|(x, _)| {
        word::any_below(x, 0x20) || word::any_equal(x, b'"') || word::any_equal(x, b'\\')
    }) || rest.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `value` as a JSON string, escaped as `serde_json` escapes it: `"`, `\\`, and control
/// characters (`\b \f \n \r \t` short, the others as `\u00xx`); everything else as it is.
pub fn push_json_str(out: &mut String, value: &str) {
    out.push('"');
    push_json_str_inner(out, value);
    out.push('"');
}

/// `value` escaped as the inside of a JSON string (without the quotes), as [`push_json_str`].
pub fn push_json_str_inner(out: &mut String, value: &str) {
    use std::fmt::Write;
    if !needs_json_escape(value.as_bytes()) {
        // Most values (ids, paths, routes, host names): copied as they are.
        out.push_str(value);
        return;
    }
    let bytes = value.as_bytes();
    let mut start = 0;
    loop {
        let i = next_json_escape(bytes, start);
        // `bytes[i]` is ASCII: `i` is on a character boundary.
        out.push_str(&value[start..i]);
        let Some(&b) = bytes.get(i) else {
            return;
        };
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            _ => "",
        };
        if short.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
}

/// The index of the first byte at or after `from` that JSON escapes, or `bytes.len()`: eight
/// bytes at a time ([`word`]) past those that need none (a large body with a few quotes is
/// copied in runs, not looked at byte by byte).
fn next_json_escape(bytes: &[u8], mut from: usize) -> usize {
    let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    while let Some(chunk) = bytes.get(from..from + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let x = u64::from_le_bytes(w);
        if word::any_below(x, 0x20) || word::any_equal(x, b'"') || word::any_equal(x, b'\\') {
            if let Some(at) = chunk.iter().position(|&b| escaped(b)) {
                return from + at;
            }
        }
        from += 8;
    }
    bytes[from.min(bytes.len())..]
        .iter()
        .position(|&b| escaped(b))
        .map_or(bytes.len(), |at| from + at)
}

/// The DER bytes of the first PEM block with this label (`PRIVATE KEY`, `CERTIFICATE`).
pub fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let len = pem[start..].find(&end)?;
    base64_decode(&pem[start..start + len]).filter(|der| !der.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_elements_are_found_by_their_exact_name() {
        let xml = "<R><Queues><Queue><Name>a&amp;b</Name></Queue></Queues><NextMarker/><Code>X</Code><Code>Y</Code></R>";
        assert_eq!(xml_element(xml, "Name"), Some("a&amp;b"));
        assert_eq!(
            xml_element(xml, "Queue"),
            Some("<Name>a&amp;b</Name>"),
            "not <Queues>"
        );
        assert_eq!(
            xml_element(xml, "Queues"),
            Some("<Queue><Name>a&amp;b</Name></Queue>")
        );
        assert_eq!(xml_element(xml, "Code"), Some("X"), "the first");
        assert_eq!(
            xml_element(xml, "NextMarker"),
            None,
            "an empty element has no text element"
        );
        assert_eq!(xml_element(xml, "Nam"), None);
        assert_eq!(xml_element("<A>open", "A"), None);
        assert_eq!(xml_element("<A></A>", "A"), Some(""));
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, std, url) in [
            ("", "", ""),
            ("f", "Zg==", "Zg"),
            ("fo", "Zm8=", "Zm8"),
            ("foo", "Zm9v", "Zm9v"),
            ("foob", "Zm9vYg==", "Zm9vYg"),
            ("fooba", "Zm9vYmE=", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), std);
            assert_eq!(base64url(plain.as_bytes()), url);
            assert_eq!(base64_decode(std).unwrap(), plain.as_bytes());
            assert_eq!(base64_decode(url).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64_decode("-_8").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(base64_decode("a!b"), None);
    }

    #[test]
    fn form_encoding_escapes_everything_but_unreserved() {
        assert_eq!(
            form(&[
                ("scope", "https://storage.azure.com/.default"),
                ("secret", "a b+c~&=")
            ]),
            "scope=https%3A%2F%2Fstorage.azure.com%2F.default&secret=a+b%2Bc%7E%26%3D"
        );
    }

    #[test]
    fn query_strings_decode_plus_and_escapes() {
        assert_eq!(
            query_pairs("a=1&b=x+y%21&&flag&bad=%zz"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y!".into()),
                ("flag".into(), String::new())
            ]
        );
    }

    #[test]
    fn pem_blocks_are_found_by_label() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nZm9v\nYmFy\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_block(pem, "CERTIFICATE").unwrap(), b"foobar");
        assert_eq!(pem_block(pem, "PRIVATE KEY"), None);
    }

    #[test]
    fn bytes_within_agrees_with_a_byte_by_byte_check() {
        let naive = |bytes: &[u8], lowest: u8, also: u8| {
            bytes
                .iter()
                .all(|&b| (lowest..0x7f).contains(&b) || b == also)
        };
        // Every byte value at every place of every length around a word, in a run of letters.
        for len in 1..=19 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    for (lowest, also) in [(0x20, b'\t'), (0x21, 0x21)] {
                        assert_eq!(
                            bytes_within(&bytes, lowest, also),
                            naive(&bytes, lowest, also),
                            "{bytes:?} from {lowest:#x} or {also:#x}"
                        );
                    }
                }
            }
        }
        assert!(bytes_within(b"", 0x20, b'\t'));
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them_wherever_the_escape_falls() {
        for len in 0..=19 {
            for at in 0..len.max(1) {
                for b in [b'"', b'\\', b'\n', 0x01, 0x1f, b'a', 0x7f] {
                    let mut bytes = vec![b'x'; len];
                    if at < len {
                        bytes[at] = b;
                    }
                    let text = String::from_utf8(bytes).unwrap();
                    let mut ours = String::new();
                    push_json_str(&mut ours, &format!("{text}é\"{text}"));
                    let theirs = serde_json::to_string(&format!("{text}é\"{text}")).unwrap();
                    assert_eq!(ours, theirs, "{text:?}");
                }
            }
        }
    }

    #[test]
    fn needs_json_escape_finds_every_byte_json_escapes() {
        for len in 1..=19 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let expected = b < 0x20 || b == b'"' || b == b'\\';
                    assert_eq!(needs_json_escape(&bytes), expected, "{bytes:?}");
                }
            }
        }
    }
}
