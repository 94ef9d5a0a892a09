//! End-to-end tests of `hermeschat-pair --local` (LAN-only direct mode, PROTOCOL §8): the real
//! CLI and its daemon serving `ws://127.0.0.1:<port>/ws/app` (`--host 127.0.0.1`), the FastAPI
//! backend fixture (`tests/fixtures/backend.py`), and an app test client speaking the frames
//! straight to the daemon. No relay is involved except in the mode-switch test.
//!
//! Every test has its own state directory, working directory, ports and backend, and stops its
//! daemon on the way out. Needs `python3 -m pip install -r tests/fixtures/requirements.txt`.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::session::{
    CMD_TIMEOUT, FrameIo, PAIR_BIN, Run, closed_port, listen_port, stream_upload, try_run,
};
use common::{
    ConnectError, Relay, Ws, b64, client_frame, expect_close_then_fin, fresh_dir, random_bytes,
    rss_growth_settles, rss_kib, unb64, ws_connect,
};
use hermeschat_pair::protocol::{ErrorCode, Frame, Headers, RequestFrame};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tungstenite::Message;

const RECV: Duration = Duration::from_secs(10);

/// One user's machine: state directory, working directory, the LAN port it uses.
struct Env {
    root: PathBuf,
    home: PathBuf,
    cwd: PathBuf,
    lan_port: u16,
}

impl Env {
    fn new() -> Env {
        let root = fresh_dir("lan");
        let home = root.join("home");
        let cwd = root.join("cwd");
        std::fs::create_dir_all(&cwd).unwrap();
        Env { root, home, cwd, lan_port: listen_port() }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&*PAIR_BIN);
        cmd.args(args)
            .env("HERMESCHAT_HOME", &self.home)
            .env("NO_COLOR", "1")
            .env_remove("HERMESCHAT_REGISTRY_URL")
            .env_remove("INVOCATION_ID")
            .env_remove("HERMESCHAT_LOCAL_HOST")
            .env_remove("HERMESCHAT_LOCAL_PORT")
            .env_remove("HERMESCHAT_LAN_TOKEN_TTL_SECS")
            .current_dir(&self.cwd);
        cmd
    }

    #[track_caller]
    fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    #[track_caller]
    fn run_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Run {
        let mut cmd = self.cmd(args);
        cmd.envs(vars.iter().copied());
        try_run(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `args` plus `--local --host 127.0.0.1 --local-port <ours> --port <backend>`.
    fn local_args<'a>(
        &'a self,
        backend_port: &'a str,
        lan_port: &'a str,
        extra: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec![
            "--local",
            "--host",
            "127.0.0.1",
            "--local-port",
            lan_port,
            "--port",
            backend_port,
        ];
        args.extend_from_slice(extra);
        args
    }

    /// `--local --json` (plus `extra`): asserts success and returns the QR payload.
    #[track_caller]
    fn pair_json(&self, backend: &Backend, extra: &[&str], vars: &[(&str, &str)]) -> LocalQr {
        let (bp, lp) = (backend.port.to_string(), self.lan_port.to_string());
        let mut args = self.local_args(&bp, &lp, &["--json"]);
        args.extend_from_slice(extra);
        let run = self.run_env(&args, vars);
        run.assert_code(0, "hermeschat-pair --local --json");
        parse_local_payload(&run.stdout)
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws/app", self.lan_port)
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.home.join("bridge.pid")).ok()?.trim().parse().ok()
    }

    fn lock_held(&self) -> bool {
        let Ok(file) =
            std::fs::OpenOptions::new().read(true).write(true).open(self.home.join("bridge.pid"))
        else {
            return false;
        };
        use std::os::fd::AsRawFd;
        // A shared lock, as the product probes: it fails only against the daemon's exclusive
        // one, never against another probe.
        // SAFETY: flock on a descriptor we own; our lock (if taken) ends when `file` drops.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("bridge.log")).unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.home.exists() {
            let pid = self.pid();
            let _ = try_run(self.cmd(&["--stop"]), Duration::from_secs(20));
            if self.lock_held()
                && let Some(pid) = pid.or(self.pid())
            {
                // SAFETY: signals the daemon this test started.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The LAN QR payload.
#[derive(Debug, Clone)]
struct LocalQr {
    url: String,
    token: String,
    expires_at: u64,
}

/// Checks `--json` output: one line, exactly `{"mode":"hermes-local","url","token","expiresAt"}`.
#[track_caller]
fn parse_local_payload(stdout: &str) -> LocalQr {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json must print exactly one line, got:\n{stdout}");
    let v: Value = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["mode", "url", "token", "expiresAt"]), "{v}");
    assert_eq!(v["mode"], "hermes-local", "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("hpt_") && token.len() == 68, "token form: {v}");
    LocalQr {
        url: v["url"].as_str().unwrap().to_owned(),
        token,
        expires_at: v["expiresAt"].as_u64().expect("expiresAt is unix ms"),
    }
}

fn now_ms() -> u64 {
    common::now_ms()
}

// =============================================================================================
// The FastAPI backend fixture (as in tests/pair.rs)

struct Backend {
    child: Option<Child>,
    port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Backend {
    fn start() -> Backend {
        let python = std::env::var("HERMESCHAT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/backend.py");
        let mut child = Command::new(&python)
            .arg(script)
            .arg("0")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} {script}: {e}"));
        let stderr: Arc<Mutex<String>> = Arc::default();
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut b = Backend { child: Some(child), port: 0, stderr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(p) = line.strip_prefix("READY ") {
                        b.port = p.trim().parse().unwrap();
                        return b;
                    }
                }
                Err(_) => {
                    let stderr = b.stderr.lock().unwrap().clone();
                    drop(b);
                    panic!(
                        "the FastAPI fixture did not print READY within 30 s (pip install -r \
                         tests/fixtures/requirements.txt?)\n{stderr}"
                    );
                }
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// =============================================================================================
// The app side of a LAN socket

/// A LAN app socket that keeps the raw text of every frame (to check what is on the wire).
struct LanApp {
    ws: Ws,
}

/// One thing read from the socket.
#[derive(Debug)]
enum Got {
    Text(String),
    Closed(Option<u16>),
    Timeout,
}

impl LanApp {
    /// Connects with `Authorization: Bearer <credential>`.
    fn connect(url: &str, credential: &str) -> Result<LanApp, ConnectError> {
        let auth = format!("Bearer {credential}");
        ws_connect(url, &[("Authorization", &auth)]).map(|ws| LanApp { ws })
    }

    #[track_caller]
    fn connect_ok(url: &str, credential: &str) -> LanApp {
        LanApp::connect(url, credential).unwrap_or_else(|e| panic!("LAN connect refused: {e:?}"))
    }

    fn next(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Timeout;
            }
            let _ = self.ws.get_mut().set_read_timeout(Some(left));
            match self.ws.read() {
                Ok(Message::Text(t)) => return Got::Text(t.as_str().to_owned()),
                Ok(Message::Close(cf)) => return Got::Closed(cf.map(|c| u16::from(c.code))),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Got::Timeout;
                }
                Err(_) => return Got::Closed(None),
            }
        }
    }

    /// The next frame; asserts no `client` field is on the wire (PROTOCOL §8).
    #[track_caller]
    fn recv(&mut self) -> Frame {
        match self.next(RECV) {
            Got::Text(t) => {
                let raw: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
                assert!(raw.get("client").is_none(), "a LAN frame carries client: {t}");
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("not a frame ({e}): {t}"))
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    fn send(&mut self, f: &Frame) {
        self.ws.send(Message::text(f.to_json())).unwrap();
    }

    /// Frames of request `id` up to its terminal frame (nothing else may arrive meanwhile).
    #[track_caller]
    fn until_terminal(&mut self, id: &str) -> Vec<(Instant, Frame)> {
        let mut out = Vec::new();
        loop {
            let f = self.recv();
            assert_eq!(f.request_id(), Some(id), "unexpected frame {f:?}");
            let end = f.is_terminal();
            out.push((Instant::now(), f));
            if end {
                return out;
            }
        }
    }

    #[track_caller]
    fn fetch(&mut self, f: &Frame) -> Whole {
        let id = f.request_id().unwrap().to_owned();
        self.send(f);
        assemble(self.until_terminal(&id).into_iter().map(|(_, f)| f).collect())
    }

    #[track_caller]
    fn wait_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + RECV;
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Got::Closed(code) => return code,
                Got::Timeout => panic!("socket not closed within {RECV:?}"),
                Got::Text(_) => {}
            }
        }
    }
}

