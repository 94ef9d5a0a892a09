//! Fault injection against the real processes: a relay killed mid-request, a daemon killed or
//! paused (laptop sleep), a network partition that drops the relay socket without a FIN, a
//! state directory that refuses writes, and the Hermes gateway (the stub,
//! `tests/fixtures/stub_gateway.py`, behind the built-in backend) killed mid-stream. Each test
//! states its expectation at the top.
//!
//! Some of these wait for the protocol's own timers (45 s pong deadline, 60 s idle close), so
//! they take a minute or two each; they run in parallel with the rest of the suite.

mod common;
mod gatewaykit;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::session::*;
use common::{AppClient, Event, Registry, Relay, unb64, with_immutable_dir};
use gatewaykit::{app_fetch, free_port, sse_content, sse_error, stub_user};
use hermeschat_pair::protocol::{ErrorCode, Frame};
use serde_json::{Value, json};

/// Waits until `cond` holds, polling every 100 ms, or panics after `limit` with `what`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

fn bridge_online(relay_url: &str, bridge_id: &str, secret: &str) -> bool {
    let (status, v) = Registry::new(relay_url).bridge_status(bridge_id, Some(secret));
    status == 200 && v["online"] == true
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid} failed");
}

/// Reads frames until `want` matches or `limit` passes; returns the frames seen.
fn read_until(app: &mut AppClient, limit: Duration, want: impl Fn(&Event) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let ev = app.next_event(Duration::from_millis(500));
        if want(&ev) {
            return true;
        }
        if matches!(ev, Event::Closed(_)) {
            return false;
        }
    }
    false
}

/// Expectation: the relay dies (SIGKILL) while a request is open at the backend. The daemon
/// reconnects to the restarted relay within the backoff cap (30 s), the pairing and the device
/// list survive, the app reconnects with its old secret, and the backend saw the interrupted
/// request exactly once (nothing is replayed).
#[test]
fn relay_killed_mid_request_nothing_lost_nothing_duplicated() {
    let mut s = setup();
    let slow = request("slow-1", "GET", "/api/slow?secs=4", &[], None);
    s.app.send(&slow);
    s.backend.wait_counter("started", 1);
    s.relay.kill();
    s.relay.restart();
    let took = wait_for(Duration::from_secs(35), "the daemon to reconnect", || {
        bridge_online(&s.relay.url(), &s.qr.g, &s.client_secret)
    });
    eprintln!("daemon back online {took:?} after the relay restart");
    let mut app = AppClient::connect_url(&app_url(&s.qr), &s.client_secret)
        .unwrap_or_else(|e| panic!("the pairing did not survive the relay restart: {e:?}"));
    app.expect_bridge_status(true);
    let echo = fetch(&mut app, &request("after", "POST", "/api/echo", &[], Some("{}")));
    assert_eq!(echo.status, 200);
    // The device list is intact.
    let (status, clients) = Registry::new(&s.relay.url()).clients(&s.qr.g, &bridge_secret(&s));
    assert_eq!(status, 200);
    assert_eq!(clients["clients"].as_array().map(Vec::len), Some(1), "{clients}");
    // Let the interrupted request finish at the backend, then count: exactly one start.
    thread::sleep(Duration::from_secs(4));
    assert_eq!(s.backend.get("/api/cancelled")["started"], 1, "a request was replayed");
}

fn bridge_secret(s: &Setup) -> String {
    s.env.bridge_json()["relaySecret"].as_str().unwrap().to_owned()
}

/// Expectation: a daemon killed with SIGKILL leaves a stale pid file; `--status` says "not
/// running" (exit 1), and the next `hermeschat-pair` starts a new daemon with the same identity
/// (same bridgeId), so the paired app keeps working.
#[test]
fn killed_daemon_is_reported_and_recovered_with_the_same_identity() {
    let mut s = setup();
    let pid = s.env.daemon_pid();
    signal(pid, "-KILL");
    wait_for(Duration::from_secs(5), "the daemon to die", || !alive(pid));
    let status = s.env.run(&["--status", "--json"]);
    if !status.stdout.contains("\"running\":false") {
        let ps = Command::new("ps").args(["-eo", "pid,ppid,stat,args"]).output().unwrap();
        eprintln!("killed {pid}; processes:\n{}", String::from_utf8_lossy(&ps.stdout));
        eprintln!("log:\n{}", s.env.log());
    }
    status.assert_code(1, "--status after SIGKILL");
    let v: serde_json::Value = serde_json::from_str(status.stdout.trim()).unwrap();
    assert_eq!(v["daemon"]["running"], false, "{v}");
    let qr = s.env.pair_json(&s.relay, &s.backend, &[]);
    assert_eq!(qr.g, s.qr.g, "the identity must survive a killed daemon");
    assert_ne!(s.env.daemon_pid(), pid);
    assert!(read_until(&mut s.app, Duration::from_secs(10), |e| {
        matches!(e, Event::Frame(Frame::BridgeStatus { online: true }))
    }));
    let echo = fetch(&mut s.app, &request("e", "POST", "/api/echo", &[], Some("{}")));
    assert_eq!(echo.status, 200);
}

