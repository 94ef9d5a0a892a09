//! `--logs`: the daemon, server and gateway logs. (Not implemented yet.)

use crate::cli::{Args, Exit, usage_error};

/// `--logs [--follow] [--lines N]`.
pub fn run(_args: &Args) -> Result<(), Exit> {
    Err(usage_error("--logs is not available in this version yet; see the README"))
}
