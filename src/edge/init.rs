//! What worker-build's entry module expects of the wasm, written here instead of linking the
//! `worker` crate for it: this mirrors worker 0.8.7's `src/init.rs`. Linked, `worker` also
//! exported classes the gateway never uses (ContainerStartupOptions, MinifyConfig, R2Range)
//! with their code and JavaScript glue.
//!
//! worker-build's shim (and scripts/lean-entry.mjs, which keeps its checks) reads
//! `__worker_init_state()` once: `criticalError` set means the next call first reinstantiates the
//! module (`__wbg_reset_state`) and bumps `instanceId`.

use wasm_bindgen::prelude::*;

#[wasm_bindgen(inline_js = "
export const state = globalThis.__worker_init_state = { criticalError: false, instanceId: 0 };
")]
extern "C" {
    type InitState;

    #[wasm_bindgen(thread_local_v2, js_name = state)]
    static INIT_STATE: InitState;

    #[cfg(not(panic = "unwind"))]
    #[wasm_bindgen(method, setter, js_name = criticalError)]
    fn set_critical_error(this: &InitState, val: bool);

    #[wasm_bindgen(method, getter, js_name = instanceId)]
    fn instance_id(this: &InitState) -> u32;

    #[wasm_bindgen(method, setter, js_name = instanceId)]
    fn set_instance_id(this: &InitState, val: u32);
}

/// Runs when the module is instantiated (again after a reinit): the one panic hook, a new
/// instance id, and a reinit after a hard abort (as worker's `init`).
#[wasm_bindgen(start, private)]
fn start() {
    std::panic::set_hook(Box::new(|info| {
        // The message and the JavaScript stack on the console (console_error_panic_hook) ...
        console_error_panic_hook::hook(info);
        // ... and, as worker's hook: with panic=abort the instance is lost, so the entry
        // module reinstantiates it before the next call.
        #[cfg(not(panic = "unwind"))]
        INIT_STATE.with(|s| s.set_critical_error(true));
    }));

    INIT_STATE.with(|s| s.set_instance_id(s.instance_id() + 1));

    wasm_bindgen::handler::set_on_abort(wasm_bindgen::handler::schedule_reinit);
}

/// The state object the entry module reads (worker's `__worker_init_state` export).
#[wasm_bindgen(js_name = "__worker_init_state")]
pub fn worker_init_state() -> JsValue {
    INIT_STATE.with(|s| s.into())
}
