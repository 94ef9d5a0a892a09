//! End-to-end tests of the relay's store around its life cycle: one relay per data directory,
//! what a clean stop leaves on disk and answers, health while the store fails, startup errors.
//! Each starts the real `hermeschat-relay` binary.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the relay on `data` with `args` and waits at most 5 s for it to exit: its exit code
/// (`None` when it was still running, and was killed) and its stderr.
fn run_relay_on(data: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin_path());
    cmd.arg("--data").arg(data).args(args);
    run_to_exit(&mut cmd)
}

/// A second relay on a data directory in use is refused (exit 1) naming the first one's pid
/// and the way out, and never touches the store; once the first is gone, it starts.
#[test]
fn a_second_relay_on_one_data_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mut first = Relay::new();
    let reg = first.registry().register_ok("first");
    let (code, stderr) = run_relay_on(&first.data_dir, &["--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "no holder pid: {stderr}");
    assert!(stderr.contains("another hermeschat-relay") && stderr.contains("--data"), "{stderr}");
    let lock = first.data_dir.join("relay.lock");
    let mode = std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "relay.lock mode");
    // The first is unaffected.
    let (status, body) = first.registry().access_code(&reg.bridge_id, &reg.relay_secret);
    assert_eq!(status, 200, "{body}");
    // The lock goes with the process, however it ends.
    first.restart();
    assert_eq!(first.registry().health().0, 200);
}

/// A data directory that cannot be made (a read-only root, here a file in the way) exits 1
/// naming the flag that moves it.
#[test]
fn a_data_directory_that_cannot_be_made_names_the_flag() {
    let dir = fresh_dir("data-blocked");
    std::fs::write(dir.join("file"), "x").unwrap();
    let (code, stderr) = run_relay_on(&dir.join("file/relay-data"), &["--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("part of that path is a file"), "{stderr}");
    assert!(stderr.contains("pass another --data directory"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counts the rows of `table` in a copy of `relay.db` alone (no `-wal`, no `-shm`): what a
/// backup that copies only that file would hold.
fn rows_in_db_file_alone(data: &Path, table: &str) -> i64 {
    let copy = fresh_dir("db-alone");
    std::fs::copy(data.join("relay.db"), copy.join("relay.db")).unwrap();
    let db = rusqlite::Connection::open(copy.join("relay.db")).unwrap();
    let n = db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap();
    drop(db);
    let _ = std::fs::remove_dir_all(&copy);
    n
}

/// After a clean stop `relay.db` alone holds every pairing (the WAL was folded in), even with
/// another connection open on the store at that moment (an operator's `sqlite3`): SQLite's own
/// fold at close is skipped whenever another connection is open, which is also what happened
/// when the relay's two worker connections closed at the same instant.
#[test]
fn a_clean_stop_leaves_every_pairing_in_relay_db() {
    let mut relay = Relay::new();
    let other = rusqlite::Connection::open(relay.data_dir.join("relay.db")).unwrap();
    let before: i64 = other.query_row("SELECT count(*) FROM bridges", [], |r| r.get(0)).unwrap();
    assert_eq!(before, 0);
    let api = relay.registry();
    for i in 0..10 {
        api.register_ok(&format!("bridge {i}"));
    }
    let reg = api.register_ok("paired");
    pair_another(&relay, &reg, "phone");
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0), "exit status on SIGTERM");
    let wal = relay.data_dir.join("relay.db-wal");
    let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(wal_len, 0, "relay.db-wal still holds changes after a clean stop");
    assert_eq!(rows_in_db_file_alone(&relay.data_dir, "bridges"), 11, "bridges in relay.db");
    assert_eq!(rows_in_db_file_alone(&relay.data_dir, "clients"), 1, "clients in relay.db");
    drop(other);
}

/// Sends one HTTP request on a fresh connection and reads until EOF (at most `timeout`): the
/// status, or `None` when the connection ended (or could not be made) without an answer.
fn one_request(addr: &str, method: &str, path: &str, body: &str, timeout: Duration) -> Answer {
    send_request(addr, method, path, body).map_or_else(Answer::default, |s| read_answer(s, timeout))
}

/// Connects to `addr` and writes one request (`Connection: close`).
fn send_request(addr: &str, method: &str, path: &str, body: &str) -> Option<TcpStream> {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    Some(s)
}

/// Reads an answer until EOF (at most `timeout`).
fn read_answer(mut s: TcpStream, timeout: Duration) -> Answer {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok());
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Answer { status, body: serde_json::from_str(&body).unwrap_or_default() }
}

/// What [`one_request`] got.
#[derive(Debug, Default)]
struct Answer {
    status: Option<u16>,
    body: serde_json::Value,
}

/// Waits (at most 10 s) for a log line whose event is `event`.
fn wait_for_event(relay: &Relay, event: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = relay.logs().iter().find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v["event"] == event)
        });
        if let Some(line) = line {
            return line;
        }
        assert!(Instant::now() < deadline, "no {event} line: {:?}", relay.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to the relay, without waiting for it to exit.
fn sigterm(relay: &Relay) {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(relay.pid() as libc::pid_t, libc::SIGTERM) };
}

