//! Allocations made while serving an interrupt belong to no process: the
//! report counts them under `[softirq]`/`[irq]`, not under whoever was
//! interrupted. Needs root.

use std::time::Duration;

use leaktrace_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// A listener that never accepts and a client that connects N times, over
/// loopback in leakgen's own network namespace: each connection's request
/// socket is allocated by the TCP receive path in the NET_RX softirq, which
/// loopback runs in the client's own bottom half. They are `[softirq]`'s, not
/// the client's (nor the listener's, which allocates nothing here).
#[test]
fn queued_connections_are_softirq_not_the_client() {
    const N: u64 = 200;
    skip_unless!(
        tracepoint_has_field("kmem", "kmem_cache_alloc", "name")
            || raw_tracepoint_described("kmem_cache_alloc"),
        "kmem:kmem_cache_alloc names no cache on this kernel, so --cache request_sock_TCP is refused"
    );
    let mut tracer = Tracer::start(&[
        "--cache",
        "request_sock_TCP",
        "--top",
        "--interval",
        "250ms",
    ])
    .expect("start");
    let unknown = tracer
        .stderr_seen
        .iter()
        .find(|l| l.contains("interrupt context unknown"))
        .cloned();
    skip_unless!(unknown.is_none(), "{}", unknown.unwrap_or_default());
    let gen = Generator::start("backlog", &N.to_string()).expect("leakgen backlog");
    let listener = gen.pid;
    let seen = tracer
        .wait_for("the queued request sockets under [softirq]", WAIT, |r| {
            r["processes"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["context"] == "softirq" && count(p, "outstanding") >= N)
            })
        })
        .expect("softirq row");
    let processes = seen["processes"].as_array().expect("processes");
    let softirq = processes
        .iter()
        .find(|p| p["context"] == "softirq")
        .expect("row");
    assert_eq!(softirq["comm"], "[softirq]");
    assert_eq!(softirq["tgid"], 0);
    assert!(!softirq["exited"].as_bool().unwrap_or(true), "{softirq}");
    // The client is leakgen's child; it and the listener hold none of them.
    for p in processes {
        let charged = count(p, "outstanding");
        if p["tgid"] == listener || p["ppid"] == listener {
            assert_eq!(charged, 0, "charged to the listener or its client: {p}");
        }
    }
    // Every tracked object is accounted somewhere: the softirq row holds
    // what the connections made.
    assert!(count(&seen["totals"], "outstanding") >= N);
    let stack = &softirq["stacks"][0];
    assert!(
        stack["kernel"]
            .as_array()
            .is_some_and(|k| k.iter().any(|f| f
                .as_str()
                .is_some_and(|f| f.starts_with("inet_reqsk_alloc")))),
        "{stack}"
    );
    // The interrupted task's user stack is not the allocation's.
    assert!(
        stack["user"].as_array().is_some_and(|u| u.is_empty()),
        "{stack}"
    );
    gen.finish().expect("leakgen exits");
    let _ = tracer.stop(libc::SIGINT);
}
