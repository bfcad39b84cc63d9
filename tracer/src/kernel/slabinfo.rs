//! `/proc/slabinfo`, format "slabinfo - version: 2.1".
//!
//! Each line is one real `kmem_cache` under its own `s->name`: caches merged into it
//! (see `caches.rs`) do not get a line, and `objsize` is `s->size` (object plus
//! alignment/metadata), which is also the `bytes_alloc` the kmem tracepoints report.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

const SUPPORTED_VERSION: &str = "2.1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlabLine {
    pub name: String,
    pub active_objs: u64,
    pub num_objs: u64,
    pub objsize: u64,
    pub objperslab: u64,
    pub pagesperslab: u64,
    pub active_slabs: u64,
    pub num_slabs: u64,
}

impl SlabLine {
    /// Bytes of all objects the cache has room for, the figure slabtop calls CACHE SIZE.
    pub fn total_bytes(&self) -> u64 {
        self.num_objs.saturating_mul(self.objsize)
    }

    /// Bytes of objects SLUB counts as in use. SLUB reports objects in per-CPU slabs as
    /// active, so this over-states live objects by up to a few slabs per CPU.
    pub fn active_bytes(&self) -> u64 {
        self.active_objs.saturating_mul(self.objsize)
    }
}

/// Reads `<root>/proc/slabinfo` (mode 0400: needs root on a live system).
pub fn read(root: &Path) -> Result<Vec<SlabLine>> {
    let path = root.join("proc/slabinfo");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<SlabLine>> {
    let mut lines = text.lines();
    let header = lines.next().context("empty slabinfo")?;
    let version = header
        .strip_prefix("slabinfo - version:")
        .with_context(|| format!("not a slabinfo header: '{header}'"))?
        .split_whitespace()
        .next()
        .unwrap_or("");
    // The column layout is only defined for 2.1 (2.1 "(statistics)" merely appends columns
    // after the ones we read); older layouts put different numbers in the same places.
    if version != SUPPORTED_VERSION {
        bail!(
            "unsupported slabinfo version '{version}' (this tool understands {SUPPORTED_VERSION})"
        );
    }
    let mut out = Vec::new();
    for (idx, line) in lines.enumerate() {
        let line_no = idx + 2;
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(line).with_context(|| format!("line {line_no}: '{line}'"))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<SlabLine> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    // Counting back from the first ':' keeps a (theoretical) name with spaces intact.
    let sep = tokens
        .iter()
        .position(|t| *t == ":")
        .context("no ':' separator")?;
    if sep < 6 {
        bail!("expected a name and 5 numbers before the first ':'");
    }
    let num = |i: usize, what: &str| -> Result<u64> {
        let tok = tokens.get(i).with_context(|| format!("missing {what}"))?;
        tok.parse()
            .with_context(|| format!("{what} '{tok}' is not a number"))
    };
    let slabdata = tokens
        .iter()
        .position(|t| *t == "slabdata")
        .context("no 'slabdata' section")?;
    Ok(SlabLine {
        name: tokens[..sep - 5].join(" "),
        active_objs: num(sep - 5, "active_objs")?,
        num_objs: num(sep - 4, "num_objs")?,
        objsize: num(sep - 3, "objsize")?,
        objperslab: num(sep - 2, "objperslab")?,
        pagesperslab: num(sep - 1, "pagesperslab")?,
        active_slabs: num(slabdata + 1, "active_slabs")?,
        num_slabs: num(slabdata + 2, "num_slabs")?,
    })
}

/// Change of one cache between two samples; negative when the cache shrank.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Growth {
    pub name: String,
    pub objs_delta: i64,
    pub bytes_delta: i64,
    pub objs_per_sec: f64,
    pub bytes_per_sec: f64,
}

/// Growth of active objects between `before` and `after`, taken `elapsed` apart.
pub fn growth(before: &SlabLine, after: &SlabLine, elapsed: Duration) -> Result<Growth> {
    if before.name != after.name {
        bail!(
            "growth needs two samples of one cache, got '{}' and '{}'",
            before.name,
            after.name
        );
    }
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        bail!("samples of '{}' are not apart in time", after.name);
    }
    let objs_delta = delta(before.active_objs, after.active_objs);
    let bytes_delta = delta(before.active_bytes(), after.active_bytes());
    Ok(Growth {
        name: after.name.clone(),
        objs_delta,
        bytes_delta,
        objs_per_sec: objs_delta as f64 / secs,
        bytes_per_sec: bytes_delta as f64 / secs,
    })
}