impl FrameIo for LanApp {
    fn send_frame(&mut self, f: &Frame) {
        self.send(f);
    }
    #[track_caller]
    fn recv_frame(&mut self) -> Frame {
        self.recv()
    }
}

/// Pairs with the token: asserts `paired` then `bridge.status` online; returns the credentials.
#[track_caller]
fn pair_app(url: &str, token: &str) -> (String, String, LanApp) {
    let mut app = LanApp::connect_ok(url, token);
    let Frame::Paired { client_id, client_secret } = app.recv() else {
        panic!("the first frame after pairing must be paired")
    };
    assert!(client_id.starts_with("hcl_") && client_id.len() == 20, "{client_id}");
    assert!(client_secret.starts_with("hcs_") && client_secret.len() == 68);
    assert_eq!(app.recv(), Frame::BridgeStatus { online: true });
    // A ping follows at once; the pong (sent by the flush) confirms the pairing, which would
    // otherwise be taken back when this socket closes.
    let _ = app.ws.get_mut().set_read_timeout(Some(RECV));
    match app.ws.read() {
        Ok(Message::Ping(_)) => app.ws.flush().expect("pong"),
        other => panic!("a new pairing is pinged at once, got {other:?}"),
    }
    (client_id, client_secret, app)
}

/// Connects with a clientSecret: asserts `bridge.status` online first.
#[track_caller]
fn reconnect(url: &str, secret: &str) -> LanApp {
    let mut app = LanApp::connect_ok(url, secret);
    assert_eq!(app.recv(), Frame::BridgeStatus { online: true });
    app
}

#[track_caller]
fn refused(url: &str, credential: &str) -> (u16, Value) {
    match LanApp::connect(url, credential) {
        Ok(_) => panic!("the LAN server accepted a credential it must refuse"),
        Err(ConnectError::Http(status, body)) => {
            (status, serde_json::from_str(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("expected an HTTP refusal, got {e:?}"),
    }
}

fn request(
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

/// `POST /api/raw` with `bytes` as a base64 body (the backend answers their size and hash).
fn raw_upload(id: &str, bytes: &[u8]) -> Frame {
    let mut up =
        request(id, "POST", "/api/raw", &[("Content-Type", "application/octet-stream")], None);
    if let Frame::Request(r) = &mut up {
        r.body = Some(b64(bytes).into());
        r.body_base64 = true;
    }
    up
}

#[derive(Debug)]
struct Whole {
    status: u16,
    headers: Headers,
    body: Vec<u8>,
    streamed: bool,
}

#[track_caller]
fn assemble(frames: Vec<Frame>) -> Whole {
    let bytes = |b: &str, b64: bool| if b64 { unb64(b) } else { b.as_bytes().to_vec() };
    match frames.first() {
        Some(Frame::Response(r)) => Whole {
            status: r.status,
            headers: r.headers.clone(),
            body: bytes(&r.body, r.body_base64),
            streamed: false,
        },
        Some(Frame::ResponseStart { status, headers, .. }) => {
            let mut body = Vec::new();
            for f in &frames[1..frames.len() - 1] {
                let Frame::ResponseChunk { body: b, body_base64, .. } = f else {
                    panic!("unexpected {f:?}")
                };
                body.extend(bytes(b, *body_base64));
            }
            assert!(matches!(frames.last(), Some(Frame::ResponseEnd { .. })), "{frames:?}");
            Whole { status: *status, headers: headers.clone(), body, streamed: true }
        }
        _ => panic!("expected a response, got {frames:?}"),
    }
}

fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Round trip through `/api/echo`: the backend saw the device's clientId.
#[track_caller]
fn assert_echo(app: &mut LanApp, id: &str, client_id: &str) {
    let body = json!({"id": id, "text": "héllo ✓"}).to_string();
    let w = app.fetch(&request(
        id,
        "POST",
        "/api/echo",
        &[("Content-Type", "application/json")],
        Some(&body),
    ));
    assert_eq!(w.status, 200, "{w:?}");
    let v: Value = serde_json::from_slice(&w.body).unwrap();
    assert_eq!(v["body"], json!({"id": id, "text": "héllo ✓"}), "{v}");
    assert_eq!(v["client"], client_id, "X-HermesChat-Client at the backend: {v}");
}

// =============================================================================================
// Tests

#[test]
fn pair_with_the_token_then_reconnect_with_the_secret() {
    let env = Env::new();
    let backend = Backend::start();
    let before = now_ms();
    let qr = env.pair_json(&backend, &[], &[]);
    assert_eq!(qr.url, env.url(), "QR url");
    let ttl = qr.expires_at.saturating_sub(before);
    assert!((590_000..=610_000).contains(&ttl), "token lives 10 minutes: {ttl} ms");

    // No relay, no registry: LAN-only mode needs no bridge.json.
    assert!(!env.home.join("bridge.json").exists());
    let lan_json = env.home.join("lan.json");
    let mode = std::fs::metadata(&lan_json).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "lan.json mode");

    let (client_id, secret, mut app) = pair_app(&qr.url, &qr.token);
    assert_echo(&mut app, "r1", &client_id);

    // --doctor checks the LAN path: no relay hops, the daemon's LAN server, the backend.
    let run = env.run(&["--doctor", "--json"]);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap_or(Value::Null);
    let state = |id: &str| {
        let hops = v["hops"].as_array().cloned().unwrap_or_default();
        hops.iter().find(|h| h["id"] == id).map(|h| h["state"].clone()).unwrap_or(Value::Null)
    };
    for id in ["registry", "bridge", "relay"] {
        assert_eq!(state(id), "skip", "{id}: {v}");
    }
    assert_eq!(state("daemon"), "ok", "{v}");
    assert_eq!(state("backend"), "ok", "{v}");
    // A LAN daemon has no relay socket: its hop is named for what it checks.
    let daemon = v["hops"].as_array().and_then(|h| h.iter().find(|h| h["id"] == "daemon"));
    assert_eq!(daemon.map(|h| h["name"].clone()), Some(json!("daemon LAN server alive")), "{v}");
    let text = env.run(&["--doctor"]).stdout;
    assert!(text.contains("daemon LAN server alive"), "{text}");
    assert!(!text.contains("relay socket"), "{text}");

    // Single use: the token is refused from now on, before the upgrade.
    let (status, body) = refused(&qr.url, &qr.token);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{body}");

    // Only digests on disk.
    let text = std::fs::read_to_string(&lan_json).unwrap();
    assert!(!text.contains(&secret) && !text.contains(&qr.token), "{text}");
    assert!(text.contains(&client_id), "{text}");

    // The same device reconnects with its secret: the old socket is replaced (4002).
    let mut again = reconnect(&qr.url, &secret);
    assert_eq!(app.wait_close(), Some(4002));
    assert_echo(&mut again, "r1", &client_id);

    // ?token= works as well as the header.
    drop(again);
    let url = format!("{}?token={secret}", qr.url);
    let mut q = LanApp { ws: ws_connect(&url, &[]).expect("?token= connect") };
    assert_eq!(q.recv(), Frame::BridgeStatus { online: true });
    assert_echo(&mut q, "r2", &client_id);

    // --status shows LAN mode, the address and the device, online (status.json has the apps
    // online within a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let run = env.run(&["--status", "--json", "--port", &backend.port.to_string()]);
        run.assert_code(0, "--status --json in LAN mode");
        let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
        if v["lan"]["devices"][0]["online"] == true || Instant::now() >= deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["lan"]["serving"], true, "{v}");
    assert_eq!(v["lan"]["url"], qr.url, "{v}");
    assert_eq!(v["lan"]["devices"][0]["clientId"], client_id, "{v}");
    assert_eq!(v["lan"]["devices"][0]["online"], true, "{v}");
    let run = env.run(&["--status", "--port", &backend.port.to_string()]);
    run.assert_code(0, "--status in LAN mode");
    assert!(run.stdout.contains("LAN mode: serving ws://127.0.0.1:"), "{}", run.stdout);
    assert!(run.stdout.contains(&client_id), "{}", run.stdout);
    assert!(!run.stdout.contains("Relay"), "{}", run.stdout);

    // No secret in the daemon's log.
    let log = env.log();
    assert!(log.contains("LAN server listening"), "{log}");
    for s in [&secret, &qr.token] {
        assert!(!log.contains(s.as_str()), "secret in bridge.log:\n{log}");
    }
}

#[test]
fn expired_token_is_refused_and_refresh_code_gives_a_new_one() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[("HERMESCHAT_LAN_TOKEN_TTL_SECS", "1")]);
    let pid = env.pid().unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    let (status, body) = refused(&qr.url, &qr.token);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "PAIRING_TOKEN_EXPIRED", "{body}");

    // --refresh-code --local: a new token, the daemon untouched.
    let fresh = env.pair_json(&backend, &["--refresh-code"], &[]);
    assert_ne!(fresh.token, qr.token);
    assert_eq!(env.pid(), Some(pid), "--refresh-code --local must keep the daemon");
    let (client_id, _, mut app) = pair_app(&fresh.url, &fresh.token);
    assert_echo(&mut app, "a", &client_id);
    // The expired one stays refused (replaced now).
    assert_eq!(refused(&qr.url, &qr.token).0, 401);
    // Without --host/--local-port, --refresh-code keeps what the running daemon serves.
    let bp = backend.port.to_string();
    let run = env.run(&["--refresh-code", "--local", "--json", "--port", &bp]);
    run.assert_code(0, "--refresh-code --local without --host");
    assert_eq!(parse_local_payload(&run.stdout).url, qr.url);
    assert_eq!(env.pid(), Some(pid), "--refresh-code --local must keep the daemon");
    assert_echo(&mut app, "b", &client_id);
}

