//! The `hermeschat-pair` command line: parsing, and one function per command.
//!
//! Exit codes: 0 success, 1 failure, 2 usage or configuration error, 130 a pairing
//! interrupted (Ctrl-C, a closing terminal, SIGTERM). Every error says what happened and what
//! to run next.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::bridge::workers::{Target, http_url};
use crate::bridge::{self, BridgeOptions, Health, Status};
use crate::daemon::{self, PidLock, Readiness, Stopped};
use crate::protocol::{DEFAULT_ALLOWED_PREFIXES, RelayQr};
use crate::registry_client::{Registry, RegistryError};
use crate::state::{self, BridgeIdentity, Config, Loaded};
use crate::{qr, secret};

/// The backend port when nothing else is configured.
pub const DEFAULT_PORT: u16 = 8765;

/// Ports where Hermes-compatible APIs commonly listen (the original tool's list).
pub const COMMON_PORTS: &[u16] = &[8765, 8000, 7860, 3000, 8080, 11434];

/// How long pairing waits for the registry to report the bridge online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(20);

const USAGE: &str = "\
hermeschat-pair — pair the HermesChat iOS app with your own Hermes Agent

USAGE:
    hermeschat-pair [OPTIONS]

With no command option: check the local backend, register with your registry, start the
bridge daemon, and print a QR code to scan in the app (My tab → + → Scan QR).

COMMANDS:
    (none)               pair: QR code + bridge daemon
    --status             is the daemon / backend / relay / gateway up? (with --json: machine-readable)
    --stop               stop the bridge daemon (idempotent)
    --refresh-code       new QR code from the same registry; paired devices keep working, the
                         daemon keeps running (restarted only to serve another backend)
    --reset              new bridge identity: every paired app is cut off, then a fresh QR code
    --foreground         run the bridge in this terminal (logs to stderr, Ctrl-C stops)
    --json               print only the QR payload as JSON (after pairing) and exit
    --local              LAN-only mode: no registry, no relay; the phone connects over the same
                         Wi-Fi (with --refresh-code: new LAN QR; with --reset: forget LAN devices)
    --install            run the bridge as a service: launchd LaunchAgent (macOS: starts at
                         desktop login, not at boot), systemd user unit (Linux), else prints a
                         cron @reboot line; needs a pairing first
    --uninstall          stop and remove the boot service
    --service-status     is the boot service installed and running? (with --json)
    --doctor             a real request app → relay → bridge → backend → gateway, each hop timed,
                         with the fix for what fails (with --json: machine-readable)
    --devices            the paired apps: name, paired at, last seen, online (with --json)
    --revoke CLIENT_ID   cut one paired app off at once (ids from --devices)
    --logs               the daemon, server and gateway logs (last 30 lines each)

OPTIONS:
    --server URL         your registry, e.g. https://relay.yourdomain.com
                         (else $HERMESCHAT_REGISTRY_URL, else the one saved at the last pairing)
    --port N             the local Hermes API port (else $HERMESCHAT_LOCAL_PORT, else the one
                         saved at the last pairing, else 8765)
    --no-server          do not start a bundled backend; use a healthy API on --port or a common port
    --host ADDR          with --local: the LAN address to serve and put in the QR (default: detected)
    --local-port N       with --local: the LAN server's port (default 8766)
    -f, --follow         with --logs: keep printing new lines (follows rotation; Ctrl-C stops)
    -n, --lines N        with --logs: lines per log (default 30)
    -h, --help           print this help
    -V, --version        print the version

ENVIRONMENT:
    HERMESCHAT_REGISTRY_URL   registry URL (same as --server)
    HERMESCHAT_HOME           state directory (default ~/.hermeschat)
    HERMESCHAT_LOCAL_HOST     backend host (default 127.0.0.1)
    HERMESCHAT_LOCAL_PORT     backend port (same as --port)
    HERMES_HOME               Hermes Agent's home (default ~/.hermes; the built-in backend and
                              --doctor read its .env and config.yaml)
    HERMESCHAT_GATEWAY_URL    the Hermes gateway's address (default from ~/.hermes, else
                              http://127.0.0.1:8642)
    AI_API_KEY, AI_BASE_URL, AI_MODEL
                              the built-in backend's direct fallback when the gateway is down
    HERMESCHAT_TRUSTED_UIDS   uids (comma-separated) whose gateway or backend you run on
                              purpose; any other account's program on those ports gets nothing
    NO_COLOR                  no colours in the output (TERM=dumb: none either)
    https_proxy, http_proxy, all_proxy, no_proxy
                              an http:// proxy for the registry and the relay (README)

FILES (in ~/.hermeschat): bridge.json (identity, 0600), config.json, bridge.pid, status.json,
bridge.log, lan.json (--local token and devices, digests only). The QR image is written to ./hermeschat_pair.png (to the state directory where the current directory cannot be written).
";

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Pair: the default.
    Pair,
    /// `--status`.
    Status,
    /// `--stop`.
    Stop,
    /// `--refresh-code`.
    RefreshCode,
    /// `--reset`.
    Reset,
    /// `--foreground`.
    Foreground,
    /// `__bridge-run` (internal): the detached daemon.
    BridgeRun {
        /// The readiness pipe's descriptor.
        ready_fd: Option<i32>,
    },
    /// `--install`: boot service.
    Install,
    /// `--uninstall`: remove the boot service.
    Uninstall,
    /// `--service-status`.
    ServiceStatus,
    /// `--doctor`: a real request along the whole path, hop by hop.
    Doctor,
    /// `--devices`: paired apps.
    Devices,
    /// `--revoke <clientId>`.
    Revoke(String),
    /// `--logs`.
    Logs,
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// Parsed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The command.
    pub command: Command,
    /// `--json`.
    pub json: bool,
    /// `--port`.
    pub port: Option<u16>,
    /// `--no-server`.
    pub no_server: bool,
    /// `--server`.
    pub server: Option<String>,
    /// `--local`: LAN-only mode.
    pub local: bool,
    /// `--host`: the LAN address to serve and advertise.
    pub host: Option<String>,
    /// `--local-port`: the LAN server's port.
    pub local_port: Option<u16>,
    /// `--follow` (with `--logs`).
    pub follow: bool,
    /// `--lines N` (with `--logs`).
    pub lines: Option<usize>,
}

/// A failed command: exit code and message.
#[derive(Debug)]
pub struct Exit {
    /// 1 or 2.
    pub code: u8,
    /// What happened and what to do.
    pub message: String,
}

/// A failure (exit 1).
pub(crate) fn fail(message: impl Into<String>) -> Exit {
    Exit { code: 1, message: message.into() }
}

/// A usage or configuration error (exit 2).
pub(crate) fn usage_error(message: impl Into<String>) -> Exit {
    Exit { code: 2, message: message.into() }
}

/// The environment variable naming the backend's port (as `--port` does).
const LOCAL_PORT_ENV: &str = "HERMESCHAT_LOCAL_PORT";

/// Parses a port number for `flag`.
fn parse_port(flag: &str, v: &str) -> Result<u16, Exit> {
    v.parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| usage_error(format!("{flag}: {v:?} is not a port number (1-65535)")))
}

/// Parses `args` (without the program name).
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Args, Exit> {
    use lexopt::prelude::*;
    let mut parsed = Args {
        command: Command::Pair,
        json: false,
        port: None,
        no_server: false,
        server: None,
        local: false,
        host: None,
        local_port: None,
        follow: false,
        lines: None,
    };
    let mut commands = Vec::new();
    let mut parser = lexopt::Parser::from_args(args);
    let usage =
        |e: lexopt::Error| usage_error(format!("{e}\nRun hermeschat-pair --help for usage."));
    while let Some(arg) = parser.next().map_err(usage)? {
        match arg {
            Long("status") => commands.push(Command::Status),
            Long("stop") => commands.push(Command::Stop),
            Long("refresh-code") => commands.push(Command::RefreshCode),
            Long("reset") => commands.push(Command::Reset),
            Long("foreground") => commands.push(Command::Foreground),
            Long("install") => commands.push(Command::Install),
            Long("uninstall") => commands.push(Command::Uninstall),
            Long("service-status") => commands.push(Command::ServiceStatus),
            Long("doctor") => commands.push(Command::Doctor),
            Long("devices") => commands.push(Command::Devices),
            Long("revoke") => {
                let v = parser.value().map_err(usage)?.to_string_lossy().into_owned();
                commands.push(Command::Revoke(v));
            }
            Long("logs") => commands.push(Command::Logs),
            Long("follow") | Short('f') => parsed.follow = true,
            Long("lines") | Short('n') => {
                let v = parser.value().map_err(usage)?.to_string_lossy().into_owned();
                let n = v
                    .parse()
                    .map_err(|_| usage_error(format!("--lines: {v:?} is not a number")))?;
                parsed.lines = Some(n);
            }
            Long("local") => parsed.local = true,
            Long("host") => {
                parsed.host = Some(parser.value().map_err(usage)?.to_string_lossy().into_owned());
            }
            Long("local-port") => {
                let v = parser.value().map_err(usage)?;
                parsed.local_port = Some(parse_port("--local-port", &v.to_string_lossy())?);
            }
            Long("json") => parsed.json = true,
            Long("no-server") => parsed.no_server = true,
            Long("port") => {
                let v = parser.value().map_err(usage)?;
                parsed.port = Some(parse_port("--port", &v.to_string_lossy())?);
            }
            Long("server") => {
                let v = parser.value().map_err(usage)?.to_string_lossy().into_owned();
                parsed.server = Some(v);
            }
            Value(v) if v == "__bridge-run" => commands.push(Command::BridgeRun { ready_fd: None }),
            Long("ready-fd") => {
                let v = parser.value().map_err(usage)?;
                let fd = v.to_string_lossy().parse().ok();
                if let Some(Command::BridgeRun { ready_fd }) = commands.last_mut() {
                    *ready_fd = fd;
                }
            }
            Short('h') | Long("help") => commands.push(Command::Help),
            Short('V') | Long("version") => commands.push(Command::Version),
            other => return Err(usage(other.unexpected())),
        }
    }
    commands.dedup();
    match commands.len() {
        0 => {}
        1 => parsed.command = commands.remove(0),
        _ if commands.contains(&Command::Help) => parsed.command = Command::Help,
        _ => {
            return Err(usage_error(
                "give at most one command (--status, --stop, --refresh-code, --reset, --foreground, \
                 --install, --uninstall, --service-status, --doctor, --devices, --revoke, --logs)",
            ));
        }
    }
    check_combination(&parsed)?;
    Ok(parsed)
}

