//! The memory picture: Slab and SUnreclaim against MemTotal, from /proc/meminfo.

use super::*;

/// SUnreclaim as a share of RAM. Healthy nodes sit at a few percent; the seed incident
/// was at 90%. Unreclaimable slab cannot be given back under pressure, so a tenth of RAM
/// is already worth a look and a quarter means the node is being eaten.
pub(super) const SUNRECLAIM_WARN_PCT: f64 = 10.0;
pub(super) const SUNRECLAIM_CRIT_PCT: f64 = 25.0;

#[derive(Debug, Clone, Serialize)]
pub struct MemoryData {
    #[serde(flatten)]
    pub meminfo: MemInfo,
    pub slab_pct: f64,
    pub sreclaimable_pct: f64,
    pub sunreclaim_pct: f64,
}

pub(super) fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

pub(super) fn kb(kb: u64) -> String {
    human_bytes(kb.saturating_mul(1024))
}

pub fn memory_finding(m: &MemInfo) -> Finding {
    let total = m.mem_total_kb;
    let data = MemoryData {
        meminfo: *m,
        slab_pct: pct(m.slab_kb, total),
        sreclaimable_pct: pct(m.sreclaimable_kb, total),
        sunreclaim_pct: pct(m.sunreclaim_kb, total),
    };
    let severity = if data.sunreclaim_pct >= SUNRECLAIM_CRIT_PCT {
        Severity::Critical
    } else if data.sunreclaim_pct >= SUNRECLAIM_WARN_PCT {
        Severity::Warning
    } else {
        Severity::Ok
    };
    let band = match severity {
        Severity::Critical => format!(" (critical above {SUNRECLAIM_CRIT_PCT}%)"),
        Severity::Warning => format!(" (warning above {SUNRECLAIM_WARN_PCT}%)"),
        _ => String::new(),
    };
    Finding {
        check: "memory",
        severity,
        summary: format!(
            "SUnreclaim {} is {:.1}% of RAM{band}",
            kb(m.sunreclaim_kb),
            data.sunreclaim_pct
        ),
        details: vec![format!(
            "MemTotal {}   MemAvailable {}   Slab {} ({:.1}%)   SReclaimable {} ({:.1}%)   SUnreclaim {} ({:.1}%)",
            kb(total),
            kb(m.mem_available_kb),
            kb(m.slab_kb),
            data.slab_pct,
            kb(m.sreclaimable_kb),
            data.sreclaimable_pct,
            kb(m.sunreclaim_kb),
            data.sunreclaim_pct
        )],
        data: Some(Data::Memory(data)),
    }
}
