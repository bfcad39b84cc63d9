//! leaktrace's outputs opened by the tools people use in an incident: `go tool
//! pprof`, inferno (FlameGraph), `promtool`, a terminal (tmux), and the
//! DaemonSet manifest. Each test needs root (it traces the real kernel) and the
//! tools `cargo xtask setup` installs; a missing one fails the test saying so.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use leaktrace_tests::*;

/// `cargo xtask vm-test` guests have no apt, no toolchains and no checkout of the
/// repository; these tests render outputs for host tools (go tool pprof,
/// promtool, tmux, inferno) and read repo files, independent of the kernel.
macro_rules! skip_in_vm_guest {
    () => {
        skip_unless!(
            std::env::var_os("LEAKTRACE_VM_GUEST").is_none(),
            "outputs are checked with host tools and repository files, which a VM guest does not have"
        )
    };
}
use serde_json::Value;

// Tests here that look for a held object's user frames in the default mode
// pass `--stack-sample 4` (or hold 1,000 objects): their subject is not the
// sampling, and at 1 in 4 the chance that none of 64 held objects is drawn
// (leaving them under the call site only, marked partial) is (3/4)^64 ≈ 1e-8.
const WAIT: Duration = Duration::from_secs(30);
const N: u64 = 300;

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tmp/outputs")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails the test when a host tool is missing: installing it is setup's job,
/// not a test's, and a skip would hide a CI machine that lacks it.
fn require_tool(tool: &str, package: &str) {
    assert!(
        have(tool),
        "`{tool}` (Debian package {package}) is not on PATH; run `cargo xtask setup` as root"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Outstanding objects/bytes on `pid`'s stacks through `user_preparse`, as the
/// final JSON report states them: what every other output must repeat.
fn keys_in_report(report: &Value, pid: u32) -> (u64, u64) {
    stacks_matching(report, pid, "user_preparse", "leak_keys").fold((0, 0), |(o, b), s| {
        (
            o + count(s, "outstanding"),
            b + count(s, "outstanding_bytes"),
        )
    })
}

/// One run of `leakgen keys N` under leaktrace writing every file output;
/// returns the final report, the generator's pid and the directory.
fn held_keys_with_files(name: &str) -> (Value, u32, PathBuf) {
    let dir = scratch(name);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (pprof, folded, svg) = (path("keys.pb.gz"), path("keys.folded"), path("keys.svg"));
    let args = [
        "--cache",
        "kmalloc-512",
        "--top",
        "--interval",
        "250ms",
        "--frames",
        "64",
        "--stack-sample",
        "4",
        "--pprof",
        &pprof,
        "--folded",
        &folded,
        "--flamegraph",
        &svg,
    ];
    let mut tracer = Tracer::start(&args).expect("start leaktrace");
    let gen = Generator::start("keys", &N.to_string()).expect("leakgen keys");
    let pid = gen.pid;
    tracer
        .wait_for("the held keys on their stack", WAIT, |r| {
            outstanding_on(r, pid, "user_preparse", "leak_keys") >= N
        })
        .expect("attribution");
    // Stop while the keys are still held: the files describe a live leak.
    let (code, report) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    assert_eq!(report["kind"], "final");
    drop(gen);
    (report, pid, dir)
}

#[test]
fn pprof_opens_in_go_tool_pprof_with_the_held_object_count() {
    skip_in_vm_guest!();
    require_tool("go", "golang-go");
    let (report, pid, dir) = held_keys_with_files("pprof");
    let (objects, bytes) = keys_in_report(&report, pid);
    assert!(
        objects >= N,
        "report: {objects} outstanding on user_preparse"
    );
    let profile = dir.join("keys.pb.gz");
    let pprof = |extra: &[&str]| {
        let mut cmd = Command::new("go");
        cmd.args(["tool", "pprof"])
            .args(extra)
            .arg(&profile)
            .env("HOME", &dir)
            .env("PPROF_TMPDIR", &dir);
        run(&mut cmd)
    };
    // Only the generator's samples, by its pid label; then user_preparse's
    // cumulative value is exactly what the report holds for it.
    let focus = format!("-tagfocus=pid={pid}");
    // Bytes unscaled (-unit=B), so the comparison is exact.
    for (index, unit, want) in [
        ("outstanding_objects", "-unit=minimum", objects),
        ("outstanding_space", "-unit=B", bytes),
    ] {
        let top = pprof(&[
            "-top",
            "-cum",
            "-nodecount=100",
            unit,
            &format!("-sample_index={index}"),
            &focus,
        ]);
        let line = top
            .lines()
            .find(|l| l.split_whitespace().last() == Some("user_preparse"))
            .unwrap_or_else(|| panic!("no user_preparse row in go tool pprof -top:\n{top}"));
        let cum = line.split_whitespace().nth(3).expect("cum column");
        assert_eq!(
            parse_pprof_value(cum),
            want,
            "{index}: go tool pprof says {cum} for user_preparse, the report {want}:\n{top}"
        );
    }
    let traces = pprof(&["-traces", "-sample_index=outstanding_objects", &focus]);
    for want in [
        "user_preparse",
        "__do_sys_add_key",
        "leak_keys",
        "leakgen",
        &pid.to_string(),
        "kmalloc-512",
    ] {
        assert!(traces.contains(want), "-traces lacks {want:?}:\n{traces}");
    }
    // Frames leaktrace cannot name (libc.so.6 has no symbol for the frame
    // that calls main) sit in their file's Mapping, with its build id, so
    // pprof shows the library instead of a fake function.
    let raw = pprof(&["-raw", "-symbolize=none"]);
    let libc = raw
        .lines()
        .find(|l| l.contains("/libc.so.6 "))
        .unwrap_or_else(|| panic!("no libc.so.6 Mapping in go tool pprof -raw:\n{raw}"));
    let build_id = libc.split_whitespace().nth(3).unwrap_or("");
    assert!(
        build_id.len() == 40 && build_id.chars().all(|c| c.is_ascii_hexdigit()),
        "libc's Mapping has no GNU build id: {libc}"
    );
    let by_address = pprof(&[
        "-top",
        "-addresses",
        "-symbolize=none",
        "-sample_index=alloc_objects",
        "-nodecount=1000",
        &focus,
    ]);
    assert!(
        by_address.contains("[libc.so.6]") && !by_address.contains("[unknown]"),
        "go tool pprof -top -addresses:\n{by_address}"
    );
}

/// `-top` prints counts plainly and bytes scaled ("150kB", "1.46MB").
fn parse_pprof_value(text: &str) -> u64 {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let num: f64 = num
        .parse()
        .unwrap_or_else(|_| panic!("pprof value {text:?}"));
    let scale = match unit {
        "" | "B" => 1.0,
        "kB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unknown pprof unit {other:?} in {text:?}"),
    };
    (num * scale).round() as u64
}

/// Every field of a real report is described in docs/json-schema.md.
fn assert_documented(report: &Value) {
    fn keys(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    out.push(k.clone());
                    keys(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
            _ => {}
        }
    }
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/json-schema.md"),
    )
    .expect("docs/json-schema.md");
    let mut all = Vec::new();
    keys(report, &mut all);
    for k in all {
        assert!(
            doc.contains(&format!("`{k}`")),
            "field {k:?} is not documented in docs/json-schema.md"
        );
    }
    assert_eq!(report["schema_version"], 3);
}

