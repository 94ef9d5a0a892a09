//! `--doctor`, `--devices`, `--revoke` and `--logs`, end to end: the real CLI and daemon, the
//! real `hermeschat-relay`, the FastAPI backend fixture, and a stand-in for the Hermes gateway
//! (`/health`, and `/v1/models` behind a bearer key) found through Hermes Agent's own
//! configuration (`$HERMES_HOME/.env`: `API_SERVER_PORT`, `API_SERVER_KEY`).
//!
//! Needs `python3 -m pip install -r tests/fixtures/requirements.txt` (as `tests/pair.rs`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{AppClient, Registry, Relay, fresh_dir};
use hermeschat_pair::protocol::RelayQr;
use serde_json::Value;

const PAIR_BIN: &str = env!("CARGO_BIN_EXE_hermeschat-pair");
const GATEWAY_KEY: &str = "doctor-test-gateway-key-0123456789";

// =============================================================================================
// Peers

/// `tests/fixtures/backend.py` under uvicorn.
struct Backend {
    child: Child,
    port: u16,
}

impl Backend {
    fn start() -> Backend {
        let python = std::env::var("HERMESCHAT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/backend.py");
        let mut child = Command::new(&python)
            .args([script, "0"])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} {script}: {e}"));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(p) = line.strip_prefix("READY ") {
                        return Backend { child, port: p.trim().parse().unwrap() };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the FastAPI fixture did not start (python3 -m pip install -r \
                         tests/fixtures/requirements.txt)"
                    );
                }
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A stand-in for the Hermes gateway's API server: `GET /health` open, `GET /v1/models` with
/// `Authorization: Bearer GATEWAY_KEY`, 401 otherwise.
fn fake_gateway() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let authed = head.contains(&format!(
                    "authorization: bearer {}",
                    GATEWAY_KEY.to_ascii_lowercase()
                ));
                let (status, body) = match path.as_str() {
                    "/health" => ("200 OK", r#"{"status":"ok","platform":"hermes-agent"}"#),
                    "/v1/models" if authed => (
                        "200 OK",
                        r#"{"object":"list","data":[{"id":"hermes-agent","object":"model"}]}"#,
                    ),
                    "/v1/models" => ("401 Unauthorized", r#"{"error":"invalid key"}"#),
                    _ => ("404 Not Found", "{}"),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

// =============================================================================================
// The CLI

/// One user's machine: HOME (with `.hermes/.env`), the state dir, a working dir.
struct Machine {
    root: PathBuf,
    state: PathBuf,
    hermes: PathBuf,
}

impl Machine {
    fn new(gateway_port: u16, key: &str) -> Machine {
        let root = fresh_dir("doctor");
        let hermes = root.join("home/.hermes");
        std::fs::create_dir_all(&hermes).unwrap();
        let m = Machine { state: root.join("home/.hermeschat"), hermes, root };
        m.write_env(gateway_port, key);
        m
    }

    fn write_env(&self, gateway_port: u16, key: &str) {
        std::fs::write(
            self.hermes.join(".env"),
            format!(
                "# Hermes Agent\nAPI_SERVER_ENABLED=true\nAPI_SERVER_KEY={key}\n\
                 API_SERVER_HOST=127.0.0.1\nAPI_SERVER_PORT={gateway_port}\n"
            ),
        )
        .unwrap();
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(PAIR_BIN);
        cmd.args(args)
            .env("HOME", self.root.join("home"))
            .env("HERMESCHAT_HOME", &self.state)
            .env("HERMES_HOME", &self.hermes)
            .env("NO_COLOR", "1")
            .env_remove("HERMESCHAT_REGISTRY_URL")
            .env_remove("INVOCATION_ID")
            .env_remove("HERMESCHAT_LOCAL_HOST")
            .env_remove("HERMESCHAT_LOCAL_PORT")
            .env_remove("API_SERVER_KEY")
            .env_remove("API_SERVER_PORT")
            .env_remove("API_SERVER_HOST")
            .env_remove("HERMESCHAT_GATEWAY_URL")
            .current_dir(&self.root)
            .stdin(Stdio::null());
        cmd
    }

    #[track_caller]
    fn run(&self, args: &[&str]) -> Run {
        let out = self.cmd(args).output().unwrap();
        Run(out)
    }

    /// Pairs against `relay` and `backend`; returns the QR payload.
    #[track_caller]
    fn pair(&self, relay: &Relay, backend: &Backend) -> RelayQr {
        let run =
            self.run(&["--json", "--server", &relay.url(), "--port", &backend.port.to_string()]);
        run.expect(0, "pairing");
        serde_json::from_str(run.stdout().trim()).unwrap()
    }

    /// `--doctor --json`, parsed; the exit code checked.
    #[track_caller]
    fn doctor(&self, code: i32) -> Value {
        let run = self.run(&["--doctor", "--json"]);
        run.expect(code, "--doctor --json");
        let lines: Vec<String> = run.stdout().lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 1, "--doctor --json prints one line:\n{}", run.all());
        serde_json::from_str(&lines[0]).unwrap()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.cmd(&["--stop"]).output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

struct Run(Output);

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout(), String::from_utf8_lossy(&self.0.stderr))
    }
    #[track_caller]
    fn expect(&self, code: i32, what: &str) -> &Self {
        assert_eq!(self.0.status.code(), Some(code), "{what}: exit code; output:\n{}", self.all());
        self
    }
}

/// A child process killed and reaped when the test ends, passed or failed.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The hop `id` of a doctor report.
#[track_caller]
fn hop<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["hops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == id)
        .unwrap_or_else(|| panic!("no hop {id} in {report}"))
}

#[track_caller]
fn assert_hop(report: &Value, id: &str, state: &str) {
    let h = hop(report, id);
    assert_eq!(h["state"], state, "hop {id}: {h}\nreport: {report:#}");
    if state == "fail" {
        assert!(
            h["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "a failed hop says what to do: {h}"
        );
    }
    if state == "ok" {
        assert!(h["ms"].as_f64().is_some(), "every run hop is timed: {h}");
    }
}

// =============================================================================================

#[test]
fn doctor_walks_the_whole_path_and_pinpoints_each_broken_hop() {
    let relay = Relay::new();
    let mut backend = Backend::start();
    let gateway = fake_gateway();
    let m = Machine::new(gateway, GATEWAY_KEY);
    m.pair(&relay, &backend);

    // Everything up: every hop passes, in order, each timed.
    let report = m.doctor(0);
    assert_eq!(report["ok"], true, "{report:#}");
    let ids: Vec<&str> =
        report["hops"].as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["registry", "bridge", "daemon", "relay", "backend", "gateway", "gatewayModels"]
    );
    for id in &ids {
        assert_hop(&report, id, "ok");
    }
    assert!(hop(&report, "relay")["detail"].as_str().unwrap().contains("→ 200"), "{report:#}");
    assert!(hop(&report, "gatewayModels")["detail"].as_str().unwrap().contains("hermes-agent"));

    // The text report: one line per hop with its timing.
    let run = m.run(&["--doctor"]);
    run.expect(0, "--doctor");
    let text = run.stdout();
    for name in ["registry reachable", "request through the relay", "gateway /v1/models"] {
        let line = text.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{text}"));
        assert!(line.starts_with('✓') && line.ends_with(" ms)"), "{line}");
    }
    // A --server naming another registry is said, not silently dropped: the checks follow the
    // pairing.
    let run = m.run(&["--doctor", "--server", "http://127.0.0.1:9"]);
    run.expect(0, "--doctor with another --server");
    assert!(
        run.all().contains(&format!(
            "--server http://127.0.0.1:9 is not the registry this bridge is paired with ({})",
            relay.url()
        )),
        "{}",
        run.all()
    );

    // The doctor's diagnostic credential is nobody's device: it is never listed.
    let devices = m.run(&["--devices", "--json"]);
    devices.expect(0, "--devices --json");
    let v: Value = serde_json::from_str(devices.stdout().trim()).unwrap();
    assert_eq!(v["devices"], serde_json::json!([]), "{v}");

    // A wrong gateway key: only the authenticated check fails, naming the key.
    m.write_env(gateway, "not-the-gateway-key-0000000000");
    let report = m.doctor(1);
    assert_hop(&report, "gateway", "ok");
    assert_hop(&report, "gatewayModels", "fail");
    assert!(
        hop(&report, "gatewayModels")["detail"].as_str().unwrap().contains("401"),
        "{report:#}"
    );
    m.write_env(gateway, GATEWAY_KEY);

    // The backend down: it fails directly and through the relay, with the bridge's error.
    backend.kill();
    let report = m.doctor(1);
    assert_hop(&report, "relay", "fail");
    assert!(
        hop(&report, "relay")["detail"].as_str().unwrap().contains("BACKEND_UNREACHABLE"),
        "{report:#}"
    );
    assert_hop(&report, "backend", "fail");
    assert_hop(&report, "registry", "ok");
    assert_hop(&report, "daemon", "ok");

    // The daemon stopped: the bridge is offline, the relay request is skipped.
    m.run(&["--stop"]).expect(0, "--stop");
    let report = m.doctor(1);
    assert_hop(&report, "registry", "ok");
    assert_hop(&report, "bridge", "fail");
    assert_hop(&report, "daemon", "fail");
    assert_hop(&report, "relay", "skip");

    // The relay gone: the first hop fails with the URL to check.
    drop(relay);
    let report = m.doctor(1);
    assert_hop(&report, "registry", "fail");
    assert!(hop(&report, "registry")["fix"].as_str().unwrap().contains("/v1/health"));
}

#[test]
fn doctor_before_pairing_says_to_pair() {
    let m = Machine::new(1, GATEWAY_KEY);
    let report = m.doctor(1);
    assert_hop(&report, "registry", "fail");
    assert_hop(&report, "bridge", "fail");
    assert!(hop(&report, "bridge")["fix"].as_str().unwrap().contains("hermeschat-pair"));
    assert_hop(&report, "relay", "skip");
    // --devices needs a pairing: a configuration error.
    m.run(&["--devices"]).expect(2, "--devices before pairing");
    // So does --revoke (it said "already revoked?" and exited 1).
    let run = m.run(&["--revoke", "hcl_0123456789abcdef"]);
    run.expect(2, "--revoke before pairing");
    assert!(run.all().contains("no pairing yet"), "{}", run.all());
    // A damaged bridge.json is kept aside by --devices too, which said it "will register anew"
    // and did not: what does is named.
    std::fs::create_dir_all(&m.state).unwrap();
    std::fs::write(m.state.join("bridge.json"), "{\"v\":2,").unwrap();
    let run = m.run(&["--devices"]);
    run.expect(2, "--devices with a damaged bridge.json");
    assert!(run.all().contains("bridge.json.corrupt-"), "{}", run.all());
    assert!(
        run.all().contains("Pairing (hermeschat-pair) registers this machine anew"),
        "{}",
        run.all()
    );
    assert!(!run.all().contains("will register anew"), "{}", run.all());
}

#[test]
fn devices_lists_paired_apps_and_revoke_cuts_one_off() {
    let relay = Relay::new();
    let backend = Backend::start();
    let m = Machine::new(1, GATEWAY_KEY);
    let qr = m.pair(&relay, &backend);
    let api = Registry::new(&qr.s);
    let phone = api.verify_ok(&qr.g, &qr.a, "Jo's iPhone");
    let code = m.run(&["--refresh-code", "--json"]);
    code.expect(0, "--refresh-code");
    let qr2: RelayQr = serde_json::from_str(code.stdout().trim()).unwrap();
    let ipad = api.verify_ok(&qr.g, &qr2.a, "iPad");
    let mut app =
        AppClient::connect_url(&format!("{}?bridgeId={}", qr.u, qr.g), &phone.client_secret)
            .unwrap_or_else(|e| panic!("app connect: {e:?}"));
    app.expect_bridge_status(true);

    let run = m.run(&["--devices", "--json"]);
    run.expect(0, "--devices --json");
    let v: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{v}");
    let by_id = |id: &str| devices.iter().find(|d| d["clientId"] == id).unwrap().clone();
    assert_eq!(by_id(&phone.client_id)["deviceName"], "Jo's iPhone");
    assert_eq!(by_id(&phone.client_id)["online"], true, "{v}");
    assert_eq!(by_id(&ipad.client_id)["online"], false, "{v}");
    assert!(by_id(&ipad.client_id)["pairedAt"].as_u64().is_some());

    let run = m.run(&["--devices"]);
    run.expect(0, "--devices");
    let text = run.stdout();
    assert!(text.contains("2 paired apps (1 online)"), "{text}");
    let row =
        text.lines().find(|l| l.starts_with(&phone.client_id)).unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("Jo's iPhone") && row.ends_with("online"), "{row}");

    // Revoke the connected phone: its socket is closed (4003) at once, its secret is dead.
    let run = m.run(&["--revoke", &phone.client_id]);
    run.expect(0, "--revoke");
    assert!(run.stdout().contains("Jo's iPhone"), "{}", run.all());
    assert_eq!(app.wait_close(), Some(4003), "the revoked app's socket must be closed 4003");
    assert!(
        AppClient::connect_url(&format!("{}?bridgeId={}", qr.u, qr.g), &phone.client_secret)
            .is_err()
    );
    let v: Value = serde_json::from_str(m.run(&["--devices", "--json"]).stdout().trim()).unwrap();
    assert_eq!(v["devices"].as_array().unwrap().len(), 1, "{v}");

    // Again: not paired any more (exit 1); garbage: a usage error (exit 2).
    m.run(&["--revoke", &phone.client_id]).expect(1, "--revoke twice");
    m.run(&["--revoke", "hcl_nothex"]).expect(2, "--revoke garbage");
}

