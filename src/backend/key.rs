//! The backend key: how the built-in backend knows this state directory's own parts where the
//! system cannot say who connects.
//!
//! The built-in backend adds the user's gateway key to what it forwards, so it must serve only
//! the user who started it. Where the owner of a connection can be looked up (Linux:
//! [`super::peer`]) other accounts are refused by uid. Where it cannot (macOS, a Linux without
//! netlink and `/proc/net`, a bridge running as the overflow uid) a request must carry
//! [`HEADER`] with the key kept in `<state dir>/backend.key`: 32 random bytes in hex, in a file
//! 0600 in the 0700 state directory, so only this account (and root) can read it. The bridge
//! of the same state directory sends it with every request to the built-in backend it started.
//!
//! The key never goes into a log, an argv or a URL: only into that header, on loopback, and
//! the backend removes the header from a request before anything else sees it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::secret;
use crate::state;

/// The request header that carries the key to the built-in backend.
pub const HEADER: &str = "X-Hermeschat-Backend-Key";

/// True for [`HEADER`] in any spelling a server may read alike (case, `_` for `-`).
pub fn is_key_header(name: &str) -> bool {
    crate::protocol::same_header(name, HEADER)
}

/// A backend key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendKey(String);

impl fmt::Debug for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendKey(<redacted>)")
    }
}

impl BackendKey {
    /// A new random key: 64 hex digits (256 bits).
    pub fn generate() -> BackendKey {
        BackendKey(secret::hex(&secret::random_bytes::<32>()))
    }

    /// The key as `backend.key` holds it (surrounding whitespace ignored): `None` unless it is
    /// exactly 64 lowercase hex digits.
    pub fn parse(text: &str) -> Option<BackendKey> {
        let text = text.trim();
        let hex = text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        hex.then(|| BackendKey(text.to_owned()))
    }

    /// The key itself, for the request header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when `presented` is this key, compared in constant time (as SHA-256 digests, so
    /// not even its length is compared byte by byte).
    pub fn matches(&self, presented: &str) -> bool {
        secret::matches(presented.trim(), &secret::digest(&self.0))
    }
}

/// Reads `<dir>/backend.key`, or writes a new one when it is missing or cannot be trusted (not
/// a regular file of ours, readable by others, or not a key): atomically, 0600. Two starting
/// at once agree on one key (a new file never replaces another: [`state::write_new`]). The
/// second value says what was replaced and why, for the caller's log; it never holds the key.
pub fn load_or_create(dir: &Path) -> io::Result<(BackendKey, Option<String>)> {
    let path = state::backend_key(dir);
    for _ in 0..3 {
        let why = match read(&path) {
            Ok(Some(key)) => return Ok((key, None)),
            Ok(None) => {
                let key = BackendKey::generate();
                if state::write_new(&path, format!("{}\n", key.expose()).as_bytes())? {
                    return Ok((key, None));
                }
                // Another process wrote one meanwhile: that one is read on the next turn.
                continue;
            }
            Err(why) => why,
        };
        let key = BackendKey::generate();
        state::write_atomic(&path, format!("{}\n", key.expose()).as_bytes())?;
        return Ok((key, Some(format!("{} {why}; wrote a new key", path.display()))));
    }
    Err(io::Error::other(format!(
        "{}: appears and disappears while being read; stop whatever keeps changing it, then \
         start the bridge again",
        path.display()
    )))
}

/// The key in `path`: `Ok(None)` when there is no file, `Err(why)` when there is one that must
/// not be used (why, for the log).
fn read(path: &Path) -> Result<Option<BackendKey>, String> {
    // O_NOFOLLOW: a symbolic link planted there is not followed to someone else's file.
    let opened =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path);
    let file: File = match opened {
        Ok(f) => f,
        // Nothing there (a link, even a dangling one, is ELOOP with O_NOFOLLOW).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err("was a symbolic link".to_owned());
        }
        Err(e) => return Err(format!("could not be read ({e})")),
    };
    let meta = file.metadata().map_err(|e| format!("could not be read ({e})"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() {
        return Err("was not a regular file".to_owned());
    }
    if meta.uid() != me {
        return Err(format!("belonged to uid {}, not to this user", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        // Others may have read it: it is no longer this account's alone.
        return Err(format!("was readable by others (mode {:o})", meta.mode() & 0o777));
    }
    let mut text = String::new();
    file.take(256).read_to_string(&mut text).map_err(|e| format!("could not be read ({e})"))?;
    BackendKey::parse(&text).map(Some).ok_or_else(|| "did not hold a key".to_owned())
}

/// Removes every [`HEADER`] from `headers` and returns the first value, so that nothing after
/// the check (the gateway, a log) ever sees the key.
pub fn take_from(headers: &mut Vec<(String, String)>) -> Option<String> {
    let mut found = None;
    headers.retain_mut(|(name, value)| {
        if !is_key_header(name) {
            return true;
        }
        if found.is_none() {
            found = Some(std::mem::take(value));
        }
        false
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "hermeschat-key-{tag}-{}-{}",
            std::process::id(),
            secret::hex(&secret::random_bytes::<4>())
        ));
        state::ensure_dir(&d).unwrap();
        d
    }

    #[test]
    fn a_key_is_made_once_0600_and_read_back() {
        let d = dir("once");
        let (key, note) = load_or_create(&d).unwrap();
        assert!(note.is_none());
        let path = state::backend_key(&d);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), key.expose());
        assert_eq!(load_or_create(&d).unwrap(), (key.clone(), None));
        assert!(key.matches(key.expose()));
        assert!(!key.matches(&BackendKey::generate().0));
        assert!(!key.matches(""));
        assert!(!format!("{key:?}").contains(key.expose()), "Debug shows the key");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_key_file_that_cannot_be_trusted_is_replaced() {
        let d = dir("replace");
        let path = state::backend_key(&d);
        let (first, _) = load_or_create(&d).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let (second, note) = load_or_create(&d).unwrap();
        assert_ne!(first, second);
        assert!(note.unwrap().contains("readable by others"));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, "not a key").unwrap();
        let (third, note) = load_or_create(&d).unwrap();
        assert!(note.unwrap().contains("did not hold a key"));
        assert_ne!(second, third);
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), &path).unwrap();
        let (_, note) = load_or_create(&d).unwrap();
        assert!(note.unwrap().contains("symbolic link"));
        assert!(!path.is_symlink());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_header_is_taken_out_in_any_spelling() {
        let mut headers = vec![
            ("Accept".to_owned(), "*/*".to_owned()),
            ("x-hermeschat-backend-key".to_owned(), "one".to_owned()),
            ("X_Hermeschat_Backend_Key".to_owned(), "two".to_owned()),
        ];
        assert_eq!(take_from(&mut headers).as_deref(), Some("one"));
        assert_eq!(headers, vec![("Accept".to_owned(), "*/*".to_owned())]);
        assert_eq!(take_from(&mut headers), None);
    }
}
