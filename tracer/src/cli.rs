//! Command line: what a user can ask for, parsed and validated before anything
//! touches the kernel. Only main.rs reads it: each Args struct converts into
//! the plain options of the code it runs ([`TraceOptions`], [`MemcgOptions`],
//! [`DoctorOptions`], [`ServeOptions`]), so nothing below knows how a flag is
//! spelled.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    doctor::DoctorOptions,
    pages::PageOptions,
    pipeline::{
        memcg::MemcgOptions,
        trace_options::{TraceOptions, Traced},
        RunOptions,
    },
    serve::ServeOptions,
    slab::{
        plan::HookMode,
        probes::Floor,
        report::{GroupBy, SortKey},
    },
};

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

--percpu traces per-CPU allocations (percpu:percpu_alloc_percpu) instead of a cache.

Examples:
  leaktrace --cache kmalloc-512 --top
  leaktrace --percpu --duration 60s
  leaktrace --cache kmalloc-cg-512 --duration 60s --json > report.jsonl
  leaktrace caches";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List slab caches with object sizes, usage and merged aliases, to pick a --cache.
    Caches,
    /// Diagnose a node whose kernel memory grows: meminfo, slab growth, dying memcgs, kmem
    /// accounting, kernel version, whether leaktrace can attach, and the next command.
    /// Works without root and where BPF cannot load.
    Doctor(DoctorArgs),
    /// Memory-cgroup lifetimes: who creates memcgs, which are removed but never
    /// freed (dying, zombie), and which charged kernel objects pin them.
    Memcg(MemcgArgs),
    /// Fleet mode: always-on Prometheus metrics of every slab cache, meminfo and
    /// memcgs, and authenticated on-demand deep traces as pprof at /debug/pprof/kmem.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Slab cache to trace, as named in /proc/slabinfo (e.g. kmalloc-512, kmalloc-cg-512, dentry).
    #[arg(long, value_name = "NAME")]
    pub cache: Option<String>,

    /// Trace per-CPU allocations (alloc_percpu: memcg statistics, percpu refcounts and
    /// counters, BPF per-CPU maps) instead of a slab cache; bytes are size x possible CPUs.
    /// One source a run: the kernel's live table holds one kind of pointer.
    #[arg(long, conflicts_with = "cache")]
    pub percpu: bool,
    /// Trace the page allocator instead of a slab cache: unmovable page blocks
    /// the kernel took for itself (pipe buffers, socket frags, driver
    /// buffers), not slab pages (--cache traces those), page tables, user or
    /// page-cache pages.
    #[arg(long, conflicts_with_all = ["cache", "percpu"])]
    pub pages: bool,

    /// Every slab cache at once, sampled by bytes (one sample per
    /// --sample-bytes allocated on average, Go's heap-profile weights): in-use
    /// estimates by cache, process and stack, with 95% intervals.
    #[arg(long, conflicts_with_all = ["cache", "percpu", "pages"])]
    pub all_caches: bool,

    /// With --all-caches: mean bytes allocated between samples, bare or with
    /// K/KiB/M/MiB/G/GiB (64 to 1GiB; default 512KiB, Go's MemProfileRate).
    #[arg(long, requires = "all_caches", value_name = "BYTES", value_parser = parse_sample_bytes)]
    pub sample_bytes: Option<u64>,

    /// With --all-caches: run until killed; each `snapshot` line on stdin
    /// writes one gzipped pprof heap profile to fd 3, preceded by its length
    /// as 8 bytes little-endian (for `serve`).
    #[arg(long, requires = "all_caches", hide = true)]
    pub pprof_snapshots: bool,

    /// With --pages: only blocks of this order (2^N pages, 0 to 15).
    #[arg(long, requires = "pages", value_name = "N",
          value_parser = clap::value_parser!(u8).range(0..16))]
    pub order: Option<u8>,

    /// With --pages: gfp flags a block's allocation must carry, comma-separated,
    /// as the kernel prints them (e.g. __GFP_ACCOUNT); !NAME refuses a flag.
    #[arg(long, requires = "pages", value_delimiter = ',', value_name = "FLAGS")]
    pub gfp: Vec<String>,

    /// Live view, refreshed every --interval (plain periodic text when stdout is not a terminal).
    #[arg(long)]
    pub top: bool,

    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Refresh period of the live view and JSON snapshots (50ms to 1h).
    #[arg(long, value_parser = parse_interval, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,

    /// Only this process (thread group id, as the host sees it; a thread's id is
    /// taken as its process's); filtered in the kernel.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=PID_MAX_LIMIT))]
    pub pid: Option<u32>,

    /// Only processes whose command name contains this text.
    #[arg(long)]
    pub comm: Option<String>,

    /// Processes (or groups) shown in the text views, live snapshots and
    /// --metrics, at least 1; the final JSON report and the files hold all.
    #[arg(long, default_value_t = 10, value_parser = parse_at_least_one)]
    pub limit: usize,

    /// Stacks shown under each process in the text views (0: none); the final
    /// JSON report and the files hold all.
    #[arg(long, default_value_t = 3)]
    pub stacks: usize,

    /// Frames shown per kernel and per user stack in the live view, at least 1
    /// (the final report shows all).
    #[arg(long, default_value_t = 8, value_parser = parse_at_least_one)]
    pub frames: usize,

    /// Order of processes and stacks.
    #[arg(long, value_enum, default_value_t = SortKey::Outstanding)]
    pub sort: SortKey,

    /// Rows aggregate processes by this (the live view cycles it with `g`): a leak
    /// spread over many short-lived processes is one row under its comm, parent
    /// (at allocation time), cgroup, container, pod or stack.
    #[arg(long, value_enum, default_value_t = GroupBy::Process)]
    pub group_by: GroupBy,

    /// Window over which growth and allocation rates are computed.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub rate_window: Duration,

    /// Objects the kernel can track at once (1 to 67108864); allocations beyond it are
    /// counted as lost. Default: room for twice the selected cache's active objects in
    /// /proc/slabinfo, 65536 to 1048576 (its kernel memory is paid for the whole run).
    #[arg(long, value_name = "N", value_parser = max_objects_range())]
    pub max_objects: Option<u32>,

    /// Where kubelet's /var/log/pods and /var/log/containers are, to name the pod and
    /// container of a cgroup path ("/" on a node; reports show namespace/pod/container).
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub pods_root: PathBuf,

    /// Ring buffer size in MiB (1 to 1024, rounded up to a power of two). Kernel
    /// memory for the whole run (`cargo xtask bench` measures loss at the highest rate).
    /// Default 8; with --all-caches 2 at the default --sample-bytes (only samples
    /// cross it), up to 8 for denser sampling.
    #[arg(long, value_name = "MIB", value_parser = ringbuf_mib_range())]
    pub ringbuf_mib: Option<u32>,

    /// Capture stacks for every allocation. By default every object is counted
    /// exactly per (process, kernel call site), and full stacks of a random 1 in
    /// --stack-sample allocations split those counts into unbiased per-stack
    /// estimates with a 95% interval.
    #[arg(long, conflicts_with = "all_caches")]
    pub exact: bool,

    /// Also key the exact counts by each allocation's first user frames (a
    /// frame-pointer walk of 8 frames per selected allocation, ~400-700 ns each,
    /// about halving the throughput kept on a hot path): paths that share a
    /// syscall wrapper are then counted exactly instead of estimated.
    #[arg(long, conflicts_with_all = ["no_user_stacks", "all_caches"])]
    pub user_paths: bool,

    /// Without --exact: capture full stacks for a random 1 in N allocations (a power
    /// of two, 1 to 65536).
    #[arg(long, default_value_t = 64, value_parser = parse_stack_sample, value_name = "N",
          conflicts_with = "all_caches")]
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

    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT, e.g. 127.0.0.1:9464 or
    /// 0.0.0.0:9464), refreshed every --interval: outstanding objects/bytes, top processes
    /// (at most --limit), losses. The port is bound before anything is attached.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub metrics: Option<std::net::SocketAddr>,

    /// Kernel hooks: auto uses raw tracepoints where the kernel's BTF proves their
    /// argument layout (cheapest) and classic kmem tracepoints elsewhere.
    #[arg(long, value_enum, default_value_t = HookMode::Auto)]
    pub hooks: HookMode,

    /// Benchmark floor: attach empty programs on the same hooks and record nothing.
    #[arg(long, hide = true)]
    pub floor: bool,

    /// Benchmark floor of a recursion-immune tracer: --floor plus a second empty
    /// program wherever leaktrace runs a spare.
    #[arg(long, hide = true, conflicts_with = "floor")]
    pub floor_spares: bool,
}

