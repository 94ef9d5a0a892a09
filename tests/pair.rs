//! End-to-end tests of `hermeschat-pair`: the real CLI and its daemon, the real
//! `hermeschat-relay`, and a FastAPI + uvicorn backend (`tests/fixtures/backend.py`), all on
//! loopback, driven through an app test client.
//!
//! Every test has its own state directory (`HERMESCHAT_HOME`), working directory, relay and
//! backend, and stops its daemon on the way out (also when it fails: see [`Env`]'s `Drop`).
//! Needs `python3 -m pip install -r tests/fixtures/requirements.txt`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::session::*;
use common::{
    AppClient, ConnectError, Event, Registry, Relay, b64, hwm_kib, random_bytes,
    rss_growth_settles, rss_kib, unb64, with_immutable_dir, ws_read,
};
use hermeschat_pair::protocol::{ErrorCode, Frame, RequestFrame};
use serde_json::{Value, json};

#[test]
fn pairing_via_json_payload_gets_the_app_online() {
    let s = setup();
    let mut app = s.app;
    // The registry sees the bridge online, for the app's own credential too.
    let (status, v) = Registry::new(&s.qr.s).bridge_status(&s.qr.g, Some(&s.client_secret));
    assert_eq!((status, &v), (200, &json!({"hasBridge": true, "online": true})));
    // bridge.json holds the identity the QR names.
    let id = s.env.bridge_json();
    assert_eq!(id["bridgeId"], s.qr.g.as_str(), "{id}");
    // The access code is single use.
    let (status, v) = Registry::new(&s.qr.s).verify(&s.qr.g, &s.qr.a, Some("Second Phone"));
    assert_eq!(status, 409, "reusing the QR's access code: {v}");
    assert_echo(&mut app, "first", &s.client_id);
}

#[test]
fn text_round_trip_reaches_backend_with_client_header() {
    let s = setup();
    let mut app = s.app;
    // A plain GET.
    let w = fetch(&mut app, &request("h1", "GET", "/api/health", &[], None));
    assert_eq!((w.status, w.json()), (200, json!({"status": "ok"})));
    assert_eq!(header(&w.headers, "content-length"), None, "the frame's body is the length");
    // HEAD: no body, and the size a GET gets, the one way to learn it without the body.
    let w = fetch(&mut app, &request("h2", "HEAD", "/api/health", &[], None));
    assert_eq!((w.status, w.body.as_slice()), (200, &b""[..]), "{w:?}");
    assert_eq!(header(&w.headers, "content-length"), Some("15"), "{w:?}");
    // JSON through /api/echo, with headers an app must not be able to forge or smuggle.
    let body = json!({"msg": "bonjour — 你好 ✓", "n": 42}).to_string();
    let f = request(
        "e1",
        "POST",
        "/api/echo",
        &[
            ("Content-Type", "application/json"),
            ("X-Custom", "kept"),
            ("X-HermesChat-Client", "hcl_0000000000000000"),
            ("Host", "evil.example"),
            ("Connection", "close"),
        ],
        Some(&body),
    );
    let w = fetch(&mut app, &f);
    assert_eq!(w.status, 200, "{w:?}");
    assert!(!w.streamed, "a small JSON answer comes whole: {w:?}");
    let v = w.json();
    assert_eq!(v["body"], json!({"msg": "bonjour — 你好 ✓", "n": 42}), "{v}");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["custom"], "kept", "ordinary headers pass: {v}");
    assert_eq!(v["contentType"], "application/json", "{v}");
    assert_eq!(
        v["clients"],
        json!([s.client_id]),
        "X-HermesChat-Client must be the real clientId only: {v}"
    );
    assert_eq!(
        v["host"],
        format!("127.0.0.1:{}", s.backend.port),
        "the app's Host header must be dropped: {v}"
    );
    assert!(
        header(&w.headers, "content-type").is_some_and(|c| c.contains("application/json")),
        "{w:?}"
    );
    // Several in a row on the same connection.
    for i in 0..5 {
        assert_echo(&mut app, &format!("r{i}"), &s.client_id);
    }
    // Twenty at once: each answered exactly once, with its own body.
    let ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for id in &ids {
        let body = json!({"id": id}).to_string();
        app.send(&request(
            id,
            "POST",
            "/api/echo",
            &[("Content-Type", "application/json")],
            Some(&body),
        ));
    }
    for id in &ids {
        let w = assemble(app.recv_until_terminal(id));
        assert_eq!(w.json()["body"], json!({"id": id}), "concurrent {id}");
    }
    app.expect_silence(Duration::from_millis(200));

    // A text response carries `"bodyBase64":false`, as the design spec shows it: an app may
    // decode it as a field that must be there.
    app.send(&request("raw-h", "GET", "/api/health", &[], None));
    let text = match app.ws.read() {
        Ok(tungstenite::Message::Text(t)) => t.as_str().to_owned(),
        other => panic!("expected the response as text, got {other:?}"),
    };
    assert!(text.contains(r#""bodyBase64":false"#), "{text}");

    // A request of 64 top-level fields, the most the relay takes, is still read by the bridge
    // once the relay has stamped `client` and `conn` on it.
    let extra: Vec<String> = (0..60).map(|i| format!(r#""x{i}":0"#)).collect();
    app.send_text(&format!(
        r#"{{"type":"request","id":"wide","method":"GET","path":"/api/health",{}}}"#,
        extra.join(",")
    ));
    let w = assemble(app.recv_until_terminal("wide"));
    assert_eq!(w.status, 200, "{w:?}");
}

#[test]
fn latin1_header_values_reach_the_app_as_the_backend_meant_them() {
    // Starlette (FastAPI), Werkzeug and Node write a header value given as a string in
    // Latin-1: "café" leaves uvicorn as the bytes `caf\xE9`, which are not UTF-8.
    let s = setup();
    let mut app = s.app;
    let w = fetch(&mut app, &request("n1", "GET", "/api/named", &[], None));
    assert_eq!(w.status, 200, "{w:?}");
    assert_eq!(header(&w.headers, "x-name"), Some("café"), "{w:?}");
    assert_eq!(
        header(&w.headers, "content-disposition"),
        Some("attachment; filename=\"résumé.pdf\""),
        "{w:?}"
    );
}

#[test]
fn binary_8_mib_round_trips_byte_exact() {
    let s = setup();
    let mut app = s.app;
    let data = random_bytes(8 * MIB);
    let want = sha_hex(&data);

    // Multipart upload (what the app does for files).
    let boundary = "----hermeschat-test-boundary-7f3a";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let w = fetch(&mut app, &request_b64("up", "/api/upload", &[("Content-Type", &ct)], &body));
    assert_eq!(w.status, 200, "{}", String::from_utf8_lossy(&w.body));
    assert_eq!(w.json(), json!({"sha256": want, "size": 8 * MIB, "filename": "blob.bin"}));

    // Raw body.
    let w = fetch(
        &mut app,
        &request_b64("raw", "/api/raw", &[("Content-Type", "application/octet-stream")], &data),
    );
    assert_eq!(w.json(), json!({"sha256": want, "size": 8 * MIB}));

    // A frame of exactly the 16 MiB limit, which the relay accepts, still fits once the relay
    // has stamped `client` on it: the bridge keeps its relay socket (every app's) and answers.
    let data = random_bytes(12_000_000);
    let mut frame = json!({"type": "request", "id": "edge", "method": "POST", "path": "/api/raw",
        "headers": {"Content-Type": "application/octet-stream"}, "body": b64(&data),
        "bodyBase64": true, "pad": ""})
    .to_string();
    let room = (16 << 20) - frame.len();
    frame = frame.replace("\"pad\":\"\"", &format!("\"pad\":\"{}\"", "x".repeat(room)));
    assert_eq!(frame.len(), 16 << 20);
    app.send_text(&frame);
    let w = assemble(app.recv_until_terminal("edge"));
    assert_eq!(w.json(), json!({"sha256": sha_hex(&data), "size": 12_000_000}));

    // Download: 8 MiB of binary (streamed: over 256 KiB), and a small one (sent whole).
    for (id, size) in [("dl-big", 8 * MIB), ("dl-small", 1000)] {
        app.send(&request(id, "GET", &format!("/api/binary?size={size}&seed=7"), &[], None));
        let frames = app.recv_until_terminal(id);
        for f in &frames {
            if let Frame::ResponseChunk { body, body_base64, client, .. } = f {
                let n = if *body_base64 { unb64(body).len() } else { body.len() };
                assert!(n <= 256 << 10, "{id}: a chunk of {n} bytes (at most 256 KiB)");
                // Large chunks reach the app as the relay cut them: without `client`.
                assert_eq!(*client, None, "{id}: the relay left client in a chunk");
            }
        }
        let w = assemble(frames);
        assert_eq!(w.status, 200);
        assert_eq!(w.body.len(), size, "{id}: length");
        let sent = header(&w.headers, "x-sha256").expect("x-sha256 header").to_owned();
        assert_eq!(sha_hex(&w.body), sent, "{id}: bytes differ from what the backend sent");
        assert_eq!(w.streamed, size > 256 << 10, "{id}: streamed");
    }
    assert_echo(&mut app, "after", &s.client_id);
}

/// The daemon's relay socket does not keep the memory of its largest request: a large frame
/// is read into a buffer of its own, freed with it (`wsread::WsReader`), and the heap is
/// handed back after a quiet spell.
#[test]
fn the_daemon_gives_back_its_read_buffer_after_a_large_upload() {
    let s = setup();
    let mut app = s.app;
    let pid = s.env.daemon_pid();
    assert_echo(&mut app, "warm", &s.client_id);
    let before = rss_kib(pid);
    let data = random_bytes(12 * MIB - (64 << 10));
    let want = json!({"sha256": sha_hex(&data), "size": data.len()});
    let raw = |id: &str| {
        request_b64(id, "/api/raw", &[("Content-Type", "application/octet-stream")], &data)
    };
    for id in ["up1", "up2"] {
        assert_eq!(fetch(&mut app, &raw(id)).json(), want, "{id}");
    }
    // The heap is trimmed a while after the last large frame (`memory::TRIM_WHEN_QUIET`).
    let grown = rss_growth_settles(pid, before, 8 << 10);
    assert!(grown < 8 << 10, "the daemon holds {grown} KiB more after two 12 MiB uploads");
    // The socket carries small and large requests as before.
    assert_echo(&mut app, "after", &s.client_id);
    assert_eq!(fetch(&mut app, &raw("up3")).json(), want, "after the trim");
}

#[test]
fn sse_events_arrive_one_by_one() {
    let s = setup();
    let mut app = s.app;
    const N: usize = 6;
    const GAP_MS: u64 = 300;
    let sent = Instant::now();
    app.send(&request("sse", "GET", &format!("/api/sse?n={N}&gap_ms={GAP_MS}"), &[], None));
    // (arrival since sent, wall-clock arrival in s, frame)
    let mut frames: Vec<(Duration, f64, Frame)> = Vec::new();
    let deadline = sent + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_read(&mut app.ws, left) {
            Event::Frame(f) => {
                let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
                let end = f.request_id() == Some("sse")
                    && matches!(
                        f,
                        Frame::ResponseEnd { .. }
                            | Frame::ResponseError { .. }
                            | Frame::Response(_)
                    );
                frames.push((sent.elapsed(), wall, f));
                if end {
                    break;
                }
            }
            other => panic!(
                "SSE: got {other:?} after {:?}",
                frames.iter().map(|f| &f.2).collect::<Vec<_>>()
            ),
        }
    }
    let Frame::ResponseStart { status, headers, .. } = &frames[0].2 else {
        panic!("SSE must be streamed: first frame {:?}", frames[0].2);
    };
    assert_eq!(*status, 200);
    assert!(
        header(headers, "content-type").is_some_and(|c| c.starts_with("text/event-stream")),
        "{headers:?}"
    );
    assert!(matches!(frames.last().unwrap().2, Frame::ResponseEnd { .. }), "{:?}", frames.last());
    let chunks: Vec<(Duration, f64, String)> = frames[1..frames.len() - 1]
        .iter()
        .map(|(at, wall, f)| match f {
            Frame::ResponseChunk { body, body_base64: false, .. } => (*at, *wall, body.clone()),
            other => panic!("SSE: expected text chunks, got {other:?}"),
        })
        .collect();
    assert!(chunks.len() >= 5, "SSE: {} chunks for {N} events, expected at least 5", chunks.len());
    // The events, in order, complete.
    let text: String = chunks.iter().map(|c| c.2.as_str()).collect();
    let events: Vec<Value> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("event {e:?}"));
            serde_json::from_str(data).unwrap()
        })
        .collect();
    assert_eq!(events.len(), N, "{text}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["i"], i, "{text}");
    }
    // Each event reached the app soon after the backend emitted it (nothing held back).
    for (i, e) in events.iter().enumerate() {
        let marker = format!("\"i\": {i},");
        let (_, wall, _) = chunks.iter().find(|c| c.2.contains(&marker)).unwrap();
        let emitted = e["t"].as_f64().unwrap();
        let latency = wall - emitted;
        assert!(
            latency < 0.25,
            "SSE event {i} reached the app {latency:.3} s after the backend sent it"
        );
    }
    let first = chunks[0].0;
    let last = chunks.last().unwrap().0;
    let stream = Duration::from_millis(GAP_MS * (N as u64 - 1));
    assert!(first < stream / 2, "first SSE chunk after {first:?}; the stream lasts {stream:?}");
    assert!(
        last - first >= stream - Duration::from_millis(GAP_MS),
        "SSE chunks bunched together: first at {first:?}, last at {last:?}"
    );
    assert_echo(&mut app, "after", &s.client_id);
}

