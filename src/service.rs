//! Boot services: a launchd LaunchAgent on macOS, a systemd user unit on Linux. (Not
//! implemented yet.)

use crate::cli::{Args, Exit, usage_error};

fn not_yet(flag: &str) -> Exit {
    usage_error(format!("{flag} is not available in this version yet; see the README"))
}

/// `--install`.
pub fn install(_args: &Args) -> Result<(), Exit> {
    Err(not_yet("--install"))
}

/// `--uninstall`.
pub fn uninstall(_args: &Args) -> Result<(), Exit> {
    Err(not_yet("--uninstall"))
}

/// `--service-status`.
pub fn status(_args: &Args) -> Result<(), Exit> {
    Err(not_yet("--service-status"))
}
