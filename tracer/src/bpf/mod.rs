//! What both tools share on the BPF side of userspace: loading an object
//! (`load.rs`) and the stacks its programs capture, interned (`stacks.rs`).

pub mod load;
pub mod stacks;
