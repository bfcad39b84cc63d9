//! leaktrace: who is growing kernel memory.
//!
//! Data path, top to bottom: kernel tracepoints (`tracer-ebpf`) -> [`bpf`] (load,
//! attach, ring buffer) -> [`pipeline`] (the event loop) -> [`slab`] (decode,
//! aggregate, report) -> [`present`] / [`output`]. See README.md, "How the code is
//! laid out".

mod bpf;
mod cli;
mod doctor;
mod kernel;
#[cfg(test)]
mod layout_tests;
mod memcg;
mod output;
mod pages;
mod percpu;
mod pipeline;
mod present;
mod serve;
mod slab;
mod symbolize;
#[cfg(test)]
mod test_rng;

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("leaktrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Caches) => {
            let root = Path::new("/");
            let catalogue = slab::caches::Catalogue::read(root).context("reading slab caches")?;
            let slab =
                kernel::slabinfo::read(root).context("reading /proc/slabinfo (needs root)")?;
            output::stdout::write_text(&present::caches::render_table(&catalogue, &slab))
                .context("printing the cache list")
        }
        // Each tool gets plain options: nothing below main.rs reads `cli`.
        Some(Command::Doctor(args)) => doctor::run(&args.into()),
        Some(Command::Memcg(args)) => block_on(pipeline::memcg::run(args.into())),
        Some(Command::Serve(args)) => block_on(serve::run(args.into())),
        None => {
            let traced = cli.trace.traced()?;
            block_on(pipeline::trace::run(cli.trace.into(), &traced))
        }
    }
}

/// Runs a tool on one thread. That is plenty: the tracing loops are bound by
/// the kernel's event rate and serve is idle almost always, and a single
/// thread keeps leaktrace's footprint on a sick node small.
fn block_on(run: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run)
}
