//! `lan.json`: the LAN pairing token and the LAN devices, shared by the CLI (which issues
//! tokens and forgets devices) and the daemon (which consumes tokens and adds devices).
//!
//! Only digests are stored: SHA-256 of the pairing token and of each clientSecret, compared in
//! constant time. Every read-modify-write happens under an exclusive `flock` on `lan.lock`, so
//! a token is consumed exactly once even if the CLI refreshes it at the same instant, and the
//! file itself is written atomically with mode 0600 ([`crate::state::write_json`]).

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::secret;
use crate::state::{self, FileLock, Loaded};

/// How long a pairing token lives unless `HERMESCHAT_LAN_TOKEN_TTL_SECS` says otherwise.
pub const TOKEN_TTL_SECS: u64 = 600;

/// Hidden override of the token lifetime (tests use a few seconds).
pub const TOKEN_TTL_ENV: &str = "HERMESCHAT_LAN_TOKEN_TTL_SECS";

/// Version of the file format.
const LAN_STATE_VERSION: u32 = 1;

/// `lan.json` in the state directory.
pub fn lan_json(dir: &Path) -> PathBuf {
    dir.join("lan.json")
}

/// `lan.lock`: held (flock) around every read-modify-write of `lan.json`.
fn lan_lock(dir: &Path) -> PathBuf {
    dir.join("lan.lock")
}

/// The token lifetime in seconds (the hidden environment override, else 10 minutes).
pub fn token_ttl_secs() -> u64 {
    std::env::var(TOKEN_TTL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(TOKEN_TTL_SECS)
}

/// The pending pairing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingToken {
    /// Hex SHA-256 of the token.
    pub digest: String,
    /// Unix ms of issue.
    pub issued_at: u64,
    /// Unix ms after which it is refused.
    pub expires_at: u64,
}

impl PendingToken {
    /// Whether the token may pair at `now_ms` (wall clock): issued by then and not expired. A
    /// clock set back to before its issue ends it, instead of adding the step to its lifetime
    /// (an hour back would let a 10-minute code pair for 70 minutes).
    pub fn live_at(&self, now_ms: u64) -> bool {
        (self.issued_at..self.expires_at).contains(&now_ms)
    }
}

/// A device paired over the LAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LanDevice {
    /// `hcl_…`.
    pub client_id: String,
    /// Hex SHA-256 of its clientSecret.
    pub secret_digest: String,
    /// What the app called itself (or `"iPhone"`).
    pub device_name: String,
    /// Unix ms of pairing.
    pub paired_at: u64,
    /// Unix ms of its last connection.
    #[serde(default)]
    pub last_seen_at: Option<u64>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LanState {
    /// Format version.
    pub v: u32,
    /// The current pairing token, until it is used or replaced.
    #[serde(default)]
    pub token: Option<PendingToken>,
    /// Paired devices.
    #[serde(default)]
    pub devices: Vec<LanDevice>,
    /// When the newest pairing token was issued (unix ms), used or not: a pairing taken back
    /// gives its token back only if no newer one was issued since ([`undo_pairing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_token_issued_at: Option<u64>,
}

impl Default for LanState {
    fn default() -> Self {
        LanState {
            v: LAN_STATE_VERSION,
            token: None,
            devices: Vec::new(),
            last_token_issued_at: None,
        }
    }
}

impl LanState {
    fn validate(&self) -> Result<(), String> {
        if self.v != LAN_STATE_VERSION {
            return Err(format!("unknown version {}", self.v));
        }
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if self.token.as_ref().is_some_and(|t| !hex64(&t.digest)) {
            return Err("malformed token digest".into());
        }
        if self.devices.iter().any(|d| !hex64(&d.secret_digest)) {
            return Err("malformed device digest".into());
        }
        Ok(())
    }
}

