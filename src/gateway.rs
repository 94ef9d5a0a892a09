//! The Hermes gateway (`127.0.0.1:8642` by default): where it is, the key it wants, why it is
//! not answering, and the wake-up chain that starts, stops or restarts it.
//!
//! Used by the pairing command ([`ensure`], which never blocks pairing beyond a bounded
//! deadline) and by the built-in backend (`POST /api/gateway/restart`, `GET
//! /api/gateway/health`).
//!
//! The chain, in order (each step only where it applies; the first one that brings `/health`
//! up wins):
//! 1. macOS: `launchctl kickstart -k gui/<uid>/ai.hermes.gateway`;
//! 2. Linux: `systemctl --user start hermes-gateway`;
//! 3. `~/.hermes/hermes-agent/venv/bin/python -m hermes_cli.main gateway run`, detached, output
//!    appended to `~/.hermeschat/gateway.log`, pid in `~/.hermeschat/gateway.pid`;
//! 4. `hermes gateway start` from `PATH`.
//!
//! Every external command is looked up on `PATH` (or under `$HOME`) at run time, so tests drive
//! the chain with fake commands and a throwaway `HOME`. Secrets (the gateway key) are never
//! printed or logged.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bridge::Health;
use crate::bridge::local_http::{LocalClient, Timeouts};
use crate::cli::Out;
use crate::state;

/// The gateway's default API server port.
pub const DEFAULT_PORT: u16 = 8642;

/// The gateway's default host.
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// Shortest `API_SERVER_KEY` the gateway accepts.
pub const MIN_KEY_LEN: usize = 16;

/// Overrides the gateway address (`http://host:port`), e.g. for tests.
pub const URL_ENV: &str = "HERMESCHAT_GATEWAY_URL";

/// The launchd label of the Hermes gateway service.
pub const LAUNCHD_LABEL: &str = "ai.hermes.gateway";

/// The systemd user unit of the Hermes gateway service.
pub const SYSTEMD_UNIT: &str = "hermes-gateway";

/// How long the pairing command waits for a woken gateway, at most.
pub const ENSURE_DEADLINE: Duration = Duration::from_secs(20);

/// How long one started step may take to bring `/health` up before the next is tried.
const STEP_WAIT: Duration = Duration::from_secs(12);

/// Deadline of one external command (`launchctl`, `systemctl`, `hermes gateway start`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Values the gateway rejects as placeholders (hermes_cli.auth `_PLACEHOLDER_SECRET_VALUES`).
const PLACEHOLDER_KEYS: &[&str] = &[
    "*",
    "**",
    "***",
    "changeme",
    "your_api_key",
    "your_api_key_here",
    "your-api-key",
    "placeholder",
    "example",
    "dummy",
    "null",
    "none",
];

// ---------------------------------------------------------------------------------------------
// Configuration discovery

/// Reads a variable of the process environment (non-empty values only).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The user's home: `$HOME`, else the passwd entry.
pub fn home_dir() -> PathBuf {
    env_var("HOME").map(PathBuf::from).or_else(std::env::home_dir).unwrap_or_default()
}

/// Where Hermes keeps its files: `$HERMES_HOME`, else `~/.hermes`.
pub fn hermes_home() -> PathBuf {
    env_var("HERMES_HOME").map(PathBuf::from).unwrap_or_else(|| home_dir().join(".hermes"))
}

/// The Python of the standard Hermes install: `~/.hermes/hermes-agent/venv/bin/python`.
pub fn venv_python(hermes_home: &Path) -> PathBuf {
    hermes_home.join("hermes-agent").join("venv").join("bin").join("python")
}

/// Parses a dotenv file: `KEY=VALUE` lines, optional `export `, `#` comments, quotes stripped.
pub fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else { continue };
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        let value = value.trim();
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => {
                value[1..].split_once(q).map_or(&value[1..], |(inner, _)| inner).to_owned()
            }
            // Unquoted: an inline comment starts at " #".
            _ => value.split(" #").next().unwrap_or("").trim().to_owned(),
        };
        out.insert(key.to_owned(), value);
    }
    out
}

/// Looks up `path` (nested mapping keys) in a simple block-style YAML document: enough for
/// `platforms.api_server.enabled` and friends, without a YAML parser. Scalars only; quotes and
/// trailing comments are stripped.
pub fn yaml_lookup(text: &str, path: &[&str]) -> Option<String> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    for raw in text.lines() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let indent = raw.len() - trimmed.len();
        let Some((key, value)) = trimmed.split_once(':') else { continue };
        let key = key.trim().trim_matches(['"', '\'']).to_owned();
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key));
        let value = value.split(" #").next().unwrap_or("").trim();
        if !value.is_empty()
            && stack.len() == path.len()
            && stack.iter().zip(path).all(|((_, k), p)| k == p)
        {
            return Some(value.trim_matches(['"', '\'']).to_owned());
        }
    }
    None
}

/// True for the gateway's truthy strings.
fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on" | "y")
}

/// Where the gateway key was read from (never the key itself), for the messages that tell the
/// user which file to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `API_SERVER_KEY` in the process environment.
    Environment,
    /// `API_SERVER_KEY` in this `.env` file.
    DotEnv(PathBuf),
    /// `platforms.api_server.extra.key` in this `config.yaml`.
    ConfigYaml(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Environment => f.write_str("API_SERVER_KEY in the environment"),
            KeySource::DotEnv(p) => write!(f, "API_SERVER_KEY in {}", p.display()),
            KeySource::ConfigYaml(p) => {
                write!(f, "platforms.api_server.extra.key in {}", p.display())
            }
        }
    }
}

/// What the Hermes configuration says about the API server. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct HermesConfig {
    /// `$HERMES_HOME` or `~/.hermes`.
    pub home: PathBuf,
    /// Host the API server listens on (a wildcard bind is reached on 127.0.0.1).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `API_SERVER_KEY` (environment, `.env`, or `config.yaml`).
    pub key: Option<String>,
    /// Where `key` was found (`None` without a key).
    pub key_source: Option<KeySource>,
    /// The API server is enabled (`API_SERVER_ENABLED`, a key, or `platforms.api_server`).
    pub enabled: bool,
    /// `~/.hermes` exists.
    pub installed: bool,
}

impl fmt::Debug for HermesConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HermesConfig")
            .field("home", &self.home)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("key", &self.key.as_ref().map(|k| format!("<{} chars>", k.chars().count())))
            .field("key_source", &self.key_source)
            .field("enabled", &self.enabled)
            .field("installed", &self.installed)
            .finish()
    }
}

impl HermesConfig {
    /// `text` with the gateway key replaced by `<redacted>`: what the gateway prints goes into
    /// reports, status lines and the app's answers, and the key must not.
    pub fn redact(&self, text: &str) -> String {
        match self.key.as_deref().map(str::trim) {
            Some(key) if !key.is_empty() => text.replace(key, "<redacted>"),
            _ => text.to_owned(),
        }
    }

    /// Reads the process environment, `~/.hermes/.env` and `~/.hermes/config.yaml`
    /// (environment first, as the gateway does), and `$HERMESCHAT_GATEWAY_URL`.
    pub fn load() -> HermesConfig {
        HermesConfig::from_sources(&hermes_home(), env_var)
    }

