//! The slab tracer: from `--cache NAME` to what the kernel side must match
//! (`caches/`, `plan.rs`), loading its object (`probes.rs`, whose counters are
//! `counters.rs`), then one run's session (`session.rs`): each record decoded
//! (`decoder.rs`), counted in the live table (`aggregator.rs`; per-stack
//! estimates in `estimate.rs`, the draw rate steered by `zoom.rs`), snapshot
//! into the one report model (`report.rs`, rows from `aggregator/rows.rs`),
//! named (`naming.rs`) and grouped (`grouping.rs`) for views and outputs.

pub mod aggregator;
pub mod caches;
pub mod cgroup_source;
pub mod counters;
pub mod decoder;
pub mod estimate;
pub mod grouping;
pub mod kheap;
pub mod kheap_source;
pub mod naming;
pub mod page_base;
pub mod plan;
pub mod probes;
pub mod report;
pub mod session;
pub mod source;
pub mod zoom;
