//! `cargo xtask …`: the project's own build, run and test entry points. Each one
//! first makes sure the eBPF toolchain is in place, so a fresh machine needs no
//! manual steps.

mod bench;
mod setup;
mod soak;
mod soak_continuous;
mod vm;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "leaktrace's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker built against nightly's LLVM)
    /// and every Debian package the tests, vm-test and bench run. Idempotent.
    Setup,
    /// Build leaktrace (release) with its embedded eBPF object.
    Build,
    /// Build and run leaktrace (release) with the given arguments, e.g. `cargo xtask run -- --cache kmalloc-512 --top`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check formatting and lints, then run every unit and integration test against this kernel (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure leaktrace's overhead against an empty-program floor and the installed peers
    /// (needs root); writes bench/results/<date>.md.
    Bench {
        /// Interleaved rounds of every configuration (0: only leaktrace's own costs).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Generator seconds per run.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Another leaktrace binary to run in the same rounds, side by side
        /// (e.g. one built at an issue's start).
        #[arg(long, value_name = "PATH")]
        baseline: Option<PathBuf>,
        /// Only the page source's rows (--pages on tmpfs writes and a pipe
        /// loop), for a quick look; writes bench/results/pages-<date>.md.
        #[arg(long)]
        pages_only: bool,
    },
    /// Run leaktrace for --secs under churn, process churn (short-lived allocating
    /// processes) and a slowly growing holder; checks RSS, loss and the held count and
    /// writes bench/results/soak-<date>.md (needs root).
    Soak {
        /// Length of the soak in seconds (at least 120: warm-up is 60).
        #[arg(long, default_value_t = 600)]
        secs: u64,
        /// Short-lived allocating processes started per second.
        #[arg(long, default_value_t = 100)]
        execs: u32,
        /// Soak `leaktrace serve` with its continuous heap sampler instead: RSS and BPF
        /// memory flat, no restart, no phantom in-use after the holders exit; writes
        /// bench/results/soak-continuous-<date>.md.
        #[arg(long)]
        continuous: bool,
    },
    /// Run the integration tests inside Debian kernels under QEMU (default: 5.10, 6.1, 6.12, newest 7.x).
    VmTest {
        /// Kernel series to boot, repeatable: 5.10, 6.1, 6.12, 7 (newest 7.x), …
        #[arg(long = "kernel", value_name = "SERIES")]
        kernels: Vec<String>,
        /// Look up the newest kernel of each series again (touches the network).
        #[arg(long)]
        refresh: bool,
        /// Only run tests whose `binary::name` contains this.
        #[arg(long)]
        test: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.task {
        Task::Setup => setup::ensure(setup::Needs::Everything),
        Task::Build => {
            setup::ensure(setup::Needs::Build)?;
            build(&root)
        }
        Task::Run { args } => {
            setup::ensure(setup::Needs::Build)?;
            build(&root)?;
            let status = Command::new(root.join("target/release/leaktrace"))
                .args(args)
                .status()
                .context("running leaktrace")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { args } => {
            setup::ensure(setup::Needs::Test)?;
            test(&root, &args)
        }
        Task::Bench {
            rounds,
            secs,
            baseline,
            pages_only,
        } => {
            setup::ensure(setup::Needs::Everything)?;
            bench::run(
                &root,
                &bench::Options {
                    rounds,
                    secs,
                    baseline,
                    pages_only,
                },
            )
        }
        Task::Soak {
            secs,
            execs,
            continuous,
        } => {
            setup::ensure(setup::Needs::Build)?;
            soak::run(
                &root,
                &soak::Options {
                    secs,
                    execs,
                    continuous,
                },
            )
        }
        Task::VmTest {
            kernels,
            refresh,
            test,
        } => {
            setup::ensure(setup::Needs::Test)?;
            vm::run(
                &root,
                vm::Options {
                    kernels,
                    refresh,
                    filter: test,
                },
            )
        }
    }
}

fn build(root: &Path) -> Result<()> {
    cargo(root, &["build", "--release", "--package", "leaktrace"])
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    cargo(root, &["fmt", "--all", "--check"])?;
    // The eBPF crate only builds for the BPF target, so it is linted there.
    let lint = ["--release", "--", "-D", "warnings"];
    cargo(
        root,
        &[
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--all-targets",
            ],
            &lint[..],
        ]
        .concat(),
    )?;
    nightly_cargo(
        root,
        &[
            &[
                "clippy",
                "--package",
                "tracer-ebpf",
                "--target",
                "bpfel-unknown-none",
            ],
            &["-Z", "build-std=core"][..],
            &lint[..],
        ]
        .concat(),
    )?;
    // Integration tests drive the real release binaries, as a user would.
    cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "leaktrace",
            "--package",
            "leaktrace-tests",
            "--bins",
        ],
    )?;
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--release",
        "--no-fail-fast",
    ];
    args.extend(extra.iter().map(String::as_str));
    // A test that finds its kernel feature missing prints `skipped: <reason>` and
    // returns, which libtest counts as passed; show the output of passing tests
    // so those can be counted as what they are.
    if !extra.iter().any(|a| a == "--") {
        args.push("--");
    }
    args.push("--show-output");
    let mut child = Command::new("cargo")
        .current_dir(root)
        .args(&args)
        .env("LEAKTRACE_BIN", root.join("target/release/leaktrace"))
        .env("LEAKGEN_BIN", root.join("target/release/leakgen"))
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let tally = Tally::read(BufReader::new(stdout), &mut std::io::stdout())?;
    let status = child.wait().context("waiting for cargo test")?;
    for (test, reason) in &tally.skipped {
        println!("skipped {test}: {reason}");
    }
    println!(
        "summary: {} passed, {} failed, {} skipped",
        tally.passed.saturating_sub(tally.skipped.len()),
        tally.failed,
        tally.skipped.len()
    );
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// Counts from libtest's output, echoed as it streams by.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    /// (test, reason) for tests that printed `skipped: <reason>`.
    skipped: Vec<(String, String)>,
}

