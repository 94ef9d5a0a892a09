//! Soak of `hermeschat-relay` (issue 7, "Load"): the release relay on loopback with 200 bridges
//! and 400 apps (2 per bridge) for `--secs` seconds (default 600), at a paced rate so the
//! machine is not saturated.
//!
//! Run with `cargo build --release --bins && cargo bench --bench soak -- --secs 600`.
//! Options: `--secs N`, `--interval-ms N` (per app, default 100), `--bridges N` (default 200),
//! `--daemon-apps N` (default 20; 0 leaves the daemon out).
//! Figures are printed, never asserted.
//!
//! - Every bridge socket has a minimal peer that answers each `request` at once with one
//!   `response` frame (the `client` field echoed, the body echoed).
//! - Every app sends one small request every `--interval-ms` (start offsets spread over the
//!   interval), each with a fresh id, and counts terminal frames (`response`, `response.end`,
//!   `response.error`, `error` with an id), duplicates and per-request latency.
//! - A few threads own all the sockets (non-blocking, level-triggered `hermeschat_pair::poll`): 2 for the
//!   bridges, 4 for the apps.
//! - A real `hermeschat-pair` daemon (release build, throwaway `HERMESCHAT_HOME`) is one more
//!   bridge, in front of the benches' origin (`support::origin_server`), with `--daemon-apps`
//!   apps of its own (default 20) at the same pace. Their requests mix what the daemon does:
//!   mostly `GET /api/health` (answered inline), every 10th (but the 100th) a `POST /api/echo` of
//!   320 KiB in base64 (its pool, a response in chunks), every 100th a `GET /api/stream` (an SSE stream
//!   of about a second), staggered between the apps. Every response body is compared with
//!   what the origin sent; latency is counted for the health requests.
//! - VmRSS, open fds and threads of the relay and of the daemon are read from /proc once all
//!   sockets are connected, every 60 s, at the end (after the drain, all sockets still
//!   connected), and with the daemon once more after its idle workers have left.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hermeschat_pair::bridge::workers::WORKER_IDLE;
use hermeschat_pair::poll::{Event, Events, PollMode, Poller};
use tungstenite::Message;

use common::{Registry, Ws, b64, random_bytes, ws_connect};
use support::*;

const BRIDGE_THREADS: usize = 2;
const APP_THREADS: usize = 4;
const APPS_PER_BRIDGE: usize = 2;
const REPORT_EVERY: Duration = Duration::from_secs(60);
const DRAIN_MAX: Duration = Duration::from_secs(15);
/// Body bytes of a daemon app's `POST /api/echo`: over the daemon's 256 KiB streaming
/// threshold, so the echo comes back in `response.chunk` frames.
const ECHO_BYTES: usize = 320 << 10;

// =============================================================================================
// Processes and /proc (as in benches/relay.rs)

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock)
}

// =============================================================================================
// Shared counters

const RUN: u8 = 0;
const DRAIN: u8 = 1;
const STOP: u8 = 2;

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    duplicates: AtomicU64,
    /// Answers (`response` or `response.end`, counted in `ok` too) whose status was not 200
    /// or whose body differed from the one expected.
    mismatched: AtomicU64,
    unknown: AtomicU64,
    bridge_requests: AtomicU64,
    socket_failures: AtomicU64,
    phase: AtomicU8,
    /// Latencies (µs) since the last report, from every app thread.
    lat: Mutex<Vec<u32>>,
    error_codes: Mutex<HashMap<String, u64>>,
}

// =============================================================================================
// Bridge threads: answer every request at once

