//! Benchmark of `hermeschat-relay` alone (issue 2, "Benchmark"): the release relay on loopback
//! with cheap test peers, compared in the same run with direct loopback baselines.
//!
//! Run with `./scripts/bench relay` (or `cargo bench --bench relay -- --reps 3` after
//! `cargo build --release`). Figures are printed, never asserted.
//!
//! Targets, interleaved inside every repetition (the order rotates per repetition):
//! - `tcp-echo`: the request frame's bytes echoed by a plain TCP server (thread per socket);
//! - `direct-ws`: the same app client talking WebSocket straight to the same minimal peer
//!   (thread per socket) — everything of the relay path except the relay;
//! - `relay`: app → relay → bridge peer → relay → app.
//!
//! The bridge peer is minimal on purpose (so the relay is what is measured): it parses each
//! `request` frame with borrowed strings and answers at once with one `response` frame — the
//! body echoed for `/api/echo`, `{"bytes":N}` for `/api/count`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tungstenite::protocol::WebSocket;
use tungstenite::{Message, Utf8Bytes};

use common::{Registry, Ws, b64, random_bytes, ws_connect};
use support::*;

const WARMUP: usize = 200;
const SEQUENTIAL: usize = 2_000;
const CONCURRENCY: usize = 16;
const C16_SECS: f64 = 2.0;
/// The largest decoded body whose base64 request frame stays under the 16 MiB message limit
/// (12 MiB − 3 KiB; a full 12 MiB in base64 is exactly 16 MiB before the JSON around it,
/// PROTOCOL §6 and note 34).
const BIG_BODY: usize = (12 << 20) - (3 << 10);
const BIG_RUNS: usize = 5;
const IDLE_BRIDGES: usize = 1_000;
const MIB: f64 = 1024.0 * 1024.0;

// =============================================================================================
// Processes and /proc

/// Answers every `request` frame with one `response` frame, at once, until the socket ends.
fn peer_loop<S: Read + Write>(mut ws: WebSocket<S>) {
    loop {
        let text = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(_) => continue,
            Err(_) => return,
        };
        let Ok(f) = serde_json::from_str::<InFrame>(text.as_str()) else { continue };
        if f.kind != "request" {
            continue;
        }
        let count;
        let (body, body_base64) = if f.path.starts_with("/api/count") {
            let n = f
                .body
                .as_deref()
                .map_or(0, |b| if f.body_base64 { b.len() / 4 * 3 } else { b.len() });
            count = format!("{{\"bytes\":{n}}}");
            (count.as_str(), false)
        } else {
            (f.body.as_deref().unwrap_or(""), f.body_base64)
        };
        let out = OutResponse {
            kind: "response",
            id: &f.id,
            client: f.client.as_deref(),
            status: 200,
            headers: serde_json::Map::new(),
            body,
            body_base64,
        };
        let json = serde_json::to_string(&out).unwrap();
        if ws.send(Message::text(json)).is_err() {
            return;
        }
    }
}

/// A WebSocket server running [`peer_loop`] on every connection (the `direct-ws` target).
fn direct_ws_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                s.set_nodelay(true).unwrap();
                if let Ok(ws) = tungstenite::accept(s) {
                    peer_loop(ws);
                }
            });
        }
    });
    addr
}

/// A TCP echo server (the `tcp-echo` target).
fn tcp_echo_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                s.set_nodelay(true).unwrap();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One request frame, serialised once (cheap to clone: `Utf8Bytes` is reference counted).
fn request_frame(id: &str, path: &str, body: &str, base64: bool) -> Utf8Bytes {
    let mut v = serde_json::json!({
        "type": "request", "id": id, "method": "POST", "path": path, "headers": {}, "body": body,
    });
    if base64 {
        v["bodyBase64"] = serde_json::Value::Bool(true);
    }
    Utf8Bytes::from(serde_json::to_string(&v).unwrap())
}

/// The app side of one socket: relay app socket or direct WebSocket.
struct App {
    ws: Ws,
}

impl App {
    fn direct(addr: &str) -> App {
        let ws = ws_connect(&format!("ws://{addr}/"), &[]).expect("direct ws connect");
        App { ws }
    }

    fn relay(relay: &RelayProc, bridge_id: &str, secret: &str) -> App {
        let auth = format!("Bearer {secret}");
        let ws = ws_connect(&relay.ws("app", bridge_id), &[("Authorization", &auth)])
            .expect("app connect");
        let mut app = App { ws };
        // The relay greets with bridge.status.
        let first = app.ws.read().expect("bridge.status");
        assert!(first.to_text().unwrap_or("").contains("bridge.status"), "{first:?}");
        app.ws.get_mut().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        app
    }

