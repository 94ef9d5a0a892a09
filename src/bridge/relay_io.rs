//! The relay I/O thread: owns the bridge's WebSocket to the relay.
//!
//! Blocking tungstenite cannot read and write from two threads, and a TLS stream cannot be
//! cloned, so the socket lives in a `Link` behind one mutex. The I/O thread is driven by
//! readiness: the socket is non-blocking and registered with a [`crate::poll::Poller`]; it reads
//! frames, hands requests to the pool and sends pings. A worker writes its response frames
//! straight into the socket under the same mutex (no hand-off back to the I/O thread); only
//! when the socket refuses bytes does it leave them queued and wake the I/O thread, which
//! then waits for writability. No read-timeout loop adds latency: the poller's timeout only
//! drives pings, the pong deadline and the head deadline of inline requests.
//!
//! Inline requests: a request with a small body is written without blocking on a keep-alive
//! backend connection, whose socket joins this thread's poller; a small whole response is
//! answered from here, anything streamed is handed to a worker with its head read. After the
//! exchange the connection stays registered ("parked") for the next request, so the common
//! case costs no registration and no liveness check.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::poll::{Event, Events, PollMode, Poller};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

use super::local_http::{self, Parked};
use super::workers::{Inline, Interest, Pool, Step};
use super::{FrameSink, Gone, LiveStatus, Outbox, log};
use crate::protocol::{self as p, Frame};
use crate::state::BridgeIdentity;
use crate::stream::Stream;
use crate::wsout::WsOut;
use crate::wsread::{Incoming, ReadError, WsReader, close_reply};

/// Poller key of the relay socket.
const SOCKET: usize = 1;

/// Poller keys of inline backend sockets start here: key − `INLINE_BASE` is the slot index.
const INLINE_BASE: usize = 2;

/// Deadline for TCP connect, TLS and the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnect delays: full jitter between zero and `min(cap, base · 2^attempt)`.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest reconnect delay (the relay's first sweep waits well past it).
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// A connection that lived this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// A WebSocket to the relay, plain or TLS.
pub type Ws = WebSocket<Stream>;

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The relay refused the bridge (401, 404, 409): a message for the user.
    Refused(u16, String),
    /// Network, TLS or protocol failure.
    Failed(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(status, msg) => {
                write!(f, "relay refused the bridge ({status}): {msg}")
            }
            ConnectError::Failed(msg) => f.write_str(msg),
        }
    }
}

/// Why a served connection ended.
enum Ended {
    Stopped,
    Lost(String),
    /// The relay closed it with 4001 for a newer connection of this bridge: another process
    /// with the same `bridge.json` (a copied state directory) serves it now.
    Replaced(String),
}

/// The relay connection role.
pub struct RelayIo {
    identity: BridgeIdentity,
    pool: Arc<Pool>,
    status: Arc<LiveStatus>,
    stop: Arc<AtomicBool>,
    poller: Arc<Poller>,
}

impl RelayIo {
    /// Prepares the role; [`RelayIo::run`] drives it.
    pub fn new(
        identity: BridgeIdentity,
        pool: Arc<Pool>,
        status: Arc<LiveStatus>,
        stop: Arc<AtomicBool>,
        poller: Arc<Poller>,
    ) -> RelayIo {
        RelayIo { identity, pool, status, stop, poller }
    }

