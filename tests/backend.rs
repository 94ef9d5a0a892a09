//! Tests of the built-in backend (`src/backend/`) and the gateway wake chain
//! (`src/gateway.rs`) against a stub gateway (`tests/fixtures/stub_gateway.py`):
//! - in-process: the backend started with [`start_with`] on a free port, talking to the stub;
//! - end to end: the real `hermeschat-pair` and its daemon in a throwaway `HOME` (fake
//!   `~/.hermes`, fake commands on `PATH`), the real relay, and the app test client.
//!
//! The same path against the real Hermes Agent gateway is `tests/hermes_gateway.rs`.

mod common;
mod gatewaykit;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Relay, fresh_dir};
use gatewaykit::{
    KEY, STUB_GATEWAY, StubGateway, User, app_fetch, connect_app, free_port, header, http, request,
    sse_content, sse_error, stub_user,
};
use hermeschat_pair::backend::upstream::{Direct, GatewaySource};
use hermeschat_pair::backend::{BackendConfig, Settings, start_with};
use hermeschat_pair::bridge::local_http::{Abort, Body, LocalClient, Timeouts};
use hermeschat_pair::gateway::{self, HermesConfig, KeySource};
use hermeschat_pair::protocol::Frame;
use serde_json::{Value, json};
use std::process::Stdio;

// =============================================================================================
// In-process backend

/// A backend on a free port, stopped on drop.
struct Backend {
    port: u16,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a backend whose gateway is `127.0.0.1:gw_port` with `key`.
fn backend(gw_port: u16, key: &str, tweak: impl FnOnce(&mut Settings)) -> Backend {
    let dir = fresh_dir("backend");
    let config = HermesConfig {
        home: dir.join("hermes"),
        host: "127.0.0.1".into(),
        port: gw_port,
        key: Some(key.into()),
        key_source: Some(KeySource::DotEnv(dir.join("hermes/.env"))),
        enabled: true,
        installed: true,
    };
    let mut s = Settings::from_env(&BackendConfig {
        host: std::net::Ipv4Addr::LOCALHOST.into(),
        port: 0,
        state_dir: dir.clone(),
    });
    s.gateway = GatewaySource::Fixed(config);
    s.direct = None;
    s.timeouts = Timeouts {
        connect: Duration::from_secs(2),
        head: Duration::from_secs(20),
        body_gap: Duration::from_secs(20),
    };
    tweak(&mut s);
    let stop = Arc::new(AtomicBool::new(false));
    let started = start_with(s, stop.clone()).expect("backend start");
    Backend { port: started.port, stop, dir }
}

/// A port where nothing listens.
fn closed_port() -> u16 {
    free_port()
}

fn chat_body(model: Option<&str>, text: &str) -> Vec<u8> {
    let mut v = json!({"messages": [{"role": "user", "content": text}]});
    if let Some(m) = model {
        v["model"] = json!(m);
    }
    v.to_string().into_bytes()
}

/// Status, headers, and body pieces with their arrival times.
type Pieces = (u16, Vec<(String, String)>, Vec<(Instant, String)>);

/// `POST /api/chat` read piece by piece.
fn chat_pieces(port: u16, body: &[u8], headers: &[(&str, &str)]) -> Pieces {
    let c = LocalClient::new("127.0.0.1", port);
    let mut h: Vec<(String, String)> =
        headers.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
    h.push(("Content-Type".into(), "application/json".into()));
    let mut r = c.send("POST", "/api/chat", &h, Body::Bytes(body), &Abort::new()).unwrap();
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.body.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        pieces.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
    }
    (r.status, r.headers, pieces)
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[test]
fn health_reports_gateway_online_offline_and_direct() {
    let mut stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |_| {});
    let (s, h, body) = http(b.port, "GET", "/api/health", &[], b"");
    assert_eq!(s, 200);
    assert_eq!(header(&h, "content-type"), Some("application/json"));
    // Health changes from one moment to the next: no cache may keep it.
    assert_eq!(header(&h, "cache-control"), Some("no-store"));
    // HEAD gets the headers GET gets (RFC 9110 §9.3.2), the no-store among them.
    let (s, h, head_body) = http(b.port, "HEAD", "/api/health", &[], b"");
    assert_eq!((s, head_body.len()), (200, 0));
    assert_eq!(header(&h, "cache-control"), Some("no-store"), "{h:?}");
    let v = json_of(&body);
    assert_eq!((v["status"].as_str(), v["gateway"].as_str()), (Some("ok"), Some("online")), "{v}");
    assert_eq!(v["version"], hermeschat_pair::VERSION);
    let v = json_of(&http(b.port, "GET", "/api/gateway/health", &[], b"").2);
    assert_eq!(v["backend"], "gateway", "{v}");
    assert_eq!(v["keyAccepted"], true, "{v}");
    assert!(!v.to_string().contains(KEY), "the key leaked: {v}");

    stub.kill();
    let v = json_of(&http(b.port, "GET", "/api/health", &[], b"").2);
    assert_eq!(v["gateway"], "offline", "{v}");
    let v = json_of(&http(b.port, "GET", "/api/gateway/health", &[], b"").2);
    assert_eq!(v["backend"], "none", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("offline"), "{v}");

    let d = backend(closed_port(), KEY, |s| {
        s.direct = Some(Direct {
            base_url: "http://127.0.0.1:9/v1".into(),
            key: "sk-direct-secret".into(),
            model: None,
        })
    });
    let v = json_of(&http(d.port, "GET", "/api/gateway/health", &[], b"").2);
    assert_eq!(v["backend"], "direct", "{v}");
    assert!(!v.to_string().contains("sk-direct-secret"), "{v}");
}

/// The bridge's own health probes (every few seconds, for months) stay out of `server.log`;
/// any other request, a health check from an app too, is logged.
#[test]
fn the_bridges_health_probes_are_not_logged() {
    let b = backend(closed_port(), KEY, |_| {});
    for _ in 0..3 {
        let health = hermeschat_pair::bridge::poller::probe("127.0.0.1", b.port, "/api/health");
        assert_eq!(health, hermeschat_pair::bridge::Health::Ready);
    }
    assert_eq!(http(b.port, "GET", "/api/health", &[], b"").0, 200);
    // The header does not hide anything but a health check.
    let probe = [(hermeschat_pair::bridge::poller::PROBE_HEADER, "1")];
    assert_eq!(http(b.port, "GET", "/api/gateway/health", &probe, b"").0, 200);
    // A request is logged once answered: wait for the last two lines, then a little more for
    // any probe line still on its way.
    let read_log = || std::fs::read_to_string(b.dir.join("server.log")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(read_log().contains("GET /api/health -> 200")
        && read_log().contains("GET /api/gateway/health -> 200"))
    {
        assert!(Instant::now() < deadline, "requests missing from server.log: {}", read_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = read_log();
    assert_eq!(log.matches("GET /api/health -> 200").count(), 1, "{log}");
    assert_eq!(log.matches("GET /api/gateway/health -> 200").count(), 1, "{log}");
}

#[test]
fn chat_streams_chunk_by_chunk_with_session_id_both_ways() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |_| {});
    let body = chat_body(None, "hi");
    let (status, headers, pieces) = chat_pieces(
        b.port,
        &body,
        &[("X-Hermes-Session-Id", "sess-42"), ("Authorization", "Bearer phone-token")],
    );
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&headers, "x-hermes-session-id"), Some("sess-42"));
    assert_eq!(header(&headers, "x-hermeschat-backend"), Some("gateway"));
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(sse_content(&text), "Hello from the stub gateway.", "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Relayed as it arrived: the stub spaces its 5 words 40 ms apart.
    assert!(pieces.len() >= 5, "expected the events one by one, got {} pieces", pieces.len());
    let span = pieces.last().unwrap().0 - pieces[0].0;
    assert!(span >= Duration::from_millis(120), "all pieces arrived together ({span:?})");
    let stats = stub.stats();
    assert_eq!(stats["last_chat"]["stream"], true, "{stats}");
    assert_eq!(stats["last_chat"]["model"], "hermes-agent", "{stats}");
    assert_eq!(stats["last_headers"]["x-hermes-session-id"], "sess-42", "{stats}");
    assert_eq!(stats["unauthorized"], 0, "the backend must send the gateway key: {stats}");
    let log = std::fs::read_to_string(b.dir.join("server.log")).unwrap();
    assert!(log.contains("POST /api/chat -> 200"), "{log}");
    assert!(!log.contains(KEY) && !log.contains("phone-token"), "a secret in server.log: {log}");
}

