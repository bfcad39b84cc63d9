//! `cargo xtask vm-test`: the integration tests inside real Debian kernels under
//! QEMU. The host only proves the tool on its own kernel; tracepoint layouts and
//! available hooks move between releases, so every build is also run on the LTS
//! kernels users have.
//!
//! One initramfs (static busybox, static leaktrace/leakgen, the static test
//! executables and a generated /init) serves every kernel. /init runs each test
//! on its own and frames its output with `@@@` markers on the serial console;
//! QEMU's exit status says nothing about the guest, so the markers are the only
//! source of truth, and a missing `@@@DONE` fails the kernel.

mod cpio;
mod kernels;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "7"];

const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Per test, inside the guest. The slowest test takes ~10 s under TCG; a hang
/// must cost minutes, not the whole CI budget.
const TEST_TIMEOUT_S: u64 = 120;
/// Boot, the hooks probe and power-off, on top of the per-test budget.
const GUEST_SLACK_S: u64 = 90;

pub struct Options {
    pub kernels: Vec<String>,
    pub refresh: bool,
    pub filter: Option<String>,
}

/// One integration test: the test executable's target name and the test's path.
#[derive(Clone)]
struct TestCase {
    bin: String,
    name: String,
}

impl TestCase {
    fn id(&self) -> String {
        format!("{}::{}", self.bin, self.name)
    }
}

enum Outcome {
    Passed,
    Skipped(String),
    Failed(String),
}

struct KernelRun {
    kernel: kernels::Kernel,
    uname: Option<String>,
    hooks: Option<String>,
    kprobes: Option<String>,
    results: Vec<(TestCase, Outcome)>,
    /// Why the guest as a whole failed (did not finish, timed out), if it did.
    guest_error: Option<String>,
    log: PathBuf,
    wall: Duration,
}

impl KernelRun {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|(_, o)| f(o)).count()
    }
    fn failed(&self) -> bool {
        self.guest_error.is_some() || self.count(|o| matches!(o, Outcome::Failed(_))) > 0
    }
}

pub fn run(root: &Path, opts: Options) -> Result<()> {
    let started = Instant::now();
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    for tool in ["qemu-system-x86_64", "dpkg-deb", "tar"] {
        which(tool).with_context(|| {
            format!("vm-test needs {tool}; run `cargo xtask setup` as root (it installs qemu-system-x86, dpkg, tar and the decompressors)")
        })?;
    }
    let series: Vec<String> = if opts.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.kernels
            .iter()
            .map(|k| k.trim_end_matches(".x").to_string())
            .collect()
    };

    let mut apt = kernels::Apt::new(&vm_dir);
    let mut kernels = Vec::new();
    for s in &series {
        let k = kernels::ensure(&mut apt, &vm_dir, s, opts.refresh)
            .with_context(|| format!("getting the Debian kernel for {s}"))?;
        eprintln!("vm-test: kernel {s}: {} ({})", k.abi, k.version);
        kernels.push(k);
    }
    let busybox = kernels::ensure_busybox(&mut apt, &vm_dir)?;

    let bins = build_static(root, &vm_dir)?;
    let mut tests = Vec::new();
    for (name, exe) in &bins.tests {
        tests.extend(list_tests(name, exe)?);
    }
    if let Some(f) = &opts.filter {
        tests.retain(|t| t.id().contains(f.as_str()));
    }
    if tests.is_empty() {
        bail!("no integration tests to run");
    }
    let initramfs = vm_dir.join("initramfs.cpio");
    write_initramfs(&initramfs, &busybox, &bins, &tests)?;
    eprintln!(
        "vm-test: {} tests on {} kernels (prepared in {:.0?})",
        tests.len(),
        kernels.len(),
        started.elapsed()
    );

    let runs = boot_all(&vm_dir, &initramfs, kernels, &tests)?;
    let failed = report(&runs);
    eprintln!("vm-test: total {:.0?}", started.elapsed());
    if failed {
        bail!("vm-test failed on at least one kernel");
    }
    Ok(())
}

fn which(tool: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .with_context(|| format!("{tool} not found in PATH"))
}

struct StaticBins {
    leaktrace: PathBuf,
    leakgen: PathBuf,
    /// Test target name → executable.
    tests: BTreeMap<String, PathBuf>,
}

