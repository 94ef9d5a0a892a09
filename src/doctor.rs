//! `--doctor`: a real request along the whole path, each hop reported with its timing and, when
//! it fails, the fix.
//!
//! ```text
//! registry reachable → bridge registered and online → the daemon's relay socket alive (in
//! LAN-only mode: its LAN server)
//!   → GET /api/health through the relay as the app sends it → backend /api/health
//!   → gateway /health → gateway /v1/models with the key
//! ```
//!
//! The request through the relay uses a diagnostic app credential the registry issues to this
//! bridge (`POST /v1/bridge/probe-client`: valid minutes, never listed as a device), never a
//! user's device secret. Hops that depend on a failed one are reported as skipped; the
//! independent local checks (backend, gateway) always run. Exit 0 when every hop passes.
//!
//! The gateway is found, and its key read, the way the built-in backend does it
//! ([`crate::gateway::HermesConfig`]): so the doctor checks the gateway chat will really use.
//!
//! The phone's side of the relay hop (the app socket and its request frames) is `app.rs`.

mod app;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bridge::local_http::LocalError;
use crate::bridge::workers::{Target, http_url};
use crate::bridge::{Health, Status};
use crate::cli::{
    Args, Exit, Out, backend_address, load_config, load_identity, read_status, registry_url,
    state_dir,
};
use crate::daemon;
use crate::gateway::{HermesConfig, KeyCheck, Platform, Problem};
use crate::protocol::ErrorCode;
use crate::registry_client::{Registry, RegistryError};
use crate::state::{self, BridgeIdentity};

use app::AppError;

/// Deadline of the request through the relay (connect, bridge.status, answer).
const RELAY_TIMEOUT: Duration = Duration::from_secs(15);

/// Deadline of one local HTTP check.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How a hop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HopState {
    /// Passed.
    Ok,
    /// Passed with a remark.
    Warn,
    /// Failed: see the fix.
    Fail,
    /// Not run: an earlier hop it depends on failed.
    Skip,
}

/// One hop of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hop {
    /// Stable key for scripts (`registry`, `bridge`, `daemon`, `relay`, `backend`, `gateway`,
    /// `gatewayModels`).
    pub id: &'static str,
    /// What was checked.
    pub name: &'static str,
    /// The outcome.
    pub state: HopState,
    /// How long the check took, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    /// What was seen.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The hops as they are collected; printed one by one in text mode.
struct Report {
    hops: Vec<Hop>,
    out: Out,
    json: bool,
}

impl Report {
    fn add(&mut self, hop: Hop) {
        if !self.json {
            let time = hop.ms.map(|ms| format!(" ({})", millis(ms))).unwrap_or_default();
            let text = format!("{:<30} {}{time}", hop.name, hop.detail);
            match hop.state {
                HopState::Ok => self.out.ok(&text),
                HopState::Warn => self.out.warn(&text),
                HopState::Fail => self.out.bad(&text),
                HopState::Skip => self.out.line("-", "2", &text),
            }
            if let Some(fix) = &hop.fix {
                for (i, line) in fix.lines().enumerate() {
                    self.out.info(&format!("{}{line}", if i == 0 { "  fix: " } else { "       " }));
                }
            }
        }
        self.hops.push(hop);
    }

    fn state(&self, id: &str) -> Option<HopState> {
        self.hops.iter().find(|h| h.id == id).map(|h| h.state)
    }
}

fn millis(ms: f64) -> String {
    if ms < 10.0 { format!("{ms:.1} ms") } else { format!("{ms:.0} ms") }
}

/// Milliseconds since `t`, to 0.1 ms.
fn elapsed_ms(t: Instant) -> Option<f64> {
    Some((t.elapsed().as_secs_f64() * 10_000.0).round() / 10.0)
}

fn hop(
    id: &'static str,
    name: &'static str,
    state: HopState,
    t: Option<Instant>,
    detail: impl Into<String>,
) -> Hop {
    Hop { id, name, state, ms: t.and_then(elapsed_ms), detail: detail.into(), fix: None }
}

