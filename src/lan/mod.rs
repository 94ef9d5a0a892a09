//! `--local`: LAN-only direct mode, no registry and no relay (PROTOCOL §8).
//!
//! - [`crate::netif`] picks the LAN address (or `--host`);
//! - [`store`] keeps `lan.json`: the pending pairing token and the LAN devices, as digests;
//! - [`server`] is the daemon's `ws://<lan-ip>:<port>/ws/app` server;
//! - [`pair`] is the CLI side: backend gate, token, daemon, QR.
//!
//! **One mode per daemon.** A daemon serves either the relay (`hermeschat-pair`) or the LAN
//! (`hermeschat-pair --local`), never both: `--local` restarts a relay-mode daemon in LAN mode
//! (saying so), and the plain command restarts a LAN-mode daemon in relay mode. Paired devices
//! of both kinds are kept; they work again as soon as their mode runs. Reasons: one pool and
//! one log per daemon stay unambiguous, and the relay role drops every open request when its
//! socket is lost, which must never cut LAN requests.
//!
//! **External backends.** When the backend is not the built-in one and it answers
//! `POST /api/local-bridge/register-token` (the HermesChat FastAPI server does), the token is
//! registered there and the QR carries that backend's LAN URL; the daemon is not needed for
//! that pairing. The backend's URL is used only if it is reachable on the LAN address; a 404
//! (or anything unusable) falls back to the daemon's own LAN server.

pub mod server;
pub mod store;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;

use crate::bridge::workers::{Pool, Target};
use crate::bridge::{LiveStatus, Status, log};
use crate::cli::{self, Args, Exit, Out, PairMode, fail, usage_error};
use crate::daemon::{self, Stopped};
use crate::protocol::LocalQr;
use crate::{netif, state};

/// The LAN server's port when `--local-port` does not say.
pub const DEFAULT_LAN_PORT: u16 = 8766;

/// The backend route that takes a LAN pairing token (HermesChat's FastAPI server).
pub const REGISTER_TOKEN_PATH: &str = "/api/local-bridge/register-token";

/// The LAN server's address and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanConfig {
    /// The LAN address to bind and advertise.
    pub host: IpAddr,
    /// The port (default 8766).
    pub port: u16,
    /// The state directory (LAN devices).
    pub state_dir: PathBuf,
}

