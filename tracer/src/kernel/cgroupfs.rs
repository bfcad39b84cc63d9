//! The memory-cgroup hierarchy as cgroupfs shows it, one probe for both tools:
//! where the memory controller is mounted (a cgroup v1 hierarchy or cgroup2),
//! every memcg directory, and how many dying memcgs the kernel holds that no
//! directory shows: `/proc/cgroups` num_cgroups minus the directories (v1), or
//! the root's `cgroup.stat` (v2). Everything is read under a root path so
//! fixture trees can stand in for `/`.

use std::{
    collections::HashMap,
    fs,
    io::ErrorKind,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CgroupVersion {
    #[serde(rename = "v1")]
    V1,
    #[serde(rename = "v2")]
    V2,
}

/// Where memcgs live on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hierarchy {
    /// 1 or 2.
    pub version: u8,
    /// The hierarchy id the `cgroup:*` tracepoints report as `root` (0 = cgroup2;
    /// 0 for v1 too where /proc/cgroups does not say).
    pub id: u32,
    /// The mount point under the root being read (`/` on a live node).
    pub mount: PathBuf,
    /// The mount point as the node sees it (`/sys/fs/cgroup/memory`), for messages.
    #[serde(skip)]
    pub seen_as: String,
}

/// The memory controller's mounts: the v1 hierarchy that carries it and the
/// cgroup2 mount that offers it, either or both (hybrid setups).
#[derive(Debug, Clone, Default)]
pub struct MemoryMounts {
    pub v1: Option<Hierarchy>,
    pub v2: Option<Hierarchy>,
}

