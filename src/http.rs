//! Minimal HTTP/1.1 message handling for the crate's own servers and clients: parse a request
//! head out of a byte buffer (so non-blocking readers can call it again as bytes arrive), build
//! responses, read a status line; and the socket calls they share (reads into spare capacity,
//! a send that never waits, an idle socket's liveness, a prompt ACK, what a timeout looks like).
//!
//! Deliberately small: heads are parsed with `httparse`, bodies are `Content-Length` only.

use std::fmt::Write as _;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Largest head accepted, in bytes: a request's by the crate's servers, a response's by the
/// bridge's client ([`crate::bridge::local_http`]).
pub const MAX_HEAD: usize = 16 << 10;

/// Most header fields accepted in a head (request or response, as [`MAX_HEAD`]).
pub const MAX_HEADERS: usize = 64;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// Header names (as sent) and values (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    /// Bytes the head occupied in the buffer.
    pub len: usize,
    /// HTTP minor version: 0 or 1.
    pub minor_version: u8,
}

/// The outcome of [`parse_head`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A complete head.
    Complete(Head),
    /// The head is unusable: answer with this status and message, then close.
    Invalid(u16, &'static str),
}

/// Parses a request head from the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            Parsed::Invalid(431, "request head too large")
        }
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(Head {
            method: req.method.unwrap_or_default().to_owned(),
            target: req.path.unwrap_or_default().to_owned(),
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                .collect(),
            len,
            minor_version: req.version.unwrap_or(1),
        }),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            Parsed::Invalid(431, "request head too large")
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => Parsed::Invalid(431, "too many headers"),
        Err(_) => Parsed::Invalid(400, "malformed request head"),
    }
}

impl Head {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// True when a comma-separated header contains `token` (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// A query parameter's value (percent-decoding is not needed for the ids used here).
    pub fn query(&self, key: &str) -> Option<&str> {
        let query = self.target.split_once('?')?.1;
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then_some(v)
        })
    }

    /// The bearer token of the `Authorization` header.
    pub fn bearer(&self) -> Option<&str> {
        let value = self.header("authorization")?;
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    /// The declared body length. Chunked request bodies are refused (`Err`). A length that
    /// fits a `u64` but not a `usize` (past 4 GiB on a 32-bit target) is `usize::MAX`, which
    /// every caller refuses as too large, as it would that length on a 64-bit target.
    pub fn content_length(&self) -> Result<usize, &'static str> {
        if self.header("transfer-encoding").is_some() {
            return Err("chunked request bodies are not supported; send Content-Length");
        }
        // One Content-Length of digits only (RFC 9112 §6.3): two of them, or a sign, could
        // be read differently by another parser on the way, and leave a request behind.
        let mut values =
            self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length"));
        let Some((_, value)) = values.next() else { return Ok(0) };
        let value = value.trim();
        if values.next().is_some() {
            return Err("more than one Content-Length");
        }
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err("invalid Content-Length");
        }
        let len: u64 = value.parse().map_err(|_| "invalid Content-Length")?;
        Ok(usize::try_from(len).unwrap_or(usize::MAX))
    }

    /// True when the client asked to close the connection after this exchange.
    pub fn wants_close(&self) -> bool {
        if self.minor_version == 0 {
            !self.header_has_token("connection", "keep-alive")
        } else {
            self.header_has_token("connection", "close")
        }
    }

    /// True for a WebSocket upgrade request.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.method == "GET"
            && self.header_has_token("connection", "upgrade")
            && self.header_has_token("upgrade", "websocket")
    }
}

/// The status code of an answer that starts with an HTTP/1.x status line (`HTTP/1.1 200 …`);
/// `None` when it does not (yet) start with one.
pub fn status_of(answer: &[u8]) -> Option<u16> {
    let rest = answer.strip_prefix(b"HTTP/1.")?;
    if !rest.get(..2)?.is_ascii() {
        return None;
    }
    std::str::from_utf8(rest.get(2..5)?).ok()?.parse().ok()
}

