//! A hostile relay: whoever speaks on the bridge's relay socket (a relay taken over, say) can
//! make the bridge forward what the passthrough rules allow, and nothing more. Here a fake
//! relay (a plain WebSocket server in the test) talks to the real `hermeschat-pair
//! --foreground`, and the test checks what the bridge lets it do to the user's machine.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::rss_kib;
use common::session::{Backend, Env};
use hermeschat_pair::protocol::RegisterResponse;
use hermeschat_pair::state::{self, BridgeIdentity};
use serde_json::json;
use tungstenite::{Message, WebSocket};

/// The bridge in the foreground, paired (as far as its bridge.json says) with a relay at
/// `relay_port`, which is the test's.
struct Bridge {
    child: Child,
}

impl Bridge {
    fn start(env: &Env, relay_port: u16, backend: &Backend) -> Bridge {
        state::ensure_dir(&env.home).unwrap();
        let reg = RegisterResponse {
            bridge_id: "0123456789abcdef01234567".into(),
            relay_secret: format!("hrs_{}", "a".repeat(64)),
            bridge_relay_url: format!("ws://127.0.0.1:{relay_port}/ws/bridge"),
            app_relay_url: format!("ws://127.0.0.1:{relay_port}/ws/app"),
        };
        let registry = format!("http://127.0.0.1:{relay_port}");
        let id = BridgeIdentity::from_registration(reg, &registry, "inst", "Test", 1);
        state::write_json(&state::bridge_json(&env.home), &id).unwrap();
        let log = std::fs::File::create(env.home.join("bridge.log")).unwrap();
        let child = env
            .cmd(&["--foreground", "--port", &backend.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Bridge { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend, and the bridge in the foreground with its relay socket accepted by the test,
/// which plays the relay on it.
fn bridge_on_a_test_relay() -> (Backend, Env, Bridge, WebSocket<TcpStream>) {
    let backend = Backend::start();
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bridge = Bridge::start(&env, listener.local_addr().unwrap().port(), &backend);
    let ws = accept(&listener);
    (backend, env, bridge, ws)
}

/// Accepts the bridge's socket on `listener` (the bridge dials in after its first probes).
fn accept(listener: &TcpListener) -> WebSocket<TcpStream> {
    listener.set_nonblocking(false).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tungstenite::accept(tcp).unwrap()
}

/// A relay that names clients that are not clientIds (megabytes long), forges log lines, and
/// sends requests the bridge refuses without ever reading its answers. The bridge ignores
/// those clients (status.json stays small), writes what the relay chose escaped (no forged
/// line, no terminal escape), and stops reading the socket once its unread answers pass a
/// bound, so its memory stays bounded.
#[test]
fn a_hostile_relay_cannot_grow_the_bridge_or_forge_its_log() {
    let (_backend, env, bridge, mut ws) = bridge_on_a_test_relay();

    let huge = format!("hcl_{}", "x".repeat(1 << 20));
    let frames = [
        json!({"type": "client.connected", "client": huge, "deviceName": "d"}),
        json!({"type": "client.connected", "client": "hcl_0123456789abcdef", "deviceName": "\u{1b}[2J"}),
        json!({"type": "error", "code": "BAD_FRAME",
               "message": "x\n2026-12-07T11:00:00.000Z relay connected: forged\u{1b}]0;t\u{7}"}),
        json!({"type": "request", "id": "r1", "client": huge, "method": "GET", "path": "/api/x"}),
    ];
    for f in &frames {
        ws.send(Message::text(f.to_string())).unwrap();
    }

    // Refused requests, sent without ever reading the answers, from a thread: once the
    // bridge stops reading, TCP stops this writer (a write times out).
    let mut tcp = ws.get_ref().try_clone().unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let writer = std::thread::spawn(move || {
        let mut writer =
            WebSocket::from_raw_socket(&mut tcp, tungstenite::protocol::Role::Server, None);
        for i in 0..400_000u32 {
            let f = json!({"type": "request", "id": format!("r{i}"),
                           "client": "hcl_0123456789abcdef", "method": "BAD", "path": "/api/x"});
            if writer.send(Message::text(f.to_string())).is_err() {
                return Some(i);
            }
        }
        None
    });
    let stopped_after = writer.join().unwrap();
    let rss_mib = rss_kib(bridge.pid()) / 1024;
    assert!(
        stopped_after.is_some(),
        "the bridge read 400,000 refused requests without ever being read from"
    );
    assert!(rss_mib < 200, "the bridge grew to {rss_mib} MiB");

    // Once the relay reads its answers, the bridge reads on: the last request sent is answered.
    let last = format!("r{}", stopped_after.unwrap_or(1) - 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the bridge did not read on after its answers drained");
        match ws.read() {
            Ok(Message::Text(t)) if t.contains(&format!("\"id\":\"{last}\"")) => break,
            Ok(_) => {}
            Err(e) => panic!("reading the bridge's answers: {e}"),
        }
    }

    // status.json lists the valid client only.
    let status = std::fs::read_to_string(env.home.join("status.json")).unwrap_or_default();
    assert!(status.len() < 64 << 10, "status.json is {} bytes", status.len());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.log().contains("is not a clientId") {
        assert!(Instant::now() < deadline, "no refusal of the bad client in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What the relay chose is written escaped: no forged line, no terminal escape.
    let log = env.log();
    assert!(!log.contains('\u{1b}'), "an escape reached the log");
    assert!(!log.lines().any(|l| l.starts_with("2026-12-07T11:00:00.000Z")), "a forged line");
    assert!(log.len() < 1 << 20, "the log holds the megabyte client");
    drop(bridge);
}

/// A relay (and app) newer than the bridge send a frame type the bridge does not know about a
/// request: the bridge answers that request `response.error BAD_REQUEST` naming the type and
/// the update, with the request's `client` and `conn`, so the app does not wait for ever. A
/// frame of an unknown type that names no request, or an open request, gets no answer, nor
/// does a malformed frame of a known type; the socket goes on serving.
#[test]
fn a_frame_type_from_a_newer_protocol_is_answered_on_its_request() {
    let (_backend, _env, _bridge, mut ws) = bridge_on_a_test_relay();
    let client = "hcl_0123456789abcdef";
    for f in [
        json!({"type": "request", "id": "slow", "client": client, "conn": 7,
               "method": "GET", "path": "/api/slow?secs=1"}),
        json!({"type": "request.pause", "id": "slow", "client": client, "conn": 7}),
        json!({"type": "telemetry.v9", "data": 1}),
        // A known type, malformed: not a newer protocol, so not answered as one.
        json!({"type": "request", "id": "bad1", "client": client, "method": 5, "path": "/x"}),
        json!({"type": "request.resume", "id": "new1", "client": client, "conn": 7, "offset": 0}),
        json!({"type": "request", "id": "plain", "client": client, "conn": 7,
               "method": "GET", "path": "/api/health"}),
    ] {
        ws.send(Message::text(f.to_string())).unwrap();
    }
    let mut answers = Vec::new();
    let done = |answers: &[serde_json::Value], id: &str| {
        answers.iter().any(|a| a["id"] == id && a["type"] == "response")
    };
    while !done(&answers, "plain") || !done(&answers, "slow") {
        match ws.read().unwrap() {
            Message::Text(t) => answers.push(serde_json::from_str(t.as_str()).unwrap()),
            _ => continue,
        }
    }
    let new1: Vec<_> = answers.iter().filter(|a| a["id"] == "new1").collect();
    assert_eq!(new1.len(), 1, "{answers:?}");
    let a = new1[0];
    assert_eq!(
        (&a["type"], &a["code"], &a["client"], &a["conn"]),
        (&json!("response.error"), &json!("BAD_REQUEST"), &json!(client), &json!(7)),
        "{a}"
    );
    let message = a["message"].as_str().unwrap();
    assert!(
        message.contains("request.resume") && message.contains("update hermeschat-pair"),
        "{a}"
    );
    // The open request goes on to its own answer; nothing else is answered.
    let slow: Vec<_> = answers.iter().filter(|a| a["id"] == "slow").collect();
    assert_eq!(slow.len(), 1, "{answers:?}");
    assert_eq!(slow[0]["status"], 200, "{answers:?}");
    assert_eq!(answers.len(), 3, "{answers:?}");
}

/// Apps that connect and leave as fast as the relay can say so (a flapping app, two phones
/// sharing one device credential): the bridge keeps answering requests in between, within the
/// relay's idle cut-off (a bridge that sends nothing for 60 s is dropped: it used to fsync
/// status.json four times per pair and flush nothing until the flood ended, about 70 s for
/// these 60,000 pairs here), and status.json ends with the apps online that are.
#[test]
fn a_flood_of_app_presence_frames_does_not_stall_the_bridge() {
    let (_backend, env, _bridge, mut ws) = bridge_on_a_test_relay();
    let stays = "hcl_ffffffffffffffff";
    let mut tcp = ws.get_ref().try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = WebSocket::from_raw_socket(&mut tcp, tungstenite::protocol::Role::Server, None);
        let send = |w: &mut WebSocket<_>, f: serde_json::Value| {
            w.write(Message::text(f.to_string())).unwrap();
        };
        send(&mut w, json!({"type": "client.connected", "client": stays, "deviceName": "d"}));
        for i in 0..60_000u32 {
            let client = format!("hcl_{i:016x}");
            send(&mut w, json!({"type": "client.connected", "client": client, "deviceName": "d"}));
            send(&mut w, json!({"type": "client.disconnected", "client": client}));
            if i % 3000 == 2999 {
                send(
                    &mut w,
                    json!({"type": "request", "id": format!("r{i}"), "client": stays,
                                    "method": "GET", "path": "/api/health"}),
                );
            }
        }
        w.flush().unwrap();
    });
    // Every request is answered (the reading goes on while the answers are read here).
    let t0 = Instant::now();
    let mut answered = 0;
    while answered < 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "{answered} of 20 answered in 60 s");
        if let Message::Text(t) = ws.read().unwrap()
            && t.as_str().contains("\"type\":\"response\"")
        {
            answered += 1;
        }
    }
    writer.join().unwrap();
    // status.json: the one app that stayed, soon.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(env.home.join("status.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if v["appsOnline"] == json!([stays]) {
            break;
        }
        assert!(Instant::now() < deadline, "appsOnline: {}", v["appsOnline"]);
        std::thread::sleep(Duration::from_millis(50));
    }
}