#[test]
fn requests_and_streaming_are_byte_exact_through_the_direct_socket() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (_, _, mut app) = pair_app(&qr.url, &qr.token);

    // 3 MiB of binary from the backend: streamed, byte-exact.
    let w = app.fetch(&request("bin", "GET", "/api/binary?size=3145728&seed=7", &[], None));
    assert_eq!(w.status, 200);
    assert!(w.streamed, "a 3 MiB response is streamed");
    assert_eq!(w.body.len(), 3 << 20);
    let want = header(&w.headers, "x-sha256").unwrap().to_owned();
    assert_eq!(format!("{:x}", Sha256::digest(&w.body)), want);

    // 2 MiB of random bytes up as base64: the backend hashes exactly what we sent.
    let bytes = random_bytes(2 << 20);
    let up = raw_upload("up", &bytes);
    let w = app.fetch(&up);
    let v: Value = serde_json::from_slice(&w.body).unwrap();
    assert_eq!(v["size"], bytes.len());
    assert_eq!(v["sha256"], format!("{:x}", Sha256::digest(&bytes)));

    // 3 MiB streamed up (request.start + request.chunk): acknowledged piece by piece, without
    // client on the acks (LanApp::recv checks), and byte-exact at the backend.
    let bytes = random_bytes(3 << 20);
    let Frame::Request(head) = raw_upload("streamed", &[]) else { unreachable!() };
    let head = RequestFrame { body: None, body_base64: false, ..head };
    let up = stream_upload(&mut app, head, &bytes, 256 << 10);
    assert_eq!(up.acks.len(), 12, "{:?}", up.acks);
    let v: Value = serde_json::from_slice(&assemble(up.frames).body).unwrap();
    assert_eq!(v["size"], bytes.len());
    assert_eq!(v["sha256"], format!("{:x}", Sha256::digest(&bytes)));

    // SSE: each event arrives on its own, as the backend flushes it (gap 300 ms).
    app.send(&request("sse", "GET", "/api/sse?n=4&gap_ms=300", &[], None));
    let frames = app.until_terminal("sse");
    let Frame::ResponseStart { status, headers, .. } = &frames[0].1 else {
        panic!("SSE must be streamed: {frames:?}")
    };
    assert_eq!(*status, 200);
    assert!(header(headers, "content-type").unwrap().starts_with("text/event-stream"));
    let chunks: Vec<(Instant, String)> = frames[1..frames.len() - 1]
        .iter()
        .map(|(t, f)| match f {
            Frame::ResponseChunk { body, body_base64: false, .. } => (*t, body.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    let text: String = chunks.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(text.matches("event: tick").count(), 4, "{text}");
    assert!(chunks.len() >= 4, "one chunk per event at least: {chunks:?}");
    let spread = chunks.last().unwrap().0.duration_since(chunks[0].0);
    assert!(spread >= Duration::from_millis(600), "events were held back: {spread:?}");

    // Refusals still come back per request, without client.
    app.send(&request("adm", "GET", "/admin", &[], None));
    match app.recv() {
        Frame::ResponseError { id, code, .. } => {
            assert_eq!((id.as_str(), code), ("adm", ErrorCode::ForbiddenPath));
        }
        other => panic!("{other:?}"),
    }
    // A bad frame gets BAD_FRAME and the socket stays up.
    app.ws.send(Message::text("{nope")).unwrap();
    assert!(matches!(app.recv(), Frame::Error { code: ErrorCode::BadFrame, .. }));
    let w = app.fetch(&request("ok", "GET", "/api/health", &[], None));
    assert_eq!(w.status, 200);
}

/// A large request's buffer is freed with it (`wsread::WsReader` reads a large frame into a
/// buffer of its own) and the heap handed back after a quiet spell: the socket does not keep
/// the memory of its largest request.
#[test]
fn an_app_socket_gives_back_its_read_buffer_after_a_large_upload() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (_, _, mut app) = pair_app(&qr.url, &qr.token);
    let pid = env.pid().expect("bridge.pid");
    let w = app.fetch(&request("warm", "GET", "/api/health", &[], None));
    assert_eq!(w.status, 200);
    let before = rss_kib(pid);
    // The largest body whose request frame fits the 16 MiB message limit, about.
    let bytes = random_bytes((12 << 20) - (64 << 10));
    let up = raw_upload("up", &bytes);
    let v: Value = serde_json::from_slice(&app.fetch(&up).body).unwrap();
    assert_eq!(v["sha256"], format!("{:x}", Sha256::digest(&bytes)));
    // The heap is trimmed a while after the last large frame (`memory::TRIM_WHEN_QUIET`).
    let grown = rss_growth_settles(pid, before, 8 << 10);
    assert!(grown < 8 << 10, "the daemon holds {grown} KiB more after a 12 MiB upload");
    let v: Value = serde_json::from_slice(&app.fetch(&up).body).unwrap();
    assert_eq!(v["size"], bytes.len(), "the socket still carries large requests");
}

/// A message over the limit, or a frame that breaks RFC 6455, used to drop the socket right
/// after the close frame, with what the app had sent still unread: its stack got a reset and
/// no client library showed the 4008 (or 1002, 1007), only a lost connection. Now what follows
/// is dropped unread and the stream ends cleanly once the close frame has left.
#[test]
fn a_refused_stream_is_told_why_before_it_ends() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (client_id, secret, app) = pair_app(&qr.url, &qr.token);
    drop(app);
    let cases: [(&str, Vec<u8>, u16, &str); 3] = [
        (
            "a message over the limit (4 MiB of it sent)",
            client_frame(0x81, &vec![b'a'; 4 << 20], true, Some((16u64 << 20) + 1)),
            4008,
            "message too large",
        ),
        (
            "text that is not UTF-8",
            client_frame(0x81, &[0xFF, 0xFE], true, None),
            1007,
            "invalid UTF-8",
        ),
        (
            "an unmasked frame",
            client_frame(0x81, b"{}", false, None),
            1002,
            "WebSocket protocol error",
        ),
    ];
    for (what, bad, want, why) in cases {
        let mut app = reconnect(&qr.url, &secret);
        let mut s = app.ws.get_mut().try_clone().unwrap();
        let mut bytes = bad;
        bytes.extend(client_frame(0x81, &vec![b'j'; 256 << 10], true, None));
        let mut writer = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || writer.write_all(&bytes));
        let (code, reason) = expect_close_then_fin(&mut s, what);
        assert_eq!((code, reason.as_str()), (want, why), "{what}");
        let sent = sender.join().unwrap();
        assert!(sent.is_ok(), "{what}: the app's send failed: {sent:?}");
    }
    // The app comes back and is served.
    let mut app = reconnect(&qr.url, &secret);
    assert_echo(&mut app, "again", &client_id);
}

