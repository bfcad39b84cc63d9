//! `leakgen`: a deterministic kernel slab allocation generator for leaktrace's
//! integration tests.
//!
//! ```text
//! leakgen keys N       N "user" keys, 400-byte payload -> N held kmalloc-512 (unaccounted)
//! leakgen inotify N    N inotify instances -> N held kmalloc-cg-512 (accounted)
//! leakgen files N      N open fds on /dev/null -> N held `filp` cache objects
//! leakgen other N      N eventfds -> N held kmalloc-64, nothing in kmalloc-512
//! leakgen zombies N    N exec-probe-style children: each forks a grandchild and
//!                      exits at once; the grandchild exits and stays a zombie
//!                      under leakgen (a child subreaper that reaps only on
//!                      release) -> N held `task_struct`s, each allocated by a
//!                      different exited process whose parent was leakgen
//! leakgen pipes N      N pipes -> N held pipe_buffer arrays (16 x 40 bytes,
//!                      accounted: kmalloc-cg-1k where the kernel has cg caches)
//! leakgen backlog N    in a network namespace of its own (lo up, syncookies
//!                      off) a loopback listener that never accepts, and a child
//!                      that connects to it N times: N queued connections, their
//!                      request and child sockets made in softirq (loopback
//!                      delivers in the sender's bottom half) while the child runs
//! leakgen keys-rcu N   as keys, but released with KEYCTL_REVOKE: the payloads are
//!                      freed from an RCU callback (softirq), not by the key GC
//! leakgen keys-twice N  as keys, then at a stdin line N more keys (printing
//!                      `MORE <pid>`) before the usual release: the same task
//!                      allocates before and after a test moves it elsewhere
//! leakgen keys-thread N  a second thread, waiting; READY with nothing held,
//!                      then at a stdin line that thread makes N keys (`MORE
//!                      <pid>`) before the usual release: a test can name the
//!                      thread's id before it allocates
//! leakgen pipe-pages N  N pipes resized to 1 MiB (F_SETPIPE_SZ) and filled by
//!                      `fill_pipe`: N x 256 held 4 KiB pages the kernel took
//!                      for pipe buffers straight from the page allocator
//!                      (`pipe_write`/`anon_pipe_write`, GFP_HIGHUSER|__GFP_ACCOUNT)
//! LEAKGEN_MEMCG_PARENT=DIR leakgen memcgs N  N memory cgroups made under DIR
//!                      by `make_memcg` (mkdir, so this process makes their
//!                      per-CPU statistics), each charged with a 64 KiB tmpfs
//!                      file written from inside it and pinned by an inotify
//!                      instance made there, then left and removed: N dying
//!                      memcgs until release closes and unlinks them;
//!                      it moves back into LEAKGEN_MEMCG_HOME (default: the
//!                      memcg it started in; cgroup v2 allows no process in DIR);
//!                      the files go in LEAKGEN_MEMCG_TMPFS (default: the first
//!                      tmpfs of /dev/shm and /tmp)
//! leakgen twopath N [RATIO]  N held kmalloc-512 keys from `hold_key`, and RATIO
//!                      (default 50) transient ones per held key from `busy_add_key`,
//!                      both through `sys_add_key` and `user_preparse`
//! leakgen rarepath SECS [BUSY_PER_SEC]  for SECS seconds, one held kmalloc-512 key
//!                      a second from `retry_hold_key` beside BUSY_PER_SEC (default
//!                      6000) keys a second added and unlinked by `serve_traffic_key`
//!                      (their payloads freed later by the key GC), both through
//!                      `sys_add_key` and `user_preparse`; then READY, holding the
//!                      SECS rare keys
//! leakgen writev    (SECONDS | --ops N) [--wait]   one transient kmalloc-512 per op
//! leakgen writev256 (SECONDS | --ops N) [--wait]   one transient kmalloc-256 per op
//! leakgen inotify-churn (SECONDS | --ops N) [--wait]   inotify_init1 + close per op:
//!                                                  one transient kmalloc-cg-512 + others
//! leakgen tmpfs-churn (SECONDS | --ops N) [--wait]   64 KiB to an unlinked /dev/shm file per
//!                                                  op, truncated every 64 MiB: page cache
//! leakgen pipe-churn (SECONDS | --ops N) [--wait]   8 KiB through a pipe per op: one page
//!                                                  allocated and one freed by the pipe
//! churn modes also take [--rate OPS_PER_SEC] (paced instead of flat out)
//! ```
//!
//! Hold modes (keys, inotify, files, other) speak a line protocol so a test can
//! snapshot the tracer while the objects are outstanding and again after they
//! are gone:
//!
//! 1. make all N objects, then print `READY <pid>`;
//! 2. wait for one line on stdin (EOF counts as a line);
//! 3. release all N objects, then print `RELEASED <pid>`;
//! 4. wait for one more line / EOF, then exit 0.
//!
//! READY and RELEASED are only printed once the kernel has really settled:
//! `keys` flushes the RCU-freed keyring edit scripts before READY, and after
//! invalidating the keys waits for the asynchronous key GC to have freed every
//! payload before RELEASED (see release_keys); the fd modes free
//! synchronously in close().
//!
//! Churn modes print `READY <pid>`, wait for a stdin line only with `--wait`,
//! churn, then print `DONE <pid> ops=<n> secs=<f> ops_per_sec=<f> cpu=<f>`, where
//! cpu is the churning thread's user+sys time over the wall time: a benchmark
//! rejects a run below ~0.9, whose thread was preempted rather than slowed.
//!
//! Exit codes: 0 ok, 2 usage, 1 any failure (the message names the syscall,
//! the errno and a hint). A mode never silently makes fewer objects than asked.
//! Limits: `keys` N <= 16382 (see MAX_KEYS) and the uid's key quota (root:
//! root_maxkeys 1,000,000, root_maxbytes 25,000,000 at ~420 bytes a key;
//! other uids: maxkeys 200, maxbytes 20,000, i.e. ~47 keys), `inotify` by fs.inotify.max_user_instances (default 128, per uid
//! and shared with every other process of the uid), the fd modes by
//! RLIMIT_NOFILE's hard limit (the soft one is raised to it).
//!
//! Every syscall that allocates is issued by inline asm from a named
//! `#[inline(never)]` function: glibc's wrappers set up no frame pointer, so a
//! frame-pointer unwinder starting in one would skip its caller, and the tests
//! look for these call chains in user stacks (the crate is built with
//! `-C force-frame-pointers=yes`):
//!
//! * keys:      `main -> run_keys -> leak_keys -> sys_add_key`
//! * twopath:   `main -> run_twopath -> hold_key -> sys_add_key` (held) and
//!   `main -> run_twopath -> busy_add_key -> sys_add_key` (freed at once)
//! * rarepath:  `main -> run_rarepath -> retry_hold_key -> sys_add_key` (held) and
//!   `main -> run_rarepath -> serve_traffic_key -> sys_add_key` (unlinked)
//! * inotify:   `main -> run_inotify -> leak_inotify -> sys_inotify_init1`
//! * files:     `main -> run_files -> leak_files -> sys_openat`
//! * other:     `main -> run_other -> leak_eventfd -> sys_eventfd2`
//! * writev:    `main -> run_churn -> churn_writev -> sys_writev`
//! * writev256: `main -> run_churn -> churn_iovec256 -> sys_writev`
//!   (deliberately not `churn_writev256`, which would contain `churn_writev`)
//! * inotify-churn: `main -> run_churn -> churn_inotify -> sys_inotify_init1`

use std::arch::asm;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// 24-byte `struct user_key_payload` header + 400 = 424 bytes -> kmalloc-512.
const KEY_PAYLOAD_LEN: usize = 400;
/// 32 * sizeof(struct iovec) = 512 -> kmalloc-512 in iovec_from_user (more
/// than UIO_FASTIOV = 8, so the on-stack array is not used).
const WRITEV_IOVS: usize = 32;
/// 16 * 16 = 256 -> kmalloc-256.
const WRITEV256_IOVS: usize = 16;

const KEY_SPEC_PROCESS_KEYRING: i32 = -2;
/// KEYQUOTA_LINK_BYTES: quota the destination keyring is charged per link.
const KEYRING_LINK_BYTES: usize = 4;
/// struct key's quotalen/datalen are u16: the process keyring ("_pid", 5
/// bytes) plus 4 bytes a link must stay <= 65535.
const MAX_KEYS: usize = (65535 - 5) / KEYRING_LINK_BYTES;
const KEYCTL_INVALIDATE: usize = 21;
const KEYCTL_UNLINK: usize = 9;
const KEYCTL_REVOKE: usize = 3;
/// Writing 1 runs rcu_barrier() (kernel/rcu/tree.c, root only).
const RCU_BARRIER_KNOB: &str = "/sys/module/rcutree/parameters/do_rcu_barrier";
/// Grace periods take 10-30 ms on the reference VM.
const RCU_FALLBACK: Duration = Duration::from_millis(200);
/// The GC frees 1000 invalidated keys in 20-60 ms on the reference VM.
const KEY_GC_TIMEOUT: Duration = Duration::from_secs(10);
const KEY_GC_POLL: Duration = Duration::from_millis(2);
/// Once our keys have left /proc/keys their destruction is microseconds away.
const KEY_GC_NKEYS_CAP: Duration = Duration::from_millis(500);

