//! The slab tracer: from `--cache NAME` to what the kernel side must match
//! (`caches/`, `plan.rs`), loading its object (`probes.rs`), then each record
//! decoded (`decoder.rs`), counted (`aggregator.rs`, `grouping.rs`; per-stack
//! estimates in `estimate.rs`, the draw rate steered by `zoom.rs`) and turned
//! into the one report model (`report.rs`) that views and outputs read.

pub mod aggregator;
pub mod caches;
pub mod cgroup_source;
pub mod decoder;
pub mod estimate;
pub mod grouping;
pub mod plan;
pub mod probes;
pub mod report;
pub mod source;
pub mod zoom;
