//! `hermeschat-relay`: the self-hosted registry + relay for HermesChat.
//!
//! Parses flags (each also readable from a `HERMESCHAT_RELAY_*` environment variable), binds,
//! and runs the relay until SIGTERM, SIGINT (Ctrl-C) or SIGHUP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hermeschat_pair::relay::{Relay, RelayConfig, StopHandle, log_event};

const USAGE: &str = "\
hermeschat-relay — the self-hosted registry + relay for HermesChat

USAGE:
    hermeschat-relay [OPTIONS]

OPTIONS (each also as an environment variable):
    --listen ADDR            address to listen on            [HERMESCHAT_RELAY_LISTEN, default 127.0.0.1:8787]
    --public-url URL         public https URL apps and bridges use, e.g. https://relay.example.com;
                             required with a wildcard --listen (0.0.0.0, [::]) and with
                             --print-systemd-unit
                                                             [HERMESCHAT_RELAY_PUBLIC_URL, default http(s)://<listen>]
    --data DIR               directory for the SQLite store  [HERMESCHAT_RELAY_DATA, default ./relay-data]
    --tls-cert FILE          PEM certificate chain: serve TLS directly (otherwise use a reverse proxy)
                                                             [HERMESCHAT_RELAY_TLS_CERT]
    --tls-key FILE           PEM PKCS#8 private key          [HERMESCHAT_RELAY_TLS_KEY]
    --trust-proxy            take client IPs from X-Forwarded-For (only behind your own proxy;
                             believed from loopback and private addresses only)
                                                             [HERMESCHAT_RELAY_TRUST_PROXY=1/true/yes/on,
                                                              0/false/no/off or unset: off]
    --rate-register N        registrations per minute per IP, 0 is unlimited
                                                             [HERMESCHAT_RELAY_RATE_REGISTER, default 20]
    --rate-verify N          pairing attempts per minute per IP, 0 is unlimited
                                                             [HERMESCHAT_RELAY_RATE_VERIFY, default 30]
    --code-ttl-secs N        access code lifetime, 1 to 86400
                                                             [HERMESCHAT_RELAY_CODE_TTL_SECS, default 600]
    --handshake-timeout-secs N
                             deadline for a request head, 1 to 86400
                                                             [HERMESCHAT_RELAY_HANDSHAKE_TIMEOUT_SECS, default 10]
    --max-connections N      open connections at most, at least 1
                                                             [HERMESCHAT_RELAY_MAX_CONNECTIONS, default 20000]
    --max-connections-per-ip N
                             open connections from one address (an IPv6 /64) at most,
                             0 is no cap; loopback is not counted; with --trust-proxy,
                             WebSockets through a local or private proxy count per
                             forwarded client (429 past the cap)
                                                             [HERMESCHAT_RELAY_MAX_CONNECTIONS_PER_IP, default 256]
    --print-systemd-unit     print a hardened systemd unit running this binary with these settings
                             (the store in /var/lib/hermeschat-relay, or --data /var/lib/NAME)
                             and exit; run it from /usr/local/bin, not from a home or /tmp
    -h, --help               print this help
    -V, --version            print the version

Logs are JSON lines on stderr. SIGTERM, SIGINT (Ctrl-C) and SIGHUP (e.g. the terminal
closing; not when started under nohup) each shut the relay down cleanly, with exit status 0;
the log names the signal.
Exit status 1: the relay could not start (the port is taken, another relay uses --data, the
store is unusable: the message says which) or failed; 2: invalid settings.
";

/// Options as parsed: the relay's configuration, and whether to print a unit instead.
struct Options {
    config: RelayConfig,
    /// The settings as given (for `--print-systemd-unit`).
    given: Given,
    print_unit: bool,
}

/// One setting's value as given, and where it came from (a flag or an environment variable),
/// so that an error names what the user typed.
struct Setting {
    value: String,
    from: String,
}

/// The settings given on the command line or in the environment (a flag wins), before
/// defaults.
struct Given {
    listen: Option<Setting>,
    public_url: Option<Setting>,
    data: Option<Setting>,
    cert: Option<Setting>,
    key: Option<Setting>,
    trust_proxy: bool,
    rate_register: Option<Setting>,
    rate_verify: Option<Setting>,
    code_ttl: Option<Setting>,
    handshake: Option<Setting>,
    max_conns: Option<Setting>,
    max_per_ip: Option<Setting>,
}

/// The environment variable `name`, when set and not empty.
fn env(name: &str) -> Option<Setting> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|value| Setting { value, from: name.to_owned() })
}