    /// Connects, serves and reconnects until the stop flag is set.
    pub fn run(&self) {
        let mut attempt: u32 = 0;
        let mut failures = FailureLog::default();
        while !self.stop.load(Ordering::SeqCst) {
            match connect(&self.identity) {
                Ok((ws, already)) => {
                    let connected = Instant::now();
                    log(&format!(
                        "relay connected: {}{}",
                        self.identity.bridge_relay_url,
                        failures.recovered()
                    ));
                    self.status.update(|s| {
                        s.relay_connected = true;
                        s.relay_since = crate::relay::now_ms();
                        s.relay_error = None;
                    });
                    let ended = self.serve(ws, &already);
                    self.pool.cancel_all();
                    self.status.update(|s| {
                        s.relay_connected = false;
                        s.relay_since = crate::relay::now_ms();
                        s.apps_online.clear();
                    });
                    // A connection that lasted starts the backoff over (a 4001 below sets
                    // its own).
                    if connected.elapsed() >= STABLE_AFTER {
                        attempt = 0;
                    }
                    match ended {
                        Ended::Stopped => return,
                        Ended::Lost(why) => {
                            log(&format!("relay connection lost: {why}"));
                            self.status.update(|s| s.relay_error = Some(why));
                        }
                        Ended::Replaced(why) => {
                            let why = format!(
                                "{why}: another copy of this bridge (the same bridge.json, on \
                                 another machine or in another state directory) took the \
                                 relay connection; the two take it from each other. Run \
                                 hermeschat-pair --reset on one of them to give it its own"
                            );
                            log(&format!("relay connection lost: {why}"));
                            self.status.update(|s| s.relay_error = Some(why));
                            // Taking it back at once would only cut the other copy's apps off.
                            attempt = attempt.max(16);
                        }
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if let Some(line) = failures.failed(&msg, Instant::now()) {
                        log(&format!("cannot connect to the relay: {line}"));
                    }
                    self.status.update(|s| s.relay_error = Some(msg));
                    if let ConnectError::Refused(..) = e {
                        // Will not fix itself quickly (deleted bridge, another instance):
                        // retry at the cap, the user is told by --status.
                        attempt = attempt.max(16);
                    }
                }
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            self.wait(delay);
        }
    }

    /// Sleeps for `delay` unless stopped first (the signal handler notifies the poller).
    fn wait(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut events = Events::new();
        while !self.stop.load(Ordering::SeqCst) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            events.clear();
            let _ = self.poller.wait(&mut events, Some(left));
        }
    }

    /// Serves one connection, whose first bytes past the handshake are `already`, until it
    /// drops or the bridge stops.
    fn serve(&self, ws: Ws, already: &[u8]) -> Ended {
        let tcp = match tcp_of(&ws).try_clone() {
            Ok(t) => t,
            Err(e) => return Ended::Lost(format!("socket: {e}")),
        };
        if let Err(e) = tcp.set_nonblocking(true) {
            return Ended::Lost(format!("socket: {e}"));
        }
        // SAFETY: `tcp` is a clone of the socket's descriptor and is deleted from the poller
        // (end of this function) before it is dropped.
        if let Err(e) =
            unsafe { self.poller.add_with_mode(&tcp, Event::readable(SOCKET), PollMode::Level) }
        {
            return Ended::Lost(format!("poller: {e}"));
        }
        // Non-blocking and polled from here on: short reads may mark it drained.
        let mut ws = ws;
        ws.get_mut().arm(true);
        let reader =
            WsReader::new(Role::Client, p::Limits::default().max_frame_from_relay(), already);
        let link = Arc::new(Link {
            state: Mutex::new(LinkState {
                ws: Some(ws),
                out: WsOut::default(),
                broken: None,
                closed: false,
                waiting: 0,
            }),
            space: Condvar::new(),
            waker: self.poller.clone(),
        });
        let outbox = Outbox::with_sink(link.clone());
        let mut conn_state = ConnState {
            last_rx: Instant::now(),
            last_ping: Instant::now(),
            last_ping_with_sleep: clock_with_sleep(),
            reader,
        };
        let mut inlines = Inlines::default();
        let ended = self.serve_loop(&link, &mut conn_state, &outbox, &tcp, &mut inlines);
        let _ = self.poller.delete(&tcp);
        // Inline requests end with the link, silently: the relay answers the apps, and
        // `cancel_all` forgets them.
        for slot in inlines.take_all() {
            let _ = self.poller.delete(&*slot.socket);
        }
        // Workers still holding this outbox get `Gone`; the socket closes now, not when the
        // last of them lets go.
        let mut st = link.lock();
        st.closed = true;
        st.ws = None;
        st.out = WsOut::default();
        link.space.notify_all();
        ended
    }

    fn serve_loop(
        &self,
        link: &Link,
        t: &mut ConnState,
        outbox: &Outbox,
        tcp: &TcpStream,
        inlines: &mut Inlines,
    ) -> Ended {
        let ping_every = Duration::from_secs(p::RELAY_PING_INTERVAL_SECS);
        let pong_timeout = Duration::from_secs(p::BRIDGE_PONG_TIMEOUT_SECS);
        let mut events = Events::new();
        // Registered interest: (readable, writable).
        let mut interest = (true, false);
        // Read the relay socket only when it was reported readable: `read_frames` reads until
        // it would block, or stops early and says so (`held`), so nothing is left behind.
        let mut relay_ready = true;
        // Reading stopped early ([`FRAMES_PER_READ`], [`READ_PAUSE`]) and is to go on (once the
        // queue drains below the pause).
        let mut held = false;
        // Terminal frames of inline requests, sent with the next flush.
        let mut answers: Vec<String> = Vec::new();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return self.shut_down(link, tcp, inlines, answers);
            }
            let (wanted, tick) = {
                let mut st = link.lock();
                let LinkState { ws: Some(ws), out, .. } = &mut *st else {
                    return Ended::Lost("socket closed".into());
                };
                for text in answers.drain(..) {
                    out.push(Message::text(text));
                }
                if relay_ready {
                    ws.get_mut().mark_ready();
                    match self.read_frames(ws, out, t, outbox, inlines) {
                        Ok(paused) => held = paused,
                        Err(ended) => return ended,
                    }
                }
                let now = Instant::now();
                t.reader.release_kept(now);
                let tick = now.duration_since(t.last_ping) >= ping_every;
                if tick {
                    let with_sleep = clock_with_sleep();
                    let asleep = slept(
                        with_sleep
                            .zip(t.last_ping_with_sleep)
                            .map(|(now, then)| now.saturating_sub(then)),
                        now.duration_since(t.last_ping),
                    );
                    if asleep >= SLEEP_RECONNECT {
                        return Ended::Lost(format!(
                            "the machine slept about {} s; the relay has dropped this socket",
                            asleep.as_secs()
                        ));
                    }
                    t.last_ping = now;
                    t.last_ping_with_sleep = with_sleep;
                    out.push(Message::Ping(Default::default()));
                }
                if let Err(e) = link.flush(&mut st) {
                    return Ended::Lost(e);
                }
                ((st.out.bytes() < READ_PAUSE, st.out.blocked()), tick)
            };
            if tick {
                self.close_idle_parked(inlines);
            }
            if Instant::now().duration_since(t.last_rx) >= pong_timeout {
                return Ended::Lost(format!(
                    "no traffic or pong from the relay for {} s",
                    pong_timeout.as_secs()
                ));
            }
            if wanted != interest {
                interest = wanted;
                let ev = Event::new(SOCKET, interest.0, interest.1);
                let _ = self.poller.modify_with_mode(tcp, ev, PollMode::Level);
            }
            // Reading stopped early with frames maybe left in the reader's buffer, which no
            // readiness event announces; the queue is below the pause: read again at once.
            let resume = held && wanted.0;
            if resume {
                held = false;
            }
            let mut next = (t.last_ping + ping_every).min(t.last_rx + pong_timeout);
            if let Some(due) = t.reader.kept_due() {
                next = next.min(due);
            }
            if let Some(deadline) = self.expire_inlines(inlines, &mut answers) {
                next = next.min(deadline);
            }
            // Work is waiting (frames to read, answers to send): the wait only collects the
            // backend sockets that are ready, so a relay that never lets the reading pause
            // does not starve the inline requests.
            let timeout = if resume || !answers.is_empty() {
                Duration::ZERO
            } else {
                next.saturating_duration_since(Instant::now())
            };
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Ended::Lost(format!("poller: {e}"));
            }
            relay_ready = resume;
            for ev in events.iter() {
                match ev.key {
                    SOCKET => relay_ready |= ev.readable,
                    key if key >= INLINE_BASE => {
                        self.drive_inline(key - INLINE_BASE, inlines, &mut |text| {
                            answers.push(text)
                        });
                    }
                    _ => {}
                }
            }
        }
    }

    /// Runs the first step of a new inline request (it writes the request) and watches its
    /// connection: a parked one is registered already, a pooled one is added.
    fn begin_inline(&self, inline: Inline, inlines: &mut Inlines, push: &mut dyn FnMut(String)) {
        let slot = match inline.tag() {
            Some(slot) if inlines.holds(slot, inline.socket()) => slot,
            _ => {
                let socket = inline.socket().clone();
                let slot = inlines.insert(Slot {
                    socket: socket.clone(),
                    interest: Interest::Readable,
                    inline: None,
                });
                // SAFETY: the slot holds a handle to `socket`, so its descriptor stays open
                // until it is deleted from the poller, which every path that empties the
                // slot does first (`end_slot`, `serve`, `shut_down`).
                let added = unsafe {
                    self.poller.add_with_mode(
                        &*socket,
                        Event::readable(INLINE_BASE + slot),
                        PollMode::Level,
                    )
                };
                if let Err(e) = added {
                    log(&format!("cannot watch a backend socket: {e}"));
                    inlines.remove(slot);
                    self.pool.end_inline(inline, p::ErrorCode::Busy, push);
                    return;
                }
                slot
            }
        };
        let step = self.pool.advance(inline, push);
        self.after_step(slot, step, inlines);
    }

    /// The connection in `slot` was reported ready: the request on it moves on; a parked
    /// connection that turns readable was closed by the backend (or sent stray bytes) and is
    /// dropped.
    fn drive_inline(&self, slot: usize, inlines: &mut Inlines, push: &mut dyn FnMut(String)) {
        let Some(inline) = inlines.take_inline(slot) else {
            if inlines.slots.get(slot).is_some_and(Option::is_some) {
                inlines.parking.retain(|parked| parked.tag != slot);
                self.end_slot(slot, inlines);
            }
            return;
        };
        let step = self.pool.advance(inline, push);
        self.after_step(slot, step, inlines);
    }

    /// Files the outcome of a step: the request waits again, its connection is parked for the
    /// next request, or the slot ends.
    fn after_step(&self, slot: usize, step: Step, inlines: &mut Inlines) {
        let (inline, interest) = match step {
            Step::Wait(inline, interest) => (Some(inline), interest),
            Step::Done(Some(mut parked))
                if inlines.holds(slot, parked.socket())
                    && inlines.parking.len() < local_http::MAX_IDLE =>
            {
                parked.tag = slot;
                parked.epoch = inlines.epoch;
                inlines.parking.push(parked);
                (None, Interest::Readable)
            }
            Step::Done(parked) => {
                self.end_slot(slot, inlines);
                if let Some(parked) = parked {
                    // Enough are parked here: the workers may use it.
                    self.pool.unpark(parked);
                }
                return;
            }
        };
        let Some(Some(s)) = inlines.slots.get_mut(slot) else { return };
        if s.interest != interest {
            s.interest = interest;
            // One direction at a time: a backend that answers early and stops reading must
            // not keep a half-written request's socket reported readable (a busy loop).
            // Hang-ups are reported either way.
            let ev = Event::new(
                INLINE_BASE + slot,
                interest == Interest::Readable,
                interest == Interest::Writable,
            );
            let _ = self.poller.modify_with_mode(&*s.socket, ev, PollMode::Level);
        }
        if let Some(inline) = inline {
            s.inline = Some(inline);
            inlines.busy += 1;
        }
    }

    /// Stops watching the connection in `slot` and frees the slot.
    fn end_slot(&self, slot: usize, inlines: &mut Inlines) {
        if let Some(s) = inlines.remove(slot) {
            let _ = self.poller.delete(&*s.socket);
        }
    }

    /// Closes the parked connections no request has used since the previous ping tick (idle
    /// for one to two ping intervals, 20–40 s): an idle daemon holds no backend connections,
    /// and a backend that never closes its idle ones does not keep up to [`MAX_IDLE`] of ours.
    ///
    /// [`MAX_IDLE`]: local_http::MAX_IDLE
    fn close_idle_parked(&self, inlines: &mut Inlines) {
        let epoch = inlines.epoch;
        inlines.epoch = epoch.wrapping_add(1);
        if inlines.parking.iter().all(|p| p.epoch == epoch) {
            return;
        }
        let stale: Vec<usize> =
            inlines.parking.iter().filter(|p| p.epoch != epoch).map(|p| p.tag).collect();
        inlines.parking.retain(|p| p.epoch == epoch);
        for slot in stale {
            self.end_slot(slot, inlines);
        }
    }

    /// Ends inline requests whose deadline passed; returns the earliest deadline left.
    fn expire_inlines(&self, inlines: &mut Inlines, answers: &mut Vec<String>) -> Option<Instant> {
        if inlines.busy == 0 {
            return None;
        }
        let now = Instant::now();
        let mut earliest: Option<Instant> = None;
        for slot in 0..inlines.slots.len() {
            let deadline = inlines.slots[slot]
                .as_ref()
                .and_then(|s| s.inline.as_ref())
                .and_then(Inline::deadline);
            let Some(deadline) = deadline else { continue };
            if deadline > now {
                earliest = Some(earliest.map_or(deadline, |e| e.min(deadline)));
            } else if let Some(inline) = inlines.take_inline(slot) {
                self.end_slot(slot, inlines);
                self.pool.expire(inline, &mut |text| answers.push(text));
            }
        }
        earliest
    }

    /// Reads the frames available now, up to [`FRAMES_PER_READ`], and dispatches them.
    /// `Ok(true)` when it stopped early (at that count, or at [`READ_PAUSE`]) with frames maybe
    /// still in the reader's buffer.
    fn read_frames(
        &self,
        ws: &mut Ws,
        out: &mut WsOut,
        t: &mut ConnState,
        outbox: &Outbox,
        inlines: &mut Inlines,
    ) -> Result<bool, Ended> {
        for _ in 0..FRAMES_PER_READ {
            // Answers the relay does not take (a relay that sends without reading) stop the
            // reading here, so TCP pushes back on it instead of the queue growing for ever.
            if out.bytes() >= READ_PAUSE {
                return Ok(true);
            }
            match t.reader.read(ws.get_mut()) {
                Ok(msg) => {
                    t.last_rx = Instant::now();
                    match msg {
                        Incoming::Text(text) => self.dispatch(out, outbox, inlines, &text),
                        Incoming::Ping(payload) => out.push_pong(payload),
                        Incoming::Close(frame) => {
                            let why = frame.as_ref().map_or("closed".to_owned(), |f| {
                                format!("closed {} {}", u16::from(f.code), f.reason)
                            });
                            // Answered before leaving, as far as the socket takes it now.
                            let _ = ws.close(close_reply(&frame));
                            let _ = ws.flush();
                            let replaced = frame.as_ref().is_some_and(|f| {
                                u16::from(f.code) == p::close_code::REPLACED_BRIDGE
                            });
                            return Err(if replaced {
                                Ended::Replaced(why)
                            } else {
                                Ended::Lost(why)
                            });
                        }
                        Incoming::Binary(_) | Incoming::Pong(_) => {}
                    }
                }
                Err(ReadError::WouldBlock) => return Ok(false),
                Err(e) => return Err(Ended::Lost(e.to_string())),
            }
        }
        Ok(true)
    }

    fn dispatch(&self, out: &mut WsOut, outbox: &Outbox, inlines: &mut Inlines, text: &Utf8Bytes) {
        let frame = match p::parse_message(text) {
            Ok(f) => f,
            Err(msg) => {
                log(&format!("ignoring a frame from the relay: {}", p::shown(&msg)));
                if msg.starts_with(p::UNKNOWN_FRAME_TYPE)
                    && let Some((answer, client, id)) = unknown_request_answer(text)
                    && !self.pool.is_open(Some(&client), &id)
                {
                    out.push(Message::text(answer));
                }
                return;
            }
        };
        // The relay stamps a valid clientId on every frame about an app. One without could
        // not be answered anywhere, and a hostile relay could make each answer (which repeats
        // it) or status.json as large as it likes.
        let about_an_app = match &frame {
            Frame::Request(r) | Frame::RequestStart(r) => Some(r.client.as_deref()),
            Frame::RequestChunk { client, .. } | Frame::Cancel { client, .. } => {
                Some(client.as_deref())
            }
            Frame::ClientConnected { client, .. } | Frame::ClientDisconnected { client } => {
                Some(Some(client.as_str()))
            }
            _ => None,
        };
        if let Some(client) = about_an_app
            && !client.is_some_and(p::is_client_id)
        {
            log(&format!(
                "ignoring a {} frame from the relay: its client {} is not a clientId",
                frame.kind(),
                p::shown(client.unwrap_or("(none)"))
            ));
            return;
        }
        match frame {
            Frame::Request(req) => {
                // Inline answers are queued without waiting for room (this thread makes the
                // room), so while the socket is backed up new requests go to workers, which
                // wait for it.
                let parking = (out.bytes() < OUT_LIMIT).then_some(&mut inlines.parking);
                match self.pool.submit_inline(req, outbox.clone(), parking) {
                    Err(refused) => out.push(Message::text(refused)),
                    Ok(None) => {}
                    Ok(Some(inline)) => {
                        self.begin_inline(inline, inlines, &mut |text| {
                            out.push(Message::text(text))
                        });
                    }
                }
            }
            Frame::RequestStart(req) => {
                if let Err(refused) = self.pool.submit_upload(req, outbox.clone()) {
                    out.push(Message::text(refused));
                }
            }
            Frame::RequestChunk { id, client, body, body_base64, .. } => {
                self.pool.upload_chunk(client.as_deref(), &id, body, body_base64);
            }
            Frame::Cancel { id, client, .. } => self.pool.cancel(client.as_deref(), &id),
            Frame::ClientConnected { client, device_name } => {
                log(&format!("app connected: {client} ({})", p::shown(&device_name)));
                self.status.update_soon(|s| {
                    if s.apps_online.len() < MAX_APPS_SHOWN {
                        s.apps_online.insert(client);
                    }
                });
            }
            Frame::ClientDisconnected { client } => {
                self.pool.cancel_client(&client);
                log(&format!("app disconnected: {client}"));
                self.status.update_soon(|s| {
                    s.apps_online.remove(&client);
                });
            }
            Frame::Error { code, message } => {
                log(&format!("relay says {}: {}", code.as_str(), p::shown(&message)));
            }
            other => log(&format!("ignoring an unexpected {} frame from the relay", other.kind())),
        }
    }

    /// Answers open requests `SHUTTING_DOWN`, sends them, closes 1001. The pool hands out its
    /// answers on another thread (writing them through the link) while this one keeps
    /// flushing, so any number of open requests gets its answer within the grace period.
    fn shut_down(
        &self,
        link: &Link,
        tcp: &TcpStream,
        inlines: &mut Inlines,
        mut answers: Vec<String>,
    ) -> Ended {
        let _ = self.poller.delete(tcp);
        // Inline requests are this thread's to answer; `answers` holds those that ended just
        // before the stop and are not sent yet.
        for slot in inlines.take_all() {
            let _ = self.poller.delete(&*slot.socket);
            if let Some(inline) = slot.inline {
                self.pool.end_inline(inline, p::ErrorCode::ShuttingDown, &mut |t| answers.push(t));
            }
        }
        {
            let mut st = link.lock();
            for text in answers {
                st.out.push(Message::text(text));
            }
        }
        // Blocking with a deadline from here on: the last frames and the close must go out.
        let _ = tcp.set_nonblocking(false);
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(2)));
        if let Some(ws) = link.lock().ws.as_mut() {
            ws.get_mut().arm(false);
        }
        let done = Arc::new(AtomicBool::new(false));
        let answering = {
            let (pool, done, waker) = (self.pool.clone(), done.clone(), self.poller.clone());
            std::thread::spawn(move || {
                pool.shutdown(p::ErrorCode::ShuttingDown);
                done.store(true, Ordering::SeqCst);
                let _ = waker.notify();
            })
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut events = Events::new();
        while Instant::now() < deadline {
            if link.flush(&mut link.lock()).is_err() {
                break;
            }
            if done.load(Ordering::SeqCst) {
                let _ = link.flush(&mut link.lock());
                break;
            }
            events.clear();
            let _ = self.poller.wait(&mut events, Some(Duration::from_millis(50)));
        }
        let _ = answering.join();
        let mut st = link.lock();
        if let Some(ws) = st.ws.as_mut() {
            let close = CloseFrame { code: CloseCode::Away, reason: "bridge shutting down".into() };
            let _ = ws.close(Some(close));
            let _ = ws.flush();
        }
        Ended::Stopped
    }
}

