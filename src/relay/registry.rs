//! The registry HTTP API (PROTOCOL §3) and WebSocket authentication (§4), run on a small pool
//! of worker threads so that SQLite never blocks the routing core.
//!
//! The reactor hands each complete HTTP request to a worker as a [`Job`]; the worker answers
//! with an [`Outcome`] (a response to write, or an authenticated upgrade).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::refusals::Verdict;
use super::store::{Store, Verify};
use super::{ConnId, Peer, Shared, ToReactor, log_event, now_ms};
use crate::http::{Head, json_response};
use crate::protocol::{self as p, ApiError, api_code};

/// Work for a registry worker.
pub enum Job {
    /// A complete HTTP request read by the reactor.
    Http {
        /// The connection it came on.
        conn: ConnId,
        /// Its head.
        head: Head,
        /// Its body (Content-Length bytes).
        body: Vec<u8>,
        /// The client's address (after `--trust-proxy`).
        ip: IpAddr,
    },
    /// Record that a client connected or disconnected.
    Touch {
        /// The clientId.
        client_id: String,
    },
    /// Delete the unfinished registrations older than [`UNFINISHED_TTL_MS`]
    /// ([`Store::expire_unfinished`]).
    Sweep,
    /// The wall clock was set back: end the access codes and diagnostic credentials still valid
    /// at `now_ms` (Unix ms, after the step) now ([`Store::withdraw_codes`]).
    WithdrawCodes {
        /// The wall-clock time the step was noticed.
        now_ms: u64,
    },
}

/// How long a registered bridge whose socket never connected, and that has no client, is
/// kept: a pairing connects its bridge within seconds, so after a day it is an abandoned
/// registration (its command registers anew if it ever comes back).
pub const UNFINISHED_TTL_MS: u64 = 24 * 3600 * 1000;

/// How many jobs may wait for a worker; past that the reactor answers 503.
pub const JOB_QUEUE: usize = 4096;

/// The reactor's end of the job queue: bounded at [`JOB_QUEUE`] waiting jobs.
///
/// Not `mpsc::sync_channel`: that allocates and writes every slot up front (4096 jobs were 612
/// KiB of an idle relay's memory). This channel grows in small blocks as jobs arrive and frees
/// them as workers take them; the count of waiting jobs keeps the bound.
pub struct JobSender {
    tx: Sender<Job>,
    waiting: Arc<AtomicUsize>,
}

/// The workers' end of the job queue, shared by all of them.
pub struct JobReceiver {
    rx: Mutex<Receiver<Job>>,
    waiting: Arc<AtomicUsize>,
}

/// A bounded job queue: the sender for the reactor, the receiver for the workers. Dropping the
/// sender ends the workers once the queue is empty.
pub fn job_queue() -> (JobSender, Arc<JobReceiver>) {
    let (tx, rx) = mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    (
        JobSender { tx, waiting: waiting.clone() },
        Arc::new(JobReceiver { rx: Mutex::new(rx), waiting }),
    )
}

/// Why [`JobSender::try_send`] dropped a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// [`JOB_QUEUE`] jobs are waiting.
    Full,
    /// No worker is left (each logged why it stopped).
    NoWorkers,
}

impl JobSender {
    /// Queues `job`, or drops it and says why.
    pub fn try_send(&self, job: Job) -> Result<(), Refused> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= JOB_QUEUE {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        self.tx.send(job).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            Refused::NoWorkers
        })
    }
}

impl JobReceiver {
    /// The next job, waiting for one; `None` once the sender is gone and the queue is empty.
    fn recv(&self) -> Option<Job> {
        let job = self.rx.lock().unwrap_or_else(|p| p.into_inner()).recv().ok()?;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        Some(job)
    }
}