/// Parses `--host`: an IP address the phone can dial (not 0.0.0.0, not multicast).
fn parse_host(text: &str) -> Result<IpAddr, Exit> {
    let ip: IpAddr = text.trim().trim_matches(['[', ']']).parse().map_err(|_| {
        usage_error(format!(
            "--host: {text:?} is not an IP address (give this machine's LAN address, e.g. \
             192.168.1.20)"
        ))
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(usage_error(format!(
            "--host: {ip} cannot be dialled by a phone; give this machine's LAN address"
        )));
    }
    Ok(ip)
}

/// `ws://<host>:<port>/ws/app` (IPv6 in brackets).
fn ws_url(host: IpAddr, port: u16) -> String {
    format!("ws://{}/ws/app", SocketAddr::new(host, port))
}

impl LanConfig {
    /// The configuration the daemon was started with: `--host` (else the detected LAN
    /// address) and `--local-port` (else 8766).
    pub fn from_args(args: &Args, state_dir: &Path) -> Result<LanConfig, Exit> {
        let host = match &args.host {
            Some(h) => parse_host(h)?,
            None => netif::detect().map_err(fail)?,
        };
        Ok(LanConfig {
            host,
            port: args.local_port.unwrap_or(DEFAULT_LAN_PORT),
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// The app URL.
    pub fn url(&self) -> String {
        ws_url(self.host, self.port)
    }
}

/// Binds the LAN server now and serves on a thread until `stop` is set.
pub fn start(
    config: LanConfig,
    pool: Arc<Pool>,
    status: Arc<LiveStatus>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let listener = server::bind(SocketAddr::new(config.host, config.port))?;
    let url = config.url();
    let srv = server::Server::new(listener, config.state_dir, pool, status.clone(), stop)?;
    let handle = std::thread::Builder::new().name("lan".into()).spawn(move || srv.run())?;
    status.update(|s| s.lan_url = Some(url.clone()));
    log(&format!("LAN server listening on {url}"));
    Ok(handle)
}

// ---------------------------------------------------------------------------------------------
// The CLI: --local, --refresh-code --local, --reset --local

/// What an external backend answers to a token registration (everything optional).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterTokenReply {
    /// The backend's own app URL, when it says.
    #[serde(default)]
    url: Option<String>,
    /// Another spelling some servers use.
    #[serde(default)]
    ws_url: Option<String>,
}

/// `host:port` of a `ws://` / `wss://` URL.
fn ws_authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("ws://").or_else(|| url.strip_prefix("wss://"))?;
    let authority = rest.split(['/', '?']).next()?;
    (!authority.is_empty()).then_some(authority)
}

/// Whether something accepts TCP connections at `url`'s address (within one second).
fn reachable(url: &str) -> bool {
    let Some(authority) = ws_authority(url) else { return false };
    let addr = authority
        .parse::<SocketAddr>()
        .ok()
        .or_else(|| std::net::ToSocketAddrs::to_socket_addrs(authority).ok()?.next());
    addr.is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// Offers the token to an external backend. `Some(url)` when the backend took it and serves
/// the app at `url` on the LAN; `None` (after saying why, when it matters) otherwise.
fn register_with_backend(
    target: &Target,
    host: IpAddr,
    token: &str,
    expires_at: u64,
    ttl_secs: u64,
    out: &Out,
) -> Option<String> {
    let agent = crate::registry_client::local_agent(Duration::from_secs(5));
    let endpoint = format!("{}{REGISTER_TOKEN_PATH}", target.url());
    let body =
        serde_json::json!({ "token": token, "expiresAt": expires_at, "ttlSeconds": ttl_secs });
    let mut resp = match agent.post(&endpoint).header("Accept", "application/json").send_json(body)
    {
        Ok(r) => r,
        Err(e) => {
            out.warn(&format!(
                "The backend's LAN token route failed ({e}); serving the LAN myself"
            ));
            return None;
        }
    };
    let status = resp.status().as_u16();
    if matches!(status, 404 | 405 | 501) {
        return None;
    }
    if !(200..300).contains(&status) {
        out.warn(&format!(
            "The backend refused the LAN token ({status} on {REGISTER_TOKEN_PATH}); serving the \
             LAN myself"
        ));
        return None;
    }
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let reply: RegisterTokenReply = serde_json::from_str(&text).unwrap_or_default();
    let url = reply
        .url
        .or(reply.ws_url)
        .filter(|u| ws_authority(u).is_some())
        .unwrap_or_else(|| ws_url(host, target.port));
    if !reachable(&url) {
        out.warn(&format!(
            "The backend took the LAN token but does not answer at {url} (it may listen on \
             127.0.0.1 only); serving the LAN myself"
        ));
        return None;
    }
    Some(url)
}

/// The address and port a running LAN-mode daemon serves, if one runs.
pub(crate) fn running_lan(dir: &Path) -> Option<(IpAddr, u16)> {
    let status = cli::running_status(dir)?;
    let url = status.lan_url.filter(|_| status.bridge_id.is_empty())?;
    let addr: SocketAddr = ws_authority(&url)?.parse().ok()?;
    Some((addr.ip(), addr.port()))
}

/// `--refresh-code --local` while a LAN daemon runs: a new QR for what it serves. Another
/// `--host` or `--local-port` is refused (exit 2) rather than restarting it: the LAN devices
/// keep the address they scanned, so moving the server is `hermeschat-pair --local`'s job.
fn refresh_keeps(
    host: IpAddr,
    port: u16,
    host_arg: Option<IpAddr>,
    port_arg: Option<u16>,
) -> Result<(), Exit> {
    if host_arg.is_none_or(|h| h == host) && port_arg.is_none_or(|p| p == port) {
        return Ok(());
    }
    let wanted = ws_url(host_arg.unwrap_or(host), port_arg.unwrap_or(port));
    Err(usage_error(format!(
        "--refresh-code --local keeps what the running LAN daemon serves ({}), so it cannot move \
         to {wanted}; nothing was changed.\n  Run hermeschat-pair --refresh-code --local without \
         --host/--local-port for a new QR, or hermeschat-pair --local with them to restart the \
         daemon there (LAN devices paired with the old address must then scan the new QR).",
        ws_url(host, port)
    )))
}

/// Checks, before a running daemon is stopped, that `lan`'s address is this machine's and its
/// port free: binds it and lets it go. Skipped when the running LAN daemon already serves that
/// very address and port (it holds them, and keeps serving them).
fn check_servable(dir: &Path, lan: &LanConfig) -> Result<(), Exit> {
    if running_lan(dir) == Some((lan.host, lan.port)) {
        return Ok(());
    }
    match server::bind(SocketAddr::new(lan.host, lan.port)) {
        Ok(probe) => {
            drop(probe);
            Ok(())
        }
        Err(e) => {
            let kept = match daemon::running(dir) {
                Some(pid) => format!("the running bridge daemon (pid {pid}) is untouched"),
                None => "no daemon was started".to_owned(),
            };
            Err(fail(format!(
                "cannot serve the LAN on {}: {e}\n  Nothing was changed: {kept}, and the last \
                 QR code is still the one that pairs.",
                lan.url()
            )))
        }
    }
}

/// Makes sure a LAN-mode daemon serves `lan` against `target`: keeps a matching one, restarts
/// a relay-mode or differently configured one, starts one when none runs.
fn ensure_lan_daemon(
    dir: &Path,
    lan: &LanConfig,
    target: &Target,
    builtin: bool,
    out: &Out,
) -> Result<(), Exit> {
    let url = lan.url();
    if let Some(pid) = daemon::running(dir) {
        let current = cli::running_status(dir);
        let same = current.as_ref().is_some_and(|s| {
            s.bridge_id.is_empty()
                && s.lan_url.as_deref() == Some(url.as_str())
                && s.backend_url == target.url()
                && cli::status_builtin(s) == builtin
        });
        let replaced = current.as_ref().is_some_and(|s| cli::replaced_program(s, out));
        let suspended = current.as_ref().is_some_and(|s| cli::suspended_daemon(s, out));
        if same && !replaced && !suspended {
            out.ok(&format!(
                "Bridge daemon already serving the LAN (pid {pid}); paired devices keep working"
            ));
            if let Some(s) = &current {
                cli::other_copy_note(s, out);
            }
            return Ok(());
        }
        if same {
            // Only its program replaced, or it is suspended: `replaced_program` or
            // `suspended_daemon` said so.
        } else if current.as_ref().is_some_and(|s| !s.bridge_id.is_empty()) {
            out.warn(&format!(
                "A relay-mode bridge daemon (pid {pid}) was running; restarting it in LAN-only \
                 mode (relay-paired apps reconnect after you run hermeschat-pair without --local)"
            ));
        } else {
            match current.as_ref().map(|s| s.lan_url.clone().filter(|old| *old != url)) {
                // Devices paired with the old address cannot find the new one by themselves.
                Some(Some(old)) => out.warn(&format!(
                    "The LAN server moves from {old} to {url}; restarting it. Devices paired \
                     with the old address must scan the new QR code"
                )),
                Some(None) => {
                    out.warn("The running bridge daemon serves another backend; restarting it")
                }
                None => {
                    out.warn("The running bridge daemon's status cannot be read; restarting it")
                }
            }
        }
        daemon::stop(dir, Duration::from_secs(5)).map_err(fail)?;
    }
    let extra = [
        "--local".to_owned(),
        "--host".to_owned(),
        lan.host.to_string(),
        "--local-port".to_owned(),
        lan.port.to_string(),
    ];
    cli::ensure_daemon(dir, None, Some(&url), target, builtin, &extra, out)?;
    Ok(())
}

/// `hermeschat-pair --local` (and `--refresh-code --local`, `--reset --local`).
pub fn pair(args: &Args, mode: PairMode) -> Result<(), Exit> {
    let out = Out::new(args.json);
    let dir = cli::state_dir()?;
    cli::say_what_an_interruption_leaves(&dir);
    let _lock = cli::command_lock(&dir, &out)?;
    cli::settle_daemon(&dir);
    let mut config = cli::load_config(&dir, &out)?;
    // A bad --host is a usage error, reported before anything runs.
    let host_override = args.host.as_deref().map(parse_host).transpose()?;
    // --refresh-code keeps what the running LAN daemon serves, and nothing else.
    let running = if mode == PairMode::RefreshCode { running_lan(&dir) } else { None };
    if let Some((h, p)) = running {
        refresh_keeps(h, p, host_override, args.local_port)?;
    }
    let backend = cli::backend_gate(args, &config, &out)?;
    crate::gateway::ensure(&out);
    let (host, how) = match (host_override, running) {
        (Some(h), _) => (h, " (--host)"),
        (None, Some((h, _))) => (h, " (as the running daemon)"),
        (None, None) => (netif::detect().map_err(fail)?, ""),
    };
    out.ok(&format!("LAN address {host}{how}"));
    if host.is_loopback() {
        out.warn("A loopback address is reachable from this machine only, not from a phone");
    }
    let port = args.local_port.or(running.map(|(_, p)| p)).unwrap_or(DEFAULT_LAN_PORT);
    let lan = LanConfig { host, port, state_dir: dir.clone() };
    let target = backend.target.clone();

    if mode == PairMode::Reset {
        // Nothing is stopped or forgotten for an address or port that cannot be served.
        check_servable(&dir, &lan)?;
        let relay_mode = cli::running_status(&dir).is_some_and(|s| !s.bridge_id.is_empty());
        match daemon::stop(&dir, Duration::from_secs(5)) {
            Ok(Stopped::Terminated(pid) | Stopped::Killed(pid)) if relay_mode => out.warn(&format!(
                "Stopped the relay-mode bridge daemon (pid {pid}): relay-paired apps are offline \
                 until you run hermeschat-pair without --local"
            )),
            Ok(Stopped::Terminated(pid) | Stopped::Killed(pid)) => out
                .ok(&format!("Stopped the bridge daemon (pid {pid}); every LAN socket is closed")),
            Ok(_) => {}
            // A daemon still running sees the devices forgotten below and closes their sockets.
            Err(e) => out.warn(&format!("cannot stop the bridge daemon: {e}")),
        }
        let (n, note) = store::forget_all(&dir)
            .map_err(|e| fail(format!("cannot reset the LAN devices: {e}")))?;
        if let Some(note) = note {
            out.warn(&note);
        }
        out.ok(&format!("Forgot {n} LAN device{}", if n == 1 { "" } else { "s" }));
    }

    let ttl = store::token_ttl_secs();
    let now = crate::relay::now_ms();
    let token = crate::secret::new_pairing_token();
    let expires_at = now + ttl * 1000;
    // Saved before the daemon starts: a boot service's bridge reads the backend choice from
    // config.json, and is started through the service.
    cli::save_backend_choice(&dir, &mut config, target.port, backend.builtin, &out);
    let served_by_backend = if backend.builtin {
        None
    } else {
        register_with_backend(&target, host, &token, expires_at, ttl, &out)
    };
    let url = match served_by_backend {
        Some(url) => {
            out.ok(&format!("Your backend serves the app on the LAN ({url}) with this token"));
            url
        }
        None => {
            // Checked before the running daemon is stopped and the pending token replaced, so
            // a wrong --host or a busy --local-port leaves both as they were.
            check_servable(&dir, &lan)?;
            let note = store::set_token(&dir, &token, now, expires_at)
                .map_err(|e| fail(format!("cannot save the LAN pairing token: {e}")))?;
            if let Some(note) = note {
                out.warn(&note);
            }
            ensure_lan_daemon(&dir, &lan, &target, backend.builtin, &out)?;
            if backend.builtin {
                cli::wait_backend_ready(&target, &dir, &out)?;
            }
            let url = lan.url();
            out.ok(&format!("LAN server ready ({url})"));
            url
        }
    };

    let payload = LocalQr { mode: "hermes-local".into(), url: url.clone(), token, expires_at };
    let json = serde_json::to_string(&payload).map_err(|e| fail(e.to_string()))?;
    if args.json {
        println!("{json}");
        return Ok(());
    }
    cli::print_qr(&json, &dir, &out, "hermeschat-pair --refresh-code --local");
    println!();
    out.info(&format!("LAN URL   : {url}"));
    out.info(&format!(
        "Expires   : {} (single use, {} min)",
        cli::local_time(expires_at),
        expires_at.saturating_sub(crate::relay::now_ms()).div_ceil(60_000)
    ));
    out.info(&format!("Log       : {}", state::bridge_log(&dir).display()));
    println!();
    out.info("Put the phone on the same Wi-Fi, then in the HermesChat app: My tab → + → Scan QR.");
    out.info("Nothing leaves your network: no registry, no relay.");
    out.info("Next: hermeschat-pair --status · --refresh-code --local (new QR) · --stop");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --status

/// lan.json holds a LAN device or an unused pairing code (it cannot be read: no): with no
/// relay pairing, a stopped daemon was a LAN-only one, started again with `--local`.
pub fn has_pairing(dir: &Path) -> bool {
    store::read(dir).is_ok_and(|(lan, _)| !lan.devices.is_empty() || lan.token.is_some())
}

/// True when the daemon whose status this is serves the LAN.
pub fn serving(saved: Option<&Status>) -> bool {
    saved.is_some_and(|s| s.lan_url.is_some())
}

/// The address the LAN daemon serves, when this machine no longer has it (the Wi-Fi changed,
/// or DHCP gave another address): its socket still listens there, but no phone reaches it.
pub fn address_lost(saved: Option<&Status>) -> Option<IpAddr> {
    let url = saved?.lan_url.as_deref()?;
    let ip = ws_authority(url)?.parse::<SocketAddr>().ok()?.ip();
    // Interfaces that cannot be listed say nothing either way.
    let list = netif::interfaces().ok()?;
    let present = ip.is_loopback() || list.iter().any(|f| f.up && f.addr == ip);
    (!present).then_some(ip)
}

/// lan.json for `--status`, and the warning to show with it: a damaged file set aside (now or
/// earlier), or lan.json that cannot be read at all.
fn status_devices(dir: &Path) -> (store::LanState, Option<String>) {
    match store::read(dir) {
        Ok((lan, note)) => (lan, store::warning(dir, note)),
        Err(e) => (store::LanState::default(), Some(e.to_string())),
    }
}

/// The `lan` object of `--status --json`: `null` when there is neither a LAN daemon nor a LAN
/// device nor a warning about lan.json.
pub fn status_json(dir: &Path, saved: Option<&Status>) -> serde_json::Value {
    let (lan, warning) = status_devices(dir);
    let url = saved.and_then(|s| s.lan_url.clone());
    if url.is_none() && lan.devices.is_empty() && warning.is_none() {
        return serde_json::Value::Null;
    }
    let online =
        |id: &str| saved.is_some_and(|s| s.lan_url.is_some() && s.apps_online.contains(id));
    let devices: Vec<serde_json::Value> = lan
        .devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "clientId": d.client_id,
                "deviceName": d.device_name,
                "pairedAt": d.paired_at,
                "lastSeenAt": d.last_seen_at,
                "online": online(&d.client_id),
            })
        })
        .collect();
    serde_json::json!({
        "serving": url.is_some(),
        "url": url,
        "addressLost": address_lost(saved).is_some(),
        "devices": devices,
        "tokenExpiresAt": lan.token.as_ref().map(|t| t.expires_at),
        "warning": warning,
    })
}

