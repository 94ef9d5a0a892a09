//! Starting, finding and stopping the bridge daemon.
//!
//! The daemon is this same binary re-executed (`hermeschat-pair __bridge-run`) in a new session
//! with stdio detached. Re-executing instead of forking means the daemon starts as a fresh,
//! single-threaded process however many threads the CLI had (forking a threaded process is
//! unsound), so it "daemonizes before any thread starts" by construction. The CLI learns the
//! daemon's real outcome through a pipe: the daemon writes `ok <pid>` only after it holds the
//! pid lock and its threads run, or `error: …`; the CLI never reports success otherwise.
//!
//! One daemon per state directory: it holds an exclusive `flock` on `bridge.pid` for its whole
//! life. A pid file without an exclusive lock is stale (the daemon died), whatever it contains.
//! Commands that only look ([`running`]) take a shared lock for an instant, never the
//! exclusive one: two of them at once must not each see the other's probe as a daemon, read
//! a stale pid and signal whatever process now has it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::state;

/// Whether this process ignores `sig` (`nohup` ignores SIGHUP, a non-interactive shell's `&`
/// SIGINT): what a handler installed later must keep as it found it.
pub fn signal_ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads this process's disposition of `sig`
    // into `old`, plain data zeroed before.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old);
        old.sa_sigaction == libc::SIG_IGN
    }
}

/// The descriptor number the readiness pipe gets in the daemon.
const READY_FD: i32 = 3;

/// How long the CLI waits for the daemon's readiness line.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The held pid lock; released when dropped (or when the process dies).
pub struct PidLock {
    file: File,
    path: PathBuf,
}

impl PidLock {
    /// Takes the lock on `bridge.pid` in `dir` and records this process's pid in it.
    /// `Err(Some(pid))` when another daemon holds it.
    pub fn acquire(dir: &Path) -> Result<PidLock, LockError> {
        let path = state::pid_file(dir);
        let mut attempts = 0;
        let mut file = loop {
            attempts += 1;
            let mut file = open_pid_file(&path).map_err(|e| LockError::Io(path.clone(), e))?;
            if try_flock(&file, libc::LOCK_EX) {
                // A daemon that exited cleanly unlinks the file; if that happened after we
                // opened it, our lock is on a file nobody else will look at: take the new one.
                if same_file(&file, &path) {
                    break file;
                }
            } else if !try_flock(&file, libc::LOCK_SH) {
                // An exclusive holder: a daemon.
                return Err(LockError::Held(read_pid(&mut file)));
            } else if attempts >= LOCK_ATTEMPTS {
                return Err(LockError::Busy);
            }
            // Only commands probing with a shared lock, for an instant.
            drop(file);
            std::thread::sleep(Duration::from_millis(2));
        };
        file.set_len(0).map_err(|e| LockError::Io(path.clone(), e))?;
        file.rewind().map_err(|e| LockError::Io(path.clone(), e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| LockError::Io(path.clone(), e))?;
        let _ = file.sync_all();
        Ok(PidLock { file, path })
    }

    /// Removes the pid file on a clean exit (the lock goes with the descriptor).
    pub fn release(self) {
        let _ = self.file.set_len(0);
        // Only our own file: a daemon whose state directory was deleted and made anew leaves
        // the new daemon's pid file where it is.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why the pid lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another daemon holds it (its pid, when readable).
    Held(Option<u32>),
    /// Other commands kept probing the file the whole time it was tried.
    Busy,
    /// The pid file could not be opened.
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held(Some(pid)) => write!(
                f,
                "a bridge daemon is already running (pid {pid}); stop it with hermeschat-pair --stop"
            ),
            LockError::Held(None) => f.write_str(
                "a bridge daemon is already running; stop it with hermeschat-pair --stop",
            ),
            LockError::Busy => f.write_str(
                "bridge.pid stayed busy (other hermeschat-pair commands are looking at it); \
                 try again in a moment",
            ),
            LockError::Io(path, e) => {
                write!(f, "cannot open {}: {e}{}", path.display(), state::write_hint(e))
            }
        }
    }
}

fn open_pid_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)
}

/// Tries of [`PidLock::acquire`] while only probes hold the file (each holds it for an instant).
const LOCK_ATTEMPTS: u32 = 100;

/// Takes (or converts to) a `flock` of kind `op` (`LOCK_EX` or `LOCK_SH`) without waiting.
fn try_flock(file: &File, op: libc::c_int) -> bool {
    state::flock(file, op | libc::LOCK_NB).is_ok()
}

