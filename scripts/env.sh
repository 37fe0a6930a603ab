# Sourced by every project script: where the pinned tools live and how wrangler is kept offline.
# It only sets variables; scripts/setup installs what they point at.
AEG_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Cargo-installed tools are shared by every checkout on the machine, keyed by version, so a
# fresh clone (CI) reuses them and a second setup is quick.
AEG_TOOLS="${AEG_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/azure-edge-gateway/tools}"
export AEG_ROOT AEG_TOOLS

# The versions every build uses. wasm-bindgen-cli must equal the wasm-bindgen in Cargo.lock.
WORKER_BUILD_VERSION=0.8.7
WASM_BINDGEN_VERSION="$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$AEG_ROOT/Cargo.lock")"
export WORKER_BUILD_VERSION WASM_BINDGEN_VERSION

# node_modules/.bin first: it holds Node 22 (the npm package `node`), which wrangler needs.
export PATH="$AEG_ROOT/node_modules/.bin:$AEG_TOOLS/worker-build-$WORKER_BUILD_VERSION/bin:$AEG_TOOLS/wasm-bindgen-$WASM_BINDGEN_VERSION/bin:$HOME/.cargo/bin:$PATH"
# worker-build would otherwise download these from a code-hosting site this machine cannot reach.
export WASM_BINDGEN_BIN="$AEG_TOOLS/wasm-bindgen-$WASM_BINDGEN_VERSION/bin/wasm-bindgen"
export WASM_OPT_BIN="$AEG_ROOT/node_modules/.bin/wasm-opt"
# wrangler: no telemetry, no error reports, no `cf` object fetch, no update check.
export WRANGLER_SEND_METRICS=false WRANGLER_SEND_ERROR_REPORTS=false CLOUDFLARE_CF_FETCH_ENABLED=false
export NO_UPDATE_NOTIFIER=1 WRANGLER_LOG_PATH="$AEG_ROOT/target/wrangler-logs"