#[test]
fn folded_stacks_round_trip_through_inferno_and_the_svg_has_the_frames() {
    skip_in_vm_guest!();
    let (report, pid, dir) = held_keys_with_files("folded");
    assert_documented(&report);
    let (_, bytes) = keys_in_report(&report, pid);
    let folded = std::fs::read_to_string(dir.join("keys.folded")).expect("folded file");
    // Default weight: outstanding bytes. The generator's keys, summed over its
    // lines through user_preparse, are what the report says they hold.
    let prefix = format!("leakgen [{pid}];");
    let mut weight = 0;
    for line in folded.lines() {
        let (stack, w) = line.rsplit_once(' ').expect("folded line has a weight");
        let w: u64 = w.parse().expect("numeric weight");
        assert!(w > 0, "zero-weight line {line:?}");
        if stack.starts_with(&prefix) && stack.contains(";user_preparse;") {
            let frames: Vec<&str> = stack.split(';').collect();
            let main = frames
                .iter()
                .position(|f| f.ends_with("main"))
                .expect("main");
            let syscall = frames
                .iter()
                .position(|f| *f == "__do_sys_add_key")
                .expect("syscall frame");
            assert!(main < syscall, "root-first order: {line}");
            // Leaf last: the allocator itself.
            assert!(
                frames.last().is_some_and(|f| f.contains("kmalloc")),
                "leaf is not the allocator: {line}"
            );
            weight += w;
        }
    }
    assert_eq!(weight, bytes, "folded bytes vs report:\n{folded}");

    // inferno reads the file back (the library inferno-flamegraph runs).
    let mut opts = inferno::flamegraph::Options::default();
    opts.count_name = "bytes".to_string();
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut opts, folded.lines(), &mut svg).expect("inferno");
    let svg = String::from_utf8(svg).expect("utf-8 svg");
    let ours = std::fs::read_to_string(dir.join("keys.svg")).expect("flame graph file");
    for svg in [&svg, &ours] {
        assert!(svg.starts_with("<?xml"), "not an SVG");
        for frame in [
            "user_preparse",
            "__do_sys_add_key",
            "leak_keys",
            &prefix[..prefix.len() - 1],
        ] {
            assert!(svg.contains(frame), "flame graph lacks {frame:?}");
        }
    }
    // Same input, same renderer: the in-process graph and the round trip agree
    // on the frames (titles differ by design).
    let titles = |s: &str| {
        let mut t: Vec<String> = s
            .match_indices("<title>")
            .map(|(i, _)| {
                s[i + 7..]
                    .split("</title>")
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        t.sort();
        t
    };
    assert_eq!(titles(&svg), titles(&ours));
}

/// A running `leaktrace --metrics 127.0.0.1:0`; the port is read from stderr.
struct Scraped {
    child: std::process::Child,
    addr: String,
}

impl Scraped {
    fn start() -> Scraped {
        let child = Command::new(leaktrace_bin())
            .args([
                "--cache",
                "kmalloc-512",
                "--interval",
                "250ms",
                "--metrics",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn leaktrace");
        // Owned by the guard at once, so a failed wait below still reaps it.
        let mut scraped = Scraped {
            child,
            addr: String::new(),
        };
        let err = scraped.child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no metrics address on stderr: {seen:?}"));
            if let Some(rest) = line.split_once("metrics at http://") {
                scraped.addr = rest.1.trim_end_matches("/metrics").to_string();
                return scraped;
            }
            seen.push(line);
        }
    }

    fn scrape(&self) -> String {
        let mut conn = TcpStream::connect(&self.addr).expect("connect to /metrics");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(conn, "GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr).expect("request");
        let mut resp = String::new();
        conn.read_to_string(&mut resp).expect("response");
        let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        body.to_string()
    }
}

impl Drop for Scraped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sample(body: &str, metric: &str, labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(labels))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn prometheus_scrape_shows_the_held_keys_and_passes_promtool() {
    skip_in_vm_guest!();
    require_tool("promtool", "prometheus");
    let tracer = Scraped::start();
    let mut gen = Generator::start("keys", &N.to_string()).expect("leakgen keys");
    let pid = gen.pid;
    let labels = format!("pid=\"{pid}\",comm=\"leakgen\"");
    let wait = |pred: &dyn Fn(f64) -> bool, what: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let body = tracer.scrape();
            let v = sample(&body, "leaktrace_process_outstanding_objects", &labels);
            if v.is_some_and(pred) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "no scrape showed {what}; last:\n{body}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    };
    let body = wait(&|v| v >= N as f64, "the held keys");
    assert!(
        sample(
            &body,
            "leaktrace_outstanding_objects",
            "cache=\"kmalloc-512\""
        )
        .is_some_and(|v| v >= N as f64),
        "{body}"
    );
    let dir = scratch("metrics");
    std::fs::write(dir.join("scrape.txt"), &body).expect("save scrape");
    let scrape = std::fs::File::open(dir.join("scrape.txt")).expect("open scrape");
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(scrape)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Live, not a snapshot of the start: freeing shows up in the next scrapes.
    gen.release().expect("release");
    wait(&|v| v < N as f64, "the keys freed");
    let mut conn = TcpStream::connect(&tracer.addr).expect("connect");
    write!(conn, "GET /nope HTTP/1.0\r\n\r\n").expect("request");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("response");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}

fn tmux(args: &[&str]) -> String {
    run(Command::new("tmux").args(args))
}

fn pane(session: &str) -> String {
    tmux(&["capture-pane", "-p", "-t", session])
}

fn wait_pane(session: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = pane(session);
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "pane never showed {what}:\n{text}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[test]
fn tui_under_tmux_sorts_expands_pauses_and_restores_the_terminal() {
    skip_in_vm_guest!();
    let session = start_tui("keys");
    let s = session.0.as_str();

    const N: u64 = 700;
    let gen = Generator::start("keys", &N.to_string()).expect("leakgen keys");
    let pid = gen.pid.to_string();
    let row = |t: &str| {
        table(t)
            .into_iter()
            .find(|l| l.split_whitespace().next() == Some(pid.as_str()))
    };
    // The OUTSTANDING column: the keys' payloads plus the keyring's own
    // kmalloc-512 objects (links), so at least N while held.
    let held = |r: &str| column(r, 2);
    let text = wait_pane(s, "the generator's row with its keys", |t| {
        row(t).is_some_and(|r| r.contains("leakgen") && held(&r) >= N)
    });
    // Default order: most outstanding first.
    let outstanding: Vec<u64> = table(&text).iter().map(|r| column(r, 2)).collect();
    assert!(
        outstanding.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by outstanding:\n{text}"
    );

    // Move the cursor (the row marked '>') to the generator; Enter expands it.
    let selected = || {
        pane(s)
            .lines()
            .any(|l| l.starts_with('>') && column(&l[1..], 0).to_string() == pid)
    };
    for _ in 0..40 {
        if selected() {
            break;
        }
        tmux(&["send-keys", "-t", s, "Down"]);
        thread::sleep(Duration::from_millis(150));
    }
    assert!(selected(), "could not select the generator:\n{}", pane(s));
    tmux(&["send-keys", "-t", s, "Enter"]);
    wait_pane(s, "the expanded stack", |t| {
        t.contains("stack #1")
            && t.contains("k user_preparse")
            && row(t).is_some_and(|r| r.contains("[-]"))
    });
    // Sort by PID ascending: the arrow moves to the PID column and the rows follow.
    tmux(&["send-keys", "-t", s, "n"]);
    tmux(&["send-keys", "-t", s, "r"]);
    let text = wait_pane(s, "sort by pid ascending", |t| t.contains("PID▲"));
    let pids: Vec<u64> = table(&text).iter().map(|r| column(r, 0)).collect();
    assert!(
        pids.len() > 1 && pids.windows(2).all(|w| w[0] < w[1]),
        "not sorted by pid:\n{text}"
    );
    // Pause freezes the rows while the keys are released; resume shows it.
    tmux(&["send-keys", "-t", s, "p"]);
    wait_pane(s, "the pause banner", |t| t.contains("PAUSED"));
    let mut gen = gen;
    gen.release().expect("release");
    thread::sleep(Duration::from_millis(1000));
    let paused = pane(s);
    assert!(
        row(&paused).is_some_and(|r| held(&r) >= N),
        "paused screen changed:\n{paused}"
    );
    tmux(&["send-keys", "-t", s, "p"]);
    wait_pane(s, "the freed keys after resume", |t| {
        !t.contains("PAUSED") && row(t).is_some_and(|r| held(&r) < N)
    });
    tmux(&["send-keys", "-t", s, "?"]);
    wait_pane(s, "the long help", |t| t.contains("close help"));

    tmux(&["send-keys", "-t", s, "q"]);
    assert_restored(s);
}

/// Process rows of the live view: lines under the header starting with a pid
/// (the selected row's '>' marker removed).
fn table(screen: &str) -> Vec<String> {
    screen
        .lines()
        .skip_while(|l| !l.contains("OUTSTANDING"))
        .skip(1)
        .map(|l| l.strip_prefix('>').unwrap_or(l))
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|t| t.parse::<u32>().is_ok())
        })
        .map(str::to_string)
        .collect()
}

/// A numeric column of a process row ("1,000" -> 1000); 0 when not a number.
fn column(row: &str, index: usize) -> u64 {
    row.split_whitespace()
        .nth(index)
        .and_then(|n| n.replace(',', "").parse().ok())
        .unwrap_or(0)
}

/// A tmux session running the live view on a terminal of its own; the shell
/// reports leaktrace's exit status and the terminal mode after it.
fn start_tui(name: &str) -> Session {
    require_tool("tmux", "tmux");
    let session = Session(format!("leaktrace-tui-{name}-{}", std::process::id()));
    let script = format!(
        "{} --cache kmalloc-512 --top --interval 250ms --frames 4; echo EXIT=$?; stty -a | tr ' ;' '\\n\\n' | grep -x -e -icanon -e icanon; sleep 600",
        leaktrace_bin().display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "180",
        "-y",
        "50",
        "sh",
        "-c",
        &script,
    ]);
    wait_pane(&session.0, "the table header", |t| {
        t.contains("OUTSTANDING▼")
    });
    assert_eq!(
        alt_screen(&session.0),
        "1",
        "the TUI should draw on the alternate screen"
    );
    session
}

