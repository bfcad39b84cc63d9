//! What pages a dying memcg still holds, by file: its LRU lists
//! (`mem_cgroup.nodeinfo[nid]->lruvec.lists[]`, and the multi-gen LRU's
//! `lrugen.folios[][][]` where the kernel has it) walked from kernel memory.
//! Every folio charged to the memcg and on an LRU is on one of them, so this
//! names files for pages charged long before leaktrace started, not only since
//! attach. Each folio is checked to be charged to this memcg
//! (`memcg_data & ~flags`); its `mapping` is a file's `address_space` (low
//! bits clear) or anonymous/movable (low bits set). The file is named by its
//! device and inode, then a path from the inode's first dentry up to the
//! filesystem root, placed under the mount point from /proc/self/mountinfo.
//! Folios off the LRU (isolated for reclaim or migration at that instant) are
//! missed; lists change while we walk, so a folio whose `memcg_data` no longer
//! matches is counted as `unverified`, never attributed.

use std::collections::HashMap;

use anyhow::Result;
use serde::Serialize;

use super::kread::{read_strings, u32_at, u64_at, Kread};
use crate::kernel::btf::{Btf, Shape};

/// Per memcg, the walk stops after this many folios (and says so).
const MAX_FOLIOS: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct FilePin {
    /// "major:minor" of the filesystem.
    pub dev: String,
    pub ino: u64,
    /// Full path where resolvable ("(deleted)" appended for an unlinked inode).
    pub path: Option<String>,
    /// The filesystem type (`super_block.s_type->name`), e.g. "tmpfs", "ext4", "bdev".
    pub fs: Option<String>,
    /// The inode has no links left (a deleted file whose pages stay cached until closed).
    pub deleted: bool,
    pub pages: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PagePins {
    /// Page-cache pages by file, most pages first.
    pub files: Vec<FilePin>,
    /// Anonymous (or movable) pages on the LRU.
    pub anon_pages: u64,
    pub folios_walked: u64,
    /// Folios met on the lists whose memcg was not this one (lists moved under us).
    pub unverified: u64,
    /// A list was cut short: over MAX_FOLIOS, or it changed under the walk.
    pub truncated: bool,
}

#[derive(Debug, Clone)]
struct Layout {
    nodeinfo: u64,
    /// Offsets from a `mem_cgroup_per_node` of every LRU list head.
    heads: Vec<u64>,
    lru: u64,
    mapping: u64,
    memcg_data: u64,
    memcg_mask: u64,
    flags: u64,
    /// `_flags_1` (order of a large folio in its low byte) and the PG_head bit.
    flags_1: Option<u64>,
    pg_head: Option<u64>,
    span: usize,
    host: u64,
    i_ino: u64,
    i_sb: u64,
    i_nlink: Option<u64>,
    i_dentry: u64,
    s_dev: u64,
    s_type: u64,
    fs_name: u64,
    d_alias: u64,
    d_parent: u64,
    d_name: u64,
}

fn off(btf: &Btf, s: &str, path: &[&str]) -> Result<u64, String> {
    btf.member_path(s, path)
        .map(|m| u64::from(m.offset))
        .ok_or_else(|| format!("no {s}.{} in BTF", path.join(".")))
}

fn bytes_of(shape: &Shape) -> Option<u64> {
    match shape {
        Shape::Array { elem_size, len } => Some(u64::from(*elem_size) * u64::from(*len)),
        Shape::Struct { size, .. } => Some(u64::from(*size)),
        _ => None,
    }
}

impl Layout {
    fn from_btf(btf: &Btf) -> Result<Layout, String> {
        // 5.16+ has struct folio; 5.10-5.15 keep the same fields in struct page.
        let page = if btf.member("folio", "lru").is_some() {
            "folio"
        } else {
            "page"
        };
        let lruvec = off(btf, "mem_cgroup_per_node", &["lruvec"])?;
        let lists = btf
            .member("lruvec", "lists")
            .ok_or("no lruvec.lists in BTF")?;
        let mut heads = Vec::new();
        let n = bytes_of(&lists.shape).ok_or("lruvec.lists is not an array")? / 16;
        for i in 0..n {
            heads.push(lruvec + u64::from(lists.offset) + 16 * i);
        }
        // The multi-gen LRU (6.1+, when built in) keeps folios on its own lists.
        for name in ["folios", "lists"] {
            if let Some(m) = btf.member_path("lruvec", &["lrugen", name]) {
                if let Some(b) = bytes_of(&m.shape) {
                    for i in 0..b / 16 {
                        heads.push(lruvec + u64::from(m.offset) + 16 * i);
                    }
                    break;
                }
            }
        }
        let (memcg_data, memcg_mask) = match btf.member(page, "memcg_data") {
            Some(m) => (
                u64::from(m.offset),
                btf.enumerator("__NR_MEMCG_DATA_FLAGS")
                    .map_or(0, |v| u64::from(v).saturating_sub(1)),
            ),
            // 5.10: page->mem_cgroup, a plain pointer.
            None => (off(btf, page, &["mem_cgroup"])?, 0),
        };
        let flags_1 = (page == "folio")
            .then(|| btf.member(page, "_flags_1").map(|m| u64::from(m.offset)))
            .flatten();
        let lru = off(btf, page, &["lru"])?;
        let mapping = off(btf, page, &["mapping"])?;
        let flags = off(btf, page, &["flags"])?;
        let span = [
            lru + 8,
            mapping + 8,
            memcg_data + 8,
            flags + 8,
            flags_1.map_or(0, |f| f + 8),
        ]
        .into_iter()
        .max()
        .unwrap_or(64) as usize;
        Ok(Layout {
            nodeinfo: off(btf, "mem_cgroup", &["nodeinfo"])?,
            heads,
            lru,
            mapping,
            memcg_data,
            memcg_mask,
            flags,
            flags_1,
            pg_head: btf.enumerator("PG_head").map(u64::from),
            span,
            host: off(btf, "address_space", &["host"])?,
            i_ino: off(btf, "inode", &["i_ino"])?,
            i_sb: off(btf, "inode", &["i_sb"])?,
            i_nlink: off(btf, "inode", &["i_nlink"]).ok(),
            i_dentry: off(btf, "inode", &["i_dentry"])?,
            s_dev: off(btf, "super_block", &["s_dev"])?,
            s_type: off(btf, "super_block", &["s_type"])?,
            fs_name: off(btf, "file_system_type", &["name"])?,
            d_alias: off(btf, "dentry", &["d_u", "d_alias"])?,
            d_parent: off(btf, "dentry", &["d_parent"])?,
            d_name: off(btf, "dentry", &["d_name", "name"])?,
        })
    }
}

fn possible_nodes() -> u64 {
    // "0" or "0-3": nodeinfo[] has nr_node_ids entries.
    std::fs::read_to_string("/sys/devices/system/node/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .rsplit(['-', ','])
                .next()
                .and_then(|l| l.parse::<u64>().ok())
        })
        .map_or(1, |last| last + 1)
}