/// The reason phrase for the status codes this crate sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// One read from `stream` appended to `buf`: at most `max` bytes, into the vector's spare
/// capacity (reserved here), so no buffer is zero-filled first. A read buffer that is zeroed
/// before every read cost 16–128 KiB of writes per small message. Returns the bytes read
/// (`0`: end of stream); the socket's read timeout applies (`WouldBlock` / `TimedOut`).
pub fn recv_appending(stream: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    recv_into_spare(stream, buf, max, 0)
}

/// As [`recv_appending`], but never waits: `WouldBlock` when nothing has arrived (the socket
/// itself stays blocking).
pub fn recv_appending_now(stream: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    recv_into_spare(stream, buf, max, libc::MSG_DONTWAIT)
}

fn recv_into_spare(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    flags: libc::c_int,
) -> io::Result<usize> {
    buf.reserve(max);
    let len = buf.len();
    let room = (buf.capacity() - len).min(max);
    // SAFETY: `buf` has at least `room` bytes of allocated spare capacity starting at
    // `len`, which `recv` may write (any bytes are valid `u8`s); the descriptor belongs to
    // `stream`, borrowed for the whole call. `recv` writes at most `room` bytes and returns
    // how many, and only those are added to the length.
    let n =
        unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().add(len).cast(), room, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the `n` bytes after `len` were just written by `recv` (n <= room).
    unsafe { buf.set_len(len + n) };
    Ok(n)
}

/// `send` flag that turns SIGPIPE into an `EPIPE` error (elsewhere the Rust runtime already
/// ignores SIGPIPE).
#[cfg(any(target_os = "linux", target_os = "android"))]
const NO_SIGPIPE: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const NO_SIGPIPE: libc::c_int = 0;

