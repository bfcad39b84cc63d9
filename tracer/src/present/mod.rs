//! What people read: units (`units.rs`), the slab tracer's text report
//! (`view.rs`) and its live terminal view (`tui.rs`), all fed by reports.

pub mod caches;
pub mod screen;
pub mod tui;
pub mod units;
pub mod view;
