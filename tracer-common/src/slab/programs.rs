//! The slab object's entry points, each named once. [`slab_programs!`]
//! hands the table to a callback macro: tracer-ebpf's generates the programs
//! (`tracer-ebpf/src/slab.rs`), this module's generates [`PROGRAMS`], the
//! names userspace loads and attaches (`slab/plan.rs`, `slab/probes.rs`).
//!
//! A row: the hook (`tracepoint`: classic, fields at tracefs offsets;
//! `raw_tracepoint`: TP_PROTO arguments; `btf_tracepoint`: the same
//! arguments typed by the kernel's BTF, so their fields are plain loads), what the program handles
//! (`kmalloc`, `cache_alloc`, `kfree`, `cache_free`; `percpu_alloc`,
//! `percpu_free` for the per-CPU source, on `percpu:*`; `page_alloc`,
//! `page_free` for the page source, and `page_kmalloc`, which takes a large
//! kmalloc's block back from it: those pages are counted in `Slab`), `main`
//! or `spare` (the second program on a raw hook, run when the kernel skipped
//! the first for recursion), then its name and the name of its build without BPF
//! compare-and-swap (5.10's verifier refuses a cmpxchg anywhere in a program).
//!
//! The page hooks are raw tracepoints where the kernel allows: they carry
//! `struct page *`, whose pfn (what `/proc/kpageflags` and a split block's
//! order-0 frees are keyed by) needs `sizeof(struct page)` from BTF and the
//! address of pfn 0's `struct page` (KASLR'd), which `page_calibrate`
//! measures before they attach. Otherwise the classic tracepoints, which
//! carry the `pfn` itself.

/// Calls `$callback! { rows }` with the slab object's program table.
#[macro_export]
macro_rules! slab_programs {
    ($callback:ident) => {
        $callback! {
            tracepoint kmalloc main: kmalloc, kmalloc_nocas;
            tracepoint cache_alloc main: kmem_cache_alloc, kmem_cache_alloc_nocas;
            tracepoint kfree main: kfree, kfree_nocas;
            tracepoint cache_free main: kmem_cache_free, kmem_cache_free_nocas;
            raw_tracepoint kmalloc main: kmalloc_raw, kmalloc_raw_nocas;
            raw_tracepoint cache_alloc main: kmem_cache_alloc_raw, kmem_cache_alloc_raw_nocas;
            raw_tracepoint kmalloc spare: kmalloc_raw_spare, kmalloc_raw_spare_nocas;
            raw_tracepoint cache_alloc spare: kmem_cache_alloc_raw_spare, kmem_cache_alloc_raw_spare_nocas;
            btf_tracepoint cache_alloc main: kmem_cache_alloc_btf, kmem_cache_alloc_btf_nocas;
            btf_tracepoint cache_alloc spare: kmem_cache_alloc_btf_spare, kmem_cache_alloc_btf_spare_nocas;
            raw_tracepoint kfree main: kfree_raw, kfree_raw_nocas;
            raw_tracepoint cache_free main: kmem_cache_free_raw, kmem_cache_free_raw_nocas;
            raw_tracepoint kfree spare: kfree_raw_spare, kfree_raw_spare_nocas;
            raw_tracepoint cache_free spare: kmem_cache_free_raw_spare, kmem_cache_free_raw_spare_nocas;
            tracepoint percpu_alloc main: percpu_alloc, percpu_alloc_nocas;
            tracepoint percpu_free main: percpu_free, percpu_free_nocas;
            raw_tracepoint percpu_free main: percpu_free_raw, percpu_free_raw_nocas;
            raw_tracepoint percpu_free spare: percpu_free_raw_spare, percpu_free_raw_spare_nocas;
            tracepoint page_alloc main: page_alloc, page_alloc_nocas;
            tracepoint page_free main: page_free, page_free_nocas;
            tracepoint page_kmalloc main: page_kmalloc, page_kmalloc_nocas;
            raw_tracepoint page_kmalloc main: page_kmalloc_raw, page_kmalloc_raw_nocas;
            raw_tracepoint page_alloc main: page_alloc_raw, page_alloc_raw_nocas;
            raw_tracepoint page_free main: page_free_raw, page_free_raw_nocas;
            raw_tracepoint page_free spare: page_free_raw_spare, page_free_raw_spare_nocas;
            raw_tracepoint page_calibrate main: page_calibrate_raw, page_calibrate_raw_nocas;
        }
    };
}

/// One program of the slab object, as userspace names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    pub name: &'static str,
    /// The same program built without compare-and-swap.
    pub nocas: &'static str,
    /// A raw hook's second program (see the module's documentation).
    pub spare: bool,
}

macro_rules! spare {
    (main) => {
        false
    };
    (spare) => {
        true
    };
}

macro_rules! program_table {
    ($($hook:ident $what:ident $role:ident: $name:ident, $nocas:ident;)*) => {
        /// Every program of the slab object, in the table's order.
        pub const PROGRAMS: &[Program] = &[$(Program {
            name: stringify!($name),
            nocas: stringify!($nocas),
            spare: spare!($role),
        }),*];

        /// Each program's name as a constant of the same name, so a
        /// misspelt program fails to compile rather than to load.
        #[allow(non_upper_case_globals)]
        pub mod name {
            $(pub const $name: &str = stringify!($name);)*
        }
    };
}

slab_programs!(program_table);
