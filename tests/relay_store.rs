//! End-to-end tests of the relay's store around its life cycle: one relay per data directory,
//! what a clean stop leaves on disk and answers, health while the store fails, startup errors.
//! Each starts the real `hermeschat-relay` binary.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the relay on `data` with `args` and waits at most 5 s for it to exit: its exit code
/// (`None` when it was still running, and was killed) and its stderr.
fn run_relay_on(data: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin_path())
        .arg("--data")
        .arg(data)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (code, stderr)
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
