//! Fuzz targets of the core's parsers, on the stable toolchain: proptest generates and mutates
//! inputs for a time budget and shrinks a failing one to a minimal input.
//!
//! Targets: `policy` (`policy::load`), `template` (`Template::parse` and `render`), `routing`
//! (`Router::find`), `jwt` (`inbound::jwt::parse` and the claims checks) and `service_bus_batch`
//! (`backend::service_bus::batch_body`). Each test:
//!
//! 1. replays its corpus, `tests/fuzz-corpus/<target>/*.json` (one input each, as JSON): seeds
//!    and every failure found before, so a regression fails on every run;
//! 2. runs generated inputs until `FUZZ_SECONDS` (default 4; 0 replays the corpus only) are
//!    spent, from a seed derived from `FUZZ_SEED` (default fixed) and the target's name, so a
//!    run is reproducible: the same seed generates the same inputs in the same order;
//! 3. prints `fuzz <target>: N executions in S s, 0 failures` to the real stderr, so the line
//!    shows with or without `--nocapture`.
//!
//! A failure (a panic, a broken property, or an input that runs longer than the watchdog's
//! minute) prints the minimal input, writes it to `tests/fuzz-corpus/<target>/failure-*.json`
//! for the next runs to replay, and fails the test. A longer run:
//!
//! ```sh
//! FUZZ_SECONDS=300 cargo test --release --test fuzz -- --nocapture --test-threads=1
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use azure_edge_gateway::backend::service_bus::{
    batch_body, Defaults, PropertyType, SENDER_PROPERTIES,
};
use azure_edge_gateway::encoding::{base64_decode, base64url, pem_block};
use azure_edge_gateway::inbound::jwt;
use azure_edge_gateway::policy::prepared::PreparedMessage;
use azure_edge_gateway::policy::{self, Backend, JwtAlgorithm, JwtCheck, MessageMapping, Route};
use azure_edge_gateway::routing::{PathTemplate, RouteMatch, Router, Segment};
use azure_edge_gateway::template::{Part, RenderContext, Template, Var};

// =============================================================================================
// The driver

const DEFAULT_SECONDS: f64 = 4.0;
const DEFAULT_SEED: u64 = 0x00C0_FFEE;
/// One input running longer than this is a hang: it is saved and the process aborts.
const HANG: Duration = Duration::from_secs(60);
/// Generated inputs per `TestRunner::run` call; the budget is checked between calls.
const BATCH: u32 = 32;

fn budget() -> Duration {
    match std::env::var("FUZZ_SECONDS") {
        Ok(s) => {
            let secs: f64 = s
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .unwrap_or_else(|| panic!("FUZZ_SECONDS must be a number of seconds, got {s:?}"));
            Duration::from_secs_f64(secs)
        }
        Err(_) => Duration::from_secs_f64(DEFAULT_SECONDS),
    }
}

fn seed() -> u64 {
    match std::env::var("FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            };
            parsed.unwrap_or_else(|| panic!("FUZZ_SEED must be a u64 (decimal or 0x…), got {s:?}"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// 32 bytes for ChaCha from the run's seed and the target's name (splitmix64).
fn rng_seed(seed: u64, target: &str) -> [u8; 32] {
    let mut state = seed ^ fnv1a(target.as_bytes());
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// Writes to the process's stderr, past libtest's capture of `print!`/`eprint!`.
fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

fn corpus<T: DeserializeOwned>(target: &str) -> Vec<(PathBuf, T)> {
    let Ok(dir) = std::fs::read_dir(corpus_dir(target)) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = dir
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let input = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not an input of this target: {e}", path.display()));
            (path, input)
        })
        .collect()
}

fn save<T: Serialize>(target: &str, input: &T) -> PathBuf {
    let text = serde_json::to_string_pretty(input).expect("inputs serialise");
    let dir = corpus_dir(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("failure-{:016x}.json", fnv1a(text.as_bytes())));
    if let Err(e) = std::fs::write(&path, text + "\n") {
        say(&format!(
            "fuzz {target}: could not save {}: {e}",
            path.display()
        ));
    }
    path
}

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics inside a property are recorded (message and file:line) instead of printed; others
/// go to the previous hook as usual.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) {
                let payload = info.payload();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a non-string panic)".to_owned());
                let at = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_else(|| "(unknown location)".to_owned());
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("panicked at {at}: {message}")));
            } else {
                previous(info);
            }
        }));
    });
}

fn run_property<T>(property: &impl Fn(&T) -> Result<(), String>, input: &T) -> Result<(), String> {
    CATCHING.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| property(input)));
    CATCHING.with(|c| c.set(false));
    match result {
        Ok(r) => r,
        Err(_) => Err(LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "panicked".to_owned())),
    }
}

/// Aborts the process on an input that runs longer than [`HANG`], after saving it.
struct Watchdog<T> {
    current: Arc<Mutex<Option<(Instant, T)>>>,
    done: Arc<AtomicBool>,
}

impl<T: Clone + Serialize + Send + 'static> Watchdog<T> {
    fn start(target: &'static str) -> Watchdog<T> {
        let current: Arc<Mutex<Option<(Instant, T)>>> = Arc::new(Mutex::new(None));
        let done = Arc::new(AtomicBool::new(false));
        let (c, d) = (current.clone(), done.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let guard = c.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((since, input)) = guard.as_ref() {
                    if since.elapsed() > HANG {
                        let path = save(target, input);
                        say(&format!(
                            "fuzz {target}: an input ran for more than {} s (a hang); saved to {}",
                            HANG.as_secs(),
                            path.display()
                        ));
                        std::process::abort();
                    }
                }
            }
        });
        Watchdog { current, done }
    }

    fn enter(&self, input: &T) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), input.clone()));
    }

    fn leave(&self) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl<T> Drop for Watchdog<T> {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Replays the target's corpus, then runs generated inputs for the time budget.
fn fuzz<T, S>(target: &'static str, strategy: S, property: impl Fn(&T) -> Result<(), String>)
where
    T: Debug + Clone + Serialize + DeserializeOwned + Send + 'static,
    S: Strategy<Value = T>,
{
    install_panic_hook();
    let started = Instant::now();
    let budget = budget();
    let seed = seed();

    let mut failures = Vec::new();
    let replay = corpus::<T>(target);
    for (path, input) in &replay {
        if let Err(e) = run_property(&property, input) {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    if !failures.is_empty() {
        let msg = format!(
            "fuzz {target}: {} of {} corpus inputs fail:\n  {}",
            failures.len(),
            replay.len(),
            failures.join("\n  ")
        );
        say(&msg);
        panic!("{msg}");
    }

    let config = Config {
        cases: BATCH,
        failure_persistence: None,
        // Shrinking stops after this long (ms) with the smallest failing input so far.
        max_shrink_time: 120_000,
        max_shrink_iters: 100_000,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &rng_seed(seed, target));
    // A runner counts its cases for good, so each batch gets a new one, seeded from this one.
    let mut seeds = TestRunner::new_with_rng(config.clone(), rng);
    let executions = AtomicU64::new(0);
    let slowest_us = AtomicU64::new(0);
    let watchdog = Watchdog::<T>::start(target);
    while started.elapsed() < budget {
        let mut runner = TestRunner::new_with_rng(config.clone(), seeds.new_rng());
        let result = runner.run(&strategy, |input| {
            executions.fetch_add(1, Ordering::Relaxed);
            watchdog.enter(&input);
            let t = Instant::now();
            let r = run_property(&property, &input);
            slowest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            watchdog.leave();
            r.map_err(TestCaseError::fail)
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(reason, minimal)) => {
                let path = save(target, &minimal);
                let msg = format!(
                    "fuzz {target}: FAILED after {} executions (seed {seed:#x}): {reason}\n\
                     minimal input: {minimal:?}\nsaved to {} (replayed first from now on)",
                    executions.load(Ordering::Relaxed),
                    path.display()
                );
                say(&msg);
                panic!("{msg}");
            }
            Err(TestError::Abort(reason)) => panic!("fuzz {target}: aborted: {reason}"),
        }
    }
    drop(watchdog);
    let n = executions.load(Ordering::Relaxed) + replay.len() as u64;
    say(&format!(
        "fuzz {target}: {n} executions in {:.1} s, 0 failures ({} corpus inputs replayed, seed {seed:#x}, slowest input {:.1} ms)",
        started.elapsed().as_secs_f64(),
        replay.len(),
        slowest_us.load(Ordering::Relaxed) as f64 / 1000.0,
    ));
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// =============================================================================================
// Inputs shared by the targets

/// The policies the project ships or tests with: `(file, text)`.
fn shipped() -> &'static [(String, String)] {
    static SHIPPED: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SHIPPED.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> = ["policy.json", "dev/policy.json", "bench/policy.json"]
            .map(String::from)
            .to_vec();
        let mut fixtures: Vec<String> = std::fs::read_dir(root.join("tests/e2e/fixtures"))
            .expect("tests/e2e/fixtures")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .map(|n| format!("tests/e2e/fixtures/{n}"))
            .collect();
        fixtures.sort();
        files.extend(fixtures);
        files
            .into_iter()
            .map(|f| {
                let text =
                    std::fs::read_to_string(root.join(&f)).unwrap_or_else(|e| panic!("{f}: {e}"));
                (f, text)
            })
            .collect()
    })
}

/// The shipped policies that load, with their routes.
fn valid_policies() -> &'static [(String, policy::Policy)] {
    static VALID: OnceLock<Vec<(String, policy::Policy)>> = OnceLock::new();
    VALID.get_or_init(|| {
        shipped()
            .iter()
            .filter_map(|(f, text)| policy::load(text).ok().map(|p| (f.clone(), p)))
            .collect()
    })
}

/// Strings that have broken parsers before: empty, whitespace, control characters, combining
/// and bidirectional marks, astral characters, escapes and braces, lengths around limits.
fn odd_strings() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "\u{0}",
        "\t\r\n",
        "\u{7f}",
        "\u{1b}[31m",
        "é",
        "e\u{301}",
        "\u{202e}evil",
        "\u{feff}",
        "😀",
        "\u{10ffff}",
        "İ",
        "ß",
        "\\",
        "\"",
        "'",
        "{",
        "}",
        "{{",
        "}}",
        "{path.x}",
        "{header.x}",
        "{uuid}",
        "%",
        "%2F",
        "%00",
        "%zz",
        "/",
        "//",
        "..",
        ".",
        "*",
        "-1",
        "1e999",
        "null",
        "true",
        "https://",
        "http://127.0.0.1:10000",
        "https://127.0.0.1:10000",
        "https://x.servicebus.windows.net",
        "https://[::1]:8080",
        "https://a@b",
        "https://a/b?c",
        "00000000-0000-0000-0000-000000000000",
        "common",
        "contoso.onmicrosoft.com",
        "ORDERS_API_KEY",
        "1ORDERS",
        "x-api-key",
        "X-Api-Key",
        "content-type",
        "application/json",
        "203.0.113.0/24",
        "2001:db8::/32",
        "::ffff:1.2.3.4",
        "300.1.1.1/8",
        "0.0.0.0/0",
        "1.2.3.4/33",
        "RS256",
        "HS256",
        "none",
        "POST",
        "post",
        "OPTIONS",
        "entra_v2",
        "entra_v1",
        "url",
        "client_secret",
        "certificate",
        "basic",
        "public",
        "china",
        "us_government",
        "api_key",
        "jwt_subject",
        "client_ip",
        "service_bus",
        "blob",
        "$schema",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for n in [63, 64, 65, 128, 129, 257, 5000] {
        v.push("a".repeat(n));
    }
    v.push("é".repeat(129));
    v
}

fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(odd_strings()),
        2 => any::<String>(),
        2 => "[a-zA-Z0-9_.:/{}%@?#-]{0,24}",
    ]
}

// =============================================================================================
// 1. policy: policy::load
//
// Inputs: arbitrary text and bytes, JSON-alphabet soup, and mutations of the shipped policies.
// Properties: no panic; load ends (the watchdog); an Err holds errors, each with a path and a
// message; loading is deterministic, also from the re-serialised document; a policy that loads
// writes out to a text that loads to the same policy.

/// A JSON tree mutation; indices pick nodes in preorder, modulo their number.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    /// A second copy of an object member (a duplicate key in the text) or array element.
    Duplicate(usize),
    Replace(usize, Odd),
    Swap(usize, usize),
    Rename(usize, String),
    /// Wraps a value in this many arrays.
    Nest(usize, usize),
}

#[derive(Debug, Clone)]
enum Odd {
    Json(Value),
    /// JSON text written as it is: numbers serde_json would not write, deep nesting, escapes.
    Raw(String),
}

/// Marks strings and keys the writer treats specially (private use: no policy has it).
const MARK: char = '\u{F8FF}';

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn node_paths(v: &Value, at: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(at.clone());
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                at.push(Seg::Key(k.clone()));
                node_paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                at.push(Seg::Index(i));
                node_paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(v: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut node = v;
    for seg in path {
        node = match (seg, node) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

fn pick(v: &Value, i: usize, with_parent: bool) -> Option<Vec<Seg>> {
    let mut paths = Vec::new();
    node_paths(v, &mut Vec::new(), &mut paths);
    if with_parent {
        paths.remove(0);
    }
    if paths.is_empty() {
        return None;
    }
    let n = paths.len();
    Some(paths.swap_remove(i % n))
}

fn odd_json(odd: &Odd) -> Value {
    match odd {
        Odd::Json(v) => v.clone(),
        Odd::Raw(text) => Value::String(format!("{MARK}raw{MARK}{text}")),
    }
}

fn apply(v: &mut Value, m: &Mutation) {
    match m {
        Mutation::Delete(i) => {
            let Some(path) = pick(v, *i, true) else {
                return;
            };
            let (last, parent) = path.split_last().expect("not the root");
            match (last, node_mut(v, parent)) {
                (Seg::Key(k), Some(Value::Object(map))) => {
                    map.remove(k);
                }
                (Seg::Index(j), Some(Value::Array(a))) if *j < a.len() => {
                    a.remove(*j);
                }
                _ => {}
            }
        }
        Mutation::Duplicate(i) => {
            let Some(path) = pick(v, *i, true) else {
                return;
            };
            let (last, parent) = path.split_last().expect("not the root");
            match (last, node_mut(v, parent)) {
                (Seg::Key(k), Some(Value::Object(map))) => {
                    if let Some(value) = map.get(k).cloned() {
                        let n = map.len();
                        map.insert(format!("{MARK}dup{n}{MARK}{k}"), value);
                    }
                }
                (Seg::Index(j), Some(Value::Array(a))) if *j < a.len() => {
                    let value = a[*j].clone();
                    a.insert(*j, value);
                }
                _ => {}
            }
        }
        Mutation::Replace(i, odd) => {
            let Some(path) = pick(v, *i, false) else {
                return;
            };
            if let Some(node) = node_mut(v, &path) {
                *node = odd_json(odd);
            }
        }
        Mutation::Swap(a, b) => {
            let (Some(pa), Some(pb)) = (pick(v, *a, false), pick(v, *b, false)) else {
                return;
            };
            let (Some(va), Some(vb)) = (
                node_mut(v, &pa).map(|n| n.clone()),
                node_mut(v, &pb).map(|n| n.clone()),
            ) else {
                return;
            };
            if let Some(n) = node_mut(v, &pa) {
                *n = vb;
            }
            if let Some(n) = node_mut(v, &pb) {
                *n = va;
            }
        }
        Mutation::Rename(i, name) => {
            let Some(path) = pick(v, *i, true) else {
                return;
            };
            let (last, parent) = path.split_last().expect("not the root");
            if let (Seg::Key(k), Some(Value::Object(map))) = (last, node_mut(v, parent)) {
                if !map.contains_key(name) {
                    if let Some(value) = map.remove(k) {
                        map.insert(name.clone(), value);
                    }
                }
            }
        }
        Mutation::Nest(i, depth) => {
            let Some(path) = pick(v, *i, false) else {
                return;
            };
            if let Some(node) = node_mut(v, &path) {
                for _ in 0..*depth {
                    *node = Value::Array(vec![node.take()]);
                }
            }
        }
    }
}

/// JSON text of a mutated tree: marked keys are written without their mark (so a duplicated
/// key appears twice), marked strings as raw JSON text.
fn write_json(v: &Value, out: &mut String) {
    let unmark = |s: &str| -> Option<String> {
        let rest = s.strip_prefix(MARK)?;
        let (_, after) = rest.split_once(MARK)?;
        Some(after.to_owned())
    };
    match v {
        Value::String(s) if s.starts_with(MARK) && s[MARK.len_utf8()..].starts_with("raw") => {
            out.push_str(&unmark(s).unwrap_or_default())
        }
        Value::Object(map) => {
            out.push('{');
            for (n, (k, child)) in map.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                let key = unmark(k).unwrap_or_else(|| k.clone());
                out.push_str(&serde_json::to_string(&key).expect("a string"));
                out.push(':');
                write_json(child, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (n, child) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write_json(child, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// An edit of the text after writing: insert, delete or truncate at a char boundary.
#[derive(Debug, Clone)]
enum TextEdit {
    Insert(usize, String),
    Delete(usize, usize),
    Truncate(usize),
}

fn edit_text(text: &mut String, e: &TextEdit) {
    let boundary = |text: &str, i: usize| {
        let mut i = if text.is_empty() {
            0
        } else {
            i % (text.len() + 1)
        };
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    match e {
        TextEdit::Insert(i, s) => {
            let i = boundary(text, *i);
            text.insert_str(i, s);
        }
        TextEdit::Delete(i, n) => {
            let start = boundary(text, *i);
            let end = boundary(text, start + n);
            if end > start {
                text.replace_range(start..end, "");
            }
        }
        TextEdit::Truncate(i) => {
            let i = boundary(text, *i);
            text.truncate(i);
        }
    }
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        (
            any::<usize>(),
            prop_oneof![
                select(vec![
                    "}", "]", ",", ":", "\"", "\\", "0", " ", "\u{0}", "{", "[", "-", "\\u"
                ])
                .prop_map(String::from),
                odd_string()
            ]
        )
            .prop_map(|(i, s)| TextEdit::Insert(i, s)),
        (any::<usize>(), 1..8usize).prop_map(|(i, n)| TextEdit::Delete(i, n)),
        any::<usize>().prop_map(TextEdit::Truncate),
    ]
}

fn odd_value() -> impl Strategy<Value = Odd> {
    let numbers = vec![
        json!(0),
        json!(-1),
        json!(1),
        json!(1.5),
        json!(-0.0),
        json!(u32::MAX),
        json!(u64::from(u32::MAX) + 1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e300),
        json!(f64::MIN_POSITIVE),
        json!(600),
        json!(601),
        json!(10),
        json!(60),
        json!(0.1),
        json!(0.9),
    ];
    let raw = vec![
        "1e400",
        "-1e400",
        "123456789012345678901234567890",
        "-123456789012345678901234567890",
        "1E2",
        "1.0",
        "-0",
        "0.0000000000000000000000001",
        "\"\\ud800\"",
        "\"\\udc00\\ud800\"",
        "\"\\u0000\"",
        "\"\\u001f\\b\\f\"",
        "\"\\/\"",
        "[]",
        "{}",
        "[null]",
        "{\"\":null}",
    ];
    prop_oneof![
        2 => Just(Odd::Json(Value::Null)),
        2 => any::<bool>().prop_map(|b| Odd::Json(Value::Bool(b))),
        4 => select(numbers).prop_map(Odd::Json),
        8 => odd_string().prop_map(|s| Odd::Json(Value::String(s))),
        3 => select(raw).prop_map(|s| Odd::Raw(s.to_owned())),
        1 => (1..300usize).prop_map(|d| Odd::Raw(format!("{}{}", "[".repeat(d), "]".repeat(d)))),
        1 => (1..300usize)
            .prop_map(|d| Odd::Raw(format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d)))),
        2 => vec(odd_string(), 0..4).prop_map(|v| Odd::Json(json!(v))),
        2 => vec((odd_string(), odd_string()), 0..3)
            .prop_map(|v| Odd::Json(Value::Object(v.into_iter().map(|(k, s)| (k, json!(s))).collect()))),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<usize>().prop_map(Mutation::Delete),
        2 => any::<usize>().prop_map(Mutation::Duplicate),
        6 => (any::<usize>(), odd_value()).prop_map(|(i, o)| Mutation::Replace(i, o)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        2 => (any::<usize>(), odd_string()).prop_map(|(i, s)| Mutation::Rename(i, s)),
        1 => (any::<usize>(), 1..200usize).prop_map(|(i, d)| Mutation::Nest(i, d)),
    ]
}

/// The seeds that mutations start from: the shipped policies and every corpus input that is a
/// JSON value.
fn policy_seeds() -> &'static [Value] {
    static SEEDS: OnceLock<Vec<Value>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds: Vec<Value> = shipped()
            .iter()
            .map(|(f, text)| serde_json::from_str(text).unwrap_or_else(|e| panic!("{f}: {e}")))
            .collect();
        seeds.extend(
            corpus::<String>("policy")
                .into_iter()
                .filter_map(|(_, text)| serde_json::from_str::<Value>(&text).ok())
                .filter(Value::is_object),
        );
        seeds
    })
}

fn policy_text() -> impl Strategy<Value = String> {
    let n = policy_seeds().len();
    let mutated = (
        0..n,
        vec(mutation(), 1..5),
        proptest::option::weighted(0.15, text_edit()),
    )
        .prop_map(|(seed, mutations, edits)| {
            let mut v = policy_seeds()[seed].clone();
            for m in &mutations {
                apply(&mut v, m);
            }
            let mut text = String::new();
            write_json(&v, &mut text);
            if let Some(e) = &edits {
                edit_text(&mut text, e);
            }
            text
        });
    prop_oneof![
        1 => any::<String>(),
        1 => vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        1 => "[\\[\\]{}\":,0-9a-z_. eE+\\\\-]{0,120}",
        20 => mutated,
    ]
}

fn check_policy(text: &str) -> Result<(), String> {
    let first = policy::load(text);
    if let Err(errors) = &first {
        ensure!(!errors.is_empty(), "Err with no error");
        for e in errors {
            // Whitespace is a path when it is the key at fault: `{" ": 1}` names `" "`.
            ensure!(!e.path.is_empty(), "an error without a path: {e:?}");
            ensure!(
                !e.message.trim().is_empty(),
                "an error without a message: {e:?}"
            );
        }
    }
    ensure!(policy::load(text) == first, "two loads of one text differ");
    // The same document written again (serde_json's own writing: key order, escapes and numbers
    // normalised) loads the same: the result depends on the JSON, not on its spelling.
    // Except in the last bit of a fraction: serde_json (without `float_roundtrip`) may read a
    // decimal 1 ULP off, and then writes that value, so a float compares approximately (the
    // model's only float is `refresh_ahead`; an error message may quote one).
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        let again = serde_json::to_string(&value).expect("a value serialises");
        let second = policy::load(&again);
        let same = if has_fraction(&value) {
            approximately(&first) == approximately(&second)
        } else {
            second == first
        };
        ensure!(
            same,
            "the re-serialised text loads differently: {first:?} then {second:?}"
        );
    }
    // A policy that loads writes out (its Serialize) to a text that loads to the same policy.
    if let Ok(p) = &first {
        let written = serde_json::to_string(p).expect("a policy serialises");
        match policy::load(&written) {
            Ok(q) => ensure!(
                approximately(&Ok(q)) == approximately(&first),
                "the written policy loads to another policy: {written}"
            ),
            Err(e) => {
                return Err(format!(
                    "the written policy does not load: {e:?}\n{written}"
                ))
            }
        }
    }
    Ok(())
}

/// Whether a document has a number that is not an integer.
fn has_fraction(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_fraction),
        Value::Object(map) => map.values().any(has_fraction),
        _ => false,
    }
}

/// A load's result with floats rounded to 12 significant digits: error paths and policies, whose
/// only float is `refresh_ahead` (messages may quote a float, so they are left out).
fn approximately(
    r: &Result<policy::Policy, Vec<policy::PolicyError>>,
) -> Result<Value, Vec<String>> {
    fn round(v: &mut Value) {
        match v {
            Value::Number(n) if n.is_f64() => {
                let x = n.as_f64().unwrap_or_default();
                *v = json!(format!("{x:.11e}"));
            }
            Value::Array(items) => items.iter_mut().for_each(round),
            Value::Object(map) => map.values_mut().for_each(round),
            _ => {}
        }
    }
    match r {
        Ok(p) => {
            let mut v = serde_json::to_value(p).expect("a policy serialises");
            round(&mut v);
            Ok(v)
        }
        Err(errors) => Err(errors.iter().map(|e| e.path.clone()).collect()),
    }
}

#[test]
fn fuzz_policy() {
    fuzz("policy", policy_text(), |t: &String| check_policy(t));
}

// =============================================================================================
// 2. template: Template::parse and render
//
// Inputs: templates built from pieces (variables, escapes, stray braces, bad dates) or arbitrary
// text; request values that look like templates. Properties: no panic; a parsed template written
// back parses the same; the rendering is the literal text with each variable replaced by the
// caller's value verbatim (so a value is never read as a template), or an error exactly when a
// value is missing.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TemplateInput {
    template: String,
    path: Vec<(String, String)>,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    jwt: Option<Map<String, Value>>,
    request_id: String,
    uuid: String,
    now_ms: f64,
}

