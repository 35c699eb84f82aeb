//! `cargo xtask test`: every check and test, what CI runs, and where its time went.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use xtask::{
    GUEST_WORKSPACES, Task, at_once, bench, build_dist, build_rust_plugins, cargo, cargo_unlinted,
    envoy_bin, languages, live, repo_root, run, setup, target_dir,
};

pub fn test() -> anyhow::Result<()> {
    let mut clock = Clock::default();
    let result = timed(&mut clock);
    clock.report();
    result
}

/// Every check, each phase timed on `clock`.
fn timed(clock: &mut Clock) -> anyhow::Result<()> {
    clock.time("rustfmt", || {
        run(cargo_unlinted().args(["fmt", "--all", "--check"]))?;
        for (workspace, _) in GUEST_WORKSPACES {
            run(cargo_unlinted()
                .current_dir(repo_root().join(workspace))
                .args(["fmt", "--all", "--check"]))?;
        }
        Ok(())
    })?;
    // On a fresh machine both take minutes, and neither needs the other: the installs mostly
    // wait on the registries while cargo keeps the cores busy, and the other languages'
    // toolchains (one process at a time, mostly one core) fill what cargo leaves idle.
    clock.alongside(
        (
            "workspace: build and lint (release, every target)",
            &build_workspace,
        ),
        (
            "setup (toolchains, Envoy, Redis, validators), then the JavaScript, Python and C \
             plugins",
            &|| {
                setup::all()?;
                languages::build()
            },
        ),
    )?;
    clock.time(
        "Rust plugins and fixtures: build and lint (wasm); the interpreted plugins compiled for \
         the tests",
        || {
            at_once(&[
                ("Rust plugins and fixtures", &build_rust_plugins),
                (
                    "the interpreted plugins, compiled ahead",
                    &languages::compile_ahead,
                ),
            ])
        },
    )?;
    let (mut passed, mut failed) = clock.time("tests: run", || {
        // cargo-nextest, where installed (.config/nextest.toml): every binary's tests in one
        // pool, each in its own process, and each test's time. Otherwise cargo's own runner,
        // one binary after another.
        let (mut command, format) = if nextest_installed() {
            let mut command = cargo();
            command.args([
                "nextest",
                "run",
                "--release",
                "--workspace",
                "--no-fail-fast",
            ]);
            (command, Format::Nextest)
        } else {
            let mut command = cargo();
            command.args(["test", "--release", "--workspace", "--no-fail-fast"]);
            (command, Format::Cargo)
        };
        run_tests(command.env("ENVOY_BIN", envoy_bin()), format)
    })?;
    clock.time("the image's build (deploy/build.sh)", build_dist)?;
    // Load held: the shipped settings carry thousands of exchanges in flight through Envoy
    // with no error (the benchmark's concurrency run, reduced).
    clock.time("concurrency check", || {
        run(&mut bench(["concurrency-check"]))
    })?;
    passed += 1;
    // Isolation under load, at a size that fits CI: fails on any request lost, duplicated or
    // wrongly answered, on any Envoy ext_proc error, and on memory that does not stay flat.
    clock.time("reliability run", || {
        run(&mut live([
            "reliability",
            "--requests",
            "2000",
            "--concurrency",
            "32",
        ]))
    })?;
    passed += 1;
    // Benchmarks are not run here (`cargo xtask bench` runs them); the workspace build above
    // has compiled and linted them.
    let (deploy_passed, deploy_failed) = clock.time("deploy tests (pytest)", || {
        run_tests(
            Command::new(setup::tools_venv().join("bin/pytest"))
                .args(["-q", "-p", "no:cacheprovider"])
                .arg(repo_root().join("deploy/tests"))
                .env("ENVOY_BIN", envoy_bin())
                .env("CARGO_TARGET_DIR", target_dir()),
            Format::Pytest,
        )
    })?;
    passed += deploy_passed;
    failed += deploy_failed;
    if failed > 0 {
        println!("tests: {passed} passed, {failed} failed");
        bail!("{failed} tests failed");
    }
    clock.time("demo", || run(&mut live(["demo", "--once"])))?;
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// The workspace in the release profile, every target -- libraries, the in-process module,
/// binaries, tests, benchmarks -- with clippy's lints as errors (`xtask::linted`). The fuzz
/// target (fuzz/, its own workspace: cargo-fuzz instruments all it builds) is one call into
/// `wasm_extproc::ext_proc::fuzz`, which this builds, lints and tests.
fn build_workspace() -> anyhow::Result<()> {
    // Every package but this driver, whose binary is the one running.
    run(cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "xtask",
        "--all-targets",
    ]))?;
    // The driver's own code is linted in its tests' build, which also leaves every test
    // binary ready for the runner.
    run(cargo().args(["test", "--release", "--workspace", "--no-run"]))
}

/// Where `cargo xtask test`'s time goes, phase by phase, so that the change that slows it
/// shows.
#[derive(Debug)]
struct Clock {
    phases: Vec<Phase>,
}