/// One backend connection the I/O thread watches: running an inline request, or parked.
struct Slot {
    /// The socket; holding it keeps the descriptor open until it leaves the poller.
    socket: Arc<TcpStream>,
    /// The readiness registered for it now.
    interest: Interest,
    /// The request running on it; `None` while the connection is parked (in
    /// [`Inlines::parking`], tagged with this slot).
    inline: Option<Inline>,
}

/// The backend connections the I/O thread watches, in reusable slots (the poller key is
/// [`INLINE_BASE`] + slot). A connection keeps its slot, and its registration, from one
/// request to the next.
#[derive(Default)]
struct Inlines {
    /// The slots.
    slots: Vec<Option<Slot>>,
    /// Empty slots.
    free: Vec<usize>,
    /// Slots running a request.
    busy: usize,
    /// Parked connections, tagged with their slot and the ping tick they were parked in; the
    /// last one parked is used first.
    parking: Vec<Parked>,
    /// Ping ticks so far ([`RelayIo::close_idle_parked`]).
    epoch: u32,
}

impl Inlines {
    /// Stores a connection in a free slot; returns the slot.
    fn insert(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// True when `slot` watches `socket`.
    fn holds(&self, slot: usize, socket: &Arc<TcpStream>) -> bool {
        matches!(self.slots.get(slot), Some(Some(s)) if Arc::ptr_eq(&s.socket, socket))
    }

    /// Takes the request out of `slot` (the slot stays, as if parked).
    fn take_inline(&mut self, slot: usize) -> Option<Inline> {
        let inline = self.slots.get_mut(slot)?.as_mut()?.inline.take()?;
        self.busy -= 1;
        Some(inline)
    }

    /// Empties `slot` and frees it.
    fn remove(&mut self, slot: usize) -> Option<Slot> {
        let taken = self.slots.get_mut(slot)?.take()?;
        if taken.inline.is_some() {
            self.busy -= 1;
        }
        self.free.push(slot);
        Some(taken)
    }

    /// Empties every slot; parked connections are closed.
    fn take_all(&mut self) -> Vec<Slot> {
        self.free.clear();
        self.busy = 0;
        self.parking.clear();
        std::mem::take(&mut self.slots).into_iter().flatten().collect()
    }
}

/// Queued outbound bytes past which workers wait for the socket (back-pressure).
const OUT_LIMIT: usize = 4 << 20;

/// Bytes waiting for the relay socket past which it is not read any more until they drain:
/// well above what the workers can queue (they wait at [`OUT_LIMIT`], one frame each past it),
/// so only answers to a relay that sends without reading reach it.
const READ_PAUSE: usize = 32 << 20;

/// Frames read from the relay per turn of the I/O loop, which then flushes what is queued (its
/// pongs and pings among it) and drives the backend sockets before it reads on: a relay that
/// sends without pause (app presence frames from an app that reconnects in a loop) never keeps
/// the bridge from answering, or from proving it is alive.
const FRAMES_PER_READ: usize = 64;

/// Apps listed online in `status.json` at most (the relay tells; a bridge has a handful).
const MAX_APPS_SHOWN: usize = 1024;

/// The I/O thread's own state of one connection: its ping and pong-deadline clocks, and its
/// reader.
struct ConnState {
    last_rx: Instant,
    last_ping: Instant,
    /// [`clock_with_sleep`] at `last_ping`: how a sleep of the machine is noticed (below).
    last_ping_with_sleep: Option<Duration>,
    reader: WsReader,
}

/// A sleep of the machine this long ends the relay connection at the next ping tick: the relay
/// drops a socket after 60 s without traffic, and the last ping may have left 20 s before the
/// sleep. Without this a dead socket would be noticed only when the pong deadline (45 s of
/// waking time, as `Instant` stops during sleep) passes, with `--status` saying connected.
const SLEEP_RECONNECT: Duration = Duration::from_secs(30);

/// How long the machine was suspended between two readings of both clocks: time
/// [`clock_with_sleep`] counted while monotonic time (`Instant`, stopped during sleep on Linux
/// and macOS) did not. Unknown (`None`) reads as no sleep.
fn slept(with_sleep_elapsed: Option<Duration>, mono_elapsed: Duration) -> Duration {
    with_sleep_elapsed.unwrap_or_default().saturating_sub(mono_elapsed)
}

/// A clock that runs on while the machine sleeps and that nobody sets (Linux `CLOCK_BOOTTIME`,
/// macOS `CLOCK_MONOTONIC`), as time since an arbitrary start; `None` where there is none.
/// Not the wall clock: one set forward (an NTP step, a Raspberry Pi without a hardware clock
/// finding the time after boot) would read as a sleep, and a working connection be dropped.
fn clock_with_sleep() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    let id = libc::CLOCK_BOOTTIME;
    #[cfg(target_os = "macos")]
    let id = libc::CLOCK_MONOTONIC;
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    return None;
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        // SAFETY: timespec is plain integers (and, on some 32-bit targets, private padding, so
        // it is zeroed rather than built), for which all zeroes is valid.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: clock_gettime writes only the timespec it is given, which outlives the call.
        let ok = unsafe { libc::clock_gettime(id, &mut ts) } == 0;
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nanos = u32::try_from(ts.tv_nsec).ok()?;
        ok.then(|| Duration::new(secs, nanos))
    }
}

