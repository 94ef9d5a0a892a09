//! `hermeschat-relay`: the self-hosted registry + relay for HermesChat.
//!
//! Parses flags (each also readable from a `HERMESCHAT_RELAY_*` environment variable), binds,
//! and runs the relay until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hermeschat_pair::relay::{Relay, RelayConfig, log_event};

const USAGE: &str = "\
hermeschat-relay — the self-hosted registry + relay for HermesChat

USAGE:
    hermeschat-relay [OPTIONS]

OPTIONS (each also as an environment variable):
    --listen ADDR            address to listen on            [HERMESCHAT_RELAY_LISTEN, default 127.0.0.1:8787]
    --public-url URL         public https URL apps and bridges use, e.g. https://relay.example.com
                                                             [HERMESCHAT_RELAY_PUBLIC_URL, default http://<listen>]
    --data DIR               directory for the SQLite store  [HERMESCHAT_RELAY_DATA, default ./relay-data]
    --tls-cert FILE          PEM certificate chain: serve TLS directly (otherwise use a reverse proxy)
                                                             [HERMESCHAT_RELAY_TLS_CERT]
    --tls-key FILE           PEM PKCS#8 private key          [HERMESCHAT_RELAY_TLS_KEY]
    --trust-proxy            take client IPs from X-Forwarded-For (only behind your own proxy)
                                                             [HERMESCHAT_RELAY_TRUST_PROXY=1]
    --rate-register N        registrations per minute per IP [HERMESCHAT_RELAY_RATE_REGISTER, default 20]
    --rate-verify N          pairing attempts per minute per IP
                                                             [HERMESCHAT_RELAY_RATE_VERIFY, default 30]
    --code-ttl-secs N        access code lifetime            [HERMESCHAT_RELAY_CODE_TTL_SECS, default 600]
    --handshake-timeout-secs N
                             deadline for a request head     [HERMESCHAT_RELAY_HANDSHAKE_TIMEOUT_SECS, default 10]
    --max-connections N      open connections at most        [HERMESCHAT_RELAY_MAX_CONNECTIONS, default 20000]
    --max-connections-per-ip N
                             open connections from one address (an IPv6 /64) at most; loopback
                             and --trust-proxy are not counted, 0 is no cap
                                                             [HERMESCHAT_RELAY_MAX_CONNECTIONS_PER_IP, default 256]
    --print-systemd-unit     print a hardened systemd unit for this binary and exit
    -h, --help               print this help
    -V, --version            print the version

Logs are JSON lines on stderr. SIGTERM or Ctrl-C shuts down cleanly.
";

/// Options as parsed, before defaults.
struct Options {
    config: RelayConfig,
    print_unit: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_num<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value.parse().map_err(|_| format!("{flag}: {value:?} is not a valid number"))
}

/// Longest duration a `--*-secs` option takes: one day. Larger values would make no sense and
/// would overflow the clock arithmetic they feed.
const MAX_SECS: u64 = 86_400;

/// A `--*-secs` option: a whole number of seconds from 1 to [`MAX_SECS`].
fn parse_secs(flag: &str, value: &str) -> Result<Duration, String> {
    match parse_num::<u64>(flag, value)? {
        n @ 1..=MAX_SECS => Ok(Duration::from_secs(n)),
        _ => Err(format!("{flag}: {value:?} is out of range (1 to {MAX_SECS} seconds)")),
    }
}

fn parse_args() -> Result<Options, String> {
    use lexopt::prelude::*;
    let mut listen = env("HERMESCHAT_RELAY_LISTEN");
    let mut public_url = env("HERMESCHAT_RELAY_PUBLIC_URL");
    let mut data = env("HERMESCHAT_RELAY_DATA");
    let mut cert = env("HERMESCHAT_RELAY_TLS_CERT");
    let mut key = env("HERMESCHAT_RELAY_TLS_KEY");
    let mut trust_proxy = env("HERMESCHAT_RELAY_TRUST_PROXY").is_some_and(|v| v != "0");
    let mut rate_register = env("HERMESCHAT_RELAY_RATE_REGISTER");
    let mut rate_verify = env("HERMESCHAT_RELAY_RATE_VERIFY");
    let mut code_ttl = env("HERMESCHAT_RELAY_CODE_TTL_SECS");
    let mut handshake = env("HERMESCHAT_RELAY_HANDSHAKE_TIMEOUT_SECS");
    let mut max_conns = env("HERMESCHAT_RELAY_MAX_CONNECTIONS");
    let mut max_per_ip = env("HERMESCHAT_RELAY_MAX_CONNECTIONS_PER_IP");
    let mut print_unit = false;

    let mut parser = lexopt::Parser::from_env();
    let text =
        |v: std::ffi::OsString| v.into_string().map_err(|_| "arguments must be UTF-8".to_owned());
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let value = |p: &mut lexopt::Parser| p.value().map_err(|e| e.to_string()).and_then(text);
        match arg {
            Long("listen") => listen = Some(value(&mut parser)?),
            Long("public-url") => public_url = Some(value(&mut parser)?),
            Long("data") => data = Some(value(&mut parser)?),
            Long("tls-cert") => cert = Some(value(&mut parser)?),
            Long("tls-key") => key = Some(value(&mut parser)?),
            Long("trust-proxy") => trust_proxy = true,
            Long("rate-register") => rate_register = Some(value(&mut parser)?),
            Long("rate-verify") => rate_verify = Some(value(&mut parser)?),
            Long("code-ttl-secs") => code_ttl = Some(value(&mut parser)?),
            Long("handshake-timeout-secs") => handshake = Some(value(&mut parser)?),
            Long("max-connections") => max_conns = Some(value(&mut parser)?),
            Long("max-connections-per-ip") => max_per_ip = Some(value(&mut parser)?),
            Long("print-systemd-unit") => print_unit = true,
            Short('h') | Long("help") => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("hermeschat-relay {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }

    let listen = listen.unwrap_or_else(|| "127.0.0.1:8787".into());
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| format!("--listen: {listen:?} is not an address like 127.0.0.1:8787"))?;
    let data = PathBuf::from(data.unwrap_or_else(|| "relay-data".into()));
    let data = std::path::absolute(&data).unwrap_or(data);
    let mut config = RelayConfig::new(listen, data);
    if let Some(url) = public_url {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!(
                "--public-url: {url:?} must start with https:// (or http:// for tests)"
            ));
        }
        config.public_url = Some(url);
    }
    config.tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c.into(), k.into())),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    config.trust_proxy = trust_proxy;
    if let Some(v) = rate_register {
        config.rate_register = parse_num("--rate-register", &v)?;
    }
    if let Some(v) = rate_verify {
        config.rate_verify = parse_num("--rate-verify", &v)?;
    }
    if let Some(v) = code_ttl {
        config.code_ttl = parse_secs("--code-ttl-secs", &v)?;
    }
    if let Some(v) = handshake {
        config.handshake_timeout = parse_secs("--handshake-timeout-secs", &v)?;
    }
    if let Some(v) = max_conns {
        config.max_connections = parse_num("--max-connections", &v)?;
    }
    if let Some(v) = max_per_ip {
        config.max_connections_per_ip = parse_num("--max-connections-per-ip", &v)?;
    }
    Ok(Options { config, print_unit })
}