#[test]
fn gateway_down_is_an_sse_error_event_not_a_500() {
    let b = backend(closed_port(), KEY, |_| {});
    let (status, headers, body) = http(b.port, "POST", "/api/chat", &[], &chat_body(None, "hi"));
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
    let text = String::from_utf8(body).unwrap();
    assert!(text.starts_with("event: error\n"), "{text}");
    let err = sse_error(&text).expect("an error event");
    assert_eq!(err["code"], "gateway_offline", "{text}");
    // The hint is the one --doctor and pairing give (the backend runs in this process, with
    // its PATH), and never names a program that is not there: this gateway has no venv.
    let message = err["message"].as_str().unwrap();
    let config = HermesConfig::from_sources(&b.dir.join("hermes"), |_| None);
    let hint = gateway::start_hint(&config, gateway::Platform::current());
    assert!(message.contains(&hint), "{message}\nwanted: {hint}");
    // (It may name the venv's python as missing, never as a command to run.)
    assert!(!message.contains("venv/bin/python -m"), "{message}");
    if gateway::which("hermes").is_none() {
        // Only as what to run once Hermes Agent is installed.
        let after_install = message.contains("install Hermes Agent, then run `hermes gateway run`");
        assert!(!message.contains("hermes gateway") || after_install, "{message}");
    }
    assert!(text.contains("data: [DONE]"), "{text}");
}

#[test]
fn wrong_key_is_named_and_401_passes_through_the_proxy() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, "wrong-key-0123456789abcdef", |_| {});
    let (status, _, body) = http(b.port, "POST", "/api/chat", &[], &chat_body(None, "hi"));
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let err = sse_error(&text).expect("an error event");
    assert_eq!(err["code"], "gateway_auth", "{text}");
    assert!(err["message"].as_str().unwrap().contains("API_SERVER_KEY"), "{text}");
    assert!(!text.contains("wrong-key"), "the key leaked: {text}");
    let (status, _, _) = http(b.port, "GET", "/v1/models", &[], b"");
    assert_eq!(status, 401);
    let v = json_of(&http(b.port, "GET", "/api/gateway/health", &[], b"").2);
    assert_eq!(v["backend"], "none", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("refuses the key"), "{v}");
}

/// The chat error says what is wrong with the key: none configured (not "refused"), or
/// refused, naming the file it is read from (the Hermes home in use, not `~/.hermes`). And
/// `/api/health` agrees with `/api/gateway/health` that chat cannot use such a gateway, from
/// the last verdict on the key (never a key check per `/api/health`).
#[test]
fn a_missing_or_refused_key_is_named_and_api_health_agrees() {
    let mut stub = StubGateway::start(0, KEY);
    let port = stub.port;
    let health = |b: &Backend| json_of(&http(b.port, "GET", "/api/health", &[], b"").2);
    let chat_error = |b: &Backend| {
        let (status, _, body) = http(b.port, "POST", "/api/chat", &[], &chat_body(None, "hi"));
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        let err = sse_error(&text).unwrap_or_else(|| panic!("no error event: {text}"));
        assert_eq!(err["code"], "gateway_auth", "{text}");
        err["message"].as_str().unwrap().to_owned()
    };

    // No key at all: "missing", with every place it is looked for; chat is not the gateway's.
    let keyless = backend(port, KEY, |s| {
        if let GatewaySource::Fixed(c) = &mut s.gateway {
            c.key = None;
            c.key_source = None;
        }
    });
    let v = health(&keyless);
    assert_eq!((v["gateway"].as_str(), v["backend"].as_str()), (Some("online"), Some("none")));
    let message = chat_error(&keyless);
    let home = keyless.dir.join("hermes");
    assert!(message.contains("no key for it is configured"), "{message}");
    assert!(!message.contains("refuses the key"), "{message}");
    assert!(message.contains(&home.join(".env").display().to_string()), "{message}");
    assert!(message.contains(&home.join("config.yaml").display().to_string()), "{message}");
    assert!(!message.contains("~/.hermes"), "{message}");
    let v = json_of(&http(keyless.port, "GET", "/api/gateway/health", &[], b"").2);
    assert_eq!((v["backend"].as_str(), v["keyAccepted"].as_bool()), (Some("none"), Some(false)));

    // Another key than the gateway's: "refuses", naming the file it came from.
    let wrong = "wrong-key-0123456789abcdef";
    let b = backend(port, wrong, |_| {});
    // No chat yet: the check /api/health started in the background gives the verdict.
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&b)["backend"] != "none" {
        assert!(Instant::now() < deadline, "/api/health never noticed the refused key");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = json_of(&http(b.port, "GET", "/api/gateway/health", &[], b"").2);
    assert_eq!((v["backend"].as_str(), v["keyAccepted"].as_bool()), (Some("none"), Some(false)));
    let message = chat_error(&b);
    let source = format!("API_SERVER_KEY in {}", b.dir.join("hermes/.env").display());
    assert!(message.contains(&format!("refuses the key (HTTP 401) from {source}")), "{message}");
    assert!(!message.contains(wrong) && !message.contains("~/.hermes"), "{message}");
    assert_eq!(health(&b)["backend"], "none");

    // The gateway comes back with this backend's key: /api/health follows (the verdict went
    // with the gateway that refused it).
    stub.kill();
    assert_eq!(health(&b)["gateway"], "offline");
    let _restarted = StubGateway::start(port, wrong);
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&b)["backend"] != "gateway" {
        assert!(Instant::now() < deadline, "/api/health kept the old verdict");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, _, body) = http(b.port, "POST", "/api/chat", &[], &chat_body(None, "hi"));
    assert_eq!(sse_content(&String::from_utf8(body).unwrap()), "Hello from the stub gateway.");
    assert!(!std::fs::read_to_string(b.dir.join("server.log")).unwrap().contains(wrong));
}

#[test]
fn rate_limit_and_gateway_errors() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |_| {});
    let (status, headers, body) =
        http(b.port, "POST", "/api/chat", &[], &chat_body(Some("stub-429"), "hi"));
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "retry-after"), Some("7"));
    assert!(String::from_utf8_lossy(&body).contains("Too many concurrent runs"));
    let (status, _, body) =
        http(b.port, "POST", "/api/chat", &[], &chat_body(Some("stub-500"), "hi"));
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert_eq!(sse_error(&text).unwrap()["code"], "gateway_error", "{text}");
    assert!(text.contains("stub exploded"), "{text}");
}

#[test]
fn a_gateway_hanging_mid_stream_ends_with_an_error_event() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |s| {
        s.timeouts.body_gap = Duration::from_millis(600);
    });
    let t0 = Instant::now();
    let (status, _, pieces) = chat_pieces(b.port, &chat_body(Some("stub-hang"), "hi"), &[]);
    assert_eq!(status, 200);
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    assert!(text.contains("\"role\": \"assistant\""), "the first event must arrive: {text}");
    assert_eq!(sse_error(&text).expect("error event")["code"], "gateway_timeout", "{text}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The backend let go of the hung upstream.
    stub.wait_stat("hang_closed", 1);

    let (_, _, pieces) = chat_pieces(b.port, &chat_body(Some("stub-break"), "hi"), &[]);
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(sse_error(&text).expect("error event")["code"], "gateway_error", "{text}");
}

