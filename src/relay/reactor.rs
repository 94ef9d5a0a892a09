//! The routing core: one thread, every socket non-blocking, driven by readiness.
//!
//! Why one thread: routing is cheap (parse a frame, stamp or strip `client`, queue it) and a
//! single owner of all sockets needs no locks between the reading and the writing side, which
//! blocking tungstenite cannot split anyway. Frames are written the moment they are routed; the
//! poller's wait timeout only drives the once-a-second timers (pings, idle and handshake
//! deadlines), never the delivery of a frame.
//!
//! Each connection moves through: (TLS handshake →) HTTP head → worker decision → either an
//! HTTP response (keep-alive) or a 101 and a WebSocket. Output to every WebSocket is a bounded
//! queue: when a destination holds more than `max_queued_bytes`, the socket feeding it is no
//! longer read until the destination drains (TCP back-pressure reaches the sender).

use crate::fasthash::{FastMap, FastSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::poll::{Event, Events, PollMode, Poller};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

use crate::stream::{Stream, TlsSocket};
use crate::wsout::{WsOut, would_block};
use crate::wsread::{Discarded, Ended, Incoming, ReadError, WsReader, close_reply};

use super::kicks::{self, Kicks};
use super::ratelimit::{
    APP_UPGRADE_BURST, APP_UPGRADE_REFILL, AppLimited, AppUpgradeLimiter, source, source_label,
};
use super::registry::{
    Job, JobSender, Outcome, Refused, access_log, for_method, shutting_down_response,
};
use super::{ConnId, Peer, Shared, ToReactor, log_event, now_ms};
use crate::http::{self, Head, Parsed};
use crate::protocol::{
    self as p, ErrorCode, Frame, LARGE_FRAME, RawFrame, SharedStr, close_code, parse_raw, raw_str,
    request_head,
};

/// True for an `accept` error about one pending connection (it was reset or refused before we
/// took it, or the call was interrupted): the next one may be fine. Anything else (out of
/// descriptors, buffers or memory) backs off instead of retrying at once.
fn one_connection_failed(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// Connections taken by one call of [`Reactor::accept`] at most: a flood (or an error that
/// repeats without taking a connection off the queue) leaves the loop to the other sockets.
const ACCEPT_BATCH: usize = 256;

/// Poller key of the listening socket.
const LISTENER: usize = usize::MAX - 1;

/// Largest registry request body.
const MAX_HTTP_BODY: usize = 64 << 10;

/// Messages (control frames included) read from one socket before others get a turn.
const READ_BATCH: usize = 32;

/// Bytes of messages read from one socket before they are routed: one 16 MiB frame is held at
/// a time, never 32 of them.
const READ_BATCH_BYTES: usize = 1 << 20;

/// Bad frames tolerated on one socket before it is closed with 4008.
const MAX_BAD_FRAMES: u32 = 32;

/// Characters of a peer's message written to the log at most.
const MAX_LOGGED_CHARS: usize = 200;

/// How long a closing WebSocket may take to finish its close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long a WebSocket's queue may stay over half its limit without a byte written before the
/// socket is closed (4008): a peer that stopped reading must not hold its queue's memory, or
/// keep paused the sockets that feed it, for ever.
const STALL_LIMIT: Duration = Duration::from_secs(p::PEER_IDLE_TIMEOUT_SECS);

/// Bytes of its own answers a socket may have queued (since its queue was last at half its
/// limit) before a full queue pauses it: an app whose queue is full of a download and that gets
/// a refusal or two is still read (its cancels, its pings), one that floods is not.
const REPLY_BUDGET: usize = 1 << 20;

/// How long the listener is left unwatched after `accept` fails for want of descriptors
/// (EMFILE, ENFILE, ENOBUFS): the pending connection stays readable, so watching it at once
/// would spin the loop and flood the log.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How long a stopping relay keeps starting the registry requests it has received (queued for
/// a worker): they are carried out and answered. Past it the rest are answered 503
/// `SHUTTING_DOWN` without being carried out; those already running are still waited for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How often the registry is swept of unfinished registrations ([`Job::Sweep`]).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// When the first sweep runs after start: once every bridge still running has had time to
/// reconnect, since an attached bridge is never swept. A store written by an older relay (one
/// that did not record connects) holds in use bridges that look unfinished until then.
const FIRST_SWEEP_AFTER: Duration = Duration::from_secs(600);

// Bridges retry at most this far apart: many times over before the first sweep.
const _: () =
    assert!(FIRST_SWEEP_AFTER.as_secs() >= 10 * crate::bridge::relay_io::BACKOFF_CAP.as_secs());

/// A wall clock set back by more than this between two timer ticks withdraws the access codes
/// and diagnostic credentials outstanding ([`Job::WithdrawCodes`]). Far above what NTP slews
/// in a second (0.5 ms), and a code kept a few seconds longer matters to no one.
const CLOCK_STEP_BACK: Duration = Duration::from_secs(5);

/// How often at most an `accept.refused` line counts the connections closed at accept.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Sources whose refusals an `accept.refused` line counts one by one, at most: bounds memory
/// under a flood from many addresses (the totals still count them all).
const REFUSED_SOURCES: usize = 1024;

/// Connections closed at accept (and WebSockets refused 429 for their client's cap) since the
/// last `accept.refused` line, by cap and by source.
#[derive(Default)]
struct AcceptRefusals {
    /// Over `--max-connections`.
    over_total: u64,
    /// Over `--max-connections-per-ip`.
    over_per_ip: u64,
    /// Refusals per source (an IPv4 address, an IPv6 /64), of [`REFUSED_SOURCES`] at most.
    by_source: FastMap<IpAddr, u64>,
    /// Some refusals came from sources past [`REFUSED_SOURCES`].
    more_sources: bool,
}

impl AcceptRefusals {
    /// Counts one refusal of a connection from `ip`: over the per-source cap, or the total one.
    fn count(&mut self, per_ip: bool, ip: IpAddr) {
        if per_ip {
            self.over_per_ip += 1;
        } else {
            self.over_total += 1;
        }
        let from = source(ip);
        if let Some(n) = self.by_source.get_mut(&from) {
            *n += 1;
        } else if self.by_source.len() < REFUSED_SOURCES {
            self.by_source.insert(from, 1);
        } else {
            self.more_sources = true;
        }
    }

    /// Writes the `accept.refused` line (the source refused most named, so that an operator
    /// sees whether one address or many hit the caps) and starts counting anew.
    fn log(&mut self) {
        let counted = std::mem::take(self);
        let top = counted.by_source.iter().max_by_key(|&(_, n)| *n);
        let (ip, ip_count) = top.map_or((String::new(), 0), |(s, n)| (source_label(*s), *n));
        let sources = counted.by_source.len().to_string();
        let sources = if counted.more_sources { format!("{sources}+") } else { sources };
        log_event(
            "accept.refused",
            &[
                ("over_max_connections", &counted.over_total.to_string()),
                ("over_max_connections_per_ip", &counted.over_per_ip.to_string()),
                ("ip", &ip),
                ("ipCount", &ip_count.to_string()),
                ("sources", &sources),
                (
                    "next",
                    "raise --max-connections or --max-connections-per-ip if these are your users",
                ),
            ],
        );
    }
}

/// How a WebSocket left routing: told in its `ws.close` line, so that an operator can tell an
/// idle timeout or a replacement from a dropped connection.
enum Closed<'a> {
    /// The relay sent a close frame with this code and reason.
    ByRelay(u16, &'a str),
    /// The peer sent a close frame, with a code or without one.
    ByPeer(Option<u16>),
    /// The connection ended with no close frame (reset, EOF, a failed write, a broken frame).
    Dropped(&'a str),
}

impl Closed<'_> {
    /// Writes the `ws.close` line of the socket `ids` name: its `code`, who closed it (`by`)
    /// and, when the relay knows it, the `reason`. Without a close frame the codes RFC 6455
    /// reserves for reporting stand in: 1005 (a close frame without a code), 1006 (none at
    /// all). A peer's own reason is not logged: it is the peer's text, of any length.
    fn log(&self, ids: &[(&str, &str)]) {
        let (code, by, reason) = match *self {
            Closed::ByRelay(code, reason) => (code, "relay", reason),
            Closed::ByPeer(code) => (code.unwrap_or(1005), "peer", ""),
            Closed::Dropped(why) => (1006, "none", why),
        };
        let code = code.to_string();
        let mut fields = ids.to_vec();
        fields.extend([("code", code.as_str()), ("by", by)]);
        if !reason.is_empty() {
            fields.push(("reason", reason));
        }
        log_event("ws.close", &fields);
    }
}

/// What happens after an HTTP response is written.
enum After {
    KeepAlive,
    Close,
    Upgrade(Peer),
}

/// An HTTP/1.1 connection: reading a request, waiting for a worker, or writing a response.
struct HttpConn {
    stream: Stream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Set while a worker holds the request, with the head for the access log of upgrades.
    waiting: Option<(Head, Instant)>,
    after: Option<After>,
}

/// An established WebSocket.
struct WsConn {
    ws: WebSocket<Stream>,
    peer: Peer,
    /// Messages waiting for the socket (bounded by back-pressure).
    out: WsOut,
    last_rx: Instant,
    last_ping: Instant,
    /// Not read while a destination it feeds is over its queue limit.
    paused: bool,
    /// Sources paused because this socket's queue is full; resumed when it drains, or when
    /// this socket leaves routing. Holds the socket itself when the relay's own answers to it
    /// (refusals, errors: [`REPLY_BUDGET`]) filled its queue.
    waiters: Vec<ConnId>,
    /// Set while the queue is over half its limit (where paused sources wait for it): when
    /// that began, or when the socket last took a byte since. [`STALL_LIMIT`] after it the
    /// socket is closed.
    stalled_since: Option<Instant>,
    /// Bytes of the relay's own answers (refusals, errors) to this socket queued since its
    /// queue was last at half its limit or below.
    replied: usize,
    bad_frames: u32,
    /// No longer routed: frames from it are ignored and nothing is queued to it.
    detached: bool,
    /// A close frame was sent; the connection is dropped at this instant at the latest.
    closing: Option<Instant>,
    /// The peer's stream was refused (a breach of RFC 6455, a message over the limit): what
    /// it sends is read dry unparsed ([`crate::wsread::discard_input`] says why).
    discarding: bool,
    /// Its write side was shut once the close frame left (a discarding socket's peer then
    /// closes without waiting for a reply that will never be parsed).
    write_shut: bool,
    /// Frames were queued since the last flush (listed in `Reactor::dirty`).
    dirty: bool,
    /// Reads its messages (tungstenite only writes).
    reader: WsReader,
}

enum Io {
    TlsHandshake(native_tls::MidHandshakeTlsStream<TlsSocket>),
    Http(Box<HttpConn>),
    Ws(Box<WsConn>),
}

struct Conn {
    io: Io,
    ip: IpAddr,
    /// The source this connection counts under for `--max-connections-per-ip`: its peer's
    /// (from accept), or with `--trust-proxy` its client's once it is a WebSocket (the proxy
    /// may carry several clients' requests on one connection before that).
    counted: Option<IpAddr>,
    deadline: Option<Instant>,
    /// Interest currently registered: (readable, writable).
    interest: (bool, bool),
}

/// A bridge's routing entry; kept while its socket or any of its apps is attached.
#[derive(Default)]
struct BridgeRoute {
    conn: Option<ConnId>,
    instance: String,
    /// clientIds of attached apps.
    apps: FastSet<String>,
    /// Requests open through this bridge.
    open: usize,
}

/// An attached app's routing entry.
struct AppRoute {
    conn: ConnId,
    bridge_id: String,
    device_name: String,
    /// Request ids open from this app.
    open: FastSet<String>,
    /// This socket's number, stamped as `conn` on its requests: the bridge's answers that carry
    /// another one are for a socket it replaced (PROTOCOL §5.3).
    number: u64,
    /// The bridge socket told `client.connected` for this socket, and the ticket of that frame
    /// in its queue ([`WsOut::withdraw`]): while it waits there, the bridge knows nothing of
    /// this socket, so if it leaves first both frames are dropped ([`Reactor::detach`]).
    announced: Option<(ConnId, u64)>,
}

/// The routing core.
pub struct Reactor {
    shared: Arc<Shared>,
    poller: Arc<Poller>,
    listener: TcpListener,
    tls: Option<native_tls::TlsAcceptor>,
    jobs: JobSender,
    inbox: Receiver<ToReactor>,
    stop: Arc<AtomicBool>,
    conns: FastMap<ConnId, Conn>,
    next_id: ConnId,
    bridges: FastMap<String, BridgeRoute>,
    apps: FastMap<String, AppRoute>,
    /// The last [`AppRoute::number`] given; never reused, so no late answer can match a newer
    /// socket.
    app_numbers: u64,
    /// Connections with input already buffered in user space (TLS or tungstenite).
    ready: Vec<ConnId>,
    /// WebSockets with routed frames queued during this turn of the loop; flushed once at its
    /// end, so frames from many sources bound for one socket leave in one write (one wake-up
    /// of the peer instead of one per frame).
    dirty: Vec<ConnId>,
    /// The messages of one [`Reactor::ws_read`] (kept to reuse its allocation).
    read_texts: Vec<Result<Utf8Bytes, ()>>,
    /// Set while the listener is unwatched after an `accept` failure ([`ACCEPT_BACKOFF`]).
    accept_paused_until: Option<Instant>,
    /// Recent revocations: upgrades checked before them are refused.
    kicks: Kicks,
    /// App sockets per credential ([`AppUpgradeLimiter`]).
    app_limit: AppUpgradeLimiter,
    /// Public peers whose `X-Forwarded-For` was ignored under `--trust-proxy`, told once a day
    /// each.
    ignored_forwarders: IgnoredForwarders,
    /// Open connections per counted source (`--max-connections-per-ip`).
    per_source: FastMap<IpAddr, u32>,
    /// Connections closed at accept since the last `accept.refused` line.
    refused: AcceptRefusals,
    /// When the last `accept.refused` line was written.
    refused_logged: Option<Instant>,
    /// When the next [`Job::Sweep`] is due.
    next_sweep: Instant,
    /// The wall clock (Unix ms) and the monotonic clock at the last timer tick: a wall clock
    /// set back between two ticks is noticed ([`CLOCK_STEP_BACK`]).
    clocks: (u64, Instant),
    /// The wall-clock time of a step back whose [`Job::WithdrawCodes`] is still to be queued
    /// (the job queue was full).
    withdraw_due: Option<u64>,
    /// The socket whose messages are being routed: what is queued to it now is an answer.
    reading: Option<ConnId>,
    ws_config: WebSocketConfig,
    dropped_frames: u64,
    /// `client.connected` frames taken back, each with the `client.disconnected` it spared.
    presence_withdrawn: u64,
}

impl Reactor {
    /// Sets up the reactor; [`Reactor::run`] drives it.
    pub fn new(
        shared: Arc<Shared>,
        listener: TcpListener,
        tls: Option<native_tls::TlsAcceptor>,
        jobs: JobSender,
        inbox: Receiver<ToReactor>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Reactor> {
        let poller = shared.poller.clone();
        // SAFETY: the listener is deleted from the poller in `run` before it is dropped.
        unsafe { poller.add_with_mode(&listener, Event::readable(LISTENER), PollMode::Level)? };
        let ws_config = WebSocketConfig::default()
            // tungstenite only writes these sockets (`WsReader` reads them): no read buffer.
            .read_buffer_size(0)
            .write_buffer_size(64 << 10);
        Ok(Reactor {
            shared,
            poller,
            listener,
            tls,
            jobs,
            inbox,
            stop,
            conns: FastMap::default(),
            next_id: 1,
            bridges: FastMap::default(),
            apps: FastMap::default(),
            app_numbers: 0,
            ready: Vec::new(),
            dirty: Vec::new(),
            read_texts: Vec::new(),
            accept_paused_until: None,
            kicks: Kicks::default(),
            app_limit: AppUpgradeLimiter::default(),
            ignored_forwarders: IgnoredForwarders::default(),
            per_source: FastMap::default(),
            refused: AcceptRefusals::default(),
            refused_logged: None,
            next_sweep: Instant::now() + FIRST_SWEEP_AFTER,
            clocks: (now_ms(), Instant::now()),
            withdraw_due: None,
            reading: None,
            ws_config,
            dropped_frames: 0,
            presence_withdrawn: 0,
        })
    }

    /// Runs until the stop flag is set, then shuts down cleanly.
    pub fn run(mut self) -> io::Result<()> {
        let addr = self.listener.local_addr()?.to_string();
        let settings = self.shared.config.log_fields();
        let mut fields = vec![
            ("addr", addr.as_str()),
            ("publicUrl", &self.shared.public_url),
            ("version", crate::VERSION),
        ];
        fields.extend(settings.iter().map(|(k, v)| (*k, v.as_str())));
        log_event("listening", &fields);
        let mut events = Events::new();
        let tick = Duration::from_secs(1);
        let mut next_tick = Instant::now() + tick;
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = if self.ready.is_empty() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, Some(timeout))
                && !would_block(&e)
            {
                return Err(e);
            }
            for ev in events.iter() {
                if ev.key == LISTENER {
                    self.accept();
                } else if ev.readable && self.unread_socket_hung_up(ev.key) {
                    self.detach(ev.key, Closed::Dropped("hung up while paused"));
                    self.remove(ev.key);
                } else {
                    if ev.readable {
                        self.mark_ready(ev.key);
                    }
                    self.on_event(ev.key, ev.readable, ev.writable);
                }
            }
            while let Ok(msg) = self.inbox.try_recv() {
                self.on_message(msg);
            }
            for id in std::mem::take(&mut self.ready) {
                self.on_event(id, true, false);
            }
            self.flush_dirty();
            if Instant::now() >= next_tick {
                self.timers();
                next_tick = Instant::now() + tick;
            }
        }
        self.shutdown();
        let _ = self.poller.delete(&self.listener);
        Ok(())
    }

    // -- connections ---------------------------------------------------------------------------

    /// Watches the listener for new connections, or stops watching it.
    fn watch_listener(&self, on: bool) {
        let ev = Event::new(LISTENER, on, false);
        let _ = self.poller.modify_with_mode(&self.listener, ev, PollMode::Level);
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let (tcp, addr) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if would_block(&e) => return,
                // That one connection failed (the peer gave up before we took it): next one.
                Err(e) if one_connection_failed(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays pending, so the listener is
                    // left unwatched for a while instead of waking the loop at once again
                    // (and logging every time).
                    log_event(
                        "accept.error",
                        &[
                            ("message", &e.to_string()),
                            (
                                "next",
                                "retrying in 1 s; raise the open-file limit (ulimit -n) or lower --max-connections",
                            ),
                        ],
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    self.watch_listener(false);
                    return;
                }
            };
            if self.conns.len() >= self.shared.config.max_connections {
                self.refused.count(false, addr.ip());
                continue;
            }
            let cap = self.shared.config.max_connections_per_ip;
            if self.counted_source(addr.ip()).is_some_and(|s| self.per_source.get(&s) >= Some(&cap))
            {
                self.refused.count(true, addr.ip());
                continue;
            }
            if tcp.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let io = match &self.tls {
                None => {
                    // Non-blocking and polled from here on: short reads may mark it drained.
                    let mut stream = Stream::plain(tcp);
                    stream.arm(true);
                    Io::Http(Box::new(HttpConn::new(stream)))
                }
                Some(acceptor) => match acceptor.accept(TlsSocket(tcp)) {
                    Ok(s) => Io::Http(Box::new(HttpConn::new(Stream::tls(s)))),
                    Err(native_tls::HandshakeError::WouldBlock(mid)) => Io::TlsHandshake(mid),
                    Err(native_tls::HandshakeError::Failure(_)) => continue,
                },
            };
            let id = self.next_id;
            self.next_id += 1;
            let conn = Conn {
                io,
                ip: addr.ip(),
                counted: self.counted_source(addr.ip()),
                deadline: Some(Instant::now() + self.shared.config.handshake_timeout),
                interest: (true, false),
            };
            let tcp = conn.tcp();
            // SAFETY: every connection is deleted from the poller (in `remove`) before its
            // socket is dropped, so the poller never refers to a closed or reused descriptor.
            let added =
                unsafe { self.poller.add_with_mode(tcp, Event::readable(id), PollMode::Level) };
            if added.is_ok() {
                self.insert(id, conn);
                // A TLS stream or a pipelined request may already hold bytes.
                self.ready.push(id);
            }
        }
    }

    /// The client a proxy names: the last `X-Forwarded-For` hop, an address alone or with a port
    /// (`198.51.100.7`, `198.51.100.7:4711`, `[2001:db8::1]:4711`).
    fn forwarded_for(head: &Head) -> Option<IpAddr> {
        // The last line: a proxy that adds a line of its own (HAProxy) puts it after the client's.
        let line =
            head.headers.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"));
        let hop = line?.1.rsplit(',').next()?.trim();
        hop.parse().ok().or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
    }

    /// Whether a connection from `peer` is believed when it names its client in
    /// `X-Forwarded-For`: with `--trust-proxy`, a peer on loopback or a private network only
    /// (where the operator's proxy is). Anyone on the internet who reaches the relay's port
    /// directly would otherwise pick any address per request, out of every per-IP limit.
    fn trusts(&self, peer: IpAddr) -> bool {
        self.shared.config.trust_proxy && may_be_a_proxy(peer)
    }

    /// The source `--max-connections-per-ip` counts a connection accepted from `ip` under, if
    /// any (none from a trusted proxy: its WebSockets are counted by client, on upgrade).
    fn counted_source(&self, ip: IpAddr) -> Option<IpAddr> {
        (!self.trusts(ip)).then(|| self.per_ip_source(ip)).flatten()
    }

    /// The source a connection from client `ip` counts under: none for loopback, or with the
    /// cap off.
    fn per_ip_source(&self, ip: IpAddr) -> Option<IpAddr> {
        let counted = self.shared.config.max_connections_per_ip > 0;
        (counted && !ip.to_canonical().is_loopback()).then(|| source(ip))
    }

    /// Adds a connection the poller watches to the table.
    fn insert(&mut self, id: ConnId, conn: Conn) {
        if let Some(s) = conn.counted {
            *self.per_source.entry(s).or_default() += 1;
        }
        self.conns.insert(id, conn);
    }

    /// Removes a connection from the poller and the table; its socket closes when dropped.
    fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let mut conn = self.conns.remove(&id)?;
        let _ = self.poller.delete(conn.tcp());
        if let Some(s) = conn.counted
            && let Some(n) = self.per_source.get_mut(&s)
        {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&s);
            }
        }
        if let Io::Ws(w) = &mut conn.io {
            self.resume(std::mem::take(&mut w.waiters));
        }
        Some(conn)
    }

    fn set_interest(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let want = match &conn.io {
            Io::TlsHandshake(_) => (true, false),
            Io::Http(h) => (h.waiting.is_none() && h.after.is_none(), h.out_pos < h.out.len()),
            Io::Ws(w) => (!w.paused, w.out.blocked()),
        };
        if want != conn.interest {
            let modified = self.poller.modify_with_mode(
                conn.tcp(),
                Event::new(id, want.0, want.1),
                PollMode::Level,
            );
            // What is recorded is what the poller watches (`unread_socket_hung_up` relies on it).
            if modified.is_ok() {
                conn.interest = want;
            }
        }
    }

    /// True when the poller reports a WebSocket readable that we do not read (paused): only a
    /// hang-up or a socket error is reported then, and level-triggered it would be reported
    /// on every turn of the loop until the pause ends. The peer is gone either way.
    fn unread_socket_hung_up(&self, id: ConnId) -> bool {
        matches!(self.conns.get(&id), Some(c @ Conn { io: Io::Ws(_), .. }) if !c.interest.0)
    }

    /// The poller reported `id` readable: its next read goes to the socket (see
    /// [`crate::stream`]).
    fn mark_ready(&mut self, id: ConnId) {
        match self.conns.get_mut(&id).map(|c| &mut c.io) {
            Some(Io::Http(h)) => h.stream.mark_ready(),
            Some(Io::Ws(w)) => w.ws.get_mut().mark_ready(),
            _ => {}
        }
    }

    fn on_event(&mut self, id: ConnId, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        match conn.io {
            Io::TlsHandshake(_) => self.tls_handshake(id),
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

    fn tls_handshake(&mut self, id: ConnId) {
        let Some(mut conn) = self.remove(id) else {
            return;
        };
        let Io::TlsHandshake(mid) = conn.io else {
            return;
        };
        conn.io = match mid.handshake() {
            Ok(s) => Io::Http(Box::new(HttpConn::new(Stream::tls(s)))),
            Err(native_tls::HandshakeError::WouldBlock(mid)) => Io::TlsHandshake(mid),
            Err(native_tls::HandshakeError::Failure(_)) => return,
        };
        let ready = matches!(conn.io, Io::Http(_));
        // SAFETY: as in `accept`: removed from the poller before the socket is dropped.
        let added =
            unsafe { self.poller.add_with_mode(conn.tcp(), Event::readable(id), PollMode::Level) };
        conn.interest = (true, false);
        if added.is_ok() {
            self.insert(id, conn);
            if ready {
                self.ready.push(id);
            }
        }
    }

    // -- HTTP ----------------------------------------------------------------------------------

    fn http_read(&mut self, id: ConnId) {
        let Some(Conn { io: Io::Http(h), ip, .. }) = self.conns.get_mut(&id) else {
            return;
        };
        let ip = *ip;
        if h.waiting.is_some() || h.after.is_some() {
            return;
        }
        let mut buf = [0u8; 8192];
        let mut eof = false;
        loop {
            if h.inbuf.len() > http::MAX_HEAD + MAX_HTTP_BODY {
                break;
            }
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
                let body = serde_json::to_string(&p::ApiError::new(code, msg)).unwrap_or_default();
                self.http_respond(id, http::json_response(status, &body, true), After::Close);
                return;
            }
            Parsed::Complete(head) => head,
        };
        // Refusals too are answered without a body to a HEAD.
        let head_request = head.method == "HEAD";
        let refuse = |status, code, msg: &str| {
            let body = serde_json::to_string(&p::ApiError::new(code, msg)).unwrap_or_default();
            let response = http::json_response(status, &body, true);
            if head_request { http::head_only(response) } else { response }
        };
        let body_len = match head.content_length() {
            Ok(n) if n > MAX_HTTP_BODY => {
                let r = refuse(413, p::api_code::TOO_LARGE, "request body too large");
                self.http_respond(id, r, After::Close);
                return;
            }
            Ok(n) => n,
            Err(msg) => {
                // Chunked bodies: 411 asks for a Content-Length; a malformed one is a 400.
                let status = if head.header("transfer-encoding").is_some() { 411 } else { 400 };
                self.http_respond(id, refuse(status, p::api_code::BAD_REQUEST, msg), After::Close);
                return;
            }
        };
        if h.inbuf.len() < head.len + body_len {
            if eof {
                self.remove(id);
            }
            return;
        }
        let rest = h.inbuf.split_off(head.len + body_len);
        let body = h.inbuf[head.len..].to_vec();
        h.inbuf = rest;
        if self.shared.config.trust_proxy
            && !may_be_a_proxy(ip)
            && Self::forwarded_for(&head).is_some()
            && self.ignored_forwarders.first(ip, Instant::now())
        {
            // The operator asked for the header and it is dropped: say why, once a day per
            // peer (a CDN in front of the relay reaches it from public addresses).
            log_event(
                "forwarded.ignored",
                &[
                    ("ip", &source_label(source(ip))),
                    ("why", "X-Forwarded-For is believed from loopback and private peers only"),
                ],
            );
        }
        let ip = self.client_ip(ip, &head);
        let Some(Conn { io: Io::Http(h), .. }) = self.conns.get_mut(&id) else {
            return;
        };
        h.waiting = Some((head.clone(), Instant::now()));
        if let Err(why) = self.jobs.try_send(Job::Http { conn: id, head, body, ip }) {
            h.waiting = None;
            let message = match why {
                Refused::Full => "the relay is overloaded; retry shortly",
                Refused::NoWorkers => {
                    "the relay's registry workers stopped (its log says why); restart the relay"
                }
            };
            let r = refuse(503, p::api_code::UNAVAILABLE, message);
            self.http_respond(id, r, After::Close);
            return;
        }
        self.set_interest(id);
    }

    /// The client address: the socket peer, or the last `X-Forwarded-For` hop when the relay
    /// sits behind a trusted proxy.
    fn client_ip(&self, peer: IpAddr, head: &Head) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        Self::forwarded_for(head).unwrap_or(peer)
    }

    fn http_respond(&mut self, id: ConnId, bytes: Vec<u8>, after: After) {
        let Some(Conn { io: Io::Http(h), deadline, .. }) = self.conns.get_mut(&id) else {
            return;
        };
        h.waiting = None;
        h.out = bytes;
        h.out_pos = 0;
        h.after = Some(after);
        // A response must be written within the handshake deadline too (slow readers).
        *deadline = Some(Instant::now() + self.shared.config.handshake_timeout);
        self.http_write(id);
    }

    fn http_write(&mut self, id: ConnId) {
        let Some(Conn { io: Io::Http(h), .. }) = self.conns.get_mut(&id) else {
            return;
        };
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
        let _ = h.stream.flush();
        // Stopping: the connection closes once its answer is written.
        match h.after.take().filter(|_| !self.stop.load(Ordering::SeqCst)) {
            Some(After::Close) | None => {
                if let Some(mut conn) = self.remove(id) {
                    conn.shutdown_write();
                }
            }
            Some(After::KeepAlive) => {
                h.out.clear();
                h.out_pos = 0;
                if let Some(c) = self.conns.get_mut(&id) {
                    c.deadline = Some(Instant::now() + self.shared.config.handshake_timeout * 6);
                }
                self.set_interest(id);
                // A pipelined request may already be buffered.
                self.ready.push(id);
            }
            Some(After::Upgrade(peer)) => self.upgrade(id, peer),
        }
    }

    fn on_message(&mut self, msg: ToReactor) {
        match msg {
            // Not waiting any more: answered 503 already, at the end of a shutdown.
            ToReactor::Outcome(Outcome::Respond { conn, .. }) if !self.http_waiting(conn) => {}
            ToReactor::Outcome(Outcome::Respond { conn, bytes, close }) => {
                let after = if close { After::Close } else { After::KeepAlive };
                self.http_respond(conn, bytes, after);
            }
            // Stopping: nothing attaches any more.
            ToReactor::Outcome(Outcome::Upgrade { conn, .. })
                if self.stop.load(Ordering::SeqCst) =>
            {
                self.refuse_stopping(conn);
            }
            ToReactor::Outcome(Outcome::Upgrade { conn, accept, peer, epoch }) => {
                self.accept_upgrade(conn, accept, peer, epoch);
            }
            ToReactor::Kick { bridge_id, client_id, epoch } => {
                self.kicks.record(&bridge_id, client_id.as_deref(), epoch, Instant::now());
                self.kick(&bridge_id, client_id.as_deref());
            }
        }
    }

    /// True when a worker holds the request of HTTP connection `id`.
    fn http_waiting(&self, id: ConnId) -> bool {
        matches!(self.conns.get(&id), Some(Conn { io: Io::Http(h), .. }) if h.waiting.is_some())
    }

    /// Answers the request of HTTP connection `id`, held by a worker, 503 `SHUTTING_DOWN`
    /// and closes: the relay is stopping and will neither carry it out nor attach it.
    fn refuse_stopping(&mut self, id: ConnId) {
        let Some(Conn { io: Io::Http(h), ip, .. }) = self.conns.get(&id) else {
            return;
        };
        let Some((head, started)) = h.waiting.clone() else {
            return;
        };
        let ip = self.client_ip(*ip, &head);
        access_log(&self.shared, &head, 503, ip, started);
        self.http_respond(id, for_method(&head, shutting_down_response()), After::Close);
    }

    /// Completes an authenticated upgrade, unless its credential was revoked after the check
    /// (401) or another live instance owns the bridge (409).
    fn accept_upgrade(&mut self, id: ConnId, accept: String, peer: Peer, epoch: u64) {
        let Some(Conn { io: Io::Http(h), ip, .. }) = self.conns.get(&id) else {
            return;
        };
        let Some((head, started)) = h.waiting.clone() else {
            return;
        };
        // Logged as registry requests are: the forwarded client behind a trusted proxy.
        let peer_ip = *ip;
        let ip = self.client_ip(peer_ip, &head);
        let refusal = if self.kicks.refuses(&peer, epoch) {
            Some((401, p::api_code::UNAUTHORIZED, "missing or wrong credentials for this endpoint"))
        } else if let Peer::Bridge { bridge_id, instance } = &peer {
            let owner = self.bridges.get(bridge_id).and_then(|r| r.conn.map(|c| (c, &r.instance)));
            let owned_by_another = owner.is_some_and(|(owner_conn, owner_instance)| {
                let alive = matches!(
                    self.conns.get(&owner_conn).map(|c| &c.io),
                    Some(Io::Ws(w)) if w.last_rx.elapsed() < Duration::from_secs(p::PEER_IDLE_TIMEOUT_SECS)
                );
                alive && owner_instance != instance
            });
            owned_by_another.then_some((
                409,
                p::api_code::BRIDGE_OWNED,
                "another bridge instance holds this bridge; stop it or run --reset",
            ))
        } else {
            None
        };
        // Behind a trusted proxy, WebSockets are counted by client from here on (not when the
        // proxy named none: every such socket would count under the proxy's own address).
        let client = (self.trusts(peer_ip) && refusal.is_none())
            .then(|| Self::forwarded_for(&head).and_then(|c| self.per_ip_source(c)))
            .flatten();
        let cap = self.shared.config.max_connections_per_ip;
        let refusal = match client {
            Some(s) if self.per_source.get(&s).is_some_and(|&n| n >= cap) => {
                self.refused.count(true, s);
                Some((
                    429,
                    p::api_code::RATE_LIMITED,
                    "too many open connections from your address; close some and retry",
                ))
            }
            _ => refusal,
        };
        if let Some((status, code, message)) = refusal {
            let body = serde_json::to_string(&p::ApiError::new(code, message)).unwrap_or_default();
            access_log(&self.shared, &head, status, ip, started);
            self.http_respond(id, http::json_response(status, &body, true), After::Close);
            return;
        }
        // Last, so that only a socket that would attach spends a token: the one it would
        // replace stays.
        if let Peer::App { bridge_id, client_id, .. } = &peer
            && let Err(limited) = self.app_limit.check(client_id, Instant::now())
        {
            let response = app_limited_response(&limited);
            if let Some(refused) = limited.log {
                log_app_limited(bridge_id, client_id, refused);
            }
            access_log(&self.shared, &head, 429, ip, started);
            self.http_respond(id, response, After::Close);
            return;
        }
        access_log(&self.shared, &head, 101, ip, started);
        if let Some(s) = client
            && let Some(conn) = self.conns.get_mut(&id)
        {
            conn.counted = Some(s);
            *self.per_source.entry(s).or_default() += 1;
        }
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        self.http_respond(id, response.into_bytes(), After::Upgrade(peer));
    }

    /// Turns a connection whose 101 was written into a WebSocket and attaches it.
    fn upgrade(&mut self, id: ConnId, peer: Peer) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        let Io::Http(h) = conn.io else { return };
        let h = *h;
        let now = Instant::now();
        // The reader starts with the bytes read past the upgrade request.
        let reader = WsReader::new(Role::Server, self.shared.config.limits.max_frame, &h.inbuf);
        let ws = WebSocket::from_raw_socket(h.stream, Role::Server, Some(self.ws_config));
        conn.io = Io::Ws(Box::new(WsConn {
            ws,
            peer: peer.clone(),
            out: WsOut::default(),
            last_rx: now,
            last_ping: now,
            paused: false,
            waiters: Vec::new(),
            stalled_since: None,
            replied: 0,
            bad_frames: 0,
            detached: false,
            closing: None,
            discarding: false,
            write_shut: false,
            dirty: false,
            reader,
        }));
        conn.deadline = None;
        self.conns.insert(id, conn);
        match peer {
            Peer::Bridge { bridge_id, instance } => self.attach_bridge(id, bridge_id, instance),
            Peer::App { bridge_id, client_id, device_name } => {
                self.attach_app(id, bridge_id, client_id, device_name)
            }
        }
        self.set_interest(id);
        self.ready.push(id);
    }

    // -- WebSocket I/O -------------------------------------------------------------------------

    fn ws_read(&mut self, id: ConnId) {
        if matches!(self.conns.get(&id), Some(Conn { io: Io::Ws(w), .. }) if w.discarding) {
            return self.ws_discard(id);
        }
        let mut texts = std::mem::take(&mut self.read_texts);
        let mut ended = None;
        let mut more = false;
        let (mut batch, mut batch_bytes) = (0, 0);
        {
            let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else {
                return;
            };
            while !w.paused {
                if batch >= READ_BATCH || batch_bytes >= READ_BATCH_BYTES {
                    more = true;
                    break;
                }
                match w.reader.read(w.ws.get_mut()) {
                    Ok(msg) => {
                        w.last_rx = Instant::now();
                        batch += 1;
                        match msg {
                            _ if w.detached && !matches!(msg, Incoming::Close(_)) => {}
                            Incoming::Text(t) => {
                                batch_bytes += t.len();
                                texts.push(Ok(t));
                            }
                            Incoming::Binary(_) => texts.push(Err(())),
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
        self.reading = Some(id);
        for t in texts.drain(..) {
            match t {
                Ok(text) => self.route_text(id, &text),
                Err(()) => {
                    self.bad_frame(id, "binary frames are not accepted; send JSON text frames")
                }
            }
        }
        self.reading = None;
        self.read_texts = texts;
        // A message over the frame limit, or a breach of RFC 6455: the stream cannot be
        // resynchronised. The peer is told why (4008, 1002, 1007) unless a close of ours is
        // already on its way.
        let refusal = match &ended {
            Some(Ended::Failed(e)) if matches!(self.conns.get(&id), Some(Conn { io: Io::Ws(w), .. }) if w.closing.is_none()) => {
                e.close_code(close_code::LIMIT).map(|code| (code, e.close_reason()))
            }
            _ => None,
        };
        if let Some((code, reason)) = refusal {
            self.fail_ws(id, code, reason);
            return;
        }
        match ended {
            Some(Ended::Failed(e)) => {
                self.detach(id, Closed::Dropped(&e.to_string()));
                self.remove(id);
                return;
            }
            // The peer's close: answered (unless it answers ours), then the socket is dropped.
            Some(Ended::Closed(frame)) => {
                self.detach(id, Closed::ByPeer(frame.as_ref().map(|f| u16::from(f.code))));
                if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id)
                    && w.closing.is_none()
                {
                    w.out.push(Message::Close(close_reply(&frame)));
                }
                self.ws_flush(id);
                // Over TLS, close_notify ends the stream cleanly after the close handshake.
                if let Some(mut conn) = self.remove(id) {
                    conn.shutdown_write();
                }
                return;
            }
            None => {}
        }
        // Pongs are queued; push them out.
        self.ws_flush(id);
        // The relay's answers to what it read (refusals, bad-frame errors) count against the
        // socket's own queue: a peer that sends without reading is not read further until it
        // drains. Traffic from others filling it (a download) does not pause it: its cancels
        // and pings are still read.
        let replied = match self.conns.get(&id) {
            Some(Conn { io: Io::Ws(w), .. }) => w.replied,
            _ => 0,
        };
        if replied > REPLY_BUDGET {
            self.apply_backpressure(id, id);
        }
        if more {
            self.ready.push(id);
        }
    }

    /// Queues a frame for a WebSocket (written at the end of this turn of the loop).
    fn send_frame(&mut self, id: ConnId, frame: &Frame) {
        self.send_text(id, frame.to_json());
    }

    /// Queues a frame for a WebSocket; it is written at the end of this turn of the loop
    /// ([`Reactor::flush_dirty`]).
    fn send_text(&mut self, id: ConnId, text: String) {
        if self.reading == Some(id)
            && let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id)
        {
            w.replied += text.len();
        }
        self.queue(id, |out| out.push(Message::text(text)));
    }

    /// Queues a large frame given as pieces of a received message and starts writing it at
    /// once, not at the end of the turn. Once written, the message is freed before its
    /// socket's next read, so the next message's buffer reuses its block instead of mapping
    /// (and faulting in) a fresh one for each: relay CPU per 12 MiB download 21.7 →
    /// 16.7–18.3 ms (stop 13, when the buffer was tungstenite's).
    fn send_pieces(&mut self, id: ConnId, pieces: Vec<Bytes>) {
        self.queue(id, |out| out.push_pieces(pieces));
        self.ws_flush(id);
    }

    /// Queues a message with `push` (unless the socket is detached) and marks the socket dirty.
    fn queue(&mut self, id: ConnId, push: impl FnOnce(&mut WsOut)) {
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else {
            return;
        };
        if w.detached {
            return;
        }
        push(&mut w.out);
        if !w.dirty {
            w.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Writes the frames queued during this turn of the loop.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) {
                w.dirty = false;
                self.ws_flush(id);
            }
        }
        // The list keeps its allocation from turn to turn.
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Writes queued messages until the socket would block. Resumes paused sources once the
    /// queue is below half its limit.
    fn ws_flush(&mut self, id: ConnId) {
        let limit = self.shared.config.limits.max_queued_bytes;
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else {
            return;
        };
        let before = w.ws.get_ref().written();
        let broken = w.out.flush(&mut w.ws).is_err();
        let after = w.out.bytes();
        // The clock runs while sources may be paused for this queue (over half the limit) and
        // restarts whenever the socket takes a byte, inside a frame too.
        if after <= limit / 2 {
            w.stalled_since = None;
            w.replied = 0;
        } else if w.ws.get_ref().written() > before || w.stalled_since.is_none() {
            w.stalled_since = Some(Instant::now());
        }
        let resume = if after <= limit / 2 { std::mem::take(&mut w.waiters) } else { Vec::new() };
        if !broken && w.discarding && !w.write_shut && w.out.is_idle() {
            w.write_shut = true;
            w.ws.get_mut().shutdown_write();
        }
        if broken {
            self.detach(id, Closed::Dropped("writing to the socket failed"));
            self.remove(id);
        } else {
            self.set_interest(id);
        }
        self.resume(resume);
    }

    /// Reads again the sources that were paused for a destination which drained or left.
    fn resume(&mut self, sources: Vec<ConnId>) {
        for src in sources {
            if let Some(Conn { io: Io::Ws(s), .. }) = self.conns.get_mut(&src)
                && s.paused
            {
                s.paused = false;
                // It was silent because we stopped reading it.
                s.last_rx = Instant::now();
                self.set_interest(src);
                self.ready.push(src);
            }
        }
    }

    /// Pauses `src` when `dst`'s queue is over the limit (back-pressure).
    fn apply_backpressure(&mut self, src: ConnId, dst: ConnId) {
        let limit = self.shared.config.limits.max_queued_bytes;
        let over = matches!(self.conns.get(&dst), Some(Conn { io: Io::Ws(w), .. }) if w.out.bytes() > limit);
        if !over {
            return;
        }
        if let Some(Conn { io: Io::Ws(d), .. }) = self.conns.get_mut(&dst)
            && !d.waiters.contains(&src)
        {
            d.waiters.push(src);
        }
        if let Some(Conn { io: Io::Ws(s), .. }) = self.conns.get_mut(&src) {
            s.paused = true;
        }
        self.set_interest(src);
    }

    /// Starts a close handshake and detaches the socket from routing; the connection lingers
    /// until the peer answers or [`CLOSE_GRACE`] passes.
    fn close_ws(&mut self, id: ConnId, code: u16, reason: &str) {
        match self.conns.get(&id) {
            Some(Conn { io: Io::Ws(w), .. }) if w.closing.is_none() => {}
            _ => return,
        }
        self.detach(id, Closed::ByRelay(code, reason));
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else {
            return;
        };
        w.closing = Some(Instant::now() + CLOSE_GRACE);
        // Keep reading: the peer's close reply ends the connection early.
        w.paused = false;
        // Queued behind what is already waiting, so final frames (SHUTTING_DOWN,
        // BRIDGE_DISCONNECTED) still leave before the close.
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() };
        w.out.push(Message::Close(Some(frame)));
        self.ws_flush(id);
        self.set_interest(id);
    }

    /// Refuses the rest of a peer's stream: closes with `code` ([`Reactor::close_ws`]), then
    /// reads and drops whatever the peer sends until it closes or the close grace ends, and
    /// shuts the write side once the close frame has left.
    fn fail_ws(&mut self, id: ConnId, code: u16, reason: &str) {
        if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) {
            w.discarding = true;
        }
        self.close_ws(id, code, reason);
        self.ws_discard(id);
    }

    /// Reads and drops what a discarding socket's peer sends ([`crate::wsread::discard_input`],
    /// at most [`READ_BATCH_BYTES`] a turn); drops the connection when the peer has closed.
    fn ws_discard(&mut self, id: ConnId) {
        let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) else { return };
        match crate::wsread::discard_input(w.ws.get_mut(), READ_BATCH_BYTES) {
            Discarded::Closed => drop(self.remove(id)),
            Discarded::Budget => self.ready.push(id),
            Discarded::Drained => {}
        }
    }

    // -- routing -------------------------------------------------------------------------------

    fn peer_of(&self, id: ConnId) -> Option<Peer> {
        match self.conns.get(&id) {
            Some(Conn { io: Io::Ws(w), .. }) if !w.detached => Some(w.peer.clone()),
            _ => None,
        }
    }

    fn bad_frame(&mut self, id: ConnId, message: &str) {
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
            self.send_frame(id, &Frame::bad_frame(message));
        }
    }

    /// Routes one text frame. Request and response frames — the ones that carry bodies — are
    /// read as a [`RawFrame`]: the few small fields routing needs are decoded, `client` is
    /// stamped or stripped, and every other value (the body above all) is forwarded as the
    /// exact JSON text it arrived as. A 16 MiB body is thus scanned once and never decoded; a
    /// frame of [`LARGE_FRAME`] or more is not even copied (it is forwarded from pieces of the
    /// received message, see [`Reactor::app_request`] and [`without_member`]), and a smaller
    /// one is copied once. Other frames are small and parsed as typed [`Frame`]s.
    fn route_text(&mut self, id: ConnId, message: &Utf8Bytes) {
        let Some(peer) = self.peer_of(id) else { return };
        let text = message.as_str();
        let mut raw = match parse_raw(text) {
            Ok(m) => m,
            Err(e) => return self.bad_frame(id, &format!("malformed frame: {e}")),
        };
        let kind = raw_str(&raw, "type").ok().flatten();
        match (peer, kind.as_deref()) {
            (Peer::App { bridge_id, client_id, .. }, Some("request" | "request.start")) => {
                self.app_request(id, &bridge_id, &client_id, raw, message)
            }
            (Peer::App { bridge_id, client_id, .. }, Some("request.chunk")) => {
                self.app_request_chunk(id, &bridge_id, &client_id, raw, message)
            }
            (Peer::Bridge { bridge_id, .. }, Some(k)) if RESPONSE_KINDS.contains(&k) => {
                let client = match raw_str(&raw, "client") {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        return self
                            .bad_frame(id, "response frames must carry the client they answer");
                    }
                    Err(msg) => return self.bad_frame(id, &msg),
                };
                let req_id = match raw_str(&raw, "id") {
                    Ok(Some(r)) => r,
                    Ok(None) => return self.bad_frame(id, "response frames need an id"),
                    Err(msg) => return self.bad_frame(id, &msg),
                };
                let conn = match p::raw_conn(&raw) {
                    Ok(n) => n,
                    Err(msg) => return self.bad_frame(id, &msg),
                };
                let client_value = raw.remove("client");
                let conn_value = raw.remove("conn");
                let terminal = TERMINAL_KINDS.contains(&k);
                let Some(app_conn) =
                    self.deliverable(bridge_id.as_str(), &client, conn, &req_id, terminal)
                else {
                    return;
                };
                // The frame goes on as the text around its `client` (and `conn`) members: a
                // large frame as pieces of the received message, uncopied; a small one copied
                // once.
                match client_value.and_then(|v| without_stamp(text, v, conn_value)) {
                    Some((before, after)) if text.len() >= LARGE_FRAME => {
                        let slice =
                            |part: &str| SharedStr::slice_of(message, part).map(Bytes::from);
                        match (slice(before), slice(after)) {
                            (Some(b), Some(a)) => self.send_pieces(app_conn, vec![b, a]),
                            _ => self.send_text(app_conn, [before, after].concat()),
                        }
                    }
                    Some((before, after)) => self.send_text(app_conn, [before, after].concat()),
                    None => self.send_text(app_conn, raw.to_json(None, None)),
                }
                self.apply_backpressure(id, app_conn);
            }
            (peer, _) => {
                let frame = match p::parse_frame(text) {
                    Ok(f) => f,
                    Err(msg) => return self.bad_frame(id, &msg),
                };
                match peer {
                    Peer::App { bridge_id, client_id, .. } => {
                        self.route_from_app(id, &bridge_id, &client_id, frame)
                    }
                    Peer::Bridge { bridge_id, .. } => self.route_from_bridge(id, &bridge_id, frame),
                }
            }
        }
    }

    /// An app's `request`: checked against the limits, admitted, stamped with the app's
    /// clientId (whatever `client` it carried is replaced) and forwarded to its bridge.
    fn app_request(
        &mut self,
        id: ConnId,
        bridge_id: &str,
        client_id: &str,
        raw: RawFrame<'_>,
        message: &Utf8Bytes,
    ) {
        let (req, body_len) = match request_head(&raw) {
            Ok(r) => r,
            // A request the app can be answered about (a valid id, not open already) gets its
            // terminal frame; the others are bad frames.
            Err(msg) => match p::raw_str(&raw, "id") {
                Ok(Some(rid))
                    if p::is_request_id(&rid)
                        && self.apps.get(client_id).is_some_and(|a| !a.open.contains(&*rid)) =>
                {
                    let reply = Frame::error(&rid, None, ErrorCode::BadRequest, msg);
                    return self.send_frame(id, &reply);
                }
                _ => return self.bad_frame(id, &msg),
            },
        };
        let limits = self.shared.config.limits;
        if !p::is_request_id(&req.id) {
            return self.bad_frame(id, "request id must be 1-64 of [A-Za-z0-9._-]");
        }
        let reply = |code, msg: String| Frame::error(&req.id, None, code, msg);
        if let Err((code, msg)) = p::check_request_limits_sized(&req, body_len, &limits) {
            // The carried length may count escapes: the decoded length decides.
            let decoded = p::unescaped_body_len(&raw);
            if code != ErrorCode::TooLarge
                || decoded == body_len
                || p::check_request_limits_sized(&req, decoded, &limits).is_err()
            {
                return self.send_frame(id, &reply(code, msg));
            }
        }
        let Some(app) = self.apps.get(client_id) else { return };
        let number = app.number;
        if app.open.contains(&req.id) {
            return self.bad_frame(id, &format!("request id {} is already open", req.id));
        }
        if app.open.len() >= limits.max_open_per_app {
            let msg = format!("more than {} open requests", limits.max_open_per_app);
            return self.send_frame(id, &reply(ErrorCode::Busy, msg));
        }
        let route = self.bridges.get(bridge_id);
        let Some(bridge_conn) = route.and_then(|r| r.conn) else {
            let msg = "the bridge is not connected to the relay".to_owned();
            return self.send_frame(id, &reply(ErrorCode::BridgeOffline, msg));
        };
        if route.is_some_and(|r| r.open >= limits.max_open_per_bridge) {
            let msg = format!("the bridge has {} open requests", limits.max_open_per_bridge);
            return self.send_frame(id, &reply(ErrorCode::Busy, msg));
        }
        if let Some(app) = self.apps.get_mut(client_id) {
            app.open.insert(req.id.clone());
            // The bridge will hear of this socket: its `client.connected` stays.
            app.announced = None;
        }
        if let Some(r) = self.bridges.get_mut(bridge_id) {
            r.open += 1;
        }
        self.forward_stamped(id, bridge_conn, (client_id, number), raw, message);
    }

    /// An app's `request.chunk`: forwarded like its `request.start` while that request is
    /// open; dropped (and counted) once it has ended, or when the bridge is gone (which
    /// answered the request already).
    fn app_request_chunk(
        &mut self,
        id: ConnId,
        bridge_id: &str,
        client_id: &str,
        raw: RawFrame<'_>,
        message: &Utf8Bytes,
    ) {
        let req_id = match raw_str(&raw, "id") {
            Ok(Some(r)) => r,
            Ok(None) => return self.bad_frame(id, "request.chunk frames need an id"),
            Err(msg) => return self.bad_frame(id, &msg),
        };
        // The shape the bridge reads, so that nothing it would have to drop travels there.
        if !raw.get("body").is_some_and(|b| b.starts_with('"')) {
            return self.bad_frame(id, "request.chunk frames need a string body");
        }
        if let Err(msg) = p::raw_field::<bool>(&raw, "bodyBase64") {
            return self.bad_frame(id, &msg);
        }
        let app = self.apps.get(client_id).filter(|a| a.open.contains(req_id.as_ref()));
        let number = app.map(|a| a.number);
        match (self.bridges.get(bridge_id).and_then(|r| r.conn), number) {
            (Some(bridge_conn), Some(number)) => {
                self.forward_stamped(id, bridge_conn, (client_id, number), raw, message)
            }
            _ => self.dropped_frames += 1,
        }
    }

    /// Sends an app's frame to its bridge stamped with the app's clientId and socket number
    /// (`stamp`; whatever `client` or `conn` it carried is replaced), then applies
    /// back-pressure to the app.
    fn forward_stamped(
        &mut self,
        id: ConnId,
        bridge_conn: ConnId,
        stamp: (&str, u64),
        mut raw: RawFrame<'_>,
        message: &Utf8Bytes,
    ) {
        let (client_id, number) = stamp;
        // `|`, not `||`: both must go.
        if raw.remove("client").is_some() | raw.remove("conn").is_some() {
            // The app named a client or a number: the frame is written anew without them.
            self.send_text(bridge_conn, raw.to_json(Some(client_id), Some(number)));
        } else {
            // `{"client":"…",` and then the frame as it arrived, after its opening brace (the
            // frame has fields, so a comma belongs there).
            let text = message.as_str();
            let rest = text.trim_start().get(1..).unwrap_or_default();
            let large = text.len() >= LARGE_FRAME;
            if let Some(rest) = large.then(|| SharedStr::slice_of(message, rest)).flatten() {
                let prefix = client_prefix(client_id, number, 0);
                let pieces = vec![Bytes::from(prefix), Bytes::from(rest)];
                self.send_pieces(bridge_conn, pieces);
            } else {
                let mut frame = client_prefix(client_id, number, rest.len());
                frame.push_str(rest);
                self.send_text(bridge_conn, frame);
            }
        }
        self.apply_backpressure(id, bridge_conn);
    }

    fn route_from_app(&mut self, id: ConnId, bridge_id: &str, client_id: &str, frame: Frame) {
        match frame {
            Frame::Cancel { id: req_id, .. } => {
                let app = self.apps.get(client_id).filter(|a| a.open.contains(&req_id));
                let number = app.map(|a| a.number);
                let bridge_conn = self.bridges.get(bridge_id).and_then(|r| r.conn);
                if let (Some(number), Some(bridge_conn)) = (number, bridge_conn) {
                    let client = Some(client_id.to_owned());
                    let cancel = Frame::Cancel { id: req_id, client, conn: Some(number) };
                    self.send_frame(bridge_conn, &cancel);
                }
            }
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

    fn route_from_bridge(&mut self, id: ConnId, bridge_id: &str, frame: Frame) {
        if let Frame::Error { message, .. } = &frame {
            // Cut: a frame may be 16 MiB, and this is the reactor thread writing a log line.
            let shown: String = message.chars().take(MAX_LOGGED_CHARS).collect();
            log_event("bridge.error_frame", &[("bridge", bridge_id), ("message", &shown)]);
            return;
        }
        self.bad_frame(
            id,
            &format!("bridges may send only response and request.ack frames, not {}", frame.kind()),
        );
    }

    /// The app connection a bridge's response frame goes to, closing the request on its
    /// terminal frame; `None` (counted) when the app left, the request already ended, or the
    /// frame answers a socket of this app that was replaced (`conn`, when the bridge sends it:
    /// the new socket may have reused the id, and that request's accounting is not touched).
    fn deliverable(
        &mut self,
        bridge_id: &str,
        client: &str,
        conn: Option<u64>,
        req_id: &str,
        terminal: bool,
    ) -> Option<ConnId> {
        let app_conn = match self.apps.get_mut(client) {
            Some(app)
                if app.bridge_id == bridge_id
                    && conn.is_none_or(|n| n == app.number)
                    && app.open.contains(req_id) =>
            {
                if terminal {
                    app.open.remove(req_id);
                }
                app.conn
            }
            _ => {
                self.dropped_frames += 1;
                return None;
            }
        };
        if terminal && let Some(r) = self.bridges.get_mut(bridge_id) {
            r.open = r.open.saturating_sub(1);
        }
        Some(app_conn)
    }

    fn attach_bridge(&mut self, id: ConnId, bridge_id: String, instance: String) {
        let old = self.bridges.get(&bridge_id).and_then(|r| r.conn);
        if let Some(old) = old {
            self.close_ws(
                old,
                close_code::REPLACED_BRIDGE,
                "replaced by a newer bridge connection",
            );
        }
        let route = self.bridges.entry(bridge_id.clone()).or_default();
        route.conn = Some(id);
        route.instance = instance;
        let apps: Vec<String> = route.apps.iter().cloned().collect();
        self.shared.presence().bridges.insert(bridge_id.clone());
        log_event("ws.open", &[("role", "bridge"), ("bridge", &bridge_id)]);
        for client in apps {
            let Some(app) = self.apps.get(&client) else {
                continue;
            };
            let (app_conn, device_name) = (app.conn, app.device_name.clone());
            self.send_frame(app_conn, &Frame::BridgeStatus { online: true });
            self.announce(id, &client, device_name);
        }
    }

    fn attach_app(
        &mut self,
        id: ConnId,
        bridge_id: String,
        client_id: String,
        device_name: String,
    ) {
        if let Some(old) = self.apps.get(&client_id).map(|a| a.conn) {
            self.close_ws(
                old,
                close_code::REPLACED_APP,
                "replaced by a newer connection of this app",
            );
        }
        let route = self.bridges.entry(bridge_id.clone()).or_default();
        route.apps.insert(client_id.clone());
        let bridge_conn = route.conn;
        self.app_numbers += 1;
        self.apps.insert(
            client_id.clone(),
            AppRoute {
                conn: id,
                bridge_id: bridge_id.clone(),
                device_name: device_name.clone(),
                open: FastSet::default(),
                number: self.app_numbers,
                announced: None,
            },
        );
        self.shared.presence().apps.insert(client_id.clone());
        let _ = self.jobs.try_send(Job::Touch { client_id: client_id.clone() });
        log_event("ws.open", &[("role", "app"), ("bridge", &bridge_id), ("client", &client_id)]);
        self.send_frame(id, &Frame::BridgeStatus { online: bridge_conn.is_some() });
        if let Some(bridge_conn) = bridge_conn {
            self.announce(bridge_conn, &client_id, device_name);
        }
    }

    /// Queues `client.connected` for `client` to bridge socket `bridge_conn`, and records in
    /// the app's route where, with the frame's ticket (`None` when it was not queued: the
    /// socket is leaving), for [`Reactor::withdraw_presence`].
    fn announce(&mut self, bridge_conn: ConnId, client: &str, device_name: String) {
        let frame = Frame::ClientConnected { client: client.to_owned(), device_name };
        let mut ticket = None;
        self.queue(bridge_conn, |out| {
            ticket = Some(out.push_withdrawable(Message::text(frame.to_json())));
        });
        if let Some(app) = self.apps.get_mut(client) {
            app.announced = ticket.map(|t| (bridge_conn, t));
        }
    }

    /// True when the `client.connected` announced as `announced` still waits, whole, in the
    /// queue of bridge socket `bridge_conn`, and was taken back: that bridge never heard of
    /// the app socket it announced.
    fn withdraw_presence(&mut self, bridge_conn: ConnId, announced: Option<(ConnId, u64)>) -> bool {
        let Some((conn, ticket)) = announced.filter(|&(c, _)| c == bridge_conn) else {
            return false;
        };
        match self.conns.get_mut(&conn) {
            Some(Conn { io: Io::Ws(w), .. }) if !w.detached => w.out.withdraw(ticket),
            _ => false,
        }
    }

    /// Detaches a socket from routing: a bridge's open requests end with
    /// `BRIDGE_DISCONNECTED` and its apps hear `bridge.status` offline; an app's bridge hears
    /// `client.disconnected`. `how` is told in the `ws.close` line.
    fn detach(&mut self, id: ConnId, how: Closed<'_>) {
        let Some(peer) = self.peer_of(id) else { return };
        // Mark the socket as leaving routing before notifying others. Nothing is queued to it
        // any more, so the sockets paused for its queue are read again.
        if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) {
            w.detached = true;
            let waiters = std::mem::take(&mut w.waiters);
            self.resume(waiters);
        }
        match peer {
            Peer::Bridge { bridge_id, .. } => {
                let Some(route) = self.bridges.get_mut(&bridge_id) else {
                    return;
                };
                if route.conn != Some(id) {
                    return;
                }
                route.conn = None;
                route.open = 0;
                let apps: Vec<String> = route.apps.iter().cloned().collect();
                self.shared.presence().bridges.remove(&bridge_id);
                how.log(&[("role", "bridge"), ("bridge", &bridge_id)]);
                for client in apps {
                    let Some(app) = self.apps.get_mut(&client) else {
                        continue;
                    };
                    let open: Vec<String> = app.open.drain().collect();
                    let app_conn = app.conn;
                    for req_id in open {
                        let msg = "the bridge disconnected before answering";
                        self.send_frame(
                            app_conn,
                            &Frame::error(&req_id, None, ErrorCode::BridgeDisconnected, msg),
                        );
                    }
                    self.send_frame(app_conn, &Frame::BridgeStatus { online: false });
                }
                self.gc_bridge(&bridge_id);
            }
            Peer::App { bridge_id, client_id, .. } => {
                if self.apps.get(&client_id).map(|a| a.conn) != Some(id) {
                    return;
                }
                let Some(app) = self.apps.remove(&client_id) else {
                    return;
                };
                self.shared.presence().apps.remove(&client_id);
                let _ = self.jobs.try_send(Job::Touch { client_id: client_id.clone() });
                how.log(&[("role", "app"), ("bridge", &bridge_id), ("client", &client_id)]);
                let bridge_conn = self.bridges.get_mut(&bridge_id).and_then(|r| {
                    r.apps.remove(&client_id);
                    r.open = r.open.saturating_sub(app.open.len());
                    r.conn
                });
                // A socket that leaves before its bridge read `client.connected` (an app
                // reconnecting in a loop, two installs replacing each other with 4002, a bridge
                // that reads slowly) costs the bridge nothing: both frames are dropped, so its
                // queue holds at most one of each per client, however fast the app flaps. Never
                // once a request of the socket was forwarded (`announced` is cleared then): the
                // bridge must hear `client.disconnected` to cancel it.
                if let Some(bridge_conn) = bridge_conn {
                    if self.withdraw_presence(bridge_conn, app.announced) {
                        self.presence_withdrawn += 1;
                    } else {
                        let frame = Frame::ClientDisconnected { client: client_id };
                        self.send_frame(bridge_conn, &frame);
                    }
                }
                self.gc_bridge(&bridge_id);
            }
        }
    }

    fn gc_bridge(&mut self, bridge_id: &str) {
        if self.bridges.get(bridge_id).is_some_and(|r| r.conn.is_none() && r.apps.is_empty()) {
            self.bridges.remove(bridge_id);
        }
    }

    fn kick(&mut self, bridge_id: &str, client_id: Option<&str>) {
        let targets: Vec<ConnId> = match client_id {
            Some(c) => self
                .apps
                .get(c)
                .filter(|a| a.bridge_id == bridge_id)
                .map(|a| a.conn)
                .into_iter()
                .collect(),
            // No route: nothing of the bridge is attached, but an upgrade may be pending (below).
            None => self.bridges.get(bridge_id).map_or_else(Vec::new, |route| {
                let apps = route.apps.iter().filter_map(|c| self.apps.get(c).map(|a| a.conn));
                route.conn.into_iter().chain(apps).collect()
            }),
        };
        // One client: revoked; the whole bridge: deleted (`--reset`, `/v1/bridge/delete`).
        let why = if client_id.is_some() { "revoked" } else { "the bridge was deleted" };
        for id in targets {
            self.close_ws(id, close_code::REVOKED, why);
        }
        // An upgrade accepted before the kick whose 101 is still being written: checked before
        // the revocation committed (one checked after fails in the store), so it never attaches.
        let revoked = |peer: &Peer| kicks::reaches(bridge_id, client_id, peer);
        let pending: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(&c.io, Io::Http(h) if matches!(&h.after, Some(After::Upgrade(p)) if revoked(p)))
            })
            .map(|(&id, _)| id)
            .collect();
        for id in pending {
            self.remove(id);
        }
    }

    // -- timers and shutdown -------------------------------------------------------------------

    /// Notices a wall clock set back since the last tick (an NTP step, a VM restored, a wrong
    /// hardware clock corrected) and has the outstanding access codes withdrawn: their expiry
    /// is a wall-clock time, so each would otherwise stay valid its lifetime plus the step (an
    /// hour back, a 10-minute code pairs for 70 minutes). A clock set forward only shortens
    /// them.
    fn watch_the_wall_clock(&mut self, now: Instant) {
        let wall = now_ms();
        let (last_wall, last_mono) = self.clocks;
        self.clocks = (wall, now);
        if let Some(back) = stepped_back(last_wall, wall, now.saturating_duration_since(last_mono))
        {
            log_event(
                "clock.stepped_back",
                &[
                    ("secs", &back.as_secs().to_string()),
                    (
                        "effect",
                        "access codes and diagnostic credentials issued before are withdrawn: \
                         pairing needs a new code (hermeschat-pair --refresh-code)",
                    ),
                ],
            );
            self.withdraw_due = Some(wall);
        }
        if let Some(at) = self.withdraw_due
            && self.jobs.try_send(Job::WithdrawCodes { now_ms: at }).is_ok()
        {
            self.withdraw_due = None;
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        self.kicks.prune(now);
        self.app_limit.prune_if_due(now);
        self.shared.register_limit.prune_if_due(now);
        self.shared.verify_limit.prune_if_due(now);
        if now >= self.next_sweep {
            // A full queue skips this sweep; the next one comes an hour later.
            let _ = self.jobs.try_send(Job::Sweep);
            self.next_sweep = now + SWEEP_EVERY;
        }
        self.watch_the_wall_clock(now);
        // Refusals are counted, and told at most once a minute: a flood must not flood the log.
        if (self.refused.over_total, self.refused.over_per_ip) != (0, 0)
            && self.refused_logged.is_none_or(|t| now.duration_since(t) >= REFUSED_LOG_EVERY)
        {
            self.refused.log();
            self.refused_logged = Some(now);
        }
        self.shared.refusals.flush(now);
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            self.watch_listener(true);
        }
        let idle = Duration::from_secs(p::PEER_IDLE_TIMEOUT_SECS);
        let ping_every = Duration::from_secs(p::RELAY_PING_INTERVAL_SECS);
        let mut expired = Vec::new();
        let mut idle_socks = Vec::new();
        let mut stalled = Vec::new();
        let mut ping = Vec::new();
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
                    None if w
                        .stalled_since
                        .is_some_and(|t| now.duration_since(t) >= STALL_LIMIT) =>
                    {
                        stalled.push(id)
                    }
                    // A paused socket is silent because we stopped reading it, not because
                    // the peer is gone (a destination that never drains is closed above).
                    None if !w.paused && now.duration_since(w.last_rx) >= idle => {
                        idle_socks.push(id)
                    }
                    None if now.duration_since(w.last_ping) >= ping_every => ping.push(id),
                    None => {}
                },
                // A request held by a worker is the relay's time, not the client's.
                Io::Http(h) if h.waiting.is_some() => {}
                _ if conn.deadline.is_some_and(|d| now >= d) => expired.push(id),
                _ => {}
            }
        }
        for id in expired {
            // WebSockets here were detached when their close began (nothing is logged again).
            self.detach(id, Closed::Dropped("deadline passed"));
            self.remove(id);
        }
        for id in idle_socks {
            self.close_ws(id, close_code::IDLE, "no traffic for 60 s");
        }
        for id in stalled {
            // The clock moves on writes: one more try first (a socket can take bytes without
            // ever being reported writable again, when it drains less than the kernel waits for).
            self.ws_flush(id);
            let still = matches!(self.conns.get(&id), Some(Conn { io: Io::Ws(w), .. })
                if w.stalled_since.is_some_and(|t| now.duration_since(t) >= STALL_LIMIT));
            if !still {
                continue;
            }
            match self.peer_of(id) {
                Some(Peer::Bridge { bridge_id, .. }) => {
                    log_event("ws.stalled", &[("role", "bridge"), ("bridge", &bridge_id)])
                }
                Some(Peer::App { bridge_id, client_id, .. }) => log_event(
                    "ws.stalled",
                    &[("role", "app"), ("bridge", &bridge_id), ("client", &client_id)],
                ),
                None => {}
            }
            // Its queue is full, so the close frame likely never leaves: the socket goes when
            // the close grace ends.
            self.close_ws(id, close_code::LIMIT, "not reading: queue full for 60 s");
        }
        for id in ping {
            if let Some(Conn { io: Io::Ws(w), .. }) = self.conns.get_mut(&id) {
                w.last_ping = now;
                w.out.push(Message::Ping(Default::default()));
                self.ws_flush(id);
            }
        }
    }

    /// Stops cleanly: WebSockets hear `SHUTTING_DOWN` for their open requests and close 1001;
    /// registry requests a worker holds are carried out and answered ([`SHUTDOWN_GRACE`]), so
    /// none is committed after its client was cut off.
    fn shutdown(&mut self) {
        log_event("shutdown", &[("connections", &self.conns.len().to_string())]);
        // Connections not accepted yet are reset when the listener closes.
        self.watch_listener(false);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        // Apps first hear that their open requests end, then every socket closes 1001.
        for (client, app) in std::mem::take(&mut self.apps) {
            for req_id in &app.open {
                let msg = "the relay is shutting down";
                self.send_frame(
                    app.conn,
                    &Frame::error(req_id, None, ErrorCode::ShuttingDown, msg),
                );
            }
            self.shared.presence().apps.remove(&client);
        }
        self.bridges.clear();
        self.flush_dirty();
        for &id in &ids {
            match self.conns.get(&id).map(|c| &c.io) {
                Some(Io::Ws(_)) => self.close_ws(id, 1001, "relay shutting down"),
                // A request a worker holds, or an answer being written: kept until answered.
                Some(Io::Http(h)) if h.waiting.is_some() || h.after.is_some() => {}
                // Between requests, or midway through one: nothing of it was carried out.
                _ => {
                    self.remove(id);
                }
            }
        }
        let start = Instant::now();
        // Close frames get a moment to leave, without waiting on slow peers.
        let ws_end = start + Duration::from_millis(500);
        // Set once every request is answered or refused: the last writes may take this long.
        let mut flush_end: Option<Instant> = None;
        let mut events = Events::new();
        loop {
            while let Ok(msg) = self.inbox.try_recv() {
                self.on_message(msg);
            }
            let now = Instant::now();
            if now >= start + SHUTDOWN_GRACE {
                self.shared.close_gate();
            }
            if flush_end.is_none()
                && self.shared.gate_closed()
                && self.shared.requests_running() == 0
            {
                // Every request a worker started has sent its answer; the ones still waiting
                // can never start: refused here, whether or not a worker refuses them too.
                while let Ok(msg) = self.inbox.try_recv() {
                    self.on_message(msg);
                }
                let waiting: Vec<ConnId> =
                    self.conns.keys().copied().filter(|&id| self.http_waiting(id)).collect();
                for id in waiting {
                    self.refuse_stopping(id);
                }
                flush_end = Some(now + CLOSE_GRACE);
            }
            if now >= ws_end {
                let ws: Vec<ConnId> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| matches!(c.io, Io::Ws(_)))
                    .map(|(&id, _)| id)
                    .collect();
                for id in ws {
                    self.remove(id);
                }
            }
            self.flush_dirty();
            let busy = self.conns.values().any(|c| match &c.io {
                Io::Http(_) => true,
                Io::Ws(w) => w.out.blocked(),
                Io::TlsHandshake(_) => false,
            });
            if !busy || flush_end.is_some_and(|t| now >= t) {
                break;
            }
            let timeout =
                if self.ready.is_empty() { Duration::from_millis(50) } else { Duration::ZERO };
            events.clear();
            let _ = self.poller.wait(&mut events, Some(timeout));
            for ev in events.iter() {
                if ev.key == LISTENER {
                    continue;
                }
                // Reported readable while not read: hung up, nobody is left to answer.
                if ev.readable && self.conns.get(&ev.key).is_some_and(|c| !c.interest.0) {
                    self.remove(ev.key);
                    continue;
                }
                if ev.readable {
                    self.mark_ready(ev.key);
                }
                self.on_event(ev.key, ev.readable, ev.writable);
            }
            for id in std::mem::take(&mut self.ready) {
                self.on_event(id, true, false);
            }
        }
        let left: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in left {
            self.remove(id);
        }
        if self.dropped_frames > 0 || self.presence_withdrawn > 0 {
            log_event(
                "stats",
                &[
                    ("droppedFrames", &self.dropped_frames.to_string()),
                    ("presenceWithdrawn", &self.presence_withdrawn.to_string()),
                ],
            );
        }
    }
}

