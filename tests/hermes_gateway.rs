//! End to end against the REAL Hermes Agent gateway (PyPI `hermes-agent==0.19.0` + `aiohttp`),
//! offline, with a stub LLM (`tests/fixtures/stub_llm.py`) as its model provider:
//! app test client → relay → daemon → built-in backend → gateway → stub.
//!
//! Needs `HERMESCHAT_TEST_HERMES=1` and a venv with hermes-agent and aiohttp in `HERMES_VENV`
//! (default `target/hermes-venv`; `.ci/run` creates it). Without the switch every test here
//! prints why it is skipped and passes.
//!
//! `bench_chat_ttfb` (ignored; run by `scripts/bench-chat`) measures the time to the first
//! SSE byte through the whole path against calling the gateway directly, in the same run.

mod common;
mod gatewaykit;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AppClient, Event, Relay};
use gatewaykit::{
    KEY, StubGateway, User, app_fetch, connect_app, free_port, request, sse_content, sse_error,
};
use hermeschat_pair::bridge::local_http::{Abort, Body, LocalClient};
use hermeschat_pair::protocol::Frame;
use serde_json::json;

/// The stub LLM script.
const STUB_LLM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stub_llm.py");

/// The reply of the stub LLM.
const REPLY: &str = "Hello from the stub LLM, one word at a time.";

/// The venv with hermes-agent, or `None` (with the skip message printed) when the real-gateway
/// tests are switched off.
fn hermes_venv(test: &str) -> Option<PathBuf> {
    if std::env::var("HERMESCHAT_TEST_HERMES").ok().as_deref() != Some("1") {
        eprintln!(
            "SKIPPED {test}: set HERMESCHAT_TEST_HERMES=1 (and HERMES_VENV to a venv with \
             hermes-agent==0.19.0 and aiohttp==3.14.1) to run it against the real Hermes gateway; \
             .ci/run does"
        );
        return None;
    }
    let venv = std::env::var_os("HERMES_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/hermes-venv"))
    });
    assert!(
        venv.join("bin/python").exists(),
        "HERMESCHAT_TEST_HERMES=1 but {} has no bin/python (see .ci/run)",
        venv.display()
    );
    Some(venv)
}

/// The stub LLM process.
struct StubLlm {
    child: Child,
    port: u16,
}

impl StubLlm {
    fn start(delay_ms: u32) -> StubLlm {
        let mut child = Command::new("python3")
            .arg(STUB_LLM)
            .arg("0")
            .env("STUB_REPLY", REPLY)
            .env("STUB_DELAY_MS", delay_ms.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 stub_llm.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches("/v1").parse().ok())
            .unwrap_or_else(|| panic!("stub_llm printed {line:?}"));
        StubLlm { child, port }
    }
}

impl Drop for StubLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user with a real Hermes install (the venv linked in as `~/.hermes/hermes-agent/venv`),
/// configured offline against `llm`, API server on `gw_port`.
fn hermes_user(tag: &str, venv: &std::path::Path, llm: &StubLlm, gw_port: u16) -> User {
    let u = User::new(tag);
    let h = u.hermes();
    std::fs::write(
        h.join("config.yaml"),
        format!(
            "model:\n  provider: custom\n  default: stub-model\n  base_url: http://127.0.0.1:{}/v1\n  \
             api_key: stub-upstream-key-not-secret\n  context_length: 131072\nsecurity:\n  \
             tirith_enabled: false\nagent:\n  api_max_retries: 1\ngateway:\n  api_server:\n    \
             max_concurrent_runs: 0\n",
            llm.port
        ),
    )
    .unwrap();
    u.write_dotenv(&format!(
        "API_SERVER_ENABLED=true\nAPI_SERVER_KEY={KEY}\nAPI_SERVER_HOST=127.0.0.1\nAPI_SERVER_PORT={gw_port}\n"
    ));
    std::fs::create_dir_all(h.join("hermes-agent")).unwrap();
    std::os::unix::fs::symlink(venv, h.join("hermes-agent/venv")).unwrap();
    // No systemd user bus in CI containers; make that explicit and deterministic.
    u.script(&u.bin.join("systemctl"), "#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n");
    u
}

fn chat_frame(id: &str, text: &str) -> Frame {
    let body = json!({"model": "hermes-agent", "messages": [{"role": "user", "content": text}]});
    request(
        id,
        "POST",
        "/api/chat",
        &[("Content-Type", "application/json")],
        Some(&body.to_string()),
    )
}

