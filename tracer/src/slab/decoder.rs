//! Ring-buffer records -> typed events. The kernel writes `tracer_common` structs;
//! we check kind and length before reading so a short or foreign record is an
//! error, not undefined behaviour.

use std::mem::size_of;

use thiserror::Error;
use tracer_common::{
    slab::{
        draw_level, AllocEvent, AllocHeader, FreeEvent, FLAG_CENSUS, FLAG_SAMPLED, FLAG_SHALLOW,
        FLAG_ZOOM, MAX_KSTACK, MAX_USTACK,
    },
    user::record_kind,
    EVENT_ALLOC, EVENT_ALLOC_NO_STACKS, EVENT_FREE,
};

/// An allocation with its stacks trimmed to the frames the kernel wrote: the
/// kernel's own header (`tracer_common::slab::AllocHeader`, whose fields read
/// through `Deref`: `a.tgid`, `a.bytes_alloc`...) with its flags decoded, and
/// the stacks that followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alloc<'a> {
    /// As the kernel wrote it (a 120-byte copy, the size of the fields read).
    pub hdr: AllocHeader,
    /// Its stacks were drawn: it stands for its (stratum, level) in estimates.
    pub drawn: bool,
    /// Drawn with probability `1 / 2^level`, decided before the draw.
    pub level: u8,
    /// Which rule set that probability.
    pub route: Route,
    /// The fingerprint walk saw no frame beyond the entry ip.
    pub shallow: bool,
    /// Stacks and comm were captured (the record carries them: drawn); when
    /// false they are empty.
    pub has_stacks: bool,
    pub comm: &'a [u8],
    pub kstack: &'a [u64],
    pub ustack: &'a [u64],
    /// Negative errno from `bpf_get_stack`, when capture failed.
    pub kstack_err: Option<i32>,
    pub ustack_err: Option<i32>,
}

impl std::ops::Deref for Alloc<'_> {
    type Target = AllocHeader;

    fn deref(&self) -> &AllocHeader {
        &self.hdr
    }
}

impl std::ops::DerefMut for Alloc<'_> {
    fn deref_mut(&mut self) -> &mut AllocHeader {
        &mut self.hdr
    }
}

/// Which rule set an allocation's draw probability (see `stack_draw` in the
/// eBPF object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// One of its stratum's first allocations on a CPU: level 0, drawn.
    Census,
    /// Its stratum was zoomed by userspace.
    Zoom,
    /// The base rate (`--stack-sample`), or every allocation (`--exact`).
    Sampled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub tgid: u32,
    pub ptr: u64,
    /// 0: the whole object. Otherwise bytes of a page block freed while the
    /// rest of it stays allocated (`FreeEvent::bytes`).
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    Alloc(Alloc<'a>),
    Free(Free),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {0} bytes is too short for any event")]
    Short(usize),
    #[error("unknown event kind {kind} ({len} bytes)")]
    UnknownKind { kind: u32, len: usize },
    #[error("event kind {kind} needs {need} bytes, record has {len}")]
    Truncated { kind: u32, need: usize, len: usize },
}

pub fn decode(record: &[u8]) -> Result<Event<'_>, DecodeError> {
    let kind = record_kind(record).ok_or(DecodeError::Short(record.len()))?;
    match kind {
        EVENT_ALLOC => {
            let ev: &AllocEvent = view(record, kind)?;
            Ok(Event::Alloc(Alloc {
                comm: trim_nul(&ev.comm),
                kstack: frames(&ev.kstack, ev.kstack_bytes, MAX_KSTACK),
                ustack: frames(&ev.ustack, ev.ustack_bytes, MAX_USTACK),
                kstack_err: (ev.kstack_bytes < 0).then_some(ev.kstack_bytes),
                ustack_err: (ev.ustack_bytes < 0).then_some(ev.ustack_bytes),
                ..header(&ev.hdr, true)
            }))
        }
        EVENT_ALLOC_NO_STACKS => {
            let hdr: &AllocHeader = view(record, kind)?;
            Ok(Event::Alloc(header(hdr, false)))
        }
        EVENT_FREE => {
            let ev: &FreeEvent = view(record, kind)?;
            Ok(Event::Free(Free {
                tgid: ev.tgid,
                ptr: ev.ptr,
                bytes: ev.bytes,
            }))
        }
        _ => Err(DecodeError::UnknownKind {
            kind,
            len: record.len(),
        }),
    }
}

