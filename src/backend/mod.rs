//! The built-in backend: the job of the original tool's bundled Python server, inside the
//! daemon, on a loopback address only (`127.0.0.1:<port>`, or `[::1]:<port>` for an IPv6
//! backend host; ARCHITECTURE §4).
//!
//! Threads: one acceptor, then one thread per connection up to [`Settings::max_connections`]
//! (more are answered 503 and closed), plus a short-lived watcher per streamed upstream
//! exchange. No async runtime. Modules, one concern each:
//! - [`conn`] — reading requests and writing responses (fixed or chunked);
//! - [`control`] — `/api/health`, `/api/gateway/health`, `/api/gateway/restart`;
//! - [`chat`] — `POST /api/chat`: the gateway (or the direct provider), SSE relayed as it
//!   arrives, errors as SSE events;
//! - [`uploads`] — storing, listing and fetching uploaded files;
//! - [`proxy`] — `/v1/*` and `/api/sessions*` passed to the gateway unchanged;
//! - [`upstream`] — the gateway's address and key, and the direct provider;
//! - [`peer`] and [`key`] — who may use it: this user's own clients only. Where the system
//!   tells who connects (Linux), other accounts are refused; where it cannot (macOS), a request
//!   must carry the backend key of this state directory, which the bridge sends
//!   (what each kind of client may do: [`peer::Access`]).
//!
//! Logs go to `server.log` in the state directory (size-rotated); never secrets or bodies.

pub mod chat;
pub mod conn;
pub mod control;
pub mod key;
pub mod peer;
pub mod proxy;
pub mod uploads;
pub mod upstream;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bridge::local_http::Timeouts;
use crate::http::Head;
use crate::state::{self, RotatingLog};
use conn::{Conn, Next};
use key::BackendKey;
use peer::Access;
use upstream::{Direct, GatewaySource, Upstream};

/// Where the built-in backend listens and keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The loopback address (`127.0.0.1`, or `::1` when the backend host is IPv6).
    pub host: IpAddr,
    /// The loopback port.
    pub port: u16,
    /// The state directory (uploads, `server.log`).
    pub state_dir: PathBuf,
}

/// Everything the backend runs with. [`Settings::from_env`] gives the daemon's; tests build
/// their own (a fixed gateway, short deadlines).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The loopback address it listens on.
    pub host: IpAddr,
    /// The loopback port (0: any free port; see [`Started::port`]).
    pub port: u16,
    /// The state directory (`uploads/`, `server.log`, `gateway.log`).
    pub state_dir: PathBuf,
    /// Where the gateway configuration comes from.
    pub gateway: GatewaySource,
    /// The direct provider, when `AI_API_KEY` is set.
    pub direct: Option<Direct>,
    /// Deadlines of gateway exchanges.
    pub timeouts: Timeouts,
    /// Connections served at once; more are answered 503.
    pub max_connections: usize,
    /// Largest request body for chat and proxied requests.
    pub max_body: usize,
    /// Largest stored upload.
    pub max_upload: usize,
    /// Deadline of one `POST /api/gateway/restart`.
    pub restart_deadline: Duration,
    /// Whether the owner of each connection is looked up ([`peer::access`]); when false, every
    /// connection is treated as on a system that cannot tell (the backend key required).
    /// From [`peer::LOOKUP_ENV`], which only tests set.
    pub peer_lookup: bool,
}

impl Settings {
    /// The daemon's settings: gateway discovered from the environment and `~/.hermes`, the
    /// direct provider from `AI_API_KEY`/`AI_BASE_URL`/`AI_MODEL`.
    pub fn from_env(config: &BackendConfig) -> Settings {
        Settings {
            host: config.host,
            port: config.port,
            state_dir: config.state_dir.clone(),
            gateway: GatewaySource::Discover,
            direct: Direct::from_env(),
            timeouts: Timeouts {
                connect: Duration::from_secs(3),
                // A streamed chat answers its head at once; a non-streamed one only when the
                // agent has finished, which can take minutes.
                head: Duration::from_secs(600),
                // The gateway sends a keep-alive comment every 30 s while the agent works.
                body_gap: Duration::from_secs(180),
            },
            max_connections: 64,
            max_body: 16 << 20,
            max_upload: 10 << 20,
            restart_deadline: Duration::from_secs(30),
            peer_lookup: peer::lookup_enabled(),
        }
    }
}

