//! End-to-end benchmark (issue 3, "Benchmark"): direct HTTP to a local origin against the same
//! work through app client → `hermeschat-relay` → `hermeschat-pair` daemon → origin, in the same
//! run, with the release binaries.
//!
//! Run with `./scripts/bench e2e` (or `cargo bench --bench e2e -- --reps 3` after
//! `cargo build --release`). Figures are printed, never asserted.
//!
//! - Origin: std threads (one per connection), keep-alive HTTP/1.1: `GET /api/health`,
//!   `POST /api/echo`, `POST /api/count` (reads the body, answers `{"bytes":N}`),
//!   `GET /api/stream` (SSE, chunked, 200 events 5 ms apart, the first at once).
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

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hermeschat_pair::protocol::RelayQr;
use serde::Deserialize;
use tungstenite::{Message, Utf8Bytes};

use common::{Registry, Ws, b64, random_bytes, ws_connect};
use support::{bin_path, cpu_secs, loadavg, proc_status};

const WARMUP: usize = 200;
const SEQUENTIAL: usize = 2_000;
const CONCURRENCY: usize = 16;
const C16_SECS: f64 = 2.0;
/// Direct upload size (the 16 MiB).
const DIRECT_UPLOAD: usize = 16 << 20;
/// The largest decoded body whose base64 request frame fits the relay's 16 MiB message limit
/// (12 MiB − 3 KiB; see PROTOCOL §6 and note 34). 16 MiB cannot travel in one request frame.
const PATH_UPLOAD: usize = (12 << 20) - (3 << 10);
const UPLOAD_RUNS: usize = 5;
const SSE_RUNS: usize = 2;
const SSE_EVENTS: usize = 200;
const SSE_GAP: Duration = Duration::from_millis(5);
const MIB: f64 = 1024.0 * 1024.0;

// =============================================================================================
// Processes and /proc

/// Samples VmRSS of `pid` every 10 ms until stopped; returns the largest value (KiB).
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                peak = peak.max(proc_status(pid, "VmRSS"));
                if s.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// A release `hermeschat-relay` on 127.0.0.1 with a throwaway `--data` and high rate limits.
struct RelayProc {
    child: Child,
    addr: String,
    data: PathBuf,
    _drain: JoinHandle<()>,
}

