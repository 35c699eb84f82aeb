//! The in-process half: runs the criterion benchmarks in `bench/benches/` and reads back the
//! median of each from criterion's own records (`target/criterion/**/new/`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use xtask::{cargo, run, target_dir};

/// One criterion benchmark's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Estimate {
    /// Median time per iteration, nanoseconds.
    pub median_ns: f64,
    /// Bytes per iteration, for throughput benchmarks.
    pub bytes: Option<u64>,
}

impl Estimate {
    pub fn micros(&self) -> f64 {
        self.median_ns / 1e3
    }

    /// MiB/s, for throughput benchmarks.
    pub fn mib_per_second(&self) -> Option<f64> {
        self.bytes
            .map(|b| b as f64 / (1 << 20) as f64 / (self.median_ns / 1e9))
    }
}

/// Results by id: `group/function` (`stream/asm_demo`, `chain/4`, `body/buffered/1024`).
pub type Estimates = BTreeMap<String, Estimate>;

/// Runs `bench/benches/stream.rs` and returns its medians.
pub fn run_stream_benchmarks() -> anyhow::Result<Estimates> {
    let records = target_dir().join("criterion");
    // Results of benchmarks that no longer exist must not reach the report.
    if records.exists() {
        std::fs::remove_dir_all(&records)?;
    }
    run(cargo().args(["bench", "-p", "extproc-bench", "--bench", "stream"]))?;
    read(&records)
}

#[derive(Deserialize)]
struct BenchmarkRecord {
    group_id: String,
    function_id: Option<String>,
    value_str: Option<String>,
    throughput: Option<Throughput>,
}

#[derive(Deserialize)]
enum Throughput {
    Bytes(u64),
    BytesDecimal(u64),
    /// Not a size in bytes: no MiB/s.
    Elements(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct EstimatesRecord {
    median: PointEstimate,
}

#[derive(Deserialize)]
struct PointEstimate {
    point_estimate: f64,
}

/// Every `*/new/benchmark.json` under `records`, with its `estimates.json`.
fn read(records: &Path) -> anyhow::Result<Estimates> {
    let mut estimates = Estimates::new();
    let mut pending = vec![records.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let in_new = path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "new");
            if !in_new || path.file_name().is_none_or(|n| n != "benchmark.json") {
                continue;
            }
            let record: BenchmarkRecord = serde_json::from_slice(&std::fs::read(&path)?)
                .context(path.display().to_string())?;
            let numbers = path.with_file_name("estimates.json");
            let median: EstimatesRecord = serde_json::from_slice(&std::fs::read(&numbers)?)
                .context(numbers.display().to_string())?;
            let id = [Some(record.group_id), record.function_id, record.value_str]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("/");
            let bytes = match record.throughput {
                Some(Throughput::Bytes(n) | Throughput::BytesDecimal(n)) => Some(n),
                Some(Throughput::Elements(_)) | None => None,
            };
            estimates.insert(
                id,
                Estimate {
                    median_ns: median.median.point_estimate,
                    bytes,
                },
            );
        }
    }
    Ok(estimates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_records() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("body_buffered/1024/new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(
            new.join("benchmark.json"),
            r#"{"group_id":"body/buffered","function_id":null,"value_str":"1024","throughput":{"Bytes":1024},"full_id":"body/buffered/1024","directory_name":"body_buffered/1024","title":"body/buffered/1024"}"#,
        )
        .unwrap();
        std::fs::write(
            new.join("estimates.json"),
            r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0},"point_estimate":2.0,"standard_error":0.1},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0},"point_estimate":2048.0,"standard_error":0.1}}"#,
        )
        .unwrap();
        // The previous run's record is not read.
        let base = dir.path().join("body_buffered/1024/base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::copy(new.join("benchmark.json"), base.join("benchmark.json")).unwrap();

        let estimates = read(dir.path()).unwrap();
        assert_eq!(estimates.len(), 1);
        let estimate = &estimates["body/buffered/1024"];
        assert_eq!(estimate.micros(), 2.048);
        let rate = estimate.mib_per_second().unwrap();
        assert!((rate - 1024.0 / 1048576.0 / 2.048e-6).abs() < 1e-9);
    }
}