const USAGE: &str = "\
usage: leakgen keys N | keys-twice N | keys-thread N | inotify N | files N | other N | zombies N | pipes N | backlog N
       leakgen pipe-pages N
       LEAKGEN_MEMCG_PARENT=DIR [LEAKGEN_MEMCG_HOME=DIR] leakgen memcgs N
       LEAKGEN_MEMCG=DIR leakgen charged N
       leakgen twopath N [RATIO]
       leakgen rarepath SECS [BUSY_PER_SEC]
       leakgen writev (SECONDS | --ops N) [--wait] [--rate OPS_PER_SEC]
       leakgen writev256 (SECONDS | --ops N) [--wait] [--rate OPS_PER_SEC]
       leakgen inotify-churn (SECONDS | --ops N) [--wait] [--rate OPS_PER_SEC]
       leakgen tmpfs-churn (SECONDS | --ops N) [--wait] [--rate OPS_PER_SEC]
       leakgen pipe-churn (SECONDS | --ops N) [--wait] [--rate OPS_PER_SEC]
hold modes print `READY <pid>`, wait for a stdin line (or EOF), release,
print `RELEASED <pid>`, wait for another line (or EOF) and exit";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Keys,
    /// N keys, a stdin line, N more keys (`MORE <pid>`), then as Keys.
    KeysTwice,
    /// Nothing, a stdin line, N keys from a second thread (`MORE <pid>`),
    /// then as Keys.
    KeysThread,
    /// Keys released by revocation: payloads freed in RCU callbacks.
    KeysRcu,
    Inotify,
    Files,
    Other,
    Zombies,
    Pipes,
    Backlog,
    /// N inotify events this process causes, charged to a watcher's memcg.
    Charged,
    /// N pipes of 1 MiB, full.
    PipePages,
    /// N removed memcgs pinned by tmpfs pages.
    Memcgs,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Limit {
    Secs(f64),
    Ops(u64),
}

