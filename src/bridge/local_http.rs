//! A minimal HTTP/1.1 client for servers on this machine: the bridge's backend (its requests
//! and health probes), the Hermes gateway (the built-in backend's upstream, and its probes).
//!
//! Why not `ureq`: a cancel or an app disconnect must abort a blocked backend read at once, from
//! another thread, and ureq has no per-request abort. Here every exchange registers its socket
//! (a shared `Arc<TcpStream>`, not a duplicated descriptor) in an [`Abort`]; `abort()` shuts that
//! socket down so the blocked read returns immediately. Sockets are blocking; the timeouts of
//! PROTOCOL §7 are socket read timeouts, which are only changed when they must be (see
//! `Conn::read_by`), so a reused keep-alive connection costs no `setsockopt` per request.
//!
//! Bodies are read by `Content-Length`, chunked transfer-encoding or until close, and
//! [`BodyReader::read`] hands out whatever arrived without waiting to fill the buffer, so a
//! server-sent event leaves the bridge the moment it arrives. Finished keep-alive connections go
//! back to a small idle pool.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

use crate::http::{MAX_HEAD, MAX_HEADERS, is_timeout, still_open};
use crate::protocol::{ErrorCode, check_header, contains_ignore_ascii_case};

/// Idle keep-alive connections kept for reuse.
pub const MAX_IDLE: usize = 16;

/// Most of a body [`LocalClient::get_small`] reads, in bytes.
const SMALL_BODY: usize = 64 << 10;

/// Longest chunk-size or trailer line accepted, in bytes.
const MAX_LINE: usize = 8 << 10;

/// Size of the buffer framing bytes (head, chunk lines) are read into.
const READ_BUF: usize = 16 << 10;

/// Request bodies up to this size are written together with the head (one segment).
const COALESCE_BODY: usize = 64 << 10;

/// How much longer than the time left a socket read timeout may be and still be kept as it is
/// (instead of one more `setsockopt`). Below the kernel's own timer granularity.
const TIMEOUT_SLACK: Duration = Duration::from_millis(1);

/// Locks a mutex, ignoring poisoning: every critical section here leaves consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The deadlines of PROTOCOL §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP connection.
    pub connect: Duration,
    /// From the end of the request to the complete response head (also bounds request writes).
    pub head: Duration,
    /// Longest silence between two reads of the body.
    pub body_gap: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            head: Duration::from_secs(120),
            body_gap: Duration::from_secs(300),
        }
    }
}

/// The [`LocalError::Timeout`] phase of a connection that was never established (a silent
/// port: a full accept queue, a dropped SYN).
pub const CONNECTING: &str = "connecting";

/// Why an exchange with the backend failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalError {
    /// The backend could not be reached (refused, unreachable, unresolvable).
    Connect {
        /// What was talked to: "the backend at host:port".
        addr: String,
        /// What the OS said.
        detail: String,
    },
    /// A deadline passed.
    Timeout {
        /// What was talked to: "the backend at host:port".
        addr: String,
        /// Which phase timed out, e.g. "waiting for the response head".
        phase: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// [`Abort::abort`] was called.
    Aborted,
    /// The backend answered something that is not usable HTTP/1.1.
    Protocol {
        /// What was talked to: "the backend at host:port".
        addr: String,
        /// What was wrong.
        detail: String,
    },
    /// What answers is a TLS server: it sent a TLS record, or it closed the connection without
    /// a byte and answers a TLS ClientHello ([`crate::tls_probe`]).
    SpeaksTls {
        /// What was talked to: "the backend at host:port".
        addr: String,
    },
    /// The connection broke mid-exchange.
    Io {
        /// What was talked to: "the backend at host:port".
        addr: String,
        /// What the OS said.
        detail: String,
    },
    /// Another user's program listens where the backend (or gateway) should, maybe since
    /// ours went down ([`crate::backend::peer::foreign_listener`]): nothing was sent to it.
    Foreign {
        /// What was to be talked to: "the backend at host:port".
        addr: String,
        /// Who listens there.
        uid: u32,
    },
    /// The request's base64 body is not valid base64 (found while sending it: the connection
    /// is dropped with the body unfinished, so the backend never acts on it).
    BadBody {
        /// What the decoder said.
        detail: String,
    },
}

impl LocalError {
    /// The `response.error` code this failure is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            LocalError::Timeout { .. } => ErrorCode::BackendTimeout,
            LocalError::Aborted => ErrorCode::Cancelled,
            LocalError::Connect { .. }
            | LocalError::Foreign { .. }
            | LocalError::Protocol { .. }
            | LocalError::SpeaksTls { .. }
            | LocalError::Io { .. } => ErrorCode::BackendUnreachable,
            LocalError::BadBody { .. } => ErrorCode::BadRequest,
        }
    }

    /// Recovers the error a [`BodyReader`] wrapped into an `io::Error`; any other I/O error
    /// counts as a broken connection.
    pub fn from_io(e: &io::Error, addr: &str) -> LocalError {
        match e.get_ref().and_then(|inner| inner.downcast_ref::<LocalError>()) {
            Some(inner) => inner.clone(),
            None => LocalError::Io { addr: addr.to_owned(), detail: e.to_string() },
        }
    }

    /// Wraps the error for `io::Read`, keeping a matching kind for callers that only look at
    /// the kind.
    fn into_io(self) -> io::Error {
        let kind = match self {
            LocalError::Timeout { .. } => io::ErrorKind::TimedOut,
            LocalError::Aborted => io::ErrorKind::ConnectionAborted,
            LocalError::Protocol { .. }
            | LocalError::SpeaksTls { .. }
            | LocalError::BadBody { .. } => io::ErrorKind::InvalidData,
            LocalError::Connect { .. } | LocalError::Io { .. } => io::ErrorKind::BrokenPipe,
            LocalError::Foreign { .. } => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, self)
    }
}

impl fmt::Display for LocalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalError::Connect { addr, detail } => {
                write!(f, "cannot connect to {addr}: {detail}")
            }
            LocalError::Timeout { addr, phase, after } => {
                write!(f, "{addr} timed out {phase} (no answer within {} s)", after.as_secs_f32())
            }
            LocalError::Aborted => f.write_str("the request was cancelled"),
            LocalError::Protocol { addr, detail } => {
                write!(f, "{addr} sent an invalid response: {detail}")
            }
            LocalError::SpeaksTls { addr } => f.write_str(&crate::tls_probe::hint(addr)),
            LocalError::Io { addr, detail } => {
                write!(f, "the connection to {addr} broke: {detail}")
            }
            LocalError::Foreign { addr, uid } => write!(
                f,
                "{addr} is served by another user's program (uid {uid}), not yours, so nothing \
                 was sent to it; stop that program, or move yours to a free port (a program \
                 you run under that account on purpose: HERMESCHAT_TRUSTED_UIDS={uid})"
            ),
            LocalError::BadBody { detail } => write!(f, "body is not valid base64: {detail}"),
        }
    }
}

impl std::error::Error for LocalError {}

/// Base64 for request bodies: the standard alphabet; padding optional, since some encoders
/// leave it out and it carries no information.
pub const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How long a backend that stopped taking the request body has to answer before the failed
/// write is reported instead.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Base64 text decoded per write of a streamed body (48 KiB of bytes).
const BASE64_CHUNK: usize = 64 << 10;

/// A request body whose pieces arrive while it is being sent (a `request.start` upload).
pub trait BodySource: fmt::Debug {
    /// Passes every piece to `write` in order, waiting for pieces still to come. A piece that
    /// cannot be used (or a body given up) comes back as `Err(Ok(..))`, a failed write as
    /// `Err(Err(..))`.
    fn pour(
        &self,
        write: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), Result<LocalError, io::Error>>;
}

/// A request body as a frame carries it.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// Bytes sent as they are.
    Bytes(&'a [u8]),
    /// Base64 text ([`BASE64_LENIENT`]), decoded in bounded chunks as it is sent: a 12 MiB
    /// upload is never held decoded, and the backend reads while the rest is decoded.
    Base64 {
        /// The text.
        text: &'a str,
        /// Its decoded length (the `Content-Length`).
        len: usize,
    },
    /// Pieces still arriving, `len` bytes in all; written as they come, never held whole,
    /// and never sent twice (a stale connection fails the request instead of retrying it).
    Stream {
        /// Where the pieces come from.
        source: &'a dyn BodySource,
        /// The total (the `Content-Length`).
        len: usize,
    },
}

