//! The kernel side of `leaktrace memcg`: load the embedded object with the
//! plan's config (`plan.rs`), attach its tracepoints and kprobes, and read
//! its counters.

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{KProbe, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use tracer_common::memcg::counter;

use crate::{
    bpf::load::{
        counter_sum, loaded, program, program_ids, raise_memlock_limit, take_counters, take_ring,
    },
    memcg::plan::Plan,
};

/// `leaktrace memcg`'s own eBPF object: its maps and programs only, none of
/// the slab tracer's.
pub(crate) static MEMCG_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace-memcg.bpf.o"));

/// Offsets for task->cgroups->subsys[memory_cgrp_id]->cgroup->kn->id.
pub struct Hooks {
    /// Dropping it detaches every program.
    _ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    pub prog_ids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub cgroup_events_lost: u64,
    pub charges_lost_ringbuf: u64,
    pub charges_lost_map_full: u64,
    pub uncharges_lost: u64,
    pub memcg_unknown: u64,
    pub percpu_lost: u64,
}

impl Hooks {
    pub fn attach(
        plan: &Plan,
        max_objects: u32,
        ringbuf_bytes: u32,
    ) -> Result<(Hooks, RingBuf<MapData>)> {
        raise_memlock_limit();
        let mut config = plan.config;
        config.wakeup_bytes = u64::from(ringbuf_bytes / 4);
        let mut ebpf = EbpfLoader::new()
            .override_global("MEMCG_CONFIG", &config, true)
            .map_max_entries("MEMCG_LIVE", max_objects)
            .map_max_entries("MEMCG_EVENTS", ringbuf_bytes)
            .load(MEMCG_OBJECT)
            .context("loading leaktrace's eBPF object (BPF ring buffers need Linux 5.8+)")?;
        let mut names: Vec<&'static str> = Vec::new();
        for &(name, system, event) in &plan.attachments {
            let prog: &mut TracePoint = program(&mut ebpf, name, "tracepoint")?;
            if !names.contains(&name) {
                loaded(name, prog.load())?;
                names.push(name);
            }
            prog.attach(system, event)
                .with_context(|| format!("attaching to tracepoint {system}:{event}"))?;
        }
        for &(name, event) in &plan.raw_attachments {
            let prog: &mut RawTracePoint = program(&mut ebpf, name, "raw tracepoint")?;
            loaded(name, prog.load())?;
            prog.attach(event)
                .with_context(|| format!("attaching to raw tracepoint {event}"))?;
            names.push(name);
        }
        for &(name, function) in &plan.kprobes {
            let prog: &mut KProbe = program(&mut ebpf, name, "kprobe")?;
            loaded(name, prog.load())?;
            prog.attach(function, 0)
                .with_context(|| format!("attaching kprobe to {function}"))?;
            names.push(name);
        }
        let ring = take_ring(&mut ebpf, "MEMCG_EVENTS")?;
        let counters = take_counters(&mut ebpf, "MEMCG_COUNTERS")?;
        let prog_ids = program_ids(&ebpf, &names);
        Ok((
            Hooks {
                _ebpf: ebpf,
                counters,
                prog_ids,
            },
            ring,
        ))
    }

    pub fn counters(&self) -> Counters {
        // A counter that cannot be read counts as 0: these only annotate the report.
        let sum = |i: u32| counter_sum(&self.counters, i).unwrap_or(0);
        Counters {
            cgroup_events_lost: sum(counter::CGROUP_LOST),
            charges_lost_ringbuf: sum(counter::CHARGE_LOST_RINGBUF),
            charges_lost_map_full: sum(counter::CHARGE_LOST_MAP_FULL),
            uncharges_lost: sum(counter::UNCHARGE_LOST),
            memcg_unknown: sum(counter::MEMCG_UNKNOWN),
            percpu_lost: sum(counter::PERCPU_LOST),
        }
    }
}