/// Static builds in their own target directory, so the host's release build is
/// not invalidated by the different flags. Frame pointers stay on: the tests
/// look for leakgen's function names in user stacks.
fn build_static(root: &Path, vm_dir: &Path) -> Result<StaticBins> {
    let target_dir = vm_dir.join("build");
    let flags = "-C force-frame-pointers=yes -C target-feature=+crt-static";
    let cargo = |args: &[&str]| {
        let mut c = Command::new("cargo");
        c.current_dir(root)
            .args(args)
            .args(["--release", "--target", TARGET, "--target-dir"])
            .arg(&target_dir)
            // Only the target's flags: build scripts stay dynamic host programs.
            .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", flags);
        c
    };
    let status = cargo(&[
        "build",
        "--package",
        "leaktrace",
        "--package",
        "leaktrace-tests",
        "--bins",
    ])
    .status()
    .context("building static leaktrace and leakgen")?;
    if !status.success() {
        bail!("static build of leaktrace/leakgen failed ({status})");
    }
    let out = cargo(&[
        "test",
        "--package",
        "leaktrace-tests",
        "--tests",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit())
    .output()
    .context("building the static integration test executables")?;
    if !out.status.success() {
        bail!(
            "static build of the integration tests failed ({})",
            out.status
        );
    }
    let mut tests = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
        ) {
            tests.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    if tests.is_empty() {
        bail!("cargo reported no integration test executables");
    }
    let release = target_dir.join(TARGET).join("release");
    let bins = StaticBins {
        leaktrace: release.join("leaktrace"),
        leakgen: release.join("leakgen"),
        tests,
    };
    for exe in [&bins.leaktrace, &bins.leakgen]
        .into_iter()
        .chain(bins.tests.values())
    {
        ensure_static(exe)?;
    }
    Ok(bins)
}

/// The guest has no libc: a dynamically linked executable would fail there with
/// a confusing "not found", so refuse it here.
fn ensure_static(exe: &Path) -> Result<()> {
    let elf = fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{} is not an ELF executable", exe.display());
    };
    const PT_INTERP: u32 = 3;
    for i in 0..usize::from(phnum) {
        let o = phoff as usize + i * usize::from(phentsize);
        if elf
            .get(o..o + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
        {
            bail!(
                "{} is dynamically linked; the VM needs static executables",
                exe.display()
            );
        }
    }
    Ok(())
}

/// The test executables are static, so the host can list their tests.
fn list_tests(bin: &str, exe: &Path) -> Result<Vec<TestCase>> {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests in {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} --list failed ({})", exe.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(|name| TestCase {
            bin: bin.to_string(),
            name: name.to_string(),
        })
        .collect())
}

fn write_initramfs(
    path: &Path,
    busybox: &Path,
    bins: &StaticBins,
    tests: &[TestCase],
) -> Result<()> {
    let mut c = cpio::Cpio::create(path)?;
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "tests"] {
        c.dir(d)?;
    }
    c.char_dev("dev/console", 5, 1)?;
    c.file_from("bin/busybox", busybox)?;
    c.file_from("bin/leaktrace", &bins.leaktrace)?;
    c.file_from("bin/leakgen", &bins.leakgen)?;
    for (name, exe) in &bins.tests {
        c.file_from(&format!("tests/{name}"), exe)?;
    }
    c.file("init", init_script(tests).as_bytes())?;
    c.finish()
}

fn init_script(tests: &[TestCase]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp
export LEAKTRACE_BIN=/bin/leaktrace LEAKGEN_BIN=/bin/leakgen LEAKTRACE_VM_GUEST=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
echo "@@@KERNEL $(uname -r)"
if [ -d /sys/bus/event_source/devices/kprobe ]; then echo "@@@KPROBES yes"; else echo "@@@KPROBES no"; fi
# tracefs is left unmounted for this first run: leaktrace must mount it itself.
leaktrace --cache kmalloc-512 --duration 1s --json >/dev/null 2>/tmp/hooks
echo "@@@HOOKS $(grep hooks: /tmp/hooks || cat /tmp/hooks)"
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
t() {
  echo "@@@BEGIN $1 $2"
  cd /tmp
"#,
    );
    s += &format!(
        "  timeout {TEST_TIMEOUT_S} /tests/$1 --exact \"$2\" --nocapture --test-threads=1 2>&1\n"
    );
    s += "  rc=$?\n  echo\n  echo \"@@@END $1 $2 $rc\"\n}\n";
    for t in tests {
        s += &format!("t {} {}\n", t.bin, t.name);
    }
    s += "echo \"@@@DONE\"\npoweroff -f\n";
    s
}

fn boot_all(
    vm_dir: &Path,
    initramfs: &Path,
    kernels: Vec<kernels::Kernel>,
    tests: &[TestCase],
) -> Result<Vec<KernelRun>> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let lanes = cpus.min(kernels.len()).max(1);
    let smp = (cpus / lanes).max(1);
    let kvm = kvm_usable();
    eprintln!(
        "vm-test: booting {} kernels, {lanes} at a time, {smp} vCPU each, {}",
        kernels.len(),
        if kvm {
            "KVM"
        } else {
            "TCG (no vmx/svm in /proc/cpuinfo)"
        }
    );
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..lanes {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(k) = kernels.get(i) else { break };
                let run = boot(vm_dir, initramfs, k.clone(), tests, smp, kvm);
                if let Ok(mut d) = done.lock() {
                    d.push((i, run));
                }
            });
        }
    });
    let mut done = done
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a VM thread panicked"))?;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// KVM only with hardware virtualisation: a paravirtual /dev/kvm (PVM) exists on
/// some cloud VMs but cannot boot stock kernels.
fn kvm_usable() -> bool {
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && Path::new("/dev/kvm").exists()
}