fn var_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(vec!["tenant", "name", "x", "y", "sub", "azp", "X-Id", "x-id", "pk", "n"]).prop_map(String::from),
        1 => "[A-Za-z0-9_-]{1,6}",
        1 => odd_string(),
    ]
}

/// What a caller sends: often text that looks like a template.
fn caller_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "{header.x}", "{header.y}", "{path.tenant}", "{query.pk}", "{jwt.sub}", "{uuid}",
            "{request_id}", "{date:%Y}", "{{", "}}", "{", "}", "{{header.x}}", "%2F", "../", "",
            "contoso",
        ])
        .prop_map(String::from),
        2 => "[a-z{}.%/]{0,12}",
        1 => odd_string(),
    ]
}

fn template_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "[a-z/._ -]{0,6}",
        3 => select(vec![
            "{{", "}}", "{", "}", "%", "{uuid}", "{request_id}", "{date:%Y/%m/%d}", "{date:%H%M%S%%}",
            "{date:%Q}", "{date:%}", "{date:}", "{date:{}", "{ uuid}", "{UUID}", "{path.}", "{path.a.b}",
            "{body.x}", "{path}", "{jwt.}", "{}", "é", "😀", "\u{0}",
        ])
        .prop_map(String::from),
        4 => (select(vec!["path", "query", "header", "jwt", "Path", "cookie"]), var_name())
            .prop_map(|(source, name)| format!("{{{source}.{name}}}")),
        1 => any::<String>(),
    ];
    prop_oneof![
        6 => vec(piece, 0..8).prop_map(|p| p.concat()),
        1 => any::<String>(),
    ]
}