/// Expectation: the backend dies while a request is open: that request ends with one
/// `response.error` (BACKEND_UNREACHABLE); once the backend is back, requests work again.
#[test]
fn backend_killed_mid_request_gets_one_terminal_error() {
    let mut s = setup();
    let slow = request("slow-2", "GET", "/api/slow?secs=20", &[], None);
    s.app.send(&slow);
    s.backend.wait_counter("started", 1);
    s.backend.kill();
    let frames = s.app.recv_until_terminal("slow-2");
    let last = frames.last().unwrap();
    assert!(
        matches!(last, Frame::ResponseError { code: ErrorCode::BackendUnreachable, .. }),
        "{frames:?}"
    );
    s.backend.restart();
    let echo = fetch(&mut s.app, &request("e2", "POST", "/api/echo", &[], Some("{}")));
    assert_eq!(echo.status, 200);
}

/// A loopback TCP proxy that can stop forwarding without closing anything, like a network
/// that silently drops packets.
struct Partition {
    port: u16,
    frozen: Arc<AtomicBool>,
}

impl Partition {
    fn start(target: u16) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    let f = f.clone();
                    thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            // While frozen, bytes vanish: no FIN, no RST, just silence.
                            if !f.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Partition { port, frozen }
    }
}

/// Expectation: the relay socket silently stops carrying bytes. The daemon detects it by its
/// pong deadline (45 s) and reconnects; the relay closes the dead socket as idle (60 s); the
/// app hears `bridge.status` offline, then online again once the path heals.
#[test]
fn silent_partition_is_detected_by_pings_and_healed() {
    let relay = Relay::new();
    let proxy = Partition::start(relay.port());
    let public = format!("http://127.0.0.1:{}", proxy.port);
    // The relay advertises the proxy, so the daemon's socket runs through it.
    let mut relay = relay;
    relay.restart_with(&["--public-url", &public]);
    let backend = Backend::start();
    let env = Env::new();
    let run = env.run(&["--json", "--server", &public, "--port", &backend.port.to_string()]);
    run.assert_code(0, "pairing through the proxy");
    let qr = parse_payload(&run.stdout, &public);
    // The app talks to the relay directly; only the bridge's path is cut.
    let direct = format!("{}/ws/app?bridgeId={}", relay.url().replace("http://", "ws://"), qr.g);
    let v = Registry::new(&relay.url()).verify_ok(&qr.g, &qr.a, "phone");
    let mut app = AppClient::connect_url(&direct, &v.client_secret).unwrap();
    app.expect_bridge_status(true);
    let cut = Instant::now();
    proxy.frozen.store(true, Ordering::SeqCst);
    assert!(
        read_until(&mut app, Duration::from_secs(75), |e| {
            matches!(e, Event::Frame(Frame::BridgeStatus { online: false }))
        }),
        "the relay never noticed the dead bridge socket"
    );
    eprintln!("relay noticed the partition after {:?}", cut.elapsed());
    // Heal: new connections pass; the daemon (which noticed by itself) reconnects.
    proxy.frozen.store(false, Ordering::SeqCst);
    assert!(
        read_until(&mut app, Duration::from_secs(40), |e| {
            matches!(e, Event::Frame(Frame::BridgeStatus { online: true }))
        }),
        "the daemon did not reconnect after the partition healed"
    );
    eprintln!("back online {:?} after the cut", cut.elapsed());
    let log = env.log();
    assert!(log.contains("no traffic or pong from the relay"), "{log}");
    let echo = fetch(&mut app, &request("p", "POST", "/api/echo", &[], Some("{}")));
    assert_eq!(echo.status, 200);
}

