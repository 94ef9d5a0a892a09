//! The health poller: keeps backend and gateway health current in `status.json`, so that
//! `--status` answers from what the daemon saw seconds ago. Once a minute it also keeps the
//! logs other processes write into the state directory within bounds
//! ([`crate::logs::trim_written_by_others`]): a bridge runs for months. And each round it
//! writes `bridge.json` again if it went missing or was damaged ([`keep_identity`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::local_http::{CONNECTING, LocalClient, LocalError, Timeouts};
use super::workers::Target;
use super::{Health, LiveStatus};
use crate::state::{self, BridgeIdentity, Loaded};

/// How often health is probed.
const INTERVAL: Duration = Duration::from_secs(5);

/// How often the logs others write are looked at, in probe rounds: once a minute.
const TRIM_EVERY: u32 = 12;

/// Deadline of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The Hermes gateway's API server.
pub const GATEWAY_HOST: &str = "127.0.0.1";
/// The Hermes gateway's port.
pub const GATEWAY_PORT: u16 = 8642;

/// Probes until `stop` is set; trims the logs in `state_dir` others write, and keeps the
/// running bridge's `identity` (relay mode) on disk.
pub fn run(
    target: &Target,
    status: &LiveStatus,
    state_dir: &Path,
    identity: Option<&BridgeIdentity>,
    stop: &AtomicBool,
) {
    let mut round = 0u32;
    // The pid file this bridge locked (it took the lock before this thread started).
    let pid_file = pid_file_id(state_dir).ok().flatten();
    // Rounds in a row that found it gone or another file: two, so that one look in the middle
    // of something odd (a restore of the directory, say) does not stop the bridge.
    let mut lost = 0;
    // The backend's health at the last probe: a TLS server is looked for (and said in the log)
    // once each time it turns unhealthy, so a backend's own log does not get a stray
    // ClientHello every round.
    let mut last_backend = Health::Unknown;
    while !stop.load(Ordering::SeqCst) {
        lost = match pid_file_id(state_dir) {
            // A stat that fails otherwise (EIO, ESTALE on a network home) proves nothing.
            Err(_) => lost,
            Ok(now) if pid_file.is_some() && now != pid_file => lost + 1,
            Ok(_) => 0,
        };
        if lost >= 2 {
            // Commands find a daemon through its locked pid file: without it this one can be
            // neither found nor stopped, and the next pairing would start a second one.
            super::log(&format!(
                "{} is gone or another file (the state directory deleted or moved?): stopping, \
                 as no command can find this daemon any more",
                state::pid_file(state_dir).display()
            ));
            // SAFETY: a signal to this process; its handler starts the clean shutdown.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            return;
        }
        if round.is_multiple_of(TRIM_EVERY) {
            crate::logs::trim_written_by_others(state_dir);
        }
        if let Some(identity) = identity {
            keep_identity(state_dir, identity);
        }
        round = round.wrapping_add(1);
        let backend = probe(&target.host, target.port, "/api/health");
        if backend == Health::Unhealthy
            && last_backend != Health::Unhealthy
            && crate::tls_probe::speaks_tls(&target.host, target.port)
        {
            let authority = super::workers::authority(&target.host, target.port);
            super::log(&crate::tls_probe::hint(&format!("the backend at {authority}")));
        }
        last_backend = backend;
        // Re-read each round: the user may change API_SERVER_PORT or the key meanwhile.
        let gateway = crate::gateway::probe(&crate::gateway::HermesConfig::load());
        status.update(|s| {
            s.backend = backend;
            s.gateway = gateway;
        });
        status.keep_on_disk();
        let until = Instant::now() + INTERVAL;
        // Not a hot path: a coarse sleep only bounds how fast the thread notices a stop.
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `bridge.pid` in `state_dir` as (device, inode); `Ok(None)` when it does not exist.
fn pid_file_id(state_dir: &Path) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(state::pid_file(state_dir)) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `bridge.json` again from the running bridge's `identity` when the file is missing
/// (deleted by hand) or damaged (set aside here first, for the user to look at): its relay
/// secret exists nowhere else, and without it every paired app would have to pair again. A
/// file that holds a valid identity, even another one (a pairing that registered anew and is
/// about to restart this daemon), and one that cannot be read, are left alone; so is one
/// written while this runs ([`state::write_json_new`]).
pub fn keep_identity(state_dir: &Path, identity: &BridgeIdentity) {
    let path = state::bridge_json(state_dir);
    let version = Some(state::STATE_VERSION);
    let why = match state::load_or_move_aside(&path, version, BridgeIdentity::validate) {
        Ok(Loaded::Ok(_)) | Err(_) => return,
        // A symlink to a file that is gone (a dotfiles setup) holds the name: set it aside.
        Ok(Loaded::Missing) if path.is_symlink() => match state::set_aside(&path, "dangling") {
            Ok(kept) => format!(
                "it was a link to a file that is gone (kept as {})",
                kept.map_or_else(String::new, |k| k.display().to_string())
            ),
            Err(e) => {
                super::log(&format!("bridge.json: a link to a file that is gone: {e}"));
                return;
            }
        },
        Ok(Loaded::Missing) => "it was missing".to_owned(),
        Ok(Loaded::MovedAside { reason, moved_to }) => {
            format!("it was damaged ({reason}; kept as {})", moved_to.display())
        }
    };
    // Only into a free name: a pairing may have written a new identity meanwhile.
    match state::write_json_new(&path, identity) {
        Ok(true) => {
            super::log(&format!("bridge.json: {why}; wrote it again from the running bridge"))
        }
        Ok(false) => super::log(&format!(
            "bridge.json: {why}, but a new one appeared meanwhile (a pairing); left it alone"
        )),
        Err(e) => super::log(&format!("bridge.json: {why}, and writing it again failed: {e}")),
    }
}

/// Marks the bridge's own health probes (every few seconds, for months): the built-in backend
/// leaves the successful ones out of `server.log`, where they would be nearly every line.
pub const PROBE_HEADER: &str = "X-Hermeschat-Probe";

/// Probes `GET http://host:port{path}` with the bridge's own client ([`LocalClient`], which
/// checks who listens before it sends): 2xx is ready, any other answer unhealthy, a refused or
/// silent port (every address the name resolves to) not listening. The answer is read to its
/// end (64 KiB at most) before the connection closes: closing a socket with bytes unread makes
/// the kernel reset the connection, and a backend that writes its body after its head (Python's
/// `http.server`) then logs a traceback at every probe, for as long as the daemon runs.
pub fn probe(host: &str, port: u16, path: &str) -> Health {
    let timeouts =
        Timeouts { connect: PROBE_TIMEOUT, head: PROBE_TIMEOUT, body_gap: PROBE_TIMEOUT };
    // A fresh client each time: no pooled connection outlives the probe.
    let client = LocalClient::with_timeouts(host, port, timeouts).without_tls_check();
    match client.get_small(path, &[("Accept", "application/json"), (PROBE_HEADER, "1")]) {
        Ok((200..=299, _)) => Health::Ready,
        Err(LocalError::Connect { .. }) => Health::NotListening,
        Err(LocalError::Timeout { phase, .. }) if phase == CONNECTING => Health::NotListening,
        Err(LocalError::Foreign { .. }) => Health::Foreign,
        Ok(_) | Err(_) => Health::Unhealthy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn serve_once(reply: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(reply);
            }
        });
        port
    }

    fn identity() -> BridgeIdentity {
        let reg = crate::protocol::RegisterResponse {
            bridge_id: "0123456789abcdef01234567".into(),
            relay_secret: format!("hrs_{}", "a".repeat(64)),
            bridge_relay_url: "ws://127.0.0.1:9/ws/bridge".into(),
            app_relay_url: "ws://127.0.0.1:9/ws/app".into(),
        };
        BridgeIdentity::from_registration(reg, "http://127.0.0.1:9", "inst", "Test", 1)
    }

    #[test]
    fn the_identity_is_put_back_when_missing_damaged_or_a_dangling_link() {
        let dir = std::env::temp_dir().join(format!("hcp-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        state::ensure_dir(&dir).unwrap();
        let path = state::bridge_json(&dir);
        let id = identity();
        let restored = || -> String {
            let got: BridgeIdentity = state::read_json(&path).unwrap().unwrap();
            got.bridge_id
        };
        keep_identity(&dir, &id);
        assert_eq!(restored(), id.bridge_id, "missing");
        std::fs::write(&path, "{\"v\":2,").unwrap();
        keep_identity(&dir, &id);
        assert_eq!(restored(), id.bridge_id, "damaged");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.join("gone"), &path).unwrap();
        keep_identity(&dir, &id);
        assert!(!path.is_symlink(), "the dangling link is still there");
        assert_eq!(restored(), id.bridge_id, "dangling link");
        // Another valid identity (a pairing that registered anew) is left alone.
        let mut other = identity();
        other.bridge_id = "ffffffffffffffffffffffff".into();
        state::write_json(&path, &other).unwrap();
        keep_identity(&dir, &id);
        assert_eq!(restored(), other.bridge_id);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Serves one probe like Python's `http.server` (head and body in separate writes, and no
    /// `Content-Length` with `length: false`), then tells how the probe's connection ended:
    /// `Ok(0)` for a clean close, an error for a reset.
    fn serve_in_two_writes(
        length: bool,
    ) -> (u16, std::sync::mpsc::Receiver<std::io::Result<usize>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else { return };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body =
                br#"{"status":"ok","server":"a Hermes-compatible API","padding":"xxxxxxxx"}"#;
            let mut head = b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.7\r\n\
                             Date: Mon, 07 Dec 2026 18:00:00 GMT\r\nContent-Type: application/json\r\n"
                .to_vec();
            if length {
                head.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            let _ = s.write_all(&head);
            // A probe that closes before the body comes (its FIN arrives at once) would make
            // the body's write meet a reset: told as an error. One that waits for the body
            // leaves this read to time out.
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            if let Ok(0) = s.read(&mut buf) {
                let _ = tx.send(Err(std::io::ErrorKind::ConnectionReset.into()));
                return;
            }
            let _ = s.set_read_timeout(None);
            let written = s.write_all(body);
            // With a length the server need not close (it might keep the connection); without
            // one, the close ends the body.
            if !length {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            let _ = tx.send(written.and_then(|()| s.read(&mut buf)));
        });
        (port, rx)
    }

    #[test]
    fn a_probe_reads_the_whole_answer_and_closes_without_a_reset() {
        for length in [true, false] {
            let (port, ended) = serve_in_two_writes(length);
            assert_eq!(probe("127.0.0.1", port, "/api/health"), Health::Ready);
            let ended = ended.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(
                matches!(ended, Ok(0)),
                "with Content-Length: {length}: the backend saw {ended:?}, not a clean close"
            );
        }
    }

    #[test]
    fn classifies_backends() {
        let ok = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(probe("127.0.0.1", ok, "/api/health"), Health::Ready);
        let bad = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(probe("127.0.0.1", bad, "/api/health"), Health::Unhealthy);
        let garbage = serve_once(b"SSH-2.0-OpenSSH_9.2\r\n");
        assert_eq!(probe("127.0.0.1", garbage, "/api/health"), Health::Unhealthy);
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert_eq!(probe("127.0.0.1", closed, "/api/health"), Health::NotListening);
    }

    /// A 2xx whose body trickles in (a byte every 20 ms, each well within the read timeout)
    /// is judged once the probe's timeout is spent: the probe, and the poller's round with it,
    /// is not held until 64 KiB have come (over 20 minutes).
    #[test]
    fn a_trickling_answer_does_not_hold_the_probe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else { return };
            let _ = s.read(&mut [0u8; 1024]);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n");
            // Until the probe hangs up.
            while s.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(probe("127.0.0.1", port, "/api/health")));
        // Not a timing assertion: a guard against a probe that never returns.
        let health = rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(health, Ok(Health::Ready), "the probe was still reading after 60 s");
    }

    /// A server that closes without a byte (as a TLS server does on a plain request) is
    /// unhealthy, and is not asked in TLS what it is: every round would leave a stray
    /// handshake in its log.
    #[test]
    fn a_probe_does_not_ask_in_tls() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 1024]);
            listener
        });
        assert_eq!(probe("127.0.0.1", port, "/api/health"), Health::Unhealthy);
        let listener = server.join().unwrap();
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "the probe connected a second time");
    }

    /// A port whose connections hang (a full accept queue) is not listening, as a refused one.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_silent_port_is_not_listening() {
        let (_listener, _queued, addr) = crate::tcp_connect::black_hole([127, 0, 0, 1].into());
        assert_eq!(probe("127.0.0.1", addr.port(), "/api/health"), Health::NotListening);
    }
}