    /// [`HermesConfig::load`] with the Hermes home and the environment passed in.
    pub fn from_sources(home: &Path, env: impl Fn(&str) -> Option<String>) -> HermesConfig {
        let dotenv = fs::read_to_string(home.join(".env")).map(|t| parse_dotenv(&t));
        let yaml = fs::read_to_string(home.join("config.yaml")).unwrap_or_default();
        let dotenv = dotenv.unwrap_or_default();
        let get = |name: &str| {
            env(name).or_else(|| dotenv.get(name).filter(|v| !v.trim().is_empty()).cloned())
        };
        let yaml_get = |leaf: &[&str]| {
            let mut path = vec!["platforms", "api_server"];
            path.extend_from_slice(leaf);
            yaml_lookup(&yaml, &path).filter(|v| !v.is_empty())
        };
        // The same order as `get`, then the YAML, each remembered so messages name the place
        // to fix: the gateway reads them in that order too (the environment, which its own
        // `.env` loading fills, overrides `config.yaml`).
        let env_path = home.join(".env");
        let yaml_path = home.join("config.yaml");
        let (key, key_source) = match env("API_SERVER_KEY") {
            Some(k) => (Some(k), Some(KeySource::Environment)),
            None => match dotenv.get("API_SERVER_KEY").filter(|v| !v.trim().is_empty()) {
                Some(k) => (Some(k.clone()), Some(KeySource::DotEnv(env_path))),
                None => match yaml_get(&["extra", "key"]) {
                    Some(k) => (Some(k), Some(KeySource::ConfigYaml(yaml_path))),
                    None => (None, None),
                },
            },
        };
        let enabled = get("API_SERVER_ENABLED").is_some_and(|v| truthy(&v))
            || get("API_SERVER_KEY").is_some()
            || yaml_get(&["enabled"]).is_some_and(|v| truthy(&v));
        let mut host = get("API_SERVER_HOST")
            .or_else(|| yaml_get(&["extra", "host"]))
            .unwrap_or_else(|| DEFAULT_HOST.to_owned());
        let mut port = get("API_SERVER_PORT")
            .or_else(|| yaml_get(&["extra", "port"]))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(DEFAULT_PORT);
        if let Some((h, p)) = env(URL_ENV).as_deref().and_then(parse_http_url) {
            host = h;
            port = p;
        }
        if matches!(host.as_str(), "0.0.0.0" | "::" | "[::]" | "") {
            host = DEFAULT_HOST.to_owned();
        }
        HermesConfig {
            home: home.to_path_buf(),
            host,
            port,
            key,
            key_source,
            enabled,
            installed: home.is_dir(),
        }
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        crate::bridge::workers::http_url(&self.host, self.port)
    }

    /// `host:port` for messages.
    pub fn addr(&self) -> String {
        self.url().trim_start_matches("http://").to_owned()
    }

    /// Where the key comes from for messages: its source, or, without one, every place it is
    /// looked for.
    pub fn key_origin(&self) -> String {
        match (&self.key_source, &self.key) {
            (Some(source), _) => source.to_string(),
            // Given directly (a configuration built by hand), not read from a file.
            (None, Some(_)) => "the configured key".to_owned(),
            (None, None) => format!(
                "no API_SERVER_KEY in the environment or {}, nor platforms.api_server.extra.key in \
                 {}",
                self.home.join(".env").display(),
                self.home.join("config.yaml").display()
            ),
        }
    }

    /// The key problem, if the gateway would refuse this key.
    pub fn key_problem(&self) -> Option<Problem> {
        match self.key.as_deref().map(str::trim) {
            None | Some("") => Some(Problem::KeyMissing),
            Some(k) if PLACEHOLDER_KEYS.contains(&k.to_ascii_lowercase().as_str()) => {
                Some(Problem::KeyPlaceholder)
            }
            Some(k) if k.chars().count() < MIN_KEY_LEN => {
                Some(Problem::KeyTooShort(k.chars().count()))
            }
            Some(_) => None,
        }
    }
}

/// `http://host:port[/...]` → (host, port); `None` for anything else.
pub fn parse_http_url(url: &str) -> Option<(String, u16)> {
    let rest = url.trim().strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

// ---------------------------------------------------------------------------------------------
// Probing and diagnosis

/// Probes `GET /health` with short deadlines: ready, unhealthy (something answers, but not
/// like the gateway) or not listening.
pub fn probe(config: &HermesConfig) -> Health {
    probe_addr(&config.host, config.port, Duration::from_millis(1500))
}

/// [`probe`] for an explicit address and answer deadline.
pub fn probe_addr(host: &str, port: u16, deadline: Duration) -> Health {
    let timeouts =
        Timeouts { connect: Duration::from_millis(500), head: deadline, body_gap: deadline };
    let client = LocalClient::with_timeouts(host, port, timeouts).named("Hermes gateway");
    match client.get_small("/health", &[("Accept", "application/json")]) {
        Ok((status, _)) if (200..300).contains(&status) => Health::Ready,
        Ok(_) => Health::Unhealthy,
        Err(crate::bridge::local_http::LocalError::Connect { .. }) => Health::NotListening,
        Err(crate::bridge::local_http::LocalError::Foreign { .. }) => Health::Foreign,
        Err(_) => Health::Unhealthy,
    }
}

/// How long the pairing command and `--status` wait for the key check.
pub const KEY_CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// What the gateway says to the key: one `GET /v1/models` with it, as `--doctor`'s
/// gatewayModels hop, chat (`/v1/chat/completions`) and every `/v1` route need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// Accepted; the models it lists.
    Accepted(Vec<String>),
    /// No key is configured: nothing was sent.
    Missing,
    /// Refused with this status (401 or 403).
    Refused(u16),
    /// Another answer: its status and the start of its body. No verdict on the key.
    Answered(u16, String),
    /// No answer (nothing was sent to another user's program, [`LocalError::Foreign`]). No
    /// verdict on the key.
    ///
    /// [`LocalError::Foreign`]: crate::bridge::local_http::LocalError::Foreign
    Failed(crate::bridge::local_http::LocalError),
}

impl KeyCheck {
    /// A short machine-readable word: `accepted`, `missing`, `refused` or `unknown`.
    pub fn word(&self) -> &'static str {
        match self {
            KeyCheck::Accepted(_) => "accepted",
            KeyCheck::Missing => "missing",
            KeyCheck::Refused(_) => "refused",
            KeyCheck::Answered(..) | KeyCheck::Failed(_) => "unknown",
        }
    }

    /// Chat cannot work with this key: missing or refused.
    pub fn is_bad(&self) -> bool {
        matches!(self, KeyCheck::Missing | KeyCheck::Refused(_))
    }
}