/// True when `path` still names the open `file` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The pid of the running daemon, if one holds the lock.
pub fn running(dir: &Path) -> Option<u32> {
    let path = state::pid_file(dir);
    if !path.exists() {
        return None;
    }
    let mut file = open_pid_file(&path).ok()?;
    if try_flock(&file, libc::LOCK_SH) {
        // No exclusive holder: a stale file from a daemon that died. Our lock ends with `file`.
        return None;
    }
    // Held, but the pid may not be written yet in the instant after the lock was taken (or
    // the file was damaged since): the kernel's lock table names the holder.
    read_pid(&mut file).or_else(|| lock_holder(&file, &path)).or(Some(0))
}

/// The program file a process runs, as it was when the process started: an upgrade replaces
/// the file (a new inode, or new contents: another modification time or size), while the
/// process goes on running the old code until it is restarted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExeStamp {
    /// Where the program file is.
    pub path: PathBuf,
    /// Its device and inode.
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
    /// Its size in bytes.
    pub len: u64,
    /// Its modification time, in nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl ExeStamp {
    /// This process's program file now.
    pub fn current() -> Option<ExeStamp> {
        let exe = this_program().ok()?;
        // Symlinks resolved (macOS reports the path as run), as Linux's /proc/self/exe is.
        ExeStamp::of(&std::fs::canonicalize(&exe).unwrap_or(exe))
    }

    /// The program file at `path` now (`None` when there is none).
    fn of(path: &Path) -> Option<ExeStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(ExeStamp {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Whether daemon `pid`, which recorded `stamp` when it started, runs a program file that has
/// been replaced or removed since (an upgrade: it still runs the old code). Without a stamp
/// (a daemon older than it) Linux still tells: `/proc/<pid>/exe` then ends in ` (deleted)`.
pub fn runs_replaced_program(pid: u32, stamp: Option<&ExeStamp>) -> bool {
    match stamp {
        Some(stamp) => ExeStamp::of(&stamp.path).as_ref() != Some(stamp),
        None => std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|exe| exe.to_string_lossy().ends_with(" (deleted)")),
    }
}

/// Whether process `pid` is stopped (SIGSTOP, Ctrl-Z) or held by a debugger: its state in
/// `/proc/<pid>/stat` is `T` or `t` (Linux), its BSD status `SSTOP` (macOS); `false` elsewhere.
#[cfg(not(target_os = "macos"))]
pub fn suspended(pid: u32) -> bool {
    // The state follows the command name, which is in parentheses and may hold anything.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('T' | 't')))
    })
}

/// Whether process `pid` is stopped (SIGSTOP, Ctrl-Z): its BSD status is `SSTOP`.
#[cfg(target_os = "macos")]
pub fn suspended(pid: u32) -> bool {
    let Ok(pid) = libc::c_int::try_from(pid) else { return false };
    // SAFETY: proc_bsdinfo is plain old data, for which all-zero bytes are a valid value.
    let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: `info` is valid and writable for `size` bytes for the duration of the call.
    let n =
        unsafe { libc::proc_pidinfo(pid, libc::PROC_PIDTBSDINFO, 0, (&raw mut info).cast(), size) };
    n == size && info.pbi_status == libc::SSTOP
}

/// The path of process `pid`'s executable (macOS: `proc_pidpath`).
#[cfg(target_os = "macos")]
fn executable_of(pid: u32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let pid = libc::c_int::try_from(pid).ok()?;
    let mut buf = vec![0u8; libc::PROC_PIDPATHINFO_MAXSIZE as usize];
    let len = u32::try_from(buf.len()).ok()?;
    // SAFETY: `buf` is valid and writable for `len` bytes for the duration of the call.
    let n = unsafe { libc::proc_pidpath(pid, buf.as_mut_ptr().cast(), len) };
    buf.truncate(usize::try_from(n).ok().filter(|&n| n > 0)?);
    Some(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

/// The pid holding an exclusive `flock` on `path` (open as `file`), from `/proc/locks`
/// (Linux; `None` elsewhere or when not found). Its lines read `1: FLOCK ADVISORY WRITE <pid>
/// <major>:<minor>:<inode> 0 EOF`. Only the inode is compared (the device numbers there
/// differ from `stat`'s on btrfs subvolumes and overlayfs); the holder is confirmed by an
/// open descriptor of it naming `path`.
#[cfg(target_os = "linux")]
pub(crate) fn lock_holder(file: &File, path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let inode = file.metadata().ok()?.ino();
    let path = std::fs::canonicalize(path).ok()?;
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    let holds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == path))
        })
    };
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, "WRITE", pid, id, ..] = fields.as_slice() else { return None };
        let pid: u32 = pid.parse().ok()?;
        let same_inode = id.rsplit(':').next()?.parse::<u64>().ok()? == inode;
        (same_inode && holds(pid)).then_some(pid)
    })
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lock_holder(_file: &File, _path: &Path) -> Option<u32> {
    None
}

