//! The eBPF toolchain, installed idempotently: nightly with rust-src (for
//! `-Z build-std=core`) and bpf-linker linked against the nightly toolchain's own
//! libLLVM, so the linker and rustc always agree on the LLVM version.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_memcg_container_packages()
}

/// Debian packages the memcg container test runs real containers with
/// (podman + runc from a local busybox rootfs: no image pull, no network).
const MEMCG_CONTAINER_PACKAGES: &[&str] = &["podman", "runc", "conmon", "busybox-static"];

fn ensure_memcg_container_packages() -> Result<()> {
    let missing: Vec<&str> = MEMCG_CONTAINER_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no memory effects.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !quiet(Command::new("apt-get").arg("--version")) {
        eprintln!(
            "xtask: not installing {} (needs root and apt-get): the memcg container test will fail",
            missing.join(" ")
        );
        return Ok(());
    }
    eprintln!(
        "xtask: installing {} (memcg container test)",
        missing.join(" ")
    );
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
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
