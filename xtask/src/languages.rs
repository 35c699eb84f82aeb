//! The example plugins in other languages (`plugins/examples/`): their toolchains, installed
//! into target/tools from the registries, and their builds, into the same directory as the
//! Rust components (`target/wasm32-wasip2/release/<name>.wasm`).
//!
//! | language | toolchain (pinned) |
//! |---|---|
//! | JavaScript | npm `@bytecodealliance/componentize-js` 0.23.0 (StarlingMonkey), with `@bytecodealliance/preview2-shim` 0.17.9 |
//! | Python | PyPI `componentize-py` 0.25.1 |
//! | C | Debian `clang-19`, `lld-19`, `wasi-libc`, `libclang-rt-19-dev-wasm32`; crates.io `wit-bindgen-cli` 0.61.1 for the bindings; jco's WASI adapter to make the component |

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{repo_root, run, target_dir};
use anyhow::Context;

/// npm packages, pinned: componentize-js builds JavaScript plugins (it needs the 0.17 line of
/// preview2-shim to run), jco supplies the WASI adapter for the C example.
const NPM_PACKAGES: [&str; 3] = [
    "@bytecodealliance/componentize-js@0.23.0",
    "@bytecodealliance/preview2-shim@0.17.9",
    "@bytecodealliance/jco@1.35.0",
];
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
pub const WIT_BINDGEN_VERSION: &str = "0.61.1";
const APT_PACKAGES: [&str; 4] = [
    "clang-19",
    "lld-19",
    "wasi-libc",
    "libclang-rt-19-dev-wasm32",
];

/// A plugin built by a language toolchain: an example, or a test fixture that needs a
/// language's own runtime (its exceptions, its console).
struct Source {
    language: &'static str,
    /// Its directory under the repository root.
    dir: &'static str,
    /// The file (JavaScript, C) or module (Python) to build.
    file: &'static str,
    /// The component's name in the build's output directory.
    name: &'static str,
    /// The contract it was written for, as a WIT directory under the repository root: a
    /// plugin keeps building against its version after the contract moves on (JavaScript
    /// names the version in its imports).
    contract: &'static str,
    /// JavaScript: whether it calls out with `fetch` (componentize-js's `http` feature). The
    /// others leave the HTTP client out.
    fetch: bool,
    /// Python: WASI imports replaced by trapping stubs (`componentize-py --stub-wasi`), for the
    /// languages benchmark's leaner build.
    stub_wasi: bool,
}

const fn source(
    language: &'static str,
    dir: &'static str,
    file: &'static str,
    name: &'static str,
    contract: &'static str,
) -> Source {
    Source {
        language,
        dir,
        file,
        name,
        contract,
        fetch: false,
        stub_wasi: false,
    }
}

const SOURCES: [Source; 9] = [
    source(
        "javascript",
        "plugins/examples/javascript",
        "asm-demo.js",
        "asm_demo_js",
        "wit",
    ),
    source(
        "javascript",
        "plugins/examples/javascript",
        "api-key.js",
        "api_key_js",
        "wit",
    ),
    source(
        "python",
        "plugins/examples/python",
        "asm_demo",
        "asm_demo_py",
        "wit",
    ),
    Source {
        stub_wasi: true,
        ..source(
            "python",
            "plugins/examples/python",
            "asm_demo",
            "asm_demo_py_stub",
            "wit",
        )
    },
    source(
        "python",
        "plugins/examples/python",
        "json_rewrite",
        "json_rewrite_py",
        "wit",
    ),
    Source {
        fetch: true,
        ..source(
            "javascript",
            "plugins/examples/javascript",
            "policy-check.js",
            "policy_check_js",
            "wit",
        )
    },
    source("c", "plugins/examples/c", "asm_demo.c", "asm_demo_c", "wit"),
    source(
        "javascript",
        "tests/fixtures/javascript",
        "throw.js",
        "throw_js",
        "wit/0.3.0",
    ),
    source(
        "python",
        "tests/fixtures/python",
        "raise_error",
        "raise_error_py",
        "wit",
    ),
];

