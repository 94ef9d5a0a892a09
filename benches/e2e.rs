//! End-to-end benchmark (issue 3, "Benchmark"): direct HTTP to a local origin against the same
//! work through app client → `hermeschat-relay` → `hermeschat-pair` daemon → origin, in the same
//! run, with the release binaries.
//!
//! Run with `./scripts/bench e2e` (or `cargo bench --bench e2e -- --reps 3` after
//! `cargo build --release`). Figures are printed, never asserted.
//!
//! - Origin: std threads (one per connection), keep-alive HTTP/1.1: `GET /api/health`,
//!   `POST /api/echo`, `POST /api/count` (reads the body, answers `{"bytes":N}`),
//!   `GET /api/stream` (SSE, chunked, 200 events 5 ms apart, the first at once),
//!   `GET /api/blob` (12 MiB of binary, for the download row).
//! - Direct: a minimal keep-alive HTTP/1.1 client over loopback.
//! - Path: the daemon started by `hermeschat-pair --server <relay> --port <origin> --json` with a
//!   throwaway `HERMESCHAT_HOME`; apps pair with the access code of that JSON payload (the first)
//!   or of fresh codes from the registry (the other 15), then talk over `/ws/app`.
//! - Every repetition runs direct and path back to back for each measurement (order alternating);
//!   ratios to direct are computed inside a repetition, then the median is taken.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hermeschat_pair::protocol::UPLOAD_WINDOW;
use tungstenite::{Message, Utf8Bytes};

use common::{Ws, b64, random_bytes, ws_connect};
use support::{
    DOWNLOAD, Daemon, HEALTH_BODY, InFrame, RelayProc, SSE_EVENTS, TWO_WRITES_BODY, bin_path,
    cpu_secs, download_blob, fmt_num, loadavg, median, origin_server, pct, proc_status,
};

const WARMUP: usize = 200;
const SEQUENTIAL: usize = 2_000;
/// Requests measured in the two-writes phase (a client that delays its ACKs waits 40 ms on
/// each, so fewer than [`SEQUENTIAL`]).
const TWO_WRITES_REQUESTS: usize = 50;
const CONCURRENCY: usize = 16;
const C16_SECS: f64 = 2.0;
/// The issue's upload size: 16 MiB, streamed through hermeschat (`request.start` and
/// `request.chunk` frames of [`STREAM_CHUNK`]).
const DIRECT_UPLOAD: usize = 16 << 20;
/// Body bytes in one `request.chunk` of a streamed upload.
const STREAM_CHUNK: usize = 256 << 10;
/// The largest decoded body whose base64 request frame fits the relay's 16 MiB message limit
/// (12 MiB − 3 KiB; see PROTOCOL §6 and note 34). 16 MiB cannot travel in one request frame.
const PATH_UPLOAD: usize = (12 << 20) - (3 << 10);
const UPLOAD_RUNS: usize = 5;

const SSE_RUNS: usize = 2;
const MIB: f64 = 1024.0 * 1024.0;

// =============================================================================================
// Processes and /proc