fn claims() -> impl Strategy<Value = Option<Map<String, Value>>> {
    let value = prop_oneof![
        4 => caller_value().prop_map(Value::String),
        1 => select(vec![json!(5), json!(-1.5), json!(u64::MAX), json!(true), json!(null), json!([]), json!({"a": 1}), json!(["a"])]),
    ];
    proptest::option::of(vec((var_name(), value), 0..4).prop_map(|v| v.into_iter().collect()))
}

fn now_ms() -> impl Strategy<Value = f64> {
    prop_oneof![
        2 => Just(1_709_210_096_000.0),
        2 => -1e14..1e14f64,
        1 => select(vec![0.0, -1.0, 8.64e15, -8.64e15, 1e300, -1e300, f64::MAX, f64::MIN, 0.5]),
    ]
}

fn template_input() -> impl Strategy<Value = TemplateInput> {
    let pairs = || vec((var_name(), caller_value()), 0..4);
    (
        template_text(),
        pairs(),
        pairs(),
        pairs(),
        claims(),
        caller_value(),
        caller_value(),
        now_ms(),
    )
        .prop_map(
            |(template, path, query, headers, jwt, request_id, uuid, now_ms)| TemplateInput {
                template,
                path,
                query,
                headers,
                jwt,
                request_id,
                uuid,
                now_ms,
            },
        )
}

/// Writes a parsed template back as template text.
fn template_source(t: &Template) -> String {
    t.parts
        .iter()
        .map(|p| match p {
            Part::Literal(l) => l.replace('{', "{{").replace('}', "}}"),
            Part::Var(v) => v.to_string(),
        })
        .collect()
}

fn check_template(input: &TemplateInput) -> Result<(), String> {
    let t = match Template::parse(&input.template) {
        Ok(t) => t,
        Err(e) => {
            ensure!(!e.trim().is_empty(), "an error without a message");
            return Ok(());
        }
    };
    let source = template_source(&t);
    ensure!(
        Template::parse(&source).as_ref() == Ok(&t),
        "the parsed template written back as {source:?} parses to {:?}, not {t:?}",
        Template::parse(&source)
    );
    let header = |name: &str| {
        input
            .headers
            .iter()
            .find(|(k, _)| k.to_ascii_lowercase() == name)
            .map(|(_, v)| v.clone())
    };
    let uuid = || input.uuid.clone();
    let ctx = RenderContext {
        path: &input.path,
        query: &input.query,
        header: &header,
        request_id: &input.request_id,
        uuid: &uuid,
        now_ms: input.now_ms,
        jwt: input.jwt.as_ref(),
        body: None,
    };
    let got = t.render(&ctx);
    // What it must be: the template's literal text, and each variable replaced by the caller's
    // value exactly as sent; a value that looks like a template is not read as one.
    let find = |pairs: &[(String, String)], name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut want = String::new();
    let mut missing = false;
    for part in &t.parts {
        let value = match part {
            Part::Literal(l) => Some(l.clone()),
            Part::Var(Var::Path(n)) => find(&input.path, n),
            Part::Var(Var::Query(n)) => find(&input.query, n),
            Part::Var(Var::Header(n)) => header(n),
            Part::Var(Var::Uuid) => Some(input.uuid.clone()),
            Part::Var(Var::RequestId) => Some(input.request_id.clone()),
            Part::Var(Var::Date(f)) => {
                Some(azure_edge_gateway::time::Utc::from_millis(input.now_ms).format(f))
            }
            Part::Var(Var::Jwt(n)) => match input.jwt.as_ref().and_then(|c| c.get(n)) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
                _ => None,
            },
            // The fuzzed render context has no body.
            Part::Var(Var::Body | Var::BodyBase64) => None,
        };
        match value {
            Some(v) => want.push_str(&v),
            None => missing = true,
        }
    }
    match got {
        Ok(out) => {
            ensure!(!missing, "rendered {out:?} although a value is missing");
            ensure!(out == want, "rendered {out:?}, expected {want:?}");
        }
        Err(e) => {
            ensure!(missing, "failed ({e}) although every value is there");
            ensure!(!e.trim().is_empty(), "an error without a message");
        }
    }
    Ok(())
}

#[test]
fn fuzz_template() {
    fuzz("template", template_input(), check_template);
}

// =============================================================================================
// 3. routing: Router::find
//
// Inputs: raw paths made of the routes' literals, escapes (%2F, %00, bad UTF-8), dot segments,
// empty and long segments, against the shipped policies' routes and a synthetic set. Properties:
// no panic; BadPath exactly when a segment does not decode; a Found route has the method, as
// many segments as the path, equal literals, parameters that are the decoded segments with a
// '/' only where the raw segment has a %2F, and no more specific route has the method; 405
// and 404 agree with a plain matcher.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RouteInput {
    /// A shipped policy's file, or `synthetic`.
    routes: String,
    method: String,
    path: String,
}

/// Routes with literal-versus-parameter choices and encoded literals, besides the shipped ones.
const SYNTHETIC_ROUTES: &str = r#"{
  "identities": { "gw": { "token_endpoint": { "url": "https://idp.example.com/token" },
                          "client_id": "c", "credential": { "client_secret": { "secret": "S" } } } },
  "routes": [
    { "name": "a", "methods": ["POST"], "path": "/orders/{tenant}", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } },
    { "name": "b", "methods": ["GET", "HEAD"], "path": "/orders/{tenant}/{id}", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } },
    { "name": "c", "methods": ["PUT"], "path": "/orders/new", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } },
    { "name": "d", "methods": ["GET"], "path": "/", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } },
    { "name": "e", "methods": ["DELETE"], "path": "/a b/caf%C3%A9", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } },
    { "name": "f", "methods": ["POST"], "path": "/x/{a}/y/{b}", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } },
    { "name": "g", "methods": ["POST"], "path": "/x/{a}/{b}/{c}", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } },
    { "name": "h", "methods": ["PATCH"], "path": "/slash/%2F/{p}/", "public": true,
      "backend": { "service_bus": { "namespace": "contoso-orders", "queue": "q", "identity": "gw" } } }
  ]
}"#;

struct Routing {
    name: String,
    routes: Vec<Route>,
    templates: Vec<PathTemplate>,
    router: Router,
}

fn routings() -> &'static [Routing] {
    static ROUTINGS: OnceLock<Vec<Routing>> = OnceLock::new();
    ROUTINGS.get_or_init(|| {
        let synthetic = policy::load(SYNTHETIC_ROUTES)
            .unwrap_or_else(|e| panic!("the synthetic routes do not load: {e:?}"));
        valid_policies()
            .iter()
            .cloned()
            .chain([("synthetic".to_owned(), synthetic)])
            .map(|(name, p)| Routing {
                name,
                templates: p
                    .routes
                    .iter()
                    .map(|r| PathTemplate::parse(&r.path).expect("a validated path"))
                    .collect(),
                router: Router::new(&p.routes),
                routes: p.routes,
            })
            .collect()
    })
}

/// The raw text of every literal segment of the routes' templates.
fn raw_literals() -> Vec<String> {
    let mut out: Vec<String> = routings()
        .iter()
        .flat_map(|r| r.routes.iter())
        .flat_map(|r| r.path.split('/').map(String::from).collect::<Vec<_>>())
        .filter(|s| !s.is_empty() && !s.starts_with('{'))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn path_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9._~-]{1,8}",
        4 => select(vec![
            "%2F", "%2f", "%00", "%C3%A9", "%c3%a9", "%FF", "%E2%82", "%", "%G1", "%2", "%25", "%2E%2E",
            "%2e", "%20", "a b", "é", "😀", "\u{0}", ";", "?", "#", "\\", "+", "%2F%2F", "%%2F",
        ])
        .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// A value for a path parameter, or a segment of its own.
fn path_value() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => vec(path_piece(), 1..4).prop_map(|p| p.concat()),
        2 => select(vec!["", ".", ".."]).prop_map(String::from),
        1 => select(vec![5000usize, 70_000]).prop_map(|n| "x".repeat(n)),
    ]
}

fn raw_path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        4 => select(raw_literals()),
        6 => path_value(),
    ];
    prop_oneof![
        1 => any::<String>(),
        1 => "[/%.a-zA-Z0-9]{0,30}",
        1 => (1..3000usize).prop_map(|n| "/a".repeat(n)),
        10 => (select(vec!["/", "", "//"]), vec(segment, 0..6), select(vec!["", "/", "//"]))
            .prop_map(|(a, segs, b)| format!("{a}{}{b}", segs.join("/"))),
    ]
}

fn any_method() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(vec!["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "", "CONNECT"])
            .prop_map(String::from),
        1 => "[A-Z]{1,7}",
    ]
}

