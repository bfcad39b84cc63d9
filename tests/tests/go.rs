//! Go programs, default and stripped (`-ldflags '-s -w'`), hold kmalloc-512
//! objects from `main.leakKeys` called by `main.retryConnect`: leaktrace names
//! both (from Go's own `.gopclntab`) in the user stack. Needs root and a Go
//! toolchain (Debian's `golang-go`, installed by `cargo xtask setup`), or the
//! binaries prebuilt in `$LEAKKEYS_GO_DIR`.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use leaktrace_tests::*;
use serde_json::Value;

// Tests here that look for a held object's user frames in the default mode
// pass `--stack-sample 4` (or hold 1,000 objects): their subject is not the
// sampling, and at 1 in 4 the chance that none of 64 held objects is drawn
// (leaving them under the call site only, marked partial) is (3/4)^64 ≈ 1e-8.
const WAIT: Duration = Duration::from_secs(30);
const N: u64 = 64;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/lib/go/bin")])
        .map(|d| d.join(name))
        .find(|p| p.exists())
}

/// The Go toolchain. None only in a vm-test guest, which has no toolchain;
/// on the host a missing one fails the test (installing it is setup's job).
fn go() -> Option<PathBuf> {
    if let Some(go) = which("go") {
        return Some(go);
    }
    assert!(
        std::env::var_os("LEAKTRACE_VM_GUEST").is_some(),
        "no `go` on PATH (Debian package golang-go); run `cargo xtask setup` as root"
    );
    None
}

fn name(program: &str, stripped: bool) -> String {
    if stripped {
        format!("{program}-stripped")
    } else {
        program.to_string()
    }
}

/// tests/go/leakkeys, prebuilt in $LEAKKEYS_GO_DIR (a guest without a
/// toolchain) or built under target/ with Go's build cache in
/// target/go-cache, so a rerun only links.
fn binary(stripped: bool) -> Option<PathBuf> {
    go_binary("leakkeys", stripped)
}

/// tests/go/PROGRAM, built like [`binary`].
fn go_binary(program: &str, stripped: bool) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LEAKKEYS_GO_DIR") {
        let bin = PathBuf::from(dir).join(name(program, stripped));
        assert!(bin.exists(), "LEAKKEYS_GO_DIR has no {}", bin.display());
        return Some(bin);
    }
    let go = go()?;
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = root().join("target/go-test");
    std::fs::create_dir_all(&out).expect("creating target/go-test");
    let bin = out.join(name(program, stripped));
    let mut cmd = Command::new(go);
    cmd.current_dir(root().join("tests/go").join(program))
        .env("GOCACHE", root().join("target/go-cache"))
        .args(["build", "-o"])
        .arg(&bin);
    if stripped {
        cmd.args(["-ldflags", "-s -w"]);
    }
    let st = cmd.arg(".").status().expect("running go build");
    assert!(st.success(), "go build of tests/go/{program} failed: {st}");
    Some(bin)
}

/// Whether the ELF file has a symbol table: its section-name table lists
/// `.symtab` only then.
fn has_symtab(bin: &Path) -> bool {
    let data = std::fs::read(bin).expect("reading the Go binary");
    data.windows(9).any(|w| w == b"\0.symtab\0")
}

