//! Per-IP token buckets for the unauthenticated registry routes (register, verify). An IPv6
//! client is counted by its /64: one host usually holds a whole /64, so counting addresses
//! would give it billions of buckets.
//!
//! Also the per-credential bucket of app sockets ([`AppUpgradeLimiter`]): an app credential
//! that opens sockets in a loop would otherwise have the relay queue a `client.connected` and
//! a `client.disconnected` to its bridge for every one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::fasthash::FastMap;

/// Buckets tracked before idle ones are pruned; bounds memory under address floods.
const MAX_TRACKED: usize = 50_000;

/// A token bucket per source IP: `per_minute` requests a minute, bursting to `per_minute`.
pub struct RateLimiter {
    per_minute: f64,
    buckets: Mutex<Buckets>,
}

/// A [`RateLimiter`]'s buckets, and when full ones were last forgotten.
struct Buckets {
    /// Source → (tokens, when they were last brought up to date).
    by_source: HashMap<IpAddr, (f64, Instant)>,
    /// When [`RateLimiter::prune_if_due`] last forgot full buckets.
    pruned: Instant,
}

impl Buckets {
    /// Forgets the buckets refilled to the full `per_minute` by `now` (as good as never seen),
    /// and gives back the table's memory once most of it is empty.
    fn prune(&mut self, per_minute: f64, now: Instant) {
        self.by_source.retain(|_, (tokens, at)| {
            *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_minute / 60.0
                < per_minute
        });
        shrink_if_sparse(&mut self.by_source);
        self.pruned = now;
    }
}

impl RateLimiter {
    /// A limiter allowing `per_minute` requests a minute per IP (0 disables the limit).
    pub fn new(per_minute: u32) -> Self {
        let buckets = Buckets { by_source: HashMap::new(), pruned: Instant::now() };
        RateLimiter { per_minute: per_minute as f64, buckets: Mutex::new(buckets) }
    }

    /// Forgets the sources whose bucket is full again, once a minute: a relay that
    /// saw many addresses once (a scan, a busy day behind a proxy) does not keep a bucket for
    /// each until the cap. The reactor calls it every second.
    pub fn prune_if_due(&self, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(buckets.pruned) >= PRUNE_EVERY {
            buckets.prune(self.per_minute, now);
        }
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).by_source.len()
    }

    /// Takes one token for `ip`. `Err(seconds)` says how long until one is available.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.per_minute <= 0.0 {
            return Ok(());
        }
        self.check_at(ip, Instant::now())
    }

    /// [`RateLimiter::check`] at `now`.
    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.by_source.len() >= MAX_TRACKED {
            buckets.prune(self.per_minute, now);
            // A flood from more distinct addresses than we track: forget them all rather than
            // grow without bound (the limit fails open for a moment, memory stays bounded).
            if buckets.by_source.len() >= MAX_TRACKED {
                buckets.by_source.clear();
            }
        }
        let (tokens, at) = buckets.by_source.entry(source(ip)).or_insert((self.per_minute, now));
        *tokens = (*tokens
            + now.saturating_duration_since(*at).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) * 60.0 / self.per_minute).ceil() as u64)
        }
    }
}

/// App sockets one credential may open at once before it is limited ([`AppUpgradeLimiter`]).
pub const APP_UPGRADE_BURST: u32 = 20;

/// One more app socket is allowed per this much time once the burst is spent: 30 a minute.
pub const APP_UPGRADE_REFILL: Duration = Duration::from_secs(2);

/// Credentials tracked before full buckets are pruned; bounds memory (credentials are paired
/// ones, so this is reached only by a relay with that many apps reconnecting at once).
const MAX_CREDENTIALS: usize = 50_000;

/// How often full buckets are forgotten ([`RateLimiter::prune_if_due`],
/// [`AppUpgradeLimiter::prune_if_due`]).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How often at most one credential's refusals are told in a `ws.app_limited` line.
pub const LIMITED_LOG_EVERY: Duration = Duration::from_secs(60);

/// One credential's bucket.
#[derive(Debug)]
struct AppBucket {
    /// Sockets it may still open now (refilled continuously up to the burst).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// Refusals not yet told in a log line.
    untold: u64,
    /// When its last `ws.app_limited` line was written.
    logged: Option<Instant>,
}

