use super::*;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/proc")).join(name)
}

fn catalogue(name: &str) -> Catalogue {
    Catalogue::read(&fixture(name)).unwrap()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---- name parsing ----

#[test]
fn kmalloc_names() {
    use KmallocKind::*;
    let kind = |n: &str| match parse_kmalloc_name(n) {
        Some(KmallocName::Kind { kind, size, .. }) => Some((kind, size)),
        _ => None,
    };
    assert_eq!(kind("kmalloc-8"), Some((Normal, 8)));
    assert_eq!(kind("kmalloc-96"), Some((Normal, 96)));
    assert_eq!(kind("kmalloc-192"), Some((Normal, 192)));
    assert_eq!(kind("kmalloc-1k"), Some((Normal, 1024)));
    assert_eq!(kind("kmalloc-1024"), Some((Normal, 1024)));
    assert_eq!(kind("kmalloc-8k"), Some((Normal, 8192)));
    assert_eq!(kind("kmalloc-2M"), Some((Normal, 2 << 20)));
    assert_eq!(kind("kmalloc-cg-512"), Some((Cgroup, 512)));
    assert_eq!(kind("kmalloc-rcl-4k"), Some((Reclaimable, 4096)));
    assert_eq!(kind("dma-kmalloc-2k"), Some((Dma, 2048)));
    assert_eq!(
        parse_kmalloc_name("kmalloc-rnd-07-1k"),
        Some(KmallocName::Random {
            size: 1024,
            size_text: "1k"
        })
    );
    for not_kmalloc in [
        "kmalloc_buckets",
        "kmalloc-",
        "kmalloc-0",
        "kmalloc-x",
        "kmalloc-cg-",
        "kmalloc-rnd-512",
        "memdup_user-512",
        "kmalloc-99999999999",
    ] {
        assert_eq!(parse_kmalloc_name(not_kmalloc), None, "{not_kmalloc}");
    }
    assert_eq!(size_spellings(1024), strs(&["1k", "1024"]));
    assert_eq!(size_spellings(512), strs(&["512"]));
    assert_eq!(size_spellings(1 << 20), strs(&["1M", "1048576"]));
}

// ---- catalogue of this host (Linux 6.18, SLUB) ----

#[test]
fn host_catalogue_groups_merged_caches() {
    let cat = catalogue("host-6.18");
    assert!(cat.iter().all(|c| c.sysfs_dir.is_some()));
    assert!(cat.notes().is_empty(), "{:?}", cat.notes());

    let k512 = cat.get("kmalloc-512").unwrap();
    assert_eq!(k512.sysfs_dir.as_deref(), Some("kmalloc-512"));
    assert!(k512.aliases.is_empty());
    assert_eq!((k512.object_size, k512.slab_size), (512, 512));
    assert_eq!(k512.kernel_name.as_deref(), Some("kmalloc-512"));
    assert!(!k512.debug);

    let sg = cat.get("sgpool-8").unwrap();
    assert_eq!(sg.sysfs_dir.as_deref(), Some(":0000256"));
    assert_eq!(sg.aliases, strs(&["biovec-16", "key_jar"]));
    assert_eq!(sg.kernel_name.as_deref(), Some("key_jar"));

    let filp = cat.get("filp").unwrap();
    assert_eq!((filp.object_size, filp.slab_size), (184, 192));
    assert!(cat.get(":0000256").is_none(), "unique ids are not names");
    assert!(cat.iter().all(|c| !c.name.starts_with(':')));
}

#[test]
fn host_slabinfo_names_are_the_kernel_names() {
    let cat = catalogue("host-6.18");
    let lines = slabinfo::read(&fixture("host-6.18")).unwrap();
    for l in &lines {
        let info = cat.get(&l.name).unwrap_or_else(|| panic!("{}", l.name));
        assert_eq!(info.kernel_name.as_deref(), Some(l.name.as_str()));
        assert_eq!(u64::from(info.slab_size), l.objsize, "{}", l.name);
    }
    // and every sysfs group has exactly one slabinfo line
    assert!(cat.iter().all(|c| c.kernel_name.is_some()));
}

#[test]
fn host_kmalloc_512() {
    let cat = catalogue("host-6.18");
    let s = select(&cat, "kmalloc-512").unwrap();
    assert_eq!(s.cache, "kmalloc-512");
    assert_eq!(s.object_size, 512);
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
    assert!(s.also_kmalloc.is_empty());
    assert!(s.named.is_empty());
    assert!(s.aliases_included.is_empty());
    assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
    assert!(s.notes[0].contains("memdup_user-512, msg_msg-512"));
}

#[test]
fn host_kmalloc_cg_512() {
    let cat = catalogue("host-6.18");
    let s = select(&cat, "kmalloc-cg-512").unwrap();
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Cgroup)));
    assert!(s.also_kmalloc.is_empty());
    assert!(s.named.is_empty());
    assert!(s.aliases_included.is_empty());
}

