//! End-to-end tests of `hermeschat-relay`: the real binary on loopback, driven by the app test
//! client and the bridge test peer of `tests/common`. Each test runs its own relay with its own
//! data directory on an OS-chosen port.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use hermeschat_pair::protocol::{
    self, ErrorCode, Frame, Headers, RequestFrame, ResponseFrame, VerifyResponse, is_access_code,
    is_bridge_id, is_client_id, is_client_secret, is_relay_secret,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A bridgeId that is well-formed but not registered.
const UNKNOWN_BRIDGE: &str = "0123456789abcdef01234567";

fn response(f: Frame) -> ResponseFrame {
    match f {
        Frame::Response(r) => r,
        other => panic!("expected a response frame, got {other:?}"),
    }
}

#[track_caller]
fn assert_response_error(f: &Frame, id: &str, code: ErrorCode) {
    match f {
        Frame::ResponseError { id: got, client, conn, code: c, message } => {
            assert_eq!((got.as_str(), *c), (id, code), "{f:?}");
            assert_eq!(*client, None, "relay must not leak client to the app: {f:?}");
            assert_eq!(*conn, None, "relay must not leak conn to the app: {f:?}");
            assert!(!message.is_empty(), "{f:?}");
        }
        other => panic!("expected response.error {code:?} for {id}, got {other:?}"),
    }
}

#[track_caller]
fn assert_bad_frame(f: &Frame) {
    match f {
        Frame::Error { code, message } => {
            assert_eq!(*code, ErrorCode::BadFrame, "{f:?}");
            assert!(!message.is_empty());
        }
        other => panic!("expected error BAD_FRAME, got {other:?}"),
    }
}

#[track_caller]
fn expect_refused(r: Result<impl Sized, ConnectError>, allowed: &[u16], what: &str) -> u16 {
    match r {
        Ok(_) => panic!("{what}: connect succeeded, expected HTTP {allowed:?}"),
        Err(ConnectError::Http(s, body)) => {
            assert!(
                allowed.contains(&s),
                "{what}: refused with {s} (body {body}), expected {allowed:?}"
            );
            s
        }
        Err(ConnectError::Other(e)) => {
            panic!("{what}: failed without an HTTP status ({e}), expected {allowed:?}")
        }
    }
}

// =============================================================================================
// Happy paths

#[test]
fn full_flow_round_trip_clean_shutdown_and_no_secret_in_logs() {
    let mut relay = Relay::new();
    let api = relay.registry();

    let health = api.call_full("GET", "/v1/health", None, None);
    assert_eq!(health.status, 200);
    assert_eq!(health.body["ok"], true, "{}", health.raw);
    assert!(health.body["version"].is_string(), "{}", health.raw);

    // register
    let r = api.call_full(
        "POST",
        "/v1/bridge/register",
        None,
        Some(&json!({"displayName": "Main Bridge", "version": "1.2.3"})),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let reg: protocol::RegisterResponse = serde_json::from_value(r.body.clone()).unwrap();
    assert!(is_bridge_id(&reg.bridge_id), "{}", reg.bridge_id);
    assert!(is_relay_secret(&reg.relay_secret));
    assert_eq!(reg.bridge_relay_url, format!("ws://{}/ws/bridge", relay.addr));
    assert_eq!(reg.app_relay_url, format!("ws://{}/ws/app", relay.addr));

    // access code
    let before = now_ms();
    let ac = api.call_full(
        "POST",
        "/v1/bridge/access-code",
        Some(&reg.relay_secret),
        Some(&json!({"bridgeId": reg.bridge_id})),
    );
    assert_eq!(ac.status, 200, "{}", ac.raw);
    assert_eq!(ac.header("cache-control"), Some("no-store"));
    let code: protocol::AccessCodeResponse = serde_json::from_value(ac.body.clone()).unwrap();
    assert!(is_access_code(&code.access_code), "{}", code.access_code);
    let ttl = code.expires_at as i64 - before as i64;
    assert!((595_000..=605_000).contains(&ttl), "expiresAt should be ~600 s ahead, is {ttl} ms");

    // verify
    let client = api.verify_ok(&reg.bridge_id, &code.access_code, "Main Phone");
    assert!(is_client_id(&client.client_id), "{}", client.client_id);
    assert!(is_client_secret(&client.client_secret));
    assert_eq!(client.app_relay_url, reg.app_relay_url);
    assert_eq!(client.bridge_name, "Main Bridge");

    // sockets, using the URLs the relay handed out
    let mut bridge = BridgePeer::connect(&relay, &reg.bridge_id, &reg.relay_secret, "inst-main")
        .expect("bridge connect");
    api.wait_bridge_online(&reg.bridge_id, &reg.relay_secret, true);
    let mut app = AppClient::connect_url(
        &format!("{}?bridgeId={}", client.app_relay_url, reg.bridge_id),
        &client.client_secret,
    )
    .expect("app connect");
    app.expect_bridge_status(true);
    assert_eq!(
        bridge.recv(),
        Frame::ClientConnected {
            client: client.client_id.clone(),
            device_name: "Main Phone".into()
        }
    );

    // text round trip; the app tries to spoof `client` and `conn`, the relay overwrites them
    let mut headers = Headers::new();
    headers.insert("content-type".into(), "text/plain; charset=utf-8".into());
    headers.insert("x-test".into(), "yes".into());
    let sent = RequestFrame {
        id: "req-1".into(),
        client: Some("hcl_00000000000000ff".into()),
        conn: Some(u64::MAX),
        method: "POST".into(),
        path: "/api/chat?x=1".into(),
        headers: headers.clone(),
        body: Some("héllo wörld ✓".into()),
        body_base64: false,
        length: None,
    };
    app.send(&Frame::Request(sent.clone()));
    let got = match bridge.recv_request_scoped() {
        Frame::Request(r) => r,
        other => panic!("bridge expected the request, got {other:?}"),
    };
    // The app socket's number: relay-wide, so not known here, but never the app's own.
    let conn = got.conn;
    assert!(conn.is_some_and(|n| n != u64::MAX), "{got:?}");
    assert_eq!(
        got,
        RequestFrame { client: Some(client.client_id.clone()), conn, ..sent },
        "the bridge must get the request unchanged except client and conn stamped"
    );
    let mut resp_headers = Headers::new();
    resp_headers.insert("content-type".into(), "application/json".into());
    bridge.send(&Frame::Response(ResponseFrame {
        id: "req-1".into(),
        client: Some(client.client_id.clone()),
        conn,
        status: 201,
        headers: resp_headers.clone(),
        body: r#"{"answer":"ok ✓"}"#.into(),
        body_base64: false,
    }));
    let frames = app.recv_until_terminal("req-1");
    assert_eq!(
        frames,
        vec![Frame::Response(ResponseFrame {
            id: "req-1".into(),
            client: None,
            conn: None,
            status: 201,
            headers: resp_headers,
            body: r#"{"answer":"ok ✓"}"#.into(),
            body_base64: false,
        })]
    );

    // a response.error from the bridge reaches the app with the client stripped; one without
    // `conn` (an older bridge) is routed by client and id alone
    app.send(&req("req-2", "GET", "/api/x", None));
    let Frame::Request(r2) = bridge.recv_request_scoped() else { panic!("expected request") };
    assert_eq!(r2.client.as_deref(), Some(client.client_id.as_str()));
    assert_eq!(r2.conn, conn, "one number per socket");
    bridge.send(&Frame::error("req-2", Some(&client.client_id), ErrorCode::BackendTimeout, "slow"));
    let f = app.recv();
    assert_response_error(&f, "req-2", ErrorCode::BackendTimeout);

    // a streamed upload: request.start and request.chunk are stamped like a request (the
    // spoofed client overwritten), request.ack reaches the app without client and ends nothing
    let spoof = Some("hcl_00000000000000ff".to_owned());
    let Frame::Request(head) = req("up-1", "POST", "/api/raw", None) else { unreachable!() };
    let head = RequestFrame { client: spoof.clone(), length: Some(6), ..head };
    app.send(&Frame::RequestStart(head.clone()));
    let stamped = Some(client.client_id.clone());
    let want = RequestFrame { client: stamped.clone(), conn, ..head };
    assert_eq!(bridge.recv_request_scoped(), Frame::RequestStart(want));
    let chunk_of = |id: &str, client: Option<String>, conn| Frame::RequestChunk {
        id: id.into(),
        client,
        conn,
        body: "abcdef".into(),
        body_base64: false,
    };
    let chunk = |client, conn| chunk_of("up-1", client, conn);
    app.send(&chunk(spoof.clone(), Some(0)));
    assert_eq!(bridge.recv_request_scoped(), chunk(stamped.clone(), conn));
    bridge.send(&Frame::RequestAck { id: "up-1".into(), client: stamped.clone(), conn, bytes: 6 });
    assert_eq!(
        app.recv(),
        Frame::RequestAck { id: "up-1".into(), client: None, conn: None, bytes: 6 }
    );
    bridge.send(&Frame::ResponseEnd { id: "up-1".into(), client: stamped.clone(), conn });
    assert_eq!(app.recv(), Frame::ResponseEnd { id: "up-1".into(), client: None, conn: None });
    // a chunk for a request that ended (or never began) is dropped: the next request is the
    // next thing the bridge sees
    app.send(&chunk(None, None));
    app.send(&chunk_of("never", None, None));
    app.send(&req("req-3", "GET", "/api/x", None));
    match bridge.recv_request_scoped() {
        Frame::Request(r) => assert_eq!(r.id, "req-3"),
        other => panic!("a chunk of no open request reached the bridge: {other:?}"),
    }
    bridge.send(&Frame::error("req-3", stamped.as_deref(), ErrorCode::BackendTimeout, "slow"));
    assert_response_error(&app.recv(), "req-3", ErrorCode::BackendTimeout);
    // a chunk the bridge could not read is a bad frame at the relay
    app.send_text(r#"{"type":"request.chunk","id":"up-1","body":5}"#);
    assert_bad_frame(&app.recv());
    app.send_text(r#"{"type":"request.chunk","id":"up-1","body":"","bodyBase64":"yes"}"#);
    assert_bad_frame(&app.recv());

    // app leaves → client.disconnected
    app.close();
    assert_eq!(bridge.recv(), Frame::ClientDisconnected { client: client.client_id.clone() });

    // SIGTERM → clean exit 0
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0), "relay exit status on SIGTERM");

    // logs: JSON lines, nothing on stdout, no secret anywhere
    let logs = relay.logs();
    assert!(!logs.is_empty());
    for line in &logs {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(v.is_object() && v["event"].is_string(), "log line: {line}");
        assert!(v.get("ts").is_some(), "log line without ts: {line}");
    }
    assert_eq!(relay.stdout_lines(), Vec::<String>::new(), "stdout must stay empty");
    relay.assert_no_secret_in_logs(&[
        &reg.relay_secret,
        &reg.relay_secret[4..],
        &client.client_secret,
        &client.client_secret[4..],
        &code.access_code,
    ]);
}

#[test]
fn base64_binary_round_trip_is_byte_exact() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    for (i, len) in [0usize, 1, 2, 3, 1000, 1 << 20, 3 << 20].into_iter().enumerate() {
        let bytes = random_bytes(len);
        let id = format!("bin-{i}");
        let r = response(p.app.request(&req_b64(&id, "/api/upload", &bytes)));
        assert!(r.body_base64, "echo must keep bodyBase64");
        let back = unb64(&r.body);
        assert_eq!(back.len(), bytes.len());
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&bytes),
            "binary body changed on the way (len {len})"
        );
    }
    // The bridge saw the exact base64 text too.
    let reqs = p.bridge.requests();
    assert_eq!(reqs.len(), 7);
    assert!(reqs.iter().all(|r| r.body_base64));
}

#[test]
fn streamed_chunks_arrive_in_order() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    p.app.send(&req("s1", "GET", "/api/stream?n=200", None));
    let frames = p.app.recv_until_terminal("s1");
    assert_eq!(frames.len(), 202, "start + 200 chunks + end");
    match &frames[0] {
        Frame::ResponseStart { id, client, conn, status, headers } => {
            assert_eq!((id.as_str(), *status, client, conn), ("s1", 200, &None, &None));
            assert_eq!(headers["content-type"], "text/event-stream");
        }
        other => panic!("first frame {other:?}"),
    }
    let mut body = String::new();
    for f in &frames[1..201] {
        match f {
            Frame::ResponseChunk { id, client, conn, body: b, .. } => {
                assert_eq!((id.as_str(), client, conn), ("s1", &None, &None));
                body.push_str(b);
            }
            other => panic!("expected chunk, got {other:?}"),
        }
    }
    let want: String = (0..200).map(|i| format!("chunk-{i};")).collect();
    assert_eq!(body, want, "chunks out of order or lost");
    assert_eq!(frames[201], Frame::ResponseEnd { id: "s1".into(), client: None, conn: None });
}

#[test]
fn interleaved_requests_are_routed_by_id() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    for i in 0..20 {
        p.app.send(&req(&format!("m{i}"), "POST", "/api/echo", Some(&format!("body{i}"))));
    }
    for i in (0..20).rev() {
        let r = response(p.app.recv_until_terminal(&format!("m{i}")).pop().unwrap());
        assert_eq!(r.body, format!("body{i}"));
    }
}

#[test]
fn cancel_reaches_bridge_with_client_stamped() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    p.app.send(&req("c1", "GET", "/api/hang", None));
    p.bridge.wait_requests(1);
    // The app may try to spoof `client` and `conn` on a cancel too.
    let spoof = Some("hcl_00000000000000ff".to_owned());
    p.app.send(&Frame::Cancel { id: "c1".into(), client: spoof, conn: Some(u64::MAX) });
    let Frame::Request(r) = p.bridge.wait_for("request", |f| matches!(f, Frame::Request(_))) else {
        unreachable!()
    };
    let cancel = p.bridge.wait_for("cancel", |f| matches!(f, Frame::Cancel { .. }));
    let client = Some(p.client.client_id.clone());
    assert!(r.conn.is_some_and(|n| n != u64::MAX), "{r:?}");
    assert_eq!(cancel, Frame::Cancel { id: "c1".into(), client, conn: r.conn });
    let f = p.app.recv();
    assert_response_error(&f, "c1", ErrorCode::Cancelled);
    p.app.assert_round_trip("after-cancel");
}

#[test]
fn revoke_closes_app_4003_and_reconnect_gets_401() {
    let relay = Relay::new();
    let api = relay.registry();
    let mut p = pair(&relay);
    let other = pair_another(&relay, &p.reg, "Other Phone");
    let mut app2 = AppClient::connect_ok(&relay, &p.reg.bridge_id, &other.client_secret, true);

    let (s, v) = api.revoke(&p.reg.bridge_id, &p.reg.relay_secret, &p.client.client_id);
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.app.wait_close(), Some(4003), "revoked app close code");
    expect_refused(
        AppClient::connect(&relay, &p.reg.bridge_id, &p.client.client_secret),
        &[401],
        "revoked clientSecret on /ws/app",
    );
    // bridge-status with the revoked secret no longer sees the bridge
    let (s, v) = api.bridge_status(&p.reg.bridge_id, Some(&p.client.client_secret));
    assert_eq!((s, &v), (200, &json!({"hasBridge": false, "online": false})));
    // the list no longer has it, the other app is untouched
    let (s, v) = api.clients(&p.reg.bridge_id, &p.reg.relay_secret);
    assert_eq!(s, 200);
    let ids: Vec<&str> =
        v["clients"].as_array().unwrap().iter().map(|c| c["clientId"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![other.client_id.as_str()]);
    app2.assert_round_trip("still-here");
    // revoking an unknown client
    let r = api.revoke(&p.reg.bridge_id, &p.reg.relay_secret, "hcl_0000000000000000");
    assert_api_error(&r, 404, "CLIENT_NOT_FOUND");
}