fn failed(
    id: &'static str,
    name: &'static str,
    t: Option<Instant>,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Hop {
    Hop { fix: Some(fix.into()), ..hop(id, name, HopState::Fail, t, detail) }
}

fn skipped(id: &'static str, name: &'static str, why: &str) -> Hop {
    hop(id, name, HopState::Skip, None, format!("skipped: {why}"))
}

const REGISTRY: (&str, &str) = ("registry", "registry reachable");
const BRIDGE: (&str, &str) = ("bridge", "bridge registered and online");
const DAEMON: (&str, &str) = ("daemon", "daemon relay socket alive");
/// The daemon hop in LAN-only mode: the same id (scripts key on it), a name that fits a daemon
/// with no relay socket.
const LAN_DAEMON: (&str, &str) = ("daemon", "daemon LAN server alive");
const RELAY: (&str, &str) = ("relay", "request through the relay");
const BACKEND: (&str, &str) = ("backend", "backend /api/health");
const GATEWAY: (&str, &str) = ("gateway", "gateway /health");
const MODELS: (&str, &str) = ("gatewayModels", "gateway /v1/models (with key)");

/// `--doctor`.
pub fn run(args: &Args) -> Result<(), Exit> {
    let out = Out::new(args.json);
    let dir = state_dir()?;
    let config = load_config(&dir, &out)?;
    let identity = load_identity(&dir, &out)?;
    let mut report = Report { hops: Vec::new(), out: Out::new(args.json), json: args.json };
    if !args.json {
        println!("hermeschat-pair doctor: app → relay → bridge → backend → gateway");
    }
    // The checks follow the pairing: a --server naming another registry is said, not dropped.
    if let (Some(id), Some(server)) = (&identity, &args.server)
        && crate::cli::normalized_registry_url(server).ok()
            != crate::cli::normalized_registry_url(&id.registry_url).ok()
    {
        out.warn(&format!(
            "--server {server} is not the registry this bridge is paired with ({}): these checks \
             are of that one. hermeschat-pair --server {server} moves the bridge there (your \
             apps must then scan a new QR code)",
            id.registry_url
        ));
    }

    let pid = daemon::running(&dir).filter(|p| *p != 0);
    let status = pid.and_then(|_| settled_status(&dir));
    // LAN-only mode has no relay: its hops are the daemon's LAN server, the backend and the
    // gateway.
    let lan = status.as_ref().filter(|s| crate::lan::serving(Some(s)));
    // A stopped daemon with LAN devices and no relay pairing was a LAN-only one: its hops are
    // the same, the daemon is reported stopped.
    let lan_stopped = pid.is_none() && identity.is_none() && crate::lan::has_pairing(&dir);
    if lan.is_some() || lan_stopped {
        for (id, name) in [REGISTRY, BRIDGE, RELAY] {
            report.add(skipped(id, name, "LAN-only mode (--local): no relay"));
        }
        report.add(match lan {
            Some(s) => check_lan_daemon(pid, s),
            None => failed(
                LAN_DAEMON.0,
                LAN_DAEMON.1,
                None,
                "the LAN-only daemon is not running",
                "start it: hermeschat-pair --local (if you installed the boot service: \
                 hermeschat-pair --service-status)",
            ),
        });
    } else {
        // 1. The registry.
        let url = match &identity {
            Some(id) => Ok(id.registry_url.trim_end_matches('/').to_owned()),
            None => registry_url(args, &config),
        };
        let registry_ok = match &url {
            Ok(url) => {
                let r = check_registry(&Registry::new(url));
                let ok = r.state == HopState::Ok;
                report.add(r);
                ok
            }
            Err(e) => {
                let fix = e.message.trim_start_matches("no registry configured. ").to_owned();
                report.add(failed(REGISTRY.0, REGISTRY.1, None, "no registry configured", fix));
                false
            }
        };

        // 2.-4. The bridge at the registry, the daemon, and a request through the relay.
        match &identity {
            None => {
                report.add(failed(
                    BRIDGE.0,
                    BRIDGE.1,
                    None,
                    format!("no pairing yet ({} is missing)", state::bridge_json(&dir).display()),
                    "pair first: hermeschat-pair",
                ));
                report.add(check_daemon(pid, status.as_ref(), None, &dir));
                report.add(skipped(RELAY.0, RELAY.1, "no pairing yet"));
            }
            Some(id) => {
                let registry = Registry::new(&id.registry_url);
                let online = if registry_ok {
                    let (h, online) = check_bridge(&registry, id, pid.is_some());
                    report.add(h);
                    online
                } else {
                    report.add(skipped(BRIDGE.0, BRIDGE.1, "the registry is unreachable"));
                    false
                };
                report.add(check_daemon(pid, status.as_ref(), Some(id), &dir));
                if online {
                    report.add(check_relay(&registry, id, &dir));
                } else {
                    let why = if registry_ok {
                        "the bridge is not online"
                    } else {
                        "the registry is unreachable"
                    };
                    report.add(skipped(RELAY.0, RELAY.1, why));
                }
            }
        }
    }

    // 5. The backend, directly.
    // Written anew: an older daemon wrote an IPv6 host without brackets.
    let (backend_host, backend_port) =
        match status.as_ref().and_then(|s| Target::parse_url(&s.backend_url)) {
            Some(target) => target,
            None => backend_address(args, &config)?,
        };
    report.add(check_backend(&backend_host, backend_port, &dir));

    // 6.-7. The gateway.
    let gw = HermesConfig::load();
    let g = check_gateway(&gw);
    report.add(g);
    if report.state(GATEWAY.0) == Some(HopState::Ok) {
        report.add(check_models(&gw));
    } else {
        report.add(skipped(MODELS.0, MODELS.1, "the gateway is down"));
    }
    if report.state(RELAY.0) == Some(HopState::Fail)
        && report.state(BACKEND.0) == Some(HopState::Ok)
        && let Some(h) = report.hops.iter_mut().find(|h| h.id == RELAY.0)
    {
        // The backend answers directly but not through the bridge: say where to look.
        h.detail.push_str(" (the backend itself answers)");
    }

    let failures: Vec<&Hop> = report.hops.iter().filter(|h| h.state == HopState::Fail).collect();
    let ok = failures.is_empty();
    if args.json {
        let value = serde_json::json!({ "ok": ok, "hops": report.hops });
        println!("{value}");
    } else {
        println!();
        if ok {
            report.out.ok("Every hop answers: chat from the app should work.");
        } else {
            report.out.bad(&format!(
                "{} of {} checks failed; start with \"{}\". Then run hermeschat-pair --doctor again.",
                failures.len(),
                report.hops.len(),
                failures[0].name
            ));
        }
    }
    if ok { Ok(()) } else { Err(Exit { code: 1, message: String::new() }) }
}

/// `status.json`, given a moment to settle when it says "not connected" without an error (the
/// relay can report the bridge online a few milliseconds before the daemon records it).
fn settled_status(dir: &Path) -> Option<Status> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let s = read_status(dir);
        let settled = s.as_ref().is_none_or(|s| s.relay_connected || s.relay_error.is_some());
        if settled || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_registry(registry: &Registry) -> Hop {
    let (id, name) = REGISTRY;
    let t = Instant::now();
    match registry.health() {
        Ok(h) => hop(
            id,
            name,
            HopState::Ok,
            Some(t),
            format!("{} (relay {})", registry.base(), h.version),
        ),
        // A certificate this machine does not trust, a name it cannot resolve: the detail
        // names the step on this machine; the relay may be fine.
        Err(e @ RegistryError::Unreachable { .. })
            if crate::registry_client::is_this_machines_side(&e.to_string()) =>
        {
            failed(
                id,
                name,
                Some(t),
                e.to_string(),
                "on this machine, not the relay: take the step named above, then run \
                 hermeschat-pair --doctor again",
            )
        }
        Err(e @ RegistryError::Unreachable { .. }) => failed(
            id,
            name,
            Some(t),
            e.to_string(),
            format!(
                "check the URL and that your relay runs: curl {}/v1/health\n(on the server: \
                 systemctl status hermeschat-relay; behind a proxy, check its TLS and upstream)",
                registry.base()
            ),
        ),
        Err(e) => failed(
            id,
            name,
            Some(t),
            e.to_string(),
            format!(
                "{} answers, but not like a hermeschat-relay: check the URL (--server, \
                 HERMESCHAT_REGISTRY_URL) and the proxy in front of the relay",
                registry.base()
            ),
        ),
    }
}

/// The bridge at the registry; returns whether it is online.
fn check_bridge(registry: &Registry, id: &BridgeIdentity, daemon_running: bool) -> (Hop, bool) {
    let (key, name) = BRIDGE;
    let t = Instant::now();
    match registry.bridge_status(&id.bridge_id, &id.relay_secret) {
        Ok(s) if s.has_bridge && s.online => {
            (hop(key, name, HopState::Ok, Some(t), format!("bridge {} online", id.bridge_id)), true)
        }
        Ok(s) if s.has_bridge => {
            let fix = if daemon_running {
                "the daemon runs but is not connected: see the daemon hop below and \
                 hermeschat-pair --logs; hermeschat-pair --stop && hermeschat-pair restarts it"
            } else {
                "start the bridge: hermeschat-pair (or hermeschat-pair --install to run it as a \
                 boot service)"
            };
            let detail =
                format!("bridge {} is registered but not connected to the relay", id.bridge_id);
            (failed(key, name, Some(t), detail, fix), false)
        }
        // bridge-status answers an unknown bridge and a refused secret alike (no oracle for
        // others); an endpoint that needs the secret tells them apart for its owner.
        Ok(_) => match registry.clients(&id.bridge_id, &id.relay_secret) {
            Err(e) if e.code() == Some("UNAUTHORIZED") => (
                failed(
                    key,
                    name,
                    Some(t),
                    format!("{e}"),
                    crate::cli::secret_refused(&id.bridge_id),
                ),
                false,
            ),
            _ => (
                failed(
                    key,
                    name,
                    Some(t),
                    format!(
                        "the registry does not know bridge {} (deleted, or its data was lost)",
                        id.bridge_id
                    ),
                    "run hermeschat-pair: it registers anew and prints a new QR code (apps must \
                     scan it)",
                ),
                false,
            ),
        },
        Err(e) => (
            failed(
                key,
                name,
                Some(t),
                e.to_string(),
                "run hermeschat-pair --doctor again; if it persists, check the relay's log",
            ),
            false,
        ),
    }
}

fn check_daemon(
    pid: Option<u32>,
    status: Option<&Status>,
    id: Option<&BridgeIdentity>,
    dir: &Path,
) -> Hop {
    let (key, name) = DAEMON;
    let t = Instant::now();
    let log = state::bridge_log(dir);
    let Some(pid) = pid else {
        return failed(
            key,
            name,
            Some(t),
            "no bridge daemon is running",
            "start it: hermeschat-pair (if you installed the boot service: hermeschat-pair \
             --service-status)",
        );
    };
    if let Some(hop) = suspended_daemon(key, name, t, pid) {
        return hop;
    }
    let Some(s) = status else {
        return failed(
            key,
            name,
            Some(t),
            format!("daemon pid {pid} runs but wrote no status.json"),
            format!("restart it: hermeschat-pair --stop && hermeschat-pair; see {}", log.display()),
        );
    };
    if let Some(id) = id
        && s.bridge_id != id.bridge_id
    {
        return failed(
            key,
            name,
            Some(t),
            format!("daemon pid {pid} serves bridge {}, not {}", s.bridge_id, id.bridge_id),
            "restart it with the current identity: hermeschat-pair --stop && hermeschat-pair",
        );
    }
    if s.relay_connected {
        let since = crate::cli::local_time(s.relay_since);
        let detail = format!("pid {pid}, connected to {} since {since}", s.relay_url);
        replaced_program(key, name, t, s, &detail, "hermeschat-pair")
            .unwrap_or_else(|| hop(key, name, HopState::Ok, Some(t), detail))
    } else {
        let err = s.relay_error.clone().unwrap_or_else(|| "no error recorded yet".into());
        failed(
            key,
            name,
            Some(t),
            format!("pid {pid} is not connected to the relay: {err}"),
            format!(
                "see {}; a 409 BRIDGE_OWNED means another machine runs this identity \
                 (hermeschat-pair --reset gives this one its own)",
                log.display()
            ),
        )
    }
}

/// The warning hop of a daemon that serves, but whose program file an upgrade has replaced
/// since it started (it still runs the old code): `restart` runs the new one.
fn replaced_program(
    key: &'static str,
    name: &'static str,
    t: Instant,
    s: &Status,
    detail: &str,
    restart: &str,
) -> Option<Hop> {
    crate::daemon::runs_replaced_program(s.pid, s.exe.as_ref()).then(|| Hop {
        fix: Some(format!("restart it so the new one runs: {restart}")),
        ..hop(
            key,
            name,
            HopState::Warn,
            Some(t),
            format!("{detail}; its program file has been replaced since it started (an upgrade)"),
        )
    })
}

/// The failed daemon hop of a suspended daemon (SIGSTOP, Ctrl-Z): its lock and status.json
/// look alive, but it serves nothing.
fn suspended_daemon(key: &'static str, name: &'static str, t: Instant, pid: u32) -> Option<Hop> {
    crate::daemon::suspended(pid).then(|| {
        failed(
            key,
            name,
            Some(t),
            format!("daemon pid {pid} is suspended (SIGSTOP or Ctrl-Z): it serves nothing"),
            format!("resume it: kill -CONT {pid} (or fg in its terminal)"),
        )
    })
}

/// The daemon in LAN-only mode: running, serving its LAN address, and that address still
/// this machine's.
fn check_lan_daemon(pid: Option<u32>, s: &Status) -> Hop {
    let (key, name) = LAN_DAEMON;
    let t = Instant::now();
    let pid = pid.unwrap_or(s.pid);
    if let Some(hop) = suspended_daemon(key, name, t, pid) {
        return hop;
    }
    let url = s.lan_url.clone().unwrap_or_default();
    match crate::lan::address_lost(Some(s)) {
        Some(lost) => failed(
            key,
            name,
            Some(t),
            format!("pid {pid} serves {url}, but this machine no longer has {lost}"),
            "run hermeschat-pair --local to serve this machine's address now, and scan its QR",
        ),
        None => {
            let detail = format!("pid {pid}, LAN server at {url}");
            replaced_program(key, name, t, s, &detail, "hermeschat-pair --local")
                .unwrap_or_else(|| hop(key, name, HopState::Ok, Some(t), detail))
        }
    }
}

fn check_relay(registry: &Registry, id: &BridgeIdentity, dir: &Path) -> Hop {
    let (key, name) = RELAY;
    let t = Instant::now();
    let fail = |detail: String, fix: String| failed(key, name, Some(t), detail, fix);
    let cred = match registry.probe_client(&id.bridge_id, &id.relay_secret) {
        Ok(c) => c,
        Err(RegistryError::Api { status: 404, code, .. }) if code == "NOT_FOUND" => {
            return fail(
                "the relay has no diagnostic credentials (POST /v1/bridge/probe-client)".into(),
                "update hermeschat-relay on your server to this version".into(),
            );
        }
        Err(e) => {
            return fail(
                format!("no diagnostic credential: {e}"),
                "run hermeschat-pair --doctor again".into(),
            );
        }
    };
    let t_cred = t.elapsed();
    let deadline = Instant::now() + RELAY_TIMEOUT;
    let mut socket =
        match app::connect(&id.app_relay_url, &id.bridge_id, &cred.client_secret, RELAY_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                return fail(
                format!("the app socket {} failed: {e}", id.app_relay_url),
                "the app URL in bridge.json must reach the relay: check the relay's --public-url \
                 and the WebSocket upgrade in your proxy (Upgrade/Connection headers)"
                    .into(),
            );
            }
        };
    let t_conn = t.elapsed();
    match socket.bridge_online(deadline) {
        Ok(true) => {}
        Ok(false) => {
            socket.close();
            return fail(
                "the relay told the app the bridge is offline".into(),
                "the bridge dropped just now; run hermeschat-pair --doctor again".into(),
            );
        }
        Err(e) => {
            return fail(
                format!("no bridge.status from the relay: {e}"),
                "check the relay's log".into(),
            );
        }
    }
    let request_id = format!("doctor-{}", &crate::secret::hex(&crate::secret::random_bytes::<6>()));
    let sent = Instant::now();
    let result = socket.get(&request_id, "/api/health", deadline);
    let round_trip = sent.elapsed();
    socket.close();
    let timing = format!(
        "credential {}, connect {}, request {}",
        millis(t_cred.as_secs_f64() * 1000.0),
        millis((t_conn - t_cred).as_secs_f64() * 1000.0),
        millis(round_trip.as_secs_f64() * 1000.0)
    );
    match result {
        Ok(a) if (200..300).contains(&a.status) => hop(
            key,
            name,
            HopState::Ok,
            Some(t),
            format!("GET /api/health → {} via app → relay → bridge → backend; {timing}", a.status),
        ),
        Ok(a) => fail(
            format!("GET /api/health → {} through the relay: {}", a.status, snippet(&a.body)),
            "the backend behind the bridge answers with an error: see the backend hop below and \
             hermeschat-pair --logs"
                .into(),
        ),
        Err(AppError::Answered(code, message)) => {
            let fix = match code {
                ErrorCode::BackendUnreachable | ErrorCode::BackendTimeout => format!(
                    "the bridge cannot reach its backend: start your Hermes backend, or \
                     hermeschat-pair --stop && hermeschat-pair; see {}",
                    state::bridge_log(dir).display()
                ),
                ErrorCode::BridgeOffline | ErrorCode::BridgeDisconnected => {
                    "the bridge dropped from the relay: hermeschat-pair --status, then \
                     hermeschat-pair --logs"
                        .into()
                }
                ErrorCode::ShuttingDown => {
                    "the daemon is stopping; start it again: hermeschat-pair".into()
                }
                ErrorCode::Busy => "the bridge is saturated; try again in a moment".into(),
                _ => format!("see {}", state::bridge_log(dir).display()),
            };
            fail(format!("GET /api/health failed: {}", AppError::Answered(code, message)), fix)
        }
        Err(e) => fail(
            format!("GET /api/health: {e}"),
            format!(
                "the request went out but nothing came back; see {}",
                state::bridge_log(dir).display()
            ),
        ),
    }
}