#[test]
fn host_kmalloc_1k_in_both_spellings() {
    let cat = catalogue("host-6.18");
    for spelled in ["kmalloc-1k", "kmalloc-1024", " kmalloc-1K "] {
        let s = select(&cat, spelled).unwrap();
        assert_eq!(s.cache, "kmalloc-1k");
        assert_eq!(s.kmalloc, Some((1024, KmallocKind::Normal)));
    }
    let s = select(&cat, "dma-kmalloc-8192").unwrap();
    assert_eq!(s.cache, "dma-kmalloc-8k");
    assert_eq!(s.kmalloc, Some((8192, KmallocKind::Dma)));
    let s = select(&cat, "kmalloc-rcl-96").unwrap();
    assert_eq!(s.kmalloc, Some((96, KmallocKind::Reclaimable)));
}

#[test]
fn host_dentry_and_filp() {
    let cat = catalogue("host-6.18");
    let s = select(&cat, "dentry").unwrap();
    assert_eq!(s.object_size, 192);
    assert_eq!(s.kmalloc, None);
    assert!(s.also_kmalloc.is_empty());
    assert_eq!(s.named, strs(&["dentry"]));
    assert!(s.aliases_included.is_empty());
    assert!(s.notes.is_empty());

    // bytes_alloc is s->size (192), not the 184-byte object
    let s = select(&cat, "filp").unwrap();
    assert_eq!(s.object_size, 192);
    assert_eq!(s.named, strs(&["filp"]));
    assert_eq!(s.kmalloc, None);
}

#[test]
fn host_merged_alias_matches_kernel_name_first() {
    let cat = catalogue("host-6.18");
    let s = select(&cat, "biovec-16").unwrap();
    assert_eq!(s.cache, "biovec-16");
    assert_eq!(s.object_size, 256);
    assert_eq!(s.kmalloc, None);
    assert_eq!(s.named, strs(&["key_jar", "biovec-16", "sgpool-8"]));
    assert_eq!(s.aliases_included, strs(&["key_jar", "sgpool-8"]));
}

#[test]
fn host_unknown_names_get_suggestions() {
    let cat = catalogue("host-6.18");
    let err = select(&cat, "kmallok-512").unwrap_err();
    let SelectError::Unknown { name, suggestions } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(name, "kmallok-512");
    assert_eq!(
        &suggestions[..2],
        &strs(&["kmalloc-512", "kmalloc-cg-512"])[..]
    );
    assert!(suggestions.len() <= MAX_SUGGESTIONS);
    assert!(
        err.to_string().starts_with(
            "unknown slab cache 'kmallok-512'; did you mean: kmalloc-512, kmalloc-cg-512"
        ),
        "{err}"
    );
    assert!(err.to_string().ends_with("? (see 'leaktrace caches')"));

    assert_eq!(cat.suggest("dentri")[0], "dentry");
    assert_eq!(cat.suggest("dent")[0], "dentry");
    assert_eq!(cat.suggest("kmlaloc-1k")[0], "kmalloc-1k");
    assert_eq!(cat.suggest("filpp")[0], "filp");
    let inode = cat.suggest("inode");
    assert_eq!(inode.len(), MAX_SUGGESTIONS);
    assert!(inode.iter().all(|n| n.contains("inode")), "{inode:?}");

    let err = select(&cat, "zzzzzzzzzzzz").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown slab cache 'zzzzzzzzzzzz' (see 'leaktrace caches')"
    );
    assert!(matches!(
        select(&cat, "").unwrap_err(),
        SelectError::Unknown { .. }
    ));
}

