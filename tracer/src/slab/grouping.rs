//! Rows by what a leak's processes share: a leak spread over many
//! short-lived processes (exec probes, mount helpers) holds one object per
//! process, and only their sum under one command, parent, cgroup, container,
//! pod or stack shows it. Built from a report's complete process list.

use std::collections::HashMap;

use crate::{
    kernel::cgroup_paths as paths,
    slab::report::{
        Counts, GroupBy, GroupReport, MergedStack, ProcessReport, SortKey, StackReport,
    },
};

/// `processes` aggregated by `by` (nothing for [`GroupBy::Process`]), largest
/// first by `sort`. Every process lands in exactly one group, so the groups'
/// counts add up to the processes'.
pub fn group(processes: &[ProcessReport], by: GroupBy, sort: SortKey) -> Vec<GroupReport> {
    if by == GroupBy::Process {
        return Vec::new();
    }
    if by == GroupBy::Stack {
        return merge_stacks(processes.iter())
            .into_iter()
            .map(stack_group)
            .collect();
    }
    let mut order: Vec<String> = Vec::new();
    let mut members: HashMap<String, Vec<&ProcessReport>> = HashMap::new();
    for p in processes {
        let key = key_of(p, by);
        members
            .entry(key.clone())
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push(p);
    }
    let mut groups: Vec<GroupReport> = order
        .into_iter()
        .filter_map(|key| {
            let ps = members.remove(&key)?;
            let mut counts = Counts::default();
            for p in &ps {
                add(&mut counts, &p.counts);
            }
            Some(GroupReport {
                processes: ps.len() as u64,
                exited: ps.iter().filter(|p| p.exited).count() as u64,
                counts,
                alloc_rate: ps.iter().map(|p| p.alloc_rate).sum(),
                growth_rate: ps.iter().map(|p| p.growth_rate).sum(),
                stacks: merge_stacks(ps.iter().copied()),
                key: label(&key, &ps, by),
            })
        })
        .collect();
    groups.sort_by(|a, b| {
        sort.compare((&b.counts, b.alloc_rate), (&a.counts, a.alloc_rate))
            .then(a.key.cmp(&b.key))
    });
    groups
}

/// Every process's stacks merged by their frames, largest outstanding bytes
/// first: the final report's "top stacks across all processes".
pub fn top_stacks(processes: &[ProcessReport]) -> Vec<MergedStack> {
    merge_stacks(processes.iter())
}

/// Rows of one stack from several processes summed. Two rows are one stack
/// when their user return addresses and kernel frames are the same and no
/// user frame's names disagree (a process that exited before its mappings
/// were read, an exec probe's child, leaves `[unknown]` frames at the very
/// addresses its parent's copy resolves), or when all their frames read the
/// same (one binary at other addresses in each process).
fn merge_stacks<'a>(processes: impl Iterator<Item = &'a ProcessReport>) -> Vec<MergedStack> {
    let mut by_addr: HashMap<(Vec<String>, Vec<u64>), Vec<usize>> = HashMap::new();
    let mut merged: Vec<MergedStack> = Vec::new();
    for p in processes {
        for s in &p.stacks {
            let one = MergedStack {
                stack: s.clone(),
                processes: 1,
                exited: u64::from(p.exited),
            };
            let ids = by_addr
                .entry((s.kernel.clone(), user_addrs(s)))
                .or_default();
            match ids
                .iter()
                .copied()
                .find(|&i| names_agree(&merged[i].stack.user, &s.user))
            {
                Some(i) => absorb(&mut merged[i], one),
                None => {
                    ids.push(merged.len());
                    merged.push(one);
                }
            }
        }
    }
    let mut by_text: HashMap<(Vec<String>, Vec<String>), usize> = HashMap::new();
    let mut out: Vec<MergedStack> = Vec::new();
    for m in merged {
        match by_text.get(&(m.stack.kernel.clone(), m.stack.user.clone())) {
            Some(&i) => absorb(&mut out[i], m),
            None => {
                by_text.insert((m.stack.kernel.clone(), m.stack.user.clone()), out.len());
                out.push(m);
            }
        }
    }
    out.sort_by(|a, b| {
        (b.stack.counts.outstanding_bytes, b.stack.counts.allocs)
            .cmp(&(a.stack.counts.outstanding_bytes, a.stack.counts.allocs))
    });
    out
}

/// Adds `from` to `into`, keeping the better-resolved user frames.
fn absorb(into: &mut MergedStack, from: MergedStack) {
    let (t, f) = (&mut into.stack, &from.stack);
    add(&mut t.counts, &f.counts);
    t.outstanding_low += f.outstanding_low;
    t.outstanding_high += f.outstanding_high;
    t.stratum_outstanding += f.stratum_outstanding;
    t.estimated |= f.estimated;
    t.partial |= f.partial;
    if unknowns(&f.user) < unknowns(&t.user) {
        t.user = f.user.clone();
        t.user_locations = f.user_locations.clone();
    }
    into.processes += from.processes;
    into.exited += from.exited;
}