/// The answer to an app upgrade refused by its credential's [`AppUpgradeLimiter`]: `429
/// RATE_LIMITED` with `Retry-After`, saying why and what to do.
fn app_limited_response(limited: &AppLimited) -> Vec<u8> {
    let wait = limited.retry_after.to_string();
    let message = format!(
        "this app opened more than {APP_UPGRADE_BURST} connections in a short time (then 1 \
         per {} s is allowed); its open connection, if any, is kept. Retry in {wait} s, with \
         backoff. Two devices sharing one pairing (a phone restored from another's backup) \
         replace each other in a loop: pair the second device anew",
        APP_UPGRADE_REFILL.as_secs()
    );
    let body = serde_json::to_string(&p::ApiError::new(p::api_code::RATE_LIMITED, message))
        .unwrap_or_default();
    let headers = [("Cache-Control", "no-store"), ("Retry-After", wait.as_str())];
    http::response(429, "application/json", body.as_bytes(), &headers, true)
}

/// Writes the `ws.app_limited` line: app `client_id` of `bridge_id` had `refused` upgrades
/// refused by its credential's limit since its last such line.
fn log_app_limited(bridge_id: &str, client_id: &str, refused: u64) {
    log_event(
        "ws.app_limited",
        &[
            ("bridge", bridge_id),
            ("client", client_id),
            ("refused", &refused.to_string()),
            (
                "next",
                "this app reconnects in a loop: a bug in the app, or two devices sharing one \
                 pairing (re-pair one of them; revoke the client if it is not yours)",
            ),
        ],
    );
}

