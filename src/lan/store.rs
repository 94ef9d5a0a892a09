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
}

impl Default for LanState {
    fn default() -> Self {
        LanState { v: LAN_STATE_VERSION, token: None, devices: Vec::new() }
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

/// Reads `lan.json` (empty when missing; an unusable file is moved aside and logged by the
/// caller through the returned note).
fn load(dir: &Path) -> io::Result<(LanState, Option<String>)> {
    match state::load_or_move_aside::<LanState>(
        &lan_json(dir),
        Some(LAN_STATE_VERSION),
        LanState::validate,
    ) {
        Ok(Loaded::Ok(s)) => Ok((s, None)),
        Ok(Loaded::Missing) => Ok((LanState::default(), None)),
        Ok(Loaded::MovedAside { reason, moved_to }) => Ok((
            LanState::default(),
            Some(format!(
                "lan.json was unusable ({reason}); kept it as {} and started fresh",
                moved_to.display()
            )),
        )),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Runs `f` on the state under the lock and saves the result when `f` says it changed.
/// Returns `f`'s value and a note about a moved-aside file, if any.
pub fn update<R>(
    dir: &Path,
    f: impl FnOnce(&mut LanState) -> (R, bool),
) -> io::Result<(R, Option<String>)> {
    let _lock = FileLock::acquire(&lan_lock(dir))?;
    let (mut s, note) = load(dir)?;
    let (value, changed) = f(&mut s);
    if changed {
        state::write_json(&lan_json(dir), &s).map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok((value, note))
}

/// A read-only snapshot (empty, and no lock file created, when `--local` was never used).
pub fn read(dir: &Path) -> io::Result<LanState> {
    if !lan_json(dir).exists() {
        return Ok(LanState::default());
    }
    let _lock = FileLock::acquire(&lan_lock(dir))?;
    Ok(load(dir)?.0)
}

/// Makes `token` the pending pairing token (replacing any previous one), valid until
/// `expires_at`. Returns a note when an unusable `lan.json` was moved aside.
pub fn set_token(
    dir: &Path,
    token: &str,
    now_ms: u64,
    expires_at: u64,
) -> io::Result<Option<String>> {
    let pending =
        PendingToken { digest: secret::hex(&secret::digest(token)), issued_at: now_ms, expires_at };
    update(dir, |s| {
        s.token = Some(pending);
        ((), true)
    })
    .map(|((), note)| note)
}

/// Forgets every device and the pending token. Returns how many devices there were.
pub fn forget_all(dir: &Path) -> io::Result<usize> {
    update(dir, |s| {
        let n = s.devices.len();
        let changed = n > 0 || s.token.is_some();
        s.devices.clear();
        s.token = None;
        (n, changed)
    })
    .map(|(n, _)| n)
}

/// Forgets one device: its secret stops working, and the running LAN server closes its socket
/// (it watches lan.json). Returns the device when it was known, and a note about a moved-aside
/// file, if any.
pub fn forget(dir: &Path, client_id: &str) -> io::Result<(Option<LanDevice>, Option<String>)> {
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

/// Takes back a pairing whose `paired` frame may never have reached the app: its socket ended
/// before the app sent a single frame. The device is forgotten and `token` is pending again,
/// so the same QR code can be scanned again, unless a newer token was issued since or it has
/// expired. Returns whether the token is pending again, or `None` when the device was
/// already gone (revoked meanwhile) and nothing changed.
pub fn undo_pairing(
    dir: &Path,
    client_id: &str,
    token: PendingToken,
    now_ms: u64,
) -> io::Result<Option<bool>> {
    update(dir, |s| {
        let Some(at) = s.devices.iter().position(|d| d.client_id == client_id) else {
            return (None, false);
        };
        s.devices.remove(at);
        let restored = s.token.is_none() && now_ms < token.expires_at;
        if restored {
            s.token = Some(token);
        }
        (Some(restored), true)
    })
    .map(|(restored, _)| restored)
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
) -> io::Result<(Result<Authorized, Refused>, Option<String>)> {
    update(dir, |s| {
        if credential.starts_with("hpt_") {
            let Some(pending) = &s.token else { return (Err(Refused::Invalid), false) };
            if !matches_hex(credential, &pending.digest) {
                return (Err(Refused::Invalid), false);
            }
            if now_ms >= pending.expires_at {
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
        assert_eq!(forget_all(&d).unwrap(), 1);
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
        assert_eq!(undo_pairing(&d, &device, used.clone(), 2_000).unwrap(), Some(true));
        assert!(read(&d).unwrap().devices.is_empty());
        // Once: the device is gone, so a second undo changes nothing.
        assert_eq!(undo_pairing(&d, &device, used, 2_001).unwrap(), None);
        // The same token pairs again.
        let (device, used) = match authorize(&d, &token, "Phone", 3_000).unwrap().0 {
            Ok(Authorized::Paired { client_id, token, .. }) => (client_id, token),
            other => panic!("{other:?}"),
        };
        // A newer token stays; the old one is not brought back.
        set_token(&d, &secret::new_pairing_token(), 4_000, 604_000).unwrap();
        assert_eq!(undo_pairing(&d, &device, used, 4_001).unwrap(), Some(false));
        assert!(read(&d).unwrap().devices.is_empty());
        assert_eq!(authorize(&d, &token, "Phone", 4_002).unwrap().0, Err(Refused::Invalid));
        // An expired token is not brought back either.
        let (device, used) = pair(&d, &token, 5_000);
        assert_eq!(undo_pairing(&d, &device, used, 605_000).unwrap(), Some(false));
        assert!(read(&d).unwrap().token.is_none());
        let _ = std::fs::remove_dir_all(&d);
    }
}
