//! The bridge daemon: one process, a thread per role, started by [`start`].
//!
//! - [`relay_io`] — owns the relay WebSocket: reads frames, pings, reconnects with jittered
//!   backoff. A small request runs right there, without blocking, on a keep-alive backend
//!   connection ("inline": written and read as the sockets become ready, so it costs no thread
//!   hand-off); everything else goes to the pool, whose workers write their frames through it;
//! - [`workers`] — a bounded pool, started on demand; each worker runs one local HTTP exchange
//!   ([`local_http`]) and streams the response back as frames: uploads, event streams, large
//!   or chunked responses, and requests that found no idle connection;
//! - [`poller`] — keeps backend and gateway health current in `status.json` ([`Status`]);
//! - in LAN mode, the LAN server ([`crate::lan::server`]) in place of the relay socket; and the
//!   built-in backend ([`crate::backend`]) when this bridge runs it.
//!
//! A stop (SIGTERM, SIGINT: the handler the daemon's command installs in [`crate::cli`]) sets
//! the shared flag and wakes [`Bridge::run`], which answers open requests `SHUTTING_DOWN` (and
//! closes the relay socket 1001). This file holds what the roles share: the frame sink
//! ([`Outbox`]), the status ([`LiveStatus`]) and the daemon's log ([`log`]).

pub mod local_http;
pub mod poller;
pub mod relay_io;
pub mod workers;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::poll::Poller;
use serde::{Deserialize, Serialize};

use crate::state::{self, BridgeIdentity};

/// Where a worker's frames go: a bounded sink, so a slow socket slows the backend read instead
/// of growing memory. Cloned into every job of one connection.
#[derive(Clone)]
pub struct Outbox {
    sink: Arc<dyn FrameSink>,
}

/// The connection that carried the request is gone; stop producing frames for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Something that takes a connection's outgoing frames (ready JSON text) in order.
pub trait FrameSink: Send + Sync {
    /// Queues or writes a frame, blocking while the connection's queue is full. `Ok` means
    /// accepted, not delivered: a frame whose own write finds the socket broken is lost with
    /// the connection, and the next send fails.
    fn send(&self, text: String) -> Result<(), Gone>;

    /// An empty buffer with room for a large frame, left by one already written (see
    /// [`crate::wsout::WsOut::take_spare`]), so a stream of large frames does not map and
    /// fault in fresh memory for each one. `None` when there is none.
    fn spare_buffer(&self) -> Option<String> {
        None
    }
}

/// A bounded channel drained by a readiness-driven thread, which every frame wakes at once
/// (the LAN server's sockets and the unit tests use this one).
struct ChannelSink {
    tx: SyncSender<String>,
    waker: Arc<Poller>,
}

impl FrameSink for ChannelSink {
    fn send(&self, text: String) -> Result<(), Gone> {
        self.tx.send(text).map_err(|_| Gone)?;
        let _ = self.waker.notify();
        Ok(())
    }
}

impl Outbox {
    /// An outbox feeding `tx`, waking `waker` on every frame.
    pub fn new(tx: SyncSender<String>, waker: Arc<Poller>) -> Outbox {
        Outbox { sink: Arc::new(ChannelSink { tx, waker }) }
    }

    /// An outbox writing into `sink`.
    pub fn with_sink(sink: Arc<dyn FrameSink>) -> Outbox {
        Outbox { sink }
    }

    /// Queues a frame, blocking while the queue is full. Fails when the connection that
    /// carried the request is gone.
    pub fn send(&self, text: String) -> Result<(), Gone> {
        self.sink.send(text)
    }

    /// An empty buffer to build the next large frame in ([`FrameSink::spare_buffer`]), or a
    /// new one.
    pub fn buffer(&self) -> String {
        self.sink.spare_buffer().unwrap_or_default()
    }
}

/// Backend or gateway health as last probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Not probed yet.
    #[default]
    Unknown,
    /// Answers its health route.
    Ready,
    /// Listens but its health route fails.
    Unhealthy,
    /// Nothing listens.
    NotListening,
    /// Another user's program listens there: nothing is sent to it
    /// ([`crate::backend::peer::foreign_listener`]).
    Foreign,
}