/// A pairing a worker is carrying out when SIGTERM comes (its store is locked by someone
/// else for a moment) is finished and answered before the relay exits: the app that sent
/// it gets its credential, and never a disconnect for a pairing the store then commits.
#[test]
fn a_pairing_in_flight_at_sigterm_is_answered() {
    let mut relay = Relay::new();
    let api = relay.registry();
    let reg = api.register_ok("locked");
    let code = api.access_code_ok(&reg.bridge_id, &reg.relay_secret).access_code;
    let lock = rusqlite::Connection::open(relay.data_dir.join("relay.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = serde_json::json!({"bridgeId": reg.bridge_id, "accessCode": code}).to_string();
    let sent = send_request(&relay.addr, "POST", "/v1/pair/verify", &body).unwrap();
    let verify = std::thread::spawn(move || read_answer(sent, Duration::from_secs(20)));
    // A request sent after it is answered: the verify was taken by a worker before it (the
    // queue is first in, first out) and waits there for the lock.
    assert_eq!(api.health().0, 200);
    sigterm(&relay);
    wait_for_event(&relay, "shutdown");
    lock.execute_batch("COMMIT").unwrap();
    let answer = verify.join().unwrap();
    assert_eq!(relay.terminate().code(), Some(0));
    let clients: i64 = lock.query_row("SELECT count(*) FROM clients", [], |r| r.get(0)).unwrap();
    assert_eq!(answer.status, Some(200), "the pairing was not answered: {answer:?}");
    assert_eq!(clients, 1, "answered 200, yet not stored");
}

/// Under a stream of registrations, SIGTERM: every registration the store holds afterwards
/// was answered 201, and every one answered 201 is there. The others were refused (503) or
/// cut off before being carried out.
#[test]
fn at_sigterm_every_stored_registration_was_answered() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let mut relay = Relay::new();
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let (addr, answered, count) = (relay.addr.clone(), answered.clone(), count.clone());
            std::thread::spawn(move || {
                let body = r#"{"displayName":"flood"}"#;
                loop {
                    let a = one_request(
                        &addr,
                        "POST",
                        "/v1/bridge/register",
                        body,
                        Duration::from_secs(20),
                    );
                    match a.status {
                        Some(201) => {
                            let id = a.body["bridgeId"].as_str().unwrap().to_owned();
                            answered.lock().unwrap().push(id);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(503) => assert_eq!(a.body["error"]["code"], "SHUTTING_DOWN", "{a:?}"),
                        Some(other) => panic!("registration answered {other}: {a:?}"),
                        None => return,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(Ordering::SeqCst) < 100 {
        assert!(Instant::now() < deadline, "registrations too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    sigterm(&relay);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(relay.terminate().code(), Some(0));
    let db = rusqlite::Connection::open(relay.data_dir.join("relay.db")).unwrap();
    let mut stmt = db.prepare("SELECT id FROM bridges").unwrap();
    let mut stored: Vec<String> =
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
    let mut answered = answered.lock().unwrap().clone();
    stored.sort();
    answered.sort();
    assert_eq!(stored.len(), answered.len(), "stored vs answered 201");
    assert_eq!(stored, answered);
}

/// A store whose pages were overwritten (the header intact, so the relay starts): requests
/// that reach it fail 500, and `/v1/health` says so (503, `ok:false`) instead of `ok:true`.
#[test]
fn health_reports_a_failing_store() {
    use std::io::{Seek, SeekFrom, Write};
    let mut relay = Relay::new();
    let api = relay.registry();
    for i in 0..5 {
        api.register_ok(&format!("bridge {i}"));
    }
    assert_eq!(relay.terminate().code(), Some(0));
    // Everything past the first page (the schema) is garbage now.
    let db = relay.data_dir.join("relay.db");
    let len = std::fs::metadata(&db).unwrap().len();
    assert!(len > 4096, "relay.db is only {len} bytes");
    let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(&vec![0xa5; (len - 4096) as usize]).unwrap();
    drop(f);
    relay.restart();
    let api = relay.registry();
    let (status, body) = api.register(Some("after"));
    assert_eq!(status, 500, "{body}");
    let (status, body) = api.health();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ok"], false, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("store"), "{body}");
}

/// A `relay.db` the relay may not write (mode 0400; as root, owned by root with the relay run
/// as nobody) is named as such, with its owner and the way out, not as a file it "cannot
/// create".
#[test]
fn a_store_the_relay_may_not_write_is_named_with_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let data = fresh_dir("readonly");
    let db = data.join("relay.db");
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o400)).unwrap();
    let mut cmd = Command::new(bin_path());
    cmd.args(["--listen", "127.0.0.1:0", "--data"]).arg(&data);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Root may write any file: the relay runs as nobody, in a directory of its own.
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    let (code, stderr) = run_to_exit(&mut cmd);
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("hermeschat-relay:")).unwrap_or_default();
    assert!(line.contains(&format!("cannot open {} for writing", db.display())), "{line}");
    assert!(line.contains("mode 0400"), "{line}");
    if root {
        assert!(line.contains("belongs to uid 0") && line.contains("chown 65534"), "{line}");
    } else {
        assert!(line.contains("belongs to you") && line.contains("chmod 600"), "{line}");
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// A `--data` directory the relay may not create (as root, the relay run as nobody) was
/// "cannot use the data dir: …: Permission denied", with no way out: it now names the user
/// the relay runs as and the command that gives it the directory.
#[test]
fn a_data_directory_the_relay_may_not_create_is_named_with_the_way_out() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let parent = fresh_dir("nocreate");
    let data = parent.join("data");
    let mut cmd = Command::new(bin_path());
    cmd.args(["--listen", "127.0.0.1:0", "--data"]).arg(&data);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me == 0 {
        // Root may create anything: the relay runs as nobody, below root's directory.
        cmd.uid(65534).gid(65534);
    } else {
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o500)).unwrap();
    }
    let (code, stderr) = run_to_exit(&mut cmd);
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("hermeschat-relay:")).unwrap_or_default();
    assert!(line.contains(&format!("--data {}", data.display())), "{line}");
    let uid = if me == 0 { 65534 } else { me };
    assert!(line.contains(&format!("the relay runs as uid {uid}")), "{line}");
    assert!(line.contains(&format!("install -d -m 700 -o {uid} {}", data.display())), "{line}");
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    let _ = std::fs::remove_dir_all(&parent);
}

/// On a full disk the relay says so and how to get out, whether SQLite reports it as "full"
/// or as a "disk I/O error" (with a little room left, creating its shared-memory file fails),
/// and leaves no WAL or shared-memory file of its own behind. Runs the relay on a 64 KiB tmpfs
/// in a user and mount namespace of its own (`unshare -rm`); skipped where there is none.
#[test]
fn a_full_disk_is_named_at_start_and_leaves_no_wal_behind() {
    let probe = Command::new("unshare").args(["-rm", "true"]).stderr(Stdio::null()).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: no user namespaces here (unshare -rm true failed)");
        return;
    }
    let mnt = fresh_dir("full");
    let script = r#"
        mount -t tmpfs -o size=64k tmpfs "$1" || exit 99
        for left in 4 12; do
            rm -rf "$1/data" "$1/fill"; mkdir "$1/data"
            head -c $(( (64 - left) * 1024 )) /dev/zero > "$1/fill" 2>/dev/null
            timeout 5 "$2" --listen 127.0.0.1:0 --data "$1/data"
            echo "exit=$? files=$(ls -A "$1/data" | tr '
' ' ')"
        done
    "#;
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh"])
        .arg(&mnt)
        .arg(bin_path())
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let runs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("exit=")).collect();
    assert_eq!(runs.len(), 2, "stdout: {stdout}\nstderr: {stderr}");
    for run in runs {
        assert!(run.starts_with("exit=1 "), "{run}\nstderr: {stderr}");
        assert!(!run.contains("relay.db-shm") && !run.contains("relay.db-wal"), "{run}");
    }
    let told: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("hermeschat-relay: relay store:")).collect();
    assert_eq!(told.len(), 2, "{stderr}");
    for line in told {
        assert!(line.contains("the disk is full") && line.contains("df -h"), "{line}");
    }
    let _ = std::fs::remove_dir_all(&mnt);
}