impl AppBucket {
    /// Its tokens at `now`.
    fn refilled(&self, now: Instant) -> f64 {
        let per_sec = 1.0 / APP_UPGRADE_REFILL.as_secs_f64();
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_sec)
            .min(f64::from(APP_UPGRADE_BURST))
    }
}

/// An app socket refused by [`AppUpgradeLimiter::check`].
#[derive(Debug, PartialEq, Eq)]
pub struct AppLimited {
    /// Whole seconds until the credential may open a socket again (at least 1).
    pub retry_after: u64,
    /// Refusals of this credential to tell in a log line now (`None`: one was written less
    /// than [`LIMITED_LOG_EVERY`] ago; these are told in the next).
    pub log: Option<u64>,
}

/// A token bucket per app credential (clientId): [`APP_UPGRADE_BURST`] sockets, then one per
/// [`APP_UPGRADE_REFILL`]. Checked by the reactor on an authenticated upgrade that would
/// attach, so a refused upgrade costs no token and one user's app never spends another's.
/// Single-threaded (the reactor owns it).
#[derive(Debug)]
pub struct AppUpgradeLimiter {
    buckets: FastMap<String, AppBucket>,
    pruned: Instant,
}

impl Default for AppUpgradeLimiter {
    fn default() -> Self {
        AppUpgradeLimiter { buckets: FastMap::default(), pruned: Instant::now() }
    }
}

impl AppUpgradeLimiter {
    /// Takes a token for a socket of `client_id` opened at `now`, or says when to retry.
    pub fn check(&mut self, client_id: &str, now: Instant) -> Result<(), AppLimited> {
        if !self.buckets.contains_key(client_id) {
            if self.buckets.len() >= MAX_CREDENTIALS {
                self.prune(now);
                // More credentials reconnecting at once than tracked: forget them all rather
                // than grow (the limit fails open for a moment, memory stays bounded).
                if self.buckets.len() >= MAX_CREDENTIALS {
                    self.buckets.clear();
                }
            }
            let full = f64::from(APP_UPGRADE_BURST);
            let fresh = AppBucket { tokens: full, at: now, untold: 0, logged: None };
            self.buckets.insert(client_id.to_owned(), fresh);
        }
        let Some(bucket) = self.buckets.get_mut(client_id) else { return Ok(()) };
        bucket.tokens = bucket.refilled(now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) * APP_UPGRADE_REFILL.as_secs_f64();
        bucket.untold += 1;
        let log =
            bucket.logged.is_none_or(|t| now.saturating_duration_since(t) >= LIMITED_LOG_EVERY);
        let log = log.then(|| {
            bucket.logged = Some(now);
            std::mem::take(&mut bucket.untold)
        });
        Err(AppLimited { retry_after: (wait.ceil() as u64).max(1), log })
    }

    /// Forgets the credentials whose bucket is full again (as good as never seen), once per
    /// minute (and when the cap is reached). The reactor calls it every second.
    pub fn prune_if_due(&mut self, now: Instant) {
        if now.saturating_duration_since(self.pruned) >= PRUNE_EVERY {
            self.prune(now);
        }
    }

    fn prune(&mut self, now: Instant) {
        let full = f64::from(APP_UPGRADE_BURST);
        self.buckets.retain(|_, b| b.refilled(now) < full);
        shrink_if_sparse(&mut self.buckets);
        self.pruned = now;
    }

