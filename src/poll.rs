//! Readiness polling for the reactor threads: the subset of the `polling` crate's API the crate
//! uses (level-triggered interest, a cross-thread notifier, a timeout per wait).
//!
//! On Linux this is a direct epoll with an eventfd notifier: one `epoll_wait` per wait, and one
//! `read` of the eventfd only after a notification. `polling` 3 re-arms a timerfd and its
//! notifier around every wait (five syscalls where one does), which was a visible share of the
//! per-request cost of the relay and the daemon. Elsewhere `polling` itself is used, behind the
//! same names.

use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(target_os = "linux"))]
pub use polling::{Event, Events, PollMode, Poller};

/// Raises the soft open-file limit (`ulimit -n`) to the hard one, as Go's runtime does for
/// servers, and returns the soft limit then in force (`None` when it cannot be read). macOS
/// starts programs with a soft limit of 256, which a busy bridge (backend connections hold two
/// descriptors each, LAN apps, uploads, logs) can reach; it reports an unlimited hard limit
/// but refuses a soft one above `OPEN_MAX` (10240), which is tried next.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let _ = ORIGINAL_SOFT_LIMIT.compare_exchange(
        NOT_RAISED,
        as_u64(lim.rlim_cur),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for want in [lim.rlim_max, lim.rlim_max.min(10_240)] {
        if lim.rlim_cur >= want {
            break;
        }
        let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one needs
        // no privilege, and failure leaves the limit as it was.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
            break;
        }
    }
    Some(as_u64(lim.rlim_cur))
}

/// An `rlim_t` as `u64`: it is `u32` on 32-bit Linux (armv7).
#[allow(clippy::useless_conversion, reason = "`rlim_t` is `u32` on 32-bit Linux (armv7)")]
fn as_u64(limit: libc::rlim_t) -> u64 {
    u64::from(limit)
}

/// The soft open-file limit before [`raise_open_file_limit`] first ran; `NOT_RAISED` until then.
static ORIGINAL_SOFT_LIMIT: AtomicU64 = AtomicU64::new(NOT_RAISED);

/// [`ORIGINAL_SOFT_LIMIT`] before the limit was raised.
const NOT_RAISED: u64 = u64::MAX;

/// Puts back the soft open-file limit this process started with, for a program it starts (the
/// Hermes gateway, `hermes gateway start`): the raised limit is for the bridge's own sockets,
/// and a child that still uses `select()` fails on descriptors above 1023. Meant for
/// `Command::pre_exec`: it only reads an atomic and calls `getrlimit`/`setrlimit`, which are
/// async-signal-safe, and allocates nothing. Does nothing when the limit was never raised.
pub fn restore_open_file_limit() {
    let original = ORIGINAL_SOFT_LIMIT.load(Ordering::Relaxed);
    if original == NOT_RAISED {
        return;
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let lowered = libc::rlimit { rlim_cur: (original as libc::rlim_t).min(lim.rlim_max), ..lim };
    // SAFETY: `lowered` is a valid rlimit; lowering the soft limit needs no privilege, and a
    // failure leaves the raised limit, which is harmless.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &lowered);
    }
}

