//! What the CLI may do on the terminal it runs in: colours, its size, and the one-line
//! progress indicator on stderr ([`Spinner`]).
//!
//! Escape sequences go only where a terminal interprets them: not into a pipe or file, not
//! with `NO_COLOR`, and not to a `TERM=dumb` terminal (Emacs' shell, some IDE consoles), which
//! shows them as text.

use std::io::{IsTerminal, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// A [`Spinner`] frame is on the screen: what [`erase_progress`] erases when the command is
/// interrupted while it waits.
static PROGRESS_DRAWN: AtomicBool = AtomicBool::new(false);

/// Whether `TERM` says the terminal interprets no escape sequences (`dumb`), or says nothing.
fn dumb() -> bool {
    std::env::var_os("TERM").is_none_or(|t| t.is_empty() || t == "dumb")
}

/// Colours on stdout: a terminal that interprets escapes, and no `NO_COLOR` (which, as
/// no-color.org has it, counts only when it is not empty).
pub fn colour_on_stdout() -> bool {
    std::io::stdout().is_terminal()
        && !dumb()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Columns and rows of the terminal on `fd`; `None` when `fd` is not a terminal or the
/// terminal does not know its size.
pub fn size(fd: RawFd) -> Option<(usize, usize)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given, which outlives the
    // call; on failure (not a terminal) it writes nothing.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some((usize::from(size.ws_col), usize::from(size.ws_row)))
}

/// Whether this process may draw on the terminal on `fd`: it is in the terminal's foreground
/// process group. A pairing put in the background (Ctrl-Z, `bg`) must not draw over the shell's
/// prompt. A terminal that is not this process's controlling one (it cannot tell) counts as
/// foreground.
fn in_foreground(fd: RawFd) -> bool {
    // SAFETY: tcgetpgrp and getpgrp only read this process's and the terminal's state.
    let (terminal, ours) = unsafe { (libc::tcgetpgrp(fd), libc::getpgrp()) };
    terminal < 0 || terminal == ours
}

/// A one-line progress indicator on stderr, drawn only on a terminal that interprets escapes,
/// while this process is in its foreground, and never wider than the terminal is now: a line
/// that wraps cannot be redrawn with `\r`, so each frame would scroll up a new line.
pub struct Spinner {
    /// Drawing is allowed at all (stderr is such a terminal and the caller is not quiet).
    enabled: bool,
    /// A frame is on the screen, to be erased.
    drawn: bool,
    /// Frames drawn so far.
    frame: usize,
}

impl Spinner {
    /// Glyphs drawn in turn before the text.
    const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

    /// A spinner that draws nothing when `quiet` or when stderr is no terminal for it.
    pub fn new(quiet: bool) -> Spinner {
        let enabled = !quiet && std::io::stderr().is_terminal() && !dumb();
        Spinner { enabled, drawn: false, frame: 0 }
    }

    /// Draws the next frame followed by `text`, cut to one column less than the terminal is
    /// wide (so the cursor never reaches the last column, where terminals wrap).
    pub fn tick(&mut self, text: &str) {
        if !self.enabled {
            return;
        }
        if !in_foreground(libc::STDERR_FILENO) {
            // The shell has moved on to a new line (Ctrl-Z): nothing of ours to erase there.
            self.drawn = false;
            PROGRESS_DRAWN.store(false, Ordering::SeqCst);
            return;
        }
        let columns = size(libc::STDERR_FILENO).map_or(80, |(columns, _)| columns);
        let glyph = Self::FRAMES[self.frame % Self::FRAMES.len()];
        let line: String =
            format!("{glyph} {text}").chars().take(columns.saturating_sub(1)).collect();
        // `\x1b[K` after the text: a shorter frame (the terminal got narrower) leaves nothing.
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
        self.drawn = true;
        PROGRESS_DRAWN.store(true, Ordering::SeqCst);
        self.frame += 1;
    }

    /// Erases the frame on the screen, if any, leaving the cursor at the start of its line.
    pub fn clear(&mut self) {
        if self.drawn {
            erase_progress();
        }
        self.drawn = false;
    }
}

/// Erases the spinner's frame on the screen, if any (and this process is in the terminal's
/// foreground), leaving the cursor at the start of its line; says whether it did. Callable
/// from any thread.
pub fn erase_progress() -> bool {
    let erase = PROGRESS_DRAWN.swap(false, Ordering::SeqCst) && in_foreground(libc::STDERR_FILENO);
    if erase {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
    erase
}

impl Drop for Spinner {
    /// An early return (an error) leaves no half-drawn line before its message.
    fn drop(&mut self) {
        self.clear();
    }
}
