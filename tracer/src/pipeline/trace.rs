//! The slab tracer's run: preflight, plan (the source: `trace_source.rs`) and attach, then the shared loop
//! (`event_loop.rs`) drives the session (`slab::session`: ring buffer ->
//! decoder -> aggregator -> report) and shows each report (TUI, text or
//! JSON, metrics), until Ctrl-C, SIGTERM or --duration; then detach, write
//! the files and print the final report.

use std::path::Path;

use anyhow::Result;

use crate::{
    kernel::btf::Btf,
    kernel::facts::KernelFacts,
    kernel::features,
    kernel::own_memory,
    kernel::procinfo::TracedProcess,
    kernel::tracefs::Tracefs,
    output,
    pipeline::event_loop::{self, Signals},
    pipeline::trace_options::{TraceOptions, Traced},
    pipeline::{trace_source, trace_tool},
    slab::aggregator::rows::SnapshotOptions,
    slab::plan,
    slab::probes::Probes,
    slab::report::MemorySource,
    slab::session::{self, Session, Setup},
    slab::zoom,
    symbolize::Symbolizer,
};

/// The slab tracer on `traced` (a cache by name or alias of /proc/slabinfo,
/// per-CPU allocations or the page allocator's unmovable blocks), to the
/// end. Errors: not root, an unknown cache or page filter, outputs or --pid
/// that fail their checks, a kernel the plan cannot attach to, a closed
/// stdout.
pub async fn run(args: TraceOptions, traced: &Traced) -> Result<()> {
    let root = Path::new("/");
    features::require_root()?;
    let checked = preflight(&args, root).await?;
    // What the kernel filters on: a thread id given to --pid is its process.
    let args = TraceOptions {
        pid: checked.traced.as_ref().map(|t| t.pid),
        ..args
    };
    let tracefs = Tracefs::locate_or_mount()?;
    // Without BTF the raw tracepoints' argument layout cannot be checked; the
    // classic tracepoints still work.
    let btf = Btf::from_sys_fs().ok();
    let facts = KernelFacts::probe(root, Some(tracefs.root()), btf.as_ref());
    let ringbuf_bytes = crate::pipeline::event_loop::ringbuf_bytes(args.run.ringbuf_mib)?;
    let zoom_policy = zoom::Policy::default();
    let options = plan::PlanOptions {
        pid: args.pid,
        kernel_stacks: !args.no_kernel_stacks,
        user_stacks: !args.no_user_stacks,
        hooks: args.hooks,
        stack_sample: if args.exact { 1 } else { args.stack_sample },
        on_demand_maps: facts.on_demand_maps,
    };
    let finish = |max_objects, active_objs| plan::Finish {
        ringbuf_bytes,
        user_paths: args.user_paths && !args.no_user_stacks,
        max_objects,
        active_objs,
        zoom_window_cap: zoom_policy.kernel_window_cap(),
    };
    let trace_source::Planned {
        mut plan,
        name,
        slab_baseline,
        aliases,
        settle,
        kheap,
        source,
    } = trace_source::plan(
        traced,
        &trace_source::Inputs {
            tracefs: &tracefs,
            btf: btf.as_ref(),
            root,
            facts: &facts,
            options,
            finish: &finish,
            max_objects: args.max_objects,
        },
    )?;
    let max_objects = plan.max_objects;
    // The parsed BTF (~17 MB on 6.18) has done its work: freed before kallsyms
    // is loaded, its pages are reused instead of pinned under it in the heap.
    let have_btf = btf.is_some();
    drop(btf);
    // Before attaching: parsing kallsyms later would stall the first drains.
    let mut symbols = Symbolizer::new();
    symbols.warm_kernel();
    own_memory::return_freed_memory();
    let (mut probes, ring) = Probes::attach(&mut plan, max_objects, ringbuf_bytes, args.floor)?;

    if !(args.exact || args.no_kernel_stacks && args.no_user_stacks || kheap.is_some()) {
        plan.notes
            .push(session::sampling_note(&plan.config, args.stack_sample));
    }
    for note in &plan.notes {
        eprintln!("leaktrace: {note}");
    }
    // The per-CPU source is classic by choice, not for want of BTF.
    let btf_note = have_btf || source == MemorySource::Percpu;
    eprintln!(
        "leaktrace: {}",
        plan::hooks_note(&facts.features, &plan.attachments, btf_note)
    );
    eprintln!(
        "leaktrace: attached to {} (bpf prog ids {:?}); Ctrl-C to stop",
        source.describe(&plan.cache),
        probes.program_ids()
    );

    let mut state = Session::new(Setup {
        config: &plan.config,
        max_objects,
        rate_window: args.rate_window,
        zoom_policy,
        symbols,
        cgroup_mount: plan.cgroup_mount.clone(),
        pods_root: args.pods_root.clone(),
        slab_baseline,
        vmap_stack: facts.vmap_stack,
        cache: name,
        source,
        aliases,
        snapshot_opts: SnapshotOptions {
            sort: args.sort,
            limit: args.limit,
            stacks: args.stacks,
            comm: args.comm.clone(),
            pid: args.pid,
        },
        traced: checked.traced,
        group_by: args.group_by,
        settle,
        kheap,
    });

    let outcome = trace_tool::run_loop(
        &args,
        ring,
        &mut probes,
        &mut state,
        checked.metrics,
        checked.signals,
        checked.snapshots,
    )
    .await;
    // Any end signal from here on is a second one: it ends a wait for a FIFO's reader.
    let ended = event_loop::EndMark::now();
    // Counters first, then detach, then render: the report states what the
    // kernel side saw up to the moment it stopped.
    let counters = probes.counters().unwrap_or_default();
    drop(probes);
    // A loop that failed (a closed stdout, a terminal error) still leaves
    // everything counted so far: the files and the report get it, then the
    // loop's error is what the run exits with.
    let (final_report, failed) = match outcome {
        Ok(mut ring) => (state.finish(Some(&mut ring), counters), None),
        Err(e) => (state.finish(None, counters), Some(e)),
    };
    let cancelled = || ended.passed();
    let patience = output::files::Patience::new(&cancelled);
    let emitted = trace_tool::emit_final(&args, &checked.outputs, &final_report, &patience);
    match failed {
        Some(e) => Err(e),
        None => emitted,
    }
}