/// Refuses options the command would silently ignore: a user who typed one expects it to act.
fn check_combination(a: &Args) -> Result<(), Exit> {
    use Command::*;
    let name = match &a.command {
        Help | Version => return Ok(()),
        Pair => "pairing",
        Status => "--status",
        Stop => "--stop",
        RefreshCode => "--refresh-code",
        Reset => "--reset",
        Foreground => "--foreground",
        Install => "--install",
        Uninstall => "--uninstall",
        ServiceStatus => "--service-status",
        Doctor => "--doctor",
        Devices => "--devices",
        Revoke(_) => "--revoke",
        Logs => "--logs",
        BridgeRun { .. } => return Ok(()),
    };
    let refuse =
        |what: &str| Err(usage_error(format!("{what}\nRun hermeschat-pair --help for usage.")));
    if !a.local && (a.host.is_some() || a.local_port.is_some()) {
        return refuse("--host and --local-port go with --local (LAN-only mode)");
    }
    if a.local && a.server.is_some() {
        return refuse("--server names a relay; --local (LAN-only mode) uses none");
    }
    if a.command != Logs && (a.follow || a.lines.is_some()) {
        return refuse("-f/--follow and -n/--lines go with --logs");
    }
    if a.json && matches!(a.command, Stop | Logs | Install | Uninstall | Foreground) {
        return refuse(&format!("{name} has no --json output"));
    }
    let pairs = matches!(a.command, Pair | RefreshCode | Reset | Foreground | Install);
    if a.no_server && !pairs {
        return refuse(&format!(
            "--no-server goes with pairing, --foreground and --install, not {name}"
        ));
    }
    if a.server.is_some() && !matches!(a.command, Pair | RefreshCode | Reset | Doctor) {
        return refuse(&format!("--server goes with pairing and --doctor, not {name}"));
    }
    Ok(())
}

/// Runs a parsed command.
pub fn run(args: Args) -> Result<(), Exit> {
    use Command::*;
    // The commands that reach the gateway, or hand the environment to a bridge that does.
    if matches!(args.command, Pair | RefreshCode | Reset | Status | Doctor | Foreground | Install) {
        check_environment()?;
    }
    match args.command.clone() {
        Command::Help => {
            print!("{USAGE}");
            Ok(())
        }
        Command::Version => {
            println!("hermeschat-pair {}", crate::VERSION);
            Ok(())
        }
        Command::Pair if args.local => crate::lan::pair(&args, PairMode::Pair),
        Command::RefreshCode if args.local => crate::lan::pair(&args, PairMode::RefreshCode),
        Command::Reset if args.local => crate::lan::pair(&args, PairMode::Reset),
        Command::Pair => pair(&args, PairMode::Pair),
        Command::RefreshCode => pair(&args, PairMode::RefreshCode),
        Command::Reset => pair(&args, PairMode::Reset),
        Command::Install => crate::service::install(&args),
        Command::Uninstall => crate::service::uninstall(&args),
        Command::ServiceStatus => crate::service::status(&args),
        Command::Doctor => crate::doctor::run(&args),
        Command::Devices => crate::devices::list(&args),
        Command::Revoke(client_id) => crate::devices::revoke(&args, &client_id),
        Command::Logs => crate::logs::run(&args),
        Command::Status => status(&args),
        Command::Stop => stop(),
        Command::Foreground => foreground(&args),
        Command::BridgeRun { ready_fd } => bridge_run(&args, ready_fd),
    }
}

