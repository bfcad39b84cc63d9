//! Facts about the running kernel, read from its own descriptions (tracefs formats,
//! /proc, /sys) at run time rather than assumed from a version: nothing here knows
//! about the tools that use it.

pub mod clock;
pub mod features;
pub mod meminfo;
pub mod slabinfo;
pub mod tracefs;