/// The kernel's PID_MAX_LIMIT on 64-bit: no PID is larger.
const PID_MAX_LIMIT: i64 = 1 << 22;

/// Far above any slab's live object count, and the LIVE map's memory
/// (about 100 bytes an entry) stays in the gigabytes at most.
pub fn max_objects_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=1 << 26)
}

/// A count of rows or frames to show: 0 would show an empty table while
/// objects are outstanding, which reads as "nothing found".
fn parse_at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("0 would show an empty table however much is found; give 1 or more".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a whole number (1 or more)")),
    }
}

/// The ring buffer's size is a u32 in bytes, and a GiB already holds minutes of
/// events at the highest rates measured.
pub fn ringbuf_mib_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=1024)
}

fn parse_stack_sample(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n.is_power_of_two() && n <= 1 << 16 => Ok(n),
        Ok(n) if n.is_power_of_two() => Err(format!(
            "{n} is more than 65536; sampling that rarely would leave most sites on their first stack"
        )),
        _ => Err(format!(
            "'{text}' is not a power of two (1, 2, 4, ... 64 ... 65536)"
        )),
    }
}

/// Below 50ms a refresh costs more than the events it shows; above an hour the
/// live view and metrics are stale.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, Duration::from_millis(50), Duration::from_secs(3600))
}