#[test]
fn cancel_stops_the_backend_request() {
    let s = setup();
    let mut app = s.app;
    app.send(&request("slow-1", "GET", "/api/slow?secs=60", &[], None));
    s.backend.wait_counter("started", 1);
    let t = Instant::now();
    app.send(&Frame::Cancel { id: "slow-1".into(), client: None, conn: None });
    let frames = app.recv_until_terminal("slow-1");
    let took = t.elapsed();
    assert!(
        matches!(&frames[..], [Frame::ResponseError { code: ErrorCode::Cancelled, .. }]),
        "cancel: {frames:?}"
    );
    assert!(took < Duration::from_secs(2), "CANCELLED came {took:?} after the cancel");
    s.backend.wait_counter("cancelled", 1);
    assert_eq!(s.backend.get("/api/cancelled")["completed"], 0);
    assert_echo(&mut app, "after", &s.client_id);

    // Cancel in the middle of a stream: the stream ends with CANCELLED, nothing after it.
    app.send(&request("sse", "GET", "/api/sse?n=100&gap_ms=50", &[], None));
    let mut chunks = 0;
    while chunks < 2 {
        match app.recv() {
            Frame::ResponseStart { .. } => {}
            Frame::ResponseChunk { .. } => chunks += 1,
            other => panic!("SSE before the cancel: {other:?}"),
        }
    }
    let t = Instant::now();
    app.send(&Frame::Cancel { id: "sse".into(), client: None, conn: None });
    let frames = app.recv_until_terminal("sse");
    assert!(
        matches!(frames.last(), Some(Frame::ResponseError { code: ErrorCode::Cancelled, .. })),
        "cancelled stream ended with {:?}",
        frames.last()
    );
    assert!(
        frames[..frames.len() - 1].iter().all(|f| matches!(f, Frame::ResponseChunk { .. })),
        "{frames:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "CANCELLED came {:?} after the cancel",
        t.elapsed()
    );
    app.expect_silence(Duration::from_millis(300));
    assert_echo(&mut app, "after-sse", &s.client_id);
}

#[test]
fn app_disconnect_aborts_the_backend_request() {
    let s = setup();
    let mut app = s.app;
    app.send(&request("slow-1", "GET", "/api/slow?secs=60", &[], None));
    s.backend.wait_counter("started", 1);
    app.close();
    // The relay tells the bridge `client.disconnected`; the bridge aborts the local request.
    s.backend.wait_counter("cancelled", 1);
    let mut app = AppClient::connect_url(&app_url(&s.qr), &s.client_secret).unwrap();
    app.expect_bridge_status(true);
    assert_echo(&mut app, "again", &s.client_id);
}

/// An app that numbers its requests per connection reuses an id as soon as it reconnects
/// (PROTOCOL §5.3): the new request gets its own answer and nothing of the old one's.
///
/// Built so that a frame of the old request reaches the relay while the new one is open there.
/// Another app starts a large download and reads none of it, so the relay stops reading the
/// bridge and the bridge's queue fills. The old request (a download too) then waits in a
/// worker with its `response.start` in hand for room in that queue. The app reconnects,
/// replacing its socket (4002), and sends a slow request under the same id; when the other app
/// leaves, the bridge is read again and the old request's frame goes out ahead of the new
/// request's answer.
#[test]
fn a_reconnected_app_that_reuses_an_id_gets_only_its_own_answer() {
    let s = setup();
    let mut old = s.app;
    let (server, port) = (s.relay.url(), s.backend.port.to_string());
    let run = s.env.run(&["--refresh-code", "--json", "--server", &server, "--port", &port]);
    run.assert_code(0, "--refresh-code --json");
    let (_, _, mut holder) = connect_app(&parse_payload(&run.stdout, &server), "Holder");
    // More than the relay queues for one app (32 MiB) and the socket buffers hold.
    let download = |mib: usize| format!("/api/binary?size={}", mib << 20);
    holder.send(&request("H", "GET", &download(96), &[], None));
    assert!(matches!(holder.recv(), Frame::ResponseStart { ref id, .. } if id == "H"));
    std::thread::sleep(Duration::from_millis(1000));
    old.send(&request("R", "GET", &download(8), &[], None));
    // Time for the bridge to take it and its worker to block on the full queue.
    std::thread::sleep(Duration::from_millis(300));

    let mut new = AppClient::connect_url(&app_url(&s.qr), &s.client_secret).unwrap();
    new.expect_bridge_status(true);
    new.send(&request("R", "GET", "/api/slow?secs=1", &[], None));
    // Open at the relay and the bridge once the backend has it.
    s.backend.wait_counter("started", 1);
    holder.close();

    let frames = new.recv_until_terminal("R");
    let kinds: Vec<&str> = frames.iter().map(Frame::kind).collect();
    match &frames[..] {
        [Frame::Response(r)] => {
            assert_eq!((r.status, r.body.as_str()), (200, r#"{"slept":1.0}"#), "{r:?}");
            assert_eq!((&r.client, r.conn), (&None, None), "{r:?}");
        }
        _ => panic!("the new R got {} frames {kinds:?}, not only its own answer", kinds.len()),
    }
    // Nothing more for R: no late chunk, no second terminal frame.
    match new.next_event(Duration::from_millis(500)) {
        Event::Timeout => {}
        other => panic!("after its answer the new R got {other:?}"),
    }
    let (code, _) = common::ws_wait_close(&mut old.ws, Duration::from_secs(30));
    assert_eq!(code, Some(4002), "the old socket is closed as replaced");
    // R was closed once, at the relay and at the bridge: it is free again.
    assert_eq!(fetch(&mut new, &request("R", "GET", "/api/health", &[], None)).status, 200);
    assert_echo(&mut new, "after", &s.client_id);
}

#[test]
fn hanging_backend_blocks_nothing_and_cancel_is_prompt() {
    let s = setup();
    let mut app = s.app;
    let ids = ["hang-1", "hang-2", "hang-3"];
    for id in ids {
        app.send(&request(id, "GET", "/api/slow?secs=120", &[], None));
    }
    s.backend.wait_counter("started", 3);
    // Other requests go through while three hang.
    for i in 0..3 {
        let t = Instant::now();
        assert_echo(&mut app, &format!("during-{i}"), &s.client_id);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "an echo took {:?} beside hanging requests",
            t.elapsed()
        );
    }
    // Nothing has answered the hanging ones.
    app.expect_silence(Duration::from_millis(300));
    let t = Instant::now();
    for id in ids {
        app.send(&Frame::Cancel { id: id.into(), client: None, conn: None });
    }
    for id in ids {
        let frames = app.recv_until_terminal(id);
        assert!(
            matches!(&frames[..], [Frame::ResponseError { code: ErrorCode::Cancelled, .. }]),
            "{id}: {frames:?}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(2), "three cancels answered in {:?}", t.elapsed());
    s.backend.wait_counter("cancelled", 3);
    // A cancel for a finished or unknown request changes nothing.
    app.send(&Frame::Cancel { id: "hang-1".into(), client: None, conn: None });
    assert_echo(&mut app, "after", &s.client_id);
}

#[test]
fn forbidden_paths_and_header_injection_are_refused_and_the_connection_keeps_working() {
    let s = setup();
    let mut app = s.app;
    let forbidden = [
        "/admin",
        "/api/../admin",
        "/api/%2e%2e/admin",
        "//evil.example/api/health",
        "http://127.0.0.1:1/api/health",
        "api/health",
        "/etc/passwd",
    ];
    for (i, path) in forbidden.iter().enumerate() {
        expect_error(
            &mut app,
            &request(&format!("fp-{i}"), "GET", path, &[], None),
            ErrorCode::ForbiddenPath,
        );
        assert_echo(&mut app, &format!("fp-ok-{i}"), &s.client_id);
    }
    let injections: [(&str, &str); 4] = [
        ("X-Custom", "a\r\nX-Injected: 1"),
        ("X-Custom", "a\nX-Injected: 1"),
        ("X-Custom\r\nX-Injected", "1"),
        ("X-Custom", "a\rb"),
    ];
    for (i, (name, value)) in injections.iter().enumerate() {
        let f = request(&format!("hi-{i}"), "POST", "/api/echo", &[(*name, *value)], Some("{}"));
        expect_error(&mut app, &f, ErrorCode::BadRequest);
        assert_echo(&mut app, &format!("hi-ok-{i}"), &s.client_id);
    }
    // A method that is not forwarded, and a body over the 12 MiB limit.
    expect_error(&mut app, &request("m", "TRACE", "/api/echo", &[], None), ErrorCode::BadRequest);
    let big = "x".repeat(12 * MIB + 1);
    expect_error(
        &mut app,
        &request("big", "POST", "/api/echo", &[], Some(&big)),
        ErrorCode::TooLarge,
    );
    // None of it reached the backend.
    assert_eq!(s.backend.get("/api/stats")["admin"], 0, "a forbidden path reached the backend");
    let echoes = s.backend.get("/api/stats")["echo"].as_u64().unwrap();
    assert_eq!(
        echoes,
        (forbidden.len() + injections.len()) as u64,
        "only the good echoes reached the backend"
    );
}

// =============================================================================================
// Streamed uploads (request.start + request.chunk)

/// The head of an upload to `/api/raw` (which answers the body's sha256 and size).
fn raw_upload(id: &str) -> RequestFrame {
    let f = request(id, "POST", "/api/raw", &[("Content-Type", "application/octet-stream")], None);
    let Frame::Request(r) = f else { unreachable!() };
    r
}

/// A body larger than one frame may carry travels as `request.start` and `request.chunk`
/// frames: it reaches the backend byte-exact, every piece is acknowledged in order, and neither
/// the daemon nor the relay ever holds it whole.
#[test]
fn a_streamed_40_mib_upload_arrives_byte_exact_and_is_never_held_whole() {
    let s = setup();
    let mut app = s.app;
    assert_echo(&mut app, "warm", &s.client_id);
    let (daemon, relay) = (s.env.daemon_pid(), s.relay.pid());
    let (daemon_before, relay_before) = (rss_kib(daemon), rss_kib(relay));
    let data = random_bytes(40 * MIB);
    let up = stream_upload(&mut app, raw_upload("big"), &data, 256 << 10);
    let w = assemble(up.frames);
    assert_eq!(w.json(), json!({"sha256": sha_hex(&data), "size": data.len()}));
    // One acknowledgement per chunk, the last one for the whole body.
    assert_eq!(up.acks.len(), 160, "{:?}", up.acks);
    assert_eq!(up.acks.last(), Some(&(data.len() as u64)));
    // 40 MiB is 53 MiB of base64: holding it would show many times over.
    for (who, pid, before) in [("daemon", daemon, daemon_before), ("relay", relay, relay_before)] {
        let grown = hwm_kib(pid).saturating_sub(before);
        assert!(grown < 16 << 10, "the {who}'s peak grew by {grown} KiB during the upload");
    }
    assert_echo(&mut app, "after", &s.client_id);
}

/// An upload that breaks its rules gets one `response.error` and leaves the socket usable;
/// a cancel ends one mid-body; chunks for a request that ended are dropped.
#[test]
fn streamed_uploads_that_break_the_rules_are_refused_and_cancels_end_them() {
    let s = setup();
    let mut app = s.app;
    let start = |id: &str, length: Option<u64>| {
        Frame::RequestStart(RequestFrame { length, ..raw_upload(id) })
    };
    let chunk = |id: &str, body: String| Frame::RequestChunk {
        id: id.into(),
        client: None,
        conn: None,
        body: body.into(),
        body_base64: true,
    };
    // Refused at the start: no length, a length over the 1 GiB limit, a body of its own.
    expect_error(&mut app, &start("no-len", None), ErrorCode::BadRequest);
    expect_error(&mut app, &start("huge", Some((1 << 30) + 1)), ErrorCode::TooLarge);
    let Frame::RequestStart(with_body) = start("own-body", Some(2)) else { unreachable!() };
    let with_body = RequestFrame { body: Some("ab".into()), ..with_body };
    expect_error(&mut app, &Frame::RequestStart(with_body), ErrorCode::BadRequest);

    // Broken while the body arrives: more than the window at once, more than the length,
    // base64 that is not.
    let cases = [
        ("ahead", 4 * MIB as u64, b64(&vec![7u8; MIB + 1]), "request.ack"),
        ("over", 10, b64(b"eleven byte"), "more than the 10 bytes"),
        ("not-b64", 3, "!!!!".to_owned(), "not valid base64"),
        ("empty", 10, String::new(), "no bytes"),
        ("tiny", MIB as u64, b64(&[3u8; 100]), "at least"),
    ];
    for (id, length, body, why) in cases {
        app.send(&start(id, Some(length)));
        app.send(&chunk(id, body));
        match app.recv_until_terminal(id).as_slice() {
            [Frame::ResponseError { code: ErrorCode::BadRequest, message, .. }] => {
                assert!(message.contains(why), "{id}: {message}");
            }
            other => panic!("{id}: expected one BAD_REQUEST, got {other:?}"),
        }
        assert_echo(&mut app, &format!("{id}-ok"), &s.client_id);
    }

    // Cancelled after its first piece was taken: CANCELLED, and a late chunk is dropped.
    app.send(&start("cut", Some(MIB as u64)));
    app.send(&chunk("cut", b64(&[1u8; 16 << 10])));
    assert_eq!(
        app.recv(),
        Frame::RequestAck { id: "cut".into(), client: None, conn: None, bytes: 16 << 10 },
        "the first piece is acknowledged"
    );
    app.send(&Frame::Cancel { id: "cut".into(), client: None, conn: None });
    match app.recv_until_terminal("cut").as_slice() {
        [Frame::ResponseError { code: ErrorCode::Cancelled, .. }] => {}
        other => panic!("expected one CANCELLED, got {other:?}"),
    }
    app.send(&chunk("cut", b64(&[2u8; 16 << 10])));
    app.expect_silence(Duration::from_millis(300));
    // The backend saw none of these bodies complete.
    assert_eq!(s.backend.get("/api/stats")["raw"], 0, "a broken upload reached the handler");
    assert_echo(&mut app, "after", &s.client_id);
}

// =============================================================================================
// Commands

#[test]
fn stop_turns_bridge_status_offline_and_is_idempotent() {
    let s = setup();
    let mut app = s.app;
    let pid = s.env.daemon_pid();
    // A request still open when the daemon stops gets its one terminal frame.
    app.send(&request("open", "GET", "/api/slow?secs=60", &[], None));
    s.backend.wait_counter("started", 1);
    let run = s.env.run(&["--stop"]);
    run.assert_code(0, "--stop");
    assert!(run.stdout.contains(&format!("pid {pid}")), "--stop names the pid: {}", run.all());
    let frames = app.recv_until_terminal("open");
    assert!(
        matches!(&frames[..], [Frame::ResponseError { code: ErrorCode::ShuttingDown, .. }]),
        "open request at --stop: {frames:?}"
    );
    s.backend.wait_counter("cancelled", 1);
    wait_bridge_status(&mut app, false, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "daemon {pid} still alive after --stop");
    assert!(!s.env.lock_held(), "the pid lock is still held after --stop");
    // The relay answers for the offline bridge at once.
    expect_error(
        &mut app,
        &request("off", "GET", "/api/health", &[], None),
        ErrorCode::BridgeOffline,
    );
    let (_, v) = Registry::new(&s.qr.s).bridge_status(&s.qr.g, Some(&s.client_secret));
    assert_eq!(v, json!({"hasBridge": true, "online": false}));
    // Idempotent.
    let again = s.env.run(&["--stop"]);
    again.assert_code(0, "second --stop");
    assert!(again.stdout.contains("No bridge daemon was running"), "{}", again.all());
}

#[test]
fn refresh_code_keeps_the_old_pairing_and_the_daemon() {
    let s = setup();
    let mut app = s.app;
    let pid = s.env.daemon_pid();
    let server = s.relay.url();
    let port = s.backend.port.to_string();
    let run = s.env.run(&["--refresh-code", "--json", "--server", &server, "--port", &port]);
    run.assert_code(0, "--refresh-code --json");
    let qr2 = parse_payload(&run.stdout, &server);
    assert_eq!(qr2.g, s.qr.g, "--refresh-code keeps the bridge");
    assert_ne!(qr2.a, s.qr.a, "--refresh-code issues a new access code");
    assert_eq!(s.env.daemon_pid(), pid, "--refresh-code must not touch the daemon");
    // The paired app never saw the bridge go away and still round-trips.
    assert_echo(&mut app, "old-app", &s.client_id);
    app.expect_silence(Duration::from_millis(200));
    // The new code pairs a second app.
    let (id2, _, mut app2) = connect_app(&qr2, "Second Phone");
    assert_ne!(id2, s.client_id);
    assert_echo(&mut app2, "new-app", &id2);
    assert_echo(&mut app, "old-app-2", &s.client_id);
}

/// A `--reset` whose new registration the registry refuses: the old bridge is gone by then,
/// and the message says so instead of claiming that nothing changed.
#[test]
fn a_reset_the_registry_refuses_says_what_it_already_did() {
    let relay = Relay::start(&["--rate-register", "1"]);
    let backend = Backend::start();
    let env = Env::new();
    env.pair_json(&relay, &backend, &[]);
    let (server, port) = (relay.url(), backend.port.to_string());
    let run = env.run(&["--reset", "--server", &server, "--port", &port]);
    run.assert_code(1, "--reset with registrations refused");
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(said.contains("RATE_LIMITED"), "the cause is named: {said}");
    assert!(said.contains("The old bridge is deleted at the registry"), "{said}");
    assert!(!said.contains("Nothing was changed"), "{said}");
}

/// Two pairings started at once in one state directory run one after the other: one identity,
/// one daemon, both exit 0, and the code of the one that ran last pairs (a new code replaces
/// the one before it).
#[test]
fn pairings_started_at_once_take_turns() {
    let relay = Relay::start(&[]);
    let backend = Backend::start();
    let env = Env::new();
    let (server, port) = (relay.url(), backend.port.to_string());
    let args = ["--json", "--server", server.as_str(), "--port", port.as_str()];
    let children: Vec<_> = (0..2)
        .map(|_| env.cmd(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    let qrs: Vec<_> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "a pairing failed: {err}");
            parse_payload(&String::from_utf8_lossy(&out.stdout), &server)
        })
        .collect();
    assert_eq!(qrs[0].g, qrs[1].g, "two identities for one state directory");
    assert_eq!(env.bridge_json()["bridgeId"], qrs[0].g.as_str());
    let copies = std::fs::read_dir(&env.home)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".replaced-"))
        .count();
    assert_eq!(copies, 0, "an identity was replaced");
    let registry = Registry::new(&server);
    let valid: Vec<_> =
        qrs.iter().filter(|qr| registry.verify(&qr.g, &qr.a, Some("Phone")).0 == 200).collect();
    assert_eq!(valid.len(), 1, "exactly the last code printed pairs");
    let secret = env.bridge_json()["relaySecret"].as_str().unwrap_or_default().to_owned();
    registry.wait_bridge_online(&valid[0].g, &secret, true);
}

