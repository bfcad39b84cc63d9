//! Harness for leaktrace's integration tests: run the real `leaktrace` binary
//! against the real kernel while `leakgen` makes allocations whose cache, count
//! and stacks are known exactly, and read leaktrace's JSON output.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    // `cargo xtask test` sets the variables; this fallback serves a plain
    // `cargo test --release` after `cargo build --release`.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    assert!(
        path.exists(),
        "{} not found; run the tests with `cargo xtask test` (it builds the binaries and sets {env})",
        path.display()
    );
    path
}

pub fn leaktrace_bin() -> PathBuf {
    binary("LEAKTRACE_BIN", "leaktrace")
}

pub fn leakgen_bin() -> PathBuf {
    binary("LEAKGEN_BIN", "leakgen")
}

/// A running `leaktrace … --json`, its JSON lines and stderr collected by threads.
pub struct Tracer {
    child: Child,
    lines: Receiver<Value>,
    stderr: Receiver<String>,
    pub stderr_seen: Vec<String>,
    pub prog_ids: Vec<u32>,
}

impl Tracer {
    /// Start `leaktrace --json ARGS` and wait until it reports it is attached.
    pub fn start(args: &[&str]) -> Result<Tracer> {
        Tracer::start_with_env(args, &[])
    }

    /// `leaktrace --json --cache CACHE --top --interval 250ms EXTRA`: the
    /// snapshots most tests poll, four a second.
    pub fn top(cache: &str, extra: &[&str]) -> Result<Tracer> {
        let mut args = vec!["--cache", cache, "--top", "--interval", "250ms"];
        args.extend_from_slice(extra);
        Tracer::start(&args)
    }