/// Frame types a bridge sends about a request.
const RESPONSE_KINDS: &[&str] = &[
    "response",
    "response.start",
    "response.chunk",
    "response.end",
    "response.error",
    "request.ack",
];

/// Frame types that end a request.
const TERMINAL_KINDS: &[&str] = &["response", "response.end", "response.error"];

/// `object` (a JSON object's text) without its top-level member `name`, whose value is `value`
/// (a slice of `object`): the text before the member and the text after it, leaving valid
/// JSON. `None` when the key is not written plainly (e.g. escaped); the caller then writes the
/// object anew.
fn without_member<'a>(object: &'a str, name: &str, value: &str) -> Option<(&'a str, &'a str)> {
    let start = (value.as_ptr() as usize).checked_sub(object.as_ptr() as usize)?;
    let end = start + value.len();
    let is_ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
    let key_end = object.get(..start)?.trim_end_matches(is_ws).strip_suffix(':')?;
    let key = key_end.trim_end_matches(is_ws).strip_suffix('"')?.strip_suffix(name)?;
    let key_start = key.strip_suffix('"')?;
    let before = key_start.trim_end_matches(is_ws);
    if let Some(kept) = before.strip_suffix(',') {
        // `…, "name": value` → `…` and whatever follows the value.
        return Some((kept, object.get(end..)?));
    }
    // The first member: drop it and the comma after it.
    let after = object.get(end..)?.trim_start_matches(is_ws);
    let after = after.strip_prefix(',').unwrap_or(after);
    before.ends_with('{').then_some((before, after))
}