/// `--stop` during a pairing waits for it: the pairing never fails halfway, and the daemon it
/// started is stopped.
#[test]
fn stop_during_a_pairing_waits_for_it() {
    let relay = Relay::start(&[]);
    let backend = Backend::start();
    let env = Env::new();
    let (server, port) = (relay.url(), backend.port.to_string());
    let pairing = env
        .cmd(&["--json", "--server", &server, "--port", &port])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the pairing holds the command lock (it takes it first thing).
    let lock = env.home.join("command.lock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lock.exists() {
        assert!(Instant::now() < deadline, "the pairing never took the command lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop = env.run(&["--stop"]);
    let out = pairing.wait_with_output().unwrap();
    assert!(out.status.success(), "the pairing failed: {}", String::from_utf8_lossy(&out.stderr));
    stop.assert_code(0, "--stop");
    assert!(stop.stdout.contains("Stopped the bridge daemon"), "{}", stop.all());
    assert!(!env.lock_held(), "the daemon the pairing started still runs");
}

/// A command suspended (Ctrl-Z) while it holds the command lock is named at once, not waited
/// for (which would hang until it is resumed, up to two minutes): `--stop` stops the daemon
/// without it, a pairing refuses and says how to resume it.
#[cfg(target_os = "linux")]
#[test]
fn a_command_suspended_with_the_lock_is_named_not_waited_for() {
    let relay = Relay::start(&[]);
    let backend = Backend::start();
    let env = Env::new();
    env.pair_json(&relay, &backend, &[]);
    let daemon = env.daemon_pid();
    // A registry that takes the connection and never answers: the pairing (moving to it, so
    // registering anew before it touches the daemon) holds the command lock for its whole
    // request (15 s).
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("http://{}", silent.local_addr().unwrap());
    let port = backend.port.to_string();
    /// Kills the suspended pairing even when an assertion fails.
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut pairing = Reap(
        env.cmd(&["--server", &server, "--port", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = pairing.0.id();
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(env.home.join("command.lock"))
        .unwrap();
    let held = || {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; a lock we get is given back at once.
        unsafe {
            if libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 {
                libc::flock(lock.as_raw_fd(), libc::LOCK_UN);
                return false;
            }
        }
        true
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !held() {
        assert!(pairing.0.try_wait().unwrap().is_none(), "the pairing ended early");
        assert!(Instant::now() < deadline, "the pairing never took the command lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: SIGSTOP to the pairing this test started (Ctrl-Z in its terminal).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGSTOP);
    }
    let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    while !stat().rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')) {
        assert!(Instant::now() < deadline, "the pairing was not suspended: {}", stat());
        std::thread::sleep(Duration::from_millis(5));
    }
    let again = env.run(&["--json", "--server", &relay.url(), "--port", &port]);
    again.assert_code(1, "a pairing behind a suspended one");
    assert!(again.all().contains(&format!("(pid {pid}) is suspended")), "{}", again.all());
    assert!(again.all().contains(&format!("kill -CONT {pid}")), "{}", again.all());
    assert!(again.all().contains("Nothing was changed"), "{}", again.all());
    let stop = env.run(&["--stop"]);
    stop.assert_code(0, "--stop behind a suspended command");
    assert!(stop.all().contains(&format!("(pid {pid}) is suspended")), "{}", stop.all());
    let stopped = format!("Stopped the bridge daemon (pid {daemon})");
    assert!(stop.stdout.contains(&stopped), "{}", stop.all());
    assert!(!env.lock_held(), "the daemon still runs");
    drop(pairing);
    // Once it has ended, the lock is free again.
    env.pair_json(&relay, &backend, &[]);
}

/// A second state directory pairing on the port where the first one's daemon serves its
/// built-in backend is told so at once (exit 1, nothing registered) instead of sharing it
/// without a word (it waited 15 s, then took it for the user's own API, and lost it when the
/// first daemon stopped); with --no-server it shares it, warned.
#[test]
fn a_second_state_directory_is_told_about_the_first_ones_built_in_backend() {
    let relay = Relay::new();
    let (first, second) = (Env::new(), Env::new());
    let (server, bp) = (relay.url(), listen_port().to_string());
    let args = ["--json", "--server", server.as_str(), "--port", bp.as_str()];
    first.run(&args).assert_code(0, "the first state directory's pairing");
    let run = second.run(&args);
    run.assert_code(1, "a second state directory on the same backend port");
    assert!(run.all().contains("another state directory's"), "{}", run.all());
    assert!(run.all().contains("--no-server"), "no way on: {}", run.all());
    assert!(!second.home.join("bridge.json").exists(), "it registered all the same");
    let run = second.run(&["--server", &server, "--port", &bp, "--no-server"]);
    run.assert_code(0, "--no-server: shared, knowingly");
    assert!(run.all().contains("chat stops whenever that daemon stops"), "{}", run.all());
}

/// Sends `sig` to `pid`, a process this test started.
fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill only sends a signal, to a process of this test's.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A supervisor (a service manager, or the user's own running `--foreground`) that restarts the
/// bridge the moment a pairing has stopped it takes the state directory before the daemon the
/// pairing starts: the pairing keeps that bridge, which serves the identity and backend the
/// pairing saved, instead of failing once. The pairing is held (SIGSTOP) while the supervisor
/// restarts the bridge. The pairing looks for the free lock every 25 ms, so on a busy machine
/// it can start its own daemon before the SIGSTOP lands; such a run stages nothing and is
/// tried again.
#[test]
fn a_bridge_its_supervisor_restarts_during_a_pairing_is_kept() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let relay = Relay::new();
    let env = Env::new();
    let (server, first, second) = (relay.url(), listen_port(), listen_port());
    let pair = |port: u16| env.cmd(&["--server", &server, "--port", &port.to_string()]);
    run_cmd(pair(first), CMD_TIMEOUT).assert_code(0, "the first pairing");
    let foreground =
        || env.cmd(&["--foreground"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Whether `bridge` comes to hold the state directory (bridge.pid names it and status.json
    // is its own) rather than exit (another daemon holds it).
    let serves = |bridge: &mut Child| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = || {
            let text = std::fs::read_to_string(env.home.join("status.json")).unwrap_or_default();
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null)
        };
        let pid = bridge.id();
        while !(env.pid() == Some(pid) && status()["pid"] == pid) {
            if bridge.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(Instant::now() < deadline, "the supervised bridge {pid} never served");
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    };
    for _attempt in 0..5 {
        env.run(&["--stop"]).assert_code(0, "--stop");
        let pairing_pid = &AtomicU32::new(0);
        let staged = std::thread::scope(|scope| {
            let mut supervised = foreground();
            assert!(serves(&mut supervised), "the supervised bridge did not start");
            let supervisor = scope.spawn(move || {
                supervised.wait().unwrap();
                let pairing = pairing_pid.load(Ordering::SeqCst);
                assert_ne!(pairing, 0, "the bridge stopped before the pairing ran");
                send_signal(pairing, libc::SIGSTOP);
                let mut again = foreground();
                let won = serves(&mut again);
                send_signal(pairing, libc::SIGCONT);
                won.then_some(again)
            });
            let child = pair(second).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            pairing_pid.store(child.id(), Ordering::SeqCst);
            let out = child.wait_with_output().unwrap();
            let again = supervisor.join().unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "the pairing failed: {said}");
            let mut again = again?;
            let kept = env.pid();
            env.run(&["--stop"]).assert_code(0, "--stop");
            again.wait().unwrap();
            assert!(said.contains("so it is kept"), "{said}");
            Some((kept, again.id()))
        });
        if let Some((kept, restarted)) = staged {
            assert_eq!(kept, Some(restarted), "the supervisor's bridge is not the one kept");
            return;
        }
    }
    panic!("the pairing started its own daemon before the supervisor's in every attempt");
}

/// A relay behind a proxy started without `--public-url` announces its loopback address: the
/// pairing says so and saves nothing (no QR a phone could never use). `127.1` reaches the
/// relay as `127.0.0.1` does, but is not the loopback address the relay announces.
#[test]
fn a_relay_that_announces_its_loopback_address_is_named_and_nothing_is_saved() {
    let relay = Relay::start(&[]);
    let backend = Backend::start();
    let env = Env::new();
    let server = relay.url().replace("127.0.0.1", "127.1");
    let run = env.run(&["--json", "--server", &server, "--port", &backend.port.to_string()]);
    run.assert_code(1, "pairing with a relay that announces a loopback address");
    assert!(run.stderr.contains("--public-url"), "the fix is named: {}", run.stderr);
    assert!(run.stderr.contains("Nothing was saved"), "{}", run.stderr);
    assert!(run.stdout.trim().is_empty(), "no QR: {}", run.stdout);
    assert!(!env.home.join("bridge.json").exists(), "an identity was saved");
}

#[test]
fn reset_cuts_off_the_old_app_and_makes_a_new_bridge() {
    let s = setup();
    let mut app = s.app;
    let server = s.relay.url();
    let port = s.backend.port.to_string();
    let run = s.env.run(&["--reset", "--json", "--server", &server, "--port", &port]);
    run.assert_code(0, "--reset --json");
    let qr2 = parse_payload(&run.stdout, &server);
    assert_ne!(qr2.g, s.qr.g, "--reset must make a new bridgeId");
    assert_eq!(s.env.bridge_json()["bridgeId"], qr2.g.as_str());
    // The old app is cut off: its socket is closed 4003…
    let code = app.wait_close();
    assert_eq!(code, Some(4003), "old app socket close code after --reset");
    // …and it cannot come back.
    match AppClient::connect_url(&app_url(&s.qr), &s.client_secret) {
        Err(ConnectError::Http(status, body)) => {
            assert!(status == 401 || status == 404, "old app reconnect: {status} {body}")
        }
        Err(e) => panic!("old app reconnect: {e:?}"),
        Ok(_) => panic!("the old app reconnected after --reset"),
    }
    let (_, v) = Registry::new(&s.qr.s).bridge_status(&s.qr.g, Some(&s.client_secret));
    assert_eq!(v, json!({"hasBridge": false, "online": false}));
    // The new bridge pairs and works.
    let (id2, _, mut app2) = connect_app(&qr2, "New Phone");
    assert_echo(&mut app2, "new", &id2);
}

#[test]
fn second_run_reuses_the_running_daemon() {
    let s = setup();
    let mut app = s.app;
    let pid = s.env.daemon_pid();
    let qr2 = s.env.pair_json(&s.relay, &s.backend, &[]);
    assert_eq!(qr2.g, s.qr.g);
    assert_ne!(qr2.a, s.qr.a);
    assert_eq!(s.env.daemon_pid(), pid, "a second hermeschat-pair must reuse the daemon");
    // The first app stayed connected throughout.
    assert_echo(&mut app, "still", &s.client_id);
    app.expect_silence(Duration::from_millis(200));
    // Without --json, it says so.
    let server = s.relay.url();
    let port = s.backend.port.to_string();
    let run = s.env.run(&["--server", &server, "--port", &port]);
    run.assert_code(0, "third run");
    assert!(run.stdout.contains(&format!("already running (pid {pid})")), "{}", run.all());
    assert_eq!(s.env.daemon_pid(), pid);
}

#[test]
fn status_json_reports_daemon_relay_and_backend() {
    let s = setup();
    let mut backend = s.backend;
    let pid = s.env.daemon_pid();
    // Files are private.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.env.home), 0o700, "state dir mode");
    for f in ["bridge.json", "bridge.log", "config.json", "status.json"] {
        assert_eq!(mode(&s.env.home.join(f)), 0o600, "{f} mode");
    }
    let status = |want_code: i32| -> Value {
        let run = s.env.run(&["--status", "--json"]);
        run.assert_code(want_code, "--status --json");
        serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("--status --json ({e}): {}", run.all()))
    };
    // appsOnline follows client.connected; give the daemon a moment to record it.
    let deadline = Instant::now() + EFFECT_TIMEOUT;
    let v = loop {
        let v = status(0);
        if v["appsOnline"] == 1 || Instant::now() >= deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        v["daemon"],
        json!({"running": true, "pid": pid, "suspended": false, "programReplaced": false}),
        "{v}"
    );
    assert_eq!(v["bridgeId"], s.qr.g.as_str(), "{v}");
    assert_eq!(v["relay"]["connected"], true, "{v}");
    assert_eq!(v["backend"]["state"], "ready", "{v}");
    assert_eq!(v["backend"]["url"], backend.url(), "{v}");
    assert_eq!(v["pairedDevices"], 1, "{v}");
    assert_eq!(v["appsOnline"], 1, "{v}");
    assert_eq!(v["healthy"], true, "{v}");
    // Human form.
    let run = s.env.run(&["--status"]);
    run.assert_code(0, "--status");
    assert!(run.stdout.contains(&format!("running (pid {pid})")), "{}", run.all());
    // Backend down: reported, exit 1.
    backend.kill();
    let v = status(1);
    assert_eq!(v["backend"]["state"], "not-listening", "{v}");
    assert_eq!(v["healthy"], false, "{v}");
    // Daemon stopped: reported, exit 1.
    s.env.run(&["--stop"]).assert_code(0, "--stop");
    let v = status(1);
    assert_eq!(v["daemon"]["running"], false, "{v}");
    assert_eq!(v["relay"]["connected"], false, "{v}");
}

// =============================================================================================
// Surviving restarts

#[test]
fn relay_restart_is_survived() {
    let mut s = setup();
    let mut app = s.app;
    assert_echo(&mut app, "before", &s.client_id);
    let pid = s.env.daemon_pid();
    s.relay.restart();
    // The app's socket went with the old relay.
    let code = app.wait_close();
    assert!(code.is_none() || code == Some(1001) || code == Some(1006), "old app socket: {code:?}");
    // Reconnect as the app would, polling; wait for the daemon to come back (its backoff).
    let deadline = Instant::now() + Duration::from_secs(35);
    let mut app = loop {
        match AppClient::connect_url(&app_url(&s.qr), &s.client_secret) {
            Ok(a) => break a,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the app cannot reconnect to the restarted relay: {e:?}"),
        }
    };
    wait_bridge_status(
        &mut app,
        true,
        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)),
    );
    assert_echo(&mut app, "after", &s.client_id);
    assert_eq!(s.env.daemon_pid(), pid, "the daemon survives a relay restart");
}

#[test]
fn backend_restart_is_survived() {
    let s = setup();
    let mut app = s.app;
    let mut backend = s.backend;
    assert_echo(&mut app, "before", &s.client_id);
    // Restarted between two requests: the bridge's kept-alive connection is now dead.
    backend.restart();
    let w = fetch(&mut app, &request("h-after-restart", "GET", "/api/health", &[], None));
    assert_eq!(
        (w.status, w.json()),
        (200, json!({"status": "ok"})),
        "first request after a backend restart"
    );
    assert_echo(&mut app, "after-restart", &s.client_id);
    // Down: a clear error, at once.
    backend.kill();
    let t = Instant::now();
    expect_error(
        &mut app,
        &request("down", "GET", "/api/health", &[], None),
        ErrorCode::BackendUnreachable,
    );
    assert!(t.elapsed() < Duration::from_secs(4), "BACKEND_UNREACHABLE took {:?}", t.elapsed());
    // Back: works again.
    backend.spawn(backend.port);
    assert_echo(&mut app, "back", &s.client_id);
}

// =============================================================================================
// Bad input

/// A port held by something that is not a Hermes API: it answers every connection with
/// `answer` and closes.
fn busy_port(answer: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(answer);
        }
    });
    port
}