fn tools() -> PathBuf {
    target_dir().join("tools")
}

fn jco() -> PathBuf {
    tools().join("jco/node_modules/.bin/jco")
}

fn wit_bindgen() -> PathBuf {
    tools().join("cargo/bin/wit-bindgen")
}

/// The JavaScript toolchain (and jco's WASI adapter for the C example), from npm.
/// componentize-py goes into the tools venv with the test tools (`setup::tools_venv`).
pub fn install_npm() -> anyhow::Result<()> {
    crate::install::npm(&tools().join("jco"), &NPM_PACKAGES)
}

/// The C toolchain's Debian packages, unless clang, the WASI sysroot and its runtime are there.
pub fn missing_packages() -> Vec<&'static str> {
    let clang = Command::new("clang-19").arg("--version").output();
    let sysroot = Path::new("/usr/lib/wasm32-wasi/libc.a").is_file();
    let runtime = Path::new("/usr/lib/llvm-19/lib/clang/19/lib/wasi").is_dir();
    if clang.is_err() || !sysroot || !runtime {
        APT_PACKAGES.to_vec()
    } else {
        Vec::new()
    }
}

/// `wit-bindgen` for the C example's bindings, from crates.io, unless this version is there.
pub fn install_wit_bindgen() -> anyhow::Result<()> {
    let installed = Command::new(wit_bindgen()).arg("--version").output();
    if installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(WIT_BINDGEN_VERSION)) {
        return Ok(());
    }
    // Only the C generator: the default features build every language's (Rust, Go, C#, C++,
    // MoonBit, D), minutes of compiling for a binary that runs once. Unoptimised for the same
    // reason: it generates a few kilobytes of C in milliseconds either way, and compiles in a
    // fraction of the release profile's time.
    run(crate::cargo_unlinted()
        .args([
            "install",
            "--locked",
            "--debug",
            "--quiet",
            "wit-bindgen-cli",
            "--version",
            WIT_BINDGEN_VERSION,
            "--no-default-features",
            "--features",
            "c",
            "--root",
        ])
        .arg(tools().join("cargo")))
}

fn out_path(name: &str) -> PathBuf {
    target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm"))
}

/// Whether `output` is newer than every file in `inputs` (directories: their files).
fn fresh(output: &Path, inputs: &[PathBuf]) -> bool {
    let Ok(built) = output.metadata().and_then(|m| m.modified()) else {
        return false;
    };
    let mut files = Vec::new();
    for input in inputs {
        match std::fs::read_dir(input) {
            Ok(entries) => files.extend(entries.flatten().map(|e| e.path())),
            Err(_) => files.push(input.clone()),
        }
    }
    files.iter().all(|f| {
        f.metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t <= built)
    })
}

/// Builds every example and language fixture (skipping those already up to date).
pub fn build() -> anyhow::Result<()> {
    let root = repo_root();
    std::fs::create_dir_all(out_path("x").parent().expect("has a parent"))?;
    for Source {
        language,
        dir: relative,
        file: source,
        name,
        contract,
        fetch,
        stub_wasi,
    } in SOURCES
    {
        let dir = root.join(relative);
        let wit = root.join(contract);
        let output = out_path(name);
        if fresh(&output, &[dir.clone(), wit.join("processor.wit")]) {
            continue;
        }
        match language {
            // componentize-js reads its inputs through a WASI sandbox rooted at the working
            // directory: paths must be relative to it.
            "javascript" => run(Command::new(
                tools().join("jco/node_modules/.bin/componentize-js"),
            )
            .current_dir(&root)
            .arg(Path::new(relative).join(source))
            .arg("--wit")
            .arg(contract)
            .args(["-n", "plugin", "-d", "fetch-event"])
            .args(if fetch { &[][..] } else { &["-d", "http"][..] })
            .arg("-o")
            .arg(&output))?,
            "python" => run(Command::new(tools().join("py/bin/componentize-py"))
                .current_dir(&dir)
                .arg("-d")
                .arg(&wit)
                .args(["-w", "plugin", "componentize", source])
                .args(if stub_wasi {
                    &["--stub-wasi"][..]
                } else {
                    &[][..]
                })
                .arg("-o")
                .arg(&output))?,
            "c" => build_c(&dir, source, &wit, &output)?,
            other => anyhow::bail!("no build for {other}"),
        }
    }
    Ok(())
}

