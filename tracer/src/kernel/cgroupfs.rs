//! Where the memory controller lives (cgroup v1 hierarchy or cgroup2), which
//! memcgs exist now, and how many dying ones the kernel holds that no directory
//! shows: `/proc/cgroups` num_cgroups minus the directories (v1), or the root's
//! `cgroup.stat` (v2).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hierarchy {
    /// 1 or 2.
    pub version: u8,
    /// The hierarchy id the `cgroup:*` tracepoints report as `root` (0 = cgroup2).
    pub id: u32,
    pub mount: PathBuf,
}

/// `/proc/cgroups`: `subsys_name hierarchy num_cgroups enabled`.
pub fn parse_proc_cgroups(text: &str, subsys: &str) -> Option<(u32, u64, bool)> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[0] == subsys)
            .then(|| Some((f[1].parse().ok()?, f[2].parse().ok()?, f[3] == "1")))?
    })
}

/// Mount point of the v1 hierarchy carrying `subsys`, from mountinfo.
pub fn parse_v1_mount(mountinfo: &str, subsys: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let _source = r.next()?;
        let opts = r.next()?;
        (fstype == "cgroup" && opts.split(',').any(|o| o == subsys))
            .then(|| left.split_whitespace().nth(4).map(str::to_string))?
    })
}

/// `cgroup.stat` key, e.g. `nr_dying_descendants`.
pub fn parse_stat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

impl Hierarchy {
    /// `--cgroup-version auto` prefers where the memory controller is bound:
    /// a v1 hierarchy if it has one, else cgroup2 if it enables memory.
    pub fn detect(root: &Path, want: Option<u8>) -> Result<Hierarchy> {
        // Newer kernels list only v1-capable controllers in /proc/cgroups (none
        // without CONFIG_MEMCG_V1): no memory line means "not on a v1 hierarchy".
        let cgroups = std::fs::read_to_string(root.join("proc/cgroups")).unwrap_or_default();
        let mountinfo = std::fs::read_to_string(root.join("proc/self/mountinfo"))
            .context("reading /proc/self/mountinfo")?;
        let (hid, enabled) = parse_proc_cgroups(&cgroups, "memory")
            .map_or((0, true), |(hid, _, enabled)| (hid, enabled));
        if !enabled {
            bail!("the memory cgroup controller is disabled (cgroup_disable=memory?)");
        }
        let v1 = (hid != 0)
            .then(|| parse_v1_mount(&mountinfo, "memory"))
            .flatten()
            .map(|m| Hierarchy {
                version: 1,
                id: hid,
                mount: root.join(m.trim_start_matches('/')),
            });
        let v2 = crate::kernel::procinfo::parse_cgroup2_mount(&mountinfo)
            .map(|m| root.join(m.trim_start_matches('/')))
            .filter(|m| {
                std::fs::read_to_string(m.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
            })
            .map(|mount| Hierarchy {
                version: 2,
                id: 0,
                mount,
            });
        match (want, v1, v2) {
            (None | Some(1), Some(h), _) => Ok(h),
            (None | Some(2), _, Some(h)) => Ok(h),
            (Some(1), None, _) => {
                bail!("no cgroup v1 memory hierarchy is mounted (the memory controller is on cgroup2 or unmounted)")
            }
            (Some(2), _, None) => bail!(
                "cgroup2 is not mounted or does not offer the memory controller \
                 (it is bound to a v1 hierarchy: check /proc/cgroups)"
            ),
            _ => bail!(
                "the memory controller is not mounted: mount a cgroup v1 'memory' hierarchy or cgroup2"
            ),
        }
    }

    /// Every live cgroup directory of this hierarchy: id (the directory's inode,
    /// which is the kernfs id the tracepoints report) -> (path, level).
    pub fn walk(&self) -> HashMap<u64, (String, u32)> {
        let mut out = HashMap::new();
        let mut stack = vec![(self.mount.clone(), 0u32)];
        while let Some((dir, level)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir
                .strip_prefix(&self.mount)
                .map_or_else(|_| String::new(), |r| format!("/{}", r.display()));
            out.insert(meta.ino(), (rel, level));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), level + 1));
                }
            }
        }
        out
    }

    /// Id of the hierarchy's root cgroup: charges there are never made.
    pub fn root_id(&self) -> u64 {
        std::fs::metadata(&self.mount).map_or(1, |m| m.ino())
    }

    /// Dying memcgs the kernel holds right now, and how that was computed.
    pub fn dying_now(&self, root: &Path) -> Result<Dying> {
        if self.version == 2 {
            let stat = std::fs::read_to_string(self.mount.join("cgroup.stat"))
                .context("reading cgroup.stat at the cgroup2 root")?;
            // 6.11+ count dying css per controller; older kernels only dying cgroups.
            if let Some(n) = parse_stat(&stat, "nr_dying_subsys_memory") {
                return Ok(Dying {
                    count: n,
                    source: "cgroup.stat nr_dying_subsys_memory".into(),
                });
            }
            let n = parse_stat(&stat, "nr_dying_descendants")
                .context("cgroup.stat has no nr_dying_descendants")?;
            return Ok(Dying {
                count: n,
                source: "cgroup.stat nr_dying_descendants (all controllers)".into(),
            });
        }
        // num_cgroups counts a cgroup until it is freed; the directories only the
        // live ones. Retry when a mkdir/rmdir raced the two reads.
        let mut last = None;
        for _ in 0..5 {
            let before = self.num_cgroups(root)?;
            let live = self.walk().len() as u64;
            let after = self.num_cgroups(root)?;
            last = Some((after, live));
            if before == after {
                break;
            }
        }
        let (total, live) = last.context("no /proc/cgroups reading")?;
        Ok(Dying {
            count: total.saturating_sub(live),
            source: format!("/proc/cgroups memory num_cgroups {total} - {live} directories"),
        })
    }

    fn num_cgroups(&self, root: &Path) -> Result<u64> {
        let text =
            std::fs::read_to_string(root.join("proc/cgroups")).context("reading /proc/cgroups")?;
        parse_proc_cgroups(&text, "memory")
            .map(|(_, n, _)| n)
            .context("no memory line in /proc/cgroups")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dying {
    pub count: u64,
    pub source: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_cgroups_mountinfo_and_stat() {
        let pc =
            "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t3\t1\t1\nmemory\t4\t17\t1\n";
        assert_eq!(parse_proc_cgroups(pc, "memory"), Some((4, 17, true)));
        assert_eq!(parse_proc_cgroups(pc, "pids"), None);
        let mi = "\
35 24 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 35 0:35 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
41 35 0:36 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
46 35 0:41 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_v1_mount(mi, "memory").as_deref(),
            Some("/sys/fs/cgroup/memory")
        );
        assert_eq!(parse_v1_mount(mi, "pids"), None);
        let stat = "nr_descendants 3\nnr_dying_descendants 7\nnr_dying_subsys_memory 5\n";
        assert_eq!(parse_stat(stat, "nr_dying_descendants"), Some(7));
        assert_eq!(parse_stat(stat, "nr_dying_subsys_memory"), Some(5));
        assert_eq!(parse_stat(stat, "nr_dying"), None);
    }
}
