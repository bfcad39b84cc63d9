//! Everything the build, the tests, vm-test and bench run, installed
//! idempotently: nightly with rust-src (for `-Z build-std=core`), bpf-linker
//! linked against the nightly toolchain's own libLLVM (so the linker and rustc
//! always agree on the LLVM version), and the Debian packages whose commands the
//! tests and xtask call. A fresh machine needs no manual step; a prepared one
//! pays a PATH lookup per command.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What a task is about to run, and so which host commands it needs.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Needs {
    /// `build`, `run`: the eBPF toolchain only.
    Build,
    /// `test` and `vm-test` (`.ci/run` runs both): the tools the tests drive and
    /// the ones that unpack and boot the guest kernels.
    Test,
    /// `bench` and `setup`: also the peers leaktrace is measured against.
    Everything,
}

/// A command run by a test or an xtask, and the Debian package that has it.
struct Tool {
    command: &'static str,
    package: &'static str,
    needed_by: Needs,
}

const fn tool(command: &'static str, package: &'static str, needed_by: Needs) -> Tool {
    Tool {
        command,
        package,
        needed_by,
    }
}

const TOOLS: &[Tool] = &[
    // tests/tests/outputs.rs, go.rs and the gosym unit tests.
    tool("go", "golang-go", Needs::Test),
    tool("promtool", "prometheus", Needs::Test),
    tool("tmux", "tmux", Needs::Test),
    // tests/tests/serve.rs makes its CA, server and client certificates.
    tool("openssl", "openssl", Needs::Test),
    tool("curl", "curl", Needs::Test),
    tool("sh", "dash", Needs::Test),
    // vm-test: boot, unpack kernel .debs, decompress bzImage payloads, fetch
    // kernels through a private apt configuration.
    tool("qemu-system-x86_64", "qemu-system-x86", Needs::Test),
    tool("dpkg-deb", "dpkg", Needs::Test),
    tool("tar", "tar", Needs::Test),
    tool("xz", "xz-utils", Needs::Test),
    tool("zstd", "zstd", Needs::Test),
    tool("lz4", "lz4", Needs::Test),
    tool("gzip", "gzip", Needs::Test),
    tool("apt-get", "apt", Needs::Test),
    // tests/tests/attribution.rs builds a C generator without frame pointers.
    tool("cc", "gcc", Needs::Test),
    // tests/tests/memcg.rs runs real containers: podman + runc from a local
    // busybox rootfs (no image pull, no network).
    tool("podman", "podman", Needs::Test),
    tool("runc", "runc", Needs::Test),
    tool("conmon", "conmon", Needs::Test),
    tool("busybox", "busybox-static", Needs::Test),
    // bench: the peers (bench/peers.rs), bcc's headers, the commit it records.
    tool("bpftrace", "bpftrace", Needs::Everything),
    tool("memleak-bpfcc", "bpfcc-tools", Needs::Everything),
    tool("perf", "linux-perf", Needs::Everything),
    tool("bpftool", "bpftool", Needs::Everything),
    tool("git", "git", Needs::Everything),
];

pub fn ensure(needs: Needs) -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_packages(needs)
}

/// Installs the packages of missing commands in one apt-get call, refreshing the
/// package lists first only then: a prepared machine never touches the network.
fn ensure_packages(needs: Needs) -> Result<()> {
    let mut missing: Vec<&Tool> = TOOLS
        .iter()
        .filter(|t| t.needed_by <= needs && find_command(t.command).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.dedup_by_key(|t| t.package);
    let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    let commands: Vec<&str> = missing.iter().map(|t| t.command).collect();
    let by_hand = format!(
        "apt-get install --no-install-recommends {}",
        packages.join(" ")
    );
    if find_command("apt-get").is_none() {
        bail!(
            "missing {}; this is not a Debian-like system (no apt-get): install their equivalents of `{by_hand}`",
            commands.join(", ")
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing {}; run `sudo {by_hand}` or run `cargo xtask setup` as root",
            commands.join(", ")
        );
    }
    eprintln!(
        "xtask: installing {} (for {})",
        packages.join(" "),
        commands.join(", ")
    );
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        // Wait for another apt or unattended-upgrades instead of failing at once.
        cmd.args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null());
        run(&mut cmd)
    };
    apt(&["-q", "update"]).context("refreshing apt's package lists")?;
    apt(&[
        &["-q", "-y", "install", "--no-install-recommends"][..],
        &packages[..],
    ]
    .concat())
    .with_context(|| format!("installing {}", packages.join(" ")))?;
    let still: Vec<&str> = commands
        .iter()
        .copied()
        .filter(|c| find_command(c).is_none())
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get installed {} but {} is still not on PATH",
            packages.join(" "),
            still.join(", ")
        );
    }
    Ok(())
}

/// `command -v`, plus the sbin directories a non-login root shell may lack
/// (bpftool lives in /usr/sbin).
fn find_command(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn ensure_nightly() -> Result<()> {
    let has_nightly = quiet(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]));
    if !has_nightly {
        eprintln!(
            "xtask: installing the nightly toolchain (needed to build eBPF with -Z build-std)"
        );
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?
            .trim(),
    );
    let (lib, soname, major) = nightly_llvm(&sysroot)?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let cache = Path::new(&home).join(".cache/leaktrace");
    let stamp = cache.join("bpf-linker.stamp");
    let want_stamp = format!("bpf-linker {BPF_LINKER_VERSION} {soname}");
    let linker_ok = quiet(
        Command::new("bpf-linker")
            .arg("--version")
            .env_remove("LD_LIBRARY_PATH"),
    );
    if linker_ok && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want_stamp) {
        return Ok(());
    }

    // bpf-linker's build looks for $LLVM_PREFIX/lib64/libLLVM.so and records that
    // directory as its runpath, where the loader then wants the versioned soname.
    let prefix = cache.join(format!("llvm-{soname}"));
    let lib64 = prefix.join("lib64");
    std::fs::create_dir_all(&lib64).with_context(|| format!("creating {}", lib64.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = lib64.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), lib.display()))?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (about a minute, once)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))?;
    if !quiet(
        Command::new("bpf-linker")
            .arg("--version")
            .env_remove("LD_LIBRARY_PATH"),
    ) {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    std::fs::write(&stamp, want_stamp).with_context(|| format!("writing {}", stamp.display()))
}

/// The nightly toolchain's libLLVM: (path, file name, LLVM major version).
fn nightly_llvm(sysroot: &Path) -> Result<(PathBuf, String, u32)> {
    let dir = sysroot.join("lib");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // e.g. libLLVM.so.22.1-rust-1.97.0-nightly
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version
                .split(['.', '-'])
                .next()
                .and_then(|m| m.parse().ok())
                .with_context(|| format!("cannot read the LLVM version from {name}"))?;
            return Ok((entry.path(), name, major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}; the nightly toolchain should ship one (reinstall it with `rustup toolchain install nightly`)",
        dir.display()
    )
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
