//! The local state directory (`~/.hermeschat/`, ARCHITECTURE §5) and the files in it.
//!
//! Everything the bridge keeps on disk goes through this module so the rules hold in one
//! place: the directory is 0700; every file is 0600 from the moment it exists (never created
//! wider and chmod-ed later, which leaves a window for another user to open it); and a file is
//! replaced by writing a temp file beside it, fsyncing and renaming, so a crash leaves the old
//! content or the new, never half of one. A state file that cannot be used is moved aside, not
//! deleted and not a panic, so the user loses nothing and the bridge re-registers by itself.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::protocol::{PROTOCOL_VERSION, RegisterResponse, is_bridge_id, is_relay_secret};

/// Environment variable that overrides the state directory.
pub const HOME_ENV: &str = "HERMESCHAT_HOME";

/// The version written into [`BridgeIdentity::v`]; it follows the wire protocol's version
/// because the identity only makes sense against a relay of that protocol.
pub const STATE_VERSION: u32 = PROTOCOL_VERSION;

/// Mode of the state directory: the owner only.
const DIR_MODE: u32 = 0o700;

/// Mode of every state file: the owner only, read and write.
const FILE_MODE: u32 = 0o600;

// ---------------------------------------------------------------------------------------------
// The directory and its paths

/// The state directory: `$HERMESCHAT_HOME` if set and non-empty, else `$HOME/.hermeschat`.
///
/// A relative override is made absolute here because the daemon changes its working
/// directory when it detaches. Without any home directory at all (no `$HOME`, no passwd
/// entry) it falls back to `.hermeschat` under the current directory rather than guessing a
/// shared location such as `/tmp`.
pub fn state_dir() -> PathBuf {
    located_state_dir().0
}

/// [`state_dir`], and whether it is the last resort: `.hermeschat` under the current directory
/// because there is no `$HERMESCHAT_HOME`, no `$HOME` and no passwd entry for this uid (a
/// container running as an arbitrary uid).
pub fn located_state_dir() -> (PathBuf, bool) {
    resolve_state_dir(std::env::var_os(HOME_ENV), std::env::var_os("HOME"), std::env::home_dir)
}

/// [`located_state_dir`] with its inputs passed in, so tests need not mutate the process
/// environment.
fn resolve_state_dir(
    override_dir: Option<OsString>,
    home: Option<OsString>,
    passwd_home: impl FnOnce() -> Option<PathBuf>,
) -> (PathBuf, bool) {
    let (dir, fallback) = match override_dir.filter(|d| !d.is_empty()) {
        Some(dir) => (PathBuf::from(dir), false),
        None => {
            let home = home.filter(|h| !h.is_empty()).map(PathBuf::from).or_else(passwd_home);
            let fallback = home.as_ref().is_none_or(|h| h.as_os_str().is_empty());
            (home.unwrap_or_default().join(".hermeschat"), fallback)
        }
    };
    (std::path::absolute(&dir).unwrap_or(dir), fallback)
}

/// `bridge.json`: the bridge's identity and relay secret.
pub fn bridge_json(dir: &Path) -> PathBuf {
    dir.join("bridge.json")
}

/// `config.json`: the user's settings.
pub fn config_json(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

/// `bridge.pid`: the daemon's pid, flock-held while it lives.
pub fn pid_file(dir: &Path) -> PathBuf {
    dir.join("bridge.pid")
}

/// `status.json`: what the daemon sees now, for `--status`.
pub fn status_json(dir: &Path) -> PathBuf {
    dir.join("status.json")
}

/// `bridge.log`: the daemon's log.
pub fn bridge_log(dir: &Path) -> PathBuf {
    dir.join("bridge.log")
}

/// `server.log`: the built-in backend's log.
pub fn server_log(dir: &Path) -> PathBuf {
    dir.join("server.log")
}

/// `backend.key`: the built-in backend's key, which this state directory's own parts (the
/// bridge) present to it where it cannot tell who connects ([`crate::backend::key`]).
pub fn backend_key(dir: &Path) -> PathBuf {
    dir.join("backend.key")
}

/// `gateway.log`: output of a gateway we started.
pub fn gateway_log(dir: &Path) -> PathBuf {
    dir.join("gateway.log")
}

/// `gateway.lock`: held while a gateway wake-up runs (one at a time).
pub fn gateway_lock(dir: &Path) -> PathBuf {
    dir.join("gateway.lock")
}

/// `service.log`: the boot service's stdout, appended to by the service manager.
pub fn service_log(dir: &Path) -> PathBuf {
    dir.join("service.log")
}

/// `service-error.log`: the boot service's stderr (the bridge's log lines), appended to by the
/// service manager.
pub fn service_error_log(dir: &Path) -> PathBuf {
    dir.join("service-error.log")
}

/// Creates `dir` (and any missing parents) with mode 0700, and tightens an existing
/// directory to 0700 when its mode is anything else.
///
/// The mode is given to `mkdir` itself, so there is no moment where the directory exists
/// with the umask's wider default. An existing directory is refused (`PermissionDenied`)
/// when it is another user's, or when other users could write to it: they could have put
/// files there (a symlink where a state file goes, an identity of theirs), and tightening it
/// now would not take those out.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    ensure_dir_raw(dir).map_err(|e| with_path(dir, e))
}

/// [`ensure_dir`] without the path added to errors.
fn ensure_dir_raw(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a directory"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "it belongs to uid {}, not to you (uid {me}): run as that user, or choose a \
                 directory of yours",
                meta.uid()
            ),
        ));
    }
    if writable_by_others(&meta) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "other users can write to it, so they could have put files there: check what it \
             holds, then chmod 700 it",
        ));
    }
    if meta.permissions().mode() & 0o777 != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// True when users other than the owner may write to the file or directory: anyone may, or
/// its group may and that group is not this process's own (with a group per user and umask
/// 002, the user's group is the user). On macOS every account's group is `staff`, shared by
/// all of them: there any group write counts.
pub fn writable_by_others(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getegid has no preconditions and cannot fail.
    let my_group = unsafe { libc::getegid() };
    let group_is_mine = meta.gid() == my_group && !cfg!(target_os = "macos");
    meta.mode() & 0o002 != 0 || (meta.mode() & 0o020 != 0 && !group_is_mine)
}

/// The account name of user `uid` from the system's user database (`getpwuid_r`: files,
/// directory services on macOS, NSS on glibc), `None` when it has none.
pub fn account_name(uid: u32) -> Option<String> {
    // SAFETY: passwd is plain old data, for which all-zero bytes are a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: every pointer is valid and writable for the duration of the call, `buf` for its
    // length; on success `found` points to `pw`, whose strings point into `buf`, which outlives
    // their use below.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: `pw_name` is a NUL-terminated string inside `buf` (checked non-null above).
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    Some(name.to_string_lossy().into_owned()).filter(|n| !n.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Atomic writes

/// Distinguishes temp files of concurrent writers inside one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically: a temp file in the same directory (created
/// exclusively, mode 0600), written, fsynced, renamed over `path`, then the directory fsynced
/// so the rename itself survives a crash.
///
/// On any error the temp file is removed and the old `path`, if any, is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_raw(path, bytes, FILE_MODE, Durable::Yes).map_err(|e| with_path(path, e))
}

/// [`write_atomic`] for a file others may read (`mode`, whatever the umask: a service file is
/// 0644).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_raw(path, bytes, mode, Durable::Yes).map_err(|e| with_path(path, e))
}

