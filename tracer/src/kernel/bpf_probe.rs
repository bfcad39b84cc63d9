//! Tiny programs loaded only to ask the kernel what its verifier accepts and
//! what its `bpf_prog_info` holds, then closed: a capability is probed where
//! the kernel can say, not inferred from its release (enterprise kernels
//! backport BPF features). Also the program info aya does not expose, which
//! `bpf::load` reads for the tools' own programs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya_obj::generated::{bpf_cmd, bpf_prog_type};

/// One `struct bpf_insn`: opcode, dst (low nibble) and src (high nibble)
/// registers, offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// BPF_ALU64 | BPF_MOV | BPF_K: `dst = imm`.
const MOV64_IMM: u8 = 0xb7;
/// BPF_STX | BPF_MEM | BPF_DW: `*(u64 *)(dst + off) = src`.
const STX_DW: u8 = 0x7b;
/// BPF_STX | BPF_ATOMIC | BPF_DW, whose imm says which atomic operation.
const ATOMIC_DW: u8 = 0xdb;
/// BPF_CMPXCHG (0xf0 | BPF_FETCH): `r0 = atomic_cmpxchg(dst + off, r0, src)`.
const CMPXCHG: i32 = 0xf1;
const EXIT: u8 = 0x95;
const R0: u8 = 0;
const R1: u8 = 1;
const FP: u8 = 10;

/// `return 0`: loads on every kernel that has raw tracepoints (4.17).
const TRIVIAL: [Insn; 2] = [insn(MOV64_IMM, R0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)];

/// A compare-and-swap on a stack slot, the instruction the slab programs'
/// live slots use on map values. Kernels before 5.12 (5ffa25502b5a "bpf: Add
/// instructions for atomic_[cmp]xchg") refuse it: their verifier reads the
/// atomic opcode as BPF_XADD with reserved bits set.
const CMPXCHG_PROGRAM: [Insn; 6] = [
    insn(MOV64_IMM, R1, 0, 0, 0),
    insn(STX_DW, FP, R1, -8, 0),
    insn(MOV64_IMM, R0, 0, 0, 0),
    insn(ATOMIC_DW, FP, R1, -8, CMPXCHG),
    insn(MOV64_IMM, R0, 0, 0, 0),
    insn(EXIT, 0, 0, 0, 0),
];

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel
/// reads the rest as zero.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// Loads `insns` as a raw tracepoint program, the type the slab tracer's
/// raw hooks use; None when the kernel refuses it.
fn load_raw_tracepoint(insns: &[Insn]) -> Option<OwnedFd> {
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT as u32,
        insn_cnt: u32::try_from(insns.len()).ok()?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: attr, the instructions and the license outlive the call, which
    // reads at most size_of::<ProgLoadAttr>() bytes of attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_LOAD as libc::c_long,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the verifier accepts BPF compare-and-swap in a raw tracepoint program.
pub fn cmpxchg() -> bool {
    load_raw_tracepoint(&CMPXCHG_PROGRAM).is_some()
}

/// Whether this kernel's `bpf_prog_info` has `recursion_misses`, asked of a
/// loaded program: the `info_len` the kernel writes back is the size of its
/// own struct. None: no program could be loaded to ask.
pub fn prog_info_has_recursion_misses() -> Option<bool> {
    let fd = load_raw_tracepoint(&TRIVIAL)?;
    let (_, len) = prog_info_len(fd.as_raw_fd())?;
    let end = std::mem::offset_of!(aya_obj::generated::bpf_prog_info, recursion_misses)
        + std::mem::size_of::<u64>();
    Some(len as usize >= end)
}

/// The program's info and how many of its bytes the kernel filled: it writes
/// back `min(ours, its own sizeof(struct bpf_prog_info))` as `info_len`
/// (bpf_prog_get_info_by_fd), so a field ending past that length is one this
/// kernel does not have.
pub fn prog_info_len(fd: i32) -> Option<(aya_obj::generated::bpf_prog_info, u32)> {
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
    // The UAPI's numbers, as aya's own bindings carry them.
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long =
        aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long;
    // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoAttr>(),
        )
    };
    (rc == 0).then_some((info, attr.info_len))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::kernel::facts::{read_release, release_at_least};

    /// From the release that brought them (5.12) every kernel has both, so
    /// the probes must find them there (as root: a plain user cannot load
    /// programs). Older releases may have them backported: not asserted.
    #[test]
    fn probes_find_what_the_release_has() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let release = read_release(Path::new("/")).unwrap_or_default();
        if release_at_least(&release, 5, 12) {
            assert!(super::cmpxchg(), "kernel {release}");
            assert_eq!(
                super::prog_info_has_recursion_misses(),
                Some(true),
                "kernel {release}"
            );
        }
    }
}