    /// Sends `frame` and waits for the terminal frame of `id`; returns (elapsed, body length).
    fn round_trip(&mut self, frame: &Utf8Bytes, id: &str) -> (Duration, usize) {
        let t0 = Instant::now();
        self.ws.send(Message::Text(frame.clone())).expect("send");
        loop {
            let msg = self.ws.read().expect("read");
            let Message::Text(t) = msg else { continue };
            let f: InFrame = serde_json::from_str(t.as_str()).expect("frame json");
            if f.id != id {
                continue;
            }
            let dt = t0.elapsed();
            match f.kind.as_ref() {
                "response" => {
                    assert_eq!(f.status, 200);
                    return (dt, f.body.map_or(0, |b| b.len()));
                }
                other => panic!("request {id}: got {other} {:?}", f.code),
            }
        }
    }
}

// =============================================================================================
// Statistics and tables

fn with_ratio(v: f64, r: f64) -> String {
    if r.is_nan() { fmt_num(v) } else { format!("{} ({:.2}×)", fmt_num(v), r) }
}

// =============================================================================================
// Measurements

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    TcpEcho,
    DirectWs,
    Relay,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::TcpEcho => "tcp-echo",
            Target::DirectWs => "direct-ws",
            Target::Relay => "relay",
        }
    }
}

/// Per repetition, per target.
#[derive(Default, Clone)]
struct Rep {
    p50: f64,
    p99: f64,
    c16: f64,
    c16_p99: f64,
    relay_cpu_us: f64,
    upload: f64,
    echo: f64,
}

struct Setup {
    relay: RelayProc,
    bridge_id: String,
    app_secrets: Vec<String>,
    direct_ws: String,
    tcp_echo: String,
    /// The bridge peer thread; kept so the socket stays open.
    _peer: JoinHandle<()>,
}

impl Setup {
    fn app(&self, t: Target, i: usize) -> App {
        match t {
            Target::DirectWs => App::direct(&self.direct_ws),
            Target::Relay => App::relay(&self.relay, &self.bridge_id, &self.app_secrets[i]),
            Target::TcpEcho => unreachable!(),
        }
    }
}

fn setup() -> Setup {
    let relay = RelayProc::start("bench-relay");
    let reg = Registry::new(&relay.url());
    let bridge = reg.register_ok("bench bridge");
    let auth = format!("Bearer {}", bridge.relay_secret);
    let ws = ws_connect(
        &relay.ws("bridge", &bridge.bridge_id),
        &[("Authorization", &auth), ("X-Hermes-Instance", "bench-1")],
    )
    .expect("bridge connect");
    ws.get_ref().set_read_timeout(None).unwrap();
    let peer = std::thread::spawn(move || peer_loop(ws));
    reg.wait_bridge_online(&bridge.bridge_id, &bridge.relay_secret, true);
    let app_secrets = (0..CONCURRENCY)
        .map(|i| {
            let code = reg.access_code_ok(&bridge.bridge_id, &bridge.relay_secret);
            reg.verify_ok(&bridge.bridge_id, &code.access_code, &format!("bench app {i}"))
                .client_secret
        })
        .collect();
    Setup {
        relay,
        bridge_id: bridge.bridge_id,
        app_secrets,
        direct_ws: direct_ws_server(),
        tcp_echo: tcp_echo_server(),
        _peer: peer,
    }
}

/// 200 warm-up + 2,000 sequential small round trips; (p50 µs, p99 µs).
fn latency(s: &Setup, t: Target) -> (f64, f64) {
    let frame = request_frame("lat", "/api/echo", "ping", false);
    let mut samples = Vec::with_capacity(SEQUENTIAL);
    if t == Target::TcpEcho {
        let mut c = TcpStream::connect(&s.tcp_echo).unwrap();
        c.set_nodelay(true).unwrap();
        let bytes = frame.as_bytes();
        let mut back = vec![0u8; bytes.len()];
        for i in 0..WARMUP + SEQUENTIAL {
            let t0 = Instant::now();
            c.write_all(bytes).unwrap();
            c.read_exact(&mut back).unwrap();
            if i >= WARMUP {
                samples.push(t0.elapsed().as_nanos() as u64);
            }
        }
    } else {
        let mut app = s.app(t, 0);
        for i in 0..WARMUP + SEQUENTIAL {
            let (dt, _) = app.round_trip(&frame, "lat");
            if i >= WARMUP {
                samples.push(dt.as_nanos() as u64);
            }
        }
    }
    samples.sort_unstable();
    (pct(&samples, 50.0) as f64 / 1e3, pct(&samples, 99.0) as f64 / 1e3)
}

