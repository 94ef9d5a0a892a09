//! Boot services: `--install`, `--uninstall`, `--service-status`.
//!
//! - macOS: a launchd LaunchAgent `ai.hermeschat.bridge` (`launchd`).
//! - Linux with systemd: a user unit `hermeschat-bridge.service` (`systemd`).
//! - Anywhere else: a cron `@reboot` line to add by hand (`cron`).
//!
//! Every file is generated here from a string template (never copied from disk), and the
//! service always runs this binary's absolute path with `--foreground`: the bridge in the
//! service manager's process, logging to `service.log` / `service-error.log` in the state dir.
//!
//! One daemon per state directory: the foreground bridge takes the same pid lock as the
//! detached daemon, so `--install` stops a detached daemon before it starts the service (and
//! says so); otherwise the service's bridge would exit at once on the held lock.
//!
//! The platform is detected (`HERMESCHAT_SERVICE_PLATFORM=macos|systemd|cron` overrides it;
//! the tests use that to exercise the macOS path on Linux with a fake `launchctl`).

mod cron;
mod launchd;
mod systemd;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{Args, Exit, Out, fail, load_identity, state_dir, usage_error};
use crate::daemon::{self, Stopped};
use crate::state;

/// The hidden override of the platform detection.
pub const PLATFORM_ENV: &str = "HERMESCHAT_SERVICE_PLATFORM";