/// A worker's answer to [`Job::Http`].
pub enum Outcome {
    /// Write these bytes; close afterwards when `close`.
    Respond {
        /// The connection.
        conn: ConnId,
        /// A whole HTTP response.
        bytes: Vec<u8>,
        /// Close after writing.
        close: bool,
    },
    /// The upgrade is authenticated; the reactor completes it (or refuses with 409, or 401
    /// when a revocation committed after the check).
    Upgrade {
        /// The connection.
        conn: ConnId,
        /// `Sec-WebSocket-Accept` value.
        accept: String,
        /// Who is connecting.
        peer: Peer,
        /// The revocation epoch read before the credential was checked ([`super::kicks`]).
        epoch: u64,
    },
}

/// Runs one worker until the job channel closes, and hands back its store connection (for the
/// checkpoint at shutdown); `None` when the store could not be opened.
pub fn worker(jobs: Arc<JobReceiver>, shared: Arc<Shared>) -> Option<Store> {
    let mut store = match Store::open(&shared.config.data) {
        Ok(s) => s,
        Err(e) => {
            log_event("error", &[("message", &e.to_string())]);
            return None;
        }
    };
    while let Some(job) = jobs.recv() {
        match job {
            Job::Touch { client_id } => {
                let changes = store.total_changes();
                match store.touch_client(&client_id, now_ms()) {
                    Ok(()) if store.total_changes() > changes => shared.store_wrote(),
                    Ok(()) => {}
                    Err(e) => {
                        shared.store_failed(&e);
                        log_event("error", &[("message", &e.to_string())]);
                    }
                }
            }
            Job::Sweep => {
                let cutoff = now_ms().saturating_sub(UNFINISHED_TTL_MS);
                let attached = |id: &str| shared.presence().bridges.contains(id);
                match store.expire_unfinished(cutoff, attached) {
                    Ok(0) => {}
                    Ok(n) => log_event("bridges.expired", &[("unfinished", &n.to_string())]),
                    Err(e) => {
                        shared.store_failed(&e);
                        log_event("error", &[("message", &e.to_string())]);
                    }
                }
            }
            Job::WithdrawCodes { now_ms } => match store.withdraw_codes(now_ms) {
                Ok((0, 0)) => {}
                Ok((codes, probes)) => {
                    shared.store_wrote();
                    log_event(
                        "codes.withdrawn",
                        &[
                            ("accessCodes", &codes.to_string()),
                            ("probeClients", &probes.to_string()),
                        ],
                    );
                }
                Err(e) => {
                    shared.store_failed(&e);
                    log_event("error", &[("message", &e.to_string())]);
                }
            },
            Job::Http { conn, head, body, ip } => {
                let started = Instant::now();
                // Counts as running until its answer is sent (end of this arm).
                let Some(_running) = shared.begin_request() else {
                    // Not logged here: the reactor answered and logged this request when it
                    // closed the gate (`refuse_stopping`).
                    let bytes = for_method(&head, shutting_down_response());
                    shared.send(ToReactor::Outcome(Outcome::Respond { conn, bytes, close: true }));
                    continue;
                };
                let (outcome, status) = handle(&mut store, &shared, conn, &head, &body, ip);
                // Upgrades are logged by the reactor once it has decided.
                if !matches!(outcome, Outcome::Upgrade { .. }) {
                    access_log(&shared, &head, status, ip, started);
                }
                shared.send(ToReactor::Outcome(outcome));
            }
        }
    }
    Some(store)
}

/// Writes one access-log line. Paths are logged without their query; no header is logged. The
/// query's `bridgeId` is, when it is well formed (an id, public by the protocol): a refused
/// upgrade then names the bridge it was for. Refusals (4xx) are bounded per source
/// ([`super::refusals`]); other lines are always written.
pub fn access_log(shared: &Shared, head: &Head, status: u16, ip: IpAddr, started: Instant) {
    let verdict = if (400..500).contains(&status) {
        shared.refusals.note(ip, status, Instant::now())
    } else {
        Verdict::Log
    };
    if verdict == Verdict::Suppress {
        return;
    }
    let (status, ms, ip) = (
        status.to_string(),
        format!("{:.2}", started.elapsed().as_secs_f64() * 1e3),
        ip.to_string(),
    );
    let mut fields =
        vec![("method", head.method.as_str()), ("path", head.path()), ("status", &status)];
    if let Some(bridge) = head.query("bridgeId").filter(|id| p::is_bridge_id(id)) {
        fields.push(("bridge", bridge));
    }
    fields.extend([("ms", ms.as_str()), ("ip", ip.as_str())]);
    if verdict == Verdict::LogLast {
        fields.push((
            "more",
            "further refusals from this address this minute are counted in one http.suppressed line",
        ));
    }
    log_event("http", &fields);
}

