//! `hermeschat-pair`: pair the HermesChat iOS app with your own Hermes Agent.

use std::process::ExitCode;

use hermeschat_pair::cli::{self, Command};

fn main() -> ExitCode {
    let result = cli::parse(std::env::args_os().skip(1)).and_then(|args| {
        // A command that prints and exits ends quietly when its reader goes away
        // (`hermeschat-pair --status | head -1`), as other commands do, instead of panicking
        // on the failed print. A bridge keeps SIGPIPE ignored: it must outlive a closed pipe.
        if !matches!(args.command, Command::Foreground | Command::BridgeRun { .. }) {
            // SAFETY: signal() only changes this process's disposition of SIGPIPE; no
            // handler runs, and no thread has been started yet.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
        }
        cli::run(args)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("✗ {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}