#[test]
fn host_case_insensitive_unique_match() {
    let cat = catalogue("host-6.18");
    assert_eq!(select(&cat, "tcp").unwrap().cache, "TCP");
    assert_eq!(select(&cat, "TCP").unwrap().named, strs(&["TCP"]));
}

#[test]
fn host_kmalloc_buckets_cannot_be_selected_alone() {
    let cat = catalogue("host-6.18");
    let err = select(&cat, "msg_msg-512").unwrap_err();
    assert_eq!(
        err,
        SelectError::KmallocBucket {
            name: "msg_msg-512".into(),
            kmalloc: "kmalloc-512".into()
        }
    );
    assert!(err.to_string().contains("CONFIG_SLAB_BUCKETS"));
    // families that only look alike are ordinary caches
    assert!(select(&cat, "bio-120").is_ok());
    assert!(select(&cat, "erofs_pcluster-16").is_ok());
}

#[test]
fn host_has_no_random_kmalloc_caches() {
    let cat = catalogue("host-6.18");
    let err = select(&cat, "kmalloc-rnd-01-512").unwrap_err();
    let SelectError::Unknown { suggestions, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(suggestions[0], "kmalloc-512");
}

#[test]
fn host_big_alias_group_fits() {
    let cat = catalogue("host-6.18");
    let s = select(&cat, "rtable").unwrap();
    assert!(s.named.len() <= MAX_NAMED);
    assert_eq!(
        s.named[0],
        cat.get("rtable").unwrap().kernel_name.clone().unwrap()
    );
}

// ---- hand-made: kmalloc-cg-512 and biovec-32 merged into kmalloc-512 ----

#[test]
fn merged_kmalloc_512_covers_cg_and_biovec() {
    let cat = catalogue("merged");
    let s = select(&cat, "kmalloc-512").unwrap();
    assert_eq!(s.object_size, 512);
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
    assert_eq!(s.also_kmalloc, vec![(512, KmallocKind::Cgroup)]);
    // biovec-32 allocations carry the kmem_cache's own name, kmalloc-512
    assert_eq!(s.named, strs(&["kmalloc-512", "biovec-32"]));
    assert_eq!(s.aliases_included, strs(&["biovec-32", "kmalloc-cg-512"]));
    assert!(s.notes.is_empty(), "{:?}", s.notes);
}

#[test]
fn merged_kmalloc_cg_512() {
    let cat = catalogue("merged");
    let s = select(&cat, "kmalloc-cg-512").unwrap();
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Cgroup)));
    assert_eq!(s.also_kmalloc, vec![(512, KmallocKind::Normal)]);
    assert_eq!(s.named, strs(&["kmalloc-512", "biovec-32"]));
    assert_eq!(s.aliases_included, strs(&["biovec-32", "kmalloc-512"]));
}

#[test]
fn merged_named_alias_of_kmalloc() {
    let cat = catalogue("merged");
    let s = select(&cat, "biovec-32").unwrap();
    assert_eq!(s.kmalloc, None);
    assert_eq!(
        s.also_kmalloc,
        vec![(512, KmallocKind::Normal), (512, KmallocKind::Cgroup)]
    );
    assert_eq!(s.named, strs(&["kmalloc-512", "biovec-32"]));
    assert_eq!(s.aliases_included, strs(&["kmalloc-512", "kmalloc-cg-512"]));
}

#[test]
fn merged_kmalloc_1k_is_separate() {
    let cat = catalogue("merged");
    let s = select(&cat, "kmalloc-1024").unwrap();
    assert_eq!(s.cache, "kmalloc-1k");
    assert_eq!(s.kmalloc, Some((1024, KmallocKind::Normal)));
    assert!(s.also_kmalloc.is_empty() && s.named.is_empty() && s.aliases_included.is_empty());
}

