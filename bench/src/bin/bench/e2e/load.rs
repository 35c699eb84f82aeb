//! The load generators, Debian's wrk and hey, run on their own core, and what their reports
//! say, read into a [`Load`].

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{Load, Options};

/// The load generator's core, kept apart from the servers'.
const LOAD_CORE: &str = "1";
/// Fills Envoy's connection pools and the servers' first allocations before anything counts.
const WARM_UP: Duration = Duration::from_secs(1);

/// A load generator on its own core.
pub(crate) fn load_generator(program: &str) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", LOAD_CORE, program]);
    command
}

/// A short closed-loop run whose figures nobody reads.
pub(super) fn warm_up(listener: SocketAddr, options: &Options) -> anyhow::Result<()> {
    output_of(load_generator("wrk").args([
        "-t1".to_string(),
        format!("-c{}", options.connections),
        format!("-d{}s", WARM_UP.as_secs()),
        format!("http://{listener}/"),
    ]))?;
    Ok(())
}

/// Closed loop: `connections` connections, each sending its next request on the last answer.
pub(super) fn wrk(listener: SocketAddr, options: &Options) -> anyhow::Result<Load> {
    let output = output_of(load_generator("wrk").args([
        "-t1".to_string(),
        format!("-c{}", options.connections),
        format!("-d{}s", options.duration.as_secs()),
        "--latency".to_string(),
        format!("http://{listener}/"),
    ]))?;
    parse_wrk(&output).with_context(|| format!("cannot read wrk's report:\n{output}"))
}

/// Fixed rate: hey's `-q` is per worker, so the rate is split between `connections` workers.
/// Their tickers start together and stay in phase, so the rate arrives as bursts of
/// `connections` requests, and the latencies include waiting behind the rest of a burst: the
/// same for every setup, but not the latency of a request arriving alone. hey reports them to
/// 0.1 ms.
pub(super) fn hey(listener: SocketAddr, rate: u64, options: &Options) -> anyhow::Result<Load> {
    let per_worker = rate as f64 / options.connections as f64;
    let output = output_of(load_generator("hey").args([
        "-z".to_string(),
        format!("{}s", options.duration.as_secs()),
        "-c".to_string(),
        options.connections.to_string(),
        "-q".to_string(),
        per_worker.to_string(),
        format!("http://{listener}/"),
    ]))?;
    parse_hey(&output).with_context(|| format!("cannot read hey's report:\n{output}"))
}

