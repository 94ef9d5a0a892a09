//! Boot services (`--install`, `--uninstall`, `--service-status`) and the relay's unit.
//!
//! The service managers are stood in for by fake `launchctl`, `systemctl` and `loginctl`
//! scripts on PATH that record their arguments (macOS cannot run here, and a test must not
//! touch the machine's real systemd). The platform is forced with the hidden
//! `HERMESCHAT_SERVICE_PLATFORM`. Each test has a throwaway HOME and HERMESCHAT_HOME.
//!
//! What is checked for real: the plist parses as a property list (python3's `plistlib`) with
//! the right keys, and the generated units pass `systemd-analyze verify` (CI installs it; a
//! machine without it skips that part with a message).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fresh_dir;
use hermeschat_pair::protocol::RegisterResponse;
use hermeschat_pair::state::{self, BridgeIdentity};
use serde_json::Value;

const PAIR_BIN: &str = env!("CARGO_BIN_EXE_hermeschat-pair");
const RELAY_BIN: &str = env!("CARGO_BIN_EXE_hermeschat-relay");

/// The fake service managers: each appends `name args…` to `$FAKE_LOG` and fails as
/// `$FAKE_FAIL` says: its words are `name:sub` (that subcommand fails, exit 1) or
/// `name:sub:prefix` (only when one of its arguments starts with `prefix`), either followed by
/// `=code` for another exit code. The rest is [`FAKE_TAIL`] or, for `launchctl`,
/// [`FAKE_LAUNCHD`].
const FAKE_HEAD: &str = r#"#!/bin/sh
name=$(basename "$0")
echo "$name $*" >> "$FAKE_LOG"
sub=$1
[ "$sub" = "--user" ] && sub=$2
for f in ${FAKE_FAIL:-}; do
  spec=${f%%=*}; code=1
  [ "$spec" != "$f" ] && code=${f#*=}
  case "$spec" in
    "$name:$sub") ;;
    "$name:$sub:"*)
      prefix=${spec#"$name:$sub:"}; hit=
      for a in "$@"; do case "$a" in "$prefix"*) hit=1;; esac; done
      [ -n "$hit" ] || continue;;
    *) continue;;
  esac
  echo "$name $sub: failed (fake)" >&2; exit "$code"
done
start() {
  if [ -n "${FAKE_START:-}" ]; then sh -c "$FAKE_START" </dev/null >/dev/null 2>&1 & fi
}
"#;

/// `systemctl`, `loginctl`, `crontab`: print `$FAKE_<NAME>_<SUBCOMMAND>` (if set); `restart`
/// starts the service's bridge when the test says how (`$FAKE_START`).
const FAKE_TAIL: &str = r#"[ "$sub" = restart ] && start
var=$(echo "FAKE_${name}_${sub}" | tr 'a-z-' 'A-Z_')
eval "out=\${$var:-}"
[ -n "$out" ] && printf '%s\n' "$out"
exit 0
"#;

/// `launchctl`, with as much of launchd as these tests need: the jobs loaded, one
/// `domain/label` a line in `$FAKE_LOG.jobs` (`legacy/label`: loaded by a `launchctl load` that
/// no domain shows); the labels disabled (by `unload -w`) in `$FAKE_LOG.disabled`. The GUI
/// domain exists unless `FAKE_GUI=0` (nobody logged in at the desktop: an SSH session). A job
/// booted out is still there for the next `$FAKE_TEARDOWN` prints of it (launchd tearing it
/// down). `print` of a job prints `$FAKE_LAUNCHCTL_PRINT`, `list` `$FAKE_LAUNCHCTL_LIST`;
/// `bootstrap` and `kickstart` start the bridge as `$FAKE_START` says.
const FAKE_LAUNCHD: &str = r#"jobs="$FAKE_LOG.jobs"; disabled="$FAKE_LOG.disabled"
touch "$jobs" "$disabled"
uid=$(id -u)
has() { grep -qxF "$1" "$2"; }
drop() { grep -vxF "$1" "$2" > "$2.new"; mv "$2.new" "$2"; }
gui_ok() { [ "${FAKE_GUI:-1}" != 0 ]; }
domain_ok() { case "$1" in gui/*) gui_ok;; *) true;; esac; }
label_of() { b=$(basename "$1"); echo "${b%.plist}"; }
eval "last=\${$#}"
case "$sub" in
  print)
    case "$2" in
      */*/*) ;;
      *) domain_ok "$2" && exit 0; echo "Could not find domain for $2" >&2; exit 113;;
    esac
    tearing="$FAKE_LOG.tearing.$(echo "$2" | tr / _)"
    if [ -f "$tearing" ]; then
      n=$(cat "$tearing")
      if [ "$n" -le 0 ]; then drop "$2" "$jobs"; rm -f "$tearing"; else echo $((n - 1)) > "$tearing"; fi
    fi
    has "$2" "$jobs" || { echo "Could not find service \"${2##*/}\" in domain for ${2%/*}" >&2; exit 113; }
    [ -n "${FAKE_LAUNCHCTL_PRINT:-}" ] && printf '%s\n' "$FAKE_LAUNCHCTL_PRINT"
    exit 0;;
  bootout)
    has "$2" "$jobs" || { echo "Boot-out failed: 3: No such process" >&2; exit 3; }
    if [ "${FAKE_TEARDOWN:-0}" -gt 0 ]; then
      echo "$FAKE_TEARDOWN" > "$FAKE_LOG.tearing.$(echo "$2" | tr / _)"
    else
      drop "$2" "$jobs"
    fi
    exit 0;;
  bootstrap)
    label=$(label_of "$3")
    domain_ok "$2" || { echo "Bootstrap failed: 125: Domain does not support specified action" >&2; exit 125; }
    if has "$label" "$disabled" || has "$2/$label" "$jobs"; then
      echo "Bootstrap failed: 5: Input/output error" >&2; exit 5
    fi
    echo "$2/$label" >> "$jobs"; start; exit 0;;
  enable)
    drop "${2##*/}" "$disabled"; exit 0;;
  kickstart)
    has "$last" "$jobs" || { echo "Could not find service \"${last##*/}\"" >&2; exit 113; }
    start; exit 0;;
  load)
    label=$(label_of "$last")
    gui_ok || { echo "Load failed: 5: Input/output error" >&2; exit 5; }
    has "gui/$uid/$label" "$jobs" && { echo "$label: service already loaded" >&2; exit 5; }
    [ "$2" = -w ] && drop "$label" "$disabled"
    echo "gui/$uid/$label" >> "$jobs"; start; exit 0;;
  unload)
    label=$(label_of "$last")
    [ "$2" = -w ] && echo "$label" >> "$disabled"
    grep -qF "/$label" "$jobs" || { echo "Unload failed: 113: Could not find specified service" >&2; exit 113; }
    grep -vF "/$label" "$jobs" > "$jobs.new"; mv "$jobs.new" "$jobs"
    exit 0;;
  list)
    grep -qF "/$2" "$jobs" || { echo "Could not find service \"$2\" in domain for port" >&2; exit 113; }
    [ -n "${FAKE_LAUNCHCTL_LIST:-}" ] && printf '%s\n' "$FAKE_LAUNCHCTL_LIST"
    exit 0;;