impl<'a> Body<'a> {
    /// A base64 body. Refuses text whose length or padding no valid base64 has, so that the
    /// last chunk always carries data: anything else wrong with the text is found while a
    /// chunk is decoded, before that chunk is written, and leaves the body short.
    pub fn base64(text: &'a str) -> Result<Body<'a>, LocalError> {
        let pad = text.len() - text.trim_end_matches('=').len();
        let n = text.len() - pad;
        // (bytes from the last 2 or 3 characters, padding allowed after them)
        let (tail, max_pad) = match n % 4 {
            0 => (0, 0),
            2 => (1, 2),
            3 => (2, 1),
            _ => (0, usize::MAX),
        };
        if max_pad == usize::MAX || pad > max_pad {
            let detail = format!("invalid length {} with {pad} padding characters", text.len());
            return Err(LocalError::BadBody { detail });
        }
        Ok(Body::Base64 { text, len: n / 4 * 3 + tail })
    }

    /// The number of bytes sent.
    pub fn len(&self) -> usize {
        match self {
            Body::Bytes(b) => b.len(),
            Body::Base64 { len, .. } | Body::Stream { len, .. } => *len,
        }
    }

    /// True when the body goes in the same write as the request head (small and at hand).
    fn coalesced(&self) -> bool {
        !matches!(self, Body::Stream { .. }) && self.len() <= COALESCE_BODY
    }

    /// True for an empty body.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes the bytes to `write` in order (base64 decoded chunk by chunk). A decoding
    /// failure comes back as `Err(Ok(..))`, a failed write as `Err(Err(..))`.
    pub(crate) fn write_with(
        &self,
        mut write: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), Result<LocalError, io::Error>> {
        let (text, len) = match *self {
            Body::Bytes(b) => return write(b).map_err(Err),
            Body::Stream { source, .. } => return source.pour(&mut write),
            Body::Base64 { text, len } => (text, len),
        };
        let bad = |detail: String| Err(Ok(LocalError::BadBody { detail }));
        // Room for one chunk's bytes (a small body gets a small buffer).
        let mut buf = vec![0u8; text.len().min(BASE64_CHUNK).div_ceil(4) * 3];
        let mut sent = 0;
        for (i, chunk) in text.as_bytes().chunks(BASE64_CHUNK).enumerate() {
            // SIMD first (4× the scalar decoder); what it refuses (padding left out, or an
            // error to report with its offset) is decoded by the lenient scalar engine, so
            // the two accept the same text.
            let simd = base64_simd::STANDARD.decode(chunk, base64_simd::Out::from_slice(&mut buf));
            let n = match simd.map(|out| out.len()) {
                Ok(n) => n,
                Err(_) => match BASE64_LENIENT.decode_slice(chunk, &mut buf) {
                    Ok(n) => n,
                    Err(e) => return bad(at_offset(e, i * BASE64_CHUNK)),
                },
            };
            sent += n;
            if sent > len {
                break;
            }
            write(&buf[..n]).map_err(Err)?;
        }
        if sent != len {
            return bad(format!("it decodes to {sent} bytes, not {len}"));
        }
        Ok(())
    }
}

/// A chunk's decoding error, with its offsets counted from the start of the whole text.
fn at_offset(e: base64::DecodeSliceError, start: usize) -> String {
    use base64::{DecodeError, DecodeSliceError};
    let e = match e {
        DecodeSliceError::DecodeError(DecodeError::InvalidByte(at, b)) => {
            DecodeError::InvalidByte(at + start, b)
        }
        DecodeSliceError::DecodeError(DecodeError::InvalidLastSymbol(at, b)) => {
            DecodeError::InvalidLastSymbol(at + start, b)
        }
        DecodeSliceError::DecodeError(e) => e,
        // The buffer holds a whole chunk's bytes.
        e @ DecodeSliceError::OutputSliceTooSmall => return e.to_string(),
    };
    e.to_string()
}

/// A cancellation handle for one exchange. Clones share the same state.
///
/// The exchange registers its socket here (a shared handle, no duplicated descriptor);
/// [`Abort::abort`] shuts that socket down, which makes a read or write blocked on another
/// thread return at once.
#[derive(Debug, Clone, Default)]
pub struct Abort {
    inner: Arc<AbortInner>,
}

/// Shared state of an [`Abort`].
#[derive(Debug, Default)]
struct AbortInner {
    /// Set once, never cleared.
    aborted: AtomicBool,
    /// Set when the requester is gone: nothing about this exchange may be sent any more.
    silenced: AtomicBool,
    /// Set just before the terminal frame is sent: the request id is free again.
    finishing: AtomicBool,
    /// The in-flight socket, while an exchange owns one. Flag and socket change under this lock
    /// so that an abort racing a connect is never lost. Holding the `Arc` keeps the descriptor
    /// open, so a shutdown can never hit a descriptor number reused by another socket.
    socket: Mutex<Option<Arc<TcpStream>>>,
}

impl Abort {
    /// A fresh, not aborted handle.
    pub fn new() -> Abort {
        Abort::default()
    }

    /// Marks the exchange aborted and shuts its socket down (if it has one now).
    pub fn abort(&self) {
        let mut socket = lock(&self.inner.socket);
        self.inner.aborted.store(true, Ordering::SeqCst);
        if let Some(s) = socket.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// True once [`Abort::abort`] was called.
    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// Aborts because the requester is gone: no frame about this request may follow.
    pub fn silence(&self) {
        self.inner.silenced.store(true, Ordering::SeqCst);
        self.abort();
    }

    /// True once [`Abort::silence`] was called.
    pub fn is_silenced(&self) -> bool {
        self.inner.silenced.load(Ordering::SeqCst)
    }

    /// Marks the exchange as sending its terminal frame. From then on its request id may be
    /// reused: the app reuses an id as soon as the terminal frame reaches it, which can be
    /// before the worker thread gets to forget the request.
    pub fn mark_finishing(&self) {
        self.inner.finishing.store(true, Ordering::SeqCst);
    }

    /// True once [`Abort::mark_finishing`] was called.
    pub fn is_finishing(&self) -> bool {
        self.inner.finishing.load(Ordering::SeqCst)
    }

    /// True when both handles belong to the same exchange.
    pub fn same(&self, other: &Abort) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Registers the exchange's socket. Fails (and shuts the socket down) when the abort came
    /// first, so an exchange never starts after its cancel.
    fn register(&self, stream: &Arc<TcpStream>) -> Result<(), LocalError> {
        let mut socket = lock(&self.inner.socket);
        if self.is_aborted() {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(LocalError::Aborted);
        }
        *socket = Some(Arc::clone(stream));
        Ok(())
    }

    /// Forgets the socket (the exchange is over). True when not aborted, i.e. the socket was
    /// not shut down and may be reused.
    fn release(&self) -> bool {
        let mut socket = lock(&self.inner.socket);
        *socket = None;
        !self.is_aborted()
    }
}

/// A response whose head has been read; the body is read through [`Response::body`].
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Header names as sent and values (UTF-8 when valid, else Latin-1), in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: BodyReader,
}

impl Response {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// True for a server-sent event stream (always forwarded as it arrives).
    pub fn is_event_stream(&self) -> bool {
        self.header("content-type")
            .is_some_and(|ct| contains_ignore_ascii_case(ct, "text/event-stream"))
    }
}

/// The client. Cheap to share between threads (`&LocalClient` is enough to send).
#[derive(Debug)]
pub struct LocalClient {
    /// Host name or address of the backend (from local configuration only).
    host: String,
    /// Backend port.
    port: u16,
    /// `host:port` for the Host header.
    authority: String,
    /// What this client talks to, for messages: "the backend at 127.0.0.1:8765".
    peer: String,
    /// Keep-alive connections ready for reuse, each with the time it went idle; shared with
    /// live [`BodyReader`]s, which return their socket when their body ends cleanly.
    idle: Arc<Mutex<IdlePool>>,
    /// Deadlines.
    timeouts: Timeouts,
    /// The built-in backend's key, sent with every request, and the one address it is sent to
    /// ([`LocalClient::with_backend_key`]).
    backend_key: Option<crate::backend::key::BackendKey>,
    /// The only address connected to, when set (the built-in backend's, with its key).
    only_addr: Option<SocketAddr>,
    /// Whether a fresh connection closed without a byte is asked in TLS what it is
    /// ([`LocalError::SpeaksTls`]); off for a periodic probe, which would leave a stray
    /// handshake in a TLS backend's log every round.
    tls_check: bool,
}

impl LocalClient {
    /// A client for `http://host:port` with the default timeouts.
    pub fn new(host: &str, port: u16) -> LocalClient {
        LocalClient::with_timeouts(host, port, Timeouts::default())
    }

    /// A client with explicit timeouts.
    pub fn with_timeouts(host: &str, port: u16, timeouts: Timeouts) -> LocalClient {
        let authority = super::workers::authority(host, port);
        LocalClient {
            host: host.to_owned(),
            port,
            peer: format!("the backend at {authority}"),
            authority,
            idle: Arc::new(Mutex::new(Vec::new())),
            timeouts,
            backend_key: None,
            only_addr: None,
            tls_check: true,
        }
    }

    /// Sends `key` in [`crate::backend::key::HEADER`] with every request, connecting to `addr`
    /// only: for the built-in backend this process started there (never to another backend,
    /// which has no use for it, nor to another address the host name resolves to). A header of
    /// that name among a request's own is the caller's to drop.
    pub fn with_backend_key(
        mut self,
        key: crate::backend::key::BackendKey,
        addr: SocketAddr,
    ) -> LocalClient {
        self.backend_key = Some(key);
        self.only_addr = Some(addr);
        self
    }

    /// Does not ask a server that closed without a byte whether it speaks TLS (its error is
    /// then [`LocalError::Io`]): for a probe repeated every few seconds.
    pub fn without_tls_check(mut self) -> LocalClient {
        self.tls_check = false;
        self
    }

    /// Names what this client talks to in its errors ("Hermes gateway" instead of "backend").
    pub fn named(mut self, name: &str) -> LocalClient {
        self.peer = format!("the {name} at {}", self.authority);
        self
    }

    /// What this client talks to, as its errors name it: "the backend at host:port".
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Its deadlines.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Gives a parked connection to the shared idle pool (its owner keeps too many).
    pub fn unpark(&self, parked: Parked) {
        pool_idle(&self.idle, parked.conn);
    }

    /// Pools a connection as if a request had left it idle (tests: a stale pooled socket).
    #[cfg(test)]
    pub(crate) fn push_idle(&self, stream: TcpStream) {
        lock(&self.idle).push((Conn::new(stream), Instant::now()));
    }

    /// Idle pooled connections now (for tests and diagnostics).
    pub fn idle_connections(&self) -> usize {
        lock(&self.idle).len()
    }

    /// Closes the pooled connections idle for `max_age` or more, and those the backend closed
    /// (or sent stray bytes on); returns how many went.
    pub fn close_idle(&self, max_age: Duration) -> usize {
        let mut idle = lock(&self.idle);
        let before = idle.len();
        idle.retain(|(conn, since)| since.elapsed() < max_age && still_open(&conn.stream));
        before - idle.len()
    }

