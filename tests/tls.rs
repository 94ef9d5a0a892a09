//! The relay's own TLS listener (`--tls-cert/--tls-key`) and the bridge's native-tls path:
//! registry over https and the bridge socket over wss, with a self-signed certificate that the
//! `hermeschat-pair` process trusts through `SSL_CERT_FILE`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{fresh_dir, make_cert, rss_growth_settles, rss_kib};

struct Relay {
    child: Child,
    addr: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_relay(dir: &Path, cert: &Path, key: &Path) -> Relay {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hermeschat-relay"))
        .args(["--listen", "127.0.0.1:0", "--rate-register", "1000", "--rate-verify", "1000"])
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["event"] == "listening"
            {
                let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).expect("the TLS relay did not start");
    Relay { child, addr }
}

/// Runs `hermeschat-pair` with its state in `home`, trusting the test certificate.
fn pair_run(home: &Path, cert: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hermeschat-pair"))
        .args(args)
        .env("HERMESCHAT_HOME", home)
        .env("SSL_CERT_FILE", cert)
        .env_remove("HERMESCHAT_REGISTRY_URL")
        .env_remove("INVOCATION_ID")
        .env_remove("HERMESCHAT_LOCAL_PORT")
        .current_dir(home.parent().unwrap_or(home))
        .output()
        .unwrap()
}

/// A TLS relay with a fresh certificate and a daemon paired with it (`out`: what
/// `hermeschat-pair --json` printed).
struct Paired {
    dir: PathBuf,
    cert: PathBuf,
    relay: Relay,
    url: String,
    home: PathBuf,
    out: std::process::Output,
}

fn pair_over_tls(tag: &str) -> Paired {
    let dir = fresh_dir(tag);
    let (cert, key) = make_cert(&dir);
    let relay = start_tls_relay(&dir, &cert, &key);
    let url = format!("https://{}", relay.addr);
    let home = dir.join("home");
    let port = counting_backend().to_string();
    let out = pair_run(&home, &cert, &["--server", &url, "--port", &port, "--json"]);
    Paired { dir, cert, relay, url, home, out }
}

#[test]
fn relay_serves_https_and_wss_and_the_bridge_pairs_over_tls() {
    let Paired { dir, cert, relay, url, home, out } = pair_over_tls("pair");
    let run = |args: &[&str]| pair_run(&home, &cert, args);
    let stopped = run(&["--stop"]);
    assert!(
        out.status.success(),
        "pairing over TLS failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(home.join("bridge.log")).unwrap_or_default()
    );
    assert!(stopped.status.success());
    let payload: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(payload["s"], url.as_str());
    assert_eq!(payload["u"], format!("wss://{}/ws/app", relay.addr).as_str());
    // The daemon really connected over wss (the registry said online before --json printed).
    let log = std::fs::read_to_string(home.join("bridge.log")).unwrap();
    assert!(log.contains(&format!("relay connected: wss://{}/ws/bridge", relay.addr)), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_untrusted_certificate_is_refused_with_a_clear_error() {
    let dir = fresh_dir("untrusted");
    let (cert, key) = make_cert(&dir);
    let relay = start_tls_relay(&dir, &cert, &key);
    let backend = counting_backend();
    let out = Command::new(env!("CARGO_BIN_EXE_hermeschat-pair"))
        .args(["--server", &format!("https://{}", relay.addr), "--port", &backend.to_string()])
        .env("HERMESCHAT_HOME", dir.join("home"))
        .env_remove("SSL_CERT_FILE")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the registry"), "{err}");
    // The next step for a relay whose CA is private (Caddy's `tls internal`, a test CA).
    assert!(
        err.contains("this machine does not trust the relay's certificate")
            && err.contains("SSL_CERT_FILE"),
        "{err}"
    );
    // The relay runs: the user is not sent to check it.
    assert!(!err.contains("that your relay is running"), "{err}");
    assert!(!dir.join("hermeschat_pair.png").exists(), "no QR may be written on failure");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--doctor` against a relay whose certificate this machine does not trust: the fix is on
/// this machine (the detail says which step), not "check that your relay runs".
#[test]
fn doctor_puts_an_untrusted_certificate_on_this_machines_side() {
    let dir = fresh_dir("doctor-untrusted");
    let (cert, key) = make_cert(&dir);
    let relay = start_tls_relay(&dir, &cert, &key);
    let out = Command::new(env!("CARGO_BIN_EXE_hermeschat-pair"))
        .args(["--doctor", "--json", "--server", &format!("https://{}", relay.addr)])
        .args(["--port", &counting_backend().to_string()])
        .env("HERMESCHAT_HOME", dir.join("home"))
        .env("HERMESCHAT_GATEWAY_URL", "http://127.0.0.1:9")
        .env_remove("SSL_CERT_FILE")
        .env_remove("HERMESCHAT_REGISTRY_URL")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hop = &report["hops"][0];
    assert_eq!(hop["state"], "fail", "{hop}");
    let (detail, fix) = (hop["detail"].as_str().unwrap(), hop["fix"].as_str().unwrap());
    assert!(detail.contains("this machine does not trust the relay's certificate"), "{detail}");
    assert!(fix.contains("on this machine, not the relay"), "{fix}");
    assert!(!fix.contains("that your relay runs"), "{fix}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `SSL_CERT_FILE` naming a file that is not there (a typo, a path from another machine) is
/// ignored by OpenSSL without a word; the error names the variable and the path.
#[test]
fn a_cert_file_variable_naming_nothing_is_named_in_the_error() {
    let dir = fresh_dir("nocafile");
    let (cert, key) = make_cert(&dir);
    let relay = start_tls_relay(&dir, &cert, &key);
    let home = dir.join("home");
    let missing = dir.join("no-such-ca.pem");
    let port = counting_backend().to_string();
    let out = pair_run(
        &home,
        &missing,
        &["--server", &format!("https://{}", relay.addr), "--port", &port],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let named = format!("SSL_CERT_FILE names {}, which does not exist here", missing.display());
    assert!(err.contains(&named), "{err}");
    assert!(!home.join("bridge.json").exists(), "nothing may be registered");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key in SEC1 form (`BEGIN EC PRIVATE KEY`, what `openssl ecparam -genkey` and `openssl ec`
/// write) is refused at start (exit 1) with the command that converts it; that command, run
/// as given, yields a key the relay serves with.
#[test]
fn a_sec1_key_is_refused_with_the_command_that_converts_it() {
    let dir = fresh_dir("sec1");
    let (cert, _) = make_cert(&dir);
    let status = Command::new("openssl")
        .args(["ec", "-in", "key.pem", "-out", "sec1.pem"])
        .current_dir(&dir)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl ec failed");
    let out = Command::new(env!("CARGO_BIN_EXE_hermeschat-relay"))
        .args(["--listen", "127.0.0.1:0", "--tls-key", "sec1.pem"])
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--tls-cert")
        .arg(&cert)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SEC1"), "{err}");
    let convert = "openssl pkcs8 -topk8 -nocrypt -in sec1.pem -out key.pk8.pem";
    assert!(err.contains(convert), "{err}");
    let status = Command::new("sh").args(["-c", convert]).current_dir(&dir).status().unwrap();
    assert!(status.success(), "{convert} failed");
    drop(start_tls_relay(&dir, &cert, &dir.join("key.pk8.pem")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the relay with `cert` and `key`, which must keep it from starting: its exit code and
/// stderr ([`common::run_to_exit`]).
fn refused_tls_relay(dir: &Path, cert: &Path, key: &Path) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hermeschat-relay"));
    cmd.args(["--listen", "127.0.0.1:0", "--data"]).arg(dir.join("data"));
    cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    common::run_to_exit(&mut cmd)
}

/// A key from another certificate used to start a relay whose every TLS handshake then
/// failed, with nothing in its log; swapped files got a message naming neither.
#[test]
fn a_key_of_another_certificate_or_swapped_files_keep_the_relay_from_starting() {
    let dir = fresh_dir("tls-mismatch");
    let (cert, key) = make_cert(&dir);
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (_, other_key) = make_cert(&other);
    let (code, err) = refused_tls_relay(&dir, &cert, &other_key);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the key does not belong to the certificate"), "{err}");
    assert!(err.contains(&other_key.display().to_string()), "{err}");
    assert!(!err.contains("\"listening\""), "{err}");
    let (code, err) = refused_tls_relay(&dir, &key, &cert);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("holds no PEM certificate"), "{err}");
    assert!(err.contains("were --tls-cert and --tls-key swapped?"), "{err}");
    let (code, err) = refused_tls_relay(&dir, &cert, &dir.join("missing.pem"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--tls-key ") && err.contains("missing.pem: cannot read it"), "{err}");
    // The matching pair still serves.
    drop(start_tls_relay(&dir, &cert, &key));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_http_to_the_tls_port_does_not_break_the_relay() {
    let dir = fresh_dir("plain");
    let (cert, key) = make_cert(&dir);
    let relay = start_tls_relay(&dir, &cert, &key);
    // A plaintext request on the TLS port fails its handshake and is dropped...
    let mut s = std::net::TcpStream::connect(&relay.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("\"ok\":true"));
    // ...and a TLS client is still served.
    let certs = vec![ureq::tls::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap()];
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::NativeTls)
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
        .build();
    let agent = ureq::Agent::config_builder().tls_config(tls).build().new_agent();
    let body = agent
        .get(&format!("https://{}/v1/health", relay.addr))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(body.contains("\"ok\":true"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_answer_that_closes_the_connection_ends_with_close_notify() {
    // A TLS peer that closes with a bare FIN cannot be told from a cut connection: OpenSSL 3
    // reports "unexpected eof while reading" (rust-openssl hides it, so `openssl s_client`).
    let dir = fresh_dir("notify");
    let (cert, key) = make_cert(&dir);
    let relay = start_tls_relay(&dir, &cert, &key);
    let mut client = Command::new("openssl")
        .args(["s_client", "-quiet", "-ign_eof", "-connect", &relay.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl must be installed for the TLS tests");
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    drop(stdin);
    let out = client.wait_with_output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"ok\":true"), "{stdout}\n{stderr}");
    assert!(!stderr.contains("unexpected eof"), "the relay closed without close_notify: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend that answers `GET /api/blob/N` with N bytes of [`blob`], and every other request
/// with 200 and, as JSON, the size of its body and the wrapping sum of its bytes.
fn counting_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut s = stream;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 << 10];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + 4 + len).skip(end + 4).collect();
                    if let Some(n) = head
                        .strip_prefix("get /api/blob/")
                        .and_then(|r| r.split(' ').next())
                        .and_then(|n| n.parse().ok())
                    {
                        let data = blob(n);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
                        );
                        if s.write_all(reply.as_bytes()).and_then(|()| s.write_all(&data)).is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    let sum =
                        body.iter().fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
                    let json = format!(r#"{{"size":{},"sum":{sum}}}"#, body.len());
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
                        json.len()
                    );
                    if s.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// `n` bytes that are not UTF-8 (so the bridge sends them as base64 chunks).
fn blob(n: usize) -> Vec<u8> {
    (0..n).map(|j| (j * 13 % 251) as u8 | 0x80).collect()
}

/// App traffic over TLS at both ends of the relay, with frames large enough (64 KiB and more)
/// to leave tungstenite's write buffer aside: requests the relay writes to the bridge from
/// pieces of the received message, and download chunks the bridge masks in place.
#[test]
fn large_requests_cross_a_tls_relay_intact() {
    use base64::Engine as _;
    let Paired { dir, cert, relay, url, home, out } = pair_over_tls("large");
    let run = |args: &[&str]| pair_run(&home, &cert, args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let qr: hermeschat_pair::protocol::RelayQr = serde_json::from_slice(&out.stdout).unwrap();

    // The app trusts the test certificate, like the phone trusts a real one.
    let pem = std::fs::read(&cert).unwrap();
    let tls = native_tls::TlsConnector::builder()
        .add_root_certificate(native_tls::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::NativeTls)
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[
                    ureq::tls::Certificate::from_pem(&pem).unwrap(),
                ]))
                .build(),
        )
        .build()
        .into();
    let verified: serde_json::Value = agent
        .post(&format!("{url}/v1/pair/verify"))
        .send_json(serde_json::json!({"bridgeId": qr.g, "accessCode": qr.a}))
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let secret = verified["clientSecret"].as_str().unwrap();
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "{}?bridgeId={}",
        qr.u, qr.g
    ))
    .unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {secret}").parse().unwrap());
    let tcp = std::net::TcpStream::connect(&relay.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (mut app, _) = tungstenite::client_tls_with_config(
        req,
        tcp,
        None,
        Some(tungstenite::Connector::NativeTls(tls)),
    )
    .unwrap();

    let pid: u32 =
        std::fs::read_to_string(home.join("bridge.pid")).unwrap().trim().parse().unwrap();
    let before = rss_kib(pid);
    for (i, len) in [100usize << 10, 3 << 20].into_iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
        let id = format!("big-{i}");
        let frame = serde_json::json!({"type": "request", "id": id, "method": "POST",
            "path": "/api/count", "headers": {"content-type": "application/octet-stream"},
            "body": base64::engine::general_purpose::STANDARD.encode(&data), "bodyBase64": true});
        app.send(tungstenite::Message::text(frame.to_string())).unwrap();
        let answer = loop {
            let msg = app.read().expect("the app socket over TLS must stay whole");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(msg.to_text().unwrap_or(""))
            else {
                continue;
            };
            if v["id"] == id.as_str() {
                break v;
            }
        };
        assert_eq!(answer["type"], "response", "{answer}");
        let sum = data.iter().fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
        let body: serde_json::Value =
            serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert_eq!(body, serde_json::json!({"size": len, "sum": sum}));
    }

    // Over TLS too, the daemon does not keep the 3 MiB request's memory; the download below
    // crosses the same socket.
    let grown = rss_growth_settles(pid, before, 3 << 10);
    assert!(grown < 3 << 10, "the daemon kept its 4 MiB read buffer: {grown} KiB more");

    let len = (3 << 20) + 7;
    let frame = serde_json::json!({"type": "request", "id": "down", "method": "GET",
        "path": format!("/api/blob/{len}"), "headers": {}});
    app.send(tungstenite::Message::text(frame.to_string())).unwrap();
    let mut got = Vec::new();
    let mut largest = 0;
    loop {
        let msg = app.read().expect("the app socket over TLS must stay whole");
        let text = msg.to_text().unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["id"], "down", "{v}");
        match v["type"].as_str() {
            Some("response.start") => assert_eq!(v["status"], 200, "{v}"),
            Some("response.chunk") => {
                assert_eq!(v["bodyBase64"], true, "{v}");
                largest = largest.max(text.len());
                let chunk = v["body"].as_str().unwrap();
                got.extend(base64::engine::general_purpose::STANDARD.decode(chunk).unwrap());
            }
            Some("response.end") => break,
            _ => panic!("unexpected frame {v}"),
        }
    }
    assert!(got == blob(len), "the download changed on the way ({} bytes)", got.len());
    assert!(largest >= 64 << 10, "no chunk frame took the masked path: largest {largest} bytes");

    // An app that closes its socket: after the close handshake the relay ends the TLS stream
    // with close_notify, which Python's ssl (unlike rust-openssl) tells from a bare FIN.
    let closed = Command::new("python3")
        .arg("-c")
        .arg(CLOSE_AND_READ_TO_END)
        .arg(&relay.addr)
        .arg(format!("/ws/app?bridgeId={}", qr.g))
        .arg(&cert)
        .env("APP_SECRET", secret)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&closed.stdout);
    assert!(said.trim() == "clean", "{said}{}", String::from_utf8_lossy(&closed.stderr));
    assert!(run(&["--stop"]).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An app socket over TLS (argv: host:port, path, CA file; `APP_SECRET` in the environment)
/// that sends a close frame and reads to the end: prints `clean` when the stream ended with
/// close_notify, `ragged` when with a bare FIN.
const CLOSE_AND_READ_TO_END: &str = r#"
import base64, os, socket, ssl, sys
addr, path, ca = sys.argv[1:4]
host, port = addr.rsplit(":", 1)
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10),
                    server_hostname=host, suppress_ragged_eofs=False)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
           f"Authorization: Bearer {os.environ['APP_SECRET']}\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
assert head.startswith(b"HTTP/1.1 101"), head
mask = os.urandom(4)
payload = (1000).to_bytes(2, "big")
s.sendall(bytes([0x88, 0x80 | len(payload)]) + mask
          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
try:
    while s.recv(65536):
        pass
    print("clean")
except ssl.SSLEOFError as e:
    print("ragged", e)
"#;