/// A request shaped like one of the routes: its literals as written (a few replaced), a
/// generated value for each parameter, now and then a segment more or less, one of the route's
/// methods or another.
fn templated_request(routes: usize) -> impl Strategy<Value = (String, String)> {
    let n = routings()[routes].routes.len();
    (
        (
            0..n,
            vec(path_value(), 6),
            vec(proptest::option::weighted(0.08, path_value()), 6),
        ),
        (
            select(vec!["/", "/", "/", "//", ""]),
            select(vec!["", "", "", "/", "//"]),
        ),
        proptest::option::weighted(0.1, (any::<usize>(), path_value())),
        proptest::option::weighted(0.1, any::<usize>()),
        prop_oneof![4 => any::<usize>().prop_map(Ok), 1 => any_method().prop_map(Err)],
    )
        .prop_map(
            move |((route, values, replaced), (head, tail), insert, remove, method)| {
                let route = &routings()[routes].routes[route];
                let mut segs: Vec<String> = route
                    .path
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .enumerate()
                    .map(|(i, s)| match &replaced[i % 6] {
                        Some(other) => other.clone(),
                        None if s.starts_with('{') => values[i % 6].clone(),
                        None => s.to_owned(),
                    })
                    .collect();
                if let Some((i, value)) = insert {
                    segs.insert(i % (segs.len() + 1), value);
                }
                if let (Some(i), false) = (remove, segs.is_empty()) {
                    segs.remove(i % segs.len());
                }
                let method = match method {
                    Ok(i) => route.methods[i % route.methods.len()].as_str().to_owned(),
                    Err(other) => other,
                };
                (method, format!("{head}{}{tail}", segs.join("/")))
            },
        )
}

fn route_input() -> impl Strategy<Value = RouteInput> {
    (0..routings().len())
        .prop_flat_map(|i| {
            let request = prop_oneof![
                4 => templated_request(i),
                1 => (any_method(), raw_path()),
            ];
            (Just(i), request)
        })
        .prop_map(|(i, (method, path))| RouteInput {
            routes: routings()[i].name.clone(),
            method,
            path,
        })
}

/// A template against decoded request segments, written out plainly: same number of
/// segments, equal literals, non-empty parameters.
fn reference_match(t: &PathTemplate, segs: &[String]) -> Option<Vec<(String, String)>> {
    if t.segments.len() != segs.len() {
        return None;
    }
    let mut params = Vec::new();
    for (s, v) in t.segments.iter().zip(segs) {
        match s {
            Segment::Literal(l) if l == v => {}
            Segment::Param(name) if !v.is_empty() => params.push((name.clone(), v.clone())),
            _ => return None,
        }
    }
    Some(params)
}

/// Percent-decoding for the oracle, written here from the contract `encoding::percent_decode`
/// documents, not by calling it (an oracle that calls the code under test cannot catch a bug
/// in it): `%` and two hex digits of either case is that byte (RFC 3986 §2.1); any other `%`
/// is malformed, `None`; every other byte, `+` included, stands for itself; a result that is
/// not UTF-8 is `None`.
fn reference_percent_decode(s: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push(hi * 16 + lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The oracle's decoder pinned by hand-written vectors.
#[test]
fn reference_percent_decode_vectors() {
    let cases: &[(&str, Option<&str>)] = &[
        ("", Some("")),
        ("abc", Some("abc")),
        ("%41", Some("A")),
        ("%e2%82%ac", Some("€")),
        ("%E2%82%AC", Some("€")),
        ("%e2%82%AC", Some("€")),
        ("%2F", Some("/")),
        ("%2f", Some("/")),
        ("%00", Some("\0")),
        ("%2541", Some("%41")),
        ("a+b", Some("a+b")),
        ("a b", Some("a b")),
        ("é", Some("é")),
        ("%", None),
        ("%4", None),
        ("a%", None),
        ("%zz", None),
        ("%4g", None),
        ("%g4", None),
        ("%%41", None),
        ("%é", None),
        ("%FF", None),
        ("%C3", None),
        ("%E2%82", None),
    ];
    for &(input, want) in cases {
        assert_eq!(
            reference_percent_decode(input).as_deref(),
            want,
            "decoding {input:?}"
        );
    }
}

fn count_encoded_slashes(raw: &str) -> usize {
    raw.to_ascii_lowercase().matches("%2f").count()
}

fn check_route(input: &RouteInput) -> Result<(), String> {
    let Some(r) = routings().iter().find(|r| r.name == input.routes) else {
        return Err(format!("no routes named {}", input.routes));
    };
    let found = r.router.find(&input.method, &input.path);
    let rest = input.path.strip_prefix('/').unwrap_or(&input.path);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let raw: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('/').collect()
    };
    let decoded: Option<Vec<String>> = raw.iter().map(|s| reference_percent_decode(s)).collect();
    let Some(segs) = decoded else {
        ensure!(
            found == RouteMatch::BadPath,
            "a path with a bad escape gave {found:?}"
        );
        return Ok(());
    };
    let matching: Vec<usize> = (0..r.routes.len())
        .filter(|&i| reference_match(&r.templates[i], &segs).is_some())
        .collect();
    let has_method = |i: usize| {
        r.routes[i]
            .methods
            .iter()
            .any(|m| m.as_str() == input.method)
    };
    let specificity = |i: usize| -> Vec<bool> {
        r.templates[i]
            .segments
            .iter()
            .map(|s| matches!(s, Segment::Param(_)))
            .collect()
    };
    match found {
        RouteMatch::Found { route, params } => {
            ensure!(route < r.routes.len(), "route {route} does not exist");
            let t = &r.templates[route];
            ensure!(
                t.segments.len() == raw.len(),
                "route {} ({}) has {} segments, the path {}",
                route,
                r.routes[route].path,
                t.segments.len(),
                raw.len()
            );
            ensure!(has_method(route), "route {route} lacks the method");
            let want = reference_match(t, &segs);
            ensure!(
                want.as_ref() == Some(&params),
                "route {} ({}) with params {params:?}; the template gives {want:?}",
                route,
                r.routes[route].path
            );
            // A '/' in a value comes from a %2F in that very segment, never from a split.
            let mut names = t.params();
            for (seg, raw_seg) in t.segments.iter().zip(&raw) {
                if let Segment::Param(_) = seg {
                    let name = names.next();
                    let value = params
                        .iter()
                        .find(|(n, _)| Some(n.as_str()) == name)
                        .map(|(_, v)| v.as_str())
                        .unwrap_or_default();
                    ensure!(
                        value.matches('/').count() == count_encoded_slashes(raw_seg),
                        "parameter {name:?} = {value:?} from the raw segment {raw_seg:?}"
                    );
                }
            }
            // Literals win over parameters from the left: no better route has this method.
            for &other in matching.iter().filter(|&&i| has_method(i)) {
                ensure!(
                    specificity(other) >= specificity(route),
                    "route {} ({}) was found, but {} ({}) is more specific",
                    route,
                    r.routes[route].path,
                    other,
                    r.routes[other].path
                );
            }
        }
        RouteMatch::MethodNotAllowed { allow } => {
            ensure!(!matching.is_empty(), "405 for a path no route has");
            ensure!(
                !matching.iter().any(|&i| has_method(i)),
                "405 though a route has the method"
            );
            let mut want: Vec<_> = matching
                .iter()
                .flat_map(|&i| r.routes[i].methods.iter().copied())
                .collect();
            want.sort();
            want.dedup();
            ensure!(allow == want, "Allow {allow:?}, expected {want:?}");
        }
        RouteMatch::NotFound => {
            ensure!(
                matching.is_empty(),
                "404 though routes {matching:?} match the path"
            );
        }
        RouteMatch::BadPath => return Err("BadPath for a path that decodes".into()),
    }
    Ok(())
}

#[test]
fn fuzz_routing() {
    fuzz("routing", route_input(), check_route);
}

// =============================================================================================
// 4. jwt: parse, select_key, check_claims, validate (a fixed "now")
//
// Inputs: arbitrary tokens, tokens assembled from generated headers and claims, and edits of
// tokens the issuer signed (characters, segments, header members, claims, signature bits).
// Properties: no panic; the signing input is the token's header.payload text; with a real
// signature check (as WebCrypto does it) exactly the signed tokens are accepted: an edited one
// never is; a refusal does not quote the token.

const NOW: i64 = 1_700_000_000;
const NOW_MS: f64 = NOW as f64 * 1000.0;
const ISS: &str = "https://login.example.com/tenant/v2.0";
const AUD: &str = "api://orders";

fn jwt_check() -> &'static JwtCheck {
    static CHECK: OnceLock<JwtCheck> = OnceLock::new();
    CHECK.get_or_init(|| {
        serde_json::from_value(json!({
            "issuers": [ISS],
            "audiences": [AUD],
            "jwks_url": "https://login.example.com/keys",
            "algorithms": ["RS256", "PS256", "ES256"],
            "required_claims": { "roles": ["Orders.Writer"] },
        }))
        .expect("a JwtCheck")
    })
}

