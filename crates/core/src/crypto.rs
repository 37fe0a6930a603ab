//! The gateway's cryptography, all of it from audited RustCrypto crates: SHA-256 (`sha2`),
//! HMAC-SHA256 (`hmac`), comparisons in constant time (`subtle`), key derivation (`hkdf`) and
//! the AEAD that seals handles (`chacha20poly1305`). Nothing here is a primitive of its own:
//! this module only fixes how the gateway uses them, so that every caller of a handle or a MAC
//! goes through one construction.
//!
//! Why RustCrypto and not WebCrypto: every use is on a synchronous path of the driver (an API
//! key compared before any I/O, a handle sealed while an answer is built), and WebCrypto's
//! digests, MACs and ciphers are all asynchronous: each would cost a crossing into JavaScript
//! and an await where none is needed. JWT signatures (RSA, ECDSA) stay with WebCrypto: they are
//! verified after a key set fetch, on a path that is asynchronous anyway.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 digest of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA256 of `data` under `key` (RFC 2104).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Whether `a` and `b` are equal, compared in time that does not depend on where they differ.
pub fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The version of the sealed-handle format: its first byte, part of the associated data, and
/// part of the key derivation's info. A new format takes a new number.
pub const HANDLE_VERSION: u8 = 2;

/// The bytes of a handle's random nonce (XChaCha20-Poly1305: 192 bits, safe to draw at random
/// for any number of handles under one key).
pub const NONCE_LEN: usize = 24;

/// A key that seals handles: derived with HKDF-SHA256 from an identity's credential (a client
/// secret, or a certificate's private key in PEM), with the format's label and version as
/// info. The same in every isolate, so a handle made in one opens in all; no configuration of
/// its own.
#[derive(Clone)]
pub struct HandleKey([u8; 32]);

impl HandleKey {
    pub fn derive(credential: &str) -> HandleKey {
        let mut key = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, credential.as_bytes())
            .expand(&handle_info(), &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        HandleKey(key)
    }
}

impl std::fmt::Debug for HandleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandleKey(…)")
    }
}

/// HKDF's info for handle keys: a label of this use and the format's version.
fn handle_info() -> Vec<u8> {
    format!("azure-edge-gateway handle v{HANDLE_VERSION}").into_bytes()
}

/// The associated data of a handle: the version and what it is bound to (`binding`: the kind of
/// handle and the route that issued it). A handle opened with another binding fails.
fn associated_data(binding: &str) -> Vec<u8> {
    let mut aad = vec![HANDLE_VERSION];
    aad.extend_from_slice(binding.as_bytes());
    aad
}

/// Seals `plain` into a handle bound to `binding`: `base64url(version ‖ nonce ‖ ciphertext ‖
/// tag)`, XChaCha20-Poly1305 under `key` with `nonce` from the platform's CSPRNG. The holder
/// learns nothing of `plain` and cannot change it or move it to another binding.
pub fn seal(key: &HandleKey, binding: &str, plain: &[u8], nonce: &[u8; NONCE_LEN]) -> String {
    let sealed = XChaCha20Poly1305::new((&key.0).into())
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: plain,
                aad: &associated_data(binding),
            },
        )
        .expect("a handle is far below the AEAD's length limit");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    out.push(HANDLE_VERSION);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    crate::encoding::base64url(&out)
}

/// What a handle sealed by [`seal`] holds, when one of `keys` sealed it for `binding` in this
/// format and nothing in it was changed.
pub fn open(keys: &[HandleKey], binding: &str, handle: &str) -> Option<Vec<u8>> {
    let bytes = crate::encoding::base64_decode(handle)?;
    let (&version, rest) = bytes.split_first()?;
    if version != HANDLE_VERSION || rest.len() < NONCE_LEN + 16 {
        return None;
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let aad = associated_data(binding);
    keys.iter().find_map(|key| {
        XChaCha20Poly1305::new((&key.0).into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn digests_and_macs_match_the_standards_vectors() {
        // FIPS 180-2 "abc"; RFC 4231 test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert!(equal_in_constant_time(b"abc", b"abc"));
        assert!(!equal_in_constant_time(b"abc", b"abd"));
        assert!(!equal_in_constant_time(b"abc", b"ab"));
        assert!(!equal_in_constant_time(b"", b"a"));
    }

    #[test]
    fn handle_keys_are_hkdf_of_the_credential_with_the_versioned_label() {
        // RFC 5869's construction, checked independently: HKDF-Extract with no salt is
        // HMAC(zeros, ikm); HKDF-Expand's first block is HMAC(prk, info ‖ 0x01).
        let prk = hmac_sha256(&[0u8; 32], b"s3cret");
        let mut input = handle_info();
        input.push(1);
        assert_eq!(HandleKey::derive("s3cret").0, hmac_sha256(&prk, &input));
        assert_eq!(handle_info(), b"azure-edge-gateway handle v2");
        assert_ne!(
            HandleKey::derive("s3cret").0,
            HandleKey::derive("s3cret2").0
        );
    }

    #[test]
    fn sealed_handles_open_only_unchanged_with_their_key_and_binding() {
        let key = HandleKey::derive("s3cret");
        let nonce = [7u8; NONCE_LEN];
        let h = seal(&key, "operation\nrestart", b"hello world", &nonce);
        assert_eq!(
            open(std::slice::from_ref(&key), "operation\nrestart", &h).as_deref(),
            Some(&b"hello world"[..])
        );
        // Rotation: any of the configured keys opens it.
        let other = HandleKey::derive("other");
        assert!(open(&[other.clone(), key.clone()], "operation\nrestart", &h).is_some());
        assert_eq!(open(&[other], "operation\nrestart", &h), None);
        assert_eq!(
            open(std::slice::from_ref(&key), "operation\nstop", &h),
            None
        );
        let bytes = crate::encoding::base64_decode(&h).unwrap();
        for at in [0, 1, 30, bytes.len() - 1] {
            let mut changed = bytes.clone();
            changed[at] ^= 1;
            let changed = crate::encoding::base64url(&changed);
            assert_eq!(
                open(std::slice::from_ref(&key), "operation\nrestart", &changed),
                None
            );
        }
        assert_eq!(
            open(
                std::slice::from_ref(&key),
                "operation\nrestart",
                &h[..h.len() - 2]
            ),
            None
        );
        assert_eq!(open(&[key], "operation\nrestart", "not base64!"), None);
    }
}
