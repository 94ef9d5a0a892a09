//! `/v1/*` and `/api/sessions*` passed to the gateway unchanged: method, path and query, body,
//! end-to-end headers both ways (429 and `Retry-After` included), bodies streamed as they
//! arrive in bounded chunks. The gateway key replaces whatever `Authorization` the app sent.

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::Shared;
use super::conn::{Conn, DisconnectWatch, Request};
use super::upstream::Upstream;
use crate::bridge::local_http::{Abort, Body, LocalError, Response};
use crate::gateway::HermesConfig;
use crate::http::Head;
use crate::protocol::{is_client_header, is_hop_by_hop};

/// Largest piece of an upstream body relayed at once.
pub const RELAY_CHUNK: usize = 16 << 10;

/// True for paths passed to the gateway.
pub fn is_proxied(path: &str) -> bool {
    path == "/v1"
        || path.starts_with("/v1/")
        || path == "/api/sessions"
        || path.starts_with("/api/sessions/")
}

/// Request headers for the gateway: hop-by-hop headers, `Host`, the bridge's client header, the
/// backend key header (taken out on arrival already: [`super::key::take_from`]) and (when we
/// have a key) the app's `Authorization` dropped; the gateway key added.
pub fn upstream_headers(head: &Head, config: &HermesConfig) -> Vec<(String, String)> {
    let auth = Upstream::auth_header(config);
    let mut out: Vec<(String, String)> = head
        .headers
        .iter()
        .filter(|(n, _)| {
            let replaced = auth.is_some() && n.eq_ignore_ascii_case("authorization");
            let dropped = is_hop_by_hop(n)
                || is_client_header(n)
                || super::key::is_key_header(n)
                || n.eq_ignore_ascii_case("expect");
            !(replaced || dropped)
        })
        .cloned()
        .collect();
    out.extend(auth);
    out
}

/// Response headers passed back: hop-by-hop and framing headers dropped (redone here).
pub fn downstream_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers.iter().filter(|(n, _)| !is_hop_by_hop(n)).cloned().collect()
}

/// The status and error code a failed upstream exchange is answered with.
pub fn failure_status(e: &LocalError) -> (u16, &'static str) {
    match e {
        LocalError::Timeout { .. } => (504, "gateway_timeout"),
        LocalError::Connect { .. } => (502, "gateway_offline"),
        LocalError::Foreign { .. } => (502, "gateway_port_held"),
        _ => (502, "gateway_error"),
    }
}

/// Forwards one request to the gateway and relays the answer.
pub fn forward(shared: &Arc<Shared>, req: &Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let config = shared.upstream.config();
    let client = shared.upstream.client(&config);
    let headers = upstream_headers(&req.head, &config);
    let abort = Abort::new();
    let watch = DisconnectWatch::start(&c.stream, &abort);
    let sent =
        client.send(&req.head.method, &req.head.target, &headers, Body::Bytes(&req.body), &abort);
    let resp = match sent {
        Ok(r) => r,
        Err(LocalError::Aborted) => return Err(io::Error::other("the client went away")),
        Err(e) => {
            drop(watch);
            let (status, code) = failure_status(&e);
            c.error(status, code, &format!("the Hermes gateway is unavailable: {e}"), close)?;
            return Ok(status);
        }
    };
    let head_only = req.head.method.eq_ignore_ascii_case("HEAD");
    let r = relay(resp, c, &[], close, head_only);
    drop(watch);
    r
}

/// Relays an upstream response: the head at once, then the body as it arrives (at most
/// [`RELAY_CHUNK`] per write), fixed-length when the upstream said how long, chunked
/// otherwise. A broken upstream mid-body ends the connection (`Err`), so the client sees a
/// truncated body rather than a clean end.
pub fn relay(
    mut resp: Response,
    c: &mut Conn,
    extra: &[(String, String)],
    close: bool,
    head_only: bool,
) -> io::Result<u16> {
    let status = resp.status;
    let mut headers = downstream_headers(&resp.headers);
    headers.extend(extra.iter().cloned());
    let bodiless = head_only || status == 204 || status == 304;
    let mut buf = vec![0u8; RELAY_CHUNK];
    match resp.body.len_hint() {
        Some(len) if !bodiless || head_only => {
            c.start_fixed(status, &headers, Some(len), close)?;
            if head_only {
                return Ok(status);
            }
            loop {
                let n = resp.body.read(&mut buf).map_err(io::Error::other)?;
                if n == 0 {
                    return Ok(status);
                }
                c.stream.write_all(&buf[..n])?;
            }
        }
        _ if bodiless => {
            c.start_fixed(status, &headers, None, close)?;
            Ok(status)
        }
        _ => {
            let mut w = c.start_chunked(status, &headers, close)?;
            w.flush_head()?;
            loop {
                let n = resp.body.read(&mut buf).map_err(io::Error::other)?;
                if n == 0 {
                    w.finish()?;
                    return Ok(status);
                }
                w.chunk(&buf[..n])?;
            }
        }
    }
}