#[test]
fn a_client_leaving_mid_stream_releases_the_gateway() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |_| {});
    let mut s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    let body = chat_body(Some("stub-hang"), "hi");
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    stub.wait_stat("hang_started", 1);
    let t0 = Instant::now();
    drop(s);
    stub.wait_stat("hang_closed", 1);
    assert!(t0.elapsed() < Duration::from_secs(3), "upstream held for {:?}", t0.elapsed());
}

#[test]
fn malformed_bodies_and_requests_are_refused_and_the_backend_keeps_serving() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |s| s.max_body = 64 << 10);
    let cases: &[&[u8]] = &[
        b"",
        b"not json",
        b"[1,2]",
        b"{}",
        br#"{"messages": []}"#,
        br#"{"messages": "hi"}"#,
        br#"{"messages": [{"content": "no role"}]}"#,
        br#"{"messages": [{"role": "user", "content": 42}]}"#,
        br#"{"messages": [{"role": "user", "content": "x"}], "stream": 3}"#,
        br#"{"messages": [{"role": "user", "content": "x"}], "attachments": "nope"}"#,
        br#"{"messages": [{"role": "user", "content": "x"}], "attachments": ["0123456789abcdef0123456789abcdef"]}"#,
        br#"{"messages": [{"role": "user", "content": "x"}], "attachments": ["../../etc/passwd"]}"#,
    ];
    for body in cases {
        let (status, headers, resp) = http(b.port, "POST", "/api/chat", &[], body);
        let shown = String::from_utf8_lossy(body);
        assert_eq!(status, 400, "{shown} → {}", String::from_utf8_lossy(&resp));
        assert_eq!(header(&headers, "content-type"), Some("application/json"), "{shown}");
        assert!(json_of(&resp)["error"]["message"].is_string(), "{shown}");
    }
    assert_eq!(stub.stats()["chats"], 0, "a malformed body reached the gateway");
    // Too large, chunked, garbage, wrong method, unknown route.
    let big = vec![b'x'; 70 << 10];
    assert_eq!(http(b.port, "POST", "/api/chat", &[], &big).0, 413);
    let raw = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let r =
        raw(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 411"), "{r}");
    let r = raw(b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(http(b.port, "GET", "/api/chat", &[], b"").0, 405);
    // A web page (other Origin) or a rebound DNS name (other Host) is refused.
    let r = raw(b"POST /api/chat HTTP/1.1\r\nHost: evil.example:8765\r\nContent-Length: 0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let chat = chat_body(None, "hi");
    let (status, _, _) =
        http(b.port, "POST", "/api/chat", &[("Origin", "https://evil.example")], &chat);
    assert_eq!(status, 403);
    // Another site's page that sends no Origin (an `<img>` GET) is marked by the browser.
    let (status, _, _) =
        http(b.port, "GET", "/api/sessions", &[("Sec-Fetch-Site", "cross-site")], b"");
    assert_eq!(status, 403, "a cross-site GET was served");
    assert_eq!(http(b.port, "GET", "/api/health", &[("Sec-Fetch-Site", "none")], b"").0, 200);
    // A page of another loopback port (maybe another user's server) is another's page; only a
    // page of this backend's own origin is not.
    let page = |port: u16| format!("http://127.0.0.1:{port}");
    let other = page(b.port.wrapping_add(1).max(1));
    assert_eq!(http(b.port, "POST", "/api/chat", &[("Origin", &other)], &chat).0, 403);
    assert_eq!(http(b.port, "GET", "/api/health", &[("Origin", &page(b.port))], b"").0, 200);
    let localhost = format!("http://localhost:{}", b.port);
    assert_eq!(http(b.port, "GET", "/api/health", &[("Origin", &localhost)], b"").0, 200);
    let another_address = format!("http://127.0.0.2:{}", b.port);
    assert_eq!(http(b.port, "POST", "/api/chat", &[("Origin", &another_address)], &chat).0, 403);
    // Two lengths (or a signed one) could leave a second request behind: refused whole.
    let r = raw(
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nContent-Length: 38\r\n\r\nGET /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "a smuggled request was answered: {r}");
    assert_eq!(stub.stats()["chats"], 0, "a refused request reached the gateway");
    assert_eq!(http(b.port, "GET", "/etc/passwd", &[], b"").0, 404);
    assert_eq!(http(b.port, "POST", "/api/gateway/restart?action=explode", &[], b"").0, 400);
    assert_eq!(http(b.port, "GET", "/api/health", &[], b"").0, 200);
}

/// A multipart body with one file part.
fn multipart(name: &str, content_type: &str, data: &[u8]) -> (String, Vec<u8>) {
    let boundary = "----hermeschat-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

#[test]
fn uploads_multipart_and_raw_hostile_names_types_and_sizes() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |s| s.max_upload = 64 << 10);
    // Multipart, path traversal in the name.
    let (ct, body) = multipart("../../../etc/passwd", "text/plain", b"root:x:0:0\n");
    let (status, _, resp) = http(b.port, "POST", "/api/upload", &[("Content-Type", &ct)], &body);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&resp));
    let text_file = json_of(&resp);
    assert_eq!(text_file["name"], "passwd");
    assert_eq!(text_file["kind"], "text");
    assert_eq!(text_file["files"].as_array().unwrap().len(), 1);
    let uploads = b.dir.join("uploads");
    for entry in std::fs::read_dir(&uploads).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.len() >= 32 && !name.contains("passwd"), "stored as {name}");
    }
    assert!(!b.dir.join("etc").exists() && !b.dir.parent().unwrap().join("etc/passwd").exists());
    // Raw PNG, declared right.
    let (status, _, resp) = http(
        b.port,
        "POST",
        "/api/upload?name=..%2F..%2Fpixel.png",
        &[("Content-Type", "image/png")],
        PNG,
    );
    assert_eq!(status, 201);
    let png = json_of(&resp);
    assert_eq!(
        (png["name"].as_str(), png["contentType"].as_str()),
        (Some("pixel.png"), Some("image/png"))
    );
    // Wrong content types: a script claiming to be a PNG, binary claiming to be text, a
    // header-injection attempt.
    let (_, _, resp) = http(
        b.port,
        "POST",
        "/api/upload",
        &[("Content-Type", "image/png")],
        b"<script>alert(1)</script>",
    );
    let fake = json_of(&resp);
    assert_eq!(fake["contentType"], "application/octet-stream", "{fake}");
    assert_eq!(fake["declaredType"], "image/png", "{fake}");
    let (_, _, resp) = http(
        b.port,
        "POST",
        "/api/upload",
        &[("Content-Type", "text/plain"), ("X-Filename", "bin.txt")],
        &[0xff, 0xfe, 0x00, 0x80],
    );
    assert_eq!(json_of(&resp)["kind"], "binary");
    let (_, _, resp) =
        http(b.port, "POST", "/api/upload", &[("Content-Type", "text/html")], b"<html>hi</html>");
    let html = json_of(&resp);
    // Too large, empty, multipart without a file.
    let big = vec![7u8; 65 << 10];
    let (status, _, _) =
        http(b.port, "POST", "/api/upload", &[("Content-Type", "application/octet-stream")], &big);
    assert_eq!(status, 413);
    let (status, _, _) = http(b.port, "POST", "/api/upload", &[], b"");
    assert_eq!(status, 400);
    let (status, _, _) = http(
        b.port,
        "POST",
        "/api/upload",
        &[("Content-Type", "multipart/form-data; boundary=zz")],
        b"--zz\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nx\r\n--zz--\r\n",
    );
    assert_eq!(status, 400);
    let (status, _, _) =
        http(b.port, "POST", "/api/upload", &[("Content-Type", "multipart/form-data")], b"junk");
    assert_eq!(status, 400);
    // Listed and fetched back as stored.
    let list = json_of(&http(b.port, "GET", "/api/uploads", &[], b"").2);
    assert_eq!(list["files"].as_array().unwrap().len(), 5, "{list}");
    let (status, h, bytes) = http(b.port, "GET", png["url"].as_str().unwrap(), &[], b"");
    assert_eq!((status, bytes.as_slice()), (200, PNG));
    assert_eq!(header(&h, "content-type"), Some("image/png"));
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    let (_, h, _) = http(b.port, "GET", html["url"].as_str().unwrap(), &[], b"");
    assert!(header(&h, "content-disposition").unwrap().starts_with("attachment"), "{h:?}");
    for bad in
        ["/api/uploads/..%2F..%2Fetc%2Fpasswd", "/api/uploads/../server.log", "/api/uploads/ZZ"]
    {
        assert_eq!(http(b.port, "GET", bad, &[], b"").0, 404, "{bad}");
    }
    // Used from chat: the text inlined, the image as a data URL.
    let chat = json!({
        "messages": [{"role": "user", "content": "look"}],
        "attachments": [text_file["id"], {"id": png["id"]}],
    });
    let (status, _, body) = http(b.port, "POST", "/api/chat", &[], chat.to_string().as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let sent = &stub.stats()["last_chat"]["messages"][0]["content"];
    let parts = sent.as_array().unwrap_or_else(|| panic!("content parts expected: {sent}"));
    assert_eq!(parts[0], json!({"type": "text", "text": "look"}));
    assert!(parts[1]["text"].as_str().unwrap().contains("root:x:0:0"), "{sent}");
    assert!(
        parts[2]["image_url"]["url"].as_str().unwrap().starts_with("data:image/png;base64,iVBOR"),
        "{sent}"
    );
    // A text-only attachment keeps a string content; a content part by file_id works too.
    let chat = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "file", "file_id": text_file["id"]}]}]});
    assert_eq!(http(b.port, "POST", "/api/chat", &[], chat.to_string().as_bytes()).0, 200);
    let sent = &stub.stats()["last_chat"]["messages"][0]["content"];
    assert!(sent[1]["text"].as_str().unwrap().contains("root:x:0:0"), "{sent}");
    // Delete.
    let url = fake["url"].as_str().unwrap();
    assert_eq!(http(b.port, "DELETE", url, &[], b"").0, 200);
    assert_eq!(http(b.port, "GET", url, &[], b"").0, 404);
}

