//! leaktrace's own footprint on the node: what it keeps resident, and giving back
//! what it no longer needs (it runs where memory is already short).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// This process's resident memory in bytes: VmRSS less the pages of BPF maps
/// it has mapped (the ring buffer's data pages are mapped twice, so VmRSS
/// counts 2x its size). Those pages are kernel memory and already in the
/// maps' `memlock`; counting them here too would overstate the footprint.
pub fn own_rss_bytes() -> Option<u64> {
    rss_outside_bpf_maps(&std::fs::read_to_string("/proc/self/smaps").ok()?)
}

/// [`own_rss_bytes`] as read at most [`RSS_REFRESH`] ago: walking smaps
/// (every page table entry of the process) was the largest share of an idle
/// `--all-caches` run's own CPU when read every refresh.
pub fn own_rss_bytes_recent() -> Option<u64> {
    static LAST: Mutex<Option<(Instant, Option<u64>)>> = Mutex::new(None);
    let Ok(mut last) = LAST.lock() else {
        return own_rss_bytes();
    };
    match *last {
        Some((at, rss)) if at.elapsed() < RSS_REFRESH => rss,
        _ => {
            let rss = own_rss_bytes();
            *last = Some((Instant::now(), rss));
            rss
        }
    }
}

/// How stale [`own_rss_bytes_recent`] may be.
pub const RSS_REFRESH: Duration = Duration::from_secs(10);

/// Gives the heap's free pages back to the kernel. Set-up (BTF, kallsyms,
/// the slab catalogue) frees tens of MB that glibc would otherwise keep
/// resident for the whole run on a node that is short of memory.
pub fn return_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// Sum of `Rss:` over the mappings of a /proc/PID/smaps text, less those of
/// `anon_inode:bpf-map`, in bytes.
fn rss_outside_bpf_maps(smaps: &str) -> Option<u64> {
    let (mut all, mut bpf) = (0u64, 0u64);
    let (mut in_bpf_map, mut seen) = (false, false);
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
            all += kib;
            if in_bpf_map {
                bpf += kib;
            }
            seen = true;
        } else {
            // A mapping's header: range perms offset dev inode [path].
            let mut fields = line.split_whitespace();
            if fields
                .next()
                .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
            {
                in_bpf_map = fields.nth(4) == Some("anon_inode:bpf-map");
            }
        }
    }
    seen.then(|| (all - bpf) * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_leaves_out_mapped_bpf_maps() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 1234   /usr/bin/leaktrace
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0001000000 rw-s 00000000 00:0f 99     anon_inode:bpf-map
Size:              16384 kB
Rss:               16384 kB
7f0002000000-7f0002100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                  20 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
Rss:                   8 kB
";
        assert_eq!(rss_outside_bpf_maps(smaps), Some((300 + 20 + 8) * 1024));
        assert_eq!(rss_outside_bpf_maps(""), None);
    }
}
