//! Leaks as incidents look: objects spread over many short-lived processes,
//! grouped by what those processes share; and the cgroup column of a process
//! in a memory cgroup, on cgroup v1 and v2. Every test here needs root.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use leaktrace_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn named_caches_work() -> bool {
    tracepoint_has_field("kmem", "kmem_cache_alloc", "name")
        || raw_tracepoint_described("kmem_cache_alloc")
}

/// The group whose key starts with `prefix`.
fn group<'a>(report: &'a Value, prefix: &str) -> Option<&'a Value> {
    report["groups"]
        .as_array()?
        .iter()
        .find(|g| g["key"].as_str().is_some_and(|k| k.starts_with(prefix)))
}

/// 50 exec-probe-style children each leave one zombie `task_struct`,
/// allocated by the child (which exits at once) and held under leakgen, a
/// subreaper that never reaps. By process they are 50 rows of 1; by parent one
/// row of 50; and the final report's top stacks hold them as one stack.
#[test]
fn zombie_probes_sum_under_their_parent_and_one_stack() {
    const N: u64 = 50;
    skip_unless!(
        named_caches_work(),
        "kmem:kmem_cache_alloc names no cache on this kernel, so --cache task_struct is refused"
    );
    let mut tracer = Tracer::start(&[
        "--cache",
        "task_struct",
        "--group-by",
        "parent",
        // Every allocation's own full stack: with 1-in-64 draws a drawn child's
        // full stack is a row apart from the others' shared-frames row.
        "--exact",
        "--top",
        "--interval",
        "250ms",
    ])
    .expect("start");
    let gen = Generator::start("zombies", &N.to_string()).expect("leakgen zombies");
    let key = format!("{} ", gen.pid);
    let seen = tracer
        .wait_for("one parent row holding the zombies", WAIT, |r| {
            group(r, &key).is_some_and(|g| count(g, "outstanding") >= N)
        })
        .expect("grouped by parent");
    assert_eq!(seen["group_by"], "parent");
    let g = group(&seen, &key).expect("row");
    assert_eq!(g["key"], format!("{} (leakgen)", gen.pid), "{g}");
    assert!(count(g, "processes") >= N, "{g}");
    // The children exited right after forking: their rows are kept, marked.
    assert!(count(g, "exited") >= N, "{g}");
    // Each child holds one: the processes never merge into one row.
    let children: Vec<&Value> = seen["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["ppid"] == gen.pid && count(p, "outstanding") > 0)
        .collect();
    assert!(children.len() as u64 >= N, "{} children", children.len());
    assert!(children.iter().all(|p| count(p, "outstanding") == 1));

    // Stop while the zombies are held: the final report's top stacks.
    let (code, report) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    let top = report["top_stacks"].as_array().expect("top_stacks");
    let biggest = top.first().expect("a top stack");
    assert!(
        count(biggest, "outstanding") >= N && count(biggest, "processes") >= N,
        "top stack: {biggest}"
    );
    assert!(
        biggest["kernel"].as_array().is_some_and(|k| k
            .iter()
            .any(|f| f.as_str().is_some_and(|f| f.starts_with("copy_process")))),
        "{biggest}"
    );
    // Groups and top stacks add up to the tracked total, like every export.
    let total = count(&report["totals"], "outstanding");
    let grouped: u64 = report["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| count(g, "outstanding"))
        .sum();
    let stacked: u64 = top.iter().map(|s| count(s, "outstanding")).sum();
    assert_eq!((grouped, stacked), (total, total));
    gen.finish().expect("leakgen exits");
}

/// Short-lived `mount` helpers in a private mount namespace, each leaving one
/// `struct mount` (mnt_cache) that the namespace holds after the helper
/// exits: by command name one row of N.
#[test]
fn mount_helpers_sum_under_their_comm() {
    const N: u64 = 20;
    skip_unless!(
        named_caches_work(),
        "kmem:kmem_cache_alloc names no cache on this kernel, so --cache mnt_cache is refused"
    );
    let tools = ["unshare", "mount", "umount"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    skip_unless!(tools, "util-linux unshare/mount/umount not installed");
    let mut tracer = Tracer::start(&[
        "--cache",
        "mnt_cache",
        "--group-by",
        "comm",
        "--top",
        "--interval",
        "250ms",
    ])
    .expect("start");
    // Speaks leakgen's hold protocol; the mounts go with the namespace.
    let script = format!(
        r#"d=$(mktemp -d /tmp/leaktrace-mnt.XXXXXX) || exit 1
for i in $(seq 1 {N}); do mkdir "$d/$i" && mount -t tmpfs lt "$d/$i" || exit 1; done
echo "READY $$"
read x
for i in $(seq 1 {N}); do umount "$d/$i"; rmdir "$d/$i"; done
rmdir "$d"
echo "RELEASED $$"
read x
exit 0"#
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let gen = Generator::start_command(cmd).expect("mount helpers");
    let seen = tracer
        .wait_for("the helpers' mounts under one comm row", WAIT, |r| {
            group(r, "mount").is_some_and(|g| g["key"] == "mount" && count(g, "outstanding") >= N)
        })
        .expect("grouped by comm");
    let g = group(&seen, "mount").expect("row");
    assert!(count(g, "processes") >= N, "{g}");
    // No single helper holds more than its own mount.
    let most = seen["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["comm"] == "mount")
        .map(|p| count(p, "outstanding"))
        .max()
        .unwrap_or(0);
    assert!(most < N, "one mount process holds {most}");
    gen.finish().expect("helpers' shell exits");
    let _ = tracer.stop(libc::SIGINT);
}

/// Where the memory controller is: (v1 hierarchy mount) or the cgroup2 mount.
fn memory_hierarchy() -> Option<(u8, PathBuf)> {
    let cgroups = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let v1_id = cgroups.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&"memory")).then(|| f.get(1)?.parse::<u32>().ok())?
    });
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = |want: &dyn Fn(&str, &str) -> bool| {
        mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let (fstype, _, opts) = (r.next()?, r.next()?, r.next()?);
            let point = left.split_whitespace().nth(4)?;
            want(fstype, opts).then(|| PathBuf::from(point))
        })
    };
    if v1_id.is_some_and(|id| id != 0) {
        if let Some(m) = mount(&|t, o| t == "cgroup" && o.split(',').any(|o| o == "memory")) {
            return Some((1, m));
        }
    }
    mount(&|t, _| t == "cgroup2").map(|m| (2, m))
}

