//! Loading the slab tracer's embedded eBPF object, attaching it, and reading
//! its counters. The object holds the slab tracer's maps and programs only
//! (`leaktrace memcg` has its own), so nothing here sizes another tool's maps.
//!
//! Every attachment is a perf-event file descriptor owned by this process, and
//! nothing is pinned, so the kernel detaches everything when we exit, however we
//! exit (Ctrl-C, SIGTERM, a panic or SIGKILL).

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use tracer_common::counter;

use crate::plan::{Hook, LiveMap, Plan};

pub(crate) static SLAB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace-slab.bpf.o"));

pub struct Probes {
    /// Keeps programs and links alive; dropping it detaches.
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    programs: Vec<&'static str>,
    /// Every map's fd, for its kernel memory; valid while the maps live (the
    /// ring buffer is handed out but lives as long as the run).
    map_fds: Vec<i32>,
}

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

impl Probes {
    /// Load with the plan's configuration and attach every planned tracepoint.
    /// Returns the ring buffer separately so the event loop can own it.
    pub fn attach(
        plan: &Plan,
        max_objects: u32,
        ringbuf_bytes: u32,
        floor: bool,
    ) -> Result<(Probes, RingBuf<MapData>)> {
        raise_memlock_limit();
        let object = match plan.live_map {
            LiveMap::Preallocated => AlignedObject::from(SLAB_OBJECT),
            LiveMap::OnDemand => with_map_flags(SLAB_OBJECT, "LIVE", BPF_F_NO_PREALLOC)?,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &plan.config, true)
            .map_max_entries("LIVE", max_objects)
            .map_max_entries("EVENTS", ringbuf_bytes)
            .load(object.bytes())
            .map_err(|e| {
                let e = anyhow::Error::new(e);
                // The cause (map name, errno) is in the source chain, not the top message.
                let hint = load_hint(&format!("{e:#}"));
                e.context(format!("loading leaktrace's eBPF programs{hint}"))
            })?;

        let mut programs: Vec<&'static str> = Vec::new();
        for a in &plan.attachments {
            // The floor is what observing these hooks at all costs: one empty
            // program per hook, so the spares count as leaktrace's overhead.
            if floor && crate::plan::is_spare(a.program) {
                continue;
            }
            // The floor runs empty programs on exactly the planned hooks.
            let name = match (floor, a.hook) {
                (false, _) => a.program,
                (true, Hook::Classic) => "floor_tp",
                (true, Hook::Raw) => "floor_raw",
            };
            let first = !programs.contains(&name);
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("eBPF object has no program {name}"))?;
            let what = a.describe();
            match a.hook {
                Hook::Classic => {
                    let prog: &mut TracePoint = prog
                        .try_into()
                        .with_context(|| format!("{name} is not a tracepoint program"))?;
                    if first {
                        prog.load()
                            .map_err(verifier_context)
                            .with_context(|| format!("loading program {name} into the kernel"))?;
                    }
                    prog.attach("kmem", a.event)
                        .with_context(|| format!("attaching to tracepoint {what}"))?;
                }
                Hook::Raw => {
                    let prog: &mut RawTracePoint = prog
                        .try_into()
                        .with_context(|| format!("{name} is not a raw tracepoint program"))?;
                    if first {
                        prog.load()
                            .map_err(verifier_context)
                            .with_context(|| format!("loading program {name} into the kernel"))?;
                    }
                    prog.attach(a.event)
                        .with_context(|| format!("attaching to raw tracepoint {what}"))?;
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
        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .context("eBPF object has no EVENTS map")?,
        )
        .context("EVENTS is not a ring buffer")?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .context("eBPF object has no COUNTERS map")?,
        )
        .context("COUNTERS is not a per-CPU array")?;
        Ok((
            Probes {
                ebpf,
                counters,
                programs,
                map_fds,
            },
            ring,
        ))
    }