/// Samples VmRSS of some processes every 10 ms until stopped; returns the largest value of
/// each (KiB).
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pids: &[u32]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let pids = pids.to_vec();
        let handle = std::thread::spawn(move || {
            let mut peak = vec![0; pids.len()];
            loop {
                for (p, &pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(proc_status(pid, "VmRSS"));
                }
                if s.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

// =============================================================================================
// bore, the peer tunnel of issue 7

/// Where `bore` is: `$HERMESCHAT_BENCH_BORE`, else `target/bore/bin/bore` (where `scripts/bench`
/// installs it), else `bore` on PATH.
fn bore_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HERMESCHAT_BENCH_BORE") {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let local = target.join("bore/bin/bore");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("bore"))
        .find(|p| p.is_file())
}

/// `bore server` (the far side, like our relay) and `bore local` (next to the origin, like our
/// daemon), both on loopback with a shared secret. bore's control port is fixed at 7835.
struct Bore {
    server: Child,
    local: Child,
    /// The public port: a client connecting here reaches the origin.
    port: u16,
    _drain: JoinHandle<()>,
}

impl Bore {
    fn start(bin: &Path, origin: u16) -> Result<Bore, String> {
        let secret = b64(&random_bytes(24));
        let mut server = Command::new(bin)
            .args(["server", "--bind-addr", "127.0.0.1"])
            .env("BORE_SECRET", &secret)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        support::stop_on_exit(server.id(), libc::SIGKILL, None);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", 7835)).is_err() {
            if let Ok(Some(st)) = server.try_wait() {
                return Err(format!("bore server exited ({st}); is port 7835 busy?"));
            }
            if started.elapsed() > Duration::from_secs(5) {
                let _ = server.kill();
                return Err("bore server did not listen on 127.0.0.1:7835 within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(Some(st)) = server.try_wait() {
            return Err(format!("bore server exited ({st}); another one holds port 7835"));
        }
        let mut local = Command::new(bin)
            .args(["local", &origin.to_string(), "--local-host", "127.0.0.1", "--to", "127.0.0.1"])
            .env("BORE_SECRET", &secret)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        support::stop_on_exit(local.id(), libc::SIGKILL, None);
        let mut lines = BufReader::new(local.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        let port = loop {
            line.clear();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = server.kill();
                return Err("bore local exited before listening".into());
            }
            // "… listening at 127.0.0.1:20660" (tracing output, perhaps with ANSI colours).
            if let Some(rest) = line.split("listening at 127.0.0.1:").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(p) = digits.parse() {
                    break p;
                }
            }
        };
        let drain = std::thread::spawn(move || {
            let mut sink = Vec::new();
            while lines.read_until(b'\n', &mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Ok(Bore { server, local, port, _drain: drain })
    }

    fn version(bin: &Path) -> String {
        Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Bore {
    fn drop(&mut self) {
        for c in [&mut self.local, &mut self.server] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// =============================================================================================
// Direct client

struct Http {
    r: BufReader<TcpStream>,
    w: TcpStream,
    line: String,
}

impl Http {
    fn connect(port: u16) -> Http {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Http {
            w: s.try_clone().unwrap(),
            r: BufReader::with_capacity(64 << 10, s),
            line: String::new(),
        }
    }

    fn send_head(&mut self, method: &str, path: &str, body_len: Option<usize>) {
        let head = match body_len {
            Some(n) => format!(
                "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
            ),
            None => format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        };
        self.w.write_all(head.as_bytes()).unwrap();
    }

    /// Reads a response head; returns (status, content-length, chunked).
    fn read_head(&mut self) -> (u16, Option<usize>, bool) {
        self.line.clear();
        self.r.read_line(&mut self.line).unwrap();
        let status = self.line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (mut len, mut chunked) = (None, false);
        loop {
            self.line.clear();
            self.r.read_line(&mut self.line).unwrap();
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                }
            }
        }
        (status, len, chunked)
    }

    /// One whole exchange; returns the body.
    fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
        self.send_head(method, path, body.map(<[u8]>::len));
        if let Some(b) = body {
            self.w.write_all(b).unwrap();
        }
        let (status, len, chunked) = self.read_head();
        assert_eq!(status, 200, "{method} {path}");
        assert!(!chunked);
        let mut out = vec![0u8; len.unwrap_or(0)];
        self.r.read_exact(&mut out).unwrap();
        out
    }

    /// One SSE stream; returns the arrival time of every event (from the request start).
    fn sse(&mut self) -> Vec<Duration> {
        let t0 = Instant::now();
        self.send_head("GET", "/api/stream", None);
        let (status, _, chunked) = self.read_head();
        assert!(status == 200 && chunked);
        let mut arrivals = Vec::new();
        loop {
            self.line.clear();
            self.r.read_line(&mut self.line).unwrap();
            let n = usize::from_str_radix(self.line.trim(), 16).unwrap();
            let mut chunk = vec![0u8; n + 2];
            self.r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                return arrivals;
            }
            let at = t0.elapsed();
            let events = chunk.windows(5).filter(|w| w == b"data:").count();
            arrivals.extend(std::iter::repeat_n(at, events));
        }
    }
}

// =============================================================================================
// Path client (app over the relay)

/// A request frame as an app sends it (PROTOCOL §5), serialised from a plain struct: the
/// clients share the cores with the path under test, so they do no more work than an app must.
fn request_frame(id: &str, method: &str, path: &str, body64: Option<&str>) -> Utf8Bytes {
    #[derive(serde::Serialize)]
    struct Request<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        id: &'a str,
        method: &'a str,
        path: &'a str,
        headers: std::collections::BTreeMap<&'static str, &'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<&'a str>,
        #[serde(rename = "bodyBase64", skip_serializing_if = "std::ops::Not::not")]
        body_base64: bool,
    }
    let mut headers = std::collections::BTreeMap::new();
    if body64.is_some() {
        headers.insert("content-type", "application/octet-stream");
    }
    let frame = Request {
        kind: "request",
        id,
        method,
        path,
        headers,
        body: body64,
        body_base64: body64.is_some(),
    };
    Utf8Bytes::from(serde_json::to_string(&frame).expect("a request frame serialises"))
}

/// An app socket. Every request gets a fresh id: reusing an id the moment its terminal frame
/// arrives races the daemon, which forgets an id only after queuing that frame (see
/// docs/BENCHMARKS.md).
struct App {
    ws: Ws,
    seq: u64,
}

impl App {
    fn connect(url: &str, secret: &str) -> App {
        let auth = format!("Bearer {secret}");
        let mut ws = ws_connect(url, &[("Authorization", &auth)]).expect("app connect");
        let first = ws.read().expect("bridge.status");
        assert!(
            first.to_text().unwrap_or("").contains("\"online\":true"),
            "expected bridge.status online: {first:?}"
        );
        ws.get_mut().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        App { ws, seq: 0 }
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}{}", self.seq)
    }

    /// Sends `frame`; calls `each(elapsed, frame, message)` for every frame of `id` until the
    /// terminal one.
    fn exchange(
        &mut self,
        frame: &Utf8Bytes,
        id: &str,
        mut each: impl FnMut(Duration, &InFrame, &Utf8Bytes),
    ) {
        let t0 = Instant::now();
        self.ws.send(Message::Text(frame.clone())).expect("send");
        loop {
            let Message::Text(t) = self.ws.read().expect("read") else { continue };
            let f: InFrame = serde_json::from_str(t.as_str()).expect("frame json");
            if f.kind == "error" {
                panic!("request {id}: the relay answered {}: {:?}", t.as_str(), f.message);
            }
            if f.id != id {
                continue;
            }
            let at = t0.elapsed();
            match f.kind.as_ref() {
                "response" | "response.end" => {
                    each(at, &f, &t);
                    return;
                }
                "response.start" | "response.chunk" => each(at, &f, &t),
                other => panic!("request {id}: {other} {:?} {:?}", f.code, f.message),
            }
        }
    }

    /// A whole-response exchange; returns (elapsed, status, body).
    fn request(&mut self, frame: &Utf8Bytes, id: &str) -> (Duration, u16, String) {
        let mut out = (Duration::ZERO, 0, String::new());
        self.exchange(frame, id, |at, f, _| {
            out = (at, f.status, f.body.as_deref().unwrap_or("").to_owned());
        });
        out
    }
}

// =============================================================================================
// Statistics

/// (time to first event ms, largest gap between consecutive events ms, events, total ms).
fn sse_figures(arrivals: &[Duration]) -> (f64, f64, usize, f64) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let gap = arrivals.windows(2).map(|w| ms(w[1] - w[0])).fold(0.0, f64::max);
    (
        arrivals.first().map_or(f64::NAN, |d| ms(*d)),
        gap,
        arrivals.len(),
        arrivals.last().map_or(f64::NAN, |d| ms(*d)),
    )
}

// =============================================================================================
// Measurements

/// The three ways to reach the origin, measured in the same repetition.
const DIRECT: usize = 0;
const PATH: usize = 1;
const BORE: usize = 2;
const NAMES: [&str; 3] = ["direct", "hermeschat", "bore"];

/// One target's figures in one repetition.
#[derive(Default, Clone, Debug)]
struct Rep {
    p50: f64,
    p99: f64,
    c16: f64,
    c16_p99: f64,
    /// CPU per request at c16 of the process next to the origin (daemon, `bore local`).
    near_cpu_us: f64,
    /// CPU per request at c16 of the far process (relay, `bore server`).
    far_cpu_us: f64,
    /// CPU per request at c16 of the bench's own process: the clients (apps or HTTP) and the
    /// origin, which share the machine's cores with the processes measured.
    bench_cpu_us: f64,
    /// CPU per sequential request (the latency phase): (near, far).
    lat_cpu_us: (f64, f64),
    /// CPU per 12 MiB download (warm-up included): (near, far).
    down_cpu_ms: (f64, f64),
    upload16: f64,
    upload12: f64,
    download12: f64,
    ttfe: f64,
    max_gap: f64,
    events_min: usize,
    sse_total: f64,
    /// Peak VmRSS during the 16 MiB uploads (streamed through hermeschat), KiB: (near, far).
    peak16_kib: (u64, u64),
    /// Peak VmRSS during the 12 MiB uploads (one request frame through hermeschat), KiB.
    peak12_kib: (u64, u64),
    /// p50 µs of `GET /api/two-writes`: an answer in two writes without `TCP_NODELAY`.
    two_writes_p50: f64,
}

/// Our path: the paired app sockets and the two processes.
struct PathSide {
    apps: Vec<App>,
    daemon_pid: u32,
    relay_pid: u32,
}

/// Something plain HTTP reaches: the origin itself or bore's public port, with the processes
/// in between (none for direct; `bore local`, `bore server` for bore).
#[derive(Clone, Copy)]
struct HttpSide {
    port: u16,
    pids: Option<(u32, u32)>,
}

fn lat_http(port: u16) -> (f64, f64) {
    lat_http_of(port, "/api/health", HEALTH_BODY, WARMUP, SEQUENTIAL)
}

/// p50 and p99 µs of `measured` sequential `GET path`s on one connection, after `warmup`.
fn lat_http_of(port: u16, path: &str, want: &[u8], warmup: usize, measured: usize) -> (f64, f64) {
    let mut c = Http::connect(port);
    let mut v = Vec::with_capacity(measured);
    for i in 0..warmup + measured {
        let t0 = Instant::now();
        let b = c.request("GET", path, None);
        let dt = t0.elapsed();
        assert_eq!(b, want);
        if i >= warmup {
            v.push(dt.as_nanos() as u64);
        }
    }
    v.sort_unstable();
    (pct(&v, 50.0) as f64 / 1e3, pct(&v, 99.0) as f64 / 1e3)
}

fn lat_path(p: &mut PathSide) -> (f64, f64) {
    lat_path_of(p, "/api/health", HEALTH_BODY, WARMUP, SEQUENTIAL)
}

/// [`lat_http_of`] through our path.
fn lat_path_of(
    p: &mut PathSide,
    path: &str,
    want: &[u8],
    warmup: usize,
    measured: usize,
) -> (f64, f64) {
    let app = &mut p.apps[0];
    let mut v = Vec::with_capacity(measured);
    for i in 0..warmup + measured {
        let id = app.next_id("lat");
        let frame = request_frame(&id, "GET", path, None);
        let (dt, status, body) = app.request(&frame, &id);
        assert!(status == 200 && body.as_bytes() == want, "{status} {body}");
        if i >= warmup {
            v.push(dt.as_nanos() as u64);
        }
    }
    v.sort_unstable();
    (pct(&v, 50.0) as f64 / 1e3, pct(&v, 99.0) as f64 / 1e3)
}

/// Runs `CONCURRENCY` closed loops for C16_SECS; returns (req/s, p99 µs, CPU µs per request of
/// each of `pids`, the connections).
fn run_c16<C: Send + 'static>(
    conns: Vec<C>,
    one: fn(&mut C, usize) -> Duration,
    pids: &[u32],
) -> (f64, f64, Vec<f64>, Vec<C>) {
    let barrier = Arc::new(Barrier::new(conns.len() + 1));
    let run = Duration::from_secs_f64(C16_SECS);
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    one(&mut c, i);
                }
                barrier.wait();
                let start = Instant::now();
                let mut lat = Vec::new();
                while start.elapsed() < run {
                    lat.push(one(&mut c, i).as_nanos() as u64);
                }
                (lat, start.elapsed(), c)
            })
        })
        .collect();
    barrier.wait();
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
    let mut all = Vec::new();
    let mut secs: f64 = 0.0;
    let mut back = Vec::new();
    for h in handles {
        let (lat, el, c) = h.join().unwrap();
        all.extend(lat);
        secs = secs.max(el.as_secs_f64());
        back.push(c);
    }
    let n = all.len() as f64;
    let cpu_us: Vec<f64> =
        pids.iter().zip(cpu0).map(|(&p, c0)| (cpu_secs(p) - c0) * 1e6 / n).collect();
    all.sort_unstable();
    (n / secs, pct(&all, 99.0) as f64 / 1e3, cpu_us, back)
}

