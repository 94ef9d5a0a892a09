//! `POST /api/chat`: an OpenAI chat-completions body, sent to the gateway's
//! `/v1/chat/completions` with `stream: true`, the SSE relayed as it arrives.
//!
//! - Uploaded files named in `attachments` (ids or `{id}` objects, added to the last user
//!   message) or as content parts `{"type":"file","file_id":…}` are expanded: images as data
//!   URLs, text inlined ([`super::uploads::Store::for_chat`]).
//! - `X-Hermes-Session-Id` (and `X-Hermes-Session-Key`, `Idempotency-Key`) go to the gateway;
//!   the gateway's `X-Hermes-Session-Id` comes back.
//! - A 429 from the gateway passes through with its `Retry-After`.
//! - Gateway down, refusing the key, or failing: HTTP 200 `text/event-stream` with one
//!   `event: error` (never a bare 500) — or, with `AI_API_KEY` set, the same request straight
//!   to the direct provider, marked `X-HermesChat-Backend: direct`.
//! - The gateway breaking or hanging mid-stream ends the stream with an error event.
//! - A malformed body is a 400 JSON error.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::Shared;
use super::conn::{Conn, DisconnectWatch, Request};
use super::proxy::{RELAY_CHUNK, downstream_headers, relay};
use super::upstream::{DEFAULT_DIRECT_MODEL, Direct, Upstream};
use crate::bridge::local_http::{Abort, Body, LocalError, Response};
use crate::gateway::{self, KeyCheck};

/// The header naming which backend answered: `gateway`, `direct` or `none`.
pub const BACKEND_HEADER: &str = "X-HermesChat-Backend";

/// The model asked of the gateway when the request names none.
pub const GATEWAY_MODEL: &str = "hermes-agent";

/// Request headers passed to the gateway as they are.
const PASSED_HEADERS: &[&str] =
    &["X-Hermes-Session-Id", "X-Hermes-Session-Key", "Idempotency-Key", "Accept-Language"];

/// Most messages accepted in one chat body.
const MAX_MESSAGES: usize = 2000;

/// Most bytes of an upstream error body read for the message.
const ERROR_BODY: u64 = 16 << 10;

/// Why the gateway could not answer.
enum Failure {
    /// No connection, or no answer in time.
    Down(LocalError),
    /// It answered with an error status.
    Refused {
        /// The status.
        status: u16,
        /// Its message.
        message: String,
    },
}

/// The SSE error event (with a final `[DONE]`) the app shows.
pub fn error_event(code: &str, message: &str, backend: &str) -> String {
    let data = json!({
        "error": {"message": message, "type": code, "code": code},
        "backend": backend,
    });
    format!("event: error\ndata: {data}\n\ndata: [DONE]\n\n")
}

/// Answers 200 `text/event-stream` holding one error event.
fn sse_error(
    c: &mut Conn,
    close: bool,
    code: &str,
    message: &str,
    backend: &str,
) -> io::Result<u16> {
    let body = error_event(code, message, backend);
    c.respond(
        200,
        "text/event-stream",
        body.as_bytes(),
        &[("Cache-Control", "no-cache"), (BACKEND_HEADER, backend)],
        close,
    )?;
    Ok(200)
}