/// Environment variables copied into the service when set here. Never a secret: service files
/// are world-readable (the gateway key stays in `~/.hermes/.env`).
const PASSED_ENV: &[&str] = &[
    state::HOME_ENV,
    "HERMESCHAT_REGISTRY_URL",
    "HERMESCHAT_LOCAL_HOST",
    "HERMESCHAT_LOCAL_PORT",
    "HERMESCHAT_GATEWAY_URL",
    crate::backend::peer::TRUSTED_UIDS_ENV,
    "HERMES_HOME",
    // The CA store OpenSSL reads on Linux: a relay with a private CA is trusted through them,
    // by the service's bridge as by the one started by hand (macOS reads the Keychain).
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The proxy variables (`crate::netproxy`), copied into the service like [`PASSED_ENV`] but
/// only without credentials (`user:pass@`): service files are world-readable. A proxy that
/// needs credentials goes in the service manager's own environment (README, Troubleshooting).
const PROXY_ENV: &[&str] = &[
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// Set in the service's environment: its bridge, finding another one running (started by
/// hand), leaves with exit 0 instead of 1, so the manager does not restart it over and over.
/// Under launchd, a configuration error (exit 2: no pairing) does the same (systemd is told
/// `RestartPreventExitStatus=2` instead).
pub const SERVICE_ENV: &str = "HERMESCHAT_SERVICE";

/// Whether this process was started by a service manager: [`SERVICE_ENV`] (our unit and
/// plist set it), or systemd's `INVOCATION_ID` with systemd itself as the parent: every
/// systemd service has it (a unit written by an older hermeschat-pair, or the user's own, as
/// the seed suggests for `--foreground`), and so do the programs a service starts (a tmux
/// server's shells), which are not services.
pub fn started_by_a_service() -> bool {
    if std::env::var_os(SERVICE_ENV).is_some() {
        return true;
    }
    // SAFETY: getppid has no preconditions and cannot fail.
    let parent = unsafe { libc::getppid() };
    std::env::var_os("INVOCATION_ID").is_some()
        && std::fs::read_to_string(format!("/proc/{parent}/comm"))
            .is_ok_and(|comm| comm.trim() == "systemd")
}

/// How long `--install` waits to see the service's bridge take the pid lock.
const START_WAIT: Duration = Duration::from_secs(3);

/// Which service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// launchd LaunchAgent.
    Launchd,
    /// systemd user unit.
    Systemd,
    /// No service manager we drive: a cron `@reboot` line.
    Cron,
}

impl Platform {
    /// The platform to use here: the override, else macOS → launchd, Linux booted with
    /// systemd and `systemctl` on PATH → systemd, else cron.
    pub fn detect() -> Result<Platform, Exit> {
        match std::env::var(PLATFORM_ENV).ok().filter(|v| !v.is_empty()).as_deref() {
            Some("macos" | "launchd") => return Ok(Platform::Launchd),
            Some("linux" | "systemd") => return Ok(Platform::Systemd),
            Some("cron" | "none") => return Ok(Platform::Cron),
            Some(other) => {
                return Err(usage_error(format!(
                    "{PLATFORM_ENV}={other:?}: use macos, systemd or cron"
                )));
            }
            None => {}
        }
        if cfg!(target_os = "macos") {
            Ok(Platform::Launchd)
        } else if Path::new("/run/systemd/system").is_dir() && on_path("systemctl") {
            Ok(Platform::Systemd)
        } else {
            Ok(Platform::Cron)
        }
    }
}

/// What a service file needs to know.
#[derive(Debug, Clone)]
pub struct Spec {
    /// This binary, absolute.
    pub exe: PathBuf,
    /// Arguments after the binary (`--foreground`, …).
    pub args: Vec<String>,
    /// The state directory, absolute.
    pub state_dir: PathBuf,
    /// The user's home directory.
    pub home: PathBuf,
    /// Environment for the bridge.
    pub env: Vec<(String, String)>,
}

impl Spec {
    /// `service.log` (stdout).
    pub fn out_log(&self) -> PathBuf {
        state::service_log(&self.state_dir)
    }

    /// `service-error.log` (stderr: the bridge's log lines).
    pub fn err_log(&self) -> PathBuf {
        state::service_error_log(&self.state_dir)
    }

    /// Hermes Agent's home (the gateway the bridge may wake writes there).
    pub fn hermes_home(&self) -> PathBuf {
        self.env
            .iter()
            .find(|(k, _)| k == "HERMES_HOME")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| self.home.join(".hermes"))
    }

    /// Builds the spec for this process: this binary, the state dir, and the flags and
    /// environment that shape the bridge.
    fn current(args: &Args, dir: &Path) -> Result<Spec, Exit> {
        let exe = this_exe()?;
        let mut bridge_args = vec!["--foreground".to_owned()];
        if let Some(port) = args.port {
            bridge_args.extend(["--port".to_owned(), port.to_string()]);
        }
        if args.no_server {
            bridge_args.push("--no-server".to_owned());
        }
        // LAN-only mode: the port the apps were paired with (given, else the running LAN
        // daemon's); the address only when given, else the bridge detects it at each start.
        if args.local {
            bridge_args.push("--local".to_owned());
            if let Some(host) = &args.host {
                bridge_args.extend(["--host".to_owned(), host.clone()]);
            }
            let port = args.local_port.or_else(|| crate::lan::running_lan(dir).map(|(_, p)| p));
            if let Some(port) = port {
                bridge_args.extend(["--local-port".to_owned(), port.to_string()]);
            }
        }
        let mut env = Vec::new();
        for name in PASSED_ENV {
            if let Some(v) = std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
                // The state dir is passed absolute: the service does not start where we are.
                let v = if *name == state::HOME_ENV { dir.display().to_string() } else { v };
                env.push(((*name).to_owned(), v));
            }
        }
        for name in PROXY_ENV {
            if let Some(v) =
                std::env::var(name).ok().filter(|v| !v.trim().is_empty() && !v.contains('@'))
            {
                env.push(((*name).to_owned(), v));
            }
        }
        env.push((SERVICE_ENV.to_owned(), "1".to_owned()));
        // The gateway wake-up looks for `hermes` on PATH; service managers start with a bare one.
        if let Ok(path) = std::env::var("PATH")
            && !path.is_empty()
        {
            env.push(("PATH".to_owned(), path));
        }
        let spec =
            Spec { exe, args: bridge_args, state_dir: dir.to_path_buf(), home: home()?, env };
        spec.check()?;
        Ok(spec)
    }

    /// Refuses what a service file cannot carry: paths that are not plain UTF-8, and control
    /// characters anywhere (a newline in an environment value would start a line of its own in
    /// a unit file or a crontab: a directive of its own).
    fn check(&self) -> Result<(), Exit> {
        for p in [&self.exe, &self.state_dir, &self.home] {
            if p.to_str().is_none_or(|s| s.chars().any(char::is_control)) {
                return Err(usage_error(format!(
                    "cannot write a service for the path {}: it is not plain UTF-8 text",
                    p.display()
                )));
            }
        }
        let values = self.env.iter().flat_map(|(k, v)| [k, v]).chain(&self.args);
        if let Some(bad) = values.into_iter().find(|v| v.chars().any(char::is_control)) {
            let name = self.env.iter().find(|(_, v)| v == bad).map_or("an argument", |(k, _)| k);
            return Err(usage_error(format!(
                "cannot write a service with {name} = {bad:?}: it holds a control character \
                 (a line break?); fix it and run --install again"
            )));
        }
        Ok(())
    }
}

