//! `--devices` and `--revoke`: the paired apps at the registry. (Not implemented yet.)

use crate::cli::{Args, Exit, usage_error};

/// `--devices`.
pub fn list(_args: &Args) -> Result<(), Exit> {
    Err(usage_error("--devices is not available in this version yet; see the README"))
}

/// `--revoke <clientId>`.
pub fn revoke(_args: &Args, _client_id: &str) -> Result<(), Exit> {
    Err(usage_error("--revoke is not available in this version yet; see the README"))
}
