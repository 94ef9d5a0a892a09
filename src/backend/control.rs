//! Health and gateway control routes of the built-in backend:
//! - `GET /api/health` — `{"status":"ok","version",…,"gateway":"online|offline","backend"}`;
//! - `GET /api/gateway/health` — `{"backend":"gateway|direct|none","reason",…}`;
//! - `POST /api/gateway/restart?action=restart|start|stop` — the wake chain
//!   ([`crate::gateway::Chain`]): steps attempted and the last 4 KiB of `gateway.log`.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::Shared;
use super::conn::{Conn, Request};
use super::upstream::Upstream;
use crate::bridge::Health;
use crate::bridge::local_http::{Abort, Body};
use crate::gateway::{self, Action, Chain, HermesConfig};

/// Bytes of `gateway.log` returned by a restart.
pub const LOG_TAIL: u64 = 4096;

/// How long `/api/health` waits for the gateway's `/health`.
const HEALTH_PROBE: Duration = Duration::from_millis(800);

/// `"gateway"`, `"direct"` or `"none"`: what `/api/chat` would use now.
pub fn backend_kind(shared: &Shared, gateway: Health) -> &'static str {
    if gateway == Health::Ready {
        "gateway"
    } else if shared.settings.direct.is_some() {
        "direct"
    } else {
        "none"
    }
}

/// `GET /api/health` (and `/health`).
pub fn health(shared: &Arc<Shared>, req: &Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let config = shared.upstream.config();
    let g = gateway::probe_addr(&config.host, config.port, HEALTH_PROBE);
    let body = json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "server": "hermeschat-pair",
        "gateway": if g == Health::Ready { "online" } else { "offline" },
        "backend": backend_kind(shared, g),
    })
    .to_string();
    if req.head.method == "HEAD" {
        let headers = [("Content-Type".to_owned(), "application/json".to_owned())];
        c.start_fixed(200, &headers, Some(body.len() as u64), close)?;
    } else {
        c.respond(
            200,
            "application/json",
            body.as_bytes(),
            &[("Cache-Control", "no-store")],
            close,
        )?;
    }
    Ok(200)
}

/// Checks the key against an authenticated route: `Some(status)` when the gateway refuses it.
fn key_refused(shared: &Shared, config: &HermesConfig) -> Option<u16> {
    let mut headers = vec![("Accept".to_owned(), "application/json".to_owned())];
    headers.extend(Upstream::auth_header(config));
    let client = shared.upstream.client(config);
    let mut r = client.send("GET", "/v1/models", &headers, Body::Bytes(b""), &Abort::new()).ok()?;
    let mut sink = Vec::new();
    let _ = (&mut r.body).take(256 << 10).read_to_end(&mut sink);
    matches!(r.status, 401 | 403).then_some(r.status)
}

/// `GET /api/gateway/health`.
pub fn gateway_health(shared: &Arc<Shared>, c: &mut Conn, close: bool) -> io::Result<u16> {
    let config = shared.upstream.config();
    let g = gateway::probe(&config);
    let mut problems = gateway::diagnose(&config, g);
    let refused = if g == Health::Ready { key_refused(shared, &config) } else { None };
    let kind = match (g, refused) {
        (Health::Ready, None) => "gateway",
        _ if shared.settings.direct.is_some() => "direct",
        _ => "none",
    };
    if g == Health::Ready {
        problems.retain(|p| matches!(p, gateway::Problem::PortHeld { .. }));
    }
    let addr = config.addr();
    let reason = match (g, refused) {
        (Health::Ready, None) => format!("the Hermes gateway answers at {addr}"),
        (Health::Ready, Some(s)) => format!(
            "the Hermes gateway at {addr} refuses the key (HTTP {s}): API_SERVER_KEY here does \
             not match the gateway's"
        ),
        _ => {
            let why = if problems.is_empty() {
                "not running".to_owned()
            } else {
                problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")
            };
            match &shared.settings.direct {
                Some(d) => format!(
                    "the Hermes gateway at {addr} is offline ({why}); chat goes straight to {}",
                    d.base_url
                ),
                None => format!("the Hermes gateway at {addr} is offline ({why})"),
            }
        }
    };
    let body = json!({
        "backend": kind,
        "reason": reason,
        "gateway": if g == Health::Ready { "online" } else { "offline" },
        "url": config.url(),
        "keyConfigured": config.key.is_some(),
        "keyAccepted": refused.is_none() && g == Health::Ready,
        "direct": shared.settings.direct.as_ref().map(|d| d.base_url.clone()),
        "problems": problems.iter().map(|p| json!({
            "code": p.code(), "message": p.to_string(), "fix": p.fix(),
        })).collect::<Vec<_>>(),
    });
    c.json(200, &body, close)?;
    Ok(200)
}

/// `POST /api/gateway/restart?action=restart|start|stop`.
pub fn restart(shared: &Arc<Shared>, req: &Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let word = req.head.query("action").unwrap_or("restart");
    let Some(action) = Action::parse(word) else {
        c.error(400, "bad_request", "action must be restart, start or stop", close)?;
        return Ok(400);
    };
    let Ok(_guard) = shared.restarting.try_lock() else {
        c.error(409, "busy", "a gateway restart is already running", close)?;
        return Ok(409);
    };
    let chain = Chain {
        platform: gateway::Platform::current(),
        config: shared.upstream.config(),
        state_dir: shared.settings.state_dir.clone(),
        deadline: shared.settings.restart_deadline,
    };
    let report = chain.run(action);
    shared.log(&format!(
        "gateway {}: {} ({})",
        action.as_str(),
        if report.ok() { "ok" } else { "failed" },
        report
            .steps
            .iter()
            .map(|s| format!("{} {}", s.name, s.outcome))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut body = report.to_json();
    body["log"] = json!(chain.log_tail(LOG_TAIL));
    c.json(200, &body, close)?;
    Ok(200)
}
