//! Liveness: how a silent peer and a stuck engine are found, and what systemd is told.
//!
//! - [`Heartbeat`]: both ends of a mesh connection send a `Ping` every `interval`; a peer silent
//!   for `timeout` is dead (the gateway fails or moves its work, a worker reconnects). Pings are
//!   sent and answered by the connection's read loop, never by the inference thread, so a
//!   generation that saturates every core does not make a healthy worker look dead.
//! - [`StallWatch`]: an infer worker's engine counts decode steps; holding work while the count
//!   stands still for `limit` is a stall, reported with every heartbeat ([`Health`]).
//! - [`Beacon`] and [`notify`]: the systemd notify protocol (`READY=1`, `STATUS=`, `WATCHDOG=1`).
//!   The watchdog is fed only while the loop that would stop on a deadlock keeps beating (and,
//!   for infer, while the engine is not stalled), so systemd restarts a process that hangs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use crate::protocol::Health;

/// How often heartbeats go out, and how long a silent peer is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(4000),
        }
    }
}

impl Heartbeat {
    /// A ticker for the heartbeat; a tick missed while the process was stopped is not replayed.
    pub fn ticker(&self) -> tokio::time::Interval {
        let mut t = tokio::time::interval(self.interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }

    /// When a peer last heard at `last_heard` is dead, unless it speaks again.
    pub fn deadline(&self, last_heard: Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(last_heard + self.timeout)
    }

    /// Why a peer last heard at `last_heard` is dead (once its deadline has passed).
    pub fn silence(&self, last_heard: Instant) -> String {
        format!(
            "no heartbeat for {:.1} s (limit {:.1} s)",
            last_heard.elapsed().as_secs_f64(),
            self.timeout.as_secs_f64()
        )
    }
}

/// Progress of an engine: steps completed, and whether it holds work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub steps: u64,
    pub busy: bool,
    /// Work the engine holds for others than this worker (an upstream server's other clients).
    pub backlog: u64,
}

/// Reads an engine's progress (cheap: atomics).
pub type ProgressProbe = Arc<dyn Fn() -> Progress + Send + Sync>;

/// Decides whether an engine is stalled: busy, with no new step for `limit`.
#[derive(Debug)]
pub struct StallWatch {
    limit: Duration,
    last_steps: u64,
    /// Since when the engine has been busy without a step (`None`: not stalling).
    since: Option<Instant>,
}

impl StallWatch {
    pub fn new(limit: Duration) -> Self {
        StallWatch {
            limit,
            last_steps: 0,
            since: None,
        }
    }