#[test]
fn stop_closes_the_lan_socket_and_the_port() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (_, _, mut app) = pair_app(&qr.url, &qr.token);
    let run = env.run(&["--stop"]);
    run.assert_code(0, "--stop");
    assert_eq!(app.wait_close(), Some(1001), "the app hears the bridge go away");
    assert!(
        TcpStream::connect(("127.0.0.1", env.lan_port)).is_err(),
        "the LAN port still accepts after --stop"
    );
    env.run(&["--stop"]).assert_code(0, "--stop again");

    // --doctor still checks the LAN path, and says the LAN daemon is stopped.
    let run = env.run(&["--doctor", "--json"]);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap_or(Value::Null);
    let hop = |id: &str| {
        let hops = v["hops"].as_array().cloned().unwrap_or_default();
        hops.into_iter().find(|h| h["id"] == id).unwrap_or(Value::Null)
    };
    for id in ["registry", "bridge", "relay"] {
        assert_eq!(hop(id)["state"], "skip", "{id}: {v}");
    }
    assert_eq!(hop("daemon")["state"], "fail", "{v}");
    assert_eq!(hop("daemon")["name"], "daemon LAN server alive", "{v}");
    assert!(hop("daemon")["fix"].as_str().is_some_and(|f| f.contains("--local")), "{v}");

    // --status too: it said "start it with: hermeschat-pair" and "No pairing yet", and plain
    // pairing asks for a registry a LAN-only machine has not got.
    let run = env.run(&["--status"]);
    run.assert_code(1, "--status with the LAN daemon stopped");
    assert!(run.stdout.contains("start it with: hermeschat-pair --local"), "{}", run.all());
    assert!(!run.stdout.contains("No pairing yet"), "{}", run.all());
}

/// A suspended daemon (SIGSTOP, Ctrl-Z) keeps its lock and its last status.json: --status and
/// --doctor say it is suspended and how to resume it, not that it serves.
#[test]
fn a_suspended_daemon_is_not_reported_serving() {
    let env = Env::new();
    let backend = Backend::start();
    env.pair_json(&backend, &[], &[]);
    let pid = env.pid().unwrap();
    let signal = |sig| {
        // SAFETY: a signal to the daemon this test started.
        unsafe { libc::kill(pid as libc::pid_t, sig) }
    };
    // kill(2) returns before the stop takes hold of every thread: on a busy machine --status
    // could look first and see it running. Wait until the kernel says it is stopped.
    let suspend = || {
        signal(libc::SIGSTOP);
        let until = Instant::now() + Duration::from_secs(10);
        while !hermeschat_pair::daemon::suspended(pid) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    suspend();
    let run = env.run(&["--status", "--port", &backend.port.to_string()]);
    signal(libc::SIGCONT);
    run.assert_code(1, "--status with the daemon suspended");
    assert!(run.stdout.contains(&format!("kill -CONT {pid}")), "{}", run.stdout);
    suspend();
    let run = env.run(&["--doctor", "--json"]);
    signal(libc::SIGCONT);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap_or(Value::Null);
    let hops = v["hops"].as_array().cloned().unwrap_or_default();
    let daemon = hops.iter().find(|h| h["id"] == "daemon").cloned().unwrap_or(Value::Null);
    assert_eq!(daemon["state"], "fail", "{v}");
    assert!(daemon["detail"].as_str().is_some_and(|d| d.contains("suspended")), "{v}");
    env.run(&["--status", "--port", &backend.port.to_string()]).assert_code(0, "resumed");
}

/// `lan.lock` held by a command that never lets go (suspended with Ctrl-Z) costs the LAN
/// server and `--status` a bounded wait, then a clear refusal: nothing freezes.
#[test]
fn a_held_lan_lock_freezes_nothing() {
    use std::os::fd::AsRawFd;
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (client_id, secret, app) = pair_app(&qr.url, &qr.token);
    drop(app);
    let lock = std::fs::File::open(env.home.join("lan.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let started = Instant::now();
    let (status, body) = refused(&qr.url, &secret);
    assert_eq!(status, 500, "{body}");
    assert!(started.elapsed() < Duration::from_secs(8), "waited {:?}", started.elapsed());
    let run = env.run(&["--status", "--port", &backend.port.to_string()]);
    assert!(run.all().contains("stayed locked"), "{}", run.all());
    drop(lock);
    let mut again = reconnect(&qr.url, &secret);
    assert_echo(&mut again, "after-lock", &client_id);
}

#[test]
fn reset_local_forgets_every_lan_device() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (_, secret, mut app) = pair_app(&qr.url, &qr.token);
    let (bp, lp) = (backend.port.to_string(), env.lan_port.to_string());
    let run = env.run(&env.local_args(&bp, &lp, &["--reset"]));
    run.assert_code(0, "--reset --local");
    assert!(run.stdout.contains("Forgot 1 LAN device"), "{}", run.all());
    assert!(std::path::Path::new(&env.cwd.join("hermeschat_pair.png")).exists(), "QR image");
    assert!(matches!(app.wait_close(), Some(1001) | None));
    assert_eq!(refused(&qr.url, &secret).0, 401, "a forgotten device must be refused");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(env.home.join("lan.json")).unwrap()).unwrap();
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(0), "devices after --reset: {v}");
    assert!(v["token"].is_object(), "a fresh token after --reset: {v}");
}