/// (req/s, p99 µs, near, far and bench-process CPU µs/req); NaN for processes not there.
fn c16_http(side: HttpSide) -> (f64, f64, f64, f64, f64) {
    let conns: Vec<Http> = (0..CONCURRENCY).map(|_| Http::connect(side.port)).collect();
    let mut pids: Vec<u32> = side.pids.map(|(a, b)| vec![a, b]).unwrap_or_default();
    pids.push(std::process::id());
    let (rate, p99, cpu, _) = run_c16(
        conns,
        |c, _| {
            let t0 = Instant::now();
            c.request("GET", "/api/health", None);
            t0.elapsed()
        },
        &pids,
    );
    let own = cpu.last().copied().unwrap_or(f64::NAN);
    match cpu.len() {
        3 => (rate, p99, cpu[0], cpu[1], own),
        _ => (rate, p99, f64::NAN, f64::NAN, own),
    }
}

fn c16_path(p: &mut PathSide) -> (f64, f64, f64, f64, f64) {
    let apps = std::mem::take(&mut p.apps);
    let (rate, p99, cpu, apps) = run_c16(
        apps,
        |app, _| {
            // Request frames are tiny; building one per call is part of any client's cost.
            let id = app.next_id("c");
            let frame = request_frame(&id, "GET", "/api/health", None);
            let (dt, status, _) = app.request(&frame, &id);
            assert_eq!(status, 200);
            dt
        },
        &[p.daemon_pid, p.relay_pid, std::process::id()],
    );
    p.apps = apps;
    (rate, p99, cpu[0], cpu[1], cpu[2])
}