/// What one churn op does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Churn {
    /// writev of this many empty iovecs to /dev/null.
    Writev(usize),
    /// inotify_init1 + close.
    Inotify,
    /// 64 KiB written to an unlinked tmpfs file, truncated every 64 MiB:
    /// page-cache (movable) pages allocated and freed, 16 an op.
    Tmpfs,
    /// 8 KiB written to a pipe and read back: one page allocated and one
    /// freed an op (the pipe keeps one released page as `tmp_page` for its
    /// next write, so a one-page op would allocate nothing).
    Pipe,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Command {
    Hold(Mode, usize),
    /// N held keys, RATIO busy add_key calls per held one.
    TwoPath(usize, usize),
    /// For SECS seconds a held key a second beside BUSY_PER_SEC unlinked ones.
    RarePath(usize, usize),
    Churn {
        op: Churn,
        limit: Limit,
        wait: bool,
        /// Ops per second to pace at; None = as fast as possible.
        rate: Option<f64>,
    },
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let (mode, rest) = args
        .split_first()
        .ok_or_else(|| "missing mode".to_string())?;
    if mode == "rarepath" {
        let (secs, rate) = match rest {
            [s] => (s.as_str(), "6000"),
            [s, r] => (s.as_str(), r.as_str()),
            _ => return Err("rarepath takes SECS [BUSY_PER_SEC]".to_string()),
        };
        let secs: usize = secs
            .parse()
            .map_err(|_| format!("SECS must be a non-negative integer, got {secs:?}"))?;
        let rate: usize = rate
            .parse()
            .map_err(|_| format!("BUSY_PER_SEC must be a non-negative integer, got {rate:?}"))?;
        if secs > MAX_KEYS {
            return Err(format!(
                "rarepath SECS must be at most {MAX_KEYS} (see keys)"
            ));
        }
        return Ok(Command::RarePath(secs, rate));
    }
    if mode == "twopath" {
        let (n, ratio) = match rest {
            [n] => (n.as_str(), "50"),
            [n, r] => (n.as_str(), r.as_str()),
            _ => return Err("twopath takes N [RATIO]".to_string()),
        };
        let n: usize = n
            .parse()
            .map_err(|_| format!("N must be a non-negative integer, got {n:?}"))?;
        let ratio: usize = ratio
            .parse()
            .map_err(|_| format!("RATIO must be a non-negative integer, got {ratio:?}"))?;
        if n > MAX_KEYS {
            return Err(format!("twopath N must be at most {MAX_KEYS} (see keys)"));
        }
        return Ok(Command::TwoPath(n, ratio));
    }
    let hold = match mode.as_str() {
        "keys" => Some(Mode::Keys),
        "keys-rcu" => Some(Mode::KeysRcu),
        "keys-twice" => Some(Mode::KeysTwice),
        "keys-thread" => Some(Mode::KeysThread),
        "inotify" => Some(Mode::Inotify),
        "files" => Some(Mode::Files),
        "other" => Some(Mode::Other),
        "zombies" => Some(Mode::Zombies),
        "pipes" => Some(Mode::Pipes),
        "backlog" => Some(Mode::Backlog),
        "charged" => Some(Mode::Charged),
        "pipe-pages" => Some(Mode::PipePages),
        "memcgs" => Some(Mode::Memcgs),
        _ => None,
    };
    if let Some(m) = hold {
        let [n] = rest else {
            return Err(format!("{mode} takes exactly one argument N"));
        };
        let n: usize = n
            .parse()
            .map_err(|_| format!("N must be a non-negative integer, got {n:?}"))?;
        if matches!(m, Mode::KeysTwice) && 2 * n > MAX_KEYS {
            return Err(format!("keys-twice N must be at most {}", MAX_KEYS / 2));
        }
        if matches!(m, Mode::Keys | Mode::KeysRcu | Mode::KeysThread) && n > MAX_KEYS {
            return Err(format!(
                "keys N must be at most {MAX_KEYS}: the process keyring's quota charge is a \
                 16-bit field (4 bytes a link), and past that it wraps and the uid's key byte \
                 quota permanently loses 64 KiB per wrap (measured on 6.18)"
            ));
        }
        return Ok(Command::Hold(m, n));
    }
    let op = match mode.as_str() {
        "writev" => Churn::Writev(WRITEV_IOVS),
        "writev256" => Churn::Writev(WRITEV256_IOVS),
        "inotify-churn" => Churn::Inotify,
        "tmpfs-churn" => Churn::Tmpfs,
        "pipe-churn" => Churn::Pipe,
        _ => return Err(format!("unknown mode {mode:?}")),
    };
    let mut limit = None;
    let mut wait = false;
    let mut rate = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let new = match a.as_str() {
            "--wait" => {
                wait = true;
                continue;
            }
            "--rate" => {
                let v = it.next().ok_or("--rate needs a value")?;
                match v.parse::<f64>() {
                    Ok(r) if r.is_finite() && r > 0.0 => rate = Some(r),
                    _ => return Err(format!("--rate must be a positive number, got {v:?}")),
                }
                continue;
            }
            "--ops" => {
                let v = it.next().ok_or("--ops needs a value")?;
                Limit::Ops(
                    v.parse()
                        .map_err(|_| format!("--ops must be an integer, got {v:?}"))?,
                )
            }
            s => match s.parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs >= 0.0 => Limit::Secs(secs),
                _ => return Err(format!("SECONDS must be a non-negative number, got {s:?}")),
            },
        };
        if limit.replace(new).is_some() {
            return Err("give either SECONDS or --ops N, once".into());
        }
    }
    let limit = limit.ok_or_else(|| format!("{mode} needs SECONDS or --ops N"))?;
    Ok(Command::Churn {
        op,
        limit,
        wait,
        rate,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("leakgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = match cmd {
        Command::Hold(Mode::Keys, n) => run_keys(n),
        Command::Hold(Mode::KeysRcu, n) => run_keys_rcu(n),
        Command::Hold(Mode::KeysTwice, n) => run_keys_twice(n),
        Command::Hold(Mode::KeysThread, n) => run_keys_thread(n),
        Command::TwoPath(n, ratio) => run_twopath(n, ratio),
        Command::RarePath(secs, rate) => run_rarepath(secs, rate),
        Command::Hold(Mode::Other, n) => run_other(n),
        Command::Hold(Mode::Inotify, n) => run_inotify(n),
        Command::Hold(Mode::Files, n) => run_files(n),
        Command::Hold(Mode::Zombies, n) => run_zombies(n),
        Command::Hold(Mode::Pipes, n) => run_pipes(n),
        Command::Hold(Mode::Backlog, n) => run_backlog(n),
        Command::Hold(Mode::Charged, n) => run_charged(n),
        Command::Hold(Mode::PipePages, n) => run_pipe_pages(n),
        Command::Hold(Mode::Memcgs, n) => run_memcgs(n),
        Command::Churn {
            op,
            limit,
            wait,
            rate,
        } => run_churn(op, limit, wait, rate),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leakgen: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------
// Raw syscalls

#[derive(Debug, Clone, Copy, PartialEq)]
struct Errno(i32);

impl Errno {
    fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EBADF => "EBADF",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EINVAL => "EINVAL",
            libc::ENFILE => "ENFILE",
            libc::EMFILE => "EMFILE",
            libc::ENOSPC => "ENOSPC",
            libc::ENOSYS => "ENOSYS",
            libc::EDQUOT => "EDQUOT",
            libc::ENOKEY => "ENOKEY",
            libc::EKEYREVOKED => "EKEYREVOKED",
            libc::EKEYEXPIRED => "EKEYEXPIRED",
            _ => "E?",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.name(),
            io::Error::from_raw_os_error(self.0)
        )
    }
}

/// The bare `syscall` instruction, inlined into each named wrapper so that the
/// wrapper's own frame (set up because of force-frame-pointers) is the
/// innermost user frame at syscall entry.
///
/// # Safety
/// The arguments must be valid for syscall `nr`; pointer arguments must point
/// to memory that stays valid for the call.
#[inline(always)]
unsafe fn raw_syscall5(
    nr: libc::c_long,
    a1: usize,
    a2: usize,
    a3: usize,
    a4: usize,
    a5: usize,
) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 syscall ABI: number in rax, args in rdi/rsi/rdx/r10/r8,
    // result in rax, rcx and r11 clobbered; the user stack is not touched.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

fn check(ret: isize) -> Result<usize, Errno> {
    if (-4095..0).contains(&ret) {
        Err(Errno(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

#[inline(never)]
fn sys_add_key(key_type: &CStr, desc: &CStr, payload: &[u8], keyring: i32) -> Result<i32, Errno> {
    // SAFETY: the strings are NUL-terminated and the payload slice is valid;
    // the kernel only reads them during the call.
    let ret = unsafe {
        raw_syscall5(
            libc::SYS_add_key,
            key_type.as_ptr() as usize,
            desc.as_ptr() as usize,
            payload.as_ptr() as usize,
            payload.len(),
            keyring as usize,
        )
    };
    check(ret).map(|serial| serial as i32)
}

#[inline(never)]
fn sys_keyctl(cmd: usize, arg2: usize, arg3: usize) -> Result<usize, Errno> {
    // SAFETY: only used with commands whose arguments are plain integers.
    check(unsafe { raw_syscall5(libc::SYS_keyctl, cmd, arg2, arg3, 0, 0) })
}

#[inline(never)]
fn sys_eventfd2(initval: u32, flags: i32) -> Result<i32, Errno> {
    // SAFETY: no pointer arguments.
    let ret = unsafe {
        raw_syscall5(
            libc::SYS_eventfd2,
            initval as usize,
            flags as usize,
            0,
            0,
            0,
        )
    };
    check(ret).map(|fd| fd as i32)
}

#[inline(never)]
fn sys_inotify_init1(flags: i32) -> Result<i32, Errno> {
    // SAFETY: no pointer arguments.
    let ret = unsafe { raw_syscall5(libc::SYS_inotify_init1, flags as usize, 0, 0, 0, 0) };
    check(ret).map(|fd| fd as i32)
}

#[inline(never)]
fn sys_openat(path: &CStr, flags: i32) -> Result<i32, Errno> {
    // SAFETY: path is NUL-terminated and outlives the call.
    let ret = unsafe {
        raw_syscall5(
            libc::SYS_openat,
            libc::AT_FDCWD as usize,
            path.as_ptr() as usize,
            flags as usize,
            0,
            0,
        )
    };
    check(ret).map(|fd| fd as i32)
}

#[inline(never)]
fn sys_close(fd: i32) -> Result<(), Errno> {
    // SAFETY: closing an fd this program opened and owns.
    check(unsafe { raw_syscall5(libc::SYS_close, fd as usize, 0, 0, 0, 0) }).map(|_| ())
}

#[inline(never)]
fn sys_writev(fd: i32, iov: &[libc::iovec]) -> Result<usize, Errno> {
    // SAFETY: iov is a valid array of iovecs, each of length 0, so the kernel
    // reads the array but no buffer behind it.
    check(unsafe {
        raw_syscall5(
            libc::SYS_writev,
            fd as usize,
            iov.as_ptr() as usize,
            iov.len(),
            0,
            0,
        )
    })
}

// ---------------------------------------------------------------------------
// Protocol

fn say(line: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Blocks until a line (or EOF) arrives on stdin.
fn wait_for_line() -> Result<()> {
    let mut buf = String::new();
    io::stdin()
        .lock()
        .read_line(&mut buf)
        .context("reading stdin")?;
    Ok(())
}

/// READY, wait, release, RELEASED, wait.
fn hold_protocol(release: impl FnOnce() -> Result<()>) -> Result<()> {
    let pid = std::process::id();
    say(&format!("READY {pid}"))?;
    wait_for_line()?;
    release()?;
    say(&format!("RELEASED {pid}"))?;
    wait_for_line()
}

// ---------------------------------------------------------------------------
// keys

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// One line of /proc/key-users.
#[derive(Debug, Clone, Copy)]
struct KeyUser {
    /// Keys that exist; the GC decrements it after destroying a key.
    nkeys: u64,
    /// Quota in use; key_put() gives it back when the last reference goes,
    /// before the GC has run.
    qnkeys: u64,
    maxkeys: u64,
    qnbytes: u64,
    maxbytes: u64,
}

/// `uid`'s line of /proc/key-users; None if the uid owns no key yet or the
/// file is unreadable.
fn key_user(uid: u32) -> Option<KeyUser> {
    let text = std::fs::read_to_string("/proc/key-users").ok()?;
    let pair = |s: &str| -> Option<(u64, u64)> {
        let (a, b) = s.split_once('/')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    for line in text.lines() {
        // "    0:     9 8/8 3/1000000 40/25000000":
        // uid: usage nkeys/nikeys qnkeys/maxkeys qnbytes/maxbytes
        let mut f = line.split_whitespace();
        if f.next()?.trim_end_matches(':').parse::<u32>().ok()? != uid {
            continue;
        }
        let _usage = f.next()?;
        let (nkeys, _nikeys) = pair(f.next()?)?;
        let (qnkeys, maxkeys) = pair(f.next()?)?;
        let (qnbytes, maxbytes) = pair(f.next()?)?;
        return Some(KeyUser {
            nkeys,
            qnkeys,
            maxkeys,
            qnbytes,
            maxbytes,
        });
    }
    None
}

fn quota_hint(uid: u32) -> String {
    let (kname, bname) = if uid == 0 {
        ("root_maxkeys", "root_maxbytes")
    } else {
        ("maxkeys", "maxbytes")
    };
    let get =
        |n: &str| read_trimmed(&format!("/proc/sys/kernel/keys/{n}")).unwrap_or_else(|| "?".into());
    let used = key_user(uid)
        .map(|u| format!("{} keys / {} bytes", u.qnkeys, u.qnbytes))
        .unwrap_or_else(|| "nothing".into());
    format!(
        "uid {uid}'s key quota is /proc/sys/kernel/keys/{kname}={} keys and {bname}={} bytes, \
         shared by every process of the uid (currently used: {used}, see /proc/key-users; \
         a dead process's keys only give quota back once the key GC has run); pick a smaller N",
        get(kname),
        get(bname)
    )
}

/// Refuses up front when the uid's key quota cannot hold `n` more keys, so the
/// test gets a clear error instead of a half-built set. Each key is charged
/// its payload plus its description, and the keyring 4 bytes per link
/// (measured on 6.18: 1000 keys with 16-byte descriptions took 419,895 bytes);
/// the estimate rounds up.
fn check_key_quota(n: usize, desc_len: usize, payload_len: usize) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let Some(KeyUser {
        qnkeys: qk,
        maxkeys: mk,
        qnbytes: qb,
        maxbytes: mb,
        ..
    }) = key_user(uid)
    else {
        return Ok(()); // nothing to go on; EDQUOT from add_key still stops us
    };
    let need_keys = n as u64;
    let need_bytes = n as u64 * (desc_len + 1 + payload_len + KEYRING_LINK_BYTES) as u64;
    if qk + need_keys > mk || qb + need_bytes > mb {
        bail!(
            "{n} keys need {need_keys} keys and about {need_bytes} bytes of key quota, \
             but only {} keys / {} bytes are left; {}",
            mk.saturating_sub(qk),
            mb.saturating_sub(qb),
            quota_hint(uid)
        );
    }
    Ok(())
}

fn add_key_error(e: Errno, done: usize, n: usize) -> anyhow::Error {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let hint = if e.0 == libc::EDQUOT {
        quota_hint(uid)
    } else {
        "see add_key(2)".into()
    };
    anyhow!("add_key(\"user\", KEY_SPEC_PROCESS_KEYRING) failed after {done} of {n} keys: {e}; hint: {hint}")
}

/// Returns the key serials. One user_preparse kmalloc-512 per key stays
/// allocated while the key lives.
#[inline(never)]
fn leak_keys(n: usize) -> Result<Vec<i32>> {
    let pid = std::process::id();
    let payload = [b'K'; KEY_PAYLOAD_LEN];
    let mut serials = Vec::with_capacity(n);
    for i in 0..n {
        let desc = CString::new(format!("leakgen-{pid}-{i}")).context("key description")?;
        let serial = sys_add_key(c"user", &desc, &payload, KEY_SPEC_PROCESS_KEYRING)
            .map_err(|e| add_key_error(e, i, n))?;
        serials.push(serial);
    }
    Ok(serials)
}

/// Invalidates the keys and returns once the key GC has freed every payload.
///
/// The payloads must be freed by the key GC kworker (user_destroy ->
/// kfree_sensitive, in process context): KEYCTL_REVOKE would free them from
/// an RCU callback in softirq, and a softirq that interrupts a running BPF
/// program gets its tracepoint events dropped (bpf_prog_active recursion
/// guard), so a tracer could miss those frees. KEYCTL_INVALIDATE rather than
/// KEYCTL_UNLINK because unlinking kmallocs a 328-byte assoc_array edit
/// (kmalloc-512, RCU-freed) per key in our context, while invalidated keys
/// are unlinked by the GC in its own context.
fn release_keys(serials: &[i32]) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let nkeys_before = key_user(uid).map(|u| u.nkeys);
    for (i, &serial) in serials.iter().enumerate() {
        sys_keyctl(KEYCTL_INVALIDATE, serial as usize, 0).map_err(|e| {
            anyhow!(
                "keyctl(KEYCTL_INVALIDATE, {serial}) failed after {i} of {} keys: {e}; \
                 hint: was the key revoked or invalidated behind our back?",
                serials.len()
            )
        })?;
    }
    wait_for_key_gc(uid, serials, nkeys_before)?;
    // The GC's keyring edits are RCU-freed; settle them too so the system is
    // quiet at RELEASED (they are not charged to us either way).
    rcu_barrier();
    Ok(())
}

/// The GC takes a dead key out of the serial tree (so out of /proc/keys) and
/// then, in the same work item, destroys it (frees the payload) and only
/// after that decrements the owner's nkeys. So: wait until none of our
/// serials is listed any more, then until the uid's nkeys has dropped by
/// len(serials). nkeys is uid-wide, so the first step keeps other processes'
/// key frees from ending the wait early, and the second is capped because
/// other processes adding keys could hold it up forever.
fn wait_for_key_gc(uid: u32, serials: &[i32], nkeys_before: Option<u64>) -> Result<()> {
    let ours: HashSet<u32> = serials.iter().map(|&s| s as u32).collect();
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string("/proc/keys").context("reading /proc/keys")?;
        let listed = text
            .lines()
            .filter_map(|l| u32::from_str_radix(l.split_whitespace().next()?, 16).ok())
            .filter(|s| ours.contains(s))
            .count();
        if listed == 0 {
            break;
        }
        if start.elapsed() >= KEY_GC_TIMEOUT {
            bail!(
                "{listed} of the {} invalidated keys are still in /proc/keys after {:?}; \
                 hint: the key GC (kworker running key_garbage_collector) is stuck or slow",
                serials.len(),
                KEY_GC_TIMEOUT
            );
        }
        std::thread::sleep(KEY_GC_POLL);
    }
    let Some(before) = nkeys_before else {
        // No /proc/key-users line: nothing finer to wait on.
        std::thread::sleep(KEY_GC_NKEYS_CAP);
        return Ok(());
    };
    let target = before.saturating_sub(serials.len() as u64);
    let settle = Instant::now();
    loop {
        match key_user(uid) {
            Some(u) if u.nkeys > target => {}
            _ => return Ok(()),
        }
        if settle.elapsed() >= KEY_GC_NKEYS_CAP {
            eprintln!(
                "leakgen: warning: uid {uid}'s nkeys in /proc/key-users has not dropped to \
                 {target} {KEY_GC_NKEYS_CAP:?} after our keys left /proc/keys (another process \
                 of the uid adding keys?); assuming the GC is done"
            );
            return Ok(());
        }
        std::thread::sleep(KEY_GC_POLL);
    }
}

/// Upper bound on strlen("leakgen-<pid>-<i>") for the quota estimate.
fn desc_len_bound(prefix: &str, n: usize) -> usize {
    prefix.len() + 10 + 1 + n.to_string().len()
}

#[inline(never)]
fn run_keys(n: usize) -> Result<()> {
    check_key_quota(n, desc_len_bound("leakgen-", n), KEY_PAYLOAD_LEN)?;
    let serials = leak_keys(n)?;
    // Linking each key into the process keyring also kmallocs a 328-byte
    // assoc_array edit script (kmalloc-512) that is freed by call_rcu some
    // 10-30 ms later; flush those so that at READY exactly the n payloads are
    // outstanding.
    rcu_barrier();
    hold_protocol(|| release_keys(&serials))
}

/// Two batches of keys from one task, the second only when told: a test moves
/// the task to another cgroup in between.
fn run_keys_twice(n: usize) -> Result<()> {
    check_key_quota(2 * n, desc_len_bound("leakgen-", 2 * n), KEY_PAYLOAD_LEN)?;
    let pid = std::process::id();
    let payload = [b'K'; KEY_PAYLOAD_LEN];
    let mut serials = leak_keys(n)?;
    rcu_barrier();
    say(&format!("READY {pid}"))?;
    wait_for_line()?;
    for i in n..2 * n {
        serials.push(hold_key(pid, i, 2 * n, &payload)?);
    }
    rcu_barrier();
    more_then_release(pid, &serials)
}

/// The end of the two-step modes: `MORE`, a line, release, `RELEASED`, a line.
fn more_then_release(pid: u32, serials: &[i32]) -> Result<()> {
    say(&format!("MORE {pid}"))?;
    wait_for_line()?;
    release_keys(serials)?;
    say(&format!("RELEASED {pid}"))?;
    wait_for_line()
}

/// Keys made by a second thread of this process, only when told: a test reads
/// the thread's id from /proc/PID/task while it waits, and traces by it. The
/// thread releases them too: the process keyring it installs is in its own
/// credentials, so only it possesses the keys.
fn run_keys_thread(n: usize) -> Result<()> {
    check_key_quota(n, desc_len_bound("leakgen-", n), KEY_PAYLOAD_LEN)?;
    let pid = std::process::id();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::Builder::new()
        .name("leakgen-keys".into())
        .spawn(move || -> Result<()> {
            wait.recv().context("the main thread went away")?;
            let serials = leak_keys(n)?;
            rcu_barrier();
            more_then_release(pid, &serials)
        })
        .context("starting the key thread")?;
    say(&format!("READY {pid}"))?;
    wait_for_line()?;
    go.send(()).context("the key thread went away")?;
    worker
        .join()
        .map_err(|_| anyhow!("the key thread panicked"))?
}

/// Keys whose payloads are freed from RCU callbacks: KEYCTL_REVOKE makes
/// user_revoke hand the payload to call_rcu, whose kfree runs in softirq on
/// whichever CPU, possibly interrupting a tracer's own kfree program.
#[inline(never)]
fn run_keys_rcu(n: usize) -> Result<()> {
    check_key_quota(n, desc_len_bound("leakgen-", n), KEY_PAYLOAD_LEN)?;
    let serials = leak_keys(n)?;
    rcu_barrier();
    hold_protocol(|| {
        for &serial in &serials {
            sys_keyctl(KEYCTL_REVOKE, serial as usize, 0)
                .map_err(|e| anyhow!("keyctl(KEYCTL_REVOKE, {serial}) failed: {e}"))?;
        }
        // Every payload's RCU callback has run once this returns. The revoked
        // keys themselves (key_jar) linger until the key GC's delay passes.
        rcu_barrier();
        Ok(())
    })
}

/// The retry loop of the kubelet incident in miniature: one path holds what it
/// allocates, a busier one frees at once, and both reach the same kernel call
/// site (`user_preparse`) through the same syscall wrapper.
#[inline(never)]
fn run_twopath(n: usize, ratio: usize) -> Result<()> {
    check_key_quota(n, desc_len_bound("leakgen-", n), KEY_PAYLOAD_LEN)?;
    let pid = std::process::id();
    let payload = [b'K'; KEY_PAYLOAD_LEN];
    let mut serials = Vec::with_capacity(n);
    for i in 0..n {
        for _ in 0..ratio {
            busy_add_key(&payload)?;
        }
        serials.push(hold_key(pid, i, n, &payload)?);
    }
    rcu_barrier();
    hold_protocol(|| release_keys(&serials))
}

/// The founding incident at a low rate: a retry loop that keeps one object a
/// second, beside healthy traffic ~6,000 times busier through the same
/// syscall wrapper and kernel call site. The busy keys are unlinked at once
/// and freed by the key GC shortly after, so the stratum's outstanding count
/// is noisy while the busy loop runs; once it stops, only the rare keys stay.
#[inline(never)]
fn run_rarepath(secs: usize, busy_per_sec: usize) -> Result<()> {
    check_key_quota(secs, desc_len_bound("leakgen-rare-", secs), KEY_PAYLOAD_LEN)?;
    let pid = std::process::id();
    let payload = [b'R'; KEY_PAYLOAD_LEN];
    let start = Instant::now();
    let mut held = Vec::with_capacity(secs);
    let mut busy = 0usize;
    // Paced in 10 ms slices so the busy rate is steady, not a burst a second.
    let per_slice = busy_per_sec.div_ceil(100);
    for i in 0..secs {
        held.push(retry_hold_key(pid, i, secs, &payload)?);
        let second_ends = start + Duration::from_secs(i as u64 + 1);
        let mut slice_ends = Instant::now();
        while Instant::now() < second_ends {
            for _ in 0..per_slice {
                serve_traffic_key(pid, busy, &payload)?;
                busy += 1;
            }
            slice_ends = (slice_ends + Duration::from_millis(10)).min(second_ends);
            if let Some(wait) = slice_ends.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    eprintln!(
        "leakgen: rarepath held {secs} keys beside {busy} unlinked ones in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    hold_protocol(|| release_keys(&held))
}

#[inline(never)]
fn retry_hold_key(pid: u32, i: usize, n: usize, payload: &[u8]) -> Result<i32> {
    let desc = CString::new(format!("leakgen-rare-{pid}-{i}")).context("key description")?;
    sys_add_key(c"user", &desc, payload, KEY_SPEC_PROCESS_KEYRING)
        .map_err(|e| add_key_error(e, i, n))
}

/// A key added and unlinked at once: its payload stays until the key GC
/// destroys the key (`user_destroy`, a plain kfree).
#[inline(never)]
fn serve_traffic_key(pid: u32, i: usize, payload: &[u8]) -> Result<()> {
    let desc = CString::new(format!("leakgen-busy-{pid}-{i}")).context("key description")?;
    let serial = sys_add_key(c"user", &desc, payload, KEY_SPEC_PROCESS_KEYRING)
        .map_err(|e| anyhow!("add_key(\"user\", busy key {i}) failed: {e}"))?;
    sys_keyctl(
        KEYCTL_UNLINK,
        serial as usize,
        KEY_SPEC_PROCESS_KEYRING as isize as usize,
    )
    .map_err(|e| anyhow!("keyctl(KEYCTL_UNLINK, {serial}) failed: {e}"))?;
    Ok(())
}

#[inline(never)]
fn hold_key(pid: u32, i: usize, n: usize, payload: &[u8]) -> Result<i32> {
    let desc = CString::new(format!("leakgen-{pid}-{i}")).context("key description")?;
    sys_add_key(c"user", &desc, payload, KEY_SPEC_PROCESS_KEYRING)
        .map_err(|e| add_key_error(e, i, n))
}

/// add_key with an empty description: the kernel runs the type's preparse
/// (user_preparse kmallocs the payload) before it refuses the missing
/// description with EINVAL and frees the payload in this same call.
#[inline(never)]
fn busy_add_key(payload: &[u8]) -> Result<()> {
    match sys_add_key(c"user", c"", payload, KEY_SPEC_PROCESS_KEYRING) {
        Err(Errno(libc::EINVAL)) => Ok(()),
        Err(e) => bail!("add_key(\"user\", \"\") failed with {e}, expected EINVAL"),
        Ok(serial) => bail!("add_key(\"user\", \"\") made key {serial}, expected EINVAL"),
    }
}

/// Blocks until every call_rcu callback queued so far has run (rcu_barrier).
/// Best effort: the knob needs root and a kernel that has it (6.x); without
/// it we sleep a few grace periods instead.
fn rcu_barrier() {
    if let Err(e) = std::fs::write(RCU_BARRIER_KNOB, "1") {
        eprintln!(
            "leakgen: warning: cannot write {RCU_BARRIER_KNOB} ({e}); sleeping \
             {RCU_FALLBACK:?} instead, RCU-freed objects may still be outstanding"
        );
        std::thread::sleep(RCU_FALLBACK);
    }
}

// ---------------------------------------------------------------------------
// other: eventfd

/// Each eventfd holds one 48-byte eventfd_ctx in kmalloc-64 (unaccounted,
/// call site do_eventfd). Keys with a small payload are not used here: every
/// add_key also kmallocs a 328-byte assoc_array edit, i.e. kmalloc-512.
#[inline(never)]
fn leak_eventfd(n: usize) -> Result<Vec<i32>> {
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        let fd = sys_eventfd2(0, libc::EFD_CLOEXEC)
            .map_err(|e| fd_error("eventfd2(0, EFD_CLOEXEC)", e, i, n, ""))?;
        fds.push(fd);
    }
    Ok(fds)
}

#[inline(never)]
fn run_other(n: usize) -> Result<()> {
    ensure_fd_room(n)?;
    let fds = leak_eventfd(n)?;
    hold_protocol(|| close_all(&fds))
}

// ---------------------------------------------------------------------------
// zombies / pipes

#[inline(never)]
fn run_zombies(n: usize) -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        bail!("prctl(PR_SET_CHILD_SUBREAPER) failed: {e}");
    }
    for i in 0..n {
        spawn_probe().with_context(|| format!("probe {i} of {n}"))?;
    }
    // Every grandchild has exited once it can be reaped; wait for all of them
    // to be zombies so READY means N task_structs are held.
    let deadline = Instant::now() + Duration::from_secs(10);
    while zombie_children() < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} grandchildren became zombies in 10 s",
                zombie_children()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    hold_protocol(reap_all)
}

/// A child that forks a grandchild and exits: the grandchild's task_struct is
/// allocated by the child, which is gone by the time anyone looks.
#[inline(never)]
fn spawn_probe() -> Result<()> {
    // SAFETY: single-threaded; both children only call fork and _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        bail!("fork failed: {e}");
    }
    if child == 0 {
        // SAFETY: async-signal-safe calls only, in the forked child.
        unsafe {
            let grandchild = libc::fork();
            if grandchild == 0 {
                libc::_exit(0);
            }
            libc::_exit(i32::from(grandchild < 0));
        }
    }
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    if unsafe { libc::waitpid(child, &mut status, 0) } != child || status != 0 {
        bail!("probe child {child} failed (wait status {status}): its fork failed?");
    }
    Ok(())
}

/// Our children in state Z (the reparented grandchildren).
fn zombie_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // Fields after the last ')': state, ppid, ...
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let mut f = rest.split_whitespace();
            f.next() == Some("Z") && f.next() == Some(me.as_str())
        })
        .count()
}