    /// Credentials tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Gives back most of a map's table when under a quarter of it is used: `retain` empties
/// entries but keeps the table, so one busy hour would otherwise hold its memory for good.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// The unit a limit counts: an IPv4 address (also when written as IPv4-mapped IPv6), or the
/// /64 network of an IPv6 address.
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// A [`source`] as the log names it: an IPv4 address, or an IPv6 network as `2001:db8::/64`.
pub(crate) fn source_label(source: IpAddr) -> String {
    match source {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("{v6}/64"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_ip() {
        let l = RateLimiter::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!((1..=20).contains(&wait));
        assert!(l.check(b).is_ok());
        assert!(RateLimiter::new(0).check(a).is_ok());
    }

    #[test]
    fn sources_seen_once_are_forgotten_when_their_bucket_is_full_again() {
        let l = RateLimiter::new(2);
        let t0 = Instant::now();
        for n in 0..5_000u32 {
            assert!(l.check_at(IpAddr::from((0x0a00_0000 + n).to_be_bytes()), t0).is_ok());
        }
        assert_eq!(l.tracked(), 5_000);
        // A minute on, a source that is spending its tokens now.
        let busy: IpAddr = "203.0.113.9".parse().unwrap();
        let t1 = t0 + PRUNE_EVERY + Duration::from_secs(1);
        assert!(l.check_at(busy, t1).is_ok());
        assert!(l.check_at(busy, t1).is_ok());
        assert!(l.check_at(busy, t1).is_err());
        l.prune_if_due(t1);
        assert_eq!(l.tracked(), 1, "only the source still limited is kept");
        assert!(l.check_at(busy, t1).is_err(), "and it is still limited");
        let table = l.buckets.lock().unwrap().by_source.capacity();
        assert!(table < 64, "the table's memory is given back: room for {table}");
    }

    #[test]
    fn an_ipv6_network_is_one_source() {
        let l = RateLimiter::new(2);
        let first: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check(first).is_ok());
        assert!(l.check(same_64).is_ok());
        assert!(l.check(first).is_err());
        assert!(l.check(same_64).is_err());
        assert!(l.check(other_64).is_ok());
        // An IPv4 address counts the same however it is written.
        let v4: IpAddr = "10.0.0.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert!(l.check(v4).is_ok());
        assert!(l.check(mapped).is_ok());
        assert!(l.check(v4).is_err());
    }

    #[test]
    fn an_app_credential_gets_its_burst_then_one_socket_per_refill() {
        let mut l = AppUpgradeLimiter::default();
        let t0 = Instant::now();
        for _ in 0..APP_UPGRADE_BURST {
            assert_eq!(l.check("hcl_a", t0), Ok(()));
        }
        let first = l.check("hcl_a", t0).unwrap_err();
        assert_eq!(first, AppLimited { retry_after: 2, log: Some(1) });
        // Further refusals within the minute are counted, not logged.
        let second = l.check("hcl_a", t0 + Duration::from_millis(500)).unwrap_err();
        assert_eq!(second, AppLimited { retry_after: 2, log: None });
        // Another credential is not touched.
        assert_eq!(l.check("hcl_b", t0), Ok(()));
        // One refill later, one socket (and only one).
        let t1 = t0 + APP_UPGRADE_REFILL;
        assert_eq!(l.check("hcl_a", t1), Ok(()));
        assert!(l.check("hcl_a", t1).is_err());
        // A minute on, the next line tells what the last one left out: the two refusals
        // counted since, and its own.
        let t2 = t0 + LIMITED_LOG_EVERY;
        let refused = loop {
            if let Err(e) = l.check("hcl_a", t2) {
                break e;
            }
        };
        assert_eq!(refused.log, Some(3));
        assert_eq!(l.check("hcl_a", t2).unwrap_err().log, None);
        // Refilled to the full burst, a credential is forgotten.
        let refilled = t2 + APP_UPGRADE_REFILL * APP_UPGRADE_BURST;
        l.prune_if_due(refilled);
        assert_eq!(l.tracked(), 0);
        for _ in 0..APP_UPGRADE_BURST {
            assert_eq!(l.check("hcl_a", refilled), Ok(()));
        }
    }

    #[test]
    fn the_app_credentials_tracked_are_bounded() {
        let mut l = AppUpgradeLimiter::default();
        let t0 = Instant::now();
        for n in 0..MAX_CREDENTIALS + 10 {
            let _ = l.check(&format!("hcl_{n}"), t0);
        }
        assert!(l.tracked() <= MAX_CREDENTIALS, "{}", l.tracked());
        // Once their buckets are full again, they are forgotten and the table's memory given
        // back.
        l.prune_if_due(t0 + PRUNE_EVERY + APP_UPGRADE_REFILL);
        assert_eq!(l.tracked(), 0);
        let table = l.buckets.capacity();
        assert!(table < 64, "room for {table}");
    }

    #[test]
    fn a_source_is_labelled_as_what_it_counts() {
        let label = |s: &str| source_label(source(s.parse().unwrap()));
        assert_eq!(label("203.0.113.5"), "203.0.113.5");
        assert_eq!(label("::ffff:203.0.113.5"), "203.0.113.5");
        assert_eq!(label("2001:db8:1:2::99"), "2001:db8:1:2::/64");
    }
}
