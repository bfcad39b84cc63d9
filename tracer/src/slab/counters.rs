//! The kernel side's counters of one slab-tracer run: plain data that the
//! loader (`probes.rs`) fills and the report (`report.rs`) carries, so
//! neither needs the other.

use serde::Serialize;

/// The kernel side's own account of what it saw and could not deliver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounters {
    pub allocs_matched: u64,
    pub allocs_lost_ringbuf: u64,
    pub allocs_lost_map_full: u64,
    pub frees_matched: u64,
    pub frees_lost_ringbuf: u64,
    pub kstack_failed: u64,
    pub ustack_failed: u64,
    /// Selected objects whose pointer broke the free filter's alignment
    /// assumption (their frees would go unseen). Should be 0.
    pub misaligned: u64,
    /// Allocations drawn while their stratum was zoomed, and the kernel time
    /// (ns) capturing their stacks took, measured around the captures.
    pub zoom_drawn: u64,
    pub zoom_stack_ns: u64,
    /// Program runs the kernel skipped because a BPF program was already running
    /// on that CPU (e.g. a kfree from an interrupt that hit our handler). None
    /// when the kernel does not report it (before 5.12).
    pub recursion_misses: Option<u64>,
    /// Frees that no program of ours ran for (recursion): up to this many of the
    /// outstanding objects may already be freed. On a raw free hook a free is
    /// lost only if both its program and the spare skipped it, so the bound is
    /// the smaller of their two miss counts; on a classic hook, every miss.
    /// None before 5.12 (unknown).
    pub frees_maybe_missed: Option<u64>,
    /// Allocations no program of ours ran for (recursion), counted the same
    /// way: at most this many selected allocations are missing from the counts.
    pub allocs_maybe_missed: Option<u64>,
    /// Kernel memory of leaktrace's BPF maps (fdinfo `memlock`; on 6.4+ the
    /// memory in use, before that the maps' full size).
    pub map_bytes: u64,
}
