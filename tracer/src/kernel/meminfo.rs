//! `/proc/meminfo`: the few fields that tell whether slab is what is eating the node.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Memory totals in KiB, as the kernel prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemInfo {
    pub mem_total_kb: u64,
    pub mem_available_kb: u64,
    pub slab_kb: u64,
    pub sreclaimable_kb: u64,
    pub sunreclaim_kb: u64,
}

/// Reads `<root>/proc/meminfo`; `root` is `/` in production and a fixture tree in tests.
pub fn read(root: &Path) -> Result<MemInfo> {
    let path = root.join("proc/meminfo");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn parse(text: &str) -> Result<MemInfo> {
    Ok(MemInfo {
        mem_total_kb: field(text, "MemTotal")?,
        mem_available_kb: field(text, "MemAvailable")?,
        slab_kb: field(text, "Slab")?,
        sreclaimable_kb: field(text, "SReclaimable")?,
        sunreclaim_kb: field(text, "SUnreclaim")?,
    })
}

fn field(text: &str, key: &str) -> Result<u64> {
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != key {
            continue;
        }
        let mut parts = rest.split_whitespace();
        let value = parts
            .next()
            .with_context(|| format!("field '{key}' has no value"))?;
        let value: u64 = value
            .parse()
            .with_context(|| format!("field '{key}' has a non-numeric value '{value}'"))?;
        // Every field we read is printed in kB; anything else means a format we do not know.
        match parts.next() {
            None | Some("kB") => return Ok(value),
            Some(unit) => bail!("field '{key}' has unexpected unit '{unit}'"),
        }
    }
    bail!("missing field '{key}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
    }

    #[test]
    fn reads_this_hosts_meminfo_fixture() {
        let m = read(&fixture("host-6.18")).unwrap();
        assert!(m.mem_total_kb > 1024 * 1024, "{m:?}");
        assert!(m.mem_available_kb <= m.mem_total_kb);
        assert_eq!(m.slab_kb, m.sreclaimable_kb + m.sunreclaim_kb);
    }

    #[test]
    fn incident_node_is_mostly_unreclaimable_slab() {
        let m = read(&fixture("incident")).unwrap();
        assert_eq!(m.mem_total_kb, 64 * 1024 * 1024);
        assert_eq!(m.slab_kb, 61 * 1024 * 1024);
        assert_eq!(m.sunreclaim_kb, 58 * 1024 * 1024);
        assert_eq!(m.sreclaimable_kb, 3 * 1024 * 1024);
    }

    #[test]
    fn missing_field_is_named() {
        let text = "MemTotal: 100 kB\nMemAvailable: 50 kB\nSReclaimable: 1 kB\nSUnreclaim: 2 kB\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.to_string(), "missing field 'Slab'");
    }

    #[test]
    fn field_name_must_match_exactly() {
        // "Slab" must not be satisfied by a line that merely starts with it.
        let text = "MemTotal: 100 kB\nMemAvailable: 50 kB\nSlabby: 7 kB\n\
                    SReclaimable: 1 kB\nSUnreclaim: 2 kB\n";
        assert!(parse(text).is_err());
    }

    #[test]
    fn bad_value_and_unit_are_errors() {
        let base = "MemAvailable: 50 kB\nSlab: 3 kB\nSReclaimable: 1 kB\nSUnreclaim: 2 kB\n";
        let err = parse(&format!("MemTotal: lots kB\n{base}")).unwrap_err();
        assert!(err.to_string().contains("MemTotal"), "{err}");
        let err = parse(&format!("MemTotal: 100 MB\n{base}")).unwrap_err();
        assert!(err.to_string().contains("unit 'MB'"), "{err}");
    }

    #[test]
    fn read_error_names_the_path() {
        let err = read(Path::new("/nonexistent-root")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent-root/proc/meminfo"));
    }
}
