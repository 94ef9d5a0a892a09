//! Allocator policy for the long-running roles (relay, daemon): fast while large frames flow,
//! near the live data when they stop.
//!
//! glibc gives each busy thread its own arena and keeps freed blocks there, and after one large
//! free it raises its mmap threshold so later large blocks come from the heap and stay
//! resident: after one 12 MiB upload the daemon's worker pool held ~150 MiB for good, and the
//! relay ~32 MiB of heap. So [`limit_allocator_retention`] fixes two arenas and a 512 KiB mmap
//! threshold: a 12 MiB frame is mapped and goes back to the system on free, while the blocks
//! of a download or a streamed upload (frames of up to 350 KiB, tungstenite's read buffers)
//! are reused from the heap instead of being mapped, zero-filled and faulted in page by page
//! for every frame (half of the relay's CPU per download before stop 16). What those leave
//! free is handed back by `malloc_trim` once no large frame has moved for
//! [`TRIM_WHEN_QUIET`] ([`note_large_transfer`]). musl's allocator already returns large
//! blocks and has no such knobs.

use std::time::Duration;

/// How long after the last large frame the free heap is handed back.
pub const TRIM_WHEN_QUIET: Duration = Duration::from_secs(2);

/// Sets the allocator policy; both binaries call it first thing in their server role, before
/// they start threads. Starts the thread that trims the heap after large transfers.
pub fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::configure();
}

/// Records that a large frame (read or written) just moved, so the heap is trimmed once they
/// stop. Cheap: a lock and, after a quiet spell, one wake-up.
pub fn note_large_transfer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::note();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::Instant;

    use super::TRIM_WHEN_QUIET;

    /// The time of the last large frame since the last trim, and its wake-up.
    struct Pending {
        last: Mutex<Option<Instant>>,
        woken: Condvar,
    }

    /// Set once the trim thread runs; until then nothing is noted.
    static PENDING: OnceLock<Pending> = OnceLock::new();

    pub(super) fn configure() {
        // SAFETY: mallopt only adjusts allocator tunables, and runs before other threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 10);
            // Keep up to 1 MiB free at the top of each heap between frames; the idle trim
            // below returns it and the free blocks inside the heap.
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
        }
        if PENDING.get().is_some() {
            return;
        }
        let pending =
            PENDING.get_or_init(|| Pending { last: Mutex::new(None), woken: Condvar::new() });
        let started = std::thread::Builder::new().name("memory-trim".into()).spawn(move || {
            trim_loop(pending);
        });
        if started.is_err() {
            // Without the thread, keep freed memory from piling up as before stop 16.
            // SAFETY: as above; a tunable, set from this thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
            }
        }
    }

    pub(super) fn note() {
        let Some(pending) = PENDING.get() else { return };
        let mut last = pending.last.lock().unwrap_or_else(|p| p.into_inner());
        let first = last.is_none();
        *last = Some(Instant::now());
        drop(last);
        if first {
            pending.woken.notify_one();
        }
    }

    /// Waits (without polling) for a large frame, then for a quiet spell after the last one,
    /// then trims.
    fn trim_loop(pending: &Pending) {
        let mut last = pending.last.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let Some(at) = *last else {
                last = pending.woken.wait(last).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let due = at + TRIM_WHEN_QUIET;
            let now = Instant::now();
            if now < due {
                last = pending
                    .woken
                    .wait_timeout(last, due - now)
                    .map_or_else(|p| p.into_inner().0, |r| r.0);
                continue;
            }
            *last = None;
            drop(last);
            // SAFETY: malloc_trim only releases free memory of the allocator's own heaps.
            unsafe {
                libc::malloc_trim(0);
            }
            last = pending.last.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
}
