//! `leaktrace memcg` against this machine's real cgroupfs: memcgs we create and
//! remove from known processes, one pinned by charged kernel objects that a
//! known process keeps, and the pre-existing dying count. Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use leaktrace_tests::{leakgen_bin, leaktrace_bin, skip_unless, Tmpfs};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Where the memory controller is, found independently of leaktrace.
#[derive(Debug, Clone)]
struct Hier {
    version: u8,
    mount: PathBuf,
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo")
}

fn memory_line() -> Option<(u32, u64)> {
    let text = std::fs::read_to_string("/proc/cgroups").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&"memory") && f.get(3) == Some(&"1"))
            .then(|| Some((f[1].parse().ok()?, f[2].parse().ok()?)))?
    })
}

fn v1_memory() -> Option<Hier> {
    let (hid, _) = memory_line()?;
    if hid == 0 {
        return None;
    }
    mountinfo().lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let r: Vec<&str> = right.split_whitespace().collect();
        (r.first() == Some(&"cgroup") && r.get(2)?.split(',').any(|o| o == "memory")).then(|| {
            Hier {
                version: 1,
                mount: PathBuf::from(left.split_whitespace().nth(4).unwrap_or("/")),
            }
        })
    })
}

fn v2_memory() -> Option<Hier> {
    // 6.16+ without CONFIG_MEMCG_V1 has no memory line in /proc/cgroups at all.
    if memory_line().is_some_and(|(hid, _)| hid != 0) {
        return None;
    }
    let mount = mountinfo().lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap_or("/")))
    })?;
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).ok()?;
    controllers
        .split_whitespace()
        .any(|c| c == "memory")
        .then_some(Hier { version: 2, mount })
}

impl Hier {
    /// A fresh child memcg path (not created yet).
    fn child(&self, tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.mount.join(format!(
            "leaktrace-test-{tag}-{}-{nanos:x}",
            std::process::id()
        ))
    }

    /// cgroup2 needs the memory controller enabled for children of the root.
    fn enable_children(&self) {
        if self.version == 2 {
            let _ = std::fs::write(self.mount.join("cgroup.subtree_control"), "+memory");
        }
    }

    /// Where our own memory cgroup is, to move a task back out of the test memcg.
    fn own_cgroup(&self) -> PathBuf {
        let text = std::fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
        let rel = text
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                let hit = if self.version == 1 {
                    ctrl.split(',').any(|c| c == "memory")
                } else {
                    ctrl.is_empty()
                };
                hit.then(|| path.to_string())
            })
            .unwrap_or_else(|| "/".to_string());
        self.mount.join(rel.trim_start_matches('/'))
    }

    /// The kernel's dying memcgs by the same arithmetic a user would do.
    fn dying(&self) -> u64 {
        if self.version == 2 {
            let stat =
                std::fs::read_to_string(self.mount.join("cgroup.stat")).expect("cgroup.stat");
            let get = |k: &str| {
                stat.lines()
                    .find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok())
            };
            return get("nr_dying_subsys_memory ")
                .or_else(|| get("nr_dying_descendants "))
                .expect("nr_dying_descendants");
        }
        let (_, total) = memory_line().expect("memory line");
        total.saturating_sub(count_dirs(&self.mount))
    }
}

fn count_dirs(dir: &Path) -> u64 {
    1 + std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| count_dirs(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// `leaktrace memcg --json ARGS`, its JSON lines and stderr collected by threads.
struct Memcg {
    child: Child,
    lines: Receiver<Value>,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Memcg {
    fn start(args: &[&str]) -> Result<Memcg> {
        let mut child = Command::new(leaktrace_bin())
            .args(["memcg", "--json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning leaktrace memcg")?;
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("non-JSON line in --json mode: {e}: {l}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if etx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut m = Memcg {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match m
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    let done = l.contains("attached to memcg lifetimes");
                    m.seen.push(l);
                    if done {
                        return Ok(m);
                    }
                }
                Err(_) => bail!("leaktrace memcg did not attach; stderr: {:?}", m.seen),
            }
        }
    }

    fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(v) => last = Some(v),
                Err(_) => {
                    while let Ok(l) = self.stderr.try_recv() {
                        self.seen.push(l);
                    }
                    bail!(
                        "timed out waiting for {what}; last report: {}; stderr: {:?}",
                        last.map_or("none".into(), |v: Value| v.to_string()),
                        self.seen
                    )
                }
            }
        }
    }
}

