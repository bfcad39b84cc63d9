//! How many CPUs the kernel may ever bring up: `num_possible_cpus()`, from
//! `/sys/devices/system/cpu/possible` (`cpu_possible_mask` as a CPU list,
//! e.g. `0-1` or `0-3,8-11`; drivers/base/cpu.c). The per-CPU allocator
//! gives every possible CPU its copy, online or not.

use std::path::Path;

use anyhow::{Context, Result};

/// `num_possible_cpus()` on the system under `root`. Errors: the file is
/// unreadable or not a CPU list.
pub fn read(root: &Path) -> Result<u64> {
    let path = root.join("sys/devices/system/cpu/possible");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    count(&text).with_context(|| format!("{} is not a CPU list: {text:?}", path.display()))
}

/// Ids in a kernel CPU (or node: the same syntax) list (`bitmap_parselist`
/// syntax without strides).
pub fn count(list: &str) -> Option<u64> {
    let mut n = 0u64;
    for part in list.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u64>().ok()?, hi.parse::<u64>().ok()?),
            None => {
                let cpu = part.parse::<u64>().ok()?;
                (cpu, cpu)
            }
        };
        n += hi.checked_sub(lo)? + 1;
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(count("0-1\n"), Some(2));
        assert_eq!(count("0"), Some(1));
        assert_eq!(count("0-3,8-11"), Some(8));
        assert_eq!(count("0,2,4-5"), Some(4));
        assert_eq!(count(""), None);
        assert_eq!(count("3-1"), None);
        assert_eq!(count("x"), None);
    }
}