/// Uploads `body` with `POST /api/count` on one keep-alive connection; MiB/s.
fn upload_http(port: u16, body: &[u8]) -> f64 {
    let mut c = Http::connect(port);
    let want = format!("{{\"bytes\":{}}}", body.len());
    let mut v = Vec::new();
    for i in 0..=UPLOAD_RUNS {
        let t0 = Instant::now();
        let r = c.request("POST", "/api/count", Some(body));
        let dt = t0.elapsed();
        assert_eq!(r, want.as_bytes());
        if i > 0 {
            v.push(body.len() as f64 / MIB / dt.as_secs_f64());
        }
    }
    median(v)
}

/// Downloads `GET /api/blob` on one keep-alive connection; MiB/s.
fn download_http(port: u16) -> f64 {
    let mut c = Http::connect(port);
    let mut v = Vec::new();
    for i in 0..=UPLOAD_RUNS {
        let t0 = Instant::now();
        let r = c.request("GET", "/api/blob", None);
        let dt = t0.elapsed();
        assert!(r == download_blob(), "the download changed on the way");
        if i > 0 {
            v.push(DOWNLOAD as f64 / MIB / dt.as_secs_f64());
        }
    }
    median(v)
}

/// MiB/s of `GET /api/blob` through the path: `response.start`, base64 `response.chunk`s and
/// `response.end`, timed until the end arrives and decoded after the clock stops.
fn download_path(p: &mut PathSide) -> f64 {
    use base64::Engine as _;
    let mut v = Vec::new();
    for i in 0..=UPLOAD_RUNS {
        let id = p.apps[0].next_id("down");
        let frame = request_frame(&id, "GET", "/api/blob", None);
        // The chunk messages are kept as received (shared, not copied) and their bodies read
        // after the clock stops: like the HTTP clients' one copy of the body, no more.
        let mut chunks: Vec<Utf8Bytes> = Vec::new();
        let mut end = Duration::ZERO;
        p.apps[0].exchange(&frame, &id, |at, f, message| {
            if f.kind == "response.chunk" {
                assert!(f.body_base64);
                chunks.push(message.clone());
            }
            end = at;
        });
        let mut got = Vec::with_capacity(DOWNLOAD);
        for c in &chunks {
            let f: InFrame = serde_json::from_str(c.as_str()).expect("frame json");
            let body = f.body.as_deref().unwrap_or("");
            got.extend(
                base64::engine::general_purpose::STANDARD.decode(body).expect("base64 chunk"),
            );
        }
        assert!(got == download_blob(), "the download changed on the way");
        if i > 0 {
            v.push(DOWNLOAD as f64 / MIB / end.as_secs_f64());
        }
    }
    median(v)
}

/// MiB/s of `POST /api/count` with the base64 body in one request frame.
fn upload_path(p: &mut PathSide, body64: &str, decoded: usize) -> f64 {
    let want = format!("{{\"bytes\":{decoded}}}");
    let mut v = Vec::new();
    for i in 0..=UPLOAD_RUNS {
        // Built before the clock starts: a 16 MiB copy per run, off the timed path.
        let id = p.apps[0].next_id("up");
        let frame = request_frame(&id, "POST", "/api/count", Some(body64));
        let (dt, status, body) = p.apps[0].request(&frame, &id);
        assert!(status == 200 && body == want, "{status} {body}");
        if i > 0 {
            v.push(decoded as f64 / MIB / dt.as_secs_f64());
        }
    }
    median(v)
}