/// The answer to a request the relay will not carry out because it is stopping: 503
/// `SHUTTING_DOWN`, closing the connection.
pub fn shutting_down_response() -> Vec<u8> {
    let body = ApiError::new(api_code::SHUTTING_DOWN, "the relay is shutting down; retry shortly");
    json_response(503, &serde_json::to_string(&body).unwrap_or_default(), true)
}

/// `response` as the request `head` gets it: without its body when the request is a `HEAD`,
/// whatever the status (PROTOCOL §3.1).
pub fn for_method(head: &Head, response: Vec<u8>) -> Vec<u8> {
    if head.method == "HEAD" { crate::http::head_only(response) } else { response }
}

/// A handler's reply: status and JSON body, or an authenticated upgrade.
enum Reply {
    Json(u16, String),
    Upgrade(String, Peer, u64),
}

fn ok<T: Serialize>(status: u16, body: &T) -> Reply {
    Reply::Json(status, serde_json::to_string(body).unwrap_or_default())
}

fn err(status: u16, code: &str, message: impl Into<String>) -> Reply {
    Reply::Json(status, serde_json::to_string(&ApiError::new(code, message)).unwrap_or_default())
}

fn handle(
    store: &mut Store,
    shared: &Shared,
    conn: ConnId,
    head: &Head,
    body: &[u8],
    ip: IpAddr,
) -> (Outcome, u16) {
    let changes = store.total_changes();
    let reply = match route(store, shared, head, body, ip) {
        Ok(r) => {
            if store.total_changes() > changes {
                shared.store_wrote();
            }
            r
        }
        Err(e) => {
            shared.store_failed(&e);
            log_event("error", &[("message", &e.to_string())]);
            err(500, api_code::INTERNAL, "the relay's store failed; try again shortly")
        }
    };
    let close = head.wants_close();
    match reply {
        Reply::Json(status, json) => {
            // Refused upgrades close: the client expected a different protocol on this socket.
            let close = close || head.path().starts_with("/ws/");
            // A 426 names the version it speaks (RFC 6455 §4.4).
            let version: &[_] =
                if status == 426 { &[("Sec-WebSocket-Version", "13")] } else { &[] };
            let bytes = for_method(head, json_response_with(status, &json, close, version));
            (Outcome::Respond { conn, bytes, close }, status)
        }
        Reply::Upgrade(accept, peer, epoch) => {
            (Outcome::Upgrade { conn, accept, peer, epoch }, 101)
        }
    }
}

/// [`json_response`] with `extra` headers.
fn json_response_with(status: u16, body: &str, close: bool, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut headers = vec![("Cache-Control", "no-store")];
    headers.extend_from_slice(extra);
    crate::http::response(status, "application/json", body.as_bytes(), &headers, close)
}

type Handled = Result<Reply, super::store::StoreError>;