/// Refuses an environment variable that is set but cannot be read (exit 2): it would be
/// ignored without a word (the default gateway probed, no account trusted) while the user who
/// set it expects it to act.
fn check_environment() -> Result<(), Exit> {
    use crate::backend::peer::TRUSTED_UIDS_ENV;
    use crate::gateway::URL_ENV;
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    // `--doctor` reads it only when no daemon tells it the backend: checked here, it is
    // refused before a half-printed report, and whether a daemon runs or not.
    if let Some(v) = set(LOCAL_PORT_ENV) {
        parse_port(LOCAL_PORT_ENV, v.trim())?;
    }
    if let Some(v) = set(URL_ENV)
        && crate::gateway::parse_http_url(&v).is_none()
    {
        return Err(usage_error(format!(
            "{URL_ENV}: {v:?} is not an address like http://127.0.0.1:8642 (http://, a host \
             and a port): fix it, or unset it to use the gateway's address from ~/.hermes"
        )));
    }
    if let Some(v) = set(TRUSTED_UIDS_ENV)
        && v.split(',').map(str::trim).any(|uid| !uid.is_empty() && uid.parse::<u32>().is_err())
    {
        return Err(usage_error(format!(
            "{TRUSTED_UIDS_ENV}: {v:?} is not a list of uids: give numbers separated by commas \
             (id -u <account> prints one), or unset it"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output

/// Status-line printer: ✓ / ⚠ / ✗ with colour only on a terminal that shows it
/// ([`crate::term::colour_on_stdout`]).
pub struct Out {
    /// Colours on (a terminal, not `TERM=dumb`, without `NO_COLOR`).
    pub colour: bool,
    quiet: bool,
}

impl Out {
    pub fn new(quiet: bool) -> Out {
        Out { colour: crate::term::colour_on_stdout(), quiet }
    }

    pub fn line(&self, mark: &str, colour: &str, text: &str) {
        if self.quiet {
            return;
        }
        if self.colour {
            println!("\x1b[{colour}m{mark}\x1b[0m {text}");
        } else {
            println!("{mark} {text}");
        }
    }

    pub fn ok(&self, text: &str) {
        self.line("✓", "32", text);
    }

    pub fn warn(&self, text: &str) {
        self.line("⚠", "33", text);
    }

    /// A failure line (✗), for reports that go on after a failed check.
    pub fn bad(&self, text: &str) {
        self.line("✗", "31", text);
    }

    pub fn info(&self, text: &str) {
        if !self.quiet {
            println!("  {text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared steps

pub(crate) fn state_dir() -> Result<PathBuf, Exit> {
    let (dir, fallback) = state::located_state_dir();
    state::ensure_dir(&dir).map_err(|e| {
        if fallback {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            return fail(format!(
                "cannot use the state directory: {e}; this account has no home directory (HOME \
                 is not set and uid {uid} has no passwd entry, as in a container), so it is \
                 .hermeschat under the current directory: set HERMESCHAT_HOME to a directory \
                 this uid may write (a volume)"
            ));
        }
        fail(format!(
            "cannot use the state directory (HERMESCHAT_HOME, default ~/.hermeschat): {e}"
        ))
    })?;
    Ok(dir)
}

pub(crate) fn load_config(dir: &Path, out: &Out) -> Result<Config, Exit> {
    match state::load_or_move_aside::<Config>(&state::config_json(dir), None, |_| Ok(())) {
        Ok(Loaded::Ok(c)) => Ok(c),
        Ok(Loaded::Missing) => Ok(Config::default()),
        Ok(Loaded::MovedAside { reason, moved_to }) => {
            out.warn(&format!(
                "config.json was unusable ({reason}); kept it as {} and started fresh",
                moved_to.display()
            ));
            Ok(Config::default())
        }
        Err(e) => Err(fail(format!("cannot read config.json: {e}"))),
    }
}

/// How long a command waits for a running daemon to write a missing or damaged bridge.json
/// again (it looks every few seconds: [`bridge::poller`]).
/// A round is up to ~10 s of probes against a wedged backend and gateway, then 5 s of sleep.
const IDENTITY_REPAIR_WAIT: Duration = Duration::from_secs(20);

/// Loads `bridge.json`. A damaged one is set aside (and pairing registers anew), unless a
/// running daemon serves a bridge: that daemon holds the identity, the relay secret exists
/// nowhere else, and it writes the file again itself, which is waited for.
pub(crate) fn load_identity(dir: &Path, out: &Out) -> Result<Option<BridgeIdentity>, Exit> {
    let path = state::bridge_json(dir);
    let look = || state::peek(&path, Some(state::STATE_VERSION), BridgeIdentity::validate);
    let serving = running_status(dir).map(|s| s.bridge_id).filter(|id| !id.is_empty());
    if let Some(serving) = serving
        && matches!(look(), Ok(Ok(None) | Err(_)))
    {
        out.warn(&format!(
            "bridge.json is missing or damaged; the running bridge daemon (bridge {serving}) \
             writes it again"
        ));
        let deadline = Instant::now() + IDENTITY_REPAIR_WAIT;
        loop {
            if let Ok(Ok(Some(id))) = look()
                && id.bridge_id == serving
            {
                out.ok("bridge.json restored by the running daemon");
                return Ok(Some(id));
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "bridge.json is missing or damaged, and the running daemon (bridge \
                     {serving}) did not write it again within {} s. Nothing was changed.\n  \
                     See {}. To start over with a new bridge (your apps must then scan a new \
                     QR code): hermeschat-pair --stop, then hermeschat-pair",
                    IDENTITY_REPAIR_WAIT.as_secs(),
                    state::bridge_log(dir).display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    match state::load_or_move_aside::<BridgeIdentity>(
        &state::bridge_json(dir),
        Some(state::STATE_VERSION),
        BridgeIdentity::validate,
    ) {
        Ok(Loaded::Ok(id)) => Ok(Some(id)),
        Ok(Loaded::Missing) => Ok(None),
        Ok(Loaded::MovedAside { reason, moved_to }) => {
            // Said by every command that loads it (--devices, --revoke too), not only pairing,
            // which is what registers anew.
            out.warn(&format!(
                "bridge.json was unusable ({reason}); kept it as {}. Pairing (hermeschat-pair) \
                 registers this machine anew: apps paired with the old bridge must scan its new \
                 QR code",
                moved_to.display()
            ));
            Ok(None)
        }
        Err(e) => Err(fail(format!("cannot read bridge.json: {e}"))),
    }
}

pub(crate) fn registry_url(args: &Args, config: &Config) -> Result<String, Exit> {
    let env = std::env::var("HERMESCHAT_REGISTRY_URL").ok().filter(|v| !v.trim().is_empty());
    let url = args.server.clone().or(env).or_else(|| config.registry_url.clone()).ok_or_else(|| {
        usage_error(
            "no registry configured. hermeschat-pair needs the registry + relay you host yourself:\n\
             \n    export HERMESCHAT_REGISTRY_URL=https://relay.yourdomain.com\n    hermeschat-pair\n\
             \nor pass --server https://relay.yourdomain.com. To host one, run hermeschat-relay \
             (see the README, \"Self-hosting the relay\").",
        )
    })?;
    normalized_registry_url(&url).map_err(usage_error)
}

/// A registry URL in one spelling: trimmed, without a trailing `/`, scheme and host in lower
/// case (`HTTPS://Relay.Example.com/` is `https://relay.example.com`), so that a saved URL and
/// a typed one compare equal when they name the same registry.
pub(crate) fn normalized_registry_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    if url.is_empty() {
        return Err("the registry URL is empty: pass --server https://relay.yourdomain.com".into());
    }
    let must = || {
        format!(
            "the registry URL {url:?} must start with https:// (http:// only for local testing)"
        )
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the registry URL {url:?} holds a space or a control character: \
             https://relay.yourdomain.com"
        ));
    }
    let (scheme, rest) = url.split_once("://").ok_or_else(must)?;
    let rest = rest.trim_end_matches('/');
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(must());
    }
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if host.is_empty() {
        return Err(format!(
            "the registry URL {url:?} names no host: https://relay.yourdomain.com"
        ));
    }
    Ok(format!("{scheme}://{}{path}", host.to_ascii_lowercase()))
}

/// The backend host and the port to try first.
pub(crate) fn backend_address(args: &Args, config: &Config) -> Result<(String, u16), Exit> {
    // An IPv6 host may be written as in a URL (`[::1]`); it is kept bare (`::1`) everywhere.
    let host = std::env::var("HERMESCHAT_LOCAL_HOST")
        .ok()
        .map(|h| h.trim().trim_start_matches('[').trim_end_matches(']').to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into());
    let env_port = match std::env::var(LOCAL_PORT_ENV) {
        Ok(v) if !v.trim().is_empty() => Some(parse_port(LOCAL_PORT_ENV, v.trim())?),
        _ => None,
    };
    let given = args.port.or(env_port);
    if given.is_none() && config.port == Some(0) {
        return Err(usage_error(
            "config.json says \"port\": 0, which is not a port number (1-65535): pass --port \
             <your backend's port> (it is saved), or remove \"port\" from config.json",
        ));
    }
    Ok((host, given.or(config.port).unwrap_or(DEFAULT_PORT)))
}

pub(crate) fn target(host: &str, port: u16) -> Target {
    Target {
        host: host.to_owned(),
        port,
        allowed_prefixes: DEFAULT_ALLOWED_PREFIXES.iter().map(|s| (*s).to_owned()).collect(),
        backend_key: None,
    }
}

/// The backend pairing will use.
pub(crate) struct Backend {
    /// Where the bridge sends requests.
    pub(crate) target: Target,
    /// The daemon starts the built-in backend on `target` (nothing listened there).
    pub(crate) builtin: bool,
}

/// How long pairing waits for another daemon's built-in backend to leave the port.
const FOREIGN_BUILTIN_WAIT: Duration = Duration::from_secs(15);

/// The backend gate: no QR before a healthy Hermes-compatible API answers `/api/health`, or
/// the built-in backend is to be started on a free port.
pub(crate) fn backend_gate(args: &Args, config: &Config, out: &Out) -> Result<Backend, Exit> {
    let external = |target| Ok(Backend { target, builtin: false });
    let (host, port) = backend_address(args, config)?;
    // The one port, if any, where our running daemon serves its built-in backend: never "your
    // API".
    let ours = builtin_port(&host);
    // The backend on this port is the one an earlier pairing chose as the user's own.
    let chosen_own = config.external_backend && config.port == Some(port);
    let health = bridge::poller::probe(&host, port, "/api/health");
    // Another state directory's daemon's built-in backend on this port, asked once.
    let foreign = if health == Health::Ready && ours != Some(port) {
        builtin_health(&host, port)
    } else {
        None
    };
    match (health, foreign) {
        // Our own daemon's built-in backend, from an earlier pairing: still the built-in one
        // (with --no-server, the user's own API is looked for elsewhere, below).
        (Health::Ready, _) if ours == Some(port) => {
            if !args.no_server {
                // Said once the daemon (kept or restarted) serves it: `wait_backend_ready`.
                return Ok(Backend { target: target(&host, port), builtin: true });
            }
        }
        // Another state directory's daemon's built-in backend. One whose state directory was
        // deleted (no command can find that daemon; it stops within seconds) is waited for;
        // one that stays is not taken for the user's own API without a word: this bridge
        // would lose its backend, silently, whenever that daemon stops.
        // (A pairing that chose the backend on this port as the user's own, --no-server or
        // not, is warned below instead.)
        (Health::Ready, Some(answer)) if !args.no_server && !chosen_own => {
            if answer["stateDir"] == "gone" || answer.get("stateDir").is_none() {
                out.info(&format!(
                    "Port {port} is served by another hermeschat-pair daemon's built-in \
                     backend; waiting up to {} s for it to stop",
                    FOREIGN_BUILTIN_WAIT.as_secs()
                ));
                let deadline = Instant::now() + FOREIGN_BUILTIN_WAIT;
                while bridge::poller::probe(&host, port, "/api/health") != Health::NotListening {
                    if Instant::now() >= deadline {
                        return Err(fail(shared_builtin(&host, port)));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            } else {
                return Err(fail(shared_builtin(&host, port)));
            }
        }
        (Health::Ready, Some(_)) => {
            // --no-server (now or at the pairing that chose it): that one is used, knowingly;
            // what follows is said.
            out.warn(&format!(
                "Port {port} is another state directory's hermeschat-pair daemon's built-in \
                 backend ({}): this bridge uses it, and chat stops whenever that daemon stops",
                http_url(&host, port)
            ));
            return external(target(&host, port));
        }
        (Health::Ready, None) => {
            out.ok(&format!("Local Hermes API ready ({})", http_url(&host, port)));
            return external(target(&host, port));
        }
        (Health::Unhealthy, _) if crate::tls_probe::speaks_tls(&host, port) => {
            let peer = format!("the backend at {}", bridge::workers::authority(&host, port));
            return Err(fail(format!(
                "{}.\n  Then run hermeschat-pair again.",
                crate::tls_probe::hint(&peer)
            )));
        }
        (Health::Unhealthy, _) => {
            return Err(fail(format!(
                "port {port} on {host} is in use, but it does not answer GET /api/health like a \
                 Hermes API.\n  Stop \
                 whatever holds port {port}, or point at your backend with --port <its port> \
                 (or a free one, for the built-in backend), then run hermeschat-pair again."
            )));
        }
        (Health::Foreign, _) => {
            let uid = crate::backend::peer::foreign_listener_at(&host, port)
                .map_or_else(String::new, |uid| format!(" (uid {uid})"));
            return Err(fail(format!(
                "port {port} on {host} is held by another user's program{uid}, not yours; \
                 nothing will be sent there.\n  Stop that program (lsof -nP -iTCP:{port} \
                 -sTCP:LISTEN), or point at your backend with --port <its port> (or a free \
                 one, for the built-in backend), then run hermeschat-pair again."
            )));
        }
        (Health::NotListening | Health::Unknown, _) => {
            // A server told to listen on `localhost` may take ::1 alone (Node 17 and later,
            // where `localhost` resolves to ::1 first): then 127.0.0.1 looks free, and the
            // built-in backend would take the same port number there while the user's API goes
            // unused, unnoticed.
            if let Some(message) = ipv6_only_listener(&host, port) {
                return Err(fail(message));
            }
        }
    }
    // Nothing on the port: the daemon starts the built-in backend there...
    if !args.no_server && crate::backend::available() && is_loopback(&host) {
        return Ok(Backend { target: target(&host, port), builtin: true });
    }
    // ...or, with --no-server (or no built-in backend), look for a healthy Hermes-compatible
    // API on the common ports, as the original tool does.
    for &p in COMMON_PORTS.iter().filter(|&&p| p != port && ours != Some(p)) {
        if bridge::poller::probe(&host, p, "/api/health") == Health::Ready {
            out.ok(&format!("Found a Hermes-compatible API on port {p} ({})", http_url(&host, p)));
            return external(target(&host, p));
        }
    }
    let tried: Vec<String> = std::iter::once(port)
        .chain(COMMON_PORTS.iter().copied().filter(|&p| p != port))
        .map(|p| {
            if ours == Some(p) {
                format!("{p} (the built-in backend, not yours)")
            } else {
                p.to_string()
            }
        })
        .collect();
    // Why the built-in backend was not started there (`--no-server` says it itself).
    let bundled = if args.no_server {
        String::new()
    } else if !is_loopback(&host) {
        format!(
            "\n  The built-in backend listens on loopback only, and HERMESCHAT_LOCAL_HOST is \
             {host}: unset it (or set 127.0.0.1) to have it started for you."
        )
    } else {
        "\n  This build has no bundled backend to start for you yet (--no-server is implied)."
            .to_owned()
    };
    Err(fail(format!(
        "no Hermes-compatible API answers /api/health on {host} (ports tried: {}).{bundled}\n  \
         Start your Hermes backend (for example: cd <HermesChat repo> && python -m server.main), \
         or pass --port <port> where it listens, then run hermeschat-pair again. No QR code was \
         generated, so nothing will pair and then fail.",
        tried.join(", ")
    )))
}

pub(crate) fn display_name(config: &Config) -> String {
    config.display_name.clone().filter(|n| !n.trim().is_empty()).unwrap_or_else(hostname)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_owned();
    if rc != 0 || name.is_empty() { "Hermes".to_owned() } else { name }
}

fn register(
    registry: &Registry,
    dir: &Path,
    name: &str,
    out: &Out,
) -> Result<BridgeIdentity, Exit> {
    let reg = registry.register(name).map_err(|e| registry_failure(&e, registry))?;
    // Nothing is saved: the relay deletes a registration whose bridge never connected.
    for url in [&reg.bridge_relay_url, &reg.app_relay_url] {
        if let Some(why) = unreachable_relay_url(registry.base(), url) {
            return Err(fail(format!("{why}. Nothing was saved; run hermeschat-pair again then")));
        }
    }
    let identity = BridgeIdentity::from_registration(
        reg,
        registry.base(),
        &secret::new_instance_id(),
        name,
        crate::relay::now_ms(),
    );
    // An identity is never overwritten: the one replaced is kept beside it.
    let path = state::bridge_json(dir);
    match state::set_aside(&path, "replaced") {
        Ok(Some(kept)) => out.info(&format!("The previous identity is kept as {}", kept.display())),
        Ok(None) => {}
        Err(e) => return Err(fail(format!("cannot keep the previous bridge identity: {e}"))),
    }
    state::write_json(&path, &identity).map_err(|e| {
        let hint = e.write_hint();
        fail(format!(
            "cannot save the bridge identity: {e}{hint}. Bridge {} is registered but unsaved; \
             run hermeschat-pair again once that is fixed",
            identity.bridge_id
        ))
    })?;
    out.ok(&format!("Registered bridge {} with {}", identity.bridge_id, registry.base()));
    Ok(identity)
}

fn registry_failure(e: &RegistryError, registry: &Registry) -> Exit {
    match e {
        // The cause names the step on this machine (its CA store, its resolver).
        RegistryError::Unreachable { cause, .. }
            if crate::registry_client::is_this_machines_side(cause) =>
        {
            fail(format!("{e}\n  Then run hermeschat-pair again. Nothing was changed."))
        }
        RegistryError::Unreachable { .. } => fail(format!(
            "{e}\n  Check the URL and that your relay is running (curl {}/v1/health), then run \
             hermeschat-pair again. Nothing was changed.",
            registry.base()
        )),
        // Something else answers there (a web server, another service's API).
        RegistryError::BadResponse { .. } => fail(format!(
            "{e}\n  Check that the URL is your hermeschat-relay (curl {}/v1/health answers \
             {{\"ok\":true,…}}), then run hermeschat-pair again. Nothing was changed.",
            registry.base()
        )),
        _ => fail(format!("{e}\n  Nothing was changed locally.")),
    }
}

/// Fetches an access code, re-registering when the registry no longer knows the bridge.
fn access_code(
    registry: &Registry,
    dir: &Path,
    identity: &mut BridgeIdentity,
    name: &str,
    fresh: bool,
    out: &Out,
) -> Result<(String, u64), Exit> {
    match registry.access_code(&identity.bridge_id, &identity.relay_secret, Some(name)) {
        Ok(c) => Ok((c.access_code, c.expires_at)),
        Err(e) if !fresh && e.code() == Some("BRIDGE_NOT_FOUND") => {
            out.warn(&format!(
                "The registry does not recognise bridge {} ({e}); registering anew",
                identity.bridge_id
            ));
            *identity = register(registry, dir, name, out)?;
            access_code(registry, dir, identity, name, true, out)
        }
        // The bridge exists there, but its secret was not taken: registering anew would strand
        // every paired app. A proxy that drops the Authorization header does this.
        Err(e) if e.code() == Some("UNAUTHORIZED") => {
            Err(fail(format!("{e}\n  {}", sentence(&secret_refused(&identity.bridge_id)))))
        }
        Err(e) => Err(registry_failure(&e, registry)),
    }
}

/// What to do when the registry knows `bridge_id` but refuses its relay secret (401): never
/// register anew by itself, which would strand every paired app. A clause: [`sentence`] makes
/// it one.
pub(crate) fn secret_refused(bridge_id: &str) -> String {
    format!(
        "the registry knows bridge {bridge_id} but did not accept its secret: if a proxy sits in \
         front of the relay, make it pass the Authorization header on. Nothing was changed; \
         hermeschat-pair --reset gives this machine a new bridge (your apps must then scan a new \
         QR code)"
    )
}

/// `clause` as a sentence of its own: its first letter upper case, a full stop at the end.
pub(crate) fn sentence(clause: &str) -> String {
    let mut s = clause.to_owned();
    if let Some(first) = s.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    s.push('.');
    s
}

pub(crate) fn read_status(dir: &Path) -> Option<Status> {
    state::read_json::<Status>(&state::status_json(dir)).ok().flatten()
}

/// The status.json of the daemon running now: `None` when none runs, or when status.json is
/// not (yet) its own (a dead daemon's, or not written yet by a starting one).
pub(crate) fn running_status(dir: &Path) -> Option<Status> {
    let pid = daemon::running(dir)?;
    read_status(dir).filter(|s| s.pid == pid)
}

/// Makes sure a daemon serves `identity` against `target`, with the built-in backend there or
/// not (`builtin`): reuses a matching one, replaces a stale one, starts one when none runs.
/// The pairing's choice of backend is passed to a daemon it starts (`--no-server` for the
/// user's own), which then does not go by config.json's `externalBackend`.
pub(crate) fn ensure_daemon(
    dir: &Path,
    relay: Option<(&str, &str)>,
    lan_url: Option<&str>,
    target: &Target,
    builtin: bool,
    extra_args: &[String],
    out: &Out,
) -> Result<u32, Exit> {
    let (bridge_id, relay_url) = relay.unwrap_or(("", ""));
    let fits = |s: &Status| {
        s.bridge_id == bridge_id
            && s.backend_url == target.url()
            && s.relay_url == relay_url
            && s.lan_url.as_deref() == lan_url
            && status_builtin(s) == builtin
    };
    let current = running_status(dir);
    let replaced = current.as_ref().is_some_and(|s| replaced_program(s, out));
    let suspended = current.as_ref().is_some_and(|s| suspended_daemon(s, out));
    if let Some(s) = current.as_ref().filter(|s| fits(s) && !replaced && !suspended) {
        out.ok(&format!("Bridge daemon already running (pid {})", s.pid));
        other_copy_note(s, out);
        return Ok(s.pid);
    }
    // A LAN pairing has said what changes already (`ensure_lan_daemon`).
    if lan_url.is_none() {
        match &current {
            Some(s) if !fits(s) => out.warn(&format!(
                "The running bridge daemon {}; restarting it",
                differs(s, bridge_id)
            )),
            // Only its program replaced, or it is suspended: `replaced_program` or
            // `suspended_daemon` said so.
            Some(_) => {}
            None if daemon::running(dir).is_some() => {
                out.warn("The running bridge daemon's status cannot be read; restarting it")
            }
            None => {}
        }
    }
    if daemon::running(dir).is_some() {
        daemon::stop(dir, Duration::from_secs(5)).map_err(fail)?;
    }
    if let Some(pid) = start_through_service(dir, &fits, out) {
        return Ok(pid);
    }
    let mut args = vec!["--port".to_owned(), target.port.to_string()];
    args.extend(extra_args.iter().cloned());
    if !builtin {
        args.push("--no-server".to_owned());
    }
    let pid = match daemon::spawn(dir, &args) {
        Ok(pid) => pid,
        Err(e) => return adopt_restarted(dir, &fits, &e, out),
    };
    out.ok(&format!("Bridge daemon started (pid {pid})"));
    Ok(pid)
}

/// After the daemon this pairing started failed (`spawn_error`): a daemon that something else
/// started in the meantime (a service manager or supervisor restarting the one just stopped)
/// holds the state directory. One that serves what `fits` accepts (it read the identity and
/// backend this pairing saved) is kept; with one that serves other settings, or none, the
/// pairing fails naming the cause, without stopping it again (its restarter would only start it
/// once more).
fn adopt_restarted(
    dir: &Path,
    fits: &dyn Fn(&Status) -> bool,
    spawn_error: &str,
    out: &Out,
) -> Result<u32, Exit> {
    settle_daemon(dir);
    let Some(s) = running_status(dir) else {
        return Err(fail(format!("the bridge daemon did not start: {spawn_error}")));
    };
    if fits(&s) && !daemon::suspended(s.pid) {
        out.ok(&format!(
            "Bridge daemon running (pid {}; started meanwhile by a service manager or \
             supervisor, or this pairing's own, ready late); it serves this pairing, so it is \
             kept",
            s.pid
        ));
        return Ok(s.pid);
    }
    Err(fail(format!(
        "the bridge daemon did not start: {spawn_error}\n  Another one (pid {}) was started \
         meanwhile, with other settings than this pairing's, by something that restarts it \
         (a service manager or supervisor running hermeschat-pair --foreground?). Stop it \
         there, or have it run this state directory's saved settings, then run \
         hermeschat-pair again.",
        s.pid
    )))
}

/// Whether the daemon `s` describes runs a program file that an upgrade has replaced since it
/// started (it still runs the old code), said to the user: it is then restarted, with the new
/// one, as `--stop` and pairing again would.
pub(crate) fn replaced_program(s: &Status, out: &Out) -> bool {
    let replaced = daemon::runs_replaced_program(s.pid, s.exe.as_ref());
    if replaced {
        out.warn(&format!(
            "The running bridge daemon (pid {}) runs a hermeschat-pair program file that has \
             been replaced since it started (an upgrade); restarting it so that the new one \
             runs. Paired apps reconnect by themselves",
            s.pid
        ));
    }
    replaced
}

/// Whether the daemon `s` describes is suspended (SIGSTOP, Ctrl-Z), said to the user: it
/// serves nothing, so a pairing restarts it rather than print a QR code nothing answers.
pub(crate) fn suspended_daemon(s: &Status, out: &Out) -> bool {
    let suspended = daemon::suspended(s.pid);
    if suspended {
        out.warn(&format!(
            "The running bridge daemon (pid {}) is suspended (SIGSTOP or Ctrl-Z) and serves \
             nothing; restarting it",
            s.pid
        ));
    }
    suspended
}

/// Says so when the daemon `s` describes runs another copy of the program than this one (two
/// installs, e.g. `cargo install` and a static binary in /usr/local/bin): it is kept, and the
/// user told how to run this copy instead.
pub(crate) fn other_copy_note(s: &Status, out: &Out) {
    let ours = daemon::ExeStamp::current();
    if let (Some(theirs), Some(ours)) = (&s.exe, ours)
        && theirs.path != ours.path
    {
        out.info(&format!(
            "It runs {}, not this program ({}); to run this one: hermeschat-pair --stop, then \
             this command again (with the boot service: --install)",
            theirs.path.display(),
            ours.path.display()
        ));
    }
}

/// What a running relay-mode pairing changes about the daemon `s`, said to the user before
/// it is restarted (LAN devices lose their server; a new identity cuts off the old one's
/// apps, which `--reset` says itself).
fn differs(s: &Status, bridge_id: &str) -> &'static str {
    if s.lan_url.is_some() {
        "serves the LAN (--local); it goes back to the relay, and LAN devices are offline until \
         you run hermeschat-pair --local again"
    } else if s.bridge_id != bridge_id {
        "serves another bridge identity"
    } else {
        "serves another backend"
    }
}

/// How long pairing waits for the boot service's bridge to serve.
const SERVICE_START_WAIT: Duration = Duration::from_secs(10);

/// Starts the bridge through the boot service installed for `dir` (launchd or systemd), so
/// that it keeps the service's restart on failure, and returns its pid once it serves what
/// `fits` accepts. `None` (the caller starts the daemon itself): no such service, it could not
/// start, or its bridge serves other settings (installed for another mode or port; it is
/// stopped again, and the user told to install the service anew).
pub(crate) fn start_through_service(
    dir: &Path,
    fits: &dyn Fn(&Status) -> bool,
    out: &Out,
) -> Option<u32> {
    let service = crate::service::installed_for(dir)?;
    let manager = service.platform.manager();
    if !service.runs_this_binary() {
        out.warn(&format!(
            "The {manager} service runs another copy of hermeschat-pair than this one; \
             hermeschat-pair --install makes it run this one"
        ));
    } else if service.outdated() {
        out.warn(&format!(
            "The {manager} service file was written by an older hermeschat-pair; \
             hermeschat-pair --install updates it"
        ));
    }
    if let Err(e) = crate::service::restart(service.platform) {
        out.warn(&format!(
            "The {manager} service did not start the bridge ({e}); starting it outside the service"
        ));
        return None;
    }
    let deadline = Instant::now() + SERVICE_START_WAIT;
    loop {
        settle_daemon(dir);
        match running_status(dir) {
            Some(s) if fits(&s) => {
                out.ok(&format!("Bridge daemon started by the {manager} service (pid {})", s.pid));
                return Some(s.pid);
            }
            Some(_) => {
                out.warn(&format!(
                    "The {manager} service runs the bridge with other settings than this \
                     pairing's; running it outside the service instead (hermeschat-pair \
                     --install makes the service start this one)"
                ));
                let _ = daemon::stop(dir, Duration::from_secs(5));
                return None;
            }
            None if Instant::now() >= deadline => {
                out.warn(&format!(
                    "The {manager} service did not start the bridge within {} s (hermeschat-pair \
                     --logs shows why); starting it outside the service",
                    SERVICE_START_WAIT.as_secs()
                ));
                return None;
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The port on `host` where the running daemon serves its built-in backend, if it does.
fn builtin_port(host: &str) -> Option<u16> {
    let status = running_status(&state_dir().ok()?)?;
    let (their_host, port) = Target::parse_url(&status.backend_url)?;
    (their_host == host && status_builtin(&status)).then_some(port)
}

/// Whether the daemon `status` describes serves the built-in backend. A daemon older than
/// `builtinBackend` is asked through its backend's `/api/health`.
pub(crate) fn status_builtin(status: &Status) -> bool {
    status.builtin_backend.unwrap_or_else(|| {
        Target::parse_url(&status.backend_url)
            .is_some_and(|(host, port)| answers_as_builtin(&host, port))
    })
}

/// Waits (up to 5 s) while a daemon is starting: its pid not yet in bridge.pid, or its
/// status.json not yet written, so that what pairing reads of it is the running daemon's.
pub(crate) fn settle_daemon(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match daemon::running(dir) {
            None => return,
            // Its status.json is its own once it names its pid, and complete once it names
            // what it serves (a LAN daemon writes its address after binding).
            Some(pid)
                if pid != 0
                    && read_status(dir).is_some_and(|s| {
                        s.pid == pid && (!s.bridge_id.is_empty() || s.lan_url.is_some())
                    }) =>
            {
                return;
            }
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// When the backend host is 127.0.0.1 and nothing listens there, but something listens on
/// the port on ::1 (IPv6 loopback): what to tell the user.
fn ipv6_only_listener(host: &str, port: u16) -> Option<String> {
    if host != "127.0.0.1" {
        return None;
    }
    let answers = match bridge::poller::probe("::1", port, "/api/health") {
        Health::NotListening | Health::Unknown => return None,
        Health::Ready => "answers GET /api/health",
        Health::Unhealthy => "does not answer GET /api/health like a Hermes API",
        Health::Foreign => "is another user's program",
    };
    Some(format!(
        "port {port} is in use on ::1 (IPv6 loopback) only, not on 127.0.0.1, where the bridge \
         looks; what listens there {answers}.\n  A server told to listen on \"localhost\" may \
         take ::1 alone (Node 17 and later do). Make your backend listen on 127.0.0.1 (or on \
         both), or set HERMESCHAT_LOCAL_HOST=::1, then run hermeschat-pair again; or pass \
         --port <a free port> for the built-in backend."
    ))
}

/// True when `/api/health` at `host:port` says it is our built-in backend
/// (`"server":"hermeschat-pair"`).
fn answers_as_builtin(host: &str, port: u16) -> bool {
    builtin_health(host, port).is_some()
}

/// The `/api/health` answer at `host:port` when it says it is our built-in backend
/// (`"server":"hermeschat-pair"`).
fn builtin_health(host: &str, port: u16) -> Option<serde_json::Value> {
    use crate::bridge::local_http::{LocalClient, Timeouts};
    let wait = Duration::from_secs(2);
    let timeouts = Timeouts { connect: wait, head: wait, body_gap: wait };
    let client = LocalClient::with_timeouts(host, port, timeouts);
    // Kept out of server.log like the bridge's own health probes.
    let (_, body) = client.get_small("/api/health", &[(bridge::poller::PROBE_HEADER, "1")]).ok()?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .filter(|v| v["server"] == "hermeschat-pair")
}

/// Why a pairing does not take the built-in backend another state directory's daemon serves on
/// `port` for its own, and the ways on.
fn shared_builtin(host: &str, port: u16) -> String {
    format!(
        "port {port} on {host} is served by the built-in backend of another state directory's \
         hermeschat-pair daemon (another HERMESCHAT_HOME): this bridge would lose its backend, \
         without a word, whenever that daemon stops.\n  Pass --port <a free port> to have this \
         state directory's own built-in backend, or --no-server to use that one all the same; \
         then run hermeschat-pair again. Nothing was changed."
    )
}

/// Records in config.json the backend a successful pairing chose: its port, and whether it is
/// the user's own (then no later start of the bridge puts the built-in one on its port).
pub(crate) fn save_backend_choice(
    dir: &Path,
    config: &mut Config,
    port: u16,
    builtin: bool,
    out: &Out,
) {
    config.port = Some(port);
    config.external_backend = !builtin;
    save_config(dir, config, out);
}

/// Saves config.json. A failure is a warning, with the way out: the pairing stands, but a
/// later run must be told the registry and port again.
fn save_config(dir: &Path, config: &Config, out: &Out) {
    if let Err(e) = state::write_json(&state::config_json(dir), config) {
        out.warn(&format!("cannot save config.json: {e}{}", e.write_hint()));
    }
}

/// Waits for the built-in backend (started by the daemon) to answer `/api/health`.
pub(crate) fn wait_backend_ready(target: &Target, dir: &Path, out: &Out) -> Result<(), Exit> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match bridge::poller::probe(&target.host, target.port, "/api/health") {
            Health::Ready => {
                out.ok(&format!("Built-in Hermes backend ready ({})", target.url()));
                return Ok(());
            }
            _ if Instant::now() >= deadline => {
                return Err(fail(format!(
                    "the built-in backend did not answer /api/health on port {} within 10 s; see \
                     {} and {}",
                    target.port,
                    state::server_log(dir).display(),
                    state::bridge_log(dir).display()
                )));
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Makes Ctrl-C (SIGINT from the terminal), a closing terminal (SIGHUP) and SIGTERM end a
/// pairing command saying what it leaves: the daemon it may have started is detached and keeps
/// running, which a user who interrupted a pairing would not guess. Exits 130. A signal
/// ignored on entry (`nohup`, a script's `&`) stays ignored.
pub(crate) fn say_what_an_interruption_leaves(dir: &Path) {
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    let ignored = signals.map(daemon::signal_ignored);
    let dir = dir.to_path_buf();
    // Fails only when a handler is set already: the command then ends as it did before.
    let _ = ctrlc::set_handler(move || {
        // The terminal echoed `^C` after whatever the cursor followed, unless that was the
        // spinner's line, now erased.
        let erased = crate::term::erase_progress();
        let newline = if !erased && std::io::stderr().is_terminal() { "\n" } else { "" };
        let left = match daemon::running(&dir) {
            Some(pid) => format!(
                "the bridge daemon (pid {pid}) keeps running (hermeschat-pair --stop stops \
                 it); run the command again for a QR code"
            ),
            None => "no bridge daemon runs; run the command again".to_owned(),
        };
        // A terminal that is gone (SIGHUP) fails the write: it must not stop the exit.
        let _ = writeln!(std::io::stderr(), "{newline}✗ Interrupted: {left}");
        std::process::exit(130);
    });
    for (sig, ignored) in signals.into_iter().zip(ignored) {
        if ignored {
            // SAFETY: signal() only sets this process's disposition of `sig` back to ignored.
            unsafe { libc::signal(sig, libc::SIG_IGN) };
        }
    }
}

/// Polls bridge-status until the relay reports the bridge online.
pub(crate) fn wait_online(
    registry: &Registry,
    identity: &BridgeIdentity,
    dir: &Path,
    quiet: bool,
) -> Result<(), Exit> {
    let mut spinner = crate::term::Spinner::new(quiet);
    let started = Instant::now();
    let mut last_error = String::new();
    loop {
        match registry.bridge_status(&identity.bridge_id, &identity.relay_secret) {
            Ok(s) if s.online => {
                spinner.clear();
                return Ok(());
            }
            Ok(_) => last_error.clear(),
            Err(e) => last_error = e.to_string(),
        }
        if started.elapsed() >= ONLINE_TIMEOUT {
            spinner.clear();
            // A bridge registered before `register` checked this: the cause, and the way out.
            if let Some(why) =
                unreachable_relay_url(&identity.registry_url, &identity.bridge_relay_url)
            {
                return Err(fail(format!(
                    "the bridge did not come online at the relay: {why}, then run \
                     hermeschat-pair --reset (paired devices scan the new QR)"
                )));
            }
            let relay_error = read_status(dir).and_then(|s| s.relay_error).unwrap_or_default();
            let detail = [relay_error, last_error]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(fail(format!(
                "the bridge did not come online at the relay within {} s{}.\n  See {} \
                 (hermeschat-pair --status shows the relay connection).",
                ONLINE_TIMEOUT.as_secs(),
                if detail.is_empty() { String::new() } else { format!(" ({detail})") },
                state::bridge_log(dir).display()
            )));
        }
        spinner.tick("Waiting for the bridge to come online at the relay…");
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// `HH:MM:SS` in local time, for the access-code expiry.
pub(crate) fn local_time(ms: u64) -> String {
    let Some(tm) = local_tm(ms) else { return bridge::format_ts(ms) };
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// The local calendar time of `ms` (Unix milliseconds); `None` when it cannot be told, and
/// the caller shows UTC ([`bridge::format_ts`]) instead.
pub(crate) fn local_tm(ms: u64) -> Option<libc::tm> {
    // The type is inferred from `localtime_r` (`time_t`; naming the alias is deprecated on
    // musl). It is 32 bits on 32-bit glibc (armv7 Raspberry Pi OS): a time past 2038-01-19
    // does not fit there and is shown in UTC rather than wrapped to 1901.
    let secs = (ms / 1000).try_into().ok()?;
    // SAFETY: localtime_r reads `secs` and writes only into the `tm` we own; a zeroed tm is a
    // valid initial value.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        (!libc::localtime_r(&secs, &mut tm).is_null()).then_some(tm)
    }
}

/// Which pairing command runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PairMode {
    /// The default command.
    Pair,
    /// `--refresh-code`.
    RefreshCode,
    /// `--reset`.
    Reset,
}

/// How long a command waits for another one of the same state directory to finish.
const COMMAND_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Why [`command_lock`] was not taken.
pub(crate) enum CommandLockError {
    /// The command holding it is suspended (Ctrl-Z, SIGSTOP): waiting would only hang until
    /// it is resumed. Its pid.
    Suspended(u32),
    /// Anything else (another command kept it too long, the file cannot be opened).
    Failed(Exit),
}

impl CommandLockError {
    /// The error of a command that needs the lock.
    fn exit(self) -> Exit {
        match self {
            CommandLockError::Suspended(pid) => fail(format!(
                "another hermeschat-pair command (pid {pid}) is suspended (Ctrl-Z) in the middle \
                 of its work for this state directory, and holds it until it ends: resume it (fg \
                 in its terminal, or kill -CONT {pid}) and let it finish, or end it (kill \
                 {pid}), then run this again. Nothing was changed"
            )),
            CommandLockError::Failed(e) => e,
        }
    }
}

/// One command at a time per state directory for what registers, issues codes and starts or
/// replaces the daemon (pairing in both modes, `--refresh-code`, `--reset`, `--install`): two
/// run at once would replace each other's identity, code or daemon and print QR codes nothing
/// serves. The lock (`command.lock`) ends with the process.
pub(crate) fn command_lock(dir: &Path, out: &Out) -> Result<state::FileLock, Exit> {
    command_lock_unless_suspended(dir, out).map_err(CommandLockError::exit)
}

/// [`command_lock`], telling a holder that is suspended apart: it is named at once instead of
/// waited for (a command suspended with Ctrl-Z in another terminal would otherwise hold every
/// other one for [`COMMAND_LOCK_WAIT`]).
pub(crate) fn command_lock_unless_suspended(
    dir: &Path,
    out: &Out,
) -> Result<state::FileLock, CommandLockError> {
    let path = dir.join("command.lock");
    let cannot = |e: std::io::Error| {
        CommandLockError::Failed(fail(format!(
            "cannot take the command lock: {e}{}",
            state::write_hint(&e)
        )))
    };
    let deadline = Instant::now() + COMMAND_LOCK_WAIT;
    let mut told = false;
    loop {
        if let Some(lock) = state::FileLock::acquire_until(&path, Instant::now()).map_err(cannot)? {
            // Read by the next command that finds it held (where the kernel does not say).
            let _ = lock.record_pid();
            return Ok(lock);
        }
        let holder = state::FileLock::holder(&path);
        if let Some(pid) = holder.filter(|&pid| daemon::suspended(pid)) {
            return Err(CommandLockError::Suspended(pid));
        }
        if Instant::now() >= deadline {
            return Err(CommandLockError::Failed(fail(format!(
                "another hermeschat-pair command{} kept running for {} s; run this again once \
                 it has ended. Nothing was changed",
                holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
                COMMAND_LOCK_WAIT.as_secs()
            ))));
        }
        if !told {
            told = true;
            out.info(&format!(
                "Another hermeschat-pair command{} is running for this state directory; waiting \
                 for it",
                holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pair(args: &Args, mode: PairMode) -> Result<(), Exit> {
    let out = Out::new(args.json);
    let dir = state_dir()?;
    say_what_an_interruption_leaves(&dir);
    let _lock = command_lock(&dir, &out)?;
    // Before the registry is asked for anything: what it answers must be saved.
    state::check_writable(&dir).map_err(|e| {
        fail(format!("cannot write in the state directory: {e}{}", state::write_hint(&e)))
    })?;
    settle_daemon(&dir);
    let mut config = load_config(&dir, &out)?;
    // A first pairing that registered but did not finish saved no registry URL in
    // config.json; bridge.json has it.
    if config.registry_url.is_none() {
        let saved = state::read_json::<BridgeIdentity>(&state::bridge_json(&dir));
        config.registry_url = saved.ok().flatten().map(|id| id.registry_url);
    }
    let url = registry_url(args, &config)?;
    let backend = backend_gate(args, &config, &out)?;
    crate::gateway::ensure(&out);
    let target = backend.target.clone();
    let registry = Registry::new(&url);
    let name = display_name(&config);

    let mut identity = load_identity(&dir, &out)?;
    if let Some(id) = &identity
        && normalized_registry_url(&id.registry_url).as_deref() != Ok(url.as_str())
    {
        if mode == PairMode::RefreshCode {
            return Err(usage_error(format!(
                "this bridge is registered with {}, not {url}; --refresh-code asks that \
                 registry for a new code. To move to {url} (your apps must then scan a new QR \
                 code), run hermeschat-pair --server {url} without --refresh-code",
                id.registry_url
            )));
        }
        out.warn(&format!(
            "The registry changed ({} → {url}); registering anew (apps paired through the old \
             one must scan the new QR code)",
            id.registry_url
        ));
        identity = None;
    }
    // Set once --reset has deleted the old bridge: a failure after that must not say that
    // nothing changed.
    let mut reset_done = false;
    if mode == PairMode::Reset {
        if let Some(old) = identity.take() {
            match registry.delete(&old.bridge_id, &old.relay_secret) {
                Ok(()) => out
                    .ok(&format!("Deleted bridge {}: every paired app is cut off", old.bridge_id)),
                Err(e) if matches!(e.code(), Some("BRIDGE_NOT_FOUND")) => {
                    out.ok(&format!("Bridge {} was already gone at the registry", old.bridge_id));
                }
                Err(e) => return Err(registry_failure(&e, &registry)),
            }
            reset_done = true;
        }
        if let Ok(Stopped::Terminated(pid) | Stopped::Killed(pid)) =
            daemon::stop(&dir, Duration::from_secs(5))
        {
            out.ok(&format!("Stopped the old bridge daemon (pid {pid})"));
        }
        // Only once the daemon is gone: while it runs, it writes a missing bridge.json again.
        if reset_done {
            let _ = std::fs::remove_file(state::bridge_json(&dir));
        }
    }
    let fresh = identity.is_none();
    let mut identity = match identity {
        Some(id) => id,
        None => register(&registry, &dir, &name, &out).map_err(|mut e| {
            if reset_done {
                let cause = e.message.split("\n  ").next().unwrap_or_default().to_owned();
                e.message = format!(
                    "{cause}\n  The old bridge is deleted at the registry (its apps are cut \
                     off); no new bridge is registered yet. Run hermeschat-pair again once the \
                     registry answers, to register a new one and get a QR code."
                );
            }
            e
        })?,
    };
    let (code, expires_at) = access_code(&registry, &dir, &mut identity, &name, fresh, &out)?;

    // --refresh-code leaves the daemon, and the backend it serves, as they are, when it is the
    // daemon status.json describes and serves the backend this run found.
    let kept = running_status(&dir).filter(|s| {
        mode == PairMode::RefreshCode
            && s.bridge_id == identity.bridge_id
            && s.backend_url == target.url()
            && !daemon::suspended(s.pid)
    });
    let builtin = kept.as_ref().map_or(backend.builtin, status_builtin);
    // Saved before the daemon starts: a boot service's bridge reads the backend choice from
    // config.json, and is started through the service below.
    save_backend_choice(&dir, &mut config, target.port, builtin, &out);
    if kept.is_some() {
        out.ok("Bridge daemon untouched; paired devices keep working");
    } else {
        let relay = Some((identity.bridge_id.as_str(), identity.bridge_relay_url.as_str()));
        ensure_daemon(&dir, relay, None, &target, builtin, &[], &out)?;
    }
    if builtin {
        wait_backend_ready(&target, &dir, &out)?;
    }
    wait_online(&registry, &identity, &dir, args.json)?;
    out.ok(&format!("Bridge online at the relay ({})", identity.app_relay_url));

    config.registry_url = Some(url.clone());
    save_config(&dir, &config, &out);

    let payload = RelayQr::new(&identity.bridge_id, &code, &url, &identity.app_relay_url, &name);
    let json = serde_json::to_string(&payload).map_err(|e| fail(e.to_string()))?;
    if args.json {
        println!("{json}");
        return Ok(());
    }
    print_qr(&json, &dir, &out, "hermeschat-pair --refresh-code");
    println!();
    out.info(&format!("Bridge ID : {}", identity.bridge_id));
    out.info(&format!("Relay     : {}", identity.app_relay_url));
    out.info(&format!(
        "Expires   : {} (single use, {} min)",
        local_time(expires_at),
        expires_at.saturating_sub(crate::relay::now_ms()).div_ceil(60_000)
    ));
    out.info(&format!("Log       : {}", state::bridge_log(&dir).display()));
    println!();
    out.info("Open the HermesChat app → My tab → + → Scan QR.");
    out.info("Next: hermeschat-pair --status · --refresh-code (new QR) · --stop");
    Ok(())
}

/// The QR image's file name.
const QR_PNG: &str = "hermeschat_pair.png";

/// Prints the QR in the terminal and writes it as `hermeschat_pair.png` in the current
/// directory, or, where that cannot be written (a read-only container root, a service's
/// working directory), in the state directory `dir`, saying where it went. The temp files a
/// run killed while writing it left in either are removed first. A terminal too narrow for the
/// code gets no drawing, but the command (`refresh`) that prints a new code once it is wider.
pub(crate) fn print_qr(json: &str, dir: &Path, out: &Out, refresh: &str) {
    let terminal = crate::term::size(libc::STDOUT_FILENO);
    // Whether the terminal is too narrow for the drawing.
    let narrow = match (qr::render_terminal(json, out.colour), terminal) {
        // A terminal narrower than the code wraps every line: what it shows is no QR code at
        // all.
        (Ok(drawing), Some((columns, _))) if columns < drawing.columns => {
            out.warn(&format!(
                "no QR code drawn here: it needs a terminal {} columns wide and this one is \
                 {columns}. Scan the QR image below, or widen the window (or make the font \
                 smaller) and run {refresh} for a new code here",
                drawing.columns
            ));
            true
        }
        (Ok(drawing), _) => {
            println!("{}", drawing.text);
            // A terminal shorter than the code never shows all of it at once: no phone can
            // scan it there. (Its rows are 0 when the terminal does not know them.)
            if let Some((_, rows @ 1..)) = terminal
                && rows < drawing.rows
            {
                out.warn(&format!(
                    "the QR code above is {} lines tall and this terminal shows {rows}: \
                     make the window taller (or the font smaller) and scroll back to it, or \
                     scan the QR image below",
                    drawing.rows
                ));
            }
            false
        }
        (Err(e), _) => {
            out.warn(&format!("cannot draw the QR code in the terminal: {e}"));
            false
        }
    };
    let cwd = std::path::absolute(".").unwrap_or_else(|_| PathBuf::from("."));
    let write = |place: &Path| {
        state::remove_stale_temps_of(place, QR_PNG);
        let png = place.join(QR_PNG);
        qr::write_png(json, &png).map(|()| png)
    };
    let cwd_error = match write(&cwd) {
        Ok(png) => return out.ok(&format!("QR image: {}", png.display())),
        Err(e) => e,
    };
    match write(dir) {
        Ok(png) => out.ok(&format!(
            "QR image: {} (not in the current directory: {cwd_error})",
            png.display()
        )),
        // Without a drawing either, the wider terminal is the only way on.
        Err(e) if narrow => out.warn(&format!(
            "no QR image: {cwd_error}; {e}. Widen the window (or make the font smaller) and \
             run {refresh} for a code drawn here"
        )),
        Err(e) => out.warn(&format!("no QR image: {cwd_error}; {e}; scan the QR above")),
    }
}

// ---------------------------------------------------------------------------------------------
// --status, --stop

pub(crate) fn health_word(h: Health) -> &'static str {
    match h {
        Health::Ready => "ready",
        Health::Unhealthy => "unhealthy",
        Health::NotListening => "not listening",
        Health::Unknown => "unknown",
        Health::Foreign => "held by another user's program",
    }
}

fn status(args: &Args) -> Result<(), Exit> {
    let out = Out::new(args.json);
    let dir = state_dir()?;
    let config = load_config(&dir, &out)?;
    // Only a look: a damaged bridge.json stays where it is (a running daemon writes it again).
    let path = state::bridge_json(&dir);
    let identity = match state::peek(&path, Some(state::STATE_VERSION), BridgeIdentity::validate) {
        Ok(Ok(identity)) => identity,
        Ok(Err(reason)) => {
            out.warn(&format!(
                "bridge.json is damaged ({reason}); a running daemon writes it again within \
                 seconds, else hermeschat-pair sets it aside and registers anew"
            ));
            None
        }
        Err(e) => return Err(fail(format!("cannot read bridge.json: {e}"))),
    };
    let pid = daemon::running(&dir);
    let saved = pid.and_then(|pid| read_status(&dir).filter(|s| s.pid == pid));
    let (bhost, bport) = match saved.as_ref().and_then(|s| Target::parse_url(&s.backend_url)) {
        Some(addr) => addr,
        None => backend_address(args, &config)?,
    };
    let backend_url = http_url(&bhost, bport);
    let backend = bridge::poller::probe(&bhost, bport, "/api/health");
    let gateway_config = crate::gateway::HermesConfig::load();
    let gateway = crate::gateway::probe(&gateway_config);
    // The key too, as --doctor's gatewayModels hop checks it: a gateway that refuses it fails
    // every chat. One request with a short deadline, only when the gateway is up.
    let key_check = (gateway == Health::Ready)
        .then(|| crate::gateway::check_key(&gateway_config, crate::gateway::KEY_CHECK_TIMEOUT));
    let relay_connected = saved.as_ref().is_some_and(|s| s.relay_connected);
    let lan_mode = crate::lan::serving(saved.as_ref());
    let devices = identity.as_ref().filter(|_| !lan_mode).map(|id| {
        Registry::new(&id.registry_url).clients(&id.bridge_id, &id.relay_secret).map(|c| c.len())
    });
    let lan_ok = lan_mode && crate::lan::address_lost(saved.as_ref()).is_none();
    // A suspended daemon (SIGSTOP, Ctrl-Z) still holds its lock and its last status.json.
    let suspended = pid.is_some_and(|p| p != 0 && daemon::suspended(p));
    // Serving, but an upgrade has replaced its program: the old code runs until a restart.
    let replaced =
        saved.as_ref().is_some_and(|s| daemon::runs_replaced_program(s.pid, s.exe.as_ref()));
    let healthy =
        pid.is_some() && !suspended && (relay_connected || lan_ok) && backend == Health::Ready;

    if args.json {
        let value = serde_json::json!({
            "daemon": {
                "running": pid.is_some(),
                "pid": pid,
                "suspended": suspended,
                "programReplaced": replaced,
            },
            "bridgeId": identity.as_ref().map(|i| &i.bridge_id),
            "registryUrl": identity.as_ref().map(|i| &i.registry_url),
            "relay": {
                "url": identity.as_ref().map(|i| &i.bridge_relay_url),
                "connected": relay_connected,
                "since": saved.as_ref().map(|s| s.relay_since),
                "error": saved.as_ref().and_then(|s| s.relay_error.clone()),
            },
            "backend": { "url": backend_url, "state": backend },
            "gateway": {
                "url": gateway_config.url(),
                "state": if gateway == Health::Ready { "online" } else { "offline" },
                "key": key_check.as_ref().map(crate::gateway::KeyCheck::word),
            },
            "appsOnline": saved.as_ref().map_or(0, |s| s.apps_online.len()),
            "pairedDevices": devices.as_ref().and_then(|d| d.as_ref().ok()),
            "lan": crate::lan::status_json(&dir, saved.as_ref()),
            "healthy": healthy,
        });
        println!("{value}");
    } else {
        let line = |good: bool, text: String| if good { out.ok(&text) } else { out.warn(&text) };
        match pid {
            Some(pid) if suspended => out.warn(&format!(
                "Bridge daemon suspended (pid {pid}; SIGSTOP or Ctrl-Z): it serves nothing and \
                 what follows is its last word. Resume it: kill -CONT {pid} (or fg in its \
                 terminal)"
            )),
            Some(pid) if replaced => out.warn(&format!(
                "Bridge daemon running (pid {pid}), but its program file has been replaced \
                 since it started (an upgrade): it still runs the old code. Restart it with \
                 the new one: hermeschat-pair{}",
                if lan_mode { " --local" } else { "" }
            )),
            Some(pid) => out.ok(&format!("Bridge daemon running (pid {pid})")),
            // With no relay pairing but a LAN one, the stopped daemon was a LAN-only one: plain
            // pairing would ask for a registry.
            None if identity.is_none() && crate::lan::has_pairing(&dir) => {
                out.warn("Bridge daemon not running — start it with: hermeschat-pair --local")
            }
            None => out.warn("Bridge daemon not running — start it with: hermeschat-pair"),
        }
        match &identity {
            Some(id) => {
                out.info(&format!("Bridge ID: {} · registry {}", id.bridge_id, id.registry_url))
            }
            None if !lan_mode && !crate::lan::has_pairing(&dir) => {
                out.info("No pairing yet — run: hermeschat-pair")
            }
            None => {}
        }
        crate::lan::print_status(&dir, saved.as_ref(), &out);
        if pid.is_some() && !lan_mode {
            let relay = match &saved {
                Some(s) if s.relay_connected => {
                    format!("Relay connected since {} ({})", local_time(s.relay_since), s.relay_url)
                }
                Some(s) => format!(
                    "Relay disconnected{}",
                    s.relay_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                ),
                None => "Relay state unknown (no status.json yet)".into(),
            };
            line(relay_connected, relay);
        }
        line(
            backend == Health::Ready,
            format!(
                "Backend {} ({backend_url}/api/health){}",
                health_word(backend),
                if backend == Health::Unhealthy {
                    "; hermeschat-pair --doctor shows what it answers"
                } else {
                    ""
                }
            ),
        );
        match &key_check {
            Some(check) => crate::gateway::print_online(
                &out,
                &gateway_config,
                crate::gateway::Platform::current(),
                &format!("Hermes Gateway online ({})", gateway_config.addr()),
                check,
            ),
            None => out.warn(&format!("Hermes Gateway offline ({})", gateway_config.addr())),
        }
        match devices {
            Some(Ok(n)) => out.info(&format!(
                "Paired devices: {n} ({} online now)",
                saved.as_ref().map_or(0, |s| s.apps_online.len())
            )),
            Some(Err(e)) => out.info(&format!("Paired devices: unknown ({e})")),
            None => {}
        }
        out.info(&format!("Log: {}", state::bridge_log(&dir).display()));
    }
    if healthy { Ok(()) } else { Err(Exit { code: 1, message: String::new() }) }
}

fn stop() -> Result<(), Exit> {
    let out = Out::new(false);
    // Not `state_dir()`: stopping must work even where the directory is refused for use.
    let dir = state::state_dir();
    // After a pairing running now, not in the middle of it (it would fail halfway, or its
    // daemon start after this stop). Where the lock cannot be taken, stop all the same; at
    // once when its holder is suspended, which may be for ever.
    let _lock = match command_lock_unless_suspended(&dir, &out) {
        Ok(lock) => Some(lock),
        Err(CommandLockError::Suspended(pid)) => {
            out.warn(&format!(
                "Another hermeschat-pair command (pid {pid}) is suspended (Ctrl-Z) in the middle \
                 of its work; stopping the daemon without waiting for it (resumed, it may start \
                 the daemon again: end it with kill {pid})"
            ));
            None
        }
        Err(CommandLockError::Failed(_)) => None,
    };
    match daemon::stop(&dir, Duration::from_secs(5)).map_err(fail)? {
        Stopped::NotRunning => out.ok("No bridge daemon was running"),
        Stopped::Terminated(pid) => out.ok(&format!("Stopped the bridge daemon (pid {pid})")),
        Stopped::Killed(pid) => {
            out.warn(&format!("The bridge daemon (pid {pid}) had to be killed"))
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The bridge itself: --foreground and the detached daemon

fn foreground(args: &Args) -> Result<(), Exit> {
    run_bridge(args, Readiness::none(), false)
}

fn bridge_run(args: &Args, ready_fd: Option<i32>) -> Result<(), Exit> {
    crate::daemon::close_inherited_fds(ready_fd);
    let readiness = ready_fd.map_or_else(Readiness::none, Readiness::from_fd);
    run_bridge(args, readiness, true)
}

/// Runs the bridge in this process. `detached`: log to `bridge.log` instead of stderr.
fn run_bridge(args: &Args, mut ready: Readiness, detached: bool) -> Result<(), Exit> {
    crate::limit_allocator_retention();
    crate::poll::raise_open_file_limit();
    let prepared: Result<_, Exit> = (|| {
        let dir = state_dir()?;
        if detached {
            bridge::log_to_file(&state::bridge_log(&dir)).map_err(|e| {
                fail(format!("cannot open the daemon's log: {e}{}", state::write_hint(&e)))
            })?;
        }
        let quiet = Out::new(true);
        let config = load_config(&dir, &quiet)?;
        // One mode per daemon: a LAN-only daemon never opens the relay socket.
        let identity = if args.local { None } else { load_identity(&dir, &quiet)? };
        if identity.is_none() && !args.local {
            return Err(usage_error(
                "no pairing yet (bridge.json is missing): run hermeschat-pair first",
            ));
        }
        let lock = PidLock::acquire(&dir).map_err(|e| match e {
            // The boot service's bridge, with one started by hand running: it leaves cleanly,
            // or the manager would restart it over and over.
            daemon::LockError::Held(_) if !detached && crate::service::started_by_a_service() => {
                Exit {
                    code: 0,
                    message: format!(
                        "{e}. The service leaves it running and stops; hermeschat-pair \
                         --install hands the bridge over to the service"
                    ),
                }
            }
            e => fail(e.to_string()),
        })?;
        // Temp files of an earlier daemon killed mid-write (SIGKILL, a power cut).
        let stale = state::remove_stale_temps(&dir);
        if stale > 0 {
            bridge::log(&format!("removed {stale} temp file(s) left by processes that died"));
        }
        let (host, port) = backend_address(args, &config)?;
        // The built-in backend runs when nothing serves the port (loopback only), unless the
        // pairing chose the user's own backend: that one may just not be up yet. A daemon the
        // pairing started (`detached`) was told its choice (`--no-server`); a bridge started
        // otherwise (the boot service) reads it from config.json.
        // Probed at most once: both questions below are about the same port, now.
        let mut health = None;
        let mut probe =
            || *health.get_or_insert_with(|| bridge::poller::probe(&host, port, "/api/health"));
        let builtin = !args.no_server
            && (detached || !config.external_backend)
            && crate::backend::available()
            && is_loopback(&host)
            && probe() == Health::NotListening;
        // A bridge started by hand or by the boot service passed no backend gate (pairing's):
        // what is on the backend's port is said once, so that a wrong --port is not silent.
        if !detached && !builtin {
            let url = http_url(&host, port);
            match probe() {
                Health::Ready => {}
                Health::NotListening | Health::Unknown => bridge::log(&format!(
                    "nothing listens on the backend {url} yet: requests fail until it starts \
                     there"
                )),
                Health::Unhealthy => bridge::log(&format!(
                    "the backend {url} answers, but not GET /api/health like a Hermes API: \
                     requests go there all the same; is --port (or HERMESCHAT_LOCAL_PORT) the \
                     port of your backend?"
                )),
                Health::Foreign => bridge::log(&format!(
                    "the backend {url} is another user's program: nothing is sent there (stop \
                     it, or pass --port <your backend's port>)"
                )),
            }
        }
        // `localhost` (the only name `is_loopback` takes) is served on 127.0.0.1.
        let loopback = host.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        let backend = builtin.then(|| crate::backend::BackendConfig {
            host: loopback,
            port,
            state_dir: dir.clone(),
        });
        let lan =
            if args.local { Some(crate::lan::LanConfig::from_args(args, &dir)?) } else { None };
        let options = BridgeOptions {
            identity,
            target: target(&host, port),
            state_dir: dir,
            workers: bridge::workers::DEFAULT_WORKERS,
            backend,
            lan,
        };
        Ok((options, lock))
    })();
    let (options, lock) = match prepared {
        Ok(v) => v,
        Err(e) => {
            ready.error(&e.message);
            return Err(if detached { e } else { launchd_config_exit(e) });
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let started = crate::poll::Poller::new()
        .map(Arc::new)
        .map_err(|e| format!("cannot create a poller: {e}"))
        .and_then(|waker| {
            let (stop, waker2) = (stop.clone(), waker.clone());
            ctrlc::set_handler(move || {
                stop.store(true, Ordering::SeqCst);
                let _ = waker2.notify();
            })
            .map_err(|e| format!("cannot install the signal handler: {e}"))?;
            Ok(waker)
        })
        .and_then(|waker| bridge::start(options, stop.clone(), waker));
    let bridge = match started {
        Ok(b) => b,
        Err(msg) => {
            // Released before the waiting command hears of the failure, so a `--status` run
            // right after it finds no daemon rather than the lock of one that never started.
            lock.release();
            ready.error(&msg);
            return Err(fail(msg));
        }
    };
    ready.ok();
    // The pairing command woke the gateway before it started a daemon (`detached`); a bridge
    // started otherwise (the boot service, `--foreground`) does it here.
    if !detached && let Ok(dir) = state_dir() {
        crate::gateway::wake_in_background(dir);
    }
    let result = bridge.run();
    lock.release();
    result.map_err(fail)
}

/// A configuration error (exit 2: no pairing, bridge.json set aside, …) of the bridge the
/// launchd service runs (`HERMESCHAT_SERVICE` set, the platform launchd): it leaves with exit 0
/// instead, its reason in `service-error.log`. Restarting cannot fix such an error, and a
/// LaunchAgent's `KeepAlive` (`SuccessfulExit` false) restarts on any other exit, every 10 s
/// for ever; the systemd unit says the same with `RestartPreventExitStatus=2`. Any other error
/// is returned as it is.
fn launchd_config_exit(e: Exit) -> Exit {
    let service = std::env::var_os(crate::service::SERVICE_ENV).is_some_and(|v| !v.is_empty());
    let launchd =
        matches!(crate::service::Platform::detect(), Ok(crate::service::Platform::Launchd));
    if e.code != 2 || !service || !launchd {
        return e;
    }
    Exit {
        code: 0,
        message: format!(
            "{}\n  The launchd service's bridge stops here with exit 0, so that launchd does not \
             restart it over and over: restarting cannot fix this. Once fixed, hermeschat-pair \
             starts the bridge again through the service.",
            e.message
        ),
    }
}

/// Why `relay_url`, a socket URL the relay announced, cannot work when it was reached at
/// `registry_url`: it names a loopback address while the registry is elsewhere. That is a
/// relay behind a proxy started without `--public-url`; neither this bridge nor a phone can
/// dial that address.
pub(crate) fn unreachable_relay_url(registry_url: &str, relay_url: &str) -> Option<String> {
    let host = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority.split(':').next().unwrap_or_default(),
        };
        host.to_ascii_lowercase()
    };
    let announced = host(relay_url);
    let unspecified = announced.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    ((is_loopback(&announced) || unspecified) && !is_loopback(&host(registry_url))).then(|| {
        format!(
            "the relay at {registry_url} announces its sockets at {relay_url}, an address only \
             the relay's own machine can use: it runs without --public-url.\n  Restart \
             hermeschat-relay with --public-url {registry_url} (or \
             HERMESCHAT_RELAY_PUBLIC_URL)"
        )
    })
}

/// True for `127.0.0.1`, `::1`, `localhost` and the like.
pub(crate) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_past_2038_is_not_wrapped() {
        // 2040-06-02 03:57:02 UTC: past what a 32-bit `time_t` holds (armv7 glibc), where a
        // wrapped value reads 1904 and its seconds 46.
        let shown = local_time(2_222_222_222_000);
        assert!(shown.ends_with(":02") || shown.ends_with(":02.000Z"), "{shown}");
    }

    #[test]
    fn a_loopback_relay_url_is_refused_only_for_a_registry_elsewhere() {
        let bad = |registry: &str, relay: &str| unreachable_relay_url(registry, relay).is_some();
        assert!(bad("https://relay.example.com", "ws://127.0.0.1:8787/ws/bridge"));
        assert!(bad("https://relay.example.com/", "ws://[::1]:8787/ws/app"));
        assert!(bad("https://relay.example.com", "ws://0.0.0.0:8787/ws/app"));
        assert!(bad("http://192.168.1.5:8787", "ws://LOCALHOST:8787/ws/app"));
        assert!(!bad("http://127.0.0.1:8787", "ws://127.0.0.1:8787/ws/app"));
        assert!(!bad("http://localhost:8787", "ws://[::1]:8787/ws/app"));
        assert!(!bad("https://relay.example.com", "wss://relay.example.com/ws/bridge"));
        assert!(!bad("https://relay.example.com", "wss://ws.example.com:443/ws/bridge"));
    }

    fn args(list: &[&str]) -> Result<Args, Exit> {
        parse(list.iter().map(std::ffi::OsString::from))
    }

    #[test]
    fn parses_commands_and_options() {
        let a = args(&[]).unwrap();
        assert_eq!(a.command, Command::Pair);
        let a = args(&["--status", "--json"]).unwrap();
        assert_eq!(a.command, Command::Status);
        assert!(a.json);
        let a = args(&["--port", "8000", "--no-server", "--server", "https://r.example"]).unwrap();
        assert_eq!(a.port, Some(8000));
        assert!(a.no_server);
        assert_eq!(a.server.as_deref(), Some("https://r.example"));
        let a = args(&["__bridge-run", "--port", "9", "--ready-fd", "3"]).unwrap();
        assert_eq!(a.command, Command::BridgeRun { ready_fd: Some(3) });
    }

    #[test]
    fn registry_urls_have_one_spelling() {
        let n = |u: &str| normalized_registry_url(u);
        assert_eq!(n(" HTTPS://Relay.Example.com/ ").as_deref(), Ok("https://relay.example.com"));
        assert_eq!(n("http://127.0.0.1:8080/base/").as_deref(), Ok("http://127.0.0.1:8080/base"));
        assert!(n("").unwrap_err().contains("empty"));
        assert!(n("https://").unwrap_err().contains("no host"));
        assert!(n("ftp://x").unwrap_err().contains("must start with https://"));
        assert!(n("relay.example.com").unwrap_err().contains("must start with https://"));
        assert!(n("https://relay example.com").unwrap_err().contains("holds a space"));
    }

    #[test]
    fn options_a_command_would_ignore_are_refused() {
        for bad in [
            &["--host", "192.168.1.2"][..],
            &["--refresh-code", "--local-port", "9000"],
            &["--local", "--server", "https://r.example.com"],
            &["--status", "-f"],
            &["--status", "--lines", "5"],
            &["--stop", "--json"],
            &["--logs", "--json"],
            &["--status", "--no-server"],
            &["--install", "--server", "https://r.example.com"],
        ] {
            let e = args(bad).unwrap_err();
            assert_eq!(e.code, 2, "{bad:?}: {}", e.message);
        }
        for good in [
            &["--local", "--host", "192.168.1.2", "--local-port", "9000"][..],
            &["--logs", "-f", "-n", "5"],
            &["--status", "--json"],
            &["--no-server", "--port", "8000"],
            &["--doctor", "--server", "https://r.example.com"],
            &["--install", "--local", "--local-port", "9000"],
        ] {
            assert!(args(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn rejects_bad_usage_with_exit_2() {
        assert_eq!(args(&["--port", "0"]).unwrap_err().code, 2);
        assert_eq!(args(&["--port", "x"]).unwrap_err().code, 2);
        assert_eq!(args(&["--bogus"]).unwrap_err().code, 2);
        assert_eq!(args(&["--stop", "--reset"]).unwrap_err().code, 2);
        assert_eq!(args(&["--stop", "--help"]).unwrap().command, Command::Help);
    }
}
