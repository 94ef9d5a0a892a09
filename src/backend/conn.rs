//! One client connection of the built-in backend: reading requests (head via
//! [`crate::http::parse_head`], `Content-Length` bodies with a per-route cap) and writing
//! responses, fixed-length or chunked (so SSE leaves as it arrives).

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::bridge::local_http::Abort;
use crate::http::{Head, Parsed, parse_head, reason};

/// How long a kept-alive connection may sit idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// How long a client may take to send one whole request once it started.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Granularity of the idle wait (how fast a stop is noticed between requests).
const IDLE_SLICE: Duration = Duration::from_millis(250);

/// Largest piece read from a socket at once.
const READ_CHUNK: usize = 64 << 10;

/// A complete request.
#[derive(Debug)]
pub struct Request {
    /// The parsed head.
    pub head: Head,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

/// What reading the next request gave.
#[derive(Debug)]
pub enum Next {
    /// A request.
    Request(Request),
    /// The client closed (or idled out, or the server stops): close quietly.
    Closed,
    /// The request is unusable: answer this status and message, then close.
    Refuse(u16, String),
}

/// A client connection: the socket and bytes read past the last request.
pub struct Conn {
    /// The socket (TCP_NODELAY set).
    pub stream: TcpStream,
    /// Bytes received but not consumed yet.
    buf: Vec<u8>,
}

impl Conn {
    /// Wraps an accepted socket.
    pub fn new(stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        Conn { stream, buf: Vec::new() }
    }

    /// Reads the next request. `max_body` gives the body cap for a head (by route); `stop`
    /// ends an idle wait.
    pub fn next(&mut self, stop: &AtomicBool, max_body: impl Fn(&Head) -> usize) -> Next {
        let idle_until = Instant::now() + IDLE_TIMEOUT;
        let mut request_until: Option<Instant> = None;
        let head = loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf) {
                    Parsed::Complete(h) => break h,
                    Parsed::Invalid(status, msg) => return Next::Refuse(status, msg.into()),
                    Parsed::Partial => {}
                }
                request_until.get_or_insert_with(|| Instant::now() + REQUEST_TIMEOUT);
            }
            let now = Instant::now();
            let until = request_until.unwrap_or(idle_until);
            if now >= until {
                return match request_until {
                    Some(_) => Next::Refuse(408, "the request head took too long".into()),
                    None => Next::Closed,
                };
            }
            if request_until.is_none() && stop.load(Ordering::SeqCst) {
                return Next::Closed;
            }
            let slice = if request_until.is_some() { until - now } else { IDLE_SLICE };
            match self.fill(slice.min(until - now)) {
                Ok(0) => return Next::Closed,
                Ok(_) | Err(Fill::Timeout) => {}
                Err(Fill::Broken) => return Next::Closed,
            }
        };
        self.buf.drain(..head.len);
        let len = match head.content_length() {
            Ok(n) => n,
            // Chunked bodies: 411 asks for a Content-Length; a malformed one is a 400.
            Err(msg) if head.header("transfer-encoding").is_some() => {
                return Next::Refuse(411, msg.into());
            }
            Err(msg) => return Next::Refuse(400, msg.into()),
        };
        let cap = max_body(&head);
        if len > cap {
            return Next::Refuse(
                413,
                format!("request body too large ({len} bytes; at most {cap})"),
            );
        }
        if len > self.buf.len() && head.header_has_token("expect", "100-continue") {
            let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let until = request_until.unwrap_or_else(|| Instant::now() + REQUEST_TIMEOUT);
        while self.buf.len() < len {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Refuse(408, "the request body took too long".into());
            }
            match self.fill(left) {
                Ok(0) | Err(Fill::Broken) => return Next::Closed,
                Ok(_) | Err(Fill::Timeout) => {}
            }
        }
        let body: Vec<u8> = self.buf.drain(..len).collect();
        Next::Request(Request { head, body })
    }

    /// One read into `buf`, waiting at most `wait`.
    fn fill(&mut self, wait: Duration) -> Result<usize, Fill> {
        let _ = self.stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        crate::http::recv_appending(&self.stream, &mut self.buf, READ_CHUNK).map_err(|e| {
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Fill::Timeout,
                _ => Fill::Broken,
            }
        })
    }

    /// Writes a complete response.
    pub fn respond(
        &mut self,
        status: u16,
        content_type: &str,
        body: &[u8],
        extra: &[(&str, &str)],
        close: bool,
    ) -> io::Result<()> {
        let bytes = crate::http::response(status, content_type, body, extra, close);
        self.stream.write_all(&bytes)
    }

    /// Writes a JSON response (`Cache-Control: no-store`).
    pub fn json(&mut self, status: u16, value: &serde_json::Value, close: bool) -> io::Result<()> {
        self.stream.write_all(&crate::http::json_response(status, &value.to_string(), close))
    }

    /// A JSON error body `{"error":{"message","type","code"}}` (OpenAI style).
    pub fn error(&mut self, status: u16, code: &str, message: &str, close: bool) -> io::Result<()> {
        let v = error_json(code, message);
        self.json(status, &v, close)
    }

    /// Starts a chunked response; the body follows through the returned writer.
    pub fn start_chunked(
        &mut self,
        status: u16,
        headers: &[(String, String)],
        close: bool,
    ) -> io::Result<Chunked<'_>> {
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (n, v) in headers {
            let _ = write!(head, "{n}: {v}\r\n");
        }
        head.push_str("Transfer-Encoding: chunked\r\n");
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        Ok(Chunked { stream: &mut self.stream, pending: head.into_bytes() })
    }

    /// Writes a head with a known body length; the body follows through [`Conn::stream`].
    pub fn start_fixed(
        &mut self,
        status: u16,
        headers: &[(String, String)],
        len: Option<u64>,
        close: bool,
    ) -> io::Result<()> {
        let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (n, v) in headers {
            let _ = write!(head, "{n}: {v}\r\n");
        }
        if let Some(len) = len {
            let _ = write!(head, "Content-Length: {len}\r\n");
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes())
    }
}

