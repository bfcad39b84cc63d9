//! kmalloc buckets: the family (`KmallocKind`) the kernel picks from gfp flags, and
//! the spellings of bucket names (`kmalloc-512`, `kmalloc-cg-1k`, `dma-kmalloc-8k`).

use super::*;

/// The kmalloc cache family a kmalloc() lands in. The kernel (`kmalloc_type()`) decides it
/// from the gfp flags in this order, and the eBPF side must use the same order:
/// `__GFP_DMA` -> `Dma`, else `__GFP_RECLAIMABLE` -> `Reclaimable`, else `__GFP_ACCOUNT` ->
/// `Cgroup`, else `Normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum KmallocKind {
    Normal,
    Cgroup,
    Reclaimable,
    Dma,
}

impl KmallocKind {
    pub(super) fn cache_name(self, size_text: &str) -> String {
        match self {
            KmallocKind::Normal => format!("kmalloc-{size_text}"),
            KmallocKind::Cgroup => format!("kmalloc-cg-{size_text}"),
            KmallocKind::Reclaimable => format!("kmalloc-rcl-{size_text}"),
            KmallocKind::Dma => format!("dma-kmalloc-{size_text}"),
        }
    }

    pub(super) fn family(self) -> &'static str {
        match self {
            KmallocKind::Normal => "kmalloc-*",
            KmallocKind::Cgroup => "kmalloc-cg-*",
            KmallocKind::Reclaimable => "kmalloc-rcl-*",
            KmallocKind::Dma => "dma-kmalloc-*",
        }
    }

    /// Why a kernel has no caches of this kind, in which case these allocations are served by
    /// the normal kmalloc caches.
    pub(super) fn absence_reason(self) -> &'static str {
        match self {
            KmallocKind::Normal => "",
            KmallocKind::Cgroup => {
                "kmem accounting is off (cgroup.memory=nokmem or no CONFIG_MEMCG) or the kernel \
                 predates 5.14, so kmalloc()s with __GFP_ACCOUNT"
            }
            KmallocKind::Reclaimable => {
                "the kernel has CONFIG_SLUB_TINY or predates 4.20, so kmalloc()s with \
                 __GFP_RECLAIMABLE"
            }
            KmallocKind::Dma => "the kernel has no CONFIG_ZONE_DMA, so kmalloc()s with __GFP_DMA",
        }
    }
}

/// What a cache name says about kmalloc, if it is a kmalloc cache name at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KmallocName<'a> {
    Kind {
        kind: KmallocKind,
        size: u32,
        size_text: &'a str,
    },
    /// `kmalloc-rnd-NN-<size>`, a CONFIG_RANDOM_KMALLOC_CACHES copy of `kmalloc-<size>`.
    Random { size: u32, size_text: &'a str },
}

pub(super) fn parse_kmalloc_name(name: &str) -> Option<KmallocName<'_>> {
    pub(super) fn kind(kind: KmallocKind, size_text: &str) -> Option<KmallocName<'_>> {
        Some(KmallocName::Kind {
            kind,
            size: parse_size(size_text)?,
            size_text,
        })
    }
    if let Some(rest) = name.strip_prefix("dma-kmalloc-") {
        return kind(KmallocKind::Dma, rest);
    }
    let rest = name.strip_prefix("kmalloc-")?;
    if let Some(s) = rest.strip_prefix("cg-") {
        return kind(KmallocKind::Cgroup, s);
    }
    if let Some(s) = rest.strip_prefix("rcl-") {
        return kind(KmallocKind::Reclaimable, s);
    }
    if let Some(r) = rest.strip_prefix("rnd-") {
        let (copy, size_text) = r.split_once('-')?;
        if copy.is_empty() || !copy.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return Some(KmallocName::Random {
            size: parse_size(size_text)?,
            size_text,
        });
    }
    kind(KmallocKind::Normal, rest)
}

/// Kernels since 4.20 spell sizes from 1024 up as `1k`, `2M`; older ones as `1024`.
pub(super) fn parse_size(text: &str) -> Option<u32> {
    let (digits, unit) = if let Some(d) = text.strip_suffix(['k', 'K']) {
        (d, 1024)
    } else if let Some(d) = text.strip_suffix('M') {
        (d, 1024 * 1024)
    } else {
        (text, 1)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u32>()
        .ok()?
        .checked_mul(unit)
        .filter(|n| *n > 0)
}

/// Every way a kernel may have spelled `size` in a cache name, the modern one first.
pub(super) fn size_spellings(size: u32) -> Vec<String> {
    let mut out = Vec::new();
    if size >= 1024 * 1024 && size.is_multiple_of(1024 * 1024) {
        out.push(format!("{}M", size / (1024 * 1024)));
    } else if size >= 1024 && size.is_multiple_of(1024) {
        out.push(format!("{}k", size / 1024));
    }
    out.push(size.to_string());
    out
}
