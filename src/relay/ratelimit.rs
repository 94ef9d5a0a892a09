//! Per-IP token buckets for the unauthenticated registry routes (register, verify). An IPv6
//! client is counted by its /64: one host usually holds a whole /64, so counting addresses
//! would give it billions of buckets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets tracked before idle ones are pruned; bounds memory under address floods.
const MAX_TRACKED: usize = 50_000;

/// A token bucket per source IP: `per_minute` requests a minute, bursting to `per_minute`.
pub struct RateLimiter {
    per_minute: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` requests a minute per IP (0 disables the limit).
    pub fn new(per_minute: u32) -> Self {
        RateLimiter { per_minute: per_minute as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `ip`. `Err(seconds)` says how long until one is available.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.per_minute <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED {
            let per_minute = self.per_minute;
            buckets.retain(|_, (tokens, at)| {
                *tokens + at.elapsed().as_secs_f64() * per_minute / 60.0 < per_minute
            });
            // A flood from more distinct addresses than we track: forget them all rather than
            // grow without bound (the limit fails open for a moment, memory stays bounded).
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets.entry(source(ip)).or_insert((self.per_minute, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_minute / 60.0)
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
    fn a_source_is_labelled_as_what_it_counts() {
        let label = |s: &str| source_label(source(s.parse().unwrap()));
        assert_eq!(label("203.0.113.5"), "203.0.113.5");
        assert_eq!(label("::ffff:203.0.113.5"), "203.0.113.5");
        assert_eq!(label("2001:db8:1:2::99"), "2001:db8:1:2::/64");
    }
}