const JWT_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt/");

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{JWT_FIXTURES}{name}"))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn jwks() -> &'static Value {
    static JWKS: OnceLock<Value> = OnceLock::new();
    JWKS.get_or_init(|| jwt::parse_jwks(&fixture("jwks.json")).expect("the fixture key set"))
}

/// PSS salts: deterministic, good enough for test signatures.
struct SaltRng(u64);

impl rsa::rand_core::RngCore for SaltRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.0 ^ (self.0 >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = self.next_u64() as u8;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for SaltRng {}

fn good_claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": "caller-1", "exp": NOW + 3600, "nbf": NOW - 10,
        "iat": NOW - 10, "scp": "orders.write", "roles": ["Orders.Writer"],
    })
}

/// Tokens the issuer signed, each valid at NOW: RS256, PS256, ES256, and ES256 without `kid`.
fn signed_tokens() -> &'static [String] {
    static TOKENS: OnceLock<Vec<String>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        use p256::ecdsa::signature::Signer as _;
        use rsa::pkcs8::DecodePrivateKey as _;
        use sha2::{Digest, Sha256};
        let rsa = rsa::RsaPrivateKey::from_pkcs8_der(
            &pem_block(&fixture("rsa-signing.pem"), "PRIVATE KEY").expect("PEM"),
        )
        .expect("an RSA key");
        let ec = {
            use p256::pkcs8::DecodePrivateKey as _;
            p256::ecdsa::SigningKey::from_pkcs8_der(
                &pem_block(&fixture("ec-signing.pem"), "PRIVATE KEY").expect("PEM"),
            )
            .expect("an EC key")
        };
        let b64 = |v: &Value| base64url(v.to_string().as_bytes());
        let sign = |header: Value| {
            let input = format!("{}.{}", b64(&header), b64(&good_claims()));
            let digest = Sha256::digest(input.as_bytes());
            let signature = match header["alg"].as_str() {
                Some("RS256") => rsa
                    .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest)
                    .expect("RS256"),
                Some("PS256") => rsa
                    .sign_with_rng(&mut SaltRng(7), rsa::Pss::new::<Sha256>(), &digest)
                    .expect("PS256"),
                _ => {
                    let s: p256::ecdsa::Signature = ec.sign(input.as_bytes());
                    s.to_bytes().to_vec()
                }
            };
            format!("{input}.{}", base64url(&signature))
        };
        vec![
            sign(json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"})),
            sign(json!({"alg": "PS256", "kid": "rsa-1"})),
            sign(json!({"alg": "ES256", "typ": "at+jwt", "kid": "ec-1"})),
            sign(json!({"alg": "ES256"})),
        ]
    })
}

/// Verifies as WebCrypto does, with the public JWK's key material.
struct Crypto;

/// A signature check standing in for WebCrypto.
trait Verify {
    fn verify(&self, alg: JwtAlgorithm, jwk: &Value, input: &[u8], signature: &[u8]) -> bool;
}

/// The gateway's own JWT sequence (`jwt::validate`, as the driver runs it), with a key set and
/// a verifier of the test's.
fn validate<V: Verify>(
    token: &str,
    check: &JwtCheck,
    jwks: &Value,
    now_ms: f64,
    verifier: &V,
) -> Result<Map<String, Value>, azure_edge_gateway::problem::Problem> {
    let key = async |parsed: &jwt::Parsed| {
        jwt::select_key(jwks, parsed)
            .cloned()
            .ok_or_else(jwt::no_key)
    };
    let verify = async |alg: JwtAlgorithm, jwk: &Value, input: &[u8], signature: &[u8]| {
        verifier.verify(alg, jwk, input, signature)
    };
    let mut future = std::pin::pin!(jwt::validate(token, check, now_ms, key, verify));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = std::future::Future::poll(future.as_mut(), &mut cx) {
            return out;
        }
    }
}

impl Verify for Crypto {
    fn verify(&self, alg: JwtAlgorithm, jwk: &Value, input: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier as _;
        use sha2::{Digest, Sha256};
        let text = |name: &str| jwk.get(name).and_then(Value::as_str);
        let bytes = |name: &str| text(name).and_then(base64_decode);
        match alg {
            JwtAlgorithm::RS256 | JwtAlgorithm::PS256 => {
                let (Some("RSA"), Some(n), Some(e)) = (text("kty"), bytes("n"), bytes("e")) else {
                    return false;
                };
                let Ok(key) = rsa::RsaPublicKey::new(
                    rsa::BigUint::from_bytes_be(&n),
                    rsa::BigUint::from_bytes_be(&e),
                ) else {
                    return false;
                };
                let digest = Sha256::digest(input);
                if alg == JwtAlgorithm::RS256 {
                    key.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest, signature)
                        .is_ok()
                } else {
                    key.verify(rsa::Pss::new::<Sha256>(), &digest, signature)
                        .is_ok()
                }
            }
            JwtAlgorithm::ES256 => {
                let (Some("EC"), Some("P-256"), Some(x), Some(y)) =
                    (text("kty"), text("crv"), bytes("x"), bytes("y"))
                else {
                    return false;
                };
                let point = [&[4u8][..], &x, &y].concat();
                let (Ok(key), Ok(signature)) = (
                    p256::ecdsa::VerifyingKey::from_sec1_bytes(&point),
                    p256::ecdsa::Signature::from_slice(signature),
                ) else {
                    return false;
                };
                key.verify(input, &signature).is_ok()
            }
        }
    }
}

/// Accepts every signature, so the claims checks run on arbitrary tokens too.
struct AcceptAnything;

impl Verify for AcceptAnything {
    fn verify(&self, _: JwtAlgorithm, _: &Value, _: &[u8], _: &[u8]) -> bool {
        true
    }
}

#[derive(Debug, Clone)]
enum TokenEdit {
    Replace(usize, char),
    /// Replaces the last character of a segment: where base64url keeps its spare bits.
    ReplaceLast(usize, char),
    Insert(usize, char),
    Delete(usize),
    Truncate(usize),
    SwapSegments(usize, usize),
    DuplicateSegment(usize),
    DropSegment(usize),
    /// A segment of another signed token.
    Transplant(usize, usize),
    Header(String, Option<Value>),
    Claim(String, Option<Value>),
    FlipSignatureBit(usize),
}

fn token_char() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                .chars()
                .collect::<Vec<_>>()
        ),
        1 => select(vec!['.', '=', '+', '/', ' ', '\n', '%', 'é', '\0']),
    ]
}

fn jwt_value() -> impl Strategy<Value = Option<Value>> {
    proptest::option::weighted(
        0.85,
        select(vec![
            json!("none"),
            json!("HS256"),
            json!("RS256"),
            json!("PS256"),
            json!("ES256"),
            json!("rs256"),
            json!("JWT"),
            json!("at+jwt"),
            json!("dpop+jwt"),
            json!("rsa-1"),
            json!("ec-1"),
            json!("hmac-1"),
            json!("rsa-enc"),
            json!(null),
            json!(1),
            json!([]),
            json!({}),
            json!(ISS),
            json!(AUD),
            json!([AUD]),
            json!(["api://x", AUD]),
            json!(NOW),
            json!(NOW - 61),
            json!(NOW + 61),
            json!(NOW + 3600),
            json!("1700003600"),
            json!(1e308),
            json!(-1),
            json!(true),
            json!(["Orders.Writer"]),
            json!("Orders.Writer"),
            json!(["b64"]),
        ]),
    )
}

fn token_edit() -> impl Strategy<Value = TokenEdit> {
    let header_keys = select(vec![
        "alg", "kid", "typ", "crit", "jwk", "jku", "x5c", "b64",
    ]);
    let claim_keys = select(vec![
        "exp", "nbf", "iss", "aud", "roles", "scp", "sub", "iat",
    ]);
    prop_oneof![
        6 => (any::<usize>(), token_char()).prop_map(|(i, c)| TokenEdit::Replace(i, c)),
        2 => (0..3usize, token_char()).prop_map(|(i, c)| TokenEdit::ReplaceLast(i, c)),
        2 => (any::<usize>(), token_char()).prop_map(|(i, c)| TokenEdit::Insert(i, c)),
        2 => any::<usize>().prop_map(TokenEdit::Delete),
        1 => any::<usize>().prop_map(TokenEdit::Truncate),
        1 => (0..4usize, 0..4usize).prop_map(|(a, b)| TokenEdit::SwapSegments(a, b)),
        1 => (0..4usize).prop_map(TokenEdit::DuplicateSegment),
        1 => (0..4usize).prop_map(TokenEdit::DropSegment),
        1 => (0..4usize, any::<usize>()).prop_map(|(s, t)| TokenEdit::Transplant(s, t)),
        2 => (header_keys, jwt_value()).prop_map(|(k, v)| TokenEdit::Header(k.to_owned(), v)),
        2 => (claim_keys, jwt_value()).prop_map(|(k, v)| TokenEdit::Claim(k.to_owned(), v)),
        2 => any::<usize>().prop_map(TokenEdit::FlipSignatureBit),
    ]
}

