//! Shared harness of the built-in backend tests (`tests/backend.rs`) and the real Hermes
//! gateway tests (`tests/hermes_gateway.rs`): the stub gateway process, a throwaway user
//! (`HOME` with a `~/.hermes`, `HERMESCHAT_HOME`, a controlled `PATH`) running the real CLI,
//! and small HTTP/SSE helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hermeschat_pair::bridge::local_http::{Abort, Body, LocalClient, Timeouts};
use hermeschat_pair::protocol::{Frame, Headers, RelayQr, RequestFrame};
use serde_json::Value;

use crate::common::{AppClient, Event, Registry, fresh_dir};

/// The CLI under test.
pub const PAIR_BIN: &str = env!("CARGO_BIN_EXE_hermeschat-pair");

/// The stub gateway script.
pub const STUB_GATEWAY: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stub_gateway.py");

/// A gateway key the stub and the real gateway accept.
pub const KEY: &str = "test-gateway-key-5f1c9a7e3b2d4c6a8e0f";

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// =============================================================================================
// The stub gateway

/// `tests/fixtures/stub_gateway.py` as a child process.
pub struct StubGateway {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
}

impl StubGateway {
    /// Starts on `port` (0: any) with `key`.
    pub fn start(port: u16, key: &str) -> StubGateway {
        let mut child = Command::new("python3")
            .arg(STUB_GATEWAY)
            .args(["--port", &port.to_string(), "--key", key])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run python3 tests/fixtures/stub_gateway.py");
        let port = wait_ready(child.stdout.take().unwrap(), Duration::from_secs(20))
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("the stub gateway did not print READY")
            });
        StubGateway { child: Some(child), port }
    }

    /// `GET /stub/stats`.
    pub fn stats(&self) -> Value {
        let (status, _, body) = http(self.port, "GET", "/stub/stats", &[], b"");
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    /// Waits until a stats counter reaches `want`.
    #[track_caller]
    pub fn wait_stat(&self, field: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.stats();
            if v[field].as_u64() >= Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "stub stat {field} never reached {want}: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the stub (the gateway goes down).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for StubGateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads lines until `READY <port>`.
fn wait_ready(out: impl Read + Send + 'static, timeout: Duration) -> Option<u16> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(p) = line.strip_prefix("READY ") {
                let _ = tx.send(p.trim().parse::<u16>().ok());
            }
        }
    });
    rx.recv_timeout(timeout).ok().flatten()
}

// =============================================================================================
// HTTP helpers

/// One request straight at `127.0.0.1:port`: (status, headers, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let timeouts = Timeouts {
        connect: Duration::from_secs(3),
        head: Duration::from_secs(60),
        body_gap: Duration::from_secs(60),
    };
    let c = LocalClient::with_timeouts("127.0.0.1", port, timeouts);
    let headers: Vec<(String, String)> =
        headers.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
    let mut r = c
        .send(method, path, &headers, Body::Bytes(body), &Abort::new())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let mut out = Vec::new();
    r.body.read_to_end(&mut out).unwrap_or_else(|e| panic!("{method} {path} body: {e}"));
    (r.status, r.headers, out)
}

/// A header of a header list.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The `data:` payloads of an SSE text, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect()
}

/// The assistant text of an OpenAI chunk stream.
pub fn sse_content(text: &str) -> String {
    sse_data(text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content").and_then(Value::as_str).map(str::to_owned)
        })
        .collect()
}

/// The error event's `error` object of an SSE text, if any.
pub fn sse_error(text: &str) -> Option<Value> {
    sse_data(text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("error").cloned())
}

// =============================================================================================
// A throwaway user running the real CLI

