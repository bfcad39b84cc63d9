//! Loading an embedded eBPF object, the same way for both tools: the memlock
//! limit, map flags aya cannot set, verifier logs, program info aya does not
//! expose, and what the maps cost. Every attachment is a file descriptor owned
//! by this process and nothing is pinned, so the kernel detaches everything
//! when we exit, however we exit.

use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use aya::programs::ProgramError;

/// aya's ProgramInfo does not expose recursion_misses, so ask BPF_OBJ_GET_INFO_BY_FD.
/// A kernel older than the field leaves it zero; callers that care check the version.
pub(crate) fn prog_info(fd: i32) -> Option<aya_obj::generated::bpf_prog_info> {
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

pub(crate) const BPF_F_NO_PREALLOC: u32 = 1;

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