/// Checks the body and expands attachments; the body to send on success.
pub fn prepare(raw: &[u8], store: &super::uploads::Store) -> Result<Value, String> {
    let mut body: Value =
        serde_json::from_slice(raw).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let obj = body.as_object_mut().ok_or("the body must be a JSON object")?;
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("the body needs a \"messages\" array")?;
    if messages.is_empty() || messages.len() > MAX_MESSAGES {
        return Err(format!("\"messages\" must hold 1 to {MAX_MESSAGES} messages"));
    }
    for (i, m) in messages.iter().enumerate() {
        let ok = m.get("role").is_some_and(Value::is_string)
            && m.get("content").is_none_or(|c| c.is_string() || c.is_array() || c.is_null());
        if !ok {
            return Err(format!(
                "messages[{i}] needs a string \"role\" and a string or array \"content\""
            ));
        }
    }
    if obj.get("stream").is_some_and(|s| !s.is_boolean() && !s.is_string()) {
        return Err("\"stream\" must be a boolean".into());
    }
    let mut attached = Vec::new();
    for key in ["attachments", "file_ids", "uploads"] {
        match obj.remove(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for item in items {
                    let id = item.as_str().or_else(|| item.get("id").and_then(Value::as_str));
                    match id {
                        Some(id) => attached.push(id.to_owned()),
                        None => return Err(format!("\"{key}\" items must be upload ids")),
                    }
                }
            }
            Some(_) => return Err(format!("\"{key}\" must be an array of upload ids")),
        }
    }
    let resolve = |id: &str| store.for_chat(id).ok_or_else(|| format!("no uploaded file {id:?}"));
    if let Some(Value::Array(messages)) = obj.get_mut("messages") {
        for m in messages.iter_mut() {
            if let Some(Value::Array(parts)) = m.get_mut("content") {
                for part in parts.iter_mut() {
                    let is_file = part
                        .get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| matches!(t, "file" | "input_file" | "upload"));
                    let id = part
                        .get("file_id")
                        .or_else(|| part.get("upload_id"))
                        .or_else(|| part.get("file").and_then(|f| f.get("file_id")))
                        .and_then(Value::as_str);
                    if let (true, Some(id)) = (is_file, id) {
                        *part = resolve(id)?;
                    }
                }
            }
        }
        if !attached.is_empty() {
            let parts = attached.iter().map(|id| resolve(id)).collect::<Result<Vec<_>, _>>()?;
            let last_user = messages
                .iter_mut()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                .ok_or("attachments need a user message")?;
            attach(last_user, parts);
        }
    }
    obj.insert("stream".into(), Value::Bool(true));
    if obj.get("model").is_none_or(|m| m.as_str().is_none_or(str::is_empty)) {
        obj.insert("model".into(), Value::String(GATEWAY_MODEL.into()));
    }
    Ok(body)
}

/// Adds content parts to a message: text-only parts are appended to a string content (the
/// most compatible form); anything else turns the content into a parts array.
fn attach(message: &mut Value, parts: Vec<Value>) {
    let all_text = parts.iter().all(|p| p.get("type").and_then(Value::as_str) == Some("text"));
    let content = message.get("content").cloned().unwrap_or(Value::Null);
    let new = match content {
        Value::String(s) if all_text => {
            let mut text = s;
            for p in &parts {
                text.push_str("\n\n");
                text.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""));
            }
            Value::String(text)
        }
        Value::Array(mut existing) => {
            existing.extend(parts);
            Value::Array(existing)
        }
        Value::String(s) => {
            let mut all = vec![json!({"type": "text", "text": s})];
            all.extend(parts);
            Value::Array(all)
        }
        _ => Value::Array(parts),
    };
    message["content"] = new;
}