impl RelayProc {
    fn start() -> RelayProc {
        let data = common::fresh_dir("bench-e2e-relay");
        let mut child = Command::new(bin_path("hermeschat-relay"))
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .args(["--rate-register", "100000", "--rate-verify", "100000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hermeschat-relay");
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
        let drain = std::thread::spawn(move || {
            let mut sink = Vec::new();
            while lines.read_until(b'\n', &mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        RelayProc { child, addr: addr.unwrap(), data, _drain: drain }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Runs `hermeschat-pair` with a throwaway state directory; returns (exit ok, stdout, stderr).
fn pair_cmd(home: &Path, args: &[&str]) -> (bool, String, String) {
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

// =============================================================================================
// Origin

fn origin_server() -> u16 {
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

fn origin_conn(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
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
        match (method.as_str(), path) {
            ("GET", "/api/health") => {
                w.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Content-Length: 11\r\n\r\n{\"ok\":true}",
                )?;
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
                    let ev = format!("data: {{\"n\":{i}}}\n\n");
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

#[derive(Deserialize)]
struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Cow<'a, str>,
    #[serde(default)]
    status: u16,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

fn request_frame(id: &str, method: &str, path: &str, body64: Option<&str>) -> Utf8Bytes {
    let mut v = serde_json::json!({
        "type": "request", "id": id, "method": method, "path": path, "headers": {},
    });
    if let Some(b) = body64 {
        v["body"] = serde_json::Value::String(b.to_owned());
        v["bodyBase64"] = serde_json::Value::Bool(true);
        v["headers"]["content-type"] = "application/octet-stream".into();
    }
    Utf8Bytes::from(serde_json::to_string(&v).unwrap())
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

    /// Sends `frame`; calls `each(elapsed, frame)` for every frame of `id` until the terminal one.
    fn exchange(&mut self, frame: &Utf8Bytes, id: &str, mut each: impl FnMut(Duration, &InFrame)) {
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
                    each(at, &f);
                    return;
                }
                "response.start" | "response.chunk" => each(at, &f),
                other => panic!("request {id}: {other} {:?} {:?}", f.code, f.message),
            }
        }
    }

    /// A whole-response exchange; returns (elapsed, status, body).
    fn request(&mut self, frame: &Utf8Bytes, id: &str) -> (Duration, u16, String) {
        let mut out = (Duration::ZERO, 0, String::new());
        self.exchange(frame, id, |at, f| {
            out = (at, f.status, f.body.as_deref().unwrap_or("").to_owned());
        });
        out
    }
}

// =============================================================================================
// Statistics

fn pct(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn fmt_num(v: f64) -> String {
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

#[derive(Default, Clone, Debug)]
struct Rep {
    p50: f64,
    p99: f64,
    c16: f64,
    c16_p99: f64,
    daemon_cpu_us: f64,
    relay_cpu_us: f64,
    upload16: f64,
    upload12: f64,
    ttfe: f64,
    max_gap: f64,
    events_min: usize,
    sse_total: f64,
    peak_rss_kib: u64,
}

struct PathSide {
    apps: Vec<App>,
    daemon_pid: u32,
    relay_pid: u32,
}

fn lat_direct(port: u16) -> (f64, f64) {
    let mut c = Http::connect(port);
    let mut v = Vec::with_capacity(SEQUENTIAL);
    for i in 0..WARMUP + SEQUENTIAL {
        let t0 = Instant::now();
        let b = c.request("GET", "/api/health", None);
        let dt = t0.elapsed();
        assert_eq!(b, b"{\"ok\":true}");
        if i >= WARMUP {
            v.push(dt.as_nanos() as u64);
        }
    }
    v.sort_unstable();
    (pct(&v, 50.0) as f64 / 1e3, pct(&v, 99.0) as f64 / 1e3)
}

fn lat_path(p: &mut PathSide) -> (f64, f64) {
    let app = &mut p.apps[0];
    let mut v = Vec::with_capacity(SEQUENTIAL);
    for i in 0..WARMUP + SEQUENTIAL {
        let id = app.next_id("lat");
        let frame = request_frame(&id, "GET", "/api/health", None);
        let (dt, status, body) = app.request(&frame, &id);
        assert!(status == 200 && body == "{\"ok\":true}", "{status} {body}");
        if i >= WARMUP {
            v.push(dt.as_nanos() as u64);
        }
    }
    v.sort_unstable();
    (pct(&v, 50.0) as f64 / 1e3, pct(&v, 99.0) as f64 / 1e3)
}

/// Runs `CONCURRENCY` closed loops for C16_SECS; returns (req/s, p99 µs, sorted latencies len).
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

fn c16_direct(port: u16) -> (f64, f64) {
    let conns: Vec<Http> = (0..CONCURRENCY).map(|_| Http::connect(port)).collect();
    let (rate, p99, _, _) = run_c16(
        conns,
        |c, _| {
            let t0 = Instant::now();
            c.request("GET", "/api/health", None);
            t0.elapsed()
        },
        &[],
    );
    (rate, p99)
}

fn c16_path(p: &mut PathSide) -> (f64, f64, f64, f64) {
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
        &[p.daemon_pid, p.relay_pid],
    );
    p.apps = apps;
    (rate, p99, cpu[0], cpu[1])
}

fn upload_direct(port: u16, body: &[u8]) -> f64 {
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

/// (MiB/s, daemon peak VmRSS KiB sampled every 10 ms during the uploads).
fn upload_path(p: &mut PathSide, body64: &str, decoded: usize) -> (f64, u64) {
    let want = format!("{{\"bytes\":{decoded}}}");
    let sampler = RssSampler::start(p.daemon_pid);
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
    (median(v), sampler.finish())
}

fn sse_path(p: &mut PathSide) -> Vec<Duration> {
    let id = p.apps[0].next_id("sse");
    let frame = request_frame(&id, "GET", "/api/stream", None);
    let mut arrivals = Vec::new();
    let mut started = false;
    p.apps[0].exchange(&frame, &id, |at, f| match f.kind.as_ref() {
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

/// With `HERMESCHAT_BENCH_VERBOSE=1`, says on stderr which phase starts.
fn progress(what: &str) {
    if std::env::var_os("HERMESCHAT_BENCH_VERBOSE").is_some() {
        eprintln!("[bench] {what}");
    }
}

/// What a panic must clean up: the detached daemon (by its state dir) and the relay.
#[allow(clippy::type_complexity)]
static CLEANUP: std::sync::Mutex<(Option<PathBuf>, Option<(u32, PathBuf)>)> =
    std::sync::Mutex::new((None, None));

/// Stops the daemon (by its state dir) and kills the relay, if they were started.
fn cleanup() {
    let (home, relay) = CLEANUP.lock().map(|g| g.clone()).unwrap_or_default();
    if let Some(home) = home {
        let _ = pair_cmd(&home, &["--stop"]);
        let _ = std::fs::remove_dir_all(&home);
    }
    if let Some((pid, data)) = relay {
        // SAFETY: kill only sends a signal to the relay process this bench started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let _ = std::fs::remove_dir_all(data);
    }
}

/// On a panic anywhere (a stuck or failed exchange in a worker thread included) or on Ctrl-C /
/// SIGTERM, stop the daemon and the relay, then exit: a thread waiting on a barrier must not
/// hang the bench, and the detached daemon must not outlive it.
fn install_panic_cleanup() {
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

fn main() {
    let mut reps = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // `cargo bench` passes `--bench`; anything unknown is ignored.
        if a == "--reps" {
            reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps);
        }
    }
    install_panic_cleanup();
    let started = Instant::now();
    println!("# hermeschat-pair end-to-end benchmark");
    println!(
        "binaries: {}, {}",
        bin_path("hermeschat-relay").display(),
        bin_path("hermeschat-pair").display()
    );
    println!("load average at start: {}", loadavg());

    // ------------------------------------------------------------------ setup
    let origin = origin_server();
    let relay = RelayProc::start();
    let registry_url = format!("http://{}", relay.addr);
    let home = common::fresh_dir("bench-e2e-home");
    if let Ok(mut g) = CLEANUP.lock() {
        *g = (Some(home.clone()), Some((relay.pid(), relay.data.clone())));
    }
    let t0 = Instant::now();
    let port_s = origin.to_string();
    let (ok, stdout, stderr) =
        pair_cmd(&home, &["--server", &registry_url, "--port", &port_s, "--json"]);
    let pair_secs = t0.elapsed().as_secs_f64();
    assert!(ok, "hermeschat-pair --json failed:\n{stdout}\n{stderr}");
    let qr: RelayQr = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("--json printed no QR payload ({e}): {stdout}"));
    let daemon_pid: u32 = std::fs::read_to_string(home.join("bridge.pid"))
        .expect("bridge.pid")
        .trim()
        .parse()
        .expect("pid");
    println!("paired in {pair_secs:.2} s: bridge {} via {}; daemon pid {daemon_pid}", qr.g, qr.s);
    let reg = Registry::new(&qr.s);
    let app_url = format!("{}?bridgeId={}", qr.u, qr.g);
    // App 0 verifies the access code from the JSON payload; the others get fresh codes.
    let first = reg.verify_ok(&qr.g, &qr.a, "bench app 0");
    let identity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("bridge.json")).unwrap()).unwrap();
    let relay_secret = identity["relaySecret"].as_str().expect("relaySecret").to_owned();
    let mut secrets = vec![first.client_secret];
    for i in 1..CONCURRENCY {
        let code = reg.access_code_ok(&qr.g, &relay_secret);
        secrets
            .push(reg.verify_ok(&qr.g, &code.access_code, &format!("bench app {i}")).client_secret);
    }
    let apps: Vec<App> = secrets.iter().map(|s| App::connect(&app_url, s)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let daemon_idle_kib = proc_status(daemon_pid, "VmRSS");
    let daemon_threads = proc_status(daemon_pid, "Threads");
    let mut path = PathSide { apps, daemon_pid, relay_pid: relay.pid() };

    let direct16: Vec<u8> = random_bytes(DIRECT_UPLOAD);
    let direct12 = direct16[..PATH_UPLOAD].to_vec();
    let body64 = b64(&direct12);
    let frame_len = request_frame("up1", "POST", "/api/count", Some(&body64)).len();
    println!(
        "path upload: {PATH_UPLOAD} bytes decoded, request frame {frame_len} bytes (relay message limit {} bytes)",
        16 << 20
    );

    // ------------------------------------------------------------------ repetitions
    let mut results: Vec<(Rep, Rep)> = Vec::new();
    for rep in 0..reps {
        let direct_first = rep % 2 == 0;
        let (mut d, mut p) = (Rep::default(), Rep::default());
        // Each measurement: direct and path back to back, order alternating per repetition.
        macro_rules! both {
            ($direct:block, $path:block) => {
                if direct_first {
                    progress("  direct");
                    $direct;
                    progress("  path");
                    $path;
                } else {
                    progress("  path");
                    $path;
                    progress("  direct");
                    $direct;
                }
            };
        }
        progress("latency");
        both!({ (d.p50, d.p99) = lat_direct(origin) }, { (p.p50, p.p99) = lat_path(&mut path) });
        progress("c16");
        both!({ (d.c16, d.c16_p99) = c16_direct(origin) }, {
            (p.c16, p.c16_p99, p.daemon_cpu_us, p.relay_cpu_us) = c16_path(&mut path)
        });
        progress("upload");
        both!(
            {
                d.upload16 = upload_direct(origin, &direct16);
                d.upload12 = upload_direct(origin, &direct12);
            },
            { (p.upload12, p.peak_rss_kib) = upload_path(&mut path, &body64, PATH_UPLOAD) }
        );
        progress("sse");
        let mut ds = Vec::new();
        let mut ps = Vec::new();
        for _ in 0..SSE_RUNS {
            both!({ ds.push(Http::connect(origin).sse()) }, { ps.push(sse_path(&mut path)) });
        }
        (d.ttfe, d.max_gap, d.events_min, d.sse_total) = sse_agg(&ds);
        (p.ttfe, p.max_gap, p.events_min, p.sse_total) = sse_agg(&ps);
        println!(
            "rep {}/{reps} ({:.0} s, load {}): direct p50 {:.1} µs c16 {:.0}/s up16 {:.0} MiB/s | \
             path p50 {:.1} µs c16 {:.0}/s up12 {:.0} MiB/s gap {:.1} ms peak {:.1} MiB",
            rep + 1,
            started.elapsed().as_secs_f64(),
            loadavg(),
            d.p50,
            d.c16,
            d.upload16,
            p.p50,
            p.c16,
            p.upload12,
            p.max_gap,
            p.peak_rss_kib as f64 / 1024.0
        );
        results.push((d, p));
    }
    std::thread::sleep(Duration::from_secs(1));
    let daemon_after_kib = proc_status(daemon_pid, "VmRSS");
    let daemon_hwm_kib = proc_status(daemon_pid, "VmHWM");
    let relay_hwm_kib = proc_status(relay.pid(), "VmHWM");

    // ------------------------------------------------------------------ 16 MiB through the path
    let big64 = b64(&direct16);
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

    // ------------------------------------------------------------------ stop the daemon
    drop(path);
    let (stopped, out, err) = pair_cmd(&home, &["--stop"]);
    let gone = proc_status(daemon_pid, "VmRSS") == 0;
    let _ = std::fs::remove_dir_all(&home);
    drop(relay);

    // ------------------------------------------------------------------ tables
    let md = |f: &dyn Fn(&Rep) -> f64, which: usize| -> f64 {
        median(results.iter().map(|(d, p)| if which == 0 { f(d) } else { f(p) }).collect())
    };
    let ratio = |f: &dyn Fn(&Rep) -> f64| -> f64 {
        median(results.iter().map(|(d, p)| f(p) / f(d)).collect())
    };
    let added = |f: &dyn Fn(&Rep) -> f64| -> f64 {
        median(results.iter().map(|(d, p)| f(p) - f(d)).collect())
    };
    let p50 = |r: &Rep| r.p50;
    let p99 = |r: &Rep| r.p99;
    let c16 = |r: &Rep| r.c16;
    let c16p99 = |r: &Rep| r.c16_p99;
    let up16 = |r: &Rep| r.upload16;
    let up12 = |r: &Rep| r.upload12;
    let ttfe = |r: &Rep| r.ttfe;
    let gap = |r: &Rep| r.max_gap;
    let total = |r: &Rep| r.sse_total;
    println!();
    println!(
        "## End to end: {reps} repetitions, medians; (×) = path / direct computed within each repetition"
    );
    println!();
    println!(
        "| target | p50 µs | p99 µs | c16 req/s | c16 p99 µs | upload 16 MiB MiB/s | upload {:.2} MiB MiB/s | \
         SSE TTFE ms (worst run) | SSE max gap ms (worst run) | SSE events (min) | SSE total ms |",
        PATH_UPLOAD as f64 / MIB
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let events = |w: usize| {
        results
            .iter()
            .map(|(d, p)| if w == 0 { d.events_min } else { p.events_min })
            .min()
            .unwrap_or(0)
    };
    println!(
        "| direct | {} | {} | {} | {} | {} | {} | {} | {} | {}/{SSE_EVENTS} | {} |",
        fmt_num(md(&p50, 0)),
        fmt_num(md(&p99, 0)),
        fmt_num(md(&c16, 0)),
        fmt_num(md(&c16p99, 0)),
        fmt_num(md(&up16, 0)),
        fmt_num(md(&up12, 0)),
        fmt_num(md(&ttfe, 0)),
        fmt_num(md(&gap, 0)),
        events(0),
        fmt_num(md(&total, 0)),
    );
    let wr = |f: &dyn Fn(&Rep) -> f64| format!("{} ({:.2}×)", fmt_num(md(f, 1)), ratio(f));
    println!(
        "| path | {} | {} | {} | {} | not possible (see below) | {} | {} | {} | {}/{SSE_EVENTS} | {} |",
        wr(&p50),
        wr(&p99),
        wr(&c16),
        wr(&c16p99),
        wr(&up12),
        fmt_num(md(&ttfe, 1)),
        fmt_num(md(&gap, 1)),
        events(1),
        fmt_num(md(&total, 1)),
    );
    println!();
    println!(
        "path added latency p50 (within each repetition): {:.1} µs; path CPU per request at c16: \
         daemon {:.1} µs, relay {:.1} µs",
        added(&p50),
        md(&|r| r.daemon_cpu_us, 1),
        md(&|r| r.relay_cpu_us, 1)
    );
    println!(
        "path upload {:.2} MiB vs direct {:.2} MiB (same size): {:.2}×; worst SSE gap over all \
         path runs: {:.1} ms; direct: {:.1} ms",
        PATH_UPLOAD as f64 / MIB,
        PATH_UPLOAD as f64 / MIB,
        ratio(&up12),
        results.iter().map(|(_, p)| p.max_gap).fold(0.0, f64::max),
        results.iter().map(|(d, _)| d.max_gap).fold(0.0, f64::max),
    );
    for (i, (d, p)) in results.iter().enumerate() {
        println!(
            "  rep {}: p50 {:.1}/{:.1} µs, c16 {:.0}/{:.0} req/s, upload12 {:.0}/{:.0} MiB/s, \
             TTFE {:.2}/{:.2} ms, gap {:.1}/{:.1} ms (direct/path)",
            i + 1,
            d.p50,
            p.p50,
            d.c16,
            p.c16,
            d.upload12,
            p.upload12,
            d.ttfe,
            p.ttfe,
            d.max_gap,
            p.max_gap
        );
    }
    println!();
    println!(
        "16 MiB (decoded) in one request frame through the path: {} bytes of base64 → {outcome}",
        big64.len()
    );
    println!();
    println!(
        "## Daemon memory (hermeschat-pair bridge daemon, pid {daemon_pid}, {daemon_threads} threads idle)"
    );
    println!();
    println!("| when | VmRSS MiB |");
    println!("|---|---|");
    println!(
        "| idle, paired, {CONCURRENCY} apps attached, before any request | {:.1} |",
        daemon_idle_kib as f64 / 1024.0
    );
    let peaks: Vec<f64> = results.iter().map(|(_, p)| p.peak_rss_kib as f64 / 1024.0).collect();
    println!(
        "| peak during the {:.2} MiB uploads (10 ms sampling; per repetition) | {} |",
        PATH_UPLOAD as f64 / MIB,
        peaks.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" / ")
    );
    println!(
        "| idle again after all repetitions (1 s) | {:.1} |",
        daemon_after_kib as f64 / 1024.0
    );
    println!("| VmHWM at the end | {:.1} |", daemon_hwm_kib as f64 / 1024.0);
    println!();
    println!("relay VmHWM at the end: {:.1} MiB", relay_hwm_kib as f64 / 1024.0);
    println!(
        "hermeschat-pair --stop: {} ({}); daemon gone: {gone}",
        if stopped { "exit 0" } else { "FAILED" },
        out.trim().lines().chain(err.trim().lines()).collect::<Vec<_>>().join(" / ")
    );
    println!();
    println!("## Goals (issue 3)");
    println!();
    let ok = |b: bool| if b { "met" } else { "MISSED" };
    let r50 = ratio(&p50);
    let rc16 = ratio(&c16);
    let up = md(&up12, 1);
    let worst_gap = results.iter().map(|(_, p)| p.max_gap).fold(0.0, f64::max);
    let idle = daemon_idle_kib as f64 / 1024.0;
    let peak = peaks.iter().copied().fold(0.0, f64::max).max(daemon_hwm_kib as f64 / 1024.0);
    println!("- p50 ≤ 2× direct: {r50:.2}× → {}", ok(r50 <= 2.0));
    println!("- c16 ≥ 0.35× direct: {rc16:.2}× → {}", ok(rc16 >= 0.35));
    println!(
        "- upload ≥ 300 MiB/s: {up:.0} MiB/s ({:.2} MiB; 16 MiB does not fit one frame) → {}",
        PATH_UPLOAD as f64 / MIB,
        ok(up >= 300.0)
    );
    println!("- no SSE gap over 20 ms: worst {worst_gap:.1} ms → {}", ok(worst_gap <= 20.0));
    println!("- daemon idle RSS ≤ 6 MiB: {idle:.1} MiB → {}", ok(idle <= 6.0));
    println!(
        "- daemon peak RSS ≤ 64 MiB during the upload: {peak:.1} MiB (incl. VmHWM) → {}",
        ok(peak <= 64.0)
    );
    println!();
    println!("total {:.0} s; load average at end: {}", started.elapsed().as_secs_f64(), loadavg());
}
