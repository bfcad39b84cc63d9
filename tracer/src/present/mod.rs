//! What people read: units (`units.rs`), the slab tracer's text report
//! (`view.rs`) and its live terminal view (`tui.rs`), memcg's text view
//! (`memcg_view.rs`) on the same screen machinery (`screen.rs`), all fed by
//! reports.

pub mod caches;
pub mod kheap_view;
pub mod memcg_view;
pub mod screen;
pub mod tui;
pub mod units;
pub mod view;