/// `POST /api/chat`.
pub fn handle(shared: &Arc<Shared>, req: &Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let body = match prepare(&req.body, &shared.uploads) {
        Ok(b) => b,
        Err(msg) => {
            c.error(400, "invalid_request_error", &msg, close)?;
            return Ok(400);
        }
    };
    let payload = serde_json::to_vec(&body).map_err(io::Error::other)?;
    let config = shared.upstream.config();
    let client = shared.upstream.client(&config);
    let mut headers = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        ("Accept".to_owned(), "text/event-stream".to_owned()),
    ];
    headers.extend(Upstream::auth_header(&config));
    for name in PASSED_HEADERS {
        if let Some(v) = req.head.header(name) {
            headers.push(((*name).to_owned(), v.to_owned()));
        }
    }
    let abort = Abort::new();
    let watch = DisconnectWatch::start(&c.stream, &abort);
    let failure = match client.send(
        "POST",
        "/v1/chat/completions",
        &headers,
        Body::Bytes(&payload),
        &abort,
    ) {
        Ok(resp) if (200..300).contains(&resp.status) => {
            shared.upstream.note_key(&config, false);
            let r = stream(resp, c, close, "gateway");
            drop(watch);
            return r;
        }
        Ok(resp) if resp.status == 429 => {
            let extra = [(BACKEND_HEADER.to_owned(), "gateway".to_owned())];
            return relay(resp, c, &extra, close, false);
        }
        Ok(mut resp) => {
            let mut text = Vec::new();
            let _ = (&mut resp.body).take(ERROR_BODY).read_to_end(&mut text);
            Failure::Refused { status: resp.status, message: upstream_message(&text) }
        }
        Err(LocalError::Aborted) => return Err(io::Error::other("the client went away")),
        Err(e) => Failure::Down(e),
    };
    drop(watch);
    let addr = config.addr();
    let (code, message, fallback) = match &failure {
        Failure::Down(e) => {
            let code = if matches!(e, LocalError::Timeout { .. }) {
                "gateway_timeout"
            } else {
                "gateway_offline"
            };
            let hint = gateway::start_hint(&config, gateway::Platform::current());
            let msg = format!(
                "The Hermes gateway ({addr}) is not reachable: {e}. Restart it from the app, or \
                 {hint}."
            );
            (code, msg, true)
        }
        Failure::Refused { status: status @ (401 | 403), message } => {
            shared.upstream.note_key(&config, true);
            // Named by what is really wrong (no key at all, or another key than the
            // gateway's), with the files the key is read from.
            let has_key = config.key.as_deref().is_some_and(|k| !k.trim().is_empty());
            let check = if has_key { KeyCheck::Refused(*status) } else { KeyCheck::Missing };
            let (what, fix) = gateway::key_trouble(&config, &check, gateway::Platform::current())
                .unwrap_or_default();
            let msg = format!(
                "The Hermes gateway ({addr}) is up, but {what} (it said: {message}). To fix it: \
                 {fix}."
            );
            ("gateway_auth", msg, true)
        }
        Failure::Refused { status, message } => (
            "gateway_error",
            format!("The Hermes gateway ({addr}) answered HTTP {status}: {message}"),
            *status >= 500,
        ),
    };
    shared.log(&format!("chat: gateway failed ({code})"));
    match (&shared.settings.direct, fallback) {
        (Some(d), true) => direct(shared, d, body, c, close, &message),
        _ => sse_error(c, close, code, &message, "none"),
    }
}

/// The message of an OpenAI-style error body, else its start.
fn upstream_message(body: &[u8]) -> String {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let msg = v
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message").or_else(|| v.get("error")).or_else(|| v.get("detail"))
        })
        .and_then(|m| m.as_str().map(str::to_owned).or_else(|| Some(m.to_string())));
    let text = msg.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let text = text.trim();
    if text.is_empty() { "no details".into() } else { text.chars().take(300).collect() }
}

/// Relays a successful gateway answer: SSE chunk by chunk (or a JSON body as it is). A
/// failure mid-stream ends the stream with an error event.
fn stream(mut resp: Response, c: &mut Conn, close: bool, backend: &str) -> io::Result<u16> {
    let ct = resp.header("content-type").unwrap_or("").to_ascii_lowercase();
    let extra = [(BACKEND_HEADER.to_owned(), backend.to_owned())];
    if !ct.contains("text/event-stream") {
        return relay(resp, c, &extra, close, false);
    }
    let mut headers = downstream_headers(&resp.headers);
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(BACKEND_HEADER));
    headers.extend(extra);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("cache-control")) {
        headers.push(("Cache-Control".into(), "no-cache".into()));
    }
    let mut w = c.start_chunked(200, &headers, close)?;
    let mut buf = vec![0u8; RELAY_CHUNK];
    loop {
        match resp.body.read(&mut buf) {
            Ok(0) => {
                w.finish()?;
                return Ok(200);
            }
            Ok(n) => w.chunk(&buf[..n])?,
            Err(e) => {
                let e = LocalError::from_io(&e, "the Hermes gateway");
                if e == LocalError::Aborted {
                    return Err(io::Error::other("the client went away"));
                }
                let code = if matches!(e, LocalError::Timeout { .. }) {
                    "gateway_timeout"
                } else {
                    "gateway_error"
                };
                // A partial event may precede: start the error on a fresh line.
                let event = format!(
                    "\n\n{}",
                    error_event(code, &format!("the stream broke: {e}"), backend)
                );
                w.chunk(event.as_bytes())?;
                w.finish()?;
                return Ok(200);
            }
        }
    }
}

