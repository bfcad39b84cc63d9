//! The slab tracer: from `--cache NAME` to what the kernel side must match.

pub mod caches;