/// 16 sockets, one request in flight on each, closed loop for [`C16_SECS`];
/// (request+response pairs/s, p99 µs, relay CPU µs per pair).
fn c16(s: &Setup, t: Target) -> (f64, f64, f64) {
    let barrier = Arc::new(Barrier::new(CONCURRENCY + 1));
    let run = Duration::from_secs_f64(C16_SECS);
    let mut handles = Vec::new();
    for i in 0..CONCURRENCY {
        let barrier = barrier.clone();
        let id = format!("c{i}");
        let frame = request_frame(&id, "/api/echo", "ping", false);
        enum Conn {
            Tcp(TcpStream),
            Ws(Box<App>),
        }
        let mut conn = match t {
            Target::TcpEcho => {
                let c = TcpStream::connect(&s.tcp_echo).unwrap();
                c.set_nodelay(true).unwrap();
                Conn::Tcp(c)
            }
            _ => Conn::Ws(Box::new(s.app(t, i))),
        };
        handles.push(std::thread::spawn(move || {
            let one = |conn: &mut Conn| match conn {
                Conn::Tcp(c) => {
                    let t0 = Instant::now();
                    let mut back = vec![0u8; frame.len()];
                    c.write_all(frame.as_bytes()).unwrap();
                    c.read_exact(&mut back).unwrap();
                    t0.elapsed()
                }
                Conn::Ws(app) => app.round_trip(&frame, &id).0,
            };
            for _ in 0..50 {
                one(&mut conn);
            }
            barrier.wait();
            let start = Instant::now();
            let mut lat = Vec::new();
            while start.elapsed() < run {
                lat.push(one(&mut conn).as_nanos() as u64);
            }
            (lat, start.elapsed())
        }));
    }
    let pid = s.relay.pid();
    barrier.wait();
    let cpu0 = cpu_secs(pid);
    let mut all = Vec::new();
    let mut secs: f64 = 0.0;
    for h in handles {
        let (lat, el) = h.join().unwrap();
        all.extend(lat);
        secs = secs.max(el.as_secs_f64());
    }
    let cpu = cpu_secs(pid) - cpu0;
    all.sort_unstable();
    let n = all.len() as f64;
    let cpu_us = if t == Target::Relay { cpu * 1e6 / n } else { f64::NAN };
    (n / secs, pct(&all, 99.0) as f64 / 1e3, cpu_us)
}

/// MiB/s of decoded body bytes for the big body: (upload answered small, echoed back).
fn big(s: &Setup, t: Target, upload: &Utf8Bytes, echo: &Utf8Bytes, b64_len: usize) -> (f64, f64) {
    let mut app = s.app(t, 0);
    let mut rate = |frame: &Utf8Bytes, id: &str, expect_len: Option<usize>| {
        let mut v = Vec::new();
        for i in 0..=BIG_RUNS {
            let (dt, len) = app.round_trip(frame, id);
            if let Some(want) = expect_len {
                assert_eq!(len, want, "echoed body length");
            }
            if i > 0 {
                v.push(BIG_BODY as f64 / MIB / dt.as_secs_f64());
            }
        }
        median(v)
    };
    let up = rate(upload, "up", None);
    let ec = rate(echo, "echo", Some(b64_len));
    (up, ec)
}

struct Idle {
    rss_start: u64,
    rss_registered: u64,
    rss_connected: u64,
    hwm: u64,
    threads_before: u64,
    threads_after: u64,
    register_secs: f64,
    connect_secs: f64,
    online: bool,
}

