//! Names the build: `HERMESCHAT_VERSION` is the package version, followed by the git commit it
//! was built from when built from this package's own git checkout (`0.1.0 (161f33e2a1b0)`),
//! so that `--version`, the relay's health and the bridge's registration tell two builds of
//! one version apart (an upgraded daemon from the one it replaced).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    // Only this package's own checkout (a worktree too): not a repository around it (a home
    // directory kept in git, a project that vendors this crate).
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let own_checkout = git(&["rev-parse", "--show-toplevel"]).is_some_and(|top| {
        let canonical = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
        manifest_dir.is_some_and(|m| canonical(m) == canonical(PathBuf::from(top)))
    });
    let commit = own_checkout
        .then(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .flatten()
        .filter(|c| c.bytes().all(|b| b.is_ascii_hexdigit()));
    let Some(commit) = commit else {
        println!("cargo:rustc-env=HERMESCHAT_VERSION={version}");
        return;
    };
    // A commit, checkout or reset moves HEAD or the branch it names (a loose ref, or
    // packed-refs after a gc) and appends to HEAD's reflog. Only files that exist are watched:
    // cargo takes a missing one for changed, and would rebuild every time.
    let mut watched = vec!["HEAD".to_owned(), "logs/HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).map(PathBuf::from)
            && path.exists()
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rustc-env=HERMESCHAT_VERSION={version} ({commit})");
}

/// What `git <args>` prints (trimmed), run in the package directory; `None` without a usable
/// `git` or outside a checkout.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}