/// This program's path: what `current_exe` says (on Linux, `/proc/self/exe`), else the path
/// it was started by (`argv[0]`, or where `PATH` finds that name), so that a bare chroot or
/// sandbox without `/proc` can still start the daemon.
pub fn this_program() -> io::Result<PathBuf> {
    std::env::current_exe().or_else(|e| {
        let argv0 = PathBuf::from(std::env::args_os().next().unwrap_or_default());
        let found = if argv0.components().count() > 1 {
            std::path::absolute(&argv0).ok().filter(|p| p.is_file())
        } else {
            argv0.to_str().filter(|name| !name.is_empty()).and_then(crate::gateway::which)
        };
        found.ok_or(e)
    })
}

/// Starts the daemon detached and waits for its readiness line. `args` follow `__bridge-run`.
pub fn spawn(dir: &Path, args: &[String]) -> Result<u32, String> {
    let exe = this_program().map_err(|e| format!("cannot find this program's path: {e}"))?;
    // The daemon's stdio is /dev/null: without it (a bare chroot) the spawn would fail with a
    // bare "No such file or directory", as if the program were missing.
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        return Err(format!(
            "cannot start the daemon: /dev/null cannot be opened ({e}); this system has no \
             usable /dev (a bare chroot?): mount one, or create it with \
             mknod -m 666 /dev/null c 1 3"
        ));
    }
    let (mut reader, writer) = io::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let writer_fd = writer.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("__bridge-run")
        .args(args)
        .arg("--ready-fd")
        .arg(READY_FD.to_string())
        .env(state::HOME_ENV, dir)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls run: setsid (leave the
    // terminal's session so closing it does not hang the daemon up), dup2 (give the pipe a
    // fixed number; dup2 clears close-on-exec on the copy) and umask.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::umask(0o077);
            if libc::dup2(writer_fd, READY_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the daemon: {e}"))?;
    drop(writer);
    // Read the readiness line on a helper thread so a wedged daemon cannot hang the CLI.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = reader.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let text = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(t) => t,
        Err(_) => {
            return Err(format!(
                "the daemon did not report ready within {} s; see {}",
                READY_TIMEOUT.as_secs(),
                state::bridge_log(dir).display()
            ));
        }
    };
    let text = text.trim();
    if let Some(pid) = text.strip_prefix("ok ") {
        return pid.trim().parse().map_err(|_| format!("the daemon said {text:?}"));
    }
    let _ = child.try_wait();
    if let Some(err) = text.strip_prefix("error: ") {
        return Err(err.to_owned());
    }
    Err(format!("the daemon exited during startup; see {}", state::bridge_log(dir).display()))
}

/// Closes the descriptors a detached daemon inherited beyond stdio and `keep` (the readiness
/// pipe): the files of whoever started `hermeschat-pair` (a terminal's, a tool's) must not
/// stay open for months, nor pass on to the gateway the daemon starts. Runs first thing in
/// the daemon, before it has a thread or a file of its own.
pub fn close_inherited_fds(keep: Option<i32>) {
    let listing = if cfg!(target_os = "linux") { "/proc/self/fd" } else { "/dev/fd" };
    let Ok(entries) = std::fs::read_dir(listing) else { return };
    // Collected first: the listing's own descriptor is closed when `entries` is dropped.
    let fds: Vec<i32> =
        entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for fd in fds.into_iter().filter(|&fd| fd > 2 && Some(fd) != keep) {
        // SAFETY: nothing in this process owns a descriptor above stdio yet (see above), so
        // none is closed under an owner; fcntl skips the listing's own, already closed.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) >= 0 {
                libc::close(fd);
            }
        }
    }
}

/// The daemon's end of the readiness pipe.
pub struct Readiness(Option<File>);

