//! WebCrypto at the edge: digests and RS256 signatures without a crypto crate in the wasm.

use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsValue;
use wasm_bindgen_futures::JsFuture;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = digest)]
    fn subtle_digest(algorithm: &str, data: &Uint8Array) -> js_sys::Promise;
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = importKey)]
    fn subtle_import_key(
        format: &str,
        key: &Uint8Array,
        algorithm: &JsValue,
        extractable: bool,
        usages: &Array,
    ) -> js_sys::Promise;
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = sign)]
    fn subtle_sign(algorithm: &JsValue, key: &JsValue, data: &Uint8Array) -> js_sys::Promise;
}

fn js_error(what: &str, e: JsValue) -> String {
    format!(
        "{what}: {}",
        e.as_string().unwrap_or_else(|| format!("{e:?}"))
    )
}

/// `SHA-1` or `SHA-256` of `data`.
pub async fn digest(algorithm: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let out = JsFuture::from(subtle_digest(algorithm, &Uint8Array::from(data)))
        .await
        .map_err(|e| js_error("digest", e))?;
    Ok(Uint8Array::new(&out).to_vec())
}

/// RSASSA-PKCS1-v1_5 with SHA-256 (JWS `RS256`) over `data`, with a PKCS#8 DER private key.
pub async fn sign_rs256(pkcs8_der: &[u8], data: &[u8]) -> Result<Vec<u8>, String> {
    let algorithm = Object::new();
    let set = |k: &str, v: &JsValue| Reflect::set(&algorithm, &JsValue::from_str(k), v).map(|_| ());
    set("name", &JsValue::from_str("RSASSA-PKCS1-v1_5")).map_err(|e| js_error("algorithm", e))?;
    set("hash", &JsValue::from_str("SHA-256")).map_err(|e| js_error("algorithm", e))?;
    let usages = Array::of1(&JsValue::from_str("sign"));
    let key = JsFuture::from(subtle_import_key(
        "pkcs8",
        &Uint8Array::from(pkcs8_der),
        &algorithm,
        false,
        &usages,
    ))
    .await
    .map_err(|e| js_error("the private key is not an RSA PKCS#8 key", e))?;
    let signature = JsFuture::from(subtle_sign(&algorithm, &key, &Uint8Array::from(data)))
        .await
        .map_err(|e| js_error("sign", e))?;
    Ok(Uint8Array::new(&signature).to_vec())
}