#[test]
fn unauthenticated_attempts_get_401_and_then_429() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    // No credential at all.
    let no_auth = ws_connect(&qr.url, &[]).map(|_| ()).unwrap_err();
    assert_eq!(no_auth.status(), Some(401));
    // A well-formed but unknown secret, and garbage.
    let fake = format!("hcs_{}", "0".repeat(64));
    assert_eq!(refused(&qr.url, &fake).0, 401);
    // A web page the phone opens (its browser names the page's origin) guessing: its failures
    // are counted apart and block only a web page's requests.
    let page = |n: usize| {
        let from_page = ws_connect(
            &format!("{}?token=hpt_guess{n}", qr.url),
            &[("Origin", "http://attacker.example")],
        );
        from_page.map(|_| ()).unwrap_err().status()
    };
    for n in 0..10 {
        assert_eq!(page(n), Some(401), "page guess {n}");
    }
    assert_eq!(page(10), Some(429), "the page's 11th guess");
    for _ in 0..8 {
        assert_eq!(refused(&qr.url, "hpt_guess").0, 401);
    }
    // The 10th guess from this address inside the minute is refused, and the next attempt is
    // slowed down, even with the right token (the missing credential guessed nothing).
    assert_eq!(refused(&qr.url, "hpt_guess").0, 401);
    match LanApp::connect(&qr.url, &qr.token) {
        Err(ConnectError::Http(429, body)) => assert!(body.contains("RATE_LIMITED"), "{body}"),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // A plain HTTP request to the route (not an upgrade) is refused too, never served.
    let mut s = TcpStream::connect(("127.0.0.1", env.lan_port)).unwrap();
    s.write_all(b"GET /ws/app HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 429") || answer.starts_with("HTTP/1.1 401"), "{answer}");
    let log = env.log();
    assert!(log.contains("429 for 127.0.0.1"), "{log}");
    // One line per address and reason a minute, however many attempts: 20 above.
    assert_eq!(log.matches("401 for 127.0.0.1: invalid credential").count(), 1, "{log}");
    assert_eq!(log.matches("401 for 127.0.0.1: no credential").count(), 1, "{log}");
}

#[test]
fn bad_host_is_a_usage_error_and_no_qr_is_printed() {
    let env = Env::new();
    let backend = Backend::start();
    let bp = backend.port.to_string();
    let run = env.run(&["--local", "--host", "0.0.0.0", "--port", &bp]);
    run.assert_code(2, "--host 0.0.0.0");
    let run = env.run(&["--local", "--host", "not-an-ip", "--port", &bp]);
    run.assert_code(2, "--host not-an-ip");
    assert!(run.all().contains("--host"), "{}", run.all());
    // An address that is not this machine's: the daemon cannot bind it; exit 1, no QR.
    let run = env.run(&["--local", "--host", "192.0.2.1", "--port", &bp, "--local-port", "18766"]);
    run.assert_code(1, "--host of another machine");
    assert!(!run.stdout.contains("hermes-local"), "{}", run.stdout);
    assert!(!env.cwd.join("hermeschat_pair.png").exists());
}

#[test]
fn no_backend_means_no_qr() {
    let env = Env::new();
    let dead = closed_port().to_string();
    let lp = env.lan_port.to_string();
    let run = env.run(&env.local_args(&dead, &lp, &["--no-server"]));
    run.assert_code(1, "--local without a backend");
    assert!(!run.stdout.contains("hermes-local"), "{}", run.stdout);
    assert!(!env.cwd.join("hermeschat_pair.png").exists());
    assert!(env.pid().is_none(), "no daemon without a backend");
}

#[test]
fn local_restarts_a_relay_daemon_in_lan_mode_and_back() {
    let env = Env::new();
    let backend = Backend::start();
    let relay = Relay::new();
    let bp = backend.port.to_string();
    let server = relay.url();
    env.run(&["--json", "--server", &server, "--port", &bp]).assert_code(0, "relay pairing");
    let relay_pid = env.pid().unwrap();

    let (bp2, lp) = (bp.clone(), env.lan_port.to_string());
    let run = env.run(&env.local_args(&bp2, &lp, &[]));
    run.assert_code(0, "--local over a relay daemon");
    assert!(run.all().contains("relay-mode bridge daemon"), "{}", run.all());
    assert_ne!(env.pid(), Some(relay_pid), "the daemon must be restarted in LAN mode");
    let status: Value =
        serde_json::from_str(env.run(&["--status", "--json", "--port", &bp]).stdout.trim())
            .unwrap();
    assert_eq!(status["lan"]["serving"], true, "{status}");
    assert_eq!(status["relay"]["connected"], false, "{status}");
    assert!(env.home.join("bridge.json").exists(), "the relay identity is kept");

    // And back: the plain command restarts it in relay mode.
    let run = env.run(&["--server", &server, "--port", &bp]);
    run.assert_code(0, "relay again");
    assert!(run.all().contains("LAN devices are offline until you run"), "{}", run.all());
    // The registry may report the bridge online a moment before status.json says so.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let run = env.run(&["--status", "--json", "--port", &bp]);
        let status: Value = serde_json::from_str(run.stdout.trim()).unwrap();
        if status["relay"]["connected"] == true || Instant::now() >= deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(status["lan"]["serving"], true, "{status}");
    assert_eq!(status["relay"]["connected"], true, "{status}");
    assert!(TcpStream::connect(("127.0.0.1", env.lan_port)).is_err(), "LAN port still open");
}

