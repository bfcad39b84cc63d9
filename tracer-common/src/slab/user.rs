//! The slab tracer's types on the user side: what userspace needs to fill
//! [`Config`] the way its eBPF object reads it.

use super::{Config, PageCalibration, ZoomSlot, CACHE_NAME_LEN};

// SAFETY: plain-old-data, repr(C), every bit pattern valid.
unsafe impl aya::Pod for Config {}

// SAFETY: plain-old-data, repr(C), no padding, every bit pattern valid.
unsafe impl aya::Pod for ZoomSlot {}

// SAFETY: plain-old-data, repr(C), no padding, every bit pattern valid.
unsafe impl aya::Pod for PageCalibration {}

/// A cache name as the kernel side compares it ([`Config::cache_names`]):
/// NUL-padded little-endian words. None when the name is too long to keep
/// the NUL byte the kernel compares at its end (more than
/// `CACHE_NAME_LEN - 1` bytes).
pub fn cache_name_words(name: &str) -> Option<[u64; CACHE_NAME_LEN / 8]> {
    let bytes = name.as_bytes();
    // The kernel compares the NUL-terminated name it read, so one byte stays zero.
    if bytes.len() >= CACHE_NAME_LEN {
        return None;
    }
    let mut buf = [0u8; CACHE_NAME_LEN];
    buf[..bytes.len()].copy_from_slice(bytes);
    let mut words = [0u64; CACHE_NAME_LEN / 8];
    for (word, chunk) in words.iter_mut().zip(buf.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *word = u64::from_le_bytes(b);
    }
    Some(words)
}