pub fn parse_duration_in(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < min || d > max {
        return Err(format!(
            "'{text}' is out of range: use {} to {}",
            show_duration(min),
            show_duration(max)
        ));
    }
    Ok(d)
}

fn show_duration(d: Duration) -> String {
    match d.as_millis() {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// `IP:PORT` only: a host name would need a resolver, which on a sick node (or
/// for a typo like 999.1.1.1) can hang before anything is reported.
pub fn parse_listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("'{text}' is not IP:PORT; use e.g. 127.0.0.1:9464, 0.0.0.0:9464 or [::1]:9464")
    })
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
    fn sample_bytes() {
        assert_eq!(parse_sample_bytes("65536"), Ok(65536));
        assert_eq!(parse_sample_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_sample_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_sample_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_sample_bytes("1GiB"), Ok(1 << 30));
        for bad in [
            "",
            "0",
            "63",
            "2GiB",
            "1.5M",
            "-1",
            "10 Mb",
            "1e6",
            "99999999999999999999G",
        ] {
            assert!(
                parse_sample_bytes(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn all_caches_takes_a_sane_rate_and_nothing_else_to_trace() {
        let cli = Cli::try_parse_from(["leaktrace", "--all-caches"]).expect("default rate");
        assert_eq!(
            cli.trace.traced().expect("traced"),
            Traced::AllCaches {
                sample_bytes: 512 * 1024
            }
        );
        for bad in [
            &["leaktrace", "--all-caches", "--sample-bytes", "0"][..],
            &["leaktrace", "--all-caches", "--sample-bytes", "2G"],
            &["leaktrace", "--all-caches", "--sample-bytes", "-1"],
            &["leaktrace", "--all-caches", "--cache", "kmalloc-512"],
        ] {
            assert!(
                Cli::try_parse_from(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        for bad in [
            &[
                "leaktrace",
                "--sample-bytes",
                "4096",
                "--cache",
                "kmalloc-512",
            ][..],
            &["leaktrace", "--pprof-snapshots", "--percpu"],
            &["leaktrace", "--group-by", "cache", "--cache", "kmalloc-512"],
        ] {
            let refused = Cli::try_parse_from(bad).map_or(true, |c| c.trace.traced().is_err());
            assert!(refused, "{bad:?} should be refused");
        }
    }

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
        assert_eq!(parse_interval("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(
            parse_interval("10ms"),
            Err("'10ms' is out of range: use 50ms to 1h".to_string())
        );
        assert!(parse_interval("2h").is_err());
    }

    #[test]
    fn one_source_a_run() {
        let err = Cli::try_parse_from(["leaktrace", "--percpu", "--cache", "kmalloc-512"])
            .expect_err("two sources");
        assert!(err.to_string().contains("--percpu"), "{err}");
        let cli = Cli::try_parse_from(["leaktrace", "--percpu"]).expect("per-CPU alone");
        assert!(cli.trace.percpu && cli.trace.cache.is_none());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_stack_sample("65536"), Ok(65536));
        assert!(parse_stack_sample("131072").is_err());
        assert!(parse_stack_sample("0").is_err());
        assert!(parse_stack_sample("3").is_err());
        assert!(parse_listen_addr("999.1.1.1:80").is_err());
        assert!(parse_listen_addr("localhost:9464").is_err());
        assert!(parse_listen_addr("[::1]:9464").is_ok());
        for bad in [
            ["--max-objects", "0"],
            ["--max-objects", "100000000"],
            ["--ringbuf-mib", "0"],
            ["--ringbuf-mib", "4096"],
            ["--pid", "0"],
            ["--group-by", "bogus"],
            ["--limit", "0"],
            ["--frames", "0"],
        ] {
            let err = Cli::try_parse_from(["leaktrace", "--cache", "x", bad[0], bad[1]])
                .expect_err("out of range");
            assert!(err.to_string().contains(bad[0]), "{err}");
        }
    }

    #[test]
    fn cli_shape() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

/// `leaktrace doctor`'s arguments.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Window between the two /proc/slabinfo samples that measure cache growth.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub watch: Duration,

    /// Print the diagnosis as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Read /proc and /sys under this directory instead of / (fixture trees in tests).
    #[arg(long, hide = true, default_value = "/")]
    pub root: PathBuf,
}

// `leaktrace memcg`'s arguments.

/// A memcg is released within milliseconds of its last reference going away,
/// so below 100ms every removal would flash as a zombie; past a week the
/// question is answered by `dying` alone.
fn parse_zombie_after(text: &str) -> Result<Duration, String> {
    parse_duration_in(
        text,
        Duration::from_millis(100),
        Duration::from_secs(7 * 86400),
    )
}

#[derive(Debug, Args)]
pub struct MemcgArgs {
    /// Live view, refreshed every --interval (plain periodic text when stdout is not a terminal).
    #[arg(long, conflicts_with = "list")]
    pub top: bool,

    /// One-shot list of memory cgroups (with --duration: after tracing that long).
    #[arg(long)]
    pub list: bool,

    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    /// Refresh period of the live view and JSON snapshots (50ms to 1h).
    #[arg(long, value_parser = parse_interval, default_value = "1s", value_name = "DURATION")]
    pub interval: Duration,

    /// A removed memcg still not released after this long is a zombie (100ms to 168h).
    #[arg(long, value_parser = parse_zombie_after, default_value = "30s", value_name = "DURATION")]
    pub zombie_after: Duration,

    /// Window over which creation and release rates are computed.
    #[arg(long, value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub rate_window: Duration,

    /// Memory cgroups shown in the text views, at least 1.
    #[arg(long, default_value_t = 20, value_parser = parse_at_least_one)]
    pub limit: usize,

    /// Pinning stacks shown per dying memcg (0: none).
    #[arg(long, default_value_t = 3)]
    pub stacks: usize,

    /// Which memory controller to watch when both are mounted: 1 (a v1 'memory'
    /// hierarchy) or 2 (cgroup2); default: wherever the memory controller is bound.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2), value_name = "1|2")]
    pub cgroup_version: Option<u8>,

    /// Do not track charged slab objects (lifetimes only; no kmem tracepoints).
    #[arg(long)]
    pub no_pins: bool,

    /// Do not capture a kernel stack per charged allocation.
    #[arg(long)]
    pub no_kernel_stacks: bool,

    /// Charged objects the kernel can track at once (1 to 67108864); more are counted as lost.
    #[arg(long, default_value_t = 1 << 20, value_name = "N", value_parser = max_objects_range())]
    pub max_objects: u32,

    /// Ring buffer size in MiB (1 to 1024, rounded up to a power of two).
    #[arg(long, default_value_t = 8, value_name = "MIB", value_parser = ringbuf_mib_range())]
    pub ringbuf_mib: u32,

    /// One memcg's full story by id (the ID column): state, page counters,
    /// every file whose pages it holds and what releases them, creator and
    /// remover where traced. Implies a one-shot list unless --duration is given.
    #[arg(long, value_name = "ID", conflicts_with = "top")]
    pub why: Option<u64>,

    /// Machine output: one JSON object per interval (with --top) and a final report, one per line.
    #[arg(long)]
    pub json: bool,

    /// At exit, write the dying memcgs and what pins them as a gzipped pprof profile
    /// (`go tool pprof FILE`): sample types dying_memcgs, pinned_objects, pinned_space;
    /// stacks `created by COMM` -> `memcg PATH` -> the pinning kernel stacks
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_help = SERVE_AFTER_HELP)]
pub struct ServeArgs {
    /// Address to listen on (IP:PORT). Loopback by default: exposing profiles to
    /// the network is a decision, e.g. 0.0.0.0:9464 in the DaemonSet.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR", value_parser = parse_listen_addr)]
    pub listen: SocketAddr,

    /// File holding the bearer token that /debug/pprof/* requests must send
    /// (`Authorization: Bearer TOKEN`), e.g. a mounted Kubernetes Secret. Without it
    /// and without --client-ca every profile request is refused with 401.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Longest deep trace a request may ask for, in seconds (1 to 3600).
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_seconds: u64,

    /// Least time between the end of one deep trace and the start of the next, so a
    /// profiler scraping every 10 s cannot turn on-demand tracing into always-on.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_min_interval)]
    pub min_interval: Duration,

    /// The always-on reads (/proc/slabinfo walks partial slabs with interrupts off,
    /// memcg counts walk the cgroup tree) run at most once per this period; scrapes
    /// in between get the cached values (1s to 1h).
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = parse_refresh)]
    pub refresh: Duration,

    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Accept TLS client certificates signed by this CA (PEM); a verified client
    /// certificate authenticates like the token. Needs --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,

    /// Where kubelet's /var/log/pods and /var/log/containers are found, to name
    /// pods and containers from cgroup paths ("/" on a node; a fixture tree in tests).
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub pods_root: PathBuf,

    /// Do not keep the heap sampler running: /debug/pprof/kheap answers 503 and
    /// /metrics has no leaktrace_kheap_* series; /debug/pprof/kmem still traces on demand.
    #[arg(long)]
    pub no_continuous: bool,

    /// The heap sampler takes one allocation per this many bytes allocated, on
    /// average, over every slab cache (as Go's runtime.MemProfileRate; 64 B to 1 GiB,
    /// suffixes K/KiB, M/MiB). Each sample stands for 1/(1 - e^(-size/BYTES)) objects.
    #[arg(long, default_value = "512KiB", value_name = "BYTES", value_parser = parse_sample_bytes)]
    pub sample_bytes: u64,
}

/// `--sample-bytes`: a byte count, bare or with K/KiB/M/MiB/G/GiB (powers of
/// 1024), 64 B to 1 GiB, the sampler's own range (`leaktrace --all-caches
/// --sample-bytes`), so serve refuses what its child would.
pub fn parse_sample_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "k" | "KiB" | "KB" => 10,
        "M" | "MiB" | "MB" => 20,
        "G" | "GiB" | "GB" => 30,
        _ => {
            return Err(format!(
                "'{text}' is not a byte count; use e.g. 65536, 64KiB, 512KiB, 1MiB"
            ))
        }
    };
    let n: u64 = number.parse().map_err(|_| {
        format!("'{text}' is not a byte count; use e.g. 65536, 64KiB, 512KiB, 1MiB")
    })?;
    match n.checked_mul(1 << shift) {
        Some(b) if (64..=1 << 30).contains(&b) => Ok(b),
        _ => Err(format!("'{text}' is out of range: use 64 to 1GiB")),
    }
}

