//! The per-CPU source (`leaktrace --percpu`): outstanding per-CPU allocations
//! (`alloc_percpu` and friends: memcg statistics, percpu refcounts and
//! counters, BPF per-CPU maps, module data) through the slab tracer's
//! pipeline. Only the plan is its own (`source.rs`): the kernel side writes
//! the slab object's records, so decoding, counting, reports, views and
//! outputs are shared.

pub mod source;