#[test]
fn real_gateway_is_woken_streams_through_the_whole_path_and_restarts() {
    let Some(venv) =
        hermes_venv("real_gateway_is_woken_streams_through_the_whole_path_and_restarts")
    else {
        return;
    };
    let llm = StubLlm::start(30);
    let gw_port = free_port();
    let u = hermes_user("hermes-e2e", &venv, &llm, gw_port);
    let relay = Relay::new();
    let t0 = Instant::now();
    let (qr, run) = u.pair(&relay.url(), free_port());
    eprintln!("pairing with a cold gateway start took {:?}", t0.elapsed());
    assert!(
        run.stdout.contains(&format!(
            "Hermes Gateway started (via the Hermes venv) (127.0.0.1:{gw_port})"
        )),
        "{}\n--- gateway.log:\n{}",
        run.stdout,
        u.gateway_log()
    );
    let mut app = connect_app(&qr);

    // The first turn imports the agent lazily (seconds); then a streamed chat, chunk by chunk.
    let r = app_fetch(&mut app, &chat_frame("warm", "warm up"), Duration::from_secs(60));
    assert_eq!(sse_content(&r.text()), REPLY, "{r:?}\n{}", u.gateway_log());
    let r = app_fetch(&mut app, &chat_frame("c1", "Say hi"), Duration::from_secs(60));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("x-hermeschat-backend"), Some("gateway"));
    assert!(r.header("x-hermes-session-id").is_some_and(|s| !s.is_empty()), "{r:?}");
    assert_eq!(sse_content(&r.text()), REPLY, "{r:?}");
    let content_pieces = r.pieces.iter().filter(|(_, t)| t.contains("\"content\"")).count();
    assert!(content_pieces >= 5, "not chunk by chunk: {:?}", r.pieces);
    let span = r.pieces.last().unwrap().0 - r.pieces[0].0;
    assert!(span >= Duration::from_millis(150), "pieces arrived together ({span:?})");

    // /v1 passthrough with the key added by the backend.
    let r =
        app_fetch(&mut app, &request("m", "GET", "/v1/models", &[], None), Duration::from_secs(10));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.text().contains("hermes-agent"), "{r:?}");

    // Stop it from the app: chat becomes an SSE error event.
    let v = app_fetch(
        &mut app,
        &request("stop", "POST", "/api/gateway/restart?action=stop", &[], None),
        Duration::from_secs(60),
    )
    .json();
    assert_eq!((v["ok"].as_bool(), v["gateway"].as_str()), (Some(true), Some("offline")), "{v}");
    let r = app_fetch(&mut app, &chat_frame("c2", "anyone?"), Duration::from_secs(30));
    assert_eq!(r.status, 200);
    assert_eq!(sse_error(&r.text()).expect("error event")["code"], "gateway_offline", "{r:?}");

    // Bring it back from the app.
    let t1 = Instant::now();
    let v = app_fetch(
        &mut app,
        &request("start", "POST", "/api/gateway/restart?action=start", &[], None),
        Duration::from_secs(60),
    )
    .json();
    eprintln!("restart endpoint brought the gateway back in {:?}", t1.elapsed());
    assert_eq!((v["ok"].as_bool(), v["startedVia"].as_str()), (Some(true), Some("venv")), "{v}");
    assert!(!v["log"].as_str().unwrap_or("").is_empty(), "{v}");
    let r = app_fetch(&mut app, &chat_frame("c3", "back?"), Duration::from_secs(60));
    assert_eq!(sse_content(&r.text()), REPLY, "{r:?}");

    // The real gateway's answer to the key: --status says ✓ while it accepts it; with the key
    // changed in .env while the gateway runs with the old one, ⚠ naming .env, and chat's
    // gateway_auth error names it too.
    let online = format!("Hermes Gateway online (127.0.0.1:{gw_port})");
    let run = u.run(&["--status"]);
    assert!(run.stdout.contains(&format!("✓ {online}")), "{}", run.stdout);
    let env_file = u.hermes().join(".env");
    let good = std::fs::read_to_string(&env_file).unwrap();
    std::fs::write(&env_file, good.replace(KEY, "changed-key-0123456789abcdef")).unwrap();
    let t = Instant::now();
    let run = u.run(&["--status"]);
    eprintln!("--status with the key check against the real gateway took {:?}", t.elapsed());
    let refused = format!(
        "⚠ {online}, but it refuses the key (HTTP 401) from API_SERVER_KEY in {}",
        env_file.display()
    );
    assert!(run.stdout.contains(&refused), "{}", run.stdout);
    // The backend re-reads the configuration every 2 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let r = app_fetch(&mut app, &chat_frame("auth", "key?"), Duration::from_secs(30));
        if let Some(err) = sse_error(&r.text()).filter(|e| e["code"] == "gateway_auth") {
            break err;
        }
        assert!(Instant::now() < deadline, "chat never reported the refused key: {r:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let source = format!("API_SERVER_KEY in {}", env_file.display());
    assert!(err["message"].as_str().unwrap().contains(&source), "{err}");
    std::fs::write(&env_file, good).unwrap();

    let v = app_fetch(
        &mut app,
        &request("bye", "POST", "/api/gateway/restart?action=stop", &[], None),
        Duration::from_secs(60),
    )
    .json();
    assert_eq!(v["ok"], true, "{v}");
    assert!(!u.server_log().contains(KEY) && !u.gateway_log().contains(KEY), "the key leaked");
}