    /// GETs a small document (a health or status answer): its status code and at most 64 KiB
    /// of its body, read for one head timeout at most (what came by then is the body).
    pub fn get_small(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Vec<u8>), LocalError> {
        let mut response = self.send("GET", path, headers, Body::Bytes(b""), &Abort::new())?;
        let mut body = Vec::new();
        // What a probe needs is the status; a body cut short is judged as read. A body that
        // trickles in (a byte now and then, each within the gap timeout) must not hold the
        // caller, a poller's round say, for hours: the whole body gets one timeout.
        let until = Instant::now() + self.timeouts.head;
        let mut chunk = [0u8; 4096];
        while body.len() < SMALL_BODY && Instant::now() < until {
            let room = chunk.len().min(SMALL_BODY - body.len());
            match response.body.read(&mut chunk[..room]) {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        Ok((response.status, body))
    }

    /// Sends one request and reads the response head. `headers` are sent as given (the caller
    /// filtered them); `Host` and `Content-Length` are added here. The body is read from the
    /// returned [`Response`]. `abort` interrupts the exchange from another thread at any point.
    pub fn send<N: AsRef<str>, V: AsRef<str>>(
        &self,
        method: &str,
        path: &str,
        headers: &[(N, V)],
        body: Body<'_>,
        abort: &Abort,
    ) -> Result<Response, LocalError> {
        let request = self.build_request(method, path, headers, body)?;
        let head_only = method.eq_ignore_ascii_case("HEAD");
        // A pooled socket may have been closed by the backend while idle: if it fails before
        // the first response byte, an idempotent request is sent once more on a fresh
        // connection. A POST or PATCH is not: the backend may have acted on it before closing.
        // An upload starts on a fresh connection and is never retried: a pooled one the backend
        // closes as the body begins could not be sent again, since the pieces sent are gone.
        let streamed = matches!(body, Body::Stream { .. });
        let retry_safe = is_retry_safe(method) && !streamed;
        let mut pooled = if streamed { None } else { self.take_idle() };
        loop {
            if abort.is_aborted() {
                return Err(LocalError::Aborted);
            }
            let reused = pooled.is_some();
            let conn = match pooled.take() {
                Some(c) => c,
                None => self.connect()?,
            };
            let peer_addr = conn.stream.peer_addr().ok();
            abort.register(&conn.stream)?;
            match self.exchange(conn, &request, body, head_only, abort) {
                Ok(response) => return Ok(response),
                Err(Attempt::Stale) if reused && retry_safe => {
                    abort.release();
                    continue;
                }
                Err(Attempt::Stale) => {
                    abort.release();
                    // A TLS server closes on a plain request without a byte (OpenSSL's "http
                    // request" error): asked in TLS, it says so.
                    if !reused
                        && self.tls_check
                        && peer_addr.is_some_and(|a| {
                            crate::tls_probe::answers_tls(a, self.timeouts.connect)
                        })
                    {
                        return Err(LocalError::SpeaksTls { addr: self.peer.clone() });
                    }
                    return Err(LocalError::Io {
                        addr: self.peer.clone(),
                        detail: "connection closed before a response".into(),
                    });
                }
                Err(Attempt::Failed(e)) => {
                    abort.release();
                    // A shut-down socket looks like a broken one: report the abort instead.
                    return Err(if abort.is_aborted() { LocalError::Aborted } else { e });
                }
            }
        }
    }

    /// Starts a request without blocking, for a readiness-driven thread: on an idle pooled
    /// keep-alive connection (none: `None`, and the caller runs [`LocalClient::send`] on a
    /// worker instead), with the body (at most 64 KiB) written together with the head. The
    /// caller registers [`Pending::socket`] for readiness and calls [`Pending::advance`] each
    /// time it is ready. A response of at most `whole_limit` bytes that is not an event stream
    /// is read whole; anything else is handed out once its head is read.
    ///
    /// The caller's own parked connections (see [`Parked`]) come first: they need no liveness
    /// check, since the caller's poller reports one that closes.
    #[allow(clippy::too_many_arguments)]
    pub fn start<N: AsRef<str>, V: AsRef<str>>(
        &self,
        method: &str,
        path: &str,
        headers: &[(N, V)],
        body: Body<'_>,
        abort: &Abort,
        whole_limit: u64,
        parking: &mut Vec<Parked>,
    ) -> Option<Pending> {
        if !body.coalesced() {
            return None;
        }
        let request = self.build_request(method, path, headers, body).ok()?;
        let (mut conn, tag) = loop {
            match parking.pop() {
                // A request that cannot be sent twice gets the pool's liveness check: a close
                // the caller's poller has not reported yet would fail it for good. A closed one
                // is dropped here; its owner notices through its poller.
                Some(Parked { conn, tag, .. })
                    if is_retry_safe(method) || still_open(&conn.stream) =>
                {
                    break (conn, Some(tag));
                }
                Some(_) => {}
                None => break (self.take_idle()?, None),
            }
        };
        // An abort that came first shuts the socket down; the worker path reports it.
        abort.register(&conn.stream).ok()?;
        Some(Pending {
            tag,
            socket: conn.stream.clone(),
            buf: conn.take_rbuf(),
            conn: Some(conn),
            request,
            sent: 0,
            response: None,
            head_only: method.eq_ignore_ascii_case("HEAD"),
            abort: abort.clone(),
            whole_limit,
            received_any: false,
            deadline: deadline_after(self.timeouts.head),
        })
    }

    /// The error for an exchange whose response head did not arrive in time.
    fn head_timeout(&self) -> LocalError {
        LocalError::Timeout {
            addr: self.peer.clone(),
            phase: "waiting for the response head",
            after: self.timeouts.head,
        }
    }

    /// Serialises the request head (and a small body with it).
    fn build_request<N: AsRef<str>, V: AsRef<str>>(
        &self,
        method: &str,
        path: &str,
        headers: &[(N, V)],
        body: Body<'_>,
    ) -> Result<Vec<u8>, LocalError> {
        let bad = |detail: String| LocalError::Protocol { addr: self.peer.clone(), detail };
        // The worker validated all of this; re-checking here keeps the client safe on its own
        // (nothing can smuggle a second request into the stream).
        let token = !method.is_empty()
            && method.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(bad(format!("refusing to send method {method:?}")));
        }
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad(format!("refusing to send path {path:?}")));
        }
        let coalesce = body.coalesced();
        // One allocation for the head and a small body.
        let header_bytes: usize =
            headers.iter().map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 4).sum();
        let key_bytes = self.backend_key.as_ref().map_or(0, |k| k.expose().len() + 30);
        let room = method.len() + path.len() + self.authority.len() + header_bytes + key_bytes + 64;
        let mut head = String::with_capacity(room + if coalesce { body.len() } else { 0 });
        let authority = &self.authority;
        let _ = fmt::Write::write_fmt(
            &mut head,
            format_args!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"),
        );
        for (name, value) in headers {
            let (name, value) = (name.as_ref(), value.as_ref());
            check_header(name, value).map_err(bad)?;
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        if let Some(key) = &self.backend_key {
            head.push_str(crate::backend::key::HEADER);
            head.push_str(": ");
            head.push_str(key.expose());
            head.push_str("\r\n");
        }
        let needs_length = !body.is_empty()
            || ["POST", "PUT", "PATCH"].iter().any(|m| method.eq_ignore_ascii_case(m));
        if needs_length {
            let _ = fmt::Write::write_fmt(
                &mut head,
                format_args!("Content-Length: {}\r\n", body.len()),
            );
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if coalesce {
            body.write_with(|b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .map_err(|e| {
                e.unwrap_or_else(|e| LocalError::Io {
                    addr: self.peer.clone(),
                    detail: e.to_string(),
                })
            })?;
        }
        Ok(out)
    }

    /// A pooled connection that still looks open, if any.
    fn take_idle(&self) -> Option<Conn> {
        loop {
            let (conn, _) = lock(&self.idle).pop()?;
            if still_open(&conn.stream) {
                return Some(conn);
            }
        }
    }

    /// Opens a fresh connection (trying every resolved address within the connect timeout).
    fn connect(&self) -> Result<Conn, LocalError> {
        let addrs: Vec<SocketAddr> = match self.only_addr {
            Some(addr) => vec![addr],
            None => (self.host.as_str(), self.port)
                .to_socket_addrs()
                .map_err(|e| LocalError::Connect {
                    addr: self.peer.clone(),
                    detail: format!("cannot resolve the host: {e}"),
                })?
                .collect(),
        };
        let mut last = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, self.timeouts.connect) {
                Ok(stream) => {
                    // Checked once per connection (they are pooled), before a byte is sent.
                    if let Some(uid) = crate::backend::peer::foreign_listener(*addr) {
                        return Err(LocalError::Foreign { addr: self.peer.clone(), uid });
                    }
                    // Small frames (SSE events, JSON) must not wait for Nagle. Set once: the
                    // option stays with the socket across reuses.
                    let _ = stream.set_nodelay(true);
                    return Ok(Conn::new(stream));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) if is_timeout(&e) => LocalError::Timeout {
                addr: self.peer.clone(),
                phase: CONNECTING,
                after: self.timeouts.connect,
            },
            Some(e) => LocalError::Connect { addr: self.peer.clone(), detail: e.to_string() },
            None => LocalError::Connect {
                addr: self.peer.clone(),
                detail: "the host resolved to no address".into(),
            },
        })
    }

    /// Writes the request and reads the head on one connection.
    fn exchange(
        &self,
        mut conn: Conn,
        request: &[u8],
        body: Body<'_>,
        head_only: bool,
        abort: &Abort,
    ) -> Result<Response, Attempt> {
        let addr = &self.peer;
        let io_err = |e: io::Error, phase: &'static str, after: Duration| -> Attempt {
            if abort.is_aborted() {
                return Attempt::Failed(LocalError::Aborted);
            }
            if is_timeout(&e) {
                return Attempt::Failed(LocalError::Timeout { addr: addr.clone(), phase, after });
            }
            if is_stale(&e) {
                return Attempt::Stale;
            }
            Attempt::Failed(LocalError::Io { addr: addr.clone(), detail: e.to_string() })
        };
        conn.set_write_timeout(self.timeouts.head);
        conn.write_all(request)
            .map_err(|e| io_err(e, "accepting the request", self.timeouts.head))?;
        // A backend may answer before it has read the whole body (a 401 or a 413) and close:
        // when writing the body fails, that answer is still looked for, briefly, and the
        // write's failure reported only without one.
        let mut unsent = None;
        if !body.coalesced() {
            match body.write_with(|b| conn.write_all(b)) {
                Ok(()) => {}
                // The connection is dropped with the body unfinished.
                Err(Ok(bad)) => return Err(Attempt::Failed(bad)),
                Err(Err(e)) if abort.is_aborted() || is_timeout(&e) => {
                    return Err(io_err(e, "accepting the request body", self.timeouts.head));
                }
                Err(Err(e)) => unsent = Some(e),
            }
        }
        let write_failure = |unsent: io::Error| {
            // Never a stale connection to retry on: the backend has seen the request.
            match io_err(unsent, "accepting the request body", self.timeouts.head) {
                Attempt::Stale => Attempt::Failed(LocalError::Io {
                    addr: addr.clone(),
                    detail: "the backend closed the connection while the body was sent".into(),
                }),
                other => other,
            }
        };

