//! Loading the slab tracer's embedded eBPF object, attaching it, and reading
//! its counters. The object holds the slab tracer's maps and programs only
//! (`leaktrace memcg` has its own), so nothing here sizes another tool's maps.
//! Loading itself (memlock, map flags, verifier logs) is `bpf::load`, shared
//! with `leaktrace memcg`.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, RawTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use tracer_common::slab::{
    counter,
    programs::{name as page_programs, PROGRAMS},
    ZoomSlot,
};

use crate::bpf::load::{
    counter_sum, loaded, map_fd, map_memory, prog_info, program, program_ids, raise_memlock_limit,
    take_counters, take_ring, with_map_flags, AlignedObject, BPF_F_NO_PREALLOC,
};
use crate::slab::counters::KernelCounters;
use crate::slab::page_base;
use crate::slab::plan::{
    is_spare, live_overflow_entries, program_variant, spare_program, Attachment, Hook, LiveMap,
    Plan,
};

pub(crate) static SLAB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace-slab.bpf.o"));

pub struct Probes {
    /// Keeps programs and links alive; dropping it detaches.
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    /// Strata whose draw probability userspace raised (see `slab::zoom`).
    zoom: Array<MapData, ZoomSlot>,
    programs: Vec<&'static str>,
    /// Every map's fd, for its kernel memory; valid while the maps live (the
    /// ring buffer is handed out but lives as long as the run).
    map_fds: Vec<i32>,
    /// The kernel's program info counts recursion misses (`Plan::recursion_misses`).
    recursion_misses: bool,
}

/// A hint only where the failure points at one cause: a guess (say, "no ring
/// buffers" for an EPERM from a seccomp profile) sends the user the wrong way.
fn load_hint(error: &str) -> &'static str {
    if error.contains("Operation not permitted") {
        " (bpf() was refused: a container's seccomp profile or an LSM, or missing CAP_BPF)"
    } else if error.contains("`EVENTS`") {
        " (the ring buffer map: this kernel needs BPF ring buffers, Linux 5.8+)"
    } else {
        ""
    }
}

/// Empty programs in place of ours, for `cargo xtask bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// One empty program per planned hook.
    Main,
    /// And a second, distinct one where leaktrace runs a spare.
    WithSpares,
}