/// State shared by the connection threads.
pub struct Shared {
    /// The settings.
    pub settings: Settings,
    /// The port bound (the settings may say 0: any).
    pub port: u16,
    /// The gateway.
    pub upstream: Upstream,
    /// The upload store.
    pub uploads: uploads::Store,
    /// `server.log` (stderr when it cannot be opened).
    log: Mutex<Option<RotatingLog>>,
    /// Set when the backend stops.
    pub stop: Arc<AtomicBool>,
    /// Serialises gateway restarts.
    pub restarting: Mutex<()>,
    /// Connections open now.
    active: AtomicUsize,
    /// The backend key (`backend.key`), required where the client's owner is not known.
    key: BackendKey,
}

impl Shared {
    /// Writes one line to `server.log`. Callers never pass secrets or bodies.
    pub fn log(&self, message: &str) {
        let line = format!("{} {message}\n", crate::bridge::format_ts(crate::relay::now_ms()));
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        match log.as_mut() {
            Some(f) => {
                let _ = io::Write::write_all(f, line.as_bytes());
            }
            None => eprint!("{line}"),
        }
    }
}

/// Whether this build has a built-in backend to start.
pub fn available() -> bool {
    true
}

/// Binds `<host>:<port>` (loopback) now, so a busy port is reported at once, and serves on a
/// thread until `stop` is set.
pub fn start(config: &BackendConfig, stop: Arc<AtomicBool>) -> io::Result<Started> {
    start_with(Settings::from_env(config), stop)
}

/// A running backend.
pub struct Started {
    /// The port bound.
    pub port: u16,
    /// The acceptor thread; it ends (after a short drain) once `stop` is set.
    pub thread: JoinHandle<()>,
    /// The shared state (for tests and diagnostics).
    pub shared: Arc<Shared>,
    /// Its key (`backend.key`): what this state directory's bridge presents to it.
    pub key: BackendKey,
}

/// Why the backend cannot listen on `addr`, and what to do: pairing found the port free a moment
/// ago, so another program took it since, or it needs a privilege this user lacks.
fn bind_error(addr: SocketAddr, e: io::Error) -> io::Error {
    let port = addr.port();
    let next = match e.kind() {
        // The backend starts only where a probe found nothing listening: another program (or
        // another state directory's bridge) took the port since.
        io::ErrorKind::AddrInUse => format!(
            "port {port} on {} was taken right after it was found free (another program started \
             listening there meanwhile; lsof -nP -iTCP:{port} -sTCP:LISTEN shows which). Run \
             this again: a Hermes API there is then used; or pass --port <a free port>",
            addr.ip()
        ),
        io::ErrorKind::PermissionDenied if port < 1024 => {
            "ports below 1024 need root: pass --port <a port from 1024 up>".to_owned()
        }
        io::ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this machine: unset HERMESCHAT_LOCAL_HOST, or set it to \
             127.0.0.1 or ::1",
            addr.ip()
        ),
        _ => "pass --port <a free port>".to_owned(),
    };
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}: {next}"))
}

