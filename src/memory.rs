//! Allocator policy for the long-running roles (relay, daemon): fast while large frames flow,
//! near the live data once they stop.
//!
//! glibc gives each busy thread its own arena and keeps freed blocks there, and after one large
//! free it raises its mmap threshold so later large blocks come from the heap and stay
//! resident: after one 12 MiB upload the daemon's worker pool held ~150 MiB for good, and the
//! relay ~32 MiB of heap. So [`limit_allocator_retention`] fixes two arenas and a 512 KiB mmap
//! threshold: a 12 MiB frame is mapped and goes back to the system on free, while the blocks
//! of a download or a streamed upload (frames of up to 350 KiB, each read into its own buffer)
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
//! musl has no such knobs: it maps every block over 128 KiB afresh and unmaps it on free, so
//! the static relay took about 2,400 page faults per 12 MiB download. The static build's global
//! allocator is therefore a [`BlockCache`] over musl's: up to 4 MiB of freed blocks of
//! 128 KiB–1 MiB are kept for the next allocation of the same rounded size, and handed back on
//! the same idle trim. Elsewhere (macOS) both functions do nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::time::Duration;

/// How long after the last large frame the free heap is handed back.
pub const TRIM_WHEN_QUIET: Duration = Duration::from_secs(2);

/// Sets the allocator policy and starts the thread that trims the heap after large transfers.
/// Call it first thing in a server role, before any other thread starts (glibc's `mallopt`
/// must not race allocations on other threads). Later calls do nothing.
pub fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::configure();
    #[cfg(all(target_os = "linux", target_env = "musl"))]
    if trim::start(|| ALLOCATOR.drain()) {
        ALLOCATOR.keep_blocks();
    }
}

/// Records that a frame of 64 KiB or more was just queued, written or read, so the heap is
/// trimmed once they stop. Cheap: an uncontended lock and, after a quiet spell, one wake-up.
/// Nothing without [`limit_allocator_retention`].
pub fn note_large_transfer() {
    #[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
    trim::note();
}

/// The static (musl) build's global allocator.
#[cfg(all(target_os = "linux", target_env = "musl"))]
#[global_allocator]
static ALLOCATOR: BlockCache = BlockCache::new();

/// Smallest block a [`BlockCache`] keeps: musl maps blocks from about this size up.
pub const CACHED_MIN: usize = 128 << 10;
/// Largest block a [`BlockCache`] keeps: a chunk frame is 350 KiB; a 16 MiB frame is rare and
/// better mapped and unmapped.
pub const CACHED_MAX: usize = 1 << 20;
/// Cached sizes are rounded up to a multiple of this, so that the blocks of frames of nearly
/// the same size fit one another.
pub const CACHED_STEP: usize = 64 << 10;
/// Blocks a [`BlockCache`] keeps at most.
pub const CACHED_SLOTS: usize = 8;
/// Bytes a [`BlockCache`] keeps at most.
pub const CACHED_BYTES: usize = 4 << 20;
/// The alignment of cached blocks: what `malloc` gives on 64-bit targets.
pub const CACHED_ALIGN: usize = 16;

/// A global allocator over the system's that keeps a few freed large blocks for reuse.
///
/// A request of [`CACHED_MIN`] to [`CACHED_MAX`] bytes (alignment at most 16) is served as a
/// block of its size rounded up to [`CACHED_STEP`] (its class): a kept block of that class if
/// there is one, else a new one from the system allocator. Freeing such a block keeps it if
/// fewer than [`CACHED_SLOTS`] blocks are kept, the kept bytes with it stay within
/// [`CACHED_BYTES`], and the trim thread runs; keeping it restarts the trim clock, so
/// [`BlockCache::drain`] empties the cache after the next quiet spell and nothing stays kept
/// once large frames stop. Otherwise it goes back to the system. Every other request goes to
/// the system allocator unchanged. Whether a block is cached depends only on its layout, which
/// the caller passes unchanged to `dealloc`, so a block always returns to where it came from.
///
/// A `realloc` that changes class, or leaves the cached sizes, allocates, copies and frees
/// (musl would move a mapped block with `mremap`): cheap for the frames it is for (350 KiB),
/// a copy per doubling for a Vec growing past 1 MiB.
///
/// Its lock is a `std::sync::Mutex`, which allocates nothing on Linux (a futex): that is what
/// makes it usable as the global allocator there, the only place it is registered.
pub struct BlockCache {
    kept: Mutex<Kept>,
}

