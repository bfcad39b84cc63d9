//! User-side helpers for what the records of both tools share.

/// The kind of a ring-buffer record (its first u32: [`crate::EVENT_ALLOC`],
/// [`crate::EVENT_MKDIR`]...), or None when the record is too short to have one.
pub fn record_kind(record: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = record.get(..4)?.try_into().ok()?;
    Some(u32::from_ne_bytes(bytes))
}
