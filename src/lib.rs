//! hermeschat-pair: pair the HermesChat iOS app with your own Hermes Agent through a relay you
//! host yourself.
//!
//! The crate has two binaries sharing this library:
//! - `hermeschat-pair` — the pairing CLI ([`cli`]) and the bridge daemon ([`bridge`],
//!   [`daemon`]);
//! - `hermeschat-relay` — the self-hosted registry + relay ([`relay`]).
//!
//! [`protocol`] holds the wire contract both sides speak, as plain serde types; [`http`] the
//! small HTTP/1.1 helpers the servers share; [`state`] the local state files; [`qr`] the QR
//! codes; [`secret`] identifiers and secrets.

pub mod backend;
pub mod bridge;
pub mod cli;
pub mod daemon;
pub mod devices;
pub mod doctor;
pub mod gateway;
pub mod http;
pub mod lan;
pub mod logs;
pub mod netif;
pub mod poll;
pub mod protocol;
pub mod qr;
pub mod registry_client;
pub mod relay;
pub mod secret;
pub mod service;
pub mod state;
pub mod stream;
pub mod wsout;
pub mod wsread;

/// Keeps a long-running process's memory near what it uses; both binaries call it first thing
/// in their server role. glibc gives each busy thread its own arena and keeps freed blocks
/// there, and after one large free it raises its mmap threshold so later large blocks come
/// from the heap and stay resident: after one 12 MiB upload the daemon's worker pool held
/// ~150 MiB for good, and the relay ~32 MiB of heap. Two arenas and a fixed mmap threshold of
/// 128 KiB (larger blocks go back to the system on free) bound that to the live data. musl's
/// allocator already returns large blocks.
pub fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tunables; callers run it before starting threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}
