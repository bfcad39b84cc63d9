//! One eBPF object per tool: a slab run creates the slab tracer's maps and
//! none of `leaktrace memcg`'s (which cost ~25 MB of kernel memory a slab run
//! never touches when both tools shared one object).

use std::collections::BTreeSet;

use leaktrace_tests::*;

/// The names of the BPF maps `pid` holds while it runs.
fn map_names(pid: u32) -> BTreeSet<String> {
    process_map_ids(pid)
        .expect("the tracer's fdinfo")
        .into_iter()
        .map(|id| map_name(id).expect("map name"))
        .collect()
}

#[test]
fn a_slab_run_creates_no_memcg_map() {
    let tracer = Tracer::start(&["--cache", "kmalloc-512", "--duration", "30s"]).expect("start");
    let names = map_names(tracer.pid());
    tracer.kill().expect("stop the tracer");
    for slab in ["LIVE", "EVENTS", "COUNTERS"] {
        assert!(names.contains(slab), "no slab map {slab} in {names:?}");
    }
    let memcg: Vec<&String> = names.iter().filter(|n| n.starts_with("MEMCG_")).collect();
    assert!(memcg.is_empty(), "a slab run created memcg maps {memcg:?}");
}
