//! The LAN server: `ws://<lan-ip>:<port>/ws/app`, speaking PROTOCOL §5 frames straight to the
//! app (§8), bound to the chosen LAN address only.
//!
//! **Why one readiness-driven thread, not a thread per connection.** tungstenite's blocking
//! `WebSocket` cannot be split into a reader and a writer, so a thread per socket would have to
//! poll with read timeouts to interleave the frames the workers produce — exactly the delay on
//! the hot path the design forbids. Here every socket is non-blocking and registered with one
//! `crate::poll::Poller`; each worker's [`Outbox`] send notifies that poller, so a response frame is
//! written the moment it exists. The wait timeout (at most `TICK`) only drives the timers
//! (pings, idle and handshake deadlines) and notices the stop flag; it never gates a frame.
//! The work per event is small (parse a frame, hand it to the pool, copy a frame out), so one
//! thread serves the handful of phones a LAN has with room to spare, and it owns every socket
//! without locks. Connections are capped ([`MAX_CONNECTIONS`]).
//!
//! **Bounded queues.** Each socket has a bounded channel ([`OUTBOX_FRAMES`] frames) from the
//! workers and an outgoing queue that is filled from it only while it holds less than
//! `max_queued_bytes`; past that the channel fills and the worker blocks, which slows its
//! backend read (TCP back-pressure end to end). TCP_NODELAY is set on every socket.
//!
//! **Authentication before the upgrade.** `GET /ws/app` must carry the pairing token or a
//! device's clientSecret (`Authorization: Bearer …` or `?token=…`); anything else gets 401
//! before any WebSocket exists, and is counted per source address: after
//! [`MAX_FAILURES_PER_MINUTE`] failures an address gets 429 (with `Retry-After`) until its
//! minute is over, whatever it presents.
//!
//! **Frames.** The socket is the client: requests are stamped with the device's clientId for
//! the pool (so ids are per device and the backend gets `X-HermesChat-Client`), and `client` is
//! stripped from every frame sent back. After the upgrade the app first gets `paired` (only
//! when it presented the pairing token) and then `bridge.status` `online: true`, as a relay
//! would send (the bridge *is* the peer, so it is always online).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use crate::poll::{Event, Events, PollMode, Poller};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

use crate::stream::Stream;
use crate::wsout::{WsOut, would_block};
use crate::wsread::{Discarded, Ended, Incoming, ReadError, WsReader, close_reply};

use super::store::{self, Authorized, PendingToken, Refused};
use crate::bridge::workers::{Pool, SHUTDOWN_GRACE};
use crate::bridge::{LiveStatus, Outbox, log};
use crate::http::{self, Head, Parsed};
use crate::protocol::{self as p, Frame, close_code};
use crate::secret;

/// Poller key of the listening socket.
const LISTENER: usize = usize::MAX - 1;

/// Open connections at most (HTTP and WebSocket together); a LAN has a few phones. When it is
/// reached, the oldest connection still sending its request head makes room for a new one:
/// idle sockets opened by another host never keep a phone out.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections from one address still sending their request head, at most.
pub const MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 8;

/// How often at most one address's refusals are written to the log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Frames a worker may queue for one socket before it blocks.
pub const OUTBOX_FRAMES: usize = 64;

/// Failed authentications from one address in a minute before it gets 429.
pub const MAX_FAILURES_PER_MINUTE: u32 = 10;

/// Addresses tracked by the failure counter before old entries are pruned.
const MAX_TRACKED: usize = 4096;

/// Deadline for a request head (and for writing the answer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The poller's longest wait: bounds timer and stop latency only.
const TICK: Duration = Duration::from_millis(250);

/// Messages read from one socket before others get a turn.
const READ_BATCH: usize = 32;

/// Bytes of a refused app's stream dropped per turn (`WsConn::discarding`), so one app that
/// sends without pause cannot hold the server's thread.
const DISCARD_BUDGET: usize = 256 << 10;

/// Bytes waiting for one app socket past which it is not read until they drain: above what
/// the workers' frames fill it to (`max_queued_bytes`, 32 MiB, and one frame past it), so only
/// the answers to an app that sends without reading reach it.
const READ_PAUSE: usize = 48 << 20;

/// Bad frames tolerated on one socket before it is closed with 4008.
const MAX_BAD_FRAMES: u32 = 32;

/// How long a closing WebSocket may take to finish its close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long the secret of a pairing taken back is told apart from a guess: a token's life.
fn undone_remembered() -> Duration {
    Duration::from_secs(store::token_ttl_secs())
}

/// Pairings taken back remembered at most (each needs a scan of the QR code).
const MAX_UNDONE_REMEMBERED: usize = 64;

/// The name a device gets when it does not say.
const DEFAULT_DEVICE_NAME: &str = "iPhone";

/// Who an upgraded socket is.
struct Session {
    client_id: String,
    device_name: String,
    /// A pairing-token connection: the clientSecret to announce in `paired`, and the token it
    /// used up, given back if the app never answers ([`store::undo_pairing`]).
    pairing: Option<(String, PendingToken)>,
}

/// What happens after an HTTP answer is written.
enum After {
    Close,
    Upgrade(Session),
}

/// A connection still speaking HTTP.
struct HttpConn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    after: Option<After>,
}