/// A yes/no environment variable: 1/true/yes/on or 0/false/no/off, in any case; unset or
/// empty is no.
fn env_bool(name: &str) -> Result<bool, String> {
    let Some(s) = env(name) else { return Ok(false) };
    match s.value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "{name}: {:?} is neither yes nor no: set it to 1, true, yes or on, or to 0, false, \
             no or off (or unset it)",
            s.value
        )),
    }
}

/// A number setting, or an error naming where it came from and what is wrong with it.
fn parse_num<T: std::str::FromStr>(s: &Setting) -> Result<T, String> {
    s.value.parse().map_err(|_| {
        let whole = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        let why = match s.value.strip_prefix('-') {
            Some(v) if whole(v) => "is negative: give a whole number, 0 or more",
            _ if whole(&s.value) => "is too large",
            _ => "is not a whole number",
        };
        format!("{}: {:?} {why}", s.from, s.value)
    })
}

/// Longest duration a `--*-secs` option takes: one day. Larger values would make no sense and
/// would overflow the clock arithmetic they feed.
const MAX_SECS: u64 = 86_400;

/// A `--*-secs` option: a whole number of seconds from 1 to [`MAX_SECS`].
fn parse_secs(s: &Setting) -> Result<Duration, String> {
    match parse_num::<u64>(s)? {
        n @ 1..=MAX_SECS => Ok(Duration::from_secs(n)),
        _ => Err(format!("{}: {:?} is out of range (1 to {MAX_SECS} seconds)", s.from, s.value)),
    }
}

