//! Who is behind a memcg's creator: walk `/proc/PID/stat` parents up to a
//! process an on-call engineer recognizes (kubelet, a containerd shim, runc...).

use std::path::Path;

use super::state::{Actor, Ancestor};
use crate::kernel::procinfo;

/// Processes that explain a memcg's origin; the walk stops after the first.
const RECOGNIZED: [&str; 14] = [
    "kubelet",
    "containerd-shim",
    "containerd",
    "dockerd",
    "crio",
    "conmon",
    "runc",
    "crun",
    "podman",
    "systemd",
    "nvidia-container",
    "docker",
    "lxc",
    "sshd",
];

const MAX_DEPTH: usize = 8;

/// `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<(String, u32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let ppid = text
        .get(close + 1..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((comm, ppid))
}

fn stat(root: &Path, pid: u32) -> Option<(String, u32)> {
    parse_stat(&std::fs::read_to_string(root.join(format!("proc/{pid}/stat"))).ok()?)
}

pub fn recognized(comm: &str) -> bool {
    RECOGNIZED.iter().any(|r| comm.starts_with(r))
}

/// The acting task as the kernel reported it, completed from /proc while it
/// may still exist. `ppid` comes from the kernel (the task may be gone already).
pub fn actor(root: &Path, pid: u32, tgid: u32, comm: &str, ppid: u32) -> Actor {
    let meta = procinfo::read_proc(root, tgid, 0);
    let mut ancestry = Vec::new();
    let mut next = if ppid != 0 {
        Some(ppid)
    } else {
        stat(root, tgid).map(|(_, p)| p)
    };
    while let Some(p) = next.filter(|&p| p != 0 && ancestry.len() < MAX_DEPTH) {
        let Some((comm, parent)) = stat(root, p) else {
            ancestry.push(Ancestor {
                pid: p,
                comm: "(exited)".into(),
            });
            break;
        };
        let stop = recognized(&comm) || p == 1;
        ancestry.push(Ancestor { pid: p, comm });
        if stop {
            break;
        }
        next = Some(parent);
    }
    Actor {
        pid,
        tgid,
        comm: if comm.is_empty() {
            meta.comm.unwrap_or_default()
        } else {
            comm.to_string()
        },
        cmdline: meta.cmdline,
        ancestry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let (comm, ppid) = parse_stat("1234 (my (odd) comm) S 42 1234 1234 0 -1").expect("parses");
        assert_eq!((comm.as_str(), ppid), ("my (odd) comm", 42));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_ancestry_reaches_a_stop() {
        let me = std::process::id();
        let a = actor(Path::new("/"), me, me, "", 0);
        assert!(!a.comm.is_empty());
        let last = a.ancestry.last().expect("we have a parent");
        assert!(
            a.ancestry.len() == MAX_DEPTH || recognized(&last.comm) || last.pid == 1,
            "{:?}",
            a.ancestry
        );
        assert!(recognized("containerd-shim-runc-v2"));
        assert!(!recognized("bash"));
    }
}
