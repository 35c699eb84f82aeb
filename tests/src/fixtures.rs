//! Components built from source by `cargo xtask build-plugins`: the bundled plugins and the
//! test fixtures in `tests/fixtures/`.

use std::path::PathBuf;

/// A component the build produces, by crate name, and the target it is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component(&'static str, &'static str);

/// The bundled plugins (`plugins/`) need no WASI and build for this target.
pub const BUNDLED_TARGET: &str = "wasm32-unknown-unknown";
/// Fixtures and the other languages' examples build for WASI 0.2.
pub const WASI_TARGET: &str = "wasm32-wasip2";

/// The bundled ASM demo plugin (`plugins/asm-demo`).
pub const ASM_DEMO: Component = Component("asm_demo", BUNDLED_TARGET);
/// The ASM demo plugin in JavaScript (`plugins/examples/javascript`, jco + QuickJS).
pub const ASM_DEMO_JS: Component = Component("asm_demo_js", WASI_TARGET);
/// Rejects requests without a configured API key (JavaScript).
pub const API_KEY_JS: Component = Component("api_key_js", WASI_TARGET);
/// The ASM demo plugin in Python (`plugins/examples/python`, componentize-py).
pub const ASM_DEMO_PY: Component = Component("asm_demo_py", WASI_TARGET);
/// Adds configured fields to JSON request bodies (Python).
pub const JSON_REWRITE_PY: Component = Component("json_rewrite_py", WASI_TARGET);
/// The ASM demo plugin in C (`plugins/examples/c`, clang + wasi-libc + wit-bindgen).
pub const ASM_DEMO_C: Component = Component("asm_demo_c", WASI_TARGET);
/// The bundled JSON redaction example (`plugins/json-redact`): whole bodies, both directions.
pub const JSON_REDACT: Component = Component("json_redact", BUNDLED_TARGET);
/// The bundled bearer-token example (`plugins/bearer-auth`): 401 on request headers.
pub const BEARER_AUTH: Component = Component("bearer_auth", BUNDLED_TARGET);
/// JavaScript that prints a line, then throws (configuration `throw`) or returns nothing
/// (`undefined`) on request headers.
pub const THROW_JS: Component = Component("throw_js", WASI_TARGET);
/// Python that prints a line, then raises on request headers.
pub const RAISE_ERROR_PY: Component = Component("raise_error_py", WASI_TARGET);
/// Upper-cases body chunks in both directions.
pub const SHOUT: Component = Component("shout", WASI_TARGET);
/// Answers at the first request body message with its length and end-of-stream flag, as JSON.
pub const BODY_PROBE: Component = Component("body_probe", WASI_TARGET);
/// Built against the previous contract (0.2.0): tags both directions' headers with
/// `x-contract: 0.2.0` and upper-cases both bodies, taken whole.
pub const CONTRACT_0_2: Component = Component("contract_0_2", WASI_TARGET);
/// Built against 0.3.0, the contract before state: tags the request `x-contract-0-3: yes`.
pub const CONTRACT_0_3: Component = Component("contract_0_3", WASI_TARGET);
/// Uses the state store as its configuration says (`flood`, `open:NAME`, `roundtrip:NAME`) and
/// reports what happened in request headers.
pub const KV_PROBE: Component = Component("kv_probe", WASI_TARGET);
/// The bundled rate limit (`plugins/rate-limit`): a fixed window per client in the state store.
pub const RATE_LIMIT: Component = Component("rate_limit", BUNDLED_TARGET);
/// The bundled token check (`plugins/token-introspect`): an introspection call, cached.
pub const TOKEN_INTROSPECT: Component = Component("token_introspect", BUNDLED_TARGET);
/// Asks a policy service with `fetch` (`plugins/examples/javascript/policy-check.js`).
pub const POLICY_CHECK_JS: Component = Component("policy_check_js", WASI_TARGET);
/// GETs the URL its configuration names, once per request-headers call (`wasi:http`).
pub const CALL_OUT: Component = Component("call_out", WASI_TARGET);
/// Answers 403 at the phase its configuration names.
pub const GATE: Component = Component("gate", WASI_TARGET);
/// Reports attributes and metadata as headers, sets dynamic metadata, reroutes on request.
pub const CONTEXT_PROBE: Component = Component("context_probe", WASI_TARGET);
/// Produces the invalid output its configuration names.
pub const MISBEHAVE: Component = Component("misbehave", WASI_TARGET);
/// Busy-waits as many milliseconds as configured, or computes `cpu:N` million iterations.
pub const SLOW: Component = Component("slow", WASI_TARGET);
/// The same, built for the bundled plugins' target: called without a fiber, it holds its
/// worker for the whole call (configure it `cpu:N`: there is no clock).
pub const SLOW_BUNDLED: Component = Component("slow", BUNDLED_TARGET);
/// The ASM plugin's next version: `-v2` header values.
pub const ASM_V2: Component = Component("asm_v2", WASI_TARGET);
/// Handles all six phases, marking each with its configuration string.
pub const TAGGER: Component = Component("tagger", WASI_TARGET);
/// Remembers the request id for the response and counts hook calls in a global.
pub const STATEFUL: Component = Component("stateful", WASI_TARGET);
/// Panics (or hits `unreachable` when configured so) on request headers.
pub const TRAP: Component = Component("trap", WASI_TARGET);
/// The same, built for the bundled plugins' target, which has no stderr.
pub const TRAP_BUNDLED: Component = Component("trap", BUNDLED_TARGET);
/// Loops forever on request headers.
pub const SPIN: Component = Component("spin", WASI_TARGET);
/// Allocates without bound on request headers.
pub const MEMORY_HOG: Component = Component("memory_hog", WASI_TARGET);
/// Reports what it can see of the host: environment, arguments, filesystem.
pub const SANDBOX_PROBE: Component = Component("sandbox_probe", WASI_TARGET);
/// Recurses until the stack overflows.
pub const RECURSE: Component = Component("recurse", WASI_TARGET);
/// A 10 MiB header value, or (configured `count`) 5,000 headers.
pub const FLOOD: Component = Component("flood", WASI_TARGET);
/// Traps on request ids divisible by its configuration (or one in N at random).
pub const FLAKY: Component = Component("flaky", WASI_TARGET);
/// Imports `acme:vault/secrets`, which the host does not provide.
pub const BAD_IMPORT: Component = Component("bad_import", WASI_TARGET);
/// Never answers `register`.
pub const NO_ANSWER: Component = Component("no_answer", WASI_TARGET);
/// Built against contract version 0.0.9.
pub const WRONG_CONTRACT: Component = Component("wrong_contract", WASI_TARGET);

/// The build's target directory (`CARGO_TARGET_DIR`, or the repository's `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"))
}

/// Where the tests' hosts keep compiled components, shared by every test and every run: the
/// JavaScript and Python components take seconds each to compile, and many tests load the
/// same ones. wasmtime keys each entry by the component's bytes and the engine's settings, and
/// writes entries atomically, so concurrent test processes share it safely. Tests of the
/// cache itself set a `cache_dir` of their own.
pub fn compile_cache() -> PathBuf {
    target_dir().join("tmp/compile-cache")
}

impl Component {
    pub fn name(self) -> &'static str {
        self.0
    }

    /// Where the build left the component. Panics with the command to run if it is missing.
    pub fn path(self) -> PathBuf {
        let path = target_dir()
            .join(self.1)
            .join("release")
            .join(format!("{}.wasm", self.0));
        assert!(
            path.is_file(),
            "{} is missing: run `cargo xtask build-plugins` (or `cargo xtask test`) first",
            path.display()
        );
        path
    }

    /// The component's bytes.
    pub fn bytes(self) -> Vec<u8> {
        std::fs::read(self.path()).expect("fixture readable")
    }
}
