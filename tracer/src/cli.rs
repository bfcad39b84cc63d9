//! Command line: what a user can ask for, parsed and validated before anything
//! touches the kernel.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::plan::HookMode;

#[derive(Debug, Parser)]
#[command(
    name = "leaktrace",
    version,
    about = "Who is growing kernel memory: outstanding slab objects by process, kernel+user stack and cgroup",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

const AFTER_HELP: &str = "\
Cache names follow /proc/slabinfo:
  kmalloc-N       kmalloc() of size class N without __GFP_ACCOUNT (also the kmalloc-rnd-*-N copies
                  of CONFIG_RANDOM_KMALLOC_CACHES, which the tracepoints cannot tell apart)
  kmalloc-cg-N    kmalloc() charged to a memory cgroup (__GFP_ACCOUNT); kernels before 5.14 have no
                  separate cg caches and report these inside kmalloc-N
  kmalloc-rcl-N   reclaimable kmalloc (__GFP_RECLAIMABLE); dma-kmalloc-N: __GFP_DMA
  NAME            a named cache (dentry, filp, ...): needs a kernel whose kmem_cache_alloc
                  tracepoint carries the cache name (6.18 does;
                  Debian 6.1 and 6.12 do not)
Caches merged into the selected one (/sys/kernel/slab aliases) are traced too and listed at start.
Only objects allocated after leaktrace attached can be attributed; the header shows the cache's
slabinfo growth next to the tracked count so the two can be compared.

Examples:
  leaktrace --cache kmalloc-512 --top
  leaktrace --cache kmalloc-cg-512 --duration 60s --json > report.jsonl
  leaktrace caches";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List slab caches with object sizes, usage and merged aliases, to pick a --cache.
    Caches,
    /// Diagnose a node whose kernel memory grows: meminfo, slab growth, dying memcgs, kmem
    /// accounting, kernel version, whether leaktrace can attach, and the next command.
    /// Works without root and where BPF cannot load.
    Doctor(crate::doctor::DoctorArgs),
    /// Memory-cgroup lifetimes: who creates memcgs, which are removed but never
    /// freed (dying, zombie), and which charged kernel objects pin them.
    Memcg(crate::memcg::MemcgArgs),
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Slab cache to trace, as named in /proc/slabinfo (e.g. kmalloc-512, kmalloc-cg-512, dentry).
    #[arg(long, value_name = "NAME")]
    pub cache: Option<String>,

    /// Live view, refreshed every --interval (plain periodic text when stdout is not a terminal).
    #[arg(long)]
    pub top: bool,

    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Refresh period of the live view and JSON snapshots.
    #[arg(long, value_parser = parse_duration, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,

    /// Only this process (thread group id); filtered in the kernel.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Only processes whose command name contains this text.
    #[arg(long)]
    pub comm: Option<String>,

    /// Processes shown.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,

    /// Stacks shown under each process.
    #[arg(long, default_value_t = 3)]
    pub stacks: usize,

    /// Frames shown per kernel and per user stack in the live view (the final report shows all).
    #[arg(long, default_value_t = 8)]
    pub frames: usize,

    /// Order of processes and stacks.
    #[arg(long, value_enum, default_value_t = SortKey::Outstanding)]
    pub sort: SortKey,

    /// Window over which growth and allocation rates are computed.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub rate_window: Duration,

    /// Objects the kernel can track at once; allocations beyond it are counted as lost.
    #[arg(long, default_value_t = 1 << 20, value_name = "N")]
    pub max_objects: u32,

    /// Ring buffer size in MiB (rounded up to a power of two). Kernel memory for
    /// the whole run (`cargo xtask bench` measures loss at the highest rate).
    #[arg(long, default_value_t = 8, value_name = "MIB")]
    pub ringbuf_mib: u32,

    /// Capture stacks for every allocation. By default every object is counted
    /// exactly per (process, kernel call site, first user frames), and full stacks
    /// of a random 1 in --stack-sample allocations split those counts into
    /// unbiased per-stack estimates with a 95% interval.
    #[arg(long)]
    pub exact: bool,

    /// Without --exact: capture full stacks for a random 1 in N allocations (power of two).
    #[arg(long, default_value_t = 64, value_parser = parse_power_of_two, value_name = "N")]
    pub stack_sample: u64,

    /// Do not capture kernel stacks.
    #[arg(long)]
    pub no_kernel_stacks: bool,

    /// Do not capture user stacks.
    #[arg(long)]
    pub no_user_stacks: bool,

    /// Machine output: one JSON object per interval (with --top) and a final report, one per line.
    #[arg(long)]
    pub json: bool,

    /// At exit, write a gzipped pprof profile (open with `go tool pprof FILE`): sample
    /// types outstanding_objects/space and alloc_objects/space; labels pid, comm, cgroup, cache.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<std::path::PathBuf>,

    /// At exit, write FlameGraph folded stacks (process;user frames;kernel frames WEIGHT).
    #[arg(long, value_name = "FILE")]
    pub folded: Option<std::path::PathBuf>,

    /// At exit, write a flame graph SVG of the same stacks (drawn by inferno).
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<std::path::PathBuf>,

    /// Weight of --folded and --flamegraph.
    #[arg(long, value_enum, default_value_t = crate::output::folded::Weight::Bytes)]
    pub weight: crate::output::folded::Weight,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464), refreshed
    /// every --interval: outstanding objects/bytes, top processes (at most --limit), losses.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Kernel hooks: auto uses raw tracepoints where the kernel's BTF proves their
    /// argument layout (cheapest) and classic kmem tracepoints elsewhere.
    #[arg(long, value_enum, default_value_t = HookMode::Auto)]
    pub hooks: HookMode,

    /// Benchmark floor: attach empty programs on the same hooks and record nothing.
    #[arg(long, hide = true)]
    pub floor: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// Objects allocated and not yet freed.
    Outstanding,
    /// Allocations per second over --rate-window: a retry loop shows up here before it leaks.
    Rate,
    /// Allocations since attach.
    Allocs,
}

fn parse_power_of_two(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n.is_power_of_two() => Ok(n),
        _ => Err(format!(
            "'{text}' is not a power of two (1, 2, 4, ... 64 ...)"
        )),
    }
}

/// `500ms`, `10s`, `5m`, `1h`, or bare seconds. Zero is refused: a zero interval
/// would spin and a zero duration would detach before anything is seen.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; use e.g. 500ms, 10s, 5m, 1h"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{text}'; use ms, s, m or h"
            ))
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("duration '{text}' must be greater than zero"));
    }
    if seconds > 366.0 * 86400.0 {
        return Err(format!("duration '{text}' is longer than a year"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "10x", "-1s", "0s", "0", "abc", "1e400s", "10 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn cli_shape() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