impl Probes {
    /// Load with the plan's configuration and attach every planned tracepoint.
    /// Returns the ring buffer separately so the event loop can own it.
    /// The page source's raw hooks are calibrated first ([`page_base`]);
    /// where that fails they become their classic twins, with a note in
    /// `plan.notes` (an error under `--hooks raw`).
    pub fn attach(
        plan: &mut Plan,
        max_objects: u32,
        ringbuf_bytes: u32,
        floor: Option<Floor>,
    ) -> Result<(Probes, RingBuf<MapData>)> {
        raise_memlock_limit();
        let object = match plan.live_map {
            LiveMap::Preallocated => AlignedObject::from(SLAB_OBJECT),
            LiveMap::OnDemand => with_map_flags(SLAB_OBJECT, "LIVE", BPF_F_NO_PREALLOC)?,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &plan.config, true)
            .map_max_entries(
                "LIVE",
                live_overflow_entries(max_objects, plan.config.live_bucket_mask),
            )
            .map_max_entries("LIVE_SLOTS", (plan.config.live_bucket_mask + 1) as u32)
            .map_max_entries("EVENTS", ringbuf_bytes)
            .load(object.bytes())
            .map_err(|e| {
                let e = anyhow::Error::new(e);
                // The cause (map name, errno) is in the source chain, not the top message.
                let hint = load_hint(&format!("{e:#}"));
                e.context(format!("loading leaktrace's eBPF programs{hint}"))
            })?;

        if plan
            .attachments
            .iter()
            .any(|a| a.program == page_programs::page_free_raw)
        {
            let size = plan.config.pages.struct_page_size;
            let live_slots = plan.config.live_bucket_mask != 0;
            if let Err(e) = page_base::calibrate(&mut ebpf, size, live_slots) {
                if plan.page_hooks_raw_required {
                    return Err(e.context("--hooks raw: the raw page hooks cannot be calibrated"));
                }
                page_base::to_classic(&mut plan.attachments);
                plan.notes.push(format!(
                    "pages: classic kmem:mm_page_alloc/mm_page_free hooks: the raw ones' \
                     struct page base could not be measured ({e:#})"
                ));
            }
        }

        let mut programs = load_btf_or_raw(&mut ebpf, plan, floor);
        for a in &plan.attachments {
            // The floor is what observing these hooks at all costs: one empty
            // program per hook, so the spares count as leaktrace's overhead;
            // `Floor::WithSpares` adds an empty program in each spare's place,
            // what the second program on a hook costs before it does anything.
            if floor == Some(Floor::Main) && is_spare(a.program) {
                continue;
            }
            let name = program_name(a, floor, plan.config.live_bucket_mask != 0);
            let first = !programs.contains(&name);
            let what = a.describe();
            match a.hook {
                Hook::Classic => {
                    let prog: &mut TracePoint = program(&mut ebpf, name, "tracepoint")?;
                    if first {
                        loaded(name, prog.load())?;
                    }
                    prog.attach(a.system, a.event)
                        .with_context(|| format!("attaching to tracepoint {what}"))?;
                }
                Hook::Raw => {
                    let prog: &mut RawTracePoint = program(&mut ebpf, name, "raw tracepoint")?;
                    if first {
                        loaded(name, prog.load())?;
                    }
                    prog.attach(a.event)
                        .with_context(|| format!("attaching to raw tracepoint {what}"))?;
                }
                // Loaded by `load_btf_or_raw`.
                Hook::Btf => {
                    let prog: &mut BtfTracePoint = program(&mut ebpf, name, "BTF tracepoint")?;
                    prog.attach()
                        .with_context(|| format!("attaching to BTF tracepoint {what}"))?;
                }
            }
            if first {
                programs.push(name);
            }
        }

        let map_fds = ebpf
            .maps()
            .filter_map(|(_, m)| map_fd(m))
            .collect::<Vec<_>>();
        let ring = take_ring(&mut ebpf, "EVENTS")?;
        let counters = take_counters(&mut ebpf, "COUNTERS")?;
        let zoom = Array::try_from(
            ebpf.take_map("ZOOM")
                .context("eBPF object has no ZOOM map")?,
        )
        .context("ZOOM is not an array")?;
        Ok((
            Probes {
                ebpf,
                counters,
                zoom,
                programs,
                map_fds,
                recursion_misses: plan.recursion_misses,
            },
            ring,
        ))
    }

    pub fn counters(&self) -> Result<KernelCounters> {
        let misses = self.recursion_misses();
        let sum = |index: u32| counter_sum(&self.counters, index);
        Ok(KernelCounters {
            allocs_matched: sum(counter::ALLOCS_MATCHED)?,
            allocs_lost_ringbuf: sum(counter::ALLOCS_LOST_RINGBUF)?,
            allocs_lost_map_full: sum(counter::ALLOCS_LOST_MAP_FULL)?,
            frees_matched: sum(counter::FREES_MATCHED)?,
            frees_lost_ringbuf: sum(counter::FREES_LOST_RINGBUF)?,
            kstack_failed: sum(counter::KSTACK_FAILED)?,
            ustack_failed: sum(counter::USTACK_FAILED)?,
            misaligned: sum(counter::MISALIGNED)?,
            zoom_drawn: sum(counter::ZOOM_DRAWN)?,
            zoom_stack_ns: sum(counter::ZOOM_STACK_NS)?,
            recursion_misses: misses.as_ref().map(|m| m.iter().map(|(_, n)| n).sum()),
            frees_maybe_missed: misses.as_ref().map(|m| missed_by_both(m, "free")),
            allocs_maybe_missed: misses.as_ref().map(|m| missed_by_both(m, "alloc")),
            map_bytes: map_memory(self.map_fds.iter().copied()),
        })
    }

    /// Writes zoom decisions into the kernel's table and returns the writes
    /// that failed (to be made again). The kernel reads each slot per
    /// allocation and records the level it used, so a write racing an
    /// allocation, or one that failed, changes how often a stratum is drawn,
    /// never what its records say.
    pub fn set_zoom(&mut self, writes: &[(u32, ZoomSlot)]) -> Vec<(u32, ZoomSlot)> {
        writes
            .iter()
            .copied()
            .filter(|&(slot, entry)| self.zoom.set(slot, entry, 0).is_err())
            .collect()
    }

