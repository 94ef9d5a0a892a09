//! The static `hermeschat-pair` in a root that holds nothing but itself (a container `FROM
//! scratch`, a bare chroot): no CA store, no `/etc/resolv.conf` or `/etc/hosts`, no `/proc`,
//! no `/dev`. Each missing piece either does not matter or is named with the next step.
//!
//! The chroot tests need root and the static build: `HERMESCHAT_TEST_BIN_DIR=<dir of the musl
//! release binaries>`, as `.ci/run` sets it; the one of an account without a home needs root
//! and `setpriv`. Without them a test is skipped with the reason printed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Relay, fresh_dir};

/// A throwaway root with only the static `hermeschat-pair` in it (at `/hermeschat-pair`), or
/// `None` (and why printed) when this machine cannot make one.
fn bare_root(tag: &str) -> Option<PathBuf> {
    let Some(bins) = std::env::var_os("HERMESCHAT_TEST_BIN_DIR") else {
        eprintln!(
            "SKIPPED: needs the static build (HERMESCHAT_TEST_BIN_DIR=<dir of the musl release \
             binaries>, as .ci/run sets it)"
        );
        return None;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: chroot needs root");
        return None;
    }
    if chroot_program().is_none() {
        eprintln!("SKIPPED: no chroot program (coreutils) here");
        return None;
    }
    let root = fresh_dir(tag).join("root");
    std::fs::create_dir_all(root.join("st")).unwrap();
    std::fs::copy(Path::new(&bins).join("hermeschat-pair"), root.join("hermeschat-pair"))
        .expect("HERMESCHAT_TEST_BIN_DIR has no hermeschat-pair");
    // A dynamically linked build cannot start in a root without its C library.
    let started = in_root(&root, &[], &["--version"]);
    if !started.status.success() {
        eprintln!(
            "SKIPPED: the binary does not run in a bare chroot (not the static build, or no \
             chroot here): {}",
            String::from_utf8_lossy(&started.stderr).trim()
        );
        return None;
    }
    Some(root)
}

/// The `chroot` program of coreutils, where this system has it.
fn chroot_program() -> Option<&'static str> {
    ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot", "/bin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
}

/// `hermeschat-pair args` run inside `root` with an empty environment besides `env` and the
/// state in `/st`, the gateway pointed at a port nothing serves.
fn in_root(root: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let chroot = chroot_program().expect("bare_root checked for chroot");
    Command::new(chroot)
        .arg(root)
        .arg("/hermeschat-pair")
        .args(args)
        .env_clear()
        .env("HERMESCHAT_HOME", "/st")
        .env("HERMESCHAT_GATEWAY_URL", "http://127.0.0.1:9")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {chroot}: {e}"))
}

/// The `registry` hop of `--doctor --json --server url` run in `root`: (state, detail).
fn registry_hop(root: &Path, env: &[(&str, &str)], url: &str) -> (String, String) {
    let out = in_root(root, env, &["--doctor", "--json", "--server", url, "--port", "9"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("--doctor --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr))
    });
    let hop = &report["hops"][0];
    let text = |k: &str| hop[k].as_str().unwrap_or_default().to_owned();
    (text("state"), text("detail"))
}

/// A relay serving TLS with a certificate from a private CA; the CA's PEM, and the relay.
fn private_ca_relay(dir: &Path) -> (PathBuf, Relay) {
    let openssl = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .expect("openssl must be installed for the TLS tests")
            .success();
        assert!(ok, "openssl {args:?} failed");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca_subject = ["-days", "1", "-subj", "/CN=Test private CA", "-keyout", "ca.key"];
    openssl(&[&["req", "-x509"], &ec[..], &ca_subject[..], &["-out", "ca.pem"]].concat());
    let csr = ["-subj", "/CN=relay", "-keyout", "key.pem", "-out", "csr.pem"];
    openssl(&[&["req"], &ec[..], &csr[..]].concat());
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "csr.pem",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext",
        "-out",
        "cert.pem",
    ]);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let relay =
        Relay::start(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    (dir.join("ca.pem"), relay)
}