fn alt_screen(s: &str) -> String {
    tmux(&["display-message", "-p", "-t", s, "#{alternate_on}"])
        .trim()
        .to_string()
}

/// leaktrace has exited 0 after printing its final report, the pane is back on
/// the main screen and the tty is in canonical mode again.
fn assert_restored(s: &str) {
    let is_mode = |l: &str| l.trim() == "icanon" || l.trim() == "-icanon";
    // Until stty has printed (it runs after the EXIT line); with the
    // scrollback, as the final report is longer than the window.
    let deadline = Instant::now() + WAIT;
    let done = loop {
        let text = tmux(&["capture-pane", "-p", "-S", "-", "-t", s]);
        if text.contains("EXIT=") && text.lines().any(is_mode) {
            break text;
        }
        assert!(Instant::now() < deadline, "leaktrace did not exit:\n{text}");
        thread::sleep(Duration::from_millis(200));
    };
    assert!(done.contains("EXIT=0"), "{done}");
    assert!(
        done.contains("leaktrace final report"),
        "no final report after quit:\n{done}"
    );
    assert_eq!(alt_screen(s), "0", "still on the alternate screen:\n{done}");
    let mode = done.lines().find(|l| is_mode(l)).unwrap_or_default();
    assert_eq!(mode.trim(), "icanon", "terminal left in raw mode:\n{done}");
}

