//! `--doctor`: a real request along the whole path, each hop reported. (Not implemented yet.)

use crate::cli::{Args, Exit, usage_error};

/// `--doctor`.
pub fn run(_args: &Args) -> Result<(), Exit> {
    Err(usage_error("--doctor is not available in this version yet; see the README"))
}