/// The user's home directory.
fn home() -> Result<PathBuf, Exit> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(std::env::home_dir)
        .ok_or_else(|| usage_error("cannot tell your home directory: set HOME"))
}

/// `~/…` for paths under the home directory (display only).
pub(crate) fn tilde(path: &Path, home: &Path) -> String {
    match path.strip_prefix(home) {
        Ok(rest) if !home.as_os_str().is_empty() => format!("~/{}", rest.display()),
        _ => path.display().to_string(),
    }
}

/// Whether `program` is an executable file in a PATH directory.
pub(crate) fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// What one external command did.
#[derive(Debug)]
pub(crate) struct Ran {
    /// Exited 0.
    pub ok: bool,
    /// stdout.
    pub stdout: String,
    /// stderr (or why it could not run).
    pub stderr: String,
}

impl Ran {
    /// A one-line reason for a failure.
    pub fn why(&self) -> String {
        let text = if self.stderr.trim().is_empty() { &self.stdout } else { &self.stderr };
        let text = text.trim();
        if text.is_empty() { "it failed without a message".to_owned() } else { text.to_owned() }
    }
}

/// Runs `program args…` to completion, stdin closed, output captured.
pub(crate) fn run<I, S>(program: &str, args: I) -> Ran
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(o) => Ran {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Err(e) => {
            Ran { ok: false, stdout: String::new(), stderr: format!("cannot run {program}: {e}") }
        }
    }
}