/// An established app socket.
struct WsConn {
    ws: WebSocket<Stream>,
    client_id: String,
    /// Frames from the workers (ready JSON, still carrying `client`).
    rx: Receiver<String>,
    /// The sending side handed to the pool with each request.
    outbox: Outbox,
    /// Messages waiting for the socket (bounded by back-pressure).
    out: WsOut,
    last_rx: Instant,
    last_ping: Instant,
    bad_frames: u32,
    /// Detached from routing (closing or replaced): nothing is read into the pool.
    detached: bool,
    /// A close frame was sent; dropped at this instant at the latest.
    closing: Option<Instant>,
    /// Its stream was refused (a message over the limit, a breach of RFC 6455): what it sends
    /// is read dry unparsed ([`crate::wsread::discard_input`] says why).
    discarding: bool,
    /// The write side was shut once the close frame of a refused stream left.
    write_shut: bool,
    /// Reads its messages (tungstenite only writes).
    reader: WsReader,
    /// A new pairing until the app's first frame shows that `paired` reached it: the token it
    /// used up, given back if the socket ends first ([`Server::remove`]).
    unconfirmed: Option<PendingToken>,
    /// Reading stopped at [`READ_PAUSE`]: read again once the queue drains (frames may wait in
    /// the reader's buffer, which no readiness event announces).
    paused: bool,
}

enum Io {
    Http(HttpConn),
    Ws(Box<WsConn>),
}

struct Conn {
    io: Io,
    ip: IpAddr,
    deadline: Option<Instant>,
    /// Interest registered now: (readable, writable).
    interest: (bool, bool),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Http(h) => &h.stream,
            Io::Ws(w) => w.ws.get_ref().tcp(),
        }
    }
}

/// Failed authentications per source address, in fixed one-minute windows, counted apart for
/// requests a web page sent (an `Origin` not this server's) and the others.
#[derive(Default)]
pub struct Failures {
    map: HashMap<(IpAddr, bool), (u32, Instant)>,
    /// Per address and kind of refusal: when the last one was logged, and those not logged
    /// since.
    logged: HashMap<(IpAddr, &'static str), (Instant, u32)>,
}

impl Failures {
    const WINDOW: Duration = Duration::from_secs(60);

    /// `Some(seconds to wait)` when `ip` failed too often in its current window, with
    /// requests of web pages (`page`) or with the others.
    pub fn blocked(&self, ip: IpAddr, page: bool, now: Instant) -> Option<u64> {
        let (count, start) = self.map.get(&(ip, page))?;
        let elapsed = now.duration_since(*start);
        (*count >= MAX_FAILURES_PER_MINUTE && elapsed < Self::WINDOW)
            .then(|| (Self::WINDOW - elapsed).as_secs().max(1))
    }