/// The settings from the command line and the environment, checked.
fn parse_args() -> Result<Options, String> {
    use lexopt::prelude::*;
    let mut given = Given {
        listen: env("HERMESCHAT_RELAY_LISTEN"),
        public_url: env("HERMESCHAT_RELAY_PUBLIC_URL"),
        data: env("HERMESCHAT_RELAY_DATA"),
        cert: env("HERMESCHAT_RELAY_TLS_CERT"),
        key: env("HERMESCHAT_RELAY_TLS_KEY"),
        trust_proxy: env_bool("HERMESCHAT_RELAY_TRUST_PROXY")?,
        rate_register: env("HERMESCHAT_RELAY_RATE_REGISTER"),
        rate_verify: env("HERMESCHAT_RELAY_RATE_VERIFY"),
        code_ttl: env("HERMESCHAT_RELAY_CODE_TTL_SECS"),
        handshake: env("HERMESCHAT_RELAY_HANDSHAKE_TIMEOUT_SECS"),
        max_conns: env("HERMESCHAT_RELAY_MAX_CONNECTIONS"),
        max_per_ip: env("HERMESCHAT_RELAY_MAX_CONNECTIONS_PER_IP"),
    };
    let mut print_unit = false;

    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let value = |p: &mut lexopt::Parser, flag: &str| {
            let v = p.value().map_err(|e| e.to_string())?;
            let value =
                v.into_string().map_err(|_| format!("--{flag}: the value must be UTF-8"))?;
            Ok::<_, String>(Some(Setting { value, from: format!("--{flag}") }))
        };
        match arg {
            Long("listen") => given.listen = value(&mut parser, "listen")?,
            Long("public-url") => given.public_url = value(&mut parser, "public-url")?,
            Long("data") => given.data = value(&mut parser, "data")?,
            Long("tls-cert") => given.cert = value(&mut parser, "tls-cert")?,
            Long("tls-key") => given.key = value(&mut parser, "tls-key")?,
            Long("trust-proxy") => given.trust_proxy = true,
            Long("rate-register") => given.rate_register = value(&mut parser, "rate-register")?,
            Long("rate-verify") => given.rate_verify = value(&mut parser, "rate-verify")?,
            Long("code-ttl-secs") => given.code_ttl = value(&mut parser, "code-ttl-secs")?,
            Long("handshake-timeout-secs") => {
                given.handshake = value(&mut parser, "handshake-timeout-secs")?
            }
            Long("max-connections") => given.max_conns = value(&mut parser, "max-connections")?,
            Long("max-connections-per-ip") => {
                given.max_per_ip = value(&mut parser, "max-connections-per-ip")?
            }
            Long("print-systemd-unit") => print_unit = true,
            Short('h') | Long("help") => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            Short('V') | Long("version") => {
                println!("hermeschat-relay {}", hermeschat_pair::VERSION);
                std::process::exit(0);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    let config = config_from(&given)?;
    if !print_unit && config.listen.ip().is_unspecified() && config.public_url.is_none() {
        return Err(format!(
            "--listen {}: apps cannot dial a wildcard address, and it is the one they would \
             be handed: pass --public-url with the URL they reach this relay at (e.g. \
             --public-url https://relay.example.com)",
            config.listen
        ));
    }
    Ok(Options { config, given, print_unit })
}

/// The relay's configuration from the settings given, checked.
fn config_from(given: &Given) -> Result<RelayConfig, String> {
    let listen: SocketAddr = match &given.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 8787)),
        Some(s) => s.value.parse().map_err(|_| {
            format!("{}: {:?} is not an address like 127.0.0.1:8787", s.from, s.value)
        })?,
    };
    let data = PathBuf::from(given.data.as_ref().map_or("relay-data", |s| s.value.as_str()));
    let data = std::path::absolute(&data).unwrap_or(data);
    let mut config = RelayConfig::new(listen, data);
    if let Some(s) = &given.public_url {
        let url = &s.value;
        let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))
        else {
            return Err(format!(
                "{}: {url:?} must start with https:// (or http:// for tests)",
                s.from
            ));
        };
        // Apps and bridges are handed `wss://<rest>/ws/…`: without a host, or with a query or
        // a space in it, that is no URL they can dial.
        let host = rest.split('/').next().unwrap_or_default();
        if url.chars().any(char::is_control) {
            return Err(format!("{}: {url:?} holds a control character: fix the value", s.from));
        }
        if host.is_empty() || rest.contains(['?', '#']) || rest.chars().any(char::is_whitespace) {
            return Err(format!(
                "{}: {url:?} is not a base URL apps can reach: give the scheme and host (and \
                 port, and path prefix, if any) only, e.g. https://relay.example.com",
                s.from
            ));
        }
        config.public_url = Some(url.clone());
    }
    config.tls = match (&given.cert, &given.key) {
        (Some(c), Some(k)) => Some((c.value.clone().into(), k.value.clone().into())),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together: give both, or neither".into()),
    };
    config.trust_proxy = given.trust_proxy;
    if let Some(s) = &given.rate_register {
        config.rate_register = parse_num(s)?;
    }
    if let Some(s) = &given.rate_verify {
        config.rate_verify = parse_num(s)?;
    }
    if let Some(s) = &given.code_ttl {
        config.code_ttl = parse_secs(s)?;
    }
    if let Some(s) = &given.handshake {
        config.handshake_timeout = parse_secs(s)?;
    }
    if let Some(s) = &given.max_conns {
        config.max_connections = parse_num(s)?;
        config.max_connections_set = true;
        if config.max_connections == 0 {
            return Err(format!(
                "{}: 0 would refuse every connection: give at least 1 (the default is 20000)",
                s.from
            ));
        }
    }
    if let Some(s) = &given.max_per_ip {
        config.max_connections_per_ip = parse_num(s)?;
    }
    Ok(config)
}

/// Where the unit keeps the store: systemd's `StateDirectory=` for the dynamic user.
const UNIT_STATE_ROOT: &str = "/var/lib";