/// Whether an atomic write is also flushed to the disk (the file, then its directory).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durable {
    Yes,
    No,
}

/// [`write_atomic`] without the path added to errors.
fn write_atomic_raw(path: &Path, bytes: &[u8], mode: u32, durable: Durable) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = parent_dir(path);
    let (tmp, file) = create_temp(dir, name)?;
    if mode != FILE_MODE
        && let Err(e) = file.set_permissions(fs::Permissions::from_mode(mode))
    {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fill_and_rename(file, &tmp, path, bytes, durable) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if durable == Durable::No {
        return Ok(());
    }
    sync_dir(dir)
}

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a fresh `.<name>.<pid>.<n>.tmp` in `dir` with `O_EXCL` and mode 0600.
///
/// `O_EXCL` also refuses a symlink planted at that name, so the write cannot be redirected.
fn create_temp(dir: &Path, name: &std::ffi::OsStr) -> io::Result<(PathBuf, File)> {
    let pid = std::process::id();
    let mut last_err = None;
    for _ in 0..16 {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{pid}.{n}.tmp"));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::AlreadyExists, "no free temp name")))
}

/// Writes and fsyncs `file`, closes it, and renames `tmp` over `path`.
fn fill_and_rename(
    mut file: File,
    tmp: &Path,
    path: &Path,
    bytes: &[u8],
    durable: Durable,
) -> io::Result<()> {
    file.write_all(bytes)?;
    if durable == Durable::Yes {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(tmp, path)
}

/// Removes the temp files of the atomic writes (`.<name>.<pid>.<n>.tmp`) in `dir` that a
/// process no longer alive left behind (killed between creating and renaming one: SIGKILL,
/// the OOM killer, a power cut). Those of live processes are left alone. Returns how many
/// went.
pub fn remove_stale_temps(dir: &Path) -> usize {
    remove_stale_temps_where(dir, |_| true)
}

/// [`remove_stale_temps`] for the temp files of `name` only: in a directory that is not ours
/// (the current directory), another program's files of the same shape are left alone.
pub fn remove_stale_temps_of(dir: &Path, name: &str) -> usize {
    remove_stale_temps_where(dir, |file| file == name)
}

/// [`remove_stale_temps`] for the temp files whose target's name `wanted` accepts.
fn remove_stale_temps_where(dir: &Path, wanted: impl Fn(&str) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((file, pid)) = name.to_str().and_then(temp_parts) else { continue };
        if !wanted(file) {
            continue;
        }
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The target's name and the pid in a temp file's name `.<name>.<pid>.<n>.tmp`, if it is one.
fn temp_parts(name: &str) -> Option<(&str, libc::pid_t)> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = rest.rsplitn(3, '.');
    let n = parts.next()?;
    let pid = parts.next()?;
    let file = parts.next().filter(|f| !f.is_empty())?;
    n.parse::<u64>().ok()?;
    Some((file, pid.parse::<libc::pid_t>().ok().filter(|&p| p > 0)?))
}

/// Fsyncs a directory so a rename inside it is durable. Filesystems that cannot fsync a
/// directory answer `EINVAL`; the data itself is already synced there, so that is not an error.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

/// Adds `path` to an I/O error's message; the OS message alone never says which file.
/// Checks that files can be created in `dir` (a temp file, removed at once): a command that
/// is about to change things elsewhere (register a bridge, issue a code) first makes sure it
/// can save what it gets.
pub fn check_writable(dir: &Path) -> io::Result<()> {
    let (tmp, file) =
        create_temp(dir, std::ffi::OsStr::new("write-check")).map_err(|e| with_path(dir, e))?;
    drop(file);
    fs::remove_file(&tmp).map_err(|e| with_path(&tmp, e))
}

/// The next step for a write into the state directory that failed with `e` (empty when its
/// kind suggests none).
pub fn write_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied => {
            " (the state directory must be writable by you: fix its permissions or mount, or \
             set HERMESCHAT_HOME to a directory that is)"
        }
        io::ErrorKind::StorageFull => " (the disk is full: free some space and try again)",
        _ => "",
    }
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// JSON files

/// Why a JSON state file could not be read or written.
#[derive(Debug)]
pub enum StateError {
    /// The file could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The file is not the JSON we expect, or the value could not be encoded.
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's description, with anything shaped like a secret redacted.
        message: String,
    },
}

impl StateError {
    /// [`write_hint`] for a failed write (nothing for a value that could not be encoded).
    pub fn write_hint(&self) -> &'static str {
        match self {
            StateError::Io { source, .. } => write_hint(source),
            StateError::Json { .. } => "",
        }
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            StateError::Json { path, message } => {
                write!(f, "{}: not the expected JSON: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Io { source, .. } => Some(source),
            StateError::Json { .. } => None,
        }
    }
}

/// Writes `value` to `path` as pretty JSON with a trailing newline, atomically, mode 0600.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StateError> {
    write_json_as(path, value, Durable::Yes)
}

/// [`write_json`] for a snapshot rewritten often and written again by its writer whenever it
/// is lost (the daemon's `status.json`): still atomic (a reader sees the old file or the new
/// one), but not fsynced, so a burst of changes costs no disk flushes.
pub fn write_json_snapshot<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
) -> Result<(), StateError> {
    write_json_as(path, value, Durable::No)
}

fn write_json_as<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
    durable: Durable,
) -> Result<(), StateError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Json {
        path: path.to_path_buf(),
        message: redact_secrets(&e.to_string()),
    })?;
    bytes.push(b'\n');
    write_atomic_raw(path, &bytes, FILE_MODE, durable)
        .map_err(|source| StateError::Io { path: path.to_path_buf(), source })
}

/// [`write_json`] that never replaces a file: the finished temp file is hard-linked to `path`,
/// which fails when the name is taken, so a writer racing with another (the daemon putting
/// back an identity while a pairing writes a new one) never undoes the other's write.
/// `Ok(false)` when `path` exists. Where hard links are not supported, the file is created
/// exclusively and written in place.
pub fn write_json_new<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<bool, StateError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Json {
        path: path.to_path_buf(),
        message: redact_secrets(&e.to_string()),
    })?;
    bytes.push(b'\n');
    write_new_raw(path, &bytes)
        .map_err(|source| StateError::Io { path: path.to_path_buf(), source })
}

/// [`write_atomic`] that never replaces a file (as [`write_json_new`]): `Ok(false)` when
/// `path` exists, and then it is left as it is. Mode 0600.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    write_new_raw(path, bytes).map_err(|e| with_path(path, e))
}

/// [`write_new`] without the path added to errors.
fn write_new_raw(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = parent_dir(path);
    let (tmp, mut file) = create_temp(dir, name)?;
    let placed = file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| {
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // No hard links here (vfat, some FUSE mounts): a file created exclusively, which
            // cannot replace one either (not atomic against a crash, but never over another).
            Err(_) => {
                let new =
                    OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path);
                match new {
                    Ok(mut f) => f.write_all(bytes).and_then(|()| f.sync_all()).map(|()| true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    });
    let _ = fs::remove_file(&tmp);
    let placed = placed?;
    if placed {
        sync_dir(dir)?;
    }
    Ok(placed)
}

/// Reads `path` as JSON; `None` when the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io { path: path.to_path_buf(), source });
        }
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| StateError::Json {
        path: path.to_path_buf(),
        message: redact_secrets(&e.to_string()),
    })
}

