//! What every leaktrace run loop waits on, set up once for the slab tracer and
//! `memcg` alike: the ring buffer, a short poll timer (the kernel batches
//! wake-ups), the refresh ticker, Ctrl-C / SIGTERM / SIGHUP, and `--duration`.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal, SignalKind},
    time::{Interval, MissedTickBehavior, Sleep},
};

/// Events reach the aggregator within this even when too few arrive to wake us.
pub const POLL: Duration = Duration::from_millis(20);

/// The same where events are few and none is urgent (`--all-caches`: samples
/// only, no zoom to steer): a tenth of the wake-ups, which were most of the
/// sampler's own CPU on an idle node (issue 27 bounds it at 0.5% of a core).
pub const SPARSE_POLL: Duration = Duration::from_millis(200);

/// `--ringbuf-mib` in bytes: the kernel wants a power of two.
pub fn ringbuf_bytes(mib: u32) -> Result<u32> {
    mib.checked_mul(1 << 20)
        .and_then(u32::checked_next_power_of_two)
        .context("--ringbuf-mib is too large")
}

pub struct Sources {
    pub ring: AsyncFd<RingBuf<MapData>>,
    pub poll: Interval,
    pub ticker: Interval,
    pub sigint: Signal,
    pub sigterm: Signal,
    /// The terminal went away: end with the files written, like SIGTERM,
    /// rather than die with them unwritten.
    pub sighup: Signal,
    pub deadline: Pin<Box<Sleep>>,
}

/// The signals that end a run. Installed before anything is attached: one
/// that arrives between attach and the loop is then held for the loop (which
/// ends at once, with its report) instead of killing the process unreported.
pub struct Signals {
    sigint: Signal,
    sigterm: Signal,
    sighup: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals> {
        count_end_requests()?;
        Ok(Signals {
            sigint: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            sighup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

/// SIGINT, SIGTERM and SIGHUP received so far. The loop sees them through
/// tokio, which only wakes a running loop; what a run does after its loop
/// (waiting for a FIFO's reader) is plain blocking code, and asks this.
static END_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts the signals that end a run beside tokio's own handlers (both are
/// actions in signal-hook-registry, which tokio uses), once per process.
fn count_end_requests() -> Result<()> {
    static COUNTING: OnceLock<Result<(), String>> = OnceLock::new();
    COUNTING
        .get_or_init(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                // SAFETY: the action only increments an atomic, which is
                // async-signal-safe.
                unsafe {
                    signal_hook_registry::register(sig, || {
                        END_REQUESTS.fetch_add(1, Ordering::Relaxed);
                    })
                }
                .map_err(|e| format!("counting signal {sig}: {e}"))?;
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A point in a run's end: whether the user asked to stop again since.
pub struct EndMark(u64);

impl EndMark {
    pub fn now() -> EndMark {
        EndMark(END_REQUESTS.load(Ordering::Relaxed))
    }

    /// A SIGINT, SIGTERM or SIGHUP arrived after this mark was taken.
    pub fn passed(&self) -> bool {
        END_REQUESTS.load(Ordering::Relaxed) > self.0
    }
}

impl Sources {
    pub fn new(
        ring: RingBuf<MapData>,
        interval: Duration,
        duration: Option<Duration>,
    ) -> Result<Sources> {
        Sources::with_signals(ring, interval, duration, Signals::install()?, POLL)
    }

    /// `poll`: [`POLL`] or [`SPARSE_POLL`].
    pub fn with_signals(
        ring: RingBuf<MapData>,
        interval: Duration,
        duration: Option<Duration>,
        signals: Signals,
        poll: Duration,
    ) -> Result<Sources> {
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it,
        // and the fd is deregistered (into_ring) before the RingBuf is used elsewhere.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| e.into_parts().1)
            .context("registering the ring buffer with the event loop")?;
        let mut poll = tokio::time::interval(poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(Sources {
            ring,
            poll,
            ticker,
            sigint: signals.sigint,
            sigterm: signals.sigterm,
            sighup: signals.sighup,
            deadline: Box::pin(tokio::time::sleep(
                duration.unwrap_or(Duration::from_secs(u64::MAX / 4)),
            )),
        })
    }

    pub fn into_ring(self) -> RingBuf<MapData> {
        self.ring.into_inner()
    }
}

/// Whether the loop goes on after a tool handled one of its own inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// One tool on the shared loop: the loop owns the waiting (ring, poll timer,
/// refresh ticker, signals, `--duration`); the tool decodes and applies what
/// the ring holds, and on each refresh builds and shows its snapshot.
// Only used generically inside this binary, so the missing `Send` bound the
// lint warns about cannot surprise a caller.
#[allow(async_fn_in_trait)]
pub trait Tool {
    /// What the tool's own sources yield (keys of a screen, scrapes).
    type Input;
    /// ring -> decode -> apply, for every event the ring holds now.
    fn drain(&mut self, ring: &mut RingBuf<MapData>);
    /// After the poll timer's drain: cheap catch-up work between refreshes.
    fn poll(&mut self) {}
    /// After the refresh ticker's drain: tick, snapshot, show.
    fn tick(&mut self) -> Result<()>;
    /// The tool's own sources; never ready when it has none.
    async fn input(&mut self) -> Self::Input;
    fn handle(&mut self, input: Self::Input) -> Result<Flow>;
}

/// `source`'s next item, or never when the tool lacks that source (no
/// screen, no metrics listener), so a `select!` branch on it stays idle.
pub async fn unless_absent<F: std::future::Future>(source: Option<F>) -> F::Output {
    match source {
        Some(next) => next.await,
        None => std::future::pending().await,
    }
}

/// The loop of every tool: ring -> decode -> apply -> tick -> snapshot, until
/// a signal, `--duration` or the tool stops it. Returns the ring so the caller
/// can drain what arrived between the last wake-up and detaching.
pub async fn run<T: Tool>(mut src: Sources, tool: &mut T) -> Result<RingBuf<MapData>> {
    loop {
        tokio::select! {
            guard = src.ring.readable_mut() => {
                let mut guard = guard.context("waiting for ring buffer events")?;
                tool.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = src.poll.tick() => {
                tool.drain(src.ring.get_mut());
                tool.poll();
            }
            _ = src.ticker.tick() => {
                tool.drain(src.ring.get_mut());
                tool.tick()?;
            }
            input = tool.input() => {
                // A profile asked for now holds what the ring holds now,
                // however long the poll timer still sleeps.
                tool.drain(src.ring.get_mut());
                if tool.handle(input)? == Flow::Stop {
                    break;
                }
            }
            _ = src.sigint.recv() => break,
            _ = src.sigterm.recv() => break,
            _ = src.sighup.recv() => break,
            _ = &mut src.deadline => break,
        }
    }
    Ok(src.into_ring())
}