impl Drop for Memcg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find<'a>(report: &'a Value, path: &str) -> Option<&'a Value> {
    report["memcgs"]
        .as_array()?
        .iter()
        .find(|m| m["path"].as_str() == Some(path))
}

fn rel(h: &Hier, dir: &Path) -> String {
    format!(
        "/{}",
        dir.strip_prefix(&h.mount).expect("under mount").display()
    )
}

/// Run `mkdir`/`rmdir` as their own processes: a known pid and comm.
fn run_tool(tool: &str, dir: &Path) -> u32 {
    let mut child = Command::new(tool).arg(dir).spawn().expect(tool);
    let pid = child.id();
    let status = child.wait().expect("wait");
    assert!(status.success(), "{tool} {} failed", dir.display());
    pid
}

/// Removes the test memcg however the test ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn empty_memcg_is_attributed_then_released(h: Hier) {
    h.enable_children();
    let mut tracer = Memcg::start(&[
        "--top",
        "--interval",
        "250ms",
        "--zombie-after",
        "1s",
        "--no-pins",
    ])
    .expect("start");
    let dir = h.child("empty");
    let _cleanup = Cleanup(dir.clone());
    let path = rel(&h, &dir);
    let mkdir_pid = run_tool("mkdir", &dir);
    let live = tracer
        .wait_for("the new memcg, live", |r| {
            find(r, &path).is_some_and(|m| m["state"] == "live")
        })
        .expect("live");
    let m = find(&live, &path).expect("listed");
    assert_eq!(
        m["creator"]["tgid"].as_u64(),
        Some(u64::from(mkdir_pid)),
        "{m}"
    );
    assert_eq!(m["creator"]["comm"], "mkdir", "{m}");
    let rmdir_pid = run_tool("rmdir", &dir);
    // Where the kernel has kprobes the memcg css's own free is seen too.
    let kprobes = tracer
        .seen
        .iter()
        .any(|l| l.contains("+ kprobes mem_cgroup_css_offline"));
    // Recorded in the test log (vm-test console logs) so the mode is visible.
    for l in tracer.seen.iter().filter(|l| l.contains("memcg hooks:")) {
        println!("{l}");
    }
    let released = tracer
        .wait_for(
            "the memcg released (and its css freed, with kprobes)",
            |r| {
                find(r, &path).is_some_and(|m| {
                    m["state"] == "released" && (!kprobes || m["css_freed_after_rmdir_s"].is_f64())
                })
            },
        )
        .expect("released");
    let m = find(&released, &path).expect("listed");
    assert_eq!(
        m["creator"]["tgid"].as_u64(),
        Some(u64::from(mkdir_pid)),
        "{m}"
    );
    assert_eq!(
        m["remover"]["tgid"].as_u64(),
        Some(u64::from(rmdir_pid)),
        "{m}"
    );
    assert_eq!(m["remover"]["comm"], "rmdir", "{m}");
    assert!(m["released_after_rmdir_s"].as_f64().is_some(), "{m}");
    assert!(
        released["counts"]["released"].as_u64() >= Some(1),
        "{released}"
    );
}

/// leakgen started inside `cgroup` (it joins before exec, so every allocation
/// it makes is charged there) holding N inotify instances.
struct Pinner {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
}