fn user_addrs(s: &StackReport) -> Vec<u64> {
    s.user_locations.iter().map(|l| l.addr).collect()
}

fn is_unknown(frame: &str) -> bool {
    frame.starts_with("[unknown]")
}

fn unknowns(frames: &[String]) -> usize {
    frames.iter().filter(|f| is_unknown(f)).count()
}

/// Same length, and every frame named on both sides has the same name.
fn names_agree(a: &[String], b: &[String]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || is_unknown(x) || is_unknown(y))
}

/// A stack as a group: its processes are those with a row under it.
fn stack_group(m: MergedStack) -> GroupReport {
    GroupReport {
        key: stack_label(&m.stack),
        processes: m.processes,
        exited: m.exited,
        counts: m.stack.counts.clone(),
        // Rates are kept per process, not per stack.
        alloc_rate: 0.0,
        growth_rate: 0.0,
        stacks: vec![m],
    }
}

/// The innermost kernel frame past the allocator and the innermost user frame.
fn stack_label(s: &StackReport) -> String {
    let kernel = s
        .kernel
        .iter()
        .find(|f| !is_allocator(f))
        .or(s.kernel.first())
        .map_or("?", String::as_str);
    match s.user.first() {
        Some(u) => format!("{kernel} <- {u}"),
        None => kernel.to_string(),
    }
}

fn is_allocator(frame: &str) -> bool {
    const ALLOCATORS: [&str; 4] = ["kmem_cache_alloc", "__kmalloc", "kmalloc", "__kmem_cache"];
    ALLOCATORS.iter().any(|a| frame.starts_with(a))
}

pub(crate) fn key_of(p: &ProcessReport, by: GroupBy) -> String {
    match by {
        GroupBy::Process | GroupBy::Stack => p.tgid.to_string(),
        GroupBy::Parent if p.ppid == 0 => "parent unknown".to_string(),
        GroupBy::Parent => p.ppid.to_string(),
        _ => key_of_names(
            &p.comm,
            p.cgroup_id,
            p.cgroup.as_deref(),
            p.pod.as_deref(),
            by,
        ),
    }
}

/// The key of what a process was named, not who it was: its comm, cgroup
/// and pod (also what `--all-caches` keeps of processes folded after they
/// exited). By process, stack or parent: the comm.
pub(crate) fn key_of_names(
    comm: &str,
    cgroup_id: u64,
    cgroup: Option<&str>,
    pod: Option<&str>,
    by: GroupBy,
) -> String {
    let decoded = || cgroup.map(paths::decode).unwrap_or_default();
    match by {
        GroupBy::Comm | GroupBy::Process | GroupBy::Stack | GroupBy::Parent => comm.to_string(),
        // Refused without --all-caches, where one run traces one cache.
        GroupBy::Cache => "every cache".to_string(),
        GroupBy::Cgroup => cgroup.map_or_else(|| format!("cgroup id {cgroup_id}"), str::to_string),
        GroupBy::Container => decoded()
            .container_id
            .unwrap_or_else(|| "(no container)".to_string()),
        // The name where kubelet gives one (without the container), else the UID.
        GroupBy::Pod => match pod {
            Some(pod) => pod.splitn(3, '/').take(2).collect::<Vec<_>>().join("/"),
            None => decoded().pod_uid.unwrap_or_else(|| "(no pod)".to_string()),
        },
    }
}

/// A parent's key is its PID; its name comes from whichever child saw it.
fn label(key: &str, members: &[&ProcessReport], by: GroupBy) -> String {
    if by != GroupBy::Parent || members.iter().all(|p| p.ppid == 0) {
        return key.to_string();
    }
    match members.iter().find_map(|p| p.parent_comm.as_deref()) {
        Some(comm) => format!("{key} ({comm})"),
        None => key.to_string(),
    }
}