#[test]
fn without_any_ca_store_the_error_says_so_and_each_distribution_layout_is_found() {
    let Some(root) = bare_root("no-ca") else { return };
    let dir = root.parent().unwrap().to_path_buf();
    let (ca, relay) = private_ca_relay(&dir);
    let url = format!("https://127.0.0.1:{}", relay.port());
    let (state, detail) = registry_hop(&root, &[], &url);
    assert_eq!(state, "fail", "{detail}");
    assert!(detail.contains("this machine has no CA certificates at all"), "{detail}");
    assert!(detail.contains("install the ca-certificates package"), "{detail}");
    // Debian/Ubuntu, Fedora/RHEL and Alpine place their bundle differently: each is found.
    for place in
        ["etc/ssl/certs/ca-certificates.crt", "etc/pki/tls/certs/ca-bundle.crt", "etc/ssl/cert.pem"]
    {
        let _ = std::fs::remove_dir_all(root.join("etc"));
        let file = root.join(place);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::copy(&ca, &file).unwrap();
        let (state, detail) = registry_hop(&root, &[], &url);
        assert_eq!(state, "ok", "CA at /{place}: {detail}");
    }
    // And SSL_CERT_FILE, anywhere.
    let _ = std::fs::remove_dir_all(root.join("etc"));
    std::fs::copy(&ca, root.join("my-ca.pem")).unwrap();
    let (state, detail) = registry_hop(&root, &[("SSL_CERT_FILE", "/my-ca.pem")], &url);
    assert_eq!(state, "ok", "SSL_CERT_FILE: {detail}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_resolv_conf_or_hosts_a_host_name_failure_names_them() {
    let Some(root) = bare_root("no-dns") else { return };
    // `.invalid` never resolves (RFC 2606), whatever answers on 127.0.0.1:53.
    let (state, detail) = registry_hop(&root, &[], "http://relay.invalid:9");
    assert_eq!(state, "fail", "{detail}");
    assert!(detail.contains("neither /etc/resolv.conf (no DNS server) nor /etc/hosts"), "{detail}");
    // /etc/hosts alone is enough for the names it lists.
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 relay.test\n").unwrap();
    let relay = Relay::start(&[]);
    let (state, detail) = registry_hop(&root, &[], &format!("http://relay.test:{}", relay.port()));
    assert_eq!(state, "ok", "{detail}");
    let _ = std::fs::remove_dir_all(root.parent().unwrap());
}

#[test]
fn without_proc_the_daemon_starts_and_without_dev_null_the_error_names_it() {
    let Some(root) = bare_root("no-proc") else { return };
    let relay = Relay::start(&[]);
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = backend.local_addr().unwrap().port().to_string();
    drop(backend);
    let pair = ["--server", &relay.url(), "--port", &port];
    // No /dev at all: the daemon's stdio cannot be /dev/null; the error says so.
    let out = in_root(&root, &[], &pair);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/null cannot be opened") && err.contains("mknod"), "{err}");
    // With /dev/null (a device node needs CAP_MKNOD: skip the rest without it), and still no
    // /proc: the daemon finds its program through argv[0], and pairs.
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let made = Command::new("mknod")
        .args(["-m", "666"])
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("SKIPPED (the rest): cannot create a device node here");
        return;
    }
    let out = in_root(&root, &[], &pair);
    let stopped = in_root(&root, &[], &["--stop"]);
    let err = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pairing in a root without /proc failed: {err}");
    assert!(err.contains("Bridge online at the relay"), "{err}");
    assert!(stopped.status.success(), "{}", String::from_utf8_lossy(&stopped.stderr));
    let _ = std::fs::remove_dir_all(root.parent().unwrap());
}

/// A container's arbitrary uid (no passwd entry, no `HOME`) started in a directory it cannot
/// write: the error says why the state directory is there and names `HERMESCHAT_HOME`. Any
/// build; needs root and `setpriv` (util-linux).
#[test]
fn an_account_without_a_home_is_told_to_set_hermeschat_home() {
    const UID: u32 = 54321;
    // SAFETY: geteuid has no preconditions and cannot fail; getpwuid only reads.
    let (root, listed) = unsafe { (libc::geteuid() == 0, !libc::getpwuid(UID).is_null()) };
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| Path::new(p).is_file());
    let (true, false, Some(setpriv)) = (root, listed, setpriv) else {
        eprintln!("SKIPPED: needs root, setpriv, and uid {UID} without a passwd entry");
        return;
    };
    // Root's, 0755: the uid may read it, not write it (as / in a container).
    let dir = fresh_dir("homeless");
    let pair = common::our_binary("hermeschat-pair", env!("CARGO_BIN_EXE_hermeschat-pair"));
    let id = UID.to_string();
    let out = Command::new(setpriv)
        .args([format!("--reuid={id}"), format!("--regid={id}"), "--clear-groups".into()])
        .arg(&pair)
        .args(["--server", "http://127.0.0.1:9", "--port", "9"])
        .env_clear()
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("uid {UID} has no passwd entry")), "{err}");
    assert!(err.contains("set HERMESCHAT_HOME"), "{err}");
    assert!(!dir.join(".hermeschat").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
