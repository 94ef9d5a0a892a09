//! Bounds the access-log lines of refused requests (any 4xx: wrong tokens, unknown bridges,
//! rate limits, bad requests). Per source, the first [`LOGGED_PER_WINDOW`] refusals of a
//! minute are logged in full; the rest are only counted, and told in one `http.suppressed`
//! line when that minute ends. An operator audit sent 10,000 upgrades with wrong tokens from
//! one client: 10,002 lines (1.1 MB) in 1.8 s, about 2.6 GB an hour, enough for journald to
//! drop the real events. Now such a client costs six lines a minute.
//!
//! Successful and 5xx lines are never held back: they are the relay's own story, not a
//! client's. Memory is bounded: at most [`MAX_SOURCES`] sources are tracked (those refused in
//! the last minute); refusals from further sources share one entry, logged as `ip` `other`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::log_event;
use super::ratelimit::{source, source_label};

/// How long a source's count runs before its `http.suppressed` line.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Refusals of one source logged in full per [`WINDOW`].
pub const LOGGED_PER_WINDOW: u32 = 5;

/// Sources tracked at most; the rest share one entry.
pub const MAX_SOURCES: usize = 1024;

/// Distinct statuses counted apart in one `http.suppressed` line (the relay answers about a
/// dozen 4xx statuses; more are still counted in the total).
const MAX_STATUSES: usize = 16;

/// What to do with one refusal's access line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it.
    Log,
    /// Write it, saying that the next ones of this source are counted, not written.
    LogLast,
    /// Count it only.
    Suppress,
}

/// One source's refusals in its current window.
struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
    /// Suppressed refusals per status, in the order first seen.
    statuses: Vec<(u16, u64)>,
}

/// An `http.suppressed` line to write: whose (`None`: the sources past [`MAX_SOURCES`]), how
/// many refusals were left out, by status.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    source: Option<IpAddr>,
    suppressed: u64,
    statuses: Vec<(u16, u64)>,
}

impl Summary {
    fn log(&self) {
        let ip = self.source.map_or_else(|| "other".to_owned(), source_label);
        let statuses: Vec<String> =
            self.statuses.iter().map(|(status, n)| format!("{status}:{n}")).collect();
        log_event(
            "http.suppressed",
            &[
                ("ip", &ip),
                ("suppressed", &self.suppressed.to_string()),
                ("statuses", &statuses.join(" ")),
                ("windowSecs", &WINDOW.as_secs().to_string()),
            ],
        );
    }
}

/// The refusal bookkeeping, shared by the reactor and the registry workers (both write
/// access lines).
#[derive(Default)]
pub struct RefusalLog {
    /// Windows by source; `None` holds the sources past [`MAX_SOURCES`].
    windows: Mutex<HashMap<Option<IpAddr>, Window>>,
}

impl RefusalLog {
    /// Counts a refusal (`status`) of a request from `ip` and says whether its line is written.
    /// Writes the `http.suppressed` line of the source's last window when it ended.
    pub fn note(&self, ip: IpAddr, status: u16, now: Instant) -> Verdict {
        let (verdict, ended) = self.count(ip, status, now);
        if let Some(summary) = ended {
            summary.log();
        }
        verdict
    }

    /// Writes the `http.suppressed` lines of the windows that ended, and forgets them: called
    /// every second, so a source that went quiet is told about within a second of its minute.
    pub fn flush(&self, now: Instant) {
        for summary in self.take_ended(Some(now)) {
            summary.log();
        }
    }