    /// Counts one failure of `ip`, with a web page's request (`page`) or another.
    pub fn fail(&mut self, ip: IpAddr, page: bool, now: Instant) {
        make_room(&mut self.map, |(_, start)| now.duration_since(*start) < Self::WINDOW);
        let entry = self.map.entry((ip, page)).or_insert((0, now));
        if now.duration_since(entry.1) >= Self::WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    /// Whether a refusal of `ip` of this `kind` is to be logged now (one line per address and
    /// kind a minute, so that no host floods the log), with those left out since the last line.
    pub fn log_now(&mut self, ip: IpAddr, kind: &'static str, now: Instant) -> Option<u32> {
        make_room(&mut self.logged, |(at, _)| now.duration_since(*at) < REFUSAL_LOG_EVERY);
        match self.logged.get_mut(&(ip, kind)) {
            Some((at, skipped)) if now.duration_since(*at) < REFUSAL_LOG_EVERY => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                *at = now;
                Some(std::mem::take(skipped))
            }
            None => {
                self.logged.insert((ip, kind), (now, 0));
                Some(0)
            }
        }
    }
}

/// Keeps a per-address table under [`MAX_TRACKED`] entries: when full, the entries `current`
/// no longer takes go, and if that is not enough, all of them (more distinct addresses than a
/// LAN has: forgotten rather than grown).
fn make_room<K, V>(map: &mut HashMap<K, V>, current: impl Fn(&V) -> bool)
where
    K: std::hash::Hash + Eq,
{
    if map.len() >= MAX_TRACKED {
        map.retain(|_, entry| current(entry));
        if map.len() >= MAX_TRACKED {
            map.clear();
        }
    }
}

/// True for a request a web browser sent on behalf of a page: browsers always name the page's
/// origin on a WebSocket handshake; the app sends none, or names this server itself. Such
/// failures are counted apart and block only such requests: a page the phone opens cannot
/// lock the app out, and a script that names an origin to dodge the limit is limited all the
/// same.
fn from_a_web_page(head: &Head, own: Option<SocketAddr>) -> bool {
    let Some(origin) = head.header("origin").map(str::trim) else { return false };
    let authority = ["http://", "https://", "ws://", "wss://"]
        .iter()
        .find_map(|scheme| origin.strip_prefix(scheme))
        .map(|rest| rest.trim_end_matches('/'));
    let ours = authority.and_then(|a| a.parse::<SocketAddr>().ok());
    own.is_none() || ours != own
}

/// Removes the `client` a worker stamped on a frame (PROTOCOL §8: the socket is the client).
/// Frames are serialised `{"type":…,"id":…,"client":…,…}`; type and id never contain quotes, so
/// the first occurrence within the head is the field itself, never body text.
pub fn strip_client(mut text: String, client: &str) -> String {
    let needle = format!(",\"client\":\"{client}\"");
    let limit = text.len().min(needle.len() + 128);
    let found = text.as_bytes()[..limit].windows(needle.len()).position(|w| w == needle.as_bytes());
    if let Some(at) = found {
        text.replace_range(at..at + needle.len(), "");
    }
    text
}

/// A JSON error answer, then close.
fn refuse(status: u16, code: &str, message: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let body = serde_json::to_string(&p::ApiError::new(code, message)).unwrap_or_default();
    let mut headers = vec![("Cache-Control", "no-store")];
    headers.extend_from_slice(extra);
    http::response(status, "application/json", body.as_bytes(), &headers, true)
}

/// A device name from the request (header `X-Device-Name` or `?deviceName=`), cleaned.
fn device_name(head: &Head) -> String {
    let raw = head
        .header("x-device-name")
        .map(str::to_owned)
        .or_else(|| head.query("deviceName").map(percent_decode))
        .unwrap_or_default();
    let clean: String =
        raw.chars().filter(|c| !c.is_control()).take(100).collect::<String>().trim().to_owned();
    if clean.is_empty() { DEFAULT_DEVICE_NAME.to_owned() } else { clean }
}

/// `%XX` and `+` decoding for a query value (lossy UTF-8).
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The LAN server, driven by [`Server::run`] on its own thread.
pub struct Server {
    poller: Arc<Poller>,
    listener: Option<TcpListener>,
    state_dir: PathBuf,
    pool: Arc<Pool>,
    status: Arc<LiveStatus>,
    stop: Arc<AtomicBool>,
    conns: HashMap<usize, Conn>,
    next_id: usize,
    /// clientId → its socket.
    clients: HashMap<String, usize>,
    /// Connections with input already buffered in user space (tungstenite, pipelining).
    ready: Vec<usize>,
    failures: Failures,
    /// Secret digests of pairings taken back ([`Server::undo_pairing`]), and when: an app that
    /// did get its `paired` frame retries with that secret, which is refused without counting
    /// as a guess, so the address is not locked out just as the user scans the QR again.
    undone: HashMap<String, Instant>,
    /// The address the server listens on (what the app's own `Origin` would name).
    own: Option<SocketAddr>,
    /// lan.json's (modification time, inode, length) when its devices were last compared with
    /// the sockets: a device forgotten since (`--revoke`) has its socket closed. lan.json is
    /// replaced whole on every write, so the inode tells writes apart where a coarse clock
    /// would not.
    devices_seen: Option<(std::time::SystemTime, u64, u64)>,
    /// The last error reading lan.json that was logged (retried every second, logged once).
    devices_error: Option<String>,
    ws_config: WebSocketConfig,
    max_queued: usize,
    /// The stop flag was seen: sockets are no longer read.
    draining: bool,
}

impl Server {
    /// Registers `listener` (bound, non-blocking) with a fresh poller.
    pub fn new(
        listener: TcpListener,
        state_dir: PathBuf,
        pool: Arc<Pool>,
        status: Arc<LiveStatus>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Server> {
        let poller = Arc::new(Poller::new()?);
        let own = listener.local_addr().ok();
        // SAFETY: the listener is deleted from the poller before it is dropped (`run`).
        unsafe { poller.add_with_mode(&listener, Event::readable(LISTENER), PollMode::Level)? };
        let limits = p::Limits::default();
        // tungstenite only writes these sockets (`WsReader` reads them): no read buffer.
        let ws_config = WebSocketConfig::default().read_buffer_size(0).write_buffer_size(64 << 10);
        Ok(Server {
            poller,
            listener: Some(listener),
            state_dir,
            pool,
            status,
            stop,
            conns: HashMap::new(),
            next_id: 1,
            clients: HashMap::new(),
            ready: Vec::new(),
            failures: Failures::default(),
            undone: HashMap::new(),
            own,
            devices_seen: None,
            devices_error: None,
            ws_config,
            max_queued: limits.max_queued_bytes,
            draining: false,
        })
    }

    /// Serves until the stop flag is set, then answers what is open and closes every socket.
    pub fn run(mut self) {
        let mut events = Events::new();
        let tick = Duration::from_secs(1);
        let mut next_tick = Instant::now() + tick;
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = if self.ready.is_empty() {
                next_tick.saturating_duration_since(Instant::now()).min(TICK)
            } else {
                Duration::ZERO
            };
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, Some(timeout))
                && !would_block(&e)
            {
                log(&format!("lan: poller failed: {e}"));
                break;
            }
            for ev in events.iter() {
                if ev.key == LISTENER {
                    self.accept();
                } else {
                    self.on_event(ev.key, ev.readable, ev.writable);
                }
            }
            for id in std::mem::take(&mut self.ready) {
                self.on_event(id, true, false);
            }
            self.pump();
            if Instant::now() >= next_tick {
                self.timers();
                next_tick = Instant::now() + tick;
            }
        }
        self.shutdown();
    }

