//! What /proc and cgroupfs say about the processes and cgroups events name.
//! Read once per process when it first allocates (it may be gone by the next
//! refresh) and cached.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcMeta {
    pub comm: Option<String>,
    pub cmdline: Option<String>,
    /// The parent's comm, read when the child was first seen (the parent of
    /// an exec probe may be gone by the report).
    pub parent_comm: Option<String>,
}

/// `ppid`: the parent the kernel side read at allocation time (0: unknown).
pub fn read_proc(root: &Path, tgid: u32, ppid: u32) -> ProcMeta {
    let dir = root.join(format!("proc/{tgid}"));
    let comm = read_comm(root, tgid);
    let cmdline = std::fs::read(dir.join("cmdline")).ok().and_then(|raw| {
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (!args.is_empty()).then(|| args.join(" "))
    });
    ProcMeta {
        comm,
        cmdline,
        parent_comm: (ppid != 0).then(|| read_comm(root, ppid)).flatten(),
    }
}

fn read_comm(root: &Path, tgid: u32) -> Option<String> {
    std::fs::read_to_string(root.join(format!("proc/{tgid}/comm")))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// The process named by `--pid`: checked to exist before attaching, and
/// watched so the report can say when it exited (its objects stay counted).
#[derive(Debug)]
pub struct TracedProcess {
    pub pid: u32,
    /// /proc/PID/stat's start time: a PID reused by a new process is not the one we trace.
    start_ticks: Option<u64>,
    /// Seconds since attach when it was first seen gone.
    pub exited_after_s: Option<f64>,
}

impl TracedProcess {
    /// Refuses a PID that names no process. PIDs are the host's (the kernel
    /// filters on them), so inside a PID namespace of its own (a container
    /// without hostPID) /proc cannot check it: that is said, not guessed.
    pub fn check(root: &Path, pid: u32) -> anyhow::Result<TracedProcess> {
        let unchecked = TracedProcess {
            pid,
            start_ticks: None,
            exited_after_s: None,
        };
        if let Some(ns) = own_pid_namespace(root) {
            eprintln!(
                "leaktrace: cannot check --pid {pid}: leaktrace runs in a PID namespace of its own \
                 ({ns}, a container without hostPID?), where PID {pid} is not the host's; the \
                 kernel filters on the host's PID {pid} (run in the host's PID namespace to have \
                 it checked)"
            );
            return Ok(unchecked);
        }
        let Some(tgid) = thread_group(root, pid) else {
            anyhow::bail!(
                "--pid {pid}: no such process (PIDs are the host's, as `ps -e` on the node shows \
                 them); check it with `ps -p {pid}`"
            );
        };
        // /proc/TID exists for every thread, but the kernel filters on the
        // thread group: a thread id given as it is would match nothing.
        if tgid != pid {
            eprintln!(
                "leaktrace: --pid {pid} is a thread of process {tgid}; tracing process {tgid}, \
                 all its threads (allocations are filtered by process)"
            );
        }
        let start_ticks = start_ticks(root, tgid);
        if start_ticks.is_none() {
            anyhow::bail!("--pid {pid}: its process {tgid} exited while being checked");
        }
        Ok(TracedProcess {
            pid: tgid,
            start_ticks,
            ..unchecked
        })
    }

    /// Notes the first time the process is found gone (or its PID reused).
    pub fn watch(&mut self, root: &Path, elapsed_s: f64) {
        if self.exited_after_s.is_none()
            && self.start_ticks.is_some()
            && start_ticks(root, self.pid) != self.start_ticks
        {
            self.exited_after_s = Some(elapsed_s);
        }
    }
}

/// The thread group (process) of thread `tid`, from /proc/TID/status; None
/// when there is no such thread.
fn thread_group(root: &Path, tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(root.join(format!("proc/{tid}/status"))).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Field 22 of /proc/PID/stat; None when there is no such process (a zombie
/// still has its entry: its objects and its exit are the same either way).
fn start_ticks(root: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(root.join(format!("proc/{pid}/stat"))).ok()?;
    // comm may hold spaces and parentheses; the fields after the last ')' don't.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Some(our namespace) when this process's PID namespace is not the host's:
/// the kernel gives the initial one the fixed inode PROC_PID_INIT_INO.
fn own_pid_namespace(root: &Path) -> Option<String> {
    const INITIAL: &str = "pid:[4026531836]";
    let ns = std::fs::read_link(root.join("proc/self/ns/pid")).ok()?;
    let ns = ns.to_string_lossy().into_owned();
    (ns != INITIAL).then_some(ns)
}

/// Maps cgroup ids to paths: cgroup2 ids (what `bpf_get_current_cgroup_id`
/// returns) or, with [`CgroupPaths::at`], a v1 hierarchy's kernfs ids; both
/// are the cgroup directory's inode number.
#[derive(Debug, Default)]
pub struct CgroupPaths {
    mount: Option<PathBuf>,
    paths: HashMap<u64, String>,
    scanned: bool,
}

impl CgroupPaths {
    /// Paths relative to the hierarchy mounted at `mount`.
    pub fn at(mount: Option<PathBuf>) -> Self {
        CgroupPaths {
            mount,
            paths: HashMap::new(),
            scanned: false,
        }
    }

    /// Path relative to the hierarchy's root, or None if unknown (removed, or no hierarchy).
    pub fn path(&mut self, id: u64) -> Option<&str> {
        if !self.paths.contains_key(&id) {
            self.rescan();
        }
        self.paths.get(&id).map(String::as_str)
    }

    /// Re-walk on the next miss: cgroups come and go during an incident.
    pub fn invalidate(&mut self) {
        self.scanned = false;
    }

    fn rescan(&mut self) {
        if self.scanned {
            return;
        }
        self.scanned = true;
        let Some(mount) = self.mount.clone() else {
            return;
        };
        let mut stack = vec![mount.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&mount).map_or_else(
                |_| dir.display().to_string(),
                |r| format!("/{}", r.display()),
            );
            self.paths.insert(meta.ino(), rel);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
}

pub fn cgroup2_mount(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(root.join("proc/self/mountinfo")).ok()?;
    parse_cgroup2_mount(&text).map(|m| root.join(m.trim_start_matches('/')))
}

/// mountinfo: `id parent major:minor root mountpoint options [optional...] - fstype source super`.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(str::to_string))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let mi = "\
35 24 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 35 0:35 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
46 35 0:41 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(mi).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(parse_cgroup2_mount("garbage\n"), None);
    }

    #[test]
    fn reads_own_process() {
        let meta = read_proc(Path::new("/"), std::process::id(), 1);
        assert!(meta.comm.is_some());
        assert!(meta.cmdline.is_some_and(|c| !c.is_empty()));
        assert!(meta.parent_comm.is_some());
    }

    #[test]
    fn a_thread_id_resolves_to_its_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).expect("send tid");
            let _ = wait.recv();
        });
        let tid = rx.recv().expect("tid");
        let pid = std::process::id();
        assert_ne!(tid, pid);
        assert_eq!(thread_group(Path::new("/"), tid), Some(pid));
        assert_eq!(thread_group(Path::new("/"), pid), Some(pid));
        drop(done);
        thread.join().expect("thread");
    }

    #[test]
    fn resolves_own_cgroup_id() {
        // Our own cgroup v2 directory must map back to its path by inode.
        let root = Path::new("/");
        let Some(mount) = cgroup2_mount(root) else {
            panic!("no cgroup2 mount on this machine");
        };
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        let ino = std::fs::metadata(mount.join(rel.trim_start_matches('/')))
            .expect("own cgroup dir")
            .ino();
        let mut paths = CgroupPaths::at(cgroup2_mount(root));
        assert_eq!(paths.path(ino), Some(rel));
    }
}