    fn count(&self, ip: IpAddr, status: u16, now: Instant) -> (Verdict, Option<Summary>) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let from = source(ip);
        let key = if windows.len() < MAX_SOURCES || windows.contains_key(&Some(from)) {
            Some(from)
        } else {
            None
        };
        let mut ended = None;
        let window = windows.entry(key).or_insert_with(|| Window::new(now));
        if now.duration_since(window.started) >= WINDOW {
            let old = std::mem::replace(window, Window::new(now));
            ended = old.summary(key);
        }
        let verdict = if window.logged < LOGGED_PER_WINDOW {
            window.logged += 1;
            if window.logged == LOGGED_PER_WINDOW { Verdict::LogLast } else { Verdict::Log }
        } else {
            window.suppressed += 1;
            match window.statuses.iter().position(|(s, _)| *s == status) {
                Some(i) => window.statuses[i].1 += 1,
                None if window.statuses.len() < MAX_STATUSES => window.statuses.push((status, 1)),
                None => {}
            }
            Verdict::Suppress
        };
        (verdict, ended)
    }

    /// Removes the windows that ended by `now` (every window when `None`) and returns the
    /// summaries of those that suppressed something.
    fn take_ended(&self, now: Option<Instant>) -> Vec<Summary> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let ended = |w: &Window| now.is_none_or(|now| now.duration_since(w.started) >= WINDOW);
        let keys: Vec<Option<IpAddr>> =
            windows.iter().filter(|(_, w)| ended(w)).map(|(k, _)| *k).collect();
        keys.into_iter().filter_map(|k| windows.remove(&k).and_then(|w| w.summary(k))).collect()
    }
}

impl Drop for RefusalLog {
    /// A relay that stops still tells what it left out of the log.
    fn drop(&mut self) {
        for summary in self.take_ended(None) {
            summary.log();
        }
    }
}

impl Window {
    fn new(now: Instant) -> Self {
        Window { started: now, logged: 0, suppressed: 0, statuses: Vec::new() }
    }

    /// Its summary, when it suppressed something.
    fn summary(self, source: Option<IpAddr>) -> Option<Summary> {
        (self.suppressed > 0).then_some(Summary {
            source,
            suppressed: self.suppressed,
            statuses: self.statuses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_a_few_lines_a_minute_then_one_summary() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let a = ip("203.0.113.5");
        let verdicts: Vec<Verdict> = (0..8).map(|_| log.count(a, 401, t0).0).collect();
        let mut want = vec![Verdict::Log; 4];
        want.push(Verdict::LogLast);
        want.extend([Verdict::Suppress; 3]);
        assert_eq!(verdicts, want);
        assert_eq!(log.count(a, 404, t0).0, Verdict::Suppress);
        // Another source is counted apart.
        assert_eq!(log.count(ip("198.51.100.7"), 401, t0).0, Verdict::Log);
        // Nothing has ended yet.
        assert!(log.take_ended(Some(t0 + WINDOW / 2)).is_empty());
        // The minute is over: one summary for the source that suppressed, and both forgotten.
        let ended = log.take_ended(Some(t0 + WINDOW));
        let want = Summary { source: Some(a), suppressed: 4, statuses: vec![(401, 3), (404, 1)] };
        assert_eq!(ended, vec![want]);
        assert!(log.windows.lock().unwrap().is_empty());
        // A new minute logs in full again.
        assert_eq!(log.count(a, 401, t0 + WINDOW).0, Verdict::Log);
    }

    #[test]
    fn a_refusal_after_the_minute_tells_the_last_one_before_the_timer_does() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let a = ip("2001:db8:1:2::1");
        for _ in 0..6 {
            log.count(a, 429, t0);
        }
        let (verdict, ended) = log.count(ip("2001:db8:1:2::ffff"), 429, t0 + WINDOW);
        assert_eq!(verdict, Verdict::Log, "a new window begins");
        let ended = ended.expect("the ended window's summary");
        assert_eq!((ended.source, ended.suppressed), (Some(source(a)), 1));
    }

    #[test]
    fn sources_past_the_cap_share_one_entry() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        for n in 0..MAX_SOURCES as u32 {
            log.count(IpAddr::from(n.to_be_bytes()), 400, t0);
        }
        let newcomer = ip("203.0.113.77");
        for _ in 0..LOGGED_PER_WINDOW {
            assert_ne!(log.count(newcomer, 401, t0).0, Verdict::Suppress);
        }
        // Another newcomer shares the overflow entry, whose few lines are spent.
        assert_eq!(log.count(ip("203.0.113.78"), 401, t0).0, Verdict::Suppress);
        assert_eq!(log.windows.lock().unwrap().len(), MAX_SOURCES + 1);
        // A tracked source keeps its own entry.
        assert_eq!(log.count(IpAddr::from(7u32.to_be_bytes()), 400, t0).0, Verdict::Log);
        let ended = log.take_ended(None);
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!((ended[0].source, ended[0].suppressed), (None, 1));
    }
}