/// `object` without its `client` member (whose value is `client`, a slice of `object`) and,
/// when given, its `conn` member, which bridges write right after `client`: the text before and
/// after them (see [`without_member`]). `None` when either key is not written plainly or `conn`
/// does not follow `client`; the caller then writes the object anew.
fn without_stamp<'a>(
    object: &'a str,
    client: &str,
    conn: Option<&str>,
) -> Option<(&'a str, &'a str)> {
    let (before, after) = without_member(object, "client", client)?;
    let Some(conn) = conn else { return Some((before, after)) };
    let (between, rest) = without_member(object, "conn", conn)?;
    // Adjacent: what precedes `conn`'s member ends where the `client` value does.
    let between = between.trim_end_matches([' ', '\t', '\n', '\r']);
    if between.as_bytes().as_ptr_range().end != client.as_bytes().as_ptr_range().end {
        return None;
    }
    if before.ends_with('{') {
        // `client` was the first member: the comma after `conn` goes too.
        let rest = rest.trim_start_matches([' ', '\t', '\n', '\r']);
        return Some((before, rest.strip_prefix(',').unwrap_or(rest)));
    }
    Some((before, rest))
}

/// How far the wall clock was set back between two readings `mono_elapsed` apart, when by
/// more than [`CLOCK_STEP_BACK`]: wall-clock time (Unix ms) that should have moved on by the
/// monotonic time elapsed but reads earlier than that.
fn stepped_back(last_wall_ms: u64, wall_ms: u64, mono_elapsed: Duration) -> Option<Duration> {
    let expected = last_wall_ms.saturating_add(mono_elapsed.as_millis() as u64);
    let back = Duration::from_millis(expected.saturating_sub(wall_ms));
    (back > CLOCK_STEP_BACK).then_some(back)
}