/// [`start`] with explicit settings.
pub fn start_with(settings: Settings, stop: Arc<AtomicBool>) -> io::Result<Started> {
    let addr = SocketAddr::new(settings.host, settings.port);
    let listener = TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
    let port = listener.local_addr()?.port();
    let in_state_dir =
        |e: io::Error| io::Error::new(e.kind(), format!("{e}{}", state::write_hint(&e)));
    state::ensure_dir(&settings.state_dir).map_err(in_state_dir)?;
    let (key, key_note) = key::load_or_create(&settings.state_dir).map_err(in_state_dir)?;
    let log = match RotatingLog::open(&state::server_log(&settings.state_dir)) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("cannot open server.log: {e}");
            None
        }
    };
    let uploads = uploads::Store::new(settings.state_dir.join("uploads"), settings.max_upload);
    let upstream = Upstream::new(settings.gateway.clone(), settings.timeouts);
    let shared = Arc::new(Shared {
        settings,
        port,
        upstream,
        uploads,
        log: Mutex::new(log),
        stop: stop.clone(),
        restarting: Mutex::new(()),
        active: AtomicUsize::new(0),
        key: key.clone(),
    });
    if let Some(note) = key_note {
        shared.log(&note);
    }
    let leftovers = shared.uploads.remove_leftovers();
    if leftovers > 0 {
        shared.log(&format!(
            "removed {leftovers} unfinished upload file(s) left by a bridge that died"
        ));
    }
    let poller = crate::poll::Poller::new()?;
    // SAFETY: the listener outlives its registration: it is deleted from the poller before
    // the acceptor thread drops either.
    unsafe {
        poller.add_with_mode(
            &listener,
            crate::poll::Event::readable(0),
            crate::poll::PollMode::Level,
        )?
    };
    listener.set_nonblocking(true)?;
    shared.log(&format!(
        "built-in backend listening on http://{} (gateway {}, direct fallback {})",
        SocketAddr::new(shared.settings.host, port),
        shared.upstream.config().addr(),
        if shared.settings.direct.is_some() { "on" } else { "off" }
    ));
    let s2 = shared.clone();
    let thread = std::thread::Builder::new()
        .name("backend-accept".into())
        .spawn(move || accept_loop(&listener, &poller, &s2))?;
    Ok(Started { port, thread, shared, key })
}