#[test]
fn tui_restores_the_terminal_on_sigterm() {
    skip_in_vm_guest!();
    let session = start_tui("sigterm");
    let s = session.0.as_str();
    let shell: u32 = tmux(&["display-message", "-p", "-t", s, "#{pane_pid}"])
        .trim()
        .parse()
        .expect("pane pid");
    let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
        .expect("the pane shell's children");
    let pid: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no leaktrace under the pane's shell: {children:?}"));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "leaktrace");
    // SAFETY: plain kill(2) of the leaktrace this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_restored(s);
}

/// A profile is evidence: with 20 one-key processes and a view cut to 5
/// processes and 1 stack each, pprof, the folded file and the JSON final
/// report still hold every tracked object, and their totals equal the
/// report's header totals.
#[test]
fn exports_hold_everything_tracked_not_the_screen_cut() {
    skip_in_vm_guest!();
    require_tool("go", "golang-go");
    let dir = scratch("complete");
    let (pprof_path, folded_path) = (dir.join("all.pb.gz"), dir.join("all.folded"));
    let tracer = Tracer::start(&[
        "--cache",
        "kmalloc-512",
        "--limit",
        "5",
        "--stacks",
        "1",
        "--weight",
        "objects",
        "--pprof",
        pprof_path.to_str().expect("utf-8 path"),
        "--folded",
        folded_path.to_str().expect("utf-8 path"),
    ])
    .expect("start");
    let gens: Vec<Generator> = (0..20)
        .map(|_| Generator::start("keys", "1").expect("leakgen keys 1"))
        .collect();
    let pids: Vec<u32> = gens.iter().map(|g| g.pid).collect();
    let (code, report) = tracer.stop(libc::SIGINT).expect("stop");
    assert_eq!(code, 0);
    drop(gens);
    let total = count(&report["totals"], "outstanding");
    let procs = report["processes"].as_array().expect("processes");
    assert!(
        procs.len() > 5,
        "the JSON final report is not cut to --limit"
    );
    for pid in &pids {
        assert!(
            process(&report, *pid).is_some(),
            "pid {pid} missing from JSON"
        );
    }
    let in_json: u64 = procs.iter().map(|p| count(p, "outstanding")).sum();
    let in_stacks: u64 = procs
        .iter()
        .flat_map(|p| p["stacks"].as_array().into_iter().flatten())
        .map(|s| count(s, "outstanding"))
        .sum();
    assert_eq!(in_json, total, "processes add up to the header total");
    assert_eq!(in_stacks, total, "stacks add up to the header total");
    let folded = std::fs::read_to_string(&folded_path).expect("folded file");
    let folded_sum: u64 = folded
        .lines()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(folded_sum, total, "folded sum vs header total:\n{folded}");
    let mut cmd = Command::new("go");
    cmd.args([
        "tool",
        "pprof",
        "-top",
        "-unit=minimum",
        "-sample_index=outstanding_objects",
    ])
    .arg(&pprof_path)
    .env("HOME", &dir)
    .env("PPROF_TMPDIR", &dir);
    let top = run(&mut cmd);
    let pprof_total: u64 = top
        .lines()
        .find(|l| l.starts_with("Showing nodes accounting for"))
        .and_then(|l| l.split(" of ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'of N total' in go tool pprof -top:\n{top}"));
    assert_eq!(pprof_total, total, "pprof total vs header total:\n{top}");
}

