//! Records of memcg's eBPF object -> [`Tracker`] updates. The kind is checked
//! before the length, and the length before a record is read, so a short or
//! foreign record is counted as undecodable instead of misread.

use std::path::Path;

use tracer_common::{
    memcg::{CgroupEvent, ChargeEvent, CssEvent, PercpuAllocEvent, PercpuFreeEvent, UnchargeEvent},
    user::record_kind,
    EVENT_CHARGE, EVENT_CSS_FREE, EVENT_CSS_OFFLINE, EVENT_MKDIR, EVENT_PERCPU_ALLOC,
    EVENT_PERCPU_FREE, EVENT_PERCPU_OTHER_MKDIR, EVENT_RELEASE, EVENT_RMDIR, EVENT_UNCHARGE,
};

use super::{
    ancestry,
    state::{ChargeInput, Tracker},
};

/// A record of an unknown kind, or shorter than its kind's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undecodable;

/// Applies one ring-buffer record to `tracker`. `kmalloc_cg`: the kernel has
/// separate `kmalloc-cg-*` caches (5.14+), which names a kmalloc's cache.
/// Creators and removers are named from /proc as their events arrive, while
/// the processes are likely still there.
pub fn apply(tracker: &mut Tracker, record: &[u8], kmalloc_cg: bool) -> Result<(), Undecodable> {
    let root = Path::new("/");
    match record_kind(record) {
        Some(EVENT_MKDIR | EVENT_RMDIR | EVENT_RELEASE) => {
            let ev = read_event::<CgroupEvent>(record).ok_or(Undecodable)?;
            let path = cstr(&ev.path);
            match ev.kind {
                EVENT_MKDIR => {
                    tracker.percpu.mkdir(ev.pid, ev.id);
                    let who = ancestry::actor(root, ev.pid, ev.tgid, &cstr(&ev.comm), ev.ppid);
                    tracker.mkdir(ev.id, &path, ev.level, ev.ts_ns, who);
                }
                EVENT_RMDIR => {
                    let who = ancestry::actor(root, ev.pid, ev.tgid, &cstr(&ev.comm), ev.ppid);
                    tracker.rmdir(ev.id, &path, ev.level, ev.ts_ns, who);
                }
                _ => tracker.release(ev.id, ev.ts_ns),
            }
        }
        Some(EVENT_CHARGE) => {
            let ev = read_event::<ChargeEvent>(record).ok_or(Undecodable)?;
            let frames = usize::try_from(ev.kstack_bytes).unwrap_or(0) / 8;
            let kstack = &ev.kstack[..frames.min(ev.kstack.len())];
            let named = cstr(&ev.cache);
            let cache = if !named.is_empty() {
                named
            } else {
                kmalloc_name(ev.bytes_alloc, kmalloc_cg)
            };
            tracker.charge(ChargeInput {
                ptr: ev.ptr,
                memcg_id: ev.memcg_id,
                bytes: ev.bytes_alloc,
                cache,
                tgid: ev.tgid,
                comm: &cstr(&ev.comm),
                kstack,
            });
        }
        Some(EVENT_CSS_OFFLINE | EVENT_CSS_FREE) => {
            let ev = read_event::<CssEvent>(record).ok_or(Undecodable)?;
            if ev.kind == EVENT_CSS_OFFLINE {
                tracker.css_offline(ev.id, ev.ts_ns);
            } else {
                tracker.css_free(ev.id, ev.ts_ns);
            }
        }
        Some(EVENT_PERCPU_ALLOC) => {
            let ev = read_event::<PercpuAllocEvent>(record).ok_or(Undecodable)?;
            let frames = usize::try_from(ev.kstack_bytes).unwrap_or(0) / 8;
            let kstack = &ev.kstack[..frames.min(ev.kstack.len())];
            tracker.percpu.alloc(ev.pid, ev.ptr, ev.size, kstack);
        }
        Some(EVENT_PERCPU_FREE | EVENT_PERCPU_OTHER_MKDIR) => {
            let ev = read_event::<PercpuFreeEvent>(record).ok_or(Undecodable)?;
            if ev.kind == EVENT_PERCPU_FREE {
                tracker.percpu.free(ev.ptr);
            } else {
                tracker.percpu.other_mkdir(ev.pid);
            }
        }
        Some(EVENT_UNCHARGE) => {
            let ev = read_event::<UnchargeEvent>(record).ok_or(Undecodable)?;
            tracker.uncharge(ev.ptr);
        }
        _ => return Err(Undecodable),
    }
    Ok(())
}

fn read_event<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= std::mem::size_of::<T>())
        // SAFETY: length checked; T is a repr(C) POD type from tracer-common.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// kmalloc records carry no cache name; the size class and the kernel's
/// separate charged caches (5.14+) name it.
fn kmalloc_name(bytes: u64, kmalloc_cg: bool) -> String {
    match (bytes, kmalloc_cg) {
        (0, _) => "kmalloc-?".into(),
        (b, _) if b > 8192 => "kmalloc-large (pages)".into(),
        (b, true) => format!("kmalloc-cg-{}", kmalloc_class(b)),
        (b, false) => format!("kmalloc-{}", kmalloc_class(b)),
    }
}

fn kmalloc_class(bytes: u64) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}k", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmalloc_names() {
        assert_eq!(kmalloc_name(512, true), "kmalloc-cg-512");
        assert_eq!(kmalloc_name(2048, true), "kmalloc-cg-2k");
        assert_eq!(kmalloc_name(96, false), "kmalloc-96");
        assert_eq!(kmalloc_name(16384, true), "kmalloc-large (pages)");
    }

    #[test]
    fn short_events_are_refused() {
        assert!(read_event::<UnchargeEvent>(&[0u8; 8]).is_none());
        assert!(read_event::<UnchargeEvent>(&[0u8; 16]).is_some());
        assert_eq!(cstr(b"abc\0def"), "abc");
    }

    #[test]
    fn unknown_and_short_records_are_undecodable() {
        let mut tracker = Tracker::new(Default::default());
        assert_eq!(apply(&mut tracker, &[], false), Err(Undecodable));
        assert_eq!(
            apply(&mut tracker, &EVENT_UNCHARGE.to_ne_bytes(), false),
            Err(Undecodable)
        );
        assert_eq!(
            apply(&mut tracker, &99u32.to_ne_bytes(), false),
            Err(Undecodable)
        );
    }
}