/// Accepts until `stop`, then waits briefly for open connections to finish.
fn accept_loop(listener: &TcpListener, poller: &crate::poll::Poller, shared: &Arc<Shared>) {
    let mut events = crate::poll::Events::new();
    while !shared.stop.load(Ordering::SeqCst) {
        events.clear();
        let _ = poller.wait(&mut events, Some(Duration::from_millis(200)));
        loop {
            match listener.accept() {
                Ok((stream, peer)) => spawn_connection(stream, peer, shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    shared.log(&format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
    let _ = poller.delete(listener);
    let until = Instant::now() + Duration::from_secs(2);
    while shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    shared.log("built-in backend stopped");
}

/// Serves `stream` on its own thread, or answers 503 when at the connection cap.
fn spawn_connection(stream: TcpStream, peer: std::net::SocketAddr, shared: &Arc<Shared>) {
    let _ = stream.set_nonblocking(false);
    if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.settings.max_connections {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        let mut c = Conn::new(stream);
        let _ = c.error(503, "busy", "too many connections to the built-in backend", true);
        return;
    }
    let s2 = shared.clone();
    let spawned = std::thread::Builder::new().name("backend-conn".into()).spawn(move || {
        let access =
            if s2.settings.peer_lookup { peer::access(&stream, peer) } else { Access::Unsupported };
        serve_connection(Conn::new(stream), &s2, access);
        s2.active.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        shared.log(&format!("cannot start a connection thread: {e}"));
    }
}

/// The body cap for a request head.
fn body_cap(shared: &Shared, head: &Head) -> usize {
    if uploads::is_upload_route(head.path()) {
        shared.settings.max_upload + (64 << 10)
    } else {
        shared.settings.max_body
    }
}

/// Serves requests on one connection until it closes.
///
/// Who may use it, by what [`peer::access`] found out about the client:
/// - this user's own ([`Access::Ours`]): everything, as it always was; a backend key sent
///   along is taken out and not checked, so the user's own scripts need none;
/// - another account's ([`Access::Stranger`]): nothing, refused at once;
/// - a client the system knows of but has no owner for ([`Access::Unknown`]: gone, an
///   orphan): only requests with the backend key, the health check too (as it was refused
///   before there was a key);
/// - on a system that cannot tell ([`Access::Unsupported`]): requests with the backend key,
///   and the health check without one. `GET /api/health` stays open there because the
///   commands that look for a backend before any key exists or is theirs ask it (pairing's
///   backend check, which also recognises another state directory's built-in backend by it,
///   `--status`, the doctor's backend hop), and it drives nothing: it tells whether the
///   gateway is up, never sends a request of the caller's on, and starts at most one check of
///   the gateway key every 30 s.
///
/// The key header is removed from every request before it is routed, so it never reaches the
/// gateway, a log or anything else.
fn serve_connection(mut c: Conn, shared: &Arc<Shared>, access: Access) {
    if access == Access::Stranger {
        // Another account of this machine: the gateway key this backend adds is not its, and
        // its health check would make its own pairing take this backend for its own.
        // Answered at once, then its request is drained for a moment (so that closing does
        // not reset the answer away): a silent one holds a slot 0.2 s.
        shared.log("refused a connection of another user of this machine (403)");
        let msg = "this is another user's built-in backend: only the user running that \
                   hermeschat-pair may use it; pass --port <another port>";
        let _ = c.error(403, "forbidden", msg, true);
        conn::drain_and_close(&c.stream, Duration::from_millis(200));
        return;
    }
    loop {
        let mut req = match c.next(&shared.stop, |h| body_cap(shared, h)) {
            Next::Request(r) => r,
            Next::Closed => return,
            Next::Refuse(status, msg) => {
                let _ = c.error(status, "bad_request", &msg, true);
                conn::close(&c.stream);
                return;
            }
        };
        let started = Instant::now();
        let presented = key::take_from(&mut req.head.headers);
        let refusal = key_refusal(shared, access, &req.head, presented.as_deref());
        let close =
            refusal.is_some() || req.head.wants_close() || shared.stop.load(Ordering::SeqCst);
        let outcome = match refusal {
            Some((code, msg)) => c.error(403, code, msg, close).map(|()| 403),
            None => route(shared, &req, &mut c, close),
        };
        // Only a health check can keep itself out of the log (the header passes through the
        // bridge from apps like any other).
        let probe = req.head.method == "GET"
            && req.head.path() == "/api/health"
            && req.head.header(crate::bridge::poller::PROBE_HEADER).is_some();
        if !(probe && matches!(outcome, Ok(200..=299))) {
            shared.log(&format!(
                "{} {} -> {} in {} ms",
                req.head.method,
                req.head.path(),
                match &outcome {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("aborted ({e})"),
                },
                started.elapsed().as_millis()
            ));
        }
        if close || outcome.is_err() {
            conn::close(&c.stream);
            return;
        }
    }
}

/// Why a request on a connection with `access` is refused for its backend key (`presented`,
/// if any): the error code and message of the 403, `None` when it may be served
/// ([`serve_connection`] has the rules).
fn key_refusal(
    shared: &Shared,
    access: Access,
    head: &Head,
    presented: Option<&str>,
) -> Option<(&'static str, &'static str)> {
    let open = match access {
        Access::Ours => return None,
        Access::Unsupported => {
            matches!(head.method.as_str(), "GET" | "HEAD")
                && matches!(head.path(), "/api/health" | "/health")
        }
        Access::Unknown | Access::Stranger => false,
    };
    match presented {
        Some(k) if shared.key.matches(k) => None,
        _ if open => None,
        None => {
            shared.log("refused a request without the backend key (403): its sender is unknown");
            Some(("backend_key_required", KEY_REQUIRED))
        }
        Some(_) => {
            shared.log("refused a request with a wrong backend key (403)");
            Some(("backend_key_wrong", KEY_WRONG))
        }
    }
}

/// The 403 for a request without the backend key.
const KEY_REQUIRED: &str = "this backend serves only the hermeschat-pair of the account that \
    started it, and this system cannot tell which account a connection comes from, so a request \
    must carry the key in backend.key of that hermeschat-pair's state directory in the \
    X-Hermeschat-Backend-Key header, as its bridge does. From another account (or state \
    directory), run your own backend: hermeschat-pair --port <a free port>; a script of yours \
    sends the header with the contents of backend.key";

/// The 403 for a request with a key that is not this backend's.
const KEY_WRONG: &str = "this backend serves only the hermeschat-pair of the account that \
    started it, and the X-Hermeschat-Backend-Key header does not hold its key (another state \
    directory's, or backend.key was replaced after this backend started: restart it with \
    hermeschat-pair --stop, then hermeschat-pair). From another account, run your own backend: \
    hermeschat-pair --port <a free port>";

/// True for a loopback host name, with or without a port (an IPv6 literal bracketed, or bare
/// without a port).
fn loopback_host(host: &str) -> bool {
    let host = host.trim();
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host
            .rsplit_once(':')
            .map_or(host, |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { host }),
    };
    crate::cli::is_loopback(name)
}

/// True unless the request names a non-loopback `Host` or comes from a web page: browsers
/// send `Origin` on cross-origin requests but a GET, and mark every request `Sec-Fetch-Site`;
/// the app and the bridge send neither. Only a page this backend served itself (an `Origin` of
/// this backend's address, or `localhost` and its port) is not another's: a page on another
/// loopback address or port may be another user's of this machine, and a page's request is
/// made by this user's browser.
fn local_origin(head: &Head, bound: std::net::SocketAddr) -> bool {
    let host_ok = head.header("host").is_none_or(loopback_host);
    let origin_ok = head.header("origin").is_none_or(|o| {
        let rest = o.trim().strip_prefix("http://").or_else(|| o.trim().strip_prefix("https://"));
        let authority = rest.map(|r| r.split('/').next().unwrap_or("")).unwrap_or("");
        // `localhost` names 127.0.0.1 and ::1: ours when bound to either.
        let localhost = matches!(bound.ip().to_string().as_str(), "127.0.0.1" | "::1");
        let ours = authority.parse::<std::net::SocketAddr>().is_ok_and(|a| a == bound)
            || (localhost && authority == format!("localhost:{}", bound.port()));
        ours && loopback_host(authority)
    });
    let fetch_ok = head
        .header("sec-fetch-site")
        .is_none_or(|site| matches!(site.trim(), "same-origin" | "none"));
    host_ok && origin_ok && fetch_ok
}

/// Dispatches one request; `Ok(status)` when the connection may be reused.
fn route(shared: &Arc<Shared>, req: &conn::Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let path = req.head.path();
    let method = req.head.method.as_str();
    let reply = |c: &mut Conn, status: u16, code: &str, msg: &str| {
        c.error(status, code, msg, close).map(|()| status)
    };
    if !local_origin(&req.head, std::net::SocketAddr::new(shared.settings.host, shared.port)) {
        // A web page (DNS rebinding, or a cross-site form) must not drive the agent.
        return reply(c, 403, "forbidden", "only local clients may use the built-in backend");
    }
    match (method, path) {
        ("GET" | "HEAD", "/api/health" | "/health") => control::health(shared, req, c, close),
        ("GET", "/api/gateway/health") => control::gateway_health(shared, c, close),
        ("POST", "/api/gateway/restart") => control::restart(shared, req, c, close),
        ("POST", "/api/chat") => chat::handle(shared, req, c, close),
        (_, "/api/gateway/health" | "/api/gateway/restart" | "/api/chat") => {
            reply(c, 405, "method_not_allowed", "method not allowed here")
        }
        (_, p) if uploads::is_upload_route(p) || uploads::is_files_route(p) => {
            uploads::handle(shared, req, c, close)
        }
        (_, p) if proxy::is_proxied(p) => proxy::forward(shared, req, c, close),
        _ => reply(c, 404, "not_found", &format!("no route {method} {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::{bind_error, loopback_host};
    use std::io;

    #[test]
    fn a_port_the_backend_cannot_take_is_named_with_the_way_out() {
        let err = |kind, addr: &str| bind_error(addr.parse().unwrap(), io::Error::from(kind));
        let busy = err(io::ErrorKind::AddrInUse, "127.0.0.1:8765").to_string();
        assert!(busy.starts_with("cannot listen on 127.0.0.1:8765: "), "{busy}");
        assert!(busy.contains("lsof -nP -iTCP:8765") && busy.contains("--port"), "{busy}");
        let low = err(io::ErrorKind::PermissionDenied, "127.0.0.1:81").to_string();
        assert!(low.contains("ports below 1024 need root") && low.contains("--port"), "{low}");
        let gone = err(io::ErrorKind::AddrNotAvailable, "[::1]:8765").to_string();
        assert!(gone.contains("HERMESCHAT_LOCAL_HOST"), "{gone}");
    }

    #[test]
    fn loopback_hosts_with_and_without_ports() {
        for host in ["127.0.0.1", "127.0.0.1:8765", "localhost:8765", "[::1]:8765", "[::1]", "::1"]
        {
            assert!(loopback_host(host), "{host} is loopback");
        }
        for host in ["192.168.1.5:8765", "evil.example:8765", "[fd00::1]:8765", "fd00::1", "", ":1"]
        {
            assert!(!loopback_host(host), "{host} is not loopback");
        }
    }
}
