//! Names the build: `HERMESCHAT_VERSION` is the package version, followed by the git commit it
//! was built from when built from a git checkout (`0.1.0 (161f33e2a1b0)`), so that `--version`,
//! the relay's health and the bridge's registration tell two builds of one version apart (an
//! upgraded daemon from the one it replaced).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let git = Path::new(".git");
    let commit = git.is_dir().then(head_commit).flatten();
    if git.is_dir() {
        // A new commit moves the branch HEAD names (a loose ref or packed-refs).
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/packed-refs");
        if let Some(branch) = std::fs::read_to_string(".git/HEAD")
            .ok()
            .and_then(|h| h.trim().strip_prefix("ref: ").map(str::to_owned))
        {
            println!("cargo:rerun-if-changed=.git/{branch}");
        }
    }
    match commit {
        Some(commit) => println!("cargo:rustc-env=HERMESCHAT_VERSION={version} ({commit})"),
        None => println!("cargo:rustc-env=HERMESCHAT_VERSION={version}"),
    }
}

/// The commit checked out, abbreviated to 12 hex digits; `None` without a usable `git`.
fn head_commit() -> Option<String> {
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !commit.is_empty() && commit.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(commit)
}
