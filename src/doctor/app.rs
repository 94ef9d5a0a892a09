//! The doctor's side of the relay: what the phone does (`/ws/app`, request frames), with the
//! doctor's own diagnostic credential.

use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::bridge::relay_io::{self, Ws, tcp_of as tcp};
use crate::protocol::{ErrorCode, Frame, RequestFrame};

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

/// Connects to `app_relay_url?bridgeId=…` with `secret`, as the app does (the bridge's own
/// connect path, so the doctor exercises exactly the TLS and handshake code the bridge uses).
pub fn connect(
    app_relay_url: &str,
    bridge_id: &str,
    secret: &str,
    timeout: Duration,
) -> Result<AppSocket, AppError> {
    let url = format!("{app_relay_url}?bridgeId={bridge_id}");
    match relay_io::open_socket(&url, secret, &[], timeout) {
        Ok((ws, _)) => Ok(AppSocket { ws }),
        Err(relay_io::ConnectError::Refused(status, message)) => {
            Err(AppError::Refused(status, message))
        }
        Err(relay_io::ConnectError::Failed(message)) => Err(AppError::Failed(message)),
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
            conn: None,
            method: "GET".to_owned(),
            path: path.to_owned(),
            headers: [("accept".to_owned(), "application/json".to_owned())].into_iter().collect(),
            body: None,
            body_base64: false,
            length: None,
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