/// Pipes from a process in its own memory cgroup (its cgroup2 cgroup where
/// memory is on cgroup2): the CGROUP column names that cgroup, not `/`.
#[test]
fn pipes_in_a_memory_cgroup_show_its_path() {
    const N: u64 = 50;
    let hierarchy = memory_hierarchy();
    skip_unless!(hierarchy.is_some(), "no memory cgroup hierarchy mounted");
    let Some((version, mount)) = hierarchy else {
        return;
    };
    // pipe_buffer arrays (16 x 40 bytes, GFP_KERNEL_ACCOUNT): kmalloc-cg-1k
    // from 5.14, kmalloc-1k before.
    let cache = if slab_cache_exists("kmalloc-cg-1k") {
        "kmalloc-cg-1k"
    } else {
        "kmalloc-1k"
    };
    let name = format!("leaktrace-pipes-{}", std::process::id());
    let dir = mount.join(&name);
    std::fs::create_dir(&dir).expect("mkdir memory cgroup");
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut tracer =
        Tracer::start(&["--cache", cache, "--top", "--interval", "250ms"]).expect("start");
    assert!(
        tracer
            .stderr_seen
            .iter()
            .any(|l| l.contains(if version == 1 {
                "memory cgroup on the v1 hierarchy"
            } else {
                "cgroup2 cgroup"
            })),
        "{:?}",
        tracer.stderr_seen
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && exec {} pipes {N}",
        dir.display(),
        leakgen_bin().display()
    ));
    let mut gen = Generator::start_command(cmd).expect("leakgen pipes in the cgroup");
    let pid = gen.pid;
    let want = format!("/{name}");
    let seen = tracer
        .wait_for("the pipes under the generator", WAIT, |r| {
            process(r, pid).is_some_and(|p| count(p, "outstanding") >= N)
        })
        .expect("pipes attributed");
    let p = process(&seen, pid).expect("listed");
    assert_eq!(
        p["cgroup"],
        want.as_str(),
        "v{version} hierarchy at {}: {p}",
        mount.display()
    );
    let c = cgroup_row(&seen, &want);
    assert!(count(c, "outstanding") >= N, "{c}");
    gen.release().expect("release");
    gen.finish().expect("leakgen exits");
    let _ = tracer.stop(libc::SIGINT);
}

