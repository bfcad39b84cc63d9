//! Reading kernel memory from userspace without /proc/kcore: the `memcg_kread`
//! BPF program does `bpf_probe_read_kernel` for a batch of (address, length)
//! requests placed in an array map, run on demand with `BPF_PROG_TEST_RUN`
//! (raw tracepoint test runs exist since 5.10). Nothing is attached.
//!
//! Why: a dying memcg is on no BPF iterator (`bpf_iter__cgroup` skips dead
//! cgroups) and `/proc/kpagecgroup` reports the nearest online ancestor; the
//! drgn way (/proc/kcore) needs CONFIG_PROC_KCORE and data symbols in kallsyms
//! (CONFIG_KALLSYMS_ALL), which kernels such as this host's lack. Reads are
//! not atomic with the kernel's updates: a walk of live lists can race with a
//! free, which the walker checks for (see `walk.rs`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun},
    Ebpf, EbpfLoader,
};
use tracer_common::memcg::{KreadBatch, KREAD_SLOTS, KREAD_SLOT_BYTES};

use crate::probes::{raise_memlock_limit, verifier_context, BPF_OBJECT};

const PROGRAM: &str = "memcg_kread";

pub struct Kread {
    ebpf: Ebpf,
    map: Array<MapData, KreadBatch>,
    batch: Box<KreadBatch>,
    /// The reading task's `task_struct` (ours), from the first run.
    pub self_task: u64,
    /// Program runs and slots read so far, and the time spent in them.
    pub runs: u64,
    pub slots: u64,
    pub busy: Duration,
}

impl Kread {
    pub fn open() -> Result<Kread> {
        raise_memlock_limit();
        // The object carries every program's maps: keep the others tiny.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("LIVE", 1)
            .map_max_entries("EVENTS", 4096)
            .map_max_entries("SITES", 1)
            .map_max_entries("MEMCG_LIVE", 1)
            .map_max_entries("MEMCG_EVENTS", 4096)
            .load(BPF_OBJECT)
            .context("loading leaktrace's eBPF object for kernel reads")?;
        let prog: &mut RawTracePoint = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("eBPF object has no program {PROGRAM}"))?
            .try_into()
            .with_context(|| format!("{PROGRAM} is not a raw tracepoint program"))?;
        prog.load()
            .map_err(verifier_context)
            .with_context(|| format!("loading program {PROGRAM} into the kernel"))?;
        let map = Array::try_from(
            ebpf.take_map("MEMCG_KREAD")
                .context("eBPF object has no MEMCG_KREAD map")?,
        )
        .context("MEMCG_KREAD is not an array")?;
        let mut k = Kread {
            ebpf,
            map,
            batch: Box::new(KreadBatch::zeroed()),
            self_task: 0,
            runs: 0,
            slots: 0,
            busy: Duration::ZERO,
        };
        k.run_batch(0)?;
        if k.self_task == 0 {
            bail!("{PROGRAM} ran but returned no task pointer");
        }
        Ok(k)
    }

    fn run_batch(&mut self, n: usize) -> Result<()> {
        let t = Instant::now();
        self.batch.n = n as u32;
        self.map
            .set(0, *self.batch, 0)
            .context("writing kernel read requests")?;
        let prog: &RawTracePoint = self
            .ebpf
            .program(PROGRAM)
            .with_context(|| format!("eBPF object has no program {PROGRAM}"))?
            .try_into()
            .with_context(|| format!("{PROGRAM} is not a raw tracepoint program"))?;
        prog.test_run(RawTracePointRunOptions::new())
            .with_context(|| {
                format!(
                    "running {PROGRAM} (BPF_PROG_TEST_RUN of a raw tracepoint needs Linux 5.10+)"
                )
            })?;
        *self.batch = self.map.get(&0, 0).context("reading kernel read results")?;
        self.self_task = self.batch.task;
        self.runs += 1;
        self.slots += n as u64;
        self.busy += t.elapsed();
        Ok(())
    }

    /// Read each (address, length); None where the kernel refused (unmapped,
    /// or a user address). Lengths above a slot span consecutive slots.
    pub fn read(&mut self, reqs: &[(u64, usize)]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut out: Vec<Option<Vec<u8>>> = reqs
            .iter()
            .map(|&(_, len)| Some(Vec::with_capacity(len)))
            .collect();
        // (request index, address, length) per slot.
        let mut pieces: Vec<(usize, u64, usize)> = Vec::new();
        for (i, &(addr, len)) in reqs.iter().enumerate() {
            if addr == 0 || len == 0 {
                out[i] = if len == 0 { Some(Vec::new()) } else { None };
                continue;
            }
            let mut done = 0;
            while done < len {
                let n = (len - done).min(KREAD_SLOT_BYTES);
                pieces.push((i, addr.wrapping_add(done as u64), n));
                done += n;
            }
        }
        for chunk in pieces.chunks(KREAD_SLOTS) {
            for (slot, &(_, addr, len)) in chunk.iter().enumerate() {
                self.batch.addr[slot] = addr;
                self.batch.len[slot] = len as u32;
                self.batch.status[slot] = 0;
            }
            self.run_batch(chunk.len())?;
            for (slot, &(i, _, len)) in chunk.iter().enumerate() {
                if self.batch.status[slot] != 0 {
                    out[i] = None;
                } else if let Some(v) = out[i].as_mut() {
                    v.extend_from_slice(&self.batch.data[slot][..len]);
                }
            }
        }
        Ok(out)
    }

    /// One u64 per address (pointers, counters).
    pub fn read_u64s(&mut self, addrs: &[u64]) -> Result<Vec<Option<u64>>> {
        let reqs: Vec<(u64, usize)> = addrs.iter().map(|&a| (a, 8)).collect();
        Ok(self
            .read(&reqs)?
            .into_iter()
            .map(|b| b.and_then(|b| u64_at(&b, 0)))
            .collect())
    }
}

pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off + 8)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off + 4)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_fields() {
        let b = [1u8, 0, 0, 0, 2, 0, 0, 0, 9];
        assert_eq!(u64_at(&b, 0), Some(0x2_0000_0001));
        assert_eq!(u32_at(&b, 4), Some(2));
        assert_eq!(u64_at(&b, 4), None);
    }
}
