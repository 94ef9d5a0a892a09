//! `hermeschat-pair`: pair the HermesChat iOS app with your own Hermes Agent.

use std::process::ExitCode;

use hermeschat_pair::cli;

fn main() -> ExitCode {
    let result = cli::parse(std::env::args_os().skip(1)).and_then(cli::run);
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
