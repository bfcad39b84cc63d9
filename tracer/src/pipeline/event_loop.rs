//! What every leaktrace run loop waits on, set up once for the slab tracer and
//! `memcg` alike: the ring buffer, a short poll timer (the kernel batches
//! wake-ups), the refresh ticker, Ctrl-C / SIGTERM / SIGHUP, and `--duration`.

use std::{pin::Pin, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal, SignalKind},
    time::{Interval, MissedTickBehavior, Sleep},
};

/// Events reach the aggregator within this even when too few arrive to wake us.
const POLL: Duration = Duration::from_millis(20);

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
        Ok(Signals {
            sigint: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            sighup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

impl Sources {
    pub fn new(
        ring: RingBuf<MapData>,
        interval: Duration,
        duration: Option<Duration>,
    ) -> Result<Sources> {
        Sources::with_signals(ring, interval, duration, Signals::install()?)
    }

    pub fn with_signals(
        ring: RingBuf<MapData>,
        interval: Duration,
        duration: Option<Duration>,
        signals: Signals,
    ) -> Result<Sources> {
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it,
        // and the fd is deregistered (into_ring) before the RingBuf is used elsewhere.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| e.into_parts().1)
            .context("registering the ring buffer with the event loop")?;
        let mut poll = tokio::time::interval(POLL);
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