/// What the daemon sees now; written to `status.json` for `--status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The daemon's pid.
    pub pid: u32,
    /// Unix ms when the daemon started.
    pub started_at: u64,
    /// The bridge served.
    pub bridge_id: String,
    /// The relay socket URL.
    pub relay_url: String,
    /// The backend base URL.
    pub backend_url: String,
    /// The daemon itself serves the built-in backend there (so a pairing run that finds it
    /// answering knows it is not the user's own). `None` from a daemon older than the field.
    #[serde(default)]
    pub builtin_backend: Option<bool>,
    /// Whether the relay socket is up.
    pub relay_connected: bool,
    /// Unix ms of the last relay state change.
    pub relay_since: u64,
    /// The last relay connection error, if any.
    pub relay_error: Option<String>,
    /// Backend health.
    pub backend: Health,
    /// Hermes gateway health.
    pub gateway: Health,
    /// clientIds of apps attached now.
    pub apps_online: BTreeSet<String>,
    /// The LAN server's app URL (`ws://<lan-ip>:<port>/ws/app`) in LAN-only mode (`--local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan_url: Option<String>,
    /// The program file the daemon started from, so that a command can tell when an upgrade
    /// has replaced it ([`crate::daemon::runs_replaced_program`]). `None` from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<crate::daemon::ExeStamp>,
    /// Unix ms of the last update.
    pub updated_at: u64,
}

/// The daemon's live status, shared by its threads and saved to `status.json` (a snapshot:
/// atomic, not fsynced) on every change, or soon after one ([`LiveStatus::update_soon`]).
pub struct LiveStatus {
    state: Mutex<Kept>,
    /// Signalled by [`LiveStatus::update_soon`] and [`LiveStatus::close`].
    changed: Condvar,
    /// The number of the last snapshot written: held while writing, so that the file is
    /// written outside `state` (a thread changing the status never waits on the disk) and an
    /// older snapshot never replaces a newer one.
    written: Mutex<u64>,
    path: PathBuf,
}

/// The status and what [`LiveStatus::run_saver`] has left to do.
struct Kept {
    status: Status,
    /// Snapshots taken so far (see `LiveStatus::written`).
    taken: u64,
    /// A change made by [`LiveStatus::update_soon`] is not on disk yet.
    unsaved: bool,
    /// The saver is to save what is left and return.
    closed: bool,
}

/// The least time between two saves of [`LiveStatus::run_saver`]: a burst of changes is one
/// write, and the changes it makes wait at most this long.
const SAVE_EVERY: Duration = Duration::from_millis(100);