/// MiB/s of `POST /api/count` with the body streamed the way an app sends a large file
/// (PROTOCOL §5): `request.start`, then base64 `request.chunk`s of [`STREAM_CHUNK`] bytes, never
/// more than [`UPLOAD_WINDOW`] ahead of the daemon's `request.ack`. The chunk frames are built
/// before the clock starts, as the one-frame upload's base64 is.
fn upload_path_streamed(p: &mut PathSide, body: &[u8]) -> f64 {
    let want = format!("{{\"bytes\":{}}}", body.len());
    let mut v = Vec::new();
    for i in 0..=UPLOAD_RUNS {
        let app = &mut p.apps[0];
        let id = app.next_id("sup");
        let start = serde_json::json!({
            "type": "request.start", "id": id, "method": "POST", "path": "/api/count",
            "headers": {"content-type": "application/octet-stream"}, "length": body.len(),
        })
        .to_string();
        let chunks: Vec<(u64, Utf8Bytes)> = body
            .chunks(STREAM_CHUNK)
            .map(|c| {
                let frame = format!(
                    r#"{{"type":"request.chunk","id":"{id}","body":"{}","bodyBase64":true}}"#,
                    b64(c)
                );
                (c.len() as u64, Utf8Bytes::from(frame))
            })
            .collect();
        let t0 = Instant::now();
        app.ws.send(Message::text(start)).expect("send");
        let (mut sent, mut acked, mut next) = (0u64, 0u64, 0);
        let (status, answer) = loop {
            while let Some((n, frame)) =
                chunks.get(next).filter(|c| sent + c.0 - acked <= UPLOAD_WINDOW)
            {
                app.ws.send(Message::Text(frame.clone())).expect("send");
                sent += n;
                next += 1;
            }
            let Message::Text(t) = app.ws.read().expect("read") else { continue };
            let f: InFrame = serde_json::from_str(t.as_str()).expect("frame json");
            if f.id != id {
                assert!(f.kind != "error", "upload {id}: the relay answered {}", t.as_str());
                continue;
            }
            match f.kind.as_ref() {
                "request.ack" => acked = f.bytes,
                "response" => break (f.status, f.body.as_deref().unwrap_or("").to_owned()),
                other => panic!("upload {id}: {other} {:?} {:?}", f.code, f.message),
            }
        };
        let dt = t0.elapsed();
        assert!(status == 200 && answer == want, "{status} {answer}");
        if i > 0 {
            v.push(body.len() as f64 / MIB / dt.as_secs_f64());
        }
    }
    median(v)
}

fn sse_path(p: &mut PathSide) -> Vec<Duration> {
    let id = p.apps[0].next_id("sse");
    let frame = request_frame(&id, "GET", "/api/stream", None);
    let mut arrivals = Vec::new();
    let mut started = false;
    p.apps[0].exchange(&frame, &id, |at, f, _| match f.kind.as_ref() {
        "response.start" => {
            assert_eq!(f.status, 200);
            started = true;
        }
        "response.chunk" => {
            let n = f.body.as_deref().unwrap_or("").matches("data:").count();
            arrivals.extend(std::iter::repeat_n(at, n));
        }
        _ => {}
    });
    assert!(started, "SSE answered without response.start (buffered?)");
    arrivals
}

/// Aggregated SSE figures over runs: (worst TTFE, worst gap, fewest events, longest total).
fn sse_agg(runs: &[Vec<Duration>]) -> (f64, f64, usize, f64) {
    let figs: Vec<_> = runs.iter().map(|a| sse_figures(a)).collect();
    (
        figs.iter().map(|f| f.0).fold(0.0, f64::max),
        figs.iter().map(|f| f.1).fold(0.0, f64::max),
        figs.iter().map(|f| f.2).min().unwrap_or(0),
        figs.iter().map(|f| f.3).fold(0.0, f64::max),
    )
}

/// Measures one target for one repetition.
fn measure(t: usize, path: &mut PathSide, http: HttpSide, bodies: (&[u8], &[u8], &str)) -> Rep {
    let (body16, body12, body64) = bodies;
    let mut r = Rep::default();
    let near_far = if t == PATH { Some((path.daemon_pid, path.relay_pid)) } else { http.pids };
    progress(&format!("  {} latency", NAMES[t]));
    let cpu0 = near_far.map(|(a, b)| (cpu_secs(a), cpu_secs(b)));
    (r.p50, r.p99) = if t == PATH { lat_path(path) } else { lat_http(http.port) };
    if let (Some((a, b)), Some((a0, b0))) = (near_far, cpu0) {
        let per = 1e6 / (WARMUP + SEQUENTIAL) as f64;
        r.lat_cpu_us = ((cpu_secs(a) - a0) * per, (cpu_secs(b) - b0) * per);
    }
    progress(&format!("  {} c16", NAMES[t]));
    (r.c16, r.c16_p99, r.near_cpu_us, r.far_cpu_us, r.bench_cpu_us) =
        if t == PATH { c16_path(path) } else { c16_http(http) };
    progress(&format!("  {} uploads", NAMES[t]));
    let sampler = near_far.map(|(a, b)| RssSampler::start(&[a, b]));
    r.upload16 =
        if t == PATH { upload_path_streamed(path, body16) } else { upload_http(http.port, body16) };
    if let Some(s) = sampler {
        let peak = s.finish();
        r.peak16_kib = (peak[0], peak[1]);
    }
    let sampler = near_far.map(|(a, b)| RssSampler::start(&[a, b]));
    r.upload12 = if t == PATH {
        upload_path(path, body64, body12.len())
    } else {
        upload_http(http.port, body12)
    };
    if let Some(s) = sampler {
        let peak = s.finish();
        r.peak12_kib = (peak[0], peak[1]);
    }
    progress(&format!("  {} download", NAMES[t]));
    let cpu0 = near_far.map(|(a, b)| (cpu_secs(a), cpu_secs(b)));
    r.download12 = if t == PATH { download_path(path) } else { download_http(http.port) };
    if let (Some((a, b)), Some((a0, b0))) = (near_far, cpu0) {
        let per = 1e3 / (UPLOAD_RUNS + 1) as f64;
        r.down_cpu_ms = ((cpu_secs(a) - a0) * per, (cpu_secs(b) - b0) * per);
    }
    progress(&format!("  {} SSE", NAMES[t]));
    let runs: Vec<Vec<Duration>> = (0..SSE_RUNS)
        .map(|_| if t == PATH { sse_path(path) } else { Http::connect(http.port).sse() })
        .collect();
    (r.ttfe, r.max_gap, r.events_min, r.sse_total) = sse_agg(&runs);
    // Last: its connections to the origin have Nagle on until their next request.
    progress(&format!("  {} two writes", NAMES[t]));
    let (w, n) = (5, TWO_WRITES_REQUESTS);
    r.two_writes_p50 = if t == PATH {
        lat_path_of(path, "/api/two-writes", TWO_WRITES_BODY, w, n).0
    } else {
        lat_http_of(http.port, "/api/two-writes", TWO_WRITES_BODY, w, n).0
    };
    r
}

