//! A scripted attack pass against the real relay while a legitimate app ↔ bridge pair keeps
//! talking: wrong-role tokens, another bridge's id, access-code guessing, oversized and
//! malformed frames, slowloris handshakes and 10,000 unauthenticated upgrade attempts. The
//! legitimate pair must keep getting answers throughout, and the lockout must hold.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{AppClient, Relay, pair, req, ws_connect};
use hermeschat_pair::protocol::Frame;

/// Counts round trips of the legitimate pair in a thread until `stop`; each must succeed.
fn keep_talking(
    mut app: AppClient,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> thread::JoinHandle<AppClient> {
    thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let id = format!("legit-{n}");
            let f = app.request(&req(&id, "POST", "/api/echo", Some("still here")));
            assert!(matches!(f, Frame::Response(_)), "the legitimate pair failed: {f:?}");
            ok.fetch_add(1, Ordering::SeqCst);
        }
        app
    })
}

#[test]
fn the_relay_keeps_serving_a_legitimate_pair_under_attack() {
    // Tight limits, as a public relay would run; the legitimate pair registers first.
    let relay = Relay::start(&["--rate-verify", "30", "--handshake-timeout-secs", "2"]);
    let p = pair(&relay);
    let victim = relay.registry().register_ok("victim");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let talker = keep_talking(p.app, stop.clone(), ok.clone());
    let app_url = |bridge: &str| format!("ws://{}/ws/app?bridgeId={bridge}", relay.addr);
    let bridge_url = |bridge: &str| format!("ws://{}/ws/bridge?bridgeId={bridge}", relay.addr);

    // 1. Wrong-role tokens and someone else's bridge: refused before the upgrade.
    let client_secret = format!("Bearer {}", p.client.client_secret);
    let relay_secret = format!("Bearer {}", p.reg.relay_secret);
    let attempts: [(String, &str, &str); 3] = [
        (bridge_url(&p.reg.bridge_id), &client_secret, "inst-x"),
        (app_url(&p.reg.bridge_id), &relay_secret, ""),
        (app_url(&victim.bridge_id), &client_secret, ""),
    ];
    for (url, auth, instance) in &attempts {
        let mut headers = vec![("Authorization", *auth)];
        if !instance.is_empty() {
            headers.push(("X-Hermes-Instance", instance));
        }
        let refused = ws_connect(url, &headers).err().and_then(|e| e.status());
        assert!(matches!(refused, Some(401 | 404)), "{url}: {refused:?}");
    }

    // 2. Access-code guessing on the victim: the lockout holds even for the right code.
    let api = relay.registry();
    let code = api.access_code_ok(&victim.bridge_id, &victim.relay_secret);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let guess = format!("{i:032x}");
        statuses.push(api.verify(&victim.bridge_id, &guess, None).0);
    }
    assert_eq!(&statuses[..4], &[401, 401, 401, 401], "{statuses:?}");
    assert!(statuses[4..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(api.verify(&victim.bridge_id, &code.access_code, None).0, 429);

    // 3. Oversized and malformed frames from an attacker's own (legitimately paired) app.
    let attacker = common::pair_another(&relay, &p.reg, "attacker");
    let mut evil = AppClient::connect_ok(&relay, &p.reg.bridge_id, &attacker.client_secret, true);
    for junk in ["{", "[]", r#"{"type":"nope"}"#, r#"{"type":"request"}"#, "\u{0}"] {
        evil.send_text(junk);
    }
    evil.send_text(&format!(r#"{{"type":"request","id":"{}"}}"#, "x".repeat(100)));

    // 4. Slowloris: 200 connections that send half a head and stall.
    let mut slow = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(&relay.addr) {
            let _ = s.write_all(b"GET /ws/app?bridgeId=");
            slow.push(s);
        }
    }

    // 5. 10,000 unauthenticated upgrade attempts, from 4 threads.
    let started = Instant::now();
    let refused = Arc::new(AtomicU64::new(0));
    let floods: Vec<_> = (0..4)
        .map(|t| {
            let (addr, refused) = (relay.addr.clone(), refused.clone());
            let bridge = p.reg.bridge_id.clone();
            thread::spawn(move || {
                for i in 0..2_500 {
                    let url = format!("ws://{addr}/ws/app?bridgeId={bridge}");
                    let token = format!("Bearer hcs_{:064x}", t * 10_000 + i);
                    if ws_connect(&url, &[("Authorization", &token)]).is_err() {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for f in floods {
        f.join().unwrap();
    }
    let flood_time = started.elapsed();
    assert_eq!(refused.load(Ordering::SeqCst), 10_000, "an unauthenticated upgrade got through");

    // The slowloris sockets time out without hurting anyone.
    thread::sleep(Duration::from_secs(3));
    drop(slow);
    stop.store(true, Ordering::SeqCst);
    let mut app = talker.join().expect("the legitimate pair failed during the attack");
    let f = app.request(&req("after", "POST", "/api/echo", Some("done")));
    assert!(matches!(f, Frame::Response(_)), "{f:?}");
    eprintln!(
        "attack pass: 10,000 refused upgrades in {flood_time:?}; the legitimate pair made {} \
         round trips meanwhile",
        ok.load(Ordering::SeqCst)
    );
    assert!(ok.load(Ordering::SeqCst) > 0);
}
