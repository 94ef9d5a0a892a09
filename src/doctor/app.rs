//! The doctor's side of the relay: what the phone does (`/ws/app`, request frames), with the
//! doctor's own diagnostic credential.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::protocol::{self as p, ErrorCode, Frame, RequestFrame};

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// Why the app-side exchange failed.
#[derive(Debug)]
pub enum AppError {
    /// The relay refused the upgrade (status, message).
    Refused(u16, String),
    /// Network, TLS or protocol failure, or a deadline.
    Failed(String),
    /// The request was answered with `response.error`.
    Answered(ErrorCode, String),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Refused(status, msg) => {
                write!(f, "the relay refused the app ({status}): {msg}")
            }
            AppError::Failed(msg) => f.write_str(msg),
            AppError::Answered(code, msg) => {
                let code = serde_json::to_value(code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{code:?}"));
                write!(f, "{code}: {msg}")
            }
        }
    }
}

/// A connected app socket.
pub struct AppSocket {
    ws: Ws,
}

/// What came back for a request.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body (text; base64 bodies are left encoded).
    pub body: String,
}

fn tcp(ws: &Ws) -> &TcpStream {
    match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s,
        MaybeTlsStream::NativeTls(s) => s.get_ref(),
        _ => unreachable!("only plain and native-tls streams are built here"),
    }
}

/// Connects to `app_relay_url?bridgeId=…` with `secret`, as the app does.
pub fn connect(
    app_relay_url: &str,
    bridge_id: &str,
    secret: &str,
    timeout: Duration,
) -> Result<AppSocket, AppError> {
    let url = format!("{app_relay_url}?bridgeId={bridge_id}");
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| AppError::Failed(format!("bad app relay URL {app_relay_url}: {e}")))?;
    let uri = request.uri().clone();
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let tls = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let auth = HeaderValue::from_str(&format!("Bearer {secret}"))
        .map_err(|_| AppError::Failed("the diagnostic credential is malformed".into()))?;
    request.headers_mut().insert("Authorization", auth);
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        AppError::Failed(format!("{what} {host}:{port}: {e}"))
    };
    let addrs =
        (host.as_str(), port).to_socket_addrs().map_err(|e| failed("cannot resolve", &e))?;
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = stream.ok_or_else(|| match last {
        Some(e) => failed("cannot connect to", &e),
        None => failed("no address for", &"empty DNS answer"),
    })?;
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(timeout)).map_err(|e| failed("socket", &e))?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| failed("socket", &e))?;
    // The TLS handshake is done here, not inside tungstenite (which panics when a handshake
    // times out on a socket with a read timeout).
    let stream = if tls {
        let connector = native_tls::TlsConnector::new().map_err(|e| failed("TLS setup for", &e))?;
        match connector.connect(&host, stream) {
            Ok(s) => MaybeTlsStream::NativeTls(s),
            Err(native_tls::HandshakeError::WouldBlock(_)) => {
                return Err(failed("TLS handshake timed out with", &"no answer"));
            }
            Err(native_tls::HandshakeError::Failure(e)) => {
                return Err(failed("TLS handshake failed with", &e));
            }
        }
    } else {
        MaybeTlsStream::Plain(stream)
    };
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(AppSocket { ws }),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let message = serde_json::from_str::<p::ApiError>(&body)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            Err(AppError::Refused(status, message))
        }
        Err(tungstenite::HandshakeError::Failure(e)) => {
            Err(failed("WebSocket handshake failed with", &e))
        }
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            Err(failed("WebSocket handshake timed out with", &"no answer"))
        }
    }
}

impl AppSocket {
    /// The next frame, by `deadline`.
    pub fn next_frame(&mut self, deadline: Instant) -> Result<Frame, AppError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AppError::Failed("no answer through the relay in time".into()));
            }
            let _ = tcp(&self.ws).set_read_timeout(Some(left));
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str()).map_err(|e| {
                        AppError::Failed(format!(
                            "the relay sent a frame this version cannot read: {e}"
                        ))
                    });
                }
                Ok(Message::Close(c)) => {
                    let why = c
                        .map(|c| format!("{} {}", u16::from(c.code), c.reason))
                        .unwrap_or_default();
                    return Err(AppError::Failed(format!("the relay closed the app socket {why}")));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(AppError::Failed("no answer through the relay in time".into()));
                }
                Err(e) => return Err(AppError::Failed(format!("app socket: {e}"))),
            }
        }
    }

    /// Reads until `bridge.status` and returns whether the relay says the bridge is online.
    pub fn bridge_online(&mut self, deadline: Instant) -> Result<bool, AppError> {
        loop {
            if let Frame::BridgeStatus { online } = self.next_frame(deadline)? {
                return Ok(online);
            }
        }
    }

    /// Sends `GET path` and collects the answer (whole or streamed) by `deadline`.
    pub fn get(&mut self, id: &str, path: &str, deadline: Instant) -> Result<Answer, AppError> {
        let frame = Frame::Request(RequestFrame {
            id: id.to_owned(),
            client: None,
            method: "GET".to_owned(),
            path: path.to_owned(),
            headers: [("accept".to_owned(), "application/json".to_owned())].into_iter().collect(),
            body: None,
            body_base64: false,
        });
        let text = serde_json::to_string(&frame).map_err(|e| AppError::Failed(e.to_string()))?;
        self.ws
            .send(Message::text(text))
            .map_err(|e| AppError::Failed(format!("app socket: {e}")))?;
        let mut answer = Answer { status: 0, body: String::new() };
        loop {
            match self.next_frame(deadline)? {
                Frame::Response(r) if r.id == id => {
                    return Ok(Answer { status: r.status, body: r.body });
                }
                Frame::ResponseStart { id: rid, status, .. } if rid == id => answer.status = status,
                Frame::ResponseChunk { id: rid, body, .. }
                    if rid == id && answer.body.len() < 4096 =>
                {
                    answer.body.push_str(&body);
                }
                Frame::ResponseEnd { id: rid, .. } if rid == id => return Ok(answer),
                Frame::ResponseError { id: rid, code, message, .. } if rid == id => {
                    return Err(AppError::Answered(code, message));
                }
                Frame::Error { code, message } => return Err(AppError::Answered(code, message)),
                _ => {}
            }
        }
    }

    /// Closes the socket politely.
    pub fn close(mut self) {
        let _ = tcp(&self.ws).set_read_timeout(Some(Duration::from_millis(500)));
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}
