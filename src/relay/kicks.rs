//! Revocations the reactor remembers, so that an upgrade a worker authenticated just before a
//! revoke (or a bridge's deletion) committed cannot attach after the reactor closed that
//! credential's sockets.
//!
//! A worker reads the revocation epoch ([`super::Shared::epoch`]) before it checks a credential
//! in the store; a revoke bumps the epoch after its commit and sends the new value with its
//! kick. An upgrade that reaches the reactor after a matching kick, with an epoch below the
//! kick's, was checked before the commit (one checked after it fails in the store), so it is
//! refused. Upgrades of other credentials, and those checked after the commit, are untouched.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Peer;

/// How long a kick is remembered: far longer than a worker takes between its store check and
/// its answer reaching the reactor.
pub const REMEMBER_FOR: Duration = Duration::from_secs(60);

/// True when a kick of `bridge_id`'s client `client_id` (of the whole bridge when `None`)
/// reaches `peer`: a bridge's kick reaches the bridge and every app of it, an app's kick that
/// app alone.
pub fn reaches(bridge_id: &str, client_id: Option<&str>, peer: &Peer) -> bool {
    let (peer_bridge, peer_client) = peer.ids();
    peer_bridge == bridge_id && (client_id.is_none() || client_id == peer_client)
}

/// Recent kicks: (bridgeId, clientId or `None` for the whole bridge) → (epoch, when).
#[derive(Debug, Default)]
pub struct Kicks {
    recent: HashMap<(String, Option<String>), (u64, Instant)>,
}

impl Kicks {
    /// Records a kick of one client of `bridge_id`, or of the whole bridge (`client_id` `None`),
    /// committed at revocation `epoch`.
    pub fn record(&mut self, bridge_id: &str, client_id: Option<&str>, epoch: u64, now: Instant) {
        let key = (bridge_id.to_owned(), client_id.map(str::to_owned));
        let entry = self.recent.entry(key).or_insert((epoch, now));
        *entry = (entry.0.max(epoch), now);
    }

    /// True when `peer`, authenticated at revocation `epoch`, was revoked after that check:
    /// a kick that [`reaches`] it (its bridge's, or its own) came with a later epoch.
    pub fn refuses(&self, peer: &Peer, epoch: u64) -> bool {
        if self.recent.is_empty() {
            return false;
        }
        let (bridge_id, client_id) = peer.ids();
        let kicked_after = |client: Option<&str>| {
            let key = (bridge_id.to_owned(), client.map(str::to_owned));
            self.recent.get(&key).is_some_and(|&(kicked, _)| kicked > epoch)
        };
        kicked_after(None) || (client_id.is_some() && kicked_after(client_id))
    }

    /// Forgets kicks older than [`REMEMBER_FOR`].
    pub fn prune(&mut self, now: Instant) {
        self.recent.retain(|_, &mut (_, at)| now.duration_since(at) < REMEMBER_FOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(bridge: &str, client: &str) -> Peer {
        Peer::App { bridge_id: bridge.into(), client_id: client.into(), device_name: "d".into() }
    }

    fn bridge(bridge: &str) -> Peer {
        Peer::Bridge { bridge_id: bridge.into(), instance: "i".into() }
    }

    #[test]
    fn an_upgrade_checked_before_a_revoke_is_refused_and_one_checked_after_is_not() {
        let now = Instant::now();
        let mut kicks = Kicks::default();
        assert!(!kicks.refuses(&app("b", "c"), 0));
        kicks.record("b", Some("c"), 5, now);
        // Checked at epochs 0..=4: before the revoke committed (epoch 5).
        assert!(kicks.refuses(&app("b", "c"), 4));
        assert!(kicks.refuses(&app("b", "c"), 0));
        // Checked after the commit: the store decided, not the kick.
        assert!(!kicks.refuses(&app("b", "c"), 5));
        // Another client of the bridge, the bridge itself, another bridge: untouched.
        assert!(!kicks.refuses(&app("b", "other"), 4));
        assert!(!kicks.refuses(&bridge("b"), 4));
        assert!(!kicks.refuses(&app("x", "c"), 4));
    }

    #[test]
    fn a_deleted_bridge_refuses_its_own_upgrade_and_every_apps() {
        let now = Instant::now();
        let mut kicks = Kicks::default();
        kicks.record("b", None, 3, now);
        assert!(kicks.refuses(&bridge("b"), 2));
        assert!(kicks.refuses(&app("b", "any"), 2));
        assert!(!kicks.refuses(&bridge("b"), 3));
        assert!(!kicks.refuses(&bridge("other"), 2));
    }

    #[test]
    fn kicks_are_forgotten_after_a_while_and_a_later_epoch_wins() {
        let now = Instant::now();
        let mut kicks = Kicks::default();
        kicks.record("b", Some("c"), 7, now);
        kicks.record("b", Some("c"), 6, now);
        assert!(kicks.refuses(&app("b", "c"), 6), "the later epoch is kept");
        kicks.prune(now + REMEMBER_FOR / 2);
        assert!(kicks.refuses(&app("b", "c"), 6));
        kicks.prune(now + REMEMBER_FOR);
        assert!(!kicks.refuses(&app("b", "c"), 6));
    }

    #[test]
    fn a_bridge_kick_reaches_the_bridge_and_its_apps_an_app_kick_that_app_alone() {
        assert!(reaches("b", None, &bridge("b")));
        assert!(reaches("b", None, &app("b", "c")));
        assert!(reaches("b", Some("c"), &app("b", "c")));
        assert!(!reaches("b", Some("c"), &app("b", "d")));
        assert!(!reaches("b", Some("c"), &bridge("b")));
        assert!(!reaches("b", None, &bridge("x")));
        assert!(!reaches("b", None, &app("x", "c")));
    }
}
