//! Facts about the running kernel, read from its own descriptions (tracefs formats,
//! /proc, /sys) at run time rather than assumed from a version: nothing here knows
//! about the tools that use it.

pub mod bpf_probe;
pub mod btf;
pub mod cgroup_paths;
pub mod cgroupfs;
pub mod clock;
pub mod facts;
pub mod features;
pub mod irq_context;
pub mod ledger;
pub mod memcg_percpu;
pub mod meminfo;
pub mod memory_stat;
pub mod own_memory;
pub mod pods;
pub mod possible_cpus;
pub mod procinfo;
pub mod slabinfo;
pub mod task_offsets;
pub mod tracefs;
pub mod zoneinfo;