fn route(store: &mut Store, shared: &Shared, head: &Head, body: &[u8], ip: IpAddr) -> Handled {
    let method = head.method.as_str();
    let path = head.path();
    // HEAD is answered wherever GET is (monitors use it), without the body (`handle`).
    let expect = |m: &str| method == m || (m == "GET" && method == "HEAD");
    Ok(match path {
        "/v1/health" if expect("GET") => health(store, shared),
        "/v1/bridge/register" if expect("POST") => return register(store, shared, body, ip),
        "/v1/bridge/access-code" if expect("POST") => {
            return access_code(store, shared, head, body);
        }
        "/v1/bridge/delete" if expect("POST") => return delete(store, shared, head, body),
        "/v1/bridge/clients" if expect("GET") => return clients(store, shared, head),
        "/v1/bridge/clients/revoke" if expect("POST") => return revoke(store, shared, head, body),
        "/v1/bridge/probe-client" if expect("POST") => return probe_client(store, head, body),
        "/v1/pair/verify" if expect("POST") => return verify(store, shared, body, ip),
        "/v1/internal/hermes/bridge-status" if expect("GET") => {
            return bridge_status(store, shared, head);
        }
        "/ws/bridge" | "/ws/app" => return upgrade(store, shared, head, path == "/ws/bridge"),
        "/v1/health"
        | "/v1/bridge/register"
        | "/v1/bridge/access-code"
        | "/v1/bridge/delete"
        | "/v1/bridge/clients"
        | "/v1/bridge/clients/revoke"
        | "/v1/bridge/probe-client"
        | "/v1/pair/verify"
        | "/v1/internal/hermes/bridge-status" => {
            err(405, api_code::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {path}"))
        }
        _ => err(404, api_code::NOT_FOUND, format!("no route {path}")),
    })
}

/// `GET /v1/health`: 200 `{"ok":true}`, or 503 `{"ok":false,…,"error":…}` while the store is
/// failing ([`Shared::store_failing`]). A cheap read first, so that a store that became
/// unreadable shows here even when nothing else is asking it.
fn health(store: &Store, shared: &Shared) -> Reply {
    if let Err(e) = store.probe()
        && e.fault
    {
        shared.store_failed(&e);
        log_event("error", &[("message", &e.to_string())]);
    }
    let version = crate::VERSION;
    if !shared.store_failing() {
        return ok(200, &p::HealthResponse { ok: true, version: version.into() });
    }
    let message = "the relay's store is failing (the relay's log says why): registrations, \
                   pairings and sign-ins fail until it is repaired";
    let body = serde_json::json!({
        "ok": false,
        "version": version,
        "error": { "code": api_code::UNAVAILABLE, "message": message },
    });
    Reply::Json(503, body.to_string())
}

/// Parses a JSON body into `T`, or a 400 reply naming the problem.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    serde_json::from_slice(body)
        .map_err(|e| err(400, api_code::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// Checks an optional display or device name: at most 100 characters, no control characters.
fn check_name(name: Option<&str>) -> Result<(), Reply> {
    match name {
        Some(n) if n.chars().count() > 100 || n.chars().any(char::is_control) => Err(err(
            400,
            api_code::BAD_REQUEST,
            "names must be at most 100 characters without control characters",
        )),
        _ => Ok(()),
    }
}

/// Authenticates the bridge named in a request with the Bearer relaySecret.
fn auth_bridge(
    store: &Store,
    head: &Head,
    bridge_id: &str,
) -> Result<Result<String, Reply>, super::store::StoreError> {
    if !p::is_bridge_id(bridge_id) {
        return Ok(Err(err(
            400,
            api_code::BAD_REQUEST,
            "bridgeId must be 24 lowercase hex digits",
        )));
    }
    let Some(token) = head.bearer() else {
        return Ok(Err(err(
            401,
            api_code::UNAUTHORIZED,
            "missing Authorization: Bearer <relaySecret>",
        )));
    };
    if let Some(bridge) = store.auth_bridge(bridge_id, token)? {
        return Ok(Ok(bridge.display_name));
    }
    Ok(Err(if store.bridge_exists(bridge_id)? {
        err(401, api_code::UNAUTHORIZED, "the relaySecret does not match this bridge")
    } else {
        err(404, api_code::BRIDGE_NOT_FOUND, "this bridge is not registered here; register again")
    }))
}

macro_rules! try_reply {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reply) => return Ok(reply),
        }
    };
}