/// A backend that writes each answer in two pieces, head then body, without `TCP_NODELAY`, as
/// uvicorn (the original tool's FastAPI server) does: Nagle holds the body back until the
/// head is acknowledged. It sends the body once its head is acknowledged (`TIOCOUTQ` at 0),
/// or after 35 ms, and records for every `GET /api/two-writes` whether the ACK came first.
/// Every other request gets the body at once. Returns the port and the records.
#[cfg(target_os = "linux")]
fn two_writes_backend() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<bool>>>) {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let records = acked.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let records = records.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let body = b"{\"status\":\"ok\"}";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n",
                        body.len()
                    );
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                    if head.starts_with("GET /api/two-writes ") {
                        let waited = Instant::now();
                        let acked_first = loop {
                            let mut unacked: libc::c_int = 0;
                            // SAFETY: a valid socket and a writable int, as TIOCOUTQ expects.
                            let r = unsafe {
                                libc::ioctl(conn.as_raw_fd(), libc::TIOCOUTQ, &mut unacked)
                            };
                            if r == 0 && unacked == 0 {
                                break true;
                            }
                            if waited.elapsed() >= Duration::from_millis(35) {
                                break false;
                            }
                            std::thread::sleep(Duration::from_micros(200));
                        };
                        records.lock().unwrap().push(acked_first);
                    }
                    if conn.write_all(body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, acked)
}

/// A backend that answers in two writes without `TCP_NODELAY` (uvicorn) held each body back
/// until its head was acknowledged, which Linux delays 40 ms on a connection in use: every
/// request after the first on a kept-alive connection took 44 ms instead of 0.4. The bridge
/// now acknowledges at once what it has read of an unfinished answer.
#[test]
#[cfg(target_os = "linux")]
fn an_answer_in_two_writes_is_acknowledged_at_once() {
    let relay = Relay::new();
    let (port, acked) = two_writes_backend();
    let env = Env::new();
    let server = relay.url();
    let run = env.run(&["--json", "--server", &server, "--port", &port.to_string()]);
    run.assert_code(0, "hermeschat-pair --json");
    let qr = parse_payload(&run.stdout, &server);
    let (_, _, mut app) = connect_app(&qr, "Test Phone");
    for i in 0..8 {
        let r = fetch(&mut app, &request(&format!("tw{i}"), "GET", "/api/two-writes", &[], None));
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    // The first exchanges of a connection are acknowledged at once anyway (quick-ACK mode at
    // its start); the delay begins once the connection carries requests both ways. A
    // scheduling hiccup on a loaded machine may miss the 35 ms now and then, never often.
    let acked = acked.lock().unwrap().clone();
    let prompt = acked.iter().skip(2).filter(|&&a| a).count();
    assert!(prompt >= 4, "heads acknowledged before the 40 ms delayed ACK: {acked:?}");
}

/// A port found free but taken before the built-in backend binds it (another program started
/// listening there in between): the pairing names that race and what to do, and prints no QR.
#[test]
fn a_port_taken_between_the_probe_and_the_built_in_backend_is_named() {
    /// A socket bound to a loopback port but not listening: a connection to it is refused (the
    /// port looks free to the probe) while a bind fails, as with a program that binds between
    /// the two. Closed when dropped.
    struct BoundOnly(libc::c_int);
    impl Drop for BoundOnly {
        fn drop(&mut self) {
            // SAFETY: closes the descriptor this value owns.
            unsafe { libc::close(self.0) };
        }
    }
    // SAFETY: plain socket calls on a descriptor owned by `BoundOnly`; the address structures
    // are valid for the sizes passed.
    let (socket, port) = unsafe {
        let socket = BoundOnly(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0));
        assert!(socket.0 >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let bound = libc::bind(socket.0, (&raw const addr).cast(), len);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let mut len = len;
        libc::getsockname(socket.0, (&raw mut addr).cast(), &mut len);
        (socket, u16::from_be(addr.sin_port))
    };
    let relay = Relay::new();
    let env = Env::new();
    let run = env.run(&["--server", &relay.url(), "--port", &port.to_string()]);
    run.assert_code(1, "a port taken before the backend binds it");
    let all = run.all();
    let named = format!("port {port} on 127.0.0.1 was taken right after it was found free");
    assert!(all.contains(&named), "{all}");
    assert!(all.contains("--port"), "{all}");
    assert!(!all.contains('█') && !all.contains('▀'), "a QR was printed: {all}");
    assert!(!env.lock_held(), "a daemon runs");
    drop(socket);
}

#[test]
fn busy_port_without_health_exits_1_and_prints_no_qr() {
    let relay = Relay::new();
    for answer in [
        &b"SSH-2.0-OpenSSH_9.6\r\ngarbage garbage\r\n"[..],
        &b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"[..],
    ] {
        let env = Env::new();
        let port = busy_port(answer);
        let port_s = port.to_string();
        let run = env.run(&["--server", &relay.url(), "--port", &port_s]);
        run.assert_code(1, "busy port");
        let all = run.all();
        assert!(all.contains(&format!("port {port}")), "the message must name the port: {all}");
        assert!(all.contains("/api/health"), "the message must say what is missing: {all}");
        assert!(
            !all.contains("\"k\":\"hp\"") && !all.contains('█') && !all.contains('▀'),
            "a QR was printed: {all}"
        );
        assert!(!env.png().exists(), "hermeschat_pair.png was written");
        assert!(!env.lock_held(), "a daemon was started");
        // --json too: nothing on stdout.
        let run = env.run(&["--json", "--server", &relay.url(), "--port", &port_s]);
        run.assert_code(1, "busy port --json");
        assert!(run.stdout.trim().is_empty(), "--json printed on failure: {}", run.stdout);
    }
}

#[test]
fn an_api_listening_on_ipv6_loopback_only_is_named_not_replaced_by_the_built_in_backend() {
    // Node 17 and later listen on ::1 alone when told "localhost" (where it resolves to ::1
    // first). 127.0.0.1:port is then free: the built-in backend was started there, and the
    // app talked to it instead of the user's API, without a word.
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    if TcpListener::bind(("127.0.0.1", port)).is_err() {
        eprintln!("skipped: 127.0.0.1:{port} is taken");
        return;
    }
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\
                  Connection: close\r\n\r\n{\"status\":\"ok\"}",
            );
        }
    });
    let relay = Relay::new();
    let env = Env::new();
    let (url, port_s) = (relay.url(), port.to_string());
    for extra in [&[][..], &["--no-server"][..]] {
        let mut args = vec!["--json", "--server", &url, "--port", &port_s];
        args.extend_from_slice(extra);
        let run = env.run(&args);
        run.assert_code(1, "an API on ::1 only");
        let all = run.all();
        assert!(all.contains(&format!("port {port}")) && all.contains("::1"), "{all}");
        assert!(all.contains("HERMESCHAT_LOCAL_HOST=::1"), "the way out: {all}");
        assert!(run.stdout.trim().is_empty(), "--json printed on failure: {}", run.stdout);
        assert!(!env.lock_held(), "a daemon was started");
    }
}