/// Every `schema_version` the README and docs/json-schema.md state for a
/// `--json` output is the one that output prints: the README said 1 while
/// the tracer printed 2.
#[test]
fn the_docs_state_the_json_schema_versions_printed() {
    skip_in_vm_guest!();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |f: &str| std::fs::read_to_string(repo.join(f)).expect("a repository file");
    let printed = |args: &[&str]| -> u64 {
        let (code, stdout, stderr) = run_leaktrace(args).expect("run");
        assert_eq!(code, 0, "{args:?}: {stderr}");
        let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"));
        v["schema_version"].as_u64().expect("schema_version")
    };
    let tracer = printed(&["--cache", "kmalloc-512", "--duration", "1s", "--json"]);
    let memcg = printed(&["memcg", "--list", "--json"]);
    let doctor = printed(&["doctor", "--watch", "100ms", "--json"]);
    // The number after `schema_version` in the README line containing `anchor`.
    let readme = read("README.md");
    let stated = |anchor: &str| -> u64 {
        let at = readme
            .find(anchor)
            .unwrap_or_else(|| panic!("README no longer says {anchor:?}"));
        let rest = &readme[at..];
        let after = &rest[rest.find("schema_version").expect("a schema_version")..];
        after
            .trim_start_matches("schema_version")
            .trim_start_matches('`')
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {anchor:?}: {after:.60}"))
    };
    assert_eq!(stated("report as JSON lines"), tracer);
    assert_eq!(stated("- `--json`: documented field by field"), tracer);
    assert_eq!(stated("# trace, then one JSON report"), memcg);
    assert_eq!(stated("prints the same findings as one object"), doctor);
    let schema = read("docs/json-schema.md");
    assert!(
        schema
            .lines()
            .next()
            .is_some_and(|l| l.contains(&format!("(schema_version {tracer})"))),
        "docs/json-schema.md's title names another version than {tracer}"
    );
}