/// A tiny backend that offers `POST /api/local-bridge/register-token`.
fn token_backend() -> (u16, mpsc::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, len) = loop {
                let Ok(n) = s.read(&mut chunk) else { break (0, 0) };
                if n == 0 {
                    break (0, 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    break (i + 4, len);
                }
            };
            if head_end == 0 {
                continue;
            }
            while buf.len() < head_end + len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let first =
                String::from_utf8_lossy(&buf[..head_end]).lines().next().unwrap_or("").to_owned();
            let body = if first.starts_with("POST /api/local-bridge/register-token") {
                let v: Value = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
                let _ = tx.send(v);
                r#"{"ok":true}"#
            } else {
                r#"{"status":"ok"}"#
            };
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, rx)
}

#[test]
fn a_backend_with_register_token_serves_the_lan_itself() {
    let env = Env::new();
    let (port, registered) = token_backend();
    let (bp, lp) = (port.to_string(), env.lan_port.to_string());
    let run = env.run(&env.local_args(&bp, &lp, &["--json"]));
    run.assert_code(0, "--local with a token-taking backend");
    let qr = parse_local_payload(&run.stdout);
    assert_eq!(qr.url, format!("ws://127.0.0.1:{port}/ws/app"), "the backend's LAN URL");
    let got = registered.recv_timeout(Duration::from_secs(5)).expect("token registered");
    assert_eq!(got["token"], qr.token, "{got}");
    assert_eq!(got["expiresAt"], qr.expires_at, "{got}");
    assert!(env.pid().is_none(), "no daemon is needed when the backend serves the LAN");
}

#[test]
fn the_built_in_backend_is_served_over_the_lan() {
    // Nothing listens on the backend port: the daemon starts the built-in backend there and
    // serves the LAN (the zero-setup path of the README).
    let env = Env::new();
    let (bp, lp) = (listen_port().to_string(), env.lan_port.to_string());
    let run = env.run(&env.local_args(&bp, &lp, &["--json"]));
    run.assert_code(0, "--local with the built-in backend");
    let qr = parse_local_payload(&run.stdout);
    let (_, _, mut app) = pair_app(&qr.url, &qr.token);
    let w = app.fetch(&request("h", "GET", "/api/health", &[], None));
    assert_eq!(w.status, 200, "{:?}", String::from_utf8_lossy(&w.body));
}

/// `GET path` straight at `127.0.0.1:port` (no key): the status line and the body.
fn plain_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(RECV)).unwrap();
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (line, rest) = text.split_once("\r\n").unwrap_or((&text, ""));
    (line.to_owned(), rest.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned())
}

/// Where the owner of a connection cannot be looked up (macOS; here turned off with the
/// test-only `HERMESCHAT_PEER_LOOKUP=off`), the LAN bridge brings the built-in backend its
/// key: a LAN app's request is served, while one straight from this machine without the key
/// is refused 403 (the health check aside).
#[test]
fn the_lan_bridge_brings_the_built_in_backend_its_key() {
    let env = Env::new();
    let bp = listen_port();
    let (bps, lp) = (bp.to_string(), env.lan_port.to_string());
    let run = env.run_env(
        &env.local_args(&bps, &lp, &["--json"]),
        &[(hermeschat_pair::backend::peer::LOOKUP_ENV, "off")],
    );
    run.assert_code(0, "--local with the built-in backend, without the owner lookup");
    let qr = parse_local_payload(&run.stdout);
    let (_, _, mut app) = pair_app(&qr.url, &qr.token);
    let w = app.fetch(&request("u", "GET", "/api/uploads", &[], None));
    assert_eq!(w.status, 200, "{:?}", String::from_utf8_lossy(&w.body));
    let (line, body) = plain_get(bp, "/api/uploads");
    assert_eq!(line, "HTTP/1.1 403 Forbidden", "{body}");
    assert!(body.contains("backend_key_required"), "{body}");
    assert_eq!(plain_get(bp, "/api/health").0, "HTTP/1.1 200 OK");
    let mode = std::fs::metadata(env.home.join("backend.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Another state directory's daemon serving its built-in backend on the port (here, one whose
/// directory was deleted, which stops within seconds) is waited for, not taken for the user's
/// own API: the new daemon then runs the built-in backend itself.
#[test]
fn another_daemons_built_in_backend_is_waited_for() {
    let old = Env::new();
    let bp = listen_port().to_string();
    let lp = old.lan_port.to_string();
    old.run(&old.local_args(&bp, &lp, &["--json"])).assert_code(0, "first --local");
    while let Err(e) = std::fs::remove_dir_all(&old.home)
        && e.kind() != std::io::ErrorKind::NotFound
    {}
    let env = Env::new();
    let lp = env.lan_port.to_string();
    let run = env.run(&env.local_args(&bp, &lp, &[]));
    run.assert_code(0, "--local on the port of another daemon's built-in backend");
    assert!(
        run.all().contains("another hermeschat-pair daemon's built-in backend"),
        "{}",
        run.all()
    );
    let config = std::fs::read_to_string(env.home.join("config.json")).unwrap();
    assert!(!config.contains("externalBackend"), "taken for the user's own API: {config}");
}

/// A TCP connection to `127.0.0.1:port` from the loopback address `127.0.0.<n>`, as another
/// host of the LAN would open one (each has its own address). Linux only: elsewhere loopback
/// has 127.0.0.1 alone.
#[cfg(target_os = "linux")]
fn connect_from(n: u8, port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sockaddr = |a: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a) },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, bound and connected with valid sockaddr_in values of `len`
    // bytes; on success its descriptor is owned by the TcpStream alone.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let from = sockaddr([127, 0, 0, n], 0);
        let to = sockaddr([127, 0, 0, 1], port);
        assert_eq!(libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len), 0);
        assert_eq!(libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len), 0);
        TcpStream::from_raw_fd(fd)
    }
}

/// True when the server closed `s` (read gives EOF or a reset) within a second.
#[cfg(target_os = "linux")]
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        }
    }
}

/// Idle sockets other hosts of the LAN open (each the most one address may hold, from as many
/// addresses as it takes to fill every slot) never keep a paired phone out.
#[cfg(target_os = "linux")]
#[test]
fn idle_sockets_of_other_hosts_never_keep_a_paired_phone_out() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (client_id, secret, app) = pair_app(&qr.url, &qr.token);
    drop(app);
    // One address holds 8 sockets that send nothing; its 9th is closed at once.
    let mut held: Vec<TcpStream> = (0..8).map(|_| connect_from(2, env.lan_port)).collect();
    let mut ninth = connect_from(2, env.lan_port);
    assert!(closed_by_server(&mut ninth), "a 9th idle socket from one address was kept");
    // Eight addresses fill all 64 slots.
    for n in 3..10 {
        held.extend((0..8).map(|_| connect_from(n, env.lan_port)));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The phone still gets in: the oldest idle socket makes room.
    let mut app = reconnect(&qr.url, &secret);
    assert_echo(&mut app, "after-flood", &client_id);
    assert!(closed_by_server(&mut held[0]), "the oldest idle socket was not the one to go");
    assert!(env.log().contains("connection refused for 127.0.0.2"), "{}", env.log());
}

