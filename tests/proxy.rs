//! An outbound HTTP proxy (`http_proxy` / `https_proxy` / `all_proxy`, `no_proxy`): a machine
//! that reaches its relay only through one.
//!
//! Expectation: the bridge's relay socket goes through a `CONNECT` tunnel of the proxy the
//! environment names, with the credentials of the proxy URL as `Proxy-Authorization`, which
//! never appear in a log; loopback (the registry here, the backend) is never proxied. The relay
//! announces its sockets under a name only the proxy can resolve (`relay.invalid`), as a relay
//! reachable only through a corporate proxy is.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::session::*;
use common::{AppClient, Registry, Relay};

/// A CONNECT proxy on loopback that sends every tunnel to `127.0.0.1:<the requested port>`
/// and records the request heads it got; anything but CONNECT gets 502.
struct TestProxy {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl TestProxy {
    fn start() -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let seen = seen.clone();
                thread::spawn(move || serve(client, &seen));
            }
        });
        TestProxy { port, heads }
    }
}

fn serve(mut client: TcpStream, seen: &Mutex<Vec<String>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    seen.lock().unwrap().push(head.clone());
    let target = head.strip_prefix("CONNECT ").and_then(|r| r.split(' ').next());
    let Some(port) = target.and_then(|t| t.rsplit(':').next()?.parse::<u16>().ok()) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let (mut u, mut c) = (upstream, client);
    let _ = std::io::copy(&mut u, &mut c);
    let _ = c.shutdown(Shutdown::Write);
}

#[test]
fn the_relay_socket_goes_through_the_proxy_and_loopback_never_does() {
    let port = listen_port();
    let public = format!("http://relay.invalid:{port}");
    let relay = Relay::start_on(&format!("127.0.0.1:{port}"), &["--public-url", &public]);
    let backend = Backend::start();
    let proxy = TestProxy::start();
    let env = Env::new();
    let proxy_url = format!("http://hc-user:pr0xy-s3cret@127.0.0.1:{}", proxy.port);

    let server = relay.url();
    let backend_port = backend.port.to_string();
    let run = env.run_env(
        &["--json", "--server", &server, "--port", &backend_port],
        &[("http_proxy", &proxy_url), ("https_proxy", &proxy_url), ("no_proxy", "")],
    );
    run.assert_code(0, "pairing through the proxy");
    let qr: hermeschat_pair::protocol::RelayQr = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(qr.u, format!("ws://relay.invalid:{port}/ws/app"));

    // Only the relay socket went through the proxy: one CONNECT, with the credentials.
    let heads = proxy.heads.lock().unwrap().clone();
    assert!(!heads.is_empty(), "the bridge never used the proxy");
    for head in &heads {
        assert!(
            head.starts_with(&format!("CONNECT relay.invalid:{port} HTTP/1.1\r\n")),
            "only the relay may go through the proxy (the registry and the backend are on \
             loopback): {head}"
        );
        // base64("hc-user:pr0xy-s3cret")
        assert!(head.contains("Proxy-Authorization: Basic aGMtdXNlcjpwcjB4eS1zM2NyZXQ=\r\n"));
    }

    // A request along the whole path, the app on the relay's own address.
    let v = Registry::new(&server).verify_ok(&qr.g, &qr.a, "Proxy Phone");
    let mut app = AppClient::connect(&relay, &qr.g, &v.client_secret).unwrap();
    app.expect_bridge_status(true);
    let r = fetch(&mut app, &request("p1", "GET", "/api/health", &[], None));
    assert_eq!(r.status, 200);

    // The proxy's password is in no log and no message.
    let logs = format!("{}\n{}\n{}", env.log(), run.stdout, run.stderr);
    assert!(!logs.contains("pr0xy-s3cret"), "the proxy password leaked:\n{logs}");
    drop(app);
    thread::sleep(Duration::from_millis(50));
}

/// A proxy variable that cannot be used is this machine's setting to fix: pairing said to check
/// that the relay runs (curl …/v1/health), which it may well do.
#[test]
fn an_unusable_proxy_is_not_blamed_on_the_relay() {
    let env = Env::new();
    for value in ["socks5://127.0.0.1:9", "http://proxy:notaport"] {
        let run = env.run_env(
            &["--json", "--server", "http://relay.invalid:9", "--port", "9"],
            &[("ALL_PROXY", value)],
        );
        run.assert_code(1, value);
        let all = run.all();
        assert!(all.contains("ALL_PROXY"), "{all}");
        assert!(!all.contains("relay is running"), "{value}: {all}");
    }
}

#[test]
fn an_unusable_proxy_is_named_not_bypassed() {
    let port = listen_port();
    let public = format!("http://relay.invalid:{port}");
    let relay = Relay::start_on(&format!("127.0.0.1:{port}"), &["--public-url", &public]);
    let backend = Backend::start();
    let env = Env::new();
    let server = relay.url();
    let backend_port = backend.port.to_string();
    let run = env.run_env(
        &["--json", "--server", &server, "--port", &backend_port],
        &[("ALL_PROXY", "socks5://hc-user:pr0xy-s3cret@127.0.0.1:9")],
    );
    assert_ne!(run.code, Some(0), "the bridge cannot come online");
    let all = format!("{}\n{}", run.all(), env.log());
    assert!(all.contains("socks5://") && all.contains("ALL_PROXY"), "{all}");
    assert!(!all.contains("pr0xy-s3cret"), "the proxy password leaked:\n{all}");
}