fn reap_all() -> Result<()> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer; -1 waits for any child.
    while unsafe { libc::waitpid(-1, &mut status, 0) } > 0 {}
    Ok(())
}

#[inline(never)]
fn run_pipes(n: usize) -> Result<()> {
    ensure_fd_room(2 * n)?;
    let mut fds = Vec::with_capacity(2 * n);
    for i in 0..n {
        let mut pair = [0i32; 2];
        // SAFETY: pair is a valid 2-int out-array.
        if unsafe { libc::pipe2(pair.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            return Err(fd_error("pipe2(O_CLOEXEC)", e, i, n, ""));
        }
        fds.extend(pair);
    }
    hold_protocol(|| close_all(&fds))
}

// ---------------------------------------------------------------------------
// pipe-pages

/// Bytes each `pipe-pages` pipe holds: 256 pages of 4 KiB. Root may pass the
/// per-user soft limit (`/proc/sys/fs/pipe-user-pages-soft`, 16,384 pages),
/// which would otherwise shrink new pipes to one page.
const PIPE_PAGES_BYTES: usize = 1 << 20;

#[inline(never)]
fn run_pipe_pages(n: usize) -> Result<()> {
    ensure_fd_room(2 * n)?;
    let mut fds = Vec::with_capacity(2 * n);
    let chunk = vec![0x5au8; 64 << 10];
    for i in 0..n {
        let mut pair = [0i32; 2];
        // SAFETY: pair is a valid 2-int out-array.
        if unsafe { libc::pipe2(pair.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            return Err(fd_error("pipe2(O_CLOEXEC|O_NONBLOCK)", e, i, n, ""));
        }
        fds.extend(pair);
        fill_pipe(pair[1], &chunk).with_context(|| format!("pipe {i} of {n}"))?;
    }
    hold_protocol(|| close_all(&fds))
}

/// Resizes the pipe to [`PIPE_PAGES_BYTES`] and writes until it is full: the
/// pages are allocated by these writes, on this function's stack.
#[inline(never)]
fn fill_pipe(fd: i32, chunk: &[u8]) -> Result<()> {
    // SAFETY: fcntl with integer arguments.
    let size = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_PAGES_BYTES as libc::c_int) };
    if size < 0 {
        return Err(os_error("fcntl(F_SETPIPE_SZ, 1 MiB)"));
    }
    if (size as usize) < PIPE_PAGES_BYTES {
        bail!(
            "the pipe took {size} bytes, not {PIPE_PAGES_BYTES}; hint: /proc/sys/fs/pipe-max-size"
        );
    }
    let mut written = 0usize;
    loop {
        // SAFETY: chunk is a live buffer of chunk.len() bytes.
        let n = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                break;
            }
            return Err(os_error("write to the pipe"));
        }
        written += n as usize;
    }
    if written < PIPE_PAGES_BYTES {
        bail!("the pipe took {written} bytes before it was full, not {PIPE_PAGES_BYTES}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// memcgs

/// Bytes of tmpfs each `memcgs` memcg is charged with: the page-cache pages
/// keep it from being released after rmdir (a dying memcg).
const MEMCG_CHARGE_BYTES: usize = 64 << 10;

#[inline(never)]
fn run_memcgs(n: usize) -> Result<()> {
    let parent = std::env::var("LEAKGEN_MEMCG_PARENT")
        .context("memcgs needs LEAKGEN_MEMCG_PARENT=DIR (a memory cgroup directory)")?;
    let parent = std::path::PathBuf::from(parent);
    let pid = std::process::id();
    // Any tmpfs: a minimal initramfs (the vm-test guests) has no /dev/shm;
    // a test may name its own.
    let tmp = match std::env::var_os("LEAKGEN_MEMCG_TMPFS") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => tmpfs_dir()?,
    };
    let mut files = Vec::with_capacity(n);
    let mut groups = Vec::with_capacity(n);
    // Back into the memcg this process started in (or LEAKGEN_MEMCG_HOME),
    // not DIR: on cgroup2 a cgroup that delegates memory to its children
    // (DIR must) may hold no process, so writing DIR/cgroup.procs fails with
    // EBUSY.
    let home = match std::env::var_os("LEAKGEN_MEMCG_HOME") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => home_cgroup(&parent)?,
    }
    .join("cgroup.procs");
    for i in 0..n {
        let dir = parent.join(format!("leakgen-{pid}-{i}"));
        let file = tmp.join(format!("leakgen-memcg-{pid}-{i}"));
        make_memcg(&dir).with_context(|| format!("memcg {i} of {n}"))?;
        std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n"))
            .with_context(|| format!("moving into {}", dir.display()))?;
        let charged = std::fs::write(&file, vec![0xa5u8; MEMCG_CHARGE_BYTES])
            .with_context(|| format!("writing {}", file.display()));
        // 7.1+ reparents a dying memcg's LRU folios, so the file alone no
        // longer keeps it dying there; an inotify group holds a reference to
        // the memcg it was made in (`fsnotify_group.memcg`) on every kernel.
        // SAFETY: plain syscall.
        let group = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        let group = if group < 0 {
            Err(os_error(
                "inotify_init1 (the memcg's pin; see fs.inotify.max_user_instances)",
            ))
        } else {
            Ok(group)
        };
        std::fs::write(&home, format!("{pid}\n"))
            .with_context(|| format!("moving back into {}", home.display()))?;
        charged?;
        files.push(file);
        groups.push(group?);
        std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    hold_protocol(|| {
        close_all(&groups)?;
        for f in &files {
            std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
        }
        Ok(())
    })
}

/// A tmpfs directory for the charging files: /dev/shm, or /tmp where /dev
/// has none (the vm-test guests mount a devtmpfs without it and a tmpfs on
/// /tmp). tmpfs pages stay charged until unlinked, disk page cache could be
/// reclaimed and let the memcg go.
fn tmpfs_dir() -> Result<std::path::PathBuf> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    for dir in ["/dev/shm", "/tmp"] {
        let path = CString::new(dir).context("path")?;
        // SAFETY: statfs fills the zeroed struct it is given.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == TMPFS_MAGIC {
            return Ok(std::path::PathBuf::from(dir));
        }
    }
    bail!("no tmpfs at /dev/shm or /tmp to charge the memcgs with")
}