/// A port no one listens on that the built-in backend cannot take either (here: the local end
/// of a connection, which holds it without SO_REUSEADDR). Pairing checked the port free, then
/// the daemon said "Address already in use (os error 98) (the state directory must be writable
/// by you …)": no port, and the wrong thing blamed. The port and the way out are named now.
#[test]
fn a_backend_port_the_daemon_cannot_take_is_named_not_blamed_on_the_state_directory() {
    let relay = Relay::new();
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let holder = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let port = holder.local_addr().unwrap().port();
    let run = env.run(&["--json", "--server", &relay.url(), "--port", &port.to_string()]);
    run.assert_code(1, "a port the daemon cannot take");
    let all = run.all();
    assert!(all.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{all}");
    assert!(all.contains("--port <a free port>"), "the way out: {all}");
    assert!(!all.contains("state directory"), "the wrong thing blamed: {all}");
    assert!(run.stdout.trim().is_empty(), "--json printed on failure: {}", run.stdout);
    assert!(!env.lock_held(), "a daemon runs");
    drop(holder);
}

/// A backend host that is not loopback (`HERMESCHAT_LOCAL_HOST`) with nothing listening was
/// blamed on the build ("This build has no bundled backend"): the host is named instead.
#[test]
fn a_backend_host_off_loopback_is_named_when_nothing_answers_there() {
    let relay = Relay::new();
    let env = Env::new();
    let port = closed_port().to_string();
    let run = env.run_env(
        &["--server", &relay.url(), "--port", &port],
        &[("HERMESCHAT_LOCAL_HOST", "0.0.0.0")],
    );
    run.assert_code(1, "a backend host off loopback");
    let all = run.all();
    assert!(all.contains("loopback only, and HERMESCHAT_LOCAL_HOST is 0.0.0.0"), "{all}");
    assert!(!all.contains("no bundled backend"), "{all}");
    assert!(!env.lock_held(), "a daemon was started");
}

#[test]
fn no_backend_anywhere_exits_1_and_prints_no_qr() {
    // With --no-server nothing is started for us: no API anywhere means no QR.
    let relay = Relay::new();
    let env = Env::new();
    let port = closed_port();
    let port_s = port.to_string();
    let run = env.run(&["--server", &relay.url(), "--port", &port_s, "--no-server"]);
    run.assert_code(1, "no backend");
    let all = run.all();
    assert!(all.contains(&port_s) && all.contains("/api/health"), "{all}");
    assert!(!all.contains("\"k\":\"hp\""), "a QR payload was printed: {all}");
    assert!(!env.png().exists(), "hermeschat_pair.png was written");
    assert!(!env.lock_held(), "a daemon was started");
}

#[test]
fn unreachable_registry_exits_1() {
    let backend = Backend::start();
    let env = Env::new();
    let server = format!("http://127.0.0.1:{}", closed_port());
    let port = backend.port.to_string();
    let run = env.run(&["--server", &server, "--port", &port]);
    run.assert_code(1, "unreachable registry");
    assert!(run.all().contains("cannot reach the registry"), "{}", run.all());
    // The system's words, without the HTTP client's "io: " in front.
    assert!(run.all().contains(": Connection refused"), "{}", run.all());
    assert!(!run.all().contains("io: "), "{}", run.all());
    assert!(!env.png().exists());
    assert!(!env.lock_held(), "a daemon was started");
    assert!(!env.home.join("bridge.json").exists(), "nothing should change locally");

    // https:// to a relay that speaks plain HTTP is said plainly, not in OpenSSL's words.
    let relay = Relay::start(&[]);
    let server = relay.url().replace("http://", "https://");
    let run = env.run(&["--server", &server, "--port", &port]);
    run.assert_code(1, "https:// to a plain relay");
    assert!(run.all().contains("does not speak TLS there (is it http://?)"), "{}", run.all());

    // A web server that is not the relay (a wrong port, a site's catch-all page): named, with
    // the check that tells (it said only "Nothing was changed locally").
    for answer in [
        &b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\
           Connection: close\r\n\r\nnot found"[..],
        &b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\
           Connection: close\r\n\r\n<html></html>"[..],
    ] {
        let server = format!("http://127.0.0.1:{}", busy_port(answer));
        let run = env.run(&["--server", &server, "--port", &port]);
        run.assert_code(1, "a web server that is not the relay");
        let all = run.all();
        assert!(all.contains("did not answer like a HermesChat registry"), "{all}");
        assert!(all.contains(&format!("curl {server}/v1/health")), "the check: {all}");
        assert!(!env.home.join("bridge.json").exists(), "nothing should change locally");
    }
}

/// A state directory whose `command.lock` cannot be opened (a read-only mount, another
/// account's file) said only "cannot take the command lock: …: Permission denied": the way out
/// is added as for the other state files.
#[test]
fn a_command_lock_that_cannot_be_opened_names_the_way_out() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    std::fs::create_dir_all(&env.home).unwrap();
    std::fs::set_permissions(&env.home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let lock = env.home.join("command.lock");
    std::fs::write(&lock, b"").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut cmd = env.cmd(&["--server", "http://127.0.0.1:9", "--port", "9"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root opens any file: the command runs as nobody, in a state directory of its own
        // whose lock is root's.
        for dir in [&env.root, &env.cwd] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::chown(&env.home, Some(65534), Some(65534)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    let run = run_cmd(cmd, Duration::from_secs(30));
    run.assert_code(1, "a command lock that cannot be opened");
    let all = run.all();
    assert!(all.contains("cannot take the command lock"), "{all}");
    assert!(all.contains("set HERMESCHAT_HOME to a directory that is"), "the way out: {all}");
}

#[test]
fn no_registry_configured_exits_2() {
    let env = Env::new();
    let port = closed_port().to_string();
    let run = env.run(&["--port", &port]);
    run.assert_code(2, "no registry");
    assert!(
        run.all().contains("HERMESCHAT_REGISTRY_URL"),
        "the message must say how to configure: {}",
        run.all()
    );
    assert!(!env.png().exists());
}

/// Decodes `hermeschat_pair.png` with a real QR decoder.
fn decode_png(path: &Path) -> String {
    let file = std::fs::File::open(path).unwrap();
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let mut img =
        rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| buf[(y * w + x) * channels]);
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "QR codes found in the PNG");
    grids[0].decode().unwrap().1
}

/// The QR image: the temp file a run killed while writing it left (its pid is dead) is removed
/// by the next run, another program's file of the same shape stays; and where the current
/// directory cannot be written, the image goes to the state directory and the output says
/// where.
#[test]
fn the_qr_image_cleans_up_after_a_killed_run_and_falls_back_to_the_state_directory() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    // A pid above pid_max: never alive.
    let stale = env.cwd.join(".hermeschat_pair.png.2147483646.0.tmp");
    let others = env.cwd.join(".notes.txt.2147483646.0.tmp");
    std::fs::write(&stale, "half a png").unwrap();
    std::fs::write(&others, "not ours").unwrap();
    let (server, port) = (relay.url(), backend.port.to_string());
    let run = env.run(&["--server", &server, "--port", &port]);
    run.assert_code(0, "pairing");
    assert!(!stale.exists(), "the killed run's temp file is still there");
    assert!(others.exists(), "another program's file was removed");
    assert!(env.png().exists(), "no QR image in the current directory: {}", run.all());
    std::fs::remove_file(env.png()).unwrap();

    let run = with_immutable_dir(&env.cwd, || {
        env.run(&["--refresh-code", "--server", &server, "--port", &port])
    });
    let Some(run) = run else { return };
    run.assert_code(0, "--refresh-code in a read-only current directory");
    let png = env.home.join("hermeschat_pair.png");
    assert!(run.stdout.contains(&format!("QR image: {}", png.display())), "{}", run.all());
    let qr = parse_payload(&decode_png(&png), &server);
    assert_eq!(qr.g, env.bridge_json()["bridgeId"].as_str().unwrap());
    assert_eq!(std::fs::metadata(&png).unwrap().permissions().mode() & 0o777, 0o600);
}

/// Runs `cmd` with its stdout on a pseudo-terminal `columns` wide and 50 rows (stderr apart);
/// returns what it printed there once it has exited.
fn run_on_terminal(cmd: std::process::Command, columns: u16) -> (String, bool) {
    let (said, status) = on_terminal(cmd, (columns, 50), Streams::Stdout, None);
    (said, status.success())
}

/// A terminal narrower than the QR code would wrap every line of it into something no phone
/// can scan: the code is not drawn, the user is told the width it needs and where the image
/// is; a terminal wide enough gets the drawing.
#[test]
fn a_terminal_too_narrow_for_the_qr_code_is_told_so_instead_of_shown_a_broken_one() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    let (server, port) = (relay.url(), backend.port.to_string());
    let blocks = |s: &str| s.contains(['▀', '▄', '█']);

    let (said, ok) = run_on_terminal(env.cmd(&["--server", &server, "--port", &port]), 40);
    assert!(ok, "pairing on a narrow terminal failed: {said}");
    assert!(!blocks(&said), "a QR code was drawn on a 40-column terminal: {said}");
    assert!(said.contains("this one is 40"), "{said}");
    assert!(said.contains(&format!("QR image: {}", env.png().display())), "{said}");
    let qr = parse_payload(&decode_png(&env.png()), &server);
    assert_eq!(qr.g, env.bridge_json()["bridgeId"].as_str().unwrap());

    let refresh = ["--refresh-code", "--server", &server, "--port", &port];
    let (said, ok) = run_on_terminal(env.cmd(&refresh), 200);
    assert!(ok, "--refresh-code on a wide terminal failed: {said}");
    assert!(blocks(&said), "no QR code drawn on a 200-column terminal: {said}");
    assert!(!said.contains("columns wide"), "{said}");
}

/// On a terminal too narrow for the drawing, where no QR image can be written either (here a
/// directory holds its name in both places), the user is not sent to "the QR above", which
/// was never drawn: widening the terminal and --refresh-code is the way on.
#[test]
fn a_narrow_terminal_without_a_qr_image_is_told_the_way_on() {
    use std::os::unix::fs::DirBuilderExt;
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    std::fs::DirBuilder::new().mode(0o700).create(&env.home).unwrap();
    std::fs::create_dir(env.png()).unwrap();
    std::fs::create_dir(env.home.join("hermeschat_pair.png")).unwrap();
    let (server, port) = (relay.url(), backend.port.to_string());
    let (said, ok) = run_on_terminal(env.cmd(&["--server", &server, "--port", &port]), 40);
    assert!(ok, "pairing on a narrow terminal failed: {said}");
    assert!(said.contains("no QR image"), "{said}");
    assert!(!said.contains("scan the QR above"), "sent to a QR never drawn: {said}");
    assert!(said.contains("run hermeschat-pair --refresh-code for a code drawn here"), "{said}");
}

/// The QR code's rows against the terminal's: a terminal shorter than the code never shows it
/// whole, so the user is told (the drawing stays, for a window made taller); one tall enough
/// is not.
#[test]
fn a_terminal_shorter_than_the_qr_code_is_told_so() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    let (server, port) = (relay.url(), backend.port.to_string());
    let pairing = ["--server", &server, "--port", &port];
    let (said, status) = on_terminal(env.cmd(&pairing), (200, 20), Streams::Stdout, None);
    assert!(status.success(), "pairing on a short terminal failed: {said}");
    assert!(said.contains(['▀', '▄', '█']), "the code is still drawn: {said}");
    assert!(said.contains("this terminal shows 20"), "{said}");
    assert!(said.contains(&format!("QR image: {}", env.png().display())), "{said}");

    let refresh = ["--refresh-code", "--server", &server, "--port", &port];
    let (said, status) = on_terminal(env.cmd(&refresh), (200, 50), Streams::Stdout, None);
    assert!(status.success(), "--refresh-code on a tall terminal failed: {said}");
    assert!(!said.contains("lines tall"), "{said}");
}

/// Escapes only where a terminal shows them as colours: `TERM=dumb` (Emacs' shell) gets the
/// plain drawing and status marks, and an empty `NO_COLOR` does not count (no-color.org).
#[test]
fn a_dumb_terminal_gets_no_escape_sequences_and_an_empty_no_color_is_ignored() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    let (server, port) = (relay.url(), backend.port.to_string());
    let pairing = ["--server", &server, "--port", &port];
    let on_a = |term: &str| {
        let mut cmd = env.cmd(&pairing);
        cmd.env("TERM", term).env("NO_COLOR", "");
        let (said, status) = on_terminal(cmd, (200, 50), Streams::Both, None);
        assert!(status.success(), "pairing on TERM={term} failed: {said}");
        assert!(said.contains(['▀', '▄', '█']), "no QR code drawn on TERM={term}: {said}");
        said
    };
    let said = on_a("dumb");
    assert!(!said.contains('\x1b'), "escape sequences on a dumb terminal: {said:?}");
    let said = on_a("xterm-256color");
    assert!(said.contains("\x1b[38;5;16;48;5;231m"), "no colours with NO_COLOR empty: {said:?}");
}

