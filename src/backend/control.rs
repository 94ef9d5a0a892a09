//! Health and gateway control routes of the built-in backend:
//! - `GET /api/health` — `{"status":"ok","version",…,"gateway":"online|offline","backend"}`;
//! - `GET /api/gateway/health` — `{"backend":"gateway|direct|none","reason",…}`;
//! - `POST /api/gateway/restart?action=restart|start|stop` — the wake chain
//!   ([`crate::gateway::Chain`]): steps attempted and the last 4 KiB of `gateway.log`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::Shared;
use super::conn::{Conn, Request};
use crate::bridge::Health;
use crate::gateway::{self, Action, Chain, HermesConfig};
use crate::state;

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

/// `GET /api/health` (and `/health`). `backend` agrees with `/api/gateway/health`: a gateway
/// that is up but refuses the key (or has none) is not what chat uses. The verdict on the key
/// is the last one known (chat's answers, `/api/gateway/health`, and a check in the background
/// when it is older than [`super::upstream::KEY_VERDICT_TTL`]), so this answer never waits on
/// an authenticated request.
pub fn health(shared: &Arc<Shared>, req: &Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let config = shared.upstream.config();
    let g = gateway::probe_addr(&config.host, config.port, HEALTH_PROBE);
    if g == Health::Ready {
        check_key_in_background(shared, &config);
    } else {
        shared.upstream.forget_key();
    }
    let usable = if g == Health::Ready && shared.upstream.key_known_bad(&config) {
        Health::Unhealthy
    } else {
        g
    };
    let body = json!({
        "status": "ok",
        "version": crate::VERSION,
        "server": "hermeschat-pair",
        "gateway": if g == Health::Ready { "online" } else { "offline" },
        "backend": backend_kind(shared, usable),
        // Whether the daemon serving this is about to stop (its state directory deleted or
        // moved: it stops within seconds), for a pairing of another state directory that
        // finds this port taken ([`crate::cli::backend_gate`]).
        "stateDir": if state::pid_file(&shared.settings.state_dir).exists() { "kept" } else { "gone" },
    });
    if req.head.method == "HEAD" {
        // The headers a GET gets (as `Conn::json` writes them), without the body.
        let headers = [
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("Cache-Control".to_owned(), "no-store".to_owned()),
        ];
        c.start_fixed(200, &headers, Some(body.to_string().len() as u64), close)?;
    } else {
        c.json(200, &body, close)?;
    }
    Ok(200)
}

/// Checks the key in a thread of its own when its verdict is due ([`Upstream::claim_key_check`]):
/// at most one check at a time, one per [`super::upstream::KEY_VERDICT_TTL`].
///
/// [`Upstream::claim_key_check`]: super::upstream::Upstream::claim_key_check
fn check_key_in_background(shared: &Arc<Shared>, config: &HermesConfig) {
    if !shared.upstream.claim_key_check(config) {
        return;
    }
    let (shared2, config) = (shared.clone(), config.clone());
    let spawned = std::thread::Builder::new().name("key-check".into()).spawn(move || {
        note_key_check(&shared2, &config, &gateway::check_key(&config, KEY_CHECK));
        shared2.upstream.key_check_done();
    });
    if spawned.is_err() {
        shared.upstream.key_check_done();
    }
}

/// Deadline of the key check of `/api/gateway/health` and of the background one.
const KEY_CHECK: Duration = Duration::from_secs(3);

/// Records a key check's verdict (no answer is no verdict: the last one stands).
fn note_key_check(shared: &Shared, config: &HermesConfig, check: &gateway::KeyCheck) {
    match check {
        gateway::KeyCheck::Accepted(_) => shared.upstream.note_key(config, false),
        gateway::KeyCheck::Refused(_) => shared.upstream.note_key(config, true),
        _ => {}
    }
}

/// `GET /api/gateway/health`.
pub fn gateway_health(shared: &Arc<Shared>, c: &mut Conn, close: bool) -> io::Result<u16> {
    let config = shared.upstream.config();
    let g = gateway::probe(&config);
    let mut problems = gateway::diagnose(&config, g);
    let check = (g == Health::Ready).then(|| gateway::check_key(&config, KEY_CHECK));
    if let Some(check) = &check {
        note_key_check(shared, &config, check);
    }
    let bad_key = check.as_ref().is_some_and(gateway::KeyCheck::is_bad);
    let kind = match (g, bad_key) {
        (Health::Ready, false) => "gateway",
        _ if shared.settings.direct.is_some() => "direct",
        _ => "none",
    };
    if g == Health::Ready {
        problems.retain(|p| matches!(p, gateway::Problem::PortHeld { .. }));
    }
    let addr = config.addr();
    let trouble =
        check.as_ref().and_then(|k| gateway::key_trouble(&config, k, gateway::Platform::current()));
    let reason = match (g, trouble) {
        (Health::Ready, None) => format!("the Hermes gateway answers at {addr}"),
        (Health::Ready, Some((what, fix))) => {
            format!("the Hermes gateway at {addr} is up, but {what}; fix: {fix}")
        }
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
        "keyAccepted": g == Health::Ready && !bad_key,
        "direct": shared.settings.direct.as_ref().map(|d| d.base_url.clone()),
        "problems": problems.iter().map(|p| json!({
            "code": p.code(), "message": p.to_string(), "fix": p.fix(&config),
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
    let mut body = report.to_json(&chain.config);
    body["log"] = json!(chain.log_tail(LOG_TAIL));
    c.json(200, &body, close)?;
    Ok(200)
}
