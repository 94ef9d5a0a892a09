//! `hermeschat-relay`: the self-hosted registry + relay.
//!
//! Roles, one file each:
//! - [`reactor`] — one thread that owns every socket: accepts, reads HTTP heads, completes
//!   WebSocket upgrades and routes frames between apps and bridges, driven by readiness
//!   ([`crate::poll`]), never by sleeps or read timeouts;
//! - [`registry`] — a small worker pool answering the registry API and authenticating upgrades
//!   against the [`store`] (SQLite), so disk never stalls routing;
//! - [`ratelimit`] — per-IP limits for the unauthenticated routes;
//! - [`refusals`] — a bound on the log lines of refused requests;
//! - [`kicks`] — revocations remembered so that no upgrade checked before one attaches after it.

pub mod kicks;
pub mod ratelimit;
pub mod reactor;
pub mod refusals;
pub mod registry;
pub mod store;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::poll::Poller;

use crate::protocol::Limits;
use ratelimit::RateLimiter;

/// Everything the relay is configured with (flags or environment variables).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The public base URL (`https://relay.example.com`); derived from `listen` when absent.
    pub public_url: Option<String>,
    /// Directory for the SQLite store.
    pub data: PathBuf,
    /// PEM certificate chain and PKCS#8 key for the built-in TLS listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Registrations per minute per IP.
    pub rate_register: u32,
    /// Verify attempts per minute per IP.
    pub rate_verify: u32,
    /// How long access codes live.
    pub code_ttl: Duration,
    /// Deadline for a connection to send a complete request head (and TLS handshake).
    pub handshake_timeout: Duration,
    /// Take the client address from `X-Forwarded-For` (behind Caddy or nginx), on connections
    /// from loopback or a private network only (where the proxy is).
    pub trust_proxy: bool,
    /// Registry worker threads.
    pub workers: usize,
    /// Open connections at most; more are closed at accept. Lowered to what the open-file
    /// limit allows when the relay binds.
    pub max_connections: usize,
    /// The operator chose `max_connections` (a flag or variable): only then is lowering it
    /// worth a warning. The default is "as many as the open-file limit allows, up to 20 000".
    pub max_connections_set: bool,
    /// Open connections from one source (an IPv4 address, an IPv6 /64) at most; more are
    /// closed at accept. Loopback sources are not counted, nor, with `trust_proxy`, a proxy's
    /// (loopback or private). 0: no cap.
    pub max_connections_per_ip: u32,
    /// Frame and queue limits.
    pub limits: Limits,
}

impl RelayConfig {
    /// Defaults for everything but the listen address and data directory.
    pub fn new(listen: SocketAddr, data: PathBuf) -> Self {
        RelayConfig {
            listen,
            public_url: None,
            data,
            tls: None,
            rate_register: 20,
            rate_verify: 30,
            code_ttl: Duration::from_millis(crate::protocol::ACCESS_CODE_TTL_MS),
            handshake_timeout: Duration::from_secs(10),
            trust_proxy: false,
            workers: 2,
            max_connections: 20_000,
            max_connections_set: false,
            max_connections_per_ip: 256,
            limits: Limits::default(),
        }
    }

    /// The settings the `listening` line reports, so that the log shows what a relay ran with
    /// (never a secret: there is none in the configuration).
    pub fn log_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("data", self.data.display().to_string()),
            ("tls", self.tls.is_some().to_string()),
            ("trustProxy", self.trust_proxy.to_string()),
            ("maxConnections", self.max_connections.to_string()),
            ("maxConnectionsPerIp", self.max_connections_per_ip.to_string()),
            ("rateRegister", self.rate_register.to_string()),
            ("rateVerify", self.rate_verify.to_string()),
            ("codeTtlSecs", self.code_ttl.as_secs().to_string()),
            ("handshakeTimeoutSecs", self.handshake_timeout.as_secs().to_string()),
            ("workers", self.workers.max(1).to_string()),
        ]
    }
}

/// A connection's identity inside the reactor (also its poller key).
pub type ConnId = usize;

