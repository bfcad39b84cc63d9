//! The run of a tool: signals, ticks and the ring buffer (`event_loop.rs`)
//! driving each tool's session, the slab tracer's (`trace.rs`, on the loop
//! `trace_tool.rs`) and memcg's (`memcg.rs`): ring -> decode -> apply ->
//! tick -> snapshot -> view/outputs.

pub mod event_loop;
pub mod fault;
pub mod memcg;
pub mod trace;
pub mod trace_options;
pub mod trace_source;
pub mod trace_tool;

use std::time::Duration;

/// How a run is paced and shown, the same for both tools (main.rs fills it
/// from the command line; nothing here knows how the flags are spelled).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// A live view refreshed every `interval` (plain periodic text when
    /// stdout is not a terminal).
    pub top: bool,
    /// One JSON object per snapshot and a final report, one per line.
    pub json: bool,
    /// Stop after this long; None: until Ctrl-C or SIGTERM.
    pub duration: Option<Duration>,
    /// Refresh period of the live view and the snapshots.
    pub interval: Duration,
    /// The ring buffer's size in MiB (rounded up to a power of two).
    pub ringbuf_mib: u32,
}