fn delta(before: u64, after: u64) -> i64 {
    let d = i128::from(after) - i128::from(before);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
    }

    const SAMPLE: &str = "\
slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>
kmalloc-512         3540   4832    512   16    2 : tunables    0    0    0 : slabdata    302    302      0
filp                 630    630    192   21    1 : tunables    0    0    0 : slabdata     30     30      0
";

    fn find<'a>(lines: &'a [SlabLine], name: &str) -> Option<&'a SlabLine> {
        lines.iter().find(|l| l.name == name)
    }

    #[test]
    fn parses_lines() {
        let lines = parse(SAMPLE).unwrap();
        assert_eq!(
            lines[0],
            SlabLine {
                name: "kmalloc-512".into(),
                active_objs: 3540,
                num_objs: 4832,
                objsize: 512,
                objperslab: 16,
                pagesperslab: 2,
                active_slabs: 302,
                num_slabs: 302,
            }
        );
        assert_eq!(lines[1].name, "filp");
        assert_eq!(lines[0].total_bytes(), 4832 * 512);
        assert_eq!(find(&lines, "filp").map(|l| l.objsize), Some(192));
        assert!(find(&lines, "dentry").is_none());
    }

    #[test]
    fn reads_host_fixture() {
        let lines = read(&fixture("host-6.18")).unwrap();
        assert!(lines.len() > 100);
        let k512 = find(&lines, "kmalloc-512").unwrap();
        assert_eq!(k512.objsize, 512);
        // On SLUB objsize is s->size, which for filp (184-byte objects) is 192.
        assert_eq!(find(&lines, "filp").unwrap().objsize, 192);
        assert!(lines.iter().all(|l| l.active_objs <= l.num_objs));
    }

    #[test]
    fn rejects_other_versions() {
        let old = "slabinfo - version: 1.1\nkmalloc-512 1 2 512 8 1 : 0 0\n";
        let err = parse(old).unwrap_err().to_string();
        assert!(err.contains("unsupported slabinfo version '1.1'"), "{err}");
        let err = parse("hello\n").unwrap_err().to_string();
        assert!(err.contains("not a slabinfo header"), "{err}");
        assert!(parse("").is_err());
    }

    #[test]
    fn accepts_statistics_variant_of_2_1() {
        let text = "slabinfo - version: 2.1 (statistics)\n\
            foo 1 2 64 64 1 : tunables 120 60 8 : slabdata 1 1 0 : globalstat 5 2 1 0 0 0 0 0 0 : cpustat 1 1 0 0\n";
        let lines = parse(text).unwrap();
        assert_eq!((lines[0].active_objs, lines[0].num_slabs), (1, 1));
    }

    #[test]
    fn malformed_line_reports_line_number() {
        let text = "slabinfo - version: 2.1\nfoo 1 2 x 4 1 : tunables 0 0 0 : slabdata 1 1 0\n";
        let err = format!("{:#}", parse(text).unwrap_err());
        assert!(
            err.contains("line 2") && err.contains("objsize 'x'"),
            "{err}"
        );
        let text = "slabinfo - version: 2.1\nfoo 1 2 : tunables 0 0 0 : slabdata 1 1 0\n";
        assert!(parse(text).is_err());
        let text = "slabinfo - version: 2.1\nfoo 1 2 3 4 1 : tunables 0 0 0 : slabdata 1\n";
        assert!(parse(text).is_err());
    }

    #[test]
    fn growth_per_second() {
        let lines = parse(SAMPLE).unwrap();
        let before = lines[0].clone();
        let mut after = before.clone();
        after.active_objs += 1000;
        let g = growth(&before, &after, Duration::from_secs(10)).unwrap();
        assert_eq!(g.objs_delta, 1000);
        assert_eq!(g.bytes_delta, 512_000);
        assert!((g.objs_per_sec - 100.0).abs() < 1e-9);
        assert!((g.bytes_per_sec - 51_200.0).abs() < 1e-9);
        let shrink = growth(&after, &before, Duration::from_millis(500)).unwrap();
        assert_eq!(shrink.objs_delta, -1000);
        assert!((shrink.objs_per_sec + 2000.0).abs() < 1e-9);
    }

    #[test]
    fn growth_rejects_mismatched_samples() {
        let lines = parse(SAMPLE).unwrap();
        assert!(growth(&lines[0], &lines[1], Duration::from_secs(1)).is_err());
        assert!(growth(&lines[0], &lines[0], Duration::ZERO).is_err());
    }
}