/// Who an authenticated WebSocket belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A bridge daemon.
    Bridge {
        /// Its bridgeId.
        bridge_id: String,
        /// Its `X-Hermes-Instance`.
        instance: String,
    },
    /// A paired app.
    App {
        /// The bridge it talks to.
        bridge_id: String,
        /// Its clientId.
        client_id: String,
        /// Its name.
        device_name: String,
    },
}

impl Peer {
    /// Its bridgeId, and its clientId when it is an app.
    pub fn ids(&self) -> (&str, Option<&str>) {
        match self {
            Peer::Bridge { bridge_id, .. } => (bridge_id, None),
            Peer::App { bridge_id, client_id, .. } => (bridge_id, Some(client_id)),
        }
    }
}

/// Messages to the reactor from other threads.
pub enum ToReactor {
    /// A worker finished an HTTP request.
    Outcome(registry::Outcome),
    /// Close sockets of a deleted bridge (all) or a revoked client (one) with 4003.
    Kick {
        /// The bridge.
        bridge_id: String,
        /// One client, or every socket of the bridge when `None`.
        client_id: Option<String>,
        /// The revocation epoch after the commit ([`Shared::kick`]).
        epoch: u64,
    },
}

/// Who is attached right now; read by workers for bridge-status and the clients list.
#[derive(Debug, Default)]
pub struct Presence {
    /// bridgeIds with a bridge socket.
    pub bridges: HashSet<String>,
    /// clientIds with an app socket.
    pub apps: HashSet<String>,
}

/// State shared between the reactor and the workers.
pub struct Shared {
    /// The configuration.
    pub config: RelayConfig,
    /// The public base URL, without a trailing slash.
    pub public_url: String,
    /// Limits `POST /v1/bridge/register`.
    pub register_limit: RateLimiter,
    /// Limits `POST /v1/pair/verify`.
    pub verify_limit: RateLimiter,
    /// Bounds the access lines of refused requests.
    pub refusals: refusals::RefusalLog,
    presence: Mutex<Presence>,
    /// Revocations (revokes and bridge deletions) committed so far: see [`kicks`].
    revocations: AtomicU64,
    /// Registry requests running on workers, plus [`GATE_CLOSED`] once none may start any
    /// more (see [`Shared::begin_request`]).
    admission: AtomicUsize,
    /// A store call failed for a reason of the store's own (damaged, unreadable, unwritable,
    /// full) and no write has committed since: `/v1/health` says so.
    store_failing: AtomicBool,
    to_reactor: Sender<ToReactor>,
    poller: Arc<Poller>,
}

/// The bit of [`Shared::admission`] that says the shutdown grace is over.
const GATE_CLOSED: usize = 1 << (usize::BITS - 1);

