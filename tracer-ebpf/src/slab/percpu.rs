//! The per-CPU source (`leaktrace --percpu`): `percpu_alloc_percpu`
//! allocations through the slab object's record path; their frees are the
//! slab hooks' (`tp_free`, `raw_free`).

use aya_ebpf::{programs::TracePointContext, EbpfContext};
use tracer_common::slab::SOURCE_PERCPU;

use super::{config, read, record, Site};

/// The per-CPU source (`percpu:percpu_alloc_percpu`, classic: per-CPU
/// allocations are rare, so the perf record's cost does not matter, and its
/// fields are the same on every kernel while the raw arguments are not).
/// Every allocation is selected; its bytes are `size` times the possible
/// CPUs, the same unit on every kernel (`bytes_alloc`, 5.19+, adds the memcg
/// bookkeeping `pcpu_obj_full_size` charges). `call_site` and `gfp_flags`
/// exist from 5.19; before, the stratum is the process alone and the stack
/// names the caller.
#[inline(always)]
pub(crate) fn tp_percpu_alloc<const CAS: bool>(ctx: &TracePointContext) -> Option<()> {
    let l = &config().percpu;
    if l.possible_cpus == 0 {
        return None;
    }
    let size: u64 = read(ctx, l.size)?;
    let call_site = if l.call_site != 0 {
        read(ctx, l.call_site).unwrap_or(0)
    } else {
        0
    };
    let gfp = if l.gfp_flags != 0 {
        read::<u32>(ctx, l.gfp_flags).unwrap_or(0) as u64
    } else {
        0
    };
    let site = Site {
        call_site,
        ptr: read(ctx, l.ptr)?,
        bytes_req: size,
        bytes_alloc: size.wrapping_mul(l.possible_cpus),
        gfp,
        source: SOURCE_PERCPU,
    };
    // `--all-caches` samples per-CPU memory by bytes with the slab caches
    // (classic hook: no spare, and `bpf_prog_active` would skip it anyway).
    if config().kheap.rate != 0 {
        super::kheap::alloc::<CAS>(ctx.as_ptr(), site, 0, false);
        return Some(());
    }
    record::<CAS>(ctx.as_ptr(), &site, false)
}