/// What presenting a credential gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorized {
    /// The pairing token was valid and is now used up: a new device, with its secret (to be
    /// sent once in the `paired` frame, never stored) and the token it used up (for
    /// [`undo_pairing`]).
    Paired { client_id: String, client_secret: String, device_name: String, token: PendingToken },
    /// A known device's clientSecret.
    Device { client_id: String, device_name: String },
}

/// Why a credential was refused (always 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No credential, or one that matches nothing (including a used or replaced token).
    Invalid,
    /// The current pairing token, past its expiry.
    Expired,
}

/// Why `lan.json` could not be used: reading (the lock, the file) and writing are told apart,
/// so a full disk during a change is never reported as an unreadable file.
#[derive(Debug)]
pub enum StoreError {
    /// `lan.lock` or `lan.json` could not be opened or read; nothing was changed.
    Read(io::Error),
    /// A change could not be saved; `lan.json` is as it was before.
    Write(io::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Read(e) => write!(f, "cannot read the LAN devices (lan.json): {e}"),
            StoreError::Write(e) => write!(f, "cannot save the LAN devices (lan.json): {e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Read(e) | StoreError::Write(e) => Some(e),
        }
    }
}

/// What [`salvage`] made of the bytes of `lan.json`.
enum Salvaged {
    /// Everything in it is valid.
    Whole(LanState),
    /// A version-1 file some entries of which are unusable: the valid rest, and what was
    /// dropped (one line each, for the log).
    Partly(LanState, Vec<String>),
    /// Not a version-1 `lan.json` at all (not JSON, not an object, another version).
    Unusable,
}

/// Reads a version-1 `lan.json` entry by entry: every device (and the token) that parses and
/// passes the checks is kept, each other one is named in the list of what was dropped, so one
/// damaged field of one device never cuts the others off.
fn salvage(bytes: &[u8]) -> Salvaged {
    use serde_json::Value;
    let Ok(Value::Object(mut top)) = serde_json::from_slice::<Value>(bytes) else {
        return Salvaged::Unusable;
    };
    if top.get("v").and_then(Value::as_u64) != Some(u64::from(LAN_STATE_VERSION)) {
        return Salvaged::Unusable;
    }
    let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let why = |e: serde_json::Error| state::redact_secrets(&e.to_string());
    let mut dropped = Vec::new();
    let token = match top.remove("token") {
        None | Some(Value::Null) => None,
        Some(v) => match serde_json::from_value::<PendingToken>(v) {
            Ok(t) if hex64(&t.digest) => Some(t),
            Ok(_) => {
                dropped.push("the pending pairing token (malformed digest)".to_owned());
                None
            }
            Err(e) => {
                dropped.push(format!("the pending pairing token ({})", why(e)));
                None
            }
        },
    };
    let entries = match top.remove("devices") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list,
        Some(_) => {
            dropped.push("the device list (\"devices\" is not a list)".to_owned());
            Vec::new()
        }
    };
    let mut devices = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let id = entry
            .get("clientId")
            .and_then(Value::as_str)
            .filter(|id| crate::protocol::is_client_id(id))
            .map(|id| format!(" {id}"))
            .unwrap_or_default();
        match serde_json::from_value::<LanDevice>(entry) {
            Ok(d) if hex64(&d.secret_digest) => devices.push(d),
            Ok(_) => dropped.push(format!("device #{}{id} (malformed secretDigest)", i + 1)),
            Err(e) => dropped.push(format!("device #{}{id} ({})", i + 1, why(e))),
        }
    }
    let last_token_issued_at = top.get("lastTokenIssuedAt").and_then(Value::as_u64);
    let s = LanState { v: LAN_STATE_VERSION, token, devices, last_token_issued_at };
    if dropped.is_empty() { Salvaged::Whole(s) } else { Salvaged::Partly(s, dropped) }
}