impl Tally {
    /// Reads libtest's output, echoing every line to `echo`.
    fn read(out: impl BufRead, echo: &mut impl Write) -> Result<Tally> {
        let mut tally = Tally::default();
        let mut current = String::new();
        for line in out.lines() {
            let line = line.context("reading cargo test output")?;
            writeln!(echo, "{line}").context("echoing cargo test output")?;
            if let Some(name) = line
                .strip_prefix("---- ")
                .and_then(|l| l.strip_suffix(" stdout ----"))
            {
                current = name.to_string();
            } else if let Some(reason) = line.strip_prefix("skipped: ") {
                tally.skipped.push((current.clone(), reason.to_string()));
            } else if let Some(result) = line.strip_prefix("test result: ") {
                tally.passed += count_before(result, " passed");
                tally.failed += count_before(result, " failed");
            }
        }
        Ok(tally)
    }
}

/// `ok. 7 passed; 0 failed; ...` -> the number before `word`.
fn count_before(result: &str, word: &str) -> usize {
    result
        .split(';')
        .find_map(|part| {
            part.strip_suffix(word)
                .or_else(|| part.trim().strip_suffix(word))
        })
        .and_then(|n| n.rsplit(' ').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("cargo").current_dir(root).args(args))
}

fn nightly_cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo"])
        .current_dir(root)
        .args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_tests_are_not_counted_as_passed() {
        let out = "\
running 2 tests
test a ... ok
test b ... ok

successes:

---- b stdout ----
skipped: no kmalloc-cg caches before 5.14

successes:
    a
    b

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s
test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
";
        // Not echoed: this test's own output is parsed by the outer run.
        let t = Tally::read(out.as_bytes(), &mut std::io::sink()).expect("parses");
        assert_eq!((t.passed, t.failed), (5, 1));
        assert_eq!(
            t.skipped,
            vec![(
                "b".to_string(),
                "no kmalloc-cg caches before 5.14".to_string()
            )]
        );
        assert_eq!(count_before("ok. 12 passed; 0 failed", " passed"), 12);
        assert_eq!(count_before("garbage", " passed"), 0);
    }
}