/// Checks the key against the gateway with [`KeyCheck`]'s one request, answered within
/// `deadline`. The key goes only into the request's `Authorization` header, and never to
/// another user's program on the port.
pub fn check_key(config: &HermesConfig, deadline: Duration) -> KeyCheck {
    let Some(key) = config.key.as_deref().map(str::trim).filter(|k| !k.is_empty()) else {
        return KeyCheck::Missing;
    };
    let timeouts = Timeouts {
        connect: Duration::from_millis(500).min(deadline),
        head: deadline,
        body_gap: deadline,
    };
    let client =
        LocalClient::with_timeouts(&config.host, config.port, timeouts).named("Hermes gateway");
    let bearer = format!("Bearer {key}");
    let headers = [("Accept", "application/json"), ("Authorization", bearer.as_str())];
    match client.get_small("/v1/models", &headers) {
        Ok((status, body)) if (200..300).contains(&status) => {
            let v: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
            let models = v
                .as_ref()
                .and_then(|v| v["data"].as_array())
                .map(|a| a.iter().filter_map(|m| m["id"].as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            KeyCheck::Accepted(models)
        }
        Ok((status @ (401 | 403), _)) => KeyCheck::Refused(status),
        Ok((status, body)) => {
            let text = String::from_utf8_lossy(&body);
            KeyCheck::Answered(status, config.redact(&truncate_chars(text.trim(), 200)))
        }
        Err(e) => KeyCheck::Failed(e),
    }
}

/// What is wrong with the key of a running gateway, and what to do, in words: `(what, fix)`
/// for a missing or refused key, naming where the key is read from (the `HERMES_HOME`-aware
/// paths); `None` otherwise. Serves the pairing line, `--status`, `--doctor`, the chat's
/// `gateway_auth` error and `/api/gateway/health` alike.
pub fn key_trouble(
    config: &HermesConfig,
    check: &KeyCheck,
    platform: Platform,
) -> Option<(String, String)> {
    let restart = restart_hint(platform);
    match check {
        KeyCheck::Missing => Some((
            format!("no key for it is configured ({})", config.key_origin()),
            format!(
                "put the key the gateway runs with in {} as API_SERVER_KEY=… (or a new one, \
                 API_SERVER_KEY=$(openssl rand -hex 32), then restart the gateway: {restart})",
                config.home.join(".env").display()
            ),
        )),
        KeyCheck::Refused(status) => Some((
            format!("it refuses the key (HTTP {status}) from {}", config.key_origin()),
            format!(
                "the gateway runs with another key: restart it so it reads this one \
                 ({restart}), or set {} to the key it runs with",
                config.key_origin()
            ),
        )),
        _ => None,
    }
}

/// How to restart a running gateway by hand: `hermes gateway restart` when `hermes` is on
/// `PATH`, else the app's gateway restart (which runs the wake chain's stop and start).
pub fn restart_hint(platform: Platform) -> String {
    let service = service_command(platform, "restart");
    match (which("hermes"), service) {
        (Some(_), _) => "`hermes gateway restart`, or the app's gateway restart".into(),
        (None, Some(service)) => {
            format!("`{service}` if it runs as a service, or the app's gateway restart")
        }
        (None, None) => "the app's gateway restart, or stop it and start it again".into(),
    }
}

/// A reason the gateway cannot serve chat, named the way users meet it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No `~/.hermes` and no `hermes` command: Hermes Agent is not installed.
    NotInstalled,
    /// The API server platform is not enabled.
    NotEnabled,
    /// `API_SERVER_KEY` is not set anywhere.
    KeyMissing,
    /// `API_SERVER_KEY` is shorter than 16 characters (its length).
    KeyTooShort(usize),
    /// `API_SERVER_KEY` is a placeholder such as `changeme`.
    KeyPlaceholder,
    /// The Python running the gateway has no `aiohttp`, so the API server never binds.
    AiohttpMissing {
        /// The Python (venv) that lacks it.
        python: PathBuf,
    },
    /// Something other than the gateway holds the port.
    PortHeld {
        /// `host:port`.
        addr: String,
        /// It is another user's program: nothing, the key included, is sent to it.
        another_user: bool,
    },
}

impl Problem {
    /// A short machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::NotInstalled => "not_installed",
            Problem::NotEnabled => "api_server_not_enabled",
            Problem::KeyMissing => "api_server_key_missing",
            Problem::KeyTooShort(_) => "api_server_key_too_short",
            Problem::KeyPlaceholder => "api_server_key_placeholder",
            Problem::AiohttpMissing { .. } => "aiohttp_missing",
            Problem::PortHeld { .. } => "port_held",
        }
    }

    /// What to run or change to fix it.
    pub fn fix(&self, config: &HermesConfig) -> String {
        // The `.env` of the Hermes home in use (`HERMES_HOME`), not always `~/.hermes`.
        let env_file = config.home.join(".env");
        let env_file = env_file.display();
        match self {
            Problem::NotInstalled => {
                "install Hermes Agent (pip install hermes-agent aiohttp, or its installer)".into()
            }
            Problem::NotEnabled | Problem::KeyMissing | Problem::KeyPlaceholder => format!(
                "add to {env_file}: API_SERVER_ENABLED=true and API_SERVER_KEY=$(openssl rand \
                 -hex 32), then start the gateway"
            ),
            Problem::KeyTooShort(_) => {
                format!("set a longer key in {env_file}: API_SERVER_KEY=$(openssl rand -hex 32)")
            }
            Problem::AiohttpMissing { python } => {
                format!("{} -m pip install aiohttp", python.display())
            }
            Problem::PortHeld { addr, .. } => {
                let port = addr.rsplit(':').next().unwrap_or("8642");
                format!(
                    "find the process with: lsof -nP -iTCP:{port} -sTCP:LISTEN — stop it, or set \
                     API_SERVER_PORT in {env_file}"
                )
            }
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotInstalled => f.write_str("Hermes Agent does not seem to be installed"),
            Problem::NotEnabled => f.write_str("the gateway's API server is not enabled"),
            Problem::KeyMissing => f.write_str("API_SERVER_KEY is missing"),
            Problem::KeyTooShort(n) => write!(
                f,
                "API_SERVER_KEY is too short ({n} characters; the gateway needs at least \
                 {MIN_KEY_LEN})"
            ),
            Problem::KeyPlaceholder => {
                f.write_str("API_SERVER_KEY is a placeholder the gateway refuses")
            }
            Problem::AiohttpMissing { .. } => {
                f.write_str("aiohttp is missing, so the gateway's API server never binds")
            }
            Problem::PortHeld { addr, another_user: false } => {
                write!(f, "port {addr} is held by something else (it does not answer /health)")
            }
            Problem::PortHeld { addr, another_user: true } => write!(
                f,
                "port {addr} is held by another user's program (nothing, your key included, is \
                 sent to it)"
            ),
        }
    }
}

/// Finds `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

/// True for an executable regular file (following symlinks).
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The Python that runs the gateway: the standard venv, else the interpreter of `hermes` on
/// `PATH` (its shebang).
fn gateway_python(hermes_home: &Path) -> Option<PathBuf> {
    let venv = venv_python(hermes_home);
    if is_executable(&venv) {
        return Some(venv);
    }
    let hermes = which("hermes")?;
    let mut head = [0u8; 256];
    let n = fs::File::open(&hermes).and_then(|mut f| f.read(&mut head)).ok()?;
    let line = String::from_utf8_lossy(&head[..n]);
    let first = line.lines().next()?.strip_prefix("#!")?.trim();
    let python = PathBuf::from(first.split_whitespace().next()?);
    is_executable(&python).then_some(python)
}

/// True when the venv around `python` (`<venv>/bin/python`) has an `aiohttp` package.
/// `None` when there is no venv layout to look into.
fn has_aiohttp(python: &Path) -> Option<bool> {
    let venv = python.parent()?.parent()?;
    let lib = venv.join("lib");
    let entries = fs::read_dir(&lib).ok()?;
    let mut looked = false;
    for entry in entries.flatten() {
        let site = entry.path().join("site-packages");
        if site.is_dir() {
            looked = true;
            if site.join("aiohttp").is_dir() {
                return Some(true);
            }
        }
    }
    looked.then_some(false)
}

