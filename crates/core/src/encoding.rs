//! Small encodings the gateway needs and that are not worth a dependency each: base64
//! (standard and URL-safe), `application/x-www-form-urlencoded`, and PEM.

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn encode_with(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
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
    out
}

/// Standard base64 with padding (RFC 4648 §4), as HTTP Basic and PEM use.
/// An HTTP field name (RFC 9110 `token`).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub fn base64(bytes: &[u8]) -> String {
    encode_with(bytes, STANDARD, true)
}

/// URL-safe base64 without padding (RFC 4648 §5), as JWTs use.
pub fn base64url(bytes: &[u8]) -> String {
    encode_with(bytes, URL_SAFE, false)
}

/// Decodes standard or URL-safe base64, padded or not, ignoring ASCII whitespace.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => continue,
            _ => return None,
        };
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
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A form body from name/value pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The name/value pairs of a query string (`a=1&b=x+y`), `+` and `%XX` decoded. A pair
/// that does not decode to UTF-8 is left out.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| crate::routing::percent_decode(&s.replace('+', " "));
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
}