    // -- connections ---------------------------------------------------------------------------

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            let (tcp, addr) = match listener.accept() {
                Ok(c) => c,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    log(&format!("lan: accept failed: {e}"));
                    return;
                }
            };
            let unauthenticated = |c: &Conn| matches!(&c.io, Io::Http(h) if h.after.is_none());
            let from_there =
                self.conns.values().filter(|c| c.ip == addr.ip() && unauthenticated(c)).count();
            if from_there >= MAX_UNAUTHENTICATED_PER_ADDRESS {
                let why = "too many connections still sending their request";
                self.refused(addr.ip(), why, "connection refused");
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                // A connection still sending its head makes room: the oldest of the address
                // holding the most of them (a phone holds one). The sockets of paired devices
                // (and answers being written) are never the ones to go.
                let mut held: HashMap<IpAddr, usize> = HashMap::new();
                for c in self.conns.values().filter(|c| unauthenticated(c)) {
                    *held.entry(c.ip).or_default() += 1;
                }
                let victim = self
                    .conns
                    .iter()
                    .filter(|(_, c)| unauthenticated(c))
                    .map(|(&id, c)| (std::cmp::Reverse(held[&c.ip]), id))
                    .min()
                    .map(|(_, id)| id);
                match victim {
                    Some(id) => drop(self.remove(id)),
                    None => {
                        let why = "every connection is a paired device's";
                        self.refused(addr.ip(), why, "connection refused");
                        continue;
                    }
                }
            }
            if tcp.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let id = self.next_id;
            self.next_id += 1;
            let conn = Conn {
                io: Io::Http(HttpConn {
                    stream: tcp,
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    out_pos: 0,
                    after: None,
                }),
                ip: addr.ip(),
                deadline: Some(Instant::now() + HANDSHAKE_TIMEOUT),
                interest: (true, false),
            };
            // SAFETY: every connection is deleted from the poller (in `remove`) before its
            // socket is dropped.
            let added = unsafe {
                self.poller.add_with_mode(conn.tcp(), Event::readable(id), PollMode::Level)
            };
            if added.is_ok() {
                self.conns.insert(id, conn);
            }
        }
    }

    /// Drops a connection. A pairing it may not have delivered (its 101 unwritten, or no
    /// frame from the app yet) is taken back, so the QR code works again.
    fn remove(&mut self, id: usize) -> Option<Conn> {
        let mut conn = self.conns.remove(&id)?;
        let _ = self.poller.delete(conn.tcp());
        let undelivered = match &mut conn.io {
            Io::Http(h) => match h.after.take() {
                Some(After::Upgrade(Session { client_id, pairing: Some((_, token)), .. })) => {
                    Some((client_id, token))
                }
                _ => None,
            },
            Io::Ws(w) => w.unconfirmed.take().map(|token| (w.client_id.clone(), token)),
        };
        if let Some((client_id, token)) = undelivered {
            self.undo_pairing(&client_id, token);
        }
        Some(conn)
    }

    /// Forgets a device whose pairing never reached the app, and gives its token back.
    fn undo_pairing(&mut self, client_id: &str, token: PendingToken) {
        match store::undo_pairing(&self.state_dir, client_id, token, crate::relay::now_ms()) {
            // Already forgotten (revoked meanwhile).
            Ok((None, note)) => log_note(note),
            Ok((Some((restored, secret_digest)), note)) => {
                log_note(note);
                let now = Instant::now();
                self.undone.retain(|_, at| now.duration_since(*at) < undone_remembered());
                if self.undone.len() < MAX_UNDONE_REMEMBERED {
                    self.undone.insert(secret_digest, now);
                }
                log(&format!(
                    "lan: app {client_id} left before its pairing was confirmed; forgot it{}",
                    if restored { " (the same QR code can be scanned again)" } else { "" }
                ));
            }
            Err(e) => log(&format!(
                "lan: cannot forget app {client_id}, whose pairing was never confirmed: {e} \
                 (remove it with hermeschat-pair --revoke {client_id})"
            )),
        }
    }

    /// Logs a refusal of `ip` for `reason`, answered `status` (at most one line per address
    /// and reason a minute, with a count of those left out).
    fn refused(&mut self, ip: IpAddr, reason: &'static str, status: &str) {
        if let Some(skipped) = self.failures.log_now(ip, reason, Instant::now()) {
            let more = if skipped > 0 {
                format!(" ({skipped} more since the last line)")
            } else {
                String::new()
            };
            log(&format!("lan: {status} for {ip}: {reason}{more}"));
        }
    }

    fn set_interest(&mut self, id: usize) {
        let draining = self.draining;
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let want = match &conn.io {
            Io::Http(h) => (h.after.is_none() && !draining, h.out_pos < h.out.len()),
            // Not read while answers it does not take pile up (an app sending without reading).
            Io::Ws(w) => {
                let reading = (!draining || w.closing.is_some()) && w.out.bytes() < READ_PAUSE;
                (reading, w.out.blocked())
            }
        };
        if want != conn.interest {
            conn.interest = want;
            let _ = self.poller.modify_with_mode(
                conn.tcp(),
                Event::new(id, want.0, want.1),
                PollMode::Level,
            );
        }
    }

    fn on_event(&mut self, id: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get(&id) else { return };
        match conn.io {
            Io::Http(_) => {
                if writable {
                    self.http_write(id);
                }
                if readable {
                    self.http_read(id);
                }
            }
            Io::Ws(_) => {
                if writable {
                    self.ws_flush(id);
                }
                if readable {
                    self.ws_read(id);
                }
            }
        }
    }

    // -- HTTP: the upgrade and its authentication ----------------------------------------------

    fn http_read(&mut self, id: usize) {
        let Some(Conn { io: Io::Http(h), ip, .. }) = self.conns.get_mut(&id) else { return };
        let ip = *ip;
        if h.after.is_some() {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut eof = false;
        while h.inbuf.len() <= http::MAX_HEAD {
            match h.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => h.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let head = match http::parse_head(&h.inbuf) {
            Parsed::Partial if eof => {
                self.remove(id);
                return;
            }
            Parsed::Partial => return,
            Parsed::Invalid(status, msg) => {
                let code =
                    if status == 431 { p::api_code::TOO_LARGE } else { p::api_code::BAD_REQUEST };
                self.respond(id, refuse(status, code, msg, &[]), After::Close);
                return;
            }
            Parsed::Complete(head) => head,
        };
        let (bytes, after) = self.answer(&head, ip);
        if let (After::Upgrade(_), Some(Conn { io: Io::Http(h), .. })) =
            (&after, self.conns.get_mut(&id))
        {
            // Bytes after the head already belong to the WebSocket.
            h.inbuf.drain(..head.len);
        }
        self.respond(id, bytes, after);
    }

    /// Decides what an HTTP request gets: 101 with a session, or an error answer.
    fn answer(&mut self, head: &Head, ip: IpAddr) -> (Vec<u8>, After) {
        let now = Instant::now();
        let path = head.path();
        if head.method == "GET" && (path == "/health" || path == "/v1/health") {
            let body = serde_json::json!({ "ok": true, "mode": "hermes-local" }).to_string();
            return (http::json_response(200, &body, true), After::Close);
        }
        if path != "/ws/app" {
            return (refuse(404, p::api_code::NOT_FOUND, "no such route", &[]), After::Close);
        }
        let page = from_a_web_page(head, self.own);
        if let Some(wait) = self.failures.blocked(ip, page, now) {
            self.refused(ip, "too many failed authentications", "429");
            let wait = wait.to_string();
            let r = refuse(
                429,
                p::api_code::RATE_LIMITED,
                "too many failed attempts from this address; wait a minute",
                &[("Retry-After", &wait)],
            );
            return (r, After::Close);
        }
        // A wrong credential counts against the address (a web page's apart); a missing one
        // never does: it guesses nothing.
        let unauthorized = |this: &mut Server, code: &str, message: &str, why: &'static str| {
            this.refused(ip, why, "401");
            (refuse(401, code, message, &[("WWW-Authenticate", "Bearer")]), After::Close)
        };
        let credential = head
            .bearer()
            .map(str::to_owned)
            .or_else(|| head.query("token").map(percent_decode))
            .filter(|c| !c.is_empty());
        let Some(credential) = credential else {
            return unauthorized(
                self,
                p::api_code::UNAUTHORIZED,
                "present the pairing token or your clientSecret (Authorization: Bearer …)",
                "no credential",
            );
        };
        // Upgrade checks before the token is consumed, so a malformed request cannot burn it.
        if !head.is_websocket_upgrade() {
            let r = refuse(
                426,
                p::api_code::UPGRADE_REQUIRED,
                "this route is a WebSocket",
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
            );
            return (r, After::Close);
        }
        if head.header("sec-websocket-version").map(str::trim) != Some("13") {
            let r = refuse(
                426,
                p::api_code::UPGRADE_REQUIRED,
                "WebSocket version 13 required",
                &[("Sec-WebSocket-Version", "13")],
            );
            return (r, After::Close);
        }
        let Some(key) = head.header("sec-websocket-key").map(str::trim) else {
            let r = refuse(400, p::api_code::BAD_REQUEST, "missing Sec-WebSocket-Key", &[]);
            return (r, After::Close);
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let name = device_name(head);
        let result = store::authorize(&self.state_dir, &credential, &name, crate::relay::now_ms());
        let session = match result {
            Err(e) => {
                log(&format!("lan: {e}"));
                let r = refuse(500, p::api_code::INTERNAL, "the bridge cannot read its state", &[]);
                return (r, After::Close);
            }
            Ok((outcome, note)) => {
                if let Some(note) = note {
                    log(&format!("lan: {note}"));
                }
                match outcome {
                    Ok(Authorized::Paired { client_id, client_secret, device_name, token }) => {
                        Session { client_id, device_name, pairing: Some((client_secret, token)) }
                    }
                    Ok(Authorized::Device { client_id, device_name }) => {
                        Session { client_id, device_name, pairing: None }
                    }
                    Err(Refused::Expired) => {
                        self.failures.fail(ip, page, now);
                        return unauthorized(
                            self,
                            "PAIRING_TOKEN_EXPIRED",
                            "the pairing QR code expired; run hermeschat-pair --refresh-code --local",
                            "expired pairing token",
                        );
                    }
                    Err(Refused::Invalid)
                        if self
                            .undone
                            .get(&secret::hex(&secret::digest(&credential)))
                            .is_some_and(|at| now.duration_since(*at) < undone_remembered()) =>
                    {
                        return unauthorized(
                            self,
                            p::api_code::UNAUTHORIZED,
                            "this device's pairing did not complete; scan the QR code again",
                            "the secret of a pairing taken back",
                        );
                    }
                    Err(Refused::Invalid) => {
                        self.failures.fail(ip, page, now);
                        return unauthorized(
                            self,
                            p::api_code::UNAUTHORIZED,
                            "unknown or already used credential; scan a fresh QR code \
                             (hermeschat-pair --refresh-code --local)",
                            "invalid credential",
                        );
                    }
                }
            }
        };
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        (response.into_bytes(), After::Upgrade(session))
    }

    fn respond(&mut self, id: usize, bytes: Vec<u8>, after: After) {
        let Some(Conn { io: Io::Http(h), deadline, .. }) = self.conns.get_mut(&id) else {
            return;
        };
        h.out = bytes;
        h.out_pos = 0;
        h.after = Some(after);
        *deadline = Some(Instant::now() + HANDSHAKE_TIMEOUT);
        self.http_write(id);
    }

    fn http_write(&mut self, id: usize) {
        let Some(Conn { io: Io::Http(h), .. }) = self.conns.get_mut(&id) else { return };
        while h.out_pos < h.out.len() {
            match h.stream.write(&h.out[h.out_pos..]) {
                Ok(0) => {
                    self.remove(id);
                    return;
                }
                Ok(n) => h.out_pos += n,
                Err(e) if would_block(&e) => {
                    self.set_interest(id);
                    return;
                }
                Err(_) => {
                    self.remove(id);
                    return;
                }
            }
        }
        match h.after.take() {
            Some(After::Upgrade(session)) => self.upgrade(id, session),
            Some(After::Close) | None => {
                if let Some(conn) = self.remove(id) {
                    let _ = conn.tcp().shutdown(Shutdown::Write);
                }
            }
        }
    }

    /// Turns a connection whose 101 was written into an app socket.
    fn upgrade(&mut self, id: usize, session: Session) {
        let Some(mut conn) = self.conns.remove(&id) else { return };
        let Io::Http(h) = conn.io else { return };
        if let Some(old) = self.clients.get(&session.client_id).copied() {
            // This connection presented the device's secret: the old one's pairing arrived.
            if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&old) {
                w.unconfirmed = None;
            }
            self.close_ws(old, close_code::REPLACED_APP, "replaced by a newer connection");
        }
        let now = Instant::now();
        let (tx, rx) = sync_channel(OUTBOX_FRAMES);
        // The reader starts with the bytes read past the upgrade request.
        let reader = WsReader::new(Role::Server, p::Limits::default().max_frame, &h.inbuf);
        let ws =
            WebSocket::from_raw_socket(Stream::plain(h.stream), Role::Server, Some(self.ws_config));
        let client_id = session.client_id.clone();
        conn.io = Io::Ws(Box::new(WsConn {
            ws,
            client_id: client_id.clone(),
            rx,
            outbox: Outbox::new(tx, self.poller.clone()),
            out: WsOut::default(),
            last_rx: now,
            last_ping: now,
            bad_frames: 0,
            detached: false,
            closing: None,
            discarding: false,
            write_shut: false,
            reader,
            unconfirmed: session.pairing.as_ref().map(|(_, token)| token.clone()),
            paused: false,
        }));
        conn.deadline = None;
        let ip = conn.ip;
        self.conns.insert(id, conn);
        self.clients.insert(client_id.clone(), id);
        self.status.update_soon(|s| {
            s.apps_online.insert(client_id.clone());
        });
        log(&format!(
            "lan: app {client_id} ({}) connected from {ip}{}",
            session.device_name,
            if session.pairing.is_some() { ", newly paired" } else { "" }
        ));
        if let Some((secret, _)) = session.pairing {
            let paired = Frame::Paired { client_id: client_id.clone(), client_secret: secret };
            self.send_text(id, paired.to_json());
        }
        self.send_text(id, Frame::BridgeStatus { online: true }.to_json());
        if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id)
            && w.unconfirmed.is_some()
        {
            // The app's pong (any frame) tells that `paired` reached it: ask for one at once.
            w.out.push(Message::Ping(Default::default()));
            self.ws_flush(id);
        }
        self.set_interest(id);
        self.ready.push(id);
    }

    // -- WebSocket I/O -------------------------------------------------------------------------

    fn ws_read(&mut self, id: usize) {
        if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id)
            && w.discarding
        {
            match crate::wsread::discard_input(w.ws.get_mut(), DISCARD_BUDGET) {
                Discarded::Closed => drop(self.remove(id)),
                Discarded::Budget => self.ready.push(id),
                Discarded::Drained => {}
            }
            return;
        }
        let mut texts = Vec::new();
        let (mut ended, mut more, mut batch) = (None, false, 0);
        {
            let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else { return };
            loop {
                if batch >= READ_BATCH {
                    more = true;
                    break;
                }
                if w.out.bytes() >= READ_PAUSE {
                    w.paused = true;
                    break;
                }
                match w.reader.read(w.ws.get_mut()) {
                    Ok(msg) => {
                        w.last_rx = Instant::now();
                        w.unconfirmed = None;
                        batch += 1;
                        match msg {
                            _ if w.detached && !matches!(msg, Incoming::Close(_)) => {}
                            Incoming::Text(t) => texts.push(Some(t)),
                            Incoming::Binary(_) => texts.push(None),
                            Incoming::Ping(payload) => w.out.push_pong(payload),
                            Incoming::Pong(_) => {}
                            Incoming::Close(frame) => {
                                ended = Some(Ended::Closed(frame));
                                break;
                            }
                        }
                    }
                    Err(ReadError::WouldBlock) => break,
                    Err(e) => {
                        ended = Some(Ended::Failed(e));
                        break;
                    }
                }
            }
        }
        for t in texts {
            match t {
                Some(text) => self.route(id, &text),
                None => self.bad_frame(id, "binary frames are not accepted; send JSON text frames"),
            }
        }
        // A message over the limit, or a breach of RFC 6455: the stream cannot be
        // resynchronised. The app is told why (4008, 1002, 1007), then what it still sends is
        // dropped until it closes (`discarding`), unless a close of ours is already on its way.
        let refusal = match &ended {
            Some(Ended::Failed(e)) if matches!(self.conns.get(&id), Some(Conn { io: Io::Ws(w), .. }) if w.closing.is_none()) => {
                e.close_code(close_code::LIMIT).map(|code| (code, e.close_reason()))
            }
            _ => None,
        };
        if let Some((code, reason)) = refusal {
            if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) {
                w.discarding = true;
            }
            self.close_ws(id, code, reason);
            self.ready.push(id);
            return;
        }
        match ended {
            Some(Ended::Failed(_)) => {
                self.detach(id);
                self.remove(id);
                return;
            }
            // The app's close: answered (unless it answers ours), then the socket is dropped.
            Some(Ended::Closed(frame)) => {
                self.detach(id);
                if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id)
                    && w.closing.is_none()
                {
                    w.out.push(Message::Close(close_reply(&frame)));
                }
                self.ws_flush(id);
                self.remove(id);
                return;
            }
            None => {}
        }
        // Pongs are queued; push them out.
        self.ws_flush(id);
        if more {
            self.ready.push(id);
        }
    }

    /// Handles one text frame from an app.
    fn route(&mut self, id: usize, text: &Utf8Bytes) {
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get(&id) else { return };
        if w.detached {
            return;
        }
        let client = w.client_id.clone();
        let frame = match p::parse_message(text) {
            Ok(frame) => frame,
            Err(msg) => return self.bad_frame(id, &msg),
        };
        let upload = matches!(frame, Frame::RequestStart(_));
        match frame {
            Frame::Request(mut req) | Frame::RequestStart(mut req) => {
                if !p::is_request_id(&req.id) {
                    return self.bad_frame(id, "request id must be 1-64 of [A-Za-z0-9._-]");
                }
                // Per-device ids, and X-HermesChat-Client at the backend.
                req.client = Some(client.clone());
                // No relay here: a `conn` the app made up would be echoed back to it.
                req.conn = None;
                let outbox = w.outbox.clone();
                let submitted = if upload {
                    self.pool.submit_upload(req, outbox)
                } else {
                    self.pool.submit(req, outbox)
                };
                if let Err(reply) = submitted {
                    self.send_text(id, strip_client(reply, &client));
                }
            }
            Frame::RequestChunk { id: req_id, body, body_base64, .. } => {
                self.pool.upload_chunk(Some(&client), &req_id, body, body_base64);
            }
            Frame::Cancel { id: req_id, .. } => self.pool.cancel(Some(&client), &req_id),
            other => {
                let msg = format!(
                    "apps may send only request, request.start, request.chunk and cancel \
                     frames, not {}",
                    other.kind()
                );
                self.bad_frame(id, &msg);
            }
        }
    }

    fn bad_frame(&mut self, id: usize, message: &str) {
        let too_many = match self.conns.get_mut(&id) {
            Some(Conn { io: Io::Ws(w), .. }) => {
                w.bad_frames += 1;
                w.bad_frames > MAX_BAD_FRAMES
            }
            _ => return,
        };
        if too_many {
            self.close_ws(id, close_code::LIMIT, "too many bad frames");
        } else {
            self.send_text(id, Frame::bad_frame(message).to_json());
        }
    }

    /// Queues a ready frame (already without `client`) and writes what the socket takes.
    fn send_text(&mut self, id: usize, text: String) {
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else { return };
        if w.closing.is_some() {
            return;
        }
        w.out.push(Message::text(text));
        self.ws_flush(id);
    }

    /// Moves the workers' frames into the sockets' queues (each up to its byte limit), then
    /// writes them.
    fn pump(&mut self) {
        let limit = self.max_queued;
        let mut touched = Vec::new();
        for (&id, conn) in self.conns.iter_mut() {
            let Io::Ws(w) = &mut conn.io else { continue };
            let mut moved = false;
            while w.out.bytes() < limit {
                match w.rx.try_recv() {
                    Ok(text) => {
                        if w.closing.is_some() {
                            continue;
                        }
                        let text = strip_client(text, &w.client_id);
                        w.out.push(Message::text(text));
                        moved = true;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if moved {
                touched.push(id);
            }
        }
        for id in touched {
            self.ws_flush(id);
        }
    }

    /// Writes queued messages until the socket would block.
    fn ws_flush(&mut self, id: usize) {
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else { return };
        let broken = w.out.flush(&mut w.ws).is_err();
        if !broken && w.discarding && !w.write_shut && w.out.is_idle() {
            w.write_shut = true;
            let _ = w.ws.get_ref().tcp().shutdown(Shutdown::Write);
        }
        let resume = w.paused && w.out.bytes() < READ_PAUSE;
        if resume {
            w.paused = false;
        }
        if broken {
            self.detach(id);
            self.remove(id);
        } else {
            self.set_interest(id);
            if resume {
                self.ready.push(id);
            }
        }
    }

    /// Takes a socket out of routing: its device is offline and its open requests are dropped
    /// (aborted at once, no frame: nobody is left to read it).
    fn detach(&mut self, id: usize) {
        let Some(Conn { io: Io::Ws(w), ip, .. }) = self.conns.get_mut(&id) else { return };
        if w.detached {
            return;
        }
        w.detached = true;
        let (client, ip) = (w.client_id.clone(), *ip);
        if self.clients.get(&client) == Some(&id) {
            self.clients.remove(&client);
            self.pool.cancel_client(&client);
            self.status.update_soon(|s| {
                s.apps_online.remove(&client);
            });
            log(&format!("lan: app {client} disconnected ({ip})"));
        }
    }

    /// Starts a close handshake; the connection lingers until the peer answers or
    /// [`CLOSE_GRACE`] passes.
    fn close_ws(&mut self, id: usize, code: u16, reason: &str) {
        match self.conns.get(&id) {
            Some(Conn { io: Io::Ws(w), .. }) if w.closing.is_none() => {}
            _ => return,
        }
        self.detach(id);
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else { return };
        // Queued after what is already waiting, so final frames leave first.
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() };
        w.out.push(Message::Close(Some(frame)));
        w.closing = Some(Instant::now() + CLOSE_GRACE);
        self.ws_flush(id);
        self.set_interest(id);
    }

    // -- timers and shutdown -------------------------------------------------------------------

    fn timers(&mut self) {
        let now = Instant::now();
        let idle = Duration::from_secs(p::PEER_IDLE_TIMEOUT_SECS);
        let ping_every = Duration::from_secs(p::RELAY_PING_INTERVAL_SECS);
        let (mut expired, mut idle_socks, mut ping) = (Vec::new(), Vec::new(), Vec::new());
        for conn in self.conns.values_mut() {
            if let Io::Ws(w) = &mut conn.io {
                w.reader.release_kept(now);
            }
        }
        for (&id, conn) in &self.conns {
            match &conn.io {
                Io::Ws(w) => match w.closing {
                    Some(until) if now >= until => expired.push(id),
                    Some(_) => {}
                    None if now.duration_since(w.last_rx) >= idle => idle_socks.push(id),
                    None if now.duration_since(w.last_ping) >= ping_every => ping.push(id),
                    None => {}
                },
                Io::Http(_) if conn.deadline.is_some_and(|d| now >= d) => expired.push(id),
                Io::Http(_) => {}
            }
        }
        for id in expired {
            self.detach(id);
            self.remove(id);
        }
        for id in idle_socks {
            self.close_ws(id, close_code::IDLE, "no traffic for 60 s");
        }
        for id in ping {
            if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) {
                w.last_ping = now;
                w.out.push(Message::Ping(Default::default()));
                self.ws_flush(id);
            }
        }
        self.close_forgotten();
    }

    /// Closes (4003) the sockets of devices no longer in lan.json: `--revoke` of a LAN device
    /// (or `--reset --local` while this daemon runs). Looks only when the file changed.
    fn close_forgotten(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let seen = std::fs::metadata(store::lan_json(&self.state_dir))
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.ino(), m.len())));
        if seen == self.devices_seen {
            return;
        }
        let state = match store::try_read(&self.state_dir) {
            Ok((state, note)) => {
                log_note(note);
                self.devices_error = None;
                state
            }
            Err(e) => {
                // Tried again in a second; said once while it lasts.
                let e = e.to_string();
                if self.devices_error.as_ref() != Some(&e) {
                    log(&format!("lan: {e}; a device revoked meanwhile keeps its socket for now"));
                    self.devices_error = Some(e);
                }
                return;
            }
        };
        self.devices_seen = seen;
        let known = |client: &str| state.devices.iter().any(|d| d.client_id == client);
        let forgotten: Vec<usize> =
            self.clients.iter().filter(|(client, _)| !known(client)).map(|(_, &id)| id).collect();
        for id in forgotten {
            self.close_ws(id, close_code::REVOKED, "revoked");
        }
        // An upgrade whose 101 is still being written: not a client yet, never to be one.
        let upgrading: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(&c.io, Io::Http(h) if matches!(&h.after, Some(After::Upgrade(s)) if !known(&s.client_id)))
            })
            .map(|(&id, _)| id)
            .collect();
        for id in upgrading {
            self.remove(id);
        }
    }

    /// Stops accepting and reading; delivers the answers the pool gives open requests
    /// (`SHUTTING_DOWN` once the bridge calls `Pool::shutdown`), then closes every socket
    /// with 1001.
    fn shutdown(&mut self) {
        self.draining = true;
        if let Some(listener) = self.listener.take() {
            let _ = self.poller.delete(&listener);
        }
        let ids: Vec<usize> = self.conns.keys().copied().collect();
        for &id in &ids {
            if matches!(self.conns.get(&id).map(|c| &c.io), Some(Io::Http(_))) {
                self.remove(id);
            } else {
                self.set_interest(id);
            }
        }
        let mut events = Events::new();
        let deadline = Instant::now() + SHUTDOWN_GRACE + Duration::from_secs(1);
        loop {
            self.pump();
            let queued =
                self.conns.values().any(|c| matches!(&c.io, Io::Ws(w) if !w.out.is_idle()));
            if (self.pool.open_requests() == 0 && !queued) || Instant::now() >= deadline {
                break;
            }
            events.clear();
            let _ = self.poller.wait(&mut events, Some(Duration::from_millis(50)));
            for ev in events.iter() {
                if ev.writable {
                    self.ws_flush(ev.key);
                }
            }
        }
        self.pump();
        let ids: Vec<usize> = self.conns.keys().copied().collect();
        for &id in &ids {
            self.close_ws(id, 1001, "bridge shutting down");
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline
            && self.conns.values().any(|c| matches!(&c.io, Io::Ws(w) if w.out.blocked()))
        {
            events.clear();
            let _ = self.poller.wait(&mut events, Some(Duration::from_millis(50)));
            for ev in events.iter() {
                if ev.writable {
                    self.ws_flush(ev.key);
                }
            }
        }
        for id in ids {
            self.remove(id);
        }
        self.status.update(|s| s.apps_online.clear());
        log("lan: server stopped");
    }
}

