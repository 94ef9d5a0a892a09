//! `--logs [--follow] [--lines N]`: the daemon, server and gateway logs (and the boot
//! service's), without the user hunting for paths.
//!
//! Each log's last N lines are printed under a `==> path <==` header, like `tail`. With
//! `--follow` new lines are printed as they are written until Ctrl-C; a log that is rotated
//! (renamed away and started anew) or truncated is followed into its new file.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::cli::{Args, Exit, fail, state_dir};
use crate::state;

/// Lines shown per log when `--lines` is not given.
pub const DEFAULT_LINES: usize = 30;

/// How often `--follow` looks for new lines.
const POLL: Duration = Duration::from_millis(200);

/// One log to show.
#[derive(Debug, Clone)]
pub struct Source {
    /// What it is (`daemon`, `server`, …).
    pub label: &'static str,
    /// Its path.
    pub path: PathBuf,
    /// Shown even when missing (the optional ones only when they exist).
    pub always: bool,
}

/// The logs of this installation.
pub fn sources(dir: &Path) -> Vec<Source> {
    let hermes_home = crate::gateway::hermes_home();
    let mut list = vec![
        Source { label: "daemon", path: state::bridge_log(dir), always: true },
        Source { label: "server", path: state::server_log(dir), always: true },
        Source { label: "gateway", path: state::gateway_log(dir), always: true },
    ];
    list.push(Source {
        label: "hermes gateway",
        path: hermes_home.join("logs/gateway.log"),
        always: false,
    });
    list.push(Source { label: "service", path: state::service_log(dir), always: false });
    list.push(Source {
        label: "service errors",
        path: state::service_error_log(dir),
        always: false,
    });
    list
}

/// Which of [`written_by_others`] (bit `i` for the `i`th) failed to trim already, and was
/// logged.
static TRIM_FAILED: AtomicU8 = AtomicU8::new(0);

/// The logs other processes write to, which the running bridge keeps within bounds: the
/// started gateway's output and the boot service's two logs. (`bridge.log` and `server.log`
/// rotate themselves; Hermes Agent's own log is not ours.) The boot service's stderr comes
/// first: it is the bridge's own log there, so the lines telling of the other trims land in it
/// after its own trim.
pub fn written_by_others(dir: &Path) -> [PathBuf; 3] {
    [state::service_error_log(dir), state::service_log(dir), state::gateway_log(dir)]
}

/// Trims each of [`written_by_others`] past [`state::RotatingLog::DEFAULT_MAX_BYTES`] in place,
/// keeping as many copies as `bridge.log` does ([`state::trim_appended_log`]); says so in the
/// bridge's log.
pub fn trim_written_by_others(dir: &Path) {
    use state::RotatingLog;
    for (i, path) in written_by_others(dir).into_iter().enumerate() {
        // A gateway wake-up reads gateway.log from an offset: not while one runs.
        let _quiet = if path == state::gateway_log(dir) {
            match state::FileLock::acquire_until(&state::gateway_lock(dir), Instant::now()) {
                Ok(Some(lock)) => Some(lock),
                _ => continue,
            }
        } else {
            None
        };
        let max = RotatingLog::DEFAULT_MAX_BYTES;
        match state::trim_appended_log(&path, max, RotatingLog::DEFAULT_KEEP) {
            Ok(false) => {}
            Ok(true) => crate::bridge::log(&format!(
                "{} passed {} MiB: its last {} MiB moved to {}.1",
                path.display(),
                max >> 20,
                max >> 20,
                path.display()
            )),
            // Said once per file and process: the next attempts (a minute apart) would only
            // repeat it.
            Err(e) if TRIM_FAILED.fetch_or(1 << i, Ordering::Relaxed) & (1 << i) == 0 => {
                crate::bridge::log(&format!("cannot trim {}: {e}", path.display()))
            }
            Err(_) => {}
        }
    }
}