// =============================================================================================
// Benchmark: time to first SSE byte, whole path vs the gateway directly

/// Time from sending a chat to the gateway directly until its first body byte.
fn direct_ttfb(client: &LocalClient, body: &[u8]) -> Duration {
    let headers = [
        ("Content-Type".to_owned(), "application/json".to_owned()),
        ("Authorization".to_owned(), format!("Bearer {KEY}")),
    ];
    let t0 = Instant::now();
    let mut r = client
        .send("POST", "/v1/chat/completions", &headers, Body::Bytes(body), &Abort::new())
        .unwrap();
    let mut buf = [0u8; 16 << 10];
    let n = r.body.read(&mut buf).unwrap();
    let ttfb = t0.elapsed();
    assert!(n > 0 && r.status == 200);
    let mut rest = Vec::new();
    r.body.read_to_end(&mut rest).unwrap();
    ttfb
}

/// Time from the app sending a chat until the first `response.chunk` arrives.
fn path_ttfb(app: &mut AppClient, id: &str, body: &str) -> Duration {
    let f = request(id, "POST", "/api/chat", &[("Content-Type", "application/json")], Some(body));
    let t0 = Instant::now();
    app.send(&f);
    let mut first = None;
    loop {
        match app.next_event(Duration::from_secs(60)) {
            Event::Frame(Frame::ResponseChunk { id: got, .. }) if got == id => {
                first.get_or_insert_with(|| t0.elapsed());
            }
            Event::Frame(Frame::ResponseEnd { id: got, .. }) if got == id => break,
            Event::Frame(Frame::ResponseStart { .. }) => {}
            other => panic!("bench {id}: {other:?}"),
        }
    }
    first.expect("no chunk")
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs `n` interleaved pairs and prints the figures.
fn measure(label: &str, app: &mut AppClient, gw_port: u16, body: &str, n: usize) {
    let client = LocalClient::new("127.0.0.1", gw_port);
    // The same chat as /api/chat sends it on: streamed.
    let mut direct: serde_json::Value = serde_json::from_str(body).unwrap();
    direct["stream"] = json!(true);
    let direct = direct.to_string();
    for i in 0..3 {
        direct_ttfb(&client, direct.as_bytes());
        path_ttfb(app, &format!("warm{label}{i}"), body);
    }
    let (mut d, mut p, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let a = direct_ttfb(&client, direct.as_bytes());
        let b = path_ttfb(app, &format!("b{label}{i}"), body);
        d.push(a);
        p.push(b);
        diff.push(b.saturating_sub(a));
    }
    d.sort();
    p.sort();
    diff.sort();
    println!(
        "BENCH {label}: n={n} direct TTFB p50 {:.2} ms p90 {:.2} ms | whole path p50 {:.2} ms p90 \
         {:.2} ms | added at p50 {:.2} ms (p50 of per-pair differences {:.2} ms, p90 {:.2} ms)",
        pct(&d, 0.5),
        pct(&d, 0.9),
        pct(&p, 0.5),
        pct(&p, 0.9),
        pct(&p, 0.5) - pct(&d, 0.5),
        pct(&diff, 0.5),
        pct(&diff, 0.9),
    );
}

#[test]
#[ignore = "benchmark: run scripts/bench-chat"]
fn bench_chat_ttfb() {
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let body = json!({"model": "hermes-agent", "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let relay = Relay::new();
    {
        // The stub gateway: isolates what relay + bridge + backend add.
        let gw_port = free_port();
        let u = User::new("bench-stub");
        u.write_dotenv(&format!("API_SERVER_KEY={KEY}\nAPI_SERVER_PORT={gw_port}\n"));
        let _stub = StubGateway::start(gw_port, KEY);
        let (qr, _) = u.pair(&relay.url(), free_port());
        let mut app = connect_app(&qr);
        measure("stub-gateway", &mut app, gw_port, &body, n);
    }
    let Some(venv) = hermes_venv("bench_chat_ttfb (real gateway part)") else { return };
    let llm = StubLlm::start(0);
    let gw_port = free_port();
    let u = hermes_user("bench-hermes", &venv, &llm, gw_port);
    let (qr, _) = u.pair(&relay.url(), free_port());
    let mut app = connect_app(&qr);
    measure("real-hermes-gateway", &mut app, gw_port, &body, n);
    let _ = app_fetch(
        &mut app,
        &request("bye", "POST", "/api/gateway/restart?action=stop", &[], None),
        Duration::from_secs(60),
    );
}
