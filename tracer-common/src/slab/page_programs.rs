//! The page source's entry points in the slab object (`leaktrace --pages`),
//! named once as [`programs`](super::programs) names the slab cache's: rows
//! of the same shape, read by tracer-ebpf's `entry_points!` and by
//! [`PROGRAMS`] here for userspace (`pages/plan.rs`).
//!
//! `page_kmalloc` takes a large kmalloc's block back (`kmem:kmalloc`, raw
//! where BTF proves its arguments): those pages are counted in `Slab`.
//!
//! Page hooks are classic tracepoints: they carry the `pfn`, which `/proc/kpageflags`
//! and a split block's order-0 frees are keyed by. The raw tracepoints carry
//! `struct page *`, whose pfn needs `vmemmap_base` (randomized by KASLR) and
//! `sizeof(struct page)`, which are not worth a second path for two hooks
//! that miss at a few loads each.

use super::programs::Program;

/// Calls `$callback! { rows }` with the page source's program table.
#[macro_export]
macro_rules! page_programs {
    ($callback:ident) => {
        $callback! {
            tracepoint page_alloc main: page_alloc, page_alloc_nocas;
            tracepoint page_free main: page_free, page_free_nocas;
            tracepoint page_kmalloc main: page_kmalloc, page_kmalloc_nocas;
            raw_tracepoint page_kmalloc main: page_kmalloc_raw, page_kmalloc_raw_nocas;
        }
    };
}

macro_rules! program_table {
    ($($hook:ident $what:ident $role:ident: $name:ident, $nocas:ident;)*) => {
        /// Every program of the page source, in the table's order.
        pub const PROGRAMS: &[Program] = &[$(Program {
            name: stringify!($name),
            nocas: stringify!($nocas),
            spare: false,
        }),*];

        /// Each program's name as a constant of the same name.
        #[allow(non_upper_case_globals)]
        pub mod name {
            $(pub const $name: &str = stringify!($name);)*
        }
    };
}

page_programs!(program_table);