/// The kept blocks: `(block, class)`, at most [`CACHED_SLOTS`].
struct Kept {
    blocks: [(Block, usize); CACHED_SLOTS],
    len: usize,
    bytes: usize,
    /// Whether blocks are kept at all: only once someone drains them.
    keeping: bool,
}

/// A free block owned by the cache.
#[derive(Clone, Copy)]
struct Block(*mut u8);

// SAFETY: a kept block is free memory owned by the cache alone (no reference to it exists once
// `dealloc` was called), and the system allocator may free or hand out a block on any thread.
unsafe impl Send for Block {}

impl BlockCache {
    /// An empty cache that keeps nothing until [`BlockCache::keep_blocks`].
    pub const fn new() -> BlockCache {
        let empty = (Block(std::ptr::null_mut()), 0);
        BlockCache {
            kept: Mutex::new(Kept {
                blocks: [empty; CACHED_SLOTS],
                len: 0,
                bytes: 0,
                keeping: false,
            }),
        }
    }

    /// Starts keeping freed blocks; whoever calls this drains them when quiet.
    pub fn keep_blocks(&self) {
        self.lock().keeping = true;
    }

    /// Hands every kept block back to the system allocator.
    pub fn drain(&self) {
        let (blocks, len) = {
            let mut kept = self.lock();
            let taken = (kept.blocks, kept.len);
            kept.len = 0;
            kept.bytes = 0;
            taken
        };
        for &(Block(ptr), class) in &blocks[..len] {
            // SAFETY: each kept block came from `System.alloc` or `System.alloc_zeroed` with
            // this layout (see `alloc`) and is owned by the cache alone; it was just removed
            // from the list, so it is freed once.
            unsafe { System.dealloc(ptr, class_layout(class)) };
        }
    }

    /// How many blocks are kept (for tests).
    pub fn kept_blocks(&self) -> usize {
        self.lock().len
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Nothing panics while the lock is held.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kept block of `class`, taken out of the cache.
    fn take(&self, class: usize) -> Option<*mut u8> {
        let mut kept = self.lock();
        let len = kept.len;
        let at = kept.blocks[..len].iter().position(|&(_, c)| c == class)?;
        let (Block(ptr), _) = kept.blocks[at];
        kept.blocks[at] = kept.blocks[len - 1];
        kept.len -= 1;
        kept.bytes -= class;
        Some(ptr)
    }

    /// Keeps `ptr` (a free block of `class`) if there is room; `false` if the caller must free
    /// it.
    fn keep(&self, ptr: *mut u8, class: usize) -> bool {
        let mut kept = self.lock();
        if !kept.keeping || kept.len == CACHED_SLOTS || kept.bytes + class > CACHED_BYTES {
            return false;
        }
        let len = kept.len;
        kept.blocks[len] = (Block(ptr), class);
        kept.len += 1;
        kept.bytes += class;
        drop(kept);
        // Whatever freed it, a kept block is handed back after the next quiet spell. (No
        // allocation happens in here: a lock, the clock and a wake-up.)
        note_large_transfer();
        true
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache::new()
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        self.drain();
    }
}

/// The class of a request the cache serves: its size rounded up to [`CACHED_STEP`].
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    let cached = (CACHED_MIN..=CACHED_MAX).contains(&size) && layout.align() <= CACHED_ALIGN;
    cached.then(|| size.next_multiple_of(CACHED_STEP))
}

/// The layout a block of `class` is allocated and freed with.
fn class_layout(class: usize) -> Layout {
    debug_assert!(class <= CACHED_MAX && class.is_multiple_of(CACHED_STEP));
    // SAFETY: CACHED_ALIGN is a power of two and `class` (at most CACHED_MAX, a multiple of
    // it) does not overflow `isize` when rounded up to it.
    unsafe { Layout::from_size_align_unchecked(class, CACHED_ALIGN) }
}