fn header(h: &AllocHeader, has_stacks: bool) -> Alloc<'_> {
    Alloc {
        hdr: *h,
        drawn: h.flags & FLAG_SAMPLED != 0,
        level: draw_level(h.flags),
        route: if h.flags & FLAG_CENSUS != 0 {
            Route::Census
        } else if h.flags & FLAG_ZOOM != 0 {
            Route::Zoom
        } else {
            Route::Sampled
        },
        shallow: h.flags & FLAG_SHALLOW != 0,
        has_stacks,
        comm: &[],
        kstack: &[],
        ustack: &[],
        kstack_err: None,
        ustack_err: None,
    }
}

/// Borrow a record as `T` without copying 600 bytes per event.
fn view<T>(record: &[u8], kind: u32) -> Result<&T, DecodeError> {
    let need = size_of::<T>();
    if record.len() < need {
        return Err(DecodeError::Truncated {
            kind,
            need,
            len: record.len(),
        });
    }
    let ptr = record.as_ptr();
    if ptr.align_offset(std::mem::align_of::<T>()) != 0 {
        // Ring buffer records are 8-byte aligned; anything else is not ours.
        return Err(DecodeError::Truncated {
            kind,
            need,
            len: record.len(),
        });
    }
    // SAFETY: length and alignment checked above; T is repr(C) plain data for which
    // every bit pattern is valid.
    Ok(unsafe { &*ptr.cast::<T>() })
}

fn frames(buf: &[u64], bytes: i32, max: usize) -> &[u64] {
    let n = usize::try_from(bytes).unwrap_or(0) / size_of::<u64>();
    let frames = &buf[..n.min(max)];
    // bpf_get_stack pads nothing, but a zero frame means the walk ended early.
    let end = frames
        .iter()
        .position(|&ip| ip == 0)
        .unwrap_or(frames.len());
    &frames[..end]
}

