//! Pieces the benches share: where the release binaries are, /proc readings, a release relay
//! and a paired daemon that cannot outlive a failed run, the origin behind the daemon, and the
//! frame shapes the minimal peers use.
//! Each bench includes it with `#[path = "support/mod.rs"] mod support;` after `mod common;`.

#![allow(dead_code)]

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hermeschat_pair::protocol::RelayQr;

use serde::{Deserialize, Serialize};

/// Where the release binaries are: `$HERMESCHAT_BENCH_BIN_DIR` (set by `scripts/bench`), else
/// `$CARGO_TARGET_DIR/release`, else `<manifest>/target/release`.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("HERMESCHAT_BENCH_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(|d| PathBuf::from(d).join("release")))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --release` first (or ./scripts/bench)",
        path.display()
    );
    path
}

/// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`) or a count (`Threads`).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time of a process (all its threads, user and system), in seconds: its CPU-time clock,
/// which counts nanoseconds, or else utime + stime from `/proc`, in 10 ms clock ticks.
pub fn cpu_secs(pid: u32) -> f64 {
    // Another process's CPU-time clock is Linux's (macOS has no `clock_getcpuclockid`); the
    // benches read /proc anyway, so they measure on Linux only.
    #[cfg(target_os = "linux")]
    {
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `clock` and `ts` are valid and writable for the duration of each call.
        let read = unsafe {
            libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
                && libc::clock_gettime(clock, &mut ts) == 0
        };
        if read {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Processes this bench started, with the signal that stops each and a directory to remove:
/// the panic hook stops them so that none outlives a failed run.
pub static CLEANUP: std::sync::Mutex<Vec<(u32, i32, Option<PathBuf>)>> =
    std::sync::Mutex::new(Vec::new());

/// Registers a process for [`cleanup`]: `signal` is sent to `pid`, then `dir` is removed.
pub fn stop_on_exit(pid: u32, signal: i32, dir: Option<PathBuf>) {
    if let Ok(mut list) = CLEANUP.lock() {
        list.push((pid, signal, dir));
    }
}

/// On a panic anywhere (a worker thread included) or on Ctrl-C / SIGTERM, stop the processes
/// this bench started and exit: a thread waiting on a barrier must not hang the bench.
pub fn install_panic_cleanup() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        cleanup();
        std::process::exit(101);
    }));
    let _ = ctrlc::set_handler(|| {
        cleanup();
        std::process::exit(130);
    });
}