/// Expectation: a daemon paused for 90 s (SIGSTOP, as a sleeping laptop) and resumed recovers
/// on its own: the relay drops it as idle meanwhile, and after SIGCONT it reconnects.
#[test]
fn daemon_paused_90s_recovers_on_its_own() {
    let mut s = setup();
    let pid = s.env.daemon_pid();
    signal(pid, "-STOP");
    assert!(
        read_until(&mut s.app, Duration::from_secs(80), |e| {
            matches!(e, Event::Frame(Frame::BridgeStatus { online: false }))
        }),
        "the relay kept a frozen bridge online"
    );
    // The relay noticed after about 60 s; stay paused for 90 s in all.
    thread::sleep(Duration::from_secs(25));
    signal(pid, "-CONT");
    let resumed = Instant::now();
    assert!(
        read_until(&mut s.app, Duration::from_secs(45), |e| {
            matches!(e, Event::Frame(Frame::BridgeStatus { online: true }))
        }),
        "the resumed daemon did not come back"
    );
    eprintln!("recovered {:?} after SIGCONT", resumed.elapsed());
    assert_eq!(s.env.daemon_pid(), pid, "the same daemon recovered");
    let echo = fetch(&mut s.app, &request("z", "POST", "/api/echo", &[], Some("{}")));
    assert_eq!(echo.status, 200);
}

/// Expectation: when `bridge.json` cannot be written (read-only state directory), the command
/// fails with a message naming the cause and the next step, before it registers anything, and
/// the old file survives byte for byte.
#[test]
fn unwritable_state_dir_keeps_the_old_identity_intact() {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    env.pair_json(&relay, &backend, &[]);
    env.run(&["--stop"]).assert_code(0, "--stop");
    let before = std::fs::read(env.home.join("bridge.json")).unwrap();
    // A different registry forces a new registration, which must write bridge.json.
    let other = Relay::new();
    let port = backend.port.to_string();
    let run = with_immutable_dir(&env.home, || {
        env.run(&["--json", "--server", &other.url(), "--port", &port])
    });
    let Some(run) = run else { return };
    run.assert_code(1, "pairing with a read-only state directory");
    assert!(run.all().contains("cannot write in the state directory"), "{}", run.all());
    assert!(run.all().contains("HERMESCHAT_HOME"), "no next step: {}", run.all());
    let after = std::fs::read(env.home.join("bridge.json")).unwrap();
    assert_eq!(before, after, "the old bridge.json was damaged");
    let leftovers: Vec<_> = std::fs::read_dir(&env.home)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files were left behind: {leftovers:?}");
}

// =============================================================================================
// The Hermes gateway killed mid-stream (app → relay → daemon → built-in backend → stub gateway)

/// A `POST /api/chat` frame (streaming) for `model` (None: the stub's normal 5-chunk answer).
fn chat(id: &str, model: Option<&str>) -> Frame {
    let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    request(
        id,
        "POST",
        "/api/chat",
        &[("Content-Type", "application/json")],
        Some(&body.to_string()),
    )
}

/// The text of a `response.chunk`.
fn chunk_text(body: &str, body_base64: bool) -> String {
    if body_base64 { String::from_utf8_lossy(&unb64(body)).into_owned() } else { body.to_owned() }
}