fn snippet(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// `GET url` on loopback with an optional bearer; `(status, body)` or the transport error.
fn local_get(url: &str, bearer: Option<&str>) -> Result<(u16, String), String> {
    let agent = crate::registry_client::local_agent(LOCAL_TIMEOUT);
    let mut req = agent.get(url).header("Accept", "application/json");
    if let Some(key) = bearer {
        req = req.header("Authorization", &format!("Bearer {key}"));
    }
    let mut resp = req.call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
    Ok((status, body))
}

fn refused(e: &str) -> bool {
    e.contains("refused") || e.contains("Connection refused")
}

fn check_backend(host: &str, port: u16, dir: &Path) -> Hop {
    let (key, name) = BACKEND;
    let t = Instant::now();
    let base = http_url(host, port);
    let url = format!("{base}/api/health");
    let answer = local_get(&url, None);
    // A TLS server answers plain HTTP with a close, an alert or a 400 page: asked in TLS, it
    // says what it is.
    let failed_plain = !matches!(&answer, Ok((status, _)) if (200..300).contains(status))
        && !matches!(&answer, Err(e) if refused(e));
    if failed_plain && crate::tls_probe::speaks_tls(host, port) {
        let peer = format!("the backend at {}", crate::bridge::workers::authority(host, port));
        return failed(
            key,
            name,
            Some(t),
            format!("{base} speaks HTTPS, not plain HTTP"),
            crate::tls_probe::hint(&peer),
        );
    }
    match answer {
        Ok((status, body)) if (200..300).contains(&status) => {
            hop(key, name, HopState::Ok, Some(t), format!("{base} → {status} {}", snippet(&body)))
        }
        Ok((status, body)) => failed(
            key,
            name,
            Some(t),
            format!("{base} → {status} {}", snippet(&body)),
            "something listens there but is not a Hermes API: stop it, or point the bridge at \
             your backend with hermeschat-pair --port <port>",
        ),
        Err(e) if refused(&e) => failed(
            key,
            name,
            Some(t),
            format!("nothing listens on {base}"),
            format!(
                "start your Hermes backend (or let hermeschat-pair start the built-in one: \
                 hermeschat-pair --stop && hermeschat-pair); its log: {}",
                state::server_log(dir).display()
            ),
        ),
        Err(e) => failed(
            key,
            name,
            Some(t),
            format!("{url}: {e}"),
            "check the backend's log: hermeschat-pair --logs",
        ),
    }
}

fn check_gateway(gw: &HermesConfig) -> Hop {
    let (key, name) = GATEWAY;
    let t = Instant::now();
    let base = gw.url();
    // Another user's program on the port gets nothing at all, not even the health check.
    let (health, detail) = if let Some(uid) =
        crate::backend::peer::foreign_listener_at(&gw.host, gw.port)
    {
        (Health::Foreign, format!("{base} is served by another user's program (uid {uid})"))
    } else {
        match local_get(&format!("{base}/health"), None) {
            Ok((status, _)) if (200..300).contains(&status) => {
                return hop(key, name, HopState::Ok, Some(t), format!("{base} → {status}"));
            }
            Ok((status, body)) => {
                (Health::Unhealthy, format!("{base} → {status} {}", snippet(&body)))
            }
            Err(e) if refused(&e) => (Health::NotListening, format!("nothing listens on {base}")),
            Err(e) => (Health::Unhealthy, format!("{base}: {e}")),
        }
    };
    let ms = elapsed_ms(t);
    // Name what stands in the way (key, API server disabled, aiohttp, a squatter on the port).
    let problems = crate::gateway::diagnose(gw, health);
    let mut detail = detail;
    let mut fix: Vec<String> = Vec::new();
    for p in &problems {
        detail.push_str(&format!("; {p}"));
        fix.push(p.fix(gw));
    }
    if !problems.iter().any(|p| matches!(p, Problem::NotInstalled | Problem::PortHeld { .. })) {
        // The same commands the pairing command prints: only those that exist here.
        let cmds = crate::gateway::manual_commands(gw, Platform::current());
        if cmds.is_empty() {
            fix.push(crate::gateway::start_hint(gw, Platform::current()));
        } else {
            fix.push("start it (hermeschat-pair also tries to wake it up) with one of:".into());
            fix.extend(cmds.iter().map(|c| format!("  {c}")));
        }
    }
    fix.push(format!(
        "its log: {} (hermeschat-pair --logs)",
        gw.home.join("logs/gateway.log").display()
    ));
    Hop { ms, ..failed(key, name, None, detail, fix.join("\n")) }
}

/// The gateway's answer to the key: [`crate::gateway::check_key`], the check pairing and
/// `--status` make too, worded by [`crate::gateway::key_trouble`] like theirs.
fn check_models(gw: &HermesConfig) -> Hop {
    let (key, name) = MODELS;
    let t = Instant::now();
    let check = crate::gateway::check_key(gw, LOCAL_TIMEOUT);
    let t = (check != KeyCheck::Missing).then_some(t);
    if let Some((what, fix)) = crate::gateway::key_trouble(gw, &check, Platform::current()) {
        return failed(key, name, t, what, fix);
    }
    match check {
        KeyCheck::Accepted(models) => {
            let shown =
                if models.is_empty() { "no models listed".to_owned() } else { models.join(", ") };
            let detail = format!("{shown} (key accepted, from {})", gw.key_origin());
            hop(key, name, HopState::Ok, t, detail)
        }
        KeyCheck::Answered(status, body) => failed(
            key,
            name,
            t,
            format!("{status} {}", snippet(&body)),
            format!("see the gateway's log: {}", gw.home.join("logs/gateway.log").display()),
        ),
        KeyCheck::Failed(LocalError::Foreign { uid, .. }) => {
            let problem = Problem::PortHeld { addr: gw.addr(), another_user: true };
            let detail =
                format!("{} is served by another user's program (uid {uid}): {problem}", gw.url());
            failed(key, name, t, detail, problem.fix(gw))
        }
        other => {
            let detail = match other {
                KeyCheck::Failed(e) => e.to_string(),
                _ => "no answer".to_owned(),
            };
            let fix = format!(
                "the gateway stopped answering; restart it: {}",
                crate::gateway::restart_hint(Platform::current())
            );
            failed(key, name, t, detail, fix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_one_short_line() {
        assert_eq!(snippet("{\n  \"status\": \"ok\"\n}"), "{ \"status\": \"ok\" }");
        assert_eq!(snippet(&"é".repeat(200)).chars().count(), 121);
    }
}
