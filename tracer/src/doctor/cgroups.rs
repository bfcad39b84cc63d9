//! Memory cgroups as cgroupfs shows them: where the memory controller is mounted, how many
//! memcgs are live and how many are dying (removed but still pinned by charged memory), how
//! long `memory.stat` takes to read, and the cgroup v1 kmem accounting state of container
//! cgroups. Everything is read under a root path so fixture trees can stand in for `/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryHierarchy {
    pub version: CgroupVersion,
    /// The mount point as the node sees it (`/sys/fs/cgroup/memory`).
    pub mount: String,
    /// The same under the root being examined.
    pub path: PathBuf,
}

/// Finds the hierarchy the memory controller is bound to, from `<root>/proc/self/mounts`.
/// A v1 memory mount wins over cgroup2: in hybrid setups (systemd's `unified` mount) the
/// memcgs that matter are the v1 ones and cgroup2 carries no controller.
pub fn locate(root: &Path) -> Result<MemoryHierarchy> {
    let mounts_path = root.join("proc/self/mounts");
    let mounts = fs::read_to_string(&mounts_path)
        .with_context(|| format!("reading {}", mounts_path.display()))?;
    let mut v2 = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, mount, fstype, options, ..] = fields[..] else {
            continue;
        };
        // Mount points escape spaces as \040; cgroup mounts never have any in practice.
        let path = root.join(mount.trim_start_matches('/'));
        match fstype {
            "cgroup" if options.split(',').any(|o| o == "memory") => {
                return Ok(MemoryHierarchy {
                    version: CgroupVersion::V1,
                    mount: mount.to_string(),
                    path,
                });
            }
            "cgroup2" if v2.is_none() => {
                let controllers =
                    fs::read_to_string(path.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "memory") {
                    v2 = Some(MemoryHierarchy {
                        version: CgroupVersion::V2,
                        mount: mount.to_string(),
                        path,
                    });
                }
            }
            _ => {}
        }
    }
    v2.with_context(|| {
        format!(
            "no cgroup v1 memory mount and no cgroup2 mount with the memory controller in {}",
            mounts_path.display()
        )
    })
}

/// One cgroup directory under the memory hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// Path relative to the mount, `/` for the root.
    pub rel: String,
    /// memory.usage_in_bytes (v1) or memory.current (v2), when readable.
    pub usage: Option<u64>,
}