impl Pinner {
    fn start(cgroup: &Path, n: u32) -> Result<Pinner> {
        let procs = std::ffi::CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )?;
        let mut cmd = Command::new(leakgen_bin());
        cmd.args(["inotify", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing task itself, on v1 and v2.
                let rc = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("spawning leakgen in the cgroup")?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let out = child.stdout.take().context("leakgen stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != format!("READY {pid}") {
            bail!("leakgen printed {line:?}");
        }
        Ok(Pinner { child, stdin, pid })
    }
}

impl Drop for Pinner {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "release");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pinned_memcg_becomes_zombie(h: Hier) {
    const N: u64 = 64;
    skip_unless!(
        Path::new("/sys/kernel/slab/kmalloc-cg-512").exists(),
        "no kmalloc-cg-512 cache (kernel before 5.14): inotify groups land in kmalloc-512"
    );
    h.enable_children();
    let mut tracer = Memcg::start(&[
        "--top",
        "--interval",
        "250ms",
        "--zombie-after",
        "1s",
        "--stacks",
        "10",
    ])
    .expect("start");
    let dir = h.child("pinned");
    let _cleanup = Cleanup(dir.clone());
    let path = rel(&h, &dir);
    let mkdir_pid = run_tool("mkdir", &dir);
    let pinner = Pinner::start(&dir, N as u32).expect("leakgen in the memcg");
    // Move the task out (rmdir needs an empty cgroup); what it allocated
    // stays charged to the memcg it was allocated in.
    std::fs::write(h.own_cgroup().join("cgroup.procs"), pinner.pid.to_string())
        .expect("moving leakgen out");
    run_tool("rmdir", &dir);
    let dying = tracer
        .wait_for("the memcg dying", |r| {
            find(r, &path).is_some_and(|m| m["state"] == "dying" || m["state"] == "zombie")
        })
        .expect("dying");
    assert!(find(&dying, &path).is_some());
    let zombie = tracer
        .wait_for(
            "the memcg a zombie pinned by leakgen's inotify groups",
            |r| {
                find(r, &path).is_some_and(|m| {
                    m["state"] == "zombie"
                        && m["pinned_by_process"].as_array().is_some_and(|p| {
                            p.iter().any(|p| {
                                p["tgid"].as_u64() == Some(u64::from(pinner.pid))
                                    && p["objects"].as_u64() >= Some(N)
                            })
                        })
                })
            },
        )
        .expect("zombie");
    let m = find(&zombie, &path).expect("listed");
    assert_eq!(
        m["creator"]["tgid"].as_u64(),
        Some(u64::from(mkdir_pid)),
        "{m}"
    );
    assert_eq!(m["creator"]["comm"], "mkdir", "{m}");
    assert!(m["dying_s"].as_f64() >= Some(1.0), "{m}");
    let cg512 = m["pinned_by_cache"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["cache"] == "kmalloc-cg-512"))
        .unwrap_or_else(|| panic!("no kmalloc-cg-512 pins: {m}"));
    assert!(cg512["objects"].as_u64() >= Some(N), "{m}");
    let fsnotify: u64 = m["pinned_stacks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["tgid"].as_u64() == Some(u64::from(pinner.pid))
                && s["kernel"].as_array().is_some_and(|f| {
                    f.iter().any(|f| {
                        f.as_str()
                            .is_some_and(|f| f.contains("fsnotify_alloc_group"))
                    })
                })
        })
        .map(|s| s["objects"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        fsnotify >= N,
        "expected {N} objects on fsnotify_alloc_group stacks: {m}"
    );
    let groups = zombie["zombies_by_creator"].as_array().expect("groups");
    assert!(groups.iter().any(|g| g["key"] == "mkdir"), "{zombie}");
}