/// A registry request a worker is carrying out ([`Shared::begin_request`]); it counts as
/// running until dropped, which the worker does once its answer is on its way.
pub struct Running<'a>(&'a Shared);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.admission.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// Sends a message to the reactor and wakes it.
    pub fn send(&self, msg: ToReactor) {
        if self.to_reactor.send(msg).is_ok() {
            let _ = self.poller.notify();
        }
    }

    /// The revocation epoch, read before a credential is checked in the store.
    pub fn epoch(&self) -> u64 {
        self.revocations.load(Ordering::SeqCst)
    }

    /// Closes the sockets of a revocation just committed to the store: one client's, or
    /// every socket of the bridge (`client_id` `None`); upgrades checked before it are refused.
    pub fn kick(&self, bridge_id: &str, client_id: Option<&str>) {
        let epoch = self.revocations.fetch_add(1, Ordering::SeqCst) + 1;
        let (bridge_id, client_id) = (bridge_id.to_owned(), client_id.map(str::to_owned));
        self.send(ToReactor::Kick { bridge_id, client_id, epoch });
    }

    /// Lets a worker start a registry request, or `None` once the shutdown grace is over
    /// ([`Shared::close_gate`]): that request is then answered 503 without touching the store,
    /// so none is carried out after its client can no longer hear the answer.
    pub fn begin_request(&self) -> Option<Running<'_>> {
        let open = |n: usize| (n & GATE_CLOSED == 0).then_some(n + 1);
        self.admission.fetch_update(Ordering::SeqCst, Ordering::SeqCst, open).ok()?;
        Some(Running(self))
    }

    /// Ends the shutdown grace: no registry request starts from now on.
    pub fn close_gate(&self) {
        self.admission.fetch_or(GATE_CLOSED, Ordering::SeqCst);
    }

    /// True once [`Shared::close_gate`] was called.
    pub fn gate_closed(&self) -> bool {
        self.admission.load(Ordering::SeqCst) & GATE_CLOSED != 0
    }

    /// Registry requests running now; each one's answer was sent before it stopped counting.
    pub fn requests_running(&self) -> usize {
        self.admission.load(Ordering::SeqCst) & !GATE_CLOSED
    }

    /// Records a store failure; one of the store's own ([`store::StoreError::fault`]) marks
    /// the store failing until [`Shared::store_wrote`].
    pub fn store_failed(&self, e: &store::StoreError) {
        if e.fault {
            self.store_failing.store(true, Ordering::SeqCst);
        }
    }

    /// Records that a write to the store committed: it is usable again.
    pub fn store_wrote(&self) {
        self.store_failing.store(false, Ordering::SeqCst);
    }

    /// True while the store is failing (see [`Shared::store_failed`]).
    pub fn store_failing(&self) -> bool {
        self.store_failing.load(Ordering::SeqCst)
    }

    /// The live presence table.
    pub fn presence(&self) -> MutexGuard<'_, Presence> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The WebSocket URL of `path` under the public URL (`https` → `wss`, `http` → `ws`).
    pub fn ws_url(&self, path: &str) -> String {
        let base = &self.public_url;
        let ws = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.clone()
        };
        format!("{ws}{path}")
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Writes one structured log line to stderr: `{"ts":…,"event":…, fields…}`. Callers never pass
/// secrets; ids (bridgeId, clientId) are public by the protocol.
pub fn log_event(event: &str, fields: &[(&str, &str)]) {
    let mut line = serde_json::Map::new();
    line.insert("ts".into(), serde_json::Value::from(now_ms()));
    line.insert("event".into(), serde_json::Value::from(event));
    for (k, v) in fields {
        line.insert((*k).into(), serde_json::Value::from(*v));
    }
    eprintln!("{}", serde_json::Value::Object(line));
}

/// A bound relay, ready to run.
pub struct Relay {
    shared: Arc<Shared>,
    listener: TcpListener,
    inbox: mpsc::Receiver<ToReactor>,
    tls: Option<native_tls::TlsAcceptor>,
    /// The exclusive lock on `--data` ([`lock_data_dir`]), held until the relay is dropped.
    data_lock: File,
}

/// Stops a running relay from another thread (e.g. a signal handler).
#[derive(Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    poller: Arc<Poller>,
}

impl StopHandle {
    /// Asks the relay to shut down cleanly.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.poller.notify();
    }
}