const SERVE_AFTER_HELP: &str = "\
Endpoints:
  /metrics                          Prometheus metrics, no authentication
  /debug/pprof/kheap[?seconds=N&cache=NAME]
                                    sampled heap profile of every slab cache since serve
                                    started, at once (the delta over N s with seconds=N);
                                    gzipped pprof, Go heap shape (token or client certificate)
  /debug/pprof/kmem?cache=NAME&seconds=N
                                    attach, trace NAME for N seconds, detach; gzipped pprof
                                    (token or client certificate required)
  /debug/pprof/memcg?seconds=N      the same for dying memcgs and what pins them
Examples:
  leaktrace serve --token-file /etc/leaktrace/token
  curl -H \"Authorization: Bearer $(cat token)\" -o kmem.pb.gz \\
      'http://127.0.0.1:9464/debug/pprof/kmem?cache=kmalloc-512&seconds=30'
  go tool pprof -top kmem.pb.gz";

fn parse_min_interval(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, Duration::from_secs(1), Duration::from_secs(86400))
}

fn parse_refresh(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, Duration::from_secs(1), Duration::from_secs(3600))
}

/// A traced cache's ring buffer in MiB when --ringbuf-mib is not given.
const DEFAULT_RINGBUF_MIB: u32 = 8;

/// The flags both tools spell alike, as the pipeline's [`RunOptions`].
fn run_options(
    top: bool,
    json: bool,
    duration: Option<Duration>,
    interval: Duration,
    ringbuf_mib: u32,
) -> RunOptions {
    RunOptions {
        top,
        json,
        duration,
        interval,
        ringbuf_mib,
    }
}

