//! Soak of `hermeschat-relay` (issue 7, "Load"): the release relay on loopback with 200 bridges
//! and 400 apps (2 per bridge) for `--secs` seconds (default 600), at a paced rate so the
//! machine is not saturated.
//!
//! Run with `cargo build --release --bins && cargo bench --bench soak -- --secs 600`.
//! Options: `--secs N`, `--interval-ms N` (per app, default 100), `--bridges N` (default 200).
//! Figures are printed, never asserted.
//!
//! - Every bridge socket has a minimal peer that answers each `request` at once with one
//!   `response` frame (the `client` field echoed, the body echoed).
//! - Every app sends one small request every `--interval-ms` (start offsets spread over the
//!   interval), each with a fresh id, and counts terminal frames (`response`, `response.end`,
//!   `response.error`, `error` with an id), duplicates and per-request latency.
//! - A few threads own all the sockets (non-blocking, level-triggered `hermeschat_pair::poll`): 2 for the
//!   bridges, 4 for the apps.
//! - Relay VmRSS and open fds are read from /proc once all sockets are connected, every 60 s,
//!   and at the end (after the drain, all sockets still connected).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hermeschat_pair::poll::{Event, Events, PollMode, Poller};
use tungstenite::Message;

use common::{Registry, Ws, ws_connect};
use support::*;

const BRIDGE_THREADS: usize = 2;
const APP_THREADS: usize = 4;
const APPS_PER_BRIDGE: usize = 2;
const REPORT_EVERY: Duration = Duration::from_secs(60);
const DRAIN_MAX: Duration = Duration::from_secs(15);

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

struct AppSock {
    ws: Ws,
    next_seq: u64,
    next_send: Instant,
    pending: HashMap<u64, Instant>,
    dead: bool,
}