fn preexisting_dying_matches_arithmetic(h: Hier) {
    // Other tenants may make and remove memcgs meanwhile: bracket the reading.
    let before = h.dying();
    let out = Command::new(leaktrace_bin())
        .args(["memcg", "--list", "--json"])
        .output()
        .expect("run");
    let after = h.dying();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert_eq!(v["kind"], "list");
    let got = v["preexisting_dying"]["at_start"]
        .as_u64()
        .expect("at_start");
    let (lo, hi) = (before.min(after), before.max(after));
    assert!(
        (lo..=hi).contains(&got),
        "leaktrace says {got} dying memcgs; /proc/cgroups arithmetic says {before}..{after}"
    );
    assert_eq!(
        v["hierarchy"]["version"].as_u64(),
        Some(u64::from(h.version))
    );
    // Every live directory is listed.
    let listed = v["memcgs"].as_array().map_or(0, Vec::len) as u64;
    if h.version == 1 {
        let dirs = count_dirs(&h.mount);
        assert!(
            listed.abs_diff(dirs) <= 2,
            "{listed} listed vs {dirs} directories"
        );
    }
}

#[test]
fn v1_empty_memcg_is_attributed_then_released() {
    let h = v1_memory();
    skip_unless!(h.is_some(), "no cgroup v1 memory hierarchy mounted");
    empty_memcg_is_attributed_then_released(h.expect("checked"));
}

#[test]
fn v2_empty_memcg_is_attributed_then_released() {
    let h = v2_memory();
    skip_unless!(h.is_some(), "the memory controller is not on cgroup2 here");
    empty_memcg_is_attributed_then_released(h.expect("checked"));
}

#[test]
fn v1_pinned_memcg_becomes_a_zombie_with_its_pins() {
    let h = v1_memory();
    skip_unless!(h.is_some(), "no cgroup v1 memory hierarchy mounted");
    pinned_memcg_becomes_zombie(h.expect("checked"));
}

#[test]
fn v2_pinned_memcg_becomes_a_zombie_with_its_pins() {
    let h = v2_memory();
    skip_unless!(h.is_some(), "the memory controller is not on cgroup2 here");
    pinned_memcg_becomes_zombie(h.expect("checked"));
}

#[test]
fn preexisting_dying_count_matches_proc_cgroups_or_cgroup_stat() {
    let h = v1_memory().or_else(v2_memory);
    skip_unless!(h.is_some(), "no memory controller mounted");
    preexisting_dying_matches_arithmetic(h.expect("checked"));
}

// ---- Every memcg the kernel holds, read from kernel memory (`kernel_memcgs`).

/// `leaktrace memcg --list --json`: the one report.
fn list() -> Value {
    let out = Command::new(leaktrace_bin())
        .args(["memcg", "--list", "--json"])
        .output()
        .expect("run leaktrace memcg --list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

fn walked(v: &Value) -> &Vec<Value> {
    v["kernel_memcgs"]["walk"]["memcgs"]
        .as_array()
        .unwrap_or_else(|| panic!("no kernel walk: {}", v["kernel_memcgs"]))
}

fn walked_at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    walked(v).iter().find(|m| m["path"].as_str() == Some(path))
}

/// `memory.stat` key of a live memcg, in pages.
fn stat_pages(dir: &Path, key: &str) -> u64 {
    let text = std::fs::read_to_string(dir.join("memory.stat")).expect("memory.stat");
    let bytes = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {key} in memory.stat"));
    bytes / 4096
}

fn wait_until(what: &str, mut f: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match f() {
            None => return last,
            Some(state) => last = state,
        }
        thread::sleep(Duration::from_millis(500));
    }
    panic!("timed out waiting for {what}; last: {last}");
}

