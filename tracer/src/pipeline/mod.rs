//! The run of a tool: signals, ticks and the ring buffer (`event_loop.rs`)
//! driving each tool's loop, the slab tracer's (`trace.rs`) and memcg's
//! (`memcg.rs`): ring -> decode -> apply -> tick -> snapshot -> view/outputs.

pub mod event_loop;
pub mod fault;
pub mod memcg;
pub mod trace;