/// What stands between the gateway and a working API server, from its configuration, its
/// install and the port (`health` from a fresh [`probe`]).
pub fn diagnose(config: &HermesConfig, health: Health) -> Vec<Problem> {
    let mut problems = Vec::new();
    if matches!(health, Health::Unhealthy | Health::Foreign) {
        let another_user = health == Health::Foreign;
        problems.push(Problem::PortHeld { addr: config.addr(), another_user });
    }
    if health == Health::Ready {
        return problems;
    }
    let python = gateway_python(&config.home);
    if !config.installed && python.is_none() && which("hermes").is_none() {
        problems.push(Problem::NotInstalled);
        return problems;
    }
    if !config.enabled {
        problems.push(Problem::NotEnabled);
    }
    if let Some(p) = config.key_problem()
        && (config.enabled || p != Problem::KeyMissing)
    {
        problems.push(p);
    }
    if let Some(python) = python
        && has_aiohttp(&python) == Some(false)
    {
        problems.push(Problem::AiohttpMissing { python });
    }
    problems
}

/// Problems recognised in gateway output (ours and Hermes' own logs).
fn problems_in_log(text: &str, config: &HermesConfig) -> Vec<Problem> {
    let mut found = Vec::new();
    if text.contains("aiohttp not installed") || text.contains("No module named 'aiohttp'") {
        let python = gateway_python(&config.home).unwrap_or_else(|| venv_python(&config.home));
        found.push(Problem::AiohttpMissing { python });
    }
    if text.contains("Refusing to start: API_SERVER_KEY is required") {
        found.push(Problem::KeyMissing);
    }
    if text.contains("Refusing to start: API_SERVER_KEY is a") {
        found.push(config.key_problem().unwrap_or(Problem::KeyTooShort(0)));
    }
    if text.contains("address already in use") || text.contains("Address already in use") {
        found.push(Problem::PortHeld { addr: config.addr(), another_user: false });
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The wake chain

/// What the chain is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start when down (nothing when already up).
    Start,
    /// Stop, then start.
    Restart,
    /// Stop.
    Stop,
}

impl Action {
    /// `start`, `restart`, `stop`.
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "start" => Some(Action::Start),
            "restart" => Some(Action::Restart),
            "stop" => Some(Action::Stop),
            _ => None,
        }
    }

    /// The query word.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Restart => "restart",
            Action::Stop => "stop",
        }
    }
}

/// The platform, which decides the service-manager steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// launchd.
    MacOs,
    /// systemd (user units).
    Linux,
    /// Neither service manager.
    Other,
}

impl Platform {
    /// The platform this binary runs on.
    pub fn current() -> Platform {
        if cfg!(target_os = "macos") {
            Platform::MacOs
        } else if cfg!(target_os = "linux") {
            Platform::Linux
        } else {
            Platform::Other
        }
    }
}

/// One step of the chain and how it went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// Short name: `launchd`, `systemd`, `venv`, `hermes`, `pid`.
    pub name: String,
    /// The command as a user would type it.
    pub command: String,
    /// `ok`, `failed`, `skipped` or `timeout`.
    pub outcome: String,
    /// What happened (exit status, last output line, why skipped).
    pub detail: String,
}

/// The outcome of [`Chain::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The action run.
    pub action: Action,
    /// `/health` answered before anything was done.
    pub was_online: bool,
    /// `/health` answers now.
    pub online: bool,
    /// The step that brought the gateway up (`None` when it was up already or nothing did).
    pub started_via: Option<String>,
    /// Steps attempted, in order.
    pub steps: Vec<Step>,
    /// What is wrong, by name.
    pub problems: Vec<Problem>,
    /// Where the gateway was looked for.
    pub addr: String,
}

impl Report {
    /// True when the action achieved its aim (up for start/restart, down for stop).
    pub fn ok(&self) -> bool {
        match self.action {
            Action::Stop => !self.online,
            Action::Start | Action::Restart => self.online,
        }
    }