/// Starts the relay on a fresh data directory with SIGHUP at its default disposition, or
/// ignored as `nohup` leaves it: the child and its stderr lines as they come.
fn spawn_with_sighup(ignored: bool) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let data = fresh_dir("sighup");
    let mut cmd = Command::new(bin_path());
    cmd.args(["--listen", "127.0.0.1:0", "--data"]).arg(&data);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let disposition = if ignored { libc::SIG_IGN } else { libc::SIG_DFL };
    // SAFETY: signal() is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGHUP, disposition);
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, lines)
}

/// The next stderr line (at most 10 s away) whose event is `event`; the lines passed on
/// the way are added to `seen`.
fn next_event(
    lines: &std::sync::mpsc::Receiver<String>,
    event: &str,
    seen: &mut Vec<String>,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| panic!("no {event}: {seen:?}"));
        seen.push(line.clone());
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["event"] == event
        {
            return v;
        }
    }
}

/// SIGHUP (a closing terminal) stops the relay cleanly, exit 0, as `--help` says, and the log
/// names the signal; started under `nohup` (SIGHUP ignored) the relay keeps running.
#[test]
fn sighup_stops_the_relay_cleanly_unless_under_nohup() {
    let signal = |child: &std::process::Child, sig| {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    };
    let mut seen = Vec::new();
    let (mut child, lines) = spawn_with_sighup(false);
    next_event(&lines, "listening", &mut seen);
    signal(&child, libc::SIGHUP);
    let line = next_event(&lines, "signal", &mut seen);
    assert_eq!(line["signal"], "SIGHUP", "{line}");
    next_event(&lines, "stopped", &mut seen);
    assert_eq!(child.wait().unwrap().code(), Some(0));

    let (mut child, lines) = spawn_with_sighup(true);
    let listening = next_event(&lines, "listening", &mut seen);
    signal(&child, libc::SIGHUP);
    let addr = listening["addr"].as_str().unwrap();
    let health = one_request(addr, "GET", "/v1/health", "", Duration::from_secs(5));
    assert_eq!(health.status, Some(200), "not serving after SIGHUP under nohup");
    signal(&child, libc::SIGTERM);
    let line = next_event(&lines, "signal", &mut seen);
    assert_eq!(line["signal"], "SIGTERM", "SIGHUP was not ignored: {line}");
    assert_eq!(child.wait().unwrap().code(), Some(0));

    let help = Command::new(bin_path()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("SIGHUP") && help.contains("exit status 0"), "{help}");
}