/// Logs what [`store`] says about a damaged lan.json it set aside (the only trace of it then).
fn log_note(note: Option<String>) {
    if let Some(note) = note {
        log(&format!("lan: {note}"));
    }
}

/// Binds `addr` and prepares the server; errors name the address and what to do.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Why the LAN server cannot listen on `addr` (`e`), and what to do.
fn bind_error(addr: SocketAddr, e: io::Error) -> io::Error {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            "port {} is in use on {}; free it or pick another with --local-port",
            addr.port(),
            addr.ip()
        ),
        io::ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this machine; pass --host <one of its LAN addresses>",
            addr.ip()
        ),
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "cannot listen on {addr}: ports below 1024 need root; pick one from 1024 up with \
             --local-port"
        ),
        _ => format!("cannot listen on {addr}"),
    };
    io::Error::new(e.kind(), format!("{hint} ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_privileged_port_is_named_with_the_flag_that_moves_it() {
        let denied = || io::Error::from(io::ErrorKind::PermissionDenied);
        let low = bind_error("192.168.1.5:80".parse().unwrap(), denied()).to_string();
        assert!(
            low.contains("ports below 1024 need root") && low.contains("--local-port"),
            "{low}"
        );
        let high = bind_error("192.168.1.5:8766".parse().unwrap(), denied()).to_string();
        assert!(high.starts_with("cannot listen on 192.168.1.5:8766 ("), "{high}");
    }

    #[test]
    fn strips_only_the_client_field() {
        let c = "hcl_0123456789abcdef";
        let f = Frame::ResponseChunk {
            id: "r1".into(),
            client: Some(c.into()),
            conn: None,
            body: format!(",\"client\":\"{c}\""),
            body_base64: false,
        };
        let out = strip_client(f.to_json(), c);
        let back = p::parse_frame(&out).unwrap();
        let Frame::ResponseChunk { client, body, .. } = back else { panic!("{out}") };
        assert_eq!(client, None);
        assert_eq!(body, format!(",\"client\":\"{c}\""));
        let e = Frame::error("x", Some(c), p::ErrorCode::Busy, "busy").to_json();
        assert!(!strip_client(e, c).contains(c));
        // Another client's frame is left alone.
        let other =
            Frame::ResponseEnd { id: "y".into(), client: Some(c.into()), conn: None }.to_json();
        assert_eq!(strip_client(other.clone(), "hcl_ffffffffffffffff"), other);
    }

    #[test]
    fn failures_block_after_the_limit_for_the_rest_of_the_minute() {
        let mut f = Failures::default();
        let ip: IpAddr = "192.168.1.50".parse().unwrap();
        let other: IpAddr = "192.168.1.51".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert_eq!(f.blocked(ip, false, t0), None);
            f.fail(ip, false, t0);
        }
        let wait = f.blocked(ip, false, t0).unwrap();
        assert!((1..=60).contains(&wait));
        assert_eq!(f.blocked(other, false, t0), None);
        assert_eq!(f.blocked(ip, false, t0 + Duration::from_secs(61)), None);
        // A web page's failures are counted apart: they block only its requests.
        assert_eq!(f.blocked(ip, true, t0), None, "the app's failures blocked pages");
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            f.fail(other, true, t0);
        }
        assert!(f.blocked(other, true, t0).is_some());
        assert_eq!(f.blocked(other, false, t0), None, "a page's failures blocked the app");
    }

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("Ada%27s+iPhone"), "Ada's iPhone");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