/// The spinner while pairing waits for the bridge to come online (here: never, the relay
/// announces a socket address where nothing listens) stays on one line of a 40-column terminal:
/// a frame wider than the terminal wraps, and `\r` then redraws only its last part, so every
/// frame scrolled up a new line. Ctrl-C there says what the interrupted pairing leaves.
#[test]
fn the_spinner_fits_a_narrow_terminal_and_ctrl_c_says_the_daemon_keeps_running() {
    let nowhere = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let relay = Relay::start(&["--public-url", &format!("http://{nowhere}")]);
    let backend = Backend::start();
    let env = Env::new();
    let (server, port) = (relay.url(), backend.port.to_string());
    const GLYPHS: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    // What the terminal got after the daemon started, cut into what each `\r` began.
    let frames = |said: &str| -> Vec<String> {
        let waiting = said.split_once("Bridge daemon started").map_or("", |(_, s)| s);
        let frames = waiting.split('\r').map(|f| f.trim_end_matches("\x1b[K"));
        frames.filter(|f| f.starts_with(GLYPHS)).map(str::to_owned).collect()
    };
    let enough = |said: &str| frames(said).len() >= 3;
    let mut cmd = env.cmd(&["--server", &server, "--port", &port]);
    cmd.env("TERM", "xterm-256color"); // CI may run without TERM: that gets no spinner
    let (said, status) = on_terminal(cmd, (40, 50), Streams::Both, Some((&enough, libc::SIGINT)));
    let frames = frames(&said);
    assert!(frames.len() >= 3, "no spinner drawn: {said:?}");
    for frame in frames {
        assert!(frame.chars().count() < 40, "a frame wider than the terminal: {frame:?}");
    }

    // Ctrl-C there: the spinner's line is erased and the user told that the daemon the
    // pairing started (detached from the terminal) keeps running, and how to stop it.
    assert_eq!(status.code(), Some(130), "{said:?}");
    let pid = std::fs::read_to_string(env.home.join("bridge.pid")).unwrap();
    let told = format!(
        "\r\x1b[K✗ Interrupted: the bridge daemon (pid {}) keeps running (hermeschat-pair --stop",
        pid.trim()
    );
    assert!(said.contains(&told), "{said:?}");
    assert!(alive(pid.trim().parse().unwrap()), "the daemon did not survive the Ctrl-C");
    // Out of the terminal's reach: a session of its own (no Ctrl-C from a terminal nor the
    // SIGHUP of one that closes gets to it) and no controlling terminal.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    assert_eq!(fields[3], pid.trim(), "the daemon's session is not its own: {stat}");
    assert_eq!(fields[4], "0", "the daemon has a controlling terminal: {stat}");
}