#[test]
fn merged_debug_cache_reports_padded_size() {
    let cat = catalogue("merged");
    let s = select(&cat, "kmalloc-2k").unwrap();
    assert_eq!(s.object_size, 2304);
    assert_eq!(s.kmalloc, Some((2304, KmallocKind::Normal)));
    assert!(s.notes.iter().any(|n| n.contains("SLUB debugging")));
    assert!(cat.get("kmalloc-2k").unwrap().debug);
}

#[test]
fn merged_too_many_aliases_matches_kernel_name_only() {
    let cat = catalogue("merged");
    let s = select(&cat, "fs_cache").unwrap();
    assert_eq!(s.named, strs(&["vmap_area"]));
    assert_eq!(s.aliases_included.len(), 9);
    assert!(s.notes.iter().any(|n| n.contains("only that name")));
}

// ---- hand-made: CONFIG_RANDOM_KMALLOC_CACHES ----

#[test]
fn rnd_kmalloc_512_includes_all_copies() {
    let cat = catalogue("kmalloc-rnd");
    let s = select(&cat, "kmalloc-512").unwrap();
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
    assert!(s.also_kmalloc.is_empty());
    assert!(s.named.is_empty());
    let expected: Vec<String> = (1..=15)
        .map(|i| format!("kmalloc-rnd-{i:02}-512"))
        .collect();
    assert_eq!(s.aliases_included, expected);
    assert!(s
        .notes
        .iter()
        .any(|n| n.contains("CONFIG_RANDOM_KMALLOC_CACHES") && n.contains("15 copies")));
    assert!(s.notes.iter().any(|n| n.contains("memdup_user-512")));

    let s = select(&cat, "kmalloc-1k").unwrap();
    assert_eq!(s.aliases_included.len(), 15);
    assert!(s.aliases_included.iter().all(|n| n.ends_with("-1k")));
}

#[test]
fn rnd_copy_alone_is_an_error() {
    let cat = catalogue("kmalloc-rnd");
    let err = select(&cat, "kmalloc-rnd-03-512").unwrap_err();
    assert_eq!(
        err,
        SelectError::RandomKmalloc {
            name: "kmalloc-rnd-03-512".into(),
            base: "kmalloc-512".into()
        }
    );
    assert!(err.to_string().contains("select kmalloc-512"), "{err}");
    let err = select(&cat, "kmalloc-rnd-03-1024").unwrap_err();
    assert!(matches!(err, SelectError::RandomKmalloc { ref base, .. } if base == "kmalloc-1k"));
}

#[test]
fn rnd_other_kinds_are_not_randomized() {
    let cat = catalogue("kmalloc-rnd");
    let s = select(&cat, "kmalloc-cg-512").unwrap();
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Cgroup)));
    assert!(s.aliases_included.is_empty());
    assert!(!s.notes.iter().any(|n| n.contains("RANDOM")));
    assert!(matches!(
        select(&cat, "memdup_user-256").unwrap_err(),
        SelectError::KmallocBucket { .. }
    ));
}

// ---- hand-made: nokmem, /proc/slabinfo unreadable ----

#[test]
fn nokmem_kmalloc_512_also_takes_accounted_kmallocs() {
    let cat = catalogue("nokmem");
    assert!(cat.notes()[0].contains("could not read /proc/slabinfo"));
    let s = select(&cat, "kmalloc-512").unwrap();
    assert!(
        !s.notes.iter().any(|n| n.contains("/proc/slabinfo")),
        "{:?}",
        s.notes
    );
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
    assert_eq!(s.also_kmalloc, vec![(512, KmallocKind::Cgroup)]);
    assert!(s.notes.iter().any(|n| n.contains("no kmalloc-cg-* caches")));
}

#[test]
fn nokmem_kmalloc_cg_explains_where_it_went() {
    let cat = catalogue("nokmem");
    let err = select(&cat, "kmalloc-cg-1024").unwrap_err();
    assert_eq!(
        err,
        SelectError::KmallocKindAbsent {
            name: "kmalloc-cg-1024".into(),
            kind: KmallocKind::Cgroup,
            served_by: "kmalloc-1k".into()
        }
    );
    assert!(err.to_string().contains("cgroup.memory=nokmem"), "{err}");
    assert!(err.to_string().ends_with("select kmalloc-1k"), "{err}");
}