/// One live relay connection, shared by the I/O thread and the workers that answer its
/// requests. A worker writes its frame straight to the socket (write-through) unless the
/// socket is backed up, so a response costs no hand-off to the I/O thread; the I/O thread
/// reads, pings, and takes over writing only while the socket refuses bytes.
struct Link {
    state: Mutex<LinkState>,
    /// Signalled when queued bytes drop under [`OUT_LIMIT`] or the link closes.
    space: Condvar,
    /// Wakes the I/O thread: the socket backed up (watch writability) or broke.
    waker: Arc<Poller>,
}

struct LinkState {
    /// `None` once the connection ended.
    ws: Option<Ws>,
    /// Frames not yet taken by the socket.
    out: WsOut,
    /// Set by whichever thread's write found the socket broken; the I/O thread ends the link.
    broken: Option<String>,
    /// No more frames are accepted.
    closed: bool,
    /// Workers waiting on `space`.
    waiting: usize,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes queued frames until the socket would block, then lets waiting workers in.
    fn flush(&self, st: &mut LinkState) -> Result<(), String> {
        if let Some(why) = &st.broken {
            return Err(why.clone());
        }
        let Some(ws) = st.ws.as_mut() else { return Err("socket closed".into()) };
        if let Err(b) = st.out.flush(ws) {
            st.broken = Some(b.0.clone());
            // Workers waiting for room must learn now that there will be none.
            self.space.notify_all();
            return Err(b.0);
        }
        if st.waiting > 0 && st.out.bytes() < OUT_LIMIT {
            self.space.notify_all();
        }
        Ok(())
    }
}