/// A lost phone paired over the LAN is cut off on its own: `--devices` lists the LAN devices
/// (no relay pairing needed), `--revoke` closes its socket (4003) and its secret stops working,
/// and the other devices keep theirs.
#[test]
fn a_lan_device_is_listed_and_revoked_on_its_own() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (lost_id, lost_secret, mut lost) = pair_app(&qr.url, &qr.token);
    let token = env.pair_json(&backend, &["--refresh-code"], &[]).token;
    let (kept_id, _, mut kept) = pair_app(&qr.url, &token);

    // Both listed, and online (status.json has the apps online within a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let devices = env.run(&["--devices", "--json"]);
        devices.assert_code(0, "--devices with LAN devices only");
        let v: Value = serde_json::from_str(&devices.stdout).unwrap();
        let all_online = v["lanDevices"]
            .as_array()
            .is_some_and(|d| d.len() == 2 && d.iter().all(|d| d["online"] == true));
        if all_online || Instant::now() >= deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let listed: BTreeSet<&str> = v["lanDevices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["clientId"].as_str().unwrap())
        .collect();
    assert_eq!(listed, BTreeSet::from([lost_id.as_str(), kept_id.as_str()]), "{v}");
    assert!(v["lanDevices"].as_array().unwrap().iter().all(|d| d["online"] == true), "{v}");

    let run = env.run(&["--revoke", &lost_id]);
    run.assert_code(0, "--revoke of a LAN device");
    assert!(run.stdout.contains("Revoked LAN device"), "{}", run.stdout);
    assert_eq!(lost.wait_close(), Some(4003), "the revoked device's socket");
    assert_eq!(refused(&qr.url, &lost_secret).0, 401, "the revoked secret still works");
    assert_echo(&mut kept, "still-here", &kept_id);
    let again = env.run(&["--revoke", &lost_id]);
    assert_eq!(again.code, Some(1), "a second revoke: {}", again.stdout);
}

