//! Child processes whose output lines are watched with timestamps, and the
//! kernel's list of loaded BPF programs.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A stopped tracer that ignores SIGINT this long is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Stream {
    Out,
    Err,
}

#[derive(Clone, Debug)]
pub struct Line {
    pub stream: Stream,
    pub text: String,
    pub at: Instant,
}

pub struct Running {
    name: String,
    child: Child,
    rx: Receiver<Line>,
    pub lines: Vec<Line>,
    pub spawned: Instant,
}

impl Running {
    pub fn spawn(mut cmd: Command, name: &str) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let (tx, rx) = channel();
        if let Some(out) = child.stdout.take() {
            forward(out, Stream::Out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward(err, Stream::Err, tx);
        }
        Ok(Running {
            name: name.into(),
            child,
            rx,
            lines: Vec::new(),
            spawned,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first line (already seen or new) matching `pred`.
    pub fn wait_for(&mut self, pred: impl Fn(&Line) -> bool, timeout: Duration) -> Result<Line> {
        if let Some(l) = self.lines.iter().find(|l| pred(l)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.lines.push(l.clone());
                    if pred(&l) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "{} said nothing expected within {timeout:?}{}",
                        self.name,
                        self.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "{} exited ({status:?}) before saying what was expected{}",
                        self.name,
                        self.tail()
                    )
                }
            }
        }
    }

    /// Takes in every line printed so far without blocking.
    pub fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("waiting for a child")? {
            self.drain();
            bail!("{} exited early ({status}){}", self.name, self.tail());
        }
        Ok(())
    }

    /// Writes one line to the child's stdin (leakgen's hold protocol).
    pub fn send_line(&mut self) -> Result<()> {
        use std::io::Write;
        let stdin = self
            .child
            .stdin
            .as_mut()
            .with_context(|| format!("{}'s stdin is closed", self.name))?;
        writeln!(stdin).with_context(|| format!("writing to {}'s stdin", self.name))
    }

    /// Waits for a child that ends by itself.
    pub fn wait(mut self) -> Result<Vec<Line>> {
        drop(self.child.stdin.take());
        let status = self.child.wait().context("waiting for a child")?;
        self.collect_rest();
        if !status.success() {
            bail!("{} failed ({status}){}", self.name, self.tail());
        }
        Ok(std::mem::take(&mut self.lines))
    }

    /// SIGINT, as Ctrl-C would, then the rest of the output.
    pub fn stop(mut self) -> Result<Vec<Line>> {
        // SAFETY: kill(2) on our own child's pid, which it keeps until we wait.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().context("waiting for a child")? {
                break s;
            }
            if start.elapsed() > STOP_TIMEOUT {
                eprintln!(
                    "xtask bench: {} ignored SIGINT for {STOP_TIMEOUT:?}; killing it",
                    self.name
                );
                let _ = self.child.kill();
                break self.child.wait().context("waiting for a killed child")?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.collect_rest();
        // Tools that exit on SIGINT by re-raising it report "signal 2".
        if !status.success() && status.code().is_some() {
            bail!("{} failed on SIGINT ({status}){}", self.name, self.tail());
        }
        Ok(std::mem::take(&mut self.lines))
    }

    fn collect_rest(&mut self) {
        while let Ok(l) = self.rx.recv_timeout(Duration::from_secs(5)) {
            self.lines.push(l);
        }
    }

    /// The last stderr lines, for error messages.
    fn tail(&self) -> String {
        let err: Vec<&str> = self
            .lines
            .iter()
            .filter(|l| l.stream == Stream::Err)
            .map(|l| l.text.as_str())
            .collect();
        if err.is_empty() {
            return String::new();
        }
        format!(
            "; stderr: {}",
            err[err.len().saturating_sub(5)..].join(" | ")
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A child left behind by an early error must not keep tracing.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forward(r: impl Read + Send + 'static, stream: Stream, tx: Sender<Line>) {
    std::thread::spawn(move || {
        for text in BufReader::new(r).lines().map_while(Result::ok) {
            let line = Line {
                stream,
                text,
                at: Instant::now(),
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// bpf(2) command numbers and attr layout from include/uapi/linux/bpf.h.
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;

#[repr(C)]
struct GetNextId {
    start_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Ids of every BPF program loaded in the kernel.
pub fn prog_ids() -> Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    let mut id = 0;
    loop {
        let mut attr = GetNextId {
            start_id: id,
            next_id: 0,
            open_flags: 0,
        };
        // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the
        // size we pass; the kernel only writes next_id.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_GET_NEXT_ID,
                &mut attr as *mut GetNextId,
                std::mem::size_of::<GetNextId>(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(ids);
            }
            return Err(e).context("bpf(BPF_PROG_GET_NEXT_ID) (needs root)");
        }
        id = attr.next_id;
        ids.insert(id);
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let tick = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no field {} in /proc/{pid}/stat", i + 3))
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok((tick(11)? + tick(12)?) / hz as f64)
}

/// VmHWM and VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |k: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {k} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Sum of smaps `Rss:` of `pid` outside `anon_inode:bpf-map` mappings, KiB.
pub fn rss_outside_bpf_maps_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut kib, mut in_bpf_map) = (0u64, false);
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Rss:") {
            if !in_bpf_map {
                kib += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
            }
        } else {
            // A mapping's header: range perms offset dev inode [path].
            let mut fields = line.split_whitespace();
            if fields
                .next()
                .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
            {
                in_bpf_map = fields.nth(4) == Some("anon_inode:bpf-map");
            }
        }
    }
    Some(kib)
}