/// The directory of this process's own memory cgroup in the hierarchy
/// `dir` belongs to: the hierarchy's mount (the first ancestor of `dir` on
/// another device) joined with this process's path there (/proc/self/cgroup:
/// the line naming `memory` on v1, `0::` on cgroup2).
fn home_cgroup(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.dev());
    let mut mount = dir.to_path_buf();
    while let Some(up) = mount.parent() {
        if dev(up)? != dev(&mount)? {
            break;
        }
        mount = up.to_path_buf();
    }
    let v2 = std::fs::read_to_string(mount.join("cgroup.controllers")).is_ok();
    let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            let hit = if v2 {
                ctrl.is_empty()
            } else {
                ctrl.split(',').any(|c| c == "memory")
            };
            hit.then(|| path.trim_start_matches('/').to_string())
        })
        .with_context(|| format!("no line of /proc/self/cgroup for {}", mount.display()))?;
    Ok(mount.join(rel))
}

/// mkdir of a memory cgroup: the kernel allocates its css and per-CPU
/// statistics in this call (`mem_cgroup_css_alloc`).
#[inline(never)]
fn make_memcg(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))
}

// ---------------------------------------------------------------------------
// backlog

fn os_error(what: &str) -> anyhow::Error {
    let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
    anyhow!("{what} failed: {e}")
}

