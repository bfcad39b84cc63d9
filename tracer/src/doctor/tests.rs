//! Fixture trees under testdata/doctor stand in for `/`:
//! * v1-host: copied from the development machine (6.18, cgroup v1 memory + cgroup2 unified).
//! * v1-incident: the seed incident (meminfo/slabinfo of the sick node, 3.10 el7 kernel,
//!   kubepods with kmem accounting on, tens of thousands of memcgs in /proc/cgroups).
//! * v2: a unified-hierarchy node (Debian 6.1) captured without root: no slabinfo, no tracefs.

use super::*;
use std::path::PathBuf;

use std::fs;

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/doctor")).join(name)
}

fn diagnose_fixture(name: &str, root_user: bool) -> Report {
    diagnose(&fixture(name), Duration::from_millis(1), root_user, || {})
}

fn data<'a>(report: &'a Report, check: &str) -> &'a Data {
    let finding = report
        .finding(check)
        .unwrap_or_else(|| panic!("no {check} finding in {report:#?}"));
    finding
        .data
        .as_ref()
        .unwrap_or_else(|| panic!("{check} has no data: {finding:#?}"))
}

fn severity(report: &Report, check: &str) -> Severity {
    report
        .finding(check)
        .unwrap_or_else(|| panic!("no {check} finding"))
        .severity
}

fn assert_ranked(report: &Report) {
    let order: Vec<Severity> = report.findings.iter().map(|f| f.severity).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "findings not ranked most severe first");
    let mut checks: Vec<&str> = report.findings.iter().map(|f| f.check).collect();
    checks.sort();
    assert_eq!(
        checks,
        ["bpf", "kmem", "ledger", "memcgs", "memory", "slab"]
    );
}

/// A copy of a fixture in a temp dir, for states that are one edit away from a fixture.
struct TempCopy(PathBuf);

