//! Loading an embedded eBPF object, the same way for both tools: the memlock
//! limit, map flags aya cannot set, verifier logs, program info aya does not
//! expose, and what the maps cost. Every attachment is a file descriptor owned
//! by this process and nothing is pinned, so the kernel detaches everything
//! when we exit, however we exit.

use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{Program, ProgramError},
    Ebpf,
};

/// aya's ProgramInfo does not expose recursion_misses, so ask BPF_OBJ_GET_INFO_BY_FD.
/// A kernel older than the field leaves it zero; callers that care check
/// `KernelFacts::recursion_misses`.
pub(crate) fn prog_info(fd: i32) -> Option<aya_obj::generated::bpf_prog_info> {
    crate::kernel::bpf_probe::prog_info_len(fd).map(|(info, _)| info)
}

pub(crate) const BPF_F_NO_PREALLOC: u32 = aya_obj::generated::BPF_F_NO_PREALLOC;

pub(crate) fn map_fd(map: &aya::maps::Map) -> Option<i32> {
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
    pub(crate) fn bytes(&self) -> &[u8] {
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

/// Program `name` of a loaded object as the kind the caller attaches (`kind`
/// says which in the error: "tracepoint", "raw tracepoint", "kprobe").
pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str, kind: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not a {kind} program"))
}

/// A program's `load()` result, with the verifier's log where it refused.
pub(crate) fn loaded(name: &str, result: Result<(), ProgramError>) -> Result<()> {
    result
        .map_err(verifier_context)
        .with_context(|| format!("loading program {name} into the kernel"))
}

/// The ring buffer map `name`, taken out of the object so the event loop can own it.
pub(crate) fn take_ring(ebpf: &mut Ebpf, name: &str) -> Result<RingBuf<MapData>> {
    RingBuf::try_from(
        ebpf.take_map(name)
            .with_context(|| format!("eBPF object has no {name} map"))?,
    )
    .with_context(|| format!("{name} is not a ring buffer"))
}

/// The per-CPU counter array `name`, taken out of the object.
pub(crate) fn take_counters(ebpf: &mut Ebpf, name: &str) -> Result<PerCpuArray<MapData, u64>> {
    PerCpuArray::try_from(
        ebpf.take_map(name)
            .with_context(|| format!("eBPF object has no {name} map"))?,
    )
    .with_context(|| format!("{name} is not a per-CPU array"))
}

/// Counter `index` summed over the CPUs (each CPU's slot wraps on its own).
pub(crate) fn counter_sum(counters: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64> {
    let values = counters
        .get(&index, 0)
        .with_context(|| format!("reading kernel counter {index}"))?;
    Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
}

/// Kernel ids of the named programs, so tests and users can check nothing outlives us.
pub(crate) fn program_ids(ebpf: &Ebpf, names: &[&str]) -> Vec<u32> {
    names
        .iter()
        .filter_map(|name| Some(ebpf.program(name)?.info().ok()?.id()))
        .collect()
}