#[inline(never)]
fn run_backlog(n: usize) -> Result<()> {
    ensure_fd_room(n + 8)?;
    // SAFETY: plain syscall; leakgen is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(os_error("unshare(CLONE_NEWNET) (needs root)"));
    }
    loopback_up()?;
    // Per network namespace: a full queue must not turn into cookies.
    std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "0")
        .context("writing /proc/sys/net/ipv4/tcp_syncookies in the new netns")?;
    let (listener, addr) = listen_loopback(n + 16)?;
    let mut ready = [0i32; 2];
    // SAFETY: ready is a valid 2-int out-array.
    if unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("pipe2"));
    }
    // SAFETY: single-threaded; the child only makes syscalls and exits.
    let client = unsafe { libc::fork() };
    if client < 0 {
        return Err(os_error("fork"));
    }
    if client == 0 {
        let code = match connect_all(&addr, n) {
            Ok(()) => {
                let _ = sys_write(ready[1], b"1");
                // Hold the connections until killed.
                loop {
                    // SAFETY: pause has no arguments.
                    unsafe { libc::pause() };
                }
            }
            Err(e) => {
                eprintln!("leakgen backlog client: {e:#}");
                1
            }
        };
        // SAFETY: leaving the forked child without running parent destructors.
        unsafe { libc::_exit(code) };
    }
    let mut byte = [0u8; 1];
    // SAFETY: byte is a valid 1-byte buffer.
    let got = unsafe { libc::read(ready[0], byte.as_mut_ptr().cast(), 1) };
    if got != 1 {
        bail!("the client (pid {client}) exited before making {n} connections");
    }
    hold_protocol(|| {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(client, libc::SIGKILL);
            libc::waitpid(client, std::ptr::null_mut(), 0);
        }
        sys_close(listener).map_err(|e| anyhow!("close(listener) failed: {e}"))
    })
}

fn sys_write(fd: i32, buf: &[u8]) -> isize {
    // SAFETY: buf is valid for buf.len() bytes.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
}

/// `ip link set lo up`, by ioctl: a fresh network namespace has lo down.
fn loopback_up() -> Result<()> {
    // SAFETY: a socket for the interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error("socket(AF_INET, SOCK_DGRAM)"));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = src as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq naming lo.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            Err(os_error("ioctl(SIOCGIFFLAGS, lo)"))
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) != 0 {
                Err(os_error("ioctl(SIOCSIFFLAGS, lo up)"))
            } else {
                Ok(())
            }
        }
    };
    let _ = sys_close(fd);
    result
}

/// A TCP listener on 127.0.0.1 (kernel-chosen port) with room for `backlog`.
fn listen_loopback(backlog: usize) -> Result<(i32, libc::sockaddr_in)> {
    // SAFETY: plain syscalls on a socket we own; addr is a valid sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(os_error("socket(AF_INET, SOCK_STREAM)"));
        }
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(os_error("bind(127.0.0.1:0)"));
        }
        if libc::listen(fd, backlog as i32) != 0 {
            return Err(os_error("listen"));
        }
        let mut got = len;
        if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut got) != 0 {
            return Err(os_error("getsockname"));
        }
        Ok((fd, addr))
    }
}

#[inline(never)]
fn connect_all(addr: &libc::sockaddr_in, n: usize) -> Result<()> {
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    for i in 0..n {
        // SAFETY: plain syscalls; addr is a valid sockaddr_in. The fds stay
        // open: the connections are what is held.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(os_error("socket")).with_context(|| format!("connection {i} of {n}"));
            }
            if libc::connect(fd, (addr as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(os_error("connect")).with_context(|| format!("connection {i} of {n}"));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// inotify / files

/// Raises RLIMIT_NOFILE's soft limit to the hard one and checks that `n` more
/// fds fit beside the ones already open.
fn ensure_fd_room(n: usize) -> Result<()> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        bail!("getrlimit(RLIMIT_NOFILE) failed: {e}");
    }
    if rl.rlim_cur < rl.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: raised is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            bail!(
                "setrlimit(RLIMIT_NOFILE, {0}/{0}) failed: {e}; hint: raise the hard limit (ulimit -Hn)",
                rl.rlim_max
            );
        }
    }
    let open_now = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(3);
    let need = open_now + n as u64;
    if need > rl.rlim_max {
        bail!(
            "{n} more fds plus the {open_now} already open exceed RLIMIT_NOFILE's hard limit {}; \
             hint: raise it (ulimit -Hn, or LimitNOFILE=) or pick a smaller N",
            rl.rlim_max
        );
    }
    presize_fd_table(need + FD_SLACK, rl.rlim_max);
    Ok(())
}