fn edit_token(token: &str, e: &TokenEdit) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    let mut segments: Vec<String> = token.split('.').map(String::from).collect();
    let json_segment = |seg: &str| -> Option<Map<String, Value>> {
        serde_json::from_slice(&base64_decode(seg)?).ok()
    };
    match e {
        TokenEdit::Replace(i, c) => {
            let i = at(*i, chars.len());
            if let Some(x) = chars.get_mut(i) {
                *x = *c;
            }
            chars.into_iter().collect()
        }
        TokenEdit::ReplaceLast(i, c) => {
            let n = segments.len();
            let seg = &mut segments[i % n];
            seg.pop();
            seg.push(*c);
            segments.join(".")
        }
        TokenEdit::Insert(i, c) => {
            let i = at(*i, chars.len() + 1);
            chars.insert(i, *c);
            chars.into_iter().collect()
        }
        TokenEdit::Delete(i) => {
            if !chars.is_empty() {
                let i = at(*i, chars.len());
                chars.remove(i);
            }
            chars.into_iter().collect()
        }
        TokenEdit::Truncate(i) => {
            chars.truncate(at(*i, chars.len() + 1));
            chars.into_iter().collect()
        }
        TokenEdit::SwapSegments(a, b) => {
            let n = segments.len();
            segments.swap(a % n, b % n);
            segments.join(".")
        }
        TokenEdit::DuplicateSegment(i) => {
            let n = segments.len();
            let s = segments[i % n].clone();
            segments.insert(i % n, s);
            segments.join(".")
        }
        TokenEdit::DropSegment(i) => {
            let n = segments.len();
            segments.remove(i % n);
            segments.join(".")
        }
        TokenEdit::Transplant(seg, from) => {
            let tokens = signed_tokens();
            let other: Vec<&str> = tokens[from % tokens.len()].split('.').collect();
            let n = segments.len();
            segments[seg % n] = other[seg % other.len()].to_owned();
            segments.join(".")
        }
        TokenEdit::Header(k, v) | TokenEdit::Claim(k, v) => {
            let i = if matches!(e, TokenEdit::Header(..)) {
                0
            } else {
                1
            };
            let Some(mut map) = segments.get(i).and_then(|s| json_segment(s)) else {
                return token.to_owned();
            };
            match v {
                Some(v) => map.insert(k.clone(), v.clone()),
                None => map.remove(k),
            };
            segments[i] = base64url(Value::Object(map).to_string().as_bytes());
            segments.join(".")
        }
        TokenEdit::FlipSignatureBit(bit) => {
            let Some(mut sig) = segments.get(2).and_then(|s| base64_decode(s)) else {
                return token.to_owned();
            };
            if sig.is_empty() {
                return token.to_owned();
            }
            let bit = bit % (sig.len() * 8);
            sig[bit / 8] ^= 1 << (bit % 8);
            segments[2] = base64url(&sig);
            segments.join(".")
        }
    }
}

fn jwt_token() -> impl Strategy<Value = String> {
    let n = signed_tokens().len();
    let mutated = (0..n, vec(token_edit(), 1..4)).prop_map(|(base, edits)| {
        let mut t = signed_tokens()[base].clone();
        for e in &edits {
            t = edit_token(&t, e);
        }
        t
    });
    let json_part = || {
        vec(
            (
                select(vec![
                    "alg", "kid", "typ", "crit", "exp", "nbf", "iss", "aud", "roles", "scp",
                ]),
                jwt_value(),
            ),
            0..6,
        )
        .prop_map(|kv| {
            let map: Map<String, Value> = kv
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
                .collect();
            base64url(Value::Object(map).to_string().as_bytes())
        })
    };
    let assembled = (json_part(), json_part(), vec(any::<u8>(), 0..80))
        .prop_map(|(h, p, sig)| format!("{h}.{p}.{}", base64url(&sig)));
    prop_oneof![
        10 => mutated,
        2 => assembled,
        1 => "[A-Za-z0-9_-]{0,20}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,20}",
        1 => any::<String>(),
        1 => Just(format!("{}.{}.{}", "e".repeat(8), "A".repeat(jwt::MAX_TOKEN_BYTES), "x")),
    ]
}

fn check_jwt(token: &str) -> Result<(), String> {
    let check = jwt_check();
    let _ = jwt::bearer_token(Some(&format!("Bearer {token}")));
    if let Ok(parsed) = jwt::parse(token, check) {
        let input_len = token.rfind('.').unwrap_or(0);
        ensure!(
            parsed.signing_input == token.as_bytes()[..input_len],
            "the signing input is not the token's header.payload text"
        );
        let _ = jwt::select_key(jwks(), &parsed).map(jwt::public_jwk);
        let _ = jwt::check_claims(&parsed.claims, check, NOW_MS);
    }
    let anything = validate(token, check, jwks(), NOW_MS, &AcceptAnything);
    let real = validate(token, check, jwks(), NOW_MS, &Crypto);
    let signed = signed_tokens().iter().any(|t| t == token);
    match &real {
        Ok(_) => {
            ensure!(
                signed,
                "a token the issuer did not sign (an edit of one it did) was accepted"
            );
            ensure!(
                anything.is_ok(),
                "accepted with a real signature check only"
            );
        }
        Err(p) => {
            ensure!(
                !signed,
                "a token the issuer signed was refused: {}",
                p.detail
            );
            let shown = format!("{} {:?}", p.body("/jwt", "r-1"), p.headers);
            ensure!(
                token.len() < 24 || !token.contains('.') || !shown.contains(token),
                "the problem quotes the token"
            );
        }
    }
    Ok(())
}

#[test]
fn fuzz_jwt() {
    fuzz("jwt", jwt_token(), |t: &String| check_jwt(t));
}

// =============================================================================================
// 5. service_bus_batch: batch_body
//
// Inputs: arbitrary bytes and JSON arrays of elements with arbitrary Body, BrokerProperties,
// UserProperties and extra members, under shipped and generated message mappings. Properties:
// no panic; a refusal has a detail; an accepted batch is a JSON array with one element and one
// message id per element sent, each element exactly Body (the one sent), BrokerProperties
// (only SENDER_PROPERTIES, of their types, MessageId = the id reported, 1-128 characters, a
// SessionId of 1-128 equal to any PartitionKey) and UserProperties (printable ASCII text).

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Body {
    Text(String),
    Bytes(Vec<u8>),
}

impl Body {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Text(s) => s.as_bytes(),
            Body::Bytes(b) => b,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BatchInput {
    body: Body,
    mapping: Option<MessageMapping>,
    path: Vec<(String, String)>,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    /// The caller's claims, on a route that checks a JWT (`{jwt.azp}` in a mapping).
    #[serde(default)]
    jwt: Option<Map<String, Value>>,
    idempotency_key: Option<String>,
    traceparent: Option<String>,
    request_id: String,
    uuid: String,
}

/// The message mappings of the shipped Service Bus routes.
fn shipped_mappings() -> Vec<MessageMapping> {
    valid_policies()
        .iter()
        .flat_map(|(_, p)| p.routes.iter())
        .filter_map(|r| match &r.backend {
            Backend::ServiceBus(sb) => sb.message.clone(),
            _ => None,
        })
        .collect()
}

fn mapping() -> impl Strategy<Value = Option<MessageMapping>> {
    let template = || {
        proptest::option::weighted(
            0.3,
            select(vec![
                "{path.tenant}".to_owned(),
                "{query.pk}".to_owned(),
                "{header.x-deliver-at}".to_owned(),
                "order".to_owned(),
                "{uuid}".to_owned(),
                "{request_id}".to_owned(),
                "Sun, 06 Nov 1994 08:49:37 GMT".to_owned(),
                "{date:%Y}".to_owned(),
                "x".repeat(129),
                String::new(),
                "{jwt.sub}".to_owned(),
                "{".to_owned(),
            ]),
        )
    };
    let generated = (
        (template(), template(), template(), template()),
        (template(), template(), template(), template()),
        proptest::option::of(select(vec![0u64, 1, 3600, u64::MAX])),
        vec(
            (
                "[a-zA-Z0-9_-]{1,8}",
                select(vec!["{path.tenant}", "edge", "ü", "{header.x}"]),
            ),
            0..3,
        ),
    )
        .prop_map(|((mi, ci, si, pk), (label, to, reply, when), ttl, props)| {
            Some(MessageMapping {
                message_id: mi,
                correlation_id: ci,
                session_id: si,
                partition_key: pk,
                label,
                to,
                reply_to: reply,
                time_to_live: ttl,
                scheduled_enqueue_time_utc: when,
                properties: props
                    .into_iter()
                    .map(|(k, v)| (k, v.to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            })
        });
    prop_oneof![
        3 => Just(None),
        3 => select(shipped_mappings()).prop_map(Some),
        2 => generated,
    ]
}

fn id_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            String::new(),
            "a".to_owned(),
            "x".repeat(128),
            "x".repeat(129),
            "é".repeat(128),
            "é".repeat(129),
            "Sun, 06 Nov 1994 08:49:37 GMT".to_owned(),
            "Sun, 06 Nov 1994 08:49:37 GMT ".to_owned(),
            "Mon, 99 Foo 0000 99:99:99 GMT".to_owned(),
            "y".repeat(33 * 1024),
        ]),
        2 => odd_string(),
    ]
}

