//! Identifiers and secrets: generation from the OS CSPRNG, SHA-256 digests for storage, and
//! constant-time comparison. Nothing here logs or formats a secret.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `n` random bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all; there is nothing safe to
    // fall back to, so stop rather than hand out a predictable secret.
    if let Err(e) = getrandom::fill(&mut buf) {
        eprintln!("fatal: the operating system's random number generator failed: {e}");
        std::process::abort();
    }
    buf
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A new bridgeId: 24 hex digits (96 bits).
pub fn new_bridge_id() -> String {
    hex(&random_bytes::<12>())
}

/// A new access code: 32 hex digits (128 bits).
pub fn new_access_code() -> String {
    hex(&random_bytes::<16>())
}

/// A new relaySecret: `hrs_` + 64 hex digits (256 bits).
pub fn new_relay_secret() -> String {
    format!("hrs_{}", hex(&random_bytes::<32>()))
}

/// A new clientId: `hcl_` + 16 hex digits.
pub fn new_client_id() -> String {
    format!("hcl_{}", hex(&random_bytes::<8>()))
}

/// A new clientSecret: `hcs_` + 64 hex digits (256 bits).
pub fn new_client_secret() -> String {
    format!("hcs_{}", hex(&random_bytes::<32>()))
}

/// A new instance id for a bridge installation (`X-Hermes-Instance`).
pub fn new_instance_id() -> String {
    format!("hin_{}", hex(&random_bytes::<16>()))
}

/// A new LAN pairing token.
pub fn new_pairing_token() -> String {
    format!("hpt_{}", hex(&random_bytes::<32>()))
}

/// SHA-256 of a secret, the only form in which secrets are stored.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two digests in constant time.
pub fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// True when `secret` hashes to `stored` (constant time).
pub fn matches(secret: &str, stored: &[u8]) -> bool {
    digests_equal(&digest(secret), stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    #[test]
    fn generated_ids_match_the_protocol_forms() {
        assert!(is_bridge_id(&new_bridge_id()));
        assert!(is_access_code(&new_access_code()));
        assert!(is_relay_secret(&new_relay_secret()));
        assert!(is_client_id(&new_client_id()));
        assert!(is_client_secret(&new_client_secret()));
        assert_ne!(new_bridge_id(), new_bridge_id());
    }

    #[test]
    fn digest_matching() {
        let s = new_relay_secret();
        let d = digest(&s);
        assert!(matches(&s, &d));
        assert!(!matches("hrs_other", &d));
        assert!(!digests_equal(&d, &d[..31]));
    }
}