/// The outcome of [`load_or_move_aside`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded<T> {
    /// There is no file.
    Missing,
    /// The file parsed and passed validation.
    Ok(T),
    /// The file was unusable and now lives at `moved_to`, content untouched.
    MovedAside {
        /// Why it was unusable, fit for a status line (secrets redacted).
        reason: String,
        /// Where it went: `<name>.corrupt-<unix-secs>`, or `<name>.v<N>-<unix-secs>` for a
        /// file written by another version.
        moved_to: PathBuf,
    },
}

/// Loads `path` as a `T`; if it does not parse, has the wrong shape, or `validate` rejects
/// it, renames it aside and says so. Never panics on file content.
///
/// `version` is the file format's (its top-level `v`; `None` for a file without one). A file
/// of an older version (or an old npm-tool file carrying `bridgeSecret` and no `v`) is tagged
/// `v<N>` rather than `corrupt`: it is not damaged, just old, and the name tells a user
/// poking around what it was. A file of a newer version is an error and stays where it is:
/// a newer hermeschat-pair wrote it, and it is still good to that one.
///
/// I/O errors (unreadable file, read-only directory) are returned, not moved aside: the file
/// may be fine and the next run may read it.
pub fn load_or_move_aside<T: DeserializeOwned>(
    path: &Path,
    version: Option<u32>,
    validate: impl Fn(&T) -> Result<(), String>,
) -> io::Result<Loaded<T>> {
    match check(path, version, validate)? {
        Checked::Missing => Ok(Loaded::Missing),
        Checked::Ok(value) => Ok(Loaded::Ok(value)),
        Checked::Damaged { reason, tag } => {
            let moved_to = move_aside(path, &tag, unix_secs()).map_err(|e| with_path(path, e))?;
            Ok(Loaded::MovedAside { reason, moved_to })
        }
    }
}

/// [`load_or_move_aside`] for a command that only looks (`--status`): a damaged file stays
/// where it is. `Ok(Err(reason))` when it is damaged, `Ok(Ok(None))` when there is none.
pub fn peek<T: DeserializeOwned>(
    path: &Path,
    version: Option<u32>,
    validate: impl Fn(&T) -> Result<(), String>,
) -> io::Result<Result<Option<T>, String>> {
    Ok(match check(path, version, validate)? {
        Checked::Missing => Ok(None),
        Checked::Ok(value) => Ok(Some(value)),
        Checked::Damaged { reason, .. } => Err(reason),
    })
}

/// What a state file holds.
enum Checked<T> {
    Missing,
    Ok(T),
    /// Unusable: why (secrets redacted), and the tag its set-aside copy gets.
    Damaged {
        reason: String,
        tag: String,
    },
}

/// Reads and judges `path` (see [`load_or_move_aside`]).
fn check<T: DeserializeOwned>(
    path: &Path,
    version: Option<u32>,
    validate: impl Fn(&T) -> Result<(), String>,
) -> io::Result<Checked<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Checked::Missing),
        Err(e) => return Err(with_path(path, e)),
    };
    let written_by = version.and_then(|_| file_version(&bytes));
    if let (Some(ours), Some(theirs)) = (version, written_by)
        && theirs > u64::from(ours)
    {
        return Err(with_path(
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "written by a newer hermeschat-pair (format v{theirs}; this one reads \
                     v{ours}): upgrade hermeschat-pair. The file is left as it is"
                ),
            ),
        ));
    }
    let problem = match serde_json::from_slice::<T>(&bytes) {
        Ok(value) => match validate(&value) {
            Ok(()) => return Ok(Checked::Ok(value)),
            Err(why) => why,
        },
        Err(e) if e.is_data() => format!("unexpected content ({e})"),
        Err(e) => format!("not valid JSON ({e})"),
    };
    let (tag, reason) = match (version, written_by) {
        (Some(ours), Some(old)) if old != u64::from(ours) => (
            format!("v{old}"),
            format!("written by an older format (v={old}); this version uses v={ours}"),
        ),
        _ => ("corrupt".to_owned(), problem),
    };
    Ok(Checked::Damaged { reason: redact_secrets(&reason), tag })
}

/// The format version a state file says it has: its numeric top-level `v`, or 1 for the npm
/// tool's files that had `bridgeSecret` and no `v`.
fn file_version(bytes: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let object = value.as_object()?;
    match object.get("v") {
        Some(v) => v.as_u64(),
        None => object.contains_key("bridgeSecret").then_some(1),
    }
}

/// Moves `path` aside as `<name>.<tag>-<secs>` (never over an earlier copy): an identity that
/// is about to be replaced is kept, not overwritten. `Ok(None)` when there is no file.
pub fn set_aside(path: &Path, tag: &str) -> io::Result<Option<PathBuf>> {
    // The name itself: a symlink to nothing is set aside too.
    if fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    move_aside(path, tag, unix_secs()).map(Some).map_err(|e| with_path(path, e))
}

/// Renames `path` to `<name>.<tag>-<secs>`, adding `.1`, `.2`, … if that name is taken, so an
/// earlier moved-aside file is never overwritten.
fn move_aside(path: &Path, tag: &str, secs: u64) -> io::Result<PathBuf> {
    for candidate in aside_names(path, tag, secs)? {
        match fs::symlink_metadata(&candidate) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::rename(path, &candidate)?;
                return Ok(candidate);
            }
            Err(e) => return Err(e),
            Ok(_) => continue,
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "too many moved-aside copies already"))
}

/// Keeps `bytes` (what `path` held before a repair) beside it as `<name>.<tag>-<secs>`, named
/// as a file set aside is named, mode 0600, never over an earlier copy. Returns its path.
pub fn copy_aside(path: &Path, bytes: &[u8], tag: &str) -> io::Result<PathBuf> {
    for candidate in aside_names(path, tag, unix_secs())? {
        let created =
            OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&candidate);
        match created {
            Ok(mut f) => {
                if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
                    let _ = fs::remove_file(&candidate);
                    return Err(with_path(&candidate, e));
                }
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(with_path(&candidate, e)),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "too many copies kept aside already"))
}

/// `<name>.<tag>-<secs>`, then the same with `.1`, `.2`, … (a thousand names in all).
fn aside_names(path: &Path, tag: &str, secs: u64) -> io::Result<impl Iterator<Item = PathBuf>> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let base = format!("{name}.{tag}-{secs}");
    let path = path.to_path_buf();
    Ok((0..1000).map(move |n| match n {
        0 => path.with_file_name(&base),
        n => path.with_file_name(format!("{base}.{n}")),
    }))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Replaces anything shaped like one of our secrets (`hrs_`, `hcs_`, `hpt_` followed by hex)