/// Page pins for each memcg address in `memcgs` (same order), or why there are none.
pub fn page_pins(
    btf: &Btf,
    kread: &mut Kread,
    memcgs: &[u64],
) -> Result<std::result::Result<Vec<PagePins>, String>> {
    let lay = match Layout::from_btf(btf) {
        Ok(l) => l,
        Err(e) => return Ok(Err(e)),
    };
    let mut out: Vec<PagePins> = vec![PagePins::default(); memcgs.len()];
    // nodeinfo pointers.
    let nodes = possible_nodes();
    let mut reqs = Vec::new();
    for &m in memcgs {
        for n in 0..nodes {
            reqs.push(m + lay.nodeinfo + 8 * n);
        }
    }
    let per_node = kread.read_u64s(&reqs)?;
    // Every LRU list followed in the kernel, then every folio read in batches.
    let mut starts: Vec<(u64, u64)> = Vec::new();
    let mut owner_of: Vec<usize> = Vec::new();
    for (i, pn) in per_node.iter().enumerate() {
        let Some(pn) = pn.filter(|&p| p != 0) else {
            continue;
        };
        for &h in &lay.heads {
            starts.push((pn + h, pn + h));
            owner_of.push(i / nodes as usize);
        }
    }
    let lists = kread.follow(&starts, MAX_FOLIOS as usize)?;
    let mut at: Vec<(usize, u64)> = Vec::new();
    for (&m, (list, complete)) in owner_of.iter().zip(lists) {
        if !complete {
            out[m].truncated = true;
        }
        at.extend(list.into_iter().map(|n| (m, n - lay.lru)));
    }
    let mut folios: Vec<(usize, u64, u64)> = Vec::new(); // (memcg, mapping, pages)
    for batch in at.chunks(64 * 256) {
        let reqs: Vec<(u64, usize)> = batch.iter().map(|&(_, f)| (f, lay.span)).collect();
        let bodies = kread.read(&reqs)?;
        for (&(m, _), body) in batch.iter().zip(bodies) {
            let p = &mut out[m];
            p.folios_walked += 1;
            let field = |o: u64| body.as_ref().and_then(|b| u64_at(b, o as usize));
            let owner = field(lay.memcg_data).map(|d| d & !lay.memcg_mask);
            if owner != Some(memcgs[m]) {
                // Moved to another list or freed while we walked.
                p.unverified += 1;
                continue;
            }
            let mut pages = 1;
            if let (Some(head), Some(f1)) = (lay.pg_head, lay.flags_1) {
                if field(lay.flags).is_some_and(|f| f & (1 << head) != 0) {
                    let order = field(f1).map_or(0, |v| v & 0xff);
                    if order <= 20 {
                        pages = 1u64 << order;
                    }
                }
            }
            match field(lay.mapping) {
                Some(map) if map != 0 && map & 3 == 0 => folios.push((m, map, pages)),
                _ => p.anon_pages += pages,
            }
        }
    }

    // Files: mapping -> inode -> (dev, ino, nlink, first dentry) -> path.
    let mut per_file: HashMap<(usize, u64), u64> = HashMap::new();
    for &(m, map, pages) in &folios {
        *per_file.entry((m, map)).or_default() += pages;
    }
    let mappings: Vec<u64> = {
        let mut v: Vec<u64> = per_file.keys().map(|&(_, map)| map).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let hosts = kread.read_u64s(&mappings.iter().map(|m| m + lay.host).collect::<Vec<_>>())?;
    let mut reqs = Vec::new();
    for h in &hosts {
        let h = h.unwrap_or(0);
        let a = |o: u64| if h == 0 { 0 } else { h + o };
        reqs.push((a(lay.i_ino), 8));
        reqs.push((a(lay.i_sb), 8));
        reqs.push((lay.i_nlink.map_or(0, a), 4));
        reqs.push((a(lay.i_dentry), 8));
    }
    let inode = kread.read(&reqs)?;
    let word = |i: usize, k: usize| inode[i * 4 + k].as_ref().and_then(|b| u64_at(b, 0));
    let sbs: Vec<u64> = (0..mappings.len())
        .map(|i| word(i, 1).unwrap_or(0))
        .collect();
    let devs = kread.read(
        &sbs.iter()
            .map(|&s| (if s == 0 { 0 } else { s + lay.s_dev }, 4))
            .collect::<Vec<_>>(),
    )?;
    let types = kread.read_u64s(
        &sbs.iter()
            .map(|&s| if s == 0 { 0 } else { s + lay.s_type })
            .collect::<Vec<_>>(),
    )?;
    let type_names = kread.read_u64s(
        &types
            .iter()
            .map(|t| t.filter(|&t| t != 0).map_or(0, |t| t + lay.fs_name))
            .collect::<Vec<_>>(),
    )?;
    let fs_names = read_strings(
        kread,
        &type_names
            .iter()
            .map(|t| t.unwrap_or(0))
            .collect::<Vec<_>>(),
    )?;
    let dentries: Vec<u64> = (0..mappings.len())
        .map(|i| {
            word(i, 3)
                .filter(|&d| d != 0)
                .map_or(0, |alias| alias - lay.d_alias)
        })
        .collect();
    let rel_paths = dentry_paths(kread, &lay, &dentries)?;
    let mounts = Mounts::read();
    type Info = (String, u64, bool, Option<String>, Option<String>);
    let mut info: HashMap<u64, Info> = HashMap::new();
    for (i, &map) in mappings.iter().enumerate() {
        let dev = devs[i]
            .as_ref()
            .and_then(|b| u32_at(b, 0))
            .map_or(0, u64::from);
        let (major, minor) = (dev >> 20, dev & 0xf_ffff);
        let nlink = inode[i * 4 + 2].as_ref().and_then(|b| u32_at(b, 0));
        let deleted = nlink == Some(0);
        let path = rel_paths[i]
            .as_ref()
            .and_then(|rel| mounts.place(major, minor, rel))
            .map(|p| if deleted { format!("{p} (deleted)") } else { p });
        info.insert(
            map,
            (
                format!("{major}:{minor}"),
                word(i, 0).unwrap_or(0),
                deleted,
                path,
                fs_names[i].clone(),
            ),
        );
    }
    for ((m, map), pages) in per_file {
        let (dev, ino, deleted, path, fs) = info
            .get(&map)
            .cloned()
            .unwrap_or_else(|| ("?".into(), 0, false, None, None));
        out[m].files.push(FilePin {
            dev,
            ino,
            path,
            fs,
            deleted,
            pages,
        });
    }
    for p in &mut out {
        p.files
            .sort_by(|a, b| b.pages.cmp(&a.pages).then(a.ino.cmp(&b.ino)));
    }
    Ok(Ok(out))
}

/// Path of each dentry relative to its filesystem's root ("/a/b").
fn dentry_paths(kread: &mut Kread, lay: &Layout, dentries: &[u64]) -> Result<Vec<Option<String>>> {
    let mut parts: Vec<Vec<String>> = vec![Vec::new(); dentries.len()];
    let mut cur: Vec<u64> = dentries.to_vec();
    let mut done: Vec<bool> = cur.iter().map(|&d| d == 0).collect();
    let mut ok: Vec<bool> = vec![true; dentries.len()];
    for _ in 0..64 {
        let todo: Vec<usize> = (0..cur.len()).filter(|&i| !done[i]).collect();
        if todo.is_empty() {
            break;
        }
        let reqs: Vec<(u64, usize)> = todo
            .iter()
            .flat_map(|&i| [(cur[i] + lay.d_parent, 8), (cur[i] + lay.d_name, 8)])
            .collect();
        let r = kread.read(&reqs)?;
        let names_at: Vec<u64> = (0..todo.len())
            .map(|k| {
                r[2 * k + 1]
                    .as_ref()
                    .and_then(|b| u64_at(b, 0))
                    .unwrap_or(0)
            })
            .collect();
        let names = read_strings(kread, &names_at)?;
        for (k, &i) in todo.iter().enumerate() {
            let parent = r[2 * k].as_ref().and_then(|b| u64_at(b, 0));
            match (parent, &names[k]) {
                (Some(p), _) if p == cur[i] => done[i] = true, // the root
                (Some(p), Some(name)) if p != 0 => {
                    parts[i].push(name.clone());
                    cur[i] = p;
                }
                _ => {
                    ok[i] = false;
                    done[i] = true;
                }
            }
        }
    }
    Ok((0..dentries.len())
        .map(|i| {
            (dentries[i] != 0 && ok[i] && done[i]).then(|| {
                let mut p: Vec<&str> = parts[i].iter().rev().map(String::as_str).collect();
                if p.is_empty() {
                    p.push("");
                }
                format!("/{}", p.join("/"))
            })
        })
        .collect())
}

/// Mount points by device, from /proc/self/mountinfo.
struct Mounts(Vec<(u64, u64, String, String)>);

impl Mounts {
    fn read() -> Mounts {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Mounts(text.lines().filter_map(parse_mountinfo_line).collect())
    }

    /// A path for `rel` (from the fs root) on device major:minor, under a
    /// mount whose root contains it.
    fn place(&self, major: u64, minor: u64, rel: &str) -> Option<String> {
        self.0
            .iter()
            .filter(|(ma, mi, root, _)| {
                *ma == major
                    && *mi == minor
                    && (root == "/" || rel == root || rel.starts_with(&format!("{root}/")))
            })
            .max_by_key(|(_, _, root, _)| root.len())
            .map(|(_, _, root, point)| {
                let tail = if root == "/" { rel } else { &rel[root.len()..] };
                if point == "/" {
                    tail.to_string()
                } else {
                    format!("{point}{tail}")
                }
            })
    }
}

fn parse_mountinfo_line(l: &str) -> Option<(u64, u64, String, String)> {
    let f: Vec<&str> = l.split_whitespace().collect();
    let (ma, mi) = f.get(2)?.split_once(':')?;
    Some((
        ma.parse().ok()?,
        mi.parse().ok()?,
        unescape(f.get(3)?),
        unescape(f.get(4)?),
    ))
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_by_device() {
        let m = Mounts(vec![
            (0, 40, "/".into(), "/tmp/x".into()),
            (8, 1, "/".into(), "/".into()),
            (8, 1, "/var/lib".into(), "/mnt/lib".into()),
        ]);
        assert_eq!(m.place(0, 40, "/f.dat").as_deref(), Some("/tmp/x/f.dat"));
        assert_eq!(m.place(8, 1, "/etc/hosts").as_deref(), Some("/etc/hosts"));
        assert_eq!(m.place(8, 1, "/var/lib/a").as_deref(), Some("/mnt/lib/a"));
        assert_eq!(m.place(9, 9, "/a"), None);
        let line = "36 35 0:40 / /tmp/a\\040b rw,relatime - tmpfs t rw";
        assert_eq!(
            parse_mountinfo_line(line),
            Some((0, 40, "/".into(), "/tmp/a b".into()))
        );
    }

    #[test]
    fn layout_of_the_running_kernel() {
        let btf = Btf::from_sys_fs().expect("BTF");
        let lay = Layout::from_btf(&btf).expect("layout");
        assert!(lay.heads.len() >= 5, "{} LRU heads", lay.heads.len());
        assert!(lay.span <= 256);
    }
}