/// The outcome of one CLI run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn assert_code(&self, code: i32, what: &str) {
        assert_eq!(
            self.code,
            Some(code),
            "{what}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// A user: `HOME` (with `.hermes/`), `HERMESCHAT_HOME`, a working directory and a `bin/`
/// directory first on `PATH` for fake commands. Dropping it stops the daemon and any gateway
/// the wake chain started.
pub struct User {
    pub root: PathBuf,
    pub home: PathBuf,
    pub state: PathBuf,
    pub cwd: PathBuf,
    pub bin: PathBuf,
    /// Extra environment for every CLI run.
    pub env: Vec<(String, String)>,
}

impl User {
    pub fn new(tag: &str) -> User {
        let root = fresh_dir(tag);
        let home = root.join("home");
        let state = home.join(".hermeschat");
        let cwd = root.join("cwd");
        let bin = root.join("bin");
        for d in [&home, &cwd, &bin, &home.join(".hermes")] {
            std::fs::create_dir_all(d).unwrap();
        }
        User { root, home, state, cwd, bin, env: Vec::new() }
    }

    /// `~/.hermes`.
    pub fn hermes(&self) -> PathBuf {
        self.home.join(".hermes")
    }

    /// Writes `~/.hermes/.env`.
    pub fn write_dotenv(&self, text: &str) {
        std::fs::write(self.hermes().join(".env"), text).unwrap();
    }

    /// Writes an executable script `bin/<name>` (or any path under HOME).
    pub fn script(&self, path: &Path, body: &str) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, body).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// `~/.hermes/hermes-agent/venv/bin/python`.
    pub fn venv_python(&self) -> PathBuf {
        self.hermes().join("hermes-agent/venv/bin/python")
    }

    /// Makes the standard venv python a fake that runs the stub gateway.
    pub fn fake_venv_with_stub(&self) {
        self.script(
            &self.venv_python(),
            &format!("#!/bin/sh\nexec python3 {STUB_GATEWAY} \"$@\"\n"),
        );
    }

    /// The CLI with a clean environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(PAIR_BIN);
        let path = format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin.display());
        cmd.args(args)
            .env("HOME", &self.home)
            .env("HERMESCHAT_HOME", &self.state)
            .env("PATH", path)
            .env("NO_COLOR", "1")
            .env("PYTHONUNBUFFERED", "1")
            .current_dir(&self.cwd);
        for v in [
            "HERMESCHAT_REGISTRY_URL",
            "INVOCATION_ID",
            "HERMESCHAT_LOCAL_HOST",
            "HERMESCHAT_LOCAL_PORT",
            "HERMESCHAT_GATEWAY_URL",
            "HERMES_HOME",
            "API_SERVER_KEY",
            "API_SERVER_PORT",
            "API_SERVER_HOST",
            "API_SERVER_ENABLED",
            "AI_API_KEY",
            "AI_BASE_URL",
            "AI_MODEL",
            "XDG_STATE_HOME",
        ] {
            cmd.env_remove(v);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the CLI to completion.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Run {
        run_cmd(self.cmd(args), Duration::from_secs(90))
    }

    /// `--json` pairing with the built-in backend on `port`; returns the QR payload and the
    /// whole run.
    #[track_caller]
    pub fn pair(&self, registry: &str, port: u16) -> (RelayQr, Run) {
        let port = port.to_string();
        let run = self.run(&["--server", registry, "--port", &port]);
        run.assert_code(0, "hermeschat-pair");
        let run_json = self.run(&["--json", "--server", registry, "--port", &port]);
        run_json.assert_code(0, "hermeschat-pair --json");
        let line = run_json.stdout.lines().find(|l| l.starts_with('{')).expect("no payload");
        (serde_json::from_str(line).unwrap(), run)
    }

    /// The pid the wake chain recorded for a gateway it spawned.
    pub fn gateway_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state.join("gateway.pid")).ok()?.trim().parse().ok()
    }

    /// Kills the recorded gateway, if any.
    pub fn kill_gateway(&self) {
        if let Some(pid) = self.gateway_pid()
            && pid > 1
        {
            // SAFETY: a process this test's wake chain started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// `gateway.log` in the state directory.
    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.state.join("gateway.log")).unwrap_or_default()
    }

    /// `server.log` in the state directory.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.state.join("server.log")).unwrap_or_default()
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = try_run(self.cmd(&["--stop"]), Duration::from_secs(20));
        self.kill_gateway();
        if std::env::var_os("HERMESCHAT_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Runs `cmd` to completion (killing it after `timeout`).
#[track_caller]
pub fn run_cmd(cmd: Command, timeout: Duration) -> Run {
    try_run(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

fn try_run(mut cmd: Command, timeout: Duration) -> Result<Run, String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let read = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
        rx
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{shown} did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Pipes must close once the CLI exits: nothing it started may hold them.
    let stdout = out
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| format!("{shown}: stdout stayed open after exit (a child holds it)"))?;
    let stderr = err
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| format!("{shown}: stderr stayed open after exit (a child holds it)"))?;
    Ok(Run { code: status.code(), stdout, stderr })
}

