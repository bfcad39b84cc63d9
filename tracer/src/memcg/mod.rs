//! `leaktrace memcg`'s model: who creates memory cgroups, which never die, and
//! what pins them. The plan (`plan`) and its attach (`hooks`), the record decoder
//! (`decode`), the tracker of memcg lifetimes and charged objects (`state`),
//! the kernel-memory walk of every memcg the kernel holds (`walk`, `pins`,
//! `kread`), the per-CPU memory of the memcgs it sees made (`percpu`) and
//! the [`report::Report`] they add up to, assembled by the
//! run's `session`. The run loop is `pipeline/memcg.rs`, the text view
//! `present/memcg_view.rs`.

mod ancestry;
pub mod decode;
pub mod hooks;
pub mod kmem;
mod kread;
pub mod percpu;
mod pins;
pub mod plan;
pub mod report;
pub mod session;
pub mod state;
mod walk;
