//! Allocator policy for the long-running roles (relay, daemon): fast while large frames flow,
//! near the live data once they stop.
//!
//! glibc gives each busy thread its own arena and keeps freed blocks there, and after one large
//! free it raises its mmap threshold so later large blocks come from the heap and stay
//! resident: after one 12 MiB upload the daemon's worker pool held ~150 MiB for good, and the
//! relay ~32 MiB of heap. So [`limit_allocator_retention`] fixes two arenas and a 512 KiB mmap
//! threshold: a 12 MiB frame is mapped and goes back to the system on free, while the blocks
//! of a download or a streamed upload (frames of up to 350 KiB, tungstenite's read buffers)
//! are reused from the heap instead of being mapped, zero-filled and faulted in page by page
//! for every frame (half of the relay's CPU per download before stop 16). Up to 4 MiB free at
//! the top of a heap stays there while frames flow: with glibc's default of 1 MiB the relay's
//! heap shrank and grew back every few frames, 250–600 page faults per 12 MiB download, down
//! to 20–175 at 4 MiB (relay CPU per download 11.1–11.5 → 7.9–8.8 ms, stop 17). What those
//! leave free is handed back by `malloc_trim` once no frame of 64 KiB or more has been queued,
//! written or read for [`TRIM_WHEN_QUIET`] ([`note_large_transfer`]). The trim holds each
//! arena's lock while it runs, about 70 µs per MiB of free heap: a few milliseconds at most
//! for the heaps these processes keep, once, after a quiet spell.
//!
//! Only glibc on Linux has these knobs; elsewhere (musl, macOS) both functions do nothing, and
//! musl's allocator returns large blocks on its own.

use std::time::Duration;

/// How long after the last large frame the free heap is handed back.
pub const TRIM_WHEN_QUIET: Duration = Duration::from_secs(2);

/// Sets the allocator policy and starts the thread that trims the heap after large transfers.
/// Call it first thing in a server role, before any other thread starts (glibc's `mallopt`
/// must not race allocations on other threads). Later calls do nothing.
pub fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::configure();
}

/// Records that a frame of 64 KiB or more was just queued, written or read, so the heap is
/// trimmed once they stop. Cheap: an uncontended lock and, after a quiet spell, one wake-up.
/// Nothing without [`limit_allocator_retention`].
pub fn note_large_transfer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::note();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex, Once};
    use std::time::Instant;

    use super::TRIM_WHEN_QUIET;

    /// The time of the last large frame since the last trim (`None`: nothing to trim), and the
    /// trim thread's wake-up.
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    static WOKEN: Condvar = Condvar::new();
    /// Set once the trim thread runs; until then nothing is noted.
    static TRIMMING: AtomicBool = AtomicBool::new(false);
    /// The policy is set once per process.
    static CONFIGURED: Once = Once::new();

    pub(super) fn configure() {
        CONFIGURED.call_once(|| {
            // SAFETY: mallopt only adjusts allocator tunables; the caller runs this before
            // other threads start (see `limit_allocator_retention`), and `Once` runs it once.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 10);
                // Keep up to 4 MiB free at the top of each heap between frames (a few frames'
                // worth); the idle trim returns it and the free blocks inside the heap.
                libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
            }
            let started =
                std::thread::Builder::new().name("memory-trim".into()).spawn(trim_loop).is_ok();
            if started {
                TRIMMING.store(true, Ordering::Release);
            } else {
                // Without the thread nothing would hand frame-sized blocks back: map them, as
                // before stop 16.
                // SAFETY: as above; no thread of ours was started.
                unsafe {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
                }
            }
        });
    }

    pub(super) fn note() {
        if !TRIMMING.load(Ordering::Acquire) {
            return;
        }
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let first = last.is_none();
        *last = Some(Instant::now());
        drop(last);
        if first {
            WOKEN.notify_one();
        }
    }

    /// Waits (without polling) for a large frame, then for a quiet spell after the last one,
    /// then trims.
    fn trim_loop() {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let Some(at) = *last else {
                last = WOKEN.wait(last).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let due = at + TRIM_WHEN_QUIET;
            let now = Instant::now();
            if now < due {
                last = match WOKEN.wait_timeout(last, due - now) {
                    Ok((guard, _)) => guard,
                    Err(p) => p.into_inner().0,
                };
                continue;
            }
            *last = None;
            drop(last);
            // SAFETY: malloc_trim only releases free memory of the allocator's own heaps; it
            // is thread-safe (it takes each arena's lock).
            unsafe {
                libc::malloc_trim(0);
            }
            last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
}