    /// [`Tracer::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Tracer> {
        let mut child = Command::new(leaktrace_bin())
            .arg("--json")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning leaktrace")?;
        let stdout = child.stdout.take().context("leaktrace stdout")?;
        let err_pipe = child.stderr.take().context("leaktrace stderr")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        panic!("leaktrace printed a non-JSON line in --json mode: {e}: {line}")
                    }
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                if etx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tracer = Tracer {
            child,
            lines,
            stderr,
            stderr_seen: Vec::new(),
            prog_ids: Vec::new(),
        };
        // Generous: in a vm-test guest (TCG, one vCPU, beside another tracer
        // and the host's own load) BTF, kallsyms and the verifier take tens of
        // seconds; attach latency is measured by `cargo xtask bench`, not here.
        let attached =
            tracer.wait_stderr(|l| l.contains("attached to"), Duration::from_secs(60))?;
        tracer.prog_ids = parse_prog_ids(&attached);
        Ok(tracer)
    }

    /// Waits for a stderr line satisfying `want` (kept in `stderr_seen` with
    /// every line before it); returns it.
    pub fn wait_stderr(
        &mut self,
        want: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if want(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "leaktrace printed no such line in {timeout:?}; stderr: {:?}",
                        self.stderr_seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!(
                        "leaktrace exited without printing such a line; stderr: {:?}",
                        self.stderr_seen
                    )
                }
            }
        }
    }

    /// Wait for a JSON line satisfying `pred`; returns it.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    if pred(&v) {
                        return Ok(v);
                    }
                    last = Some(v);
                }
                Err(_) => {
                    self.drain_stderr();
                    bail!(
                        "timed out after {timeout:?} waiting for {what}; last snapshot: {}; stderr: {:?}",
                        last.map_or("none".to_string(), |v| v.to_string()),
                        self.stderr_seen
                    );
                }
            }
        }
    }

    /// Send a signal, wait for exit, and return (exit code, final report).
    pub fn stop(self, signal: i32) -> Result<(i32, Value)> {
        self.stop_with_stderr(signal)
            .map(|(code, report, _)| (code, report))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal, wait for exit, and return (exit code, last JSON line,
    /// every stderr line).
    pub fn stop_with_stderr(self, signal: i32) -> Result<(i32, Value, Vec<String>)> {
        self.signal(signal);
        self.finish(Duration::from_secs(20))
    }

    /// Sends `signal` and returns at once.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for exit (killing it past `timeout`, an error) and returns (exit
    /// code, last JSON line, every stderr line).
    pub fn finish(mut self, timeout: Duration) -> Result<(i32, Value, Vec<String>)> {
        let status = wait_timeout(&mut self.child, timeout)?;
        let mut last = None;
        while let Ok(v) = self.lines.recv_timeout(Duration::from_millis(500)) {
            last = Some(v);
        }
        self.drain_stderr();
        let report =
            last.ok_or_else(|| anyhow!("no final report; stderr: {:?}", self.stderr_seen))?;
        Ok((status, report, std::mem::take(&mut self.stderr_seen)))
    }

    /// Wait for it to end by itself; returns (exit code, every stderr line).
    pub fn wait_exit(mut self, timeout: Duration) -> Result<(i32, Vec<String>)> {
        let status = wait_timeout(&mut self.child, timeout)?;
        thread::sleep(Duration::from_millis(200));
        self.drain_stderr();
        Ok((status, std::mem::take(&mut self.stderr_seen)))
    }

    /// SIGKILL: no report, no cleanup of its own; returns once it is reaped.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill().context("SIGKILL")?;
        self.child.wait().context("reaping leaktrace")?;
        Ok(())
    }

    fn drain_stderr(&mut self) {
        while let Ok(line) = self.stderr.try_recv() {
            self.stderr_seen.push(line);
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("process did not exit within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn parse_prog_ids(line: &str) -> Vec<u32> {
    line.split_once("prog ids [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(ids, _)| {
            ids.split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Ids of the BPF programs `pid` holds, from its descriptors' fdinfo (program
/// and link fds both carry `prog_id`).
pub fn prog_ids_held_by(pid: u32) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .flat_map(|info| {
                    info.lines()
                        .filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// True while the kernel still has a BPF program with this id.
pub fn prog_exists(id: u32) -> bool {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // SAFETY: attr outlives the call and matches the kernel's union prefix for this command.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: we own the fd the kernel just gave us.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

/// Programs are freed after an RCU grace period; give the kernel a moment.
pub fn assert_detached(ids: &[u32]) {
    assert!(!ids.is_empty(), "leaktrace did not report its program ids");
    let deadline = Instant::now() + Duration::from_secs(5);
    while ids.iter().any(|&id| prog_exists(id)) {
        assert!(
            Instant::now() < deadline,
            "BPF programs {ids:?} still loaded after leaktrace exited"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A running `leakgen MODE N`, stopped at each protocol step by its stdin.
pub struct Generator {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    pub pid: u32,
}

impl Generator {
    /// Start and wait for `READY <pid>`: the allocations are made and held.
    pub fn start(mode: &str, arg: &str) -> Result<Generator> {
        let mut cmd = Command::new(leakgen_bin());
        cmd.args([mode, arg]);
        Generator::start_command(cmd)
    }

    /// Start any program that speaks leakgen's protocol (READY, a line on
    /// stdin, RELEASED, EOF), e.g. the Go programs of tests/go.
    pub fn start_command(mut cmd: Command) -> Result<Generator> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().context("leakgen stdout")?;
        let (tx, stdout) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut gen = Generator {
            pid: child.id(),
            child,
            stdin,
            stdout,
        };
        gen.expect("READY", Duration::from_secs(30))?;
        Ok(gen)
    }

    fn expect(&mut self, word: &str, timeout: Duration) -> Result<()> {
        let line = self
            .stdout
            .recv_timeout(timeout)
            .with_context(|| format!("leakgen did not print {word} within {timeout:?}"))?;
        if line != format!("{word} {}", self.pid) {
            bail!("leakgen printed {line:?}, expected '{word} {}'", self.pid);
        }
        Ok(())
    }

    /// Send a line and wait for `word` (e.g. `MORE` of `leakgen keys-twice`).
    pub fn advance(&mut self, word: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("leakgen stdin already closed")?;
        writeln!(stdin, "go on")?;
        stdin.flush()?;
        self.expect(word, Duration::from_secs(30))
    }

    /// Free what was held and wait for `RELEASED`.
    pub fn release(&mut self) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("leakgen stdin already closed")?;
        writeln!(stdin, "release")?;
        stdin.flush()?;
        self.expect("RELEASED", Duration::from_secs(30))
    }

    pub fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let code = wait_timeout(&mut self.child, Duration::from_secs(30))?;
        if code != 0 {
            bail!("leakgen exited with {code}");
        }
        Ok(())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        if self.stdin.is_some() || self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The process entry for `tgid` in a report, if listed.
pub fn process(report: &Value, tgid: u32) -> Option<&Value> {
    report["processes"]
        .as_array()?
        .iter()
        .find(|p| p["tgid"].as_u64() == Some(u64::from(tgid)))
}

pub fn count(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or(0)
}

/// Outstanding objects of `tgid` on stacks whose kernel frames name `kframe`
/// and whose user frames name `uframe` (substring matches).
pub fn outstanding_on(report: &Value, tgid: u32, kframe: &str, uframe: &str) -> u64 {
    stacks_matching(report, tgid, kframe, uframe)
        .map(|s| count(s, "outstanding"))
        .sum()
}

/// Outstanding objects of `tgid` allocated directly by `caller` (the kernel
/// frame right below the allocator), under user frames naming `uframe`. Unlike
/// [`outstanding_on`], not counting allocations made on the way, such as a new
/// slab page's obj_exts vector, which lives as long as the slab page.
pub fn allocated_by(report: &Value, tgid: u32, caller: &str, uframe: &str) -> u64 {
    stacks_matching(report, tgid, caller, uframe)
        .filter(|s| called_the_allocator(s, caller))
        .map(|s| count(s, "outstanding"))
        .sum()
}

/// Whether `caller` is the kernel frame right below the allocator in this
/// stack row: frame 1 of a full stack, or frame 0 of a partial row (a stratum
/// none of whose objects drew a full stack is named by its call site alone).
pub fn called_the_allocator(row: &Value, caller: &str) -> bool {
    let prefix = format!("{caller}+");
    let at = |i: usize| {
        row["kernel"][i]
            .as_str()
            .is_some_and(|f| f.starts_with(&prefix))
    };
    at(1) || (row["partial"] == true && at(0))
}

pub fn stacks_matching<'a>(
    report: &'a Value,
    tgid: u32,
    kframe: &'a str,
    uframe: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    process(report, tgid)
        .and_then(|p| p["stacks"].as_array())
        .into_iter()
        .flatten()
        .filter(move |s| frames_contain(&s["kernel"], kframe) && frames_contain(&s["user"], uframe))
}

fn frames_contain(frames: &Value, needle: &str) -> bool {
    needle.is_empty()
        || frames.as_array().is_some_and(|f| {
            f.iter()
                .any(|x| x.as_str().is_some_and(|s| s.contains(needle)))
        })
}

/// Run leaktrace to completion with `args` and return (exit code, stdout, stderr).
pub fn run_leaktrace(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(leaktrace_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running leaktrace")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// [`run_leaktrace`] for a run that may hang: past `timeout` it is killed
/// and the result is an error naming what it printed.
pub fn run_leaktrace_within(args: &[&str], timeout: Duration) -> Result<(i32, String, String)> {
    let mut child = Command::new(leaktrace_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning leaktrace")?;
    let collect = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = collect(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = collect(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_timeout(&mut child, timeout);
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    match status {
        Ok(code) => Ok((code, stdout, stderr)),
        Err(e) => bail!("{args:?}: {e}; stdout: {stdout}; stderr: {stderr}"),
    }
}

/// End the test as skipped when the running kernel lacks what it needs: prints
/// `skipped: <reason>` (which `cargo xtask vm-test` counts as skipped, never as
/// passed) and returns. Decide `$available` from the running kernel (tracefs
/// formats, /sys/kernel/slab, kallsyms), not from its version number.
#[macro_export]
macro_rules! skip_unless {
    ($available:expr, $($reason:tt)+) => {
        if !$available {
            println!("skipped: {}", format!($($reason)+));
            return;
        }
    };
}

/// Whether the running kernel's `system:event` tracepoint format has `field`.
/// Panics when tracefs is not mounted: the answer would be a guess.
pub fn tracepoint_has_field(system: &str, event: &str, field: &str) -> bool {
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(|t| format!("{t}/events/{system}/{event}/format"))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_else(|| panic!("no tracefs format for {system}:{event}; is tracefs mounted?"));
    format.lines().any(|l| {
        l.trim_start()
            .strip_prefix("field:")
            .and_then(|decl| decl.split(';').next())
            .and_then(|decl| decl.split_whitespace().last())
            .and_then(|name| name.trim_start_matches('*').split('[').next())
            .is_some_and(|name| name == field)
    })
}

/// Whether a slab cache of this name (or an alias of one) exists on this kernel.
pub fn slab_cache_exists(name: &str) -> bool {
    std::path::Path::new("/sys/kernel/slab").join(name).exists()
}

/// Whether the running kernel has BTF type information.
pub fn kernel_has_btf() -> bool {
    std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
}

/// Whether the running kernel has a function or object named exactly `symbol`.
pub fn kernel_has_symbol(symbol: &str) -> bool {
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").expect("reading /proc/kallsyms");
    kallsyms
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some(symbol))
}

/// Whether raw tracepoint `event` has its own BTF-described probe function
/// (`__bpf_trace_<event>`, where BTF keeps the argument names leaktrace checks);
/// an event defined through a shared class (5.10's kfree is a `kmem_free`
/// event) has none.
pub fn raw_tracepoint_described(event: &str) -> bool {
    kernel_has_btf() && kernel_has_symbol(&format!("__bpf_trace_{event}"))
}

/// Runs leaktrace to completion with bpf(2) refused (EPERM) by a seccomp
/// filter. An input refused with its own message under this filter was
/// refused before any BPF program or map existed: a run that got as far as
/// loading one fails on bpf() with a different message.
pub fn run_leaktrace_without_bpf(args: &[&str]) -> Result<(i32, String, String)> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(leaktrace_bin());
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (prctl, seccomp) on data it owns.
    unsafe {
        cmd.pre_exec(deny_bpf_syscall);
    }
    let out = cmd.output().context("running leaktrace without bpf()")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A classic-BPF seccomp filter: x86-64 `bpf` -> EPERM, everything else runs.
fn deny_bpf_syscall() -> std::io::Result<()> {
    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| SockFilter { code, jt, jf, k };
    let filter = [
        op(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        op(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        op(JEQ_K, 0, 1, libc::SYS_bpf as u32),
        op(RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ];
    let prog = SockFprog {
        len: filter.len() as u16,
        filter: filter.as_ptr(),
    };
    // SAFETY: prctl/seccomp with a filter that outlives the calls.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(
            libc::SYS_seccomp,
            1, /* SECCOMP_SET_MODE_FILTER */
            0,
            &prog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The ids of the maps a loaded program uses (its `bpf_prog_info.map_ids`):
/// with the program ids, everything of leaktrace's the kernel must free.
pub fn prog_map_ids(prog_id: u32) -> Result<Vec<u32>> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let fd = bpf_get_fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)
        .with_context(|| format!("program {prog_id}"))?;
    // bpf_prog_info up to map_ids: nr_map_ids at byte 52, map_ids at 56.
    let mut info = [0u64; 8];
    let mut ids = [0u32; 64];
    info[6] = u64::from(ids.len() as u32) << 32;
    info[7] = ids.as_mut_ptr() as u64;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr, info and ids outlive the call; the kernel writes at most
    // info_len bytes of info and nr_map_ids ids.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("bpf_prog_info of {prog_id}: {err}");
    }
    let n = (info[6] >> 32) as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

/// True while the kernel still has a BPF map with this id.
pub fn map_exists(id: u32) -> bool {
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    match bpf_get_fd_by_id(BPF_MAP_GET_FD_BY_ID, id) {
        Ok(fd) => {
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
            true
        }
        Err(e) => e.raw_os_error() != Some(libc::ENOENT),
    }
}

fn bpf_get_fd_by_id(cmd: libc::c_long, id: u32) -> std::io::Result<i32> {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: attr outlives the call and matches the kernel's union prefix for this command.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd as i32)
}

/// Waits for the kernel to free every listed program and map (after an RCU
/// grace period, so this polls).
pub fn assert_freed(prog_ids: &[u32], map_ids: &[u32]) {
    assert!(
        !prog_ids.is_empty(),
        "leaktrace did not report its program ids"
    );
    assert!(!map_ids.is_empty(), "no map ids were collected");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let progs: Vec<u32> = prog_ids
            .iter()
            .copied()
            .filter(|&id| prog_exists(id))
            .collect();
        let maps: Vec<u32> = map_ids
            .iter()
            .copied()
            .filter(|&id| map_exists(id))
            .collect();
        if progs.is_empty() && maps.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still loaded 10s after leaktrace exited: programs {progs:?}, maps {maps:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The ids of the BPF maps process `pid` holds open (`map_id:` in its
/// /proc/PID/fdinfo entries): what a run of it has created in the kernel.
pub fn process_map_ids(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        // An fd closed since the listing is simply not one of the maps.
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A BPF map's name as the kernel holds it (`bpf_map_info.name`, at most 15
/// bytes), from the bpf syscall itself so no bpftool is needed in test guests.
pub fn map_name(id: u32) -> Result<String> {
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let fd = bpf_get_fd_by_id(BPF_MAP_GET_FD_BY_ID, id).with_context(|| format!("map {id}"))?;
    // bpf_map_info: type, id, key_size, value_size, max_entries, map_flags
    // (six u32s), then char name[16] at byte 24.
    let mut info = [0u8; 40];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("bpf_map_info of {id}: {err}");
    }
    let name = &info[24..40];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// A tmpfs of our own (`mount -t tmpfs`, 64 MiB), unmounted (lazily)
/// however the test ends; `.0` is its directory.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// A 64 MiB tmpfs of the test's own (the vm-test guests have no /dev/shm).
    pub fn mount(tag: &str) -> Tmpfs {
        Tmpfs::mount_sized(tag, 64)
    }

    pub fn mount_sized(tag: &str, mib: u32) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("leaktrace-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmpfs dir");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "leaktrace-test",
            ])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount -t tmpfs {}", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}
