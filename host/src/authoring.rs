//! The plugin authors' loop, without Envoy: exchanges written down in files, played through
//! the same chain, runtime, guard and failure policies the server runs, and checked against
//! what the author expects (`wasm-extproc test`).
//!
//! - [`file`]: the exchange file format (YAML), validated strictly.
//! - [`play`]: one exchange played to the ext_proc state machine as Envoy would send it, and
//!   what Envoy would receive.
//! - [`transcript`]: an exchange's messages and answers read into what came out (and, for a
//!   recording, into the exchange as a file describes it).
//! - [`check`]: what came out against the file's `expect:`, and the report.
//! - [`templates`]: `wasm-extproc new`, a plugin project to start from.

pub mod check;
pub mod file;
pub mod play;
pub mod templates;
pub mod transcript;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::Host;
use crate::config::Config;
use file::{ExchangeFile, FileError};

/// How a test run went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub exchanges: usize,
    pub failed: usize,
}

/// Why a test run could not run.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// An exchange file is unreadable or invalid; nothing ran.
    #[error(transparent)]
    File(#[from] FileError),
    /// The plugins could not be loaded.
    #[error("{0:#}")]
    Load(anyhow::Error),
}

/// Plays every exchange of `files` through the plugins `config` names, writing a report per
/// exchange to `out`. Every file is read and checked before any exchange runs.
pub async fn test(
    config: &Config,
    files: &[PathBuf],
    out: &mut impl Write,
) -> Result<Summary, TestError> {
    let loaded: Vec<(PathBuf, ExchangeFile)> = files
        .iter()
        .map(|path| ExchangeFile::load(path).map(|file| (path.clone(), file)))
        .collect::<Result<_, _>>()?;
    let host = Host::load(config).await.map_err(TestError::Load)?;
    let generation = host
        .current()
        .context("nothing loaded")
        .map_err(TestError::Load)?;
    let metrics = host.metrics();
    let mut summary = Summary::default();
    for (path, file) in &loaded {
        for spec in &file.exchanges {
            let played = play::play(&generation, &metrics, spec, &file.envoy).await;
            let differences = check::differences(&played, spec.expect.as_ref());
            summary.exchanges += 1;
            if !differences.is_empty() {
                summary.failed += 1;
            }
            let report = check::report(
                &path.display().to_string(),
                &spec.name,
                &played,
                &differences,
            );
            let _ = out.write_all(report.as_bytes());
        }
    }
    let _ = writeln!(
        out,
        "{} exchange(s), {} passed, {} failed",
        summary.exchanges,
        summary.exchanges - summary.failed,
        summary.failed
    );
    Ok(summary)
}