/// with `<redacted>`. serde_json quotes offending values in its messages, and those messages
/// end up in logs and status lines.
pub fn redact_secrets(text: &str) -> String {
    const PREFIXES: [&str; 3] = ["hrs_", "hcs_", "hpt_"];
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = PREFIXES.iter().filter_map(|p| rest.find(p)).min() {
        let after = &rest[start + 4..];
        let hex_len = after.bytes().take_while(|b| b.is_ascii_hexdigit()).count();
        out.push_str(&rest[..start]);
        if hex_len > 0 {
            out.push_str("<redacted>");
        } else {
            out.push_str(&rest[start..start + 4]);
        }
        rest = &after[hex_len..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// bridge.json and config.json

/// `bridge.json`: who this bridge is to the relay. Written once at registration, replaced on
/// `--reset` or when the registry changes. Unknown fields are tolerated (and dropped on the
/// next write) so a newer version's file does not force a re-registration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeIdentity {
    /// File format version, always [`STATE_VERSION`].
    pub v: u32,
    /// The bridgeId (24 lowercase hex).
    pub bridge_id: String,
    /// The relaySecret (`hrs_` + 64 hex). Never printed: [`fmt::Debug`] redacts it.
    pub relay_secret: String,
    /// Where the bridge connects (`wss://…/ws/bridge`).
    pub bridge_relay_url: String,
    /// Where apps connect (`wss://…/ws/app`), put in the QR.
    pub app_relay_url: String,
    /// This installation's id, sent as `X-Hermes-Instance` so a restart takes over its socket.
    pub instance_id: String,
    /// The registry this identity belongs to; a different registry means re-registering.
    pub registry_url: String,
    /// The name shown in the app.
    pub display_name: String,
    /// When the identity was registered, unix milliseconds.
    pub created_at: u64,
}

impl BridgeIdentity {
    /// Builds the identity from a registry's answer to `POST /v1/bridge/register`.
    pub fn from_registration(
        registration: RegisterResponse,
        registry_url: &str,
        instance_id: &str,
        display_name: &str,
        created_at: u64,
    ) -> Self {
        BridgeIdentity {
            v: STATE_VERSION,
            bridge_id: registration.bridge_id,
            relay_secret: registration.relay_secret,
            bridge_relay_url: registration.bridge_relay_url,
            app_relay_url: registration.app_relay_url,
            instance_id: instance_id.to_owned(),
            registry_url: registry_url.to_owned(),
            display_name: display_name.to_owned(),
            created_at,
        }
    }

    /// Checks the version and the forms of the ids, secret and URLs. The message never quotes
    /// the secret.
    pub fn validate(&self) -> Result<(), String> {
        if self.v != STATE_VERSION {
            return Err(format!("version {} (expected {STATE_VERSION})", self.v));
        }
        if !is_bridge_id(&self.bridge_id) {
            return Err("bridgeId is not 24 lowercase hex digits".into());
        }
        if !is_relay_secret(&self.relay_secret) {
            return Err("relaySecret is not hrs_ followed by 64 lowercase hex digits".into());
        }
        let ws = |u: &str| u.starts_with("wss://") || u.starts_with("ws://");
        if !ws(&self.bridge_relay_url) || !ws(&self.app_relay_url) {
            return Err("a relay URL is not a ws:// or wss:// URL".into());
        }
        let http = |u: &str| u.starts_with("https://") || u.starts_with("http://");
        if !http(&self.registry_url) {
            return Err("registryUrl is not an http:// or https:// URL".into());
        }
        if self.instance_id.is_empty() {
            return Err("instanceId is empty".into());
        }
        Ok(())
    }
}

impl fmt::Debug for BridgeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeIdentity")
            .field("v", &self.v)
            .field("bridge_id", &self.bridge_id)
            .field("relay_secret", &format_args!("<redacted>"))
            .field("bridge_relay_url", &self.bridge_relay_url)
            .field("app_relay_url", &self.app_relay_url)
            .field("instance_id", &self.instance_id)
            .field("registry_url", &self.registry_url)
            .field("display_name", &self.display_name)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// `config.json`: the user's saved settings. Every field is optional; unset fields are left
/// out of the file so that a default changed in a later release still applies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// The registry URL (`--server`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_url: Option<String>,
    /// The backend port (`--port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The name shown in the app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The last pairing chose the user's own backend (`--no-server`, or an API that already
    /// answered on the port): the bridge never starts the built-in backend on its port, even
    /// when it starts (at boot, say) before that backend does.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub external_backend: bool,
}

// ---------------------------------------------------------------------------------------------
// Locks

/// An exclusive `flock` on a lock file (created 0600), released when dropped: one process at a
/// time runs what it guards (`lan.json` updates, a gateway wake-up).
#[derive(Debug)]
pub struct FileLock {
    /// Held open for the lock's life: the lock ends when it is closed.
    file: File,
}

impl FileLock {
    /// Waits for the lock as long as it takes.
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        Self::take(path, None)
    }

    /// Waits for the lock until `deadline`; `Ok(None)` when another holder kept it until then.
    pub fn acquire_until(
        path: &Path,
        deadline: std::time::Instant,
    ) -> io::Result<Option<FileLock>> {
        match Self::take(path, Some(deadline)) {
            Ok(lock) => Ok(Some(lock)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes this process's pid into the lock file, for [`FileLock::holder`] where the
    /// kernel does not name a lock's holder.
    pub fn record_pid(&self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.set_len(0)?;
        self.file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
    }

    /// The pid of the process holding the lock on `path`: the kernel's lock table (Linux),
    /// else the pid its holder recorded ([`FileLock::record_pid`]). `None` when not told.
    pub fn holder(path: &Path) -> Option<u32> {
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
        crate::daemon::lock_holder(&file, path).or_else(|| {
            use std::io::Read;
            let mut text = String::new();
            (&file).take(32).read_to_string(&mut text).ok()?;
            text.trim().parse().ok()
        })
    }

    fn take(path: &Path, deadline: Option<std::time::Instant>) -> io::Result<FileLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(path)
            .map_err(|e| with_path(path, e))?;
        let op = if deadline.is_some() { libc::LOCK_EX | libc::LOCK_NB } else { libc::LOCK_EX };
        loop {
            let Err(e) = flock(&file, op) else {
                return Ok(FileLock { file });
            };
            match deadline {
                _ if e.kind() == io::ErrorKind::Interrupted => {}
                Some(until) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= until {
                        return Err(e);
                    }
                    // Not a hot path: a holder keeps it for seconds.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => return Err(with_path(path, e)),
            }
        }
    }
}

/// `flock(2)` on `file` with `op` (`LOCK_EX`/`LOCK_SH`, optionally `| LOCK_NB`). The lock
/// belongs to the open file description: it ends when every descriptor of it is closed.
pub fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only reads a descriptor that `file` owns for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

/// A log file that rotates by size: `bridge.log` → `bridge.log.1` → … → `bridge.log.<keep-1>`,
/// the oldest dropped. Files are created 0600.
///
/// A write goes whole into one file: when it would push the current file past `max_bytes`,
/// the file is rotated first. So a file exceeds the limit only when one write alone is larger.
/// One process should own a log; a second writer would not see the first one's size.
#[derive(Debug)]
pub struct RotatingLog {
    /// The current file's path (`bridge.log`).
    path: PathBuf,
    /// The current file, opened for append.
    file: File,
    /// Bytes in the current file.
    len: u64,
    /// Rotate before a write would take the file past this.
    max_bytes: u64,
    /// Files kept, the current one included (at least 1).
    keep: usize,
}

impl RotatingLog {
    /// Default size limit per file: 5 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 5 << 20;

    /// Default files kept: `x.log`, `x.log.1`, `x.log.2`.
    pub const DEFAULT_KEEP: usize = 3;

    /// Opens (or creates) `path` with the default limits.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::with_limits(path, Self::DEFAULT_MAX_BYTES, Self::DEFAULT_KEEP)
    }

    /// Opens (or creates) `path`, rotating past `max_bytes` and keeping `keep` files
    /// (a `keep` of 0 is taken as 1: the log is truncated instead of rotated).
    pub fn with_limits(path: &Path, max_bytes: u64, keep: usize) -> io::Result<Self> {
        let file = open_log(path, false).map_err(|e| with_path(path, e))?;
        let len = file.metadata().map_err(|e| with_path(path, e))?.len();
        Ok(RotatingLog { path: path.to_path_buf(), file, len, max_bytes, keep: keep.max(1) })
    }

    /// The current log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Shifts every kept file up by one, dropping the oldest, and starts an empty file.
    fn rotate(&mut self) -> io::Result<()> {
        shift_generations(&self.path, self.keep, 0)?;
        self.file = open_log(&self.path, self.keep == 1)?;
        self.len = 0;
        Ok(())
    }
}

/// Renames `path.<n>` to `path.<n+1>` for every n from `keep - 2` down to `from`, dropping
/// `path.<keep-1>`. Renaming over the next name replaces it atomically, so the oldest goes away
/// by being overwritten, from the top down.
fn shift_generations(path: &Path, keep: usize, from: usize) -> io::Result<()> {
    for i in (from + 1..keep).rev() {
        match fs::rename(numbered(path, i - 1), numbered(path, i)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Keeps a log that another process appends to (the started gateway's output, the boot
/// service's logs) under `max_bytes`: once past it, its last `max_bytes` are copied to `path.1` (older copies shift up, `keep` files in all) and the file is
/// truncated in place, so the writer's descriptor stays valid ("copytruncate"). The writer
/// must append (`O_APPEND`, as `>>`, systemd's `append:` and launchd do): its next line then
/// lands at the start. Lines written between the copy and the truncation are lost. Returns
/// whether the log was trimmed.
///
/// Left alone, with an error: anything but a regular file (a symlink is not followed, a FIFO
/// never opened), a file it cannot write, and a sparse one (its writer does not append, so a
/// truncation would only leave a hole as large as the file). A failed copy changes nothing.
pub fn trim_appended_log(path: &Path, max_bytes: u64, keep: usize) -> io::Result<bool> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::MetadataExt;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(with_path(path, e)),
    };
    if !meta.file_type().is_file() {
        return Err(with_path(path, io::Error::other("not a regular file")));
    }
    if meta.len() <= max_bytes {
        return Ok(false);
    }
    let log = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| with_path(path, e))?;
    let meta = log.metadata()?;
    if meta.blocks().saturating_mul(512) < meta.len() / 2 {
        return Err(with_path(
            path,
            io::Error::other(
                "sparse: its writer does not append, so it cannot be trimmed in place",
            ),
        ));
    }
    if keep > 1 {
        // The copy is made aside and put in place only once whole: a full disk loses no copy.
        let aside = numbered(path, 1).with_extension("partial");
        let copied = (|| -> io::Result<()> {
            let mut from = &log;
            from.seek(io::SeekFrom::Start(meta.len().saturating_sub(max_bytes)))?;
            let mut copy = open_log(&aside, true)?;
            io::copy(&mut from.take(max_bytes), &mut copy)?;
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = fs::remove_file(&aside);
            return Err(with_path(path, e));
        }
        shift_generations(path, keep, 1)?;
        fs::rename(&aside, numbered(path, 1))?;
    }
    log.set_len(0)?;
    Ok(true)
}

/// `path` for generation 0, `path.<n>` after that.
fn numbered(path: &Path, n: usize) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Opens a log for append, creating it 0600, tightening an existing file that is wider.
fn open_log(path: &Path, truncate: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).mode(FILE_MODE);
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    let file = options.open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(file)
}

impl Write for RotatingLog {
    /// Writes all of `buf` to one file, rotating first if it would not fit.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let incoming = buf.len() as u64;
        if self.len > 0 && self.len.saturating_add(incoming) > self.max_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(buf) {
            // Part of `buf` may have landed; resynchronise the size from the file.
            self.len = self.file.metadata().map_or(self.len, |m| m.len());
            return Err(e);
        }
        self.len += incoming;
        Ok(buf.len())
    }

    /// Nothing is buffered here; the file is written through.
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_of_dead_processes_are_removed() {
        let dir = std::env::temp_dir().join(format!("hc-stale-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // A pid that cannot be alive (above pid_max) and this process's own.
        let dead = dir.join(".status.json.2147483646.3.tmp");
        let ours = dir.join(format!(".status.json.{}.4.tmp", std::process::id()));
        let other = dir.join("status.json.1.2.tmp.keep");
        for f in [&dead, &ours, &other] {
            fs::write(f, "x").unwrap();
        }
        assert_eq!(remove_stale_temps(&dir), 1);
        assert!(!dead.exists() && ours.exists() && other.exists());
        assert_eq!(temp_parts(".bridge.json.12.0.tmp"), Some(("bridge.json", 12)));
        assert_eq!(temp_parts("..12.0.tmp"), None);
        assert_eq!(temp_parts(".x.y.tmp"), None);
        // Only the named file's: another program's of the same shape stay.
        let png = dir.join(".hermeschat_pair.png.2147483646.0.tmp");
        fs::write(&dead, "x").unwrap();
        fs::write(&png, "x").unwrap();
        assert_eq!(remove_stale_temps_of(&dir, "hermeschat_pair.png"), 1);
        assert!(!png.exists() && dead.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn account_name_reads_the_user_database() {
        // uid 0 is root on every Unix; an unused uid has no name.
        assert_eq!(account_name(0).as_deref(), Some("root"));
        assert_eq!(account_name(u32::MAX - 7), None);
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        /// Creates `hermeschat-state-<tag>-<pid>-<nanos>`.
        fn new(tag: &str) -> TestDir {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("hermeschat-state-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }

        /// A path inside the directory.
        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }

        /// The names in the directory, sorted.
        fn names(&self) -> Vec<String> {
            names_in(&self.0)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o700));
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The names in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The permission bits of `path`.
    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A valid identity with a recognisable secret.
    fn identity() -> BridgeIdentity {
        BridgeIdentity::from_registration(
            RegisterResponse {
                bridge_id: "0123456789abcdef01234567".into(),
                relay_secret: format!("hrs_{}", "5ec7".repeat(16)),
                bridge_relay_url: "wss://relay.example.com/ws/bridge".into(),
                app_relay_url: "wss://relay.example.com/ws/app".into(),
            },
            "https://relay.example.com",
            "hin_00112233445566778899aabbccddeeff",
            "my-macbook",
            1_700_000_000_000,
        )
    }

    #[test]
    fn state_dir_prefers_the_override_then_home() {
        let none = || None;
        let passwd = || Some(PathBuf::from("/home/pw"));
        let chosen = |dir: &str| (PathBuf::from(dir), false);
        assert_eq!(
            resolve_state_dir(Some("/srv/hc".into()), Some("/home/u".into()), none),
            chosen("/srv/hc")
        );
        assert_eq!(
            resolve_state_dir(Some("".into()), Some("/home/u".into()), none),
            chosen("/home/u/.hermeschat")
        );
        assert_eq!(
            resolve_state_dir(None, Some("/home/u".into()), none),
            chosen("/home/u/.hermeschat")
        );
        assert_eq!(
            resolve_state_dir(None, Some("".into()), passwd),
            chosen("/home/pw/.hermeschat")
        );
        let (relative, fallback) = resolve_state_dir(Some("rel/dir".into()), None, none);
        assert!(relative.is_absolute() && !fallback, "{relative:?}");
        assert!(relative.ends_with("rel/dir"));
        // No home anywhere (an empty passwd home is none): the last resort, and said so.
        for passwd in [None, Some(PathBuf::new())] {
            let (dir, fallback) = resolve_state_dir(None, Some("".into()), || passwd);
            assert!(dir.is_absolute() && dir.ends_with(".hermeschat") && fallback, "{dir:?}");
        }
    }

    #[test]
    fn ensure_dir_creates_0700_and_tightens() {
        let t = TestDir::new("ensure");
        let nested = t.join("a/b/state");
        ensure_dir(&nested).unwrap();
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&t.join("a")), 0o700, "created parents are private too");

        let loose = t.join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_dir(&loose).unwrap();
        assert_eq!(mode(&loose), 0o700);
        ensure_dir(&loose).unwrap(); // idempotent

        let file = t.join("file");
        fs::write(&file, "x").unwrap();
        let err = ensure_dir(&file).unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");

        // Anyone could have planted files in it: refused, and left as it is.
        let open = t.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_dir(&open).unwrap_err();
        assert!(err.to_string().contains("other users can write"), "{err}");
        assert_eq!(mode(&open), 0o777);

        // Another user's (root can make one): refused.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = t.join("theirs");
            fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = ensure_dir(&theirs).unwrap_err();
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }
    }

    #[test]
    fn write_atomic_creates_0600_and_replaces() {
        let t = TestDir::new("atomic");
        let path = t.join("status.json");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(mode(&path), 0o600);

        // A pre-existing world-readable file is replaced by a private one.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(t.names(), vec!["status.json"], "no temp file left behind");
    }

    #[test]
    fn write_atomic_cleans_up_when_the_rename_fails() {
        let t = TestDir::new("rename-fails");
        // A directory in the way: the temp file is written, then the rename fails.
        let target = t.join("bridge.json");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), "keep").unwrap();
        let err = write_atomic(&target, b"new").unwrap_err();
        assert!(err.to_string().contains("bridge.json"), "{err}");
        assert_eq!(t.names(), vec!["bridge.json"], "temp file removed");
        assert_eq!(fs::read_to_string(target.join("inside")).unwrap(), "keep");
    }

    #[test]
    fn write_atomic_keeps_the_old_file_in_a_read_only_dir() {
        let t = TestDir::new("readonly");
        let path = t.join("bridge.json");
        write_atomic(&path, b"old").unwrap();
        fs::set_permissions(&t.0, fs::Permissions::from_mode(0o500)).unwrap();

        // Root (CAP_DAC_OVERRIDE) writes through 0500; probe before relying on it.
        let probe = t.join("probe");
        let enforced = fs::write(&probe, "p").is_err();
        let _ = fs::remove_file(&probe);
        let result = write_atomic(&path, b"new");
        fs::set_permissions(&t.0, fs::Permissions::from_mode(0o700)).unwrap();

        if enforced {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
            assert_eq!(fs::read(&path).unwrap(), b"old");
            assert_eq!(t.names(), vec!["bridge.json"]);
        } else {
            eprintln!("note: running with permission override (root); read-only check skipped");
            result.unwrap();
        }
    }

    #[test]
    fn write_atomic_fails_cleanly_without_a_directory() {
        let t = TestDir::new("nodir");
        let err = write_atomic(&t.join("missing/x.json"), b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(t.names().is_empty());
        assert!(write_atomic(Path::new("/"), b"x").is_err(), "no file name");
    }

    #[test]
    fn json_round_trip_pretty_with_newline() {
        let t = TestDir::new("json");
        let path = config_json(&t.0);
        assert!(read_json::<Config>(&path).unwrap().is_none());
        let config = Config {
            registry_url: Some("https://relay.example.com".into()),
            port: Some(8765),
            display_name: None,
            external_backend: true,
        };
        write_json(&path, &config).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("}\n"), "{text:?}");
        assert!(text.contains("\n  \"registryUrl\": "), "pretty, camelCase: {text}");
        assert!(text.contains("\"externalBackend\": true"), "{text}");
        assert!(!text.contains("displayName"), "unset fields are omitted");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read_json::<Config>(&path).unwrap(), Some(config));

        fs::write(&path, "{\"port\": \"hrs_abcdef\"}").unwrap();
        let err = read_json::<Config>(&path).unwrap_err();
        let shown = err.to_string();
        assert!(matches!(err, StateError::Json { .. }));
        assert!(shown.contains("config.json"), "{shown}");
        assert!(!shown.contains("hrs_abcdef"), "{shown}");
    }

    #[test]
    fn config_tolerates_missing_and_unknown_fields() {
        let c: Config = serde_json::from_str(r#"{"port":9000,"bridgeSecret":"x"}"#).unwrap();
        assert_eq!(c.port, Some(9000));
        assert_eq!(c.registry_url, None);
        assert_eq!(serde_json::from_str::<Config>("{}").unwrap(), Config::default());
        assert_eq!(serde_json::to_string(&Config::default()).unwrap(), "{}");
    }

    #[test]
    fn identity_serde_and_validation() {
        let id = identity();
        id.validate().unwrap();
        let json = serde_json::to_value(&id).unwrap();
        for key in [
            "v",
            "bridgeId",
            "relaySecret",
            "bridgeRelayUrl",
            "appRelayUrl",
            "instanceId",
            "registryUrl",
            "displayName",
            "createdAt",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        let mut with_extra = json.clone();
        with_extra["futureField"] = serde_json::json!(true);
        let back: BridgeIdentity = serde_json::from_value(with_extra).unwrap();
        assert_eq!(back, id);

        let bad = |f: fn(&mut BridgeIdentity)| {
            let mut id = identity();
            f(&mut id);
            id.validate().unwrap_err()
        };
        assert!(bad(|i| i.v = 1).contains("version 1"));
        assert!(bad(|i| i.bridge_id = "XYZ".into()).contains("bridgeId"));
        let secret_err = bad(|i| i.relay_secret = "hrs_short".into());
        assert!(secret_err.contains("relaySecret") && !secret_err.contains("short"));
        assert!(bad(|i| i.app_relay_url = "https://x".into()).contains("relay URL"));
        assert!(bad(|i| i.registry_url = "ftp://x".into()).contains("registryUrl"));
        assert!(bad(|i| i.instance_id.clear()).contains("instanceId"));
    }

    #[test]
    fn identity_debug_hides_the_secret() {
        let id = identity();
        for shown in [format!("{id:?}"), format!("{id:#?}")] {
            assert!(!shown.contains(&id.relay_secret), "{shown}");
            assert!(!shown.contains("5ec75ec7"), "{shown}");
            assert!(shown.contains("<redacted>"));
            assert!(shown.contains(&id.bridge_id));
        }
        let loaded = format!("{:?}", Loaded::Ok(id.clone()));
        assert!(!loaded.contains(&id.relay_secret));
    }

    #[test]
    fn load_reports_missing_and_ok() {
        let t = TestDir::new("load-ok");
        let path = bridge_json(&t.0);
        let got = load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap();
        assert_eq!(got, Loaded::Missing);
        write_json(&path, &identity()).unwrap();
        let got = load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap();
        assert_eq!(got, Loaded::Ok(identity()));
        assert_eq!(t.names(), vec!["bridge.json"]);
    }

    /// Asserts `name` is `<prefix><digits>`.
    fn assert_suffixed(name: &str, prefix: &str) {
        let digits = name
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{name} does not start with {prefix}"));
        assert!(!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()), "{name}");
    }

    #[test]
    fn unparseable_file_is_moved_aside_intact() {
        let t = TestDir::new("corrupt");
        let path = bridge_json(&t.0);
        let garbage = b"{\"v\":2, \"bridgeId\": \x00 truncated";
        fs::write(&path, garbage).unwrap();
        let Loaded::MovedAside { reason, moved_to } =
            load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap()
        else {
            panic!("not moved aside")
        };
        assert!(reason.contains("not valid JSON"), "{reason}");
        assert!(!path.exists());
        assert_eq!(fs::read(&moved_to).unwrap(), garbage);
        let name = moved_to.file_name().unwrap().to_str().unwrap();
        assert_suffixed(name, "bridge.json.corrupt-");
        assert_eq!(moved_to.parent(), Some(t.0.as_path()));
    }

    #[test]
    fn wrong_shape_and_failed_validation_are_corrupt() {
        let t = TestDir::new("shape");
        let path = bridge_json(&t.0);

        fs::write(&path, "[1, 2]").unwrap();
        let got = load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap();
        let Loaded::MovedAside { reason, moved_to } = got else { panic!("not moved aside") };
        assert!(reason.contains("unexpected content"), "{reason}");
        assert_suffixed(moved_to.file_name().unwrap().to_str().unwrap(), "bridge.json.corrupt-");

        let mut id = identity();
        id.relay_secret = format!("hrs_{}", "ab".repeat(20)); // too short
        write_json(&path, &id).unwrap();
        let got = load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap();
        let Loaded::MovedAside { reason, moved_to } = got else { panic!("not moved aside") };
        assert!(reason.contains("relaySecret"), "{reason}");
        assert!(!reason.contains("abab"), "{reason}");
        assert!(moved_to.to_string_lossy().contains(".corrupt-"));
        assert_eq!(names_in(&t.0).len(), 2, "both copies kept");
    }

    #[test]
    fn old_version_files_are_tagged_with_their_version() {
        let t = TestDir::new("v1");
        let path = bridge_json(&t.0);
        let v1 = r#"{"v":1,"bridgeId":"abc","bridgeSecret":"s3cr3t"}"#;
        fs::write(&path, v1).unwrap();
        let Loaded::MovedAside { reason, moved_to } =
            load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap()
        else {
            panic!("not moved aside")
        };
        assert!(reason.contains("v=1"), "{reason}");
        assert_suffixed(moved_to.file_name().unwrap().to_str().unwrap(), "bridge.json.v1-");
        assert_eq!(fs::read_to_string(&moved_to).unwrap(), v1);

        // The npm tool's files had no `v`, only a bridgeSecret.
        fs::write(&path, r#"{"bridgeSecret":"s3cr3t","relayUrl":"wss://x"}"#).unwrap();
        let got = load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap();
        let Loaded::MovedAside { moved_to, .. } = got else { panic!("not moved aside") };
        assert!(moved_to.to_string_lossy().contains("bridge.json.v1-"));

        // A current-version file that the caller's rule rejects is corrupt, not old.
        write_json(&path, &identity()).unwrap();
        let got =
            load_or_move_aside(&path, Some(STATE_VERSION), |_: &BridgeIdentity| Err("nope".into()))
                .unwrap();
        let Loaded::MovedAside { reason, moved_to } = got else { panic!("not moved aside") };
        assert_eq!(reason, "nope");
        assert!(moved_to.to_string_lossy().contains(".corrupt-"));
    }

    #[test]
    fn write_json_new_never_replaces_a_file() {
        let t = TestDir::new("new");
        let path = bridge_json(&t.0);
        assert!(write_json_new(&path, &identity()).unwrap());
        assert_eq!(mode(&path), 0o600);
        let mut other = identity();
        other.bridge_id = "ffffffffffffffffffffffff".into();
        assert!(!write_json_new(&path, &other).unwrap(), "replaced an existing file");
        let kept: BridgeIdentity = read_json(&path).unwrap().unwrap();
        assert_eq!(kept.bridge_id, identity().bridge_id);
        assert_eq!(names_in(&t.0).len(), 1, "a temp file was left");
    }

    #[test]
    fn a_newer_file_is_an_error_and_a_look_moves_nothing() {
        let t = TestDir::new("newer");
        let path = bridge_json(&t.0);
        let v3 = r#"{"v":3,"bridgeId":"abc","somethingNew":true}"#;
        fs::write(&path, v3).unwrap();
        let err =
            load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap_err();
        assert!(err.to_string().contains("newer hermeschat-pair (format v3"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), v3, "left as it is");
        assert!(peek(&path, Some(STATE_VERSION), BridgeIdentity::validate).is_err());

        fs::write(&path, "{\"v\":2,").unwrap();
        let looked = peek(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap();
        assert!(matches!(&looked, Err(reason) if reason.contains("not valid JSON")), "{looked:?}");
        assert_eq!(names_in(&t.0).len(), 1, "peek moved the file");
        write_json(&path, &identity()).unwrap();
        let looked = peek(&path, Some(STATE_VERSION), BridgeIdentity::validate).unwrap();
        assert_eq!(looked.map(|id| id.map(|i| i.bridge_id)), Ok(Some(identity().bridge_id)));
    }

    #[test]
    fn move_aside_never_overwrites_an_earlier_copy() {
        let t = TestDir::new("collide");
        let path = t.join("bridge.json");
        let mut moved = Vec::new();
        for content in ["a", "b", "c"] {
            fs::write(&path, content).unwrap();
            moved.push(move_aside(&path, "corrupt", 42).unwrap());
        }
        assert_eq!(
            t.names(),
            vec!["bridge.json.corrupt-42", "bridge.json.corrupt-42.1", "bridge.json.corrupt-42.2",]
        );
        for (path, content) in moved.iter().zip(["a", "b", "c"]) {
            assert_eq!(fs::read_to_string(path).unwrap(), content);
        }
    }

    #[test]
    fn unreadable_file_is_an_error_not_moved() {
        let t = TestDir::new("unreadable");
        let path = t.join("bridge.json");
        fs::create_dir(&path).unwrap(); // reading a directory fails with an I/O error
        assert!(load_or_move_aside(&path, Some(STATE_VERSION), BridgeIdentity::validate).is_err());
        assert!(path.is_dir());
    }

    #[test]
    fn secrets_are_redacted_from_messages() {
        let s = format!("bad value \"hrs_{}\" and hcs_00ff, hpt_ alone", "a".repeat(64));
        assert_eq!(redact_secrets(&s), "bad value \"<redacted>\" and <redacted>, hpt_ alone");
        assert_eq!(redact_secrets("nothing here"), "nothing here");
    }

    #[test]
    fn log_rotation_keeps_n_files_within_the_limit() {
        let t = TestDir::new("rotate");
        let path = bridge_log(&t.0);
        let max = 100;
        let mut log = RotatingLog::with_limits(&path, max, 3).unwrap();
        let mut last = Vec::new();
        for i in 0..200u32 {
            // Writes of 1..=40 bytes, never split across files.
            let line = format!("{i:04}{}\n", "x".repeat((i as usize * 7) % 36));
            log.write_all(line.as_bytes()).unwrap();
            let len = fs::metadata(&path).unwrap().len();
            assert!(len <= max, "write {i}: {len} bytes in a {max}-byte log");
            last = line.into_bytes();
        }
        log.flush().unwrap();
        assert_eq!(t.names(), vec!["bridge.log", "bridge.log.1", "bridge.log.2"]);
        for name in t.names() {
            let p = t.join(&name);
            assert_eq!(mode(&p), 0o600, "{name}");
            assert!(fs::metadata(&p).unwrap().len() <= max, "{name}");
        }
        let current = fs::read(&path).unwrap();
        assert!(current.ends_with(&last), "newest line is in the current file");
        // Whole lines only: every file starts with a line number.
        for name in t.names() {
            let text = fs::read_to_string(t.join(&name)).unwrap();
            assert!(text.lines().all(|l| l[..4].bytes().all(|b| b.is_ascii_digit())));
        }
        // The rotated files hold older lines than the current one.
        let first_num =
            |name: &str| -> u32 { fs::read_to_string(t.join(name)).unwrap()[..4].parse().unwrap() };
        assert!(first_num("bridge.log.2") < first_num("bridge.log.1"));
        assert!(first_num("bridge.log.1") < first_num("bridge.log"));
    }

    #[test]
    fn a_log_another_process_appends_to_is_trimmed_in_place() {
        let t = TestDir::new("trim");
        let path = t.join("service-error.log");
        let read = |name: &str| fs::read(t.join(name)).unwrap();
        // The writer's descriptor, opened once as a service manager does (`append:`).
        let mut writer = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        writer.write_all(b"first\n").unwrap();
        assert!(!trim_appended_log(&path, 12, 3).unwrap(), "under the limit: left alone");
        writer.write_all(b"second line\n").unwrap();
        assert!(trim_appended_log(&path, 12, 3).unwrap());
        assert_eq!(read("service-error.log.1"), b"second line\n", "the last 12 bytes");
        assert_eq!(mode(&t.join("service-error.log.1")), 0o600);
        // The writer goes on through the same descriptor, from the start of the file.
        writer.write_all(b"third!\n").unwrap();
        assert_eq!(read("service-error.log"), b"third!\n");
        writer.write_all(b"fourth line\n").unwrap();
        assert!(trim_appended_log(&path, 12, 3).unwrap());
        assert_eq!(read("service-error.log.1"), b"fourth line\n");
        assert_eq!(read("service-error.log.2"), b"second line\n");
        // The oldest copy is dropped: `keep` files in all.
        writer.write_all(&[b'x'; 13]).unwrap();
        assert!(trim_appended_log(&path, 12, 3).unwrap());
        assert_eq!(t.names(), ["service-error.log", "service-error.log.1", "service-error.log.2"]);
        assert_eq!(read("service-error.log.1"), [b'x'; 12]);
        assert_eq!(read("service-error.log.2"), b"fourth line\n");
        assert_eq!(read("service-error.log"), b"");
        // A missing log is nothing to do.
        assert!(!trim_appended_log(&t.join("none.log"), 10, 3).unwrap());
    }

    #[test]
    fn only_regular_logs_written_by_appending_are_trimmed() {
        let t = TestDir::new("trim-odd");
        // A symlink (to a file outside the state directory, say) is not followed.
        let outside = t.join("elsewhere");
        fs::write(&outside, [b'o'; 40]).unwrap();
        let link = t.join("gateway.log");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(trim_appended_log(&link, 10, 3).is_err());
        assert_eq!(fs::metadata(&outside).unwrap().len(), 40, "the link's target was truncated");
        // A FIFO is never opened (that would block until a writer came).
        let fifo = t.join("service.log");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid, NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(trim_appended_log(&fifo, 0, 3).is_err());
        // A sparse file (its writer seeks instead of appending) is left as it is.
        let sparse = t.join("service-error.log");
        let f = File::create(&sparse).unwrap();
        f.set_len(64 << 20).unwrap();
        let err = trim_appended_log(&sparse, 1 << 20, 3).unwrap_err();
        assert!(err.to_string().contains("does not append"), "{err}");
        assert_eq!(fs::metadata(&sparse).unwrap().len(), 64 << 20);
        assert!(!t.join("service-error.log.1").exists());
    }

    #[test]
    fn oversized_write_exceeds_by_one_write_only() {
        let t = TestDir::new("oversize");
        let path = t.join("server.log");
        let mut log = RotatingLog::with_limits(&path, 10, 2).unwrap();
        log.write_all(b"abc").unwrap();
        log.write_all(&[b'z'; 25]).unwrap(); // does not fit: rotate, then lands alone
        assert_eq!(fs::read(t.join("server.log.1")).unwrap(), b"abc");
        assert_eq!(fs::metadata(&path).unwrap().len(), 25);
        log.write_all(b"next").unwrap(); // the big file rotates out at once
        assert_eq!(fs::read(&path).unwrap(), b"next");
        assert_eq!(fs::read(t.join("server.log.1")).unwrap(), [b'z'; 25]);
        assert_eq!(t.names(), vec!["server.log", "server.log.1"]);

        // An oversized first write into an empty log goes in without rotating an empty file.
        let fresh = t.join("fresh.log");
        let mut log = RotatingLog::with_limits(&fresh, 10, 2).unwrap();
        log.write_all(&[b'y'; 25]).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().len(), 25);
        assert!(!t.join("fresh.log.1").exists(), "no empty generation rotated out");
    }

    #[test]
    fn log_reopen_counts_existing_bytes_and_keep_one_truncates() {
        let t = TestDir::new("reopen");
        let path = t.join("gateway.log");
        fs::write(&path, [b'o'; 8]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let mut log = RotatingLog::with_limits(&path, 10, 1).unwrap();
        assert_eq!(mode(&path), 0o600, "an existing wide log is tightened");
        assert_eq!(log.path(), path.as_path());
        log.write_all(b"12").unwrap(); // 8 + 2 fits exactly
        assert_eq!(fs::read(&path).unwrap(), b"oooooooo12");
        log.write_all(b"3").unwrap(); // 11 > 10: keep=1 truncates in place
        assert_eq!(fs::read(&path).unwrap(), b"3");
        assert_eq!(t.names(), vec!["gateway.log"]);

        let default = RotatingLog::open(&t.join("bridge.log")).unwrap();
        assert_eq!(default.max_bytes, 5 << 20);
        assert_eq!(default.keep, 3);
    }

    #[test]
    fn path_helpers_name_the_files() {
        let d = Path::new("/s");
        assert_eq!(bridge_json(d), Path::new("/s/bridge.json"));
        assert_eq!(config_json(d), Path::new("/s/config.json"));
        assert_eq!(pid_file(d), Path::new("/s/bridge.pid"));
        assert_eq!(status_json(d), Path::new("/s/status.json"));
        assert_eq!(bridge_log(d), Path::new("/s/bridge.log"));
        assert_eq!(server_log(d), Path::new("/s/server.log"));
        assert_eq!(gateway_log(d), Path::new("/s/gateway.log"));
        assert_eq!(numbered(d, 0), Path::new("/s"));
        assert_eq!(numbered(Path::new("/s/x.log"), 2), Path::new("/s/x.log.2"));
    }

    #[test]
    fn a_failed_write_says_what_to_do_about_a_full_disk_or_a_read_only_directory() {
        let io = |kind: io::ErrorKind| StateError::Io {
            path: "/s/config.json".into(),
            source: kind.into(),
        };
        assert!(io(io::ErrorKind::StorageFull).write_hint().contains("the disk is full"));
        assert!(io(io::ErrorKind::ReadOnlyFilesystem).write_hint().contains("HERMESCHAT_HOME"));
        let json = StateError::Json { path: "/s/config.json".into(), message: "x".into() };
        assert_eq!(json.write_hint(), "");
    }
}