    pub fn counters(&self) -> Result<KernelCounters> {
        let misses = self.recursion_misses();
        let sum = |index: u32| -> Result<u64> {
            let values = self
                .counters
                .get(&index, 0)
                .with_context(|| format!("reading kernel counter {index}"))?;
            Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(KernelCounters {
            allocs_matched: sum(counter::ALLOCS_MATCHED)?,
            allocs_lost_ringbuf: sum(counter::ALLOCS_LOST_RINGBUF)?,
            allocs_lost_map_full: sum(counter::ALLOCS_LOST_MAP_FULL)?,
            frees_matched: sum(counter::FREES_MATCHED)?,
            frees_lost_ringbuf: sum(counter::FREES_LOST_RINGBUF)?,
            kstack_failed: sum(counter::KSTACK_FAILED)?,
            ustack_failed: sum(counter::USTACK_FAILED)?,
            misaligned: sum(counter::MISALIGNED)?,
            recursion_misses: misses.as_ref().map(|m| m.iter().map(|(_, n)| n).sum()),
            frees_maybe_missed: misses.as_ref().map(|m| missed_by_both(m, "free")),
            allocs_maybe_missed: misses.as_ref().map(|m| missed_by_both(m, "alloc")),
            map_bytes: map_memory(self.map_fds.iter().copied()),
        })
    }

    /// Kernel program ids, so tests and users can check nothing outlives us.
    pub fn program_ids(&self) -> Vec<u32> {
        self.programs
            .iter()
            .filter_map(|name| Some(self.ebpf.program(name)?.info().ok()?.id()))
            .collect()
    }

    /// Per program: runs the kernel skipped for recursion. None before 5.12,
    /// whose bpf_prog_info has no such field (zero would read as "none missed").
    fn recursion_misses(&self) -> Option<Vec<(&'static str, u64)>> {
        if !crate::kernel::features::kernel_at_least(5, 12) {
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
            matches && !crate::plan::is_spare(name)
        })
        .map(
            |&(name, m)| match crate::plan::spare_program(name).and_then(of) {
                Some(spare) => m.min(spare),
                None => m,
            },
        )
        .sum()
}

/// aya's ProgramInfo does not expose recursion_misses, so ask BPF_OBJ_GET_INFO_BY_FD.
/// A kernel older than the field leaves it zero; callers that care check the version.
fn prog_info(fd: i32) -> Option<aya_obj::generated::bpf_prog_info> {
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is plain data; zero is a valid value for every field.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoAttr>(),
        )
    };
    (rc == 0).then_some(info)
}

const BPF_F_NO_PREALLOC: u32 = 1;

fn map_fd(map: &aya::maps::Map) -> Option<i32> {
    use aya::maps::Map;
    let data = match map {
        Map::HashMap(d) | Map::PerCpuArray(d) | Map::RingBuf(d) | Map::Array(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// An ELF image in 8-byte-aligned memory, as the object parser requires.
pub(crate) struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the u64 buffer holds at least `len` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl From<&[u8]> for AlignedObject {
    fn from(data: &[u8]) -> Self {
        let mut obj = AlignedObject {
            words: vec![0u64; data.len().div_ceil(8)],
            len: data.len(),
        };
        obj.bytes_mut().copy_from_slice(data);
        obj
    }
}

/// The object with map `name`'s flags set to `flags`: aya takes map flags
/// from the object only. Legacy `maps`-section definitions (what aya-ebpf's
/// `#[map]` emits) are `struct bpf_map_def { type, key_size, value_size,
/// max_entries, map_flags, ... }` of u32s, so the flags sit 16 bytes in.
pub(crate) fn with_map_flags(elf: &[u8], name: &str, flags: u32) -> Result<AlignedObject> {
    use object::{Object, ObjectSection, ObjectSymbol};
    const MAP_FLAGS_OFFSET: u64 = 16;
    let mut obj = AlignedObject::from(elf);
    let file = object::File::parse(elf).context("parsing the embedded eBPF object")?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .with_context(|| format!("the eBPF object has no map symbol {name}"))?;
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .with_context(|| format!("map {name} has no section"))?;
    if section.name() != Ok("maps") {
        anyhow::bail!("map {name} is not a legacy `maps` definition; cannot set its flags");
    }
    let (start, size) = section
        .file_range()
        .with_context(|| format!("map {name}'s section has no file data"))?;
    let at = sym.address() + MAP_FLAGS_OFFSET;
    if at + 4 > size {
        anyhow::bail!("map {name}'s definition is shorter than struct bpf_map_def");
    }
    let off = usize::try_from(start + at).context("map definition offset")?;
    obj.bytes_mut()[off..off + 4].copy_from_slice(&flags.to_le_bytes());
    Ok(obj)
}

/// Bytes the kernel charges for the maps behind `fds` (`memlock:` in each
/// fd's /proc/self/fdinfo), the figure bpftool shows as bytes_memlock.
pub(crate) fn map_memory(fds: impl Iterator<Item = i32>) -> u64 {
    fds.filter_map(|fd| std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (64 KiB by default), far
/// less than our live-object map. Failure is not fatal: newer kernels ignore it.
pub(crate) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit call with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Verifier rejections carry a log that is the only useful part of the error.
pub(crate) fn verifier_context(err: ProgramError) -> anyhow::Error {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            anyhow::anyhow!(
                "the kernel's verifier rejected the program: {io_error}\n{verifier_log}"
            )
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
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