impl FrameSink for Link {
    fn send(&self, text: String) -> Result<(), Gone> {
        let mut st = self.lock();
        while !st.closed && st.broken.is_none() && st.out.bytes() >= OUT_LIMIT {
            st.waiting += 1;
            st = self.space.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiting -= 1;
        }
        if st.closed || st.broken.is_some() {
            return Err(Gone);
        }
        if text.len() >= p::LARGE_FRAME {
            st.out.push_masked_text(text, true);
        } else {
            st.out.push(Message::text(text));
        }
        // While the socket is backed up the I/O thread watches writability and flushes.
        if !st.out.blocked() {
            let failed = self.flush(&mut st).is_err();
            if failed || st.out.blocked() {
                let _ = self.waker.notify();
            }
        }
        Ok(())
    }

    fn spare_buffer(&self) -> Option<String> {
        // An emptied Vec is valid UTF-8.
        self.lock().out.take_spare().and_then(|v| String::from_utf8(v).ok())
    }
}

/// The TCP socket under a relay WebSocket.
pub fn tcp_of(ws: &Ws) -> &TcpStream {
    ws.get_ref().tcp()
}

/// "1 failed attempt", "2 failed attempts" (`kind` "failed ").
fn attempts(n: u64, kind: &str) -> String {
    format!("{n} {kind}attempt{}", if n == 1 { "" } else { "s" })
}