fn trim_nul(comm: &[u8]) -> &[u8] {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    &comm[..end]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An aligned byte buffer holding `value`, as the ring buffer would.
    pub(crate) fn record_of<T: Copy>(value: &T) -> Vec<u64> {
        let words = size_of::<T>().div_ceil(8);
        let mut buf = vec![0u64; words];
        // SAFETY: buf has at least size_of::<T>() bytes and is 8-aligned.
        unsafe { std::ptr::write(buf.as_mut_ptr().cast::<T>(), *value) };
        buf
    }

    pub(crate) fn bytes(words: &[u64], len: usize) -> &[u8] {
        // SAFETY: reinterpreting initialized u64s as bytes.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len) }
    }

    pub(crate) fn alloc_event(tgid: u32, ptr: u64, kstack: &[u64], ustack: &[u64]) -> AllocEvent {
        let mut ev = AllocEvent {
            hdr: header_of(EVENT_ALLOC, tgid, ptr),
            kstack_bytes: (kstack.len() * 8) as i32,
            ustack_bytes: (ustack.len() * 8) as i32,
            comm: [0; 16],
            kstack: [0; MAX_KSTACK],
            ustack: [0; MAX_USTACK],
        };
        ev.comm[..7].copy_from_slice(b"leakgen");
        ev.kstack[..kstack.len()].copy_from_slice(kstack);
        ev.ustack[..ustack.len()].copy_from_slice(ustack);
        ev
    }

    pub(crate) fn header_of(kind: u32, tgid: u32, ptr: u64) -> AllocHeader {
        AllocHeader {
            kind,
            tgid,
            pid: tgid + 1,
            source: tracer_common::slab::SOURCE_KMALLOC,
            flags: FLAG_SAMPLED,
            ptr,
            ts_ns: 1_000,
            bytes_req: 424,
            bytes_alloc: 512,
            gfp_flags: 0xcc0,
            cgroup_id: 7,
            call_site: 0xffff_ffff_8123_4567,
            user_ip: 0x401000,
            user_fingerprint: 0x51,
            start_ns: 99,
            ppid: 3,
            context: 5,
            charged_cgroup_id: 77,
        }
    }

    #[test]
    fn decodes_sampled_alloc_without_stacks() {
        let mut hdr = header_of(EVENT_ALLOC_NO_STACKS, 5, 0x400);
        hdr.flags = FLAG_SHALLOW;
        let buf = record_of(&hdr);
        let Ok(Event::Alloc(a)) = decode(bytes(&buf, size_of::<AllocHeader>())) else {
            panic!("decode failed")
        };
        assert!(!a.has_stacks && !a.drawn && a.shallow);
        assert_eq!((a.level, a.route), (0, Route::Sampled));
        hdr.flags = FLAG_ZOOM | (3 << tracer_common::slab::DRAW_LEVEL_SHIFT);
        let zoomed = record_of(&hdr);
        let Ok(Event::Alloc(z)) = decode(bytes(&zoomed, size_of::<AllocHeader>())) else {
            panic!("decode failed")
        };
        assert_eq!((z.level, z.route, z.drawn), (3, Route::Zoom, false));
        assert_eq!(a.user_fingerprint, 0x51);
        assert_eq!((a.start_ns, a.ppid, a.context), (99, 3, 5));
        assert_eq!(a.charged_cgroup_id, 77);
        assert_eq!(
            (a.tgid, a.ptr, a.call_site),
            (5, 0x400, 0xffff_ffff_8123_4567)
        );
        assert!(a.kstack.is_empty() && a.comm.is_empty());
        // A full event cut to header length is truncated, not misread.
        let full = record_of(&alloc_event(5, 0x400, &[], &[]));
        assert!(matches!(
            decode(bytes(&full, size_of::<AllocHeader>())),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn decodes_alloc_with_trimmed_stacks() {
        let ev = alloc_event(
            42,
            0xffff_8880_0000_0200,
            &[0xffff_ffff_8100_0000, 0xffff_ffff_8100_0010],
            &[0x401000],
        );
        let buf = record_of(&ev);
        let Event::Alloc(a) = decode(bytes(&buf, size_of::<AllocEvent>())).expect("decodes") else {
            panic!("not an alloc")
        };
        assert_eq!(a.tgid, 42);
        assert!(a.has_stacks && a.drawn && !a.shallow);
        assert_eq!(a.comm, b"leakgen");
        assert_eq!(a.kstack.len(), 2);
        assert_eq!(a.ustack, &[0x401000]);
        assert_eq!(a.kstack_err, None);
    }

    #[test]
    fn failed_stack_is_empty_with_errno() {
        let mut ev = alloc_event(1, 0x10, &[], &[]);
        ev.ustack_bytes = -14;
        let buf = record_of(&ev);
        let Ok(Event::Alloc(a)) = decode(bytes(&buf, size_of::<AllocEvent>())) else {
            panic!("decode failed")
        };
        assert!(a.ustack.is_empty());
        assert_eq!(a.ustack_err, Some(-14));
    }

    #[test]
    fn decodes_free() {
        let ev = FreeEvent {
            kind: EVENT_FREE,
            tgid: 9,
            ptr: 0x200,
            bytes: 0,
        };
        let buf = record_of(&ev);
        assert_eq!(
            decode(bytes(&buf, size_of::<FreeEvent>())),
            Ok(Event::Free(Free {
                tgid: 9,
                ptr: 0x200,
                bytes: 0,
            }))
        );
    }

    #[test]
    fn rejects_short_unknown_and_truncated() {
        assert_eq!(decode(&[1, 0]), Err(DecodeError::Short(2)));
        let buf = [7u64, 0];
        assert!(matches!(
            decode(bytes(&buf, 16)),
            Err(DecodeError::UnknownKind { kind: 7, .. })
        ));
        let ev = alloc_event(1, 0x10, &[], &[]);
        let buf = record_of(&ev);
        assert!(matches!(
            decode(bytes(&buf, 100)),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