#[test]
fn delete_closes_both_sockets_4003_and_forgets_the_bridge() {
    let relay = Relay::new();
    let api = relay.registry();
    let mut p = pair(&relay);
    let (s, v) = api.delete(&p.reg.bridge_id, &p.reg.relay_secret);
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.app.wait_close(), Some(4003), "app close code on delete");
    assert_eq!(p.bridge.wait_closed(), Some(4003), "bridge close code on delete");

    let (s, v) = api.bridge_status(&p.reg.bridge_id, Some(&p.reg.relay_secret));
    assert_eq!((s, &v), (200, &json!({"hasBridge": false, "online": false})));
    let code = api.access_code(&p.reg.bridge_id, &p.reg.relay_secret);
    assert!(code.0 == 401 || code.0 == 404, "access-code after delete: {code:?}");
    assert_api_error(&api.verify(&p.reg.bridge_id, &"0".repeat(32), None), 404, "BRIDGE_NOT_FOUND");
    expect_refused(
        BridgePeer::connect(&relay, &p.reg.bridge_id, &p.reg.relay_secret, "inst-1"),
        &[401, 404],
        "deleted bridge on /ws/bridge",
    );
    expect_refused(
        AppClient::connect(&relay, &p.reg.bridge_id, &p.client.client_secret),
        &[401, 404],
        "client of a deleted bridge on /ws/app",
    );
}

// =============================================================================================
// Registry errors (§3)

#[test]
fn verify_error_codes() {
    let relay = Relay::new();
    let api = relay.registry();
    let reg = api.register_ok("B");

    // unknown bridge
    assert_api_error(&api.verify(UNKNOWN_BRIDGE, &"a".repeat(32), None), 404, "BRIDGE_NOT_FOUND");
    // no code issued yet
    assert_api_error(
        &api.verify(&reg.bridge_id, &"a".repeat(32), None),
        401,
        "ACCESS_CODE_INVALID",
    );
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    // wrong code
    let mut wrong = code.access_code.clone();
    wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
    assert_api_error(&api.verify(&reg.bridge_id, &wrong, None), 401, "ACCESS_CODE_INVALID");
    // right code once, then used
    api.verify_ok(&reg.bridge_id, &code.access_code, "P1");
    assert_api_error(&api.verify(&reg.bridge_id, &code.access_code, None), 409, "ACCESS_CODE_USED");
    // a new code replaces the old one
    let c1 = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    let c2 = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    assert_ne!(c1.access_code, c2.access_code);
    assert_api_error(
        &api.verify(&reg.bridge_id, &c1.access_code, None),
        401,
        "ACCESS_CODE_INVALID",
    );
    let v = api.verify_ok(&reg.bridge_id, &c2.access_code, "P2");
    assert!(is_client_secret(&v.client_secret));
}

#[test]
fn access_code_expires() {
    let relay = Relay::start(&["--code-ttl-secs", "1"]);
    let api = relay.registry();
    let reg = api.register_ok("B");
    let before = now_ms();
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    let ttl = code.expires_at as i64 - before as i64;
    assert!((500..=1500).contains(&ttl), "expiresAt {ttl} ms ahead");
    std::thread::sleep(Duration::from_millis(1300));
    assert_api_error(
        &api.verify(&reg.bridge_id, &code.access_code, None),
        410,
        "ACCESS_CODE_EXPIRED",
    );
    // a fresh code works
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    api.verify_ok(&reg.bridge_id, &code.access_code, "P");
}

/// libfaketime's preload library (Debian/Ubuntu package `faketime`), if installed.
fn libfaketime() -> Option<std::path::PathBuf> {
    let multiarch = std::fs::read_dir("/usr/lib").ok()?.flatten().map(|e| e.path());
    multiarch
        .chain([std::path::PathBuf::from("/usr/lib")])
        .map(|dir| dir.join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists())
}

/// True when the ELF file at `path` names a dynamic loader (`PT_INTERP`): a preload library
/// such as libfaketime reaches only such a binary, not the static release build.
fn dynamically_linked(path: &str) -> bool {
    let Ok(elf) = std::fs::read(path) else { return false };
    let field = |at: usize, len: usize| -> Option<usize> {
        let bytes = elf.get(at..at + len)?;
        Some(bytes.iter().rev().fold(0usize, |n, &b| n << 8 | usize::from(b)))
    };
    // ELF32 or ELF64 (little-endian, as on every target we build): where the program headers
    // are, how large each is, how many.
    let (phoff, phentsize, phnum) = match elf.get(4) {
        Some(1) => (field(0x1c, 4), field(0x2a, 2), field(0x2c, 2)),
        Some(2) => (field(0x20, 8), field(0x36, 2), field(0x38, 2)),
        _ => return false,
    };
    let (Some(phoff), Some(size), Some(count)) = (phoff, phentsize, phnum) else { return false };
    const PT_INTERP: usize = 3;
    (0..count).any(|i| field(phoff + i * size, 4) == Some(PT_INTERP))
}

#[test]
fn a_wall_clock_set_back_withdraws_the_access_codes_it_would_prolong() {
    let Some(lib) = libfaketime() else {
        eprintln!("skipped: libfaketime is not installed (apt-get install faketime)");
        return;
    };
    if !dynamically_linked(bin_path()) {
        eprintln!("skipped: {} is statically linked, out of libfaketime's reach", bin_path());
        return;
    }
    // The relay's wall clock follows this file; its monotonic clock is left alone, as a real
    // clock step leaves it.
    let offset = fresh_dir("faketime").join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let relay = Relay::start_env("127.0.0.1:0", &env, &[]);
    let api = relay.registry();
    let reg = api.register_ok("B");
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    api.probe_client_ok(&reg.bridge_id, &reg.relay_secret);
    // An hour back: the 10-minute code would pair for 70 minutes.
    std::fs::write(&offset, "-1h\n").unwrap();
    let step = relay.wait_event("clock.stepped_back", "after the step", |_| true);
    let secs: u64 = step["secs"].as_str().unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&secs), "{step}");
    let withdrawn = relay.wait_event("codes.withdrawn", "after the step", |_| true);
    assert_eq!((&withdrawn["accessCodes"], &withdrawn["probeClients"]), (&json!("1"), &json!("1")));
    assert_api_error(
        &api.verify(&reg.bridge_id, &code.access_code, None),
        410,
        "ACCESS_CODE_EXPIRED",
    );
    // A code issued after the step lives its full lifetime.
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    api.verify_ok(&reg.bridge_id, &code.access_code, "P");
}

#[test]
fn five_wrong_codes_burn_the_code() {
    let relay = Relay::new();
    let api = relay.registry();
    let reg = api.register_ok("B");
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    for i in 0..5 {
        let wrong = format!("{:032x}", 0xdead_0000u64 + i);
        assert_ne!(wrong, code.access_code);
        let r = api.verify(&reg.bridge_id, &wrong, None);
        if i < 4 {
            assert_api_error(&r, 401, "ACCESS_CODE_INVALID");
        } else {
            // the fifth wrong code may already say TOO_MANY_ATTEMPTS
            assert!(
                (r.0 == 401 && r.1["error"]["code"] == "ACCESS_CODE_INVALID")
                    || (r.0 == 429 && r.1["error"]["code"] == "TOO_MANY_ATTEMPTS"),
                "fifth wrong code: {r:?}"
            );
        }
    }
    assert_api_error(
        &api.verify(&reg.bridge_id, &code.access_code, None),
        429,
        "TOO_MANY_ATTEMPTS",
    );
    // another bridge is not affected
    let reg2 = api.register_ok("B2");
    let code2 = api.access_code_ok(&reg2.bridge_id, &reg2.relay_secret);
    api.verify_ok(&reg2.bridge_id, &code2.access_code, "P");
}

#[test]
fn registry_unauthorized() {
    let mut relay = Relay::new();
    let api = relay.registry();
    let a = api.register_ok("A");
    let b = api.register_ok("B");
    let code = api.access_code_ok(&a.bridge_id, &a.relay_secret);
    let client = api.verify_ok(&a.bridge_id, &code.access_code, "P");
    let bogus = format!("hrs_{}", "0".repeat(64));

    let bad_tokens: Vec<(Option<&str>, &str)> = vec![
        (None, "no token"),
        (Some(bogus.as_str()), "bogus relaySecret"),
        (Some(b.relay_secret.as_str()), "other bridge's relaySecret"),
        (Some(client.client_secret.as_str()), "a clientSecret"),
    ];
    for (tok, what) in bad_tokens {
        let body = json!({"bridgeId": a.bridge_id});
        let calls: Vec<(&str, (u16, Value))> = vec![
            ("access-code", api.call("POST", "/v1/bridge/access-code", tok, Some(&body))),
            (
                "clients",
                api.call("GET", &format!("/v1/bridge/clients?bridgeId={}", a.bridge_id), tok, None),
            ),
            (
                "revoke",
                api.call(
                    "POST",
                    "/v1/bridge/clients/revoke",
                    tok,
                    Some(&json!({"bridgeId": a.bridge_id, "clientId": client.client_id})),
                ),
            ),
            ("probe-client", api.call("POST", "/v1/bridge/probe-client", tok, Some(&body))),
            ("delete", api.call("POST", "/v1/bridge/delete", tok, Some(&body))),
        ];
        for (route, r) in calls {
            assert_eq!(
                (r.0, r.1["error"]["code"].as_str()),
                (401, Some("UNAUTHORIZED")),
                "{route} with {what}: {:?}",
                r
            );
        }
    }
    // nothing was changed by the refused calls
    let (s, v) = api.clients(&a.bridge_id, &a.relay_secret);
    assert_eq!(s, 200);
    assert_eq!(v["clients"].as_array().unwrap().len(), 1, "{v}");
    let (s, v) = api.bridge_status(&a.bridge_id, Some(&a.relay_secret));
    assert_eq!((s, v["hasBridge"].as_bool()), (200, Some(true)));
    relay.stop_and_check_logs(&[
        &a.relay_secret,
        &b.relay_secret,
        &client.client_secret,
        &code.access_code,
    ]);
}