/// Creates the service logs 0600 up front, so the service manager appends to private files.
fn touch_logs(spec: &Spec) -> Result<(), Exit> {
    use std::os::unix::fs::OpenOptionsExt;
    for path in [spec.out_log(), spec.err_log()] {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| fail(format!("cannot create {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Writes a service file atomically (a fresh temp file, never a planted one, renamed over
/// it), mode 0644: service managers refuse group/world-writable files. Its directory, and
/// every directory between it and `home`, must be the user's and writable by nobody else:
/// anyone who can write there can replace the unit, and run what they like as the user.
fn write_file(path: &Path, text: &str, home: &Path) -> Result<(), Exit> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    // The directories as named, and as they really are once symlinks are followed (a link's
    // target's own parents could let someone else swap the target).
    let chain = |parent: &Path, home: &Path| -> Vec<PathBuf> {
        let within = parent.ancestors().skip(1).take_while(|d| d.starts_with(home) && *d != home);
        std::iter::once(parent).chain(within).map(Path::to_path_buf).collect()
    };
    let mut dirs = chain(parent, home);
    if let (Ok(real_parent), Ok(real_home)) =
        (std::fs::canonicalize(parent), std::fs::canonicalize(home))
    {
        dirs.extend(chain(&real_parent, &real_home));
    }
    for dir in &dirs {
        let check = |e: std::io::Error| fail(format!("cannot check {}: {e}", dir.display()));
        // A symlink (a dotfiles setup) is judged by its owner, then by the directory it names:
        // its own mode bits are always 0777 and mean nothing.
        let link = std::fs::symlink_metadata(dir).map_err(check)?;
        let link_ok = !link.file_type().is_symlink() || link.uid() == me || link.uid() == 0;
        let meta = std::fs::metadata(dir).map_err(check)?;
        if !link_ok || meta.uid() != me {
            // Often left by a `sudo` install (e.g. `sudo brew services` owns LaunchAgents).
            return Err(fail(format!(
                "{} is not yours: whoever owns it can replace the service. Check what is in \
                 it, then run: sudo chown -h \"$USER\" {}; and run --install again",
                dir.display(),
                dir.display()
            )));
        }
        if state::writable_by_others(&meta) {
            return Err(fail(format!(
                "{} is writable by other users: anyone who can write there can replace the \
                 service. Check what is in it, then run: chmod go-w {}; and run --install again",
                dir.display(),
                dir.display()
            )));
        }
    }
    state::write_atomic_mode(path, text.as_bytes(), 0o644)
        .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
}

/// Stops a detached daemon (one daemon per state dir: the service's bridge needs the lock).
/// Returns whether one was running.
fn stop_detached(dir: &Path, out: &Out) -> Result<bool, Exit> {
    match daemon::stop(dir, Duration::from_secs(5)).map_err(fail)? {
        Stopped::NotRunning => Ok(false),
        Stopped::Terminated(pid) | Stopped::Killed(pid) => {
            out.ok(&format!(
                "Stopped the running bridge daemon (pid {pid}); the service runs the bridge from \
                 now on"
            ));
            Ok(true)
        }
    }
}

/// Starts the bridge daemon outside the service, as pairing does ([`daemon::spawn`]), with the
/// settings the service was to run it with: when the service did not start after `--install`
/// stopped the running daemon for it, the bridge runs on all the same. Returns its pid.
fn start_detached(spec: &Spec) -> Result<u32, String> {
    let mut args: Vec<String> =
        spec.args.iter().filter(|a| *a != "--foreground").cloned().collect();
    // A daemon goes by the backend choice it is given, not by config.json's (`run_bridge`).
    let external =
        crate::cli::load_config(&spec.state_dir, &Out::new(true)).is_ok_and(|c| c.external_backend);
    if external && !args.iter().any(|a| a == "--no-server") {
        args.push("--no-server".to_owned());
    }
    daemon::spawn(&spec.state_dir, &args)
}

/// Waits briefly for the service's bridge to hold the pid lock.
fn wait_started(dir: &Path) -> Option<u32> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        if let Some(pid) = daemon::running(dir).filter(|p| *p != 0) {
            return Some(pid);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reports whether the bridge came up after loading the service.
fn report_started(spec: &Spec, out: &Out) {
    match wait_started(&spec.state_dir) {
        Some(pid) => out.ok(&format!("Bridge running under the service (pid {pid})")),
        None => out.warn(&format!(
            "The bridge is not running yet; check hermeschat-pair --service-status and {}",
            tilde(&spec.err_log(), &spec.home)
        )),
    }
}

/// Warns when the service would run a build-tree binary that the next `cargo build` replaces.
fn warn_build_tree(spec: &Spec, out: &Out) {
    let s = spec.exe.to_string_lossy();
    if s.contains("/target/debug/") || s.contains("/target/release/") {
        out.warn(&format!(
            "The service runs {s}, a build output; install the binary (cargo install --path . or \
             the static release) and run --install again from there"
        ));
    }
}

/// The seed's rule: no service before a pairing exists (a LAN pairing for `--local`).
fn require_pairing(args: &Args, dir: &Path, out: &Out) -> Result<(), Exit> {
    if args.local {
        if crate::lan::store::lan_json(dir).exists() {
            return Ok(());
        }
        return Err(usage_error(format!(
            "--install --local needs a LAN pairing first: {} is missing.\n  Pair first: \
             hermeschat-pair --local — then run hermeschat-pair --install --local.",
            crate::lan::store::lan_json(dir).display()
        )));
    }
    if load_identity(dir, out)?.is_some() {
        return Ok(());
    }
    Err(usage_error(format!(
        "--install needs a pairing first: {} is missing.\n  Without it the service's bridge \
         could only exit at once for lack of credentials.\n  Pair first: hermeschat-pair — \
         then run hermeschat-pair --install.",
        state::bridge_json(dir).display()
    )))
}

/// A boot service (launchd or systemd) installed for a state directory ([`installed_for`]).
pub(crate) struct Installed {
    /// Which manager runs it.
    pub platform: Platform,
    /// Its unit file or plist, as written by `--install`.
    text: String,
}

/// The boot service (launchd or systemd) installed for the state directory `dir`, if any:
/// pairing starts the bridge through it, so the bridge keeps the service's restart on
/// failure. (cron starts nothing on demand.) The service file names `dir` in its log paths.
pub(crate) fn installed_for(dir: &Path) -> Option<Installed> {
    let platform = Platform::detect().ok()?;
    let home = home().ok()?;
    let (path, marker) = match platform {
        Platform::Launchd => (launchd::plist_path(&home), launchd::err_log_entry(dir)),
        Platform::Systemd => (systemd::unit_path(&home), systemd::err_log_entry(dir)),
        Platform::Cron => return None,
    };
    let text = std::fs::read_to_string(path).ok()?;
    text.contains(&marker).then_some(Installed { platform, text })
}

impl Installed {
    /// Whether it was written by an older hermeschat-pair, one that did not set
    /// [`SERVICE_ENV`]: its bridge then fails (and is restarted over and over) whenever a
    /// bridge started by hand runs. `--install` writes it anew.
    pub(crate) fn outdated(&self) -> bool {
        !self.text.contains(SERVICE_ENV)
    }

    /// Whether the service runs this very binary (its unit or plist names this executable
    /// first): one installed from an older copy keeps running that copy.
    pub(crate) fn runs_this_binary(&self) -> bool {
        let Some(exe) = this_exe().ok().and_then(|e| e.to_str().map(str::to_owned)) else {
            return true;
        };
        let entry = match self.platform {
            Platform::Launchd => launchd::program_entry(&exe),
            Platform::Systemd => systemd::program_entry(&exe),
            Platform::Cron => return true,
        };
        self.text.contains(&entry)
    }
}

/// This program's absolute path, symlinks resolved: what a service runs.
fn this_exe() -> Result<PathBuf, Exit> {
    let exe = std::env::current_exe()
        .map_err(|e| fail(format!("cannot find this program's path: {e}")))?;
    Ok(std::fs::canonicalize(&exe).unwrap_or(exe))
}

/// Starts the installed service's bridge, or restarts it: `systemctl --user restart`,
/// `launchctl kickstart -k`.
pub(crate) fn restart(platform: Platform) -> Result<(), String> {
    let ran = match platform {
        Platform::Systemd => systemd::restart(),
        Platform::Launchd => launchd::restart(),
        Platform::Cron => return Err("cron starts the bridge at boot only".to_owned()),
    };
    if ran.ok { Ok(()) } else { Err(ran.why()) }
}

impl Platform {
    /// The manager's name, for messages.
    pub(crate) fn manager(self) -> &'static str {
        match self {
            Platform::Launchd => "launchd",
            Platform::Systemd => "systemd",
            Platform::Cron => "cron",
        }
    }
}

/// `--install`.
pub fn install(args: &Args) -> Result<(), Exit> {
    let out = Out::new(false);
    let platform = Platform::detect()?;
    let dir = state_dir()?;
    let _lock = crate::cli::command_lock(&dir, &out)?;
    require_pairing(args, &dir, &out)?;
    let spec = Spec::current(args, &dir)?;
    // A proxy variable with credentials is not written into the (world-readable) service
    // file: say so, or its bridge would try to connect directly without a word.
    let withheld: Vec<&str> = PROXY_ENV
        .iter()
        .copied()
        .filter(|name| std::env::var(name).is_ok_and(|v| v.contains('@')))
        .collect();
    if !withheld.is_empty() {
        out.warn(&format!(
            "{} holds a password and is not written into the service file (other users can \
             read it): give the service its proxy another way (README, Troubleshooting, \
             \"Behind an HTTP proxy\")",
            withheld.join(", ")
        ));
    }
    match platform {
        Platform::Launchd => launchd::install(&spec, &out),
        Platform::Systemd => systemd::install(&spec, &out),
        Platform::Cron => cron::install(&spec, &out),
    }
}

/// `--uninstall`.
pub fn uninstall(_args: &Args) -> Result<(), Exit> {
    let out = Out::new(false);
    let platform = Platform::detect()?;
    let home = home()?;
    match platform {
        Platform::Launchd => launchd::uninstall(&home, &out),
        Platform::Systemd => systemd::uninstall(&home, &out),
        Platform::Cron => cron::uninstall(&out),
    }
}

/// The state of the installed service, for `--service-status`.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    /// `launchd`, `systemd` or `cron`.
    pub manager: &'static str,
    /// The label or unit name.
    pub name: String,
    /// The service file.
    pub file: Option<String>,
    /// The service file exists (cron: the line is in the crontab).
    pub installed: bool,
    /// Loaded / enabled at boot.
    pub enabled: bool,
    /// The service's process runs.
    pub running: bool,
    /// Its pid.
    pub pid: Option<u32>,
    /// The manager's own words for the state (`running`, `inactive (dead)`, …).
    pub detail: String,
}

/// `--service-status`.
pub fn status(args: &Args) -> Result<(), Exit> {
    let out = Out::new(args.json);
    let platform = Platform::detect()?;
    let dir = state_dir()?;
    let home = home()?;
    let state = match platform {
        Platform::Launchd => launchd::state(&home),
        Platform::Systemd => systemd::state(&home),
        Platform::Cron => cron::state(&dir),
    };
    let daemon_pid = daemon::running(&dir).filter(|p| *p != 0);
    if args.json {
        let value = serde_json::json!({
            "service": &state,
            "bridgePid": daemon_pid,
            "logs": [state::service_log(&dir), state::service_error_log(&dir)],
        });
        println!("{value}");
    } else {
        let (dot, colour) = if state.running { ("●", "32") } else { ("○", "33") };
        let headline = match (state.installed, state.running) {
            (true, true) => format!(
                "{} service running pid={}",
                state.manager,
                state.pid.map_or_else(|| "?".to_owned(), |p| p.to_string())
            ),
            (true, false) => {
                format!("{} service installed, not running ({})", state.manager, state.detail)
            }
            (false, _) if platform == Platform::Cron => "cron: no @reboot hermeschat-pair \
                line in the crontab — add the one hermeschat-pair --install prints (crontab -e)"
                .to_owned(),
            (false, _) => format!(
                "{} service not installed — install with: hermeschat-pair --install",
                state.manager
            ),
        };
        out.line(dot, colour, &headline);
        let key = if platform == Platform::Launchd { "label" } else { "unit " };
        if platform != Platform::Cron {
            println!("{key} : {}", state.name);
        }
        if let Some(file) = &state.file {
            let shown = tilde(Path::new(file), &home);
            let key = if platform == Platform::Launchd { "plist" } else { "file " };
            println!("{key} : {shown}");
        }
        println!(
            "logs  : {}, {}",
            tilde(&state::service_log(&dir), &home),
            tilde(&state::service_error_log(&dir), &home)
        );
        if installed_for(&dir).is_some_and(|i| i.outdated()) {
            out.warn(
                "The service file was written by an older hermeschat-pair: run hermeschat-pair \
                 --install again to update it",
            );
        }
        match daemon_pid {
            // cron only starts the bridge at boot: the one running now is simply the bridge.
            Some(pid) if state.pid != Some(pid) && platform != Platform::Cron => {
                out.info(&format!(
                    "A bridge runs outside the service (pid {pid}); --install hands it over to \
                     the service"
                ))
            }
            _ => {}
        }
    }
    if state.running { Ok(()) } else { Err(Exit { code: 1, message: String::new() }) }
}

/// XML text escaping for the plist.
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The user name, for the linger hint.
pub(crate) fn user_name() -> String {
    if let Some(u) = std::env::var("USER").ok().filter(|u| !u.is_empty()) {
        return u;
    }
    state::account_name(uid()).unwrap_or_else(|| "$USER".to_owned())
}

/// The numeric user id.
pub(crate) fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn spec() -> Spec {
        Spec {
            exe: PathBuf::from("/opt/hermes chat/bin/hermeschat-pair"),
            args: vec!["--foreground".into(), "--port".into(), "8000".into()],
            state_dir: PathBuf::from("/home/u/.hermeschat"),
            home: PathBuf::from("/home/u"),
            env: vec![
                ("HERMESCHAT_REGISTRY_URL".into(), "https://relay.example.com/?a=1&b=<2>".into()),
                ("PATH".into(), "/usr/bin:/bin".into()),
            ],
        }
    }

    #[test]
    fn escapes_xml_and_abbreviates_home() {
        assert_eq!(xml_escape("a&b<c>\"'"), "a&amp;b&lt;c&gt;&quot;&apos;");
        assert_eq!(tilde(Path::new("/home/u/x/y"), Path::new("/home/u")), "~/x/y");
        assert_eq!(tilde(Path::new("/etc/x"), Path::new("/home/u")), "/etc/x");
        assert_eq!(spec().hermes_home(), PathBuf::from("/home/u/.hermes"));
    }
}