fn register(store: &mut Store, shared: &Shared, body: &[u8], ip: IpAddr) -> Handled {
    if let Err(wait) = shared.register_limit.check(ip) {
        return Ok(err(
            429,
            api_code::RATE_LIMITED,
            format!("too many registrations; retry in {wait} s"),
        ));
    }
    let req: p::RegisterRequest = try_reply!(parse(body));
    try_reply!(check_name(req.display_name.as_deref()));
    try_reply!(check_name(req.version.as_deref()));
    let name = req.display_name.as_deref().filter(|n| !n.trim().is_empty()).unwrap_or("Hermes");
    let (bridge_id, relay_secret) = store.register(name, req.version.as_deref(), now_ms())?;
    log_event("bridge.registered", &[("bridge", &bridge_id)]);
    Ok(ok(
        201,
        &p::RegisterResponse {
            bridge_id,
            relay_secret,
            bridge_relay_url: shared.ws_url("/ws/bridge"),
            app_relay_url: shared.ws_url("/ws/app"),
        },
    ))
}

fn access_code(store: &mut Store, shared: &Shared, head: &Head, body: &[u8]) -> Handled {
    let req: p::BridgeRequest = try_reply!(parse(body));
    try_reply!(check_name(req.display_name.as_deref()));
    try_reply!(auth_bridge(store, head, &req.bridge_id)?);
    let name = req.display_name.as_deref().filter(|n| !n.trim().is_empty());
    let ttl = shared.config.code_ttl.as_millis() as u64;
    let (access_code, expires_at) = store.issue_access_code(&req.bridge_id, name, now_ms(), ttl)?;
    Ok(ok(200, &p::AccessCodeResponse { access_code, expires_at }))
}

fn delete(store: &mut Store, shared: &Shared, head: &Head, body: &[u8]) -> Handled {
    let req: p::BridgeRequest = try_reply!(parse(body));
    try_reply!(auth_bridge(store, head, &req.bridge_id)?);
    store.delete_bridge(&req.bridge_id)?;
    shared.kick(&req.bridge_id, None);
    log_event("bridge.deleted", &[("bridge", &req.bridge_id)]);
    Ok(ok(200, &p::OkResponse { ok: true }))
}

fn clients(store: &mut Store, shared: &Shared, head: &Head) -> Handled {
    let bridge_id = head.query("bridgeId").unwrap_or_default();
    try_reply!(auth_bridge(store, head, bridge_id)?);
    let mut clients = store.list_clients(bridge_id)?;
    let presence = shared.presence();
    for c in &mut clients {
        c.online = presence.apps.contains(&c.client_id);
    }
    Ok(ok(200, &p::ClientsResponse { clients }))
}

fn revoke(store: &mut Store, shared: &Shared, head: &Head, body: &[u8]) -> Handled {
    let req: p::RevokeRequest = try_reply!(parse(body));
    try_reply!(auth_bridge(store, head, &req.bridge_id)?);
    if !store.revoke(&req.bridge_id, &req.client_id)? {
        return Ok(err(
            404,
            api_code::CLIENT_NOT_FOUND,
            "no such client is paired with this bridge",
        ));
    }
    shared.kick(&req.bridge_id, Some(&req.client_id));
    log_event("client.revoked", &[("bridge", &req.bridge_id), ("client", &req.client_id)]);
    Ok(ok(200, &p::OkResponse { ok: true }))
}

fn probe_client(store: &mut Store, head: &Head, body: &[u8]) -> Handled {
    let req: p::BridgeRequest = try_reply!(parse(body));
    try_reply!(auth_bridge(store, head, &req.bridge_id)?);
    let (client_id, client_secret, expires_at) = store.probe_client(&req.bridge_id, now_ms())?;
    Ok(ok(200, &p::ProbeClientResponse { client_id, client_secret, expires_at }))
}