/// After `want` was deleted: the memcg at `path` is released, or (where
/// `others_may_hold`: a disk filesystem's metadata blocks, a container
/// image's files first read by it) still dying without `want` and with every
/// page it still holds named.
fn released_or_held_by_other_pages(path: &str, want: &str, kind: &str, others_may_hold: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = list();
        let Some(m) = walked_at(&v, path) else {
            eprintln!("released once {want} was deleted");
            return;
        };
        let files = m["page_pins"]["files"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has_file = files.iter().any(|f| f["path"].as_str() == Some(want));
        if others_may_hold && !has_file && m[kind].as_i64() < Some(1000) {
            assert!(
                !files.is_empty() || m["page_pins"]["anon_pages"].as_u64() > Some(0),
                "still dying but no page named: {m}"
            );
            eprintln!(
                "still dying after {want} was deleted, held by: {}",
                m["page_pins"]
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not released after {want} was deleted: {m}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let kv: (u32, u32) = (
        it.next().and_then(|x| x.parse().ok()).unwrap_or(0),
        it.next().and_then(|x| x.parse().ok()).unwrap_or(0),
    );
    kv >= (major, minor)
}

/// Filesystem type of the mount holding `path`, from /proc/self/mountinfo.
fn fs_type_of(path: &Path) -> String {
    let path = path.to_string_lossy();
    mountinfo()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            let inside = point == "/" || path == point || path.starts_with(&format!("{point}/"));
            let fs = right.split_whitespace().next()?.to_string();
            inside.then_some((point.len(), fs))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
        .unwrap_or_default()
}

/// Where the pinning file lives: our own tmpfs (shmem pages) or the root
/// filesystem (regular file pages).
enum Backing {
    Tmpfs,
    RootFs,
}

/// Removes a test file however the test ends.
struct RmFile(PathBuf);

impl Drop for RmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn shmem_pins_dying_memcg_until_file_deleted(h: Hier) {
    page_cache_pins_dying_memcg_until_file_deleted(h, Backing::Tmpfs);
}

fn page_cache_pins_dying_memcg_until_file_deleted(h: Hier, backing: Backing) {
    let tmpfs = matches!(backing, Backing::Tmpfs);
    h.enable_children();
    let (_fs, file, kind, fs_type) = match backing {
        Backing::Tmpfs => {
            let fs = Tmpfs::mount("shmem");
            let file = fs.0.join("pinned.dat");
            (Some(fs), file, "shmem", None)
        }
        Backing::RootFs => {
            let dir = ["/var/tmp", "/tmp", "/"]
                .into_iter()
                .map(PathBuf::from)
                .find(|d| d.is_dir())
                .expect("a directory");
            let fs_type = fs_type_of(&dir);
            skip_unless!(
                !matches!(fs_type.as_str(), "tmpfs" | "ramfs" | "rootfs" | "devtmpfs"),
                "{} is on {fs_type} here: no disk-backed file pages",
                dir.display()
            );
            let file = dir.join(format!("leaktrace-pinned-{}.dat", std::process::id()));
            (None, file, "file", Some(fs_type))
        }
    };
    let _rm = RmFile(file.clone());
    let dir = h.child(kind);
    std::fs::create_dir(&dir).expect("mkdir memcg");
    let _cleanup = Cleanup(dir.clone());
    // The writer joins the memcg itself ("0" = the writing task), writes 4 MiB
    // of tmpfs page cache and exits: the pages stay charged to the memcg.
    let script = format!(
        "echo 0 > {}/cgroup.procs && head -c 4194304 /dev/zero > {}",
        dir.display(),
        file.display()
    );
    let st = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("sh");
    assert!(st.success(), "{script}");
    let path = rel(&h, &dir);

    // Live: the walk's per-item pages agree with the kernel's memory.stat
    // (v1 "cache" / v2 "file" is NR_FILE_PAGES, shmem included).
    let file_key = if h.version == 1 { "cache" } else { "file" };
    for (key, field) in [("shmem", "shmem"), (file_key, "file")] {
        let expect = stat_pages(&dir, key);
        // 1,024 pages written; memory.stat may lag by a per-CPU batch
        // (MEMCG_CHARGE_BATCH, 64 pages) until its next flush (999 seen in a
        // 7.3 guest), as the walk's 64-page tolerance below allows too.
        assert!(
            expect >= 1024 - 64 || key == "shmem" && kind == "file",
            "memory.stat {key} {expect} pages"
        );
        let v = list();
        let m = walked_at(&v, &path).unwrap_or_else(|| panic!("{path} not walked"));
        assert_eq!(m["online"], true, "{m}");
        let got = m[field].as_i64().expect("stat readable") as u64;
        assert!(
            got.abs_diff(expect) <= 64,
            "walk {field} {got} vs memory.stat {key} {expect}: {m}"
        );
    }

    // Removed: dying, holding the shmem pages.
    std::fs::remove_dir(&dir).expect("rmdir memcg");
    let v = list();
    let Some(m) = walked_at(&v, &path) else {
        // 7.1+ reparents a dying memcg's LRU folios to its parent, so page
        // cache stops pinning it; before that, a release here is a bug.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        assert!(
            kernel_at_least(7, 1),
            "{path} released after rmdir on {}: its page cache should pin it",
            release.trim()
        );
        eprintln!(
            "kernel {}: page cache reparented at offline, memcg released",
            release.trim()
        );
        return;
    };
    eprintln!("page cache pins the dying memcg on this kernel");
    assert_eq!(m["dying"], true, "{m}");
    assert!(m[kind].as_i64().unwrap_or(0) >= 1000, "{m}");
    assert!(m["usage_pages"].as_u64().unwrap_or(0) >= 1000, "{m}");
    let agg = &v["kernel_memcgs"]["aggregate"];
    // Flushed stats: a page or so may still be in a per-CPU delta.
    assert!(
        agg[format!("{kind}_bytes")].as_u64().unwrap_or(0) >= 1000 * 4096,
        "{agg}"
    );
    // Named by file: the LRU walk finds the tmpfs file's pages.
    let files = m["page_pins"]["files"].as_array().expect("page_pins.files");
    let want = file.display().to_string();
    let pin = files
        .iter()
        .find(|f| f["path"].as_str() == Some(want.as_str()))
        .unwrap_or_else(|| panic!("no pin on {want}: {m}"));
    assert!(pin["pages"].as_u64().unwrap_or(0) >= 1000, "{pin}");
    // A removed memcg's css refcount is readable (atomic mode) and not zero.
    // Each charged folio holds one: measured on 6.18; other kernels print theirs.
    let refs = m["css_refs"].as_i64().unwrap_or(0);
    assert!(refs >= 1, "{m}");
    if kernel_at_least(6, 18) {
        assert!(refs >= 1000, "{m}");
    }
    eprintln!("css references of the dying memcg: {refs}");
    assert_eq!(
        pin["fs"].as_str(),
        Some(fs_type.as_deref().unwrap_or("tmpfs")),
        "{pin}"
    );
    let id = m["id"].as_u64().expect("id");
    eprintln!("dying with its {kind} pages: {pin}");
    // The human view of the same memcg.
    let out = Command::new(leaktrace_bin())
        .args(["memcg", "--why", &id.to_string()])
        .output()
        .expect("run --why");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("state: dying"), "{text}");
    assert!(text.contains(&want), "{text}");
    assert!(text.contains("delete or truncate it"), "{text}");

    // File deleted: its pages are freed. On tmpfs nothing else holds the
    // memcg and it is released. On a disk filesystem the writer may also have
    // been the first to read metadata blocks (block-device page cache charged
    // to it), which keep holding it: then it must still be dying, without the
    // file, and the walk must name what is left.
    std::fs::remove_file(&file).expect("rm file");
    released_or_held_by_other_pages(&path, &want, kind, !tmpfs);
}

fn empty_memcg_released_without_pins(h: Hier) {
    h.enable_children();
    let dir = h.child("empty-walk");
    std::fs::create_dir(&dir).expect("mkdir");
    let _cleanup = Cleanup(dir.clone());
    let path = rel(&h, &dir);
    let v = list();
    let m = walked_at(&v, &path).unwrap_or_else(|| panic!("{path} not walked"));
    assert_eq!(m["online"], true);
    assert_eq!(m["usage_pages"].as_u64(), Some(0), "{m}");
    std::fs::remove_dir(&dir).expect("rmdir");
    wait_until("the empty memcg to be released", || {
        walked_at(&list(), &path).map(|m| m.to_string())
    });
}

fn preexisting_dying_listed_with_pages(h: Hier) {
    let before = h.dying();
    let v = list();
    let after = h.dying();
    let agg = &v["kernel_memcgs"]["aggregate"];
    let dying = agg["dying"].as_u64().expect("aggregate dying");
    let listed: Vec<&Value> = walked(&v).iter().filter(|m| m["dying"] == true).collect();
    assert_eq!(listed.len() as u64, dying);
    // Races with other tenants' memcgs (and a css released just before its
    // cgroup is freed) allow a small difference.
    let (lo, hi) = (before.min(after), before.max(after));
    assert!(
        dying + 2 >= lo && dying <= hi + 2,
        "walk says {dying} dying; {} arithmetic says {before}..{after}",
        if h.version == 1 {
            "/proc/cgroups"
        } else {
            "cgroup.stat"
        }
    );
    for m in &listed {
        assert!(m["usage_pages"].is_u64(), "no page counter: {m}");
        assert!(m["file"].is_i64() && m["kernel"].is_i64(), "no stats: {m}");
        assert!(
            m["path"].as_str().is_some_and(|p| p.starts_with('/')),
            "{m}"
        );
    }
    let with_pages = listed
        .iter()
        .filter(|m| m["usage_pages"].as_u64().unwrap_or(0) > 0)
        .count() as u64;
    assert_eq!(agg["holding_pages"].as_u64(), Some(with_pages));
    eprintln!(
        "{dying} dying memcgs before this test ({with_pages} holding pages); walk took {} ms",
        v["kernel_memcgs"]["walk"]["walk_ms"]
    );
}

#[test]
fn v1_tmpfs_pages_pin_a_dying_memcg_until_the_file_is_deleted() {
    let h = v1_memory();
    skip_unless!(h.is_some(), "no cgroup v1 memory hierarchy mounted");
    shmem_pins_dying_memcg_until_file_deleted(h.expect("checked"));
}

#[test]
fn v2_tmpfs_pages_pin_a_dying_memcg_until_the_file_is_deleted() {
    let h = v2_memory();
    skip_unless!(h.is_some(), "the memory controller is not on cgroup2 here");
    shmem_pins_dying_memcg_until_file_deleted(h.expect("checked"));
}

#[test]
fn empty_memcg_removed_is_released_by_the_kernel_walk() {
    let h = v1_memory().or_else(v2_memory);
    skip_unless!(h.is_some(), "no memory controller mounted");
    empty_memcg_released_without_pins(h.expect("checked"));
}

#[test]
fn preexisting_dying_memcgs_are_listed_with_their_pages() {
    let h = v1_memory().or_else(v2_memory);
    skip_unless!(h.is_some(), "no memory controller mounted");
    preexisting_dying_listed_with_pages(h.expect("checked"));
}

#[test]
fn v1_regular_file_pages_pin_a_dying_memcg_until_the_file_is_deleted() {
    let h = v1_memory();
    skip_unless!(h.is_some(), "no cgroup v1 memory hierarchy mounted");
    page_cache_pins_dying_memcg_until_file_deleted(h.expect("checked"), Backing::RootFs);
}

#[test]
fn v2_regular_file_pages_pin_a_dying_memcg_until_the_file_is_deleted() {
    let h = v2_memory();
    skip_unless!(h.is_some(), "the memory controller is not on cgroup2 here");
    page_cache_pins_dying_memcg_until_file_deleted(h.expect("checked"), Backing::RootFs);
}

// ---- A real container: podman + runc from a local busybox rootfs.

fn have(tool: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// A private podman: its own storage, run root and containers.conf (this
/// machine refuses rlimit changes: `default_ulimits = []`), no network.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new() -> Podman {
        let dir = std::env::temp_dir().join(format!("leaktrace-podman-{}", std::process::id()));
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
        let busybox = ["/usr/bin/busybox", "/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox");
        std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        for tool in ["sh", "head", "cat", "grep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool)).expect("symlink");
        }
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\nnetns = \"none\"\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n",
        )
        .expect("containers.conf");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(dir.join("rootfs.tar"))
            .arg(".")
            .status()
            .expect("tar");
        assert!(st.success(), "tar rootfs");
        let p = Podman { dir };
        let out = p
            .cmd()
            .arg("import")
            .arg(p.dir.join("rootfs.tar"))
            .arg("localhost/leaktrace-busybox")
            .output()
            .expect("podman import");
        assert!(
            out.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "-a", "-f"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn container_pins_its_volume_file(h: Hier) {
    let podman = Podman::new();
    let vol = Tmpfs::mount("volume");
    let file = vol.0.join("written-by-the-container.dat");
    let want = file.display().to_string();
    let mut tracer = Memcg::start(&[
        "--duration",
        "12s",
        "--zombie-after",
        "1s",
        "--interval",
        "1s",
    ])
    .expect("leaktrace memcg attaches");
    // The container writes 4 MiB into the host tmpfs volume and exits; --rm
    // removes it and runc/podman remove its memcg.
    let out = podman
        .cmd()
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/data", vol.0.display()))
        .args([
            "localhost/leaktrace-busybox",
            "/bin/sh",
            "-c",
            "head -c 4194304 /dev/zero > /data/written-by-the-container.dat && cat /proc/self/cgroup",
        ])
        .output()
        .expect("podman run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman run: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The container's own view of its memory cgroup: v1 "N:memory:/path", v2 "0::/path".
    let path = stdout
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, p) = (f.next()?, f.next()?, f.next()?);
            let hit = if h.version == 1 {
                ctrl.split(',').any(|c| c == "memory")
            } else {
                ctrl.is_empty()
            };
            hit.then(|| p.to_string())
        })
        .unwrap_or_else(|| panic!("no memory cgroup in {stdout}"));
    let id = path
        .rsplit('/')
        .next()
        .and_then(|c| c.strip_prefix("libpod-"))
        .map(|c| c.trim_end_matches(".scope").to_string())
        .unwrap_or_else(|| panic!("not a libpod cgroup: {path}"));

    let fin = tracer
        .wait_for("the final report", |v| v["kind"] == "final")
        .expect("final report");
    let traced = find(&fin, &path).unwrap_or_else(|| panic!("{path} not traced: {fin}"));
    let creator = traced["creator"]["comm"].as_str().unwrap_or("");
    let chain: Vec<&str> = traced["creator"]["ancestry"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["comm"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        creator.starts_with("runc") || chain.iter().any(|c| c.starts_with("runc")),
        "creator {creator} <- {chain:?}: {traced}"
    );
    assert_eq!(traced["container"]["runtime"], "podman", "{traced}");
    assert_eq!(
        traced["container"]["container_id"].as_str(),
        Some(id.as_str()),
        "{traced}"
    );
    let m = fin["kernel_memcgs"]["walk"]["memcgs"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["path"].as_str() == Some(path.as_str())))
        .unwrap_or_else(|| panic!("{path} not in the kernel walk: {}", fin["kernel_memcgs"]));
    assert_eq!(m["dying"], true, "{m}");
    let pin = m["page_pins"]["files"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["path"].as_str() == Some(want.as_str())))
        .unwrap_or_else(|| panic!("no pin on {want}: {m}"));
    assert!(pin["pages"].as_u64().unwrap_or(0) >= 1000, "{pin}");
    eprintln!(
        "container {} created by {creator} <- {chain:?}, dying, pinned by {pin}",
        &id[..12]
    );

    std::fs::remove_file(&file).expect("rm volume file");
    released_or_held_by_other_pages(&path, &want, "shmem", true);
}

#[test]
fn podman_container_memcg_is_pinned_by_its_volume_file() {
    let h = v1_memory().or_else(v2_memory);
    skip_unless!(h.is_some(), "no memory controller mounted");
    skip_unless!(
        have("podman") && have("runc") && have("busybox"),
        "podman, runc or busybox not installed (cargo xtask setup installs them)"
    );
    container_pins_its_volume_file(h.expect("checked"));
}