/// How often a failure to connect that repeats itself is told again in the log.
const RETELL_FAILURE_EVERY: Duration = Duration::from_secs(3600);

/// The log's account of failed connection attempts. A relay down for days is retried every
/// 15 s on average, and one line per attempt (about 0.7 MB a day) would rotate everything
/// before the outage out of `bridge.log`. So a failure is logged when it first happens or
/// changes, and then, while it repeats, once an hour with the number of repeats; the
/// connection that ends the spell says how many went untold.
#[derive(Default)]
struct FailureLog {
    /// The last failure logged.
    last: Option<String>,
    /// Repeats of it not yet told.
    untold: u64,
    /// When it was last told.
    told: Option<Instant>,
}

impl FailureLog {
    /// The line to log for the failure `msg` at `now`, if any.
    fn failed(&mut self, msg: &str, now: Instant) -> Option<String> {
        let due =
            self.told.is_none_or(|t| now.saturating_duration_since(t) >= RETELL_FAILURE_EVERY);
        if self.last.as_deref() == Some(msg) && !due {
            self.untold += 1;
            return None;
        }
        let line = match (self.last.as_deref() == Some(msg), self.untold) {
            (true, n) => {
                format!("{msg} ({} since it was last logged)", attempts(n + 1, "failed "))
            }
            (false, 0) => msg.to_owned(),
            (false, n) => format!(
                "{msg} (the failure before it: {} not logged one by one)",
                attempts(n, "more failed ")
            ),
        };
        self.last = Some(msg.to_owned());
        self.untold = 0;
        self.told = Some(now);
        Some(line)
    }

    /// What the connection that ends a spell of failures adds to its log line: the repeats
    /// not yet told. Starts the account over.
    fn recovered(&mut self) -> String {
        let untold = self.untold;
        *self = FailureLog::default();
        if untold == 0 {
            String::new()
        } else {
            format!(" (after {} not logged one by one)", attempts(untold, "more failed "))
        }
    }
}

/// A full-jitter delay for the given attempt.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_CAP);
    let r = u64::from_le_bytes(crate::secret::random_bytes::<8>());
    let ms = (ceiling.as_millis() as u64).max(1);
    Duration::from_millis((r % ms).max(100))
}

/// Opens the bridge socket (see [`open_socket`]) with the relaySecret and instance id, then
/// clears the handshake timeouts: the I/O loop runs the socket non-blocking.
pub fn connect(identity: &BridgeIdentity) -> Result<(Ws, Vec<u8>), ConnectError> {
    let url = format!("{}?bridgeId={}", identity.bridge_relay_url, identity.bridge_id);
    let headers = [(p::INSTANCE_HEADER, identity.instance_id.as_str())];
    let (ws, already) = open_socket(&url, &identity.relay_secret, &headers, CONNECT_TIMEOUT)
        .map_err(|e| match e {
            // The bridge is known (an unknown one is 404), its secret refused: the same cause
            // and way out as the registry's 401 (`--doctor`, `--devices`).
            ConnectError::Refused(401, message) => ConnectError::Refused(
                401,
                format!("{message}; {}", crate::cli::secret_refused(&identity.bridge_id)),
            ),
            e => e,
        })?;
    let tcp = tcp_of(&ws);
    let _ = tcp.set_read_timeout(None);
    let _ = tcp.set_write_timeout(None);
    Ok((ws, already))
}

