//! Fault injection for the tests of how a run ends (tests/tests/cli.rs): with
//! `LEAKTRACE_FAULT=<point>` in the environment, the run panics at that point,
//! as a bug there would. Unset, it costs one environment lookup per call.

/// Panics when `LEAKTRACE_FAULT` names `point`. Points:
/// `panic-on-second-refresh` (programs attached, and `--top` has drawn its
/// first screen and owns the terminal).
pub fn panic_if_asked(point: &str) {
    if std::env::var_os("LEAKTRACE_FAULT").is_some_and(|v| v == point) {
        panic!("LEAKTRACE_FAULT={point}: an injected panic");
    }
}
