//! Builds the eBPF objects from `tracer-ebpf/` so `leaktrace` can embed them: one file
//! to copy to a node. One object per tool (`leaktrace-slab`, `leaktrace-memcg`), so
//! each run creates only its own tool's maps. The eBPF build needs nightly (`-Z build-std=core`) and
//! bpf-linker; `cargo xtask setup` installs both and every xtask command runs it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    if let Err(err) = build() {
        eprintln!("error: building leaktrace's eBPF object failed: {err}");
        eprintln!("hint: run `cargo xtask setup` (installs nightly rust-src and bpf-linker), then build again");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let workspace = manifest_dir
        .parent()
        .ok_or("tracer/ has no parent directory")?;
    let ebpf_dir = workspace.join("tracer-ebpf");
    let common_dir = workspace.join("tracer-common");
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=LEAKTRACE_BPF_DIR");

    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);

    // Prebuilt objects (e.g. a CI artifact: the nightly build's
    // `bpfel-unknown-none/release/` directory) skip the nightly toolchain.
    if let Some(prebuilt) = env::var_os("LEAKTRACE_BPF_DIR") {
        for object in OBJECTS {
            let from = Path::new(&prebuilt).join(object);
            std::fs::copy(&from, out_dir.join(format!("{object}.bpf.o")))
                .map_err(|e| format!("copying {} (LEAKTRACE_BPF_DIR): {e}", from.display()))?;
        }
        return Ok(());
    }

    // OUT_DIR is <target>/<profile>/build/leaktrace-<hash>/out; keep the eBPF build
    // next to it so it is cached per profile and cleaned by `cargo clean`.
    let target_dir = out_dir
        .ancestors()
        .nth(3)
        .map(|profile| profile.join("ebpf"))
        .ok_or("unexpected OUT_DIR layout")?;

    let status = nightly_cargo()
        .current_dir(workspace)
        .args(["build", "--package", "tracer-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .map_err(|e| format!("running nightly cargo: {e}"))?;
    if !status.success() {
        return Err(format!("nightly cargo exited with {status}"));
    }
    for object in OBJECTS {
        let built = target_dir.join("bpfel-unknown-none/release").join(object);
        copy_if_changed(&built, &out_dir.join(format!("{object}.bpf.o")))?;
    }
    Ok(())
}

/// The `[[bin]]` targets of `tracer-ebpf`: one eBPF object per tool.
const OBJECTS: [&str; 2] = ["leaktrace-slab", "leaktrace-memcg"];

/// `rustup run nightly cargo`, with the outer build's toolchain and flags removed
/// so they do not leak into the BPF target build.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<(), String> {
    let new = std::fs::read(from).map_err(|e| format!("reading {}: {e}", from.display()))?;
    if std::fs::read(to).ok().as_deref() == Some(new.as_slice()) {
        return Ok(());
    }
    std::fs::write(to, new).map_err(|e| format!("writing {}: {e}", to.display()))
}