/// The store directory the unit uses, as a `StateDirectory=` name: `hermeschat-relay`, or
/// what `--data` names under `/var/lib` (the sandboxed service can write nowhere else).
fn unit_state_dir(given: &Given, config: &RelayConfig) -> Result<String, String> {
    let Some(s) = &given.data else { return Ok("hermeschat-relay".into()) };
    let refuse = || {
        format!(
            "{}: {:?}: the unit keeps its store in a directory under {UNIT_STATE_ROOT} (its \
             StateDirectory=, the only place the sandboxed service may write), named with \
             letters, digits, '.', '_' and '-': pass --data {UNIT_STATE_ROOT}/NAME, or leave \
             --data out for {UNIT_STATE_ROOT}/hermeschat-relay (to bring an existing store, \
             stop the old relay and copy its relay.db there with relay.db-wal and relay.db-shm \
             if they exist, before the first start)",
            s.from, s.value
        )
    };
    let rel = config.data.strip_prefix(UNIT_STATE_ROOT).map_err(|_| refuse())?;
    let name = rel.to_str().ok_or_else(refuse)?;
    let safe = |c: char| c.is_ascii_alphanumeric() || "._-/".contains(c);
    let parts_ok = name.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
    if name.is_empty() || !name.chars().all(safe) || !parts_ok {
        return Err(refuse());
    }
    Ok(name.to_owned())
}

/// Refuses a value with a control character: in a unit file a line break would start a
/// directive of its own.
fn no_control(what: &str, value: &str) -> Result<(), String> {
    if value.chars().any(char::is_control) {
        return Err(format!(
            "{what}: {value:?} holds a control character, which would break the unit file: \
             fix the value"
        ));
    }
    Ok(())
}

/// One word of an `ExecStart=` line: `%` and `$` doubled (systemd expands specifiers and
/// variables), double-quoted with `\` and `"` escaped unless it is plain.
fn exec_word(what: &str, value: &str) -> Result<String, String> {
    no_control(what, value)?;
    let escaped = value.replace('%', "%%").replace('$', "$$");
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._:,+@=-[]".contains(c);
    if !escaped.is_empty() && escaped.chars().all(plain) {
        return Ok(escaped);
    }
    Ok(format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\"")))
}

/// Where `exe` lies out of the unit's sandbox reach, if it does: what that place is and the
/// setting that hides it. `ProtectHome=yes` hides `/home`, `/root` and `/run/user` (the
/// dynamic user could not read a home anyway); `PrivateTmp=yes` gives the service empty
/// `/tmp` and `/var/tmp` of its own, and `PrivateDevices=yes` an empty `/dev/shm`. systemd
/// would then fail to start it (203/EXEC).
fn hidden_from_the_unit(exe: &Path) -> Option<(&'static str, &'static str)> {
    const HIDDEN: [(&str, &str, &str); 6] = [
        ("/home", "under a home directory", "ProtectHome=yes"),
        ("/root", "under a home directory", "ProtectHome=yes"),
        ("/run/user", "under a home directory", "ProtectHome=yes"),
        ("/tmp", "in a temporary directory", "PrivateTmp=yes"),
        ("/var/tmp", "in a temporary directory", "PrivateTmp=yes"),
        ("/dev/shm", "in shared memory", "PrivateDevices=yes"),
    ];
    HIDDEN
        .iter()
        .find(|(dir, ..)| exe.starts_with(dir))
        .map(|&(_, place, setting)| (place, setting))
}