#[test]
fn uploads_a_killed_bridge_left_unfinished_are_removed_at_start() {
    use hermeschat_pair::backend::uploads;
    let mut planted = None;
    let b = backend(closed_port(), KEY, |s| {
        let dir = s.state_dir.join("uploads");
        let kept = uploads::Store::new(dir.clone(), 1 << 20).put("kept.txt", "text/plain", b"k");
        // Killed mid-write (a dead pid's temp), and between the bytes and their metadata.
        let temp = dir.join(format!(".{}.2147483646.0.tmp", "ab".repeat(16)));
        let orphan = dir.join("cd".repeat(16));
        std::fs::write(&temp, vec![1u8; 256 << 10]).unwrap();
        std::fs::write(&orphan, vec![2u8; 256 << 10]).unwrap();
        planted = Some((kept.unwrap(), temp, orphan));
    });
    let (kept, temp, orphan) = planted.unwrap();
    assert!(!temp.exists(), "the dead bridge's temp file is removed");
    assert!(!orphan.exists(), "bytes without metadata are removed");
    let list = json_of(&http(b.port, "GET", "/api/uploads", &[], b"").2);
    assert_eq!(list["files"].as_array().unwrap().len(), 1, "{list}");
    let (status, _, bytes) = http(b.port, "GET", &kept.url, &[], b"");
    assert_eq!((status, bytes.as_slice()), (200, b"k".as_slice()), "a whole upload is kept");
    let log = std::fs::read_to_string(b.dir.join("server.log")).unwrap();
    assert!(log.contains("removed 2 unfinished upload file(s)"), "{log}");
}

#[test]
fn v1_and_sessions_are_proxied_unchanged_with_the_key_added() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |_| {});
    let (status, _, body) =
        http(b.port, "GET", "/v1/models", &[("Authorization", "Bearer phone")], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["data"][0]["id"], "hermes-agent");
    let (status, h, body) = http(
        b.port,
        "POST",
        "/api/sessions/s1/chat?x=1&y=%20",
        &[("Content-Type", "application/json"), ("X-HermesChat-Client", "hcl_x")],
        br#"{"message":"hi"}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(header(&h, "x-stub-echo"), Some("1"));
    let v = json_of(&body);
    assert_eq!(v["path"], "/api/sessions/s1/chat?x=1&y=%20", "{v}");
    assert_eq!(v["body"], r#"{"message":"hi"}"#, "{v}");
    assert_eq!(v["method"], "POST");
    let (status, _, body) = http(b.port, "DELETE", "/api/sessions/s1", &[], b"");
    assert_eq!((status, json_of(&body)["method"].as_str()), (200, Some("DELETE")));
    // Streaming passes through event by event.
    let c = LocalClient::new("127.0.0.1", b.port);
    let mut r = c
        .send("GET", "/v1/runs/r1/events", &[] as &[(&str, &str)], Body::Bytes(b""), &Abort::new())
        .unwrap();
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let mut buf = vec![0u8; 4096];
    let mut reads = Vec::new();
    loop {
        let n = r.body.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        reads.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert_eq!(stub.stats()["unauthorized"], 0);
    // Gateway down: a JSON 502 here (not chat).
    drop(stub);
    let (status, _, body) = http(b.port, "GET", "/v1/models", &[], b"");
    assert_eq!(status, 502);
    assert_eq!(json_of(&body)["error"]["code"], "gateway_offline");
}

#[test]
fn direct_fallback_when_the_gateway_is_down() {
    // The stub doubles as the direct provider (an OpenAI-compatible API on /v1).
    let provider = StubGateway::start(0, "sk-direct-provider-key");
    let b = backend(closed_port(), KEY, |s| {
        s.direct = Some(Direct {
            base_url: format!("http://127.0.0.1:{}/v1", provider.port),
            key: "sk-direct-provider-key".into(),
            model: Some("direct-model".into()),
        })
    });
    let (status, headers, pieces) = chat_pieces(b.port, &chat_body(None, "hi"), &[]);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-hermeschat-backend"), Some("direct"));
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    assert!(text.starts_with(": backend=direct"), "{text}");
    assert_eq!(sse_content(&text), "Hello from the stub gateway.", "{text}");
    assert!(pieces.len() >= 4, "direct output must stream too: {} pieces", pieces.len());
    assert_eq!(provider.stats()["last_chat"]["model"], "direct-model");
}

#[test]
fn connections_are_capped() {
    let b = backend(closed_port(), KEY, |s| s.max_connections = 2);
    let idle: Vec<TcpStream> =
        (0..2).map(|_| TcpStream::connect(("127.0.0.1", b.port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = third.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http(b.port, "GET", "/api/health", &[], b"").0, 200);
}

// =============================================================================================
// The backend key (where the owner of a connection cannot be looked up)

/// The backend key header.
const KEY_HEADER: &str = hermeschat_pair::backend::key::HEADER;

/// The key in `<dir>/backend.key`, after checking the file is 0600.
#[track_caller]
fn backend_key_of(dir: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("backend.key");
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "backend.key is not 0600");
    let key = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    assert!(key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()), "not a key: {key:?}");
    key
}

/// Asserts a 403 naming the missing (or wrong) backend key and the next step.
#[track_caller]
fn assert_key_refusal(status: u16, body: &[u8], code: &str, what: &str) {
    assert_eq!(status, 403, "{what}: {}", String::from_utf8_lossy(body));
    let v = json_of(body);
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("serves only the hermeschat-pair of the account that started it")
            && msg.contains("--port <a free port>"),
        "{what}: {msg}"
    );
}

/// Where the owner of a connection cannot be looked up (macOS; here the lookup is turned off),
/// a request without this state directory's backend key, or with another, is refused 403 and
/// reaches nothing; the health check stays open. With the key it is served, and the key goes
/// no further than the backend.
#[test]
fn without_the_owner_lookup_only_requests_with_the_backend_key_are_served() {
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |s| s.peer_lookup = false);
    let key = backend_key_of(&b.dir);
    let chat = chat_body(None, "hi");
    let json_ct = ("Content-Type", "application/json");
    let wrong = "0".repeat(64);
    let routes: [(&str, &str, &[u8]); 6] = [
        ("POST", "/api/chat", &chat),
        ("GET", "/v1/models", b""),
        ("POST", "/api/sessions/s1/chat", b"{}"),
        ("GET", "/api/gateway/health", b""),
        ("POST", "/api/gateway/restart?action=stop", b""),
        ("GET", "/api/uploads", b""),
    ];
    for (presented, code) in [(None, "backend_key_required"), (Some(&wrong), "backend_key_wrong")] {
        for (method, path, body) in routes {
            let mut headers = vec![json_ct];
            headers.extend(presented.map(|k| (KEY_HEADER, k.as_str())));
            let (status, _, out) = http(b.port, method, path, &headers, body);
            assert_key_refusal(status, &out, code, &format!("{method} {path} ({code})"));
        }
    }
    let stats = stub.stats();
    assert_eq!(stats["requests"], 0, "a refused request reached the gateway: {stats}");
    // The health check needs no key (the commands that look for a backend ask it).
    let (status, _, body) = http(b.port, "GET", "/api/health", &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["server"], "hermeschat-pair");

    // With the key (in any case of the header's name): served, and not passed on.
    let (status, h, pieces) = chat_pieces(b.port, &chat, &[("x-hermeschat-backend-key", &key)]);
    assert_eq!(status, 200);
    assert_eq!(header(&h, "x-hermeschat-backend"), Some("gateway"));
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(sse_content(&text), "Hello from the stub gateway.", "{text}");
    let (status, _, body) =
        http(b.port, "POST", "/api/sessions/s1/chat", &[json_ct, (KEY_HEADER, &key)], b"{}");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = http(b.port, "GET", "/v1/models", &[(KEY_HEADER, &key)], b"");
    assert_eq!(status, 200);
    // Every request the gateway saw (the health check's and key check's too), and none with
    // the key.
    let stats = stub.stats();
    assert_eq!(stats["chats"], 1, "{stats}");
    let seen = stats["request_headers"].to_string();
    assert!(!seen.contains("backend-key") && !seen.contains(&key), "key passed on: {seen}");
    let log = std::fs::read_to_string(b.dir.join("server.log")).unwrap();
    assert!(log.contains("refused a request without the backend key (403)"), "{log}");
    assert!(!log.contains(&key) && !log.contains(&wrong), "a key in server.log: {log}");
}