/// A relay secret the registry refuses (401: a proxy that drops the Authorization header, a
/// bridge.json edited by hand) was reported by `--doctor` and `--devices` as a bridge the
/// registry "does not know", with "run hermeschat-pair to register anew" as the fix, which
/// pairing then refused. Both now name the refused secret and the way out pairing names.
#[test]
fn a_refused_relay_secret_is_not_taken_for_a_forgotten_bridge() {
    let relay = Relay::new();
    let backend = Backend::start();
    let m = Machine::new(1, GATEWAY_KEY);
    let qr = m.pair(&relay, &backend);
    m.run(&["--stop"]).expect(0, "--stop");
    let path = m.state.join("bridge.json");
    let mut id: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    id["relaySecret"] = Value::from(format!("hrs_{}", "0".repeat(64)));
    std::fs::write(&path, id.to_string()).unwrap();
    let report = m.doctor(1);
    assert_hop(&report, "bridge", "fail");
    let bridge = hop(&report, "bridge");
    let (detail, fix) = (bridge["detail"].as_str().unwrap(), bridge["fix"].as_str().unwrap());
    assert!(detail.contains("401") && !detail.contains("does not know"), "{bridge}");
    assert!(fix.contains(&format!("knows bridge {}", qr.g)) && fix.contains("--reset"), "{bridge}");
    let run = m.run(&["--devices"]);
    run.expect(1, "--devices with a refused secret");
    assert!(run.all().contains("did not accept its secret"), "{}", run.all());
    assert!(!run.all().contains("no longer knows"), "{}", run.all());
    // Pairing gives the same way out, and keeps the identity.
    let run = m.run(&["--json", "--server", &relay.url(), "--port", &backend.port.to_string()]);
    run.expect(1, "pairing with a refused secret");
    assert!(run.all().contains("did not accept its secret"), "{}", run.all());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), id.to_string(), "bridge.json changed");
}