/// A hardened systemd unit running this binary (`exe`) with every setting given.
fn systemd_unit(given: &Given, config: &RelayConfig, exe: &Path) -> Result<String, String> {
    let Some(public) = &config.public_url else {
        return Err("--print-systemd-unit needs --public-url: the https URL apps and bridges \
                    reach this relay at (e.g. --public-url https://relay.example.com)"
            .into());
    };
    let exe = exe.to_str().ok_or("the path of this binary is not UTF-8: copy it to /usr/local/bin and run --print-systemd-unit from there")?;
    let state = unit_state_dir(given, config)?;
    let mut exec = vec![
        exec_word("the path of this binary", exe)?,
        "--listen".into(),
        config.listen.to_string(),
        "--public-url".into(),
        exec_word("--public-url", public)?,
        "--data".into(),
        format!("{UNIT_STATE_ROOT}/{state}"),
    ];
    // The TLS files are read by systemd (as root, before the sandbox) and handed to the
    // service in its credentials directory (%d): a root-only key, or one under a home, works.
    let mut credentials = String::new();
    if let Some((cert, key)) = &config.tls {
        for (name, flag, path) in [("tls-cert", "--tls-cert", cert), ("tls-key", "--tls-key", key)]
        {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let path = path.to_str().ok_or(format!("{flag}: the path must be UTF-8"))?;
            no_control(flag, path)?;
            credentials.push_str(&format!("LoadCredential={name}:{}\n", path.replace('%', "%%")));
            exec.extend([flag.to_owned(), format!("%d/{name}")]);
        }
    }
    if config.trust_proxy {
        exec.push("--trust-proxy".into());
    }
    let numbers = [
        ("--rate-register", given.rate_register.is_some(), u64::from(config.rate_register)),
        ("--rate-verify", given.rate_verify.is_some(), u64::from(config.rate_verify)),
        ("--code-ttl-secs", given.code_ttl.is_some(), config.code_ttl.as_secs()),
        ("--handshake-timeout-secs", given.handshake.is_some(), config.handshake_timeout.as_secs()),
        ("--max-connections", given.max_conns.is_some(), config.max_connections as u64),
        (
            "--max-connections-per-ip",
            given.max_per_ip.is_some(),
            u64::from(config.max_connections_per_ip),
        ),
    ];
    for (flag, _, n) in numbers.into_iter().filter(|(_, given, _)| *given) {
        exec.extend([flag.to_owned(), n.to_string()]);
    }
    // Ports below 1024 need this one capability; everything else is dropped.
    let caps = if config.listen.port() < 1024 { "CAP_NET_BIND_SERVICE" } else { "" };
    Ok(format!(
        "# Install: save as /etc/systemd/system/hermeschat-relay.service, then
#   systemctl daemon-reload && systemctl enable --now hermeschat-relay
# Put Caddy or nginx in front for TLS (see the README), or add --tls-cert/--tls-key
# (systemd reads them at start: restart the service after renewing them).
[Unit]
Description=HermesChat registry + relay
Documentation=https://github.com/hermeschat/hermeschat-pair
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exec}
{credentials}Restart=on-failure
RestartSec=2
RestartPreventExitStatus=2
DynamicUser=yes
StateDirectory={state}
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
CapabilityBoundingSet={caps}
AmbientCapabilities={caps}

[Install]
WantedBy=multi-user.target
",
        exec = exec.join(" "),
    ))
}

/// `--print-systemd-unit`: the unit on stdout, or why there is none (exit 2); a warning on
/// stderr when the sandbox it sets up could not reach this binary.
fn print_unit(options: &Options) -> ExitCode {
    let exe = std::env::current_exe()
        .unwrap_or_else(|_| PathBuf::from("/usr/local/bin/hermeschat-relay"));
    match systemd_unit(&options.given, &options.config, &exe) {
        Ok(unit) => {
            if let Some((place, setting)) = hidden_from_the_unit(&exe) {
                eprintln!(
                    "hermeschat-relay: warning: this binary is {}, {place}: the unit's sandbox \
                     ({setting}, DynamicUser=yes) cannot reach it, so the service would fail to \
                     start (203/EXEC). Copy it out and print the unit from there:\n  \
                     sudo install -m 755 {} /usr/local/bin/\n  \
                     /usr/local/bin/hermeschat-relay --print-systemd-unit …",
                    exe.display(),
                    exe.display()
                );
            }
            print!("{unit}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hermeschat-relay: {e}\nRun hermeschat-relay --help for usage.");
            ExitCode::from(2)
        }
    }
}