/// Where the owner of a connection is looked up (Linux), this user's own clients are served
/// as they always were: no key needed, and a key header sent along (any value) is taken out
/// before the gateway.
#[test]
fn with_the_owner_lookup_this_users_keyless_clients_are_served_as_before() {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        eprintln!("skipped: no /proc/net/tcp, so the owner of a connection may not be known");
        return;
    }
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |_| {});
    let (status, _, pieces) = chat_pieces(b.port, &chat_body(None, "hi"), &[]);
    assert_eq!(status, 200);
    let text: String = pieces.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(sse_content(&text), "Hello from the stub gateway.", "{text}");
    assert_eq!(http(b.port, "GET", "/v1/models", &[], b"").0, 200);
    assert_eq!(http(b.port, "GET", "/api/gateway/health", &[], b"").0, 200);
    let sent = [(KEY_HEADER, "not-the-key"), ("Content-Type", "application/json")];
    let (status, _, body) = http(b.port, "POST", "/api/sessions/s1/chat", &sent, b"{}");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stats = stub.stats();
    assert_eq!(stats["chats"], 1, "{stats}");
    let seen = stats["request_headers"].to_string();
    assert!(!seen.contains("backend-key"), "the key header was passed on: {seen}");
}

// =============================================================================================
// End to end: app → relay → daemon → built-in backend → (woken) stub gateway

#[test]
fn e2e_pairing_wakes_the_gateway_chat_streams_and_restart_brings_it_back() {
    let relay = Relay::new();
    let gw_port = free_port();
    let u = stub_user("e2e-wake", gw_port);
    let (qr, run) = u.pair(&relay.url(), free_port());
    assert!(
        run.stdout.contains(&format!(
            "Hermes Gateway started (via the Hermes venv) (127.0.0.1:{gw_port})"
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("Built-in Hermes backend ready"), "{}", run.stdout);
    let calls = std::fs::read_to_string(u.root.join("systemctl.calls")).unwrap_or_default();
    assert!(calls.contains("--user start hermes-gateway"), "systemd was not tried first: {calls}");
    let mut app = connect_app(&qr);

    // Streaming chat through the whole path, chunk by chunk.
    let body = String::from_utf8(chat_body(None, "hello")).unwrap();
    let chat = |id: &str| {
        request(id, "POST", "/api/chat", &[("Content-Type", "application/json")], Some(&body))
    };
    let r = app_fetch(&mut app, &chat("c1"), Duration::from_secs(20));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse_content(&r.text()), "Hello from the stub gateway.", "{r:?}");
    assert!(r.pieces.len() >= 5, "not chunk by chunk: {} pieces", r.pieces.len());
    let span = r.pieces.last().unwrap().0 - r.pieces[0].0;
    assert!(span >= Duration::from_millis(120), "pieces arrived together ({span:?})");

    // Stop the gateway from the app: chat answers an SSE error event.
    let r = app_fetch(
        &mut app,
        &request("s1", "POST", "/api/gateway/restart?action=stop", &[], None),
        Duration::from_secs(40),
    );
    let v = r.json();
    assert_eq!((v["ok"].as_bool(), v["gateway"].as_str()), (Some(true), Some("offline")), "{v}");
    assert!(
        v["attempted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "pid" && s["outcome"] == "ok"),
        "{v}"
    );
    let r = app_fetch(&mut app, &chat("c2"), Duration::from_secs(20));
    assert_eq!(r.status, 200);
    assert_eq!(sse_error(&r.text()).expect("error event")["code"], "gateway_offline", "{r:?}");
    let v = app_fetch(
        &mut app,
        &request("h1", "GET", "/api/gateway/health", &[], None),
        Duration::from_secs(10),
    )
    .json();
    assert_eq!(v["backend"], "none", "{v}");

    // Start it again from the app.
    let r = app_fetch(
        &mut app,
        &request("s2", "POST", "/api/gateway/restart?action=start", &[], None),
        Duration::from_secs(40),
    );
    let v = r.json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["startedVia"], "venv", "{v}");
    let steps: Vec<&str> =
        v["attempted"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(steps, ["systemd", "venv"], "{v}");
    assert!(v["log"].as_str().unwrap().contains("hermes_cli.main gateway run"), "{v}");
    assert!(v["log"].as_str().unwrap().len() <= 4096);
    let r = app_fetch(&mut app, &chat("c3"), Duration::from_secs(20));
    assert_eq!(sse_content(&r.text()), "Hello from the stub gateway.", "{r:?}");

    // Restart: stop then start.
    let v = app_fetch(
        &mut app,
        &request("s3", "POST", "/api/gateway/restart?action=restart", &[], None),
        Duration::from_secs(40),
    )
    .json();
    assert_eq!((v["ok"].as_bool(), v["gateway"].as_str()), (Some(true), Some("online")), "{v}");
    let log = u.server_log();
    assert!(log.contains("POST /api/chat -> 200"), "{log}");
    assert!(!log.contains(KEY) && !u.gateway_log().contains(KEY), "the key leaked into a log");
}

/// After a reboot the boot service runs `hermeschat-pair --foreground`: that bridge wakes the
/// gateway itself (nothing else would), so chat works without the pairing command. The bridge
/// raises its own open-file limit; the gateway it starts gets the one the bridge started with.
#[test]
fn e2e_a_foreground_bridge_wakes_the_gateway() {
    let relay = Relay::new();
    let gw_port = free_port();
    let u = stub_user("fg-wake", gw_port);
    let nofile = u.root.join("gateway.nofile");
    u.script(
        &u.venv_python(),
        &format!(
            "#!/bin/sh\nulimit -Sn > {}\nexec python3 {STUB_GATEWAY} \"$@\"\n",
            nofile.display()
        ),
    );
    let (qr, _) = u.pair(&relay.url(), free_port());
    let mut app = connect_app(&qr);
    // As after a reboot: no daemon, no gateway.
    u.run(&["--stop"]).assert_code(0, "--stop");
    assert_eq!(app.recv(), Frame::BridgeStatus { online: false });
    u.kill_gateway();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", gw_port)).is_ok() {
        assert!(Instant::now() < deadline, "the stub gateway did not go away");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&nofile);
    let mut cmd = u.cmd(&["--foreground"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    // Start the bridge with a soft limit below the hard one, as macOS does (256).
    let mut hard = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid, writable rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) }, 0);
    let soft = 512.min(hard.rlim_max);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: only setrlimit, async-signal-safe, runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard.rlim_max };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
    }
    let mut bridge = cmd.spawn().unwrap();
    assert_eq!(app.recv(), Frame::BridgeStatus { online: true });
    // It waits 10 s for the gateway to come up by itself first.
    let deadline = Instant::now() + Duration::from_secs(45);
    while TcpStream::connect(("127.0.0.1", gw_port)).is_err() {
        assert!(Instant::now() < deadline, "the foreground bridge did not wake the gateway");
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = String::from_utf8(chat_body(None, "hello")).unwrap();
    let chat =
        request("c1", "POST", "/api/chat", &[("Content-Type", "application/json")], Some(&body));
    let r = app_fetch(&mut app, &chat, Duration::from_secs(20));
    assert_eq!(sse_content(&r.text()), "Hello from the stub gateway.", "{r:?}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", bridge.id())).unwrap();
    let _ = bridge.kill();
    let _ = bridge.wait();
    let bridge_soft = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let bridge_soft: libc::rlim_t = bridge_soft.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(bridge_soft, hard.rlim_max, "the bridge did not raise its limit: {limits}");
    let gateway_soft = std::fs::read_to_string(&nofile).unwrap();
    assert_eq!(gateway_soft.trim(), soft.to_string(), "the gateway got the bridge's raised limit");
}