#[cfg(target_os = "linux")]
pub use linux::{Event, Events, PollMode, Poller};

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// The epoll key of the notifier; callers' keys must differ (they are small slab indices).
    const NOTIFY_KEY: u64 = u64::MAX;

    /// Most events returned by one wait.
    const EVENTS_CAP: usize = 256;

    /// Interest in, or readiness of, one registered source.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Event {
        /// The caller's key for the source.
        pub key: usize,
        /// Readable (or closed / in error).
        pub readable: bool,
        /// Writable (or closed / in error).
        pub writable: bool,
    }

    impl Event {
        /// Interest in (or readiness for) both directions as given.
        pub fn new(key: usize, readable: bool, writable: bool) -> Event {
            Event { key, readable, writable }
        }

        /// Interest in reading only.
        pub fn readable(key: usize) -> Event {
            Event::new(key, true, false)
        }

        fn epoll_bits(self) -> u32 {
            let mut bits = 0;
            if self.readable {
                bits |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            }
            if self.writable {
                bits |= libc::EPOLLOUT as u32;
            }
            bits
        }
    }

    /// How events are reported. Only level-triggered interest is used here.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PollMode {
        /// Reported on every wait while the condition holds.
        Level,
    }

    /// Events returned by [`Poller::wait`].
    pub struct Events {
        list: Vec<libc::epoll_event>,
    }

    impl Default for Events {
        fn default() -> Self {
            Events::new()
        }
    }

    impl Events {
        /// Room for 256 events per wait.
        pub fn new() -> Events {
            Events { list: Vec::with_capacity(EVENTS_CAP) }
        }

        /// Forgets the events of the last wait.
        pub fn clear(&mut self) {
            self.list.clear();
        }

        /// Events of the last wait (the notifier's own event is never included).
        pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
            self.list.iter().filter(|e| e.u64 != NOTIFY_KEY).map(|e| {
                let bits = e.events;
                let closed = bits & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                Event {
                    key: e.u64 as usize,
                    readable: closed || bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0,
                    writable: closed || bits & libc::EPOLLOUT as u32 != 0,
                }
            })
        }
    }

    /// An epoll instance and its eventfd notifier. Share it behind an `Arc`: any thread may
    /// [`Poller::notify`] it, one thread waits.
    #[derive(Debug)]
    pub struct Poller {
        epoll: OwnedFd,
        notifier: OwnedFd,
        /// A notification is pending (set by `notify`, cleared by the wait that sees it), so
        /// a burst of notifications costs one eventfd write, as in `polling`.
        notified: AtomicBool,
    }

    /// The result of a libc call that returns -1 on error.
    fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
        if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
    }

    impl Poller {
        /// A new epoll instance with its notifier registered.
        pub fn new() -> io::Result<Poller> {
            // SAFETY: epoll_create1 and eventfd take no pointers; each returns a fresh
            // descriptor owned by nobody else (or -1, turned into an error before use), so
            // `OwnedFd` may take ownership of it.
            let epoll =
                unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
            // SAFETY: as above.
            let notifier = unsafe {
                OwnedFd::from_raw_fd(check(libc::eventfd(
                    0,
                    libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
                ))?)
            };
            let poller = Poller { epoll, notifier, notified: AtomicBool::new(false) };
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: NOTIFY_KEY };
            poller.ctl(libc::EPOLL_CTL_ADD, poller.notifier.as_raw_fd(), Some(&mut ev))?;
            Ok(poller)
        }

        fn ctl(
            &self,
            op: libc::c_int,
            fd: RawFd,
            ev: Option<&mut libc::epoll_event>,
        ) -> io::Result<()> {
            let ptr = ev.map_or(std::ptr::null_mut(), |e| e as *mut libc::epoll_event);
            // SAFETY: `self.epoll` is a live epoll descriptor owned by `self`; `ptr` is either
            // null (allowed for EPOLL_CTL_DEL) or points to a live `epoll_event` borrowed for
            // this call. A stale `fd` makes the kernel return an error, never memory unsafety.
            check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, ptr) }).map(|_| ())
        }

        /// Registers `source` with the interest in `ev`.
        ///
        /// # Safety
        /// The same contract as `polling::Poller::add_with_mode`: `source` must be deleted
        /// before it is closed, or a reused descriptor number would report its events under
        /// the old key. Nothing here touches memory through it.
        pub unsafe fn add_with_mode(
            &self,
            source: &impl AsFd,
            ev: Event,
            _mode: PollMode,
        ) -> io::Result<()> {
            let mut e = libc::epoll_event { events: ev.epoll_bits(), u64: ev.key as u64 };
            self.ctl(libc::EPOLL_CTL_ADD, source.as_fd().as_raw_fd(), Some(&mut e))
        }

        /// Changes the interest of a registered source.
        pub fn modify_with_mode(
            &self,
            source: impl AsFd,
            ev: Event,
            _mode: PollMode,
        ) -> io::Result<()> {
            let mut e = libc::epoll_event { events: ev.epoll_bits(), u64: ev.key as u64 };
            self.ctl(libc::EPOLL_CTL_MOD, source.as_fd().as_raw_fd(), Some(&mut e))
        }

        /// Unregisters a source.
        pub fn delete(&self, source: impl AsFd) -> io::Result<()> {
            self.ctl(libc::EPOLL_CTL_DEL, source.as_fd().as_raw_fd(), None)
        }

        /// Waits for events, a notification or the timeout (`None`: no timeout). Events of
        /// this wait are appended to `events`. An interrupted wait returns `Interrupted`.
        pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
            let ms = match timeout {
                None => -1,
                // Rounded up, so a wait never ends before its deadline (and spins on it).
                Some(t) => {
                    let ms = t.as_nanos().div_ceil(1_000_000);
                    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
                }
            };
            let list = &mut events.list;
            let start = list.len();
            let room = list.capacity() - start;
            if room == 0 {
                return Ok(0);
            }
            // SAFETY: the kernel writes at most `room` events into the spare capacity of
            // `list`, which is allocated for them (`epoll_event` is plain data); `set_len`
            // then covers exactly the `n` events written.
            let n = unsafe {
                let spare = list.as_mut_ptr().add(start);
                let n = check(libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    spare,
                    libc::c_int::try_from(room).unwrap_or(libc::c_int::MAX),
                    ms,
                ))? as usize;
                list.set_len(start + n);
                n
            };
            if list[start..].iter().any(|e| e.u64 == NOTIFY_KEY) {
                let mut buf = [0u8; 8];
                // SAFETY: reads at most 8 bytes into the live local `buf`; the eventfd is
                // non-blocking, so this never waits.
                let _ = unsafe {
                    libc::read(self.notifier.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                // Cleared after the drain: a notify between the two finds the flag still set
                // and writes nothing, but this thread is awake and about to look anyway.
                self.notified.store(false, Ordering::SeqCst);
            }
            Ok(n)
        }

        /// Wakes the thread in [`Poller::wait`] (or makes its next wait return at once).
        pub fn notify(&self) -> io::Result<()> {
            if self.notified.swap(true, Ordering::SeqCst) {
                return Ok(());
            }
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes the 8 bytes of the live local `one` to the eventfd owned by
            // `self`; an eventfd write of 8 bytes is the documented way to add to its counter.
            let r =
                unsafe { libc::write(self.notifier.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if r < 0 {
                self.notified.store(false, Ordering::SeqCst);
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A connected loopback pair (also used by other modules' tests).
    pub(crate) fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn keys(p: &Poller, timeout: Duration) -> Vec<(usize, bool, bool)> {
        let mut events = Events::new();
        p.wait(&mut events, Some(timeout)).unwrap();
        events.iter().map(|e| (e.key, e.readable, e.writable)).collect()
    }

    #[test]
    fn level_triggered_readable_until_drained() {
        let p = Poller::new().unwrap();
        let (mut a, mut b) = pair();
        // SAFETY: `b` is deleted before it is dropped.
        unsafe { p.add_with_mode(&b, Event::readable(7), PollMode::Level) }.unwrap();
        assert!(keys(&p, Duration::from_millis(20)).is_empty());
        a.write_all(b"hi").unwrap();
        // Reported on every wait until read: level-triggered.
        assert_eq!(keys(&p, Duration::from_secs(5)), [(7, true, false)]);
        assert_eq!(keys(&p, Duration::from_secs(5)), [(7, true, false)]);
        let mut buf = [0u8; 2];
        b.read_exact(&mut buf).unwrap();
        assert!(keys(&p, Duration::from_millis(20)).is_empty());
        // Writable interest on an empty send buffer is reported at once.
        p.modify_with_mode(&b, Event::new(7, true, true), PollMode::Level).unwrap();
        assert_eq!(keys(&p, Duration::from_secs(5)), [(7, false, true)]);
        // A peer close reads as readable.
        p.modify_with_mode(&b, Event::readable(7), PollMode::Level).unwrap();
        drop(a);
        assert_eq!(keys(&p, Duration::from_secs(5)), [(7, true, false)]);
        p.delete(&b).unwrap();
        assert!(keys(&p, Duration::from_millis(20)).is_empty());
    }

    #[test]
    fn notify_wakes_a_wait_once_and_timeouts_are_kept() {
        let p = Arc::new(Poller::new().unwrap());
        let t0 = Instant::now();
        assert!(keys(&p, Duration::from_millis(30)).is_empty());
        assert!(t0.elapsed() >= Duration::from_millis(30), "{:?}", t0.elapsed());

        // A notification from another thread wakes a wait; the notifier's own event is not
        // reported to the caller.
        let waker = p.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.notify().unwrap();
        });
        let t0 = Instant::now();
        assert!(keys(&p, Duration::from_secs(10)).is_empty());
        assert!(t0.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        // Two notifications before a wait make it return at once, and are both consumed by
        // that one wake-up: the next wait runs to its timeout.
        p.notify().unwrap();
        p.notify().unwrap();
        let t0 = Instant::now();
        keys(&p, Duration::from_secs(10));
        assert!(t0.elapsed() < Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(keys(&p, Duration::from_millis(30)).is_empty());
        assert!(t0.elapsed() >= Duration::from_millis(30));
        // A notification before the wait makes it return at once.
        p.notify().unwrap();
        let t0 = Instant::now();
        keys(&p, Duration::from_secs(10));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