/// One line of the table.
#[derive(Debug)]
struct Phase {
    name: &'static str,
    took: Duration,
    /// Whether it counts towards the total (a phase that ran alongside another does not).
    counted: bool,
    /// The CPU time its processes took, where known: on two cores a phase that keeps both
    /// busy shows twice its seconds here, and only less CPU makes it shorter.
    cpu: Option<Duration>,
}

impl Default for Clock {
    /// A clock whose first phase is what came before xtask ran: cargo building xtask itself.
    fn default() -> Self {
        let phases = match time_since_parent_started() {
            Some(took) => vec![Phase {
                name: "cargo xtask: building xtask",
                took,
                counted: true,
                cpu: None,
            }],
            None => Vec::new(),
        };
        Clock { phases }
    }
}

/// `task`, which leaves how long it took in `took`.
fn timing<'a>(
    task: &'a (dyn Fn() -> anyhow::Result<()> + Sync),
    took: &'a Mutex<Duration>,
) -> impl Fn() -> anyhow::Result<()> + Sync + 'a {
    move || {
        let started = Instant::now();
        let result = task();
        *took.lock().unwrap_or_else(|e| e.into_inner()) = started.elapsed();
        result
    }
}

/// The kernel's clock ticks per second (`USER_HZ`), in which /proc gives times: 100 on Linux.
const TICKS_PER_SECOND: u64 = 100;

/// Fields `numbers` (as `proc(5)` numbers them, from 1) of process `pid`'s `/proc/PID/stat`,
/// as numbers, read at once. Fields are counted after the command name's closing parenthesis,
/// since the name may hold spaces.
fn stat_fields<const N: usize>(pid: &str, numbers: [usize; N]) -> Option<[u64; N]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let mut values = [0; N];
    for (value, number) in values.iter_mut().zip(numbers) {
        // The first field after the name is field 3.
        *value = fields.get(number.checked_sub(3)?)?.parse().ok()?;
    }
    Some(values)
}

/// The CPU time (user and system) of this process's children that have ended, from `/proc`:
/// every command a phase ran, and all they ran in turn.
fn children_cpu() -> Option<Duration> {
    let [user, system] = stat_fields("self", [16, 17])?;
    Some(Duration::from_millis(
        (user + system) * 1000 / TICKS_PER_SECOND,
    ))
}

/// How long ago the process that started this one (`cargo`) started, from `/proc`.
fn time_since_parent_started() -> Option<Duration> {
    let parent = std::os::unix::process::parent_id().to_string();
    let [started] = stat_fields(&parent, [22])?;
    let started = started as f64 / TICKS_PER_SECOND as f64;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (uptime > started).then(|| Duration::from_secs_f64(uptime - started))
}

impl Clock {
    /// Runs `phase`, timed as `name`.
    fn time<T>(
        &mut self,
        name: &'static str,
        phase: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let (started, cpu) = (Instant::now(), children_cpu());
        let result = phase();
        self.phases.push(Phase {
            name,
            took: started.elapsed(),
            counted: true,
            cpu: cpu_since(cpu),
        });
        result
    }

    /// Runs two phases at once; the first is timed until both are done (what the run waits
    /// for), the second on its own, shown as alongside it. Fails naming each that failed.
    fn alongside(&mut self, first: Task<'_>, beside: Task<'_>) -> anyhow::Result<()> {
        let (started, cpu) = (Instant::now(), children_cpu());
        let beside_took = Mutex::new(Duration::ZERO);
        let result = {
            let beside_timed = timing(beside.1, &beside_took);
            at_once(&[first, (beside.0, &beside_timed)])
        };
        let beside_took = beside_took.into_inner().unwrap_or_else(|e| e.into_inner());
        // The CPU both took together, on the first's line.
        self.phases.push(Phase {
            name: first.0,
            took: started.elapsed(),
            counted: true,
            cpu: cpu_since(cpu),
        });
        self.phases.push(Phase {
            name: beside.0,
            took: beside_took,
            counted: false,
            cpu: None,
        });
        result
    }

    /// The table of phases, seconds and CPU seconds, and the totals, on standard error.
    fn report(&self) {
        let counted = || self.phases.iter().filter(|phase| phase.counted);
        let total: Duration = counted().map(|phase| phase.took).sum();
        let cpu: Duration = counted().filter_map(|phase| phase.cpu).sum();
        let seconds = |cpu: Option<Duration>| {
            cpu.map_or("-".to_string(), |cpu| format!("{:.0}", cpu.as_secs_f64()))
        };
        eprintln!("\nwhere the time went:\n");
        eprintln!("| phase | seconds | CPU seconds |\n|---|---:|---:|");
        for phase in &self.phases {
            let (name, took, cpu) = (phase.name, phase.took.as_secs_f64(), seconds(phase.cpu));
            if phase.counted {
                eprintln!("| {name} | {took:.0} | {cpu} |");
            } else {
                eprintln!("| {name} (alongside the phase above; CPU there) | ({took:.0}) | |");
            }
        }
        eprintln!(
            "| **total** | **{:.0}** | **{:.0}** |",
            total.as_secs_f64(),
            cpu.as_secs_f64()
        );
    }
}