impl Relay {
    /// Binds the listener, opens the store and loads TLS material, so that every configuration
    /// error surfaces before the relay reports itself ready.
    pub fn bind(mut config: RelayConfig) -> io::Result<Relay> {
        config.max_connections =
            fit_to_fd_limit(config.max_connections, config.max_connections_set);
        // 0700 and ours: whoever can write there can swap the store for one of their own. A
        // directory a container or volume set up otherwise (another owner, a shared group)
        // is used all the same, with a warning: refusing would take the relay down.
        match crate::state::ensure_dir(&config.data) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && config.data.is_dir() => {
                let why = e.to_string();
                log_event("data_dir.unsafe", &[("warning", &why)]);
            }
            Err(e) => return Err(data_dir_error(&config.data, e)),
        }
        // Before the store is touched: a second relay must not open it at all.
        let data_lock = lock_data_dir(&config.data)?;
        store::Store::open_first(&config.data).map_err(|e| io::Error::other(e.to_string()))?;
        let tls = match &config.tls {
            None => None,
            Some((cert, key)) => Some(load_tls(cert, key)?),
        };
        let listener =
            TcpListener::bind(config.listen).map_err(|e| listen_error(config.listen, e))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}"))
            .trim_end_matches('/')
            .to_owned();
        let poller = Arc::new(Poller::new()?);
        let (tx, inbox) = mpsc::channel();
        let shared = Arc::new(Shared {
            register_limit: RateLimiter::new(config.rate_register),
            verify_limit: RateLimiter::new(config.rate_verify),
            refusals: refusals::RefusalLog::default(),
            config,
            public_url,
            presence: Mutex::new(Presence::default()),
            revocations: AtomicU64::new(0),
            admission: AtomicUsize::new(0),
            store_failing: AtomicBool::new(false),
            to_reactor: tx,
            poller,
        });
        Ok(Relay { shared, listener, inbox, tls, data_lock })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The public base URL in use.
    pub fn public_url(&self) -> &str {
        &self.shared.public_url
    }

    /// A handle that stops [`Relay::run`].
    pub fn stop_handle(&self, stop: Arc<AtomicBool>) -> StopHandle {
        StopHandle { stop, poller: self.shared.poller.clone() }
    }

    /// Runs until `stop` is set (see [`StopHandle`]). Spawns the worker threads, then runs the
    /// reactor on the calling thread.
    pub fn run(self, stop: Arc<AtomicBool>) -> io::Result<()> {
        let (job_tx, job_rx) = registry::job_queue();
        let mut workers = Vec::new();
        for i in 0..self.shared.config.workers.max(1) {
            let (rx, shared) = (job_rx.clone(), self.shared.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("registry-{i}"))
                    .spawn(move || registry::worker(rx, shared))?,
            );
        }
        // Only the workers hold the receiver: should they all exit (their store cannot be
        // opened), requests are answered 503 at once instead of waiting for ever.
        drop(job_rx);
        let shared = self.shared.clone();
        let reactor =
            reactor::Reactor::new(self.shared, self.listener, self.tls, job_tx, self.inbox, stop)?;
        let result = reactor.run();
        // Whatever is still queued was never answered (the reactor is gone): it must not run.
        shared.close_gate();
        // The reactor dropped the job sender: workers finish the queued jobs (registry requests
        // refused unstarted) and exit.
        let mut stores: Vec<store::Store> =
            workers.into_iter().filter_map(|w| w.join().ok().flatten()).collect();
        // SQLite folds the WAL into relay.db when its last connection closes, but connections
        // closing at the same instant each see the other open and none does it: relay.db alone
        // would then lack recent pairings. So the others close first and one checkpoints.
        let last = stores.pop();
        drop(stores);
        if let Some(store) = last
            && let Err(e) = store.checkpoint()
        {
            log_event(
                "checkpoint.failed",
                &[
                    ("message", &e.to_string()),
                    (
                        "next",
                        "recent changes are in relay.db-wal, which the next start reads: keep it \
                         with relay.db (copy relay.db, relay.db-wal and relay.db-shm together)",
                    ),
                ],
            );
        }
        // Released only now that no worker can write to the store any more.
        drop(self.data_lock);
        result
    }
}

/// The lock file in `--data` that one relay at a time holds.
pub const LOCK_FILE: &str = "relay.lock";

/// Takes an exclusive `flock` on [`LOCK_FILE`] in `dir` (created 0600) and writes our pid in
/// it. Two relays on one store would each keep their own view of live sockets and
/// revocations (one would never close an app revoked through the other), so a second one is
/// refused, naming the first. The kernel releases the lock when the process ends, however it
/// ends.
fn lock_data_dir(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| {
            let next = if e.kind() == io::ErrorKind::PermissionDenied {
                format!(": {}", not_writable_hint(dir))
            } else {
                String::new()
            };
            io::Error::new(e.kind(), format!("cannot open {}: {e}{next}", path.display()))
        })?;
    if let Err(e) = crate::state::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(e.kind(), format!("cannot lock {}: {e}", path.display())));
        }
        // The kernel's lock table names the holder; the pid it wrote is the fallback (off
        // Linux, or when its /proc entry is not ours to read).
        let written = || std::fs::read_to_string(&path).ok()?.trim().parse::<u32>().ok();
        let holder = crate::daemon::lock_holder(&file, &path)
            .or_else(written)
            .map_or_else(String::new, |pid| format!(" (pid {pid})"));
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "another hermeschat-relay{holder} is using the data directory {} (it holds \
                 {}): stop it first, or give this relay a --data directory of its own (two \
                 relays on one store would not see each other's revocations)",
                dir.display(),
                path.display()
            ),
        ));
    }
    // Best effort: only the refusal message above reads it.
    let _ = file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(file)
}

