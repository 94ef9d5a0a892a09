//! Pieces the benches share: where the release binaries are, /proc readings, a release relay
//! process that cannot outlive a failed run, and the frame shapes the minimal peers use.
//! Each bench includes it with `#[path = "support/mod.rs"] mod support;` after `mod common;`.

#![allow(dead_code)]

use std::borrow::Cow;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

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
