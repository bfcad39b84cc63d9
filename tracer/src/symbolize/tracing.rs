//! Frames of the tracing machinery on top of a captured kernel stack, which
//! both tools drop before showing a stack.

/// Frames of the tracing machinery itself (our BPF program, the raw tracepoint
/// trampoline) sit on top of a raw tracepoint's kernel stack; they say nothing
/// about who allocated and differ by hook, so they are dropped from the top.
pub fn strip_tracing_frames(mut frames: Vec<String>) -> Vec<String> {
    const TRACING: [&str; 7] = [
        "bpf_prog_",
        "bpf_trace_run",
        "__bpf_trace_",
        "__traceiter_",
        "perf_trace_",
        "trace_event_raw_event_",
        "trace_call_bpf",
    ];
    // Our program's own frame may be named after whatever kernel symbol
    // precedes it when kallsyms was read before the program was loaded (it is,
    // to keep that parse out of the event loop): drop everything above the
    // last tracing-machinery frame near the top, named or not.
    const TOP: usize = 6;
    let mut keep = 0;
    for (i, f) in frames.iter().take(TOP).enumerate() {
        if TRACING.iter().any(|t| f.starts_with(t)) {
            keep = i + 1;
        } else if keep > 0 {
            break;
        }
    }
    frames.drain(..keep);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_frames_are_dropped_only_from_the_top() {
        let frames = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let raw = frames(&[
            "bpf_prog_ac3eadf3fccf7f8c_kmalloc_raw+0x499",
            "bpf_trace_run6+0x10b",
            "__kmalloc_noprof+0x244",
            "user_preparse+0x2f",
            "bpf_trace_run6+0x10b",
        ]);
        assert_eq!(
            strip_tracing_frames(raw),
            frames(&[
                "__kmalloc_noprof+0x244",
                "user_preparse+0x2f",
                "bpf_trace_run6+0x10b"
            ])
        );
        assert!(strip_tracing_frames(frames(&["bpf_prog_x+0x1"])).is_empty());
        // A program loaded after kallsyms was read carries a neighbour's name.
        let misnamed = frames(&[
            "__stop_runtime_ptr_USER_PTR_MAX+0x1234",
            "bpf_trace_run6+0x10b",
            "__traceiter_kmalloc+0x4a",
            "__kmalloc_noprof+0x244",
            "user_preparse+0x2f",
        ]);
        assert_eq!(
            strip_tracing_frames(misnamed),
            frames(&["__kmalloc_noprof+0x244", "user_preparse+0x2f"])
        );
    }
}