/// With `HERMESCHAT_BENCH_VERBOSE=1`, says on stderr which phase starts, stamped with
/// `CLOCK_MONOTONIC` seconds: the clock of `perf record -k CLOCK_MONOTONIC`, so a profile of
/// the whole run can be cut to one phase with `perf report --time`.
fn progress(what: &str) {
    if std::env::var_os("HERMESCHAT_BENCH_VERBOSE").is_some() {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        eprintln!("[bench {}.{:06}] {what}", ts.tv_sec, ts.tv_nsec / 1000);
    }
}

/// Which way a figure is better, for the "vs bore" column.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

fn main() {
    let mut reps = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // `cargo bench` passes `--bench`; anything unknown is ignored.
        if a == "--reps" {
            reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps);
        }
    }
    support::install_panic_cleanup();
    let started = Instant::now();
    println!("# hermeschat-pair end-to-end benchmark: direct loopback, our path, bore");
    println!(
        "binaries: {}, {}",
        bin_path("hermeschat-relay").display(),
        bin_path("hermeschat-pair").display()
    );
    println!("load average at start: {}", loadavg());

    // ------------------------------------------------------------------ setup
    let origin = origin_server();
    let relay = RelayProc::start("bench-e2e-relay");
    let daemon = Daemon::start(&relay.url(), origin, "bench-e2e-home");
    let daemon_pid = daemon.pid;
    println!(
        "paired in {:.2} s: bridge {} via {}; daemon pid {daemon_pid}",
        daemon.pair_secs, daemon.qr.g, daemon.qr.s
    );
    let app_url = daemon.app_url();
    let secrets = daemon.pair_apps(CONCURRENCY, "bench app");
    let apps: Vec<App> = secrets.iter().map(|s| App::connect(&app_url, s)).collect();

    let bore = match bore_path() {
        None => Err("not found: run ./scripts/bench (it installs bore-cli into target/bore) or \
                     set HERMESCHAT_BENCH_BORE"
            .to_owned()),
        Some(bin) => {
            println!("bore: {} ({})", bin.display(), Bore::version(&bin));
            Bore::start(&bin, origin)
        }
    };
    let bore = match bore {
        Ok(b) => Some(b),
        Err(e) => {
            println!("bore: skipped — {e}");
            None
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    let idle_kib = |pid: u32| proc_status(pid, "VmRSS");
    let idle = [
        (0, 0),
        (idle_kib(daemon_pid), idle_kib(relay.pid())),
        bore.as_ref().map_or((0, 0), |b| (idle_kib(b.local.id()), idle_kib(b.server.id()))),
    ];
    let daemon_threads = proc_status(daemon_pid, "Threads");
    let mut path = PathSide { apps, daemon_pid, relay_pid: relay.pid() };
    let direct_side = HttpSide { port: origin, pids: None };
    let bore_side =
        bore.as_ref().map(|b| HttpSide { port: b.port, pids: Some((b.local.id(), b.server.id())) });
    let targets: Vec<usize> =
        if bore.is_some() { vec![DIRECT, PATH, BORE] } else { vec![DIRECT, PATH] };

    let body16: Vec<u8> = random_bytes(DIRECT_UPLOAD);
    let body12 = body16[..PATH_UPLOAD].to_vec();
    let body64 = b64(&body12);
    let frame_len = request_frame("up1", "POST", "/api/count", Some(&body64)).len();
    println!(
        "path upload: {PATH_UPLOAD} bytes decoded, request frame {frame_len} bytes (relay message limit {} bytes)",
        16 << 20
    );

    // ------------------------------------------------------------------ repetitions
    let mut results: Vec<[Rep; 3]> = Vec::new();
    for rep in 0..reps {
        let mut r: [Rep; 3] = Default::default();
        // The targets run back to back; the order rotates every repetition.
        for k in 0..targets.len() {
            let t = targets[(rep + k) % targets.len()];
            let http = if t == BORE { bore_side.unwrap_or(direct_side) } else { direct_side };
            r[t] = measure(t, &mut path, http, (&body16, &body12, &body64));
        }
        let line = targets
            .iter()
            .map(|&t| {
                format!(
                    "{} p50 {:.1} µs c16 {:.0}/s up16 {:.0} up12 {:.0} down12 {:.0} MiB/s gap {:.1} ms",
                    NAMES[t],
                    r[t].p50,
                    r[t].c16,
                    r[t].upload16,
                    r[t].upload12,
                    r[t].download12,
                    r[t].max_gap
                )
            })
            .collect::<Vec<_>>()
            .join(" | ");
        println!(
            "rep {}/{reps} ({:.0} s, load {}): {line}",
            rep + 1,
            started.elapsed().as_secs_f64(),
            loadavg()
        );
        results.push(r);
    }
    std::thread::sleep(Duration::from_secs(1));
    let daemon_after_kib = proc_status(daemon_pid, "VmRSS");
    let hwm = [
        (0, 0),
        (proc_status(daemon_pid, "VmHWM"), proc_status(relay.pid(), "VmHWM")),
        bore.as_ref().map_or((0, 0), |b| {
            (proc_status(b.local.id(), "VmHWM"), proc_status(b.server.id(), "VmHWM"))
        }),
    ];

    // ------------------------------------------------------------------ 16 MiB through the path
    let big64 = b64(&body16);
    let big_frame = request_frame("big16", "POST", "/api/count", Some(&big64));
    let mut probe = App::connect(&app_url, &secrets[0]);
    let outcome = match probe.ws.send(Message::Text(big_frame.clone())) {
        Err(e) => format!("send failed: {e}"),
        Ok(()) => match probe.ws.read() {
            Ok(Message::Close(Some(cf))) => {
                format!("socket closed {} ({})", u16::from(cf.code), cf.reason)
            }
            Ok(Message::Text(t)) => t.as_str().chars().take(160).collect(),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("read error: {e}"),
        },
    };
    drop(probe);

    // ------------------------------------------------------------------ stop everything
    drop(path);
    drop(bore);
    let (stopped, out, err) = daemon.stop();
    let gone = proc_status(daemon_pid, "VmRSS") == 0;
    let _ = std::fs::remove_dir_all(&daemon.home);
    drop(relay);

    // ------------------------------------------------------------------ the table
    let md = |t: usize, f: &dyn Fn(&Rep) -> f64| median(results.iter().map(|r| f(&r[t])).collect());
    // Ratios are taken within each repetition (same minute, same load), then the median.
    let ratio = |t: usize, base: usize, f: &dyn Fn(&Rep) -> f64| {
        median(results.iter().map(|r| f(&r[t]) / f(&r[base])).collect())
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let has_bore = targets.contains(&BORE);
    let verdict = |v: f64, better: Better| -> String {
        if v.is_nan() {
            "—".into()
        } else {
            let ok = if better == Better::Lower { v <= 1.0 } else { v >= 1.0 };
            format!("{v:.2}× {}", if ok { "at least bore" } else { "**behind bore**" })
        }
    };
    println!();
    println!(
        "## Side by side: {reps} repetitions, medians; (×) = target / direct within each repetition"
    );
    println!();
    println!(
        "direct = HTTP straight to the origin; hermeschat = app WebSocket → hermeschat-relay → \
         hermeschat-pair daemon → origin (JSON envelopes, base64 bodies); bore = HTTP → bore server \
         → bore local → origin (raw TCP splice)."
    );
    println!();
    println!("| measure | direct | hermeschat | bore | hermeschat vs bore |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Rep) -> f64, better: Better| {
        let cell = |t: usize| {
            if t == BORE && !has_bore {
                "—".to_owned()
            } else if t == DIRECT {
                fmt_num(md(t, f))
            } else {
                format!("{} ({:.2}×)", fmt_num(md(t, f)), ratio(t, DIRECT, f))
            }
        };
        let vs = if has_bore { verdict(ratio(PATH, BORE, f), better) } else { "—".into() };
        println!("| {name} | {} | {} | {} | {vs} |", cell(DIRECT), cell(PATH), cell(BORE));
    };
    row("small request p50 µs", &|r| r.p50, Better::Lower);
    row("small request p99 µs", &|r| r.p99, Better::Lower);
    row(
        "small request p50 µs, an answer in two writes without TCP_NODELAY (uvicorn)",
        &|r| r.two_writes_p50,
        Better::Lower,
    );
    row(&format!("c16 req/s ({CONCURRENCY} connections, closed loop)"), &|r| r.c16, Better::Higher);
    row("c16 p99 µs", &|r| r.c16_p99, Better::Lower);
    row("upload 16 MiB MiB/s (hermeschat: streamed)", &|r| r.upload16, Better::Higher);
    row(
        &format!(
            "upload {:.2} MiB MiB/s (hermeschat: one request frame)",
            PATH_UPLOAD as f64 / MIB
        ),
        &|r| r.upload12,
        Better::Higher,
    );
    row("download 12 MiB MiB/s", &|r| r.download12, Better::Higher);
    let sse_row = |name: &str, f: &dyn Fn(&Rep) -> f64| {
        let cell = |t: usize| if t == BORE && !has_bore { "—".into() } else { fmt_num(md(t, f)) };
        let vs = if has_bore { verdict(ratio(PATH, BORE, f), Better::Lower) } else { "—".into() };
        println!("| {name} | {} | {} | {} | {vs} |", cell(DIRECT), cell(PATH), cell(BORE));
    };
    sse_row("SSE first event ms (each repetition's worst stream)", &|r| r.ttfe);
    sse_row("SSE largest gap between events ms (each repetition's worst stream)", &|r| r.max_gap);
    let events = |t: usize| results.iter().map(|r| r[t].events_min).min().unwrap_or(0);
    println!(
        "| SSE events received (fewest) | {}/{SSE_EVENTS} | {}/{SSE_EVENTS} | {} | — |",
        events(DIRECT),
        events(PATH),
        if has_bore { format!("{}/{SSE_EVENTS}", events(BORE)) } else { "—".into() }
    );
    // Direct has no processes in between: only the bench process's own row has a figure there.
    let cpu_row = |name: &str, f: &dyn Fn(&Rep) -> f64| {
        let d = md(DIRECT, f);
        let direct = if d > 0.0 { fmt_num(d) } else { "—".into() };
        let b = if has_bore { fmt_num(md(BORE, f)) } else { "—".into() };
        let vs = if has_bore { verdict(ratio(PATH, BORE, f), Better::Lower) } else { "—".into() };
        println!("| {name} | {direct} | {} | {b} | {vs} |", fmt_num(md(PATH, f)));
    };
    cpu_row("CPU µs per request at c16, next to the origin (daemon / bore local)", &|r| {
        r.near_cpu_us
    });
    cpu_row("CPU µs per request at c16, far side (relay / bore server)", &|r| r.far_cpu_us);
    cpu_row("CPU µs per request at c16, the bench process (the clients and the origin)", &|r| {
        r.bench_cpu_us
    });
    cpu_row("CPU µs per sequential request, next to the origin", &|r| r.lat_cpu_us.0);
    cpu_row("CPU µs per sequential request, far side", &|r| r.lat_cpu_us.1);
    cpu_row("CPU ms per 12 MiB download, next to the origin", &|r| r.down_cpu_ms.0);
    cpu_row("CPU ms per 12 MiB download, far side", &|r| r.down_cpu_ms.1);
    let mem_row = |name: &str, ours: f64, theirs: f64| {
        let (b, vs) = if has_bore {
            (format!("{theirs:.1}"), verdict(ours / theirs, Better::Lower))
        } else {
            ("—".into(), "—".into())
        };
        println!("| {name} | — | {ours:.1} | {b} | {vs} |");
    };
    type Peaks = fn(&Rep) -> (u64, u64);
    let peak = |t: usize, far: bool, of: Peaks| {
        results.iter().map(|r| if far { of(&r[t]).1 } else { of(&r[t]).0 }).max().unwrap_or(0)
    };
    let (p16, p12): (Peaks, Peaks) = (|r| r.peak16_kib, |r| r.peak12_kib);
    mem_row("RSS MiB idle, next to the origin", mib(idle[PATH].0), mib(idle[BORE].0));
    mem_row("RSS MiB idle, far side", mib(idle[PATH].1), mib(idle[BORE].1));
    for (what, of) in [("16 MiB uploads (streamed)", p16), ("12 MiB uploads (one frame)", p12)] {
        for (side, far) in [("next to the origin", false), ("far side", true)] {
            mem_row(
                &format!("RSS MiB peak during the {what}, {side}"),
                mib(peak(PATH, far, of)),
                mib(peak(BORE, far, of)),
            );
        }
    }
    mem_row("VmHWM MiB at the end, next to the origin", mib(hwm[PATH].0), mib(hwm[BORE].0));
    mem_row("VmHWM MiB at the end, far side", mib(hwm[PATH].1), mib(hwm[BORE].1));
    println!();
    println!("Per repetition (direct / hermeschat / bore):");
    for (i, r) in results.iter().enumerate() {
        let f = |g: &dyn Fn(&Rep) -> f64| {
            targets.iter().map(|&t| format!("{:.1}", g(&r[t]))).collect::<Vec<_>>().join("/")
        };
        println!(
            "  rep {}: p50 {} µs, c16 {} req/s, upload16 {} MiB/s, upload12 {} MiB/s, download12 {} MiB/s, TTFE {} ms, gap {} ms",
            i + 1,
            f(&|r| r.p50),
            f(&|r| r.c16),
            f(&|r| r.upload16),
            f(&|r| r.upload12),
            f(&|r| r.download12),
            f(&|r| r.ttfe),
            f(&|r| r.max_gap),
        );
    }
    println!();
    println!(
        "16 MiB (decoded) in one request frame through hermeschat: {} bytes of base64 → {outcome}",
        big64.len()
    );
    println!();
    println!(
        "Daemon (pid {daemon_pid}, {daemon_threads} threads idle): VmRSS {:.1} MiB idle before any \
         request, {:.1} MiB idle after all repetitions.",
        mib(idle[PATH].0),
        mib(daemon_after_kib)
    );
    println!(
        "hermeschat-pair --stop: {} ({}); daemon gone: {gone}",
        if stopped { "exit 0" } else { "FAILED" },
        out.trim().lines().chain(err.trim().lines()).collect::<Vec<_>>().join(" / ")
    );
    println!();
    println!("## Goals of issue 3 (hermeschat against direct)");
    println!();
    let ok = |b: bool| if b { "met" } else { "MISSED" };
    let r50 = ratio(PATH, DIRECT, &|r| r.p50);
    let rc16 = ratio(PATH, DIRECT, &|r| r.c16);
    let up = md(PATH, &|r| r.upload16);
    let worst_gap = results.iter().map(|r| r[PATH].max_gap).fold(0.0, f64::max);
    let idle_mib = mib(idle[PATH].0);
    let peak_mib = mib(peak(PATH, false, p12).max(hwm[PATH].0));
    println!("- p50 ≤ 2× direct: {r50:.2}× → {}", ok(r50 <= 2.0));
    println!("- c16 ≥ 0.35× direct: {rc16:.2}× → {}", ok(rc16 >= 0.35));
    println!("- upload ≥ 300 MiB/s: {up:.0} MiB/s (16 MiB, streamed) → {}", ok(up >= 300.0));
    println!("- no SSE gap over 20 ms: worst {worst_gap:.1} ms → {}", ok(worst_gap <= 20.0));
    println!("- daemon idle RSS ≤ 6 MiB: {idle_mib:.1} MiB → {}", ok(idle_mib <= 6.0));
    println!(
        "- daemon peak RSS ≤ 64 MiB during the upload: {peak_mib:.1} MiB (incl. VmHWM) → {}",
        ok(peak_mib <= 64.0)
    );
    println!();
    println!("total {:.0} s; load average at end: {}", started.elapsed().as_secs_f64(), loadavg());
}