impl TraceArgs {
    /// What the run traces: a slab cache, per-CPU allocations or page blocks
    /// (clap keeps them exclusive). Error: none was asked for.
    pub fn traced(&self) -> anyhow::Result<Traced> {
        // clap's `requires` is not enforced on these flattened flags.
        if !self.all_caches && (self.sample_bytes.is_some() || self.pprof_snapshots) {
            anyhow::bail!("--sample-bytes and --pprof-snapshots go with --all-caches");
        }
        if !self.all_caches && self.group_by == GroupBy::Cache {
            anyhow::bail!(
                "--group-by cache goes with --all-caches (a traced run sees one cache or source)"
            );
        }
        if self.all_caches {
            return Ok(Traced::AllCaches {
                sample_bytes: self
                    .sample_bytes
                    .unwrap_or(crate::slab::kheap::DEFAULT_RATE),
            });
        }
        match (&self.cache, self.percpu, self.pages) {
            (Some(cache), ..) => Ok(Traced::Cache(cache.clone())),
            (None, true, _) => Ok(Traced::Percpu),
            (None, false, true) => Ok(Traced::Pages(PageOptions {
                order: self.order,
                gfp: self.gfp.clone(),
            })),
            (None, false, false) => anyhow::bail!(
                "no cache selected: use --cache NAME (e.g. --cache kmalloc-512; 'leaktrace caches' \
                 lists them), --percpu for per-CPU allocations or --pages for the page allocator's \
                 unmovable blocks"
            ),
        }
    }
}