/// Runs a command to its end and returns its stdout; fails, with its stderr, if it does.
pub(crate) fn output_of(command: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("cannot run {shown} (wrk and hey are Debian packages)"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// wrk's report with `--latency`: throughput, the 50% and 99% lines of the latency
/// distribution, the request count, and its socket errors and non-2xx/3xx count when it has
/// any.
fn parse_wrk(report: &str) -> anyhow::Result<Load> {
    let (mut requests, mut rps, mut p50, mut p99) = (None, None, None, None);
    let mut errors = 0;
    for line in report.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("50%") {
            p50 = Some(wrk_duration_ms(value.trim())?);
        } else if let Some(value) = line.strip_prefix("99%") {
            p99 = Some(wrk_duration_ms(value.trim())?);
        } else if let Some(value) = line.strip_prefix("Requests/sec:") {
            rps = Some(value.trim().parse()?);
        } else if let Some(value) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += value.trim().parse::<u64>()?;
        } else if let Some(counts) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 0, write 0, timeout 0`
            for count in counts.split(',') {
                let count = count
                    .split_whitespace()
                    .nth(1)
                    .context("a socket error count")?;
                errors += count.parse::<u64>()?;
            }
        } else if line.contains(" requests in ") {
            let count = line.split_whitespace().next().unwrap_or_default();
            requests = Some(count.parse()?);
        }
    }
    Ok(Load {
        requests: requests.context("no `N requests in` line")?,
        errors,
        rps: rps.context("no `Requests/sec:` line")?,
        p50_ms: p50.context("no 50% latency line")?,
        p99_ms: p99.context("no 99% latency line")?,
    })
}

/// A wrk duration (`117.00us`, `2.66ms`, `1.02s`, `1.50m`) in milliseconds.
fn wrk_duration_ms(text: &str) -> anyhow::Result<f64> {
    let units = [
        ("us", 1e-3),
        ("ms", 1.0),
        ("s", 1e3),
        ("m", 60e3),
        ("h", 3600e3),
    ];
    let (number, scale) = units
        .iter()
        .find_map(|(unit, scale)| Some((text.strip_suffix(unit)?, scale)))
        .with_context(|| format!("`{text}` is not a wrk duration"))?;
    Ok(number.parse::<f64>()? * scale)
}

/// hey's summary: throughput, the 50% and 99% lines of its latency distribution (in seconds),
/// and the status code and error distributions: every response counts as a request, anything
/// but 2xx and every request that got no response as an error.
fn parse_hey(report: &str) -> anyhow::Result<Load> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        Latency,
        Statuses,
        Errors,
    }
    let mut section = Section::Other;
    let (mut rps, mut p50, mut p99) = (None, None, None);
    let (mut requests, mut errors) = (0, 0);
    for line in report.lines().map(str::trim) {
        match line {
            "Latency distribution:" => section = Section::Latency,
            "Status code distribution:" => section = Section::Statuses,
            "Error distribution:" => section = Section::Errors,
            _ if line.ends_with(':') && !line.starts_with('[') => section = Section::Other,
            _ => {}
        }
        if let Some(value) = line.strip_prefix("Requests/sec:") {
            rps = Some(value.trim().parse()?);
        } else if section == Section::Latency
            && let Some((percent, seconds)) = line.split_once("% in ")
        {
            let ms = seconds.trim_end_matches("secs").trim().parse::<f64>()? * 1e3;
            match percent {
                "50" => p50 = Some(ms),
                "99" => p99 = Some(ms),
                _ => {}
            }
        } else if let Some(entry) = line.strip_prefix('[')
            && let Some((key, count)) = entry.split_once(']')
        {
            // `[200]	2000 responses`, `[100]	Get "http://...": dial tcp ...`
            match section {
                Section::Statuses => {
                    let count: u64 = count
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .parse()?;
                    requests += count;
                    if !key.starts_with('2') {
                        errors += count;
                    }
                }
                Section::Errors => errors += key.parse::<u64>()?,
                Section::Latency | Section::Other => {}
            }
        }
    }
    Ok(Load {
        requests,
        errors,
        rps: rps.context("no `Requests/sec:` line")?,
        // hey leaves out percentiles it has too few samples for, and all of them when no
        // request succeeded.
        p50_ms: p50.context("no 50% latency line (too few successful requests?)")?,
        p99_ms: p99.context("no 99% latency line (too few successful requests?)")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wrk -t1 -c16 -d2s --latency` against `bench-upstream`.
    const WRK: &str = "Running 2s test @ http://127.0.0.1:18080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   171.90us  398.90us   8.05ms   97.25%
    Req/Sec   106.23k    12.47k  126.26k    66.67%
  Latency Distribution
     50%  117.00us
     75%  135.00us
     90%  158.00us
     99%    2.66ms
  221437 requests in 2.10s, 25.13MB read
Requests/sec: 105445.84
Transfer/sec:     11.97MB
";

    /// wrk against a server answering 404.
    const WRK_NOT_FOUND: &str = "Running 1s test @ http://127.0.0.1:18181/nope
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.58ms    2.52ms  18.84ms   77.79%
    Req/Sec     1.17k   227.76     1.63k    80.00%
  Latency Distribution
     50%    2.69ms
     75%    4.79ms
     90%    7.22ms
     99%   11.96ms
  1171 requests in 1.00s, 594.65KB read
  Non-2xx or 3xx responses: 1171
Requests/sec:   1166.86
Transfer/sec:    592.55KB
";

    /// wrk against a server that closes or never answers its connections.
    const WRK_SOCKET_ERRORS: &str = "Running 2s test @ http://127.0.0.1:18182/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 2.00s, 0.00B read
  Socket errors: connect 0, read 4, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
";

    /// `hey -z 2s -c 4 -q 250` against `bench-upstream`.
    const HEY: &str = "
Summary:
  Total:\t2.0038 secs
  Slowest:\t0.0009 secs
  Fastest:\t0.0000 secs
  Average:\t0.0002 secs
  Requests/sec:\t998.0814
  
  Total data:\t22000 bytes
  Size/request:\t11 bytes

Response time histogram:
  0.000 [1]\t|
  0.000 [208]\t|■■■■■■■■■
  0.000 [929]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.000 [770]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.000 [86]\t|■■■■
  0.000 [2]\t|
  0.001 [1]\t|
  0.001 [1]\t|
  0.001 [0]\t|
  0.001 [0]\t|
  0.001 [2]\t|


Latency distribution:
  10% in 0.0001 secs
  25% in 0.0002 secs
  50% in 0.0002 secs
  75% in 0.0002 secs
  90% in 0.0003 secs
  95% in 0.0003 secs
  99% in 0.0003 secs

Details (average, fastest, slowest):
  DNS+dialup:\t0.0000 secs, 0.0000 secs, 0.0009 secs
  DNS-lookup:\t0.0000 secs, 0.0000 secs, 0.0000 secs
  req write:\t0.0000 secs, 0.0000 secs, 0.0002 secs
  resp wait:\t0.0001 secs, 0.0000 secs, 0.0004 secs
  resp read:\t0.0000 secs, 0.0000 secs, 0.0001 secs

Status code distribution:
  [200]\t2000 responses



";

    /// hey with too few requests for a 99th percentile (it prints `0% in 0.0000 secs` in its
    /// place), against a server answering 404.
    const HEY_FEW_NOT_FOUND: &str = "
Summary:
  Total:\t1.0502 secs
  Slowest:\t0.0036 secs
  Fastest:\t0.0008 secs
  Average:\t0.0019 secs
  Requests/sec:\t24.7560
  
  Total data:\t8710 bytes
  Size/request:\t335 bytes

Response time histogram:
  0.001 [1]\t|■■■■■■■■
  0.001 [4]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■

Latency distribution:
  10% in 0.0009 secs
  25% in 0.0014 secs
  50% in 0.0018 secs
  75% in 0.0026 secs
  90% in 0.0034 secs
  95% in 0.0036 secs
  0% in 0.0000 secs

Details (average, fastest, slowest):
  DNS+dialup:\t0.0005 secs, 0.0008 secs, 0.0036 secs

Status code distribution:
  [404]\t26 responses
";

    /// hey against a closed port: no response at all.
    const HEY_REFUSED: &str = "
Summary:
  Total:\t1.0067 secs
  Slowest:\t0.0000 secs
  Fastest:\t0.0000 secs
  Average:\t NaN secs
  Requests/sec:\t99.3328
  

Response time histogram:


Latency distribution:

Details (average, fastest, slowest):
  DNS+dialup:\t NaN secs, 0.0000 secs, 0.0000 secs

Status code distribution:

Error distribution:
  [100]\tGet \"http://127.0.0.1:18199/\": dial tcp 127.0.0.1:18199: connect: connection refused
";

    #[test]
    fn wrk_reports_are_read() {
        let load = parse_wrk(WRK).unwrap();
        assert_eq!((load.requests, load.errors), (221_437, 0));
        assert_eq!(load.rps, 105_445.84);
        assert!((load.p50_ms - 0.117).abs() < 1e-9);
        assert!((load.p99_ms - 2.66).abs() < 1e-9);
    }

    #[test]
    fn wrk_counts_non_2xx_answers_and_socket_errors_as_errors() {
        let load = parse_wrk(WRK_NOT_FOUND).unwrap();
        assert_eq!((load.requests, load.errors), (1171, 1171));
        assert_eq!(load.p99_ms, 11.96);
        let load = parse_wrk(WRK_SOCKET_ERRORS).unwrap();
        assert_eq!((load.requests, load.errors), (0, 4));
    }

    #[test]
    fn wrk_durations_come_in_every_unit() {
        assert_eq!(wrk_duration_ms("1.50s").unwrap(), 1500.0);
        assert_eq!(wrk_duration_ms("2.00m").unwrap(), 120_000.0);
        assert!(wrk_duration_ms("12").is_err());
    }

    #[test]
    fn hey_reports_are_read() {
        let load = parse_hey(HEY).unwrap();
        assert_eq!((load.requests, load.errors), (2000, 0));
        assert_eq!(load.rps, 998.0814);
        assert!((load.p50_ms - 0.2).abs() < 1e-9);
        assert!((load.p99_ms - 0.3).abs() < 1e-9);
    }

    #[test]
    fn hey_counts_non_2xx_answers_and_failed_requests_as_errors() {
        let error = parse_hey(HEY_FEW_NOT_FOUND).unwrap_err();
        assert!(error.to_string().contains("99%"), "{error}");
        let error = parse_hey(HEY_REFUSED).unwrap_err();
        assert!(error.to_string().contains("50%"), "{error}");

        // The same reports with the percentiles they lack.
        let complete = HEY_FEW_NOT_FOUND.replace("0% in 0.0000", "99% in 0.0036");
        let load = parse_hey(&complete).unwrap();
        assert_eq!((load.requests, load.errors), (26, 26));
        let complete = HEY_REFUSED.replace(
            "Latency distribution:\n",
            "Latency distribution:\n  50% in 0.0001 secs\n  99% in 0.0002 secs\n",
        );
        let load = parse_hey(&complete).unwrap();
        assert_eq!((load.requests, load.errors), (0, 100));
    }
}