fn bridge_thread(mut socks: Vec<Ws>, c: Arc<Counters>) {
    let poller = Poller::new().unwrap();
    for (k, ws) in socks.iter().enumerate() {
        ws.get_ref().set_nonblocking(true).unwrap();
        // SAFETY: every socket is deleted from the poller before it is dropped (below).
        unsafe { poller.add_with_mode(ws.get_ref(), Event::readable(k), PollMode::Level) }.unwrap();
    }
    let mut dead = vec![false; socks.len()];
    let mut events = Events::new();
    while c.phase.load(Ordering::Relaxed) != STOP {
        events.clear();
        let _ = poller.wait(&mut events, Some(Duration::from_millis(100)));
        for ev in events.iter() {
            let k = ev.key;
            if dead[k] {
                continue;
            }
            let ws = &mut socks[k];
            loop {
                let text = match ws.read() {
                    Ok(Message::Text(t)) => t,
                    Ok(_) => continue,
                    Err(e) if would_block(&e) => break,
                    Err(_) => {
                        dead[k] = true;
                        c.socket_failures.fetch_add(1, Ordering::Relaxed);
                        let _ = poller.delete(ws.get_ref());
                        break;
                    }
                };
                let Ok(f) = serde_json::from_str::<InFrame>(text.as_str()) else { continue };
                if f.kind != "request" {
                    continue;
                }
                c.bridge_requests.fetch_add(1, Ordering::Relaxed);
                let out = OutResponse {
                    kind: "response",
                    id: &f.id,
                    client: f.client.as_deref(),
                    status: 200,
                    headers: serde_json::Map::new(),
                    body: f.body.as_deref().unwrap_or(""),
                    body_base64: f.body_base64,
                };
                let json = serde_json::to_string(&out).unwrap();
                // On WouldBlock the frame stays queued in tungstenite and goes with the next flush.
                match ws.send(Message::text(json)) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => {}
                    Err(_) => {
                        dead[k] = true;
                        c.socket_failures.fetch_add(1, Ordering::Relaxed);
                        let _ = poller.delete(ws.get_ref());
                        break;
                    }
                }
            }
        }
        for (k, ws) in socks.iter_mut().enumerate() {
            if !dead[k] {
                let _ = ws.flush();
            }
        }
    }
    for (k, ws) in socks.iter().enumerate() {
        if !dead[k] {
            let _ = poller.delete(ws.get_ref());
        }
    }
}

// =============================================================================================
// App threads: paced requests, terminal frames, latency

/// What an app sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// `POST /api/echo` with a short text body, to a simulated bridge that echoes it.
    Echo,
    /// The daemon's mix (see the header).
    Daemon,
}

/// A daemon app's `POST /api/echo` body, and its base64 (made once).
fn echo_body() -> &'static (Vec<u8>, String) {
    static BODY: std::sync::OnceLock<(Vec<u8>, String)> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let bytes = random_bytes(ECHO_BYTES);
        let text = b64(&bytes);
        (bytes, text)
    })
}

/// The whole body of `GET /api/stream` (made once).
fn stream_body() -> &'static [u8] {
    static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BODY.get_or_init(|| (0..SSE_EVENTS).flat_map(|i| sse_event(i).into_bytes()).collect())
}

/// Request `seq` of an app: its frame, the body the answer must carry, and whether its
/// latency is counted. `shift` (the app's place in its group) staggers the daemon's mix, so
/// that its apps' echoes and streams do not all fall in the same interval.
fn request_for(load: Load, seq: u64, shift: u64) -> (String, Cow<'static, [u8]>, bool) {
    let turn = seq + shift;
    match load {
        Load::Echo => {
            let body = format!("ping {seq}");
            let frame = format!(
                r#"{{"type":"request","id":"r{seq}","method":"POST","path":"/api/echo","headers":{{}},"body":"{body}"}}"#
            );
            (frame, Cow::Owned(body.into_bytes()), true)
        }
        Load::Daemon if turn % 100 == 99 => {
            let frame = format!(
                r#"{{"type":"request","id":"r{seq}","method":"GET","path":"/api/stream","headers":{{}}}}"#
            );
            (frame, Cow::Borrowed(stream_body()), false)
        }
        Load::Daemon if turn % 10 == 9 => {
            let (bytes, text) = echo_body();
            let frame = format!(
                r#"{{"type":"request","id":"r{seq}","method":"POST","path":"/api/echo","headers":{{"content-type":"application/octet-stream"}},"body":"{text}","bodyBase64":true}}"#
            );
            (frame, Cow::Borrowed(bytes.as_slice()), false)
        }
        Load::Daemon => {
            let frame = format!(
                r#"{{"type":"request","id":"r{seq}","method":"GET","path":"/api/health","headers":{{}}}}"#
            );
            (frame, Cow::Borrowed(HEALTH_BODY), true)
        }
    }
}