fn app_thread(mut apps: Vec<AppSock>, interval: Duration, c: Arc<Counters>) {
    let poller = Poller::new().unwrap();
    for (k, a) in apps.iter().enumerate() {
        a.ws.get_ref().set_nonblocking(true).unwrap();
        // SAFETY: every socket is deleted from the poller before it is dropped (below).
        unsafe { poller.add_with_mode(a.ws.get_ref(), Event::readable(k), PollMode::Level) }
            .unwrap();
    }
    let mut events = Events::new();
    let mut lat: Vec<u32> = Vec::new();
    let mut last_flush = Instant::now();
    loop {
        let phase = c.phase.load(Ordering::Relaxed);
        if phase == STOP {
            break;
        }
        // Send what is due.
        let now = Instant::now();
        if phase == RUN {
            for a in apps.iter_mut().filter(|a| !a.dead && a.next_send <= now) {
                let seq = a.next_seq;
                a.next_seq += 1;
                let frame = format!(
                    r#"{{"type":"request","id":"r{seq}","method":"POST","path":"/api/echo","headers":{{}},"body":"ping {seq}"}}"#
                );
                a.pending.insert(seq, Instant::now());
                c.sent.fetch_add(1, Ordering::Relaxed);
                match a.ws.send(Message::text(frame)) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => {}
                    Err(_) => {
                        a.dead = true;
                        c.socket_failures.fetch_add(1, Ordering::Relaxed);
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
                        c.socket_failures.fetch_add(1, Ordering::Relaxed);
                        let _ = poller.delete(a.ws.get_ref());
                        break;
                    }
                };
                let t1 = Instant::now();
                let Ok(f) = serde_json::from_str::<InFrame>(text.as_str()) else {
                    c.unknown.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let terminal = match f.kind.as_ref() {
                    "response" => Some(true),
                    "response.end" | "response.error" => Some(false),
                    "error" if !f.id.is_empty() => Some(false),
                    _ => None,
                };
                let Some(is_ok) = terminal else {
                    if f.kind == "error" {
                        c.unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                };
                let seq = f.id.strip_prefix('r').and_then(|s| s.parse::<u64>().ok());
                match seq.and_then(|s| a.pending.remove(&s)) {
                    Some(t0) => {
                        lat.push((t1 - t0).as_micros().min(u32::MAX as u128) as u32);
                        if is_ok {
                            c.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            c.errors.fetch_add(1, Ordering::Relaxed);
                            let code = f.code.as_deref().unwrap_or(&f.kind).to_owned();
                            *c.error_codes.lock().unwrap().entry(code).or_default() += 1;
                        }
                    }
                    None if seq.is_some_and(|s| s < a.next_seq) => {
                        c.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        c.unknown.fetch_add(1, Ordering::Relaxed);
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
        if lat.len() >= 256 || (!lat.is_empty() && phase != RUN) {
            c.lat.lock().unwrap().append(&mut lat);
        }
    }
    c.lat.lock().unwrap().append(&mut lat);
    for a in apps.iter().filter(|a| !a.dead) {
        let _ = poller.delete(a.ws.get_ref());
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

fn main() {
    install_panic_cleanup();
    let mut secs: u64 = 600;
    let mut interval_ms: u64 = 100;
    let mut n_bridges: usize = 200;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // `cargo bench` passes `--bench`; anything unknown is ignored.
        let mut val = || args.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--secs" => secs = val().unwrap_or(secs),
            "--interval-ms" => interval_ms = val().unwrap_or(interval_ms).max(1),
            "--bridges" => n_bridges = val().map_or(n_bridges, |v| v as usize).max(1),
            _ => {}
        }
    }
    let n_apps = n_bridges * APPS_PER_BRIDGE;
    let interval = Duration::from_millis(interval_ms);
    println!("# hermeschat-relay soak (issue 7, Load)");
    println!("relay binary: {}", bin_path("hermeschat-relay").display());
    println!(
        "{n_bridges} bridges, {n_apps} apps ({APPS_PER_BRIDGE} per bridge), 1 request per app every \
         {interval_ms} ms (offered {:.0} req/s), {secs} s; {} cores; load average at start: {}",
        n_apps as f64 * 1000.0 / interval_ms as f64,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );

    let relay = RelayProc::start("bench-soak");
    let pid = relay.pid();
    let reg = Registry::new(&relay.url());
    let setup0 = Instant::now();
    let bridges: Vec<_> =
        (0..n_bridges).map(|i| reg.register_ok(&format!("soak bridge {i}"))).collect();
    let mut app_secrets = Vec::with_capacity(n_apps);
    for (i, b) in bridges.iter().enumerate() {
        for j in 0..APPS_PER_BRIDGE {
            let code = reg.access_code_ok(&b.bridge_id, &b.relay_secret);
            let v = reg.verify_ok(&b.bridge_id, &code.access_code, &format!("soak app {i}.{j}"));
            app_secrets.push((i, v.client_secret));
        }
    }
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
    let c = Arc::new(Counters::default());
    let mut handles = Vec::new();
    for socks in bridge_socks {
        let c = c.clone();
        handles.push(std::thread::spawn(move || bridge_thread(socks, c)));
    }
    let mut app_socks: Vec<Vec<AppSock>> = (0..APP_THREADS).map(|_| Vec::new()).collect();
    let start_at = Instant::now() + Duration::from_secs(1);
    for (k, (bi, secret)) in app_secrets.iter().enumerate() {
        let auth = format!("Bearer {secret}");
        let mut ws =
            ws_connect(&relay.ws("app", &bridges[*bi].bridge_id), &[("Authorization", &auth)])
                .unwrap_or_else(|e| panic!("app {k}: {e:?}"));
        let first = ws.read().expect("bridge.status");
        assert!(first.to_text().unwrap_or("").contains("bridge.status"), "{first:?}");
        // Start offsets spread evenly over one interval.
        let offset = interval.mul_f64(k as f64 / n_apps as f64);
        app_socks[k % APP_THREADS].push(AppSock {
            ws,
            next_seq: 0,
            next_send: start_at + offset,
            pending: HashMap::new(),
            dead: false,
        });
    }
    let setup_secs = setup0.elapsed().as_secs_f64();
    // All connected: the start figures.
    std::thread::sleep(Duration::from_millis(500));
    let rss_start = proc_status(pid, "VmRSS");
    let fds_start = open_fds(pid);
    let threads_start = proc_status(pid, "Threads");
    println!("setup (register, pair, connect {} sockets): {setup_secs:.1} s", n_bridges + n_apps);
    for apps in app_socks {
        let c = c.clone();
        handles.push(std::thread::spawn(move || app_thread(apps, interval, c)));
    }

    let mut rows = vec![Row {
        label: "start (all connected, idle)".into(),
        sent: 0,
        received: 0,
        rate: 0.0,
        p50: f64::NAN,
        p99: f64::NAN,
        rss_kib: rss_start,
        fds: fds_start,
        threads: threads_start,
        cpu_pct: 0.0,
    }];
    let mut all_lat: Vec<u32> = Vec::new();
    let t0 = Instant::now();
    let run = Duration::from_secs(secs);
    let mut last = (Instant::now(), 0u64, cpu_secs(pid));
    let mut snapshot =
        |label: String, c: &Counters, all_lat: &mut Vec<u32>, rows: &mut Vec<Row>| {
            let mut lat = std::mem::take(&mut *c.lat.lock().unwrap());
            lat.sort_unstable();
            let received = c.ok.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed);
            let now = Instant::now();
            let cpu = cpu_secs(pid);
            let dt = (now - last.0).as_secs_f64().max(1e-9);
            let row = Row {
                label,
                sent: c.sent.load(Ordering::Relaxed),
                received,
                rate: (received - last.1) as f64 / dt,
                p50: pct(&lat, 50.0),
                p99: pct(&lat, 99.0),
                rss_kib: proc_status(pid, "VmRSS"),
                fds: open_fds(pid),
                threads: proc_status(pid, "Threads"),
                cpu_pct: (cpu - last.2) * 100.0 / dt,
            };
            last = (now, received, cpu);
            eprintln!(
                "[{}] sent {} received {} {:.0}/s p50 {:.2} ms p99 {:.2} ms rss {:.1} MiB fds {} \
             load {}",
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
            all_lat.extend_from_slice(&lat);
            rows.push(row);
        };
    let mut next_report = REPORT_EVERY;
    while t0.elapsed() < run {
        let until = next_report.min(run);
        std::thread::sleep(until.saturating_sub(t0.elapsed()).min(Duration::from_millis(500)));
        if t0.elapsed() >= next_report && next_report < run {
            snapshot(format!("{} s", next_report.as_secs()), &c, &mut all_lat, &mut rows);
            next_report += REPORT_EVERY;
        }
    }
    snapshot(format!("{secs} s (sending stops)"), &c, &mut all_lat, &mut rows);
    c.phase.store(DRAIN, Ordering::Relaxed);
    let d0 = Instant::now();
    while d0.elapsed() < DRAIN_MAX {
        let done = c.ok.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed);
        if done >= c.sent.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let drain_secs = d0.elapsed().as_secs_f64();
    // Let the relay settle (idle, all sockets still connected) before the end figures.
    std::thread::sleep(Duration::from_secs(2));
    snapshot(format!("end (drained {drain_secs:.1} s + 2 s idle)"), &c, &mut all_lat, &mut rows);
    let hwm = proc_status(pid, "VmHWM");
    c.phase.store(STOP, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }

    // ------------------------------------------------------------------------- table
    let sent = c.sent.load(Ordering::Relaxed);
    let ok = c.ok.load(Ordering::Relaxed);
    let errors = c.errors.load(Ordering::Relaxed);
    let received = ok + errors;
    all_lat.sort_unstable();
    println!();
    println!(
        "## Soak: {n_bridges} bridges, {n_apps} apps, {secs} s, 1 request/app every {interval_ms} ms"
    );
    println!();
    println!(
        "| at | requests sent | terminal frames | frames/s (interval) | p50 ms (interval) | \
         p99 ms (interval) | relay VmRSS MiB | relay fds | relay threads | relay CPU % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        print_row(r);
    }
    println!();
    let end = rows.last().unwrap();
    println!("| total | value |");
    println!("|---|---|");
    println!("| requests sent | {sent} |");
    println!("| requests seen by bridge peers | {} |", c.bridge_requests.load(Ordering::Relaxed));
    println!("| terminal frames received | {received} ({ok} response, {errors} error) |");
    println!("| lost (sent − received after drain) | {} |", sent.saturating_sub(received));
    println!("| duplicates | {} |", c.duplicates.load(Ordering::Relaxed));
    println!("| unknown / unmatched frames | {} |", c.unknown.load(Ordering::Relaxed));
    println!("| sockets failed | {} |", c.socket_failures.load(Ordering::Relaxed));
    println!(
        "| latency p50 / p99 / max ms (all {} requests) | {:.2} / {:.2} / {:.2} |",
        all_lat.len(),
        pct(&all_lat, 50.0),
        pct(&all_lat, 99.0),
        all_lat.last().map_or(f64::NAN, |&v| v as f64 / 1e3)
    );
    println!(
        "| relay VmRSS start → end MiB | {:.1} → {:.1} ({:+.1}); VmHWM {:.1} |",
        rss_start as f64 / 1024.0,
        end.rss_kib as f64 / 1024.0,
        (end.rss_kib as f64 - rss_start as f64) / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "| relay fds start → end | {fds_start} → {} ({:+}) |",
        end.fds,
        end.fds as i64 - fds_start as i64
    );
    let codes = c.error_codes.lock().unwrap();
    if !codes.is_empty() {
        println!("| error codes | {codes:?} |");
    }
    println!();
    println!("total {:.0} s; load average at end: {}", t0.elapsed().as_secs_f64(), loadavg());
    drop(relay);
}