/// Compiles every component [`build`] makes into the tests' compile cache (the test kit's
/// `fixtures::compile_cache`), once each, with the host the tests run (`wasm-extproc check`).
/// A JavaScript or Python component takes seconds to compile; without this, the tests that
/// start together at the beginning of a run each compile the same ones at once.
pub fn compile_ahead() -> anyhow::Result<()> {
    let dir = target_dir().join("tmp/compile-ahead");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for (index, Source { name, .. }) in SOURCES.iter().enumerate() {
        std::os::unix::fs::symlink(out_path(name), dir.join(format!("{index:02}-{name}.wasm")))?;
    }
    let config = dir.join("host.toml");
    // The interpreters' memory, as the tests give them; the plugin that calls out, its
    // destination (none is called). This runs beside the Rust guests' build: a first call
    // into an interpreter's fresh instance can take longer than the 20 ms default then, and
    // what is checked here is that each compiles, not its budget (the tests check theirs).
    std::fs::write(
        &config,
        "[defaults]\nmemory_limit_mib = 128\ntimeout_ms = 1000\n\
         http_allow = [\"http://127.0.0.1:9\"]\n[envoy]\nmessage_timeout_ms = 10000\n",
    )?;
    let mut check = Command::new(target_dir().join("release/wasm-extproc"));
    check
        .arg("check")
        .arg("--config")
        .arg(&config)
        .arg("--plugins-dir")
        .arg(&dir)
        .arg("--cache-dir")
        .arg(target_dir().join("tmp/compile-cache"))
        .env("RUST_LOG", "warn");
    eprintln!("+ {}", crate::shown(&check));
    // A line per plugin when all is well: shown only when something is not.
    let output = check.output().context("cannot run wasm-extproc check")?;
    if !output.status.success() {
        anyhow::bail!(
            "compiling the interpreted plugins ahead failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// C: bindings from wit-bindgen, a WASI preview 1 reactor module from clang and wasi-libc,
/// then a component through the WASI preview 1 adapter.
fn build_c(dir: &Path, source: &str, wit: &Path, output: &Path) -> anyhow::Result<()> {
    let work = target_dir().join("examples-c");
    let bindings = work.join("bindings");
    std::fs::create_dir_all(&bindings)?;
    run(Command::new(wit_bindgen())
        .args(["c", "--world", "plugin", "--out-dir"])
        .arg(&bindings)
        .arg(wit))?;
    let core = work.join(format!("{source}.core.wasm"));
    run(Command::new("clang-19")
        .args([
            // Debian's wasi-libc is installed for the `wasm32-wasi` (preview 1) triple.
            "--target=wasm32-wasi",
            "--sysroot=/usr",
            "-mexec-model=reactor",
            "-O2",
            "-Wall",
            "-Werror",
        ])
        .arg("-I")
        .arg(&bindings)
        .arg(dir.join(source))
        .arg(bindings.join("plugin.c"))
        .arg(bindings.join("plugin_component_type.o"))
        .arg("-o")
        .arg(&core))
    .context("building the C example")?;
    run(Command::new(jco())
        .arg("new")
        .arg(&core)
        .args(["--wasi-reactor", "-o"])
        .arg(output))
}