/// A hardened systemd unit running this binary with the current settings.
fn systemd_unit(config: &RelayConfig) -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .unwrap_or_else(|| "/usr/local/bin/hermeschat-relay".into());
    let public = config.public_url.clone().unwrap_or_else(|| "https://relay.example.com".into());
    let data = "/var/lib/hermeschat-relay";
    format!(
        "# Install: save as /etc/systemd/system/hermeschat-relay.service, then
#   systemctl daemon-reload && systemctl enable --now hermeschat-relay
# Put Caddy or nginx in front for TLS (see the README), or add --tls-cert/--tls-key.
[Unit]
Description=HermesChat registry + relay
Documentation=https://github.com/hermeschat/hermeschat-pair
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exe} --listen {listen} --public-url {public} --data {data}
Restart=on-failure
RestartSec=2
DynamicUser=yes
StateDirectory=hermeschat-relay
StateDirectoryMode=0700
UMask=0077
LimitNOFILE=65536
NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectSystem=strict
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
",
        listen = config.listen,
    )
}

/// Raises the soft open-file limit to the hard limit: each connection is a descriptor.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass; no memory is shared.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("hermeschat-relay: {e}\nRun hermeschat-relay --help for usage.");
            return ExitCode::from(2);
        }
    };
    if options.print_unit {
        print!("{}", systemd_unit(&options.config));
        return ExitCode::SUCCESS;
    }
    raise_fd_limit();
    hermeschat_pair::limit_allocator_retention();
    let relay = match Relay::bind(options.config) {
        Ok(r) => r,
        Err(e) => {
            log_event("fatal", &[("message", &e.to_string())]);
            eprintln!("hermeschat-relay: {e}");
            return ExitCode::from(1);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let handle = relay.stop_handle(stop.clone());
    if let Err(e) = ctrlc::set_handler(move || handle.stop()) {
        eprintln!("hermeschat-relay: cannot install the signal handler: {e}");
        return ExitCode::from(1);
    }
    match relay.run(stop) {
        Ok(()) => {
            log_event("stopped", &[]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            log_event("fatal", &[("message", &e.to_string())]);
            ExitCode::from(1)
        }
    }
}