/// Reads `lan.json` (empty when missing). Devices and a token that are unusable are dropped
/// and the rest kept (the original is first copied aside); a file that is not a version-1
/// `lan.json` at all is moved aside whole. Either way the returned note says what happened,
/// for the caller to log or print: the note is the only trace of it at that moment.
fn load(dir: &Path) -> Result<(LanState, Option<String>), StoreError> {
    let path = lan_json(dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((LanState::default(), None)),
        Err(e) => {
            return Err(StoreError::Read(io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            )));
        }
    };
    match salvage(&bytes) {
        Salvaged::Whole(s) => Ok((s, None)),
        Salvaged::Partly(s, dropped) => {
            // Nothing is lost: the original is kept before the cleaned file replaces it, and
            // when it cannot be kept nothing is changed.
            let copy = state::copy_aside(&path, &bytes, "corrupt").map_err(StoreError::Write)?;
            state::write_json(&path, &s)
                .map_err(|e| StoreError::Write(io::Error::other(e.to_string())))?;
            let n = s.devices.len();
            Ok((
                s,
                Some(format!(
                    "lan.json had unusable entries, dropped: {}; kept the {n} valid device{} \
                     (the original is kept as {}; a dropped device must pair again: \
                     hermeschat-pair --refresh-code --local)",
                    dropped.join("; "),
                    if n == 1 { "" } else { "s" },
                    copy.display()
                )),
            ))
        }
        Salvaged::Unusable => {
            match state::load_or_move_aside::<LanState>(
                &path,
                Some(LAN_STATE_VERSION),
                LanState::validate,
            ) {
                Ok(Loaded::Ok(s)) => Ok((s, None)),
                Ok(Loaded::Missing) => Ok((LanState::default(), None)),
                Ok(Loaded::MovedAside { reason, moved_to }) => Ok((
                    LanState::default(),
                    Some(format!(
                        "lan.json was unusable ({reason}); kept it as {} and started with no LAN \
                         devices: they are cut off until they pair again (hermeschat-pair \
                         --refresh-code --local)",
                        moved_to.display()
                    )),
                )),
                // Written by a newer version: left as it is.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(StoreError::Read(e)),
                Err(e) => Err(StoreError::Write(e)),
            }
        }
    }
}

/// How long `lan.lock` is waited for: its holders keep it for milliseconds, and the LAN
/// server waits on its event thread (a command suspended with the lock, Ctrl-Z, must not
/// freeze it).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes `lan.lock`, waiting at most `wait`. When it stays held, the error names the holder
/// (and whether it is suspended, which is the one holder that keeps it for more than an
/// instant) where that can be told.
fn lock_within(dir: &Path, wait: std::time::Duration) -> Result<FileLock, StoreError> {
    let path = lan_lock(dir);
    FileLock::acquire_until(&path, std::time::Instant::now() + wait)
        .map_err(StoreError::Read)?
        .ok_or_else(|| {
            let held = if wait.is_zero() {
                "is locked by another process".to_owned()
            } else {
                format!("stayed locked for {} s", wait.as_secs())
            };
            let who = match FileLock::holder(&path) {
                Some(pid) if crate::daemon::suspended(pid) => format!(
                    " (pid {pid}, suspended with Ctrl-Z: resume it with fg in its terminal, or \
                     kill -CONT {pid})"
                ),
                Some(pid) => format!(" (pid {pid})"),
                None => " (a hermeschat-pair command suspended with Ctrl-Z?)".to_owned(),
            };
            StoreError::Read(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} {held}{who}", path.display()),
            ))
        })
}

/// Runs `f` on the state under the lock and saves the result when `f` says it changed.
/// Returns `f`'s value and a note about a damaged file set aside, if any.
pub fn update<R>(
    dir: &Path,
    f: impl FnOnce(&mut LanState) -> (R, bool),
) -> Result<(R, Option<String>), StoreError> {
    let _lock = lock_within(dir, LOCK_WAIT)?;
    let (mut s, note) = load(dir)?;
    let (value, changed) = f(&mut s);
    if changed {
        state::write_json(&lan_json(dir), &s)
            .map_err(|e| StoreError::Write(io::Error::other(e.to_string())))?;
    }
    Ok((value, note))
}