/// Expectation: the Hermes gateway dies (SIGKILL) while a chat is streaming through the
/// built-in backend, after the first chunk has reached the app. The app gets exactly one
/// terminal frame for that request within 10 s — `response.end` after an SSE `error` event, or
/// `response.error` — and nothing for it afterwards; the daemon keeps running with the same pid
/// and the app socket stays open; once the gateway is started again from the app
/// (`/api/gateway/restart?action=start`), a new chat streams normally.
#[test]
fn gateway_killed_mid_stream_ends_the_chat_with_one_terminal_frame() {
    let relay = Relay::new();
    let gw_port = free_port();
    let u = stub_user("fault-gw", gw_port);
    let (qr, run) = u.pair(&relay.url(), free_port());
    assert!(run.stdout.contains("Hermes Gateway started"), "{}", run.stdout);
    let mut app = gatewaykit::connect_app(&qr);
    let daemon_pid: u32 = std::fs::read_to_string(u.state.join("bridge.pid"))
        .expect("bridge.pid")
        .trim()
        .parse()
        .unwrap();
    assert!(alive(daemon_pid));

    // The whole path works before the fault.
    let r = app_fetch(&mut app, &chat("c0", None), Duration::from_secs(20));
    assert_eq!(sse_content(&r.text()), "Hello from the stub gateway.", "{r:?}");

    let gw_pid = u.gateway_pid().expect("the wake chain recorded no gateway pid");
    let cmdline = std::fs::read(format!("/proc/{gw_pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("stub_gateway.py"),
        "gateway.pid {gw_pid} is not the stub gateway"
    );

    // A stream that stays open: the stub sends the role chunk, then holds the socket.
    app.send(&chat("k1", Some("stub-hang")));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut frames = Vec::new();
    let mut body = String::new();
    while !body.contains("\"role\": \"assistant\"") {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the first chunk never reached the app: {frames:?}");
        match app.next_event(left) {
            Event::Frame(f) if f.request_id() == Some("k1") => {
                assert!(!f.is_terminal(), "k1 ended before the gateway was killed: {f:?}");
                if let Frame::ResponseChunk { body: b, body_base64, .. } = &f {
                    body.push_str(&chunk_text(b, *body_base64));
                }
                frames.push(f);
            }
            Event::Frame(_) | Event::Timeout => {}
            other => panic!("waiting for the first chunk of k1: {other:?}"),
        }
    }
    assert!(matches!(frames.first(), Some(Frame::ResponseStart { status: 200, .. })), "{frames:?}");
    let (_, _, stats) = gatewaykit::http(gw_port, "GET", "/stub/stats", &[], b"");
    let stats: Value = serde_json::from_slice(&stats).unwrap();
    assert_eq!(stats["hang_started"], 1, "{stats}");

    // Kill the gateway mid-stream.
    let killed = Instant::now();
    signal(gw_pid as u32, "-KILL");
    let mut terminal = None;
    while terminal.is_none() {
        let left = Duration::from_secs(10).saturating_sub(killed.elapsed());
        assert!(
            !left.is_zero(),
            "no terminal frame for k1 within 10 s of the kill: {frames:?}\nserver.log:\n{}",
            u.server_log()
        );
        match app.next_event(left) {
            Event::Frame(f) if f.request_id() == Some("k1") => {
                if let Frame::ResponseChunk { body: b, body_base64, .. } = &f {
                    body.push_str(&chunk_text(b, *body_base64));
                }
                if f.is_terminal() {
                    terminal = Some((killed.elapsed(), f.clone()));
                }
                frames.push(f);
            }
            Event::Frame(_) | Event::Timeout => {}
            other => panic!("app socket after the gateway kill: {other:?} (k1 so far {frames:?})"),
        }
    }
    let (took, last) = terminal.unwrap();
    let kind = match &last {
        Frame::ResponseEnd { .. } => {
            let err = sse_error(&body)
                .unwrap_or_else(|| panic!("response.end without an SSE error event: {body:?}"));
            format!("response.end after an SSE error event ({err})")
        }
        Frame::ResponseError { code, message, .. } => {
            format!("response.error {code:?}: {message}")
        }
        other => panic!("k1 ended with {other:?}: {frames:?}"),
    };
    eprintln!("gateway SIGKILL -> terminal frame of the open chat in {took:?}: {kind}");
    // The message names the component that failed: the gateway, not the built-in backend.
    assert!(kind.contains("Hermes gateway"), "the error does not name the gateway: {kind}");
    assert!(sse_content(&body).is_empty(), "the hung stream carried content: {body:?}");

    // Nothing more for k1: no second terminal frame.
    let quiet = Instant::now() + Duration::from_secs(2);
    while let Some(left) = quiet.checked_duration_since(Instant::now()) {
        match app.next_event(left) {
            Event::Frame(f) if f.request_id() == Some("k1") => {
                panic!("a frame for k1 after its terminal frame: {f:?} (before: {frames:?})")
            }
            Event::Frame(_) => {}
            Event::Timeout => break,
            other => panic!("app socket after the terminal frame: {other:?}"),
        }
    }

    // The gateway is gone; the daemon is not.
    wait_for(Duration::from_secs(5), "the gateway to die", || !alive(gw_pid as u32));
    assert!(alive(daemon_pid), "the daemon died with the gateway\n{}", u.server_log());
    let status = u.run(&["--status", "--json"]);
    let v: Value = serde_json::from_str(status.stdout.trim())
        .unwrap_or_else(|e| panic!("--status --json ({e}): {}{}", status.stdout, status.stderr));
    assert_eq!(v["daemon"]["running"], true, "{v}");
    assert_eq!(v["daemon"]["pid"], daemon_pid, "{v}");
    assert_eq!(v["relay"]["connected"], true, "{v}");
    assert_eq!(v["gateway"]["state"], "offline", "{v}");
    // While it is down, a chat is an SSE error event at once, on the same app socket.
    let r = app_fetch(&mut app, &chat("c1", None), Duration::from_secs(20));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(sse_error(&r.text()).expect("error event")["code"], "gateway_offline", "{r:?}");

    // Start it again from the app; chat streams normally.
    let v = app_fetch(
        &mut app,
        &request("s1", "POST", "/api/gateway/restart?action=start", &[], None),
        Duration::from_secs(40),
    )
    .json();
    assert_eq!((v["ok"].as_bool(), v["gateway"].as_str()), (Some(true), Some("online")), "{v}");
    let r = app_fetch(&mut app, &chat("c2", None), Duration::from_secs(20));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(sse_content(&r.text()), "Hello from the stub gateway.", "{r:?}");
    assert!(r.pieces.len() >= 5, "not chunk by chunk: {} pieces", r.pieces.len());
    assert_ne!(u.gateway_pid(), Some(gw_pid), "the restart reused the killed pid");
    assert!(alive(daemon_pid), "the daemon changed during the test");
}

/// What an HTTPS server on the backend's port sends back to a plain HTTP request.
#[derive(Clone, Copy)]
enum PlainAnswer {
    /// Nothing: the connection is closed (OpenSSL behind uvicorn, Node, `openssl s_server`).
    Close,
    /// nginx's 400 page for an `ssl` port.
    NginxPage,
}

/// An HTTPS server on loopback `port`, as a backend configured with a certificate is: a
/// ClientHello gets a real TLS handshake (the test certificate), plain HTTP gets `plain`.
fn https_backend(port: u16, dir: &Path, plain: PlainAnswer) {
    let (cert, key) = common::make_cert(dir);
    let identity = native_tls::Identity::from_pkcs8(
        &std::fs::read(cert).unwrap(),
        &std::fs::read(key).unwrap(),
    )
    .unwrap();
    let acceptor = native_tls::TlsAcceptor::new(identity).unwrap();
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut first = [0u8; 1];
            if stream.peek(&mut first).is_ok_and(|n| n == 1) && first[0] == 0x16 {
                let _ = acceptor.accept(stream);
                continue;
            }
            let mut s = stream;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            if let PlainAnswer::NginxPage = plain {
                let body = "<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS \
                            port</title></head>\r\n</html>\r\n";
                let _ = write!(
                    s,
                    "HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Type: text/html\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        }
    });
}

/// Expectation: the backend on the bridge's port starts speaking HTTPS (a certificate added to
/// its configuration). The app's request ends in BACKEND_UNREACHABLE whose message says the
/// backend speaks HTTPS and what to do; the daemon's log says the same, and so does
/// `--doctor`; pairing against another such backend (nginx's 400 page this time) refuses with
/// it, before anything is registered.
#[test]
fn a_backend_that_speaks_https_is_named_as_such() {
    let mut s = setup();
    let port = s.backend.port;
    s.backend.kill();
    https_backend(port, &common::fresh_dir("https-backend"), PlainAnswer::Close);

    s.app.send(&request("tls-1", "GET", "/api/health", &[], None));
    let frames = s.app.recv_until_terminal("tls-1");
    match frames.last() {
        Some(Frame::ResponseError { code: ErrorCode::BackendUnreachable, message, .. }) => {
            assert!(
                message.contains(&format!("the backend at 127.0.0.1:{port} speaks HTTPS"))
                    && message.contains("serve it over plain HTTP on loopback"),
                "{message}"
            );
        }
        other => panic!("expected BACKEND_UNREACHABLE, got {other:?}"),
    }
    // The daemon's health probe, every 5 s.
    wait_for(Duration::from_secs(15), "the daemon's log to name HTTPS", || {
        s.env.log().contains(&format!("the backend at 127.0.0.1:{port} speaks HTTPS"))
    });

    let doctor = s.env.run(&["--doctor", "--json"]);
    let report: Value = serde_json::from_str(doctor.stdout.trim()).unwrap();
    let hop = report["hops"].as_array().unwrap().iter().find(|h| h["id"] == "backend").unwrap();
    assert_eq!(hop["state"], "fail", "{hop}");
    assert!(hop["detail"].as_str().unwrap().contains("speaks HTTPS"), "{hop}");
    assert!(hop["fix"].as_str().unwrap().contains("serve it over plain HTTP"), "{hop}");

    let nginx = free_port();
    https_backend(nginx, &common::fresh_dir("https-nginx"), PlainAnswer::NginxPage);
    let run = s.env.run(&["--server", &s.relay.url(), "--port", &nginx.to_string(), "--no-server"]);
    run.assert_code(1, "pairing against an HTTPS backend");
    assert!(
        run.all().contains(&format!("the backend at 127.0.0.1:{nginx} speaks HTTPS")),
        "{}",
        run.all()
    );
}