        let wait = if unsent.is_some() { EARLY_ANSWER_WAIT } else { self.timeouts.head };
        let deadline = deadline_after(wait);
        let mut buf = conn.take_rbuf();
        let mut received_any = false;
        loop {
            if let Some((status, headers, minor)) =
                take_final_head(&mut buf, addr).map_err(Attempt::Failed)?
            {
                let rbuf = std::mem::take(&mut buf);
                return self
                    .body_reader(conn, rbuf, status, &headers, minor, head_only, abort, false)
                    .map(|body| Response { status, headers, body })
                    .map_err(Attempt::Failed);
            }
            if received_any {
                crate::http::ack_now(&conn.stream);
            }
            // A passed deadline comes back as a `TimedOut` error.
            let room = MAX_HEAD - buf.len();
            let read = conn.append_by(&mut buf, room, deadline);
            if let Some(e) = unsent.take_if(|_| !matches!(read, Ok(n) if n > 0)) {
                return Err(write_failure(e));
            }
            match read {
                Ok(0) if abort.is_aborted() => return Err(Attempt::Failed(LocalError::Aborted)),
                Ok(0) if !received_any => return Err(Attempt::Stale),
                Ok(0) => {
                    return Err(Attempt::Failed(LocalError::Io {
                        addr: addr.clone(),
                        detail: "connection closed inside the response head".into(),
                    }));
                }
                Ok(_) => received_any = true,
                Err(e) if received_any && is_stale(&e) => {
                    return Err(Attempt::Failed(LocalError::Io {
                        addr: addr.clone(),
                        detail: e.to_string(),
                    }));
                }
                Err(e) => {
                    return Err(io_err(e, "waiting for the response head", self.timeouts.head));
                }
            }
        }
    }

    /// Builds the body reader for a parsed head.
    #[allow(clippy::too_many_arguments)]
    fn body_reader(
        &self,
        conn: Conn,
        rbuf: Vec<u8>,
        status: u16,
        headers: &[(String, String)],
        minor: u8,
        head_only: bool,
        abort: &Abort,
        park: bool,
    ) -> Result<BodyReader, LocalError> {
        let addr = self.peer.clone();
        let has_token = |name: &str, token: &str| {
            headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .flat_map(|(_, v)| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        let mut keep_alive = minor >= 1 && !has_token("connection", "close");
        let te: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let lengths: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect();
        let framing = if head_only || status == 204 || status == 304 {
            Framing::Done
        } else if !te.is_empty() {
            // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3).
            if te.last().is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
                Framing::Chunked(ChunkState::Size)
            } else {
                keep_alive = false;
                Framing::Close
            }
        } else if let Some(first) = lengths.first() {
            let n: u64 = first.parse().map_err(|_| LocalError::Protocol {
                addr: addr.clone(),
                detail: format!("invalid Content-Length {first:?}"),
            })?;
            if lengths.iter().any(|l| *l != *first) {
                return Err(LocalError::Protocol {
                    addr: addr.clone(),
                    detail: "conflicting Content-Length headers".into(),
                });
            }
            Framing::Length(n)
        } else {
            keep_alive = false;
            Framing::Close
        };
        let len_hint = match framing {
            Framing::Done => Some(0),
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let mut reader = BodyReader {
            conn: Some(conn),
            rbuf,
            start: 0,
            framing,
            len_hint,
            keep_alive,
            idle: self.idle.clone(),
            abort: abort.clone(),
            addr,
            gap: self.timeouts.body_gap,
            park,
            parked: None,
        };
        if matches!(reader.framing, Framing::Done | Framing::Length(0)) {
            reader.framing = Framing::Done;
            reader.finish(true);
        }
        Ok(reader)
    }
}

/// Puts a reusable connection into the idle pool, unless [`MAX_IDLE`] wait there already (then
/// it is closed).
fn pool_idle(idle: &Mutex<IdlePool>, conn: Conn) {
    let mut idle = lock(idle);
    if idle.len() < MAX_IDLE {
        idle.push((conn, Instant::now()));
    }
}

/// The idle pool: connections, each with the time it went idle; the last pooled is reused
/// first, so the ones left unused sink to the front and age out ([`LocalClient::close_idle`]).
type IdlePool = Vec<(Conn, Instant)>;

/// True for methods that may be sent once more after a pooled connection turned out to be
/// closed before any response byte. A POST or PATCH is not: the backend may have acted on it
/// before closing.
pub fn is_retry_safe(method: &str) -> bool {
    ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"].iter().any(|m| method.eq_ignore_ascii_case(m))
}

/// An idle keep-alive connection kept by a readiness-driven thread after an exchange it ran
/// itself ([`Pending`]): the socket stays registered with that thread's poller, so the next
/// exchange needs no registration and no liveness check, and a backend that closes it is
/// noticed as readiness. Other threads never see it.
#[derive(Debug)]
pub struct Parked {
    conn: Conn,
    /// The owner's name for it (e.g. its poller key).
    pub tag: usize,
    /// The owner's clock when it was parked (e.g. a count of ticks), to close it once idle.
    pub epoch: u32,
}

impl Parked {
    /// The socket.
    pub fn socket(&self) -> &Arc<TcpStream> {
        &self.conn.stream
    }
}

/// A request started by [`LocalClient::start`]: written and read without blocking, as its
/// socket becomes ready.
#[derive(Debug)]
pub struct Pending {
    /// The tag of the parked connection it runs on, if it runs on one.
    tag: Option<usize>,
    /// The socket, for readiness registration (shared with the connection).
    socket: Arc<TcpStream>,
    /// The connection until its head is read (then it lives in `response`).
    conn: Option<Conn>,
    /// The request bytes; freed once all are sent.
    request: Vec<u8>,
    /// Request bytes the socket has taken.
    sent: usize,
    /// Response head bytes read so far.
    buf: Vec<u8>,
    /// The response once its head is read; its body is buffered until whole.
    response: Option<Response>,
    /// HEAD requests have no response body.
    head_only: bool,
    /// The exchange's abort handle.
    abort: Abort,
    /// Largest body read whole.
    whole_limit: u64,
    /// Any response byte arrived.
    received_any: bool,
    /// When the response head must have arrived (`None`: never).
    deadline: Option<Instant>,
}

/// What a [`Pending`] exchange needs or produced.
#[derive(Debug)]
pub enum Progress {
    /// Call again when the socket is readable, or writable when `writable`.
    Wait {
        /// The request is not fully written yet.
        writable: bool,
    },
    /// The head and the whole body are in memory: reading the body never blocks.
    Whole(Response),
    /// The head is read; the body continues on the socket (blocking reads, e.g. on a worker).
    Streamed(Response),
    /// The pooled connection was closed before any response byte: an idempotent request may
    /// be sent again on another connection ([`is_retry_safe`]).
    Stale,
    /// The exchange failed.
    Failed(LocalError),
}

impl Pending {
    /// The socket to watch.
    pub fn socket(&self) -> &Arc<TcpStream> {
        &self.socket
    }

    /// The tag of the parked connection this exchange took, if it took one.
    pub fn tag(&self) -> Option<usize> {
        self.tag
    }

    /// When the response head must have arrived; past it, [`Pending::timed_out`] is the error.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The error for a passed deadline. Ends the exchange (the connection is closed).
    pub fn timed_out(self, client: &LocalClient) -> LocalError {
        self.abort.release();
        match &self.response {
            Some(response) => response.body.broken(Some(io::ErrorKind::TimedOut.into())),
            None => client.head_timeout(),
        }
    }

    /// Writes and reads what the socket allows now.
    pub fn advance(&mut self, client: &LocalClient) -> Progress {
        let progress = self.step(client);
        if matches!(progress, Progress::Stale | Progress::Failed(_)) {
            self.abort.release();
            self.conn = None;
        }
        progress
    }

    fn step(&mut self, client: &LocalClient) -> Progress {
        let addr = &client.peer;
        let failed = |e: io::Error, abort: &Abort, received_any: bool| {
            if abort.is_aborted() {
                Progress::Failed(LocalError::Aborted)
            } else if !received_any && is_stale(&e) {
                Progress::Stale
            } else {
                Progress::Failed(LocalError::Io { addr: addr.clone(), detail: e.to_string() })
            }
        };
        while self.sent < self.request.len() {
            match crate::http::send_now(&self.socket, &self.request[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Progress::Wait { writable: true };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return failed(e, &self.abort, false),
            }
            if self.sent == self.request.len() {
                self.request = Vec::new();
                // The backend cannot have answered yet: no read that would only block.
                return Progress::Wait { writable: false };
            }
        }
        loop {
            if let Some(response) = &mut self.response {
                let whole = match response.body.len_hint() {
                    Some(n) if !response.is_event_stream() && n <= self.whole_limit => n,
                    _ => {
                        // A worker reads it; its connection goes back to the shared pool.
                        response.body.set_park(false);
                        return Progress::Streamed(self.take_response());
                    }
                };
                if response.body.buffered() as u64 >= whole {
                    return Progress::Whole(self.take_response());
                }
                match response.body.fill_now() {
                    Ok(0) => {
                        return Progress::Failed(response.body.broken(None));
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        crate::http::ack_now(&self.socket);
                        return Progress::Wait { writable: false };
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Progress::Failed(response.body.broken(Some(e))),
                }
            }
            match take_final_head(&mut self.buf, addr) {
                Err(e) => return Progress::Failed(e),
                Ok(Some((status, headers, minor))) => {
                    let Some(conn) = self.conn.take() else {
                        return Progress::Failed(LocalError::Aborted);
                    };
                    let rbuf = std::mem::take(&mut self.buf);
                    let (head_only, abort) = (self.head_only, &self.abort);
                    // Parked unless it turns out to be streamed (above): a body read whole
                    // ends here, and its connection stays with the caller.
                    match client
                        .body_reader(conn, rbuf, status, &headers, minor, head_only, abort, true)
                    {
                        Ok(body) => self.response = Some(Response { status, headers, body }),
                        Err(e) => return Progress::Failed(e),
                    }
                    // From here on the deadline is the gap between body reads.
                    self.deadline = deadline_after(client.timeouts.body_gap);
                    continue;
                }
                Ok(None) => {}
            }
            let room = MAX_HEAD - self.buf.len();
            match crate::http::recv_appending_now(&self.socket, &mut self.buf, room) {
                Ok(0) if self.abort.is_aborted() => return Progress::Failed(LocalError::Aborted),
                Ok(0) if !self.received_any => return Progress::Stale,
                Ok(0) => {
                    return Progress::Failed(LocalError::Io {
                        addr: addr.clone(),
                        detail: "connection closed inside the response head".into(),
                    });
                }
                Ok(_) => self.received_any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.received_any {
                        crate::http::ack_now(&self.socket);
                    }
                    return Progress::Wait { writable: false };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return failed(e, &self.abort, self.received_any),
            }
        }
    }

    /// Hands the response out (only called with one present).
    fn take_response(&mut self) -> Response {
        match self.response.take() {
            Some(r) => r,
            None => unreachable_response(),
        }
    }
}

#[cold]
fn unreachable_response() -> ! {
    // `take_response` is only called on the branch that found a response.
    std::process::abort()
}

/// Outcome of one attempt on one connection.
enum Attempt {
    /// The connection died before any response byte: a pooled socket may be retried.
    Stale,
    /// A real failure.
    Failed(LocalError),
}

/// Errors a connection closed by the peer while idle produces.
fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// The instant `after` from now; `None` (no deadline) when that is beyond what `Instant`
/// represents.
fn deadline_after(after: Duration) -> Option<Instant> {
    Instant::now().checked_add(after)
}

/// How much one read may append to a body's read buffer: what is left of [`READ_BUF`], so a
/// few bytes carried over from the last read do not double the buffer (and keep
/// [`Conn::keep_rbuf`] from keeping it), and a whole [`READ_BUF`] once it is half full.
fn read_room(rbuf: &[u8]) -> usize {
    match READ_BUF - rbuf.len().min(READ_BUF) {
        room if room >= READ_BUF / 2 => room,
        _ => READ_BUF,
    }
}

/// A connection to the backend with the socket options it has now, so that an option is only
/// set (one `setsockopt`) when it must change. TCP_NODELAY is set once, in
/// [`LocalClient::connect`].
#[derive(Debug)]
struct Conn {
    /// The socket; shared with the exchange's [`Abort`] while an exchange runs (`&TcpStream`
    /// reads, writes and shuts down).
    stream: Arc<TcpStream>,
    /// The read timeout set on the socket (`None`: none, reads wait forever).
    read_timeout: Option<Duration>,
    /// The write timeout set on the socket (`None`: none).
    write_timeout: Option<Duration>,
    /// The read buffer of its last exchange, empty, kept for the next one: a fresh one per
    /// request cost glibc's slow path (a 16 KiB block, and a pass over its fast bins) every
    /// time. At most [`READ_BUF`] of capacity is kept.
    rbuf: Vec<u8>,
}

impl Conn {
    /// Wraps a socket that has no read or write timeout yet (as `connect` returns it).
    fn new(stream: TcpStream) -> Conn {
        Conn { stream: Arc::new(stream), read_timeout: None, write_timeout: None, rbuf: Vec::new() }
    }

    /// The kept read buffer, empty (see [`Conn::rbuf`]).
    fn take_rbuf(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.rbuf)
    }

    /// Keeps `buf` for the next exchange if it is not larger than [`READ_BUF`].
    fn keep_rbuf(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() <= READ_BUF {
            buf.clear();
            self.rbuf = buf;
        }
    }

    /// Sets the write timeout unless the socket has it already. A failure is ignored (the
    /// socket keeps its previous timeout), as before.
    fn set_write_timeout(&mut self, timeout: Duration) {
        if self.write_timeout != Some(timeout)
            && self.stream.set_write_timeout(Some(timeout)).is_ok()
        {
            self.write_timeout = Some(timeout);
        }
    }

    /// Writes all of `data` (each send bounded by the write timeout).
    fn write_all(&self, data: &[u8]) -> io::Result<()> {
        (&*self.stream).write_all(data)
    }

    /// One read of whatever has arrived, waiting until `deadline` at most (`None`: forever);
    /// a passed deadline is a `TimedOut` error.
    ///
    /// The socket's read timeout is only lowered (one `setsockopt`) when it is longer than the
    /// time left, give or take [`TIMEOUT_SLACK`]; a shorter one just makes the read wake up
    /// early and wait again for the rest. So the timeout settles on the shortest limit the
    /// client uses (head or body gap) and then stays: no `setsockopt` per request.
    fn read_by(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
        self.wait_by(deadline, |s| (&*s.stream).read(buf))
    }

    /// As [`Conn::read_by`], appending at most `max` bytes to `buf` without zero-filling it.
    fn append_by(
        &mut self,
        buf: &mut Vec<u8>,
        max: usize,
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        self.wait_by(deadline, |s| crate::http::recv_appending(&s.stream, buf, max))
    }

    /// Runs one socket read `op`, within `deadline` (see [`Conn::read_by`]).
    fn wait_by(
        &mut self,
        deadline: Option<Instant>,
        mut op: impl FnMut(&Conn) -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                if self.read_timeout.is_none_or(|t| t > left.saturating_add(TIMEOUT_SLACK)) {
                    self.stream.set_read_timeout(Some(left))?;
                    self.read_timeout = Some(left);
                }
            }
            match op(self) {
                // A timeout shorter than the time left, or a signal: wait again.
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Takes the final response head off the front of `buf`, skipping interim responses (100
/// Continue, 103 Early Hints): its status, headers and HTTP minor version, with `buf` left
/// holding the bytes after it; `None` while more bytes are needed. A 101 or a head over
/// [`MAX_HEAD`] is an error.
fn take_final_head(buf: &mut Vec<u8>, addr: &str) -> Result<Option<FinalHead>, LocalError> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        match parse_head(buf, addr)? {
            Some((_, 101, _, _)) => {
                return Err(LocalError::Protocol {
                    addr: addr.to_owned(),
                    detail: "unexpected 101 Switching Protocols".into(),
                });
            }
            Some((consumed, status, _, _)) if (100..200).contains(&status) => {
                buf.drain(..consumed);
            }
            Some((consumed, status, headers, minor)) => {
                buf.drain(..consumed);
                return Ok(Some((status, headers, minor)));
            }
            None if buf.len() >= MAX_HEAD => {
                return Err(LocalError::Protocol {
                    addr: addr.to_owned(),
                    detail: format!("response head larger than {MAX_HEAD} bytes"),
                });
            }
            None => return Ok(None),
        }
    }
}

/// A final response head: status, headers, HTTP minor version.
type FinalHead = (u16, Vec<(String, String)>, u8);

/// A parsed head: bytes consumed, status, headers, HTTP minor version.
type ParsedHead = (usize, u16, Vec<(String, String)>, u8);

/// Parses a response head at the start of `buf`; `None` when more bytes are needed.
fn parse_head(buf: &[u8], addr: &str) -> Result<Option<ParsedHead>, LocalError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(consumed)) => {
            let headers =
                resp.headers.iter().map(|h| (h.name.to_owned(), header_text(h.value))).collect();
            Ok(Some((consumed, resp.code.unwrap_or(0), headers, resp.version.unwrap_or(1))))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(LocalError::Protocol {
            addr: addr.to_owned(),
            detail: format!("response head has more than {MAX_HEADERS} header fields"),
        }),
        // A TLS alert in answer to plain HTTP.
        Err(_) if crate::tls_probe::is_tls_record(buf) => {
            Err(LocalError::SpeaksTls { addr: addr.to_owned() })
        }
        Err(e) => Err(LocalError::Protocol {
            addr: addr.to_owned(),
            detail: format!("malformed response head: {e}"),
        }),
    }
}

/// A header value as text: UTF-8 when it is valid UTF-8, else Latin-1, one character per byte
/// (how HTTP clients read obs-text). Starlette, Werkzeug and Node write a header value given as
/// a string in Latin-1 (`café` goes out as `caf\xE9`), which lossy UTF-8 would turn into
/// `caf\u{FFFD}`; aiohttp writes UTF-8. Either way the app gets the text the backend meant.
fn header_text(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) => text.to_owned(),
        Err(_) => value.iter().map(|&b| char::from(b)).collect(),
    }
}