/// Room for the fds std and /proc reads open after ensure_fd_room.
const FD_SLACK: u64 = 16;

/// Grows the fd table once, before the leak loop, so that growing it does not
/// add allocations of the leak's size class. The table only grows, to
/// 128 * 2^k slots; the step to 1024 slots (fds 512..=1023) kvmallocs
/// 2*1024/8 + 8 = 264 bytes of bitmaps from kmalloc-cg-512 (seen as an
/// alloc_fdtable kmalloc-512 in our context, held until exit), so that size is
/// skipped: 2048 slots put the bitmaps in kmalloc-cg-1k.
fn presize_fd_table(max_fd: u64, hard_limit: u64) {
    let target = if (512..1024).contains(&max_fd) {
        1024
    } else {
        max_fd
    };
    // The initial table embedded in files_struct has 64 slots.
    if target < 64 {
        return;
    }
    if target >= hard_limit {
        eprintln!(
            "leakgen: warning: RLIMIT_NOFILE {hard_limit} too low to presize the fd table to \
             {target}; growing it may kmalloc from kmalloc-cg-512 (alloc_fdtable)"
        );
        return;
    }
    // SAFETY: plain fd syscalls on fds this function owns; `target` is
    // unused (nothing else in this process opens fds that high) and closed
    // right after.
    let ok = unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        let ok = fd >= 0 && libc::dup2(fd, target as i32) >= 0;
        if ok {
            libc::close(target as i32);
        }
        if fd >= 0 {
            libc::close(fd);
        }
        ok
    };
    if !ok {
        eprintln!(
            "leakgen: warning: could not presize the fd table to {target} ({}); growing it may \
             kmalloc from kmalloc-cg-512 (alloc_fdtable)",
            io::Error::last_os_error()
        );
    }
}

fn fd_error(call: &str, e: Errno, done: usize, n: usize, extra: &str) -> anyhow::Error {
    let hint = match e.0 {
        libc::EMFILE => format!("EMFILE is RLIMIT_NOFILE (see `ulimit -n`){extra}"),
        libc::ENFILE => "system-wide file limit /proc/sys/fs/file-max reached".into(),
        _ => "see the syscall's man page".into(),
    };
    anyhow!("{call} failed after {done} of {n}: {e}; hint: {hint}")
}

/// Each instance holds one fsnotify_group, kzalloc'ed with
/// GFP_KERNEL_ACCOUNT -> kmalloc-cg-512, until its fd is closed.
#[inline(never)]
fn leak_inotify(n: usize) -> Result<Vec<i32>> {
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        let fd = sys_inotify_init1(0).map_err(|e| {
            let max = read_trimmed("/proc/sys/fs/inotify/max_user_instances")
                .unwrap_or_else(|| "?".into());
            fd_error(
                "inotify_init1(0)",
                e,
                i,
                n,
                &format!(
                    ", or the per-uid inotify instance limit \
                     /proc/sys/fs/inotify/max_user_instances={max} (counts every process of the uid)"
                ),
            )
        })?;
        fds.push(fd);
    }
    Ok(fds)
}

/// Each open holds one `filp` cache object until the fd is closed.
#[inline(never)]
fn leak_files(n: usize) -> Result<Vec<i32>> {
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        let fd = sys_openat(c"/dev/null", libc::O_RDONLY | libc::O_CLOEXEC)
            .map_err(|e| fd_error("openat(\"/dev/null\", O_RDONLY)", e, i, n, ""))?;
        fds.push(fd);
    }
    Ok(fds)
}

fn close_all(fds: &[i32]) -> Result<()> {
    for (i, &fd) in fds.iter().enumerate() {
        sys_close(fd).map_err(|e| {
            anyhow!(
                "close({fd}) failed after {i} of {}: {e}; hint: fd closed behind our back?",
                fds.len()
            )
        })?;
    }
    Ok(())
}

#[inline(never)]
fn run_inotify(n: usize) -> Result<()> {
    // Checked up front: an inotify_init1 EMFILE cannot tell this limit from
    // RLIMIT_NOFILE, and a clear error beats a half-built set.
    let max = read_trimmed("/proc/sys/fs/inotify/max_user_instances");
    if let Some(max) = max.as_deref().and_then(|s| s.parse::<usize>().ok()) {
        if n > max {
            bail!(
                "{n} inotify instances exceed /proc/sys/fs/inotify/max_user_instances={max} \
                 (a per-uid limit shared by every process of the uid); hint: \
                 sysctl -w fs.inotify.max_user_instances={} or pick a smaller N",
                n + 128
            );
        }
    }
    ensure_fd_room(n)?;
    let fds = leak_inotify(n)?;
    hold_protocol(|| close_all(&fds))
}

/// Remote charging (`set_active_memcg`): a child moves into the memory cgroup
/// `$LEAKGEN_MEMCG` and watches a fresh directory with inotify; this process
/// (in its own memcg) then creates N files there. Each IN_CREATE event is
/// kmalloc'ed here, with __GFP_ACCOUNT, but charged to the watcher's group
/// memcg (fs/notify/inotify/inotify_fsnotify.c), and stays queued until the
/// watcher goes: 32-40 bytes of event plus a 41-byte name, kmalloc-cg-96.
#[inline(never)]
fn run_charged(n: usize) -> Result<()> {
    let memcg = std::env::var("LEAKGEN_MEMCG").context("charged needs LEAKGEN_MEMCG=DIR")?;
    let dir = std::env::temp_dir().join(format!("leakgen-charged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("creating the watched directory")?;
    let cdir = CString::new(dir.as_os_str().as_encoded_bytes()).context("directory name")?;
    let mut ready = [0i32; 2];
    // SAFETY: ready is a valid 2-int out-array.
    if unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("pipe2"));
    }
    let procs = CString::new(format!("{memcg}/cgroup.procs")).context("memcg path")?;
    // SAFETY: single-threaded; the child only makes syscalls until it is killed.
    let watcher = unsafe { libc::fork() };
    if watcher < 0 {
        return Err(os_error("fork"));
    }
    if watcher == 0 {
        // SAFETY: plain syscalls on buffers that live until _exit.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            let ok = fd >= 0 && libc::write(fd, b"0\n".as_ptr().cast(), 2) == 2;
            let ino = libc::inotify_init1(libc::IN_CLOEXEC);
            let ok =
                ok && ino >= 0 && libc::inotify_add_watch(ino, cdir.as_ptr(), libc::IN_CREATE) >= 0;
            let byte = [u8::from(ok)];
            libc::write(ready[1], byte.as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    // SAFETY: our end of the pipe; one byte into a live buffer.
    let mut byte = [0u8; 1];
    let got = unsafe {
        libc::close(ready[1]);
        libc::read(ready[0], byte.as_mut_ptr().cast(), 1)
    };
    let stop_watcher = || {
        // SAFETY: our own child.
        unsafe {
            libc::kill(watcher, libc::SIGKILL);
            libc::waitpid(watcher, std::ptr::null_mut(), 0);
        }
    };
    if got != 1 || byte[0] != 1 {
        stop_watcher();
        bail!(
            "the watcher could not join {memcg} or watch {}",
            dir.display()
        );
    }
    for i in 0..n {
        let name = dir.join(format!("{i:0>41}"));
        std::fs::File::create(&name).with_context(|| format!("creating {}", name.display()))?;
    }
    hold_protocol(|| {
        stop_watcher();
        std::fs::remove_dir_all(&dir).context("removing the watched directory")
    })
}

#[inline(never)]
fn run_files(n: usize) -> Result<()> {
    ensure_fd_room(n)?;
    let fds = leak_files(n)?;
    hold_protocol(|| close_all(&fds))
}

// ---------------------------------------------------------------------------
// writev churn

/// Checks the clock only every this many ops: Instant::now is a vDSO call, but
/// at ~1M ops/s it would still be a visible share of the loop.
const CLOCK_EVERY: u64 = 256;

/// Ops between pacing checks under --rate: small enough that a paced run
/// stays smooth at 1 ms granularity, large enough that the sleep syscall is
/// not a visible share of the op cost.
const PACE_EVERY: u64 = 32;

/// Runs `op` until `limit`, optionally paced to `rate` ops/s; returns the
/// number of ops done.
#[inline(always)]
fn churn_loop(
    limit: Limit,
    rate: Option<f64>,
    mut op: impl FnMut(u64) -> Result<()>,
) -> Result<u64> {
    let start = Instant::now();
    let (max_ops, deadline) = match limit {
        Limit::Ops(n) => (n, None),
        Limit::Secs(s) => (u64::MAX, Some(Duration::from_secs_f64(s))),
    };
    let mut ops = 0u64;
    while ops < max_ops {
        if let Some(d) = deadline {
            if ops.is_multiple_of(CLOCK_EVERY) && start.elapsed() >= d {
                break;
            }
        }
        if let Some(r) = rate {
            if ops.is_multiple_of(PACE_EVERY) {
                pace(start, ops, r);
            }
        }
        op(ops)?;
        ops += 1;
    }
    Ok(ops)
}

/// Sleeps until `ops` ops are due at `rate` ops/s since `start`.
fn pace(start: Instant, ops: u64, rate: f64) {
    let due = Duration::from_secs_f64(ops as f64 / rate);
    if let Some(ahead) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(ahead);
    }
}

/// `n` empty iovecs: iovec_from_user kmallocs n * 16 bytes (32 -> 512,
/// 16 -> 256) and frees them before writev returns.
fn empty_iovecs<const N: usize>() -> [libc::iovec; N] {
    static BYTE: u8 = 0;
    [libc::iovec {
        iov_base: &BYTE as *const u8 as *mut libc::c_void,
        iov_len: 0,
    }; N]
}

fn writev_op(fd: i32, iov: &[libc::iovec], ops: u64) -> Result<()> {
    sys_writev(fd, iov).map(|_| ()).map_err(|e| {
        anyhow!(
            "writev(/dev/null, {} iovecs) failed after {ops} ops: {e}; hint: see writev(2)",
            iov.len()
        )
    })
}

/// 32 empty iovecs -> one transient kmalloc-512 per op.
#[inline(never)]
fn churn_writev(fd: i32, limit: Limit, rate: Option<f64>) -> Result<u64> {
    let iov = empty_iovecs::<WRITEV_IOVS>();
    churn_loop(limit, rate, |ops| writev_op(fd, &iov, ops))
}

/// Same as churn_writev with 16 iovecs -> a transient kmalloc-256.
#[inline(never)]
fn churn_iovec256(fd: i32, limit: Limit, rate: Option<f64>) -> Result<u64> {
    let iov = empty_iovecs::<WRITEV256_IOVS>();
    churn_loop(limit, rate, |ops| writev_op(fd, &iov, ops))
}

/// inotify_init1 + close: one fsnotify_group (accounted, kmalloc-cg-512)
/// plus a file, an inode and more, all freed again by the close.
#[inline(never)]
fn churn_inotify(limit: Limit, rate: Option<f64>) -> Result<u64> {
    churn_loop(limit, rate, |ops| {
        let fd = sys_inotify_init1(libc::IN_CLOEXEC).map_err(|e| {
            anyhow!(
                "inotify_init1 failed after {ops} ops: {e}; hint: \
                 /proc/sys/fs/inotify/max_user_instances is shared by every process of the uid"
            )
        })?;
        sys_close(fd).map_err(|e| anyhow!("close(inotify fd {fd}) failed: {e}"))
    })
}

/// Bytes a tmpfs-churn op writes, and how many ops fill the file before it is
/// truncated (64 MiB).
const TMPFS_CHUNK: usize = 64 << 10;
const TMPFS_OPS_PER_FILE: u64 = 1024;

#[inline(never)]
fn churn_tmpfs(limit: Limit, rate: Option<f64>) -> Result<u64> {
    let path = format!("/dev/shm/leakgen-tmpfs-churn-{}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {path}"))?;
    // Unlinked at once: the pages go with the last close, however this ends.
    std::fs::remove_file(&path).with_context(|| format!("unlinking {path}"))?;
    let chunk = vec![0x5au8; TMPFS_CHUNK];
    churn_loop(limit, rate, |ops| {
        let at = ops % TMPFS_OPS_PER_FILE;
        if at == 0 {
            file.set_len(0)
                .with_context(|| format!("truncating the tmpfs file after {ops} ops"))?;
        }
        std::os::unix::fs::FileExt::write_all_at(&file, &chunk, at * TMPFS_CHUNK as u64)
            .with_context(|| format!("writing the tmpfs file after {ops} ops; hint: df /dev/shm"))
    })
}