/// Public peers that sent `X-Forwarded-For` to a relay run with `--trust-proxy` (the header is
/// ignored from them: [`may_be_a_proxy`]), by source ([`source`]: an IPv6 /64 is one), so
/// that each is logged once a day. At most [`IgnoredForwarders::MAX`] are remembered; past
/// them nothing more is logged that day. Forgotten daily: on a public relay scanners fill the
/// set within weeks, and an operator's proxy moved to a public address later must still be
/// told.
struct IgnoredForwarders {
    seen: std::collections::HashSet<IpAddr>,
    /// When `seen` was last emptied.
    since: Instant,
}

impl Default for IgnoredForwarders {
    fn default() -> Self {
        IgnoredForwarders { seen: Default::default(), since: Instant::now() }
    }
}

impl IgnoredForwarders {
    /// Sources remembered at most.
    const MAX: usize = 64;

    /// How long a source told stays untold again.
    const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

    /// True the first time in [`Self::FORGET_AFTER`] that `peer`'s source is seen at `now`
    /// (while fewer than [`Self::MAX`] are known).
    fn first(&mut self, peer: IpAddr, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) >= Self::FORGET_AFTER {
            self.seen = Default::default();
            self.since = now;
        }
        self.seen.len() < Self::MAX && self.seen.insert(source(peer))
    }
}