    /// The JSON the built-in backend answers with (`log` added by the caller); `config` is the
    /// chain's, whose files the fixes name.
    pub fn to_json(&self, config: &HermesConfig) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok(),
            "action": self.action.as_str(),
            "gateway": if self.online { "online" } else { "offline" },
            "wasOnline": self.was_online,
            "startedVia": self.started_via,
            "url": format!("http://{}", self.addr),
            "attempted": self.steps,
            "problems": self.problems.iter().map(|p| serde_json::json!({
                "code": p.code(), "message": p.to_string(), "fix": p.fix(config),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The wake chain with everything it depends on spelled out (tests build one by hand).
#[derive(Debug, Clone)]
pub struct Chain {
    /// Which service-manager steps apply.
    pub platform: Platform,
    /// The gateway configuration (address, Hermes home).
    pub config: HermesConfig,
    /// Our state directory: `gateway.log`, `gateway.pid`.
    pub state_dir: PathBuf,
    /// Overall deadline of one run.
    pub deadline: Duration,
}

impl Chain {
    /// The chain for this machine, with the current configuration.
    pub fn new(state_dir: &Path, deadline: Duration) -> Chain {
        Chain {
            platform: Platform::current(),
            config: HermesConfig::load(),
            state_dir: state_dir.to_path_buf(),
            deadline,
        }
    }

    /// `gateway.log` in the state directory.
    pub fn log_path(&self) -> PathBuf {
        state::gateway_log(&self.state_dir)
    }

    /// `gateway.pid` in the state directory: the gateway we spawned.
    pub fn pid_path(&self) -> PathBuf {
        self.state_dir.join("gateway.pid")
    }

    /// `gateway.lock` in the state directory: held while a chain runs, so that two (a pairing
    /// and a boot bridge, say) never start two gateways, which would both answer the user's
    /// messaging platforms.
    pub fn lock_path(&self) -> PathBuf {
        state::gateway_lock(&self.state_dir)
    }

    /// The user id for `gui/<uid>`.
    fn uid() -> u32 {
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() }
    }

    /// Runs `action`: the applicable steps in order, each followed by a bounded wait for
    /// `/health`, until the aim is reached or the deadline passes.
    pub fn run(&self, action: Action) -> Report {
        // One chain at a time; the next one starts from what the previous one left, with its
        // whole deadline from then on.
        let path = self.lock_path();
        let lock = state::ensure_dir(&self.state_dir).and_then(|()| {
            if let Some(lock) = state::FileLock::acquire_until(&path, Instant::now())? {
                return Ok(Some((lock, false)));
            }
            let lock = state::FileLock::acquire_until(&path, Instant::now() + self.deadline)?;
            Ok(lock.map(|lock| (lock, true)))
        });
        let (_lock, waited) = match lock {
            Ok(Some((lock, waited))) => (Some(lock), waited),
            Ok(None) => return self.busy_report(action),
            // No lock file (a read-only state directory): run unguarded rather than not at all.
            Err(_) => (None, false),
        };
        let until = Instant::now() + self.deadline;
        let health = probe(&self.config);
        let was_online = health == Health::Ready;
        let mut report = Report {
            action,
            was_online,
            online: was_online,
            started_via: None,
            steps: Vec::new(),
            problems: Vec::new(),
            addr: self.config.addr(),
        };
        // A restart asked for while another chain ran, which left the gateway up: that one
        // started it just now; stopping it again would only risk leaving it down.
        if waited && was_online && action == Action::Restart {
            return report;
        }
        if matches!(action, Action::Stop | Action::Restart) {
            self.stop_steps(&mut report, until);
            if action == Action::Stop {
                return report;
            }
        } else if was_online {
            return report;
        }
        let health = probe(&self.config);
        report.problems = diagnose(&self.config, health);
        if health == Health::Ready {
            report.online = true;
            return report;
        }
        if !report.problems.is_empty() {
            report.steps.push(Step {
                name: "diagnose".into(),
                command: String::new(),
                outcome: "failed".into(),
                detail: format!(
                    "not starting the gateway: {}",
                    report.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")
                ),
            });
            return report;
        }
        self.start_steps(&mut report, until);
        report
    }

    /// What a chain that waited its whole deadline for another one reports.
    fn busy_report(&self, action: Action) -> Report {
        let online = probe(&self.config) == Health::Ready;
        Report {
            action,
            was_online: online,
            online,
            started_via: None,
            steps: vec![Step {
                name: "lock".into(),
                command: String::new(),
                outcome: "busy".into(),
                detail: format!(
                    "another wake-up of the gateway held {} for the whole deadline",
                    self.lock_path().display()
                ),
            }],
            problems: Vec::new(),
            addr: self.config.addr(),
        }
    }

    /// The start steps, in order, until `/health` answers.
    fn start_steps(&self, report: &mut Report, until: Instant) {
        let uid = Chain::uid();
        let python = venv_python(&self.config.home);
        let python_cmd = format!("{} -m hermes_cli.main gateway run", python.display());
        let mut steps: Vec<Launcher<'_>> = Vec::new();
        if self.platform == Platform::MacOs {
            let target = format!("gui/{uid}/{LAUNCHD_LABEL}");
            let cmd = format!("launchctl kickstart -k {target}");
            steps.push((
                "launchd",
                cmd,
                Box::new(move |c: &Chain| c.command("launchctl", &["kickstart", "-k", &target])),
            ));
        }
        if self.platform == Platform::Linux {
            steps.push((
                "systemd",
                format!("systemctl --user start {SYSTEMD_UNIT}"),
                Box::new(|c: &Chain| c.command("systemctl", &["--user", "start", SYSTEMD_UNIT])),
            ));
        }
        steps.push(("venv", python_cmd, Box::new(|c: &Chain| c.spawn_venv())));
        steps.push((
            "hermes",
            "hermes gateway start".into(),
            Box::new(|c: &Chain| c.command("hermes", &["gateway", "start"])),
        ));
        for (name, command, launch) in steps {
            if Instant::now() >= until {
                break;
            }
            let log_from = self.log_len();
            let launched = launch(self);
            let (outcome, mut detail, child_pid) = match launched {
                Launched::Skipped(why) => ("skipped", why, None),
                Launched::Failed(why) => ("failed", why, None),
                Launched::Started { detail, pid } => ("ok", detail, pid),
            };
            if outcome != "ok" {
                report.steps.push(Step {
                    name: name.into(),
                    command,
                    outcome: outcome.into(),
                    detail,
                });
                continue;
            }
            let step_until = until.min(Instant::now() + STEP_WAIT);
            let waited = self.wait_health(true, step_until, child_pid, log_from);
            let outcome = match &waited {
                Waited::Reached => "ok",
                Waited::Problems(found) => {
                    for p in found {
                        if !report.problems.contains(p) {
                            report.problems.push(p.clone());
                        }
                    }
                    detail = format!(
                        "{detail}; the gateway reported: {}",
                        found.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")
                    );
                    "failed"
                }
                Waited::Exited(status) => {
                    detail = format!("{detail}; the gateway exited ({status})");
                    "failed"
                }
                Waited::Timeout => {
                    detail = format!("{detail}; /health did not answer in time");
                    "timeout"
                }
            };
            report.steps.push(Step { name: name.into(), command, outcome: outcome.into(), detail });
            if matches!(waited, Waited::Reached) {
                report.online = true;
                report.started_via = Some(name.to_owned());
                return;
            }
            if matches!(waited, Waited::Problems(_)) {
                // The configuration is at fault: another launcher would fail the same way.
                if name == "venv" {
                    self.kill_recorded();
                }
                return;
            }
        }
        report.online = probe(&self.config) == Health::Ready;
    }

    /// The stop steps, in order, until `/health` stops answering.
    fn stop_steps(&self, report: &mut Report, until: Instant) {
        let uid = Chain::uid();
        let mut steps: Vec<Launcher<'_>> = Vec::new();
        if self.platform == Platform::MacOs {
            let target = format!("gui/{uid}/{LAUNCHD_LABEL}");
            steps.push((
                "launchd",
                format!("launchctl kill SIGTERM {target}"),
                Box::new(move |c: &Chain| c.command("launchctl", &["kill", "SIGTERM", &target])),
            ));
        }
        if self.platform == Platform::Linux {
            steps.push((
                "systemd",
                format!("systemctl --user stop {SYSTEMD_UNIT}"),
                Box::new(|c: &Chain| c.command("systemctl", &["--user", "stop", SYSTEMD_UNIT])),
            ));
        }
        steps.push((
            "pid",
            format!("kill $(cat {})", self.pid_path().display()),
            Box::new(|c: &Chain| c.kill_recorded()),
        ));
        steps.push((
            "hermes",
            "hermes gateway stop".into(),
            Box::new(|c: &Chain| c.command("hermes", &["gateway", "stop"])),
        ));
        for (name, command, launch) in steps {
            if probe(&self.config) != Health::Ready || Instant::now() >= until {
                break;
            }
            let (outcome, mut detail) = match launch(self) {
                Launched::Skipped(why) => ("skipped", why),
                Launched::Failed(why) => ("failed", why),
                Launched::Started { detail, .. } => ("ok", detail),
            };
            let mut outcome = outcome.to_owned();
            if outcome == "ok" {
                let step_until = until.min(Instant::now() + Duration::from_secs(6));
                if !matches!(self.wait_health(false, step_until, None, 0), Waited::Reached) {
                    outcome = "timeout".into();
                    detail = format!("{detail}; /health still answers");
                }
            }
            report.steps.push(Step { name: name.into(), command, outcome, detail });
        }
        report.online = probe(&self.config) == Health::Ready;
    }

    /// Bytes in `gateway.log` now (0 when missing).
    fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map_or(0, |m| m.len())
    }

    /// Opens `gateway.log` for append (0600), creating the state directory if needed.
    fn open_log(&self) -> io::Result<fs::File> {
        state::ensure_dir(&self.state_dir)?;
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new().create(true).append(true).mode(0o600).open(self.log_path())
    }

    /// Appends a marker line to `gateway.log`.
    fn log_line(&self, text: &str) {
        if let Ok(mut f) = self.open_log() {
            let ts = crate::bridge::format_ts(crate::relay::now_ms());
            let _ = writeln!(f, "== {ts} hermeschat-pair: {text}");
        }
    }

    /// Runs a service-manager command from `PATH` with a deadline, output to `gateway.log`.
    fn command(&self, program: &str, args: &[&str]) -> Launched {
        let Some(path) = which(program) else {
            return Launched::Skipped(format!("{program} not found on PATH"));
        };
        let shown = format!("{program} {}", args.join(" "));
        self.log_line(&format!("running {shown}"));
        let from = self.log_len();
        let log = match self.open_log() {
            Ok(f) => f,
            Err(e) => return Launched::Failed(format!("cannot open gateway.log: {e}")),
        };
        let err = match log.try_clone() {
            Ok(f) => f,
            Err(e) => return Launched::Failed(format!("cannot open gateway.log: {e}")),
        };
        let mut cmd = Command::new(&path);
        cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: restore_open_file_limit is async-signal-safe (get/setrlimit only). A
            // `hermes gateway start` may leave a gateway running with what it inherits.
            unsafe {
                cmd.pre_exec(|| {
                    crate::poll::restore_open_file_limit();
                    Ok(())
                });
            }
        }
        let child = cmd.spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return Launched::Failed(format!("cannot run {shown}: {e}")),
        };
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break None,
            }
        };
        let output = self.log_since(from);
        let last = output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        let last = truncate_chars(last, 300);
        match status {
            Some(s) if s.success() => {
                Launched::Started { detail: format!("{shown}: exit 0"), pid: None }
            }
            Some(s) => Launched::Failed(format!(
                "{shown}: {s}{}",
                if last.is_empty() { String::new() } else { format!(": {last}") }
            )),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Launched::Failed(format!(
                    "{shown}: no answer within {} s",
                    COMMAND_TIMEOUT.as_secs()
                ))
            }
        }
    }

    /// Spawns the venv's `python -m hermes_cli.main gateway run`, detached (its own session,
    /// stdin null, output appended to `gateway.log`), and records its pid.
    fn spawn_venv(&self) -> Launched {
        let python = venv_python(&self.config.home);
        if !is_executable(&python) {
            return Launched::Skipped(format!("{} not found", python.display()));
        }
        self.log_line(&format!("starting {} -m hermes_cli.main gateway run", python.display()));
        let (log, err) = match self.open_log().and_then(|f| f.try_clone().map(|c| (f, c))) {
            Ok(pair) => pair,
            Err(e) => return Launched::Failed(format!("cannot open gateway.log: {e}")),
        };
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "hermes_cli.main", "gateway", "run"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .current_dir(&self.config.home);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid and restore_open_file_limit (get/setrlimit) are async-signal-safe
            // and touch no memory of ours. setsid detaches the gateway from our session so a
            // terminal hang-up or our exit leaves it running; the gateway gets the open-file
            // limit we started with, not the one the bridge raised for itself.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    crate::poll::restore_open_file_limit();
                    Ok(())
                });
            }
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id();
                if let Err(e) = state::write_atomic(&self.pid_path(), pid.to_string().as_bytes()) {
                    self.log_line(&format!("cannot write gateway.pid: {e}"));
                }
                reap(child);
                Launched::Started { detail: format!("spawned (pid {pid})"), pid: Some(pid) }
            }
            Err(e) => Launched::Failed(format!("cannot run {}: {e}", python.display())),
        }
    }

    /// Stops the gateway whose pid we recorded (when that process still looks like Hermes).
    fn kill_recorded(&self) -> Launched {
        let path = self.pid_path();
        let Some(pid) = fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<i32>().ok())
        else {
            return Launched::Skipped("no gateway started by hermeschat-pair".into());
        };
        if pid <= 1 || !alive(pid) {
            let _ = fs::remove_file(&path);
            return Launched::Skipped(format!("recorded gateway pid {pid} is not running"));
        }
        if !looks_like_hermes(pid) {
            let _ = fs::remove_file(&path);
            return Launched::Skipped(format!("pid {pid} is no longer a Hermes gateway"));
        }
        // SAFETY: plain kill(2) on a pid we started and just checked.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(8);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let detail = if alive(pid) {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            format!("pid {pid} killed (SIGTERM was not enough)")
        } else {
            format!("pid {pid} stopped")
        };
        let _ = fs::remove_file(&path);
        Launched::Started { detail, pid: None }
    }

    /// Polls `/health` until it is `up` (or down), the deadline passes, the spawned process
    /// exits, or the gateway's output names a known problem.
    fn wait_health(&self, up: bool, until: Instant, pid: Option<u32>, log_from: u64) -> Waited {
        let hermes_log = self.config.home.join("logs").join("gateway.log");
        let hermes_from = fs::metadata(&hermes_log).map_or(0, |m| m.len());
        loop {
            let ready = probe(&self.config) == Health::Ready;
            if ready == up {
                return Waited::Reached;
            }
            if up {
                let mut text = self.log_since(log_from);
                text.push_str(&read_from(&hermes_log, hermes_from, 64 << 10));
                let found = problems_in_log(&text, &self.config);
                if !found.is_empty() {
                    return Waited::Problems(found);
                }
                if let Some(pid) = pid
                    && !alive(pid as i32)
                {
                    return Waited::Exited("process gone".into());
                }
            }
            if Instant::now() >= until {
                return Waited::Timeout;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `gateway.log` from byte `from` on (at most 64 KiB), without the key.
    fn log_since(&self, from: u64) -> String {
        self.config.redact(&read_from(&self.log_path(), from, 64 << 10))
    }

    /// The last `max` bytes of `gateway.log`, without the key.
    pub fn log_tail(&self, max: u64) -> String {
        self.config.redact(&log_tail(&self.log_path(), max))
    }
}

/// Reads up to `max` bytes of `path` from byte `from` (lossy UTF-8; empty on any error).
fn read_from(path: &Path, from: u64, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else { return String::new() };
    // Emptied since `from` was taken (trimmed in place): all of it is new.
    let from = if f.metadata().is_ok_and(|m| m.len() < from) { 0 } else { from };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `max` bytes of `path` (lossy UTF-8, starting at a line boundary when possible).
fn log_tail(path: &Path, max: u64) -> String {
    let len = fs::metadata(path).map_or(0, |m| m.len());
    let text = read_from(path, len.saturating_sub(max), max);
    if len > max {
        match text.find('\n') {
            Some(i) => text[i + 1..].to_owned(),
            None => text,
        }
    } else {
        text
    }
}

/// At most `n` characters of `s`.
fn truncate_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A step of the chain: name, the command as shown, and what runs it.
type Launcher<'a> = (&'a str, String, Box<dyn Fn(&Chain) -> Launched + 'a>);

/// How a launcher went.
enum Launched {
    /// Does not apply here (command or file missing).
    Skipped(String),
    /// Ran and failed.
    Failed(String),
    /// Ran; the gateway should come up (or down).
    Started {
        /// What ran and how it exited.
        detail: String,
        /// The pid, when we spawned the gateway ourselves.
        pid: Option<u32>,
    },
}

/// How a wait for `/health` ended.
enum Waited {
    /// The wanted state was reached.
    Reached,
    /// The gateway's output names problems.
    Problems(Vec<Problem>),
    /// The spawned process exited.
    Exited(String),
    /// The deadline passed.
    Timeout,
}

/// Waits for a detached child on a thread, so it never lingers as a zombie.
fn reap(mut child: Child) {
    let _ = std::thread::Builder::new().name("gateway-reaper".into()).spawn(move || {
        let _ = child.wait();
    });
}

/// True when `pid` exists (and is not a zombie on Linux).
fn alive(pid: i32) -> bool {
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
        return !matches!(state, Some('Z' | 'X') | None);
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// True when `pid`'s command line mentions Hermes.
fn looks_like_hermes(pid: i32) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .or_else(|_| {
            Command::new("ps")
                .args(["-o", "command=", "-p", &pid.to_string()])
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        })
        .unwrap_or_default();
    cmdline.contains("hermes")
}

/// A command that starts the gateway by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartCommand {
    /// The command line, ready to paste.
    pub command: String,
    /// It runs the gateway in the foreground (no service manager needed; it lives as long as
    /// the terminal).
    pub foreground: bool,
}

impl fmt::Display for StartCommand {
    /// The command, with a shell comment on the foreground ones (so the line stays pasteable).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.command)?;
        if self.foreground {
            f.write_str("  # in the foreground, no service needed (keep the terminal open)")?;
        }
        Ok(())
    }
}

/// The service manager's command that starts (`verb` "start") or restarts the gateway's
/// service, when `hermes gateway install` installed one here (its unit or LaunchAgent file
/// exists) and the manager's program is on `PATH`: suggesting it otherwise only earns "Unit
/// not found" or "Could not find service".
fn service_command(platform: Platform, verb: &str) -> Option<String> {
    match platform {
        Platform::Linux => {
            let unit = format!(".config/systemd/user/{SYSTEMD_UNIT}.service");
            (home_dir().join(unit).is_file() && which("systemctl").is_some())
                .then(|| format!("systemctl --user {verb} {SYSTEMD_UNIT}"))
        }
        Platform::MacOs => {
            let plist = format!("Library/LaunchAgents/{LAUNCHD_LABEL}.plist");
            (home_dir().join(plist).is_file() && which("launchctl").is_some())
                .then(|| format!("launchctl kickstart -k gui/{}/{LAUNCHD_LABEL}", Chain::uid()))
        }
        Platform::Other => None,
    }
}

/// The commands a user can run by hand to start the gateway here, only those whose program
/// exists: the service manager's (with `hermes gateway start`, which uses it) when the
/// gateway's service is installed (its unit or LaunchAgent file exists), then `hermes gateway
/// run` in the foreground (what Hermes itself suggests on machines without a service), else
/// the venv's python when `hermes` is not on `PATH`. Empty when none of them exists. Serves
/// the pairing line, `--doctor` and the chat error alike.
pub fn manual_commands(config: &HermesConfig, platform: Platform) -> Vec<StartCommand> {
    let service = service_command(platform, "start");
    let hermes = which("hermes").is_some();
    let background = |command: String| StartCommand { command, foreground: false };
    let mut cmds = Vec::new();
    if let Some(service) = service {
        if hermes {
            cmds.push(background("hermes gateway start".into()));
        }
        cmds.push(background(service));
    }
    let venv = venv_python(&config.home);
    if hermes {
        cmds.push(StartCommand { command: "hermes gateway run".into(), foreground: true });
    } else if is_executable(&venv) {
        cmds.push(StartCommand {
            command: format!("{} -m hermes_cli.main gateway run", venv.display()),
            foreground: true,
        });
    }
    cmds
}

/// [`manual_commands`] as one sentence (for the chat error and the wake-up's log line), or,
/// when none exists here, what is missing.
pub fn start_hint(config: &HermesConfig, platform: Platform) -> String {
    let cmds = manual_commands(config, platform);
    if cmds.is_empty() {
        return format!(
            "nothing here can start it (no `hermes` on PATH, no {}): install Hermes Agent, then \
             run `hermes gateway run`",
            venv_python(&config.home).display()
        );
    }
    let shown: Vec<String> = cmds
        .iter()
        .map(|c| {
            let note = if c.foreground { " (in the foreground, no service needed)" } else { "" };
            format!("`{}`{note}", c.command)
        })
        .collect();
    format!("start it with {}", shown.join(" or "))
}

// ---------------------------------------------------------------------------------------------
// The bridge's wake-up at start

/// How long a bridge started at boot waits for the gateway to come up by itself before it runs
/// the wake chain.
pub const BOOT_GRACE: Duration = Duration::from_secs(10);

/// Runs the wake chain once in a background thread (after [`BOOT_GRACE`], bounded by
/// [`ENSURE_DEADLINE`]) and logs
/// its outcome with [`crate::bridge::log`]. For a bridge started without the pairing command
/// (the boot service's `--foreground`): after a reboot nothing else would bring the gateway
/// up, and chat would answer `gateway_offline` until the user ran `hermeschat-pair` again.
pub fn wake_in_background(state_dir: PathBuf) {
    let spawned = std::thread::Builder::new().name("gateway-wake".into()).spawn(move || {
        let chain = Chain::new(&state_dir, ENSURE_DEADLINE);
        // At boot the gateway's own service may be starting too: give it a moment before
        // starting (or, on macOS, kickstarting) anything.
        let grace = Instant::now() + BOOT_GRACE;
        while Instant::now() < grace && probe(&chain.config) != Health::Ready {
            std::thread::sleep(Duration::from_secs(1));
        }
        let report = chain.run(Action::Start);
        let addr = &report.addr;
        let line = if report.was_online {
            format!("Hermes gateway online ({addr})")
        } else if report.online {
            let via = report.started_via.as_deref().unwrap_or("the wake chain");
            format!("Hermes gateway started via {via} ({addr})")
        } else {
            let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
            let busy = report.steps.iter().any(|s| s.name == "lock" && s.outcome == "busy");
            let why = if busy {
                "another wake-up of it (the pairing command's, or the built-in backend's) took \
                 the whole time"
                    .into()
            } else if problems.is_empty() {
                "nothing could start it".into()
            } else {
                problems.join("; ")
            };
            format!(
                "Hermes gateway not running ({addr}): {why}; chat needs it: run hermeschat-pair \
                 --doctor, or {}",
                start_hint(&chain.config, chain.platform)
            )
        };
        crate::bridge::log(&line);
    });
    if let Err(e) = spawned {
        crate::bridge::log(&format!("cannot start the gateway wake-up: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// The pairing command's line

/// Makes sure the gateway runs, for pairing: probes, runs the wake chain when it is down
/// (bounded by [`ENSURE_DEADLINE`]), and prints exactly one status line — online, started via
/// X, or not running with the reason — plus the manual commands when it failed. Never fails.
pub fn ensure(out: &Out) {
    let dir = state::state_dir();
    let chain = Chain::new(&dir, ENSURE_DEADLINE);
    let report = chain.run(Action::Start);
    let addr = &report.addr;
    if report.was_online || report.online {
        let line = if report.was_online {
            format!("Hermes Gateway online ({addr})")
        } else {
            let via = match report.started_via.as_deref() {
                Some("launchd") => "launchd",
                Some("systemd") => "systemd",
                Some("venv") => "the Hermes venv",
                Some("hermes") => "hermes gateway start",
                _ => "the wake chain",
            };
            format!("Hermes Gateway started (via {via}) ({addr})")
        };
        // Up is not enough: every chat fails when the gateway refuses the key.
        let check = check_key(&chain.config, KEY_CHECK_TIMEOUT);
        print_online(out, &chain.config, chain.platform, &line, &check);
        return;
    }
    let reason = if report.problems.is_empty() {
        let tried: Vec<String> =
            report.steps.iter().map(|s| format!("{}: {}", s.name, s.detail)).collect();
        if tried.is_empty() { "nothing to try".to_owned() } else { tried.join("; ") }
    } else {
        report.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")
    };
    out.warn(&format!(
        "Hermes Gateway not running ({addr}); automatic start failed: {reason}. Chat needs it; \
         pairing continues."
    ));
    for p in &report.problems {
        out.info(&format!("Fix: {}", p.fix(&chain.config)));
    }
    let cmds = manual_commands(&chain.config, chain.platform);
    if cmds.is_empty() {
        out.info(&format!("Then: {}", start_hint(&chain.config, chain.platform)));
    } else {
        out.info("Start it by hand with one of:");
        for cmd in cmds {
            out.info(&format!("  {cmd}"));
        }
    }
    out.info(&format!("Log: {}", chain.log_path().display()));
}

/// Prints the line of a gateway that is up: `✓ line` when it accepts the key (or the check
/// could not tell), else `⚠ line, but …` with what is wrong with the key and the fix. For the
/// pairing command and `--status`.
pub fn print_online(
    out: &Out,
    config: &HermesConfig,
    platform: Platform,
    line: &str,
    check: &KeyCheck,
) {
    match key_trouble(config, check, platform) {
        None => out.ok(line),
        Some((what, fix)) => {
            out.warn(&format!("{line}, but {what}: every chat fails until this is fixed"));
            out.info(&format!("Fix: {fix}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_and_yaml() {
        let env = parse_dotenv(
            "# c\nexport API_SERVER_KEY=\"abc def\"\nAPI_SERVER_PORT=9000 # port\nX='q'\nbad\n",
        );
        assert_eq!(env["API_SERVER_KEY"], "abc def");
        assert_eq!(env["API_SERVER_PORT"], "9000");
        assert_eq!(env["X"], "q");
        let yaml = "model:\n  default: x\nplatforms:\n  api_server:\n    enabled: true # on\n    \
                    extra:\n      port: 9100\n      key: \"k\"\n  other:\n    enabled: false\n";
        assert_eq!(
            yaml_lookup(yaml, &["platforms", "api_server", "enabled"]).as_deref(),
            Some("true")
        );
        assert_eq!(
            yaml_lookup(yaml, &["platforms", "api_server", "extra", "port"]).as_deref(),
            Some("9100")
        );
        assert_eq!(yaml_lookup(yaml, &["platforms", "other", "extra", "port"]), None);
    }

    #[test]
    fn the_key_is_redacted_from_what_the_gateway_printed() {
        let dir = std::env::temp_dir();
        let key = "k3y-0123456789abcdef";
        let config = HermesConfig::from_sources(&dir, |n| {
            (n == "API_SERVER_KEY").then(|| format!(" {key} "))
        });
        let text = format!("starting with API_SERVER_KEY={key}\nbind failed ({key})");
        let clean = config.redact(&text);
        assert!(!clean.contains(key), "{clean}");
        assert_eq!(clean.matches("<redacted>").count(), 2, "{clean}");
        let keyless = HermesConfig::from_sources(&dir, |_| None);
        assert_eq!(keyless.redact("as it was"), "as it was");
    }

    #[test]
    fn a_chain_waits_for_one_already_running_and_starts_nothing_meanwhile() {
        let dir = std::env::temp_dir().join(format!("hc-gw-lock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let config = HermesConfig::from_sources(&dir, |n| {
            (n == URL_ENV).then(|| format!("http://{closed}"))
        });
        let chain = Chain {
            platform: Platform::Other,
            config,
            state_dir: dir.clone(),
            deadline: Duration::from_millis(300),
        };
        let held = state::FileLock::acquire(&chain.lock_path()).unwrap();
        let started = Instant::now();
        let report = chain.run(Action::Start);
        assert!(started.elapsed() >= Duration::from_millis(300), "it did not wait");
        assert_eq!(report.steps.len(), 1, "{:?}", report.steps);
        assert_eq!(
            (report.steps[0].name.as_str(), report.steps[0].outcome.as_str()),
            ("lock", "busy")
        );
        assert!(!report.online);
        assert!(!dir.join("gateway.pid").exists(), "a gateway was started meanwhile");
        // Released: the next one takes it at once.
        drop(held);
        let lock = state::FileLock::acquire_until(&chain.lock_path(), Instant::now()).unwrap();
        assert!(lock.is_some(), "the lock was not released");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_precedence_and_key_checks() {
        let dir = std::env::temp_dir().join(format!("hc-gw-cfg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(".env"), "API_SERVER_KEY=short\nAPI_SERVER_PORT=9001\n").unwrap();
        let c = HermesConfig::from_sources(&dir, |_| None);
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 9001));
        assert!(c.enabled);
        assert_eq!(c.key_problem(), Some(Problem::KeyTooShort(5)));
        assert!(!format!("{c:?}").contains("short"), "Debug shows the key");
        let c = HermesConfig::from_sources(&dir, |n| match n {
            "API_SERVER_KEY" => Some("0123456789abcdef".into()),
            URL_ENV => Some("http://127.0.0.1:1234".into()),
            _ => None,
        });
        assert_eq!((c.port, c.key_problem()), (1234, None));
        fs::write(dir.join(".env"), "API_SERVER_KEY=changeme\n").unwrap();
        let c = HermesConfig::from_sources(&dir, |_| None);
        assert_eq!(c.key_problem(), Some(Problem::KeyPlaceholder));
        fs::write(dir.join(".env"), "").unwrap();
        let c = HermesConfig::from_sources(&dir, |_| None);
        assert!(!c.enabled);
        assert_eq!(diagnose(&c, Health::NotListening)[0], Problem::NotEnabled);
        assert_eq!(c.key_source, None);
        fs::write(dir.join("config.yaml"), "platforms:\n  api_server:\n    extra:\n      key: k\n")
            .unwrap();
        let k = HermesConfig::from_sources(&dir, |_| None);
        assert_eq!(k.key_source, Some(KeySource::ConfigYaml(dir.join("config.yaml"))));
        fs::write(dir.join(".env"), "API_SERVER_KEY=from-dotenv\n").unwrap();
        let k = HermesConfig::from_sources(&dir, |_| None);
        assert_eq!(k.key_source, Some(KeySource::DotEnv(dir.join(".env"))));
        let k = HermesConfig::from_sources(&dir, |n| (n == "API_SERVER_KEY").then(|| "e".into()));
        assert_eq!((k.key.as_deref(), k.key_source), (Some("e"), Some(KeySource::Environment)));
        fs::write(dir.join(".env"), "").unwrap();
        fs::remove_file(dir.join("config.yaml")).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls_and_log_problems() {
        assert_eq!(parse_http_url("http://127.0.0.1:8642/x"), Some(("127.0.0.1".into(), 8642)));
        assert_eq!(parse_http_url("http://[::1]:1"), Some(("::1".into(), 1)));
        assert_eq!(parse_http_url("https://x:1"), None);
        let c = HermesConfig::from_sources(Path::new("/nonexistent-hermes"), |_| None);
        let found = problems_in_log("WARNING API Server: aiohttp not installed\n", &c);
        assert_eq!(found[0].code(), "aiohttp_missing");
    }
}