/// Where the owner of a connection cannot be looked up (macOS; here turned off with the
/// test-only `HERMESCHAT_PEER_LOOKUP=off`), the daemon's bridge brings the built-in backend
/// its key: the app's requests through the relay reach the gateway, `--status` and `--doctor`
/// find the backend, while a client of this machine without the key gets 403 and nothing
/// reaches the gateway. The key is in `backend.key` (0600) and nowhere else: not in a log, the
/// daemon's argv, or what the CLI prints.
#[test]
fn e2e_without_the_owner_lookup_the_bridge_brings_the_backend_key() {
    let relay = Relay::new();
    let stub = StubGateway::start(0, KEY);
    let mut u = User::new("backend-key");
    u.write_dotenv(&format!(
        "API_SERVER_ENABLED=true\nAPI_SERVER_KEY={KEY}\nAPI_SERVER_PORT={}\n",
        stub.port
    ));
    u.env.push((hermeschat_pair::backend::peer::LOOKUP_ENV.into(), "off".into()));
    let port = free_port();
    let (qr, run) = u.pair(&relay.url(), port);
    assert!(run.stdout.contains("Built-in Hermes backend ready"), "{}", run.stdout);
    let key = backend_key_of(&u.state);

    // The app, through relay → bridge → built-in backend → gateway.
    let mut app = connect_app(&qr);
    let body = String::from_utf8(chat_body(None, "hello")).unwrap();
    let json_ct = ("Content-Type", "application/json");
    let r = app_fetch(
        &mut app,
        &request("c1", "POST", "/api/chat", &[json_ct], Some(&body)),
        Duration::from_secs(20),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(sse_content(&r.text()), "Hello from the stub gateway.", "{r:?}");
    // A key header from the app is not the bridge's: dropped, the bridge's own sent.
    let r = app_fetch(
        &mut app,
        &request("m1", "GET", "/v1/models", &[(KEY_HEADER, "from-the-app")], None),
        Duration::from_secs(20),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["data"][0]["id"], "hermes-agent", "{r:?}");
    let chats = stub.stats()["chats"].as_u64().unwrap();
    assert_eq!(chats, 1);

    // Anyone else on this machine, without the key: 403, and nothing reaches the gateway.
    let (status, _, out) = http(port, "POST", "/api/chat", &[json_ct], body.as_bytes());
    assert_key_refusal(status, &out, "backend_key_required", "keyless chat");
    let (status, _, out) = http(port, "GET", "/v1/models", &[], b"");
    assert_key_refusal(status, &out, "backend_key_required", "keyless /v1/models");
    let (status, _, out) = http(port, "GET", "/v1/models", &[(KEY_HEADER, "from-the-app")], b"");
    assert_key_refusal(status, &out, "backend_key_wrong", "/v1/models with a wrong key");
    let stats = stub.stats();
    assert_eq!(stats["chats"], 1, "a keyless chat reached the gateway: {stats}");
    let seen = stats["request_headers"].to_string();
    assert!(!seen.contains("backend-key") && !seen.contains(&key), "key passed on: {seen}");
    assert!(!seen.contains("from-the-app"), "the app's key header passed on: {seen}");

    // The commands that look for the backend need no key.
    u.run(&["--status"]).assert_code(0, "--status");
    let doctor = u.run(&["--doctor", "--json"]);
    let v: Value = serde_json::from_str(doctor.stdout.trim())
        .unwrap_or_else(|e| panic!("--doctor --json ({e}): {}", doctor.stdout));
    for hop in ["relay", "backend"] {
        let found = v["hops"].as_array().unwrap().iter().find(|h| h["id"] == hop).cloned();
        assert_eq!(found.as_ref().map(|h| h["state"].clone()), Some(json!("ok")), "{hop}: {v}");
    }

    // The key: nowhere but backend.key.
    let pid = std::fs::read_to_string(u.state.join("bridge.pid")).unwrap();
    let argv = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    let bridge_log = std::fs::read_to_string(u.state.join("bridge.log")).unwrap_or_default();
    let everything = format!(
        "{}{}{}{}{}{}{}",
        run.stdout,
        run.stderr,
        doctor.stdout,
        doctor.stderr,
        u.server_log(),
        bridge_log,
        String::from_utf8_lossy(&argv)
    );
    assert!(!everything.contains(&key), "the backend key leaked");
    assert!(
        u.server_log().contains("refused a request without the backend key"),
        "{}",
        u.server_log()
    );
}

/// A gateway that is up but refuses the key (the key changed in `.env` while it runs), or
/// with no key configured here: pairing and `--status` say so with ⚠ (not "✓ online"), naming
/// the file the key is read from (under `HERMES_HOME`) and the fix; the app's chat error too.
#[test]
fn e2e_pairing_and_status_warn_when_the_gateway_refuses_the_key() {
    let relay = Relay::new();
    let stub = StubGateway::start(0, KEY);
    let mut u = User::new("key-refused");
    let home = u.root.join("hermes-elsewhere");
    std::fs::create_dir_all(&home).unwrap();
    u.env.push(("HERMES_HOME".into(), home.display().to_string()));
    let env_file = home.join(".env");
    let changed = "changed-key-0123456789abcdef";
    let write_env = |key: Option<&str>| {
        let key = key.map(|k| format!("API_SERVER_KEY={k}\n")).unwrap_or_default();
        std::fs::write(&env_file, format!("{key}API_SERVER_PORT={}\n", stub.port)).unwrap();
    };
    write_env(Some(changed));
    let online = format!("Hermes Gateway online (127.0.0.1:{})", stub.port);
    let refused = format!(
        "⚠ {online}, but it refuses the key (HTTP 401) from API_SERVER_KEY in {}",
        env_file.display()
    );
    let (qr, run) = u.pair(&relay.url(), free_port());
    assert!(run.stdout.contains(&refused), "{}", run.stdout);
    assert!(!run.stdout.contains(&format!("✓ {online}")), "{}", run.stdout);
    assert!(run.stdout.contains("Fix: the gateway runs with another key"), "{}", run.stdout);

    let status = |json: bool| {
        let run = u.run(if json { &["--status", "--json"] } else { &["--status"] });
        run.assert_code(0, "--status (the gateway is reported, never required)");
        run
    };
    let run = status(false);
    assert!(run.stdout.contains(&refused), "{}", run.stdout);
    let v: Value = serde_json::from_str(status(true).stdout.trim()).unwrap();
    assert_eq!(
        (v["gateway"]["state"].as_str(), v["gateway"]["key"].as_str()),
        (Some("online"), Some("refused")),
        "{v}"
    );

    // The app's chat error names the same file.
    let mut app = connect_app(&qr);
    let body = String::from_utf8(chat_body(None, "hi")).unwrap();
    let chat =
        request("c1", "POST", "/api/chat", &[("Content-Type", "application/json")], Some(&body));
    let r = app_fetch(&mut app, &chat, Duration::from_secs(20));
    let err = sse_error(&r.text()).expect("an error event");
    assert_eq!(err["code"], "gateway_auth", "{r:?}");
    let source = format!("API_SERVER_KEY in {}", env_file.display());
    assert!(err["message"].as_str().unwrap().contains(&source), "{err}");

    // The key removed: "no key for it is configured", every place it is looked for named.
    write_env(None);
    let run = status(false);
    let missing = format!(
        "⚠ {online}, but no key for it is configured (no API_SERVER_KEY in the environment or {}",
        env_file.display()
    );
    assert!(run.stdout.contains(&missing), "{}", run.stdout);
    assert!(run.stdout.contains(&home.join("config.yaml").display().to_string()), "{}", run.stdout);
    let v: Value = serde_json::from_str(status(true).stdout.trim()).unwrap();
    assert_eq!(v["gateway"]["key"], "missing", "{v}");

    // The gateway's key: ✓.
    write_env(Some(KEY));
    let run = status(false);
    assert!(run.stdout.contains(&format!("✓ {online}")), "{}", run.stdout);
    let v: Value = serde_json::from_str(status(true).stdout.trim()).unwrap();
    assert_eq!(v["gateway"]["key"], "accepted", "{v}");

    let everything = format!("{}{}{}", run.stdout, u.server_log(), u.gateway_log());
    assert!(!everything.contains(changed) && !everything.contains(KEY), "a key leaked");
}

#[test]
fn e2e_wake_failures_are_diagnosed_by_name_and_never_block_pairing() {
    let relay = Relay::new();
    // (setup, expected words in the "not running" line)
    type Setup = Box<dyn Fn(&User, u16)>;
    let cases: Vec<(&str, Setup, &str)> = vec![
        (
            "not-enabled",
            Box::new(|u: &User, _| u.write_dotenv("# nothing here\n")),
            "API server is not enabled",
        ),
        (
            "short-key",
            Box::new(|u: &User, p| {
                u.write_dotenv(&format!(
                    "API_SERVER_ENABLED=true\nAPI_SERVER_KEY=short\nAPI_SERVER_PORT={p}\n"
                ))
            }),
            "API_SERVER_KEY is too short (5 characters",
        ),
        (
            "no-key",
            Box::new(|u: &User, p| {
                u.write_dotenv(&format!("API_SERVER_ENABLED=true\nAPI_SERVER_PORT={p}\n"))
            }),
            "API_SERVER_KEY is missing",
        ),
        (
            "no-aiohttp",
            Box::new(|u: &User, p| {
                u.write_dotenv(&format!("API_SERVER_KEY={KEY}\nAPI_SERVER_PORT={p}\n"));
                u.script(&u.venv_python(), "#!/bin/sh\nexit 1\n");
                let site = u.hermes().join("hermes-agent/venv/lib/python3.11/site-packages");
                std::fs::create_dir_all(site.join("yaml")).unwrap();
            }),
            "aiohttp is missing",
        ),
        (
            "aiohttp-at-runtime",
            Box::new(|u: &User, p| {
                u.write_dotenv(&format!("API_SERVER_KEY={KEY}\nAPI_SERVER_PORT={p}\n"));
                u.script(
                    &u.venv_python(),
                    "#!/bin/sh\necho 'WARNING gateway.run: API Server: aiohttp not installed' >&2\nsleep 30\n",
                );
            }),
            "aiohttp is missing",
        ),
    ];
    // The system directories of the users' PATH: what the manual commands may find there.
    let on_system_path =
        |name: &str| ["/usr/local/bin", "/usr/bin", "/bin"].iter().any(|d| is_program(d, name));
    for (tag, setup, words) in cases {
        let port = free_port();
        let u = User::new(tag);
        setup(&u, port);
        let t0 = Instant::now();
        let (_, run) = u.pair(&relay.url(), free_port());
        let took = t0.elapsed();
        assert!(
            run.stdout.contains("Hermes Gateway not running") && run.stdout.contains(words),
            "{tag}: {}",
            run.stdout
        );
        // The fixes name the Hermes home's own .env, not a literal ~/.hermes.
        if tag == "not-enabled" || tag == "short-key" {
            let env_file = u.hermes().join(".env").display().to_string();
            assert!(
                run.stdout.contains(&format!("Fix: add to {env_file}"))
                    || run.stdout.contains(&format!("Fix: set a longer key in {env_file}")),
                "{tag}: {}",
                run.stdout
            );
            assert!(!run.stdout.contains("~/.hermes"), "{tag}: {}", run.stdout);
        }
        // Only the commands whose program exists are suggested: the venv's python where the
        // case made one, never `hermes` (not installed), never systemctl (no gateway unit is
        // installed in this HOME, whether or not the system has systemctl).
        let hints = manual_hints(&run.stdout);
        let venv = u.venv_python().exists();
        assert_eq!(hints.contains("-m hermes_cli.main gateway run"), venv, "{tag}: {hints}");
        assert!(!hints.contains("systemctl"), "{tag}: {hints}");
        if !on_system_path("hermes") {
            assert!(!hints.contains("hermes gateway"), "{tag}: {hints}");
        }
        assert!(took < Duration::from_secs(25), "{tag}: pairing took {took:?}");
        u.kill_gateway();
    }

    // `hermes` on PATH and a service manager, but no gateway service installed: only
    // `hermes gateway run` in the foreground (the service commands would find no unit).
    let u = User::new("hermes-on-path");
    u.write_dotenv("# nothing here\n");
    u.script(&u.bin.join("hermes"), "#!/bin/sh\necho 'Not supported' >&2\nexit 1\n");
    u.script(&u.bin.join("systemctl"), "#!/bin/sh\nexit 1\n");
    u.script(&u.bin.join("launchctl"), "#!/bin/sh\nexit 1\n");
    let (_, run) = u.pair(&relay.url(), free_port());
    let hints = manual_hints(&run.stdout);
    assert!(!hints.contains("hermes gateway start"), "{hints}");
    assert!(!hints.contains("systemctl"), "{hints}");
    assert!(hints.contains("hermes gateway run  # in the foreground"), "{hints}");
    assert!(!hints.contains("venv"), "{hints}");
    drop(u);

    // With the gateway's unit installed (`hermes gateway install`): the service commands too.
    let u = User::new("hermes-service");
    u.write_dotenv("# nothing here\n");
    u.script(&u.bin.join("hermes"), "#!/bin/sh\necho 'Not supported' >&2\nexit 1\n");
    u.script(&u.bin.join("systemctl"), "#!/bin/sh\nexit 1\n");
    let units = u.home.join(".config/systemd/user");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("hermes-gateway.service"), "[Service]\n").unwrap();
    let (_, run) = u.pair(&relay.url(), free_port());
    let hints = manual_hints(&run.stdout);
    assert!(hints.contains("  hermes gateway start\n"), "{hints}");
    assert!(hints.contains("  systemctl --user start hermes-gateway\n"), "{hints}");
    assert!(hints.contains("hermes gateway run  # in the foreground"), "{hints}");

    // Nothing that could start it (an empty PATH, no venv): no command is suggested, the line
    // says what is missing.
    let mut u = User::new("nothing-to-start");
    let port = free_port();
    u.write_dotenv(&format!("API_SERVER_KEY={KEY}\nAPI_SERVER_PORT={port}\n"));
    u.env.push(("PATH".into(), u.bin.display().to_string()));
    let (_, run) = u.pair(&relay.url(), free_port());
    assert!(!run.stdout.contains("Start it by hand"), "{}", run.stdout);
    assert!(
        run.stdout.contains("nothing here can start it (no `hermes` on PATH"),
        "{}",
        run.stdout
    );

    // Port held by something that is not the gateway.
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in squatter.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let u = stub_user("squatter", port);
    let (_, run) = u.pair(&relay.url(), free_port());
    assert!(
        run.stdout.contains(&format!("port 127.0.0.1:{port} is held by something else")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("lsof -nP -iTCP:"), "{}", run.stdout);
}

/// The pairing output from "Start it by hand" on (the manual commands), or "" without it.
fn manual_hints(stdout: &str) -> String {
    stdout.find("Start it by hand").map_or_else(String::new, |i| stdout[i..].to_owned())
}

/// True when `dir/name` is an executable file.
fn is_program(dir: &str, name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(std::path::Path::new(dir).join(name))
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// On a machine with several users, only the user running the bridge may use its built-in
/// backend (which adds that user's gateway key): another account's connection gets 403 and
/// nothing reaches the gateway. Needs root, to run the other account's client.
#[test]
fn another_user_of_the_machine_is_refused() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/proc/net/tcp").exists() {
        eprintln!("skipped: needs root (to act as another user) and /proc/net/tcp");
        return;
    }
    let stub = StubGateway::start(0, KEY);
    let b = backend(stub.port, KEY, |_| {});
    let ask = |as_nobody: bool, path: &str| -> String {
        let script = format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {}))\n\
             s.sendall(b'GET {path} HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n')\n\
             out = b''\nwhile True:\n    d = s.recv(4096)\n    if not d: break\n    out += d\n\
             print(out.split(b'\\r\\n')[0].decode())\n",
            b.port
        );
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", &script]).stdin(Stdio::null());
        if as_nobody {
            // SAFETY: only setgid/setuid (async-signal-safe) run between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let out = cmd.output().expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(ask(true, "/v1/models"), "HTTP/1.1 403 Forbidden", "another user was served");
    assert_eq!(ask(false, "/v1/models"), "HTTP/1.1 200 OK", "the bridge's own user was refused");
    // Not even the health check: another user's pairing must not take this backend for its.
    assert_eq!(ask(true, "/api/health"), "HTTP/1.1 403 Forbidden", "another user's health check");
}