/// A task that moves to another memory cgroup between two batches of
/// allocations: each batch counts under the cgroup it was made in. The kernel
/// side reuses a task's memcg between its allocations only while
/// `task->cgroups` is unchanged; a stale memcg would put both batches in the
/// first cgroup.
#[test]
fn a_task_moved_to_another_memory_cgroup_counts_in_each() {
    const N: u64 = 100;
    let hierarchy = memory_hierarchy();
    skip_unless!(hierarchy.is_some(), "no memory cgroup hierarchy mounted");
    let Some((version, mount)) = hierarchy else {
        return;
    };
    let names = ["a", "b"].map(|x| format!("leaktrace-move-{x}-{}", std::process::id()));
    let dirs = names.clone().map(|n| mount.join(n));
    for d in &dirs {
        std::fs::create_dir(d).expect("mkdir memory cgroup");
    }
    let _cleanup = dirs.clone().map(RemoveOnDrop);
    let mut tracer =
        Tracer::start(&["--cache", "kmalloc-512", "--top", "--interval", "250ms"]).expect("start");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && exec {} keys-twice {N}",
        dirs[0].display(),
        leakgen_bin().display()
    ));
    let mut gen = Generator::start_command(cmd).expect("leakgen keys-twice in cgroup a");
    let [a, b] = names.map(|n| format!("/{n}"));
    let outstanding = |r: &Value, path: &str| {
        r["cgroups"]
            .as_array()
            .and_then(|rows| rows.iter().find(|c| c["path"] == path))
            .map_or(0, |c| count(c, "outstanding"))
    };
    tracer
        .wait_for("the first batch in a", WAIT, |r| outstanding(r, &a) >= N)
        .expect("first batch attributed");
    std::fs::write(dirs[1].join("cgroup.procs"), gen.pid.to_string()).expect("move to b");
    gen.advance("MORE").expect("second batch");
    let seen = tracer
        .wait_for("the second batch in b", WAIT, |r| outstanding(r, &b) >= N)
        .unwrap_or_else(|e| panic!("v{version}: second batch not under {b}: {e:#}"));
    let in_a = outstanding(&seen, &a);
    assert!(
        (N..N + N / 2).contains(&in_a),
        "v{version}: {in_a} outstanding in {a}, {} in {b}: the second batch must not count \
         in the cgroup the task left",
        outstanding(&seen, &b)
    );
    gen.release().expect("release");
    gen.finish().expect("leakgen exits");
    let _ = tracer.stop(libc::SIGINT);
}

/// A process in a cgroup laid out as kubelet's cgroupfs driver makes them
/// (`kubepods/burstable/pod<uid>/<container id>`), with kubelet's log
/// directories naming that pod and container (a fixture tree given with
/// --pods-root): the report, the cgroup table and `--group-by pod` say
/// `namespace/pod/container`, not the UID.
#[test]
fn kubernetes_cgroups_are_named_by_namespace_pod_and_container() {
    const N: u64 = 40;
    const UID: &str = "5a0c1b2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d";
    const ID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let hierarchy = memory_hierarchy();
    skip_unless!(hierarchy.is_some(), "no memory cgroup hierarchy mounted");
    let Some((_, mount)) = hierarchy else {
        return;
    };
    let top = mount.join(format!("kubepods-leaktrace-{}", std::process::id()));
    let pod_dir = top.join("burstable").join(format!("pod{UID}"));
    let container = pod_dir.join(ID);
    std::fs::create_dir_all(&container).expect("mkdir the pod's cgroups");
    // An array drops its elements first to last: innermost first, as a cgroup
    // goes only once its children have.
    let _cleanup = [
        container.clone(),
        pod_dir.clone(),
        top.join("burstable"),
        top.clone(),
    ]
    .map(RemoveOnDrop);
    let pods_root = std::env::temp_dir().join(format!("leaktrace-pods-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pods_root);
    std::fs::create_dir_all(pods_root.join(format!("var/log/pods/payments_api-7d9f_{UID}/app")))
        .expect("pod log dir");
    std::fs::create_dir_all(pods_root.join("var/log/containers")).expect("containers dir");
    std::fs::write(
        pods_root.join(format!("var/log/containers/api-7d9f_payments_app-{ID}.log")),
        "",
    )
    .expect("container log link");
    let mut tracer = Tracer::start(&[
        "--cache",
        "kmalloc-512",
        "--top",
        "--interval",
        "250ms",
        "--group-by",
        "pod",
        "--pods-root",
        &pods_root.display().to_string(),
    ])
    .expect("start");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && exec {} keys {N}",
        container.display(),
        leakgen_bin().display()
    ));
    let mut gen = Generator::start_command(cmd).expect("leakgen keys in the pod's cgroup");
    let pid = gen.pid;
    let want = "payments/api-7d9f/app";
    let seen = tracer
        .wait_for("the keys under the named pod", WAIT, |r| {
            process(r, pid).is_some_and(|p| count(p, "outstanding") >= N)
        })
        .expect("keys attributed");
    let p = process(&seen, pid).expect("listed");
    assert_eq!(p["pod"], want, "{p}");
    let row = seen["cgroups"]
        .as_array()
        .and_then(|rows| rows.iter().find(|c| c["pod"] == want))
        .unwrap_or_else(|| panic!("no cgroup row named {want}: {}", seen["cgroups"]));
    assert!(count(row, "outstanding") >= N, "{row}");
    let g =
        group(&seen, "payments/api-7d9f").unwrap_or_else(|| panic!("groups: {}", seen["groups"]));
    assert_eq!(g["key"], "payments/api-7d9f", "{g}");
    gen.release().expect("release");
    gen.finish().expect("leakgen exits");
    let _ = tracer.stop(libc::SIGINT);
    let _ = std::fs::remove_dir_all(&pods_root);
}