/// Why the `--data` directory `dir` cannot be used (`e`, from creating it), and what to do.
fn data_dir_error(dir: &Path, e: io::Error) -> io::Error {
    let d = dir.display();
    // What the system said, without the path [`crate::state::ensure_dir`] put in front.
    let said = e.to_string();
    let cause = said.strip_prefix(&format!("{d}: ")).unwrap_or(&said);
    let message = match e.kind() {
        io::ErrorKind::AlreadyExists => format!(
            "--data {d} is a file, not a directory: pass a directory (one that does not exist \
             yet is created)"
        ),
        io::ErrorKind::NotADirectory => format!(
            "--data {d}: part of that path is a file, not a directory ({cause}): pass another \
             --data directory"
        ),
        io::ErrorKind::PermissionDenied => {
            format!("--data {d}: {cause}: {}", not_writable_hint(dir))
        }
        // E.g. the relative default (./relay-data) in a read-only root or working directory
        // (a container): the way out is the flag.
        _ => format!(
            "cannot use the data dir: {said}: choose a writable one with --data (or \
             HERMESCHAT_RELAY_DATA)"
        ),
    };
    io::Error::new(e.kind(), message)
}

/// The next step when the relay may not create or write the `--data` directory `dir`.
fn not_writable_hint(dir: &Path) -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    format!(
        "the relay runs as {} and may not write there: create the directory for that user \
         (sudo install -d -m 700 -o {me} {}), run the relay as the directory's owner, or pass \
         --data a directory of this user's",
        store::user_label(me),
        dir.display()
    )
}

/// Descriptors kept for what is not a client connection: the listener, the poller, SQLite,
/// log and TLS files, worker threads' sockets.
const FD_RESERVE: u64 = 64;

/// Raises the soft open-file limit ([`crate::poll::raise_open_file_limit`]) and lowers
/// `max_connections` to what it allows, so that the connection cap, not `accept` failing for
/// want of descriptors, is what turns clients away. Lowering a cap the operator `set` is
/// logged; lowering the default is not (a common `ulimit -n` of 20 000 is 64 short of it on
/// every start), and the `listening` line shows the cap in use either way.
fn fit_to_fd_limit(max_connections: usize, set: bool) -> usize {
    let Some(limit) = crate::poll::raise_open_file_limit() else { return max_connections };
    let room = usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if room >= max_connections {
        return max_connections;
    }
    let fit = room.max(1);
    if !set {
        return fit;
    }
    log_event(
        "config.max_connections",
        &[
            ("requested", &max_connections.to_string()),
            ("used", &fit.to_string()),
            ("why", "the open-file limit (ulimit -n) allows no more"),
        ],
    );
    fit
}

/// Why `--listen addr` cannot be bound, and what to do about it.
fn listen_error(addr: SocketAddr, e: io::Error) -> io::Error {
    let next = match e.kind() {
        io::ErrorKind::AddrInUse => {
            "another program (or another relay) already listens there: pass another --listen \
             address, or stop the other process (`ss -ltnp` or `lsof -nP -iTCP -sTCP:LISTEN` \
             shows which)"
        }
        io::ErrorKind::AddrNotAvailable => {
            "this machine has no such address: pass one of its own, 127.0.0.1, or 0.0.0.0 \
             with --public-url"
        }
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            "ports below 1024 need root or CAP_NET_BIND_SERVICE: listen on a higher port behind \
             a proxy, or run the unit --print-systemd-unit prints (it grants the capability)"
        }
        _ => "pass another --listen address",
    };
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}: {next}"))
}

fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> io::Result<native_tls::TlsAcceptor> {
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            io::Error::new(e.kind(), format!("{flag} {}: cannot read it: {e}", p.display()))
        })
    };
    let key_pem = read("--tls-key", key)?;
    let cert_pem = read("--tls-cert", cert)?;
    // The file that holds the other one's kind of block was most likely given to the wrong flag.
    let swapped =
        find(&cert_pem, b"PRIVATE KEY-----").is_some() && find(&key_pem, CERT_LABEL).is_some();
    let swap_hint = if swapped { " (were --tls-cert and --tls-key swapped?)" } else { "" };
    if find(&cert_pem, CERT_LABEL).is_none() {
        return Err(io::Error::other(format!(
            "--tls-cert {} holds no PEM certificate (BEGIN CERTIFICATE){swap_hint}: pass the \
             certificate chain, e.g. certbot's fullchain.pem",
            cert.display()
        )));
    }
    if find(&key_pem, b"PRIVATE KEY-----").is_none() {
        return Err(io::Error::other(format!(
            "--tls-key {} holds no PEM private key (BEGIN PRIVATE KEY){swap_hint}: pass the key \
             issued with the certificate, e.g. certbot's privkey.pem",
            key.display()
        )));
    }
    // native-tls wants the key's PEM block first in the file: text before it (openssl's "Bag
    // Attributes", an "EC PARAMETERS" block) is skipped rather than refused.
    let pkcs8 = find(&key_pem, PKCS8_LABEL).map_or(&key_pem[..], |at| &key_pem[at..]);
    let identity = native_tls::Identity::from_pkcs8(&cert_pem, pkcs8).map_err(|e| {
        io::Error::other(match key_form_hint(&key_pem, key) {
            Some(hint) => hint,
            None => format!(
                "--tls-cert {} and --tls-key {}: invalid TLS certificate or key (PEM, PKCS#8 \
                 key expected): {e}",
                cert.display(),
                key.display()
            ),
        })
    })?;
    let acceptor = native_tls::TlsAcceptor::new(identity)
        .map_err(|e| io::Error::other(format!("TLS setup failed: {e}")))?;
    self_handshake(&acceptor).map_err(|e| {
        io::Error::other(format!(
            "a TLS handshake with --tls-cert {} and --tls-key {} fails ({e}): the key does not \
             belong to the certificate's first entry. Pass the key issued with this certificate \
             (certbot: privkey.pem beside fullchain.pem in the same live/ directory)",
            cert.display(),
            key.display()
        ))
    })?;
    Ok(acceptor)
}

/// How a PEM certificate begins.
const CERT_LABEL: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// One TLS handshake of `acceptor` with ourselves over a socket pair. The TLS library takes a
/// key that does not match the certificate without a word; the relay would then start and fail
/// every client's handshake, logging nothing, so that is found out here, before it starts.
fn self_handshake(acceptor: &native_tls::TlsAcceptor) -> Result<(), String> {
    let (server, client) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    for s in [&server, &client] {
        // Bounded: a stuck handshake must not keep the relay from starting or failing.
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    }
    let acceptor = acceptor.clone();
    let accepting = std::thread::Builder::new()
        .name("tls-check".into())
        .spawn(move || acceptor.accept(server).map(drop).map_err(|e| e.to_string()))
        .map_err(|e| e.to_string())?;
    // Only whether the key signs for the certificate is checked: not its name or its issuer.
    let connected = native_tls::TlsConnector::builder()
        .danger_accept_invalid_certs(true)
        .danger_accept_invalid_hostnames(true)
        .build()
        .map_err(|e| e.to_string())?
        .connect("localhost", client)
        .map(drop)
        .map_err(|e| e.to_string());
    let accepted = accepting.join().unwrap_or_else(|_| Err("the check panicked".into()));
    accepted.and(connected)
}