/// Every directory of the hierarchy, root first. A directory that cannot be listed is an
/// error rather than a skip: a short count would be reported as dying memcgs.
pub fn walk(h: &MemoryHierarchy) -> Result<Vec<CgroupDir>> {
    let usage_file = match h.version {
        CgroupVersion::V1 => "memory.usage_in_bytes",
        CgroupVersion::V2 => "memory.current",
    };
    let mut out = Vec::new();
    let mut stack = vec![(h.path.clone(), "/".to_string())];
    while let Some((dir, rel)) = stack.pop() {
        out.push(CgroupDir {
            rel: rel.clone(),
            usage: read_u64(&dir.join(usage_file)).ok(),
        });
        let entries = fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        let mut children = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            // file_type does not follow symlinks, so a link cannot make us loop.
            let is_dir = entry
                .file_type()
                .with_context(|| format!("stat {}", entry.path().display()))?
                .is_dir();
            if is_dir {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child_rel = if rel == "/" {
                    format!("/{name}")
                } else {
                    format!("{rel}/{name}")
                };
                children.push((entry.path(), child_rel));
            }
        }
        children.sort();
        stack.extend(children.into_iter().rev());
    }
    Ok(out)
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
pub fn count(root: &Path, h: &MemoryHierarchy, dirs: &[CgroupDir]) -> Result<MemcgCounts> {
    match h.version {
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
                    h.mount
                ),
            })
        }
        CgroupVersion::V2 => {
            let path = h.path.join("cgroup.stat");
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let key = |k: &str| {
                text.lines().find_map(|l| {
                    let (name, value) = l.split_once(' ')?;
                    (name == k)
                        .then(|| value.trim().parse::<u64>().ok())
                        .flatten()
                })
            };
            if let (Some(live), Some(dying)) =
                (key("nr_subsys_memory"), key("nr_dying_subsys_memory"))
            {
                return Ok(MemcgCounts {
                    live,
                    dying,
                    method: format!(
                        "{}/cgroup.stat nr_subsys_memory and nr_dying_subsys_memory",
                        h.mount
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
                    h.mount,
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

/// How long one read of a memory.stat took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatTiming {
    pub cgroup: String,
    pub usage_bytes: Option<u64>,
    pub seconds: f64,
}

/// Times `memory.stat` of the root and of the cgroup using the most memory: on a node full
/// of dying memcgs these reads take seconds, and every monitoring agent pays that.
pub fn time_memory_stat(h: &MemoryHierarchy, dirs: &[CgroupDir]) -> Result<Vec<StatTiming>> {
    let mut targets = vec![dirs.first().context("no cgroup directories")?];
    if let Some(largest) = dirs
        .iter()
        .skip(1)
        .filter(|d| d.usage.is_some())
        .max_by_key(|d| d.usage)
    {
        targets.push(largest);
    }
    let mut out = Vec::new();
    for dir in targets {
        let path = h
            .path
            .join(dir.rel.trim_start_matches('/'))
            .join("memory.stat");
        let start = Instant::now();
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        out.push(StatTiming {
            cgroup: dir.rel.clone(),
            usage_bytes: dir.usage,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(out)
}

/// Limits at or above this are the kernel's "unlimited" (PAGE_COUNTER_MAX pages).
const UNLIMITED: u64 = 1 << 60;

/// cgroup v1 kernel-memory accounting as the container runtimes left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KmemState {
    /// `cgroup.memory=nokmem` on the kernel command line: no kmem accounting at all.
    pub nokmem: bool,
    /// The root has memory.kmem.* files (CONFIG_MEMCG_KMEM, v1 interface present).
    pub kmem_files: bool,
    pub root_kmem_usage_bytes: Option<u64>,
    /// `memory.kmem.slabinfo` of the root could be read.
    pub slabinfo_readable: bool,
    /// Cgroups whose path names kubepods or docker.
    pub container_cgroups: u64,
    pub with_kmem_usage: u64,
    pub with_kmem_limit: u64,
    /// A few container cgroups with a kmem limit (or usage), for the report.
    pub examples: Vec<String>,
}

pub fn kmem_state(root: &Path, h: &MemoryHierarchy, dirs: &[CgroupDir]) -> KmemState {
    let nokmem = fs::read_to_string(root.join("proc/cmdline"))
        .map(|c| c.split_whitespace().any(|a| a == "cgroup.memory=nokmem"))
        .unwrap_or(false);
    let root_usage = read_u64(&h.path.join("memory.kmem.usage_in_bytes")).ok();
    let mut state = KmemState {
        nokmem,
        kmem_files: h.path.join("memory.kmem.usage_in_bytes").exists(),
        root_kmem_usage_bytes: root_usage,
        slabinfo_readable: fs::read(h.path.join("memory.kmem.slabinfo")).is_ok(),
        container_cgroups: 0,
        with_kmem_usage: 0,
        with_kmem_limit: 0,
        examples: Vec::new(),
    };
    let mut limited = Vec::new();
    let mut used = Vec::new();
    for dir in dirs.iter().filter(|d| is_container(&d.rel)) {
        state.container_cgroups += 1;
        let path = h.path.join(dir.rel.trim_start_matches('/'));
        if read_u64(&path.join("memory.kmem.usage_in_bytes")).is_ok_and(|u| u > 0) {
            state.with_kmem_usage += 1;
            used.push(dir.rel.clone());
        }
        if read_u64(&path.join("memory.kmem.limit_in_bytes")).is_ok_and(|l| l < UNLIMITED) {
            state.with_kmem_limit += 1;
            limited.push(dir.rel.clone());
        }
    }
    limited.extend(used);
    limited.dedup();
    limited.truncate(3);
    state.examples = limited;
    state
}

fn is_container(rel: &str) -> bool {
    rel.split('/')
        .any(|c| c.contains("kubepods") || c.contains("docker"))
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: '{}' is not a number", path.display(), text.trim()))
}