fn boot(
    vm_dir: &Path,
    initramfs: &Path,
    kernel: kernels::Kernel,
    tests: &[TestCase],
    smp: usize,
    kvm: bool,
) -> Result<KernelRun> {
    let run_dir = vm_dir.join("run");
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let log = run_dir.join(format!("{}.console.log", kernel.series));
    let qemu_err = run_dir.join(format!("{}.qemu.log", kernel.series));
    let _ = fs::remove_file(&log);
    let accel: &[&str] = if kvm {
        &["-accel", "kvm", "-cpu", "host"]
    } else {
        &["-accel", "tcg", "-cpu", "max"]
    };
    let qemu_out =
        File::create(&qemu_err).with_context(|| format!("creating {}", qemu_err.display()))?;
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(accel)
        .args(["-smp", &smp.to_string(), "-m", "2048"])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 loglevel=2 panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(
            qemu_out
                .try_clone()
                .context("duplicating the QEMU log handle")?,
        )
        .stderr(qemu_out)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let limit = Duration::from_secs(GUEST_SLACK_S + TEST_TIMEOUT_S * tests.len() as u64);
    let mut timed_out = false;
    loop {
        if child.try_wait().context("waiting for QEMU")?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let wall = started.elapsed();
    let console = fs::read(&log).unwrap_or_default();
    let mut run = parse_console(&String::from_utf8_lossy(&console), tests, kernel, log);
    run.wall = wall;
    if timed_out {
        run.guest_error = Some(format!("QEMU killed after {limit:?}"));
    } else if run.guest_error.is_some() {
        let qemu = fs::read_to_string(&qemu_err).unwrap_or_default();
        if !qemu.trim().is_empty() {
            run.guest_error = run
                .guest_error
                .map(|e| format!("{e}; QEMU said: {}", qemu.trim()));
        }
    }
    Ok(run)
}

fn parse_console(
    console: &str,
    tests: &[TestCase],
    kernel: kernels::Kernel,
    log: PathBuf,
) -> KernelRun {
    let mut run = KernelRun {
        kernel,
        uname: None,
        hooks: None,
        kprobes: None,
        results: Vec::new(),
        guest_error: None,
        log,
        wall: Duration::ZERO,
    };
    let mut current: Option<(String, String, Vec<String>)> = None;
    let mut finished = BTreeMap::new();
    let mut done = false;
    for raw in console.split('\n') {
        let raw = raw.trim_end_matches('\r');
        let Some(at) = raw.find("@@@") else {
            if let Some((_, _, out)) = current.as_mut() {
                out.push(raw.to_string());
            }
            continue;
        };
        let line = &raw[at + 3..];
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        match tag {
            "KERNEL" => run.uname = Some(rest.to_string()),
            "KPROBES" => run.kprobes = Some(rest.to_string()),
            "HOOKS" => run.hooks = Some(rest.trim_start_matches("leaktrace: ").to_string()),
            "BEGIN" => {
                let (bin, name) = rest.split_once(' ').unwrap_or((rest, ""));
                current = Some((bin.to_string(), name.to_string(), Vec::new()));
            }
            "END" => {
                if let Some((bin, name, out)) = current.take() {
                    let rc = rest.rsplit(' ').next().and_then(|r| r.parse::<i32>().ok());
                    finished.insert(format!("{bin}::{name}"), classify(rc, &out));
                }
            }
            "DONE" => done = true,
            _ => {}
        }
    }
    for t in tests {
        let outcome = finished.remove(&t.id()).unwrap_or_else(|| {
            let partial = current
                .as_ref()
                .filter(|(b, n, _)| format!("{b}::{n}") == t.id())
                .map(|(_, _, out)| out.join("\n"))
                .unwrap_or_default();
            Outcome::Failed(format!("no result: the guest stopped first\n{partial}"))
        });
        run.results.push((t.clone(), outcome));
    }
    if !done {
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        run.guest_error = Some(format!(
            "the guest did not finish (no @@@DONE); console tail:\n{}",
            tail.join("\n")
        ));
    }
    run
}

fn classify(rc: Option<i32>, out: &[String]) -> Outcome {
    let text = out.join("\n");
    match rc {
        Some(0) => {
            if let Some(reason) = out
                .iter()
                .find_map(|l| l.split_once("skipped:").map(|(_, r)| r.trim().to_string()))
            {
                Outcome::Skipped(reason)
            } else if text.contains("test result: ok. 1 passed") {
                Outcome::Passed
            } else {
                Outcome::Failed(format!("the test did not run:\n{text}"))
            }
        }
        Some(124) | Some(143) => Outcome::Failed(format!(
            "timed out after {TEST_TIMEOUT_S}s in the guest:\n{text}"
        )),
        Some(rc) => Outcome::Failed(format!("exit {rc}:\n{text}")),
        None => Outcome::Failed(format!("no exit status:\n{text}")),
    }
}

/// Prints the per-kernel, per-test report; true if any kernel failed.
fn report(runs: &[KernelRun]) -> bool {
    let mut any_failed = false;
    println!();
    for r in runs {
        let k = &r.kernel;
        println!(
            "== {} — {} ({}), {:.0?}: {}",
            k.series,
            r.uname.as_deref().unwrap_or(&k.abi),
            k.version,
            r.wall,
            if r.failed() { "FAILED" } else { "ok" }
        );
        println!(
            "   kprobes in guest: {}; leaktrace {}",
            r.kprobes.as_deref().unwrap_or("?"),
            r.hooks.as_deref().unwrap_or("reported no hooks line")
        );
        for (t, o) in &r.results {
            match o {
                Outcome::Passed => println!("   pass {}", t.id()),
                Outcome::Skipped(why) => println!("   skip {} — {why}", t.id()),
                Outcome::Failed(out) => {
                    println!("   FAIL {}", t.id());
                    for l in out.lines() {
                        println!("        | {l}");
                    }
                }
            }
        }
        if let Some(e) = &r.guest_error {
            println!("   guest: {e}");
        }
        if r.failed() {
            println!("   console log: {}", r.log.display());
            any_failed = true;
        }
    }
    println!();
    println!(
        "{:<6} {:<28} {:>6} {:>7} {:>6}  result",
        "series", "kernel", "passed", "skipped", "failed"
    );
    for r in runs {
        println!(
            "{:<6} {:<28} {:>6} {:>7} {:>6}  {}",
            r.kernel.series,
            r.uname.as_deref().unwrap_or(&r.kernel.abi),
            r.count(|o| matches!(o, Outcome::Passed)),
            r.count(|o| matches!(o, Outcome::Skipped(_))),
            r.count(|o| matches!(o, Outcome::Failed(_))),
            if r.failed() { "FAILED" } else { "ok" }
        );
    }
    any_failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(bin: &str, name: &str) -> TestCase {
        TestCase {
            bin: bin.into(),
            name: name.into(),
        }
    }

    fn kernel() -> kernels::Kernel {
        kernels::Kernel {
            series: "5.10".into(),
            abi: "5.10.0-46-cloud-amd64".into(),
            version: "5.10.262-1".into(),
            vmlinux: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn console_markers_give_pass_skip_fail_and_missing() {
        let console = "SeaBIOS\r\n@@@KERNEL 5.10.0-46-cloud-amd64\r\n@@@HOOKS leaktrace: hooks: tracepoints x\r\n\
            @@@BEGIN cli a\r\nrunning 1 test\r\ntest a ... ok\r\ntest result: ok. 1 passed; 0 failed\r\n\r\n@@@END cli a 0\r\n\
            @@@BEGIN slab b\r\nskipped: no name field\r\ntest result: ok. 1 passed\r\n@@@END slab b 0\r\n\
            @@@BEGIN slab c\r\nthread panicked at boom\r\n@@@END slab c 101\r\n\
            @@@BEGIN slab d\r\n[   12.3] Kernel panic\r\n";
        let tests = [
            case("cli", "a"),
            case("slab", "b"),
            case("slab", "c"),
            case("slab", "d"),
        ];
        let r = parse_console(console, &tests, kernel(), PathBuf::new());
        assert_eq!(r.uname.as_deref(), Some("5.10.0-46-cloud-amd64"));
        assert_eq!(r.hooks.as_deref(), Some("hooks: tracepoints x"));
        assert!(matches!(r.results[0].1, Outcome::Passed));
        assert!(matches!(&r.results[1].1, Outcome::Skipped(w) if w == "no name field"));
        assert!(matches!(&r.results[2].1, Outcome::Failed(o) if o.contains("boom")));
        assert!(matches!(&r.results[3].1, Outcome::Failed(o) if o.contains("Kernel panic")));
        assert!(r.guest_error.is_some(), "no @@@DONE");
        assert!(r.failed());
    }

    #[test]
    fn a_filter_matching_nothing_is_not_a_pass() {
        let out = vec![
            "running 0 tests".to_string(),
            "test result: ok. 0 passed".into(),
        ];
        assert!(matches!(classify(Some(0), &out), Outcome::Failed(_)));
    }
}