#[test]
fn corrupt_bridge_json_is_moved_aside_and_pairing_succeeds() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    std::fs::create_dir_all(&env.home).unwrap();
    std::fs::set_permissions(&env.home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let garbage = "{\"bridgeId\": \"abc\", \x00\x01 this is not json";
    std::fs::write(env.home.join("bridge.json"), garbage).unwrap();
    let server = relay.url();
    let port = backend.port.to_string();
    // The human form: the QR in the terminal and the PNG.
    let run = env.run(&["--server", &server, "--port", &port]);
    run.assert_code(0, "pairing over a corrupt bridge.json");
    let aside: Vec<PathBuf> = std::fs::read_dir(&env.home)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("bridge.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "one bridge.json.corrupt-* file: {aside:?}");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), garbage, "moved aside untouched");
    assert!(
        run.all().contains("bridge.json.corrupt-"),
        "the user is told where it went: {}",
        run.all()
    );
    let id = env.bridge_json();
    let bridge_id = id["bridgeId"].as_str().unwrap().to_owned();
    assert!(run.stdout.contains(&bridge_id), "the bridge id is printed: {}", run.stdout);
    assert!(run.stdout.contains("hermeschat_pair.png"), "{}", run.stdout);
    // The PNG decodes to a payload that pairs.
    let text = decode_png(&env.png());
    let qr = parse_payload(&text, &server);
    assert_eq!(qr.g, bridge_id);
    let (client_id, _, mut app) = connect_app(&qr, "Phone");
    assert_echo(&mut app, "after-corrupt", &client_id);

    // An old v1 file is kept aside under its own name, and pairing registers anew.
    s_stop(&env);
    std::fs::write(env.home.join("bridge.json"), r#"{"bridgeId":"abc","bridgeSecret":"s3cr3t"}"#)
        .unwrap();
    let qr2 = env.pair_json(&relay, &backend, &[]);
    assert_ne!(qr2.g, bridge_id);
    let v1: Vec<String> = std::fs::read_dir(&env.home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bridge.json.v1-"))
        .collect();
    assert_eq!(v1.len(), 1, "one bridge.json.v1-* file");
}

#[track_caller]
fn s_stop(env: &Env) {
    env.run(&["--stop"]).assert_code(0, "--stop");
}

// =============================================================================================
// Secrets

#[test]
fn no_secret_in_relay_stderr_or_bridge_log() {
    let s = setup();
    let mut app = s.app;
    let mut relay = s.relay;
    assert_echo(&mut app, "one", &s.client_id);
    let server = relay.url();
    let port = s.backend.port.to_string();
    let run = s.env.run(&["--refresh-code", "--json", "--server", &server, "--port", &port]);
    run.assert_code(0, "--refresh-code");
    let qr2 = parse_payload(&run.stdout, &server);
    let (_, secret2, mut app2) = connect_app(&qr2, "Phone 2");
    let _ = fetch(&mut app2, &request("x", "GET", "/api/health", &[], None));
    let relay_secret = s.env.bridge_json()["relaySecret"].as_str().unwrap().to_owned();
    assert!(relay_secret.starts_with("hrs_"), "relaySecret shape");
    s_stop(&s.env);
    let log = s.env.log();
    assert!(log.contains(&s.qr.g), "bridge.log should say which bridge it served: {log}");
    let secrets: [&str; 5] = [&relay_secret, &s.client_secret, &secret2, &s.qr.a, &qr2.a];
    for secret in secrets {
        let bare = secret.trim_start_matches("hrs_").trim_start_matches("hcs_");
        assert!(!log.contains(bare), "bridge.log holds a secret ({}…):\n{log}", &secret[..8]);
    }
    drop(app);
    drop(app2);
    relay.stop_and_check_logs(&secrets);
}

// =============================================================================================
// More commands and recoveries

#[test]
fn usage_help_version_and_unavailable_commands() {
    let env = Env::new();
    let run = env.run(&["--help"]);
    run.assert_code(0, "--help");
    for flag in [
        "--status",
        "--stop",
        "--refresh-code",
        "--reset",
        "--foreground",
        "--json",
        "--server",
        "--port",
    ] {
        assert!(run.stdout.contains(flag), "--help lacks {flag}");
    }
    let run = env.run(&["--version"]);
    run.assert_code(0, "--version");
    assert_eq!(run.stdout.trim(), format!("hermeschat-pair {}", hermeschat_pair::VERSION));
    env.run(&["--bogus"]).assert_code(2, "--bogus");
    env.run(&["--port", "70000"]).assert_code(2, "--port 70000");
    env.run(&["--stop", "--reset"]).assert_code(2, "two commands");
    // A boot service before any pairing would restart a bridge with no credentials forever.
    let run = env.run(&["--install"]);
    run.assert_code(2, "--install before pairing");
    assert!(run.all().contains("hermeschat-pair"), "{}", run.all());
    // Nothing paired yet: --status says so and fails; --stop is fine.
    let run = env.run(&["--status", "--json"]);
    run.assert_code(1, "--status before pairing");
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["daemon"]["running"], false, "{v}");
    env.run(&["--stop"]).assert_code(0, "--stop before pairing");
}

#[test]
fn environment_and_saved_config_are_honoured() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    let server = relay.url();
    let port = backend.port.to_string();
    let run = env.run_env(
        &["--json"],
        &[("HERMESCHAT_REGISTRY_URL", &server), ("HERMESCHAT_LOCAL_PORT", &port)],
    );
    run.assert_code(0, "pairing from the environment");
    let qr = parse_payload(&run.stdout, &server);
    let pid = env.daemon_pid();
    // Nothing given: the saved registry and port are used, and the daemon is reused.
    let run = env.run(&["--json"]);
    run.assert_code(0, "pairing from config.json");
    let qr2 = parse_payload(&run.stdout, &server);
    assert_eq!(qr2.g, qr.g);
    assert_eq!(env.daemon_pid(), pid);
    let (client_id, _, mut app) = connect_app(&qr2, "Phone");
    assert_echo(&mut app, "cfg", &client_id);
}

/// `HERMESCHAT_GATEWAY_URL` without a port (or with https://, or no URL at all) was ignored
/// without a word, the default gateway probed and reported instead; an uid list with a word in
/// it trusted no one; a backend port that is not a number was refused by `--doctor` only after
/// half its report (and not at all while a daemon ran). Each is refused (exit 2) naming the
/// variable, before anything is done; `--stop` still works.
#[test]
fn environment_variables_that_cannot_be_read_are_refused_not_ignored() {
    let relay = Relay::new();
    let env = Env::new();
    let port = closed_port().to_string();
    for (name, value) in [
        ("HERMESCHAT_GATEWAY_URL", "http://127.0.0.1"),
        ("HERMESCHAT_GATEWAY_URL", "https://gateway:8642"),
        ("HERMESCHAT_TRUSTED_UIDS", "1001,hermes"),
        ("HERMESCHAT_LOCAL_PORT", "abc"),
    ] {
        for args in [&["--server", &relay.url(), "--port", &port][..], &["--status"], &["--doctor"]]
        {
            let run = env.run_env(args, &[(name, value)]);
            run.assert_code(2, &format!("{name}={value} {args:?}"));
            let all = run.all();
            assert!(all.contains(name) && all.contains(value), "{all}");
            // Refused before anything is done: --doctor printed half its report first.
            assert!(run.stdout.trim().is_empty(), "{name}={value} {args:?}: {}", run.stdout);
        }
        assert!(!env.home.join("bridge.json").exists(), "pairing went ahead");
        env.run_env(&["--stop"], &[(name, value)]).assert_code(0, "--stop");
    }
    // What they should be is taken.
    let run = env.run_env(
        &["--status"],
        &[
            ("HERMESCHAT_GATEWAY_URL", "http://127.0.0.1:1"),
            ("HERMESCHAT_TRUSTED_UIDS", "1001, 1002"),
        ],
    );
    assert!(run.all().contains("127.0.0.1:1"), "{}", run.all());
}

/// Two copies of one `bridge.json` (a copied state directory) take the relay connection from
/// each other (4001): the one replaced says why and what to do, and does not take it back at
/// once.
#[test]
fn a_copied_identity_is_named_when_it_takes_the_connection() {
    let s = setup();
    let copy = Env::new();
    std::fs::create_dir_all(&copy.home).unwrap();
    std::fs::set_permissions(&copy.home, std::fs::Permissions::from_mode(0o700)).unwrap();
    for file in ["bridge.json", "config.json"] {
        std::fs::copy(s.env.home.join(file), copy.home.join(file)).unwrap();
    }
    let port = s.backend.port.to_string();
    let mut second = copy
        .cmd(&["--foreground", "--no-server", "--port", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = s.env.run(&["--status"]);
        if run.stdout.contains("another copy of this bridge") {
            assert!(run.stdout.contains("--reset"), "{}", run.stdout);
            break;
        }
        assert!(Instant::now() < deadline, "--status never named the copy:\n{}", run.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = second.kill();
    let _ = second.wait();
}

/// A daemon whose state directory is deleted under it can no longer be found or stopped by
/// any command (its pid file is gone), and the next pairing would start a second one beside
/// it: it notices within a poll round and stops by itself.
#[test]
fn a_daemon_whose_state_directory_is_deleted_stops() {
    let s = setup();
    let pid = s.env.daemon_pid();
    // The daemon may write a file in the middle of the deletion: delete until it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::fs::remove_dir_all(&s.env.home)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        assert!(Instant::now() < deadline, "cannot delete the state directory: {e}");
    }
    // Paired again at once into a new directory at the same path: the orphan, stopping,
    // leaves the new daemon's pid file alone.
    s.env.pair_json(&s.relay, &s.backend, &[]);
    let new_pid = s.env.daemon_pid();
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the orphaned daemon {pid} still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(s.env.daemon_pid(), new_pid, "the new daemon lost its pid file or stopped");
    s.env.run(&["--status"]).assert_code(0, "--status after the orphan left");
}

/// A suspended daemon (SIGSTOP, Ctrl-Z) serves nothing: pairing again restarts it instead of
/// printing a QR code nothing answers, and `--stop` stops it cleanly (resumed to act on its
/// SIGTERM), instead of killing it after the grace period.
#[cfg(target_os = "linux")]
#[test]
fn a_suspended_daemon_is_restarted_by_pairing_and_stopped_cleanly() {
    let s = setup();
    let mut app = s.app;
    let suspend = |pid: u32| {
        // SAFETY: SIGSTOP to the daemon this test started (Ctrl-Z).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGSTOP);
        }
        let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stat().rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')) {
            assert!(Instant::now() < deadline, "pid {pid} was not suspended: {}", stat());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let pid = s.env.daemon_pid();
    suspend(pid);
    let server = s.relay.url();
    let port = s.backend.port.to_string();
    let run = s.env.run(&["--server", &server, "--port", &port]);
    run.assert_code(0, "pairing with a suspended daemon");
    assert!(run.all().contains(&format!("(pid {pid}) is suspended")), "{}", run.all());
    let pid2 = s.env.daemon_pid();
    assert_ne!(pid2, pid, "the suspended daemon was kept: {}", run.all());
    // It gave its lock back on the way out, and may not have ended yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the suspended daemon still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_bridge_status(&mut app, true, Duration::from_secs(10));
    assert_echo(&mut app, "after-suspend", &s.client_id);
    suspend(pid2);
    let stop = s.env.run(&["--stop"]);
    stop.assert_code(0, "--stop of a suspended daemon");
    let stopped = format!("Stopped the bridge daemon (pid {pid2})");
    assert!(stop.stdout.contains(&stopped), "{}", stop.all());
    let log = s.env.log();
    assert!(log.trim_end().ends_with("bridge stopped"), "no clean shutdown: {log}");
}

#[test]
fn a_killed_daemon_is_replaced_by_the_next_run() {
    let s = setup();
    let mut app = s.app;
    let pid = s.env.daemon_pid();
    // SAFETY: SIGKILL to the daemon this test started (a crash).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    wait_bridge_status(&mut app, false, Duration::from_secs(5));
    let qr2 = s.env.pair_json(&s.relay, &s.backend, &[]);
    assert_eq!(qr2.g, s.qr.g, "the identity survives a daemon crash");
    let pid2 = s.env.daemon_pid();
    assert_ne!(pid2, pid);
    wait_bridge_status(&mut app, true, Duration::from_secs(5));
    assert_echo(&mut app, "after-crash", &s.client_id);
}

#[test]
fn a_bridge_deleted_at_the_registry_is_registered_anew() {
    let s = setup();
    let mut app = s.app;
    let id = s.env.bridge_json();
    let (status, v) = Registry::new(&s.qr.s).delete(&s.qr.g, id["relaySecret"].as_str().unwrap());
    assert_eq!(status, 200, "{v}");
    assert_eq!(app.wait_close(), Some(4003));
    // --status names the cause and the next step once the daemon has been refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let run = s.env.run(&["--status"]);
        if run.stdout.contains("no longer knows this bridge; run hermeschat-pair to register") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "--status:\n{}", run.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }
    let qr2 = s.env.pair_json(&s.relay, &s.backend, &[]);
    assert_ne!(qr2.g, s.qr.g, "a new identity after BRIDGE_NOT_FOUND");
    assert_eq!(s.env.bridge_json()["bridgeId"], qr2.g.as_str());
    let (client_id, _, mut app2) = connect_app(&qr2, "Phone 2");
    assert_echo(&mut app2, "anew", &client_id);
}

#[test]
fn a_new_registry_gets_a_new_identity_and_daemon() {
    let s = setup();
    let mut app = s.app;
    let pid = s.env.daemon_pid();
    let relay_b = Relay::new();
    let qr2 = s.env.pair_json(&relay_b, &s.backend, &[]);
    assert_ne!(qr2.g, s.qr.g);
    assert_eq!(qr2.s, relay_b.url());
    let pid2 = s.env.daemon_pid();
    assert_ne!(pid2, pid, "the daemon must be restarted to serve the new identity");
    // The app of the old registry sees its bridge go offline; the new pairing works.
    wait_bridge_status(&mut app, false, Duration::from_secs(5));
    let (client_id, _, mut app2) = connect_app(&qr2, "Phone B");
    assert_echo(&mut app2, "b", &client_id);
    drop(app2);
    drop(relay_b);
}

/// A child process killed and reaped when the test ends, failed or not.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn foreground_logs_to_stderr_and_stops_cleanly_on_ctrl_c() {
    let s = setup();
    let mut app = s.app;
    s.env.run(&["--stop"]).assert_code(0, "--stop");
    wait_bridge_status(&mut app, false, Duration::from_secs(5));
    let port = s.backend.port.to_string();
    let mut child = s
        .env
        .cmd(&["--foreground", "--port", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = read_all(child.stdout.take().unwrap());
    let err = read_all(child.stderr.take().unwrap());
    let pid = child.id();
    let mut child = Reap(child);
    wait_bridge_status(&mut app, true, Duration::from_secs(10));
    assert_echo(&mut app, "fg", &s.client_id);
    assert_eq!(s.env.pid(), Some(pid), "the foreground bridge holds bridge.pid");
    // SAFETY: SIGINT (Ctrl-C) to the child this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "--foreground did not stop within 5 s of Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = err.recv_timeout(Duration::from_secs(5)).unwrap();
    let stdout = out.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "--foreground exit on Ctrl-C\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stderr.contains(&s.qr.g), "the foreground bridge logs to stderr: {stderr:?}");
    wait_bridge_status(&mut app, false, Duration::from_secs(5));
    assert!(!s.env.lock_held(), "bridge.pid still locked after Ctrl-C");
}

/// `--foreground` (the boot service's bridge) passes no backend gate: pointed at a port that is
/// not a Hermes API it served it without a word. It says so now, once, and keeps running.
#[test]
fn a_foreground_bridge_names_a_backend_port_that_is_not_a_hermes_api() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    env.pair_json(&relay, &backend, &[]);
    env.run(&["--stop"]).assert_code(0, "--stop");
    let id = env.bridge_json();
    let (bridge_id, secret) =
        (id["bridgeId"].as_str().unwrap(), id["relaySecret"].as_str().unwrap());
    relay.registry().wait_bridge_online(bridge_id, secret, false);
    let port =
        busy_port(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .to_string();
    let mut child = env
        .cmd(&["--foreground", "--port", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let err = read_all(child.stderr.take().unwrap());
    let mut child = Reap(child);
    // Online at the relay: past its start, and what it found said.
    relay.registry().wait_bridge_online(bridge_id, secret, true);
    assert!(child.0.try_wait().unwrap().is_none(), "--foreground exited");
    // SAFETY: SIGINT (Ctrl-C) to the child this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
    let stderr = err.recv_timeout(Duration::from_secs(10)).unwrap();
    let said = format!("the backend http://127.0.0.1:{port} answers, but not GET /api/health");
    assert!(stderr.contains(&said) && stderr.contains("--port"), "{stderr}");
}

/// A pairing made with the user's own backend is remembered: a later start without flags (the
/// boot service's `--foreground`), here before that backend is up, never puts the built-in
/// backend on its port, and requests reach the user's backend once it is back.
#[test]
fn a_bridge_paired_with_an_external_backend_never_takes_its_port() {
    let s = setup();
    let mut app = s.app;
    let mut backend = s.backend;
    s.env.run(&["--stop"]).assert_code(0, "--stop");
    wait_bridge_status(&mut app, false, Duration::from_secs(5));
    backend.kill();
    let mut child = s
        .env
        .cmd(&["--foreground"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = read_all(child.stderr.take().unwrap());
    let mut child = Reap(child);
    wait_bridge_status(&mut app, true, Duration::from_secs(10));
    // Online, and the port is still free for the user's backend.
    expect_error(
        &mut app,
        &request("early", "GET", "/api/health", &[], None),
        ErrorCode::BackendUnreachable,
    );
    backend.spawn(backend.port);
    assert_echo(&mut app, "own-backend", &s.client_id);
    let _ = child.0.kill();
    let _ = child.0.wait();
    let stderr = err.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(!stderr.contains("built-in backend"), "the built-in backend started: {stderr}");
}

/// Switching from your own backend to the built-in one, as the README says: stop yours and run
/// `hermeschat-pair` again. The daemon that served your backend is replaced by one that runs
/// the built-in backend, and config.json forgets the external choice.
#[test]
fn pairing_again_without_your_backend_switches_to_the_built_in_one() {
    let s = setup();
    let mut app = s.app;
    let mut backend = s.backend;
    let config = || std::fs::read_to_string(s.env.home.join("config.json")).unwrap();
    assert!(config().contains("\"externalBackend\": true"), "{}", config());
    backend.kill();
    let port = backend.port.to_string();
    let run = s.env.run(&["--server", &s.relay.url(), "--port", &port]);
    run.assert_code(0, "hermeschat-pair with the user's backend stopped");
    assert!(run.stdout.contains("Built-in Hermes backend ready"), "{}", run.stdout);
    assert!(!config().contains("externalBackend"), "{}", config());
    wait_bridge_status(&mut app, true, Duration::from_secs(10));
    let w = fetch(&mut app, &request("h-builtin", "GET", "/api/health", &[], None));
    assert_eq!(w.status, 200);
    assert_eq!(w.json()["version"], hermeschat_pair::VERSION, "the built-in backend answers");
}

/// A first pairing that registered but did not finish (config.json without the registry URL)
/// is completed by running `hermeschat-pair` again without `--server`: bridge.json knows it.
#[test]
fn the_registry_of_an_unfinished_first_pairing_comes_from_bridge_json() {
    let s = setup();
    std::fs::write(s.env.home.join("config.json"), "{}\n").unwrap();
    let port = s.backend.port.to_string();
    let run = s.env.run(&["--json", "--port", &port]);
    run.assert_code(0, "hermeschat-pair without --server");
    assert_eq!(parse_payload(&run.stdout, &s.relay.url()).g, s.qr.g, "the same bridge");
}

/// A boot service's log (the service manager appends the foreground bridge's stderr to
/// `service-error.log`, and the started gateway's output to `gateway.log`) is kept under 5 MiB
/// by the running bridge: trimmed in place, its lines so far in `.1`, the writer going on from
/// the start of the same file.
#[test]
fn logs_others_append_to_are_trimmed_in_place_by_the_running_bridge() {
    use std::os::unix::fs::OpenOptionsExt;
    let s = setup();
    let mut app = s.app;
    s.env.run(&["--stop"]).assert_code(0, "--stop");
    wait_bridge_status(&mut app, false, Duration::from_secs(5));
    let errors = s.env.home.join("service-error.log");
    let gateway = s.env.home.join("gateway.log");
    let old_lines = "an old line of a bridge that ran for months\n".repeat(130_000);
    assert!(old_lines.len() > 5 << 20);
    std::fs::write(&errors, &old_lines).unwrap();
    std::fs::write(&gateway, &old_lines).unwrap();
    // As systemd's `StandardError=append:`: stderr opened once, O_APPEND.
    let stderr = std::fs::OpenOptions::new().append(true).mode(0o600).open(&errors).unwrap();
    let child = s
        .env
        .cmd(&["--foreground", "--port", &s.backend.port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let _child = Reap(child);
    wait_bridge_status(&mut app, true, Duration::from_secs(10));
    assert_echo(&mut app, "trimmed", &s.client_id);
    // Both trims are told in the bridge's log, its stderr: service-error.log itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let told = |what: &str| std::fs::read_to_string(&errors).unwrap().contains(what);
    while !(told("service-error.log passed 5 MiB") && told("gateway.log passed 5 MiB")) {
        assert!(Instant::now() < deadline, "{:?}", std::fs::read_to_string(&errors).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::metadata(&gateway).unwrap().len(), 0, "gateway.log was not trimmed");
    // .1 holds the last 5 MiB.
    let copy = std::fs::read_to_string(gateway.with_extension("log.1")).unwrap();
    assert_eq!(copy.len(), 5 << 20);
    assert!(old_lines.ends_with(&copy), "gateway.log.1 is not the end of the old lines");
    let copy = std::fs::read_to_string(errors.with_extension("log.1")).unwrap();
    assert!(copy.len() <= 5 << 20 && copy.contains("an old line"), "service-error.log.1");
    // The bridge went on writing its stderr through the same descriptor, from the start of the
    // file: no hole of NUL bytes where the old lines were.
    let now = std::fs::read_to_string(&errors).unwrap();
    assert!(now.len() < 1 << 20, "service-error.log still holds {} bytes", now.len());
    assert!(!now.contains('\0'), "service-error.log has a hole: {:?}", &now[..now.len().min(80)]);
}

/// An IPv6 backend host, written as in a URL (`HERMESCHAT_LOCAL_HOST=[::1]`): the built-in
/// backend is started on `[::1]` and answers through the relay.
#[test]
fn a_bracketed_ipv6_backend_host_gets_the_built_in_backend_there() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let s = setup();
    let mut app = s.app;
    let port = std::net::TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port();
    let port = port.to_string();
    let run = s.env.run_env(
        &["--server", &s.relay.url(), "--port", &port],
        &[("HERMESCHAT_LOCAL_HOST", "[::1]")],
    );
    run.assert_code(0, "hermeschat-pair with HERMESCHAT_LOCAL_HOST=[::1]");
    assert!(run.stdout.contains("Built-in Hermes backend ready"), "{}", run.stdout);
    assert!(
        std::net::TcpStream::connect(format!("[::1]:{port}")).is_ok(),
        "nothing listens on [::1]:{port}"
    );
    wait_bridge_status(&mut app, true, Duration::from_secs(10));
    let w = fetch(&mut app, &request("h-v6", "GET", "/api/health", &[], None));
    assert_eq!(w.status, 200);
    assert_eq!(w.json()["version"], hermeschat_pair::VERSION, "the built-in backend answers");
    // --status names it as a URL and finds it healthy (without the variable: status.json).
    let status = s.env.run(&["--status", "--json"]);
    status.assert_code(0, "--status");
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["backend"]["url"], format!("http://[::1]:{port}"), "{v}");
}

/// The detached daemon keeps none of the files its caller left open without close-on-exec
/// (a terminal's, a tool's): it would hold them for months and hand them to the gateway.
#[test]
fn the_daemon_closes_descriptors_its_caller_left_open() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let relay = Relay::start(&[]);
    let backend = Backend::start();
    let env = Env::new();
    let marker = env.root.join("inherited-marker");
    let file = std::fs::File::create(&marker).unwrap();
    let fd = file.as_raw_fd();
    let server = relay.url();
    let port = backend.port.to_string();
    let mut cmd = env.cmd(&["--json", "--server", &server, "--port", &port]);
    // SAFETY: dup2 is async-signal-safe. The copy (without close-on-exec, as a shell's
    // redirection leaves it) gets a number far from the daemon's own readiness descriptor.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 100) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let run = common::session::run_cmd(cmd, Duration::from_secs(60));
    run.assert_code(0, "pairing with an inherited descriptor");
    let pid = env.daemon_pid();
    let open: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(!open.iter().any(|p| p.contains("inherited-marker")), "{open:?}");
    drop(file);
}

/// A bridge identity is never lost to a damaged file, another spelling of the registry, or a
/// secret the registry refuses:
/// - `bridge.json` damaged while the daemon runs: `--status` only looks (and says so), and the
///   daemon writes the file again, so the next pairing keeps the bridge and its apps;
/// - `--refresh-code` against another registry URL is refused (exit 2), file untouched;
/// - a secret the registry refuses (401) is reported, never answered by registering anew;
/// - a file from a newer version is an error and stays as it is;
/// - pairing with another registry keeps the replaced identity beside the new one.
#[test]
fn the_bridge_identity_survives_damage_and_mistakes() {
    let s = setup();
    let env = &s.env;
    let mut app = s.app;
    let path = env.home.join("bridge.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let bridge_id = s.qr.g.clone();
    let server = s.relay.url();
    let port = s.backend.port.to_string();
    let files = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&env.home)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("bridge.json"))
            .collect();
        names.sort();
        names
    };

    // Damaged while the daemon runs.
    std::fs::write(&path, "{\"v\":2,").unwrap();
    let run = env.run(&["--status"]);
    assert!(run.all().contains("bridge.json is damaged"), "{}", run.all());
    assert_eq!(files(), vec!["bridge.json"], "--status moved a file");
    let run = env.run(&["--json", "--refresh-code", "--server", &server, "--port", &port]);
    run.assert_code(0, "--refresh-code over a damaged bridge.json");
    assert_eq!(parse_payload(&run.stdout, &server).g, bridge_id, "the bridge was replaced");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
    assert!(env.log().contains("wrote it again from the running bridge"), "{}", env.log());
    assert_echo(&mut app, "still-paired", &s.client_id);

    // Another spelling of the registry with --refresh-code.
    let other = server.replace("127.0.0.1", "localhost");
    let run = env.run(&["--refresh-code", "--server", &other, "--port", &port]);
    run.assert_code(2, "--refresh-code against another registry");
    assert!(run.stderr.contains("without --refresh-code"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);

    // A secret the registry refuses.
    let mut id: Value = serde_json::from_str(&original).unwrap();
    id["relaySecret"] = json!(format!("hrs_{}", "0".repeat(64)));
    std::fs::write(&path, serde_json::to_string_pretty(&id).unwrap()).unwrap();
    let run = env.run(&["--refresh-code", "--server", &server, "--port", &port]);
    run.assert_code(1, "a refused secret");
    assert!(run.stderr.contains("did not accept its secret"), "{}", run.stderr);
    assert_eq!(env.bridge_json()["bridgeId"], bridge_id.as_str(), "registered anew");
    std::fs::write(&path, &original).unwrap();

    // Written by a newer version.
    let newer = original.replacen("\"v\": 2", "\"v\": 3", 1);
    assert_ne!(newer, original);
    std::fs::write(&path, &newer).unwrap();
    let run = env.run(&["--refresh-code", "--server", &server, "--port", &port]);
    run.assert_code(1, "a newer bridge.json");
    assert!(run.stderr.contains("newer hermeschat-pair"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), newer, "left as it is");
    std::fs::write(&path, &original).unwrap();

    // Pairing with another registry: a new bridge, the old identity kept.
    let run = env.run(&["--json", "--server", &other, "--port", &port]);
    run.assert_code(0, "pairing with another registry");
    assert_ne!(env.bridge_json()["bridgeId"], bridge_id.as_str());
    let kept: Vec<String> =
        files().into_iter().filter(|n| n.starts_with("bridge.json.replaced-")).collect();
    assert_eq!(kept.len(), 1, "{:?}", files());
    assert_eq!(std::fs::read_to_string(env.home.join(&kept[0])).unwrap(), original);
}

/// Output piped into a reader that goes away (`--status | head -1`) ends the command quietly,
/// without a panic's message and exit code 101.
#[test]
fn a_closed_output_pipe_ends_a_command_quietly() {
    let env = Env::new();
    for args in [&["--status"][..], &["--help"]] {
        let mut child = env
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {stderr}");
    }
}

/// A damaged `bridge.pid` (the lock still held by the daemon) does not make the daemon
/// unstoppable: the kernel's lock table names it.
#[cfg(target_os = "linux")]
#[test]
fn a_damaged_pid_file_does_not_hide_the_daemon() {
    let s = setup();
    let pid = s.env.daemon_pid();
    std::fs::write(s.env.home.join("bridge.pid"), "garbage\n").unwrap();
    let run = s.env.run(&["--status", "--json"]);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["daemon"]["pid"], pid, "{v}");
    s.env.run(&["--stop"]).assert_code(0, "--stop with a damaged bridge.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the daemon is still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon raises its soft open-file limit to the hard one: macOS starts programs with 256
/// descriptors, which a busy bridge (two per backend connection, LAN apps, uploads) can use up.
#[test]
fn the_daemon_raises_its_open_file_limit() {
    use std::os::unix::process::CommandExt;
    let soft_and_hard = |pid: &str| -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[3].to_owned(), f[4].to_owned())
    };
    let (_, hard) = soft_and_hard("self");
    if hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        eprintln!("SKIPPED: the hard open-file limit is {hard}, no room above 256");
        return;
    }
    let relay = Relay::start(&[]);
    let backend = Backend::start();
    let env = Env::new();
    let (server, port) = (relay.url(), backend.port.to_string());
    let mut cmd = env.cmd(&["--json", "--server", &server, "--port", &port]);
    // SAFETY: setrlimit is async-signal-safe, and only lowers the child's soft limit.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 256;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_cmd(cmd, Duration::from_secs(60)).assert_code(0, "pairing with ulimit -n 256");
    let pid = env.daemon_pid().to_string();
    assert_eq!(soft_and_hard(&pid), (hard.clone(), hard), "daemon {pid}");
}

/// An upgrade replaces the program file under a running daemon, which goes on running the old
/// code: `--status` and `--doctor` say so, and the next pairing restarts it with the new file
/// (the seed's upgrade steps stop it first; users often skip that). The app keeps its pairing.
#[test]
fn a_daemon_whose_program_was_upgraded_is_restarted_by_the_next_pairing() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    // The installed program: a copy, replaced as installers do (a new file renamed over it).
    let bin = env.root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let installed = bin.join("hermeschat-pair");
    let install = || {
        let fresh = bin.join(".hermeschat-pair.new");
        std::fs::copy(&*PAIR_BIN, &fresh).unwrap();
        std::fs::rename(&fresh, &installed).unwrap();
    };
    install();
    let (server, port) = (relay.url(), backend.port.to_string());
    let pair = || {
        let cmd = env.cmd_of(&installed, &["--server", &server, "--port", &port]);
        let run = run_cmd(cmd, Duration::from_secs(60));
        run.assert_code(0, "pairing");
        run
    };
    let run = env.cmd_of(&installed, &["--json", "--server", &server, "--port", &port]);
    let run = run_cmd(run, Duration::from_secs(60));
    run.assert_code(0, "first pairing");
    let qr = parse_payload(&run.stdout, &server);
    let (client_id, secret, mut app) = connect_app(&qr, "Phone");
    assert_echo(&mut app, "before", &client_id);
    let old = env.daemon_pid();

    // Not replaced: pairing again keeps it, and --status says nothing of the sort.
    let run = pair();
    assert!(run.stdout.contains(&format!("already running (pid {old})")), "{}", run.all());
    let status = run_cmd(env.cmd_of(&installed, &["--status", "--json"]), CMD_TIMEOUT);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["daemon"]["programReplaced"], false, "{v}");

    install();
    let status = run_cmd(env.cmd_of(&installed, &["--status", "--json"]), CMD_TIMEOUT);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["daemon"]["programReplaced"], true, "{v}");
    let status = run_cmd(env.cmd_of(&installed, &["--status"]), CMD_TIMEOUT);
    assert!(status.stdout.contains("has been replaced since it started"), "{}", status.all());
    let doctor = run_cmd(env.cmd_of(&installed, &["--doctor", "--json"]), CMD_TIMEOUT);
    let v: Value = serde_json::from_str(&doctor.stdout).unwrap();
    let hop = v["hops"].as_array().unwrap().iter().find(|h| h["id"] == "daemon").unwrap();
    assert_eq!(hop["state"], "warn", "{hop}");
    assert!(hop["fix"].as_str().unwrap().contains("hermeschat-pair"), "{hop}");

    let run = pair();
    assert!(run.stdout.contains("has been replaced since it started"), "{}", run.all());
    let new = env.daemon_pid();
    assert_ne!(new, old, "the daemon was not restarted");
    assert!(!alive(old), "the old daemon {old} still runs");
    let status = run_cmd(env.cmd_of(&installed, &["--status", "--json"]), CMD_TIMEOUT);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["daemon"]["programReplaced"], false, "{v}");

    // Another copy of the program (two installs) finds it running and says whose it is.
    let run = env.run(&["--server", &server, "--port", &port]);
    run.assert_code(0, "pairing with another copy");
    assert!(run.stdout.contains(&format!("already running (pid {new})")), "{}", run.all());
    assert!(run.stdout.contains(&format!("It runs {}", installed.display())), "{}", run.all());

    // The app's pairing survives: it connects again with its own secret and is served.
    drop(app);
    let mut app = AppClient::connect_url(&app_url(&qr), &secret)
        .unwrap_or_else(|e| panic!("app connect refused: {e:?}"));
    app.expect_bridge_status(true);
    assert_echo(&mut app, "after-upgrade", &client_id);
}