/// True when an idle socket has neither been closed by the peer nor received stray bytes: a
/// one-byte peek that would block. One `recv(MSG_PEEK | MSG_DONTWAIT)`, which leaves the
/// socket blocking (no `set_nonblocking` round trip).
pub fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    loop {
        // SAFETY: `stream` is borrowed for the whole call, so its descriptor stays open and
        // refers to this socket; `probe` is a live, writable local buffer of exactly the 1 byte
        // passed as the length, and `recv` writes at most that many bytes into it. MSG_PEEK
        // consumes nothing and MSG_DONTWAIT applies to this call only, so neither the socket's
        // data nor its flags change.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                probe.as_mut_ptr().cast(),
                probe.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            // 0: the peer closed it; more: stray bytes no request asked for. Stale either way.
            return false;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock => return true,
            io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// A timeout on a blocking socket (`SO_RCVTIMEO`/`SO_SNDTIMEO` surface as `WouldBlock` on
/// Unix, `TimedOut` elsewhere).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Sends at once the ACK the kernel holds back for what `stream` has received, before a read
/// that waits for the rest of a response already begun.
///
/// A server that writes a response in two pieces without `TCP_NODELAY` (uvicorn does: the
/// original tool's FastAPI backend) holds the second piece until the first is acknowledged
/// (Nagle), and Linux delays that ACK by 40 ms on a connection in use: every request on a
/// kept-alive connection paid it. `TCP_QUICKACK` set while an ACK is pending sends it now;
/// after a read that already holds the whole answer nothing calls this. Elsewhere a no-op
/// (macOS has no such option).
pub fn ack_now(stream: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and an int option of the right size; a failure
        // only leaves the ACK delayed.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stream;
}

/// One `send` of `data` that never waits: the bytes the socket took now (`WouldBlock` when it
/// took none). No SIGPIPE on a closed peer: that is an `EPIPE` error.
pub fn send_now(stream: &TcpStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a live slice of `data.len()` readable bytes and the descriptor belongs
    // to `stream`, borrowed for the whole call; `send` only reads from the buffer.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | NO_SIGPIPE,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Builds a complete response with a body.
pub fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
    close: bool,
) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if !content_type.is_empty() {
        let _ = write!(head, "Content-Type: {content_type}\r\n");
    }
    let _ = write!(head, "Content-Length: {}\r\n", body.len());
    for (name, value) in extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// `response` (as [`response`] builds it) cut after its head: the answer to `HEAD`, whose
/// `Content-Length` gives the size a `GET` would get but which carries no body (RFC 9110 §9.3.2;
/// on a kept-alive connection a body would be read as the start of the next response).
pub fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// Builds a JSON response with `Cache-Control: no-store`.
pub fn json_response(status: u16, body: &str, close: bool) -> Vec<u8> {
    response(status, "application/json", body.as_bytes(), &[("Cache-Control", "no-store")], close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_of_reads_an_http_1_status_line_only() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(status_of(b"HTTP/1.0 502 Bad Gateway"), Some(502));
        assert_eq!(status_of(b"HTTP/1.1 20"), None);
        assert_eq!(status_of(b"HTTP/2 200 OK"), None);
        assert_eq!(status_of(b"SSH-2.0-OpenSSH_9.6"), None);
        assert_eq!(status_of("HTTP/1.\u{fffd}200 OK".as_bytes()), None);
    }

    #[test]
    fn one_content_length_of_digits_only() {
        let len = |headers: &str| {
            let raw = format!("POST / HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
            let Parsed::Complete(head) = parse_head(raw.as_bytes()) else { panic!("{raw}") };
            head.content_length()
        };
        assert_eq!(len(""), Ok(0));
        assert_eq!(len("Content-Length: 12\r\n"), Ok(12));
        assert_eq!(len("content-length:  7 \r\n"), Ok(7));
        assert!(len("Content-Length: 0\r\nContent-Length: 47\r\n").is_err(), "two lengths");
        assert!(len("Content-Length: 5\r\nContent-Length: 5\r\n").is_err(), "repeated");
        for bad in ["+2", "-1", "0x10", "", "1 2", "99999999999999999999999"] {
            assert!(len(&format!("Content-Length: {bad}\r\n")).is_err(), "{bad:?}");
        }
        assert!(len("Transfer-Encoding: chunked\r\n").is_err());
    }

    #[test]
    fn a_length_past_32_bits_is_too_large_not_invalid_or_wrapped() {
        // 2^32 + 1: on a 32-bit target (armv7) it neither wraps to 1 nor reads as malformed,
        // so the caller refuses it as too large (413), as on a 64-bit one.
        let raw = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4294967297\r\n\r\n";
        let Parsed::Complete(head) = parse_head(raw.as_bytes()) else { panic!("{raw}") };
        let len = head.content_length();
        assert!(len.is_ok_and(|n| n >= u32::MAX as usize), "{len:?}");
    }

    #[test]
    fn parses_incrementally() {
        let raw = b"GET /ws/app?bridgeId=abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer hcs_1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\nrest";
        assert_eq!(parse_head(&raw[..20]), Parsed::Partial);
        let Parsed::Complete(head) = parse_head(raw) else { panic!("not complete") };
        assert_eq!(head.len, raw.len() - 4);
        assert_eq!(head.path(), "/ws/app");
        assert_eq!(head.query("bridgeId"), Some("abc"));
        assert_eq!(head.bearer(), Some("hcs_1"));
        assert!(head.is_websocket_upgrade());
        assert!(!head.wants_close());
    }

    #[test]
    fn refuses_floods_and_garbage() {
        let mut flood = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            flood.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        flood.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&flood), Parsed::Invalid(431, "too many headers"));
        assert!(matches!(parse_head(b"\x16\x03\x01garbage\r\n\r\n"), Parsed::Invalid(400, _)));
        let big = vec![b'a'; MAX_HEAD + 1];
        assert!(matches!(
            parse_head(&[b"GET /".as_slice(), &big].concat()),
            Parsed::Invalid(431, _)
        ));
    }

    #[test]
    fn builds_responses() {
        let r = json_response(404, "{}", true);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("Cache-Control: no-store\r\n"));
        assert!(text.ends_with("Connection: close\r\n\r\n{}"));
    }
}
