//! The built-in backend: the job of the original tool's bundled Python server, inside the
//! daemon, on `127.0.0.1:<port>` only. (Issue: "The built-in backend and the Hermes gateway
//! wake-up" — not implemented yet; [`available`] is false until it is.)

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

/// Where the built-in backend listens and keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The loopback port.
    pub port: u16,
    /// The state directory (uploads, `server.log`).
    pub state_dir: PathBuf,
}

/// Whether this build has a built-in backend to start.
pub fn available() -> bool {
    false
}

/// Binds `127.0.0.1:<port>` now (so a busy port is reported at once) and serves on a thread
/// until `stop` is set.
pub fn start(config: &BackendConfig, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    let _ = (config, stop);
    Err(io::Error::new(io::ErrorKind::Unsupported, "this build has no built-in backend"))
}
