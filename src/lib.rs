//! hermeschat-pair: pair the HermesChat iOS app with your own Hermes Agent through a relay you
//! host yourself.
//!
//! The crate has two binaries sharing this library:
//! - `hermeschat-pair` — the pairing CLI and the bridge daemon;
//! - `hermeschat-relay` — the self-hosted registry + relay ([`relay`]).
//!
//! [`protocol`] holds the wire contract both sides speak, as plain serde types.

pub mod http;
pub mod protocol;
pub mod qr;
pub mod relay;
pub mod secret;
pub mod state;