    /// Kernel program ids, so tests and users can check nothing outlives us.
    pub fn program_ids(&self) -> Vec<u32> {
        program_ids(&self.ebpf, &self.programs)
    }

    /// Per program: runs the kernel skipped for recursion. None where
    /// bpf_prog_info has no such field (before 5.12, `KernelFacts::recursion_misses`):
    /// zero would read as "none missed".
    fn recursion_misses(&self) -> Option<Vec<(&'static str, u64)>> {
        if !self.recursion_misses {
            return None;
        }
        let mut out = Vec::new();
        for name in &self.programs {
            let fd = self.ebpf.program(name)?.fd().ok()?;
            out.push((*name, prog_info(fd.as_fd().as_raw_fd())?.recursion_misses));
        }
        Some(out)
    }
}

/// The program `Probes::attach` loads for `a` (floor: an empty one).
fn program_name(a: &Attachment, floor: Option<Floor>, live_slots: bool) -> &'static str {
    let spare = is_spare(a.program);
    match (floor, a.hook) {
        (None, _) => program_variant(a.program, live_slots),
        (Some(_), Hook::Classic) => "floor_tp",
        (Some(_), Hook::Raw) if spare => "floor_raw_spare",
        (Some(_), Hook::Raw) => "floor_raw",
        (Some(_), Hook::Btf) if spare => "floor_btf_spare",
        (Some(_), Hook::Btf) => "floor_btf",
    }
}

/// Loads the plan's BTF tracepoint programs (which the kernel binds to their
/// event at load) and returns their names. Where the kernel refuses one (no
/// vmlinux BTF, no `tp_btf` before 5.5, a verifier that will not take the
/// field load) every BTF hook becomes its raw twin instead, which reads the
/// same arguments through `bpf_probe_read_kernel`, with a note saying so.
fn load_btf_or_raw(ebpf: &mut Ebpf, plan: &mut Plan, floor: Option<Floor>) -> Vec<&'static str> {
    let live_slots = plan.config.live_bucket_mask != 0;
    let wanted: Vec<(&'static str, &'static str)> = plan
        .attachments
        .iter()
        .filter(|a| a.hook == Hook::Btf)
        .map(|a| (program_name(a, floor, live_slots), a.event))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let load = |ebpf: &mut Ebpf| -> Result<Vec<&'static str>> {
        let btf = Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")?;
        let mut done = Vec::new();
        for &(name, event) in &wanted {
            if done.contains(&name) {
                continue;
            }
            let prog: &mut BtfTracePoint = program(ebpf, name, "BTF tracepoint")?;
            loaded(name, prog.load(event, &btf))?;
            done.push(name);
        }
        Ok(done)
    };
    match load(ebpf) {
        Ok(done) => done,
        Err(e) => {
            for a in plan.attachments.iter_mut().filter(|a| a.hook == Hook::Btf) {
                a.hook = Hook::Raw;
                a.program = raw_twin(a.program);
            }
            plan.notes.push(format!(
                "raw tracepoints instead of BTF ones for {}: {e:#}",
                wanted.iter().map(|(_, e)| *e).collect::<Vec<_>>().join(",")
            ));
            Vec::new()
        }
    }
}

