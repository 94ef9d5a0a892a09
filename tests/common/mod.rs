//! Test harness for the end-to-end tests of `hermeschat-relay`: a [`Relay`] process wrapper, a
//! registry client ([`Registry`]), an app test client ([`AppClient`]) and a bridge test peer
//! ([`BridgePeer`] / [`ServedBridge`]). Everything talks to the real binary over loopback.
//!
//! Read timeouts are used freely here: they only bound how long a test waits.

#![allow(dead_code)]

pub mod session;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hermeschat_pair::protocol::{
    AccessCodeResponse, ErrorCode, Frame, Headers, ProbeClientResponse, RegisterResponse,
    RequestFrame, ResponseFrame, VerifyResponse,
};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocket;
use tungstenite::{HandshakeError, Message};

/// How long a test waits for one frame before it fails.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Rate limits high enough that ordinary tests never hit them.
pub const HIGH_RATES: &[&str] = &["--rate-register", "10000", "--rate-verify", "10000"];

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A fresh, unique directory under the system temp dir.
pub fn fresh_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let dir = std::env::temp_dir()
        .join(format!("hermeschat-relay-test-{}-{tag}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic-enough pseudo random bytes (xorshift64*), seeded from the clock.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut x = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64)
        ^ 0x9E37_79B9_7F4A_7C15
        ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0xA24B_AED4_963E_E407);
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A process's resident set (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().to_owned();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A process's peak resident set so far (`VmHWM`), KiB.
pub fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_owned();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Polls `pid`'s resident set for up to 10 s until it is less than `limit_kib` above
/// `before_kib`; returns the growth last seen (KiB).
pub fn rss_growth_settles(pid: u32, before_kib: u64, limit_kib: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let grown = rss_kib(pid).saturating_sub(before_kib);
        if grown < limit_kib || Instant::now() > deadline {
            return grown;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("body is not valid base64: {e}"))
}

// =============================================================================================
// Relay process

/// Shared, growing list of the relay's stderr lines (and a condvar rung on each new line).
type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// One `hermeschat-relay` process with its own data directory.
pub struct Relay {
    child: Option<Child>,
    pub data_dir: PathBuf,
    /// `127.0.0.1:PORT` as logged in the `listening` line.
    pub addr: String,
    extra: Vec<String>,
    /// Environment variables set for the relay (on top of the test's own).
    env: Vec<(String, String)>,
    /// stderr lines of every incarnation of this relay (restarts append).
    logs: Lines,
    /// stdout lines (the relay must print nothing there).
    stdout: Lines,
    readers: Vec<JoinHandle<()>>,
}

/// The relay under test.
pub fn bin_path() -> &'static str {
    static RELAY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        our_binary("hermeschat-relay", env!("CARGO_BIN_EXE_hermeschat-relay"))
    });
    &RELAY
}

/// One of our binaries: `$HERMESCHAT_TEST_BIN_DIR/<name>` when that is set (CI runs the tests
/// of large transfers on the static build this way: its allocator is its own, see
/// `src/memory.rs`), else `built`, the one Cargo built for the tests.
pub fn our_binary(name: &str, built: &str) -> String {
    match std::env::var_os("HERMESCHAT_TEST_BIN_DIR") {
        Some(dir) => {
            let path = PathBuf::from(dir).join(name);
            assert!(path.is_file(), "HERMESCHAT_TEST_BIN_DIR has no {name}: {}", path.display());
            path.to_string_lossy().into_owned()
        }
        None => built.to_owned(),
    }
}

fn drain<R: Read + Send + 'static>(r: R, lines: Lines) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line =
                        String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned();
                    let (m, cv) = &*lines;
                    m.lock().unwrap().push(line);
                    cv.notify_all();
                }
            }
        }
    })
}

impl Relay {
    /// Starts a relay on `127.0.0.1:0` with high rate limits and `extra` flags.
    pub fn start(extra: &[&str]) -> Relay {
        Relay::start_on("127.0.0.1:0", extra)
    }

    /// Starts a relay listening on `listen` with high rate limits and `extra` flags.
    pub fn start_on(listen: &str, extra: &[&str]) -> Relay {
        Relay::start_env(listen, &[], extra)
    }

    /// Starts a relay listening on `listen` with the environment variables `env` set, high
    /// rate limits and `extra` flags.
    pub fn start_env(listen: &str, env: &[(&str, &str)], extra: &[&str]) -> Relay {
        let mut all: Vec<String> = HIGH_RATES.iter().map(|s| s.to_string()).collect();
        // Later flags win for a typical CLI parser, but to be safe drop the defaults that the
        // caller overrides.
        for flag in ["--rate-register", "--rate-verify"] {
            if extra.contains(&flag)
                && let Some(i) = all.iter().position(|a| a == flag)
            {
                all.drain(i..i + 2);
            }
        }
        all.extend(extra.iter().map(|s| s.to_string()));
        let mut relay = Relay {
            child: None,
            data_dir: fresh_dir("data"),
            addr: String::new(),
            extra: all,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            logs: Arc::new((Mutex::new(Vec::new()), Condvar::new())),
            stdout: Arc::new((Mutex::new(Vec::new()), Condvar::new())),
            readers: Vec::new(),
        };
        relay.spawn(listen);
        relay
    }