fn add(sum: &mut Counts, c: &Counts) {
    sum.outstanding += c.outstanding;
    sum.outstanding_bytes += c.outstanding_bytes;
    sum.allocs += c.allocs;
    sum.frees += c.frees;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(kernel: &[&str], user: &[&str], outstanding: u64) -> StackReport {
        StackReport {
            kstack: crate::slab::report::StackId::EMPTY,
            ustack: crate::slab::report::StackId::EMPTY,
            counts: Counts {
                outstanding,
                outstanding_bytes: outstanding * 64,
                allocs: outstanding,
                frees: 0,
            },
            estimated: false,
            outstanding_low: outstanding,
            outstanding_high: outstanding,
            partial: true,
            stratum_outstanding: outstanding,
            kernel: kernel.iter().map(|s| s.to_string()).collect(),
            user: user.iter().map(|s| s.to_string()).collect(),
            kernel_locations: Vec::new(),
            user_locations: Vec::new(),
        }
    }

    fn proc(tgid: u32, ppid: u32, comm: &str, stacks: Vec<StackReport>) -> ProcessReport {
        let mut counts = Counts::default();
        for s in &stacks {
            add(&mut counts, &s.counts);
        }
        ProcessReport {
            tgid,
            start_ns: u64::from(tgid) * 10,
            ppid,
            parent_comm: (ppid == 7).then(|| "reaper".to_string()),
            exited: tgid != 7,
            context: None,
            comm: comm.to_string(),
            cmdline: None,
            cgroup_id: 1,
            cgroup: Some(format!(
                "/kubepods/burstable/pod{}/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
            )),
            pod: None,
            charged_elsewhere: None,
            counts,
            alloc_rate: 1.0,
            growth_rate: 1.0,
            fingerprinted: Some(true),
            unfingerprinted_allocs: 0,
            stacks,
        }
    }

    /// Fifty exited children of one parent, one object each, and a bystander
    /// holding more than any one of them.
    fn probes() -> Vec<ProcessReport> {
        let mut ps: Vec<ProcessReport> = (100..150)
            .map(|t| {
                proc(
                    t,
                    7,
                    "sh",
                    vec![stack(
                        &["kmem_cache_alloc_node", "copy_process"],
                        &["fork"],
                        1,
                    )],
                )
            })
            .collect();
        ps.push(proc(
            7,
            1,
            "bystander",
            vec![stack(&["__kmalloc", "user_preparse"], &["add_key"], 5)],
        ));
        ps
    }

    #[test]
    fn many_one_object_processes_sum_under_their_parent() {
        let groups = group(&probes(), GroupBy::Parent, SortKey::Outstanding);
        assert_eq!(groups.len(), 2);
        let g = &groups[0];
        assert_eq!(g.key, "7 (reaper)");
        assert_eq!((g.processes, g.exited, g.counts.outstanding), (50, 50, 50));
        assert_eq!(g.stacks.len(), 1);
        assert_eq!(
            (g.stacks[0].processes, g.stacks[0].stack.counts.outstanding),
            (50, 50)
        );
        assert_eq!(groups[1].key, "1");
        let total: u64 = groups.iter().map(|g| g.counts.outstanding).sum();
        assert_eq!(total, 55);
    }

    #[test]
    fn comm_container_pod_and_stack_keys() {
        let ps = probes();
        let by_comm = group(&ps, GroupBy::Comm, SortKey::Outstanding);
        assert_eq!(
            (by_comm[0].key.as_str(), by_comm[0].counts.outstanding),
            ("sh", 50)
        );
        let pods = group(&ps, GroupBy::Pod, SortKey::Outstanding);
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].key, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
        let containers = group(&ps, GroupBy::Container, SortKey::Outstanding);
        assert_eq!(containers[0].counts.outstanding, 55);
        let stacks = group(&ps, GroupBy::Stack, SortKey::Outstanding);
        assert_eq!(stacks[0].key, "copy_process <- fork");
        assert_eq!((stacks[0].processes, stacks[0].exited), (50, 50));
        assert!(group(&ps, GroupBy::Process, SortKey::Outstanding).is_empty());
        let top = top_stacks(&ps);
        assert_eq!(
            (top[0].processes, top[0].stack.counts.outstanding),
            (50, 50)
        );
    }

    #[test]
    fn an_exited_process_unresolved_frames_join_the_resolved_same_addresses() {
        let with_addr = |user: &str| {
            let mut s = stack(&["copy_process"], &[user], 1);
            s.user_locations = vec![crate::slab::report::Location {
                addr: 0x7f00_0000_1353,
                frames: vec![user.to_string()],
                module: None,
            }];
            s
        };
        let ps = vec![
            proc(
                100,
                7,
                "leakgen",
                vec![with_addr("[unknown] 0x7f0000001353")],
            ),
            proc(101, 7, "leakgen", vec![with_addr("_Fork+0x23")]),
            proc(
                102,
                7,
                "leakgen",
                vec![with_addr("[unknown] 0x7f0000001353")],
            ),
            // Same address, another name: another binary, not merged.
            proc(103, 7, "other", vec![with_addr("main+0x10")]),
            // Same names at another address (ASLR): merged.
            proc(
                104,
                7,
                "leakgen",
                vec![stack(&["copy_process"], &["_Fork+0x23"], 1)],
            ),
        ];
        let top = top_stacks(&ps);
        assert_eq!(top.len(), 2);
        let fork = top.iter().find(|m| m.processes == 4).expect("merged");
        assert_eq!(fork.stack.user, vec!["_Fork+0x23".to_string()]);
        assert_eq!((fork.stack.counts.outstanding, fork.exited), (4, 4));
    }

    #[test]
    fn cycle_visits_every_grouping() {
        let mut g = GroupBy::Process;
        for _ in 0..GroupBy::CYCLE.len() {
            g = g.next();
        }
        assert_eq!(g, GroupBy::Process);
        assert_eq!(GroupBy::Parent.name(), "parent");
    }
}