/// A read-only snapshot (empty, and no lock file created, when `--local` was never used), and
/// a note when a damaged `lan.json` was set aside just now (log or print it: nothing else
/// tells of it at the time; [`set_aside_warning`] tells of it later).
pub fn read(dir: &Path) -> Result<(LanState, Option<String>), StoreError> {
    read_within(dir, LOCK_WAIT)
}

/// [`read`] without waiting for the lock: for a caller that looks again soon anyway (the LAN
/// server's timer), and must not block its thread meanwhile.
pub fn try_read(dir: &Path) -> Result<(LanState, Option<String>), StoreError> {
    read_within(dir, std::time::Duration::ZERO)
}

fn read_within(
    dir: &Path,
    wait: std::time::Duration,
) -> Result<(LanState, Option<String>), StoreError> {
    if !lan_json(dir).exists() {
        return Ok((LanState::default(), None));
    }
    let _lock = lock_within(dir, wait)?;
    load(dir)
}

/// The copies of a damaged `lan.json` kept in `dir` (`lan.json.corrupt-<secs>`,
/// `lan.json.v<n>-<secs>`, with an optional `.<n>`), newest first.
pub fn set_aside_copies(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("lan.json.").is_some_and(|rest| {
                rest.starts_with("corrupt-")
                    || (rest.starts_with('v')
                        && rest[1..].starts_with(|c: char| c.is_ascii_digit()))
            })
        })
        .map(|e| {
            let at = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            (at, e.path())
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The warning `--status` and `--devices` print while a damaged `lan.json` is kept aside
/// (whoever set it aside, whenever): LAN devices may be missing. `None` when there is none.
pub fn set_aside_warning(dir: &Path) -> Option<String> {
    let copies = set_aside_copies(dir);
    let newest = copies.first()?;
    let more = match copies.len() {
        1 => String::new(),
        n => format!(" (and {} older cop{})", n - 1, if n == 2 { "y" } else { "ies" }),
    };
    Some(format!(
        "a damaged lan.json was set aside as {}{more}: LAN devices it held that are not \
         listed here are cut off (why: bridge.log, or the command that found it). Pair them \
         again (hermeschat-pair --refresh-code --local), then delete that file to clear this \
         warning",
        newest.display()
    ))
}

/// What to tell the user about lan.json after a load: the note of what happened just now,
/// else the standing warning about a copy kept aside.
pub fn warning(dir: &Path, note: Option<String>) -> Option<String> {
    note.or_else(|| set_aside_warning(dir))
}

/// Makes `token` the pending pairing token (replacing any previous one), valid until
/// `expires_at`. Returns a note when an unusable `lan.json` was moved aside.
pub fn set_token(
    dir: &Path,
    token: &str,
    now_ms: u64,
    expires_at: u64,
) -> Result<Option<String>, StoreError> {
    let pending =
        PendingToken { digest: secret::hex(&secret::digest(token)), issued_at: now_ms, expires_at };
    update(dir, |s| {
        s.last_token_issued_at = Some(pending.issued_at);
        s.token = Some(pending);
        ((), true)
    })
    .map(|((), note)| note)
}

/// Forgets every device and the pending token. Returns how many devices there were, and a
/// note about a damaged file set aside, if any.
pub fn forget_all(dir: &Path) -> Result<(usize, Option<String>), StoreError> {
    update(dir, |s| {
        let n = s.devices.len();
        let changed = n > 0 || s.token.is_some();
        s.devices.clear();
        s.token = None;
        (n, changed)
    })
}

/// Forgets one device: its secret stops working, and the running LAN server closes its socket
/// (it watches lan.json). Returns the device when it was known, and a note about a moved-aside
/// file, if any.
pub fn forget(
    dir: &Path,
    client_id: &str,
) -> Result<(Option<LanDevice>, Option<String>), StoreError> {
    if !lan_json(dir).exists() {
        return Ok((None, None));
    }
    update(dir, |s| {
        let at = s.devices.iter().position(|d| d.client_id == client_id);
        let gone = at.map(|i| s.devices.remove(i));
        let changed = gone.is_some();
        (gone, changed)
    })
}

/// A pairing taken back: whether its token is pending again, and the forgotten device's
/// secret digest.
pub type Undone = (bool, String);

/// Takes back a pairing whose `paired` frame may never have reached the app: its socket ended
/// before the app sent a single frame. The device is forgotten and `token` is pending again,
/// so the same QR code can be scanned again, unless a newer token was issued since or it has
/// expired. Returns whether the token is pending again and the forgotten device's secret
/// digest, or `None` when the device was already gone (revoked meanwhile) and nothing
/// changed; and a note about a damaged file set aside, if any.
pub fn undo_pairing(
    dir: &Path,
    client_id: &str,
    token: PendingToken,
    now_ms: u64,
) -> Result<(Option<Undone>, Option<String>), StoreError> {
    update(dir, |s| {
        let Some(at) = s.devices.iter().position(|d| d.client_id == client_id) else {
            return (None, false);
        };
        let gone = s.devices.remove(at);
        // Not when another token was issued since, even one already used: the user asked for
        // a new QR code, maybe because the old one was seen.
        let restored = s.token.is_none()
            && s.last_token_issued_at.is_none_or(|at| at == token.issued_at)
            && token.live_at(now_ms);
        if restored {
            s.token = Some(token);
        }
        (Some((restored, gone.secret_digest)), true)
    })
}

/// Constant-time comparison of `credential`'s digest with a stored hex digest.
fn matches_hex(credential: &str, stored_hex: &str) -> bool {
    let got = secret::hex(&secret::digest(credential));
    secret::digests_equal(got.as_bytes(), stored_hex.as_bytes())
}

/// Checks a credential: a pairing token (`hpt_…`) is consumed and creates a device; a
/// clientSecret (`hcs_…`) must belong to a device. `device_name` names a new device.
pub fn authorize(
    dir: &Path,
    credential: &str,
    device_name: &str,
    now_ms: u64,
) -> Result<(Result<Authorized, Refused>, Option<String>), StoreError> {
    update(dir, |s| {
        if credential.starts_with("hpt_") {
            let Some(pending) = &s.token else { return (Err(Refused::Invalid), false) };
            if !matches_hex(credential, &pending.digest) {
                return (Err(Refused::Invalid), false);
            }
            if !pending.live_at(now_ms) {
                return (Err(Refused::Expired), false);
            }
            // Single use: gone before the device exists.
            let Some(token) = s.token.take() else { return (Err(Refused::Invalid), false) };
            let client_id = secret::new_client_id();
            let client_secret = secret::new_client_secret();
            s.devices.push(LanDevice {
                client_id: client_id.clone(),
                secret_digest: secret::hex(&secret::digest(&client_secret)),
                device_name: device_name.to_owned(),
                paired_at: now_ms,
                last_seen_at: Some(now_ms),
            });
            let ok = Authorized::Paired {
                client_id,
                client_secret,
                device_name: device_name.to_owned(),
                token,
            };
            return (Ok(ok), true);
        }
        if !crate::protocol::is_client_secret(credential) {
            return (Err(Refused::Invalid), false);
        }
        // Compare with every device (no early exit), so timing says nothing about which.
        let mut found = None;
        for (i, d) in s.devices.iter().enumerate() {
            if matches_hex(credential, &d.secret_digest) && found.is_none() {
                found = Some(i);
            }
        }
        match found {
            Some(i) => {
                let d = &mut s.devices[i];
                d.last_seen_at = Some(now_ms);
                let ok = Authorized::Device {
                    client_id: d.client_id.clone(),
                    device_name: d.device_name.clone(),
                };
                (Ok(ok), true)
            }
            None => (Err(Refused::Invalid), false),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hcp-lanstore-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        state::ensure_dir(&d).unwrap();
        d
    }

    /// A holder that is not suspended (a command holding the lock for an instant) is named,
    /// not taken for one suspended with Ctrl-Z.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_held_lock_names_its_holder() {
        let d = dir("held");
        state::ensure_dir(&d).unwrap();
        let held = FileLock::acquire(&lan_lock(&d)).unwrap();
        let e = lock_within(&d, std::time::Duration::ZERO).unwrap_err().to_string();
        assert!(e.contains(&format!("(pid {})", std::process::id())), "{e}");
        assert!(!e.contains("Ctrl-Z"), "{e}");
        drop(held);
        assert!(lock_within(&d, std::time::Duration::ZERO).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn token_is_single_use_and_expires() {
        let d = dir("token");
        let token = secret::new_pairing_token();
        set_token(&d, &token, 1_000, 601_000).unwrap();
        assert_eq!(authorize(&d, "hpt_wrong", "x", 2_000).unwrap().0, Err(Refused::Invalid));
        let (first, _) = authorize(&d, &token, "Phone", 2_000).unwrap();
        let Ok(Authorized::Paired { client_id, client_secret, .. }) = first else {
            panic!("{first:?}")
        };
        assert!(crate::protocol::is_client_id(&client_id));
        assert_eq!(authorize(&d, &token, "Phone", 2_001).unwrap().0, Err(Refused::Invalid));
        let (again, _) = authorize(&d, &client_secret, "", 3_000).unwrap();
        assert_eq!(
            again,
            Ok(Authorized::Device { client_id: client_id.clone(), device_name: "Phone".into() })
        );
        // Nothing secret is stored in clear.
        let text = std::fs::read_to_string(lan_json(&d)).unwrap();
        assert!(!text.contains(&client_secret) && !text.contains(&token), "{text}");
        let t2 = secret::new_pairing_token();
        set_token(&d, &t2, 10_000, 11_000).unwrap();
        assert_eq!(authorize(&d, &t2, "x", 11_000).unwrap().0, Err(Refused::Expired));
        // A clock set back to before the token was issued ends it, rather than add the step
        // to its lifetime.
        let t3 = secret::new_pairing_token();
        set_token(&d, &t3, 20_000, 620_000).unwrap();
        assert_eq!(authorize(&d, &t3, "x", 19_999).unwrap().0, Err(Refused::Expired));
        assert_eq!(forget_all(&d).unwrap().0, 1);
        assert_eq!(authorize(&d, &client_secret, "", 12_000).unwrap().0, Err(Refused::Invalid));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Pairs with `token` (issued anew) and returns the device and the token it used up.
    fn pair(d: &Path, token: &str, at: u64) -> (String, PendingToken) {
        set_token(d, token, at, at + 600_000).unwrap();
        match authorize(d, token, "Phone", at + 1).unwrap().0 {
            Ok(Authorized::Paired { client_id, token, .. }) => (client_id, token),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_undone_pairing_gives_the_token_back_unless_a_newer_one_exists() {
        let d = dir("undo");
        let token = secret::new_pairing_token();
        let (device, used) = pair(&d, &token, 1_000);
        assert_eq!(
            undo_pairing(&d, &device, used.clone(), 2_000).unwrap().0.map(|u| u.0),
            Some(true)
        );
        assert!(read(&d).unwrap().0.devices.is_empty());
        // Once: the device is gone, so a second undo changes nothing.
        assert_eq!(undo_pairing(&d, &device, used, 2_001).unwrap().0, None);
        // The same token pairs again.
        let (device, used) = match authorize(&d, &token, "Phone", 3_000).unwrap().0 {
            Ok(Authorized::Paired { client_id, token, .. }) => (client_id, token),
            other => panic!("{other:?}"),
        };
        // A newer token stays; the old one is not brought back.
        set_token(&d, &secret::new_pairing_token(), 4_000, 604_000).unwrap();
        assert_eq!(undo_pairing(&d, &device, used, 4_001).unwrap().0.map(|u| u.0), Some(false));
        assert!(read(&d).unwrap().0.devices.is_empty());
        assert_eq!(authorize(&d, &token, "Phone", 4_002).unwrap().0, Err(Refused::Invalid));
        // An expired token is not brought back either.
        let (device, used) = pair(&d, &token, 5_000);
        assert_eq!(undo_pairing(&d, &device, used, 605_000).unwrap().0.map(|u| u.0), Some(false));
        assert!(read(&d).unwrap().0.token.is_none());
        // Nor one replaced by a newer token that was used in turn (none pending now).
        let (first, used) = pair(&d, &token, 700_000);
        let newer = secret::new_pairing_token();
        let (_second, _) = pair(&d, &newer, 700_010);
        assert!(read(&d).unwrap().0.token.is_none());
        assert_eq!(undo_pairing(&d, &first, used, 700_020).unwrap().0.map(|u| u.0), Some(false));
        assert_eq!(authorize(&d, &token, "Mallory", 700_030).unwrap().0, Err(Refused::Invalid));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A device as lan.json holds it.
    fn device_json(id: &str, seen: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "clientId": id,
            "secretDigest": "ab".repeat(32),
            "deviceName": "Phone",
            "pairedAt": 1_000,
            "lastSeenAt": seen,
        })
    }

    #[test]
    fn one_bad_device_is_dropped_and_the_others_kept_with_the_original_aside() {
        let d = dir("salvage");
        let (a, b, c) = ("hcl_000000000000000a", "hcl_000000000000000b", "hcl_000000000000000c");
        let text = serde_json::json!({
            "v": 1,
            "token": {"digest": "nothex", "issuedAt": 1, "expiresAt": 2},
            "devices": [
                device_json(a, 5_000.into()),
                device_json(b, "yesterday".into()),
                device_json(c, serde_json::Value::Null),
            ],
        })
        .to_string();
        std::fs::write(lan_json(&d), &text).unwrap();
        let (s, note) = read(&d).unwrap();
        let ids: Vec<&str> = s.devices.iter().map(|x| x.client_id.as_str()).collect();
        assert_eq!(ids, [a, c]);
        assert!(s.token.is_none());
        let note = note.expect("a note says what was dropped");
        assert!(note.contains(&format!("device #2 {b}")) && note.contains("token"), "{note}");
        assert!(note.contains("kept the 2 valid devices"), "{note}");
        // The original is kept, byte for byte; the cleaned file reads whole from now on.
        let copies = set_aside_copies(&d);
        assert_eq!(copies.len(), 1, "{copies:?}");
        assert_eq!(std::fs::read_to_string(&copies[0]).unwrap(), text);
        assert!(note.contains(&copies[0].display().to_string()), "{note}");
        assert_eq!(read(&d).unwrap(), (s, None));
        assert!(set_aside_warning(&d).is_some_and(|w| w.contains("lan.json.corrupt-")));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_file_that_is_not_lan_json_is_moved_aside_with_a_note() {
        let d = dir("unusable");
        assert_eq!(set_aside_warning(&d), None);
        std::fs::write(lan_json(&d), "{\"v\":1,\"devices\":[").unwrap();
        let (s, note) = read(&d).unwrap();
        assert!(s.devices.is_empty());
        let note = note.expect("a note says it was moved aside");
        assert!(note.contains("not valid JSON") && note.contains("cut off"), "{note}");
        assert!(!lan_json(&d).exists());
        assert_eq!(set_aside_copies(&d).len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
