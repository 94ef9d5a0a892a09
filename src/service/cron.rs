//! No service manager we can drive (Linux without systemd, BSDs, containers): print a cron
//! `@reboot` line for the user to add. The crontab is never edited behind their back.

use std::path::Path;

use super::{ServiceState, Spec, run};
use crate::cli::{Exit, Out};

/// Single-quotes a word for `/bin/sh` (cron runs lines with it).
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | ':' | '=' | ',')
        })
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Escapes `%`, which cron turns into a newline.
fn cron_escape(s: &str) -> String {
    s.replace('%', "\\%")
}

/// Longer crontab lines are cut or refused by some crons (Vixie cron and its descendants).
const CRON_LINE_MAX: usize = 1000;

/// The crontab line: the foreground bridge at boot, with the service's environment (`PATH`
/// too: cron's own is bare, and the gateway wake-up looks for `hermes` there), output
/// appended to the service logs.
pub fn line(spec: &Spec) -> String {
    let mut words = Vec::new();
    for (k, v) in &spec.env {
        words.push(format!("{k}={}", sh_quote(v)));
    }
    words.push(sh_quote(&spec.exe.to_string_lossy()));
    words.extend(spec.args.iter().map(|a| sh_quote(a)));
    let out = sh_quote(&spec.out_log().to_string_lossy());
    let err = sh_quote(&spec.err_log().to_string_lossy());
    cron_escape(&format!("@reboot {} >>{out} 2>>{err}", words.join(" ")))
}

/// `--install` without systemd or launchd.
pub fn install(spec: &Spec, out: &Out) -> Result<(), Exit> {
    out.warn(
        "No systemd or launchd here: this system needs a cron entry to start the bridge at boot",
    );
    out.info("Add this line with crontab -e:");
    let line = line(spec);
    println!();
    println!("{line}");
    println!();
    if line.len() > CRON_LINE_MAX {
        out.warn(&format!(
            "The line is {} characters; some crons cut lines past {CRON_LINE_MAX}: shorten its \
             PATH=… if yours does",
            line.len()
        ));
    }
    out.info("Until the next boot, the bridge started by hermeschat-pair keeps running as it is.");
    out.info("To remove it later: crontab -e and delete the line.");
    Ok(())
}

/// `--uninstall` without systemd or launchd.
pub fn uninstall(out: &Out) -> Result<(), Exit> {
    out.info(
        "No systemd or launchd here: remove the @reboot hermeschat-pair line with crontab -e.",
    );
    Ok(())
}

/// `--service-status` without systemd or launchd: whether the crontab holds our line and the
/// bridge runs.
pub fn state(dir: &Path) -> ServiceState {
    let crontab = run("crontab", ["-l"]);
    let installed = crontab.ok
        && crontab.stdout.lines().any(|l| {
            let l = l.trim_start();
            l.starts_with("@reboot") && l.contains("hermeschat-pair") && l.contains("--foreground")
        });
    let pid = crate::daemon::running(dir).filter(|p| *p != 0);
    ServiceState {
        manager: "cron",
        name: "@reboot".to_owned(),
        file: None,
        installed,
        enabled: installed,
        running: installed && pid.is_some(),
        pid: if installed { pid } else { None },
        detail: if pid.is_some() {
            "bridge running".to_owned()
        } else {
            "bridge not running".to_owned()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_quotes_for_sh_and_escapes_percent() {
        let mut spec = super::super::tests::spec();
        spec.env.push(("HERMESCHAT_HOME".into(), "/home/u/it's 100%".into()));
        let l = line(&spec);
        assert!(l.starts_with("@reboot HERMESCHAT_REGISTRY_URL="), "{l}");
        assert!(l.contains("HERMESCHAT_HOME='/home/u/it'\\''s 100\\%'"), "{l}");
        assert!(
            l.contains("'/opt/hermes chat/bin/hermeschat-pair' --foreground --port 8000"),
            "{l}"
        );
        assert!(
            l.ends_with(
                ">>/home/u/.hermeschat/service.log 2>>/home/u/.hermeschat/service-error.log"
            ),
            "{l}"
        );
    }
}