    /// Starts a relay with default (high) rate limits.
    pub fn new() -> Relay {
        Relay::start(&[])
    }

    fn spawn(&mut self, listen: &str) {
        let first_line = self.logs.0.lock().unwrap().len();
        let mut child = Command::new(bin_path())
            .arg("--listen")
            .arg(listen)
            .arg("--data")
            .arg(&self.data_dir)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin_path()));
        self.readers.push(drain(child.stderr.take().unwrap(), self.logs.clone()));
        self.readers.push(drain(child.stdout.take().unwrap(), self.stdout.clone()));
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(10);
        let (m, cv) = &*self.logs;
        let mut lines = m.lock().unwrap();
        loop {
            for line in &lines[first_line..] {
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && v["event"] == "listening"
                {
                    let addr = v["addr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("listening line has no string addr: {line}"));
                    self.addr = addr.to_owned();
                    return;
                }
            }
            let now = Instant::now();
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if now >= deadline || exited.is_some() {
                let collected = lines.join("\n");
                drop(lines);
                self.kill();
                panic!(
                    "relay did not print a {{\"event\":\"listening\"}} line within 10 s \
                     (exit status: {exited:?}); stderr so far:\n{collected}"
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            lines = cv.wait_timeout(lines, wait).unwrap().0;
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn app_ws_url(&self, bridge_id: &str) -> String {
        format!("ws://{}/ws/app?bridgeId={bridge_id}", self.addr)
    }

    pub fn bridge_ws_url(&self, bridge_id: &str) -> String {
        format!("ws://{}/ws/bridge?bridgeId={bridge_id}", self.addr)
    }

    pub fn registry(&self) -> Registry {
        Registry::new(&self.url())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay not running").id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// SIGTERM, then wait (at most 10 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("relay not running");
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "relay did not exit within 10 s of SIGTERM; stderr:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        status
    }

    /// SIGKILL, then start again on the same data dir and the same port.
    /// Restarts on the same port and data directory with `extra` flags added.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self.restart();
    }

    pub fn restart(&mut self) {
        self.kill();
        let listen = self.addr.clone();
        // The port was just released; retry briefly in case the OS is slow to free it.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if std::net::TcpListener::bind(&listen).is_ok() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn(&listen);
        assert_eq!(self.addr, listen, "restarted relay did not keep its port");
    }

    /// Every stderr line so far (all incarnations).
    pub fn logs(&self) -> Vec<String> {
        self.logs.0.lock().unwrap().clone()
    }

    /// The JSON log lines so far whose `event` is `event`.
    pub fn events(&self, event: &str) -> Vec<Value> {
        let lines = self.logs.0.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits (at most 5 s) for a JSON log line with `event` for which `pred` holds, and
    /// returns it; fails the test naming `what` otherwise.
    #[track_caller]
    pub fn wait_event(&self, event: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + RECV_TIMEOUT;
        let (m, cv) = &*self.logs;
        let mut lines = m.lock().unwrap();
        loop {
            let found = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["event"] == event && pred(v));
            if let Some(v) = found {
                return v;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("no {event} log line {what}; log:\n{}", lines.join("\n"));
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Every stdout line so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.0.lock().unwrap().clone()
    }

    /// SIGTERM (asserting exit 0, so every log line is flushed), then asserts no log line holds
    /// any of `secrets`.
    #[track_caller]
    pub fn stop_and_check_logs(&mut self, secrets: &[&str]) {
        let status = self.terminate();
        assert_eq!(status.code(), Some(0), "relay exit status on SIGTERM");
        let mut all: Vec<&str> = Vec::new();
        for s in secrets {
            all.push(s);
            // the bare hex part of a prefixed secret must not appear either
            if let Some(hex) = s.strip_prefix("hrs_").or_else(|| s.strip_prefix("hcs_")) {
                all.push(hex);
            }
        }
        self.assert_no_secret_in_logs(&all);
    }

    /// Panics when any log line contains one of `secrets`.
    pub fn assert_no_secret_in_logs(&self, secrets: &[&str]) {
        for line in self.logs() {
            for s in secrets {
                assert!(!s.is_empty());
                assert!(
                    !line.contains(s),
                    "a secret ({}…) appears in a relay log line: {line}",
                    &s[..s.len().min(8)]
                );
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

// =============================================================================================
// Registry client

/// A full HTTP answer.
#[derive(Debug)]
pub struct HttpResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub raw: String,
    /// `raw` parsed as JSON, or `Value::Null` when it is not JSON.
    pub body: Value,
}

impl HttpResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `error.code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("<no error.code>")
    }
}

/// Asserts an error answer: status, `{"error":{"code","message"}}` with a non-empty message.
#[track_caller]
pub fn assert_api_error(r: &(u16, Value), status: u16, code: &str) {
    assert_eq!(
        (r.0, r.1["error"]["code"].as_str()),
        (status, Some(code)),
        "expected {status} {code}, got {} {}",
        r.0,
        r.1
    );
    let msg = r.1["error"]["message"].as_str();
    assert!(msg.is_some_and(|m| !m.is_empty()), "error body lacks a message: {}", r.1);
}

pub struct Registry {
    base: String,
    agent: ureq::Agent,
}

impl Registry {
    pub fn new(base: &str) -> Registry {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Registry { base: base.trim_end_matches('/').to_owned(), agent }
    }

    /// One call. `body` None → GET (or an empty POST when `method` is POST).
    pub fn call_full(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> HttpResp {
        self.call_with_headers(method, path, bearer, &[], body)
    }

    /// One call with extra request headers.
    pub fn call_with_headers(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> HttpResp {
        let url = format!("{}{}", self.base, path);
        let result = match method {
            "GET" => {
                let mut rq = self.agent.get(&url);
                if let Some(t) = bearer {
                    rq = rq.header("Authorization", &format!("Bearer {t}"));
                }
                for (k, v) in headers {
                    rq = rq.header(*k, *v);
                }
                rq.call()
            }
            "POST" => {
                let mut rq = self.agent.post(&url);
                if let Some(t) = bearer {
                    rq = rq.header("Authorization", &format!("Bearer {t}"));
                }
                for (k, v) in headers {
                    rq = rq.header(*k, *v);
                }
                match body {
                    Some(b) => rq.send_json(b),
                    None => rq.send_empty(),
                }
            }
            other => panic!("method {other} not supported by the test client"),
        };
        Self::finish(result, method, path)
    }

    /// POST with a raw (possibly malformed) JSON body.
    pub fn post_raw(&self, path: &str, bearer: Option<&str>, raw: &str) -> HttpResp {
        let url = format!("{}{}", self.base, path);
        let mut rq = self.agent.post(&url).header("Content-Type", "application/json");
        if let Some(t) = bearer {
            rq = rq.header("Authorization", &format!("Bearer {t}"));
        }
        Self::finish(rq.send(raw), "POST", path)
    }

    fn finish(
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        method: &str,
        path: &str,
    ) -> HttpResp {
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: transport error: {e}"));
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let raw = resp.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        HttpResp { status, headers, raw, body }
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let r = self.call_full(method, path, bearer, body);
        (r.status, r.body)
    }

    pub fn health(&self) -> (u16, Value) {
        self.call("GET", "/v1/health", None, None)
    }

    pub fn register(&self, display_name: Option<&str>) -> (u16, Value) {
        let body = match display_name {
            Some(n) => json!({"displayName": n, "version": "test"}),
            None => json!({}),
        };
        self.call("POST", "/v1/bridge/register", None, Some(&body))
    }

    #[track_caller]
    pub fn register_ok(&self, display_name: &str) -> RegisterResponse {
        let (s, v) = self.register(Some(display_name));
        assert_eq!(s, 201, "register: {v}");
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("register body {v}: {e}"))
    }

    pub fn access_code(&self, bridge_id: &str, secret: &str) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/bridge/access-code",
            Some(secret),
            Some(&json!({"bridgeId": bridge_id})),
        )
    }

    #[track_caller]
    pub fn access_code_ok(&self, bridge_id: &str, secret: &str) -> AccessCodeResponse {
        let (s, v) = self.access_code(bridge_id, secret);
        assert_eq!(s, 200, "access-code: {v}");
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("access-code body {v}: {e}"))
    }

    pub fn verify(&self, bridge_id: &str, code: &str, device: Option<&str>) -> (u16, Value) {
        let mut body = json!({"bridgeId": bridge_id, "accessCode": code});
        if let Some(d) = device {
            body["deviceName"] = json!(d);
        }
        self.call("POST", "/v1/pair/verify", None, Some(&body))
    }

    #[track_caller]
    pub fn verify_ok(&self, bridge_id: &str, code: &str, device: &str) -> VerifyResponse {
        let (s, v) = self.verify(bridge_id, code, Some(device));
        assert_eq!(s, 200, "verify: {v}");
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("verify body {v}: {e}"))
    }

    pub fn clients(&self, bridge_id: &str, secret: &str) -> (u16, Value) {
        self.call("GET", &format!("/v1/bridge/clients?bridgeId={bridge_id}"), Some(secret), None)
    }

    pub fn revoke(&self, bridge_id: &str, secret: &str, client_id: &str) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/bridge/clients/revoke",
            Some(secret),
            Some(&json!({"bridgeId": bridge_id, "clientId": client_id})),
        )
    }

    pub fn delete(&self, bridge_id: &str, secret: &str) -> (u16, Value) {
        self.call("POST", "/v1/bridge/delete", Some(secret), Some(&json!({"bridgeId": bridge_id})))
    }

    pub fn probe_client(&self, bridge_id: &str, secret: &str) -> (u16, Value) {
        self.call(
            "POST",
            "/v1/bridge/probe-client",
            Some(secret),
            Some(&json!({"bridgeId": bridge_id})),
        )
    }

    #[track_caller]
    pub fn probe_client_ok(&self, bridge_id: &str, secret: &str) -> ProbeClientResponse {
        let (s, v) = self.probe_client(bridge_id, secret);
        assert_eq!(s, 200, "probe-client: {v}");
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("probe-client body {v}: {e}"))
    }

    pub fn bridge_status(&self, bridge_id: &str, token: Option<&str>) -> (u16, Value) {
        self.call(
            "GET",
            &format!("/v1/internal/hermes/bridge-status?bridgeId={bridge_id}"),
            token,
            None,
        )
    }

    /// Waits (at most 3 s) until bridge-status says `online == want`.
    #[track_caller]
    pub fn wait_bridge_online(&self, bridge_id: &str, secret: &str, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (s, v) = self.bridge_status(bridge_id, Some(secret));
            if s == 200 && v["online"] == want {
                return;
            }
            if Instant::now() >= deadline {
                panic!("bridge-status never became online={want}: last {s} {v}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// =============================================================================================
// WebSocket plumbing

pub type Ws = WebSocket<TcpStream>;

/// Why a WebSocket connect failed.
#[derive(Debug)]
pub enum ConnectError {
    /// Refused before the upgrade with this HTTP status (and body).
    Http(u16, String),
    /// Anything else (transport, protocol).
    Other(String),
}

impl ConnectError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Http(s, _) => Some(*s),
            ConnectError::Other(_) => None,
        }
    }
}

/// Opens a WebSocket with extra request headers. The stream gets a read timeout of
/// [`RECV_TIMEOUT`] and TCP_NODELAY.
pub fn ws_connect(url: &str, headers: &[(&str, &str)]) -> Result<Ws, ConnectError> {
    let mut req = url.into_client_request().unwrap_or_else(|e| panic!("bad ws url {url}: {e}"));
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let host = req.uri().host().unwrap().to_owned();
    let port = req.uri().port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host.as_str(), port))
        .map_err(|e| ConnectError::Other(format!("tcp connect: {e}")))?;
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    // tungstenite zero-fills `read_buffer_size` bytes (128 KiB by default) before every read;
    // at 16 KiB, as the relay and the daemon use, a test or bench client costs the shared cores
    // about 4 µs less per frame it receives (docs/PERFORMANCE.md, stop 17).
    let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10);
    match tungstenite::client::client_with_config(req, stream, Some(config)) {
        Ok((ws, _resp)) => Ok(ws),
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err(ConnectError::Http(resp.status().as_u16(), body))
        }
        Err(HandshakeError::Failure(e)) => Err(ConnectError::Other(e.to_string())),
        Err(HandshakeError::Interrupted(_)) => {
            Err(ConnectError::Other("handshake timed out".into()))
        }
    }
}

/// What one read produced.
#[derive(Debug)]
pub enum Event {
    Frame(Frame),
    /// A text message that does not parse as a [`Frame`].
    Text(String),
    Binary(Vec<u8>),
    /// A close frame (code, reason) or a closed connection (None).
    Closed(Option<u16>),
    Timeout,
}

fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io)
        if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// Reads one data message (pings/pongs are handled underneath), waiting at most `timeout`.
pub fn ws_read(ws: &mut Ws, timeout: Duration) -> Event {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Event::Timeout;
        }
        let _ = ws.get_mut().set_read_timeout(Some(left));
        match ws.read() {
            Ok(Message::Text(t)) => {
                return match serde_json::from_str::<Frame>(t.as_str()) {
                    Ok(f) => Event::Frame(f),
                    Err(_) => Event::Text(t.as_str().to_owned()),
                };
            }
            Ok(Message::Binary(b)) => return Event::Binary(b.to_vec()),
            Ok(Message::Close(cf)) => return Event::Closed(cf.map(|c| u16::from(c.code))),
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => return Event::Timeout,
            Err(_) => return Event::Closed(None),
        }
    }
}

/// Reads until the socket closes and returns the close code (None: closed without a code).
/// Data frames on the way are returned too.
#[track_caller]
pub fn ws_wait_close(ws: &mut Ws, timeout: Duration) -> (Option<u16>, Vec<Event>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_read(ws, left) {
            Event::Closed(code) => return (code, seen),
            Event::Timeout => panic!("socket not closed within {timeout:?}; saw {seen:?}"),
            other => seen.push(other),
        }
    }
}

pub fn send_frame(ws: &mut Ws, f: &Frame) {
    ws.send(Message::text(f.to_json())).unwrap_or_else(|e| panic!("send {f:?}: {e}"));
}

/// A request frame.
pub fn req(id: &str, method: &str, path: &str, body: Option<&str>) -> Frame {
    Frame::Request(RequestFrame {
        id: id.into(),
        client: None,
        conn: None,
        method: method.into(),
        path: path.into(),
        headers: Headers::new(),
        body: body.map(Into::into),
        body_base64: false,
        length: None,
    })
}

/// A request frame with a base64 body.
pub fn req_b64(id: &str, path: &str, bytes: &[u8]) -> Frame {
    Frame::Request(RequestFrame {
        id: id.into(),
        client: None,
        conn: None,
        method: "POST".into(),
        path: path.into(),
        headers: Headers::new(),
        body: Some(b64(bytes).into()),
        body_base64: true,
        length: None,
    })
}

// =============================================================================================
// App test client

pub struct AppClient {
    pub ws: Ws,
    /// Frames read while looking for something else.
    pending: VecDeque<Frame>,
}

impl AppClient {
    pub fn connect(
        relay: &Relay,
        bridge_id: &str,
        secret: &str,
    ) -> Result<AppClient, ConnectError> {
        Self::connect_url(&relay.app_ws_url(bridge_id), secret)
    }

    pub fn connect_url(url: &str, secret: &str) -> Result<AppClient, ConnectError> {
        let auth = format!("Bearer {secret}");
        let ws = ws_connect(url, &[("Authorization", &auth)])?;
        Ok(AppClient { ws, pending: VecDeque::new() })
    }

    /// Connects and asserts the first frame is `bridge.status` with `online`.
    #[track_caller]
    pub fn connect_ok(relay: &Relay, bridge_id: &str, secret: &str, online: bool) -> AppClient {
        let mut app = Self::connect(relay, bridge_id, secret)
            .unwrap_or_else(|e| panic!("app connect refused: {e:?}"));
        app.expect_bridge_status(online);
        app
    }

    #[track_caller]
    pub fn expect_bridge_status(&mut self, online: bool) {
        let f = self.recv();
        assert_eq!(f, Frame::BridgeStatus { online }, "expected bridge.status online={online}");
    }

    pub fn send(&mut self, f: &Frame) {
        send_frame(&mut self.ws, f);
    }

    pub fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t)).unwrap();
    }

    pub fn send_binary(&mut self, b: &[u8]) {
        self.ws.send(Message::binary(b.to_vec())).unwrap();
    }

    /// Next event (pending frames first).
    pub fn next_event(&mut self, timeout: Duration) -> Event {
        if let Some(f) = self.pending.pop_front() {
            return Event::Frame(f);
        }
        ws_read(&mut self.ws, timeout)
    }

    /// Next frame; panics on timeout, close or a non-frame message.
    #[track_caller]
    pub fn recv(&mut self) -> Frame {
        match self.next_event(RECV_TIMEOUT) {
            Event::Frame(f) => f,
            other => panic!("app expected a frame, got {other:?}"),
        }
    }

    /// Asserts nothing arrives within `d`.
    #[track_caller]
    pub fn expect_silence(&mut self, d: Duration) {
        match self.next_event(d) {
            Event::Timeout => {}
            other => panic!("app expected silence, got {other:?}"),
        }
    }

    /// Frames for `id` up to and including its terminal frame. Other frames are kept for later.
    #[track_caller]
    pub fn recv_until_terminal(&mut self, id: &str) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut stash = VecDeque::new();
        let deadline = Instant::now() + RECV_TIMEOUT * 2;
        // Look at already-pending frames first.
        while let Some(f) = self.pending.pop_front() {
            if f.request_id() == Some(id) {
                let end = f.is_terminal();
                out.push(f);
                if end {
                    self.pending.extend(stash);
                    return out;
                }
            } else {
                stash.push_back(f);
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ws_read(&mut self.ws, left) {
                Event::Frame(f) if f.request_id() == Some(id) => {
                    let end = f.is_terminal();
                    out.push(f);
                    if end {
                        self.pending.extend(stash);
                        return out;
                    }
                }
                Event::Frame(f) => stash.push_back(f),
                other => panic!(
                    "app waiting for the terminal frame of {id:?}: got {other:?} after {out:?} \
                     (other frames: {stash:?})"
                ),
            }
        }
    }

    /// Sends `f` (a request) and returns its single terminal frame, asserting it is the only
    /// frame for that id.
    #[track_caller]
    pub fn request(&mut self, f: &Frame) -> Frame {
        let id = f.request_id().expect("not a request").to_owned();
        self.send(f);
        let mut frames = self.recv_until_terminal(&id);
        assert_eq!(frames.len(), 1, "expected one frame for {id}: {frames:?}");
        frames.pop().unwrap()
    }

    /// Round-trips a small text request through an echoing bridge and checks the echo.
    #[track_caller]
    pub fn assert_round_trip(&mut self, id: &str) {
        let body = format!("ping {id}");
        match self.request(&req(id, "POST", "/api/echo", Some(&body))) {
            Frame::Response(r) => {
                assert_eq!(r.status, 200, "{r:?}");
                assert_eq!(r.body, body);
                assert_eq!(r.client, None, "relay must strip client: {r:?}");
            }
            other => panic!("round trip {id}: unexpected {other:?}"),
        }
    }

    #[track_caller]
    pub fn wait_close(&mut self) -> Option<u16> {
        ws_wait_close(&mut self.ws, RECV_TIMEOUT).0
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = ws_wait_close(&mut self.ws, Duration::from_secs(2));
    }
}

// =============================================================================================
// Bridge test peer

/// A bridge socket driven by hand.
pub struct BridgePeer {
    pub ws: Ws,
    pub bridge_id: String,
}

impl BridgePeer {
    pub fn connect(
        relay: &Relay,
        bridge_id: &str,
        secret: &str,
        instance: &str,
    ) -> Result<BridgePeer, ConnectError> {
        let auth = format!("Bearer {secret}");
        let ws = ws_connect(
            &relay.bridge_ws_url(bridge_id),
            &[("Authorization", &auth), ("X-Hermes-Instance", instance)],
        )?;
        Ok(BridgePeer { ws, bridge_id: bridge_id.to_owned() })
    }

    #[track_caller]
    pub fn connect_ok(relay: &Relay, bridge_id: &str, secret: &str, instance: &str) -> BridgePeer {
        Self::connect(relay, bridge_id, secret, instance)
            .unwrap_or_else(|e| panic!("bridge connect refused: {e:?}"))
    }

    pub fn send(&mut self, f: &Frame) {
        send_frame(&mut self.ws, f);
    }

    #[track_caller]
    pub fn recv(&mut self) -> Frame {
        match ws_read(&mut self.ws, RECV_TIMEOUT) {
            Event::Frame(f) => f,
            other => panic!("bridge expected a frame, got {other:?}"),
        }
    }

    /// Next frame that is not `client.connected` / `client.disconnected`.
    #[track_caller]
    pub fn recv_request_scoped(&mut self) -> Frame {
        loop {
            let f = self.recv();
            if !matches!(f, Frame::ClientConnected { .. } | Frame::ClientDisconnected { .. }) {
                return f;
            }
        }
    }

    /// Moves the socket into a thread that answers requests by path:
    /// - `/api/hang…` — never answers (until cancelled: then `CANCELLED`);
    /// - `/api/stream?n=N` — `response.start`, N chunks `chunk-<i>;`, `response.end`;
    /// - `/api/error` — `response.error` `BACKEND_UNREACHABLE`;
    /// - anything else — echo: status 200, the request body (same base64 flag), headers
    ///   `x-echo-method`, `x-echo-path`, `x-echo-client`.
    ///
    /// Every response echoes the request's `client`.
    pub fn serve(self) -> ServedBridge {
        let stream = self.ws.get_ref().try_clone().unwrap();
        let seen: Arc<(Mutex<Vec<Frame>>, Condvar)> = Arc::new(Default::default());
        let closed: Arc<Mutex<Option<Event>>> = Arc::new(Mutex::new(None));
        let (seen2, closed2) = (seen.clone(), closed.clone());
        let mut ws = self.ws;
        let handle = std::thread::spawn(move || {
            let mut hanging: Vec<(String, Option<String>, Option<u64>)> = Vec::new();
            loop {
                let ev = ws_read(&mut ws, Duration::from_secs(3600));
                let f = match ev {
                    Event::Frame(f) => f,
                    Event::Timeout => continue,
                    other => {
                        *closed2.lock().unwrap() = Some(other);
                        seen2.1.notify_all();
                        return;
                    }
                };
                {
                    let (m, cv) = &*seen2;
                    m.lock().unwrap().push(f.clone());
                    cv.notify_all();
                }
                let out: Vec<Frame> = match f {
                    Frame::Request(r) => serve_one(r, &mut hanging),
                    Frame::Cancel { id, client, conn } => {
                        if let Some(i) =
                            hanging.iter().position(|(h, c, _)| *h == id && *c == client)
                        {
                            hanging.remove(i);
                            vec![Frame::ResponseError {
                                id,
                                client,
                                conn,
                                code: ErrorCode::Cancelled,
                                message: "cancelled".into(),
                            }]
                        } else {
                            vec![]
                        }
                    }
                    _ => vec![],
                };
                for o in out {
                    if ws.send(Message::text(o.to_json())).is_err() {
                        return;
                    }
                }
            }
        });
        ServedBridge { stream, seen, closed, handle: Some(handle), bridge_id: self.bridge_id }
    }
}

/// Answers like a current bridge: `client` and `conn` echoed on every answer.
fn serve_one(
    r: RequestFrame,
    hanging: &mut Vec<(String, Option<String>, Option<u64>)>,
) -> Vec<Frame> {
    let (client, conn) = (r.client.clone(), r.conn);
    if r.path.starts_with("/api/hang") {
        hanging.push((r.id, client, conn));
        return vec![];
    }
    if let Some(n) = r.path.strip_prefix("/api/stream?n=") {
        let n: usize = n.parse().unwrap();
        let mut out = vec![Frame::ResponseStart {
            id: r.id.clone(),
            client: client.clone(),
            conn,
            status: 200,
            headers: [("content-type".to_owned(), "text/event-stream".to_owned())].into(),
        }];
        for i in 0..n {
            out.push(Frame::ResponseChunk {
                id: r.id.clone(),
                client: client.clone(),
                conn,
                body: format!("chunk-{i};"),
                body_base64: false,
            });
        }
        out.push(Frame::ResponseEnd { id: r.id, client, conn });
        return out;
    }
    if r.path == "/api/error" {
        return vec![Frame::error_for(&r, ErrorCode::BackendUnreachable, "backend down")];
    }
    let mut headers = Headers::new();
    headers.insert("x-echo-method".into(), r.method.clone());
    headers.insert("x-echo-path".into(), r.path.clone());
    headers.insert("x-echo-client".into(), client.clone().unwrap_or_else(|| "<none>".into()));
    vec![Frame::Response(ResponseFrame {
        id: r.id,
        client,
        conn,
        status: 200,
        headers,
        body: r.body.as_deref().unwrap_or_default().to_owned(),
        body_base64: r.body_base64,
    })]
}

/// A bridge peer serving requests in its own thread.
pub struct ServedBridge {
    stream: TcpStream,
    seen: Arc<(Mutex<Vec<Frame>>, Condvar)>,
    closed: Arc<Mutex<Option<Event>>>,
    handle: Option<JoinHandle<()>>,
    pub bridge_id: String,
}

impl ServedBridge {
    /// Every frame the bridge has received.
    pub fn seen(&self) -> Vec<Frame> {
        self.seen.0.lock().unwrap().clone()
    }

    /// Waits until a received frame matches; returns it.
    #[track_caller]
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Frame) -> bool) -> Frame {
        let deadline = Instant::now() + RECV_TIMEOUT;
        let (m, cv) = &*self.seen;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(f) = g.iter().find(|f| pred(f)) {
                return f.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "bridge never received {what}; got {:?}; closed: {:?}",
                    *g,
                    self.closed.lock().unwrap()
                );
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits until `n` requests have arrived.
    #[track_caller]
    pub fn wait_requests(&self, n: usize) {
        self.wait_requests_within(n, RECV_TIMEOUT);
    }

    /// [`ServedBridge::wait_requests`] with its own deadline, for frames of many MiB (a debug
    /// build on a loaded machine takes seconds to pass and decode them).
    #[track_caller]
    pub fn wait_requests_within(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.seen;
        let mut g = m.lock().unwrap();
        loop {
            let count = g.iter().filter(|f| matches!(f, Frame::Request(_))).count();
            if count >= n {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("bridge saw {count} requests, expected {n}");
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    pub fn requests(&self) -> Vec<RequestFrame> {
        self.seen()
            .into_iter()
            .filter_map(|f| match f {
                Frame::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// How the socket ended, once it has (`Closed(code)`).
    pub fn closed(&self) -> Option<Option<u16>> {
        match &*self.closed.lock().unwrap() {
            Some(Event::Closed(c)) => Some(*c),
            Some(_) => Some(None),
            None => None,
        }
    }

    /// Waits for the relay to close the socket; returns the close code.
    #[track_caller]
    pub fn wait_closed(&self) -> Option<u16> {
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            if let Some(c) = self.closed() {
                return c;
            }
            if Instant::now() >= deadline {
                panic!("bridge socket not closed by the relay");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Drops the TCP connection without a close frame (a crashed bridge).
    pub fn kill(mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ServedBridge {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// =============================================================================================
// A whole pairing

/// A registered bridge with one paired app, both sockets attached.
pub struct Paired {
    pub reg: RegisterResponse,
    pub client: VerifyResponse,
    pub bridge: ServedBridge,
    pub app: AppClient,
}

/// Registers a bridge, pairs one app, attaches a serving bridge peer and the app.
#[track_caller]
pub fn pair(relay: &Relay) -> Paired {
    let (reg, bridge) = registered_bridge(relay);
    let bridge = bridge.serve();
    let client = pair_another(relay, &reg, "Test Phone");
    let app = AppClient::connect_ok(relay, &reg.bridge_id, &client.client_secret, true);
    Paired { reg, client, bridge, app }
}

/// Registers a bridge and attaches a bridge peer that the test reads itself (not serving),
/// once the relay reports it online.
#[track_caller]
pub fn registered_bridge(relay: &Relay) -> (RegisterResponse, BridgePeer) {
    let api = relay.registry();
    let reg = api.register_ok("Test Bridge");
    let bridge = BridgePeer::connect_ok(relay, &reg.bridge_id, &reg.relay_secret, "inst-1");
    api.wait_bridge_online(&reg.bridge_id, &reg.relay_secret, true);
    (reg, bridge)
}

/// Pairs one more app with an existing bridge.
#[track_caller]
pub fn pair_another(relay: &Relay, reg: &RegisterResponse, device: &str) -> VerifyResponse {
    let api = relay.registry();
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret);
    api.verify_ok(&reg.bridge_id, &code.access_code, device)
}

/// Sends raw bytes on a fresh TCP connection and returns what the relay answers (until EOF or
/// `timeout`).
pub fn raw_exchange(addr: &str, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

/// Runs `cmd` (stdin and stdout closed) and waits at most 5 s for it to exit: its exit code
/// (`None` when it was still running, and was killed) and its stderr.
pub fn run_to_exit(cmd: &mut Command) -> (Option<i32>, String) {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (code, stderr)
}

// =============================================================================================
// Raw WebSocket frames (what no client library would send)

/// One unmasked frame from a server (the relay, the LAN server): its opcode and payload; the error when the stream ended
/// (`UnexpectedEof` for a clean end) or broke before a whole frame.
pub fn read_raw_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head)?;
    let len = match head[1] & 0x7F {
        126 => {
            let mut n = [0u8; 2];
            s.read_exact(&mut n)?;
            u64::from(u16::from_be_bytes(n))
        }
        127 => {
            let mut n = [0u8; 8];
            s.read_exact(&mut n)?;
            u64::from_be_bytes(n)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((head[0] & 0x0F, payload))
}

/// A client frame: FIN and opcode in `first`, masked with a zero key (the payload goes as is)
/// unless `masked` is false; its header may announce `announced` bytes instead of the
/// payload's length.
pub fn client_frame(first: u8, payload: &[u8], masked: bool, announced: Option<u64>) -> Vec<u8> {
    let len = announced.unwrap_or(payload.len() as u64);
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut f = vec![first];
    match len {
        0..=125 => f.push(mask_bit | len as u8),
        126..=0xFFFF => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&len.to_be_bytes());
        }
    }
    if masked {
        f.extend_from_slice(&[0; 4]);
    }
    f.extend_from_slice(payload);
    f
}

/// Reads until the server's close frame: its code and reason; then the stream must end cleanly
/// (FIN): a reset would make the peer's stack drop the close frame before the app read it.
pub fn expect_close_then_fin(s: &mut TcpStream, what: &str) -> (u16, String) {
    loop {
        match read_raw_frame(s) {
            Ok((8, payload)) => {
                assert!(payload.len() >= 2, "{what}: a close frame without a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                let mut rest = [0u8; 64];
                match s.read(&mut rest) {
                    Ok(0) => {}
                    other => panic!("{what}: after the close frame, {other:?} instead of the end"),
                }
                return (code, reason);
            }
            Ok(_) => {}
            Err(e) => panic!("{what}: no close frame, the stream ended with {e}"),
        }
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost (PEM chain, PKCS#8 key).
pub fn make_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl must be installed for the TLS tests");
    assert!(status.success(), "openssl could not make a test certificate");
    (cert, key)
}

/// Runs `f` with `dir` made immutable (`chattr +i`: even root cannot create or rename files in
/// it). Returns None, with a note, where the filesystem does not support it.
pub fn with_immutable_dir<T>(dir: &Path, f: impl FnOnce() -> T) -> Option<T> {
    let ok = Command::new("chattr").arg("+i").arg(dir).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: chattr +i is not supported here; skipping this read-only directory check");
        return None;
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let _ = Command::new("chattr").arg("-i").arg(dir).status();
    Some(result.unwrap_or_else(|p| std::panic::resume_unwind(p)))
}