/// Opens a WebSocket to the relay as the bridge or an app does: TCP with `TCP_NODELAY`, the
/// TLS handshake done here (so a stalled handshake is a clean timeout, not a tungstenite
/// panic), then the WebSocket handshake with `bearer` in the `Authorization` header — never in
/// the URL. The socket keeps `timeout` as its read and write timeouts.
///
/// Also returns the bytes read past the handshake's response: the first frames, if the relay
/// sent any at once. tungstenite holds them too, for a caller that reads with it; a
/// [`WsReader`] starts with them.
pub fn open_socket(
    url: &str,
    bearer: &str,
    headers: &[(&'static str, &str)],
    timeout: Duration,
) -> Result<(Ws, Vec<u8>), ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::Failed(format!("bad relay URL {url}: {e}")))?;
    let uri = request.uri().clone();
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let tls = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let malformed = |what: &str| ConnectError::Failed(format!("the {what} is malformed"));
    let auth =
        HeaderValue::from_str(&format!("Bearer {bearer}")).map_err(|_| malformed("secret"))?;
    request.headers_mut().insert("Authorization", auth);
    for (name, value) in headers {
        let value = HeaderValue::from_str(value).map_err(|_| malformed(name))?;
        request.headers_mut().insert(*name, value);
    }

    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ConnectError::Failed(format!("{what} {host}:{port}: {e}"))
    };
    // An HTTP proxy from the environment (`https_proxy`, `NO_PROXY`, …: see `netproxy`), as
    // the registry calls use: the relay is then reached through a CONNECT tunnel.
    let scheme = if tls { "wss" } else { "ws" };
    let proxy = crate::netproxy::for_target(scheme, &host).map_err(ConnectError::Failed)?;
    let tcp = match &proxy {
        Some(proxy) => {
            let mut tcp = crate::tcp_connect::connect(&proxy.host, proxy.port, timeout)
                .map_err(|e| ConnectError::Failed(format!("{e} (the proxy from {})", proxy.var)))?;
            tcp.set_read_timeout(Some(timeout)).map_err(|e| failed("socket", &e))?;
            tcp.set_write_timeout(Some(timeout)).map_err(|e| failed("socket", &e))?;
            proxy.tunnel(&mut tcp, &host, port, timeout).map_err(ConnectError::Failed)?;
            tcp
        }
        None => crate::tcp_connect::connect(&host, port, timeout).map_err(ConnectError::Failed)?,
    };
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(timeout)).map_err(|e| failed("socket", &e))?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| failed("socket", &e))?;
    let mut stream = if tls {
        let connector = native_tls::TlsConnector::new().map_err(|e| failed("TLS setup for", &e))?;
        match connector.connect(&host, crate::stream::TlsSocket(tcp)) {
            Ok(s) => Stream::tls(s),
            Err(native_tls::HandshakeError::WouldBlock(_)) => {
                return Err(failed("TLS handshake timed out with", &"no answer"));
            }
            Err(native_tls::HandshakeError::Failure(e)) => {
                let why = crate::registry_client::with_trust_hint(e.to_string());
                return Err(failed("TLS handshake failed with", &why));
            }
        }
    } else {
        Stream::plain(tcp)
    };
    // For a caller that reads with tungstenite (`doctor`): it zero-fills up to
    // `read_buffer_size` bytes before every read, 128 KiB by default.
    let config = WebSocketConfig::default()
        .max_message_size(Some(p::Limits::default().max_frame_from_relay()))
        .read_buffer_size(16 << 10)
        .write_buffer_size(64 << 10);
    stream.keep_after_head();
    match tungstenite::client::client_with_config(request, stream, Some(config)) {
        Ok((mut ws, _response)) => {
            let already = ws.get_mut().end_head_scan();
            Ok((ws, already))
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let api = serde_json::from_str::<p::ApiError>(&body).ok();
            // A proxy's page (the relay behind it is stopped or restarting), or the relay's own
            // 503 while it shuts down or is overloaded: retried at the usual pace, like a
            // refused connection, never at the cap a refusal of this bridge gets.
            if status >= 500 {
                let why = match &api {
                    Some(e) => format!("the relay answered {status}: {}", e.error.message),
                    None => crate::registry_client::proxy_page(status)
                        .unwrap_or_else(|| format!("the relay answered HTTP {status}")),
                };
                return Err(ConnectError::Failed(why));
            }
            let (code, message) = api
                .map(|e| (e.error.code, e.error.message))
                .unwrap_or_else(|| (String::new(), format!("HTTP {status}")));
            // The next step, for --status and the log.
            let message = match code.as_str() {
                "BRIDGE_NOT_FOUND" => "the relay no longer knows this bridge; run \
                                       hermeschat-pair to register anew (phones then scan its \
                                       new QR)"
                    .to_owned(),
                // The upgrade headers were lost on the way: a proxy that does not pass them on.
                "UPGRADE_REQUIRED" => format!(
                    "{message}: the proxy in front of the relay does not pass the WebSocket \
                     upgrade on (nginx needs proxy_http_version 1.1, proxy_set_header Upgrade \
                     $http_upgrade and proxy_set_header Connection \"upgrade\"; see the README)"
                ),
                "BRIDGE_OWNED" => {
                    format!("{message}; hermeschat-pair --reset gives this machine its own bridge")
                }
                _ => message,
            };
            Err(ConnectError::Refused(status, message))
        }
        Err(tungstenite::HandshakeError::Failure(e)) => {
            Err(failed("WebSocket handshake failed with", &e))
        }
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            Err(failed("WebSocket handshake timed out with", &"no answer"))
        }
    }
}