    /// Takes one reading of the engine at `now`; answers what to report.
    pub fn observe(&mut self, p: Progress, now: Instant) -> Health {
        if p.steps != self.last_steps || !p.busy {
            self.last_steps = p.steps;
            self.since = None;
        } else if self.since.is_none() {
            self.since = Some(now);
        }
        let stalled = self
            .since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.limit);
        Health {
            steps: p.steps,
            busy: p.busy,
            stalled,
            backlog: p.backlog,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// What a process's main loops share with its watchdog: when they last ran, and whether the
/// engine is stalled.
#[derive(Debug)]
pub struct Beacon {
    born: Instant,
    /// Milliseconds after `born` of the last beat.
    last: AtomicU64,
    stalled: AtomicBool,
    /// `READY=1` has been sent: systemd arms the watchdog at the first `WATCHDOG=1`, even before
    /// it, so feeding waits for readiness (a worker still waiting for its gateway is covered by
    /// `TimeoutStartSec=` instead).
    ready: AtomicBool,
}

impl Default for Beacon {
    fn default() -> Self {
        Beacon {
            born: Instant::now(),
            last: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            ready: AtomicBool::new(false),
        }
    }
}

impl Beacon {
    /// The loop is alive.
    pub fn beat(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    pub fn set_stalled(&self, stalled: bool) -> bool {
        self.stalled.swap(stalled, Ordering::Relaxed)
    }

    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// `READY=1` was sent.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Ready, beat within `within`, and not stalled: the watchdog may be fed.
    pub fn healthy(&self, within: Duration) -> bool {
        let since = self.born.elapsed().as_millis() as u64 - self.last.load(Ordering::Relaxed);
        self.ready.load(Ordering::Relaxed) && since <= within.as_millis() as u64 && !self.stalled()
    }
}

/// Sends one notification to systemd (`$NOTIFY_SOCKET`); `false` when there is no socket.
/// Errors are logged once, never fatal: a process outside systemd must run the same.
pub fn notify(state: &str) -> bool {
    static SOCKET: OnceLock<Option<String>> = OnceLock::new();
    let Some(path) = SOCKET.get_or_init(|| std::env::var("NOTIFY_SOCKET").ok()) else {
        return false;
    };
    match send(path, state) {
        Ok(()) => true,
        Err(e) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(socket = %path, error = %e, "cannot notify systemd");
            }
            false
        }
    }
}

fn send(path: &str, state: &str) -> std::io::Result<()> {
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = path.strip_prefix('@') {
        // An abstract socket (Linux): the name after a leading NUL.
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        return Err(std::io::Error::other(format!(
            "abstract socket @{name} needs Linux"
        )));
    }
    sock.send_to(state.as_bytes(), path)?;
    Ok(())
}

/// The watchdog period systemd asked for (`$WATCHDOG_USEC`, for this process).
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Feeds systemd's watchdog every half period while `healthy(period)` holds, until the task is
/// aborted. `healthy` runs on the async runtime: a runtime that deadlocks stops feeding it too.
pub async fn feed_watchdog(healthy: impl Fn(Duration) -> bool) {
    let Some(period) = watchdog_period() else {
        return;
    };
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "feeding systemd's watchdog"
    );
    let mut tick = tokio::time::interval(period / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut starving = false;
    loop {
        tick.tick().await;
        if healthy(period) {
            if starving {
                tracing::info!("healthy again; feeding the watchdog");
                starving = false;
            }
            notify("WATCHDOG=1");
        } else if !starving {
            tracing::error!("not healthy: the systemd watchdog is no longer fed");
            starving = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_is_stalled_only_when_busy_without_steps_for_the_limit() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut w = StallWatch::new(Duration::from_secs(5));
        let p = |steps, busy| Progress {
            steps,
            busy,
            backlog: 0,
        };
        assert!(!w.observe(p(0, false), s(0)).stalled);
        // Idle for long: never a stall.
        assert!(!w.observe(p(0, false), s(100)).stalled);
        // Busy and stepping: fine.
        assert!(!w.observe(p(1, true), s(101)).stalled);
        assert!(!w.observe(p(2, true), s(110)).stalled);
        // Busy, no step: a stall once the limit has passed since the count stopped.
        assert!(!w.observe(p(2, true), s(111)).stalled);
        assert!(!w.observe(p(2, true), s(115)).stalled);
        assert!(w.observe(p(2, true), s(116)).stalled);
        // One step ends it; the clock starts again.
        assert!(!w.observe(p(3, true), s(117)).stalled);
        assert!(!w.observe(p(3, true), s(118)).stalled);
        assert!(w.observe(p(3, true), s(123)).stalled);
        // Work cancelled while stuck (no longer busy): no stall.
        assert!(!w.observe(p(3, false), s(124)).stalled);
    }

    #[test]
    fn heartbeat_expiry_names_the_silence() {
        let hb = Heartbeat::default();
        let heard = Instant::now() - Duration::from_secs(5);
        assert_eq!(
            hb.deadline(heard),
            tokio::time::Instant::from_std(heard + hb.timeout)
        );
        let why = hb.silence(heard);
        assert!(why.starts_with("no heartbeat for 5."), "{why}");
    }

    #[test]
    fn the_beacon_is_healthy_only_when_fresh_and_not_stalled() {
        let b = Beacon::default();
        b.beat();
        assert!(!b.healthy(Duration::from_secs(1)), "not before READY=1");
        b.set_ready();
        assert!(b.healthy(Duration::from_secs(1)));
        b.set_stalled(true);
        assert!(!b.healthy(Duration::from_secs(1)));
        b.set_stalled(false);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!b.healthy(Duration::from_millis(10)));
    }

    #[test]
    fn notify_reaches_a_datagram_socket_and_its_abstract_twin() {
        use std::os::unix::net::UnixDatagram;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("meshd-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let rx = UnixDatagram::bind_addr(&addr).unwrap();
            send(&format!("@{name}"), "WATCHDOG=1").unwrap();
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
    }
}