/// `kmem_cache_alloc_btf[_spare][_nocas]`'s raw tracepoint program.
fn raw_twin(btf_program: &'static str) -> &'static str {
    let raw = btf_program.replacen("_btf", "_raw", 1);
    PROGRAMS
        .iter()
        .flat_map(|p| [p.name, p.nocas])
        .find(|name| *name == raw)
        .unwrap_or(btf_program)
}

/// Events of the hooks whose program names contain `kind` that neither the
/// program nor its spare ran for; see [`KernelCounters::frees_maybe_missed`].
fn missed_by_both(misses: &[(&'static str, u64)], kind: &str) -> u64 {
    let of = |name: &str| misses.iter().find(|(n, _)| *n == name).map(|(_, m)| *m);
    misses
        .iter()
        .filter(|(name, _)| {
            let alloc = name.contains("alloc") || name.starts_with("kmalloc");
            let matches = if kind == "free" {
                name.contains("free")
            } else {
                alloc
            };
            matches && !is_spare(name)
        })
        .map(|&(name, m)| match spare_program(name).and_then(of) {
            Some(spare) => m.min(spare),
            None => m,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::{is_spare, program_variant, spare_program};

    /// Every program the plan can name, and its build without compare-and-swap,
    /// is in the object under that name (parsed without syscalls).
    #[test]
    fn every_planned_program_and_its_variant_is_in_the_object() {
        let object = super::AlignedObject::from(super::SLAB_OBJECT);
        let obj = aya_obj::Object::parse(object.bytes()).expect("parse the slab object");
        let planned = [
            "kmalloc",
            "kmem_cache_alloc",
            "kfree",
            "kmem_cache_free",
            "kmalloc_raw",
            "kmem_cache_alloc_raw",
            "kmem_cache_alloc_btf",
            "kfree_raw",
            "kmem_cache_free_raw",
            "percpu_alloc",
            "percpu_free",
            "percpu_free_raw",
            "page_alloc",
            "page_free",
            "page_alloc_raw",
            "page_free_raw",
            "page_kmalloc",
            "page_kmalloc_raw",
        ];
        // The page calibration keeps no live objects: no cmpxchg either way.
        for name in ["page_calibrate_raw", "page_calibrate_raw_nocas"] {
            assert!(obj.programs.contains_key(name), "{name} not in the object");
        }
        let spares = planned.iter().filter_map(|p| spare_program(p));
        for name in planned.into_iter().chain(spares) {
            for live_slots in [true, false] {
                let loaded = program_variant(name, live_slots);
                assert_eq!(loaded == name, live_slots, "{name} -> {loaded}");
                assert!(
                    obj.programs.contains_key(loaded),
                    "{loaded} not in the object"
                );
                // What a 5.10 verifier refuses even in dead code.
                let cmpxchg = atomic_count(&obj, loaded, |imm| imm == 0xf1);
                assert_eq!(cmpxchg > 0, live_slots, "{loaded}: {cmpxchg} cmpxchg");
                // The loaded name still pairs with its spare (loss accounting).
                if let Some(spare) = spare_program(name) {
                    assert_eq!(
                        spare_program(loaded),
                        Some(program_variant(spare, live_slots)),
                        "{loaded}"
                    );
                    assert!(is_spare(program_variant(spare, live_slots)));
                }
                // Nor any other atomic but the plain add 5.10 knows.
                if !live_slots {
                    assert_eq!(atomic_count(&obj, loaded, |imm| imm != 0), 0, "{loaded}");
                }
            }
        }
    }

    /// A BTF hook the kernel refuses falls back to the raw program of the
    /// same role and build.
    #[test]
    fn every_btf_program_has_a_raw_twin() {
        for (btf, raw) in [
            ("kmem_cache_alloc_btf", "kmem_cache_alloc_raw"),
            ("kmem_cache_alloc_btf_spare", "kmem_cache_alloc_raw_spare"),
            ("kmem_cache_alloc_btf_nocas", "kmem_cache_alloc_raw_nocas"),
            (
                "kmem_cache_alloc_btf_spare_nocas",
                "kmem_cache_alloc_raw_spare_nocas",
            ),
        ] {
            assert_eq!(super::raw_twin(btf), raw);
        }
    }

    /// `BPF_STX | BPF_DW | BPF_ATOMIC` instructions whose operation (`imm`:
    /// 0 add, 0xf1 cmpxchg, ...) passes `op`, in `program`'s own instructions
    /// or any subprogram of the object.
    fn atomic_count(obj: &aya_obj::Object, program: &str, op: impl Fn(i32) -> bool) -> usize {
        let key = obj.programs[program].function_key();
        let program_keys: std::collections::HashSet<_> =
            obj.programs.values().map(|p| p.function_key()).collect();
        obj.functions
            .iter()
            .filter(|(k, _)| **k == key || !program_keys.contains(*k))
            .flat_map(|(_, f)| &f.instructions)
            .filter(|i| i.code == 0xdb && op(i.imm))
            .count()
    }

    #[test]
    fn load_hints_only_where_the_cause_is_known() {
        let eperm = "map error: failed to create map `LIVE`: Operation not permitted (os error 1)";
        assert!(super::load_hint(eperm).contains("seccomp"));
        let ringbuf = "map error: failed to create map `EVENTS`: Invalid argument (os error 22)";
        assert!(super::load_hint(ringbuf).contains("ring buffers"));
        let live = "map error: failed to create map `LIVE`: Invalid argument (os error 22)";
        assert_eq!(super::load_hint(live), "");
    }
}