/// How the end of the body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer-encoding.
    Chunked(ChunkState),
    /// Until the server closes the connection.
    Close,
    /// The body is complete.
    Done,
}

/// Position inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data; this many bytes remain.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// Inside the trailer section (after the last chunk).
    Trailer,
}

/// Reads one response body. Dropping it before the end closes the connection.
#[derive(Debug)]
pub struct BodyReader {
    /// The connection; `None` once the body is over.
    conn: Option<Conn>,
    /// Bytes read from the socket but not yet consumed (`start..end`).
    rbuf: Vec<u8>,
    /// First unconsumed byte in `rbuf` (which ends where the valid bytes end).
    start: usize,
    /// Where we are in the body.
    framing: Framing,
    /// The declared length, when known (`Some(0)` for no body).
    len_hint: Option<u64>,
    /// Whether the connection may be reused after a clean end.
    keep_alive: bool,
    /// The client's idle pool.
    idle: Arc<Mutex<IdlePool>>,
    /// The exchange's abort handle.
    abort: Abort,
    /// What the client talks to ("the backend at host:port"), for errors.
    addr: String,
    /// The read timeout between body reads, for errors.
    gap: Duration,
    /// A clean end keeps the connection in `parked` instead of the idle pool.
    park: bool,
    /// The connection, kept for [`BodyReader::take_parked`].
    parked: Option<Conn>,
}

impl BodyReader {
    /// The body length when the head declared it (`Some(0)` for bodiless responses); `None`
    /// for chunked or close-delimited bodies.
    pub fn len_hint(&self) -> Option<u64> {
        self.len_hint
    }