/// A request awaiting its terminal frame.
struct Pending {
    sent: Instant,
    /// Whether its latency is counted.
    timed: bool,
    /// The body its answer must carry, and how much of it has arrived so far.
    expect: Cow<'static, [u8]>,
    got: usize,
    /// False once a status other than 200 or a byte that differs has arrived.
    intact: bool,
}

impl Pending {
    /// Checks the status and the body piece of a `response`, `response.start` or
    /// `response.chunk` frame against what is expected.
    fn take(&mut self, f: &InFrame) {
        if matches!(f.kind.as_ref(), "response" | "response.start") && f.status != 200 {
            self.intact = false;
        }
        let Some(body) = f.body.as_deref() else { return };
        let piece: Cow<[u8]> = if f.body_base64 {
            match STANDARD.decode(body) {
                Ok(b) => Cow::Owned(b),
                Err(_) => {
                    self.intact = false;
                    return;
                }
            }
        } else {
            Cow::Borrowed(body.as_bytes())
        };
        let end = self.got + piece.len();
        if self.expect.get(self.got..end) != Some(&piece[..]) {
            self.intact = false;
        }
        self.got = end;
    }
}

struct AppSock {
    ws: Ws,
    load: Load,
    /// Its place among the apps of its kind (see [`request_for`]).
    shift: u64,
    /// Where its tallies go: the simulated bridges' apps and the daemon's count apart.
    c: Arc<Counters>,
    next_seq: u64,
    next_send: Instant,
    pending: HashMap<u64, Pending>,
    /// Latencies (µs) not yet handed to `c`.
    lat: Vec<u32>,
    dead: bool,
}