impl LiveStatus {
    /// Starts from `initial`, saving to `path`.
    pub fn new(initial: Status, path: PathBuf) -> LiveStatus {
        let kept = Kept { status: initial, taken: 0, unsaved: false, closed: false };
        let live = LiveStatus {
            state: Mutex::new(kept),
            changed: Condvar::new(),
            written: Mutex::new(0),
            path,
        };
        live.update(|_| {});
        live
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` and saves the result (only when it changed something).
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut k = self.lock();
        let before = serde_json::to_string(&k.status).unwrap_or_default();
        f(&mut k.status);
        let after = serde_json::to_string(&k.status).unwrap_or_default();
        if before != after || k.status.updated_at == 0 || k.unsaved {
            let snapshot = Self::snapshot(&mut k);
            drop(k);
            self.write(snapshot);
        }
    }

    /// Applies `f` now and leaves the saving to [`LiveStatus::run_saver`]'s thread: for
    /// changes that come in bursts (apps connecting and leaving, as fast as a flapping app
    /// likes), so that the thread serving the sockets never waits on the disk for them.
    pub fn update_soon(&self, f: impl FnOnce(&mut Status)) {
        let mut k = self.lock();
        f(&mut k.status);
        k.unsaved = true;
        self.changed.notify_one();
    }

    /// Saves what [`LiveStatus::update_soon`] changes, at most every 100 ms, until
    /// [`LiveStatus::close`]. Runs on a thread of its own, asleep while nothing changes.
    pub fn run_saver(&self) {
        let mut k = self.lock();
        loop {
            while !k.unsaved && !k.closed {
                k = self.changed.wait(k).unwrap_or_else(|p| p.into_inner());
            }
            if k.unsaved {
                let snapshot = Self::snapshot(&mut k);
                drop(k);
                self.write(snapshot);
                k = self.lock();
            }
            if k.closed {
                return;
            }
            // The pause between two saves, cut short by `close`.
            let until = Instant::now() + SAVE_EVERY;
            while !k.closed && Instant::now() < until {
                let left = until.saturating_duration_since(Instant::now());
                k = self.changed.wait_timeout(k, left).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
    }

    /// Makes [`LiveStatus::run_saver`] save what is left and return.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// The status to write now, numbered; the change it holds is saved from here on.
    fn snapshot(k: &mut Kept) -> (u64, Status) {
        k.unsaved = false;
        k.taken += 1;
        k.status.updated_at = crate::relay::now_ms();
        (k.taken, k.status.clone())
    }

    /// Writes `snapshot` unless a newer one has been written already.
    fn write(&self, (number, status): (u64, Status)) {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if number <= *written {
            return;
        }
        *written = number;
        if let Err(e) = state::write_json_snapshot(&self.path, &status) {
            log(&format!("cannot write {}: {e}", self.path.display()));
        }
    }

    /// Writes `status.json` again when it no longer holds this status (damaged, deleted, or
    /// a stale copy put back): it is otherwise written only on a change, and `--status` reads
    /// it.
    pub fn keep_on_disk(&self) {
        let mut k = self.lock();
        let on_disk = state::read_json::<serde_json::Value>(&self.path).ok().flatten();
        if on_disk.is_some() && on_disk == serde_json::to_value(&k.status).ok() {
            return;
        }
        let snapshot = Self::snapshot(&mut k);
        drop(k);
        self.write(snapshot);
    }

    /// A copy of the current status.
    pub fn get(&self) -> Status {
        self.lock().status.clone()
    }
}

/// Everything the bridge runs with.
pub struct BridgeOptions {
    /// The relay identity from `bridge.json`; `None` in LAN-only mode (no relay socket).
    pub identity: Option<BridgeIdentity>,
    /// The fixed local target.
    pub target: workers::Target,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Request workers.
    pub workers: usize,
    /// The built-in backend to run inside the daemon, when nothing else serves the port.
    pub backend: Option<crate::backend::BackendConfig>,
    /// The LAN server (`--local`).
    pub lan: Option<crate::lan::LanConfig>,
}

/// The daemon's log file, once [`log_to_file`] set it; stderr otherwise.
static LOG_FILE: OnceLock<Mutex<state::RotatingLog>> = OnceLock::new();

/// Sends [`log`] lines to a size-rotated file (the detached daemon's `bridge.log`).
pub fn log_to_file(path: &std::path::Path) -> std::io::Result<()> {
    let file = state::RotatingLog::open(path)?;
    let _ = LOG_FILE.set(Mutex::new(file));
    Ok(())
}

/// Writes one log line (stderr in the foreground, the rotating log in the daemon). Callers
/// never pass secrets.
pub fn log(message: &str) {
    let line = format!("{} {message}\n", format_ts(crate::relay::now_ms()));
    match LOG_FILE.get() {
        Some(file) => {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = std::io::Write::write_all(&mut *file, line.as_bytes());
        }
        None => eprint!("{line}"),
    }
}

/// `2026-11-24T21:30:00.123Z` for a unix-ms timestamp.
pub fn format_ts(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Gregorian date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A started bridge: listeners bound and helper threads running; [`Bridge::run`] serves.
pub struct Bridge {
    identity: Option<BridgeIdentity>,
    pool: Arc<workers::Pool>,
    status: Arc<LiveStatus>,
    stop: Arc<AtomicBool>,
    waker: Arc<Poller>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Starts the bridge's roles except the relay socket: the built-in backend and the LAN
/// server bind here (so a busy port is an error the daemon reports before saying ready), then
/// the pool and the health poller start. `waker` must be the poller the signal handler
/// notifies.
pub fn start(
    options: BridgeOptions,
    stop: Arc<AtomicBool>,
    waker: Arc<Poller>,
) -> Result<Bridge, String> {
    let BridgeOptions { identity, target, state_dir, workers, backend, lan } = options;
    let backend_url = target.url();
    let status = Arc::new(LiveStatus::new(
        Status {
            pid: std::process::id(),
            started_at: crate::relay::now_ms(),
            bridge_id: identity.as_ref().map(|i| i.bridge_id.clone()).unwrap_or_default(),
            relay_url: identity.as_ref().map(|i| i.bridge_relay_url.clone()).unwrap_or_default(),
            backend_url,
            builtin_backend: Some(backend.is_some()),
            exe: crate::daemon::ExeStamp::current(),
            ..Status::default()
        },
        state::status_json(&state_dir),
    ));
    let mut threads = Vec::new();
    let mut target = target;
    if let Some(config) = &backend {
        let started = crate::backend::start(config, stop.clone())
            .map_err(|e| format!("the built-in backend cannot start: {e}"))?;
        threads.push(started.thread);
        // This bridge started the backend at `target`: it is the built-in one, so it gets the
        // key (required where the backend cannot tell who connects). A bridge that did not
        // start it (the user's own backend, or nothing yet) never sends it.
        let addr = std::net::SocketAddr::new(config.host, config.port);
        target.backend_key = Some((started.key, addr));
        log(&format!("built-in backend listening on http://{addr}"));
    }
    let pool =
        Arc::new(workers::Pool::new(target.clone(), workers, crate::protocol::Limits::default()));
    if let Some(config) = lan {
        threads.push(
            crate::lan::start(config, pool.clone(), status.clone(), stop.clone())
                .map_err(|e| format!("the LAN server cannot start: {e}"))?,
        );
    }
    {
        let status = status.clone();
        threads.push(
            std::thread::Builder::new()
                .name("status".into())
                .spawn(move || status.run_saver())
                .map_err(|e| format!("cannot start the status saver: {e}"))?,
        );
    }
    {
        let (status, stop, target) = (status.clone(), stop.clone(), target.clone());
        let (dir, identity) = (state_dir.clone(), identity.clone());
        threads.push(
            std::thread::Builder::new()
                .name("health".into())
                .spawn(move || poller::run(&target, &status, &dir, identity.as_ref(), &stop))
                .map_err(|e| format!("cannot start the health poller: {e}"))?,
        );
    }
    match &identity {
        Some(id) => log(&format!(
            "bridge {} starting: relay {}, backend {}",
            id.bridge_id,
            id.bridge_relay_url,
            target.url()
        )),
        None => log(&format!("bridge starting in LAN-only mode: backend {}", target.url())),
    }
    Ok(Bridge { identity, pool, status, stop, waker, threads })
}

impl Bridge {
    /// Serves until the stop flag is set: the relay I/O loop on this thread (or, in LAN-only
    /// mode, a wait for the stop), then answers open requests `SHUTTING_DOWN` and joins.
    pub fn run(self) -> Result<(), String> {
        match self.identity {
            Some(identity) => {
                let io = relay_io::RelayIo::new(
                    identity,
                    self.pool.clone(),
                    self.status.clone(),
                    self.stop.clone(),
                    self.waker.clone(),
                );
                io.run();
            }
            None => {
                let mut events = crate::poll::Events::new();
                while !self.stop.load(Ordering::SeqCst) {
                    events.clear();
                    // Woken by the signal handler; the timeout is only a safety net.
                    let _ = self.waker.wait(&mut events, Some(Duration::from_secs(1)));
                }
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.pool.shutdown(crate::protocol::ErrorCode::ShuttingDown);
        self.status.close();
        for t in self.threads {
            let _ = t.join();
        }
        self.status.update(|s| s.relay_connected = false);
        log("bridge stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(1_795_555_732_093), "2026-11-24T21:28:52.093Z");
        assert_eq!(format_ts(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