/// The CPU children took since `before`.
fn cpu_since(before: Option<Duration>) -> Option<Duration> {
    Some(children_cpu()?.saturating_sub(before?))
}

fn nextest_installed() -> bool {
    cargo_unlinted()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A test runner's summary lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `test result: ok. N passed; M failed; ...`, once per test binary.
    Cargo,
    /// `Summary [ 413.2s] N tests run: N passed (5 slow), M failed, 0 skipped`, on stderr.
    Nextest,
    /// `M failed, N passed in 4.52s`.
    Pytest,
}

impl Format {
    /// The counts `line` gives, if it is a summary line.
    fn summary(self, line: &str) -> Option<&str> {
        match self {
            Format::Cargo => line.strip_prefix("test result: "),
            Format::Nextest => {
                let line = line.trim_start().strip_prefix("Summary [")?;
                let (_, counts) = line.split_once(" run: ")?;
                Some(counts)
            }
            Format::Pytest => {
                let (counts, took) = line.trim_matches(['=', ' ']).rsplit_once(" in ")?;
                let seconds = took.split_whitespace().next()?.strip_suffix('s')?;
                seconds.parse::<f64>().ok()?;
                Some(counts)
            }
        }
    }
}

/// Adds up `N passed` and `M failed` (or `timed out`) in a summary's parts.
fn counts(summary: &str) -> (u64, u64) {
    let (mut passed, mut failed) = (0, 0);
    for part in summary.split(['.', ';', ',']) {
        let mut words = part.split_whitespace();
        match (words.next().map(str::parse::<u64>), words.next()) {
            (Some(Ok(n)), Some("passed")) => passed += n,
            (Some(Ok(n)), Some("failed" | "timed")) => failed += n,
            _ => {}
        }
    }
    (passed, failed)
}

/// Runs a test runner, passing its output through, and adds up what its summary lines report.
fn run_tests(command: &mut Command, format: Format) -> anyhow::Result<(u64, u64)> {
    eprintln!("+ {}", xtask::shown(command));
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read = |stream: Box<dyn std::io::Read + Send>, to_stderr: bool| {
        std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
            let (mut passed, mut failed) = (0, 0);
            for line in BufReader::new(stream).lines() {
                let line = line?;
                if to_stderr {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
                if let Some(summary) = format.summary(&line) {
                    let (p, f) = counts(summary);
                    passed += p;
                    failed += f;
                }
            }
            Ok((passed, failed))
        })
    };
    let out = read(Box::new(stdout), false);
    let err = read(Box::new(stderr), true);
    let (passed_out, failed_out) = out.join().expect("reader")?;
    let (passed_err, failed_err) = err.join().expect("reader")?;
    let (passed, failed) = (passed_out + passed_err, failed_out + failed_err);
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{} failed: {status}", xtask::shown(command));
    }
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::{Format, children_cpu, counts, cpu_since};

    /// A phase's CPU is what its commands spent, however long they waited for a core.
    #[test]
    fn a_phase_counts_the_cpu_its_commands_spent() {
        let before = children_cpu();
        assert!(before.is_some(), "/proc/self/stat is readable");
        let spent = Command::new("python3")
            .args(["-c", "import time\nwhile time.process_time() < 0.3: pass"])
            .status()
            .expect("python3 runs");
        assert!(spent.success());
        let cpu = cpu_since(before).expect("read again");
        assert!(cpu >= Duration::from_millis(280), "{cpu:?}");
    }

    #[test]
    fn each_runners_summary_is_counted_and_nothing_else() {
        let cases = [
            (
                Format::Cargo,
                "test result: FAILED. 40 passed; 2 failed; 0 ignored; 0 measured",
                Some((40, 2)),
            ),
            (
                Format::Nextest,
                "     Summary [ 413.205s] 282 tests run: 282 passed (5 slow), 0 skipped",
                Some((282, 0)),
            ),
            (
                Format::Nextest,
                "     Summary [  13.2s] 9 tests run: 6 passed, 2 failed, 1 timed out, 0 skipped",
                Some((6, 3)),
            ),
            (
                Format::Pytest,
                "1 failed, 51 passed in 4.52s",
                Some((51, 1)),
            ),
            (
                Format::Pytest,
                "============ 52 passed in 3.01s ============",
                Some((52, 0)),
            ),
            // A test's own output that looks like a summary is not one.
            (Format::Pytest, "2 passed, 0 failed in the report", None),
            (Format::Nextest, "test result: ok. 3 passed", None),
            (Format::Cargo, "  2 exchange(s), 2 passed, 0 failed", None),
        ];
        for (format, line, want) in cases {
            assert_eq!(format.summary(line).map(counts), want, "{format:?}: {line}");
        }
    }
}