/// The `response.error` that answers a frame of a type this bridge does not know (one a newer
/// app and relay use, e.g. `request.start` before streamed uploads) when it is about a
/// request: it names an app (`client`) and a request `id`, returned with the answer. Sent
/// when that request is not open here (a frame about an open one is only logged, its request
/// going on), the app gets a terminal frame instead of waiting for ever, and learns why.
/// `None` for anything else (it is only logged).
fn unknown_request_answer(text: &str) -> Option<(String, String, String)> {
    let raw = p::parse_raw(text).ok()?;
    let kind = p::raw_str(&raw, "type").ok()??;
    let id = p::raw_str(&raw, "id").ok()??;
    let client = p::raw_str(&raw, "client").ok()??;
    if !p::is_request_id(&id) || !p::is_client_id(&client) {
        return None;
    }
    let mut answer = Frame::error(
        &id,
        Some(&client),
        p::ErrorCode::BadRequest,
        format!(
            "this bridge does not know {:?} frames: update hermeschat-pair on the machine \
             that runs Hermes",
            p::shown(&kind)
        ),
    );
    if let Frame::ResponseError { conn, .. } = &mut answer {
        *conn = p::raw_conn(&raw).ok()?;
    }
    Some((answer.to_json(), client.into_owned(), id.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::local_http::test_origin;
    use crate::bridge::workers::Target;

    #[test]
    fn a_sleep_is_time_the_boot_clock_counted_and_monotonic_time_did_not() {
        let s = Duration::from_secs;
        // Awake: both clocks agree (give or take).
        assert_eq!(slept(Some(s(20)), s(20)), Duration::ZERO);
        // Asleep for two minutes between two ticks 20 s of waking time apart.
        let asleep = slept(Some(s(140)), s(20));
        assert_eq!(asleep, s(120));
        assert!(asleep >= SLEEP_RECONNECT);
        // A short nap keeps the connection; an unreadable clock is no sleep.
        assert!(slept(Some(s(40)), s(20)) < SLEEP_RECONNECT);
        assert_eq!(slept(None, s(20)), Duration::ZERO);
    }

    #[test]
    fn the_clock_with_sleep_runs_with_monotonic_time_while_awake() {
        let (before, mono) = (clock_with_sleep(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let elapsed = clock_with_sleep().zip(before).map(|(now, then)| now - then);
        let asleep = slept(elapsed, mono.elapsed());
        assert!(elapsed.is_some_and(|e| e >= Duration::from_millis(50)), "{elapsed:?}");
        assert!(asleep < Duration::from_secs(1), "{asleep:?} read as a sleep");
    }
    use crate::protocol::{Headers, Limits, RequestFrame};
    use std::sync::atomic::Ordering;

    /// A relay I/O role with a real pool in front of `port`, never connected to a relay.
    fn relay_io(port: u16, dir: &std::path::Path) -> RelayIo {
        let identity = BridgeIdentity {
            v: 1,
            bridge_id: "0".repeat(24),
            relay_secret: "hrs_test".into(),
            bridge_relay_url: "ws://127.0.0.1:9/ws/bridge".into(),
            app_relay_url: "ws://127.0.0.1:9/ws/app".into(),
            instance_id: "test".into(),
            registry_url: "http://127.0.0.1:9".into(),
            display_name: "test".into(),
            created_at: 0,
        };
        let pool = Arc::new(Pool::new(Target::new("127.0.0.1", port), 2, Limits::default()));
        let status = Arc::new(LiveStatus::new(Default::default(), dir.join("status.json")));
        let poller = Arc::new(Poller::new().unwrap());
        RelayIo::new(identity, pool, status, Arc::default(), poller)
    }

    /// Runs `GET /api/health` inline to its answer; its connection is left parked.
    fn health_inline(io: &RelayIo, inlines: &mut Inlines, id: &str) {
        let req = RequestFrame {
            id: id.into(),
            client: Some("app".into()),
            conn: None,
            method: "GET".into(),
            path: "/api/health".into(),
            headers: Headers::new(),
            body: None,
            body_base64: false,
            length: None,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(8);
        let out = Outbox::new(tx, io.poller.clone());
        // A request runs inline only on a keep-alive connection at hand: the first goes to a
        // worker, which pools its connection before it answers.
        let mut tries = 0;
        let inline = loop {
            let mut req = req.clone();
            req.id = format!("{id}{tries}");
            match io.pool.submit_inline(req, out.clone(), Some(&mut inlines.parking)) {
                Ok(Some(inline)) => break inline,
                Ok(None) => {
                    rx.recv_timeout(Duration::from_secs(10)).expect("a worker's answer");
                    tries += 1;
                    assert!(tries < 50, "never ran inline");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("refused: {e}"),
            }
        };
        let mut answers = Vec::new();
        io.begin_inline(inline, inlines, &mut |t| answers.push(t));
        let mut events = Events::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while answers.is_empty() {
            assert!(Instant::now() < deadline, "no answer to {id}");
            events.clear();
            io.poller.wait(&mut events, Some(Duration::from_millis(100))).unwrap();
            for ev in events.iter().filter(|ev| ev.key >= INLINE_BASE) {
                io.drive_inline(ev.key - INLINE_BASE, inlines, &mut |t| answers.push(t));
            }
        }
        assert!(answers[0].contains(r#""status":200"#), "{answers:?}");
    }

    #[test]
    fn parked_connections_unused_for_a_ping_interval_are_closed() {
        let o = test_origin::start();
        let dir = std::env::temp_dir().join(format!("hc-relay-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let io = relay_io(o.port, &dir);
        let mut inlines = Inlines::default();
        health_inline(&io, &mut inlines, "a");
        let accepted = o.accepted.load(Ordering::SeqCst);
        health_inline(&io, &mut inlines, "b");
        // Both ran on one connection, which stays parked.
        assert_eq!((inlines.parking.len(), o.accepted.load(Ordering::SeqCst)), (1, accepted));
        // A tick right after it was used keeps it...
        io.close_idle_parked(&mut inlines);
        assert_eq!(inlines.parking.len(), 1);
        // ...and so does a tick after a request used it again.
        health_inline(&io, &mut inlines, "c");
        io.close_idle_parked(&mut inlines);
        assert_eq!((inlines.parking.len(), o.accepted.load(Ordering::SeqCst)), (1, accepted));
        let socket = inlines.parking[0].socket().clone();
        // A whole tick interval without a request closes it and frees its slot: nothing else
        // holds the socket.
        io.close_idle_parked(&mut inlines);
        assert!(inlines.parking.is_empty());
        assert!(inlines.slots.iter().all(Option::is_none));
        assert_eq!(Arc::strong_count(&socket), 1);
        // The next request cannot reuse it: it opens a fresh connection.
        health_inline(&io, &mut inlines, "d");
        assert!(o.accepted.load(Ordering::SeqCst) > accepted);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_repeated_failure_is_logged_once_an_hour_and_the_reconnect_counts_the_rest() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let refused = "connection refused (os error 111)";
        assert_eq!(log.failed(refused, at(0)).as_deref(), Some(refused));
        // A day of retries every 15 s: one line an hour, not 240.
        let told: Vec<String> =
            (1..=5760).filter_map(|i| log.failed(refused, at(15 * i))).collect();
        assert_eq!(told.len(), 24, "{told:?}");
        assert_eq!(told[0], format!("{refused} (240 failed attempts since it was last logged)"));
        // Another failure is told at once, with what the last one left untold.
        assert_eq!(log.failed(refused, at(86_415)), None);
        let timeout = "timed out";
        let line = log.failed(timeout, at(86_430)).unwrap();
        let before = "the failure before it: 1 more failed attempt not logged one by one";
        assert_eq!(line, format!("{timeout} ({before})"));
        assert_eq!(log.failed(timeout, at(86_445)), None);
        assert_eq!(log.failed(timeout, at(86_460)), None);
        assert_eq!(log.recovered(), " (after 2 more failed attempts not logged one by one)");
        // The next spell starts afresh.
        assert_eq!(log.recovered(), "");
        assert_eq!(log.failed(timeout, at(90_000)).as_deref(), Some(timeout));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d >= Duration::from_millis(100));
            assert!(d <= BACKOFF_CAP);
        }
        // Early attempts stay short.
        assert!(backoff(0) <= BACKOFF_BASE.max(Duration::from_millis(100)));
    }
}