fn verify(store: &mut Store, shared: &Shared, body: &[u8], ip: IpAddr) -> Handled {
    if let Err(wait) = shared.verify_limit.check(ip) {
        return Ok(err(
            429,
            api_code::RATE_LIMITED,
            format!("too many pairing attempts; retry in {wait} s"),
        ));
    }
    let req: p::VerifyRequest = try_reply!(parse(body));
    try_reply!(check_name(req.device_name.as_deref()));
    if !p::is_bridge_id(&req.bridge_id) {
        return Ok(err(400, api_code::BAD_REQUEST, "bridgeId must be 24 lowercase hex digits"));
    }
    let device = req.device_name.as_deref().filter(|n| !n.trim().is_empty()).unwrap_or("iPhone");
    Ok(match store.verify(&req.bridge_id, &req.access_code, device, now_ms())? {
        Verify::Paired { client_id, client_secret, bridge_name } => {
            log_event("client.paired", &[("bridge", &req.bridge_id), ("client", &client_id)]);
            ok(
                200,
                &p::VerifyResponse {
                    client_id,
                    client_secret,
                    app_relay_url: shared.ws_url("/ws/app"),
                    bridge_name,
                },
            )
        }
        Verify::BridgeNotFound => {
            err(404, api_code::BRIDGE_NOT_FOUND, "this QR's bridge is not registered here")
        }
        Verify::Invalid => err(401, api_code::ACCESS_CODE_INVALID, "the access code is wrong"),
        Verify::Used => err(
            409,
            api_code::ACCESS_CODE_USED,
            "this QR was already used; run hermeschat-pair --refresh-code",
        ),
        Verify::Expired => err(
            410,
            api_code::ACCESS_CODE_EXPIRED,
            "this QR expired; run hermeschat-pair --refresh-code",
        ),
        Verify::TooManyAttempts => err(
            429,
            api_code::TOO_MANY_ATTEMPTS,
            "too many wrong codes; the code is burned, run hermeschat-pair --refresh-code",
        ),
    })
}

fn bridge_status(store: &mut Store, shared: &Shared, head: &Head) -> Handled {
    let bridge_id = head.query("bridgeId").unwrap_or_default();
    let token = head.bearer().unwrap_or_default();
    let authorised = p::is_bridge_id(bridge_id)
        && if p::is_relay_secret(token) {
            store.auth_bridge(bridge_id, token)?.is_some()
        } else {
            p::is_client_secret(token) && store.auth_client(bridge_id, token, now_ms())?.is_some()
        };
    // Unknown bridge and wrong token look the same: never an oracle.
    let online = authorised && shared.presence().bridges.contains(bridge_id);
    Ok(ok(200, &p::BridgeStatusResponse { has_bridge: authorised, online }))
}