/// A pairing whose app vanished before it sent anything (so `paired` may never have reached
/// it) is taken back: the device is forgotten and the same QR code pairs again. One the app
/// answered stays when its socket closes.
#[test]
fn a_pairing_the_app_never_answered_is_taken_back() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let addr = qr.url.trim_start_matches("ws://").split('/').next().unwrap().to_owned();
    let lan_devices = || -> Vec<Value> {
        let run = env.run(&["--devices", "--json"]);
        let v: Value = serde_json::from_str(&run.stdout).unwrap_or(Value::Null);
        v["lanDevices"].as_array().cloned().unwrap_or_default()
    };

    // The upgrade is answered (the token is used up), then the connection drops unanswered.
    let mut raw = TcpStream::connect(&addr).unwrap();
    let request = format!(
        "GET /ws/app HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        qr.token
    );
    raw.write_all(request.as_bytes()).unwrap();
    raw.set_read_timeout(Some(RECV)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // `bridge.status` follows `paired`: the whole paired frame has arrived.
    while !got.windows(15).any(|w| w == b"\"bridge.status\"") {
        let n = raw
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&got)));
        assert!(n > 0, "closed before paired: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&got));
    assert_eq!(lan_devices().len(), 1, "the device exists while its socket is open");
    drop(raw);

    let deadline = Instant::now() + RECV;
    while !lan_devices().is_empty() {
        assert!(Instant::now() < deadline, "the unanswered pairing stays: {:?}", lan_devices());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(env.log().contains("left before its pairing was confirmed"), "{}", env.log());

    // An app that did read `paired` retries with its secret: refused, but never counted as a
    // guess, so the address is not locked out (429) when the QR code is scanned again.
    let text = String::from_utf8_lossy(&got);
    let secret = text
        .split("\"clientSecret\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the paired frame's secret")
        .to_owned();
    for _ in 0..12 {
        let (status, body) = refused(&qr.url, &secret);
        assert_eq!(status, 401, "{body}");
        assert!(body.to_string().contains("did not complete"), "{body}");
    }

    // The same token pairs again; this app answers, so its pairing outlives its socket.
    let (client_id, secret, app) = pair_app(&qr.url, &qr.token);
    drop(app);
    let mut again = reconnect(&qr.url, &secret);
    assert_echo(&mut again, "r1", &client_id);
    assert_eq!(lan_devices().len(), 1);
}

/// Replaces `path` with `text` the way a program would (a new file renamed over it).
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("test-tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The copies of a damaged lan.json kept in the state directory.
fn lan_json_copies(env: &Env) -> Vec<PathBuf> {
    let mut copies: Vec<PathBuf> = std::fs::read_dir(&env.home)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("lan.json.corrupt-"))
        .map(|e| e.path())
        .collect();
    copies.sort();
    copies
}

/// Waits (10 s at most) until bridge.log holds `what`.
#[track_caller]
fn wait_log(env: &Env, what: &str) {
    let deadline = Instant::now() + RECV;
    while !env.log().contains(what) {
        assert!(Instant::now() < deadline, "bridge.log never said {what:?}:\n{}", env.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// lan.json damaged under a running daemon: one bad field of one device drops that device
/// only (its socket closes 4003; the others keep working), a file that is not JSON at all is
/// moved aside; each time bridge.log says what happened, `--status` and `--devices` warn, and
/// the damaged original is kept byte for byte.
#[test]
fn a_damaged_lan_json_is_told_and_its_valid_devices_kept() {
    let env = Env::new();
    let backend = Backend::start();
    let bp = backend.port.to_string();
    let qr = env.pair_json(&backend, &[], &[]);
    let (good_id, _, mut good) = pair_app(&qr.url, &qr.token);
    let token = env.pair_json(&backend, &["--refresh-code"], &[]).token;
    let (bad_id, _, mut bad) = pair_app(&qr.url, &token);

    // One field of one device goes bad.
    let path = env.home.join("lan.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for d in v["devices"].as_array_mut().unwrap() {
        if d["clientId"] == bad_id.as_str() {
            d["lastSeenAt"] = json!("yesterday");
        }
    }
    let damaged = serde_json::to_string_pretty(&v).unwrap();
    replace_file(&path, &damaged);
    assert_eq!(bad.wait_close(), Some(4003), "the dropped device's socket");
    wait_log(&env, &format!("{bad_id} (invalid type: string \"yesterday\""));
    assert!(env.log().contains("kept the 1 valid device"), "{}", env.log());
    assert_echo(&mut good, "kept", &good_id);
    let copies = lan_json_copies(&env);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(std::fs::read_to_string(&copies[0]).unwrap(), damaged, "the original is kept");

    let run = env.run(&["--status", "--port", &bp]);
    run.assert_code(0, "--status after a device was dropped");
    assert!(run.stdout.contains("LAN devices: 1 (1 online now)"), "{}", run.stdout);
    assert!(run.stdout.contains("⚠ a damaged lan.json was set aside as"), "{}", run.stdout);
    let status: Value =
        serde_json::from_str(env.run(&["--status", "--json", "--port", &bp]).stdout.trim())
            .unwrap();
    let warning = status["lan"]["warning"].as_str().unwrap_or_default();
    assert!(warning.contains(&copies[0].display().to_string()), "{status}");
    let run = env.run(&["--devices", "--json"]);
    run.assert_code(0, "--devices --json after a device was dropped");
    let devices: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(devices["lanDevices"].as_array().map(Vec::len), Some(1), "{devices}");
    assert_eq!(devices["lanDevices"][0]["clientId"], good_id.as_str(), "{devices}");
    assert!(devices["lanWarning"].as_str().is_some_and(|w| w.contains("set aside")), "{devices}");
    let run = env.run(&["--devices"]);
    assert!(run.stdout.contains("⚠ a damaged lan.json was set aside"), "{}", run.stdout);

    // Not JSON at all: moved aside whole, and said.
    replace_file(&path, "{\"v\": 1, \"devices\": [");
    assert_eq!(good.wait_close(), Some(4003), "a device of the unusable file");
    wait_log(&env, "lan.json was unusable (not valid JSON");
    let run = env.run(&["--status", "--port", &bp]);
    assert!(run.stdout.contains("LAN devices: 0"), "{}", run.stdout);
    assert!(run.stdout.contains("⚠ a damaged lan.json was set aside"), "{}", run.stdout);
    assert_eq!(lan_json_copies(&env).len(), 2);
}

/// `--devices` with the relay down: the LAN devices are local, so they are listed (exit 0)
/// with one warning line for the relay's apps (`relayError`, `"devices": null` in JSON).
#[test]
fn devices_lists_the_lan_devices_when_the_relay_is_down() {
    let env = Env::new();
    let backend = Backend::start();
    let mut relay = Relay::new();
    let bp = backend.port.to_string();
    env.run(&["--json", "--server", &relay.url(), "--port", &bp]).assert_code(0, "relay pairing");
    let qr = env.pair_json(&backend, &[], &[]);
    let (client_id, _, _app) = pair_app(&qr.url, &qr.token);
    relay.kill();

    for extra in [&[][..], &["--local"][..]] {
        let mut args = vec!["--devices"];
        args.extend_from_slice(extra);
        let run = env.run(&args);
        run.assert_code(0, "--devices with the relay down");
        assert!(run.stdout.contains(&client_id), "{}", run.all());
        let warnings: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with('⚠')).collect();
        assert_eq!(warnings.len(), 1, "{}", run.stdout);
        assert!(warnings[0].contains("paired through the relay are unknown"), "{}", run.stdout);
        assert!(warnings[0].contains("/v1/health"), "the next step: {}", run.stdout);

        args.push("--json");
        let run = env.run(&args);
        run.assert_code(0, "--devices --json with the relay down");
        let v: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(v["devices"], Value::Null, "unknown, not empty: {v}");
        assert!(v["relayError"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert_eq!(v["lanDevices"][0]["clientId"], client_id.as_str(), "{v}");
    }
}

/// Makes `dir` immutable (`chattr +i`: even root cannot create or rename files in it, as with
/// a full disk) until dropped. `None` where the filesystem does not support it.
struct Immutable(PathBuf);

impl Immutable {
    fn new(dir: &std::path::Path) -> Option<Immutable> {
        let ok = Command::new("chattr").arg("+i").arg(dir).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("note: chattr +i is not supported here; skipping the unwritable check");
        }
        ok.then(|| Immutable(dir.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// `--revoke` of a LAN device when lan.json cannot be written: a write failure, said as one,
/// with nothing changed (no "cannot read", no "already revoked?"); it works once writes do.
#[test]
fn a_revoke_that_cannot_be_saved_says_so() {
    let env = Env::new();
    let backend = Backend::start();
    let qr = env.pair_json(&backend, &[], &[]);
    let (client_id, secret, app) = pair_app(&qr.url, &qr.token);
    drop(app);
    let before = std::fs::read(env.home.join("lan.json")).unwrap();
    let Some(guard) = Immutable::new(&env.home) else { return };
    let run = env.run(&["--revoke", &client_id]);
    drop(guard);
    run.assert_code(1, "--revoke with an unwritable lan.json");
    let all = run.all();
    assert!(all.contains("cannot save the LAN devices (lan.json)"), "{all}");
    assert!(all.contains("Nothing was changed"), "{all}");
    assert!(!all.contains("cannot read") && !all.contains("already revoked"), "{all}");
    assert_eq!(std::fs::read(env.home.join("lan.json")).unwrap(), before);
    reconnect(&qr.url, &secret);
    env.run(&["--revoke", &client_id]).assert_code(0, "--revoke once writes work");
}

/// A wrong `--host` or a busy `--local-port` is found out before the working LAN daemon is
/// stopped (or its devices forgotten, or its QR replaced): exit 1 naming the cause, and the
/// daemon, its devices and the pending QR are as they were. `--refresh-code --local` refuses
/// to move the running daemon (exit 2).
#[test]
fn a_bad_host_or_busy_port_leaves_the_running_daemon_alone() {
    let env = Env::new();
    let backend = Backend::start();
    let (bp, lp) = (backend.port.to_string(), env.lan_port.to_string());
    let first = env.pair_json(&backend, &[], &[]);
    let (client_id, _, mut app) = pair_app(&first.url, &first.token);
    let qr = env.pair_json(&backend, &["--refresh-code"], &[]);
    let pid = env.pid().expect("a daemon");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let other_port = listen_port().to_string();

    let cases: [(&[&str], i32, &str); 6] = [
        (&["--local", "--host", "192.0.2.1"], 1, "192.0.2.1 is not an address of this machine"),
        (&["--local", "--host", "127.0.0.1", "--local-port", &busy_port], 1, "is in use"),
        (&["--reset", "--local", "--host", "192.0.2.1"], 1, "not an address of this machine"),
        (&["--refresh-code", "--local", "--host", "192.0.2.1"], 2, "keeps what the running"),
        (&["--refresh-code", "--local", "--local-port", &other_port], 2, "keeps what the running"),
        (&["--refresh-code", "--local", "--local-port", &busy_port], 2, "keeps what the running"),
    ];
    for (args, code, why) in cases {
        let mut args = args.to_vec();
        args.extend(["--port", &bp]);
        let run = env.run(&args);
        run.assert_code(code, &args.join(" "));
        assert!(run.all().contains(why), "{args:?}: {}", run.all());
        assert!(!run.stdout.contains("hermes-local"), "{args:?}: {}", run.stdout);
        assert_eq!(env.pid(), Some(pid), "{args:?} stopped the daemon");
        assert!(env.lock_held(), "{args:?}: the daemon is gone");
        assert_echo(&mut app, "still-served", &client_id);
    }
    // The pending QR from before is still the one that pairs.
    let (second_id, _, _) = pair_app(&qr.url, &qr.token);
    assert_ne!(second_id, client_id);
    // The running daemon's own address and port, given again: fine, and it is kept.
    let run = env.run(&[
        "--refresh-code",
        "--local",
        "--host",
        "127.0.0.1",
        "--local-port",
        &lp,
        "--port",
        &bp,
        "--json",
    ]);
    run.assert_code(0, "--refresh-code --local with the running daemon's address");
    assert_eq!(parse_local_payload(&run.stdout).url, qr.url);
    assert_eq!(env.pid(), Some(pid));
    drop(busy);
    // Moving it on purpose (plain --local) says that paired devices must scan again.
    let run =
        env.run(&["--local", "--host", "127.0.0.1", "--local-port", &other_port, "--port", &bp]);
    run.assert_code(0, "--local on another port");
    assert!(run.all().contains("must scan the new QR code"), "{}", run.all());
}