#[test]
fn nokmem_without_slabinfo_matches_every_alias() {
    let cat = catalogue("nokmem");
    let s = select(&cat, "sgpool-8").unwrap();
    assert_eq!(cat.get("sgpool-8").unwrap().kernel_name, None);
    assert_eq!(s.named, strs(&["biovec-16", "key_jar", "sgpool-8"]));
    assert!(s
        .notes
        .iter()
        .any(|n| n.contains("could not read") && n.contains("all of them are matched")));

    let err = select(&cat, "vmap_area").unwrap_err();
    let SelectError::TooManyNames { cache, names } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(cache, "vmap_area");
    assert_eq!(names.len(), 9);
    assert!(err.to_string().contains("run as root"));
}

// ---- incident capture: no sysfs, /proc/slabinfo only ----

#[test]
fn incident_falls_back_to_slabinfo() {
    let cat = catalogue("incident");
    assert!(cat.iter().all(|c| c.sysfs_dir.is_none()));
    assert!(cat.notes()[0].contains("/sys/kernel/slab is absent"));
    let s = select(&cat, "kmalloc-512").unwrap();
    assert_eq!(s.kmalloc, Some((512, KmallocKind::Normal)));
    assert!(s.also_kmalloc.is_empty());
    assert!(s
        .notes
        .iter()
        .any(|n| n.contains("/sys/kernel/slab is absent")));
    let s = select(&cat, "dentry").unwrap();
    assert_eq!(s.named, strs(&["dentry"]));
    assert_eq!(s.object_size, 192);
}

#[test]
fn nothing_readable_is_an_error() {
    let err = Catalogue::read(Path::new("/nonexistent-root")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("/nonexistent-root/sys/kernel/slab is absent"),
        "{msg}"
    );
    assert!(msg.contains("/nonexistent-root/proc/slabinfo"), "{msg}");
}

/// A throwaway tree for states that cannot live in git (dangling links, empty dirs).
struct TempTree(std::path::PathBuf);

impl TempTree {
    fn new(tag: &str) -> TempTree {
        let dir = std::env::temp_dir().join(format!("leaktrace-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sys/kernel/slab")).unwrap();
        fs::create_dir_all(dir.join("proc")).unwrap();
        TempTree(dir)
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn empty_sysfs_falls_back_to_slabinfo() {
    let t = TempTree::new("empty-sysfs");
    fs::copy(
        fixture("incident").join("proc/slabinfo"),
        t.0.join("proc/slabinfo"),
    )
    .unwrap();
    let cat = Catalogue::read(&t.0).unwrap();
    assert!(cat.iter().all(|c| c.sysfs_dir.is_none()));
    assert!(cat.get("kmalloc-512").is_some());
}

#[test]
fn dangling_alias_is_noted_not_fatal() {
    let t = TempTree::new("dangling");
    let slab = t.0.join("sys/kernel/slab");
    fs::create_dir(slab.join("dentry")).unwrap();
    for (attr, value) in [("object_size", "192"), ("slab_size", "192"), ("align", "8")] {
        fs::write(slab.join("dentry").join(attr), format!("{value}\n")).unwrap();
    }
    std::os::unix::fs::symlink(":0000064", slab.join("gone")).unwrap();
    let cat = Catalogue::read(&t.0).unwrap();
    assert!(cat.get("gone").is_none());
    assert!(
        !cat.get("dentry").unwrap().debug,
        "missing debug flags mean off"
    );
    assert!(cat.notes().iter().any(|n| n.contains("gone -> :0000064")));

    fs::write(slab.join("dentry/slab_size"), "lots\n").unwrap();
    let err = format!("{:#}", Catalogue::read(&t.0).unwrap_err());
    assert!(
        err.contains("dentry/slab_size: 'lots' is not a number"),
        "{err}"
    );
}

#[test]
fn edit_distance_basics() {
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("kmallok", "kmalloc"), 1);
    assert_eq!(edit_distance("kmlaloc", "kmalloc"), 1);
    assert_eq!(edit_distance("dentry", "dentry"), 0);
}
