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
use tracer_common::memcg::{KreadBatch, KREAD_FOLLOW, KREAD_SLOTS, KREAD_SLOT_BYTES};

use super::hooks::MEMCG_OBJECT;
use crate::bpf::load::{loaded, program, raise_memlock_limit};

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
        // Only the kread program and its map are used: keep the tracking maps tiny.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("MEMCG_LIVE", 1)
            .map_max_entries("MEMCG_EVENTS", 4096)
            .load(MEMCG_OBJECT)
            .context("loading leaktrace's eBPF object for kernel reads")?;
        let prog: &mut RawTracePoint = program(&mut ebpf, PROGRAM, "raw tracepoint")?;
        loaded(PROGRAM, prog.load())?;
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
                self.batch.set_read(slot, addr, len as u32);
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

    /// Whole `next` chains of linked lists, read in the kernel up to
    /// KREAD_FOLLOW steps per slot per run: for each (first `next` field
    /// address, head), every node address after it up to (not including) the
    /// head. A chain that breaks (failed read, a value that is no kernel
    /// address, or longer than `max`) is returned as far as read, with false.
    pub fn follow(&mut self, starts: &[(u64, u64)], max: usize) -> Result<Vec<(Vec<u64>, bool)>> {
        let mut out: Vec<(Vec<u64>, bool)> = vec![(Vec::new(), true); starts.len()];
        // (index, address to read next)
        let mut todo: Vec<(usize, u64)> = starts.iter().map(|&(a, _)| a).enumerate().collect();
        while !todo.is_empty() {
            let mut next = Vec::new();
            for chunk in todo.chunks(KREAD_SLOTS) {
                for (slot, &(i, addr)) in chunk.iter().enumerate() {
                    self.batch.set_follow(slot, addr, starts[i].1);
                }
                self.run_batch(chunk.len())?;
                for (slot, &(i, _)) in chunk.iter().enumerate() {
                    let got = usize::try_from(self.batch.status[slot]).unwrap_or(0);
                    let (nodes, ok) = &mut out[i];
                    let mut last = None;
                    let mut ended = false;
                    for j in 0..got.min(KREAD_FOLLOW) {
                        let v = u64_at(&self.batch.data[slot], j * 8).unwrap_or(0);
                        if v == starts[i].1 {
                            ended = true;
                            break;
                        }
                        if v >> 56 != 0xff {
                            // A poisoned or NULL head (a list never used, e.g.
                            // the unevictable one on 6.x) is an empty list;
                            // anywhere later the chain broke under us.
                            if !(nodes.is_empty() && j == 0 && is_poison_or_null(v)) {
                                *ok = false;
                            }
                            ended = true;
                            break;
                        }
                        nodes.push(v);
                        last = Some(v);
                    }
                    if ended {
                        continue;
                    }
                    match last {
                        // A full slot: go on from the last node read.
                        Some(v) if got == KREAD_FOLLOW && nodes.len() < max => next.push((i, v)),
                        _ => *ok = false,
                    }
                }
            }
            todo = next;
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

/// NULL or a list poison value (`LIST_POISON1/2` = POISON_POINTER_DELTA +
/// 0x100/0x122; the delta is 0xdead000000000000 on x86-64 and 0 or
/// 0xdead000000000000 on arm64).
fn is_poison_or_null(v: u64) -> bool {
    let low = v & 0xffff_ffff;
    v == 0 || ((v >> 32 == 0xdead_0000 || v >> 32 == 0) && (low == 0x100 || low == 0x122))
}

pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off + 8)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off + 4)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

/// NUL-terminated kernel strings (kernfs names are at most 255 bytes); a
/// read that crosses into an unmapped page is retried shorter.
pub(super) fn read_strings(kread: &mut Kread, addrs: &[u64]) -> Result<Vec<Option<String>>> {
    let mut out: Vec<Option<String>> = vec![None; addrs.len()];
    for len in [256usize, 64, 16] {
        let todo: Vec<usize> = (0..addrs.len())
            .filter(|&i| out[i].is_none() && addrs[i] != 0)
            .collect();
        if todo.is_empty() {
            break;
        }
        let reqs: Vec<(u64, usize)> = todo.iter().map(|&i| (addrs[i], len)).collect();
        for (&i, b) in todo.iter().zip(kread.read(&reqs)?) {
            if let Some(b) = b {
                if let Some(end) = b.iter().position(|&c| c == 0) {
                    out[i] = Some(String::from_utf8_lossy(&b[..end]).into_owned());
                }
            }
        }
    }
    Ok(out)
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
