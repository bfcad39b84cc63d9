//! Slab cache catalogue (`/sys/kernel/slab`) and the translation of `--cache NAME` into what
//! the eBPF side has to match.
//!
//! Facts this module is built on (checked on Linux 6.18, SLUB):
//! * SLUB merges compatible caches into one `kmem_cache`. In sysfs a mergeable cache is a
//!   directory named by a unique id (`:A-0000256`, the letters are slab flags) and every name
//!   that resolved to it is a symlink to that directory; unmergeable caches are plain
//!   directories under their own name.
//! * A merged `kmem_cache` keeps the name of the cache created first (`s->name`). That name,
//!   and only that one, is what `/proc/slabinfo` lists and what `kmem:kmem_cache_alloc`
//!   carries in its `name` field: on the reference host `sgpool-8` allocations are reported
//!   as `name=key_jar`.
//! * Both `kmem:kmalloc` and `kmem:kmem_cache_alloc` report `bytes_alloc = s->size`, which
//!   sysfs calls `slab_size` (filp: `object_size` 184, `bytes_alloc` 192).
//! * `kmem:kmalloc` has no cache field: the target cache follows from `bytes_alloc` and the
//!   kmalloc type the kernel derives from the gfp flags (see [`KmallocKind`]).

mod catalogue;
mod kmalloc;
mod select;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::kernel::slabinfo::{self, SlabLine};

/// Upper bound of names the eBPF program compares `kmem_cache_alloc`'s `name` against.
pub const MAX_NAMED: usize = 8;
const MAX_SUGGESTIONS: usize = 5;

pub use catalogue::*;
pub use kmalloc::*;
pub use select::*;

#[cfg(test)]
mod tests;