/// The signals that stop the relay cleanly.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks [`STOP_SIGNALS`] in the calling thread and every thread it starts afterwards, so
/// that they wait for `sigwait` in [`spawn_signal_thread`]. Returns the set. SIGHUP stays
/// ignored when it was on entry (`nohup`); SIGTERM and SIGINT are always taken (a shell
/// script's `relay &` starts with SIGINT ignored).
fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before any other use.
    // signal() and pthread_sigmask change this process's dispositions and this thread's mask,
    // nothing else; no other thread runs yet.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            if hermeschat_pair::daemon::signal_ignored(sig) {
                if sig == libc::SIGHUP {
                    continue;
                }
                // An ignored signal is discarded, never left pending for sigwait.
                libc::signal(sig, libc::SIG_DFL);
            }
            libc::sigaddset(&mut set, sig);
        }
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => Ok(set),
            rc => Err(std::io::Error::from_raw_os_error(rc)),
        }
    }
}

/// Waits for the signals of `set` on a thread of its own; each is logged (which one stopped
/// the relay) and stops the relay. Signals are not handled asynchronously at all, so nothing
/// here needs to be async-signal-safe.
fn spawn_signal_thread(set: libc::sigset_t, handle: StopHandle) -> std::io::Result<()> {
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised signal set and `sig` a valid place for the result.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let name = match sig {
                libc::SIGTERM => "SIGTERM",
                libc::SIGINT => "SIGINT",
                libc::SIGHUP => "SIGHUP",
                _ => "another signal",
            };
            log_event("signal", &[("signal", name), ("next", "shutting down cleanly")]);
            handle.stop();
        }
    })?;
    Ok(())
}

/// Parses the settings, then runs the relay (or prints its unit).
fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("hermeschat-relay: {e}\nRun hermeschat-relay --help for usage.");
            return ExitCode::from(2);
        }
    };
    if options.print_unit {
        return print_unit(&options);
    }
    // Before any thread starts (the allocator's trimmer is one): every thread inherits the
    // mask, so the signal thread alone receives them (a signal during startup waits for it).
    let signals = match block_stop_signals() {
        Ok(set) => set,
        Err(e) => {
            eprintln!("hermeschat-relay: cannot set up signal handling: {e}");
            return ExitCode::from(1);
        }
    };
    // (Relay::bind raises the open-file limit, and fits the connection cap to it.)
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
    if let Err(e) = spawn_signal_thread(signals, handle) {
        eprintln!("hermeschat-relay: cannot start the signal thread: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_under_a_home_or_a_temporary_directory_are_out_of_the_sandbox_reach() {
        let hidden = [
            ("/home/ann/.cargo/bin/hermeschat-relay", "ProtectHome=yes"),
            ("/root/.cargo/bin/x", "ProtectHome=yes"),
            ("/run/user/1000/x", "ProtectHome=yes"),
            ("/tmp/hermeschat-relay", "PrivateTmp=yes"),
            ("/var/tmp/build/x", "PrivateTmp=yes"),
            ("/dev/shm/x", "PrivateDevices=yes"),
        ];
        for (exe, setting) in hidden {
            assert_eq!(hidden_from_the_unit(Path::new(exe)).map(|h| h.1), Some(setting), "{exe}");
        }
        for reachable in
            ["/usr/local/bin/hermeschat-relay", "/opt/x", "/homely/x", "/rooted/x", "/tmpfs/x"]
        {
            assert_eq!(hidden_from_the_unit(Path::new(reachable)), None, "{reachable}");
        }
    }

    #[test]
    fn exec_words_are_quoted_as_systemd_reads_them() {
        let word = |v: &str| exec_word("x", v).unwrap();
        assert_eq!(word("/usr/local/bin/hermeschat-relay"), "/usr/local/bin/hermeschat-relay");
        assert_eq!(word("/opt/my relay/bin"), "\"/opt/my relay/bin\"");
        assert_eq!(word(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(word("https://x/%41$HOME"), "\"https://x/%%41$$HOME\"");
        assert!(exec_word("--public-url", "https://x\nExecStartPre=/bin/sh").is_err());
    }
}