/// Whether `peer` may be the operator's proxy: loopback, a private network (`10/8`,
/// `172.16/12`, `192.168/16`, IPv6 `fc00::/7`), or link-local, IPv4-mapped addresses as their
/// IPv4 address. A public address never is: it is a client that reached the relay directly.
fn may_be_a_proxy(peer: IpAddr) -> bool {
    match peer.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local(),
    }
}

/// `{"client":"…","conn":N,`, how a request frame forwarded to its bridge begins, in a string
/// with room for `rest` more bytes.
fn client_prefix(client_id: &str, number: u64, rest: usize) -> String {
    use std::fmt::Write as _;
    let quoted = if client_id.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
        None
    } else {
        Some(p::json_string(client_id))
    };
    let quoted_len = quoted.as_ref().map_or(client_id.len() + 2, String::len);
    let digits = number.checked_ilog10().map_or(1, |d| d as usize + 1);
    // Exactly the frame's length: the message made of it then needs no allocation of its own.
    let stamp_len = r#"{"client":,"conn":,"#.len() + quoted_len + digits;
    let mut out = String::with_capacity(stamp_len + rest);
    out.push_str(r#"{"client":"#);
    match &quoted {
        Some(q) => out.push_str(q),
        None => {
            out.push('"');
            out.push_str(client_id);
            out.push('"');
        }
    }
    // Writing to a `String` cannot fail; it has room for the digits.
    let _ = write!(out, r#","conn":{number},"#);
    out
}

impl HttpConn {
    fn new(stream: Stream) -> Self {
        HttpConn {
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            waiting: None,
            after: None,
        }
    }
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::TlsHandshake(mid) => &mid.get_ref().0,
            Io::Http(h) => h.stream.tcp(),
            Io::Ws(w) => w.ws.get_ref().tcp(),
        }
    }

    /// Ends our side once everything is written ([`Stream::shutdown_write`]).
    fn shutdown_write(&mut self) {
        match &mut self.io {
            Io::TlsHandshake(mid) => drop(mid.get_ref().0.shutdown(Shutdown::Write)),
            Io::Http(h) => h.stream.shutdown_write(),
            Io::Ws(w) => w.ws.get_mut().shutdown_write(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_wall_clock_set_back_past_the_threshold_counts_as_a_step() {
        let second = Duration::from_secs(1);
        let t = 1_800_000_000_000;
        // Ticking along, slewed a little, or late: no step.
        assert_eq!(stepped_back(t, t + 1_000, second), None);
        assert_eq!(stepped_back(t, t + 999, second), None);
        assert_eq!(stepped_back(t, t + 30_000, Duration::from_secs(30)), None);
        assert_eq!(stepped_back(t, t - 4_000, second), None);
        // Forward a day: codes only end sooner.
        assert_eq!(stepped_back(t, t + 86_400_000, second), None);
        // Back an hour.
        assert_eq!(stepped_back(t, t - 3_599_000, second), Some(Duration::from_secs(3_600)));
        assert_eq!(stepped_back(t, 0, second), Some(Duration::from_millis(t + 1_000)));
    }

    /// What `without_member` leaves of `text` once `client` is cut out (None: not found).
    fn cut(text: &str) -> Option<String> {
        let raw = parse_raw(text).unwrap();
        let (before, after) = without_member(text, "client", raw.get("client")?)?;
        Some(format!("{before}{after}"))
    }

    #[test]
    fn an_ignored_forwarder_is_told_once_a_day_and_the_list_is_bounded() {
        let mut seen = IgnoredForwarders::default();
        let t0 = Instant::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(seen.first(ip("203.0.113.7"), t0));
        assert!(!seen.first(ip("203.0.113.7"), t0));
        // One /64 is one source.
        assert!(seen.first(ip("2001:db8::1"), t0));
        assert!(!seen.first(ip("2001:db8::2"), t0));
        for n in 0..200u32 {
            seen.first(IpAddr::V4(std::net::Ipv4Addr::from(0x0800_0000 + n)), t0);
        }
        assert_eq!(seen.seen.len(), IgnoredForwarders::MAX);
        assert!(!seen.first(ip("198.51.100.1"), t0), "past the bound nothing more is logged");
        // A day later (scanners filled the list long ago), a new source is told, and an old
        // one again.
        let day = t0 + IgnoredForwarders::FORGET_AFTER;
        assert!(seen.first(ip("198.51.100.1"), day));
        assert!(seen.first(ip("203.0.113.7"), day));
        assert!(!seen.first(ip("203.0.113.7"), day));
    }

    #[test]
    fn only_a_local_or_private_peer_is_believed_as_a_proxy() {
        for local in ["127.0.0.1", "::1", "10.1.2.3", "172.17.0.2", "192.168.1.9", "fd00::7"] {
            assert!(may_be_a_proxy(local.parse().unwrap()), "{local}");
        }
        for direct in ["203.0.113.7", "8.8.8.8", "2001:db8::1", "::ffff:198.51.100.7", "172.32.0.1"]
        {
            assert!(!may_be_a_proxy(direct.parse().unwrap()), "{direct}");
        }
        assert!(may_be_a_proxy("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn the_client_is_the_last_hop_of_the_last_forwarded_for_line() {
        let head = |lines: &[&str]| Head {
            method: "GET".into(),
            target: "/".into(),
            headers: lines.iter().map(|v| ("X-Forwarded-For".into(), (*v).into())).collect(),
            len: 0,
            minor_version: 1,
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // The client's own line first, the proxy's (HAProxy) after it.
        assert_eq!(Reactor::forwarded_for(&head(&["127.0.0.1", "203.0.113.9"])), ip("203.0.113.9"));
        assert_eq!(
            Reactor::forwarded_for(&head(&["10.0.0.1, 198.51.100.7:4711"])),
            ip("198.51.100.7")
        );
        assert_eq!(Reactor::forwarded_for(&head(&["[2001:db8::1]:443"])), ip("2001:db8::1"));
        assert_eq!(Reactor::forwarded_for(&head(&["garbage"])), None);
        assert_eq!(Reactor::forwarded_for(&head(&[])), None);
    }

    #[test]
    fn a_member_is_cut_out_leaving_valid_json() {
        let cases = [
            (r#"{"type":"x","client":"c","body":"b"}"#, r#"{"type":"x","body":"b"}"#),
            (r#"{"client":"c","type":"x"}"#, r#"{"type":"x"}"#),
            (r#"{"type":"x","client":"c"}"#, r#"{"type":"x"}"#),
            (r#"{ "client" : "c" , "type":"x"}"#, r#"{ "type":"x"}"#),
            (r#"{"type":"x" , "client":null}"#, r#"{"type":"x" }"#),
            (r#"{"client":"c"}"#, r#"{}"#),
            (r#"{"a":"\"client\":","client":"c","b":1}"#, r#"{"a":"\"client\":","b":1}"#),
        ];
        for (text, want) in cases {
            let got = cut(text).unwrap_or_else(|| panic!("not cut: {text}"));
            assert_eq!(got, want);
            let back: serde_json::Value = serde_json::from_str(&got).unwrap();
            assert!(back.get("client").is_none());
        }
        // A key written with an escape is left to the caller, which writes the frame anew.
        assert_eq!(cut(r#"{"type":"x","\u0063lient":"c"}"#), None);
        assert_eq!(cut(r#"{"type":"x"}"#), None);
    }

    /// What `without_stamp` leaves of `text` once `client` and `conn` are cut out.
    fn unstamped(text: &str) -> Option<String> {
        let raw = parse_raw(text).unwrap();
        let (before, after) = without_stamp(text, raw.get("client")?, raw.get("conn"))?;
        Some(format!("{before}{after}"))
    }

    #[test]
    fn the_stamp_is_cut_out_in_one_piece_where_bridges_write_it() {
        let cases = [
            (
                r#"{"type":"x","id":"a","client":"c","conn":7,"body":"b"}"#,
                r#"{"type":"x","id":"a","body":"b"}"#,
            ),
            (r#"{"type":"x","id":"a","client":"c","conn":7}"#, r#"{"type":"x","id":"a"}"#),
            (r#"{"client":"c","conn":7,"type":"x"}"#, r#"{"type":"x"}"#),
            (r#"{ "client":"c" , "conn" : 18446744073709551615 , "type":"x"}"#, r#"{ "type":"x"}"#),
            (r#"{"client":"c","conn":7}"#, r#"{}"#),
            // An older bridge: no `conn`.
            (r#"{"type":"x","client":"c","body":"b"}"#, r#"{"type":"x","body":"b"}"#),
            // Body text that looks like the stamp is left alone.
            (
                r#"{"type":"x","body":",\"conn\":7","client":"c","conn":7}"#,
                r#"{"type":"x","body":",\"conn\":7"}"#,
            ),
        ];
        for (text, want) in cases {
            let got = unstamped(text).unwrap_or_else(|| panic!("not cut: {text}"));
            assert_eq!(got, want);
            let back: serde_json::Value = serde_json::from_str(&got).unwrap();
            assert!(back.get("client").is_none() && back.get("conn").is_none(), "{got}");
        }
        // `conn` elsewhere, or escaped: the caller writes the frame anew.
        assert_eq!(unstamped(r#"{"type":"x","client":"c","id":"a","conn":7}"#), None);
        assert_eq!(unstamped(r#"{"conn":7,"client":"c","type":"x"}"#), None);
        assert_eq!(unstamped(r#"{"type":"x","client":"c","\u0063onn":7}"#), None);
    }

    #[test]
    fn the_stamp_prefix_is_exactly_its_length_and_reads_back() {
        for (client, number) in
            [("hcl_0123456789abcdef", 0), ("hcl_0123456789abcdef", 10), ("a\"b", u64::MAX)]
        {
            let rest = r#""type":"cancel","id":"r"}"#;
            let mut frame = client_prefix(client, number, rest.len());
            assert_eq!(frame.capacity(), frame.len() + rest.len(), "{frame}");
            frame.push_str(rest);
            let Frame::Cancel { client: c, conn, .. } = p::parse_frame(&frame).unwrap() else {
                panic!("{frame}")
            };
            assert_eq!((c.as_deref(), conn), (Some(client), Some(number)));
        }
    }
}