impl TempCopy {
    fn of(name: &str, tag: &str) -> TempCopy {
        let dir =
            std::env::temp_dir().join(format!("leaktrace-doctor-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        copy_tree(&fixture(name), &dir);
        TempCopy(dir)
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---- the seed incident ----

#[test]
fn incident_is_critical_on_memory_slab_memcgs_and_kmem() {
    let r = diagnose_fixture("v1-incident", true);
    assert_ranked(&r);
    assert_eq!(r.kernel_release, "3.10.0-1160.el7.x86_64");

    let Data::Memory(m) = data(&r, "memory") else {
        panic!()
    };
    assert_eq!(m.meminfo.sunreclaim_kb, 58 * 1024 * 1024);
    assert!(
        (m.sunreclaim_pct - 58.0 * 100.0 / 64.0).abs() < 0.01,
        "{m:?}"
    );
    assert_eq!(severity(&r, "memory"), Severity::Critical);
    let memory = r.finding("memory").expect("memory");
    assert!(
        memory.summary.contains("SUnreclaim 58.0G is 90.6% of RAM"),
        "{}",
        memory.summary
    );

    let Data::Slab(s) = data(&r, "slab") else {
        panic!()
    };
    assert_eq!(s.top_size[0].name, "kmalloc-512");
    assert!(
        s.top_growth.is_empty(),
        "one capture cannot grow: {:?}",
        s.top_growth
    );
    assert_eq!(s.suggested_cache.as_deref(), Some("kmalloc-512"));
    assert_eq!(severity(&r, "slab"), Severity::Critical);

    let Data::Memcgs(c) = data(&r, "memcgs") else {
        panic!()
    };
    assert_eq!(c.version, CgroupVersion::V1);
    assert_eq!(c.mount, "/sys/fs/cgroup/memory");
    // 10 directories in the fixture's memory hierarchy, root included.
    assert_eq!((c.counts.live, c.counts.dying), (10, 48213 - 10));
    assert_eq!(c.memory_stat.len(), 2);
    assert_eq!(c.memory_stat[0].cgroup, "/");
    assert_eq!(c.memory_stat[1].cgroup, "/kubepods");
    assert_eq!(severity(&r, "memcgs"), Severity::Critical);
    assert!(r
        .finding("memcgs")
        .expect("memcgs")
        .summary
        .contains("dying >> live"));

    let Data::Kmem(k) = data(&r, "kmem") else {
        panic!()
    };
    let ids: Vec<&str> = k.known_issues.iter().map(|i| i.id).collect();
    assert_eq!(
        ids,
        ["kmem-caches-leak", "memory-stat-slow", "slab-pins-memcg"]
    );
    let state = k.kmem.as_ref().expect("v1 kmem state");
    assert!(!state.nokmem && state.kmem_files && state.slabinfo_readable);
    // kubepods, burstable, besteffort, 2 pods, 2 containers, docker.service
    assert_eq!(state.container_cgroups, 8);
    assert_eq!(state.with_kmem_usage, 7);
    assert_eq!(state.with_kmem_limit, 1);
    assert!(
        state.examples[0].ends_with("/9e4b2a7c1f3d5e60"),
        "{:?}",
        state.examples
    );
    assert_eq!(severity(&r, "kmem"), Severity::Critical);

    // 3.10 has no BPF ring buffer: leaktrace cannot run there, so the next step is slabinfo.
    let Data::Bpf(b) = data(&r, "bpf") else {
        panic!()
    };
    assert_eq!(b.ring_buffer, Some(false));
    assert!(!b.can_attach);
    assert_eq!(severity(&r, "bpf"), Severity::Warning);
    let watch = "watch -n 1 \"grep -E '^kmalloc-512 ' /proc/slabinfo\"";
    assert_eq!(r.next_command.as_deref(), Some(watch));
    let text = render(&r);
    assert!(
        text.starts_with("leaktrace doctor — kernel 3.10.0-1160.el7.x86_64"),
        "{text}"
    );
    assert!(
        text.lines().nth(1).is_some_and(|l| l.starts_with("CRIT")),
        "{text}"
    );
    assert!(text.ends_with(&format!("next: {watch}\n")), "{text}");
}

#[test]
fn incident_on_rhel8_before_the_memory_stat_fix() {
    let t = TempCopy::of("v1-incident", "rhel8");
    fs::write(
        t.0.join("proc/sys/kernel/osrelease"),
        "4.18.0-147.el8.x86_64\n",
    )
    .expect("write");
    for root_user in [false, true] {
        let r = diagnose(&t.0, Duration::from_millis(1), root_user, || {});
        let Data::Kmem(k) = data(&r, "kmem") else {
            panic!()
        };
        let ids: Vec<&str> = k.known_issues.iter().map(|i| i.id).collect();
        assert_eq!(ids, ["memory-stat-slow", "slab-pins-memcg"]);
        // Accounting is on in the pods, but this kernel does destroy per-memcg caches.
        assert_eq!(severity(&r, "kmem"), Severity::Warning);
        let Data::Bpf(b) = data(&r, "bpf") else {
            panic!()
        };
        assert_eq!(b.ring_buffer, None, "RHEL backports: unknown, not refused");
        assert!(b.can_attach);
        let sudo = if root_user { "" } else { "sudo " };
        assert_eq!(
            r.next_command,
            Some(format!("{sudo}leaktrace --cache kmalloc-512 --top"))
        );
    }
}

// ---- this machine ----

#[test]
fn host_v1_counts_dying_memcgs_from_proc_cgroups() {
    let r = diagnose_fixture("v1-host", true);
    assert_ranked(&r);
    let Data::Memcgs(c) = data(&r, "memcgs") else {
        panic!()
    };
    let proc_cgroups = fs::read_to_string(fixture("v1-host/proc/cgroups")).expect("read");
    let num: u64 = proc_cgroups
        .lines()
        .find(|l| l.starts_with("memory"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .expect("memory line");
    assert_eq!(c.counts.live, 7);
    assert_eq!(c.counts.dying, num - 7);
    assert!(
        c.counts.method.contains("/proc/cgroups num_cgroups"),
        "{}",
        c.counts.method
    );
    assert_eq!(severity(&r, "memcgs"), Severity::Ok);

    let Data::Kmem(k) = data(&r, "kmem") else {
        panic!()
    };
    assert!(k.known_issues.is_empty());
    let state = k.kmem.as_ref().expect("v1");
    assert_eq!(state.container_cgroups, 0);
    assert!(state.root_kmem_usage_bytes.is_some_and(|u| u > 0));
    assert_eq!(severity(&r, "kmem"), Severity::Ok);

    let Data::Bpf(b) = data(&r, "bpf") else {
        panic!()
    };
    assert!(
        b.root && b.btf && !b.kprobes && b.kmem_tracepoints && b.can_attach,
        "{b:?}"
    );
    assert_eq!(b.tracefs.as_deref(), Some("/sys/kernel/tracing"));
    assert_eq!(b.ring_buffer, Some(true));
    assert_eq!(severity(&r, "memory"), Severity::Ok);
    let cache = match data(&r, "slab") {
        Data::Slab(s) => s.suggested_cache.clone().expect("a cache"),
        _ => panic!(),
    };
    assert_eq!(
        r.next_command,
        Some(format!("leaktrace --cache {cache} --top"))
    );
}

// ---- cgroup v2 ----

#[test]
fn v2_counts_nr_dying_descendants_and_degrades_without_root_files() {
    let r = diagnose_fixture("v2", false);
    assert_ranked(&r);
    let Data::Memcgs(c) = data(&r, "memcgs") else {
        panic!()
    };
    assert_eq!(c.version, CgroupVersion::V2);
    assert_eq!(c.mount, "/sys/fs/cgroup");
    assert_eq!((c.counts.live, c.counts.dying), (8, 4180));
    assert!(c.counts.method.contains("nr_dying_descendants"));
    assert_eq!(c.memory_stat[1].cgroup, "/kubepods.slice");
    assert_eq!(severity(&r, "memcgs"), Severity::Critical);

    let Data::Kmem(k) = data(&r, "kmem") else {
        panic!()
    };
    assert_eq!(k.cgroup_version, Some(CgroupVersion::V2));
    assert!(k.kmem.is_none());
    assert_eq!(severity(&r, "kmem"), Severity::Ok);

    let slab = r.finding("slab").expect("slab");
    assert_eq!(slab.severity, Severity::Unknown);
    assert!(
        slab.summary
            .starts_with("unknown: slab growth needs /proc/slabinfo"),
        "{}",
        slab.summary
    );
    assert!(slab.summary.contains("proc/slabinfo"), "{}", slab.summary);

    let Data::Bpf(b) = data(&r, "bpf") else {
        panic!()
    };
    assert!(b.tracefs.is_none());
    assert!(b
        .tracefs_note
        .as_deref()
        .is_some_and(|n| n.contains("not mounted")));
    assert_eq!(r.next_command.as_deref(), Some("sudo leaktrace doctor"));

    let r = diagnose_fixture("v2", true);
    assert_eq!(r.next_command.as_deref(), Some("leaktrace caches"));
}

#[test]
fn v2_prefers_per_controller_counts() {
    let t = TempCopy::of("v2", "subsys");
    fs::write(
        t.0.join("sys/fs/cgroup/cgroup.stat"),
        "nr_descendants 7\nnr_subsys_memory 6\nnr_dying_descendants 4180\nnr_dying_subsys_memory 37\n",
    )
    .expect("write");
    let r = diagnose(&t.0, Duration::from_millis(1), true, || {});
    let Data::Memcgs(c) = data(&r, "memcgs") else {
        panic!()
    };
    assert_eq!((c.counts.live, c.counts.dying), (6, 37));
    assert!(c.counts.method.contains("nr_dying_subsys_memory"));
    assert_eq!(severity(&r, "memcgs"), Severity::Ok);
}

#[test]
fn v1_disabled_memory_controller_is_unknown_not_fatal() {
    let t = TempCopy::of("v1-host", "disabled");
    let path = t.0.join("proc/cgroups");
    let text = fs::read_to_string(&path).expect("read");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("memory") {
                "memory\t4\t21\t0\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&path, text).expect("write");
    let r = diagnose(&t.0, Duration::from_millis(1), true, || {});
    let f = r.finding("memcgs").expect("memcgs");
    assert_eq!(f.severity, Severity::Unknown);
    assert!(f.summary.contains("cgroup_disable=memory"), "{}", f.summary);
}

#[test]
fn empty_root_degrades_every_check() {
    let dir = std::env::temp_dir().join(format!("leaktrace-doctor-empty-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("mkdir");
    let r = diagnose(&dir, Duration::from_millis(1), false, || {});
    let _ = fs::remove_dir_all(&dir);
    assert_ranked(&r);
    for check in ["memory", "memcgs", "slab"] {
        let f = r.finding(check).expect("finding");
        assert_eq!(f.severity, Severity::Unknown, "{f:?}");
        assert!(f.summary.starts_with("unknown: "), "{f:?}");
        assert!(
            f.summary.contains(&dir.display().to_string()),
            "reason names the file: {f:?}"
        );
    }
    let kmem = r.finding("kmem").expect("kmem");
    assert!(
        kmem.summary.contains("kmem accounting unknown"),
        "{}",
        kmem.summary
    );
    assert_eq!(r.kernel_release, "unknown");
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(json["findings"][0]["severity"], "unknown");
    assert!(json["findings"][0]["data"].is_null());
}

// ---- slab growth ----

/// The real capture with /sys/kernel/slab, where SLUB's merges are visible.
fn host_proc() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/proc/host-6.18"
    ))
    .to_path_buf()
}

fn host_lines() -> Vec<SlabLine> {
    slabinfo::read(&host_proc()).expect("slabinfo")
}

#[test]
fn growth_ranks_by_bytes_and_names_merged_aliases() {
    let before = host_lines();
    let cat = Catalogue::read(&host_proc()).expect("catalogue");
    let mut after = before.clone();
    // key_jar is merged with other caches on this kernel: its aliases must be named.
    let key_jar = cat.get("key_jar").expect("key_jar").clone();
    assert!(!key_jar.aliases.is_empty());
    for l in after.iter_mut() {
        match l.name.as_str() {
            "kmalloc-cg-512" => l.active_objs += 2000,
            "key_jar" => l.active_objs += 100_000,
            "dentry" => l.active_objs = l.active_objs.saturating_sub(500),
            _ => {}
        }
    }
    let f = slab_finding(
        &before,
        &after,
        Duration::from_secs(2),
        Some(&cat),
        Some(24 << 20),
    )
    .expect("finding");
    let Some(Data::Slab(s)) = &f.data else {
        panic!()
    };
    let names: Vec<&str> = s.top_growth.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["key_jar", "kmalloc-cg-512"]);
    assert_eq!(s.top_growth[0].aliases, key_jar.aliases);
    let k = &s.top_growth[1];
    assert!(
        (k.bytes_per_sec - 2000.0 * 512.0 / 2.0).abs() < 1e-6,
        "{k:?}"
    );
    assert!((k.objs_per_sec - 1000.0).abs() < 1e-6);
    assert_eq!(f.severity, Severity::Warning);
    assert!(f.summary.starts_with("key_jar (merged: "), "{}", f.summary);
    assert_eq!(s.suggested_cache.as_deref(), Some("key_jar"));
    assert!(f
        .details
        .iter()
        .any(|d| d.contains("kmalloc-cg-512") && d.contains("+1000 objs/s")));
}

#[test]
fn slow_growth_is_listed_but_not_a_warning() {
    let before = host_lines();
    let mut after = before.clone();
    let grown = after
        .iter_mut()
        .find(|l| l.name == "kmalloc-512")
        .expect("kmalloc-512");
    grown.active_objs += 10;
    let f = slab_finding(
        &before,
        &after,
        Duration::from_secs(10),
        None,
        Some(24 << 20),
    )
    .expect("finding");
    assert_eq!(f.severity, Severity::Ok);
    assert!(
        f.summary.starts_with("no cache grew faster than"),
        "{}",
        f.summary
    );
    let Some(Data::Slab(s)) = &f.data else {
        panic!()
    };
    assert_eq!(s.top_growth[0].name, "kmalloc-512");
    // Nothing is big or fast: trace what grew at all.
    assert_eq!(s.suggested_cache.as_deref(), Some("kmalloc-512"));
}

#[test]
fn random_kmalloc_copy_is_traced_through_its_base_cache() {
    let root = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/proc/kmalloc-rnd"
    ));
    let cat = Catalogue::read(root).expect("catalogue");
    assert_eq!(
        traceable_name(Some(&cat), "kmalloc-rnd-03-512"),
        "kmalloc-512"
    );
    assert_eq!(traceable_name(Some(&cat), "kmalloc-512"), "kmalloc-512");
    assert_eq!(traceable_name(None, "whatever"), "whatever");
}

// ---- memcg thresholds ----

fn counts(live: u64, dying: u64) -> MemcgCounts {
    MemcgCounts {
        live,
        dying,
        method: String::new(),
    }
}

fn timing(seconds: f64) -> StatTiming {
    StatTiming {
        cgroup: "/".into(),
        usage_bytes: None,
        seconds,
    }
}

#[test]
fn memcg_bands() {
    assert_eq!(memcg_severity(&counts(7, 14), &[]), Severity::Ok);
    assert_eq!(memcg_severity(&counts(100, 150), &[]), Severity::Ok);
    assert_eq!(memcg_severity(&counts(100, 250), &[]), Severity::Warning);
    assert_eq!(memcg_severity(&counts(100, 999), &[]), Severity::Warning);
    assert_eq!(memcg_severity(&counts(100, 1000), &[]), Severity::Critical);
    assert_eq!(memcg_severity(&counts(1000, 5000), &[]), Severity::Warning);
    // The seed node: memory.stat took 9 s.
    assert_eq!(
        memcg_severity(&counts(7, 0), &[timing(9.0)]),
        Severity::Critical
    );
    assert_eq!(
        memcg_severity(&counts(7, 0), &[timing(0.01), timing(1.5)]),
        Severity::Warning
    );
}

// ---- memory band ----

#[test]
fn memory_band_edges() {
    let m = |sunreclaim_kb| MemInfo {
        mem_total_kb: 1000,
        mem_available_kb: 500,
        slab_kb: sunreclaim_kb,
        sreclaimable_kb: 0,
        sunreclaim_kb,
        ..MemInfo::default()
    };
    assert_eq!(memory_finding(&m(99)).severity, Severity::Ok);
    assert_eq!(memory_finding(&m(100)).severity, Severity::Warning);
    assert_eq!(memory_finding(&m(250)).severity, Severity::Critical);
    let zero = MemInfo {
        mem_total_kb: 0,
        ..m(0)
    };
    assert_eq!(memory_finding(&zero).severity, Severity::Ok);
}

// ---- BPF capability ----

#[test]
fn bpf_blockers_and_commands() {
    let features = |release: &str, btf| Features {
        kernel_release: release.to_string(),
        btf,
        kprobes: false,
    };
    let found = TracefsState::Found {
        path: "/sys/kernel/tracing".into(),
        kmem_events: true,
    };
    let f = bpf_finding(true, &features("6.18.44", true), &found, Some("dentry"));
    assert_eq!(f.severity, Severity::Ok);
    let Some(Data::Bpf(b)) = &f.data else {
        panic!()
    };
    assert_eq!(b.next_command, "leaktrace --cache dentry --top");
    assert!(
        f.summary
            .contains("root yes, BTF yes, tracefs yes, kprobes no"),
        "{}",
        f.summary
    );

    let f = bpf_finding(
        true,
        &features("5.4.0-42-generic", false),
        &found,
        Some("dentry"),
    );
    assert_eq!(f.severity, Severity::Warning);
    assert!(
        f.summary.contains("no BPF ring buffer (needs 5.8+)"),
        "{}",
        f.summary
    );
    let Some(Data::Bpf(b)) = &f.data else {
        panic!()
    };
    assert_eq!(
        b.next_command,
        "watch -n 1 \"grep -E '^dentry ' /proc/slabinfo\""
    );
    assert!(f.details.iter().any(|d| d.contains("no BTF")));

    let no_kmem = TracefsState::Found {
        path: "/sys/kernel/tracing".into(),
        kmem_events: false,
    };
    let f = bpf_finding(true, &features("6.1.0", true), &no_kmem, None);
    assert_eq!(f.severity, Severity::Warning);
    assert!(f.summary.contains("no kmalloc tracepoint"), "{}", f.summary);

    let hidden = TracefsState::NotReadable("/sys/kernel/tracing is not readable".into());
    let f = bpf_finding(false, &features("6.1.0", true), &hidden, Some("filp"));
    assert!(f.summary.contains("tracefs unknown"), "{}", f.summary);
    let Some(Data::Bpf(b)) = &f.data else {
        panic!()
    };
    assert_eq!(b.next_command, "sudo leaktrace --cache filp --top");
}

#[test]
fn json_carries_the_same_findings() {
    let r = diagnose_fixture("v1-incident", true);
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(json["schema_version"], 1);
    assert_eq!(
        json["next_command"],
        r.next_command.as_deref().expect("next")
    );
    assert!(json["next_command"]
        .as_str()
        .is_some_and(|c| c.contains("kmalloc-512")));
    let findings = json["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), r.findings.len());
    for (j, f) in findings.iter().zip(&r.findings) {
        assert_eq!(j["check"], f.check);
        assert_eq!(j["summary"], f.summary.as_str());
    }
    let memcgs = findings
        .iter()
        .find(|f| f["check"] == "memcgs")
        .expect("memcgs");
    assert_eq!(memcgs["severity"], "critical");
    assert_eq!(memcgs["data"]["version"], "v1");
    assert_eq!(memcgs["data"]["dying"], 48213 - 10);
    let memory = findings
        .iter()
        .find(|f| f["check"] == "memory")
        .expect("memory");
    assert_eq!(memory["data"]["sunreclaim_kb"], 58u64 * 1024 * 1024);
}

#[test]
fn kprobes_are_seen_through_tracefs_too() {
    let t = TempCopy::of("v1-host", "kprobes");
    let r = diagnose(&t.0, Duration::from_millis(1), true, || {});
    let Data::Bpf(b) = data(&r, "bpf") else {
        panic!()
    };
    assert!(
        !b.kprobes,
        "the captured host has neither kprobe PMU nor kprobe_events"
    );
    fs::write(t.0.join("sys/kernel/tracing/kprobe_events"), "").expect("write");
    let r = diagnose(&t.0, Duration::from_millis(1), true, || {});
    let Data::Bpf(b) = data(&r, "bpf") else {
        panic!()
    };
    assert!(b.kprobes);
    let bpf = r.finding("bpf").expect("bpf");
    assert!(bpf.summary.contains("kprobes yes"), "{}", bpf.summary);
}

// ---- the kernel-memory ledger ----

fn host_ledger(f: impl FnOnce(&mut MemInfo)) -> Ledger {
    let root = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/proc/ledger-6.18"
    ));
    let mut m = meminfo::read(root).expect("ledger-6.18 meminfo");
    f(&mut m);
    Ledger::from_parts(&m, Some((15_916, 15_916)), Some(true))
}

fn ledger_data(f: &Finding) -> &LedgerData {
    match &f.data {
        Some(Data::Ledger(l)) => l,
        _ => panic!("no ledger data: {f:#?}"),
    }
}

#[test]
fn ledger_figures_are_the_fixtures_meminfo() {
    let r = diagnose_fixture("v1-host", true);
    let Data::Ledger(l) = data(&r, "ledger") else {
        panic!("not ledger data")
    };
    let m = meminfo::read(&fixture("v1-host")).expect("meminfo");
    let at = |name: &str| {
        let b = l.buckets.iter().find(|b| b.name == name).expect(name);
        (b.before_kb, b.after_kb)
    };
    let both = |v: u64| (Some(v as i64), Some(v as i64));
    assert_eq!(at("slab_unreclaimable"), both(m.sunreclaim_kb));
    assert_eq!(at("slab_reclaimable"), both(m.sreclaimable_kb));
    assert_eq!(at("kernel_stack"), both(m.kernel_stack_kb));
    assert_eq!(at("page_tables"), both(m.page_tables_kb));
    assert_eq!(at("vmalloc"), both(m.vmalloc_used_kb));
    assert_eq!(at("percpu"), both(m.percpu_kb.expect("Percpu")));
    // A still fixture grows nothing: no verdict, no next command from the ledger.
    assert_eq!(l.growing, None);
    assert_eq!(severity(&r, "ledger"), Severity::Ok);
    assert!(r
        .next_command
        .as_deref()
        .is_some_and(|c| c.contains("--cache")));
}

#[test]
fn ledger_names_the_source_of_the_growing_bucket() {
    let before = host_ledger(|_| {});
    let secs = Duration::from_secs(10);
    let rate = GROWTH_FLOOR_BYTES_PER_SEC;
    type Grow = fn(&mut MemInfo);
    let cases: [(&str, Grow, &str); 5] = [
        (
            "percpu",
            |m| m.percpu_kb = m.percpu_kb.map(|p| p + 8 * 1024),
            "leaktrace --percpu",
        ),
        // Pages taken straight from the page allocator: only MemFree falls.
        (
            "unexplained",
            |m| m.mem_free_kb -= 200 * 1024,
            "leaktrace --pages",
        ),
        (
            "slab_unreclaimable",
            |m| {
                m.sunreclaim_kb += 64 * 1024;
                m.slab_kb += 64 * 1024;
                m.mem_free_kb -= 64 * 1024;
            },
            "leaktrace --cache kmalloc-512 --top",
        ),
        (
            "kernel_stack",
            |m| {
                // With VMAP_STACK the stacks are vmalloc pages too; the smaller growth
                // (vmalloc's other users) must not win over the stacks.
                m.kernel_stack_kb += 16 * 1024;
                m.vmalloc_used_kb += 8 * 1024;
                m.mem_free_kb -= 16 * 1024;
            },
            "leaktrace --cache task_struct --top",
        ),
        (
            "vmalloc",
            |m| {
                m.vmalloc_used_kb += 16 * 1024;
                m.mem_free_kb -= 16 * 1024;
            },
            "sort -k2 -n /proc/vmallocinfo | tail",
        ),
    ];
    for (bucket, grow, next) in cases {
        let after = host_ledger(grow);
        let f = ledger_finding(&before, &after, secs, Some("kmalloc-512"), rate);
        let l = ledger_data(&f);
        assert_eq!(l.growing, Some(bucket), "{f:#?}");
        assert_eq!(l.next_command.as_deref(), Some(next), "{bucket}");
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.summary.contains(next), "{}", f.summary);
    }
}

#[test]
fn ledger_thresholds_ignore_noise() {
    let before = host_ledger(|_| {});
    let rate = GROWTH_FLOOR_BYTES_PER_SEC;
    let quiet = |f: &Finding| ledger_data(f).growing.is_none();
    // 3 MiB of Percpu and 30 MiB of residual are under the floors.
    let after = host_ledger(|m| {
        m.percpu_kb = m.percpu_kb.map(|p| p + 3 * 1024);
        m.mem_free_kb -= 30 * 1024;
    });
    let f = ledger_finding(&before, &after, Duration::from_secs(2), None, rate);
    assert!(quiet(&f), "{f:#?}");
    // 40 MiB of residual passes the floor, but not when the per-CPU lists moved 32 MiB
    // between the reads around meminfo (their mean, 16 MiB lower, adds 16 MiB: 56 < 64).
    let m = meminfo::read(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/proc/ledger-6.18"
    )))
    .expect("meminfo");
    let grown = MemInfo {
        mem_free_kb: m.mem_free_kb - 40 * 1024,
        ..m
    };
    let settled = Ledger::from_parts(&grown, Some((15_916, 15_916)), Some(true));
    let f = ledger_finding(&before, &settled, Duration::from_secs(2), None, rate);
    assert_eq!(ledger_data(&f).growing, Some("unexplained"));
    let racing = Ledger::from_parts(&grown, Some((7_724, 15_916)), Some(true));
    let f = ledger_finding(&before, &racing, Duration::from_secs(2), None, rate);
    assert!(quiet(&f), "{f:#?}");
    // 8 MiB of Percpu over an hour is under the rate (1% of RAM per hour here).
    let after = host_ledger(|m| m.percpu_kb = m.percpu_kb.map(|p| p + 8 * 1024));
    let hour_rate = 24_683_784.0 * 1024.0 * GROWTH_RAM_PCT_PER_HOUR / 100.0 / 3600.0;
    let f = ledger_finding(&before, &after, Duration::from_secs(3600), None, hour_rate);
    assert!(quiet(&f), "{f:#?}");
}

#[test]
fn ledger_text_shows_every_bucket_and_the_formula() {
    let before = host_ledger(|_| {});
    let after = host_ledger(|m| m.mem_free_kb -= 200 * 1024);
    let f = ledger_finding(
        &before,
        &after,
        Duration::from_secs(3),
        None,
        GROWTH_FLOOR_BYTES_PER_SEC,
    );
    for field in [
        "SUnreclaim",
        "SReclaimable",
        "KReclaimable - SReclaimable",
        "KernelStack",
        "PageTables",
        "SecPageTables",
        "Percpu",
        "VmallocUsed",
        "Hugetlb",
        "Zswap",
        "the residual",
    ] {
        assert!(
            f.details.iter().any(|d| d.contains(field)),
            "{field}: {:#?}",
            f.details
        );
    }
    assert!(
        f.summary
            .starts_with("unexplained (the residual) grew +200.0M"),
        "{}",
        f.summary
    );
    assert!(f.details.iter().any(|d| d.contains("inside VmallocUsed")));
}
