//! The run of a tool: signals, ticks and the ring buffer (`event_loop.rs`)
//! driving the slab tracer's loop (`trace.rs`): ring -> decode -> apply ->
//! tick -> snapshot -> view/outputs.

pub mod event_loop;
pub mod fault;
pub mod trace;