/// Why [`Conn::fill`] read nothing.
enum Fill {
    /// The wait passed.
    Timeout,
    /// The socket failed.
    Broken,
}

/// `{"error":{"message","type","code"}}`.
pub fn error_json(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"message": message, "type": code, "code": code}})
}

/// A chunked body being written. The head is sent together with the first chunk (one
/// segment); every chunk is one `write_all`, so an SSE event leaves at once.
pub struct Chunked<'a> {
    stream: &'a mut TcpStream,
    /// Bytes not written yet (the head until the first chunk).
    pending: Vec<u8>,
}

impl Chunked<'_> {
    /// Sends the head now (without waiting for a first chunk).
    pub fn flush_head(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.stream.write_all(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Writes one chunk (nothing for empty data).
    pub fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let _ = write!(ChunkHead(&mut self.pending), "{:x}\r\n", data.len());
        self.pending.extend_from_slice(data);
        self.pending.extend_from_slice(b"\r\n");
        let r = self.stream.write_all(&self.pending);
        self.pending.clear();
        r
    }

    /// Writes the last chunk.
    pub fn finish(mut self) -> io::Result<()> {
        self.pending.extend_from_slice(b"0\r\n\r\n");
        let r = self.stream.write_all(&self.pending);
        self.pending.clear();
        r
    }
}

/// `fmt::Write` into a byte vector.
struct ChunkHead<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for ChunkHead<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Aborts an upstream exchange when the client goes away while we wait on the upstream
/// (a cancel in the app closes the bridge's socket to us). Stops watching on drop.
pub struct DisconnectWatch {
    done: Arc<AtomicBool>,
}

impl DisconnectWatch {
    /// Watches `stream` (through a clone) and calls `abort.abort()` on EOF or error.
    pub fn start(stream: &TcpStream, abort: &Abort) -> DisconnectWatch {
        let done = Arc::new(AtomicBool::new(false));
        if let Ok(peer) = stream.try_clone() {
            let (done2, abort) = (done.clone(), abort.clone());
            let spawned =
                std::thread::Builder::new().name("backend-watch".into()).spawn(move || {
                    let _ = peer.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut probe = [0u8; 1];
                    while !done2.load(Ordering::SeqCst) {
                        match peer.peek(&mut probe) {
                            Ok(0) => {
                                abort.abort();
                                return;
                            }
                            // The client sent more (a pipelined request): nothing to watch for.
                            Ok(_) => return,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::WouldBlock
                                        | io::ErrorKind::TimedOut
                                        | io::ErrorKind::Interrupted
                                ) => {}
                            Err(_) => {
                                abort.abort();
                                return;
                            }
                        }
                    }
                });
            if spawned.is_err() {
                done.store(true, Ordering::SeqCst);
            }
        }
        DisconnectWatch { done }
    }
}

impl Drop for DisconnectWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Closes the connection both ways (after a refusal).
pub fn close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
}

/// Ends the writing side after an answer and reads what the client still sends, for at most
/// `limit`, then closes: closed with unread bytes, the connection would be reset, and the
/// client could lose the answer.
pub fn drain_and_close(stream: &TcpStream, limit: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let until = std::time::Instant::now() + limit;
    let mut sink = [0u8; 4096];
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match std::io::Read::read(&mut &*stream, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}