impl From<TraceArgs> for TraceOptions {
    fn from(a: TraceArgs) -> Self {
        let ringbuf_mib = a.ringbuf_mib.unwrap_or(if a.all_caches {
            let rate = a.sample_bytes.unwrap_or(crate::slab::kheap::DEFAULT_RATE);
            crate::slab::kheap_source::ring_mib(rate)
        } else {
            DEFAULT_RINGBUF_MIB
        });
        TraceOptions {
            run: run_options(a.top, a.json, a.duration, a.interval, ringbuf_mib),
            pid: a.pid,
            comm: a.comm,
            limit: a.limit,
            stacks: a.stacks,
            frames: a.frames,
            sort: a.sort,
            group_by: a.group_by,
            rate_window: a.rate_window,
            max_objects: a.max_objects,
            pods_root: a.pods_root,
            exact: a.exact,
            stack_sample: a.stack_sample,
            user_paths: a.user_paths,
            no_kernel_stacks: a.no_kernel_stacks,
            no_user_stacks: a.no_user_stacks,
            pprof: a.pprof,
            pprof_snapshots: a.pprof_snapshots,
            folded: a.folded,
            flamegraph: a.flamegraph,
            weight: a.weight,
            metrics: a.metrics,
            hooks: a.hooks,
            floor: if a.floor_spares {
                Some(Floor::WithSpares)
            } else if a.floor {
                Some(Floor::Main)
            } else {
                None
            },
        }
    }
}

impl From<MemcgArgs> for MemcgOptions {
    fn from(a: MemcgArgs) -> Self {
        MemcgOptions {
            run: run_options(a.top, a.json, a.duration, a.interval, a.ringbuf_mib),
            list: a.list,
            zombie_after: a.zombie_after,
            rate_window: a.rate_window,
            limit: a.limit,
            stacks: a.stacks,
            cgroup_version: a.cgroup_version,
            no_pins: a.no_pins,
            no_kernel_stacks: a.no_kernel_stacks,
            max_objects: a.max_objects,
            why: a.why,
            pprof: a.pprof,
        }
    }
}

impl From<DoctorArgs> for DoctorOptions {
    fn from(a: DoctorArgs) -> Self {
        DoctorOptions {
            watch: a.watch,
            json: a.json,
            root: a.root,
        }
    }
}

impl From<ServeArgs> for ServeOptions {
    fn from(a: ServeArgs) -> Self {
        ServeOptions {
            listen: a.listen,
            token_file: a.token_file,
            max_seconds: a.max_seconds,
            min_interval: a.min_interval,
            refresh: a.refresh,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            client_ca: a.client_ca,
            pods_root: a.pods_root,
            continuous: !a.no_continuous,
            sample_bytes: a.sample_bytes,
        }
    }
}