/// Authenticates a WebSocket upgrade. Tokens are bound to their role by their form and by the
/// table they are checked against: a clientSecret can never open `/ws/bridge`, nor a
/// relaySecret `/ws/app`.
fn upgrade(store: &mut Store, shared: &Shared, head: &Head, bridge_role: bool) -> Handled {
    if !head.is_websocket_upgrade() {
        return Ok(err(426, api_code::UPGRADE_REQUIRED, "this endpoint needs a WebSocket upgrade"));
    }
    if head.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Ok(err(426, api_code::UPGRADE_REQUIRED, "only WebSocket version 13 is supported"));
    }
    let Some(key) = head.header("sec-websocket-key") else {
        return Ok(err(400, api_code::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let bridge_id = head.query("bridgeId").unwrap_or_default();
    if !p::is_bridge_id(bridge_id) {
        return Ok(err(400, api_code::BAD_REQUEST, "bridgeId must be 24 lowercase hex digits"));
    }
    let token = head.bearer().unwrap_or_default();
    // Read before the store is: a revocation that commits after this check is caught by the
    // reactor (super::kicks).
    let epoch = shared.epoch();
    let unauthorised =
        || err(401, api_code::UNAUTHORIZED, "missing or wrong credentials for this endpoint");
    if bridge_role {
        if !p::is_relay_secret(token) {
            return Ok(unauthorised());
        }
        let instance = head.header(p::INSTANCE_HEADER).unwrap_or("").trim();
        if instance.is_empty() || instance.len() > 128 {
            return Ok(err(400, api_code::BAD_REQUEST, "missing X-Hermes-Instance header"));
        }
        Ok(match store.auth_bridge(bridge_id, token)? {
            Some(_) => {
                // Its registration is finished: never expired as unfinished.
                store.mark_connected(bridge_id, now_ms())?;
                Reply::Upgrade(
                    accept,
                    Peer::Bridge { bridge_id: bridge_id.into(), instance: instance.into() },
                    epoch,
                )
            }
            None if !store.bridge_exists(bridge_id)? => {
                err(404, api_code::BRIDGE_NOT_FOUND, "this bridge is not registered here")
            }
            None => unauthorised(),
        })
    } else {
        if !p::is_client_secret(token) {
            return Ok(unauthorised());
        }
        Ok(match store.auth_client(bridge_id, token, now_ms())? {
            Some(c) => Reply::Upgrade(
                accept,
                Peer::App { bridge_id: c.bridge_id, client_id: c.id, device_name: c.device_name },
                epoch,
            ),
            None if !store.bridge_exists(bridge_id)? => {
                err(404, api_code::BRIDGE_NOT_FOUND, "this bridge is not registered here")
            }
            None => unauthorised(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(n: usize) -> Job {
        Job::Touch { client_id: n.to_string() }
    }

    #[test]
    fn the_job_queue_holds_at_most_its_bound_and_frees_a_place_per_job_taken() {
        let (tx, rx) = job_queue();
        for n in 0..JOB_QUEUE {
            assert_eq!(tx.try_send(touch(n)), Ok(()), "job {n} refused below the bound");
        }
        assert_eq!(tx.try_send(touch(JOB_QUEUE)), Err(Refused::Full), "a job past the bound");
        let Some(Job::Touch { client_id }) = rx.recv() else { panic!("no job") };
        assert_eq!(client_id, "0", "jobs leave in order");
        assert_eq!(tx.try_send(touch(JOB_QUEUE)), Ok(()), "a taken job freed no place");
        assert_eq!(tx.try_send(touch(JOB_QUEUE + 1)), Err(Refused::Full));
        drop(tx);
        let mut left = 0;
        while rx.recv().is_some() {
            left += 1;
        }
        assert_eq!(left, JOB_QUEUE, "the queued jobs are still delivered after the sender left");
    }

    /// Health follows the store: ok until a call fails for a reason of the store's own (not a
    /// busy one), then 503 until a later write commits.
    #[test]
    fn health_is_503_from_a_store_fault_until_a_write_commits() {
        let dir = std::env::temp_dir().join(format!("hcp-health-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let shared = super::super::tests::shared_in(dir.clone());
        let mut store = Store::open(&dir).unwrap();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let request = |method: &str, target: &str| Head {
            method: method.into(),
            target: target.into(),
            headers: Vec::new(),
            len: 0,
            minor_version: 1,
        };
        let mut call = |method: &str, target: &str| {
            let head = request(method, target);
            handle(&mut store, &shared, 1, &head, b"{}", ip).1
        };
        assert_eq!(call("GET", "/v1/health"), 200);
        let failure = |code| {
            super::super::store::StoreError::from(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        shared.store_failed(&failure(rusqlite::ffi::SQLITE_BUSY));
        assert_eq!(call("GET", "/v1/health"), 200, "a busy store is not a failing one");
        shared.store_failed(&failure(rusqlite::ffi::SQLITE_CORRUPT));
        assert_eq!(call("GET", "/v1/health"), 503);
        // A call that commits nothing leaves it failing; a committed write ends it.
        assert_eq!(call("GET", "/v1/bridge/clients?bridgeId=000000000000000000000001"), 401);
        assert_eq!(call("GET", "/v1/health"), 503);
        assert_eq!(call("POST", "/v1/bridge/register"), 201);
        assert_eq!(call("GET", "/v1/health"), 200);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_queue_without_workers_refuses_jobs() {
        let (tx, rx) = job_queue();
        drop(rx);
        assert_eq!(tx.try_send(touch(0)), Err(Refused::NoWorkers));
        assert_eq!(tx.waiting.load(Ordering::Acquire), 0, "a refused job still counts as waiting");
    }
}