/// The LAN lines of `--status`.
pub fn print_status(dir: &Path, saved: Option<&Status>, out: &Out) {
    let (lan, warning) = status_devices(dir);
    if let Some(w) = &warning {
        out.warn(w);
    }
    match saved.and_then(|s| s.lan_url.as_deref()) {
        Some(url) => match address_lost(saved) {
            None => out.ok(&format!("LAN mode: serving {url} (no relay)")),
            Some(ip) => out.warn(&format!(
                "LAN mode: serving {url}, but this machine no longer has the address {ip} \
                 (another network, or a new address from DHCP): phones cannot reach it. Run \
                 hermeschat-pair --local to serve this machine's address now, and scan its QR"
            )),
        },
        None if lan.devices.is_empty() => return,
        // A relay-mode daemon runs: serving the LAN instead would cut its apps off.
        None if saved.is_some_and(|s| !s.bridge_id.is_empty()) => out.info(
            "LAN mode: not serving; the bridge runs in relay mode (hermeschat-pair --local would \
             serve the LAN devices instead, and take the relay's apps offline)",
        ),
        None => out.info("LAN mode: not serving (start it with: hermeschat-pair --local)"),
    }
    let online: Vec<&store::LanDevice> = lan
        .devices
        .iter()
        .filter(|d| serving(saved) && saved.is_some_and(|s| s.apps_online.contains(&d.client_id)))
        .collect();
    out.info(&format!("LAN devices: {} ({} online now)", lan.devices.len(), online.len()));
    for d in &lan.devices {
        let state = if online.iter().any(|o| o.client_id == d.client_id) {
            "online".to_owned()
        } else {
            match d.last_seen_at {
                Some(ms) => format!("last seen {}", crate::bridge::format_ts(ms)),
                None => "never connected".to_owned(),
            }
        };
        out.info(&format!("  {} {} — {state}", d.client_id, d.device_name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_this_machine_no_longer_has_is_told_apart() {
        let serving = |ip: IpAddr| Status { lan_url: Some(ws_url(ip, 8766)), ..Status::default() };
        let ours = netif::interfaces().unwrap().into_iter().map(|f| f.addr).collect::<Vec<_>>();
        for ip in &ours {
            assert_eq!(address_lost(Some(&serving(*ip))), None, "{ip} is this machine's");
        }
        assert_eq!(address_lost(Some(&serving("127.0.0.1".parse().unwrap()))), None);
        // An address from documentation ranges no machine here holds.
        let gone: IpAddr = ["198.51.100.77", "203.0.113.77"]
            .iter()
            .map(|a| a.parse().unwrap())
            .find(|a| !ours.contains(a))
            .unwrap();
        assert_eq!(address_lost(Some(&serving(gone))), Some(gone));
        // Not serving the LAN: nothing lost.
        assert_eq!(address_lost(Some(&Status::default())), None);
        assert_eq!(address_lost(None), None);
    }

    #[test]
    fn hosts_and_urls() {
        assert_eq!(parse_host("192.168.1.5").unwrap().to_string(), "192.168.1.5");
        assert_eq!(parse_host("[fd00::1]").unwrap().to_string(), "fd00::1");
        assert_eq!(parse_host("0.0.0.0").unwrap_err().code, 2);
        assert_eq!(parse_host("my-mac.local").unwrap_err().code, 2);
        assert_eq!(ws_url("10.0.0.2".parse().unwrap(), 8766), "ws://10.0.0.2:8766/ws/app");
        assert_eq!(ws_url("fd00::1".parse().unwrap(), 8766), "ws://[fd00::1]:8766/ws/app");
        assert_eq!(ws_authority("ws://10.0.0.2:8765/ws/app?x=1"), Some("10.0.0.2:8765"));
        assert_eq!(ws_authority("http://x/"), None);
    }
}