/// Stops every process registered with [`stop_on_exit`] and removes its directory.
pub fn cleanup() {
    let list = CLEANUP.lock().map(|g| g.clone()).unwrap_or_default();
    for (pid, signal, _) in &list {
        // SAFETY: kill only sends a signal to a process this bench started.
        unsafe { libc::kill(*pid as libc::pid_t, *signal) };
    }
    for (pid, _, dir) in list {
        if let Some(dir) = dir {
            // A daemon removes its pid file on SIGTERM; give it a moment before the rmdir.
            for _ in 0..50 {
                if proc_status(pid, "VmRSS") == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A release `hermeschat-relay` on 127.0.0.1 with a throwaway `--data` and high rate limits.
pub struct RelayProc {
    pub child: Child,
    pub addr: String,
    pub data: PathBuf,
    pub _drain: JoinHandle<()>,
}

impl RelayProc {
    pub fn start(tag: &str) -> RelayProc {
        let data = super::common::fresh_dir(tag);
        let mut child = Command::new(bin_path("hermeschat-relay"))
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .args(["--rate-register", "1000000", "--rate-verify", "1000000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hermeschat-relay");
        stop_on_exit(child.id(), libc::SIGKILL, Some(data.clone()));
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let mut addr = None;
        let mut line = String::new();
        while addr.is_none() {
            line.clear();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("relay exited before listening");
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["event"] == "listening"
            {
                addr = v["addr"].as_str().map(str::to_owned);
            }
        }
        // Keep draining the access log so the relay never blocks on a full pipe.
        let drain = std::thread::spawn(move || {
            let mut sink = Vec::new();
            while lines.read_until(b'\n', &mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        RelayProc { child, addr: addr.unwrap(), data, _drain: drain }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws(&self, role: &str, bridge_id: &str) -> String {
        format!("ws://{}/ws/{role}?bridgeId={bridge_id}", self.addr)
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

// =============================================================================================
// Origin

/// Bytes `GET /api/blob` answers: a download of the same size as the e2e bench's one-frame
/// upload.
pub const DOWNLOAD: usize = 12 << 20;
/// Events `GET /api/stream` sends.
pub const SSE_EVENTS: usize = 200;
/// The time between two of its events (the first goes at once).
pub const SSE_GAP: Duration = Duration::from_millis(5);

/// The body `GET /api/health` answers.
pub const HEALTH_BODY: &[u8] = b"{\"ok\":true}";

/// The body `GET /api/two-writes` answers, in a write of its own after the head.
pub const TWO_WRITES_BODY: &[u8] = b"{\"status\":\"ok\"}";

/// The text of `GET /api/stream`'s event `i`.
pub fn sse_event(i: usize) -> String {
    format!("data: {{\"n\":{i}}}\n\n")
}

/// Starts the origin on a loopback port (a thread per connection, keep-alive HTTP/1.1) and
/// returns the port. It serves `GET /api/health`, `POST /api/echo` (the body back, with its
/// content type), `POST /api/count` (reads the body, answers `{"bytes":N}`), `GET /api/blob`
/// ([`DOWNLOAD`] bytes of binary), `GET /api/stream` (SSE, chunked: [`SSE_EVENTS`] events
/// [`SSE_GAP`] apart, the first at once) and `GET /api/two-writes` (as uvicorn answers: the
/// head, then [`TWO_WRITES_BODY`] in a second write, without `TCP_NODELAY`).
pub fn origin_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = origin_conn(s);
            });
        }
    });
    port
}

/// The bytes `GET /api/blob` serves (made once).
pub fn download_blob() -> &'static [u8] {
    static BLOB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOB.get_or_init(|| (0..DOWNLOAD).map(|i| (i * 31 + i / 4096) as u8).collect())
}

fn origin_conn(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut nodelay = true;
    let mut w = s.try_clone()?;
    let mut r = BufReader::with_capacity(64 << 10, s);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut len = 0usize;
        let mut ctype = String::from("application/octet-stream");
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("content-type") {
                    ctype = v.trim().to_owned();
                }
            }
        }
        let path = path.split('?').next().unwrap_or("");
        // Nagle only for the two-writes answer; turned off again by the next request, once
        // the client has the whole of it (turning it off earlier would push the body out).
        let two_writes = path == "/api/two-writes";
        if nodelay == two_writes {
            w.set_nodelay(!two_writes)?;
            nodelay = !two_writes;
        }
        match (method.as_str(), path) {
            ("GET", "/api/two-writes") => {
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n",
                    TWO_WRITES_BODY.len()
                )?;
                w.write_all(TWO_WRITES_BODY)?;
            }
            ("GET", "/api/health") => {
                // One write, as a server answers a small request.
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n",
                    HEALTH_BODY.len()
                )
                .into_bytes();
                out.extend_from_slice(HEALTH_BODY);
                w.write_all(&out)?;
            }
            ("POST", "/api/count") => {
                let mut left = len;
                while left > 0 {
                    let n = {
                        let buf = r.fill_buf()?;
                        if buf.is_empty() {
                            return Ok(());
                        }
                        buf.len().min(left)
                    };
                    r.consume(n);
                    left -= n;
                }
                let b = format!("{{\"bytes\":{len}}}");
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{b}",
                    b.len()
                )?;
            }
            ("POST", "/api/echo") => {
                body.resize(len, 0);
                r.read_exact(&mut body)?;
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\n\r\n"
                )
                .into_bytes();
                out.extend_from_slice(&body);
                w.write_all(&out)?;
            }
            ("GET", "/api/blob") => {
                let blob = download_blob();
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {}\r\n\r\n",
                    blob.len()
                )?;
                w.write_all(blob)?;
            }
            ("GET", "/api/stream") => {
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                      Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
                )?;
                let t0 = Instant::now();
                for i in 0..SSE_EVENTS {
                    let due = t0 + SSE_GAP * i as u32;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let ev = sse_event(i);
                    write!(w, "{:x}\r\n{ev}\r\n", ev.len())?;
                }
                w.write_all(b"0\r\n\r\n")?;
            }
            _ => {
                w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            }
        }
    }
}

// =============================================================================================
// The daemon