// =============================================================================================
// The app side

/// Verifies the QR's access code and connects the app socket; asserts the bridge is online.
#[track_caller]
pub fn connect_app(qr: &RelayQr) -> AppClient {
    let v = Registry::new(&qr.s).verify_ok(&qr.g, &qr.a, "Test Phone");
    let url = format!("{}?bridgeId={}", qr.u, qr.g);
    let mut app = AppClient::connect_url(&url, &v.client_secret)
        .unwrap_or_else(|e| panic!("app connect refused: {e:?}"));
    app.expect_bridge_status(true);
    app
}

/// A request frame.
pub fn request(
    id: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Frame {
    let headers: Headers =
        headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    Frame::Request(RequestFrame {
        id: id.into(),
        client: None,
        conn: None,
        method: method.into(),
        path: path.into(),
        headers,
        body: body.map(Into::into),
        body_base64: false,
        length: None,
    })
}

/// A response seen by the app: status, headers, body pieces with their arrival times.
#[derive(Debug)]
pub struct AppResponse {
    pub status: u16,
    pub headers: Headers,
    /// (arrival, text) per `response.chunk` (or the one body of a plain `response`).
    pub pieces: Vec<(Instant, String)>,
    /// When the request was sent.
    pub sent: Instant,
}

impl AppResponse {
    /// The whole body.
    pub fn text(&self) -> String {
        self.pieces.iter().map(|(_, t)| t.as_str()).collect()
    }

    /// A header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The JSON body.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends a request through the relay and collects its response frames as they arrive.
#[track_caller]
pub fn app_fetch(app: &mut AppClient, f: &Frame, timeout: Duration) -> AppResponse {
    let id = f.request_id().unwrap().to_owned();
    let sent = Instant::now();
    app.send(f);
    let deadline = sent + timeout;
    let mut resp = AppResponse { status: 0, headers: Headers::new(), pieces: Vec::new(), sent };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = app.next_event(left);
        let now = Instant::now();
        let frame = match ev {
            Event::Frame(f) if f.request_id() == Some(id.as_str()) => f,
            Event::Frame(_) => continue,
            other => panic!("waiting for {id}: {other:?} (so far {resp:?})"),
        };
        let text = |body: &str, b64: bool| {
            if b64 {
                String::from_utf8_lossy(&crate::common::unb64(body)).into_owned()
            } else {
                body.to_owned()
            }
        };
        match frame {
            Frame::Response(r) => {
                resp.status = r.status;
                resp.headers = r.headers;
                resp.pieces.push((now, text(&r.body, r.body_base64)));
                return resp;
            }
            Frame::ResponseStart { status, headers, .. } => {
                resp.status = status;
                resp.headers = headers;
            }
            Frame::ResponseChunk { body, body_base64, .. } => {
                resp.pieces.push((now, text(&body, body_base64)));
            }
            Frame::ResponseEnd { .. } => return resp,
            other => panic!("{id}: unexpected {other:?}"),
        }
    }
}

/// A user whose Hermes config points at a gateway on `port` and whose venv python is a fake
/// running the stub gateway; `systemctl` is a fake that records its call and fails.
pub fn stub_user(tag: &str, port: u16) -> User {
    let u = User::new(tag);
    u.write_dotenv(&format!(
        "API_SERVER_ENABLED=true\nAPI_SERVER_KEY={KEY}\nAPI_SERVER_PORT={port}\n"
    ));
    u.fake_venv_with_stub();
    let marker = u.root.join("systemctl.calls");
    u.script(
        &u.bin.join("systemctl"),
        &format!(
            "#!/bin/sh\necho \"$@\" >> {}\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n",
            marker.display()
        ),
    );
    u
}