impl Readiness {
    /// Takes the descriptor named by `--ready-fd`, if it is open.
    pub fn from_fd(fd: i32) -> Readiness {
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Readiness(None);
        }
        // SAFETY: the descriptor is open (checked above) and was handed to this process by
        // `spawn` for this purpose alone; nothing else owns or closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Readiness(Some(File::from(owned)))
    }

    /// No readiness pipe (foreground or service mode).
    pub fn none() -> Readiness {
        Readiness(None)
    }

    /// Reports success.
    pub fn ok(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "ok {}", std::process::id());
        }
    }

    /// Reports a startup failure.
    pub fn error(&mut self, message: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "error: {message}");
        }
    }
}

/// What `--stop` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// No daemon was running.
    NotRunning,
    /// The daemon exited after SIGTERM.
    Terminated(u32),
    /// It had to be killed.
    Killed(u32),
}

/// Stops the daemon: SIGTERM, wait for the lock to be released, SIGKILL after `grace`.
pub fn stop(dir: &Path, grace: Duration) -> Result<Stopped, String> {
    // A stale pid file stays: it is harmless, and unlinking it here could hide a daemon that
    // took its lock since we looked.
    let Some(pid) = running(dir) else {
        return Ok(Stopped::NotRunning);
    };
    if pid == 0 {
        return Err(format!(
            "a bridge daemon holds {} but it names no pid (it is starting, or the file was \
             damaged): try again in a second; if this persists, find the daemon with: fuser {} \
             (or lsof), and stop it with kill <pid>",
            state::pid_file(dir).display(),
            state::pid_file(dir).display()
        ));
    }
    // In the instant after a new daemon takes the lock, the file still names the one that
    // died, a pid the system may have given to anything since.
    if !same_program(pid) {
        return Err(format!(
            "bridge.pid names pid {pid}, which runs another program than this one: not \
             signalling it. A daemon may be starting: try again in a second (if pid {pid} is a \
             bridge daemon run from a renamed binary, stop it by hand)"
        ));
    }
    let signal = |sig| {
        // SAFETY: kill only sends a signal; the pid comes from the lock holder's pid file.
        unsafe { libc::kill(pid as libc::pid_t, sig) }
    };
    if signal(libc::SIGTERM) != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(format!("cannot signal the daemon (pid {pid}): {e}"));
        }
    }
    // A suspended daemon (SIGSTOP, Ctrl-Z) acts on the SIGTERM only once resumed: without
    // this it would be killed after `grace`, its sockets and files left as they were.
    signal(libc::SIGCONT);
    // Gone once `pid` no longer holds the lock: another daemon (one a concurrent command
    // started) may hold it by then, which is not this one failing to exit.
    let released = || running(dir) != Some(pid);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if released() {
            return Ok(Stopped::Terminated(pid));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    // Checked again right before: a pid that exited meanwhile may be another program's now.
    if released() || !same_program(pid) {
        return Ok(Stopped::Terminated(pid));
    }
    signal(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if released() {
            return Ok(Stopped::Killed(pid));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!("the daemon (pid {pid}) does not exit; kill it by hand"))
}

/// False when `pid` is known to run another program than a bridge daemon (Linux: neither the
/// command name nor the executable is this program's, and its arguments are not a bridge's:
/// a CLI run through a renamed link still stops its daemon); true when it cannot be told.
#[cfg(not(target_os = "macos"))]
fn same_program(pid: u32) -> bool {
    let proc = |what: &str| format!("/proc/{pid}/{what}");
    let Ok(comm) = std::fs::read_to_string(proc("comm")) else { return true };
    if std::fs::read_to_string("/proc/self/comm").is_ok_and(|ours| ours == comm) {
        return true;
    }
    let exe = |path: String| std::fs::read_link(path).ok();
    if exe(proc("exe")).is_some_and(|theirs| Some(theirs) == exe("/proc/self/exe".into())) {
        return true;
    }
    let args = std::fs::read(proc("cmdline")).unwrap_or_default();
    args.split(|&b| b == 0).any(|a| a == b"__bridge-run" || a == b"--foreground")
}

/// False when `pid` is known to run another program than a bridge daemon (macOS: its
/// executable has neither this program's path nor its file name, as Linux compares the command
/// name); true when it cannot be told.
#[cfg(target_os = "macos")]
fn same_program(pid: u32) -> bool {
    let (Some(theirs), Some(ours)) = (executable_of(pid), executable_of(std::process::id())) else {
        return true;
    };
    theirs == ours || theirs.file_name() == ours.file_name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_file_replaced_under_a_process_is_told() {
        let dir = std::env::temp_dir().join(format!("hc-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("sleeper");
        std::fs::copy("/bin/sleep", &program).unwrap();
        let stamp = ExeStamp::of(&program).unwrap();
        let mut child = Command::new(&program).arg("30").spawn().unwrap();
        assert!(!runs_replaced_program(child.id(), Some(&stamp)));
        #[cfg(target_os = "linux")]
        assert!(!runs_replaced_program(child.id(), None));
        // An installer's replacement: a new file renamed over the old one.
        let fresh = dir.join("sleeper.new");
        std::fs::copy("/bin/sleep", &fresh).unwrap();
        std::fs::rename(&fresh, &program).unwrap();
        assert!(runs_replaced_program(child.id(), Some(&stamp)));
        // A daemon older than the stamp: Linux names the old file deleted.
        #[cfg(target_os = "linux")]
        assert!(runs_replaced_program(child.id(), None));
        // Removed altogether (uninstalled).
        std::fs::remove_file(&program).unwrap();
        assert!(runs_replaced_program(child.id(), Some(&stamp)));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stop_never_signals_a_process_that_is_not_a_bridge() {
        if std::fs::read_to_string("/proc/self/comm").is_err() {
            eprintln!("SKIPPED: no /proc here, so no process can be told apart");
            return;
        }
        let dir = std::env::temp_dir().join(format!("hcp-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        state::ensure_dir(&dir).unwrap();
        /// Kills the stand-in process even when an assertion fails.
        struct Reap(std::process::Child);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut other = Reap(Command::new("sleep").arg("30").spawn().unwrap());
        // The lock is held (as by a daemon that just took it) while the file still names
        // another process (as the one that died, its pid now reused).
        let lock = PidLock::acquire(&dir).unwrap();
        std::fs::write(state::pid_file(&dir), format!("{}\n", other.0.id())).unwrap();
        let refused = stop(&dir, Duration::from_millis(100)).unwrap_err();
        assert!(refused.contains("runs another program"), "{refused}");
        assert!(other.0.try_wait().unwrap().is_none(), "the other process was signalled");
        drop(other);
        lock.release();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_is_exclusive_and_stale_files_are_ignored() {
        let dir = std::env::temp_dir().join(format!("hcp-daemon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        state::ensure_dir(&dir).unwrap();
        // A stale pid file with garbage: nobody holds the lock.
        std::fs::write(state::pid_file(&dir), "99999999\n").unwrap();
        assert_eq!(running(&dir), None);
        let lock = PidLock::acquire(&dir).unwrap();
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts just as another process would.
        assert_eq!(running(&dir), Some(std::process::id()));
        assert!(matches!(PidLock::acquire(&dir), Err(LockError::Held(Some(_)))));
        lock.release();
        assert_eq!(running(&dir), None);
        assert_eq!(stop(&dir, Duration::from_millis(10)).unwrap(), Stopped::NotRunning);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn probes_at_once_never_take_a_stale_pid_for_a_daemon() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = std::env::temp_dir().join(format!("hcp-probes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        state::ensure_dir(&dir).unwrap();
        // Four commands looking at once, as `--stop` and `--status` typed together do.
        let probe = |stop: &Arc<AtomicBool>| {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0;
                while !stop.load(Ordering::Relaxed) {
                    seen += usize::from(running(&dir).is_some());
                }
                seen
            })
        };
        // A stale file naming a live process that is not a daemon: this test itself.
        std::fs::write(state::pid_file(&dir), format!("{}\n", std::process::id())).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let probes: Vec<_> = (0..4).map(|_| probe(&stop)).collect();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let seen: usize = probes.into_iter().map(|p| p.join().unwrap()).sum();
        assert_eq!(seen, 0, "a probe took another probe for a daemon and read the stale pid");
        // A daemon starting meanwhile still gets the lock: probes hold it only for an instant.
        let stop = Arc::new(AtomicBool::new(false));
        let probes: Vec<_> = (0..4).map(|_| probe(&stop)).collect();
        for _ in 0..200 {
            PidLock::acquire(&dir).expect("a probe kept a daemon from starting").release();
        }
        stop.store(true, Ordering::Relaxed);
        probes.into_iter().for_each(|p| drop(p.join()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