/// Runs `hermeschat-pair` with a throwaway state directory; returns (exit ok, stdout, stderr).
pub fn pair_cmd(home: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_path("hermeschat-pair"))
        .args(args)
        .current_dir(home)
        .env("HERMESCHAT_HOME", home)
        .env("NO_COLOR", "1")
        .env_remove("HERMESCHAT_REGISTRY_URL")
        .env_remove("HERMESCHAT_LOCAL_HOST")
        .env_remove("HERMESCHAT_LOCAL_PORT")
        .stdin(Stdio::null())
        .output()
        .expect("run hermeschat-pair");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A release `hermeschat-pair` daemon paired with a relay through a throwaway
/// `HERMESCHAT_HOME`, in front of a loopback origin; stopped with SIGTERM if the bench fails.
pub struct Daemon {
    /// Its state directory.
    pub home: PathBuf,
    /// Its process id (from `bridge.pid`).
    pub pid: u32,
    /// The pairing payload `--json` printed.
    pub qr: RelayQr,
    /// Seconds `hermeschat-pair` took to register, pair and start the daemon.
    pub pair_secs: f64,
}

impl Daemon {
    /// Runs `hermeschat-pair --server <relay_url> --port <origin> --json`; panics with its
    /// output if it fails.
    pub fn start(relay_url: &str, origin: u16, tag: &str) -> Daemon {
        let home = super::common::fresh_dir(tag);
        let t0 = Instant::now();
        let port = origin.to_string();
        let (ok, stdout, stderr) =
            pair_cmd(&home, &["--server", relay_url, "--port", &port, "--json"]);
        let pair_secs = t0.elapsed().as_secs_f64();
        let pid: u32 = std::fs::read_to_string(home.join("bridge.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        // SIGTERM is the daemon's clean stop; its state dir goes after it. Never for pid 0:
        // kill(0, ..) would signal the bench's whole process group.
        if pid != 0 {
            stop_on_exit(pid, libc::SIGTERM, Some(home.clone()));
        }
        assert!(ok && pid != 0, "hermeschat-pair --json failed:\n{stdout}\n{stderr}");
        let qr: RelayQr = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("--json printed no QR payload ({e}): {stdout}"));
        Daemon { home, pid, qr, pair_secs }
    }

    /// Pairs `n` apps; returns their client secrets. The first verifies the access code of
    /// the JSON payload, the others fresh codes from the registry.
    pub fn pair_apps(&self, n: usize, name: &str) -> Vec<String> {
        let reg = super::common::Registry::new(&self.qr.s);
        let identity: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.home.join("bridge.json")).unwrap())
                .unwrap();
        let relay_secret = identity["relaySecret"].as_str().expect("relaySecret").to_owned();
        (0..n)
            .map(|i| {
                let code = if i == 0 {
                    self.qr.a.clone()
                } else {
                    reg.access_code_ok(&self.qr.g, &relay_secret).access_code
                };
                reg.verify_ok(&self.qr.g, &code, &format!("{name} {i}")).client_secret
            })
            .collect()
    }

    /// The URL its apps connect to.
    pub fn app_url(&self) -> String {
        format!("{}?bridgeId={}", self.qr.u, self.qr.g)
    }

    /// `hermeschat-pair --stop`: (exit ok, stdout, stderr).
    pub fn stop(&self) -> (bool, String, String) {
        pair_cmd(&self.home, &["--stop"])
    }
}

// =============================================================================================
// The minimal peer (bridge side) and the app client

#[derive(Deserialize)]
pub struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub id: Cow<'a, str>,
    #[serde(default, borrow)]
    pub client: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub path: Cow<'a, str>,
    #[serde(default, borrow)]
    pub body: Option<Cow<'a, str>>,
    #[serde(default, rename = "bodyBase64")]
    pub body_base64: bool,
    #[serde(default)]
    pub status: u16,
    /// `request.ack`: body bytes the backend has taken.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
pub struct OutResponse<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'a str>,
    pub status: u16,
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub body: &'a str,
    #[serde(rename = "bodyBase64", skip_serializing_if = "std::ops::Not::not")]
    pub body_base64: bool,
}

// =============================================================================================
// Statistics

/// The `p`th percentile (nearest rank) of sorted samples.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median; NaN for no samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// A figure for a table: thousands separated, 3 significant digits below 10,000, "—" for NaN.
pub fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v >= 10_000.0 {
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