/// A program of another user (uid 65534) listening on 127.0.0.1: it answers every request 200
/// `{}` and prints, one line each, what every connection sent it. Needs root.
struct Squatter {
    child: std::process::Child,
    port: u16,
    /// Its output, a line per connection.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Squatter {
    fn start() -> Squatter {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let script = "import socket, sys\n\
            l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(16)\n\
            print('READY', l.getsockname()[1], flush=True)\n\
            while True:\n\
            \x20   c, _ = l.accept(); c.settimeout(1.0); got = b''\n\
            \x20   try:\n\
            \x20       while b'\\r\\n\\r\\n' not in got:\n\
            \x20           d = c.recv(65536)\n\
            \x20           if not d: break\n\
            \x20           got += d\n\
            \x20   except OSError: pass\n\
            \x20   print(repr(got), flush=True)\n\
            \x20   try: c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\n{}')\n\
            \x20   except OSError: pass\n\
            \x20   c.close()\n";
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::piped());
        // SAFETY: only setgid/setuid (async-signal-safe) run between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("python3");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let port = first.strip_prefix("READY ").and_then(|p| p.trim().parse().ok());
        let port = port.unwrap_or_else(|| panic!("squatter did not start: {first:?}"));
        // Keep its output for `received`.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Squatter { child, port, lines: rx }
    }

    /// What each connection sent it so far (Python `repr` of the bytes).
    fn received(&self) -> Vec<String> {
        // A connection is printed when it ends or after its 1 s read timeout.
        std::thread::sleep(Duration::from_millis(1200));
        self.lines.try_iter().collect()
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root_with_proc() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/proc/net/tcp").exists() {
        eprintln!("skipped: needs root (to act as another user) and /proc/net/tcp");
        return false;
    }
    true
}