/// Finds the memory controller's mounts in `<root>/proc/self/mounts`.
pub fn memory_mounts(root: &Path) -> Result<MemoryMounts> {
    let mounts_path = root.join("proc/self/mounts");
    let mounts = fs::read_to_string(&mounts_path)
        .with_context(|| format!("reading {}", mounts_path.display()))?;
    // Newer kernels list only v1-capable controllers in /proc/cgroups (none
    // without CONFIG_MEMCG_V1): no memory line means "not on a v1 hierarchy".
    let hid = fs::read_to_string(root.join("proc/cgroups"))
        .ok()
        .and_then(|t| parse_proc_cgroups(&t, "memory"))
        .map_or(0, |(hid, _, _)| hid);
    let mut out = MemoryMounts::default();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, mount, fstype, options, ..] = fields[..] else {
            continue;
        };
        // Mount points escape spaces as \040; cgroup mounts never have any in practice.
        let path = root.join(mount.trim_start_matches('/'));
        match fstype {
            "cgroup" if out.v1.is_none() && options.split(',').any(|o| o == "memory") => {
                out.v1 = Some(Hierarchy {
                    version: 1,
                    id: hid,
                    mount: path,
                    seen_as: mount.to_string(),
                });
            }
            "cgroup2" if out.v2.is_none() => {
                let controllers =
                    fs::read_to_string(path.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "memory") {
                    out.v2 = Some(Hierarchy {
                        version: 2,
                        id: 0,
                        mount: path,
                        seen_as: mount.to_string(),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// One cgroup directory under the memory hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// Path relative to the mount, `/` for the root.
    pub rel: String,
    /// Depth below the root (0).
    pub level: u32,
    /// The directory's inode: the kernfs id the cgroup tracepoints report.
    pub id: u64,
    /// memory.usage_in_bytes (v1) or memory.current (v2), when asked for and readable.
    pub usage: Option<u64>,
}

/// `/proc/cgroups`: `subsys_name hierarchy num_cgroups enabled`.
pub fn parse_proc_cgroups(text: &str, subsys: &str) -> Option<(u32, u64, bool)> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[0] == subsys)
            .then(|| Some((f[1].parse().ok()?, f[2].parse().ok()?, f[3] == "1")))?
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
    /// A v1 memory mount wins over cgroup2: in hybrid setups (systemd's `unified`
    /// mount) the memcgs that matter are the v1 ones and cgroup2 carries no
    /// controller. `doctor`'s view.
    pub fn bound(root: &Path) -> Result<Hierarchy> {
        let MemoryMounts { v1, v2 } = memory_mounts(root)?;
        v1.or(v2).with_context(|| {
            format!(
                "no cgroup v1 memory mount and no cgroup2 mount with the memory controller in {}",
                root.join("proc/self/mounts").display()
            )
        })
    }

    pub fn cgroup_version(&self) -> CgroupVersion {
        if self.version == 1 {
            CgroupVersion::V1
        } else {
            CgroupVersion::V2
        }
    }

    /// `--cgroup-version auto` prefers where the memory controller is bound:
    /// a v1 hierarchy if it has one, else cgroup2 if it enables memory.
    pub fn detect(root: &Path, want: Option<u8>) -> Result<Hierarchy> {
        let cgroups = fs::read_to_string(root.join("proc/cgroups")).unwrap_or_default();
        let enabled = parse_proc_cgroups(&cgroups, "memory").is_none_or(|(_, _, enabled)| enabled);
        if !enabled {
            bail!("the memory cgroup controller is disabled (cgroup_disable=memory?)");
        }
        let MemoryMounts { v1, v2 } = memory_mounts(root)?;
        // The tracepoints' hierarchy filter needs the v1 id.
        let v1 = v1.filter(|h| h.id != 0);
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

    /// Every cgroup directory of the hierarchy, root first. A directory that
    /// cannot be listed is an error rather than a skip: a short count would be
    /// reported as dying memcgs. One removed while we walk is simply gone (it
    /// is not live, and the kernel counts it as dying until it is freed).
    /// `usage` reads each memcg's usage file too.
    pub fn dirs(&self, usage: bool) -> Result<Vec<CgroupDir>> {
        let usage_file = match self.version {
            1 => "memory.usage_in_bytes",
            _ => "memory.current",
        };
        let mut out = Vec::new();
        let mut stack = vec![(self.mount.clone(), "/".to_string(), 0u32)];
        while let Some((dir, rel, level)) = stack.pop() {
            let vanished = |e: &std::io::Error| level > 0 && e.kind() == ErrorKind::NotFound;
            let meta = match fs::metadata(&dir) {
                Ok(meta) => meta,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e).with_context(|| format!("stat {}", dir.display())),
            };
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
            };
            out.push(CgroupDir {
                rel: rel.clone(),
                level,
                id: meta.ino(),
                usage: usage
                    .then(|| read_u64(&dir.join(usage_file)).ok())
                    .flatten(),
            });
            let mut children = Vec::new();
            for entry in entries {
                let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
                // file_type does not follow symlinks, so a link cannot make us loop.
                let is_dir = match entry.file_type() {
                    Ok(t) => t.is_dir(),
                    Err(e) if e.kind() == ErrorKind::NotFound => false,
                    Err(e) => {
                        return Err(e).with_context(|| format!("stat {}", entry.path().display()))
                    }
                };
                if is_dir {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child_rel = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    children.push((entry.path(), child_rel, level + 1));
                }
            }
            children.sort();
            stack.extend(children.into_iter().rev());
        }
        Ok(out)
    }

    /// Every live cgroup: id (the directory's inode, which is the kernfs id the
    /// tracepoints report) -> (path, level).
    pub fn live(&self) -> Result<HashMap<u64, (String, u32)>> {
        Ok(self
            .dirs(false)?
            .into_iter()
            .map(|d| (d.id, (d.rel, d.level)))
            .collect())
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
            let live = self.dirs(false)?.len() as u64;
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

/// Live and dying memcgs and how they were counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemcgCounts {
    pub live: u64,
    pub dying: u64,
    pub method: String,
}

/// v1: `/proc/cgroups` counts every memcg the kernel still holds, directories only the ones
/// not removed; the difference are dying memcgs. v2: `cgroup.stat` counts them directly
/// (per controller on 6.11+, all cgroups before).
pub fn count(root: &Path, h: &Hierarchy, dirs: &[CgroupDir]) -> Result<MemcgCounts> {
    match h.cgroup_version() {
        CgroupVersion::V1 => {
            let path = root.join("proc/cgroups");
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let (num, enabled) = proc_cgroups_memory(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            if !enabled {
                bail!("the memory controller is disabled (cgroup_disable=memory)");
            }
            let live = dirs.len() as u64;
            Ok(MemcgCounts {
                live,
                // Directories made between the two reads would make this negative.
                dying: num.saturating_sub(live),
                method: format!(
                    "/proc/cgroups num_cgroups {num} minus {live} directories under {}",
                    h.seen_as
                ),
            })
        }
        CgroupVersion::V2 => {
            let path = h.mount.join("cgroup.stat");
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let key = |k: &str| parse_stat(&text, k);
            if let (Some(live), Some(dying)) =
                (key("nr_subsys_memory"), key("nr_dying_subsys_memory"))
            {
                return Ok(MemcgCounts {
                    live,
                    dying,
                    method: format!(
                        "{}/cgroup.stat nr_subsys_memory and nr_dying_subsys_memory",
                        h.seen_as
                    ),
                });
            }
            let dying = key("nr_dying_descendants")
                .with_context(|| format!("{} has no nr_dying_descendants", path.display()))?;
            Ok(MemcgCounts {
                live: dirs.len() as u64,
                dying,
                method: format!(
                    "{}/cgroup.stat nr_dying_descendants (all controllers) and {} directories",
                    h.seen_as,
                    dirs.len()
                ),
            })
        }
    }
}

/// `(num_cgroups, enabled)` of the memory line of /proc/cgroups.
fn proc_cgroups_memory(text: &str) -> Result<(u64, bool)> {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() != Some(&"memory") {
            continue;
        }
        let [_, _, num, enabled, ..] = fields[..] else {
            bail!("short memory line '{line}'");
        };
        let num = num
            .parse()
            .with_context(|| format!("num_cgroups '{num}' is not a number"))?;
        return Ok((num, enabled == "1"));
    }
    bail!("no memory line (kernel without CONFIG_MEMCG)")
}

pub fn read_u64(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: '{}' is not a number", path.display(), text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_cgroups_and_stat() {
        let pc =
            "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t3\t1\t1\nmemory\t4\t17\t1\n";
        assert_eq!(parse_proc_cgroups(pc, "memory"), Some((4, 17, true)));
        assert_eq!(parse_proc_cgroups(pc, "pids"), None);
        let stat = "nr_descendants 3\nnr_dying_descendants 7\nnr_dying_subsys_memory 5\n";
        assert_eq!(parse_stat(stat, "nr_dying_descendants"), Some(7));
        assert_eq!(parse_stat(stat, "nr_dying_subsys_memory"), Some(5));
        assert_eq!(parse_stat(stat, "nr_dying"), None);
    }

    /// Both tools' questions (where, which memcgs, how many dying) from one
    /// probe of a fixture node: doctor's preference and memcg's agree.
    #[test]
    fn one_probe_answers_both_tools() {
        let root = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/doctor/v1-host"
        ));
        let bound = Hierarchy::bound(root).unwrap();
        assert_eq!(bound.cgroup_version(), CgroupVersion::V1);
        assert_eq!(bound.seen_as, "/sys/fs/cgroup/memory");
        let detected = Hierarchy::detect(root, None).unwrap();
        assert_eq!(detected, bound);
        let dirs = bound.dirs(false).unwrap();
        assert_eq!(dirs[0].rel, "/");
        assert_eq!(bound.live().unwrap().len(), dirs.len());
    }
}