fn user_frames(stack: &Value) -> Vec<&str> {
    stack["user"]
        .as_array()
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn held_keys_named(stripped: bool) {
    let bin = binary(stripped);
    skip_unless!(
        bin.is_some(),
        "no Go toolchain in this vm-test guest; set LEAKKEYS_GO_DIR to prebuilt \
         tests/go/leakkeys binaries (leakkeys, leakkeys-stripped)"
    );
    let Some(bin) = bin else { return };
    assert_eq!(
        has_symtab(&bin),
        !stripped,
        "{} should {}have a symbol table",
        bin.display(),
        if stripped { "not " } else { "" }
    );
    let mut tracer = Tracer::top("kmalloc-512", &["--stack-sample", "4"]).expect("start leaktrace");
    let mut cmd = Command::new(&bin);
    cmd.arg(N.to_string());
    let mut gen = Generator::start_command(cmd).expect("go leakkeys");
    let pid = gen.pid;

    let held = tracer
        .wait_for("N outstanding keys under main.leakKeys", WAIT, |r| {
            outstanding_on(r, pid, "user_preparse", "main.leakKeys") >= N
        })
        .expect("attribution to main.leakKeys");
    let stack = stacks_matching(&held, pid, "user_preparse", "main.leakKeys")
        .max_by_key(|s| count(s, "outstanding"))
        .expect("a stack");
    let frames = user_frames(stack);
    let pos = |name: &str| {
        frames
            .iter()
            .position(|f| f.starts_with(&format!("{name}+")))
            .unwrap_or_else(|| panic!("no {name} frame in {frames:#?}"))
    };
    // Caller below callee, each named with its source position.
    assert!(
        pos("main.leakKeys") < pos("main.retryConnect"),
        "{frames:#?}"
    );
    assert!(pos("main.retryConnect") < pos("main.main"), "{frames:#?}");
    assert!(pos("main.main") < pos("runtime.main"), "{frames:#?}");
    assert!(
        frames[pos("main.leakKeys")].contains("main.go:"),
        "no file:line in {frames:#?}"
    );
    // Fully named: no bare module offsets or unknown addresses, and the walk
    // reached the goroutine's first frame.
    let file = bin.file_name().and_then(|f| f.to_str()).unwrap_or("?");
    for f in &frames {
        assert!(
            !f.starts_with("[unknown]")
                && !f.starts_with(&format!("{file}+"))
                && !f.starts_with('['),
            "unnamed frame {f:?} in {frames:#?}"
        );
    }
    assert!(
        frames
            .last()
            .is_some_and(|f| f.starts_with("runtime.goexit")),
        "stack does not end at runtime.goexit: {frames:#?}"
    );

    gen.release().expect("release");
    tracer
        .wait_for("the keys seen freed", WAIT, |r| {
            allocated_by(r, pid, "user_preparse", "main.leakKeys") == 0
        })
        .expect("frees");
    gen.finish().expect("leakkeys exit");
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
}

#[test]
fn go_user_stack_is_named() {
    held_keys_named(false);
}

#[test]
fn stripped_go_user_stack_is_named_from_gopclntab() {
    held_keys_named(true);
}

/// The kubelet shape: a stripped Go program whose retry-loop goroutine holds
/// N keys while another goroutine makes 50 times as many that are freed at
/// once, both through syscall.Syscall6 into user_preparse. The default
/// (sampled) mode must put the held objects under main.retryConnect.
#[test]
fn stripped_go_retry_loop_is_named_beside_a_busier_goroutine() {
    // Stacks of 1 in 64: (63/64)^1000 ≈ 1.5e-7 that no held key is drawn.
    const N: u64 = 1000;
    let bin = go_binary("twopath", true);
    skip_unless!(
        bin.is_some(),
        "no Go toolchain; set LEAKKEYS_GO_DIR to prebuilt tests/go binaries (twopath-stripped)"
    );
    let Some(bin) = bin else { return };
    // 64 MiB of ring: 51,000 allocations in a burst (see attribution.rs).
    let mut tracer = Tracer::top("kmalloc-512", &["--stacks", "20", "--ringbuf-mib", "64"])
        .expect("start leaktrace");
    let mut cmd = Command::new(&bin);
    cmd.arg(N.to_string());
    let mut gen = Generator::start_command(cmd).expect("go twopath");
    let pid = gen.pid;
    let held = tracer
        .wait_for("N outstanding keys on user_preparse", WAIT, |r| {
            outstanding_on(r, pid, "user_preparse", "") >= N
        })
        .expect("held keys");
    let retry = outstanding_on(&held, pid, "user_preparse", "main.retryConnect");
    let busy = outstanding_on(&held, pid, "user_preparse", "main.busyTraffic");
    let p = process(&held, pid).expect("listed");
    assert!(
        retry * 100 >= N * 95,
        "≥95% of {N} held keys must be under main.retryConnect, got {retry} (busyTraffic {busy}): {p:#}"
    );
    assert!(
        busy <= N / 50,
        "busyTraffic holds nothing, got {busy}: {p:#}"
    );
    gen.release().expect("release");
    gen.finish().expect("twopath exits");
    let (code, _) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
}

/// Issue 23's founding shape in a real Go client: a stripped program dials a
/// closed port on 127.0.0.1 once a second, 10 times (one `TCP` socket per
/// attempt, freed when the refused connect is closed). In the default mode,
/// sorted by rate, the attempts show under a full stack that names the dial
/// path in Go terms (a census of the new stratum draws them all), in the text
/// report and in the pprof profile.
#[test]
fn a_stripped_go_dial_retry_loop_is_named_in_the_default_mode() {
    // A named cache needs kmem_cache_alloc's name (see attribution.rs).
    skip_unless!(
        tracepoint_has_field("kmem", "kmem_cache_alloc", "name")
            || raw_tracepoint_described("kmem_cache_alloc"),
        "kmem:kmem_cache_alloc names no cache on this kernel, so --cache TCP is refused"
    );
    let bin = go_binary("dialloop", true);
    skip_unless!(
        bin.is_some(),
        "no Go toolchain; set LEAKKEYS_GO_DIR to prebuilt tests/go binaries (dialloop-stripped)"
    );
    let Some(bin) = bin else { return };
    let dir = std::env::temp_dir().join(format!("leaktrace-dialloop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let profile = dir.join("dial.pb.gz");
    let mut tracer = Command::new(leaktrace_bin())
        .args(["--cache", "TCP", "--sort", "rate", "--comm", "dialloop"])
        .arg("--pprof")
        .arg(&profile)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn leaktrace");
    let stderr = tracer.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let attached = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("attached to"));
    assert!(attached, "leaktrace did not attach");
    std::thread::spawn(move || lines.for_each(drop));
    let out = Command::new(&bin)
        .args(["10", "127.0.0.1:1"])
        .output()
        .expect("run dialloop");
    assert!(out.status.success(), "dialloop: {out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = said
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("dialloop printed {said:?}"));
    assert!(
        said.contains("refused=10"),
        "every dial must be refused: {said}"
    );
    // SAFETY: kill with a child pid we own.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let done = tracer.wait_with_output().expect("leaktrace exits");
    assert!(done.status.success(), "{done:?}");
    let text = String::from_utf8_lossy(&done.stdout);
    // The process's block of the final report, up to the next section.
    let block = text
        .split("\n\n")
        .find(|b| b.contains(&format!("\n{pid:>8} ")) || b.contains(&format!(" {pid} ")))
        .unwrap_or_else(|| panic!("no row for pid {pid}:\n{text}"));
    for frame in [
        "sk_prot_alloc",
        "net.(*Dialer).DialContext",
        "main.dialAPIServer",
        "main.retryLoop",
    ] {
        assert!(block.contains(frame), "no {frame} in the report:\n{block}");
    }
    assert!(
        !block.contains("only the frames all share"),
        "the attempts must have full stacks:\n{block}"
    );
    assert!(
        block.contains("10 allocs, 10 frees"),
        "each attempt exactly once:\n{block}"
    );
    // vm-test guests carry the Go programs prebuilt but no toolchain.
    let Some(go) = which("go") else {
        println!("not checked here: the pprof profile (no go tool pprof in this vm-test guest)");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let traces = Command::new(go)
        .args(["tool", "pprof", "-traces", "-sample_index=alloc_objects"])
        .arg(format!("-tagfocus=pid={pid}"))
        .arg(&profile)
        .env("HOME", &dir)
        .env("PPROF_TMPDIR", &dir)
        .output()
        .expect("go tool pprof");
    let traces = String::from_utf8_lossy(&traces.stdout);
    for frame in [
        "sk_prot_alloc",
        "net.(*Dialer).DialContext",
        "main.dialAPIServer",
    ] {
        assert!(
            traces.contains(frame),
            "pprof -traces lacks {frame}:\n{traces}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