/// Another user's program that took the gateway's port (the gateway is down) gets nothing
/// from the built-in backend, the gateway key least of all: the app gets 502
/// `gateway_port_held`, and `--doctor` names the squatter without sending the key.
#[test]
fn a_gateway_port_taken_by_another_user_gets_nothing() {
    if !is_root_with_proc() {
        return;
    }
    let squatter = Squatter::start();
    let b = backend(squatter.port, KEY, |_| {});
    let (status, _, body) = http(b.port, "GET", "/v1/models", &[], b"");
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let v = json_of(&body);
    assert!(v.to_string().contains("gateway_port_held"), "{v}");
    let (status, _, body) = http(b.port, "GET", "/api/health", &[], b"");
    assert_eq!(status, 200);
    assert!(json_of(&body).to_string().contains("offline"), "{}", String::from_utf8_lossy(&body));

    // --doctor: the gateway hop names the other user's program; the key is never sent.
    let user = stub_user("squatted", squatter.port);
    let run = user.run(&["--doctor", "--json"]);
    assert!(run.stdout.contains("another user's program"), "{}\n{}", run.stdout, run.stderr);

    let got = squatter.received();
    assert!(got.iter().all(|line| !line.contains(KEY)), "the key reached the squatter: {got:?}");
    // Nothing at all was sent: the backend's connections, --doctor's checks.
    assert!(got.iter().all(|line| line == "b''"), "{got:?}");
}

/// Pairing with another user's program on the backend port is refused: the app's traffic
/// would go to it.
#[test]
fn a_backend_port_taken_by_another_user_is_refused_at_pairing() {
    if !is_root_with_proc() {
        return;
    }
    let squatter = Squatter::start();
    let relay = Relay::start(&[]);
    let user = stub_user("squatted-backend", free_port());
    let port = squatter.port.to_string();
    let run = user.run(&["--server", &relay.url(), "--port", &port]);
    run.assert_code(1, "pairing with another user's program on the backend port");
    assert!(run.stderr.contains("another user's program"), "{}", run.stderr);
    assert!(!user.state.join("bridge.pid").exists(), "a daemon was started");
    let got = squatter.received();
    assert!(got.iter().all(|line| line == "b''"), "something was sent: {got:?}");

    // An account the user trusts on purpose is used.
    let mut user = user;
    user.env.push(("HERMESCHAT_TRUSTED_UIDS".into(), "1234, 65534".into()));
    let run = user.run(&["--json", "--server", &relay.url(), "--port", &port]);
    run.assert_code(0, "pairing with a trusted account's backend");
    let got = squatter.received();
    assert!(got.iter().any(|line| line.contains("/api/health")), "{got:?}");
}
