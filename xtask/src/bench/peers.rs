//! The peers leaktrace is compared with (installed by `cargo xtask setup`,
//! which `bench` runs first); a peer that cannot run is skipped with the reason.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::{Ready, Tracer};

/// The leak tracer a bpftrace user would write: pointer -> (pid, kernel stack)
/// for 512-byte allocations, deleted on free. `clear` keeps bpftrace from
/// printing the map at exit.
const BPFTRACE_SCRIPT: &str = "\
tracepoint:kmem:kmalloc /args->bytes_alloc == 512/ { @live[args->ptr] = (pid, kstack); }
tracepoint:kmem:kfree { delete(@live[args->ptr]); }
END { clear(@live); }
";

/// bcc compiles memleak against kernel headers; Debian 12 packages them for
/// 6.1 only, and memleak's tracepoint-only kernel mode does not care that the
/// running kernel is newer.
const HEADERS_SERIES: &str = "6.1";

pub fn prepare(work: &Path) -> (Vec<Tracer>, Vec<(String, String)>) {
    let mut tracers = Vec::new();
    let mut skipped = Vec::new();
    let mut add = |name: &str, r: Result<Tracer>| match r {
        Ok(t) => tracers.push(t),
        Err(e) => {
            eprintln!("xtask bench: skipping {name}: {e:#}");
            skipped.push((name.to_string(), format!("{e:#}")));
        }
    };
    add("bpftrace", bpftrace(work));
    add("memleak-bpfcc", memleak(work));
    add("perf stat", perf());
    (tracers, skipped)
}

fn bpftrace(work: &Path) -> Result<Tracer> {
    let program = ensure_tool("bpftrace", "bpftrace")?;
    let script = work.join("leak.bt");
    std::fs::write(&script, BPFTRACE_SCRIPT)
        .with_context(|| format!("writing {}", script.display()))?;
    Ok(Tracer {
        name: "bpftrace ptr->(pid,kstack)".into(),
        program,
        args: vec![script.display().to_string()],
        env: vec![],
        ready: Ready::Line("Attaching"),
    })
}

fn memleak(work: &Path) -> Result<Tracer> {
    let program = ensure_tool("memleak-bpfcc", "bpfcc-tools")?;
    let headers = ensure_headers(work).context("kernel headers for bcc")?;
    Ok(Tracer {
        name: "memleak-bpfcc -z 512 -Z 512".into(),
        program,
        args: ["-z", "512", "-Z", "512"].map(String::from).to_vec(),
        env: vec![("BCC_KERNEL_SOURCE".into(), headers.display().to_string())],
        // Printed once BPF() has compiled and auto-attached the tracepoints.
        ready: Ready::LineThenSettle("Attaching to kernel allocators", Duration::from_millis(300)),
    })
}

fn perf() -> Result<Tracer> {
    let program = ensure_tool("perf", "linux-perf")?;
    Ok(Tracer {
        name: "perf stat -e kmem:kmalloc".into(),
        program,
        // System-wide, as a tracer of the whole node would be.
        args: ["stat", "-a", "-e", "kmem:kmalloc"]
            .map(String::from)
            .to_vec(),
        env: vec![],
        // perf stat prints nothing until it stops.
        ready: Ready::Settle(Duration::from_secs(1)),
    })
}

/// The path of `cmd`; `bench` ran setup, so a missing one is a broken install.
fn ensure_tool(cmd: &str, package: &str) -> Result<PathBuf> {
    which(cmd).with_context(|| {
        format!("no {cmd} on PATH (Debian package {package}); run `cargo xtask setup` as root")
    })
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// A merged Debian `linux-headers-<abi>-amd64` + `-common` tree under
/// `work/headers/`, built once (a `.complete` stamp marks it done).
fn ensure_headers(work: &Path) -> Result<PathBuf> {
    let abi = newest_headers_abi()?;
    let dir = work.join("headers");
    let merged = dir.join(format!("linux-headers-{abi}"));
    if merged.join(".complete").is_file() {
        return Ok(merged);
    }
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let pkgs = [
        format!("linux-headers-{abi}-common"),
        format!("linux-headers-{abi}-amd64"),
    ];
    run(Command::new("apt-get")
        .arg("download")
        .args(&pkgs)
        .current_dir(&debs))?;
    let extract = dir.join("extract");
    for entry in std::fs::read_dir(&debs).with_context(|| format!("listing {}", debs.display()))? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extract))?;
        }
    }
    // The -amd64 tree refers to the -common one by relative paths that only
    // work inside /usr/src; copying both into one directory removes that.
    std::fs::create_dir_all(&merged).with_context(|| format!("creating {}", merged.display()))?;
    for p in &pkgs {
        let src = extract.join("usr/src").join(p);
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&merged))?;
    }
    std::fs::write(merged.join(".complete"), "")
        .with_context(|| format!("stamping {}", merged.display()))?;
    Ok(merged)
}

/// The newest `6.1.0-N` for which apt knows an amd64 headers package.
fn newest_headers_abi() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only"])
        .arg(format!(
            "^linux-headers-{}\\.[0-9]+-[0-9]+-amd64$",
            HEADERS_SERIES.replace('.', "\\.")
        ))
        .output()
        .context("running apt-cache search")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| {
            let abi = l
                .split_whitespace()
                .next()?
                .strip_prefix("linux-headers-")?
                .strip_suffix("-amd64")?;
            let n: u32 = abi.rsplit('-').next()?.parse().ok()?;
            Some((n, abi.to_string()))
        })
        .max()
        .map(|(_, abi)| abi)
        .with_context(|| {
            format!("apt knows no linux-headers-{HEADERS_SERIES}.*-amd64 package (not Debian 12?)")
        })
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
