//! What the slab tracer is asked for, as plain options: main.rs fills them
//! from the command line, the run (`trace.rs`) and its loop
//! (`trace_tool.rs`) read them.

use std::time::Duration;

use crate::{
    output::folded::Weight,
    pages::PageOptions,
    pipeline::RunOptions,
    slab::plan::HookMode,
    slab::probes::Floor,
    slab::report::{GroupBy, SortKey},
};

/// What the slab tracer is asked for (main.rs fills it from the command line).
#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub run: RunOptions,
    /// Only this process (tgid), filtered in the kernel.
    pub pid: Option<u32>,
    /// Only processes whose command name contains this (text views).
    pub comm: Option<String>,
    /// Processes, stacks under each, and frames per stack in the live view.
    pub limit: usize,
    pub stacks: usize,
    pub frames: usize,
    pub sort: SortKey,
    /// What rows aggregate at start (the live view cycles it).
    pub group_by: GroupBy,
    /// Window of growth and allocation rates.
    pub rate_window: Duration,
    /// Objects the kernel can track at once; None: from the cache's size.
    pub max_objects: Option<u32>,
    /// Where kubelet's pod and container logs are, to name pods.
    pub pods_root: std::path::PathBuf,
    /// Stacks for every allocation instead of 1 in `stack_sample`.
    pub exact: bool,
    pub stack_sample: u64,
    /// Key the exact counts by each allocation's first user frames too.
    pub user_paths: bool,
    pub no_kernel_stacks: bool,
    pub no_user_stacks: bool,
    /// Files written at exit, and their weight.
    pub pprof: Option<std::path::PathBuf>,
    /// `--all-caches --pprof-snapshots`: a profile to fd 3 per stdin line.
    pub pprof_snapshots: bool,
    pub folded: Option<std::path::PathBuf>,
    pub flamegraph: Option<std::path::PathBuf>,
    pub weight: Weight,
    /// Prometheus metrics served at this address.
    pub metrics: Option<std::net::SocketAddr>,
    pub hooks: HookMode,
    /// Benchmark floor: empty programs on the same hooks instead of ours.
    pub floor: Option<Floor>,
}

/// What the slab tracer's pipeline attributes, one source a run: the
/// kernel's live table is keyed by one kind of pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Traced {
    /// A slab cache by name or alias (`--cache`).
    Cache(String),
    /// Per-CPU allocations (`--percpu`).
    Percpu,
    /// The page allocator's unmovable blocks (`--pages`).
    Pages(PageOptions),
    /// Every slab cache, sampled by bytes (`--all-caches`).
    AllCaches { sample_bytes: u64 },
}
