//! hermeschat-pair: pair the HermesChat iOS app with your own Hermes Agent through a relay you
//! host yourself.
//!
//! The crate has two binaries sharing this library:
//! - `hermeschat-pair` — the pairing CLI ([`cli`]) and the bridge daemon ([`bridge`],
//!   [`daemon`]);
//! - `hermeschat-relay` — the self-hosted registry + relay ([`relay`]).
//!
//! The modules, one role each, by the side they serve:
//! - the wire: [`protocol`] is the contract both sides speak (plain serde types, no I/O);
//!   [`jsonscan`], [`wsread`], [`wsout`], [`stream`], [`poll`] and [`http`] read and write it
//!   on the readiness-driven threads of both binaries, with [`fasthash`] for their maps and
//!   [`memory`] for their allocator;
//! - the user's machine: [`cli`] and its commands ([`devices`], [`doctor`], [`logs`],
//!   [`service`], [`lan`] with [`netif`]), [`daemon`] and [`bridge`], the built-in
//!   [`backend`], the Hermes [`gateway`], [`tls_probe`] for a local server that speaks HTTPS,
//!   [`state`], the files all of them keep, and [`term`], what they may draw on the terminal;
//! - the way out to the registry and relay: [`registry_client`], [`tcp_connect`],
//!   [`netproxy`];
//! - small parts both sides use: [`qr`] (the pairing codes), [`secret`] (identifiers and
//!   secrets).

pub mod backend;
pub mod bridge;
pub mod cli;
pub mod daemon;
pub mod devices;
pub mod doctor;
pub mod fasthash;
pub mod gateway;
pub mod http;
pub mod jsonscan;
pub mod lan;
pub mod logs;
pub mod memory;
pub mod netif;
pub mod netproxy;
pub mod poll;
pub mod protocol;
pub mod qr;
pub mod registry_client;
pub mod relay;
pub mod secret;
pub mod service;
pub mod state;
pub mod stream;
pub mod tcp_connect;
pub mod term;
pub mod tls_probe;
pub mod wsout;
pub mod wsread;

pub use memory::limit_allocator_retention;

/// This build: the package version, and the git commit it was built from when there was one
/// (`0.1.0 (161f33e2a1b0)`; see `build.rs`).
pub const VERSION: &str = env!("HERMESCHAT_VERSION");
