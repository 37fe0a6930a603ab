//! Reading a request body chunk by chunk, straight from its `ReadableStream`.
//!
//! Not `Request::clone` + `stream()`: a clone tees the body, and the branch nobody reads would
//! buffer the whole upload in memory. One reader, one chunk at a time.

use worker::js_sys::{Function, Object, Promise, Reflect, Uint8Array};
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::Request;

pub struct BodyReader {
    reader: Object,
    read: Function,
}

impl BodyReader {
    /// `None` when the request has no body.
    pub fn new(req: &Request) -> Option<BodyReader> {
        let reader = req.inner().body()?.get_reader();
        let read = Reflect::get(&reader, &JsValue::from_str("read"))
            .ok()?
            .dyn_into::<Function>()
            .ok()?;
        Some(BodyReader { reader, read })
    }

    /// The next chunk, or `None` at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        let promise: Promise = self
            .read
            .call0(&self.reader)
            .map_err(describe)?
            .dyn_into()
            .map_err(describe)?;
        let result = JsFuture::from(promise).await.map_err(describe)?;
        let done = Reflect::get(&result, &JsValue::from_str("done")).map_err(describe)?;
        if done.as_bool().unwrap_or(true) {
            return Ok(None);
        }
        let value = Reflect::get(&result, &JsValue::from_str("value")).map_err(describe)?;
        Ok(Some(Uint8Array::new(&value).to_vec()))
    }
}

fn describe(e: JsValue) -> String {
    e.as_string().unwrap_or_else(|| format!("{e:?}"))
}
