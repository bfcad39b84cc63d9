//! How long `memory.stat` takes to read: on a node full of dying memcgs the
//! kernel walks them all for it, and every monitoring agent pays that.
//! `doctor` reports it and `serve` exports it.

use std::fs;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::kernel::cgroupfs::{CgroupDir, Hierarchy};

/// How long one read of a memory.stat took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatTiming {
    pub cgroup: String,
    pub usage_bytes: Option<u64>,
    pub seconds: f64,
}

/// Times `memory.stat` of the root and of the cgroup using the most memory: on a node full
/// of dying memcgs these reads take seconds, and every monitoring agent pays that.
pub fn time_memory_stat(h: &Hierarchy, dirs: &[CgroupDir]) -> Result<Vec<StatTiming>> {
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
            .mount
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