/// Bytes a pipe-churn op writes and reads back: two pages.
const PIPE_CHURN_BYTES: usize = 12 << 10;

#[inline(never)]
fn churn_pipe(limit: Limit, rate: Option<f64>) -> Result<u64> {
    let mut pair = [0i32; 2];
    // SAFETY: pair is a valid 2-int out-array.
    if unsafe { libc::pipe2(pair.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("pipe2(O_CLOEXEC)"));
    }
    let out = vec![0x5au8; PIPE_CHURN_BYTES];
    let mut back = vec![0u8; PIPE_CHURN_BYTES];
    let result = churn_loop(limit, rate, |ops| {
        // SAFETY: out is a live buffer of its length.
        let n = unsafe { libc::write(pair[1], out.as_ptr().cast(), out.len()) };
        if n != out.len() as isize {
            return Err(os_error("write to the churn pipe")).context(format!("after {ops} ops"));
        }
        let mut got = 0usize;
        while got < back.len() {
            // SAFETY: the tail of back is live and back.len() - got bytes long.
            let n =
                unsafe { libc::read(pair[0], back[got..].as_mut_ptr().cast(), back.len() - got) };
            if n <= 0 {
                return Err(os_error("read from the churn pipe"))
                    .context(format!("after {ops} ops"));
            }
            got += n as usize;
        }
        Ok(())
    });
    close_all(&pair)?;
    result
}

/// user + sys CPU time of the calling thread.
fn thread_cpu() -> Result<Duration> {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes to it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        let e = Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        bail!("getrusage(RUSAGE_THREAD) failed: {e}");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

#[inline(never)]
fn run_churn(op: Churn, limit: Limit, wait: bool, rate: Option<f64>) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("open(\"/dev/null\", O_WRONLY) failed")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let pid = std::process::id();
    say(&format!("READY {pid}"))?;
    if wait {
        wait_for_line()?;
    }
    let cpu0 = thread_cpu()?;
    let start = Instant::now();
    let ops = match op {
        Churn::Writev(WRITEV_IOVS) => churn_writev(fd, limit, rate)?,
        Churn::Writev(_) => churn_iovec256(fd, limit, rate)?,
        Churn::Inotify => churn_inotify(limit, rate)?,
        Churn::Tmpfs => churn_tmpfs(limit, rate)?,
        Churn::Pipe => churn_pipe(limit, rate)?,
    };
    let secs = start.elapsed().as_secs_f64();
    let cpu = (thread_cpu()? - cpu0).as_secs_f64();
    let rate = if secs > 0.0 { ops as f64 / secs } else { 0.0 };
    let frac = if secs > 0.0 { cpu / secs } else { 0.0 };
    say(&format!(
        "DONE {pid} ops={ops} secs={secs:.3} ops_per_sec={rate:.0} cpu={frac:.3}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Command, String> {
        parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses() {
        assert_eq!(p(&["keys", "10"]), Ok(Command::Hold(Mode::Keys, 10)));
        assert_eq!(p(&["keys-rcu", "10"]), Ok(Command::Hold(Mode::KeysRcu, 10)));
        assert_eq!(
            p(&["keys-twice", "10"]),
            Ok(Command::Hold(Mode::KeysTwice, 10))
        );
        assert!(p(&["keys-twice", "8192"]).is_err());
        assert_eq!(p(&["twopath", "10"]), Ok(Command::TwoPath(10, 50)));
        assert_eq!(p(&["twopath", "10", "500"]), Ok(Command::TwoPath(10, 500)));
        assert!(p(&["twopath"]).is_err());
        assert_eq!(p(&["rarepath", "20"]), Ok(Command::RarePath(20, 6000)));
        assert_eq!(p(&["rarepath", "5", "100"]), Ok(Command::RarePath(5, 100)));
        assert!(p(&["rarepath"]).is_err());
        assert_eq!(
            p(&["writev", "--ops", "5", "--wait"]),
            Ok(Command::Churn {
                op: Churn::Writev(32),
                limit: Limit::Ops(5),
                wait: true,
                rate: None,
            })
        );
        assert_eq!(
            p(&["writev256", "1.5"]),
            Ok(Command::Churn {
                op: Churn::Writev(16),
                limit: Limit::Secs(1.5),
                wait: false,
                rate: None,
            })
        );
        assert_eq!(
            p(&["inotify-churn", "2", "--rate", "50000"]),
            Ok(Command::Churn {
                op: Churn::Inotify,
                limit: Limit::Secs(2.0),
                wait: false,
                rate: Some(50000.0),
            })
        );
        assert!(p(&["writev", "1", "--rate", "0"]).is_err());
        assert!(p(&["writev", "1", "--rate"]).is_err());
        assert!(p(&[]).is_err());
        assert!(p(&["keys"]).is_err());
        assert!(p(&["keys", "-1"]).is_err());
        assert_eq!(p(&["keys", "16382"]), Ok(Command::Hold(Mode::Keys, 16382)));
        assert!(p(&["keys", "16383"]).is_err());
        assert!(p(&["writev"]).is_err());
        assert!(p(&["writev", "1", "--ops", "3"]).is_err());
        assert!(p(&["bogus", "1"]).is_err());
    }
}