/// The last `n` lines of `file` before offset `len` (at most the last 4 MiB are read).
pub fn tail(file: &mut File, n: usize, len: u64) -> io::Result<Vec<u8>> {
    const BLOCK: u64 = 64 << 10;
    const LIMIT: u64 = 4 << 20;
    if n == 0 || len == 0 {
        return Ok(Vec::new());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut start = len;
    loop {
        let step = BLOCK.min(start);
        start -= step;
        let mut block = vec![0u8; step as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&buf);
        buf = block;
        // A trailing newline ends the last line; it does not start another.
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let newlines = body.iter().filter(|&&b| b == b'\n').count();
        if newlines >= n || start == 0 || len - start >= LIMIT {
            let body_len = body.len();
            let mut seen = 0;
            let mut cut = 0;
            for i in (0..body_len).rev() {
                if buf[i] == b'\n' {
                    seen += 1;
                    if seen == n {
                        cut = i + 1;
                        break;
                    }
                }
            }
            return Ok(buf[cut..].to_vec());
        }
    }
}

/// Writes, turning a closed stdout (`| head`) into a quiet stop.
fn emit(out: &mut impl Write, bytes: &[u8]) -> bool {
    out.write_all(&defanged(bytes)).and_then(|()| out.flush()).is_ok()
}

/// `bytes` fit for a terminal: control characters other than newline and tab, C1 controls
/// (U+0080–U+009F, which terminals obey too) included, are written escaped (`\x1b`), except
/// colour sequences (`ESC [ digits;… m`), which a gateway's output may use. A log line can hold text others chose (a device name, a message a peer sent), and
/// `--logs` must not let it move the cursor, retitle the window or clear the screen.
fn defanged(bytes: &[u8]) -> Cow<'_, [u8]> {
    let harmless = |b: u8| (b >= b' ' && b != 0x7f && b != 0xc2) || b == b'\n' || b == b'\t';
    if bytes.iter().all(|&b| harmless(b)) {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0x1b {
            // ESC [ (digits or ;)* m: a colour.
            let params = bytes[i + 1..]
                .strip_prefix(b"[")
                .map(|rest| rest.iter().take_while(|c| c.is_ascii_digit() || **c == b';').count());
            if let Some(n) = params
                && bytes.get(i + 2 + n) == Some(&b'm')
            {
                out.extend_from_slice(&bytes[i..i + 3 + n]);
                i += 3 + n;
                continue;
            }
        }
        // U+0080..U+009F is C2 80..C2 9F in UTF-8.
        if b == 0xc2 && bytes.get(i + 1).is_some_and(|c| (0x80..=0x9f).contains(c)) {
            out.extend_from_slice(format!("\\u{{{:x}}}", bytes[i + 1]).as_bytes());
            i += 2;
            continue;
        }
        if harmless(b) || b == 0xc2 {
            out.push(b);
        } else {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn header(s: &Source, note: &str) -> String {
    format!("==> {} ({}){note} <==\n", s.path.display(), s.label)
}

/// Where the end of `bytes` may be the start of a sequence [`defanged`] judges whole (a
/// colour cut short, the first byte of a C1 control): `--logs -f` holds that back for the
/// next read rather than show it escaped by mistake.
fn incomplete_tail(bytes: &[u8]) -> usize {
    if bytes.last() == Some(&0xc2) {
        return bytes.len() - 1;
    }
    let from = bytes.len().saturating_sub(32);
    match bytes[from..].iter().rposition(|&b| b == 0x1b) {
        Some(at) => {
            let at = from + at;
            let rest = &bytes[at + 1..];
            let open = rest.is_empty()
                || (rest[0] == b'[' && rest[1..].iter().all(|c| c.is_ascii_digit() || *c == b';'));
            if open { at } else { bytes.len() }
        }
        None => bytes.len(),
    }
}

/// A followed log: where we are in which file.
struct Followed {
    source: Source,
    file: Option<File>,
    ino: u64,
    pos: u64,
    /// The end of the last read held back ([`incomplete_tail`]).
    carry: Vec<u8>,
}

impl Followed {
    fn open(source: Source, at_end: bool) -> Followed {
        let mut f = Followed { source, file: None, ino: 0, pos: 0, carry: Vec::new() };
        if let Ok(mut file) = File::open(&f.source.path)
            && let Ok(meta) = file.metadata()
        {
            f.ino = meta.ino();
            f.pos = if at_end { file.seek(SeekFrom::End(0)).unwrap_or(0) } else { 0 };
            f.file = Some(file);
        }
        f
    }

    /// New bytes since the last call, following rotation and truncation.
    fn poll(&mut self) -> Vec<u8> {
        let mut fresh = Vec::new();
        let current = std::fs::metadata(&self.source.path).ok();
        let replaced = match (&self.file, &current) {
            (Some(_), Some(m)) => m.ino() != self.ino,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if replaced {
            // Finish the old file (lines written just before the rotation), then switch.
            self.read_new(&mut fresh);
            let next = Followed::open(self.source.clone(), false);
            *self = next;
        } else if let (Some(file), Some(m)) = (&mut self.file, &current)
            && m.len() < self.pos
        {
            // Truncated in place: start over.
            self.pos = 0;
            let _ = file.seek(SeekFrom::Start(0));
        }
        self.read_new(&mut fresh);
        fresh
    }

    fn read_new(&mut self, into: &mut Vec<u8>) {
        let Some(file) = &mut self.file else { return };
        if file.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        if let Ok(n) = file.read_to_end(into) {
            self.pos += n as u64;
        }
    }
}

/// `--logs [--follow] [--lines N]`.
pub fn run(args: &Args) -> Result<(), Exit> {
    let dir = state_dir()?;
    let n = args.lines.unwrap_or(DEFAULT_LINES);
    // Every log is opened once, up front: the tail ends where following starts, so no line
    // written in between is lost or shown twice. Logs not written yet are followed too.
    let mut followed: Vec<Followed> =
        sources(&dir).into_iter().map(|s| Followed::open(s, true)).collect();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut last = None;
    for (i, f) in followed.iter_mut().enumerate() {
        let s = &f.source;
        if !s.always && f.file.is_none() {
            continue;
        }
        let sep = if last.is_none() { "" } else { "\n" };
        let mut text = match &mut f.file {
            Some(file) => match tail(file, n, f.pos) {
                Ok(t) => {
                    format!("{sep}{}", header(s, "")).into_bytes().into_iter().chain(t).collect()
                }
                Err(e) => format!("{sep}{}  cannot read it: {e}\n", header(s, "")).into_bytes(),
            },
            None => match File::open(&s.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    format!("{sep}{}  cannot open it: {e}\n", header(s, "")).into_bytes()
                }
                _ => format!("{sep}{}", header(s, ": not written yet")).into_bytes(),
            },
        };
        if !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        if !emit(&mut out, &text) {
            return Ok(());
        }
        last = Some(i);
    }
    if !args.follow {
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .map_err(|e| fail(format!("cannot install the Ctrl-C handler: {e}")))?;
    while !stop.load(Ordering::SeqCst) {
        for (i, f) in followed.iter_mut().enumerate() {
            let polled = f.poll();
            let grew = !polled.is_empty();
            let mut fresh = std::mem::take(&mut f.carry);
            fresh.extend(polled);
            // Held back for one read only: a log that goes quiet shows its end all the same.
            if grew {
                f.carry = fresh.split_off(incomplete_tail(&fresh));
            }
            if fresh.is_empty() {
                continue;
            }
            if last != Some(i) {
                let head = format!("\n{}", header(&f.source, ""));
                if !emit(&mut out, head.as_bytes()) {
                    return Ok(());
                }
                last = Some(i);
            }
            if !emit(&mut out, &fresh) {
                return Ok(());
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn control_sequences_are_shown_escaped_and_colours_kept() {
        let line = b"ok \x1b[32mgreen\x1b[0m \x1b]0;pwned\x07 \x1b[2J\tend\n";
        let shown = String::from_utf8(defanged(line).into_owned()).unwrap();
        assert_eq!(shown, "ok \x1b[32mgreen\x1b[0m \\x1b]0;pwned\\x07 \\x1b[2J\tend\n");
        assert!(matches!(defanged(b"plain\tline\n"), Cow::Borrowed(_)));
        // C1 controls (CSI, OSC, ST as UTF-8) are escaped; other text around them is kept.
        let c1 = "a\u{9b}2J\u{9d}0;pwned\u{9c}b é\n";
        let shown = String::from_utf8(defanged(c1.as_bytes()).into_owned()).unwrap();
        assert_eq!(shown, "a\\u{9b}2J\\u{9d}0;pwned\\u{9c}b é\n");
    }

    #[test]
    fn a_sequence_cut_by_a_read_is_held_for_the_next() {
        assert_eq!(incomplete_tail(b"ok \x1b[3"), 3);
        assert_eq!(incomplete_tail(b"ok \x1b"), 3);
        assert_eq!(incomplete_tail(b"ok \xc2"), 3);
        assert_eq!(incomplete_tail(b"ok \x1b[32mgreen"), 13);
        assert_eq!(incomplete_tail(b"ok \x1b]0;t"), 8);
        assert_eq!(incomplete_tail(b"plain"), 5);
    }

    use super::*;

    fn temp(name: &str, text: &str) -> (PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("hcp-logs-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("x.log");
        std::fs::write(&path, text).unwrap();
        let file = File::open(&path).unwrap();
        (path, file)
    }

    #[test]
    fn tail_takes_the_last_lines() {
        let (_, mut f) = temp("a", "1\n2\n3\n4\n");
        assert_eq!(tail(&mut f, 2, 8).unwrap(), b"3\n4\n");
        assert_eq!(tail(&mut f, 10, 8).unwrap(), b"1\n2\n3\n4\n");
        assert_eq!(tail(&mut f, 0, 8).unwrap(), b"");
        assert_eq!(tail(&mut f, 1, 6).unwrap(), b"3\n", "only up to the offset");
        let (_, mut f) = temp("b", "1\n2\nno newline");
        assert_eq!(tail(&mut f, 1, 14).unwrap(), b"no newline");
        let long: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
        let (_, mut f) = temp("c", &long);
        let len = long.len() as u64;
        assert_eq!(tail(&mut f, 2, len).unwrap(), b"line 49998\nline 49999\n");
    }

    #[test]
    fn follow_survives_rotation_and_truncation() {
        let (path, _) = temp("d", "old\n");
        let source = Source { label: "t", path: path.clone(), always: true };
        let mut f = Followed::open(source, true);
        assert!(f.poll().is_empty());
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"a\n").unwrap();
        assert_eq!(f.poll(), b"a\n");
        // Rotation: a last line lands in the old file, then a new file starts.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"b\n").unwrap();
        std::fs::rename(&path, path.with_extension("log.1")).unwrap();
        std::fs::write(&path, "c\n").unwrap();
        assert_eq!(f.poll(), b"b\nc\n");
        // Truncation in place.
        std::fs::write(&path, "").unwrap();
        assert!(f.poll().is_empty());
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"d\n").unwrap();
        assert_eq!(f.poll(), b"d\n");
    }
}