/// Longest a direct provider's answer may stream: far longer than any chat answer, and what
/// bounds the thread a stalled one holds (the backend serves 64 connections at once).
const DIRECT_ANSWER_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Sends the chat to the direct provider and relays its SSE, marked `backend: direct`.
fn direct(
    shared: &Arc<Shared>,
    d: &Direct,
    mut body: Value,
    c: &mut Conn,
    close: bool,
    why: &str,
) -> io::Result<u16> {
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    if model.is_empty() || model == GATEWAY_MODEL {
        body["model"] = json!(d.model.clone().unwrap_or_else(|| DEFAULT_DIRECT_MODEL.to_owned()));
    }
    let payload = match serde_json::to_vec(&body) {
        Ok(p) => p,
        Err(e) => return sse_error(c, close, "internal", &e.to_string(), "direct"),
    };
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(180)))
        // No read timeout between events can be set on ureq's stream: the whole answer is
        // bounded instead, so a provider that stalls (or a connection lost without a reset)
        // frees this connection's thread in the end.
        .timeout_recv_body(Some(DIRECT_ANSWER_LIMIT))
        .build();
    let agent: ureq::Agent = config.into();
    let url = format!("{}/chat/completions", d.base_url);
    let sent = agent
        .post(&url)
        .header("Authorization", &format!("Bearer {}", d.key))
        .header("Content-Type", "application/json")
        .header("Accept", "text/event-stream")
        .send(&payload[..]);
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            shared.log(&format!("chat: direct provider failed: {e}"));
            let msg = format!("{why} The direct provider ({}) failed too: {e}", d.base_url);
            return sse_error(c, close, "direct_unavailable", &msg, "direct");
        }
    };
    let status = resp.status().as_u16();
    let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let ct = header("content-type").unwrap_or_else(|| "text/event-stream".into());
    let retry = header("retry-after");
    let mut reader = resp.into_body().into_reader();
    if status == 429 {
        let mut text = Vec::new();
        let _ = (&mut reader).take(ERROR_BODY).read_to_end(&mut text);
        let mut extra = vec![(BACKEND_HEADER, "direct")];
        if let Some(r) = retry.as_deref() {
            extra.push(("Retry-After", r));
        }
        c.respond(429, &ct, &text, &extra, close)?;
        return Ok(429);
    }
    if !(200..300).contains(&status) {
        let mut text = Vec::new();
        let _ = (&mut reader).take(ERROR_BODY).read_to_end(&mut text);
        let msg = format!(
            "{why} The direct provider ({}) answered HTTP {status}: {}",
            d.base_url,
            upstream_message(&text)
        );
        return sse_error(c, close, "direct_error", &msg, "direct");
    }
    shared.log("chat: answered by the direct provider");
    let headers = vec![
        ("Content-Type".to_owned(), ct),
        ("Cache-Control".to_owned(), "no-cache".to_owned()),
        (BACKEND_HEADER.to_owned(), "direct".to_owned()),
    ];
    let mut w = c.start_chunked(200, &headers, close)?;
    w.chunk(b": backend=direct\n\n")?;
    let mut buf = vec![0u8; RELAY_CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                w.finish()?;
                return Ok(200);
            }
            Ok(n) => w.chunk(&buf[..n])?,
            Err(e) => {
                let event = format!(
                    "\n\n{}",
                    error_event("direct_error", &format!("the stream broke: {e}"), "direct")
                );
                w.chunk(event.as_bytes())?;
                w.finish()?;
                return Ok(200);
            }
        }
    }
}