/// A fresh relay, 1,000 registered bridges, 1,000 connected idle bridge sockets.
fn idle_rss() -> Idle {
    let relay = RelayProc::start("bench-relay");
    let pid = relay.pid();
    std::thread::sleep(Duration::from_millis(300));
    let rss_start = proc_status(pid, "VmRSS");
    let threads_before = proc_status(pid, "Threads");
    let reg = Registry::new(&relay.url());
    let t0 = Instant::now();
    let bridges: Vec<_> =
        (0..IDLE_BRIDGES).map(|i| reg.register_ok(&format!("idle {i}"))).collect();
    let register_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let rss_registered = proc_status(pid, "VmRSS");
    let t0 = Instant::now();
    let mut sockets = Vec::with_capacity(IDLE_BRIDGES);
    for (i, b) in bridges.iter().enumerate() {
        let auth = format!("Bearer {}", b.relay_secret);
        let inst = format!("idle-{i}");
        let ws = ws_connect(
            &relay.ws("bridge", &b.bridge_id),
            &[("Authorization", &auth), ("X-Hermes-Instance", &inst)],
        )
        .unwrap_or_else(|e| panic!("idle bridge {i}: {e:?}"));
        sockets.push(ws);
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // Spot-check that the last and the first bridge are attached.
    let online = [0, IDLE_BRIDGES - 1].iter().all(|&i| {
        let (s, v) = reg.bridge_status(&bridges[i].bridge_id, Some(&bridges[i].relay_secret));
        s == 200 && v["online"] == true
    });
    std::thread::sleep(Duration::from_secs(1));
    let rss_connected = proc_status(pid, "VmRSS");
    let threads_after = proc_status(pid, "Threads");
    let hwm = proc_status(pid, "VmHWM");
    drop(sockets);
    Idle {
        rss_start,
        rss_registered,
        rss_connected,
        hwm,
        threads_before,
        threads_after,
        register_secs,
        connect_secs,
        online,
    }
}

fn main() {
    install_panic_cleanup();
    let mut reps = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // `cargo bench` passes `--bench`; anything unknown is ignored.
        if a == "--reps" {
            reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps);
        }
    }
    let started = Instant::now();
    println!("# hermeschat-relay benchmark");
    println!("relay binary: {}", bin_path("hermeschat-relay").display());
    println!("load average at start: {}", loadavg());
    println!(
        "repetitions: {reps}; targets interleaved, order rotated per repetition; \
         figures = medians over repetitions; ratios computed within each repetition"
    );

    let s = setup();
    let payload = random_bytes(BIG_BODY);
    let body64 = b64(&payload);
    let upload = request_frame("up", "/api/count", &body64, true);
    let echo = request_frame("echo", "/api/echo", &body64, true);
    println!(
        "big body: {} bytes decoded, {} bytes base64, request frame {} bytes (limit {} bytes)",
        BIG_BODY,
        body64.len(),
        echo.len(),
        16 << 20
    );

    let targets = [Target::TcpEcho, Target::DirectWs, Target::Relay];
    let mut results: Vec<Vec<(Target, Rep)>> = Vec::new();
    for rep in 0..reps {
        let mut order = targets.to_vec();
        order.rotate_left(rep % targets.len());
        let mut row: Vec<(Target, Rep)> = order.iter().map(|&t| (t, Rep::default())).collect();
        for (t, r) in row.iter_mut() {
            (r.p50, r.p99) = latency(&s, *t);
        }
        for (t, r) in row.iter_mut() {
            (r.c16, r.c16_p99, r.relay_cpu_us) = c16(&s, *t);
        }
        for (t, r) in row.iter_mut() {
            if *t == Target::TcpEcho {
                (r.upload, r.echo) = (f64::NAN, f64::NAN);
            } else {
                (r.upload, r.echo) = big(&s, *t, &upload, &echo, body64.len());
            }
        }
        print!(
            "rep {}/{reps} ({:.0} s, load {}):",
            rep + 1,
            started.elapsed().as_secs_f64(),
            loadavg()
        );
        for (t, r) in &row {
            print!(
                " {} p50 {:.1} µs c16 {:.0}/s up {:.0} MiB/s;",
                t.name(),
                r.p50,
                r.c16,
                r.upload
            );
        }
        println!();
        row.sort_by_key(|(t, _)| targets.iter().position(|x| x == t));
        results.push(row);
    }
    let relay_rss_after_load = proc_status(s.relay.pid(), "VmRSS");
    let relay_hwm_after_load = proc_status(s.relay.pid(), "VmHWM");
    drop(s);

    let idle = idle_rss();

    // ------------------------------------------------------------------------- tables
    let get = |ti: usize, f: &dyn Fn(&Rep) -> f64| -> f64 {
        median(results.iter().map(|row| f(&row[ti].1)).collect())
    };
    // Ratio of target ti to base bi, computed within each repetition, then the median.
    let ratio = |ti: usize, bi: usize, f: &dyn Fn(&Rep) -> f64| -> f64 {
        median(results.iter().map(|row| f(&row[ti].1) / f(&row[bi].1)).collect())
    };
    let added = |ti: usize, bi: usize, f: &dyn Fn(&Rep) -> f64| -> f64 {
        median(results.iter().map(|row| f(&row[ti].1) - f(&row[bi].1)).collect())
    };
    println!();
    println!(
        "## Relay alone (ratios in parentheses are to direct-ws, computed within each repetition)"
    );
    println!();
    println!(
        "| target | small RT p50 µs | small RT p99 µs | c16 pairs/s | c16 p99 µs | \
         relay CPU µs/pair (c16) | upload {:.2} MiB MiB/s | echo {:.2} MiB MiB/s |",
        BIG_BODY as f64 / MIB,
        BIG_BODY as f64 / MIB
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (ti, t) in targets.iter().enumerate() {
        let base = 1; // direct-ws
        let r = |f: &dyn Fn(&Rep) -> f64| if ti == base { f64::NAN } else { ratio(ti, base, f) };
        let opt = |v: f64, rr: f64| if v.is_nan() { "—".to_owned() } else { with_ratio(v, rr) };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            t.name(),
            with_ratio(get(ti, &|x| x.p50), r(&|x| x.p50)),
            with_ratio(get(ti, &|x| x.p99), r(&|x| x.p99)),
            with_ratio(get(ti, &|x| x.c16), r(&|x| x.c16)),
            with_ratio(get(ti, &|x| x.c16_p99), r(&|x| x.c16_p99)),
            fmt_num(get(ti, &|x| x.relay_cpu_us)),
            opt(get(ti, &|x| x.upload), r(&|x| x.upload)),
            opt(get(ti, &|x| x.echo), r(&|x| x.echo)),
        );
    }
    println!();
    let relay_p50 = get(2, &|x| x.p50);
    println!(
        "relay added latency (p50 relay − p50 direct-ws, within each repetition): {:.1} µs; \
         relay p50 vs tcp-echo p50: {:.2}×",
        added(2, 1, &|x| x.p50),
        ratio(2, 0, &|x| x.p50)
    );
    println!(
        "per repetition p50 µs (tcp-echo / direct-ws / relay): {}",
        results
            .iter()
            .map(|row| format!("{:.1}/{:.1}/{:.1}", row[0].1.p50, row[1].1.p50, row[2].1.p50))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "relay RSS after the load above: {:.1} MiB (VmHWM {:.1} MiB)",
        relay_rss_after_load as f64 / 1024.0,
        relay_hwm_after_load as f64 / 1024.0
    );
    println!();
    println!(
        "## Relay idle memory: {IDLE_BRIDGES} registered bridges with connected idle sockets (fresh relay)"
    );
    println!();
    println!("| phase | VmRSS MiB | threads |");
    println!("|---|---|---|");
    println!("| started | {:.1} | {} |", idle.rss_start as f64 / 1024.0, idle.threads_before);
    println!(
        "| {IDLE_BRIDGES} bridges registered ({:.1} s) | {:.1} | |",
        idle.register_secs,
        idle.rss_registered as f64 / 1024.0
    );
    println!(
        "| {IDLE_BRIDGES} bridge sockets connected ({:.1} s), 1 s idle | {:.1} | {} |",
        idle.connect_secs,
        idle.rss_connected as f64 / 1024.0,
        idle.threads_after
    );
    println!("| VmHWM | {:.1} | |", idle.hwm as f64 / 1024.0);
    println!();
    println!(
        "per idle socket: {:.1} KiB (RSS connected − registered); attached (spot check): {}",
        (idle.rss_connected as f64 - idle.rss_registered as f64) / IDLE_BRIDGES as f64,
        idle.online
    );
    println!();
    println!("## Goals (issue 2)");
    println!();
    let ok = |b: bool| if b { "met" } else { "MISSED" };
    println!(
        "- relay-only round trip p50 < 100 µs: {:.1} µs → {}",
        relay_p50,
        ok(relay_p50 < 100.0)
    );
    let idle_mib = idle.rss_connected as f64 / 1024.0;
    println!(
        "- 1,000 idle bridge sockets < 64 MiB RSS: {:.1} MiB → {}",
        idle_mib,
        ok(idle_mib < 64.0)
    );
    println!();
    println!("total {:.0} s; load average at end: {}", started.elapsed().as_secs_f64(), loadavg());
}