/// What the command line names outside the kernel, checked before anything is
/// attached: an hour of tracing must not end in "no such directory".
struct Preflight {
    outputs: output::Outputs,
    metrics: Option<tokio::net::TcpListener>,
    traced: Option<TracedProcess>,
    signals: Signals,
    /// `--pprof-snapshots`: fd 3, where each requested profile goes.
    snapshots: Option<std::fs::File>,
}

async fn preflight(args: &TraceOptions, root: &Path) -> Result<Preflight> {
    let traced = args
        .pid
        .map(|pid| TracedProcess::check(root, pid))
        .transpose()?;
    let outputs = output::Outputs::check(&output::OutputFiles {
        pprof: args.pprof.as_deref(),
        folded: args.folded.as_deref(),
        flamegraph: args.flamegraph.as_deref(),
        weight: args.weight,
    })?;
    let metrics = match args.metrics {
        Some(addr) => Some(output::metrics::bind(addr).await?),
        None => None,
    };
    let snapshots = if args.pprof_snapshots {
        Some(profile_fd()?)
    } else {
        None
    };
    Ok(Preflight {
        outputs,
        metrics,
        traced,
        snapshots,
        signals: Signals::install()?,
    })
}

/// fd 3, where `--pprof-snapshots` writes: checked open and writable before
/// anything is attached.
fn profile_fd() -> Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_GETFL) and fstat only read the descriptor's state.
    let flags = unsafe { libc::fcntl(3, libc::F_GETFL) };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let kind = if unsafe { libc::fstat(3, &mut st) } == 0 {
        st.st_mode & libc::S_IFMT
    } else {
        0
    };
    // A pipe, socket or file the parent handed over; not one of the
    // runtime's own descriptors (epoll, eventfd: anonymous inodes), which
    // take fd 3 when the parent passed none.
    let handed_over = [libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFREG].contains(&kind);
    if flags < 0 || flags & libc::O_ACCMODE == libc::O_RDONLY || !handed_over {
        anyhow::bail!(
            "--pprof-snapshots writes profiles to fd 3, which is not a pipe, socket or file \
             open for writing (start leaktrace with one there)"
        );
    }
    // SAFETY: fd 3 is a pipe, socket or file the parent opened for us
    // (checked above); nothing else in this process uses it.
    Ok(unsafe { std::fs::File::from_raw_fd(3) })
}