#[test]
fn registry_generic_errors() {
    let relay = Relay::new();
    let api = relay.registry();
    let r = api.call_full("GET", "/v1/nope", None, None);
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{}", r.raw);
    let r = api.call_full("GET", "/v1/bridge/register", None, None);
    assert_eq!((r.status, r.code()), (405, "METHOD_NOT_ALLOWED"), "{}", r.raw);
    let r = api.post_raw("/v1/pair/verify", None, "{not json");
    assert_eq!((r.status, r.code()), (400, "BAD_REQUEST"), "{}", r.raw);
    let r = api.post_raw("/v1/pair/verify", None, r#"{"bridgeId":"xyz","accessCode":5}"#);
    assert_eq!(r.status, 400, "{}", r.raw);
    // the relay still serves
    assert_eq!(api.health().0, 200);
}

#[test]
fn register_rate_limited_per_ip() {
    let relay = Relay::start(&["--rate-register", "3"]);
    let api = relay.registry();
    for _ in 0..3 {
        api.register_ok("B");
    }
    assert_api_error(&api.register(Some("B")), 429, "RATE_LIMITED");
    // other routes are unaffected
    assert_eq!(api.health().0, 200);
}

#[test]
fn verify_rate_limited_per_ip() {
    let relay = Relay::start(&["--rate-verify", "3"]);
    let api = relay.registry();
    for _ in 0..3 {
        assert_api_error(
            &api.verify(UNKNOWN_BRIDGE, &"a".repeat(32), None),
            404,
            "BRIDGE_NOT_FOUND",
        );
    }
    assert_api_error(&api.verify(UNKNOWN_BRIDGE, &"a".repeat(32), None), 429, "RATE_LIMITED");
}

#[test]
fn concurrent_verifies_yield_exactly_one_secret() {
    let mut relay = Relay::new();
    let api = relay.registry();
    let reg = api.register_ok("B");
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    let n = 12;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (url, bid, code, barrier) =
                (relay.url(), reg.bridge_id.clone(), code.access_code.clone(), barrier.clone());
            std::thread::spawn(move || {
                let api = Registry::new(&url);
                barrier.wait();
                api.verify(&bid, &code, Some(&format!("phone-{i}")))
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    assert_eq!(ok.len(), 1, "exactly one verify must win: {results:?}");
    for r in results.iter().filter(|r| r.0 != 200) {
        assert_api_error(r, 409, "ACCESS_CODE_USED");
    }
    let (_, v) = api.clients(&reg.bridge_id, &reg.relay_secret);
    assert_eq!(v["clients"].as_array().unwrap().len(), 1, "{v}");
    let winner = ok[0].1["clientSecret"].as_str().unwrap();
    relay.stop_and_check_logs(&[&reg.relay_secret, winner, &code.access_code]);
}

#[test]
fn bridge_status_never_an_oracle() {
    let relay = Relay::new();
    let api = relay.registry();
    let a = api.register_ok("A");
    let b = api.register_ok("B");
    let code = api.access_code_ok(&a.bridge_id, &a.relay_secret);
    let client = api.verify_ok(&a.bridge_id, &code.access_code, "P");
    let code_b = api.access_code_ok(&b.bridge_id, &b.relay_secret);
    let client_b = api.verify_ok(&b.bridge_id, &code_b.access_code, "PB");
    let none = json!({"hasBridge": false, "online": false});

    let st = |tok: Option<&str>| api.bridge_status(&a.bridge_id, tok);
    assert_eq!(st(Some(&a.relay_secret)), (200, json!({"hasBridge": true, "online": false})));
    assert_eq!(st(Some(&client.client_secret)), (200, json!({"hasBridge": true, "online": false})));
    assert_eq!(st(None), (200, none.clone()), "no token");
    assert_eq!(st(Some("garbage")), (200, none.clone()), "wrong token");
    assert_eq!(st(Some(&b.relay_secret)), (200, none.clone()), "other bridge's secret");
    assert_eq!(st(Some(&client_b.client_secret)), (200, none.clone()), "other bridge's client");
    assert_eq!(
        api.bridge_status(UNKNOWN_BRIDGE, Some(&a.relay_secret)),
        (200, none.clone()),
        "unknown bridge"
    );
    assert_eq!(api.bridge_status("not-even-hex", None), (200, none.clone()), "malformed bridgeId");

    let bridge = BridgePeer::connect_ok(&relay, &a.bridge_id, &a.relay_secret, "i").serve();
    api.wait_bridge_online(&a.bridge_id, &a.relay_secret, true);
    assert_eq!(st(Some(&client.client_secret)), (200, json!({"hasBridge": true, "online": true})));
    assert_eq!(st(Some("garbage")), (200, none.clone()));
    bridge.kill();
    api.wait_bridge_online(&a.bridge_id, &a.relay_secret, false);
}

#[test]
fn probe_client_works_and_is_not_listed() {
    let mut relay = Relay::new();
    let api = relay.registry();
    let mut p = pair(&relay);
    let code = api.access_code_ok(&p.reg.bridge_id, &p.reg.relay_secret);
    let before = now_ms();
    let probe = api.probe_client_ok(&p.reg.bridge_id, &p.reg.relay_secret);
    assert!(is_client_id(&probe.client_id));
    assert!(is_client_secret(&probe.client_secret));
    let ttl = probe.expires_at as i64 - before as i64;
    assert!((295_000..=305_000).contains(&ttl), "probe ttl {ttl} ms");

    let mut probe_app = AppClient::connect_ok(&relay, &p.reg.bridge_id, &probe.client_secret, true);
    probe_app.assert_round_trip("probe-1");
    let f =
        p.bridge.wait_for("probe request", |f| matches!(f, Frame::Request(r) if r.id == "probe-1"));
    let Frame::Request(r) = f else { unreachable!() };
    assert_eq!(r.client.as_deref(), Some(probe.client_id.as_str()));

    let (s, v) = api.clients(&p.reg.bridge_id, &p.reg.relay_secret);
    assert_eq!(s, 200);
    let ids: Vec<&str> =
        v["clients"].as_array().unwrap().iter().map(|c| c["clientId"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![p.client.client_id.as_str()], "probe must not be listed");
    // the current access code is untouched
    let later = api.verify_ok(&p.reg.bridge_id, &code.access_code, "After Probe");
    p.app.assert_round_trip("main-still-ok");
    relay.stop_and_check_logs(&[
        &p.reg.relay_secret,
        &p.client.client_secret,
        &probe.client_secret,
        &later.client_secret,
        &code.access_code,
    ]);
}

#[test]
fn devices_list_shows_online_state() {
    let relay = Relay::new();
    let api = relay.registry();
    let p = pair(&relay);
    let before = now_ms();
    let (s, v) = api.clients(&p.reg.bridge_id, &p.reg.relay_secret);
    assert_eq!(s, 200, "{v}");
    let list: protocol::ClientsResponse = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(list.clients.len(), 1, "{v}");
    let c = &list.clients[0];
    assert_eq!(c.client_id, p.client.client_id);
    assert_eq!(c.device_name, "Test Phone");
    assert!(c.online, "app is connected: {v}");
    assert!(c.paired_at <= before && c.paired_at + 60_000 > before, "{v}");

    p.app.close();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, v) = api.clients(&p.reg.bridge_id, &p.reg.relay_secret);
        if v["clients"][0]["online"] == false {
            assert!(v["clients"][0]["lastSeenAt"].is_u64(), "lastSeenAt after disconnect: {v}");
            break;
        }
        assert!(Instant::now() < deadline, "client never went offline: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// =============================================================================================
// WebSocket refusals (§4)

#[test]
fn ws_role_and_bridge_refusals() {
    let mut relay = Relay::new();
    let api = relay.registry();
    let a = api.register_ok("A");
    let b = api.register_ok("B");
    let ca = api.access_code_ok(&a.bridge_id, &a.relay_secret);
    let client_a = api.verify_ok(&a.bridge_id, &ca.access_code, "PA");

    expect_refused(
        BridgePeer::connect(&relay, &a.bridge_id, &client_a.client_secret, "x"),
        &[401],
        "clientSecret on /ws/bridge",
    );
    expect_refused(
        AppClient::connect(&relay, &a.bridge_id, &a.relay_secret),
        &[401],
        "relaySecret on /ws/app",
    );
    expect_refused(
        AppClient::connect(&relay, &b.bridge_id, &client_a.client_secret),
        &[401, 404],
        "app of bridge A asking for bridge B",
    );
    expect_refused(
        BridgePeer::connect(&relay, &a.bridge_id, &b.relay_secret, "x"),
        &[401],
        "relaySecret of B on bridge A",
    );
    expect_refused(
        BridgePeer::connect(&relay, UNKNOWN_BRIDGE, &a.relay_secret, "x"),
        &[404],
        "unknown bridge on /ws/bridge",
    );
    expect_refused(
        AppClient::connect(&relay, UNKNOWN_BRIDGE, &client_a.client_secret),
        &[401, 404],
        "unknown bridge on /ws/app",
    );
    // no Authorization at all
    expect_refused(ws_connect(&relay.app_ws_url(&a.bridge_id), &[]), &[401], "no token on /ws/app");
    expect_refused(
        ws_connect(&relay.bridge_ws_url(&a.bridge_id), &[("X-Hermes-Instance", "x")]),
        &[401],
        "no token on /ws/bridge",
    );
    // the legitimate pair still works after all that
    let _bridge = BridgePeer::connect_ok(&relay, &a.bridge_id, &a.relay_secret, "i").serve();
    api.wait_bridge_online(&a.bridge_id, &a.relay_secret, true);
    let mut app = AppClient::connect_ok(&relay, &a.bridge_id, &client_a.client_secret, true);
    app.assert_round_trip("ok");
    relay.stop_and_check_logs(&[
        &a.relay_secret,
        &b.relay_secret,
        &client_a.client_secret,
        &ca.access_code,
    ]);
}

/// A refused upgrade's access line names the bridge it was for (401, 404, 409; never a
/// token); a malformed bridgeId is not logged.
#[test]
fn refused_upgrades_name_their_bridge_in_the_log() {
    let relay = Relay::new();
    let p = pair(&relay);
    let refused = |status: &'static str, bridge: &str| {
        let bridge = bridge.to_owned();
        relay.wait_event("http", &format!("{status} for {bridge}"), move |v| {
            v["status"] == status && v["bridge"] == bridge.as_str()
        })
    };
    let wrong = format!("Bearer hcs_{}", "0".repeat(64));
    let url = relay.app_ws_url(&p.reg.bridge_id);
    expect_refused(ws_connect(&url, &[("Authorization", &wrong)]), &[401], "a wrong token");
    refused("401", &p.reg.bridge_id);
    expect_refused(
        AppClient::connect(&relay, UNKNOWN_BRIDGE, &p.client.client_secret),
        &[401, 404],
        "unknown bridge on /ws/app",
    );
    refused("404", UNKNOWN_BRIDGE);
    expect_refused(
        BridgePeer::connect(&relay, &p.reg.bridge_id, &p.reg.relay_secret, "inst-2"),
        &[409],
        "second instance",
    );
    refused("409", &p.reg.bridge_id);
    let garbled = format!("ws://{}/ws/app?bridgeId=zz{}", relay.addr, p.reg.bridge_id);
    expect_refused(ws_connect(&garbled, &[]), &[400], "a malformed bridgeId");
    let line = relay.wait_event("http", "400 for the malformed bridgeId", |v| v["status"] == "400");
    assert!(line.get("bridge").is_none(), "{line}");
    relay.assert_no_secret_in_logs(&[&p.client.client_secret, &p.reg.relay_secret, &wrong[7..]]);
}

/// Opens `/ws/app` of `bridge` with a wrong token (the `n`th) as the client `from` (behind a
/// trusted proxy) over a raw connection, and returns the status the relay answered.
fn wrong_token_upgrade(relay: &Relay, bridge: &str, from: &str, n: usize) -> String {
    let request = format!(
        "GET /ws/app?bridgeId={bridge} HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer hcs_{n:064x}\r\nX-Forwarded-For: {from}\r\n\r\n"
    );
    let answer = raw_exchange(&relay.addr, request.as_bytes(), RECV_TIMEOUT);
    String::from_utf8_lossy(answer.get(9..12).unwrap_or_default()).into_owned()
}

/// A flood of refused upgrades from one client writes a few access lines, then only counts:
/// one `http.suppressed` line a minute (here at shutdown, which tells what it left out). The
/// client's successful requests, and another client's refusals, are still logged.
#[test]
fn a_refusal_flood_writes_a_few_lines_per_source_and_counts_the_rest() {
    let mut relay = Relay::start(&["--trust-proxy"]);
    let bridge = relay.registry().register_ok("flooded").bridge_id;
    for n in 0..200 {
        assert_eq!(wrong_token_upgrade(&relay, &bridge, "203.0.113.5", n), "401");
    }
    for n in 0..2 {
        assert_eq!(wrong_token_upgrade(&relay, &bridge, "10.0.0.1, 198.51.100.7", n), "401");
    }
    let api = relay.registry();
    let ok = api.call_with_headers(
        "GET",
        "/v1/health",
        None,
        &[("X-Forwarded-For", "203.0.113.5")],
        None,
    );
    assert_eq!(ok.status, 200);
    relay.wait_event("http", "for the health check", |v| v["path"] == "/v1/health");
    relay.stop_and_check_logs(&[]);
    let lines = relay.events("http");
    let refused = |ip: &str| -> Vec<&Value> {
        lines.iter().filter(|v| v["ip"] == ip && v["status"] == "401").collect()
    };
    let flooder = refused("203.0.113.5");
    assert_eq!(
        flooder.len(),
        5,
        "401 lines of the flooding client; the first: {:?}",
        flooder.first()
    );
    assert!(
        flooder[4]["more"].as_str().is_some_and(|m| m.contains("http.suppressed")),
        "{}",
        flooder[4]
    );
    assert_eq!(refused("198.51.100.7").len(), 2, "another client's refusals are its own");
    let suppressed = relay.events("http.suppressed");
    assert_eq!(suppressed.len(), 1, "{suppressed:?}");
    let want = json!({"ip": "203.0.113.5", "suppressed": "195", "statuses": "401:195"});
    for field in ["ip", "suppressed", "statuses"] {
        assert_eq!(suppressed[0][field], want[field], "{}", suppressed[0]);
    }
}

#[test]
fn second_bridge_instance_409_same_instance_replaces_4001() {
    let relay = Relay::new();
    let api = relay.registry();
    let mut p = pair(&relay);

    let s = expect_refused(
        BridgePeer::connect(&relay, &p.reg.bridge_id, &p.reg.relay_secret, "inst-2"),
        &[409],
        "second instance",
    );
    assert_eq!(s, 409);
    p.app.assert_round_trip("still-first");

    // same instance replaces: old closed 4001, new one serves
    let newer =
        BridgePeer::connect_ok(&relay, &p.reg.bridge_id, &p.reg.relay_secret, "inst-1").serve();
    assert_eq!(p.bridge.wait_closed(), Some(4001), "replaced bridge close code");
    // the app may see offline/online flaps around the swap; skip bridge.status frames
    let mut id = 0;
    loop {
        id += 1;
        let rid = format!("after-replace-{id}");
        p.app.send(&req(&rid, "POST", "/api/echo", Some("x")));
        let frames = p.app.recv_until_terminal(&rid);
        if let Some(Frame::Response(r)) = frames.last() {
            assert_eq!(r.body, "x");
            break;
        }
        assert!(id < 20, "no round trip through the replacing bridge: {frames:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(newer.requests().iter().any(|r| r.id.starts_with("after-replace")));

    // once the owner is gone, another instance may take over
    newer.kill();
    api.wait_bridge_online(&p.reg.bridge_id, &p.reg.relay_secret, false);
    let _third =
        BridgePeer::connect_ok(&relay, &p.reg.bridge_id, &p.reg.relay_secret, "inst-3").serve();
}

#[test]
fn second_app_socket_replaces_4002() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    let mut app2 = AppClient::connect_ok(&relay, &p.reg.bridge_id, &p.client.client_secret, true);
    let (code, _) = ws_wait_close(&mut p.app.ws, RECV_TIMEOUT);
    assert_eq!(code, Some(4002), "replaced app close code");
    app2.assert_round_trip("replacement");
}

/// Each `ws.close` line says the close code and who closed: the relay (with its reason), the
/// peer, or nobody (the connection dropped: 1006). A replaced socket, a revoked one, a peer's
/// close and a crash no longer look alike.
#[test]
fn ws_close_lines_carry_the_code_and_who_closed() {
    let relay = Relay::new();
    let api = relay.registry();
    let mut p = pair(&relay);
    let closed = |client: &str, code: &'static str, by: &'static str| {
        let client = client.to_owned();
        relay.wait_event("ws.close", &format!("{code} by {by}"), move |v| {
            v["client"] == client.as_str() && v["code"] == code && v["by"] == by
        })
    };
    // Replaced by a newer socket of the same app: 4002, the relay closed it.
    let app2 = AppClient::connect_ok(&relay, &p.reg.bridge_id, &p.client.client_secret, true);
    assert_eq!(p.app.wait_close(), Some(4002));
    let line = closed(&p.client.client_id, "4002", "relay");
    assert_eq!(line["role"], "app", "{line}");
    assert!(line["reason"].as_str().is_some_and(|r| r.contains("replaced")), "{line}");
    // The app closes itself (a close frame without a code: 1005).
    app2.close();
    closed(&p.client.client_id, "1005", "peer");
    // Revoked: 4003.
    let other = pair_another(&relay, &p.reg, "Other Phone");
    let mut app3 = AppClient::connect_ok(&relay, &p.reg.bridge_id, &other.client_secret, true);
    assert_eq!(api.revoke(&p.reg.bridge_id, &p.reg.relay_secret, &other.client_id).0, 200);
    assert_eq!(app3.wait_close(), Some(4003));
    closed(&other.client_id, "4003", "relay");
    // A bridge replaced by the same instance: 4001; the newer one crashes: 1006, nobody closed.
    let newer =
        BridgePeer::connect_ok(&relay, &p.reg.bridge_id, &p.reg.relay_secret, "inst-1").serve();
    assert_eq!(p.bridge.wait_closed(), Some(4001));
    let bridge = |code: &'static str, by: &'static str| {
        relay.wait_event("ws.close", &format!("bridge {code} by {by}"), |v| {
            v["role"] == "bridge" && v["code"] == code && v["by"] == by
        })
    };
    bridge("4001", "relay");
    newer.kill();
    bridge("1006", "none");
}

#[test]
fn ws_app_without_upgrade_is_426() {
    let relay = Relay::new();
    let api = relay.registry();
    let p = pair(&relay);
    let r = api.call_full(
        "GET",
        &format!("/ws/app?bridgeId={}", p.reg.bridge_id),
        Some(&p.client.client_secret),
        None,
    );
    assert_eq!((r.status, r.code()), (426, "UPGRADE_REQUIRED"), "{}", r.raw);
    // RFC 6455 §4.4: the refusal names the version the relay speaks, and is JSON like the rest.
    assert_eq!(r.header("sec-websocket-version"), Some("13"), "{}", r.raw);
    assert_eq!(r.header("cache-control"), Some("no-store"), "{}", r.raw);
    let r = api.call_full(
        "GET",
        &format!("/ws/bridge?bridgeId={}", p.reg.bridge_id),
        Some(&p.reg.relay_secret),
        None,
    );
    assert_eq!(r.status, 426, "/ws/bridge without upgrade: {}", r.raw);
}

// =============================================================================================
// Terminal frames when the bridge is missing or dies

#[test]
fn bridge_offline_answered_at_once() {
    let relay = Relay::new();
    let api = relay.registry();
    let reg = api.register_ok("B");
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    let client = api.verify_ok(&reg.bridge_id, &code.access_code, "P");
    let mut app = AppClient::connect_ok(&relay, &reg.bridge_id, &client.client_secret, false);
    let t = Instant::now();
    let f = app.request(&req("o1", "GET", "/api/x", None));
    assert_response_error(&f, "o1", ErrorCode::BridgeOffline);
    assert!(t.elapsed() < Duration::from_millis(500), "took {:?}", t.elapsed());

    // the bridge comes online → status change pushed to the app
    let _bridge = BridgePeer::connect_ok(&relay, &reg.bridge_id, &reg.relay_secret, "i").serve();
    app.expect_bridge_status(true);
    app.assert_round_trip("o2");
}

#[test]
fn killed_bridge_yields_bridge_disconnected_for_every_open_request() {
    let relay = Relay::new();
    let api = relay.registry();
    let mut p = pair(&relay);
    let ids: Vec<String> = (0..5).map(|i| format!("h{i}")).collect();
    for id in &ids {
        p.app.send(&req(id, "GET", "/api/hang", None));
    }
    p.bridge.wait_requests(5);
    p.bridge.kill();

    let mut errors = Vec::new();
    let mut offline = false;
    while errors.len() < ids.len() || !offline {
        match p.app.recv() {
            Frame::BridgeStatus { online: false } => offline = true,
            f @ Frame::ResponseError { .. } => {
                let id = f.request_id().unwrap().to_owned();
                assert_response_error(&f, &id, ErrorCode::BridgeDisconnected);
                errors.push(id);
            }
            other => panic!("unexpected frame after bridge death: {other:?}"),
        }
    }
    errors.sort();
    assert_eq!(errors, ids, "each open request gets exactly one BRIDGE_DISCONNECTED");
    p.app.expect_silence(Duration::from_millis(200));
    api.wait_bridge_online(&p.reg.bridge_id, &p.reg.relay_secret, false);

    // a new request now gets BRIDGE_OFFLINE
    let f = p.app.request(&req("after", "GET", "/api/x", None));
    assert_response_error(&f, "after", ErrorCode::BridgeOffline);

    // the bridge comes back (another instance is fine once the old one is dead)
    let _b =
        BridgePeer::connect_ok(&relay, &p.reg.bridge_id, &p.reg.relay_secret, "inst-2").serve();
    p.app.expect_bridge_status(true);
    p.app.assert_round_trip("back");
}

/// A socket that replaced another of the same app (4002) and reuses one of its request ids
/// gets only its own request's frames: the bridge's late frames for the old request carry the
/// old socket's `conn` and are dropped, a terminal one without closing the new request. A
/// frame without `conn` (an older bridge) is still routed by client and id.
#[test]
fn late_answers_for_a_replaced_socket_never_reach_the_new_one() {
    let relay = Relay::new();
    let (reg, mut bridge) = registered_bridge(&relay);
    let c = pair_another(&relay, &reg, "phone");
    let mut old = AppClient::connect_ok(&relay, &reg.bridge_id, &c.client_secret, true);
    assert!(matches!(bridge.recv(), Frame::ClientConnected { .. }));
    old.send(&req("R", "POST", "/api/echo", Some(r#"{"old":1}"#)));
    let Frame::Request(first) = bridge.recv_request_scoped() else { panic!("request expected") };

    let mut new = AppClient::connect_ok(&relay, &reg.bridge_id, &c.client_secret, true);
    assert_eq!(old.wait_close(), Some(protocol::close_code::REPLACED_APP));
    assert_eq!(bridge.recv(), Frame::ClientDisconnected { client: c.client_id.clone() });
    assert!(matches!(bridge.recv(), Frame::ClientConnected { .. }));
    new.send(&req("R", "GET", "/api/health", None));
    let Frame::Request(second) = bridge.recv_request_scoped() else { panic!("request expected") };
    assert_eq!(
        (first.client.as_ref(), second.client.as_ref()),
        (Some(&c.client_id), Some(&c.client_id))
    );
    assert!(first.conn.is_some() && second.conn.is_some() && first.conn != second.conn);

    // What the bridge had queued for the old R before it heard `client.disconnected`.
    let (client, conn) = (Some(c.client_id.clone()), first.conn);
    let id = || "R".to_owned();
    for f in [
        Frame::ResponseStart {
            id: id(),
            client: client.clone(),
            conn,
            status: 200,
            headers: Headers::new(),
        },
        Frame::ResponseChunk {
            id: id(),
            client: client.clone(),
            conn,
            body: "old".into(),
            body_base64: false,
        },
        Frame::ResponseEnd { id: id(), client: client.clone(), conn },
        Frame::ResponseError {
            id: id(),
            client: client.clone(),
            conn,
            code: ErrorCode::Cancelled,
            message: "x".into(),
        },
    ] {
        bridge.send(&f);
    }
    // Dropped, and the new R is still open: a duplicate is refused, nothing else arrives.
    new.send(&req("R", "GET", "/api/health", None));
    assert_bad_frame(&new.recv());
    new.expect_silence(Duration::from_millis(200));

    // The new R's own answer arrives, stripped of client and conn, and closes it.
    let answer = |conn| {
        Frame::Response(ResponseFrame {
            id: "R".into(),
            client: client.clone(),
            conn,
            status: 200,
            headers: Headers::new(),
            body: r#"{"status":"ok"}"#.into(),
            body_base64: false,
        })
    };
    bridge.send(&answer(second.conn));
    let got = response(new.recv());
    assert_eq!((got.body.as_str(), &got.client, got.conn), (r#"{"status":"ok"}"#, &None, None));
    bridge.send(&answer(second.conn));
    new.expect_silence(Duration::from_millis(200));

    // An older bridge (no `conn`) is routed by client and id, as before.
    new.send(&req("R", "GET", "/api/health", None));
    let Frame::Request(third) = bridge.recv_request_scoped() else { panic!("request expected") };
    assert_eq!(third.conn, second.conn, "one number per socket");
    bridge.send(&answer(None));
    assert_eq!(response(new.recv()).body, r#"{"status":"ok"}"#);
    // A malformed `conn` from a bridge is a bad frame.
    bridge
        .ws
        .send(tungstenite::Message::text(format!(
            r#"{{"type":"response.end","id":"R","client":"{}","conn":"1"}}"#,
            c.client_id
        )))
        .unwrap();
    assert_bad_frame(&bridge.recv());
}

#[test]
fn bridge_answers_are_routed_per_client_and_unknown_ids_dropped() {
    let relay = Relay::new();
    let (reg, mut bridge) = registered_bridge(&relay);
    let c1 = pair_another(&relay, &reg, "one");
    let c2 = pair_another(&relay, &reg, "two");
    let mut a1 = AppClient::connect_ok(&relay, &reg.bridge_id, &c1.client_secret, true);
    let mut a2 = AppClient::connect_ok(&relay, &reg.bridge_id, &c2.client_secret, true);
    a1.send(&req("same", "GET", "/api/1", None));
    a2.send(&req("same", "GET", "/api/2", None));
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Frame::Request(r) = bridge.recv_request_scoped() {
            got.push(r);
        }
    }
    got.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(got[0].client.as_deref(), Some(c1.client_id.as_str()));
    assert_eq!(got[1].client.as_deref(), Some(c2.client_id.as_str()));

    let answer = |client: &str, body: &str| {
        Frame::Response(ResponseFrame {
            id: "same".into(),
            client: Some(client.into()),
            conn: None,
            status: 200,
            headers: Headers::new(),
            body: body.into(),
            body_base64: false,
        })
    };
    // a frame for a request nobody has open, and one for an unknown client: dropped
    bridge.send(&Frame::Response(ResponseFrame {
        id: "nobody".into(),
        ..response(answer(&c1.client_id, "stray"))
    }));
    bridge.send(&answer("hcl_00000000000000ff", "stray"));
    // answer client two first
    bridge.send(&answer(&c2.client_id, "for two"));
    assert_eq!(response(a2.recv()).body, "for two");
    a1.expect_silence(Duration::from_millis(200));
    bridge.send(&answer(&c1.client_id, "for one"));
    assert_eq!(response(a1.recv()).body, "for one");
    // a second terminal frame for an id already answered is dropped as well
    bridge.send(&answer(&c1.client_id, "again"));
    a1.expect_silence(Duration::from_millis(200));
    a2.expect_silence(Duration::from_millis(10));
}

#[test]
fn busy_after_32_open_requests() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    for i in 0..32 {
        p.app.send(&req(&format!("b{i}"), "GET", "/api/hang", None));
    }
    p.bridge.wait_requests(32);
    let f = p.app.request(&req("b32", "GET", "/api/hang", None));
    assert_response_error(&f, "b32", ErrorCode::Busy);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(p.bridge.requests().len(), 32, "the BUSY request must not reach the bridge");

    // finishing one frees a slot
    p.app.send(&Frame::Cancel { id: "b0".into(), client: None, conn: None });
    let f = p.app.recv();
    assert_response_error(&f, "b0", ErrorCode::Cancelled);
    p.app.send(&req("b33", "GET", "/api/hang", None));
    p.bridge.wait_requests(33);
    // and a second app of the same bridge has its own budget
    let other = pair_another(&relay, &p.reg, "other");
    let mut app2 = AppClient::connect_ok(&relay, &p.reg.bridge_id, &other.client_secret, true);
    app2.assert_round_trip("other-app");
}

// =============================================================================================
// Bad input on the sockets

#[test]
fn bad_frames_get_bad_frame_and_socket_stays_open() {
    let relay = Relay::new();
    let mut p = pair(&relay);

    p.app.send_text("{not json");
    assert_bad_frame(&p.app.recv());
    p.app.send_text(r#"{"type":"teleport","id":"1"}"#);
    assert_bad_frame(&p.app.recv());
    p.app.send_text(r#"{"id":"1","method":"GET","path":"/api/x"}"#);
    assert_bad_frame(&p.app.recv());
    p.app.send_text("[]");
    assert_bad_frame(&p.app.recv());
    p.app.send_binary(&[0, 1, 2, 3, 0xff]);
    assert_bad_frame(&p.app.recv());
    // Values the relay forwards without decoding them are still checked as a decoder would:
    // a lone surrogate in a body or in an unknown field, a number out of range, a long body
    // with a control character in it.
    let request = |extra: &str| {
        format!(
            r#"{{"type":"request","id":"r","method":"GET","path":"/api/x","headers":{{}}{extra}}}"#
        )
    };
    for extra in [
        r#","body":"a\ud800b""#,
        r#","note":{"a":["\udc00"]}"#,
        r#","note":1e999"#,
        &format!(",\"body\":\"{}\u{1}\"", "QUFB".repeat(40)),
    ] {
        p.app.send_text(&request(extra));
        assert_bad_frame(&p.app.recv());
    }
    // a frame type the app may not send (a response) is not forwarded
    p.app.send(&Frame::Response(ResponseFrame {
        id: "x".into(),
        client: None,
        conn: None,
        status: 200,
        headers: Headers::new(),
        body: String::new(),
        body_base64: false,
    }));
    match p.app.next_event(Duration::from_millis(300)) {
        Event::Timeout => {}
        Event::Frame(f) => assert_bad_frame(&f),
        other => panic!("after an app-sent response: {other:?}"),
    }
    p.app.assert_round_trip("after-bad");
    assert!(
        p.bridge.requests().iter().all(|r| r.id == "after-bad"),
        "bad frames must not reach the bridge"
    );
    assert!(
        !p.bridge.seen().iter().any(|f| matches!(f, Frame::Response(_))),
        "an app-sent response must not reach the bridge"
    );
}

#[test]
fn bad_frames_from_the_bridge_get_bad_frame() {
    let relay = Relay::new();
    let (reg, mut bridge) = registered_bridge(&relay);
    let c = pair_another(&relay, &reg, "p");
    let mut app = AppClient::connect_ok(&relay, &reg.bridge_id, &c.client_secret, true);
    assert!(matches!(bridge.recv(), Frame::ClientConnected { .. }));
    bridge.ws.send(tungstenite::Message::text("{oops")).unwrap();
    assert_bad_frame(&bridge.recv());
    bridge.ws.send(tungstenite::Message::text(r#"{"type":"nope"}"#)).unwrap();
    assert_bad_frame(&bridge.recv());
    bridge.ws.send(tungstenite::Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_bad_frame(&bridge.recv());
    app.send(&req("r", "POST", "/api/echo", Some("b")));
    let Frame::Request(r) = bridge.recv_request_scoped() else { panic!("request expected") };
    assert_eq!(r.client.as_deref(), Some(c.client_id.as_str()));
    bridge.send(&Frame::Response(ResponseFrame {
        id: "r".into(),
        client: r.client.clone(),
        conn: r.conn,
        status: 204,
        headers: Headers::new(),
        body: String::new(),
        body_base64: false,
    }));
    assert_eq!(response(app.recv()).status, 204);
}

#[test]
fn request_limits_answer_per_request() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    let base = |id: &str| RequestFrame {
        id: id.into(),
        client: None,
        conn: None,
        method: "POST".into(),
        path: "/api/echo".into(),
        headers: Headers::new(),
        body: None,
        body_base64: false,
        length: None,
    };

    // body: exactly 12 MiB of text passes, one byte more is TOO_LARGE
    let mut at = base("body-at");
    at.body = Some("a".repeat(12 << 20).into());
    let r = response(p.app.request(&Frame::Request(at)));
    assert_eq!(r.body.len(), 12 << 20);
    let mut over = base("body-over");
    over.body = Some("a".repeat((12 << 20) + 1).into());
    let f = p.app.request(&Frame::Request(over));
    assert_response_error(&f, "body-over", ErrorCode::TooLarge);
    // base64 body decoding to more than 12 MiB (kept under the 16 MiB frame limit is
    // impossible, so use a text body that is plainly over instead) — covered above.

    // headers: 64 pass, 65 are too many
    let mut h64 = base("h-64");
    h64.headers = (0..64).map(|i| (format!("x-h{i}"), "v".into())).collect();
    response(p.app.request(&Frame::Request(h64)));
    let mut h65 = base("h-65");
    h65.headers = (0..65).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let f = p.app.request(&Frame::Request(h65));
    assert_response_error(&f, "h-65", ErrorCode::TooLarge);

    // one header value: 8 KiB passes, 8 KiB + 1 is TOO_LARGE
    let mut hv = base("hv-at");
    hv.headers.insert("x-big".into(), "v".repeat(8 << 10));
    response(p.app.request(&Frame::Request(hv)));
    let mut hv = base("hv-over");
    hv.headers.insert("x-big".into(), "v".repeat((8 << 10) + 1));
    let f = p.app.request(&Frame::Request(hv));
    assert_response_error(&f, "hv-over", ErrorCode::TooLarge);

    // path: 2 KiB passes, 2 KiB + 1 is TOO_LARGE
    let mut pa = base("path-at");
    pa.path = format!("/api/{}", "p".repeat((2 << 10) - 5));
    assert_eq!(pa.path.len(), 2 << 10);
    response(p.app.request(&Frame::Request(pa)));
    let mut pa = base("path-over");
    pa.path = format!("/api/{}", "p".repeat((2 << 10) - 4));
    let f = p.app.request(&Frame::Request(pa));
    assert_response_error(&f, "path-over", ErrorCode::TooLarge);

    let over: Vec<String> = p
        .bridge
        .requests()
        .into_iter()
        .map(|r| r.id)
        .filter(|id| id.ends_with("over") || id == "h-65")
        .collect();
    assert!(over.is_empty(), "requests over a limit reached the bridge: {over:?}");
    p.app.assert_round_trip("after-limits");
}

/// A request with a valid id but a missing or mistyped field gets its one terminal frame
/// (`BAD_REQUEST`), so the app waiting on that id is answered; and a text body is measured
/// decoded: escapes (`\"`, `\/`) do not count twice against the 12 MiB limit.
#[test]
fn malformed_requests_are_answered_and_bodies_measured_decoded() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    for (id, frame) in [
        ("nometh", r#"{"type":"request","id":"nometh","path":"/api/x"}"#),
        ("nopath", r#"{"type":"request","id":"nopath","method":"GET"}"#),
        ("nullh", r#"{"type":"request","id":"nullh","method":"GET","path":"/a","headers":null}"#),
    ] {
        p.app.send_text(frame);
        match p.app.recv() {
            Frame::ResponseError { id: got, code, .. } => {
                assert_eq!((got.as_str(), code), (id, ErrorCode::BadRequest))
            }
            other => panic!("{id}: expected response.error BAD_REQUEST, got {other:?}"),
        }
    }
    // 6.5 MiB of `"`: 13 MiB as JSON text, 6.5 MiB decoded.
    let quotes = "\"".repeat(13 << 19);
    p.app.send(&req("quotes", "POST", "/api/raw", Some(&quotes)));
    p.bridge.wait_requests_within(1, Duration::from_secs(60));
    let r = p.bridge.requests().into_iter().find(|r| r.id == "quotes").unwrap();
    assert_eq!(r.body.as_deref().map(str::len), Some(13 << 19));
}

#[test]
fn request_ids_out_of_spec_are_refused_and_socket_stays_usable() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    let long = "a".repeat(65);
    for bad in ["", "a b", long.as_str(), "é", "a/b", "x\n"] {
        p.app.send(&req(bad, "GET", "/api/echo", None));
        match p.app.recv() {
            Frame::Error { code, .. } => assert_eq!(code, ErrorCode::BadFrame, "id {bad:?}"),
            Frame::ResponseError { id, code, client, .. } => {
                assert_eq!(code, ErrorCode::BadRequest, "id {bad:?}");
                assert_eq!(id, bad);
                assert_eq!(client, None);
            }
            other => panic!("id {bad:?}: unexpected {other:?}"),
        }
    }
    // ids at the edge of the spec are fine
    let edge = "Z".repeat(64).to_string();
    p.app.assert_round_trip(&edge);
    p.app.assert_round_trip("a.b_c-9");
    let ids: Vec<String> = p.bridge.requests().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![edge, "a.b_c-9".to_owned()], "bad ids must not reach the bridge");
}

#[test]
fn oversized_ws_message_closes_only_that_socket() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    let other = pair_another(&relay, &p.reg, "other");
    let mut app2 = AppClient::connect_ok(&relay, &p.reg.bridge_id, &other.client_secret, true);

    // 17 MiB in one message: above the 16 MiB frame limit.
    let mut big = base_request_json("huge");
    big.push_str(&"a".repeat(17 << 20));
    big.push_str("\"}");
    let _ = p.app.ws.send(tungstenite::Message::text(big));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ws_read(&mut p.app.ws, Duration::from_secs(5)) {
            Event::Closed(code) => {
                assert_eq!(code, Some(4008), "close code for an oversized message (§4)");
                break;
            }
            Event::Timeout => panic!("socket not closed after a 17 MiB message"),
            Event::Frame(f) => {
                // a TOO_LARGE answer is not what §6 says for a frame over 16 MiB, but the
                // important part is the socket being closed
                assert!(Instant::now() < deadline, "{f:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    app2.assert_round_trip("neighbour");
    assert!(
        !p.bridge.requests().iter().any(|r| r.id == "huge"),
        "the oversized request reached the bridge"
    );
    // the same client may come back
    let mut again = AppClient::connect_ok(&relay, &p.reg.bridge_id, &p.client.client_secret, true);
    again.assert_round_trip("again");
}

fn base_request_json(id: &str) -> String {
    format!(r#"{{"type":"request","id":"{id}","method":"POST","path":"/api/echo","body":""#)
}

// =============================================================================================
// Bad input before the upgrade

#[test]
fn header_flood_on_upgrade_is_refused() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    let mut head = format!(
        "GET /ws/app?bridgeId={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n",
        p.reg.bridge_id, relay.addr, p.client.client_secret
    );
    for i in 0..100 {
        head.push_str(&format!("X-Flood-{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    let answer = raw_exchange(&relay.addr, head.as_bytes(), Duration::from_secs(3));
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or("");
    assert!(
        status_line.starts_with("HTTP/1.1 431") || status_line.starts_with("HTTP/1.1 400"),
        "100 headers on the upgrade: got {status_line:?}"
    );
    // the existing app socket was not replaced by the refused upgrade
    p.app.assert_round_trip("after-flood");
}

#[test]
fn truncated_and_silent_handshakes_do_not_hurt_others() {
    let relay = Relay::new();
    let api = relay.registry();
    // silent connections, held open during the whole test
    let silent: Vec<TcpStream> =
        (0..20).map(|_| TcpStream::connect(&relay.addr).unwrap()).collect();
    // truncated heads, then closed
    for cut in [5usize, 30, 60] {
        let head = format!(
            "GET /ws/app?bridgeId={UNKNOWN_BRIDGE} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n",
            relay.addr
        );
        let mut s = TcpStream::connect(&relay.addr).unwrap();
        s.write_all(&head.as_bytes()[..cut.min(head.len())]).unwrap();
        drop(s);
    }
    // a head that stops half way and stays open
    let mut half = TcpStream::connect(&relay.addr).unwrap();
    half.write_all(
        b"POST /v1/bridge/register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"disp",
    )
    .unwrap();
    // garbage that is not HTTP at all
    let answer =
        raw_exchange(&relay.addr, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", Duration::from_secs(2));
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 400"),
        "garbage request line answered with {text:?}"
    );

    // a full pairing and round trip still work while those sockets hang around
    let mut p = pair(&relay);
    p.app.assert_round_trip("alive");
    assert_eq!(api.health().0, 200);
    drop(silent);
    let mut buf = [0u8; 16];
    half.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let _ = half.read(&mut buf);
}

// =============================================================================================
// Durability

#[test]
fn restart_keeps_pairings() {
    let mut relay = Relay::new();
    let api = relay.registry();
    let p = pair(&relay);
    let Paired { reg, client, bridge, app } = p;
    drop(app);
    drop(bridge);

    relay.restart();
    let api2 = relay.registry();
    let (s, v) = api2.bridge_status(&reg.bridge_id, Some(&reg.relay_secret));
    assert_eq!((s, v["hasBridge"].as_bool()), (200, Some(true)), "{v}");
    let _bridge = BridgePeer::connect(&relay, &reg.bridge_id, &reg.relay_secret, "inst-1")
        .expect("bridge reconnect after restart")
        .serve();
    api2.wait_bridge_online(&reg.bridge_id, &reg.relay_secret, true);
    let mut app = AppClient::connect(&relay, &reg.bridge_id, &client.client_secret)
        .expect("app reconnect after restart with the same secret");
    app.expect_bridge_status(true);
    app.assert_round_trip("after-restart");

    let (s, v) = api2.clients(&reg.bridge_id, &reg.relay_secret);
    assert_eq!(s, 200);
    assert_eq!(v["clients"][0]["clientId"], client.client_id.as_str(), "{v}");
    // the registry keeps working for new pairings too
    let code = api2.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    let newer = api2.verify_ok(&reg.bridge_id, &code.access_code, "New Phone");
    drop(api);
    relay.stop_and_check_logs(&[
        &reg.relay_secret,
        &client.client_secret,
        &newer.client_secret,
        &code.access_code,
    ]);
}

#[test]
fn restart_keeps_access_codes() {
    let mut relay = Relay::new();
    let api = relay.registry();
    let a = api.register_ok("A");
    let used = api.access_code_ok(&a.bridge_id, &a.relay_secret);
    api.verify_ok(&a.bridge_id, &used.access_code, "P");
    let b = api.register_ok("B");
    let unused = api.access_code_ok(&b.bridge_id, &b.relay_secret);
    relay.restart();
    let api = relay.registry();
    // a used code stays used across a crash
    assert_api_error(&api.verify(&a.bridge_id, &used.access_code, None), 409, "ACCESS_CODE_USED");
    // the code issued (and not used) before the crash still works
    api.verify_ok(&b.bridge_id, &unused.access_code, "Q");
}

// =============================================================================================
// More limits and operations

#[test]
fn many_bad_frames_close_4008_and_others_keep_working() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    let other = pair_another(&relay, &p.reg, "other");
    let mut app2 = AppClient::connect_ok(&relay, &p.reg.bridge_id, &other.client_secret, true);
    let mut code = None;
    for i in 0..500 {
        if p.app.ws.send(tungstenite::Message::text("{bad")).is_err() {
            break;
        }
        match p.app.next_event(RECV_TIMEOUT) {
            Event::Frame(f) => assert_bad_frame(&f),
            Event::Closed(c) => {
                assert!(i >= 5, "closed after only {i} bad frames");
                code = Some(c);
                break;
            }
            other => panic!("bad frame {i}: {other:?}"),
        }
    }
    // when the send failed because the relay already closed, read the close frame
    let code = code.unwrap_or_else(|| p.app.wait_close());
    assert_eq!(code, Some(4008), "a peer sending many bad frames is closed 4008");
    app2.assert_round_trip("neighbour");
}

#[test]
fn open_requests_per_bridge_capped_at_256() {
    let relay = Relay::new();
    let api = relay.registry();
    let mut p = pair(&relay);
    let mut apps = Vec::new();
    for a in 0..8 {
        let c = pair_another(&relay, &p.reg, &format!("app{a}"));
        let mut app = AppClient::connect_ok(&relay, &p.reg.bridge_id, &c.client_secret, true);
        for i in 0..32 {
            app.send(&req(&format!("a{a}-{i}"), "GET", "/api/hang", None));
        }
        apps.push(app);
    }
    p.bridge.wait_requests(256);
    // 257th open request for this bridge
    let f = p.app.request(&req("one-too-many", "GET", "/api/hang", None));
    assert_response_error(&f, "one-too-many", ErrorCode::Busy);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(p.bridge.requests().len(), 256);
    for app in apps.iter_mut() {
        app.expect_silence(Duration::from_millis(1));
    }
    drop(api);
}

/// The relay answers an app's ping with its payload, and its close frame with the same code;
/// the bridge then hears the app left.
#[test]
fn an_app_ping_and_close_are_answered() {
    use tungstenite::Message;
    use tungstenite::protocol::frame::{CloseFrame, coding::CloseCode};
    let relay = Relay::new();
    let mut p = pair(&relay);
    p.app.ws.send(Message::Ping(b"are you there".to_vec().into())).unwrap();
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        match p.app.ws.read().expect("app socket") {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"are you there");
                break;
            }
            other => assert!(Instant::now() < deadline, "no pong; got {other:?}"),
        }
    }
    let close = CloseFrame { code: CloseCode::from(4000), reason: "bye".into() };
    p.app.ws.close(Some(close)).unwrap();
    let (code, _) = ws_wait_close(&mut p.app.ws, RECV_TIMEOUT);
    assert_eq!(code, Some(4000), "the close reply echoes the app's code");
    let client_id = p.client.client_id.clone();
    p.bridge.wait_for("client.disconnected", |f| {
        *f == Frame::ClientDisconnected { client: client_id.clone() }
    });
}

#[test]
fn app_disconnect_notifies_bridge_and_frees_its_slots() {
    let relay = Relay::new();
    let mut p = pair(&relay);
    for i in 0..32 {
        p.app.send(&req(&format!("d{i}"), "GET", "/api/hang", None));
    }
    p.bridge.wait_requests(32);
    let client_id = p.client.client_id.clone();
    drop(p.app); // TCP drop without a close frame
    p.bridge.wait_for("client.disconnected", |f| {
        *f == Frame::ClientDisconnected { client: client_id.clone() }
    });
    let mut app = AppClient::connect_ok(&relay, &p.reg.bridge_id, &p.client.client_secret, true);
    for i in 0..32 {
        app.send(&req(&format!("e{i}"), "GET", "/api/hang", None));
    }
    p.bridge.wait_requests(64);
    // a late answer from the bridge for a request of the dead socket is not delivered
    app.expect_silence(Duration::from_millis(200));
}

#[test]
fn x_forwarded_for_is_ignored_without_trust_proxy() {
    let relay = Relay::start(&["--rate-register", "2"]);
    let api = relay.registry();
    api.register_ok("1");
    api.register_ok("2");
    let r = api.call_with_headers(
        "POST",
        "/v1/bridge/register",
        None,
        &[("X-Forwarded-For", "203.0.113.9")],
        Some(&json!({})),
    );
    assert_eq!(
        (r.status, r.code()),
        (429, "RATE_LIMITED"),
        "X-Forwarded-For must not reset the per-IP limit: {}",
        r.raw
    );
}

#[test]
fn access_code_can_rename_the_bridge() {
    let relay = Relay::new();
    let api = relay.registry();
    let reg = api.register_ok("Old Name");
    let (s, v) = api.call(
        "POST",
        "/v1/bridge/access-code",
        Some(&reg.relay_secret),
        Some(&json!({"bridgeId": reg.bridge_id, "displayName": "New Name"})),
    );
    assert_eq!(s, 200, "{v}");
    let code = v["accessCode"].as_str().unwrap();
    let client = api.verify_ok(&reg.bridge_id, code, "P");
    assert_eq!(client.bridge_name, "New Name");
}

#[test]
fn slow_handshakes_time_out() {
    let relay = Relay::start(&["--handshake-timeout-secs", "1"]);
    let t = Instant::now();
    let mut silent = TcpStream::connect(&relay.addr).unwrap();
    let mut half = TcpStream::connect(&relay.addr).unwrap();
    half.write_all(b"GET /ws/app?bridgeId=0123456789abcdef01234567 HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    for (name, s) in [("silent", &mut silent), ("half head", &mut half)] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{name} connection not closed by the relay: {e}"),
        }
        let text = String::from_utf8_lossy(&buf);
        assert!(
            buf.is_empty() || text.starts_with("HTTP/1.1 408") || text.starts_with("HTTP/1.1 400"),
            "{name}: {text:?}"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "handshake timeout of 1 s took {:?}",
        t.elapsed()
    );
    let mut p = pair(&relay);
    p.app.assert_round_trip("ok");
}

#[test]
fn sigterm_with_live_sockets_exits_zero() {
    let mut relay = Relay::new();
    let mut p = pair(&relay);
    p.app.send(&req("open", "GET", "/api/hang", None));
    p.bridge.wait_requests(1);
    let t = Instant::now();
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t.elapsed());
    // the app socket is gone (with or without a close frame)
    loop {
        match p.app.next_event(RECV_TIMEOUT) {
            Event::Closed(_) => break,
            Event::Frame(_) => continue,
            other => panic!("app socket after relay shutdown: {other:?}"),
        }
    }
}

/// A large request is forwarded from pieces of the message it arrived in. While the bridge is
/// not reading, the relay's write of it stops part-way; a ping the bridge sends meanwhile is
/// answered after the request, never inside it, and a duplicate field or a frame of more than
/// 64 fields is refused.
#[test]
fn a_pong_never_lands_inside_a_half_written_request() {
    let relay = Relay::new();
    let (reg, mut bridge) = registered_bridge(&relay);
    let client = pair_another(&relay, &reg, "Test Phone");
    let mut app = AppClient::connect_ok(&relay, &reg.bridge_id, &client.client_secret, true);

    // 12 MiB is more than loopback buffers hold while the bridge does not read.
    let body = "b".repeat(12 << 20);
    app.send(&req("big", "POST", "/api/echo", Some(&body)));
    std::thread::sleep(Duration::from_millis(300));
    bridge.ws.send(tungstenite::Message::Ping(b"mid-frame".to_vec().into())).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let mut request = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    let _ = bridge.ws.get_mut().set_read_timeout(Some(Duration::from_secs(20)));
    loop {
        assert!(Instant::now() < deadline, "no pong after the request");
        match bridge.ws.read().expect("the bridge socket must carry intact frames") {
            tungstenite::Message::Text(t) => match protocol::parse_frame(t.as_str()).unwrap() {
                Frame::Request(r) => request = Some(r),
                Frame::ClientConnected { .. } => {}
                other => panic!("unexpected {other:?}"),
            },
            tungstenite::Message::Pong(p) => {
                assert_eq!(&p[..], b"mid-frame");
                break;
            }
            _ => {}
        }
    }
    let r = request.expect("the pong must come after the request it waited for");
    assert_eq!(r.client.as_deref(), Some(client.client_id.as_str()));
    assert_eq!((r.id.as_str(), r.body.as_deref().map(str::len)), ("big", Some(12 << 20)));
    assert!(r.body.as_deref().is_some_and(|b| b.bytes().all(|c| c == b'b')));

    // The relay forwards the text it received, so it refuses a field given twice rather than
    // check one value while the bridge reads the other.
    app.send_text(r#"{"type":"request","id":"dup","method":"GET","path":"/a","path":"/b"}"#);
    match app.recv() {
        Frame::Error { code: ErrorCode::BadFrame, message } => {
            assert!(message.contains("duplicate field `path`"), "{message}")
        }
        other => panic!("expected a BAD_FRAME error, got {other:?}"),
    }
    // So is a frame of more than 64 top-level fields, which would cost the relay a list of
    // millions in a 16 MiB frame.
    let extra: Vec<String> = (0..61).map(|i| format!(r#""x{i}":0"#)).collect();
    let wide =
        format!(r#"{{"type":"request","id":"w","method":"GET","path":"/a",{}}}"#, extra.join(","));
    app.send_text(&wide);
    match app.recv() {
        Frame::Error { code: ErrorCode::BadFrame, message } => {
            assert!(message.contains("more than 64 top-level fields"), "{message}")
        }
        other => panic!("expected a BAD_FRAME error, got {other:?}"),
    }
}

/// tungstenite kept its read buffer at the size of the largest message a connection sent, for
/// as long as it lived: four apps that each uploaded 12 MiB once held 49 MiB of relay memory.
/// Now a large message is read into a buffer of its own, freed with it, and the connections
/// go on working: a request sent right behind a large one, and later requests, arrive intact.
/// A large message sent in fragments arrives intact too, as does everything after it on that
/// socket.
#[test]
fn large_uploads_do_not_pin_memory_per_app() {
    let relay = Relay::new();
    let (reg, mut bridge) = registered_bridge(&relay);
    let _ = bridge.ws.get_mut().set_read_timeout(Some(Duration::from_secs(20)));
    let mut next_request = || loop {
        if let tungstenite::Message::Text(t) = bridge.ws.read().expect("bridge socket")
            && let Ok(Frame::Request(r)) = protocol::parse_frame(t.as_str())
        {
            return r;
        }
    };
    let body = "b".repeat(12 << 20);
    let mut apps = Vec::new();
    let before = rss_kib(relay.pid());
    for i in 0..4 {
        let client = pair_another(&relay, &reg, &format!("Phone {i}"));
        let mut app = AppClient::connect_ok(&relay, &reg.bridge_id, &client.client_secret, true);
        app.send(&req(&format!("big{i}"), "POST", "/api/echo", Some(&body)));
        app.send(&req(&format!("small{i}"), "GET", "/api/health", None));
        let big = next_request();
        assert_eq!(
            (big.id.as_str(), big.body.as_deref().map(str::len)),
            (&*format!("big{i}"), Some(12 << 20))
        );
        assert_eq!(next_request().id, format!("small{i}"));
        apps.push(app);
    }
    // A 2 MiB request in three fragments, then a small one right behind it.
    let frame =
        serde_json::to_string(&req("frag", "POST", "/api/echo", Some(&body[..2 << 20]))).unwrap();
    let (a, rest) = frame.split_at(frame.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let parts = [
        (a, OpCode::Data(Data::Text), false),
        (b, OpCode::Data(Data::Continue), false),
        (c, OpCode::Data(Data::Continue), true),
    ];
    for (part, op, fin) in parts {
        let f = tungstenite::protocol::frame::Frame::message(part.as_bytes().to_vec(), op, fin);
        apps[0].ws.write(tungstenite::Message::Frame(f)).unwrap();
    }
    apps[0].ws.flush().unwrap();
    apps[0].send(&req("after-frag", "GET", "/api/health", None));
    let r = next_request();
    assert_eq!((r.id.as_str(), r.body.map(|b| b.len())), ("frag", Some(2 << 20)));
    assert_eq!(next_request().id, "after-frag");

    // The heap is trimmed a while after the last large frame (`memory::TRIM_WHEN_QUIET`).
    let grown = rss_growth_settles(relay.pid(), before, 24 << 10);
    assert!(grown < 24 << 10, "the relay holds {grown} KiB more after four 12 MiB uploads");
    // Every socket still carries requests, large and small.
    for (i, app) in apps.iter_mut().enumerate() {
        app.send(&req(&format!("again{i}"), "POST", "/api/echo", Some(&body[..3 << 20])));
        let r = next_request();
        assert_eq!((r.id, r.body.map(|b| b.len())), (format!("again{i}"), Some(3 << 20)));
    }
}

/// Writes `frames` (built once) to `ws` until a write has waited 2 s (the relay stopped reading
/// it: back-pressure) or `limit` bytes went out. Returns the bytes written and whether the
/// writes blocked. A blocked write keeps its bytes in tungstenite's buffer for a later flush.
fn write_until_blocked(ws: &mut Ws, frame: &str, limit: usize) -> (usize, bool) {
    ws.get_ref().set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = 0;
    while sent < limit {
        match ws.send(tungstenite::Message::text(frame)) {
            Ok(()) => sent += frame.len(),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return (sent, true);
            }
            Err(e) => panic!("write failed after {sent} bytes: {e}"),
        }
    }
    (sent, false)
}

/// An app that sends without reading: the relay's answers to it (here `BRIDGE_OFFLINE` for
/// every request) fill its queue, the relay stops reading it instead of growing that queue
/// without bound (PROTOCOL §6), and after 60 s with the queue over half its limit and nothing
/// written the socket is closed, its memory given back.
#[test]
fn an_app_that_never_reads_is_paused_then_closed() {
    let relay = Relay::start(&[]);
    let api = relay.registry();
    let reg = api.register_ok("Offline Bridge");
    let client = pair_another(&relay, &reg, "flooder");
    let mut app = AppClient::connect_ok(&relay, &reg.bridge_id, &client.client_secret, false);
    let rss_before = rss_kib(relay.pid());
    let request = serde_json::to_string(&req("flood", "GET", "/api/health", None)).unwrap();
    // Each ~90-byte request earns a ~150-byte answer: 400 MB of requests would queue ~650 MB.
    let (sent, blocked) = write_until_blocked(&mut app.ws, &request, 400 << 20);
    assert!(blocked, "the relay kept reading an app that never reads ({sent} bytes sent)");
    let grown = rss_kib(relay.pid()).saturating_sub(rss_before);
    // The 32 MiB queue (about twice that in memory, for messages this small), not the
    // hundreds of MiB the requests sent would have queued.
    assert!(grown < 200 << 10, "relay RSS grew {grown} KiB for one app ({sent} bytes sent)");
    // Others are still served meanwhile.
    assert_eq!(api.health().0, 200);

    // It reads a little (12 MiB of answers: the queue falls below its limit, but not to the
    // half where the pause ends), then stops again: closed once the queue has gone 60 s
    // without a byte written.
    app.ws.get_ref().set_write_timeout(Some(Duration::from_millis(50))).unwrap();
    app.ws.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < 12 << 20 {
        assert!(Instant::now() < deadline, "only {got} bytes of answers in 60 s");
        match app.ws.read() {
            Ok(m) => got += m.len(),
            // The flush of the request left half-written above.
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading the answers failed after {got} bytes: {e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let stalled = loop {
        if relay
            .logs()
            .iter()
            .any(|l| l.contains("\"ws.stalled\"") && l.contains(&client.client_id))
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(stalled, "the stalled app was not closed: {:?}", relay.logs());
    // What was queued is dropped with the socket: reading now ends in a close or a reset
    // after at most what the kernel buffers held.
    let (code, _) = ws_wait_close(&mut app.ws, Duration::from_secs(10));
    assert!(code.is_none() || code == Some(protocol::close_code::LIMIT), "{code:?}");
    assert_eq!(api.health().0, 200);
}

/// A bridge streaming to an app that does not read is paused (back-pressure). When that app
/// goes away, the bridge is read again at once: its other apps are served, and its answers are
/// not stuck behind the queue of a socket that no longer exists.
#[test]
fn a_bridge_paused_for_an_app_that_left_is_read_again() {
    let relay = Relay::start(&[]);
    let (reg, mut bridge) = registered_bridge(&relay);
    let slow = pair_another(&relay, &reg, "slow");
    let other = pair_another(&relay, &reg, "other");
    let mut slow_app = AppClient::connect_ok(&relay, &reg.bridge_id, &slow.client_secret, true);
    slow_app.send(&req("big", "GET", "/api/big", None));
    assert!(matches!(bridge.recv_request_scoped(), Frame::Request(r) if r.id == "big"));
    bridge.send(&Frame::ResponseStart {
        id: "big".into(),
        client: Some(slow.client_id.clone()),
        conn: None,
        status: 200,
        headers: Default::default(),
    });
    let chunk = serde_json::to_string(&Frame::ResponseChunk {
        id: "big".into(),
        client: Some(slow.client_id.clone()),
        conn: None,
        body: "A".repeat(1 << 20),
        body_base64: false,
    })
    .unwrap();
    let (sent, blocked) = write_until_blocked(&mut bridge.ws, &chunk, 400 << 20);
    assert!(blocked, "the relay kept reading a bridge whose app does not read ({sent} bytes)");

    // The slow app vanishes without reading its download.
    drop(slow_app);
    let mut other_app = AppClient::connect_ok(&relay, &reg.bridge_id, &other.client_secret, true);
    other_app.send(&req("q1", "GET", "/api/health", None));
    // The bridge finishes its blocked write (the relay reads it again) and finds the request.
    bridge.ws.get_ref().set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    bridge.ws.flush().expect("the relay never read the bridge again");
    let request = loop {
        match bridge.recv() {
            Frame::Request(r) => break r,
            Frame::ClientConnected { .. } | Frame::ClientDisconnected { .. } => {}
            other => panic!("bridge got {other:?}"),
        }
    };
    assert_eq!((request.id.as_str(), request.client.as_deref()), ("q1", Some(&*other.client_id)));
    bridge.send(&Frame::Response(ResponseFrame {
        id: "q1".into(),
        client: Some(other.client_id.clone()),
        conn: request.conn,
        status: 200,
        headers: Default::default(),
        body: "ok".into(),
        body_base64: false,
    }));
    let answer = response(other_app.recv());
    assert_eq!((answer.id.as_str(), answer.status, answer.body.as_str()), ("q1", 200, "ok"));
}

/// Under a low open-file limit the relay lowers its connection cap to fit (and says so), so a
/// flood of idle connections is turned away by the cap, not by `accept` failing for want of
/// descriptors (which, level-triggered, used to spin the loop and flood the log); once the
/// flood goes, it serves again.
/// A relay started with an open-file limit of 100 and `args`: the process, and its stderr
/// lines as they come.
fn relay_with_100_descriptors(
    data: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(bin_path());
    cmd.args(["--listen", "127.0.0.1:0", "--data"]).arg(data).args(args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 100, rlim_max: 100 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (child, lines)
}

/// The first line of `event` among `lines`, waiting at most 10 s for it.
fn find_event(lines: &std::sync::Mutex<Vec<String>>, event: &str) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found =
            lines.lock().unwrap().iter().find_map(|l| {
                serde_json::from_str::<Value>(l).ok().filter(|v| v["event"] == event)
            });
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_low_open_file_limit_lowers_the_connection_cap_instead_of_failing_accepts() {
    let data = fresh_dir("fdlimit");
    // The default cap is fitted to the limit without a warning (a default setup starts
    // clean); the listening line shows the cap in use.
    let (mut child, lines) = relay_with_100_descriptors(&data, &[]);
    let listening = find_event(&lines, "listening").expect("not listening");
    assert_eq!(listening["maxConnections"], "36", "100 descriptors less the 64 kept back");
    let warned = lines.lock().unwrap().iter().any(|l| l.contains("config.max_connections"));
    assert!(!warned, "the default cap was warned about: {:?}", lines.lock().unwrap());
    let addr = listening["addr"].as_str().unwrap().to_owned();
    // More idle connections than descriptors.
    let flood: Vec<TcpStream> = (0..150).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let accept_errors = lines.lock().unwrap().iter().filter(|l| l.contains("accept.error")).count();
    assert_eq!(accept_errors, 0, "accept failed: {:?}", lines.lock().unwrap());
    drop(flood);
    let api = Registry::new(&format!("http://{addr}"));
    // The closed connections are read as closed and dropped at once.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(api.health().0, 200, "the relay does not serve after the flood");
    let _ = child.kill();
    let _ = child.wait();
    // A cap the operator chose that the limit cannot meet is lowered with a warning.
    let (mut child, lines) = relay_with_100_descriptors(&data, &["--max-connections", "50"]);
    let cap = find_event(&lines, "config.max_connections").expect("no config.max_connections");
    assert_eq!((&cap["requested"], &cap["used"]), (&json!("50"), &json!("36")), "{cap}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data);
}

/// Sends `GET /v1/health` on `s` (keep-alive) and tells whether a `200` came back: the relay
/// accepted the connection and serves it.
fn serves_health(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: relay\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200"))
}

#[test]
fn one_address_holds_at_most_its_share_of_connections_and_loopback_is_not_counted() {
    // A source that is not loopback: one of this machine's own addresses.
    let ifaces = hermeschat_pair::netif::interfaces().unwrap_or_default();
    let usable = |f: &&hermeschat_pair::netif::Iface| f.up && f.addr.is_ipv4() && !f.loopback;
    let Some(ip) = ifaces.iter().filter(usable).map(|f| f.addr).find(|a| !a.is_loopback()) else {
        eprintln!("skipped: this machine has no non-loopback address");
        return;
    };
    let relay = Relay::start_on(
        "0.0.0.0:0",
        &["--max-connections-per-ip", "3", "--public-url", "https://relay.example.com"],
    );
    let port = relay.port();
    let from_lan = || TcpStream::connect((ip, port)).unwrap();
    let mut held: Vec<TcpStream> = (0..3).map(|_| from_lan()).collect();
    for (i, s) in held.iter_mut().enumerate() {
        assert!(serves_health(s), "connection {i} of 3 from {ip} was not served");
    }
    // The fourth from the same address is closed at accept.
    let mut fourth = from_lan();
    assert!(!serves_health(&mut fourth), "a fourth connection from {ip} was served");
    // Loopback is not counted: a local proxy or a test harness is never capped.
    let mut local: Vec<TcpStream> =
        (0..5).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    for (i, s) in local.iter_mut().enumerate() {
        assert!(serves_health(s), "loopback connection {i} was not served");
    }
    // A closed connection gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = from_lan();
        if serves_health(&mut again) {
            held.push(again);
            break;
        }
        assert!(Instant::now() < deadline, "the place of a closed connection was not given back");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The refusal is told in the log (once a minute at most, the first at the next tick).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refused = relay.logs().iter().find_map(|l| {
            serde_json::from_str::<Value>(l).ok().filter(|v| v["event"] == "accept.refused")
        });
        if let Some(line) = refused {
            // One, or more if a retry above came before the relay saw the close.
            let refused: u64 =
                line["over_max_connections_per_ip"].as_str().unwrap().parse().unwrap();
            assert!(refused >= 1, "{line}");
            assert_eq!(line["over_max_connections"], "0", "{line}");
            assert_eq!(line["ip"], ip.to_string(), "the source is named: {line}");
            break;
        }
        assert!(Instant::now() < deadline, "no accept.refused line: {:?}", relay.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `listening` line says what the relay runs with: its data directory, whether it trusts
/// a proxy, its limits (no secret: the configuration holds none).
#[test]
fn the_listening_line_shows_the_settings_in_use() {
    let relay = Relay::start(&["--trust-proxy", "--max-connections-per-ip", "7"]);
    let line = relay.wait_event("listening", "", |_| true);
    assert_eq!(line["data"], relay.data_dir.display().to_string(), "{line}");
    let want = [
        ("trustProxy", "true"),
        ("tls", "false"),
        ("maxConnectionsPerIp", "7"),
        ("rateRegister", "10000"),
        ("codeTtlSecs", "600"),
        ("handshakeTimeoutSecs", "10"),
    ];
    for (field, value) in want {
        assert_eq!(line[field], value, "{field}: {line}");
    }
    let max: u64 = line["maxConnections"].as_str().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(max >= 1, "{line}");
}

/// A store last run by an older relay, which did not record connects: its bridges in use look
/// like unfinished registrations (registered long ago, never connected, no app) until they
/// reconnect. The sweep of unfinished registrations waits long enough for that (not at
/// start, when none is attached yet); the store tests cover what it then deletes.
#[test]
fn bridges_of_an_older_relay_are_not_swept_before_they_can_reconnect() {
    let mut relay = Relay::start(&["--handshake-timeout-secs", "1"]);
    let api = relay.registry();
    let unfinished = api.register_ok("never connected");
    let (connected, bridge) = registered_bridge(&relay);
    drop(bridge);
    relay.kill();
    // Registered two days ago; connects not recorded (an older relay ran since).
    let db = rusqlite::Connection::open(relay.data_dir.join("relay.db")).unwrap();
    db.execute(
        "UPDATE bridges SET created_at = created_at - 2 * 86400000, connected_at = NULL",
        [],
    )
    .unwrap();
    drop(db);
    relay.restart();
    // A connection that never sends a request is dropped at a timer tick past its 1 s deadline:
    // after it, the ticks that would have started a sweep at start have run.
    let mut silent = TcpStream::connect(&relay.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(silent.read(&mut [0u8; 16]).unwrap_or(0), 0, "the silent connection was kept");
    // A clean stop runs every job queued (a sweep too) before the relay exits.
    assert_eq!(relay.terminate().code(), Some(0));
    let db = rusqlite::Connection::open(relay.data_dir.join("relay.db")).unwrap();
    for (what, id) in [("unfinished", &unfinished.bridge_id), ("in use", &connected.bridge_id)] {
        let n: i64 =
            db.query_row("SELECT count(*) FROM bridges WHERE id = ?1", [id], |r| r.get(0)).unwrap();
        assert_eq!(n, 1, "the {what} bridge was swept at start");
    }
    assert!(
        !relay.logs().iter().any(|l| l.contains("bridges.expired")),
        "a sweep ran at start: {:?}",
        relay.logs()
    );
}

// =============================================================================================
// Startup checks: settings that cannot work are refused before the relay serves anything.

/// Runs the relay with `args` (after `--data` of a fresh directory) and `env`, and waits at
/// most 5 s for it to exit: its exit code (`None` when it was still running, and was killed)
/// and its stderr.
fn run_relay(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let data = fresh_dir("data");
    let (code, stderr) = run_relay_on(&data, args, env);
    let _ = std::fs::remove_dir_all(&data);
    (code, stderr)
}

/// [`run_relay`] on the data directory `data`.
fn run_relay_on(
    data: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(bin_path());
    cmd.arg("--data").arg(data).args(args).envs(env.iter().copied());
    run_to_exit(&mut cmd)
}

/// Registers twice from loopback, then once more claiming another client address in
/// `X-Forwarded-For`, against a relay allowing 2 registrations a minute per address: the
/// status of the third.
fn third_registration_with_forwarded_for(relay: &Relay) -> u16 {
    let api = relay.registry();
    api.register_ok("1");
    api.register_ok("2");
    let r = api.call_with_headers(
        "POST",
        "/v1/bridge/register",
        None,
        &[("X-Forwarded-For", "203.0.113.9")],
        Some(&json!({})),
    );
    r.status
}

/// `HERMESCHAT_RELAY_TRUST_PROXY` takes the usual words for yes and no, in any case: a "no"
/// leaves `X-Forwarded-For` ignored (the per-IP limit holds), a "yes" trusts it (another
/// address, another limit). Anything else is refused naming the variable.
#[test]
fn trust_proxy_variable_takes_yes_and_no_words() {
    for no in ["0", "false", "FALSE", "no", "Off"] {
        let env = [("HERMESCHAT_RELAY_TRUST_PROXY", no)];
        let relay = Relay::start_env("127.0.0.1:0", &env, &["--rate-register", "2"]);
        let status = third_registration_with_forwarded_for(&relay);
        assert_eq!(status, 429, "HERMESCHAT_RELAY_TRUST_PROXY={no} trusted X-Forwarded-For");
    }
    for yes in ["1", "true", "Yes", "ON"] {
        let env = [("HERMESCHAT_RELAY_TRUST_PROXY", yes)];
        let relay = Relay::start_env("127.0.0.1:0", &env, &["--rate-register", "2"]);
        let status = third_registration_with_forwarded_for(&relay);
        assert_eq!(status, 201, "HERMESCHAT_RELAY_TRUST_PROXY={yes} ignored X-Forwarded-For");
    }
    for bad in ["maybe", "2", "enabled"] {
        let env = [("HERMESCHAT_RELAY_TRUST_PROXY", bad)];
        let (code, stderr) = run_relay(&["--listen", "127.0.0.1:0"], &env);
        assert_eq!(code, Some(2), "HERMESCHAT_RELAY_TRUST_PROXY={bad}: {stderr}");
        assert!(
            stderr.contains("HERMESCHAT_RELAY_TRUST_PROXY") && stderr.contains(bad),
            "{stderr}"
        );
        assert!(stderr.contains("true") && stderr.contains("false"), "{stderr}");
    }
}

/// `--max-connections 0` would refuse every connection: it is refused at start (exit 2), from
/// the flag and from the environment alike, each named.
#[test]
fn max_connections_zero_is_refused_at_start() {
    let (code, stderr) = run_relay(&["--listen", "127.0.0.1:0", "--max-connections", "0"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--max-connections") && stderr.contains("at least 1"), "{stderr}");
    let env = [("HERMESCHAT_RELAY_MAX_CONNECTIONS", "0")];
    let (code, stderr) = run_relay(&["--listen", "127.0.0.1:0"], &env);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("HERMESCHAT_RELAY_MAX_CONNECTIONS"), "{stderr}");
    // 1 is served.
    let relay = Relay::start(&["--max-connections", "1"]);
    assert_eq!(relay.registry().health().0, 200);
}

/// A number setting out of its type's range was "not a valid number", a number too large or
/// negative included: each is named for what it is (exit 2).
#[test]
fn number_settings_say_what_is_wrong_with_the_value() {
    for (args, why) in [
        (["--rate-register", "99999999999"], "is too large"),
        (["--max-connections-per-ip", "-1"], "is negative"),
        (["--rate-verify", "ten"], "is not a whole number"),
    ] {
        let (code, stderr) = run_relay(&[&["--listen", "127.0.0.1:0"][..], &args].concat(), &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]) && stderr.contains(why), "{args:?}: {stderr}");
    }
}

/// A wildcard `--listen` without `--public-url` would hand apps `ws://0.0.0.0:PORT/…`: it is
/// refused (exit 2) saying to pass `--public-url`; with one it starts and hands out that URL.
#[test]
fn wildcard_listen_needs_a_public_url() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let (code, stderr) = run_relay(&["--listen", listen], &[]);
        assert_eq!(code, Some(2), "--listen {listen}: {stderr}");
        assert!(stderr.contains("--public-url") && stderr.contains(listen), "{stderr}");
    }
    let relay = Relay::start_on("0.0.0.0:0", &["--public-url", "https://relay.example.com"]);
    let api = Registry::new(&format!("http://127.0.0.1:{}", relay.port()));
    let reg = api.register_ok("wildcard");
    for url in [&reg.bridge_relay_url, &reg.app_relay_url] {
        assert!(url.starts_with("wss://relay.example.com/"), "handed out {url}");
    }
}

/// A `--public-url` without a host (`https://`) started a relay that handed apps and bridges
/// `wss:/ws/app`; one with a query or a space, URLs as broken. Each is refused (exit 2).
#[test]
fn a_public_url_apps_cannot_dial_is_refused_at_start() {
    for url in
        ["https://", "http:///ws", "https://relay.example.com?x=1", "https://relay example.com"]
    {
        let (code, stderr) = run_relay(&["--listen", "127.0.0.1:0", "--public-url", url], &[]);
        assert_eq!(code, Some(2), "--public-url {url}: {stderr}");
        assert!(stderr.contains("--public-url") && stderr.contains("scheme and host"), "{stderr}");
    }
    let relay = Relay::start(&["--public-url", "https://relay.example.com/prefix/"]);
    let reg = relay.registry().register_ok("prefix");
    assert_eq!(reg.app_relay_url, "wss://relay.example.com/prefix/ws/app");
}

/// A `--data` that is a file, or lies under one, was "cannot use the data dir: …: File
/// exists": it is now named as a file, with what to pass instead (exit 1, the file untouched).
#[test]
fn a_data_path_that_is_a_file_is_named_as_such() {
    let dir = fresh_dir("datafile");
    let file = dir.join("relay-data");
    std::fs::write(&file, b"mine").unwrap();
    let (code, stderr) = run_relay_on(&file, &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let named = format!("--data {} is a file, not a directory", file.display());
    assert!(stderr.contains(&named), "{stderr}");
    let (code, stderr) = run_relay_on(&file.join("sub"), &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("part of that path is a file, not a directory"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `relay.db` that is not a database stops the relay with the file's path and what to do
/// (restore a backup, or move it aside to start empty); the file is left as it was.
#[test]
fn a_corrupt_store_is_named_with_the_way_out() {
    let data = fresh_dir("corrupt");
    let db = data.join("relay.db");
    let junk = vec![b'x'; 8192];
    std::fs::write(&db, &junk).unwrap();
    let (code, stderr) = run_relay_on(&data, &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "no path: {stderr}");
    assert!(stderr.contains("backup") && stderr.contains("move it aside"), "{stderr}");
    assert!(stderr.contains("forgets every"), "{stderr}");
    assert_eq!(std::fs::read(&db).unwrap(), junk, "relay.db was changed");
    let _ = std::fs::remove_dir_all(&data);
}

/// A `--listen` address another process holds is named, with the two ways out.
#[test]
fn a_busy_listen_address_is_named_with_the_way_out() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let (code, stderr) = run_relay(&["--listen", &addr], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(stderr.contains("another --listen") && stderr.contains("stop"), "{stderr}");
}

/// `--rate-register 0` is no limit at all (as `--help` says), not "nothing allowed".
#[test]
fn a_zero_rate_is_unlimited_as_help_says() {
    let relay = Relay::start(&["--rate-register", "0"]);
    let api = relay.registry();
    for i in 0..40 {
        api.register_ok(&format!("bridge {i}"));
    }
    let out = std::process::Command::new(bin_path()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for line in ["--rate-register", "--rate-verify"] {
        let text = help.lines().find(|l| l.contains(line)).unwrap_or_else(|| panic!("{help}"));
        assert!(text.contains("0 is unlimited"), "{text}");
    }
    assert!(help.contains("0 is no cap"), "{help}");
}

/// Behind a trusted proxy every connection comes from the proxy's address, so the per-source
/// cap counts each WebSocket by its client (the last `X-Forwarded-For` hop) once it is
/// upgraded: a third socket of one client is refused (429), another client is unaffected, and
/// a closed socket gives its place back. Plain HTTP requests are not counted (a proxy carries
/// several clients' requests on one connection).
#[test]
fn behind_a_trusted_proxy_websockets_are_capped_per_client() {
    let relay = Relay::start(&["--trust-proxy", "--max-connections-per-ip", "2"]);
    let (reg, _bridge) = registered_bridge(&relay);
    // Three apps (one socket each) behind the same client address.
    let secrets: Vec<String> =
        (0..3).map(|i| pair_another(&relay, &reg, &format!("Phone {i}")).client_secret).collect();
    let url = relay.app_ws_url(&reg.bridge_id);
    let open = |secret: &str, from: &str| {
        let auth = format!("Bearer {secret}");
        ws_connect(&url, &[("Authorization", &auth), ("X-Forwarded-For", from)])
    };
    let first = open(&secrets[0], "198.51.100.7").expect("first socket");
    let _second = open(&secrets[1], "10.0.0.1, 198.51.100.7").expect("second socket");
    match open(&secrets[2], "198.51.100.7") {
        Err(ConnectError::Http(429, body)) => assert!(body.contains("RATE_LIMITED"), "{body}"),
        other => panic!("a third socket from one client address: {other:?}"),
    }
    let _other = open(&secrets[2], "198.51.100.8").expect("another client address");
    // Registry requests through the proxy, from the client at its cap, are not counted.
    let api = relay.registry();
    for _ in 0..5 {
        let r = api.call_with_headers(
            "GET",
            "/v1/health",
            None,
            &[("X-Forwarded-For", "198.51.100.7")],
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open(&secrets[0], "198.51.100.7").is_err() {
        assert!(Instant::now() < deadline, "a closed socket did not give its place back");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Upgrades are logged with the forwarded client, as registry requests are, never with the
    // proxy's address: the 101s and the 429 of the cap alike.
    let ws_line =
        |status: &'static str| move |v: &Value| v["path"] == "/ws/app" && v["status"] == status;
    let refused = relay.wait_event("http", "for the 429 upgrade", ws_line("429"));
    assert_eq!(refused["ip"], "198.51.100.7", "{refused}");
    relay.wait_event("http", "for the other client's 101", |v| {
        ws_line("101")(v) && v["ip"] == "198.51.100.8"
    });
    let upgrades = relay.events("http");
    let upgrades: Vec<&Value> = upgrades.iter().filter(|v| v["path"] == "/ws/app").collect();
    // Two 101s, the 429 and the other client's 101 at least (the reopened socket's line may
    // still be on its way).
    assert!(upgrades.len() >= 4, "{upgrades:?}");
    for line in upgrades {
        assert!(line["ip"] == "198.51.100.7" || line["ip"] == "198.51.100.8", "{line}");
    }
    // The refusal is counted under the client it names.
    let line = relay.wait_event("accept.refused", "for the capped client", |_| true);
    assert_eq!((&line["ip"], &line["sources"]), (&json!("198.51.100.7"), &json!("1")), "{line}");
}

// ---------------------------------------------------------------------------------------------
// An app credential that reconnects in a loop (PROTOCOL §4.2 check 11, §6)

/// The burst of app sockets one credential may open (`ratelimit::APP_UPGRADE_BURST`) and the
/// time per further socket (`APP_UPGRADE_REFILL`).
const APP_BURST: u32 = 20;
const APP_REFILL: Duration = Duration::from_secs(2);

/// The most sockets one credential can have attached in `elapsed` (its burst, one per refill
/// after it, and one for the refill under way).
fn app_sockets_allowed(elapsed: Duration) -> u32 {
    APP_BURST + (elapsed.as_secs_f64() / APP_REFILL.as_secs_f64()) as u32 + 1
}

/// The raw answer to an upgrade of `/ws/app` with `secret`.
fn raw_app_upgrade(relay: &Relay, bridge_id: &str, secret: &str) -> String {
    let head = format!(
        "GET /ws/app?bridgeId={bridge_id} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {secret}\r\n\r\n",
        relay.addr
    );
    String::from_utf8_lossy(&raw_exchange(&relay.addr, head.as_bytes(), Duration::from_secs(3)))
        .into_owned()
}

/// An app credential reconnecting in a tight loop (a buggy app; two installs sharing one
/// pairing that replace each other with 4002) gets its burst of sockets, then `429
/// RATE_LIMITED` with `Retry-After` before the upgrade: its last socket is not replaced and
/// keeps working, another app of the same bridge is not affected, the relay's log names the
/// credential, and once the wait is over the credential connects again.
#[test]
fn an_app_reconnecting_in_a_loop_is_refused_429_and_its_socket_stays() {
    let relay = Relay::new();
    let p = pair(&relay);
    let other = pair_another(&relay, &p.reg, "Other Phone");
    let mut steady = AppClient::connect_ok(&relay, &p.reg.bridge_id, &other.client_secret, true);
    let started = Instant::now();
    // `pair` attached the first socket.
    let mut attached = 1;
    let mut last = None;
    let refusal = loop {
        match AppClient::connect(&relay, &p.reg.bridge_id, &p.client.client_secret) {
            Ok(mut app) => {
                app.expect_bridge_status(true);
                attached += 1;
                // The one it replaced closes 4002.
                last = Some(app);
            }
            Err(ConnectError::Http(429, body)) => break body,
            Err(e) => panic!("reconnect {attached}: {e:?}"),
        }
        let allowed = app_sockets_allowed(started.elapsed());
        assert!(attached <= allowed, "{attached} sockets attached, {allowed} allowed");
    };
    assert!(attached >= APP_BURST, "refused after only {attached} sockets: {refusal}");
    let v: Value = serde_json::from_str(&refusal).unwrap_or_else(|e| panic!("{refusal}: {e}"));
    assert_eq!(v["error"]["code"], "RATE_LIMITED", "{refusal}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Retry in") && message.contains("pair the second"), "{message}");
    // The answer says how long to wait.
    let raw = raw_app_upgrade(&relay, &p.reg.bridge_id, &p.client.client_secret);
    assert!(raw.starts_with("HTTP/1.1 429 "), "{raw}");
    let retry_after: u64 = raw
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {raw}"));
    assert!((1..=APP_REFILL.as_secs()).contains(&retry_after), "{raw}");
    // The refused upgrades replaced nothing: the last socket still carries requests.
    let mut last = last.expect("a socket attached");
    last.assert_round_trip("still-attached");
    // Another app of the same bridge is untouched, and may reconnect.
    steady.assert_round_trip("steady");
    let mut steady = AppClient::connect_ok(&relay, &p.reg.bridge_id, &other.client_secret, true);
    steady.assert_round_trip("steady-again");
    // The log names the credential, with what to do.
    let client = p.client.client_id.clone();
    let line = relay
        .wait_event("ws.app_limited", "for the flapping app", |v| v["client"] == client.as_str());
    assert_eq!(line["bridge"], p.reg.bridge_id.as_str(), "{line}");
    assert!(line["next"].as_str().is_some_and(|n| n.contains("re-pair")), "{line}");
    // Once the wait is over, the credential connects again (replacing its socket: 4002).
    std::thread::sleep(Duration::from_secs(retry_after));
    let mut again = AppClient::connect_ok(&relay, &p.reg.bridge_id, &p.client.client_secret, true);
    assert_eq!(last.wait_close(), Some(4002));
    again.assert_round_trip("after-the-wait");
    drop(p.app);
}

/// What a bridge socket that the test reads itself got, up to and including the request
/// `until`: the presence frames (`client.connected` as `+client`, `client.disconnected` as
/// `-client`) and request ids (`>id`, from `client`) in order, and how many requests of more
/// than 1 MiB (not parsed: a debug build takes long to).
fn bridge_frames_until(bridge: &mut BridgePeer, until: &str) -> (Vec<String>, usize) {
    bridge.ws.get_ref().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (mut seen, mut large) = (Vec::new(), 0);
    loop {
        let msg = bridge.ws.read().unwrap_or_else(|e| panic!("bridge socket after {seen:?}: {e}"));
        let tungstenite::Message::Text(t) = msg else { continue };
        if t.len() > 1 << 20 {
            large += 1;
            continue;
        }
        match protocol::parse_frame(t.as_str()) {
            Ok(Frame::ClientConnected { client, .. }) => seen.push(format!("+{client}")),
            Ok(Frame::ClientDisconnected { client }) => seen.push(format!("-{client}")),
            Ok(Frame::Request(r)) => {
                seen.push(format!(">{}:{}", r.client.unwrap_or_default(), r.id));
                if r.id == until {
                    return (seen, large);
                }
            }
            other => panic!("bridge got {other:?}"),
        }
    }
}

/// The clients a bridge holds online after `frames` (of [`bridge_frames_until`]), from
/// `online` on.
fn online_after(online: &[&str], frames: &[String]) -> std::collections::BTreeSet<String> {
    let mut set: std::collections::BTreeSet<String> =
        online.iter().map(|s| (*s).to_owned()).collect();
    for f in frames {
        if let Some(c) = f.strip_prefix('+') {
            set.insert(c.to_owned());
        } else if let Some(c) = f.strip_prefix('-') {
            set.remove(c);
        }
    }
    set
}

/// Apps that connect and disconnect in a loop while their bridge reads slowly (here not at
/// all, its socket full of two 12 MiB requests) cost it a bounded number of presence frames:
/// a `client.connected` still waiting for the bridge when its socket is gone is dropped with
/// its `client.disconnected`, so the bridge never hears of the sockets that came and went.
/// The bridge still ends with the right clients online, hears `client.disconnected` for a
/// socket whose request it got (to cancel it), and hears of the last socket of an app that
/// was replaced over and over (4002). A credential flapping as fast as it can from four
/// threads is refused (429) after its burst, and the relay's memory stays put.
#[test]
fn apps_flapping_while_their_bridge_is_slow_cost_it_a_bounded_number_of_presence_frames() {
    let relay = Relay::start(&["--rate-verify", "0"]);
    let (reg, mut bridge) = registered_bridge(&relay);
    let pid = relay.pid();
    let steady = pair_another(&relay, &reg, "steady");
    let mut steady_app = AppClient::connect_ok(&relay, &reg.bridge_id, &steady.client_secret, true);
    // The bridge stops reading: its socket fills, and what follows waits in the relay's queue.
    let body = "b".repeat(12 << 20);
    for i in 0..2 {
        steady_app.send(&req(&format!("big{i}"), "POST", "/api/echo", Some(&body)));
    }
    drop(body);
    let flappers: Vec<VerifyResponse> =
        (0..10).map(|i| pair_another(&relay, &reg, &format!("flapper {i}"))).collect();
    let (replaced, requester, looper) = (
        pair_another(&relay, &reg, "replaced"),
        pair_another(&relay, &reg, "requester"),
        pair_another(&relay, &reg, "looper"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kib(pid);

    // One credential as fast as it can, from four threads, for 3 s.
    let started = Instant::now();
    let (ok, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let url = relay.app_ws_url(&reg.bridge_id);
            let secret = looper.client_secret.clone();
            let (ok, limited) = (ok.clone(), limited.clone());
            std::thread::spawn(move || {
                while started.elapsed() < Duration::from_secs(3) {
                    match AppClient::connect_url(&url, &secret) {
                        Ok(app) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            drop(app);
                        }
                        Err(ConnectError::Http(429, _)) => {
                            limited.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (ok, limited) = (ok.load(Ordering::SeqCst), limited.load(Ordering::SeqCst));
    let allowed = u64::from(app_sockets_allowed(started.elapsed()));
    assert!(
        ok <= allowed && limited > 0,
        "{ok} sockets attached ({allowed} allowed), {limited} refused"
    );
    // Ten credentials, each connecting and closing 15 times (within their burst).
    for f in &flappers {
        for _ in 0..15 {
            AppClient::connect_ok(&relay, &reg.bridge_id, &f.client_secret, true).close();
        }
    }
    // One replaced ten times over (4002); its last socket stays.
    let mut replaced_app = None;
    for _ in 0..10 {
        replaced_app =
            Some(AppClient::connect_ok(&relay, &reg.bridge_id, &replaced.client_secret, true));
    }
    // One sends a request and leaves: the bridge must hear that it left, to cancel it.
    let mut req_app = AppClient::connect_ok(&relay, &reg.bridge_id, &requester.client_secret, true);
    req_app.send(&req("orphan", "GET", "/api/hang", None));
    req_app.close();
    // The last socket of the replaced app carries a request; then the steady app's marker.
    let mut replaced_app = replaced_app.unwrap();
    replaced_app.send(&req("from-last", "GET", "/api/health", None));
    std::thread::sleep(Duration::from_millis(300));
    steady_app.send(&req("marker", "GET", "/api/health", None));
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_kib(pid).saturating_sub(rss_before);

    let (frames, large) = bridge_frames_until(&mut bridge, "marker");
    assert_eq!(large, 2, "{frames:?}");
    let presence = frames.iter().filter(|f| !f.starts_with('>')).count();
    // Without dropping: 2 per socket, over 350 here. With it: the requester's two, the
    // replaced app's last `client.connected`, and a few that left before the bridge stopped.
    assert!(presence <= 10, "the bridge got {presence} presence frames: {frames:?}");
    let pos = |f: &str| frames.iter().position(|g| g == f);
    let r = &requester.client_id;
    let (c, q, d) = (pos(&format!("+{r}")), pos(&format!(">{r}:orphan")), pos(&format!("-{r}")));
    assert!(c < q && q < d && c.is_some(), "requester: {frames:?}");
    let last = &replaced.client_id;
    let (c, q) = (pos(&format!("+{last}")), pos(&format!(">{last}:from-last")));
    assert!(c.is_some() && c < q, "replaced: {frames:?}");
    // The bridge's view: the steady app (announced before it stopped reading) and the last
    // socket of the replaced one.
    let online = online_after(&[&steady.client_id], &frames);
    let want: std::collections::BTreeSet<String> =
        [steady.client_id.clone(), replaced.client_id.clone()].into();
    assert_eq!(online, want, "{frames:?}");
    eprintln!(
        "flapping: {ok} sockets of the looping credential attached, {limited} refused; the \
         bridge got {presence} presence frames; relay RSS +{grown} KiB"
    );
    // Hundreds of sockets came and went: the relay holds a few of their frames, not all.
    assert!(grown < 8 << 10, "relay RSS grew {grown} KiB while apps flapped");
    let _ = relay.wait_event("ws.app_limited", "for the looping credential", |v| {
        v["client"] == looper.client_id.as_str()
    });
}

// =============================================================================================
// Refused streams: the peer hears why

/// An app socket opened over a raw TCP stream (as a client library would open it, with
/// `permessage-deflate` offered, which the relay declines), after its `bridge.status` frame.
fn raw_app_socket(relay: &Relay, bridge_id: &str, secret: &str) -> TcpStream {
    let mut s = TcpStream::connect(&relay.addr).unwrap();
    let head = format!(
        "GET /ws/app?bridgeId={bridge_id} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
         Authorization: Bearer {secret}\r\n\r\n",
        relay.addr
    );
    s.write_all(head.as_bytes()).unwrap();
    s.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "the relay closed during the handshake");
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-extensions"), "no extension is agreed: {head}");
    let (op, payload) = read_raw_frame(&mut s).expect("bridge.status");
    assert_eq!(op, 1, "{}", String::from_utf8_lossy(&payload));
    s
}

/// A frame that breaks RFC 6455 used to drop the TCP connection without a close frame, while
/// what the app had sent after it was still unread, so the app's stack got a reset: every
/// client library saw 1006 ("connection lost") and could not tell a bug of its own from a
/// network failure. Now the relay closes 1002 (1007 for text that is not UTF-8), drops what
/// follows unread, and ends the stream cleanly once the close frame has left.
#[test]
fn a_broken_frame_is_answered_with_a_close_code_before_the_stream_ends() {
    let relay = Relay::new();
    let (reg, bridge) = registered_bridge(&relay);
    let _bridge = bridge.serve();
    let junk = client_frame(0x81, &vec![b'j'; 256 << 10], true, None);
    let cases: [(&str, Vec<u8>, u16); 6] = [
        ("text that is not UTF-8", client_frame(0x81, &[0xFF, 0xFE], true, None), 1007),
        ("a close reason that is not UTF-8", client_frame(0x88, &[3, 232, 0xFF], true, None), 1007),
        ("an unmasked frame", client_frame(0x81, b"{}", false, None), 1002),
        ("a reserved bit (compression was not agreed)", client_frame(0xC1, b"x", true, None), 1002),
        ("an unknown opcode", client_frame(0x83, b"x", true, None), 1002),
        ("a ping of 126 bytes", client_frame(0x89, &[b'p'; 126], true, None), 1002),
    ];
    for (what, bad, want) in cases {
        let client = pair_another(&relay, &reg, "Raw Phone");
        let mut s = raw_app_socket(&relay, &reg.bridge_id, &client.client_secret);
        // The broken frame and 256 KiB behind it, in one write, as a client sends them.
        s.write_all(&[bad, junk.clone()].concat()).unwrap();
        let (code, _) = expect_close_then_fin(&mut s, what);
        assert_eq!(code, want, "{what}");
    }
    let line = relay.wait_event("ws.close", "a close for a broken frame", |e| e["code"] == "1007");
    assert_eq!(line["by"], "relay", "{line}");
}

/// A message over the 16 MiB limit closes its socket with 4008 (PROTOCOL §6), but the relay
/// dropped the connection right after writing the close frame, with the rest of the message
/// unread: the app's stack got a reset, its send of the message failed, and no client library
/// (Python websockets, websocket-client, aiohttp) surfaced the 4008, only a lost connection.
/// Now the rest is read and dropped while the close frame leaves, and the stream ends cleanly.
#[test]
fn a_message_over_the_limit_lets_its_sender_finish_and_read_4008() {
    let relay = Relay::new();
    let (reg, bridge) = registered_bridge(&relay);
    let _bridge = bridge.serve();
    let client = pair_another(&relay, &reg, "Raw Phone");
    let mut s = raw_app_socket(&relay, &reg.bridge_id, &client.client_secret);
    // A frame announcing one byte over the limit, and 4 MiB of its payload.
    let over = (16u64 << 20) + 1;
    let frame = client_frame(0x81, &vec![b'a'; 4 << 20], true, Some(over));
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&frame));
    let (code, reason) = expect_close_then_fin(&mut s, "a message over the limit");
    assert_eq!((code, reason.as_str()), (4008, "message too large"));
    let sent = sender.join().unwrap();
    assert!(sent.is_ok(), "the app's send failed: {sent:?}");
    // The same app comes back and is served.
    let mut again = AppClient::connect_ok(&relay, &reg.bridge_id, &client.client_secret, true);
    again.assert_round_trip("again");
}

/// `HEAD /v1/health` (what many uptime monitors send) is answered as `GET` is, without a body:
/// it was a 405 carrying one, whose bytes a kept-alive client read as the start of its next
/// response. A `HEAD` the relay refuses carries none either.
#[test]
fn head_is_answered_like_get_without_a_body() {
    let relay = Relay::start(&[]);
    for (path, status) in [("/v1/health", "200"), ("/v1/nothing", "404")] {
        let requests = format!(
            "HEAD {path} HTTP/1.1\r\nHost: relay\r\n\r\n\
             GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_exchange(&relay.addr, requests.as_bytes(), RECV_TIMEOUT);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let (head, get) = answer.split_once("\r\n\r\n").expect("a response head");
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        // The GET's response follows the HEAD's head at once, and has the length announced.
        assert!(get.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
        let get_body = get.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let length = head.lines().find_map(|l| l.strip_prefix("Content-Length: "));
        assert_eq!(length, Some(get_body.len().to_string().as_str()), "{answer}");
    }
    // Refused before any route is asked (a chunked body: 411), the HEAD gets no body either.
    let request = b"HEAD /v1/health HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n";
    let answer = raw_exchange(&relay.addr, request, RECV_TIMEOUT);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 411 "), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "a body came with the HEAD's refusal: {answer}");
}