fn property_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => id_string().prop_map(Value::String),
        2 => select(vec![
            json!(0), json!(-1), json!(1), json!(1.5), json!(3600), json!(1e300), json!(u64::MAX),
            json!(i64::MIN), json!(-0.0),
        ]),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => select(vec![json!(null), json!([]), json!({}), json!(["a"])]),
    ]
}

fn broker_name() -> impl Strategy<Value = String> {
    let mut names: Vec<String> = SENDER_PROPERTIES
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    names.extend(
        [
            "messageid",
            "EnqueuedTimeUtc",
            "SequenceNumber",
            "LockToken",
            "DeliveryCount",
            "State",
            "",
            "MessageId ",
            "\u{0}",
        ]
        .map(String::from),
    );
    prop_oneof![6 => select(names), 1 => odd_string()]
}

fn batch_element() -> impl Strategy<Value = Value> {
    let broker = prop_oneof![
        6 => vec((broker_name(), property_value()), 0..5)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        1 => property_value(),
    ];
    let user = prop_oneof![
        6 => vec((odd_string(), property_value()), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        1 => property_value(),
    ];
    let body = prop_oneof![
        4 => odd_string().prop_map(Value::String),
        1 => property_value(),
        1 => Just(json!({"order": 1, "nested": [1, {"a": null}]})),
    ];
    let object = (
        proptest::option::weighted(0.97, body),
        proptest::option::weighted(0.6, broker),
        proptest::option::weighted(0.5, user),
        proptest::option::weighted(0.05, (odd_string(), property_value())),
    )
        .prop_map(|(body, broker, user, extra)| {
            let mut m = Map::new();
            if let Some(v) = body {
                m.insert("Body".into(), v);
            }
            if let Some(v) = broker {
                m.insert("BrokerProperties".into(), v);
            }
            if let Some(v) = user {
                m.insert("UserProperties".into(), v);
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        });
    prop_oneof![20 => object, 1 => property_value()]
}

fn batch_body_bytes() -> impl Strategy<Value = Body> {
    let elements = prop_oneof![1 => Just(Vec::new()), 12 => vec(batch_element(), 1..6)];
    let json_batch =
        (elements, proptest::option::weighted(0.05, text_edit())).prop_map(|(elements, edit)| {
            let mut text = Value::Array(elements).to_string();
            if let Some(e) = &edit {
                edit_text(&mut text, e);
            }
            Body::Text(text)
        });
    prop_oneof![
        16 => json_batch,
        1 => vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
        1 => any::<String>().prop_map(Body::Text),
    ]
}

fn batch_input() -> impl Strategy<Value = BatchInput> {
    let pairs = || {
        vec(
            (
                select(vec!["tenant", "pk", "x", "x-deliver-at"]).prop_map(String::from),
                caller_value(),
            ),
            0..3,
        )
    };
    let traceparent = proptest::option::of(prop_oneof![
        Just("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
        Just("00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned()),
        odd_string(),
    ]);
    (
        batch_body_bytes(),
        mapping(),
        (
            prop_oneof![
                3 => Just(vec![("tenant".to_owned(), "contoso".to_owned())]),
                1 => pairs(),
            ],
            prop_oneof![
                1 => Just(vec![("pk".to_owned(), "contoso".to_owned())]),
                1 => pairs(),
            ],
            prop_oneof![
                1 => Just(vec![(
                    "x-deliver-at".to_owned(),
                    "Sun, 06 Nov 1994 08:49:37 GMT".to_owned()
                )]),
                1 => pairs(),
            ],
        ),
        (
            proptest::option::of(prop_oneof![3 => "[a-zA-Z0-9-]{1,20}", 1 => id_string()]),
            traceparent,
        ),
        (
            caller_value(),
            prop_oneof![Just("generated-id".to_owned()), id_string()],
        ),
        claims(),
    )
        .prop_map(
            |(
                body,
                mapping,
                (path, query, headers),
                (idempotency_key, traceparent),
                (request_id, uuid),
                jwt,
            )| {
                BatchInput {
                    body,
                    mapping,
                    path,
                    query,
                    headers,
                    jwt,
                    idempotency_key,
                    traceparent,
                    request_id,
                    uuid,
                }
            },
        )
}

fn check_batch(input: &BatchInput) -> Result<(), String> {
    let header = |name: &str| {
        input
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let uuid = || input.uuid.clone();
    let ctx = RenderContext {
        path: &input.path,
        query: &input.query,
        header: &header,
        request_id: &input.request_id,
        uuid: &uuid,
        now_ms: NOW_MS,
        jwt: input.jwt.as_ref(),
        body: None,
    };
    let defaults = Defaults {
        idempotency_key: input.idempotency_key.as_deref(),
        traceparent: input.traceparent.as_deref(),
        request_id: &input.request_id,
    };
    let bytes = input.body.bytes();
    // The compiler parses a route's templates; a mapping whose templates do not parse never
    // reaches a request.
    let mapping = match input.mapping.as_ref().map(PreparedMessage::from_mapping) {
        None => PreparedMessage::default(),
        Some(Ok(mapping)) => mapping,
        Some(Err(_)) => return Ok(()),
    };
    let (out, ids) = match batch_body(bytes, &mapping, &ctx, &defaults) {
        Ok(ok) => ok,
        Err(p) => {
            ensure!(!p.detail.trim().is_empty(), "a problem without detail");
            ensure!(
                matches!(p.status, 400 | 413 | 500),
                "status {} for a refused batch",
                p.status
            );
            return Ok(());
        }
    };
    let Ok(Value::Array(sent)) = serde_json::from_slice::<Value>(bytes) else {
        return Err("accepted a body that is not a JSON array".into());
    };
    let written: Value =
        serde_json::from_str(&out).map_err(|e| format!("the batch is not JSON: {e}"))?;
    let Value::Array(written) = written else {
        return Err("the batch is not a JSON array".into());
    };
    ensure!(
        written.len() == sent.len() && ids.len() == sent.len(),
        "{} elements sent, {} written, {} ids",
        sent.len(),
        written.len(),
        ids.len()
    );
    for (i, ((w, id), s)) in written.iter().zip(&ids).zip(&sent).enumerate() {
        let Value::Object(w) = w else {
            return Err(format!("element {i} is not an object"));
        };
        let keys: Vec<&str> = w.keys().map(String::as_str).collect();
        ensure!(
            keys == ["Body", "BrokerProperties", "UserProperties"],
            "element {i} has the fields {keys:?}"
        );
        let sent_body = match &s["Body"] {
            Value::String(b) => b.clone(),
            other => other.to_string(),
        };
        ensure!(
            w["Body"] == Value::String(sent_body),
            "element {i}'s body changed"
        );
        let Value::Object(broker) = &w["BrokerProperties"] else {
            return Err(format!("element {i}: BrokerProperties is not an object"));
        };
        for (name, value) in broker {
            let Some((_, ty)) = SENDER_PROPERTIES.iter().find(|(n, _)| n == name) else {
                return Err(format!(
                    "element {i}: BrokerProperties.{name} is not sender-settable"
                ));
            };
            let ok = match ty {
                PropertyType::String => value.is_string(),
                PropertyType::Number => value.as_f64().is_some_and(|n| n > 0.0),
                PropertyType::Bool => value.is_boolean(),
            };
            ensure!(
                ok,
                "element {i}: BrokerProperties.{name} = {value} is not a {ty:?}"
            );
        }
        let n = id.chars().count();
        ensure!(
            (1..=128).contains(&n),
            "element {i}: a message id of {n} characters"
        );
        ensure!(
            broker.get("MessageId") == Some(&Value::String(id.clone())),
            "element {i}: the id {id:?} is not its MessageId"
        );
        if let Some(session) = broker.get("SessionId").and_then(Value::as_str) {
            let n = session.chars().count();
            ensure!(
                (1..=128).contains(&n),
                "element {i}: a session id of {n} characters"
            );
            if let Some(pk) = broker.get("PartitionKey") {
                ensure!(
                    pk == session,
                    "element {i}: SessionId and PartitionKey differ"
                );
            }
        }
        let Value::Object(user) = &w["UserProperties"] else {
            return Err(format!("element {i}: UserProperties is not an object"));
        };
        for (name, value) in user {
            let printable = value
                .as_str()
                .is_some_and(|v| v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)));
            ensure!(
                printable,
                "element {i}: UserProperties.{name} = {value} is not printable ASCII text"
            );
        }
    }
    Ok(())
}

#[test]
fn fuzz_service_bus_batch() {
    fuzz("service_bus_batch", batch_input(), check_batch);
}