/// The report's cgroup-table row for `path`; panics (failing the test) when absent.
fn cgroup_row<'a>(report: &'a Value, path: &str) -> &'a Value {
    report["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .find(|c| c["path"] == path)
        .unwrap_or_else(|| panic!("cgroup {path} not in the cgroup table: {report}"))
}

/// Removes a cgroup directory once its processes are gone (rmdir may need a
/// moment after the last one exits).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}

fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Remote charging: inotify events are kmalloc'ed by the process that touched
/// the file but charged to the watcher's memory cgroup (`set_active_memcg`).
/// The allocating process's row says which memcg paid, and the cgroup table
/// counts the objects under the payer.
#[test]
fn remote_charges_name_the_memcg_that_pays() {
    const N: u64 = 200;
    let hierarchy = memory_hierarchy();
    skip_unless!(hierarchy.is_some(), "no memory cgroup hierarchy mounted");
    skip_unless!(
        slab_cache_exists("kmalloc-cg-96"),
        "no kmalloc-cg-96 (accounted kmalloc caches are 5.14+)"
    );
    let Some((version, mount)) = hierarchy else {
        return;
    };
    if version == 2 {
        // The watcher's cgroup gets a memcg of its own only with the memory
        // controller enabled below the root (the root may hold processes).
        let _ = std::fs::write(mount.join("cgroup.subtree_control"), "+memory");
    }
    let name = format!("leaktrace-charged-{}", std::process::id());
    let dir = mount.join(&name);
    std::fs::create_dir(&dir).expect("mkdir memory cgroup");
    let _cleanup = RemoveOnDrop(dir.clone());
    let own_memcg = dir.join(if version == 1 {
        "memory.usage_in_bytes"
    } else {
        "memory.current"
    });
    skip_unless!(
        own_memcg.exists(),
        "{} has no memcg of its own (memory controller not enabled there)",
        dir.display()
    );
    let mut tracer = Tracer::start(&["--cache", "kmalloc-cg-96", "--top", "--interval", "250ms"])
        .expect("start");
    let mut cmd = Command::new(leakgen_bin());
    cmd.args(["charged", &N.to_string()])
        .env("LEAKGEN_MEMCG", &dir);
    let mut gen = Generator::start_command(cmd).expect("leakgen charged");
    let pid = gen.pid;
    let want = format!("/{name}");
    let seen = tracer
        .wait_for("the events charged to the watcher", WAIT, |r| {
            process(r, pid).is_some_and(|p| {
                count(p, "outstanding") >= N && count(&p["charged_elsewhere"], "allocs") >= N
            })
        })
        .expect("remote charges seen");
    let p = process(&seen, pid).expect("listed");
    assert_eq!(
        p["charged_elsewhere"]["cgroup"],
        want.as_str(),
        "v{version} hierarchy at {}: {p}",
        mount.display()
    );
    assert_ne!(
        p["cgroup"],
        want.as_str(),
        "the allocator is not in it: {p}"
    );
    let payer = cgroup_row(&seen, &want);
    assert!(count(payer, "outstanding") >= N, "{payer}");
    gen.release().expect("release");
    gen.finish().expect("leakgen exits");
    let _ = tracer.stop(libc::SIGINT);
}
