//! The Hermes gateway (`127.0.0.1:8642`): probing and, later, the wake-up chain. Never blocks
//! pairing.

use crate::bridge::Health;
use crate::bridge::poller::{GATEWAY_HOST, GATEWAY_PORT, probe};
use crate::cli::Out;

/// Reports whether the gateway is online. (The wake-up chain comes with the built-in backend
/// issue.)
pub fn ensure(out: &Out) {
    if probe(GATEWAY_HOST, GATEWAY_PORT, "/health") == Health::Ready {
        out.ok(&format!("Hermes Gateway online ({GATEWAY_HOST}:{GATEWAY_PORT})"));
    } else {
        out.warn(&format!(
            "Hermes Gateway not running ({GATEWAY_HOST}:{GATEWAY_PORT}); chat needs it. Start it \
             with: hermes gateway start"
        ));
    }
}