    /// Body bytes already read from the socket and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.rbuf.len() - self.start
    }

    /// Moves the unconsumed bytes to the front of the buffer, before a read appends to it.
    fn compact(&mut self) {
        self.rbuf.drain(..self.start);
        self.start = 0;
    }

    /// Appends what has arrived to the buffer without waiting (`WouldBlock`: nothing yet;
    /// `Ok(0)`: end of stream).
    fn fill_now(&mut self) -> io::Result<usize> {
        self.compact();
        let Some(conn) = self.conn.as_ref() else { return Ok(0) };
        let room = read_room(&self.rbuf);
        crate::http::recv_appending_now(&conn.stream, &mut self.rbuf, room)
    }

    /// True once the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.framing == Framing::Done
    }

    /// Ends the body; a cleanly ended keep-alive connection goes back to the idle pool.
    fn finish(&mut self, clean: bool) {
        self.framing = Framing::Done;
        let Some(mut conn) = self.conn.take() else { return };
        // `release` must run either way so the abort handle stops holding the socket (a later
        // abort must not shut down a pooled connection).
        let not_aborted = self.abort.release();
        if clean && not_aborted && self.keep_alive && self.buffered() == 0 {
            conn.keep_rbuf(std::mem::take(&mut self.rbuf));
            self.start = 0;
            if self.park {
                self.parked = Some(conn);
                return;
            }
            pool_idle(&self.idle, conn);
        }
    }

    /// Whether a clean end keeps the connection for [`BodyReader::take_parked`]; turned off,
    /// a connection kept already goes to the shared idle pool.
    fn set_park(&mut self, park: bool) {
        self.park = park;
        if park {
            return;
        }
        if let Some(conn) = self.parked.take() {
            pool_idle(&self.idle, conn);
        }
    }

    /// The connection of a body read whole by a [`Pending`] exchange, once it ended cleanly
    /// and may be reused; the caller keeps it registered (see [`Parked`]).
    pub fn take_parked(&mut self) -> Option<Parked> {
        self.parked.take().map(|conn| Parked { conn, tag: 0, epoch: 0 })
    }

    /// The error for a socket that ended early or failed.
    fn broken(&self, e: Option<io::Error>) -> LocalError {
        if self.abort.is_aborted() {
            return LocalError::Aborted;
        }
        match e {
            Some(e) if is_timeout(&e) => LocalError::Timeout {
                addr: self.addr.clone(),
                phase: "between two reads of the body",
                after: self.gap,
            },
            Some(e) => LocalError::Io { addr: self.addr.clone(), detail: e.to_string() },
            None => LocalError::Io {
                addr: self.addr.clone(),
                detail: "connection closed in the middle of the body".into(),
            },
        }
    }

    /// One socket read into `out`. `Ok(0)` is end of stream.
    fn read_socket(&mut self, to_rbuf: bool, out: &mut [u8]) -> Result<usize, LocalError> {
        if to_rbuf {
            self.compact();
        }
        let Some(conn) = self.conn.as_mut() else { return Ok(0) };
        // The head has come: what is read now is more of a response already begun.
        crate::http::ack_now(&conn.stream);
        // The body gap bounds each read on its own.
        let deadline = deadline_after(self.gap);
        let r = if to_rbuf {
            let room = read_room(&self.rbuf);
            conn.append_by(&mut self.rbuf, room, deadline)
        } else {
            conn.read_by(out, deadline)
        };
        r.map_err(|e| self.broken(Some(e)))
    }

    /// Copies buffered bytes, or does one socket read straight into `out` (never waits for
    /// more than the first bytes to arrive). Errors on end of stream.
    fn read_data(&mut self, out: &mut [u8]) -> Result<usize, LocalError> {
        if self.buffered() > 0 {
            let n = out.len().min(self.buffered());
            out[..n].copy_from_slice(&self.rbuf[self.start..self.start + n]);
            self.start += n;
            return Ok(n);
        }
        match self.read_socket(false, out)? {
            0 => Err(self.broken(None)),
            n => Ok(n),
        }
    }

    /// Reads one CRLF- (or LF-) terminated framing line, without the terminator.
    fn read_line(&mut self) -> Result<String, LocalError> {
        loop {
            let avail = &self.rbuf[self.start..];
            if let Some(pos) = avail.iter().position(|&b| b == b'\n') {
                let line = &avail[..pos];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let text = String::from_utf8_lossy(line).into_owned();
                self.start += pos + 1;
                return Ok(text);
            }
            if avail.len() > MAX_LINE {
                return Err(LocalError::Protocol {
                    addr: self.addr.clone(),
                    detail: "chunk framing line too long".into(),
                });
            }
            if self.read_socket(true, &mut [])? == 0 {
                return Err(self.broken(None));
            }
        }
    }

    /// The body-reading core, with typed errors.
    fn read_body(&mut self, out: &mut [u8]) -> Result<usize, LocalError> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.framing {
                Framing::Done => return Ok(0),
                Framing::Length(remaining) => {
                    let want = out.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let n = self.read_data(&mut out[..want])?;
                    let left = remaining - n as u64;
                    self.framing = Framing::Length(left);
                    if left == 0 {
                        self.finish(true);
                    }
                    return Ok(n);
                }
                Framing::Close => {
                    if self.buffered() > 0 {
                        return self.read_data(out);
                    }
                    let n = self.read_socket(false, out)?;
                    if n == 0 {
                        // End of stream is the end of the body, unless we caused it.
                        if self.abort.is_aborted() {
                            return Err(LocalError::Aborted);
                        }
                        self.finish(false);
                    }
                    return Ok(n);
                }
                Framing::Chunked(ChunkState::Size) => {
                    let line = self.read_line()?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16).map_err(|_| LocalError::Protocol {
                        addr: self.addr.clone(),
                        detail: format!("invalid chunk size line {line:?}"),
                    })?;
                    self.framing = Framing::Chunked(if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    });
                }
                Framing::Chunked(ChunkState::Data(remaining)) => {
                    let want = out.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let n = self.read_data(&mut out[..want])?;
                    let left = remaining - n as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    });
                    return Ok(n);
                }
                Framing::Chunked(ChunkState::DataEnd) => {
                    let line = self.read_line()?;
                    if !line.is_empty() {
                        return Err(LocalError::Protocol {
                            addr: self.addr.clone(),
                            detail: "missing CRLF after chunk data".into(),
                        });
                    }
                    self.framing = Framing::Chunked(ChunkState::Size);
                }
                Framing::Chunked(ChunkState::Trailer) => {
                    // Trailers are ignored; an empty line ends the message.
                    if self.read_line()?.is_empty() {
                        self.finish(true);
                        return Ok(0);
                    }
                }
            }
        }
    }
}

impl Read for BodyReader {
    /// Returns the body bytes available now (at least one, unless the body is over): it never
    /// waits to fill `buf`. Errors wrap a [`LocalError`]; see [`LocalError::from_io`].
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_body(buf).map_err(LocalError::into_io)
    }
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        // An unfinished body leaves the connection in an unknown state: close it.
        if self.conn.is_some() {
            self.abort.release();
            self.conn = None;
        }
    }
}

/// A tiny threaded HTTP/1.1 origin on 127.0.0.1 for the bridge tests (real sockets).
#[cfg(test)]
pub(crate) mod test_origin {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use crate::http::{Parsed, parse_head};

    /// The text `/api/utf8` serves, written in pieces that split multi-byte characters.
    pub const UTF8_TEXT: &str = "héllo wörld — 🎉 ünïcödé ✓";

    /// Byte offsets where `/api/utf8` cuts its chunks (inside é, —, 🎉 and ✓).
    pub const UTF8_CUTS: &[usize] = &[2, 10, 18, 20, 36];

    /// A running origin.
    pub struct Origin {
        /// Its port on 127.0.0.1.
        pub port: u16,
        /// Connections accepted so far.
        pub accepted: Arc<AtomicUsize>,
        /// `/api/hang` requests received.
        pub hangs: Arc<AtomicUsize>,
        /// `/api/hang` connections the client closed.
        pub hang_closed: Arc<AtomicUsize>,
    }