/// How a PKCS#8 PEM key begins, the only form native-tls loads.
const PKCS8_LABEL: &[u8] = b"-----BEGIN PRIVATE KEY-----";

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Why a key file native-tls refused is not PKCS#8, with the command that converts it, when
/// its PEM label names another form (SEC1 and PKCS#1 are what `openssl ecparam`/`genrsa`
/// and older tools write); `None` when the label says nothing useful.
fn key_form_hint(pem: &[u8], path: &std::path::Path) -> Option<String> {
    let shown = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@".contains(c);
    let quoted = if shown.chars().all(plain) {
        shown.clone()
    } else {
        format!("'{}'", shown.replace('\'', r"'\''"))
    };
    let (form, command) = if find(pem, PKCS8_LABEL).is_some() {
        return None;
    } else if find(pem, b"-----BEGIN EC PRIVATE KEY-----").is_some() {
        ("an EC key in SEC1 form (BEGIN EC PRIVATE KEY)", "openssl pkcs8 -topk8 -nocrypt")
    } else if find(pem, b"-----BEGIN RSA PRIVATE KEY-----").is_some() {
        ("an RSA key in PKCS#1 form (BEGIN RSA PRIVATE KEY)", "openssl pkcs8 -topk8 -nocrypt")
    } else if find(pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----").is_some() {
        ("an encrypted key (BEGIN ENCRYPTED PRIVATE KEY)", "openssl pkcs8")
    } else {
        return None;
    };
    Some(format!(
        "--tls-key {shown} holds {form}, and the relay reads unencrypted PKCS#8 keys (BEGIN \
         PRIVATE KEY): convert it with `{command} -in {quoted} -out key.pk8.pem` and pass \
         --tls-key key.pk8.pem (convert it again whenever the key is renewed)"
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A [`Shared`] with the store in `data`, whose messages to the reactor go nowhere.
    pub(crate) fn shared_in(data: PathBuf) -> Shared {
        let config = RelayConfig::new(([127, 0, 0, 1], 0).into(), data);
        Shared {
            register_limit: RateLimiter::new(0),
            verify_limit: RateLimiter::new(0),
            config,
            public_url: "http://127.0.0.1".into(),
            presence: Mutex::new(Presence::default()),
            revocations: AtomicU64::new(0),
            admission: AtomicUsize::new(0),
            store_failing: AtomicBool::new(false),
            refusals: refusals::RefusalLog::default(),
            to_reactor: mpsc::channel().0,
            poller: Arc::new(Poller::new().unwrap()),
        }
    }

    #[test]
    fn no_request_starts_once_the_gate_is_closed_and_running_ones_are_counted() {
        let s = shared_in(PathBuf::from("/nonexistent"));
        let a = s.begin_request().unwrap();
        let b = s.begin_request().unwrap();
        assert_eq!(s.requests_running(), 2);
        drop(b);
        s.close_gate();
        assert!(s.gate_closed());
        assert!(s.begin_request().is_none(), "a request started after the grace");
        assert_eq!(s.requests_running(), 1, "the one running is still counted");
        drop(a);
        assert_eq!(s.requests_running(), 0);
        assert!(s.begin_request().is_none());
    }

    #[test]
    fn a_key_in_another_form_is_named_with_the_command_that_converts_it() {
        let path = std::path::Path::new("/etc/ssl/my key.pem");
        let hint = |pem: &str| key_form_hint(pem.as_bytes(), path);
        let sec1 = hint("-----BEGIN EC PARAMETERS-----\nBggq\n-----END EC PARAMETERS-----\n-----BEGIN EC PRIVATE KEY-----\n").unwrap();
        assert!(sec1.contains("SEC1"), "{sec1}");
        assert!(
            sec1.contains(
                "openssl pkcs8 -topk8 -nocrypt -in '/etc/ssl/my key.pem' -out key.pk8.pem"
            ),
            "{sec1}"
        );
        let pkcs1 = hint("-----BEGIN RSA PRIVATE KEY-----\n").unwrap();
        assert!(pkcs1.contains("PKCS#1") && pkcs1.contains("-topk8 -nocrypt"), "{pkcs1}");
        let encrypted = hint("-----BEGIN ENCRYPTED PRIVATE KEY-----\n").unwrap();
        assert!(encrypted.contains("`openssl pkcs8 -in '/etc/ssl/my key.pem'"), "{encrypted}");
        assert_eq!(hint("-----BEGIN PRIVATE KEY-----\n"), None);
        assert_eq!(hint("garbage"), None);
    }
}