#[test]
fn logs_tail_and_follow_through_rotation() {
    let m = Machine::new(1, GATEWAY_KEY);
    std::fs::create_dir_all(&m.state).unwrap();
    let log = m.state.join("bridge.log");
    let lines: String = (1..=50).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&log, lines).unwrap();
    std::fs::write(m.state.join("server.log"), "server up\n").unwrap();

    let run = m.run(&["--logs", "--lines", "2"]);
    run.expect(0, "--logs");
    let text = run.stdout();
    assert!(
        text.contains(&format!("==> {} (daemon) <==\nline 49\nline 50\n", log.display())),
        "{text}"
    );
    assert!(!text.contains("line 48"), "{text}");
    assert!(text.contains("server up"), "{text}");
    assert!(text.contains("gateway.log (gateway): not written yet"), "{text}");

    // --follow: new lines, then a rotation (rename + new file), then Ctrl-C.
    let child = m.cmd(&["--logs", "--follow", "--lines", "1"]).stdout(Stdio::piped()).spawn();
    let mut child = Reaped(child.unwrap());
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l == want => return,
                Ok(l) => seen.push(l),
                Err(_) => panic!("--follow never printed {want:?}; saw {seen:?}"),
            }
        }
    };
    wait_for("line 50");
    let append = |text: &str| {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&log).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    append("fresh 1\n");
    wait_for("fresh 1");
    append("before rotation\n");
    std::fs::rename(&log, m.state.join("bridge.log.1")).unwrap();
    append("after rotation\n");
    wait_for("before rotation");
    wait_for("after rotation");
    // SAFETY: signals the child this test started.
    unsafe {
        libc::kill(child.0.id() as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "--logs --follow did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "Ctrl-C ends --follow cleanly: {status}");
}

/// The gatewayModels hop names where the key really comes from: the environment, `.env`, or
/// `platforms.api_server.extra.key` in `config.yaml` (a key there was reported as `.env`'s).
#[test]
fn doctor_names_the_real_source_of_the_gateway_key() {
    let gateway = fake_gateway();
    let m = Machine::new(gateway, GATEWAY_KEY);
    let models = |report: &Value| hop(report, "gatewayModels").clone();
    let yaml = m.hermes.join("config.yaml");
    let key_in_yaml = |key: &str| {
        std::fs::write(
            &yaml,
            format!("platforms:\n  api_server:\n    enabled: true\n    extra:\n      key: {key}\n"),
        )
        .unwrap();
    };

    // In config.yaml only (no pairing yet: the doctor exits 1, the gateway hops still run).
    std::fs::write(m.hermes.join(".env"), format!("API_SERVER_PORT={gateway}\n")).unwrap();
    key_in_yaml(GATEWAY_KEY);
    let h = models(&m.doctor(1));
    assert_eq!(h["state"], "ok", "{h}");
    let want = format!("platforms.api_server.extra.key in {}", yaml.display());
    assert!(h["detail"].as_str().unwrap().contains(&want), "{h}");
    assert!(!h["detail"].as_str().unwrap().contains(".env"), "{h}");

    // A wrong key there: the failure and its fix name config.yaml.
    key_in_yaml("not-the-gateway-key-0000000000");
    let h = models(&m.doctor(1));
    assert_eq!(h["state"], "fail", "{h}");
    assert!(h["detail"].as_str().unwrap().contains(&want), "{h}");
    assert!(h["fix"].as_str().unwrap().contains(&want), "{h}");

    // .env wins over config.yaml, as in the gateway.
    m.write_env(gateway, GATEWAY_KEY);
    let h = models(&m.doctor(1));
    let env_file = format!("API_SERVER_KEY in {}", m.hermes.join(".env").display());
    assert!(h["detail"].as_str().unwrap().contains(&env_file), "{h}");

    // The environment wins over both.
    let run =
        Run(m.cmd(&["--doctor", "--json"]).env("API_SERVER_KEY", GATEWAY_KEY).output().unwrap());
    let v: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    let h = models(&v);
    assert!(h["detail"].as_str().unwrap().contains("API_SERVER_KEY in the environment"), "{h}");

    // No key anywhere: every place it is looked for is named.
    std::fs::write(m.hermes.join(".env"), format!("API_SERVER_PORT={gateway}\n")).unwrap();
    std::fs::remove_file(&yaml).unwrap();
    let h = models(&m.doctor(1));
    assert_eq!(h["state"], "fail", "{h}");
    let detail = h["detail"].as_str().unwrap();
    assert!(detail.contains(".env") && detail.contains("config.yaml"), "{h}");
}

/// With the gateway down, the fix names only commands that exist on this machine (the same
/// list pairing prints): `hermes gateway run` with `hermes` on PATH, never a venv python that
/// is not there, and what is missing when nothing could start it.
#[test]
fn doctor_suggests_only_start_commands_that_exist() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let m = Machine::new(closed, GATEWAY_KEY);
    let bin = m.root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let doctor_with_path = || {
        let out = m.cmd(&["--doctor", "--json"]).env("PATH", &bin).output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let h = hop(&v, "gateway").clone();
        assert_eq!(h["state"], "fail", "{h}");
        h["fix"].as_str().unwrap().to_owned()
    };

    // Nothing on PATH, no venv: no command, the missing pieces named.
    let fix = doctor_with_path();
    assert!(fix.contains("nothing here can start it (no `hermes` on PATH"), "{fix}");
    assert!(!fix.contains("hermes gateway start"), "{fix}");

    // `hermes` on PATH (no service manager there): the foreground command.
    let hermes = bin.join("hermes");
    std::fs::write(&hermes, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&hermes, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fix = doctor_with_path();
    assert!(fix.contains("hermes gateway run  # in the foreground"), "{fix}");
    assert!(!fix.contains("hermes gateway start"), "no service manager on PATH: {fix}");
    assert!(!fix.contains("venv"), "{fix}");
}