esac
exit 0
"#;

/// One user's machine: HOME, the state dir, a bin dir of fakes, and their log.
struct Machine {
    root: PathBuf,
    home: PathBuf,
    state: PathBuf,
    fakes: PathBuf,
    log: PathBuf,
}

impl Machine {
    fn new() -> Machine {
        let root = fresh_dir("service");
        let home = root.join("home");
        let state = home.join("state dir"); // a space: quoting is part of the contract
        let fakes = root.join("bin");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&fakes).unwrap();
        for name in ["launchctl", "systemctl", "loginctl", "crontab"] {
            let p = fakes.join(name);
            let tail = if name == "launchctl" { FAKE_LAUNCHD } else { FAKE_TAIL };
            std::fs::write(&p, format!("{FAKE_HEAD}{tail}")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let log = root.join("calls.log");
        Machine { root, home, state, fakes, log }
    }

    /// Writes a valid `bridge.json` (a pairing exists).
    fn paired(&self) -> &Self {
        state::ensure_dir(&self.state).unwrap();
        let reg = RegisterResponse {
            bridge_id: "0123456789abcdef01234567".into(),
            relay_secret: format!("hrs_{}", "a".repeat(64)),
            bridge_relay_url: "ws://127.0.0.1:9/ws/bridge".into(),
            app_relay_url: "ws://127.0.0.1:9/ws/app".into(),
        };
        let id = BridgeIdentity::from_registration(reg, "http://127.0.0.1:9", "inst", "Test", 1);
        state::write_json(&state::bridge_json(&self.state), &id).unwrap();
        self
    }

    fn cmd(&self, platform: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(PAIR_BIN);
        cmd.args(args)
            .env_clear()
            .env("HOME", &self.home)
            .env("HERMESCHAT_HOME", &self.state)
            .env("HERMESCHAT_REGISTRY_URL", "https://relay.example.com")
            .env("HERMESCHAT_SERVICE_PLATFORM", platform)
            .env("PATH", format!("{}:/usr/bin:/bin", self.fakes.display()))
            .env("FAKE_LOG", &self.log)
            .env("USER", "tester")
            .env("NO_COLOR", "1")
            .current_dir(&self.root)
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `hermeschat-pair --foreground <args>` as a bridge started by hand and waits
    /// until it holds the state dir's pid lock.
    fn foreground_bridge(&self, platform: &str, args: &[&str]) -> std::process::Child {
        let bridge = self
            .cmd(platform, &[&["--foreground"][..], args].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lock = self.state.join("bridge.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&lock).map_or(true, |s| s.trim() != bridge.id().to_string()) {
            assert!(Instant::now() < deadline, "the foreground bridge never took the pid lock");
            std::thread::sleep(Duration::from_millis(20));
        }
        bridge
    }

    fn run(&self, platform: &str, args: &[&str], vars: &[(&str, &str)]) -> Out {
        let mut cmd = self.cmd(platform, args);
        cmd.envs(vars.iter().copied());
        Out(cmd.output().unwrap_or_else(|e| panic!("cannot run {PAIR_BIN}: {e}")))
    }

    /// The recorded calls, one per line.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn clear_calls(&self) {
        let _ = std::fs::remove_file(&self.log);
    }

    /// The fake launchd's loaded jobs (`domain/label`), one per line.
    fn launchd_jobs(&self) -> Vec<String> {
        let jobs = self.root.join("calls.log.jobs");
        std::fs::read_to_string(jobs).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    /// Sets the fake launchd's loaded jobs.
    fn set_launchd_jobs(&self, jobs: &[&str]) {
        let text: String = jobs.iter().map(|j| format!("{j}\n")).collect();
        std::fs::write(self.root.join("calls.log.jobs"), text).unwrap();
    }

    fn plist(&self) -> PathBuf {
        self.home.join("Library/LaunchAgents/ai.hermeschat.bridge.plist")
    }

    fn unit(&self) -> PathBuf {
        self.home.join(".config/systemd/user/hermeschat-bridge.service")
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

struct Out(Output);

impl Out {
    fn code(&self) -> Option<i32> {
        self.0.status.code()
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout(), String::from_utf8_lossy(&self.0.stderr))
    }
    #[track_caller]
    fn expect(&self, code: i32, what: &str) -> &Self {
        assert_eq!(self.code(), Some(code), "{what}: exit code; output:\n{}", self.all());
        self
    }
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// The binary as the service must name it: absolute, symlinks resolved.
fn exe() -> String {
    std::fs::canonicalize(PAIR_BIN).unwrap().to_string_lossy().into_owned()
}

/// Parses a plist with python3's plistlib and returns it as JSON.
fn parse_plist(path: &Path) -> Value {
    let script = "import json, plistlib, sys\n\
                  with open(sys.argv[1], 'rb') as f:\n    d = plistlib.load(f)\n\
                  print(json.dumps(d))";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .expect("python3 is needed to parse the plist (CI has it)");
    assert!(
        out.status.success(),
        "plistlib cannot parse {}: {}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(path).unwrap_or_default()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `systemd-analyze [--user] verify unit`: passes with no complaint at all, or the tool is
/// absent (then says so and returns false).
#[track_caller]
fn assert_systemd_verifies(unit: &Path, user: bool, runtime: &Path) -> bool {
    let which = Command::new("sh").arg("-c").arg("command -v systemd-analyze").output().unwrap();
    if !which.status.success() {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed here, so {} was not verified \
             (CI installs it: apt-get install systemd)",
            unit.display()
        );
        return false;
    }
    let mut cmd = Command::new("systemd-analyze");
    if user {
        cmd.arg("--user");
    }
    std::fs::create_dir_all(runtime).unwrap();
    std::fs::set_permissions(runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = cmd
        .arg("verify")
        .arg(unit)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify reports problems as warnings on stderr and may still exit 0: any line fails.
    let complaints: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify {} failed ({}):\n{stderr}\n--- unit:\n{}",
        unit.display(),
        out.status,
        std::fs::read_to_string(unit).unwrap_or_default()
    );
    true
}

// =============================================================================================

#[test]
fn install_is_refused_before_a_pairing_exists() {
    for platform in ["macos", "systemd"] {
        let m = Machine::new();
        let run = m.run(platform, &["--install"], &[]);
        run.expect(2, "--install before pairing");
        let text = run.all();
        assert!(text.contains("--install") && text.contains("bridge.json"), "{text}");
        assert!(text.contains("hermeschat-pair"), "{text}");
        assert!(m.calls().is_empty(), "no service manager call before pairing: {:?}", m.calls());
        assert!(!m.plist().exists() && !m.unit().exists());
    }
}

#[test]
fn macos_install_writes_a_launch_agent_and_bootstraps_it() {
    let m = Machine::new();
    m.paired();
    let run = m.run("macos", &["--install"], &[]);
    run.expect(0, "--install (macOS)");
    let plist = m.plist();
    let calls = m.calls();
    let domain = format!("gui/{}", uid());
    assert!(
        calls.contains(&format!("launchctl bootstrap {domain} {}", plist.display())),
        "launchctl bootstrap gui/<uid> <plist> expected: {calls:?}"
    );
    assert!(!calls.iter().any(|c| c.contains("load -w")), "no fallback needed: {calls:?}");

    let d = parse_plist(&plist);
    assert_eq!(d["Label"], "ai.hermeschat.bridge", "{d}");
    assert_eq!(d["ProgramArguments"], serde_json::json!([exe(), "--foreground"]), "{d}");
    assert!(Path::new(d["ProgramArguments"][0].as_str().unwrap()).is_absolute());
    assert_eq!(d["RunAtLoad"], true, "{d}");
    assert!(d["KeepAlive"] == true || d["KeepAlive"].is_object(), "KeepAlive: {d}");
    // Not `Background`: launchd would throttle the chat's CPU and I/O (and the gateway's).
    assert_eq!(d["ProcessType"], "Standard", "{d}");
    let state = m.state.to_string_lossy();
    assert_eq!(d["StandardOutPath"], format!("{state}/service.log"), "{d}");
    assert_eq!(d["StandardErrorPath"], format!("{state}/service-error.log"), "{d}");
    assert_eq!(d["EnvironmentVariables"]["HERMESCHAT_HOME"], *state, "{d}");
    assert_eq!(d["EnvironmentVariables"]["HERMESCHAT_REGISTRY_URL"], "https://relay.example.com");
    // The logs exist, private, before launchd appends to them.
    for log in ["service.log", "service-error.log"] {
        let mode = std::fs::metadata(m.state.join(log)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{log} mode");
    }
    assert!(run.stdout().contains("ai.hermeschat.bridge"), "{}", run.all());
}

#[test]
fn macos_bootstrap_failure_falls_back_to_load_w() {
    let m = Machine::new();
    m.paired();
    let run =
        m.run("macos", &["--install"], &[("FAKE_FAIL", "launchctl:bootstrap launchctl:print")]);
    run.expect(0, "--install with a failing bootstrap");
    let calls = m.calls();
    assert!(
        calls.contains(&format!("launchctl load -w {}", m.plist().display())),
        "fallback to launchctl load -w expected: {calls:?}"
    );
    // Both failing: exit 1 with both reasons, and the plist stays for a manual load.
    m.clear_calls();
    let run = m.run(
        "macos",
        &["--install"],
        &[("FAKE_FAIL", "launchctl:bootstrap launchctl:load launchctl:print")],
    );
    run.expect(1, "--install when launchctl fails");
    assert!(run.all().contains("bootstrap") && run.all().contains("load -w"), "{}", run.all());
}

#[test]
fn macos_service_status_and_uninstall() {
    let m = Machine::new();
    m.paired();
    m.run("macos", &["--install"], &[]).expect(0, "--install");
    let print =
        "gui/501/ai.hermeschat.bridge = {\n\tactive count = 1\n\tstate = running\n\tpid = 4242\n}";
    let run = m.run("macos", &["--service-status"], &[("FAKE_LAUNCHCTL_PRINT", print)]);
    run.expect(0, "--service-status (running)");
    let text = run.stdout();
    assert!(text.contains("● launchd service running pid=4242"), "{text}");
    assert!(text.contains("label : ai.hermeschat.bridge"), "{text}");
    assert!(text.contains("plist : ~/Library/LaunchAgents/ai.hermeschat.bridge.plist"), "{text}");
    let run = m.run("macos", &["--service-status", "--json"], &[("FAKE_LAUNCHCTL_PRINT", print)]);
    let v: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert_eq!(v["service"]["pid"], 4242, "{v}");
    assert_eq!(v["service"]["installed"], true, "{v}");

    m.clear_calls();
    m.run("macos", &["--uninstall"], &[]).expect(0, "--uninstall");
    let calls = m.calls();
    assert!(
        calls.contains(&format!("launchctl bootout gui/{}/ai.hermeschat.bridge", uid())),
        "bootout expected: {calls:?}"
    );
    assert!(!m.plist().exists(), "the plist must be removed");
    let run =
        m.run("macos", &["--service-status"], &[("FAKE_FAIL", "launchctl:print launchctl:list")]);
    run.expect(1, "--service-status after uninstall");
    assert!(run.stdout().contains("not installed"), "{}", run.all());
    // Uninstalling twice is fine.
    m.run("macos", &["--uninstall"], &[("FAKE_FAIL", "launchctl:print")]).expect(0, "again");
}

/// `--service-status` reads the job's own `state` and `pid` from `launchctl print`, not those
/// of a nested block printed before them (a coalition's `state = active`).
#[test]
fn macos_service_status_reads_only_the_jobs_own_lines() {
    let m = Machine::new();
    m.paired();
    m.run("macos", &["--install"], &[]).expect(0, "--install");
    assert_eq!(m.launchd_jobs(), [format!("gui/{}/ai.hermeschat.bridge", uid())]);
    let print = "gui/501/ai.hermeschat.bridge = {\n\tactive count = 1\n\tjetsam coalition = \
                 {\n\t\tID = 7\n\t\tstate = active\n\t\tpid = 99\n\t}\n\tstate = running\n\
                 \tpid = 4242\n}";
    let run = m.run("macos", &["--service-status"], &[("FAKE_LAUNCHCTL_PRINT", print)]);
    run.expect(0, "--service-status (running)");
    assert!(run.stdout().contains("● launchd service running pid=4242"), "{}", run.all());
    // A job that is not running: its state, not the coalition's.
    let print = "gui/501/ai.hermeschat.bridge = {\n\tresource coalition = {\n\t\tstate = \
                 active\n\t}\n\tstate = not running\n\tlast exit code = 2\n}";
    let run = m.run("macos", &["--service-status"], &[("FAKE_LAUNCHCTL_PRINT", print)]);
    run.expect(1, "--service-status (not running)");
    assert!(run.stdout().contains("not running (not running, last exit code 2)"), "{}", run.all());
}

/// The launchd service's bridge finding no pairing (bridge.json deleted, or set aside as
/// damaged) says why in its log and exits 0: launchd's `KeepAlive` would restart any other
/// exit every 10 s for ever. The systemd unit is told not to restart on exit 2
/// (`RestartPreventExitStatus=2`), and a bridge run by hand is no service: exit 2 there.
#[test]
fn macos_service_bridge_without_a_pairing_exits_0() {
    let m = Machine::new();
    m.paired();
    m.run("macos", &["--install"], &[]).expect(0, "--install");
    let d = parse_plist(&m.plist());
    assert_eq!(d["KeepAlive"]["SuccessfulExit"], false, "{d}");
    assert_eq!(d["EnvironmentVariables"]["HERMESCHAT_SERVICE"], "1", "{d}");
    std::fs::remove_file(state::bridge_json(&m.state)).unwrap();
    // The bridge as launchd runs it: the plist's arguments and environment.
    let args: Vec<&str> =
        d["ProgramArguments"].as_array().unwrap()[1..].iter().filter_map(Value::as_str).collect();
    let env: Vec<(&str, &str)> = d["EnvironmentVariables"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
        .collect();
    let run = m.run("macos", &args, &env);
    run.expect(0, "the launchd service's bridge without a pairing");
    let text = run.all();
    assert!(text.contains("no pairing yet") && text.contains("exit 0"), "{text}");

    let run = m.run("systemd", &args, &env);
    run.expect(2, "the systemd service's bridge without a pairing (RestartPreventExitStatus=2)");
    m.run("macos", &["--foreground"], &[]).expect(2, "a bridge run by hand without a pairing");
}

#[test]
fn linux_install_writes_a_verified_unit_and_enables_it() {
    let m = Machine::new();
    m.paired();
    let run = m.run("systemd", &["--install"], &[]);
    run.expect(0, "--install (systemd)");
    let calls = m.calls();
    let expected = [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now hermeschat-bridge.service",
    ];
    for e in expected {
        assert!(calls.iter().any(|c| c == e), "{e} expected: {calls:?}");
    }
    let reload = calls.iter().position(|c| c.ends_with("daemon-reload")).unwrap();
    let enable = calls.iter().position(|c| c.contains("enable --now")).unwrap();
    assert!(reload < enable, "daemon-reload before enable: {calls:?}");
    // No lingering reported: the hint for headless boxes.
    assert!(run.all().contains("loginctl enable-linger tester"), "{}", run.all());

    let unit = std::fs::read_to_string(m.unit()).unwrap();
    for line in [
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "WantedBy=default.target",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}:\n{unit}");
    }
    assert!(
        unit.contains(&format!("ReadWritePaths=\"{}\"", m.state.display())),
        "the state dir must be writable:\n{unit}"
    );
    assert!(unit.contains(&format!("ExecStart={} --foreground", exe())), "{unit}");
    assert_systemd_verifies(&m.unit(), true, &m.root.join("runtime"));

    // With lingering on, no hint.
    let run = m.run("systemd", &["--install"], &[("FAKE_LOGINCTL_SHOW_USER", "yes")]);
    run.expect(0, "reinstall");
    assert!(!run.all().contains("sudo loginctl enable-linger"), "{}", run.all());
}

#[test]
fn linux_reinstall_restarts_an_active_service() {
    let m = Machine::new();
    m.paired();
    let run = m.run("systemd", &["--install"], &[("FAKE_SYSTEMCTL_IS_ACTIVE", "active")]);
    run.expect(0, "--install over an active service");
    let calls = m.calls();
    assert!(
        calls.contains(&"systemctl --user restart hermeschat-bridge.service".to_owned()),
        "{calls:?}"
    );
}

#[test]
fn linux_without_a_user_manager_explains_and_offers_cron() {
    let m = Machine::new();
    m.paired();
    let run = m.run("systemd", &["--install"], &[("FAKE_FAIL", "systemctl:daemon-reload")]);
    run.expect(1, "--install without a user manager");
    let text = run.all();
    assert!(text.contains("enable-linger") && text.contains("@reboot"), "{text}");
}

#[test]
fn linux_service_status_and_uninstall() {
    let m = Machine::new();
    m.paired();
    m.run("systemd", &["--install"], &[]).expect(0, "--install");
    let show = "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=4242\nUnitFileState=enabled\nResult=success";
    let run = m.run("systemd", &["--service-status"], &[("FAKE_SYSTEMCTL_SHOW", show)]);
    run.expect(0, "--service-status");
    let text = run.stdout();
    assert!(text.contains("● systemd service running pid=4242"), "{text}");
    assert!(text.contains("hermeschat-bridge.service"), "{text}");
    assert!(!text.contains("older hermeschat-pair"), "{text}");
    // A unit written by an older hermeschat-pair (before HERMESCHAT_SERVICE): named, with the
    // fix.
    let unit = std::fs::read_to_string(m.unit()).unwrap();
    let old: String = unit
        .lines()
        .filter(|l| !l.contains("HERMESCHAT_SERVICE"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(old, unit);
    std::fs::write(m.unit(), &old).unwrap();
    let run = m.run("systemd", &["--service-status"], &[("FAKE_SYSTEMCTL_SHOW", show)]);
    assert!(
        run.stdout()
            .contains("written by an older hermeschat-pair: run hermeschat-pair --install again"),
        "{}",
        run.all()
    );
    std::fs::write(m.unit(), &unit).unwrap();
    let dead = "ActiveState=inactive\nSubState=dead\nMainPID=0\nUnitFileState=enabled";
    let run = m.run("systemd", &["--service-status"], &[("FAKE_SYSTEMCTL_SHOW", dead)]);
    run.expect(1, "--service-status (stopped)");
    assert!(run.stdout().contains("inactive (dead)"), "{}", run.all());

    m.clear_calls();
    m.run("systemd", &["--uninstall"], &[]).expect(0, "--uninstall");
    let calls = m.calls();
    assert!(
        calls.contains(&"systemctl --user disable --now hermeschat-bridge.service".to_owned()),
        "{calls:?}"
    );
    assert!(calls.last().is_some_and(|c| c.ends_with("daemon-reload")), "{calls:?}");
    assert!(!m.unit().exists());
    m.clear_calls();
    m.run("systemd", &["--uninstall"], &[]).expect(0, "--uninstall again");
    assert!(m.calls().is_empty(), "nothing installed: no calls: {:?}", m.calls());
}

#[test]
fn install_hands_a_running_detached_daemon_over_to_the_service() {
    let m = Machine::new();
    m.paired();
    // A bridge holding the state dir's pid lock (its relay and backend are unreachable; it
    // keeps retrying, as a real daemon would).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut bridge =
        m.foreground_bridge("systemd", &["--no-server", "--port", &closed.to_string()]);
    let run = m.run("systemd", &["--install"], &[]);
    run.expect(0, "--install with a running daemon");
    assert!(
        run.all().contains(&format!("Stopped the running bridge daemon (pid {})", bridge.id())),
        "{}",
        run.all()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = bridge.try_wait().unwrap() {
            assert!(status.success(), "the daemon should exit cleanly on SIGTERM: {status}");
            break;
        }
        if Instant::now() >= deadline {
            let _ = bridge.kill();
            panic!("the detached daemon still runs after --install");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // It was stopped before the service was started.
    let calls = m.calls();
    assert!(calls.iter().any(|c| c.contains("enable --now")), "{calls:?}");
}

/// launchctl is asked about the job in the GUI domain, then in the user domain (where an SSH
/// session loads it): `--service-status` and `--uninstall` find it there. A job loaded the
/// legacy way (`launchctl load`), which no domain shows, is unloaded by `--uninstall` all the
/// same: it must not keep running after the user was told it is gone.
#[test]
fn macos_finds_the_job_in_the_user_domain_and_a_legacy_loaded_one() {
    let m = Machine::new();
    m.paired();
    m.run("macos", &["--install"], &[]).expect(0, "--install");
    let user_job = format!("user/{}/ai.hermeschat.bridge", uid());
    m.set_launchd_jobs(&[&user_job]);
    let print = "user/501/ai.hermeschat.bridge = {\n\tstate = running\n\tpid = 4242\n}";
    let vars = [("FAKE_LAUNCHCTL_PRINT", print), ("FAKE_GUI", "0")];
    let run = m.run("macos", &["--service-status"], &vars);
    run.expect(0, "--service-status (loaded in the user domain)");
    assert!(run.stdout().contains("● launchd service running pid=4242"), "{}", run.all());

    m.clear_calls();
    let run = m.run("macos", &["--uninstall"], &[("FAKE_GUI", "0")]);
    run.expect(0, "--uninstall (loaded in the user domain)");
    assert!(m.calls().contains(&format!("launchctl bootout {user_job}")), "{:?}", m.calls());
    assert!(m.launchd_jobs().is_empty(), "still loaded: {:?}", m.launchd_jobs());
    assert!(!m.plist().exists());

    m.run("macos", &["--install"], &[]).expect(0, "--install again");
    m.set_launchd_jobs(&["legacy/ai.hermeschat.bridge"]);
    m.clear_calls();
    let run = m.run("macos", &["--uninstall"], &[]);
    run.expect(0, "--uninstall (loaded with launchctl load)");
    let calls = m.calls();
    assert!(calls.contains(&format!("launchctl unload {}", m.plist().display())), "{calls:?}");
    assert!(m.launchd_jobs().is_empty(), "still loaded: {:?}", m.launchd_jobs());
    assert!(!m.plist().exists());
    assert!(run.stdout().contains("Stopped and unloaded"), "{}", run.all());
}

/// Pairing restarts the bridge through the LaunchAgent loaded in the user domain (an SSH
/// session's): `launchctl kickstart` is tried in the GUI domain, then there.
#[test]
fn pairing_kickstarts_the_launch_agent_in_the_user_domain() {
    let m = Machine::new();
    m.paired();
    m.run("macos", &["--install"], &[]).expect(0, "--install");
    let user_job = format!("user/{}/ai.hermeschat.bridge", uid());
    m.set_launchd_jobs(&[&user_job]);
    std::fs::write(m.state.join("lan.json"), "{}").unwrap();
    m.clear_calls();
    let (backend, lan) = (free_port().to_string(), free_port().to_string());
    let service_bridge = format!(
        "HERMESCHAT_SERVICE=1 '{PAIR_BIN}' --foreground --local --host 127.0.0.1 --local-port \
         {lan} --port {backend}"
    );
    let pair = ["--local", "--host", "127.0.0.1", "--local-port", &lan, "--port", &backend];
    let run = m.run("macos", &pair, &[("FAKE_START", &service_bridge), ("FAKE_GUI", "0")]);
    run.expect(0, "--local with the LaunchAgent in the user domain");
    let text = run.all();
    assert!(text.contains("Bridge daemon started by the launchd service (pid"), "{text}");
    let kickstart = format!("launchctl kickstart -k {user_job}");
    assert!(m.calls().contains(&kickstart), "{:?}", m.calls());
    m.run("macos", &["--stop"], &[]).expect(0, "--stop");
}

/// `--install` over a loaded job boots it out and waits until launchd has torn it down before
/// it bootstraps the new plist (a bootstrap meanwhile fails: "5: Input/output error").
#[test]
fn macos_reinstall_waits_for_the_old_job_to_be_torn_down() {
    let m = Machine::new();
    m.paired();
    m.run("macos", &["--install"], &[]).expect(0, "--install");
    m.clear_calls();
    let run = m.run("macos", &["--install"], &[("FAKE_TEARDOWN", "3")]);
    run.expect(0, "--install over a loaded job that takes a while to go");
    let calls = m.calls();
    let job = format!("gui/{}/ai.hermeschat.bridge", uid());
    let bootout = calls.iter().position(|c| *c == format!("launchctl bootout {job}"));
    let bootstrap = calls.iter().position(|c| c.starts_with("launchctl bootstrap gui/"));
    assert!(bootout.is_some() && bootout < bootstrap, "{calls:?}");
    let polls =
        calls[bootout.unwrap()..].iter().filter(|c| **c == format!("launchctl print {job}"));
    assert!(polls.count() >= 4, "launchctl print polled until the job is gone: {calls:?}");
    assert!(!calls.iter().any(|c| c.contains("load -w")), "{calls:?}");
    assert!(run.stdout().contains("Loaded with launchctl bootstrap gui/"), "{}", run.all());
    assert_eq!(m.launchd_jobs(), [job]);
}

/// A label left disabled (by a legacy `launchctl unload -w`) is enabled before the bootstrap,
/// which refuses a disabled job.
#[test]
fn macos_install_enables_a_disabled_label_before_bootstrap() {
    let m = Machine::new();
    m.paired();
    std::fs::write(m.root.join("calls.log.disabled"), "ai.hermeschat.bridge\n").unwrap();
    let run = m.run("macos", &["--install"], &[]);
    run.expect(0, "--install with the label disabled");
    let calls = m.calls();
    let job = format!("gui/{}/ai.hermeschat.bridge", uid());
    let enable = calls.iter().position(|c| *c == format!("launchctl enable {job}"));
    let bootstrap = calls.iter().position(|c| c.starts_with("launchctl bootstrap gui/"));
    assert!(enable.is_some() && enable < bootstrap, "{calls:?}");
    assert!(!calls.iter().any(|c| c.contains("load -w")), "no fallback needed: {calls:?}");
    assert!(run.stdout().contains("Loaded with launchctl bootstrap gui/"), "{}", run.all());
}

/// Over SSH with nobody logged in at the desktop there is no `gui/<uid>` domain: `--install`
/// loads the job into `user/<uid>` (where it runs now), and says that launchd loads it by
/// itself only at a desktop login.
#[test]
fn macos_install_over_ssh_loads_into_the_user_domain() {
    let m = Machine::new();
    m.paired();
    let run = m.run("macos", &["--install"], &[("FAKE_GUI", "0")]);
    run.expect(0, "--install with no desktop session");
    let calls = m.calls();
    let user = format!("user/{}", uid());
    let bootstrap = format!("launchctl bootstrap {user} {}", m.plist().display());
    assert!(calls.contains(&bootstrap), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("launchctl bootstrap gui/")), "{calls:?}");
    assert_eq!(m.launchd_jobs(), [format!("{user}/ai.hermeschat.bridge")]);
    let text = run.all();
    assert!(text.contains(&format!("Loaded with launchctl bootstrap {user}")), "{text}");
    assert!(text.contains("only at a desktop login"), "{text}");
}

/// When launchd loads the job neither way after `--install` stopped the running bridge for it
/// (no desktop session, "Allow in the Background" off), the bridge is started again outside
/// the service, and the error says why and what to do next, not the command that just failed.
#[test]
fn macos_install_that_launchd_refuses_keeps_the_bridge_running() {
    let m = Machine::new();
    m.paired();
    let closed = free_port().to_string();
    let bridge_args = ["--no-server", "--port", closed.as_str()];
    let mut bridge = m.foreground_bridge("macos", &bridge_args);
    let install = [&["--install"][..], &bridge_args].concat();
    let vars = [("FAKE_GUI", "0"), ("FAKE_FAIL", "launchctl:bootstrap=5")];
    let run = m.run("macos", &install, &vars);
    run.expect(1, "--install that launchd refuses");
    let text = run.all();
    let stopped = bridge.wait().unwrap();
    assert!(stopped.success(), "the old bridge stops cleanly: {stopped}");
    assert!(text.contains("Allow in the Background") && text.contains("desktop"), "{text}");
    assert!(text.contains("runs again, outside the service (pid"), "{text}");
    let next = text.lines().find(|l| l.contains("Next:")).unwrap_or_else(|| panic!("{text}"));
    assert!(!next.contains("launchctl"), "the next step is not what just failed: {next}");
    // A daemon serves again.
    let pid: u32 =
        std::fs::read_to_string(m.state.join("bridge.pid")).unwrap().trim().parse().unwrap();
    assert_ne!(pid, bridge.id());
    // SAFETY: kill with signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, 0) }, 0, "pid {pid} is not running");
    m.run("macos", &["--stop"], &[]).expect(0, "--stop");
}

/// The proxy variables reach the service's bridge (it would connect to no relay behind a
/// proxy otherwise), but only without credentials: the unit file is world-readable.
#[test]
fn install_passes_proxy_variables_without_credentials() {
    let m = Machine::new();
    m.paired();
    let vars = [
        ("https_proxy", "http://proxy.corp:3128"),
        ("NO_PROXY", ".corp,10.0.0.0"),
        ("ALL_PROXY", "http://user:pr0xy-s3cret@proxy.corp:3128"),
    ];
    let run = m.run("systemd", &["--install"], &vars);
    run.expect(0, "--install");
    // The one left out is named (its bridge would otherwise go direct without a word), never
    // its password.
    let said = run.all();
    assert!(said.contains("ALL_PROXY holds a password and is not written"), "{said}");
    assert!(said.contains("(other users can read it): give the service"), "{said}");
    assert!(!said.contains("pr0xy-s3cret"), "{said}");
    let unit = std::fs::read_to_string(m.unit()).unwrap();
    assert!(unit.contains("Environment=\"https_proxy=http://proxy.corp:3128\""), "{unit}");
    assert!(unit.contains("Environment=\"NO_PROXY=.corp,10.0.0.0\""), "{unit}");
    assert!(!unit.contains("pr0xy-s3cret") && !unit.contains("ALL_PROXY"), "{unit}");
    m.run("systemd", &["--uninstall"], &[]).expect(0, "--uninstall");
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// With the service installed, pairing starts the bridge through it (it keeps the service's
/// restart on failure) when the service's bridge serves what the pairing needs; one that
/// serves something else is stopped again and the bridge runs outside the service, with the
/// fix said. A service's bridge finding one started by hand leaves with exit 0, so the
/// manager does not restart it over and over.
#[test]
fn pairing_starts_the_bridge_through_the_installed_service() {
    let m = Machine::new();
    m.paired();
    m.run("systemd", &["--install"], &[]).expect(0, "--install");
    let unit = std::fs::read_to_string(m.unit()).unwrap();
    assert!(unit.contains("Environment=\"HERMESCHAT_SERVICE=1\""), "{unit}");
    std::fs::write(m.state.join("lan.json"), "{}").unwrap();
    m.clear_calls();

    let (backend, lan) = (free_port().to_string(), free_port().to_string());
    let service_bridge = |lan_port: &str| {
        format!(
            "HERMESCHAT_SERVICE=1 '{PAIR_BIN}' --foreground --local --host 127.0.0.1 \
             --local-port {lan_port} --port {backend}"
        )
    };
    let pair = ["--local", "--host", "127.0.0.1", "--local-port", &lan, "--port", &backend];
    let run = m.run("systemd", &pair, &[("FAKE_START", &service_bridge(&lan))]);
    run.expect(0, "--local with the service installed");
    let text = run.all();
    assert!(text.contains("Bridge daemon started by the systemd service (pid"), "{text}");
    assert!(!text.contains("another copy"), "{text}");
    assert!(
        m.calls().iter().any(|c| c.contains("restart hermeschat-bridge.service")),
        "{:?}",
        m.calls()
    );

    // A second bridge, as the service would start one now: it leaves cleanly.
    let again = m.run("systemd", &["--foreground", "--local"], &[("HERMESCHAT_SERVICE", "1")]);
    again.expect(0, "the service's bridge with one already running");
    assert!(again.all().contains("hands the bridge over to the service"), "{}", again.all());
    m.run("systemd", &["--foreground", "--local"], &[]).expect(1, "a second bridge by hand");

    // The service's bridge serves another LAN port than this pairing asks for; and its unit
    // names another copy of the program (an older install), which is said.
    let unit = std::fs::read_to_string(m.unit()).unwrap();
    std::fs::write(m.unit(), unit.replace(&exe(), "/opt/old/hermeschat-pair")).unwrap();
    let other = free_port().to_string();
    let pair = ["--local", "--host", "127.0.0.1", "--local-port", &other, "--port", &backend];
    let run = m.run("systemd", &pair, &[("FAKE_START", &service_bridge(&lan))]);
    run.expect(0, "--local on another port with the service installed");
    let text = run.all();
    assert!(text.contains("runs the bridge with other settings"), "{text}");
    assert!(text.contains("runs another copy of hermeschat-pair"), "{text}");
    assert!(text.contains("Bridge daemon started (pid"), "{text}");
    m.run("systemd", &["--stop"], &[]).expect(0, "--stop");
}

#[test]
fn without_systemd_a_cron_line_is_printed() {
    let m = Machine::new();
    m.paired();
    let run = m.run("cron", &["--install"], &[]);
    run.expect(0, "--install (cron)");
    let text = run.stdout();
    let line = text.lines().find(|l| l.starts_with("@reboot")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(&exe()) && line.contains("--foreground"), "{line}");
    assert!(line.contains("service-error.log"), "{line}");
    // cron's own PATH is bare: the gateway wake-up finds `hermes` through this one.
    assert!(line.contains(&format!("PATH={}:/usr/bin:/bin", m.fakes.display())), "{line}");
    assert!(m.calls().is_empty(), "the crontab is never edited: {:?}", m.calls());
    // Before the line is added, --service-status says what to do with it.
    let run = m.run("cron", &["--service-status"], &[]);
    assert!(
        run.stdout().contains("add the one hermeschat-pair --install prints"),
        "{}",
        run.stdout()
    );
    assert!(!run.stdout().contains("install with"), "{}", run.stdout());
    let crontab = format!("# m h dom mon dow command\n{line}");
    let run = m.run("cron", &["--service-status", "--json"], &[("FAKE_CRONTAB__L", &crontab)]);
    let v: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert_eq!(v["service"]["installed"], true, "{v}");
}

/// `hermeschat-relay --print-systemd-unit` with `args` and `env` (and no other
/// `HERMESCHAT_RELAY_*` variable): exit code, stdout, stderr.
fn relay_unit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    relay_unit_of(Path::new(RELAY_BIN), args, env)
}

/// [`relay_unit`] of the relay binary at `exe`.
fn relay_unit_of(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HERMESCHAT_RELAY_") {
            cmd.env_remove(name);
        }
    }
    let out =
        cmd.arg("--print-systemd-unit").args(args).envs(env.iter().copied()).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The words of the unit's `ExecStart=` line as systemd reads them: split at blanks outside
/// double quotes, `\\` and `\"` unescaped, `%%` and `$$` made single (`%d` is kept).
fn exec_start_words(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart= in:\n{unit}"));
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                word.get_or_insert_default();
            }
            '\\' => word.get_or_insert_default().extend(chars.next()),
            '%' | '$' if chars.peek() == Some(&c) => {
                chars.next();
                word.get_or_insert_default().push(c);
            }
            ' ' if !quoted => words.extend(word.take()),
            c => word.get_or_insert_default().push(c),
        }
    }
    words.extend(word);
    words
}

#[test]
fn relay_unit_passes_systemd_analyze() {
    let dir = fresh_dir("relay-unit");
    let (code, unit_text, stderr) = relay_unit(&["--public-url", "https://relay.example.com"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let unit = dir.join("hermeschat-relay.service");
    std::fs::write(&unit, &unit_text).unwrap();
    assert_systemd_verifies(&unit, false, &dir.join("runtime"));
    // Invalid settings (exit 2) are not retried every 2 s.
    assert!(unit_text.lines().any(|l| l == "RestartPreventExitStatus=2"), "{unit_text}");
    let words = exec_start_words(&unit_text);
    let want = [
        RELAY_BIN,
        "--listen",
        "127.0.0.1:8787",
        "--public-url",
        "https://relay.example.com",
        "--data",
        "/var/lib/hermeschat-relay",
    ];
    assert_eq!(words, want, "{unit_text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A binary under `/tmp` would be hidden from the service by `PrivateTmp=yes` (systemd would
/// fail with 203/EXEC): the unit is printed with a warning that says so and where to put it.
#[test]
fn relay_unit_warns_about_a_binary_in_a_temporary_directory() {
    let dir = Path::new("/tmp").join(format!("hermeschat-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("hermeschat-relay");
    // A hard link is free; a copy when /tmp is another file system.
    if std::fs::hard_link(RELAY_BIN, &exe).is_err() {
        std::fs::copy(RELAY_BIN, &exe).unwrap();
    }
    let args = ["--public-url", "https://relay.example.com"];
    let run = std::panic::catch_unwind(|| relay_unit_of(&exe, &args, &[]));
    let _ = std::fs::remove_dir_all(&dir);
    let Ok((code, unit, stderr)) = run else {
        eprintln!("SKIPPED: a binary under /tmp cannot run here (noexec?)");
        return;
    };
    assert_eq!(code, Some(0), "{stderr}");
    assert!(unit.contains(&format!("ExecStart={} ", exe.display())), "{unit}");
    assert!(stderr.contains("warning") && stderr.contains("PrivateTmp=yes"), "{stderr}");
    assert!(stderr.contains("/usr/local/bin"), "{stderr}");
}

/// Every setting given to `--print-systemd-unit`, as a flag or as an environment variable,
/// reaches the unit's command line; the TLS files are handed over by systemd (read as root at
/// start, so a root-only key and a file under a home work); a port below 1024 gets the one
/// capability it needs; the unit still passes `systemd-analyze verify`.
#[test]
fn relay_unit_keeps_every_setting() {
    let dir = fresh_dir("relay-unit-all");
    let cert = dir.join("fullchain.pem");
    let key = dir.join("my key%1.pem");
    std::fs::write(&cert, "cert").unwrap();
    std::fs::write(&key, "key").unwrap();
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let args = [
        "--listen",
        "0.0.0.0:443",
        "--public-url",
        "https://relay.example.com/a$b",
        "--data",
        "/var/lib/relay-two",
        "--tls-cert",
        cert_s,
        "--tls-key",
        key_s,
        "--trust-proxy",
        "--rate-register",
        "0",
        "--rate-verify",
        "5",
        "--code-ttl-secs",
        "300",
        "--handshake-timeout-secs",
        "20",
        "--max-connections",
        "1000",
        "--max-connections-per-ip",
        "0",
    ];
    let (code, unit_text, stderr) = relay_unit(&args, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let want = [
        RELAY_BIN,
        "--listen",
        "0.0.0.0:443",
        "--public-url",
        "https://relay.example.com/a$b",
        "--data",
        "/var/lib/relay-two",
        "--tls-cert",
        "%d/tls-cert",
        "--tls-key",
        "%d/tls-key",
        "--trust-proxy",
        "--rate-register",
        "0",
        "--rate-verify",
        "5",
        "--code-ttl-secs",
        "300",
        "--handshake-timeout-secs",
        "20",
        "--max-connections",
        "1000",
        "--max-connections-per-ip",
        "0",
    ];
    assert_eq!(exec_start_words(&unit_text), want, "{unit_text}");
    let lines: Vec<&str> = unit_text.lines().collect();
    for line in [
        format!("LoadCredential=tls-cert:{cert_s}"),
        format!("LoadCredential=tls-key:{}", key_s.replace('%', "%%")),
        "StateDirectory=relay-two".to_owned(),
        "AmbientCapabilities=CAP_NET_BIND_SERVICE".to_owned(),
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE".to_owned(),
    ] {
        assert!(lines.contains(&line.as_str()), "no {line:?} in:\n{unit_text}");
    }
    let unit = dir.join("hermeschat-relay.service");
    std::fs::write(&unit, &unit_text).unwrap();
    assert_systemd_verifies(&unit, false, &dir.join("runtime"));

    // The same from the environment.
    let env = [
        ("HERMESCHAT_RELAY_LISTEN", "127.0.0.1:9000"),
        ("HERMESCHAT_RELAY_PUBLIC_URL", "https://relay.example.com"),
        ("HERMESCHAT_RELAY_TLS_CERT", cert_s),
        ("HERMESCHAT_RELAY_TLS_KEY", key_s),
        ("HERMESCHAT_RELAY_TRUST_PROXY", "yes"),
        ("HERMESCHAT_RELAY_RATE_REGISTER", "7"),
        ("HERMESCHAT_RELAY_RATE_VERIFY", "8"),
        ("HERMESCHAT_RELAY_CODE_TTL_SECS", "60"),
        ("HERMESCHAT_RELAY_HANDSHAKE_TIMEOUT_SECS", "5"),
        ("HERMESCHAT_RELAY_MAX_CONNECTIONS", "100"),
        ("HERMESCHAT_RELAY_MAX_CONNECTIONS_PER_IP", "9"),
    ];
    let (code, unit_text, stderr) = relay_unit(&[], &env);
    assert_eq!(code, Some(0), "{stderr}");
    let want = [
        RELAY_BIN,
        "--listen",
        "127.0.0.1:9000",
        "--public-url",
        "https://relay.example.com",
        "--data",
        "/var/lib/hermeschat-relay",
        "--tls-cert",
        "%d/tls-cert",
        "--tls-key",
        "%d/tls-key",
        "--trust-proxy",
        "--rate-register",
        "7",
        "--rate-verify",
        "8",
        "--code-ttl-secs",
        "60",
        "--handshake-timeout-secs",
        "5",
        "--max-connections",
        "100",
        "--max-connections-per-ip",
        "9",
    ];
    assert_eq!(exec_start_words(&unit_text), want, "{unit_text}");
    assert!(!unit_text.contains("CAP_NET_BIND_SERVICE"), "port 9000 needs no capability");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the unit cannot hold is refused (exit 2, nothing printed): a control character (it
/// would start a directive of its own), no `--public-url` (apps would be handed a
/// placeholder), a `--data` outside `/var/lib` (the sandboxed service can write nowhere else).
#[test]
fn relay_unit_refuses_what_it_cannot_hold() {
    let injected = "https://relay.example.com\nExecStartPre=/bin/touch /tmp/injected";
    let cases: [(&[&str], &str); 4] = [
        (&["--public-url", injected], "control character"),
        (&[], "--public-url"),
        (&["--public-url", "https://r.example.com", "--data", "/srv/relay"], "/var/lib"),
        (
            &["--public-url", "https://r.example.com", "--tls-cert", "/a\tb", "--tls-key", "/k"],
            "control character",
        ),
    ];
    for (args, why) in cases {
        let (code, stdout, stderr) = relay_unit(args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed a unit:\n{stdout}");
    }
    // Bringing an existing store: relay.db alone may lack what its WAL still holds.
    let args = ["--public-url", "https://r.example.com", "--data", "/srv/relay"];
    let (_, _, stderr) = relay_unit(&args, &[]);
    assert!(stderr.contains("relay.db-wal") && stderr.contains("stop the old relay"), "{stderr}");
}

/// `--install --local` runs the LAN-only bridge at boot (with the given address and port), and
/// asks for a LAN pairing, not a relay one, before it installs anything.
#[test]
fn install_local_runs_the_lan_bridge_and_needs_a_lan_pairing() {
    let m = Machine::new();
    // Only a relay pairing: not enough for a LAN service.
    m.paired();
    let args = ["--install", "--local", "--host", "192.168.1.20", "--local-port", "9000"];
    let run = m.run("cron", &args, &[]);
    run.expect(2, "--install --local without a LAN pairing");
    let text = run.all();
    assert!(text.contains("lan.json") && text.contains("hermeschat-pair --local"), "{text}");
    // A LAN pairing (lan.json, as `hermeschat-pair --local` leaves it).
    std::fs::write(m.state.join("lan.json"), "{}").unwrap();
    let run = m.run("cron", &args, &[]);
    run.expect(0, "--install --local (cron)");
    let text = run.stdout();
    let line = text.lines().find(|l| l.starts_with("@reboot")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("--foreground --local --host 192.168.1.20 --local-port 9000"), "{line}");
}

/// What would let someone else write the unit is refused: a line break in an environment
/// value (a directive of its own), a unit directory other users can write to. The unit is
/// written fresh, never through a file planted beside it, and 0644 whatever the umask.
#[test]
fn install_refuses_what_would_let_others_write_the_unit() {
    use std::os::unix::process::CommandExt;
    let m = Machine::new();
    m.paired();
    let injected = "https://relay.example.com\nExecStartPre=/bin/touch /tmp/injected\n#";
    let run = m.run("systemd", &["--install"], &[("HERMESCHAT_REGISTRY_URL", injected)]);
    run.expect(2, "a line break in an environment value");
    assert!(run.all().contains("control character"), "{}", run.all());
    assert!(!m.unit().exists(), "a unit was written");

    let systemd_dir = m.home.join(".config/systemd");
    std::fs::create_dir_all(&systemd_dir).unwrap();
    std::fs::set_permissions(&systemd_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = m.run("systemd", &["--install"], &[]);
    run.expect(1, "a world-writable ~/.config/systemd");
    assert!(run.all().contains("writable by other users"), "{}", run.all());
    assert!(!m.unit().exists(), "a unit was written");
    std::fs::set_permissions(&systemd_dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A symlink planted where the unit used to be staged, and a umask of 000.
    let victim = m.root.join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let unit_dir = m.unit().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::os::unix::fs::symlink(&victim, unit_dir.join("hermeschat-bridge.tmp")).unwrap();
    let mut cmd = m.cmd("systemd", &["--install"]);
    // SAFETY: umask is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    Out(cmd.output().unwrap()).expect(0, "--install with umask 000");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    let mode = std::fs::metadata(m.unit()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "unit mode");
    for dir in [&unit_dir, &systemd_dir] {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o022, 0, "{} is {mode:o}", dir.display());
    }

    // A dotfiles setup: ~/.config is a symlink of the user's to a directory of theirs.
    let m = Machine::new();
    m.paired();
    let dotfiles = m.home.join("dotfiles/config");
    std::fs::create_dir_all(&dotfiles).unwrap();
    std::os::unix::fs::symlink(&dotfiles, m.home.join(".config")).unwrap();
    m.run("systemd", &["--install"], &[]).expect(0, "--install with a symlinked ~/.config");
    assert!(dotfiles.join("systemd/user/hermeschat-bridge.service").is_file());
    // The link's target is judged where it really is: a parent others can write is refused.
    let repo = m.home.join("dotfiles");
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = m.run("systemd", &["--install"], &[]);
    run.expect(1, "a symlinked ~/.config inside a world-writable directory");
    assert!(run.all().contains("writable by other users"), "{}", run.all());
}

/// A relay whose certificate comes from a private CA is trusted on Linux through
/// `SSL_CERT_FILE` (or `SSL_CERT_DIR`): the boot service's bridge gets them too, or it would
/// fail every TLS handshake with the relay after a reboot while the bridge started by hand works.
#[test]
fn the_service_keeps_the_ca_settings_of_a_private_relay() {
    let m = Machine::new();
    m.paired();
    let (file, dir) = ("/etc/hermeschat/relay-ca.pem", "/etc/hermeschat/certs");
    let vars = [("SSL_CERT_FILE", file), ("SSL_CERT_DIR", dir)];
    m.run("systemd", &["--install"], &vars).expect(0, "--install");
    let unit = std::fs::read_to_string(m.unit()).unwrap();
    assert!(unit.contains(&format!("Environment=\"SSL_CERT_FILE={file}\"")), "{unit}");
    assert!(unit.contains(&format!("Environment=\"SSL_CERT_DIR={dir}\"")), "{unit}");
    m.run("macos", &["--install"], &vars).expect(0, "--install (launchd)");
    let d = parse_plist(&m.plist());
    assert_eq!(d["EnvironmentVariables"]["SSL_CERT_FILE"], file, "{d}");
}