// SAFETY: every block handed out is either the system allocator's answer to the caller's own
// layout, or a block of at least the caller's size and alignment (a class is the size rounded
// up; CACHED_ALIGN is at least the requested alignment) that no one else holds: a fresh one, or
// one taken out of the kept list under its lock. A block is freed or kept according to the
// layout the caller gives back, which `GlobalAlloc` requires to be the one it was allocated
// with (or `realloc`'s new size), so it goes back to the allocator it came from with the layout
// it was allocated with.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            // SAFETY: the caller's layout, passed on (non-zero size, as `alloc` requires).
            None => unsafe { System.alloc(layout) },
            Some(class) => match self.take(class) {
                Some(ptr) => ptr,
                // SAFETY: a non-zero size and a power-of-two alignment.
                None => unsafe { System.alloc(class_layout(class)) },
            },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            // SAFETY: as in `alloc`.
            None => unsafe { System.alloc_zeroed(layout) },
            Some(class) => match self.take(class) {
                Some(ptr) => {
                    // SAFETY: the block holds at least `layout.size()` writable bytes and is
                    // ours alone.
                    unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
                    ptr
                }
                // SAFETY: as in `alloc`.
                None => unsafe { System.alloc_zeroed(class_layout(class)) },
            },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: `ptr` came from `System` with this layout (see the impl's comment).
            None => unsafe { System.dealloc(ptr, layout) },
            Some(class) => {
                if !self.keep(ptr, class) {
                    // SAFETY: a block of this class came from `System` with `class_layout`.
                    unsafe { System.dealloc(ptr, class_layout(class)) }
                }
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `realloc`'s contract: `new_size`, rounded up to the alignment, does not
        // overflow `isize`, and the alignment is the block's own (a power of two).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            // SAFETY: a system block, resized by the system (see `dealloc`).
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            // The block of this class already holds `new_size` bytes.
            (Some(old), Some(new)) if old == new => ptr,
            _ => {
                // SAFETY: `new_layout` has a non-zero size (realloc's contract); the old block
                // holds `layout.size()` initialised-or-not bytes we may read, the new one at
                // least `new_size`, and they are distinct blocks; the old one is then freed
                // with the layout it was allocated with.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

/// The trim thread both allocator policies share: it sleeps until a large frame is noted,
/// waits for a quiet spell after the last one, then runs the policy's trim.
#[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
mod trim {
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
    /// The thread is started once per process.
    static STARTED: Once = Once::new();

    /// Starts the trim thread, which runs `trim` after each quiet spell; `false` if the thread
    /// could not be started (then nothing is noted and `trim` never runs).
    pub(super) fn start(trim: fn()) -> bool {
        STARTED.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("memory-trim".into())
                .spawn(move || trim_loop(trim))
                .is_ok();
            TRIMMING.store(spawned, Ordering::Release);
        });
        TRIMMING.load(Ordering::Acquire)
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
    fn trim_loop(trim: fn()) {
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
            trim();
            last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::sync::Once;

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
            if !super::trim::start(trim) {
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

    /// Hands the heaps' free memory back to the system.
    fn trim() {
        // SAFETY: malloc_trim only releases free memory of the allocator's own heaps; it is
        // thread-safe (it takes each arena's lock).
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 1).unwrap()
    }

    #[test]
    fn large_blocks_are_kept_and_reused_by_class_and_small_ones_pass_through() {
        let cache = BlockCache::new();
        // SAFETY (whole test): every block is written within its size and freed once with
        // the layout (or realloc size) it was allocated with.
        unsafe {
            // Nothing is kept until someone will drain.
            let a = cache.alloc(layout(300 << 10));
            cache.dealloc(a, layout(300 << 10));
            assert_eq!(cache.kept_blocks(), 0);

            cache.keep_blocks();
            let a = cache.alloc(layout(300 << 10));
            a.write_bytes(7, 300 << 10);
            cache.dealloc(a, layout(300 << 10));
            assert_eq!(cache.kept_blocks(), 1);
            // Another size of the same 320 KiB class gets that block; another class does not.
            let other = cache.alloc(layout(400 << 10));
            assert_eq!(cache.kept_blocks(), 1);
            let b = cache.alloc(layout((300 << 10) + 100));
            assert_eq!((b, cache.kept_blocks()), (a, 0));
            b.add((300 << 10) + 99).write(1);
            cache.dealloc(other, layout(400 << 10));
            cache.dealloc(b, layout((300 << 10) + 100));
            assert_eq!(cache.kept_blocks(), 2);

            // A zeroed block from the cache is zeroed.
            let z = cache.alloc_zeroed(layout(300 << 10));
            assert_eq!(z, a);
            assert!(std::slice::from_raw_parts(z, 300 << 10).iter().all(|&x| x == 0));
            cache.dealloc(z, layout(300 << 10));

            // Small, huge and over-aligned requests are the system's.
            for l in
                [layout(100), layout(2 << 20), Layout::from_size_align(256 << 10, 4096).unwrap()]
            {
                let p = cache.alloc(l);
                assert!(!p.is_null() && (p as usize).is_multiple_of(l.align()));
                cache.dealloc(p, l);
            }
            assert_eq!(cache.kept_blocks(), 2);

            cache.drain();
            assert_eq!(cache.kept_blocks(), 0);
        }
    }

    /// The trim thread hands kept blocks back on its own after a quiet spell: keeping a block
    /// starts its clock. (This test starts the process's trim thread, for its own cache; no
    /// other test of this binary does.)
    #[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
    #[test]
    fn kept_blocks_are_handed_back_after_a_quiet_spell() {
        static CACHE: BlockCache = BlockCache::new();
        assert!(trim::start(|| CACHE.drain()));
        CACHE.keep_blocks();
        // SAFETY: as above.
        unsafe {
            let p = CACHE.alloc(layout(300 << 10));
            CACHE.dealloc(p, layout(300 << 10));
        }
        assert_eq!(CACHE.kept_blocks(), 1);
        let deadline = std::time::Instant::now() + TRIM_WHEN_QUIET * 5;
        while CACHE.kept_blocks() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(CACHE.kept_blocks(), 0, "still kept after {:?}", TRIM_WHEN_QUIET * 5);
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = BlockCache::new();
        cache.keep_blocks();
        // SAFETY: as above.
        unsafe {
            let blocks: Vec<_> = (0..12).map(|_| cache.alloc(layout(CACHED_MAX))).collect();
            for &p in &blocks {
                cache.dealloc(p, layout(CACHED_MAX));
            }
            // 4 MiB of 1 MiB blocks.
            assert_eq!(cache.kept_blocks(), CACHED_BYTES / CACHED_MAX);
            cache.drain();
            // At most CACHED_SLOTS blocks, however small.
            let small: Vec<_> = (0..12).map(|_| cache.alloc(layout(CACHED_MIN))).collect();
            for &p in &small {
                cache.dealloc(p, layout(CACHED_MIN));
            }
            assert_eq!(cache.kept_blocks(), CACHED_SLOTS);
            cache.drain();
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_every_kind_of_block() {
        let cache = BlockCache::new();
        cache.keep_blocks();
        let sizes = [64, 100 << 10, 130 << 10, 190 << 10, 300 << 10, 1 << 20, 3 << 20, 200];
        // SAFETY: as above; each step reads only the bytes written so far.
        unsafe {
            let mut p = cache.alloc(layout(10));
            let mut size = 10;
            for (i, &b) in b"0123456789".iter().enumerate() {
                p.add(i).write(b);
            }
            for &next in &sizes {
                p = cache.realloc(p, layout(size), next);
                assert!(!p.is_null());
                let kept = size.min(next).min(10);
                assert_eq!(std::slice::from_raw_parts(p, kept), &b"0123456789"[..kept], "{next}");
                p.add(next - 1).write(0xAA);
                size = next;
            }
            cache.dealloc(p, layout(size));
            cache.drain();
        }
    }
}
