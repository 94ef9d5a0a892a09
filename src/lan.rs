//! `--local`: LAN-only direct mode, no registry and no relay. (Not implemented yet.)

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

use crate::bridge::LiveStatus;
use crate::bridge::workers::Pool;
use crate::cli::{Args, Exit, PairMode, usage_error};

/// The LAN server's address and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanConfig {
    /// The LAN address to bind and advertise.
    pub host: IpAddr,
    /// The port (default 8766).
    pub port: u16,
    /// The state directory (LAN devices).
    pub state_dir: PathBuf,
}

fn not_yet() -> Exit {
    usage_error("--local is not available in this version yet; see the README")
}

impl LanConfig {
    /// The configuration the daemon was started with.
    pub fn from_args(args: &Args, state_dir: &Path) -> Result<LanConfig, Exit> {
        let _ = (args, state_dir);
        Err(not_yet())
    }
}

/// Binds the LAN server now and serves on a thread until `stop` is set.
pub fn start(
    config: LanConfig,
    pool: Arc<Pool>,
    status: Arc<LiveStatus>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let _ = (config, pool, status, stop);
    Err(io::Error::new(io::ErrorKind::Unsupported, "LAN mode is not implemented yet"))
}

/// `hermeschat-pair --local` (and `--refresh-code --local`, `--reset --local`).
pub fn pair(args: &Args, mode: PairMode) -> Result<(), Exit> {
    let _ = (args, mode);
    Err(not_yet())
}