/// A bridge started by a service manager that finds one started by hand leaves with exit 0, so
/// the manager does not restart it over and over: our unit sets HERMESCHAT_SERVICE (systemd's
/// INVOCATION_ID counts only with systemd as the parent, which a test cannot be). Run by hand,
/// it is an error (exit 1), also from a shell that inherited INVOCATION_ID (a tmux server
/// started by a systemd service).
#[test]
fn a_service_bridge_leaves_quietly_when_one_already_runs() {
    let s = setup();
    let port = s.backend.port.to_string();
    let run = s.env.run(&["--foreground", "--port", &port]);
    run.assert_code(1, "--foreground beside a running daemon");
    let run = s.env.run_env(&["--foreground", "--port", &port], &[("INVOCATION_ID", "1")]);
    run.assert_code(1, "--foreground with an inherited INVOCATION_ID");
    let run = s.env.run_env(&["--foreground", "--port", &port], &[("HERMESCHAT_SERVICE", "1")]);
    run.assert_code(0, "the service's bridge");
    assert!(run.all().contains("The service leaves it running"), "{}", run.all());
}

/// A daemon killed while it wrote a state file leaves its temp file behind; the next daemon
/// removes those of dead processes (and only those).
#[test]
fn a_starting_daemon_removes_temp_files_of_dead_processes() {
    let s = setup();
    let stale = s.env.home.join(".status.json.2147483646.7.tmp");
    let live = s.env.home.join(format!(".status.json.{}.7.tmp", std::process::id()));
    std::fs::write(&stale, "{").unwrap();
    std::fs::write(&live, "{").unwrap();
    s.env.run(&["--stop"]).assert_code(0, "--stop");
    s.env.pair_json(&s.relay, &s.backend, &[]);
    assert!(!stale.exists(), "the dead process's temp file is still there");
    assert!(live.exists(), "a live process's temp file was removed");
    assert!(s.env.log().contains("removed 1 temp file(s)"), "{}", s.env.log());
}

// =============================================================================================
// Behind a reverse proxy

/// A stand-in for nginx or Caddy in front of the relay (plain HTTP, no TLS): each connection is
/// passed on to `127.0.0.1:upstream` byte for byte, WebSocket upgrades included; while nothing
/// listens there (the relay stopped or restarting) it answers as those proxies do, `502 Bad
/// Gateway` with an HTML page, and closes. Stops with the test process.
fn front_proxy(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            std::thread::spawn(move || {
                match std::net::TcpStream::connect(("127.0.0.1", upstream)) {
                    Ok(relay) => {
                        let (mut c2, mut r2) =
                            (client.try_clone().unwrap(), relay.try_clone().unwrap());
                        let (mut relay, mut client) = (relay, client);
                        let up = std::thread::spawn(move || {
                            let _ = std::io::copy(&mut c2, &mut r2);
                            let _ = r2.shutdown(std::net::Shutdown::Write);
                        });
                        let _ = std::io::copy(&mut relay, &mut client);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        let _ = up.join();
                    }
                    Err(_) => {
                        // Read the request head, then answer like nginx does.
                        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut head = Vec::new();
                        let mut buf = [0u8; 4096];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match client.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
                                <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx\
                                </center>\r\n</body>\r\n</html>\r\n";
                        let _ = write!(
                            client,
                            "HTTP/1.1 502 Bad Gateway\r\nServer: nginx\r\nContent-Type: text/html\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                            page.len()
                        );
                    }
                }
            });
        }
    });
    port
}

/// A relay behind a proxy, stopped and started again: the proxy answers `502 Bad Gateway`
/// meanwhile. The CLI and the daemon say that the relay behind the proxy is down (not that the
/// URL is wrong, nor that the relay refused the bridge), and the daemon retries at its usual
/// pace instead of the 30 s it waits after a real refusal, so it is back within seconds of the
/// relay.
#[test]
fn a_proxys_502_while_the_relay_restarts_is_retried_at_once_and_named() {
    let relay_port = listen_port();
    let proxy = front_proxy(relay_port);
    let public = format!("http://127.0.0.1:{proxy}");
    let mut relay = Relay::start_on(&format!("127.0.0.1:{relay_port}"), &["--public-url", &public]);
    let backend = Backend::start();
    let env = Env::new();
    let port = backend.port.to_string();
    let run = env.run(&["--json", "--server", &public, "--port", &port]);
    run.assert_code(0, "pairing through the proxy");
    let qr = parse_payload(&run.stdout, &public);
    assert_eq!(qr.u, format!("ws://127.0.0.1:{proxy}/ws/app"), "the relay hands out the proxy");
    let (client_id, secret, app) = connect_app(&qr, "Proxied Phone");
    drop(app);

    relay.kill();
    let run = env.run(&["--refresh-code"]);
    assert_ne!(run.code, Some(0), "{}", run.all());
    let said = run.all();
    assert!(
        said.contains("cannot reach the registry")
            && said.contains("the proxy in front of the relay answered HTTP 502 (Bad Gateway)")
            && !said.contains("did not answer like a HermesChat registry"),
        "{said}"
    );
    // The daemon meets the 502 too, and says what it is.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !env.log().contains("the proxy in front of the relay answered HTTP 502") {
        assert!(Instant::now() < deadline, "no 502 in the daemon's log:\n{}", env.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!env.log().contains("refused the bridge (502)"), "{}", env.log());

    relay.restart();
    let back = Instant::now();
    let registry = Registry::new(&public);
    while registry.bridge_status(&qr.g, Some(&secret)).1["online"] != true {
        assert!(back.elapsed() < Duration::from_secs(35), "the bridge never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = back.elapsed();
    assert!(took < Duration::from_secs(10), "the bridge took {took:?} to come back");
    let mut app = AppClient::connect_url(&app_url(&qr), &secret).unwrap();
    app.expect_bridge_status(true);
    assert_echo(&mut app, "after", &client_id);
}
