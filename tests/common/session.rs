//! The `hermeschat-pair` session harness shared by the e2e suites: a throwaway state directory
//! and working directory per test ([`Env`], which stops its daemon on drop), the FastAPI
//! backend fixture ([`Backend`]), and helpers to pair an app from the `--json` payload and
//! exchange requests through the relay.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AppClient, Event, Registry, Relay, b64, fresh_dir, unb64};
use hermeschat_pair::protocol::{ErrorCode, Frame, Headers, RelayQr, RequestFrame, UPLOAD_WINDOW};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The CLI under test (see [`super::our_binary`]).
pub static PAIR_BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    super::our_binary("hermeschat-pair", env!("CARGO_BIN_EXE_hermeschat-pair"))
});

/// Deadline of one CLI run (pairing waits up to 20 s for the bridge to come online).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a test waits for a backend-side effect (a cancel reaching the backend, …).
pub const EFFECT_TIMEOUT: Duration = Duration::from_secs(5);

pub const MIB: usize = 1 << 20;

// =============================================================================================
// Running the CLI

/// The outcome of one CLI run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout and stderr together (where a message goes is not part of the contract).
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32, what: &str) {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: exit code\n--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// Reads `r` to the end on a thread; the text arrives on the returned channel.
pub fn read_all<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Runs `cmd` to completion (killing it after `timeout`) and collects its output.
#[track_caller]
pub fn run_cmd(cmd: Command, timeout: Duration) -> Run {
    try_run(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Spawns `cmd`, again while its program file is busy (`ETXTBSY`, for up to a second): a
/// test that has just written a copy of a binary (an upgrade) may find the copy's write
/// descriptor inherited, for the instant until it execs, by a process another test thread is
/// starting.
pub fn spawn_retrying(cmd: &mut Command) -> std::io::Result<Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// [`run_cmd`] without panicking (for `Drop`).
pub fn try_run(mut cmd: Command, timeout: Duration) -> Result<Run, String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn_retrying(&mut cmd).map_err(|e| format!("cannot run {shown}: {e}"))?;
    let out = read_all(child.stdout.take().unwrap());
    let err = read_all(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
            let stderr = err.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
            return Err(format!(
                "{shown} did not finish within {timeout:?}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The CLI has exited: its pipes must close now. If they stay open, the daemon it started
    // inherited them (a daemon must detach from the terminal's stdio).
    let stdout = out.recv_timeout(Duration::from_secs(5)).map_err(|_| {
        format!("{shown} exited ({status}) but its stdout stayed open: the daemon holds it")
    })?;
    let stderr = err.recv_timeout(Duration::from_secs(5)).map_err(|_| {
        format!("{shown} exited ({status}) but its stderr stayed open: the daemon holds it")
    })?;
    Ok(Run { code: status.code(), stdout, stderr })
}

/// A process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some(Some('Z' | 'X')) | None)
        }
        Err(_) => false,
    }
}

/// One user's machine: a state directory and a current directory, and the CLI run in them.
/// Dropping it stops the daemon (`--stop`, then SIGKILL by pid if it still holds the lock) and
/// removes the directories.
pub struct Env {
    pub root: PathBuf,
    pub home: PathBuf,
    pub cwd: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let root = fresh_dir("pair");
        let home = root.join("home");
        let cwd = root.join("cwd");
        std::fs::create_dir_all(&cwd).unwrap();
        Env { root, home, cwd }
    }

    /// The CLI with a clean environment: only what the test passes configures it.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_of(Path::new(&*PAIR_BIN), args)
    }

    /// [`Env::cmd`] running the program at `program` (a copy of the CLI).
    pub fn cmd_of(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("HERMESCHAT_HOME", &self.home)
            // Pairing and a `--foreground` bridge wake the Hermes gateway: never the real one
            // of the machine the tests run on.
            .env("HERMES_HOME", self.root.join("hermes"))
            .env("NO_COLOR", "1")
            .env_remove("HERMESCHAT_REGISTRY_URL")
            .env_remove("HERMESCHAT_LOCAL_HOST")
            .env_remove("HERMESCHAT_LOCAL_PORT")
            // Not a service's bridge, even when the tests run under a service manager.
            .env_remove("HERMESCHAT_SERVICE")
            .env_remove("INVOCATION_ID")
            .current_dir(&self.cwd);
        cmd
    }

    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Run {
        run_cmd(self.cmd(args), CMD_TIMEOUT)
    }

    /// [`Env::run`] with extra environment variables.
    #[track_caller]
    pub fn run_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Run {
        let mut cmd = self.cmd(args);
        cmd.envs(vars.iter().copied());
        run_cmd(cmd, CMD_TIMEOUT)
    }

    /// `--json` pairing against `relay` and `backend`; asserts success and returns the payload.
    #[track_caller]
    pub fn pair_json(&self, relay: &Relay, backend: &Backend, extra: &[&str]) -> RelayQr {
        let server = relay.url();
        let port = backend.port.to_string();
        let mut args = vec!["--json", "--server", &server, "--port", &port];
        args.extend_from_slice(extra);
        let run = self.run(&args);
        run.assert_code(0, "hermeschat-pair --json");
        parse_payload(&run.stdout, &server)
    }

    /// The pid recorded in `bridge.pid`.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.home.join("bridge.pid")).ok()?.trim().parse().ok()
    }

    #[track_caller]
    pub fn daemon_pid(&self) -> u32 {
        let pid = self.pid().expect("bridge.pid holds no pid while the daemon should run");
        assert!(alive(pid), "daemon pid {pid} from bridge.pid is not alive");
        pid
    }

    pub fn bridge_json(&self) -> Value {
        let text = std::fs::read_to_string(self.home.join("bridge.json")).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bridge.json {text}: {e}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("bridge.log")).unwrap_or_default()
    }

    pub fn png(&self) -> PathBuf {
        self.cwd.join("hermeschat_pair.png")
    }

    /// Whether some process holds the daemon's lock on `bridge.pid`.
    pub fn lock_held(&self) -> bool {
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
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.home.exists() {
            let pid = self.pid();
            let _ = try_run(self.cmd(&["--stop"]), Duration::from_secs(20));
            if self.lock_held()
                && let Some(pid) = pid.or(self.pid())
            {
                // SAFETY: sends a signal to the daemon this test started.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Parses and checks `--json` output: exactly one line holding exactly the QR payload object.
#[track_caller]
pub fn parse_payload(stdout: &str, server: &str) -> RelayQr {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json must print exactly one line, got:\n{stdout}");
    let value: Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e}): {stdout}"));
    let keys: BTreeSet<&str> =
        value.as_object().expect("payload object").keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["v", "k", "g", "a", "s", "u", "n"]), "payload keys: {value}");
    assert_eq!(value["v"], 2, "{value}");
    assert_eq!(value["k"], "hp", "{value}");
    let qr: RelayQr = serde_json::from_value(value.clone()).unwrap();
    assert!(is_hex(&qr.g, 24), "g is not a bridgeId: {value}");
    assert!(is_hex(&qr.a, 32), "a is not an access code: {value}");
    assert_eq!(qr.s, server, "s must be the registry URL: {value}");
    let relay_host = server.trim_start_matches("http://");
    assert_eq!(qr.u, format!("ws://{relay_host}/ws/app"), "u must be the app relay URL: {value}");
    assert!(!qr.n.trim().is_empty(), "n (display name) is empty: {value}");
    qr
}

pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// =============================================================================================
// The FastAPI backend fixture

/// `tests/fixtures/backend.py` running under uvicorn.
pub struct Backend {
    pub child: Option<Child>,
    pub port: u16,
    pub stderr: Arc<Mutex<String>>,
}

impl Backend {
    /// Starts on a free port.
    pub fn start() -> Backend {
        let mut b = Backend { child: None, port: 0, stderr: Arc::default() };
        b.spawn(0);
        b
    }

    pub fn spawn(&mut self, port: u16) {
        let python = std::env::var("HERMESCHAT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/backend.py");
        let mut child = Command::new(&python)
            .arg(script)
            .arg(port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} {script}: {e}"));
        let stderr = self.stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
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
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(p) = line.strip_prefix("READY ") {
                        let got: u16 = p.trim().parse().unwrap();
                        assert!(port == 0 || got == port, "backend asked for {port}, got {got}");
                        self.port = got;
                        return;
                    }
                }
                Err(_) => {
                    self.kill();
                    panic!(
                        "the FastAPI fixture did not print READY within 30 s (did you run \
                         `python3 -m pip install -r tests/fixtures/requirements.txt`?)\n\
                         stderr:\n{}",
                        self.stderr.lock().unwrap()
                    );
                }
            }
        }
    }

    /// SIGKILL (a crashed backend).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill, then start again on the same port.
    pub fn restart(&mut self) {
        let port = self.port;
        self.kill();
        self.spawn(port);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET path` straight at the backend (not through the bridge).
    #[track_caller]
    pub fn get(&self, path: &str) -> Value {
        let (status, body) = Registry::new(&self.url()).call("GET", path, None, None);
        assert_eq!(status, 200, "direct GET {path}: {body}");
        body
    }

    /// Waits until `/api/cancelled`'s `field` reaches `want`.
    #[track_caller]
    pub fn wait_counter(&self, field: &str, want: u64) {
        let deadline = Instant::now() + EFFECT_TIMEOUT;
        loop {
            let v = self.get("/api/cancelled");
            if v[field].as_u64() == Some(want) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("backend /api/cancelled {field} never reached {want}: {v}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

// =============================================================================================
// Frames

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

pub fn request_b64(id: &str, path: &str, headers: &[(&str, &str)], bytes: &[u8]) -> Frame {
    let Frame::Request(mut r) = request(id, "POST", path, headers, None) else { unreachable!() };
    r.body = Some(b64(bytes).into());
    r.body_base64 = true;
    Frame::Request(r)
}

/// An app's socket, relayed or LAN.
pub trait FrameIo {
    /// Sends a frame.
    fn send_frame(&mut self, f: &Frame);
    /// The next frame.
    fn recv_frame(&mut self) -> Frame;
}

impl FrameIo for AppClient {
    fn send_frame(&mut self, f: &Frame) {
        self.send(f);
    }
    #[track_caller]
    fn recv_frame(&mut self) -> Frame {
        self.recv()
    }
}

/// The frames an app sees for a streamed upload ([`stream_upload`]).
#[derive(Debug)]
pub struct Uploaded {
    /// The totals of the `request.ack` frames, in order.
    pub acks: Vec<u64>,
    /// The response frames, terminal one last.
    pub frames: Vec<Frame>,
    /// Body bytes sent in `request.chunk` frames.
    pub sent: usize,
}

/// Sends `data` as a streamed upload the way an app does (PROTOCOL §5): `start` as a
/// `request.start` announcing the length, then `request.chunk` frames of `chunk` bytes in
/// base64, never more than [`UPLOAD_WINDOW`] bytes ahead of the last `request.ack`. Reads
/// frames of this request only (through `recv`) until its terminal frame.
#[track_caller]
pub fn stream_upload(
    app: &mut impl FrameIo,
    mut start: RequestFrame,
    data: &[u8],
    chunk: usize,
) -> Uploaded {
    let id = start.id.clone();
    start.length = Some(data.len() as u64);
    app.send_frame(&Frame::RequestStart(start));
    let mut up = Uploaded { acks: Vec::new(), frames: Vec::new(), sent: 0 };
    loop {
        let acked = up.acks.last().copied().unwrap_or(0);
        while up.sent < data.len() {
            let n = chunk.min(data.len() - up.sent);
            if (up.sent + n) as u64 - acked > UPLOAD_WINDOW {
                break;
            }
            app.send_frame(&Frame::RequestChunk {
                id: id.clone(),
                client: None,
                conn: None,
                body: b64(&data[up.sent..up.sent + n]).into(),
                body_base64: true,
            });
            up.sent += n;
        }
        let f = app.recv_frame();
        assert_eq!(f.request_id(), Some(id.as_str()), "a frame of another request: {f:?}");
        match f {
            Frame::RequestAck { bytes, client, .. } => {
                assert_eq!(client, None, "request.ack reached the app with client");
                assert!(bytes > acked && bytes <= up.sent as u64, "ack {bytes} after {acked}");
                up.acks.push(bytes);
            }
            f if f.is_terminal() => {
                up.frames.push(f);
                return up;
            }
            f => up.frames.push(f),
        }
    }
}

pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// A whole response, streamed or not.
#[derive(Debug)]
pub struct Whole {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub streamed: bool,
}

impl Whole {
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("response body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body))
        })
    }
}

/// Assembles the frames of one request into a [`Whole`]; panics on `response.error`.
#[track_caller]
pub fn assemble(frames: Vec<Frame>) -> Whole {
    let body_bytes =
        |body: &str, base64: bool| if base64 { unb64(body) } else { body.as_bytes().to_vec() };
    match frames.first() {
        Some(Frame::Response(r)) => {
            assert_eq!(frames.len(), 1, "{frames:?}");
            Whole {
                status: r.status,
                headers: r.headers.clone(),
                body: body_bytes(&r.body, r.body_base64),
                streamed: false,
            }
        }
        Some(Frame::ResponseStart { status, headers, .. }) => {
            let mut body = Vec::new();
            let last = frames.len() - 1;
            for (i, f) in frames.iter().enumerate().skip(1) {
                match f {
                    Frame::ResponseChunk { body: b, body_base64, .. } if i < last => {
                        body.extend(body_bytes(b, *body_base64));
                    }
                    Frame::ResponseEnd { .. } if i == last => {}
                    other => panic!("unexpected frame {i} of a streamed response: {other:?}"),
                }
            }
            Whole { status: *status, headers: headers.clone(), body, streamed: true }
        }
        _ => panic!("expected a response, got {frames:?}"),
    }
}

/// Sends `f` and returns its whole response.
#[track_caller]
pub fn fetch(app: &mut AppClient, f: &Frame) -> Whole {
    let id = f.request_id().unwrap().to_owned();
    app.send(f);
    assemble(app.recv_until_terminal(&id))
}

/// Sends `f` and asserts its only frame is `response.error` with `code`.
#[track_caller]
pub fn expect_error(app: &mut AppClient, f: &Frame, code: ErrorCode) {
    match app.request(f) {
        Frame::ResponseError { code: got, message, .. } => {
            assert_eq!(got, code, "{f:?} → {message}");
            assert!(!message.is_empty(), "error without a message");
        }
        other => panic!("{f:?}: expected response.error {code:?}, got {other:?}"),
    }
}

/// A JSON round trip through `/api/echo`; asserts the backend saw `client_id`.
#[track_caller]
pub fn assert_echo(app: &mut AppClient, id: &str, client_id: &str) {
    let body = json!({"id": id, "text": "héllo ✓"}).to_string();
    let w = fetch(
        app,
        &request(id, "POST", "/api/echo", &[("Content-Type", "application/json")], Some(&body)),
    );
    assert_eq!(w.status, 200, "{w:?}");
    let v = w.json();
    assert_eq!(v["body"], json!({"id": id, "text": "héllo ✓"}), "{v}");
    assert_eq!(v["client"], client_id, "X-HermesChat-Client the backend saw: {v}");
}

/// Verifies the QR's access code at its registry (as the app does) and connects the app
/// socket at the QR's relay URL; asserts `bridge.status` online. Returns (clientId,
/// clientSecret, app).
#[track_caller]
pub fn connect_app(qr: &RelayQr, device: &str) -> (String, String, AppClient) {
    let v = Registry::new(&qr.s).verify_ok(&qr.g, &qr.a, device);
    assert_eq!(v.app_relay_url, qr.u, "verify's appRelayUrl must match the QR");
    let mut app = AppClient::connect_url(&app_url(qr), &v.client_secret)
        .unwrap_or_else(|e| panic!("app connect refused: {e:?}"));
    app.expect_bridge_status(true);
    (v.client_id, v.client_secret, app)
}

pub fn app_url(qr: &RelayQr) -> String {
    format!("{}?bridgeId={}", qr.u, qr.g)
}

/// Reads app frames until `bridge.status` with `online == want` (other frames ignored).
#[track_caller]
pub fn wait_bridge_status(app: &mut AppClient, want: bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match app.next_event(left) {
            Event::Frame(Frame::BridgeStatus { online }) if online == want => return,
            Event::Frame(_) => {}
            other => panic!("waiting for bridge.status online={want}: got {other:?}"),
        }
    }
}

pub fn sha_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A port with nothing listening on it (bound, then released).
pub fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A port free now that a server of the test binds later: below the system's ephemeral range
/// (from 32768 on Linux by default), so that no outgoing connection of the tests running
/// meanwhile takes it, and never the same twice in one test process (a cursor from a random
/// start).
pub fn listen_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(0);
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000u32, ephemeral_from.max(12_000));
    let _ = CURSOR.compare_exchange(
        0,
        {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            1 + (h.finish() % u64::from(high - low)) as u32
        },
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..500 {
        let port = (low + CURSOR.fetch_add(1, Ordering::SeqCst) % (high - low)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    closed_port()
}

/// The usual start of a test: relay, backend, a paired daemon, and one connected app.
pub struct Setup {
    pub env: Env,
    pub backend: Backend,
    pub relay: Relay,
    pub qr: RelayQr,
    pub client_id: String,
    pub client_secret: String,
    pub app: AppClient,
}

#[track_caller]
pub fn setup() -> Setup {
    let relay = Relay::new();
    let backend = Backend::start();
    let env = Env::new();
    let qr = env.pair_json(&relay, &backend, &[]);
    let (client_id, client_secret, app) = connect_app(&qr, "Test Phone");
    Setup { env, backend, relay, qr, client_id, client_secret, app }
}

// Field order matters for Drop: `env` (stops the daemon) drops before the backend and relay.

// =============================================================================================
// Pairing and passthrough

// =============================================================================================
// On a terminal

/// Where a command run by [`on_terminal`] writes: which of its streams go to the terminal.
#[derive(Clone, Copy, PartialEq)]
pub enum Streams {
    /// stdout on the terminal, stderr piped (and dropped).
    Stdout,
    /// stdout and stderr both on the terminal, as in an interactive shell.
    Both,
}

/// For [`on_terminal`]: when the command has written `enough`, the signal it gets.
pub type Until<'a> = (&'a dyn Fn(&str) -> bool, libc::c_int);

/// Runs `cmd` with a pseudo-terminal of `columns` × `rows` (stdin too), as it runs in a
/// terminal window, and returns what the terminal received (escapes included) and how it
/// ended. The terminal is not the command's controlling one (that would take a session of its
/// own). With `until` (`(enough, signal)`), the command gets `signal` as soon as what it wrote
/// is `enough` (a command that waits for something that never comes; SIGINT is Ctrl-C).
pub fn on_terminal(
    mut cmd: Command,
    (columns, rows): (u16, u16),
    streams: Streams,
    until: Option<Until>,
) -> (String, std::process::ExitStatus) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut size = libc::winsize { ws_row: rows, ws_col: columns, ws_xpixel: 0, ws_ypixel: 0 };
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes the two descriptors it opens into the ints given; the name
    // pointer may be null; the termios pointer is null (defaults); `size` outlives the call.
    let rc = unsafe {
        let (name, termios) = (std::ptr::null_mut(), std::ptr::null_mut());
        libc::openpty(&mut master, &mut slave, name, termios, std::ptr::addr_of_mut!(size))
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let stderr = match streams {
        Streams::Both => Stdio::from(slave.try_clone().unwrap()),
        Streams::Stdout => Stdio::null(),
    };
    cmd.stdin(Stdio::from(slave.try_clone().unwrap())).stdout(Stdio::from(slave)).stderr(stderr);
    let mut child = spawn_retrying(&mut cmd).unwrap();
    drop(cmd); // the parent's copies of the terminal's slave side
    // Read as it comes (a spinner writes more than the terminal's buffer holds in 20 s), and
    // without blocking: the daemon the command starts may hold the terminal open.
    let mut master = std::fs::File::from(master);
    // SAFETY: fcntl on a descriptor this function owns.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut said = Vec::new();
    let mut drain = |said: &mut Vec<u8>| {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut buf) {
            said.extend_from_slice(&buf[..n]);
        }
    };
    let deadline = Instant::now() + CMD_TIMEOUT;
    let mut until = until;
    let status = loop {
        drain(&mut said);
        if let Some(status) = child.try_wait().unwrap() {
            drain(&mut said);
            break status;
        }
        if let Some((enough, signal)) = until
            && enough(&String::from_utf8_lossy(&said))
        {
            let pid = libc::pid_t::try_from(child.id()).unwrap();
            // SAFETY: kill only sends a signal, to the child this function started.
            unsafe { libc::kill(pid, signal) };
            until = None;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "the command did not finish in {CMD_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&said)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (String::from_utf8_lossy(&said).into_owned(), status)
}