/// The store's format number is kept in SQLite's `user_version`: a relay writes its own into
/// a store that has none (an older relay's), and refuses (exit 1, the store untouched) one a
/// newer relay wrote in a format it does not know.
#[test]
fn a_store_from_a_newer_relay_is_refused_untouched() {
    let mut relay = Relay::new();
    let reg = relay.registry().register_ok("kept");
    relay.terminate();
    let format = |data: &Path| -> i64 {
        let db = rusqlite::Connection::open(data.join("relay.db")).unwrap();
        db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    };
    assert_eq!(format(&relay.data_dir), 1);
    {
        let db = rusqlite::Connection::open(relay.data_dir.join("relay.db")).unwrap();
        db.pragma_update(None, "user_version", 7).unwrap();
    }
    let (code, stderr) = run_relay_on(&relay.data_dir, &["--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("written by a newer hermeschat-relay (store format 7"), "{stderr}");
    assert_eq!(format(&relay.data_dir), 7, "the store was changed");
    assert_eq!(rows_in_db_file_alone(&relay.data_dir, "bridges"), 1);
    // Back to a format this relay knows (as an older store has): it starts and serves it.
    {
        let db = rusqlite::Connection::open(relay.data_dir.join("relay.db")).unwrap();
        db.pragma_update(None, "user_version", 0).unwrap();
    }
    relay.restart();
    assert_eq!(relay.registry().access_code(&reg.bridge_id, &reg.relay_secret).0, 200);
    assert_eq!(format(&relay.data_dir), 1);
}