/// Drives `apps` until `phase` says stop: sends what is due while it says run, and reads
/// every answer.
fn app_thread(mut apps: Vec<AppSock>, interval: Duration, phase: Arc<Counters>) {
    let poller = Poller::new().unwrap();
    for (k, a) in apps.iter().enumerate() {
        a.ws.get_ref().set_nonblocking(true).unwrap();
        // SAFETY: every socket is deleted from the poller before it is dropped (below).
        unsafe { poller.add_with_mode(a.ws.get_ref(), Event::readable(k), PollMode::Level) }
            .unwrap();
    }
    let mut events = Events::new();
    let mut last_flush = Instant::now();
    loop {
        let phase = phase.phase.load(Ordering::Relaxed);
        if phase == STOP {
            break;
        }
        // Send what is due.
        let now = Instant::now();
        if phase == RUN {
            for a in apps.iter_mut().filter(|a| !a.dead && a.next_send <= now) {
                let seq = a.next_seq;
                a.next_seq += 1;
                let (frame, expect, timed) = request_for(a.load, seq, a.shift);
                let p = Pending { sent: Instant::now(), timed, expect, got: 0, intact: true };
                a.pending.insert(seq, p);
                a.c.sent.fetch_add(1, Ordering::Relaxed);
                match a.ws.send(Message::text(frame)) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => {}
                    Err(_) => {
                        a.dead = true;
                        a.c.socket_failures.fetch_add(1, Ordering::Relaxed);
                        let _ = poller.delete(a.ws.get_ref());
                    }
                }
                a.next_send += interval;
                if a.next_send < now {
                    // Fell behind (machine stalled): do not burst to catch up.
                    a.next_send = now + interval;
                }
            }
        }
        let wake = if phase == RUN {
            apps.iter()
                .filter(|a| !a.dead)
                .map(|a| a.next_send)
                .min()
                .map_or(Duration::from_millis(50), |t| t.saturating_duration_since(Instant::now()))
                .min(Duration::from_millis(50))
        } else {
            Duration::from_millis(50)
        };
        events.clear();
        let _ = poller.wait(&mut events, Some(wake));
        for ev in events.iter() {
            let a = &mut apps[ev.key];
            if a.dead {
                continue;
            }
            loop {
                let text = match a.ws.read() {
                    Ok(Message::Text(t)) => t,
                    Ok(_) => continue,
                    Err(e) if would_block(&e) => break,
                    Err(_) => {
                        a.dead = true;
                        a.c.socket_failures.fetch_add(1, Ordering::Relaxed);
                        let _ = poller.delete(a.ws.get_ref());
                        break;
                    }
                };
                let t1 = Instant::now();
                let Ok(f) = serde_json::from_str::<InFrame>(text.as_str()) else {
                    a.c.unknown.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let seq = f.id.strip_prefix('r').and_then(|s| s.parse::<u64>().ok());
                let terminal = match f.kind.as_ref() {
                    "response" => Some(true),
                    "response.end" | "response.error" => Some(false),
                    "error" if !f.id.is_empty() => Some(false),
                    "response.start" | "response.chunk" => {
                        match seq.and_then(|s| a.pending.get_mut(&s)) {
                            Some(p) => p.take(&f),
                            None => {
                                a.c.unknown.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        continue;
                    }
                    _ => None,
                };
                let Some(one_frame) = terminal else {
                    if f.kind == "error" {
                        a.c.unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                };
                match seq.and_then(|s| a.pending.remove(&s)) {
                    Some(mut p) => {
                        if p.timed {
                            a.lat.push((t1 - p.sent).as_micros().min(u32::MAX as u128) as u32);
                        }
                        if f.kind == "response" || f.kind == "response.end" {
                            if one_frame {
                                p.take(&f);
                            }
                            a.c.ok.fetch_add(1, Ordering::Relaxed);
                            if !p.intact || p.got != p.expect.len() {
                                a.c.mismatched.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            a.c.errors.fetch_add(1, Ordering::Relaxed);
                            let code = f.code.as_deref().unwrap_or(&f.kind).to_owned();
                            *a.c.error_codes.lock().unwrap().entry(code).or_default() += 1;
                        }
                    }
                    None if seq.is_some_and(|s| s < a.next_seq) => {
                        a.c.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        a.c.unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if last_flush.elapsed() >= Duration::from_millis(5) {
            for a in apps.iter_mut().filter(|a| !a.dead) {
                let _ = a.ws.flush();
            }
            last_flush = Instant::now();
        }
        for a in apps.iter_mut() {
            if a.lat.len() >= 64 || (!a.lat.is_empty() && phase != RUN) {
                a.c.lat.lock().unwrap().append(&mut a.lat);
            }
        }
    }
    for a in apps.iter_mut() {
        a.c.lat.lock().unwrap().append(&mut a.lat);
        if !a.dead {
            let _ = poller.delete(a.ws.get_ref());
        }
    }
}

// =============================================================================================
// Statistics and the table

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e3
}

struct Row {
    label: String,
    sent: u64,
    received: u64,
    rate: f64,
    p50: f64,
    p99: f64,
    rss_kib: u64,
    fds: usize,
    threads: u64,
    cpu_pct: f64,
}

fn print_row(r: &Row) {
    let ms = |v: f64| if v.is_nan() { "—".to_owned() } else { format!("{v:.2}") };
    println!(
        "| {} | {} | {} | {:.0} | {} | {} | {:.1} | {} | {} | {:.0} |",
        r.label,
        r.sent,
        r.received,
        r.rate,
        ms(r.p50),
        ms(r.p99),
        r.rss_kib as f64 / 1024.0,
        r.fds,
        r.threads,
        r.cpu_pct
    );
}

/// One process watched (the relay or the daemon) and the apps whose requests it is counted
/// with: its table rows and the running figures between them.
struct Watched {
    name: &'static str,
    pid: u32,
    c: Arc<Counters>,
    rows: Vec<Row>,
    all_lat: Vec<u32>,
    /// Time, terminal frames and CPU seconds at the last row.
    last: (Instant, u64, f64),
    /// Requests without a terminal frame when the drain ended.
    lost: u64,
}

impl Watched {
    /// Starts watching `pid`: the first row, all sockets connected and idle.
    fn new(name: &'static str, pid: u32, c: Arc<Counters>) -> Watched {
        let start = Row {
            label: "start (all connected, idle)".into(),
            sent: 0,
            received: 0,
            rate: 0.0,
            p50: f64::NAN,
            p99: f64::NAN,
            rss_kib: proc_status(pid, "VmRSS"),
            fds: open_fds(pid),
            threads: proc_status(pid, "Threads"),
            cpu_pct: 0.0,
        };
        let last = (Instant::now(), 0, cpu_secs(pid));
        Watched { name, pid, c, rows: vec![start], all_lat: Vec::new(), last, lost: 0 }
    }

    /// Adds a row: requests and latency since the last one, and the process's figures now.
    fn snapshot(&mut self, label: &str) {
        let c = &self.c;
        let mut lat = std::mem::take(&mut *c.lat.lock().unwrap());
        lat.sort_unstable();
        let received = c.ok.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed);
        let now = Instant::now();
        let cpu = cpu_secs(self.pid);
        let dt = (now - self.last.0).as_secs_f64().max(1e-9);
        let row = Row {
            label: label.to_owned(),
            sent: c.sent.load(Ordering::Relaxed),
            received,
            rate: (received - self.last.1) as f64 / dt,
            p50: pct(&lat, 50.0),
            p99: pct(&lat, 99.0),
            rss_kib: proc_status(self.pid, "VmRSS"),
            fds: open_fds(self.pid),
            threads: proc_status(self.pid, "Threads"),
            cpu_pct: (cpu - self.last.2) * 100.0 / dt,
        };
        self.last = (now, received, cpu);
        eprintln!(
            "[{} {}] sent {} received {} {:.0}/s p50 {:.2} ms p99 {:.2} ms rss {:.1} MiB fds {} \
             load {}",
            self.name,
            row.label,
            row.sent,
            row.received,
            row.rate,
            row.p50,
            row.p99,
            row.rss_kib as f64 / 1024.0,
            row.fds,
            loadavg()
        );
        self.all_lat.extend_from_slice(&lat);
        self.rows.push(row);
    }

    /// Terminal frames received so far.
    fn received(&self) -> u64 {
        self.c.ok.load(Ordering::Relaxed) + self.c.errors.load(Ordering::Relaxed)
    }

    /// True once every request sent has its terminal frame.
    fn drained(&self) -> bool {
        self.received() >= self.c.sent.load(Ordering::Relaxed)
    }

    /// The table of rows and the totals.
    fn print(&mut self, title: &str, seen_by_peers: Option<u64>) {
        let (name, c) = (self.name, &self.c);
        println!();
        println!("## {title}");
        println!();
        println!(
            "| at | requests sent | terminal frames | frames/s (interval) | p50 ms (interval) | \
             p99 ms (interval) | {name} VmRSS MiB | {name} fds | {name} threads | {name} CPU % |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            print_row(r);
        }
        println!();
        let sent = c.sent.load(Ordering::Relaxed);
        let ok = c.ok.load(Ordering::Relaxed);
        let errors = c.errors.load(Ordering::Relaxed);
        let received = ok + errors;
        self.all_lat.sort_unstable();
        let (start, end) = (&self.rows[0], &self.rows[self.rows.len() - 1]);
        println!("| total | value |");
        println!("|---|---|");
        println!("| requests sent | {sent} |");
        if let Some(seen) = seen_by_peers {
            println!("| requests seen by bridge peers | {seen} |");
        }
        println!("| terminal frames received | {received} ({ok} response, {errors} error) |");
        println!("| lost (sent − received when the drain ended) | {} |", self.lost);
        println!("| duplicates | {} |", c.duplicates.load(Ordering::Relaxed));
        println!(
            "| answers with another status or body than sent | {} |",
            c.mismatched.load(Ordering::Relaxed)
        );
        println!("| unknown / unmatched frames | {} |", c.unknown.load(Ordering::Relaxed));
        println!("| sockets failed | {} |", c.socket_failures.load(Ordering::Relaxed));
        println!(
            "| latency p50 / p99 / max ms (all {} timed requests) | {:.2} / {:.2} / {:.2} |",
            self.all_lat.len(),
            pct(&self.all_lat, 50.0),
            pct(&self.all_lat, 99.0),
            self.all_lat.last().map_or(f64::NAN, |&v| v as f64 / 1e3)
        );
        // MiB to one decimal, so that a difference printed agrees with the figures printed.
        let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
        // The largest sample, not VmHWM: the kernel updates that lazily and it can read below
        // a sample taken earlier.
        let peak = self.rows.iter().map(|r| r.rss_kib).max().unwrap_or(0);
        println!(
            "| {name} VmRSS start → end MiB | {:.1} → {:.1} ({:+.1}); largest sample {:.1} |",
            mib(start.rss_kib),
            mib(end.rss_kib),
            mib(end.rss_kib) - mib(start.rss_kib),
            mib(peak)
        );
        if let Some(first) = self.rows.get(1).filter(|_| self.rows.len() > 3) {
            println!(
                "| {name} VmRSS at {} → end MiB | {:.1} → {:.1} ({:+.1}) |",
                first.label,
                mib(first.rss_kib),
                mib(end.rss_kib),
                mib(end.rss_kib) - mib(first.rss_kib)
            );
        }
        println!(
            "| {name} fds start → end | {} → {} ({:+}) |",
            start.fds,
            end.fds,
            end.fds as i64 - start.fds as i64
        );
        println!("| {name} threads start → end | {} → {} |", start.threads, end.threads);
        let codes = c.error_codes.lock().unwrap();
        if !codes.is_empty() {
            println!("| error codes | {codes:?} |");
        }
    }
}

fn main() {
    install_panic_cleanup();
    let mut secs: u64 = 600;
    let mut interval_ms: u64 = 100;
    let mut n_bridges: usize = 200;
    let mut daemon_apps: usize = 20;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // `cargo bench` passes `--bench`; anything unknown is ignored.
        let mut val = || args.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--secs" => secs = val().unwrap_or(secs),
            "--interval-ms" => interval_ms = val().unwrap_or(interval_ms).max(1),
            "--bridges" => n_bridges = val().map_or(n_bridges, |v| v as usize).max(1),
            "--daemon-apps" => daemon_apps = val().map_or(daemon_apps, |v| v as usize),
            _ => {}
        }
    }
    let n_apps = n_bridges * APPS_PER_BRIDGE;
    let interval = Duration::from_millis(interval_ms);
    let per_sec = |apps: usize| apps as f64 * 1000.0 / interval_ms as f64;
    println!("# hermeschat-relay and hermeschat-pair soak (issue 7, Load)");
    println!(
        "binaries: {}, {}",
        bin_path("hermeschat-relay").display(),
        bin_path("hermeschat-pair").display()
    );
    println!(
        "{n_bridges} simulated bridges with {n_apps} apps ({APPS_PER_BRIDGE} each), and the daemon \
         with {daemon_apps} apps; 1 request per app every {interval_ms} ms (offered {:.0} + {:.0} \
         req/s), {secs} s; {} cores; load average at start: {}",
        per_sec(n_apps),
        per_sec(daemon_apps),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );

    let relay = RelayProc::start("bench-soak");
    let reg = Registry::new(&relay.url());
    let setup0 = Instant::now();
    let bridges: Vec<_> =
        (0..n_bridges).map(|i| reg.register_ok(&format!("soak bridge {i}"))).collect();
    let mut app_secrets = Vec::with_capacity(n_apps);
    for (i, b) in bridges.iter().enumerate() {
        for j in 0..APPS_PER_BRIDGE {
            let code = reg.access_code_ok(&b.bridge_id, &b.relay_secret);
            let v = reg.verify_ok(&b.bridge_id, &code.access_code, &format!("soak app {i}.{j}"));
            let k = app_secrets.len();
            let at = k as f64 / n_apps as f64;
            app_secrets.push((relay.ws("app", &b.bridge_id), v.client_secret, Load::Echo, k, at));
        }
    }
    let daemon = (daemon_apps > 0).then(|| {
        let daemon = Daemon::start(&relay.url(), origin_server(), "bench-soak-home");
        let url = daemon.app_url();
        for (j, secret) in daemon.pair_apps(daemon_apps, "soak daemon app").into_iter().enumerate()
        {
            // Half a step off the other apps' start times.
            let at = (j as f64 + 0.5) / daemon_apps as f64;
            app_secrets.push((url.clone(), secret, Load::Daemon, j, at));
        }
        daemon
    });
    let mut bridge_socks: Vec<Vec<Ws>> = (0..BRIDGE_THREADS).map(|_| Vec::new()).collect();
    for (i, b) in bridges.iter().enumerate() {
        let auth = format!("Bearer {}", b.relay_secret);
        let inst = format!("soak-{i}");
        let ws = ws_connect(
            &relay.ws("bridge", &b.bridge_id),
            &[("Authorization", &auth), ("X-Hermes-Instance", &inst)],
        )
        .unwrap_or_else(|e| panic!("bridge {i}: {e:?}"));
        bridge_socks[i % BRIDGE_THREADS].push(ws);
    }
    for b in &bridges {
        reg.wait_bridge_online(&b.bridge_id, &b.relay_secret, true);
    }
    // `c` counts the simulated bridges' apps (and says the phase); `dc` the daemon's.
    let c = Arc::new(Counters::default());
    let dc = Arc::new(Counters::default());
    let mut handles = Vec::new();
    for socks in bridge_socks {
        let c = c.clone();
        handles.push(std::thread::spawn(move || bridge_thread(socks, c)));
    }
    let mut app_socks: Vec<Vec<AppSock>> = (0..APP_THREADS).map(|_| Vec::new()).collect();
    let start_at = Instant::now() + Duration::from_secs(1);
    let total_apps = app_secrets.len();
    for (k, (url, secret, load, shift, at)) in app_secrets.into_iter().enumerate() {
        let auth = format!("Bearer {secret}");
        let mut ws = ws_connect(&url, &[("Authorization", &auth)])
            .unwrap_or_else(|e| panic!("app {k}: {e:?}"));
        let first = ws.read().expect("bridge.status");
        assert!(first.to_text().unwrap_or("").contains("\"online\":true"), "{first:?}");
        // Start offsets spread evenly over one interval, each kind of app on its own.
        let offset = interval.mul_f64(at);
        app_socks[k % APP_THREADS].push(AppSock {
            ws,
            load,
            shift: shift as u64,
            c: if load == Load::Daemon { dc.clone() } else { c.clone() },
            next_seq: 0,
            next_send: start_at + offset,
            pending: HashMap::new(),
            lat: Vec::new(),
            dead: false,
        });
    }
    let setup_secs = setup0.elapsed().as_secs_f64();
    // All connected: the start figures.
    std::thread::sleep(Duration::from_millis(500));
    let mut watched = vec![Watched::new("relay", relay.pid(), c.clone())];
    if let Some(d) = &daemon {
        watched.push(Watched::new("daemon", d.pid, dc.clone()));
    }
    println!(
        "setup (register, pair, connect {} sockets): {setup_secs:.1} s",
        n_bridges + total_apps
    );
    for apps in app_socks {
        let c = c.clone();
        handles.push(std::thread::spawn(move || app_thread(apps, interval, c)));
    }

    let t0 = Instant::now();
    let run = Duration::from_secs(secs);
    let mut next_report = REPORT_EVERY;
    while t0.elapsed() < run {
        let until = next_report.min(run);
        std::thread::sleep(until.saturating_sub(t0.elapsed()).min(Duration::from_millis(500)));
        if t0.elapsed() >= next_report && next_report < run {
            let label = format!("{} s", next_report.as_secs());
            watched.iter_mut().for_each(|w| w.snapshot(&label));
            next_report += REPORT_EVERY;
        }
    }
    let label = format!("{secs} s (sending stops)");
    watched.iter_mut().for_each(|w| w.snapshot(&label));
    c.phase.store(DRAIN, Ordering::Relaxed);
    let d0 = Instant::now();
    while d0.elapsed() < DRAIN_MAX && !watched.iter().all(Watched::drained) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let drain_secs = d0.elapsed().as_secs_f64();
    // Lost is what had no terminal frame when the drain ended.
    for w in &mut watched {
        w.lost = w.c.sent.load(Ordering::Relaxed).saturating_sub(w.received());
    }
    // Let the processes settle (idle, all sockets still connected) before the end figures.
    std::thread::sleep(Duration::from_secs(2));
    let label = format!("end (drained {drain_secs:.1} s + 2 s idle)");
    watched.iter_mut().for_each(|w| w.snapshot(&label));
    if let Some(w) = watched.get_mut(1) {
        // The daemon's idle workers leave after `WORKER_IDLE` without a job; its backend
        // connections close 20–40 s (parked on the relay I/O thread) or 30–60 s (pooled for
        // the workers) after their last use.
        let idle = WORKER_IDLE * 2 + Duration::from_secs(5);
        std::thread::sleep(idle - Duration::from_secs(2));
        w.snapshot(&format!("{} s idle", idle.as_secs()));
    }
    c.phase.store(STOP, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }

    // ------------------------------------------------------------------------- tables
    let seen = c.bridge_requests.load(Ordering::Relaxed);
    let relay_title = format!(
        "Relay: {n_bridges} simulated bridges, {n_apps} apps, {secs} s, 1 request/app every \
         {interval_ms} ms{}",
        if daemon.is_some() {
            " (requests of these apps; the relay's figures include the daemon's traffic)"
        } else {
            ""
        }
    );
    watched[0].print(&relay_title, Some(seen));
    if let Some(w) = watched.get_mut(1) {
        let title = format!(
            "Daemon: {daemon_apps} apps through the relay, {secs} s, 1 request/app every \
             {interval_ms} ms (health; every 10th a 320 KiB echo; every 100th an SSE stream)"
        );
        w.print(&title, None);
    }
    println!();
    if let Some(d) = &daemon {
        let (stopped, out, err) = d.stop();
        let gone = proc_status(d.pid, "VmRSS") == 0;
        println!("hermeschat-pair --stop: {} ({}); daemon gone: {gone}", stopped, out.trim());
        if !stopped {
            eprintln!("{err}");
        }
        let _ = std::fs::remove_dir_all(&d.home);
    }
    println!("total {:.0} s; load average at end: {}", t0.elapsed().as_secs_f64(), loadavg());
    drop(relay);
}