    impl Origin {
        /// Waits (bounded) until `counter` reaches `n`.
        pub fn wait_for(counter: &AtomicUsize, n: usize) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while counter.load(Ordering::SeqCst) < n {
                assert!(std::time::Instant::now() < deadline, "origin never reached {n}");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Starts an origin on an ephemeral port.
    pub fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let origin = Origin {
            port,
            accepted: Arc::default(),
            hangs: Arc::default(),
            hang_closed: Arc::default(),
        };
        let (accepted, hangs, closed) =
            (origin.accepted.clone(), origin.hangs.clone(), origin.hang_closed.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (hangs, closed) = (hangs.clone(), closed.clone());
                std::thread::spawn(move || serve(stream, &hangs, &closed));
            }
        });
        origin
    }

    /// Deterministic pseudo-random bytes (xorshift), for binary bodies.
    pub fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Writes one chunk of a chunked body and flushes it.
    fn write_chunk(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
        s.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
        s.write_all(data)?;
        s.write_all(b"\r\n")?;
        s.flush()
    }

    /// Serves one connection, keep-alive, until it closes.
    fn serve(mut s: TcpStream, hangs: &AtomicUsize, closed: &AtomicUsize) {
        let _ = s.set_nodelay(true);
        let mut buf = Vec::new();
        loop {
            let head = loop {
                match parse_head(&buf) {
                    Parsed::Complete(h) => break h,
                    Parsed::Invalid(..) => return,
                    Parsed::Partial => {}
                }
                let mut tmp = [0u8; 16 << 10];
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            };
            buf.drain(..head.len);
            let len = head.content_length().unwrap_or(0);
            while buf.len() < len {
                let mut tmp = [0u8; 64 << 10];
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            let ok = match (head.method.as_str(), head.path()) {
                ("GET" | "HEAD", "/api/health") => {
                    let body = br#"{"ok":true}"#;
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    if head.method == "GET" {
                        r.extend_from_slice(body);
                    }
                    s.write_all(&r).is_ok()
                }
                ("POST", "/api/echo") => {
                    let ct = head.header("content-type").unwrap_or("application/octet-stream");
                    let client = head.header("x-hermeschat-client").unwrap_or("-");
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nX-Echo-Client: {client}\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&body);
                    s.write_all(&r).is_ok()
                }
                ("GET", "/api/headers") => {
                    let map: serde_json::Map<String, serde_json::Value> = head
                        .headers
                        .iter()
                        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone().into()))
                        .collect();
                    let json = serde_json::Value::Object(map).to_string();
                    s.write_all(&crate::http::json_response(200, &json, false)).is_ok()
                }
                ("GET", "/api/sse") => {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
                    let mut ok = s.write_all(head.as_bytes()).is_ok();
                    for i in 0..5 {
                        if i > 0 {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        let event = format!("event: tick\ndata: {{\"n\":{i}}}\n\n");
                        ok = ok && write_chunk(&mut s, event.as_bytes()).is_ok();
                    }
                    ok && s.write_all(b"0\r\n\r\n").is_ok()
                }
                ("GET", "/api/utf8") => {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n";
                    let mut ok = s.write_all(head.as_bytes()).is_ok();
                    let bytes = UTF8_TEXT.as_bytes();
                    let mut from = 0;
                    for &cut in UTF8_CUTS.iter().chain(std::iter::once(&bytes.len())) {
                        ok = ok && write_chunk(&mut s, &bytes[from..cut]).is_ok();
                        from = cut;
                        std::thread::sleep(Duration::from_millis(40));
                    }
                    ok && s.write_all(b"0\r\nX-Trailer: t\r\n\r\n").is_ok()
                }
                ("GET", "/api/big") => {
                    let body = noise(1 << 20, 7);
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&body);
                    s.write_all(&r).is_ok()
                }
                ("GET", "/api/eof") => {
                    // Close-delimited body: no length, no chunking.
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil ");
                    std::thread::sleep(Duration::from_millis(30));
                    let _ = s.write_all(b"close");
                    return;
                }
                ("GET", "/api/nocontent") => s
                    .write_all(
                        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
                    )
                    .is_ok(),
                ("GET", "/api/once") => {
                    // Answers as keep-alive, then drops the idle connection.
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    std::thread::sleep(Duration::from_millis(20));
                    return;
                }
                ("GET", "/api/hang") => {
                    hangs.fetch_add(1, Ordering::SeqCst);
                    // Never answers; notices when the client goes away.
                    let mut tmp = [0u8; 256];
                    while matches!(s.read(&mut tmp), Ok(n) if n > 0) {}
                    closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                ("GET", "/api/stall") => {
                    // Two bytes of a ten-byte body, then silence until the client goes away.
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab");
                    let mut tmp = [0u8; 256];
                    while matches!(s.read(&mut tmp), Ok(n) if n > 0) {}
                    return;
                }
                ("GET", "/api/close") => return,
                _ => s.write_all(&crate::http::json_response(404, "{}", false)).is_ok(),
            };
            if !ok {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_origin::{self, Origin};
    use super::*;

    /// No request headers (the header list is generic over its string types).
    const NO_HEADERS: &[(&str, &str)] = &[];
    use std::net::TcpListener;
    use std::sync::atomic::Ordering;

    fn client(o: &Origin) -> LocalClient {
        LocalClient::new("127.0.0.1", o.port)
    }

    fn get(c: &LocalClient, path: &str) -> Result<Response, LocalError> {
        c.send("GET", path, NO_HEADERS, Body::Bytes(b""), &Abort::new())
    }

    fn body_of(r: &mut Response) -> Vec<u8> {
        let mut v = Vec::new();
        r.body.read_to_end(&mut v).unwrap();
        v
    }

    /// A server that answers plain HTTP with a TLS alert (as rustls-based servers do) is named
    /// as speaking HTTPS, not as sending a malformed head.
    #[test]
    fn a_tls_alert_in_answer_is_named_https() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            // A fatal protocol_version alert, TLS 1.2 record.
            s.write_all(b"\x15\x03\x03\x00\x02\x02\x46").unwrap();
        });
        let e = get(&LocalClient::new("127.0.0.1", port), "/api/health").unwrap_err();
        server.join().unwrap();
        assert!(matches!(e, LocalError::SpeaksTls { .. }), "{e:?}");
        assert_eq!(e.code(), ErrorCode::BackendUnreachable);
        assert!(
            e.to_string().starts_with(&format!("the backend at 127.0.0.1:{port} speaks HTTPS"))
        );
    }

    #[test]
    fn keep_alive_reuses_one_connection() {
        let o = test_origin::start();
        let c = client(&o);
        for _ in 0..10 {
            let mut r = get(&c, "/api/health").unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(body_of(&mut r), br#"{"ok":true}"#);
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(c.idle_connections(), 1);
    }

    #[test]
    fn a_pooled_connection_keeps_its_read_buffer_empty_and_bounded() {
        let o = test_origin::start();
        let c = client(&o);
        let body = vec![b'x'; 3 * READ_BUF];
        for round in 0..3 {
            let mut r = get(&c, "/api/health").unwrap();
            assert_eq!(body_of(&mut r), br#"{"ok":true}"#, "round {round}");
            drop(r);
            let conn = c.take_idle().expect("the connection went back to the pool");
            // Kept for the next exchange, with nothing of this one left in it.
            assert!(conn.rbuf.is_empty());
            assert!((1..=READ_BUF).contains(&conn.rbuf.capacity()), "{}", conn.rbuf.capacity());
            pool_idle(&c.idle, conn);
            let mut r = c.send("POST", "/api/echo", NO_HEADERS, Body::Bytes(&body), &Abort::new());
            let r = r.as_mut().unwrap();
            assert_eq!(body_of(r), body, "round {round}");
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
        let conn = c.take_idle().expect("the connection went back to the pool");
        assert!(conn.rbuf.is_empty() && conn.rbuf.capacity() <= READ_BUF);
    }

    #[test]
    fn a_read_fills_the_buffer_up_to_its_size_before_it_grows() {
        assert_eq!(read_room(&[]), READ_BUF);
        assert_eq!(read_room(&[0; 100]), READ_BUF - 100);
        let mut buf = vec![0u8; 100];
        buf.reserve_exact(READ_BUF - 100);
        buf.reserve(read_room(&buf));
        assert_eq!(buf.capacity(), READ_BUF, "carried-over bytes must not double the buffer");
        // Half full and more: a whole READ_BUF more (a body read whole grows as it must).
        assert_eq!(read_room(&vec![0; READ_BUF / 2 + 1]), READ_BUF);
        assert_eq!(read_room(&vec![0; 3 * READ_BUF]), READ_BUF);
    }

    #[test]
    fn chunked_reads_return_event_by_event() {
        let o = test_origin::start();
        let c = client(&o);
        let mut r = get(&c, "/api/sse").unwrap();
        assert_eq!(r.body.len_hint(), None);
        let mut buf = vec![0u8; 1 << 16];
        let mut reads = Vec::new();
        loop {
            let n = r.body.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            reads.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        assert_eq!(reads.len(), 5, "{reads:?}");
        assert!(reads[0].starts_with("event: tick\ndata: {\"n\":0}"));
        // The chunked body ended cleanly, so the connection is reusable.
        assert_eq!(c.idle_connections(), 1);
    }

    #[test]
    fn utf8_trailers_head_and_interim_responses() {
        let o = test_origin::start();
        let c = client(&o);
        let mut r = get(&c, "/api/utf8").unwrap();
        assert_eq!(String::from_utf8(body_of(&mut r)).unwrap(), test_origin::UTF8_TEXT);
        let mut r =
            c.send("HEAD", "/api/health", NO_HEADERS, Body::Bytes(b""), &Abort::new()).unwrap();
        assert_eq!(r.header("content-length"), Some("11"));
        assert!(body_of(&mut r).is_empty());
        let mut r = get(&c, "/api/nocontent").unwrap();
        assert_eq!(r.status, 204);
        assert_eq!(r.header("x-a"), Some("1"));
        assert!(body_of(&mut r).is_empty());
        let mut r = get(&c, "/api/health").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(body_of(&mut r), br#"{"ok":true}"#);
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn header_values_are_utf8_else_latin1_and_too_many_fields_are_named() {
        // What Starlette, Werkzeug and Node send for a header given as "café" (Latin-1), and
        // what aiohttp sends (UTF-8).
        let head = b"HTTP/1.1 200 OK\r\nX-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9 \xe2\x9c\x93\r\n\
                     Content-Disposition: attachment; filename=\"r\xe9sum\xe9.pdf\"\r\n\r\n";
        let (_, status, headers, _) = parse_head(head, "b").unwrap().unwrap();
        assert_eq!(status, 200);
        let value = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(value("X-Latin"), Some("café"));
        assert_eq!(value("X-Utf8"), Some("café ✓"));
        assert_eq!(value("Content-Disposition"), Some("attachment; filename=\"résumé.pdf\""));
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let e = parse_head(&many, "the backend").unwrap_err().to_string();
        assert!(e.contains(&format!("more than {MAX_HEADERS} header fields")), "{e}");
    }

    #[test]
    fn close_delimited_body_and_stale_connections() {
        let o = test_origin::start();
        let c = client(&o);
        let mut r = get(&c, "/api/eof").unwrap();
        assert_eq!(r.body.len_hint(), None);
        assert_eq!(body_of(&mut r), b"until close");
        assert_eq!(c.idle_connections(), 0);
        // The origin drops this connection after answering; the next request must not fail.
        let mut r = get(&c, "/api/once").unwrap();
        assert_eq!(body_of(&mut r), b"ok");
        std::thread::sleep(Duration::from_millis(100));
        let mut r = get(&c, "/api/health").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(body_of(&mut r), br#"{"ok":true}"#);
    }

    #[test]
    fn stale_pooled_socket_is_retried_on_a_fresh_connection() {
        // A pooled socket whose peer vanished without the peek noticing yet: simulate it by
        // pooling a connection to a listener that accepts then resets on first data.
        let o = test_origin::start();
        let c = client(&o);
        let stale_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stale = TcpStream::connect(stale_listener.local_addr().unwrap()).unwrap();
        let (peer, _) = stale_listener.accept().unwrap();
        std::thread::spawn(move || {
            // Close as soon as the request arrives, without answering.
            let mut peer = peer;
            let mut b = [0u8; 1024];
            let _ = peer.read(&mut b);
        });
        c.push_idle(stale);
        let mut r = get(&c, "/api/health").unwrap();
        assert_eq!(body_of(&mut r), br#"{"ok":true}"#);
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn abort_unblocks_a_hanging_read_at_once() {
        let o = test_origin::start();
        let c = Arc::new(client(&o));
        let abort = Abort::new();
        let (c2, a2) = (c.clone(), abort.clone());
        let t = std::thread::spawn(move || get_with(&c2, "/api/hang", &a2));
        Origin::wait_for(&o.hangs, 1);
        let t0 = Instant::now();
        abort.abort();
        let result = t.join().unwrap();
        assert!(t0.elapsed() < Duration::from_millis(100), "{:?}", t0.elapsed());
        assert_eq!(result.unwrap_err(), LocalError::Aborted);
        Origin::wait_for(&o.hang_closed, 1);
        // Aborted before starting: no connection at all.
        let before = o.accepted.load(Ordering::SeqCst);
        assert_eq!(get_with(&c, "/api/health", &abort).unwrap_err(), LocalError::Aborted);
        assert_eq!(o.accepted.load(Ordering::SeqCst), before);
        assert_eq!(c.idle_connections(), 0);
    }

    fn get_with(c: &LocalClient, path: &str, abort: &Abort) -> Result<Response, LocalError> {
        c.send("GET", path, NO_HEADERS, Body::Bytes(b""), abort)
    }

    #[test]
    fn abort_mid_body_is_reported_as_aborted() {
        let o = test_origin::start();
        let c = client(&o);
        let abort = Abort::new();
        let mut r = get_with(&c, "/api/sse", &abort).unwrap();
        let mut buf = [0u8; 1024];
        assert!(r.body.read(&mut buf).unwrap() > 0);
        abort.abort();
        let err = r.body.read(&mut buf).unwrap_err();
        assert_eq!(LocalError::from_io(&err, "x"), LocalError::Aborted);
        drop(r);
        assert_eq!(c.idle_connections(), 0);
    }

    #[test]
    fn errors_are_classified() {
        let o = test_origin::start();
        let quick = Timeouts {
            connect: Duration::from_secs(3),
            head: Duration::from_millis(200),
            body_gap: Duration::from_millis(200),
        };
        let c = LocalClient::with_timeouts("127.0.0.1", o.port, quick);
        let t0 = Instant::now();
        let e = get(&c, "/api/hang").unwrap_err();
        assert!(matches!(e, LocalError::Timeout { .. }), "{e}");
        assert_eq!(e.code(), ErrorCode::BackendTimeout);
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(e.to_string().contains(&format!("127.0.0.1:{}", o.port)), "{e}");

        let e = get(&c, "/api/close").unwrap_err();
        assert_eq!(e.code(), ErrorCode::BackendUnreachable, "{e}");

        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = get(&LocalClient::new("127.0.0.1", port), "/api/health").unwrap_err();
        assert!(matches!(e, LocalError::Connect { .. }), "{e}");
        assert_eq!(e.code(), ErrorCode::BackendUnreachable);
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");

        // Nothing can be smuggled through the request line or headers.
        let bad = [("X-A", "1\r\nX-B: 2")];
        assert!(c.send("GET", "/api/health", &bad, Body::Bytes(b""), &Abort::new()).is_err());
        assert!(
            c.send("GET", "/api/x HTTP/1.1\r\n", NO_HEADERS, Body::Bytes(b""), &Abort::new())
                .is_err()
        );
        assert!(c.send("GE T", "/api/x", NO_HEADERS, Body::Bytes(b""), &Abort::new()).is_err());
    }

    #[test]
    fn a_shorter_socket_timeout_never_cuts_a_longer_limit_short() {
        // The socket keeps the shortest read timeout it was given; a phase with a longer limit
        // must still wait its full limit (and no longer).
        let o = test_origin::start();
        let t = Timeouts {
            connect: Duration::from_secs(3),
            head: Duration::from_millis(600),
            body_gap: Duration::from_millis(250),
        };
        let c = LocalClient::with_timeouts("127.0.0.1", o.port, t);
        // Body reads (250 ms) lower the socket's timeout below the head limit (600 ms)...
        let mut r = get(&c, "/api/sse").unwrap();
        assert_eq!(body_of(&mut r).len(), 5 * "event: tick\ndata: {\"n\":0}\n\n".len());
        assert_eq!(c.idle_connections(), 1);
        // ...and the next head on that connection still gets its 600 ms.
        let t0 = Instant::now();
        let e = get(&c, "/api/hang").unwrap_err();
        let waited = t0.elapsed();
        assert!(
            matches!(e, LocalError::Timeout { phase: "waiting for the response head", .. }),
            "{e}"
        );
        assert!(waited >= Duration::from_millis(590), "{waited:?}");
        assert!(waited < Duration::from_millis(1500), "{waited:?}");
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);

        // The other way round: a short head limit, then a longer body gap.
        let t = Timeouts {
            connect: Duration::from_secs(3),
            head: Duration::from_millis(100),
            body_gap: Duration::from_millis(400),
        };
        let c = LocalClient::with_timeouts("127.0.0.1", o.port, t);
        assert_eq!(body_of(&mut get(&c, "/api/health").unwrap()), br#"{"ok":true}"#);
        let mut r = get(&c, "/api/stall").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(r.body.read(&mut buf).unwrap(), 2);
        let t0 = Instant::now();
        let err = r.body.read(&mut buf).unwrap_err();
        let waited = t0.elapsed();
        let e = LocalError::from_io(&err, "x");
        assert!(
            matches!(e, LocalError::Timeout { phase: "between two reads of the body", .. }),
            "{e}"
        );
        assert!(waited >= Duration::from_millis(390), "{waited:?}");
        assert!(waited < Duration::from_millis(1300), "{waited:?}");
    }

    #[test]
    fn liveness_peek_sees_eof_and_stray_bytes_and_leaves_the_socket_blocking() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (a, listener.accept().unwrap().0)
        };
        let (a, mut b) = pair();
        assert!(still_open(&a));
        // Still blocking: a read waits for its timeout instead of failing at once.
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let t0 = Instant::now();
        assert!(is_timeout(&(&a).read(&mut [0u8; 1]).unwrap_err()));
        assert!(t0.elapsed() >= Duration::from_millis(40));
        b.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!still_open(&a));
        // The peek consumed nothing.
        assert_eq!((&a).read(&mut [0u8; 4]).unwrap(), 1);
        let (a, b) = pair();
        drop(b);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!still_open(&a));
    }

    /// A backend that answers before it has read the body, then closes: its answer reaches
    /// the caller instead of the failed write.
    #[test]
    fn an_answer_given_before_the_body_was_read_is_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = [0u8; 256];
            let _ = s.read(&mut head);
            let answer = "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!";
            s.write_all(answer.as_bytes()).unwrap();
            // Closed with the body unread: the client's next writes fail.
        });
        let big = vec![b'x'; 32 << 20];
        let c = LocalClient::new("127.0.0.1", port);
        let mut r = c
            .send("POST", "/api/upload", NO_HEADERS, Body::Bytes(&big), &Abort::new())
            .expect("the early answer");
        assert_eq!(r.status, 413);
        assert_eq!(body_of(&mut r), b"big!");
    }

    #[test]
    fn post_bodies_and_content_length() {
        let o = test_origin::start();
        let c = client(&o);
        let big = test_origin::noise(300 << 10, 3);
        let headers = [("Content-Type", "application/octet-stream")];
        let mut r =
            c.send("POST", "/api/echo", &headers, Body::Bytes(&big), &Abort::new()).unwrap();
        assert_eq!(r.body.len_hint(), Some(big.len() as u64));
        assert_eq!(body_of(&mut r), big);
        // POST without a body still says Content-Length: 0 (else the origin would wait).
        let mut r =
            c.send("POST", "/api/echo", NO_HEADERS, Body::Bytes(b""), &Abort::new()).unwrap();
        assert!(body_of(&mut r).is_empty());
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
    }

    /// The SIMD decoder with its scalar fallback accepts exactly what the lenient scalar
    /// engine accepts, with the same bytes (chunk edges included).
    #[test]
    fn base64_bodies_decode_like_the_lenient_engine() {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let check = |text: &str| {
            let want = BASE64_LENIENT.decode(text).ok();
            let got = Body::base64(text).ok().and_then(|body| {
                let mut out = Vec::new();
                body.write_with(|b| {
                    out.extend_from_slice(b);
                    Ok(())
                })
                .ok()
                .map(|()| out)
            });
            assert_eq!(got, want, "{:?}… ({} bytes)", &text[..text.len().min(8)], text.len());
        };
        // At the 64 KiB chunk edge: lengths around it, padding before and after it, a bad
        // symbol on either side of it.
        let whole = "QUJD".repeat(BASE64_CHUNK / 4 + 2);
        for len in BASE64_CHUNK - 4..BASE64_CHUNK + 6 {
            check(&whole[..len]);
            check(&format!("{}==", &whole[..len]));
            check(&format!("{}=", &whole[..len]));
        }
        for at in [BASE64_CHUNK - 2, BASE64_CHUNK - 1, BASE64_CHUNK, BASE64_CHUNK + 1] {
            for bad in ["=", "!", "\n"] {
                let mut text = whole.clone();
                text.replace_range(at..at + 1, bad);
                check(&text);
            }
        }
        for round in 0..4000 {
            let len =
                if round % 50 == 0 { BASE64_CHUNK + next(300) as usize } else { next(40) as usize };
            let mut text: Vec<u8> = (0..len).map(|_| alphabet[next(64) as usize]).collect();
            match next(4) {
                0 => text.extend_from_slice(b"="),
                1 => text.extend_from_slice(b"=="),
                2 if !text.is_empty() => {
                    let at = next(text.len() as u64) as usize;
                    text[at] = b"=! \n-_"[next(6) as usize];
                }
                _ => {}
            }
            check(&String::from_utf8(text).unwrap());
        }
    }

    #[test]
    fn base64_bodies_are_decoded_on_the_way_out() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        let o = test_origin::start();
        let c = client(&o);
        // Sizes around the padding cases, the coalescing threshold and the decoding chunk.
        for len in [0, 1, 2, 3, 1000, 64 << 10, (300 << 10) + 1] {
            let data = test_origin::noise(len, len as u64);
            for text in [STANDARD.encode(&data), STANDARD_NO_PAD.encode(&data)] {
                let body = Body::base64(&text).unwrap();
                assert_eq!(body.len(), len);
                let mut r = c.send("POST", "/api/echo", NO_HEADERS, body, &Abort::new()).unwrap();
                assert_eq!(r.body.len_hint(), Some(len as u64));
                assert!(body_of(&mut r) == data, "{len} bytes changed on the way");
            }
        }
        let reused = o.accepted.load(Ordering::SeqCst);

        // A length no base64 has is refused before anything is sent.
        assert!(matches!(Body::base64("QUFBQ"), Err(LocalError::BadBody { .. })));

        // A bad character, or padding that ends a chunk in the middle of the text, is found
        // while sending: the request fails BAD_REQUEST and its connection is not reused.
        let mut bad_char = STANDARD.encode(test_origin::noise(300 << 10, 9));
        bad_char.replace_range(200_000..200_001, "!");
        let mut mid_pad = "A".repeat(BASE64_CHUNK - 4);
        mid_pad.push_str("QQ==");
        mid_pad.push_str(&"QUFB".repeat(20_000));
        for text in [bad_char, mid_pad] {
            let body = Body::base64(&text).unwrap();
            let e = c.send("POST", "/api/echo", NO_HEADERS, body, &Abort::new()).unwrap_err();
            assert!(matches!(e, LocalError::BadBody { .. }), "{e:?}");
            assert_eq!(e.code(), ErrorCode::BadRequest);
        }
        // The offset of a bad character counts from the start of the text.
        let mut late = "QUFB".repeat(BASE64_CHUNK / 2);
        late.replace_range(BASE64_CHUNK + 5..BASE64_CHUNK + 6, "!");
        let e =
            c.send("POST", "/api/echo", NO_HEADERS, Body::base64(&late).unwrap(), &Abort::new());
        let e = e.unwrap_err().to_string();
        assert!(e.contains(&format!("offset {}", BASE64_CHUNK + 5)), "{e}");
        // Padding that no data needs (it would make a last chunk of padding alone, after
        // the whole Content-Length was written) is refused before anything is sent.
        let whole_chunks = "QUFB".repeat(BASE64_CHUNK / 2);
        for text in [
            format!("{whole_chunks}="),
            format!("{whole_chunks}=="),
            format!("{whole_chunks}QUI=="),
        ] {
            assert!(matches!(Body::base64(&text), Err(LocalError::BadBody { .. })), "{text:.8}");
        }
        for (text, len) in [("QQ", 1), ("QQ=", 1), ("QQ==", 1), ("QUI", 2), ("QUI=", 2)] {
            assert_eq!(Body::base64(text).unwrap().len(), len, "{text}");
        }
        let mut r =
            c.send("POST", "/api/echo", NO_HEADERS, Body::Bytes(b"ok"), &Abort::new()).unwrap();
        assert_eq!(body_of(&mut r), b"ok");
        assert_eq!(
            o.accepted.load(Ordering::SeqCst),
            reused + 3,
            "a broken body's connection was reused"
        );
    }
}
