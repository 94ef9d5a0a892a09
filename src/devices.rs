//! `--devices` and `--revoke <clientId>`: the apps paired with this bridge, as the registry
//! knows them (diagnostic credentials of `--doctor` are never listed), and the LAN devices of
//! `--local` (lan.json).

use std::path::Path;

use crate::cli::{Args, Exit, Out, fail, load_identity, state_dir, usage_error};
use crate::lan::store::StoreError;
use crate::protocol::{ClientInfo, is_client_id};
use crate::registry_client::{Registry, RegistryError};

/// What to do about a registry error: the next step, for the error or the warning line.
fn registry_hint(e: &RegistryError, registry: &Registry, bridge_id: &str) -> Option<String> {
    match e {
        // This machine's CA store or resolver: the cause already says what to do.
        RegistryError::Unreachable { cause, .. }
            if crate::registry_client::is_this_machines_side(cause) =>
        {
            None
        }
        RegistryError::Unreachable { .. } => Some(format!(
            "check that your relay runs (curl {}/v1/health), then try again",
            registry.base()
        )),
        // The bridge is there, its secret refused (a proxy that drops the Authorization
        // header): registering anew would strand every paired app.
        RegistryError::Api { code, .. } if code == "UNAUTHORIZED" => {
            Some(crate::cli::secret_refused(bridge_id))
        }
        RegistryError::Api { code, .. } if code == "BRIDGE_NOT_FOUND" => Some(
            "the registry no longer knows this bridge; run hermeschat-pair to register anew \
                 (apps must scan the new QR code)"
                .to_owned(),
        ),
        _ => None,
    }
}

fn registry_error(e: &RegistryError, registry: &Registry, bridge_id: &str) -> Exit {
    match registry_hint(e, registry, bridge_id) {
        Some(hint) => fail(format!("{e}\n  {}", crate::cli::sentence(&hint))),
        None => fail(e.to_string()),
    }
}

/// `2026-11-24 21:30` in local time.
pub(crate) fn local_date_time(ms: u64) -> String {
    let Some(tm) = crate::cli::local_tm(ms) else { return crate::bridge::format_ts(ms) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

/// `just now`, `5 min ago`, `3 h ago`, `2 days ago`.
fn ago(ms: u64, now: u64) -> String {
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => "just now".to_owned(),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// The table of `--devices`.
fn table(clients: &[ClientInfo], now: u64) -> String {
    let rows: Vec<[String; 5]> = clients
        .iter()
        .map(|c| {
            let seen = match (c.online, c.last_seen_at) {
                (true, _) => "now".to_owned(),
                (false, Some(t)) => format!("{} ({})", local_date_time(t), ago(t, now)),
                (false, None) => "never".to_owned(),
            };
            [
                c.client_id.clone(),
                c.device_name.clone(),
                local_date_time(c.paired_at),
                seen,
                if c.online { "online".to_owned() } else { "offline".to_owned() },
            ]
        })
        .collect();
    let head = ["CLIENT ID", "NAME", "PAIRED", "LAST SEEN", "STATE"];
    let mut width = head.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(width[i] - cell.chars().count() + 2));
            }
        }
        s
    };
    let mut text = line(head) + "\n";
    for row in &rows {
        text.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
        text.push('\n');
    }
    text
}

/// The LAN devices of `--devices`.
struct LanList {
    /// The devices as rows of the table; online when the running LAN daemon has their socket.
    devices: Vec<ClientInfo>,
    /// Why they are unknown: lan.json cannot be read (the relay's apps still count).
    error: Option<String>,
    /// A damaged lan.json was set aside (now or earlier): some devices may be missing.
    warning: Option<String>,
}

/// The LAN devices (`--local`), from lan.json.
fn lan_devices(dir: &Path) -> LanList {
    let (lan, note) = match crate::lan::store::read(dir) {
        Ok(read) => read,
        Err(e) => {
            return LanList { devices: Vec::new(), error: Some(e.to_string()), warning: None };
        }
    };
    let serving = crate::cli::running_status(dir).filter(|s| s.lan_url.is_some());
    let devices = lan
        .devices
        .into_iter()
        .map(|d| ClientInfo {
            online: serving.as_ref().is_some_and(|s| s.apps_online.contains(&d.client_id)),
            client_id: d.client_id,
            device_name: d.device_name,
            paired_at: d.paired_at,
            last_seen_at: d.last_seen_at,
        })
        .collect();
    LanList { devices, error: None, warning: crate::lan::store::warning(dir, note) }
}

/// `--devices`: the apps paired through the relay, then the LAN devices (`--local`).
///
/// The LAN list is local, so it is printed even when the registry cannot be asked: then the
/// relay part is one warning line (`relayError` and `"devices": null` with `--json`) and the
/// exit code is 0, as when lan.json cannot be read and the relay's apps are listed. When
/// neither part can be listed, the registry's error is the answer (exit 1).
pub fn list(args: &Args) -> Result<(), Exit> {
    let out = Out::new(args.json);
    let dir = state_dir()?;
    let identity = load_identity(&dir, &out)?;
    let lan = lan_devices(&dir);
    if let Some(w) = &lan.warning {
        out.warn(w);
    }
    match (&identity, &lan.error) {
        (None, Some(e)) => return Err(fail(e.clone())),
        (None, None) if lan.devices.is_empty() => return Err(no_pairing("no devices")),
        _ => {}
    }
    let relay = identity.as_ref().map(|id| {
        let registry = Registry::new(&id.registry_url);
        let clients = registry.clients(&id.bridge_id, &id.relay_secret);
        (id, clients.map_err(|e| (e, registry)))
    });
    let mut relay_error = None;
    let clients = match relay {
        Some((id, Ok(clients))) => Some((id, clients)),
        Some((id, Err((e, registry)))) => {
            if lan.devices.is_empty() {
                if let Some(lan_error) = &lan.error {
                    out.warn(lan_error);
                }
                return Err(registry_error(&e, &registry, &id.bridge_id));
            }
            let hint = registry_hint(&e, &registry, &id.bridge_id)
                .map(|h| format!("; {h}"))
                .unwrap_or_default();
            relay_error = Some(e.to_string());
            out.warn(&format!("the apps paired through the relay are unknown: {e}{hint}"));
            None
        }
        None => None,
    };
    if let Some(e) = &lan.error {
        out.warn(e);
    }
    if args.json {
        let mut value = serde_json::json!({
            "bridgeId": identity.as_ref().map(|id| &id.bridge_id),
            "devices": match (&clients, &relay_error) {
                (_, Some(_)) => serde_json::Value::Null,
                (Some((_, c)), None) => serde_json::json!(c),
                (None, None) => serde_json::json!([]),
            },
            "lanDevices": lan.devices,
        });
        if let Some(e) = relay_error {
            value["relayError"] = e.into();
        }
        if let Some(e) = lan.error {
            value["lanError"] = e.into();
        }
        if let Some(w) = lan.warning {
            value["lanWarning"] = w.into();
        }
        println!("{value}");
        return Ok(());
    }
    match &clients {
        Some((id, clients)) if clients.is_empty() => {
            out.ok(&format!("No app is paired with bridge {} yet", id.bridge_id));
            out.info("Pair one: hermeschat-pair --refresh-code, then scan the QR in the app.");
        }
        Some((id, clients)) => {
            let online = clients.iter().filter(|c| c.online).count();
            out.ok(&format!(
                "{} paired app{} ({online} online) · bridge {}",
                clients.len(),
                if clients.len() == 1 { "" } else { "s" },
                id.bridge_id
            ));
            print!("{}", table(clients, crate::relay::now_ms()));
        }
        None => {}
    }
    if !lan.devices.is_empty() {
        print_lan(&lan.devices, &out);
    }
    if !lan.devices.is_empty() || clients.is_some_and(|(_, c)| !c.is_empty()) {
        out.info("Cut one off: hermeschat-pair --revoke <CLIENT ID>");
    }
    Ok(())
}

/// The LAN section of `--devices`.
fn print_lan(lan: &[ClientInfo], out: &Out) {
    let online = lan.iter().filter(|c| c.online).count();
    out.ok(&format!(
        "{} LAN device{} ({online} online) · hermeschat-pair --local",
        lan.len(),
        if lan.len() == 1 { "" } else { "s" }
    ));
    print!("{}", table(lan, crate::relay::now_ms()));
}

/// Exit 2: nothing is paired, through the relay or on the LAN, so there is `what` (`"no
/// devices"`, `"no app to revoke"`).
fn no_pairing(what: &str) -> Exit {
    usage_error(format!(
        "no pairing yet (bridge.json is missing, and no LAN device), so {what}: run \
         hermeschat-pair (or hermeschat-pair --local)"
    ))
}

/// `--revoke <clientId>`: a LAN device is forgotten (the running LAN server closes its socket
/// within a second); any other is revoked at the registry.
pub fn revoke(args: &Args, client_id: &str) -> Result<(), Exit> {
    let out = Out::new(args.json);
    let client_id = client_id.trim();
    if !is_client_id(client_id) {
        return Err(usage_error(format!(
            "--revoke: {client_id:?} is not a client id (hcl_ followed by 16 hex digits); \
             hermeschat-pair --devices lists them"
        )));
    }
    let dir = state_dir()?;
    // A LAN device is forgotten here; a lan.json problem never stops a revoke at the registry.
    let mut lan_problem = None;
    let mut lan_unsaved = None;
    let forgotten = match crate::lan::store::forget(&dir, client_id) {
        Ok((device, note)) => {
            if let Some(note) = note {
                out.warn(&note);
            }
            device
        }
        // Nothing changed on disk: said as a write failure, never as "not paired".
        Err(e @ StoreError::Write(_)) => {
            lan_unsaved = Some(e.to_string());
            None
        }
        Err(e) => {
            let e = e.to_string();
            out.warn(&e);
            lan_problem = Some(e);
            None
        }
    };
    let unsaved = |e: &str| {
        fail(format!(
            "cannot revoke {client_id}: {e}\n  Nothing was changed in lan.json: a LAN device \
             {client_id} stays paired and keeps working. Free some disk space (or fix what refuses writes) \
             in {}, then run hermeschat-pair --revoke {client_id} again.",
            dir.display()
        ))
    };
    // Not at the registry either: said with the LAN problem, since the device may be there.
    let not_found = |what: &str| {
        if let Some(e) = &lan_unsaved {
            return unsaved(e);
        }
        let lan = lan_problem
            .as_ref()
            .map(|e| format!("\n  {e}: a LAN device {client_id} may still be paired."))
            .unwrap_or_default();
        fail(format!(
            "no app {client_id} is paired with {what} (already revoked?); hermeschat-pair \
             --devices lists the paired apps{lan}"
        ))
    };
    if let Some(device) = forgotten {
        if args.json {
            let value = serde_json::json!({
                "revoked": client_id,
                "deviceName": device.device_name,
                "lan": true,
            });
            println!("{value}");
            return Ok(());
        }
        out.ok(&format!(
            "Revoked LAN device {client_id} ({}): its connection is closed and its secret no \
             longer works",
            device.device_name
        ));
        out.info("To use the app again it must scan a new QR code (hermeschat-pair --refresh-code --local).");
        return Ok(());
    }
    let Some(id) = load_identity(&dir, &out)? else {
        // Nothing paired at all is the configuration error --devices reports (exit 2).
        let lan = lan_devices(&dir);
        let nothing_paired = lan_problem.is_none()
            && lan_unsaved.is_none()
            && lan.error.is_none()
            && lan.devices.is_empty();
        if nothing_paired {
            return Err(no_pairing("no app to revoke"));
        }
        return Err(not_found("this machine"));
    };
    let registry = Registry::new(&id.registry_url);
    // The name, for the message (best effort: the revoke below is what counts).
    let name = registry
        .clients(&id.bridge_id, &id.relay_secret)
        .ok()
        .and_then(|cs| cs.into_iter().find(|c| c.client_id == client_id))
        .map(|c| c.device_name);
    match registry.revoke(&id.bridge_id, &id.relay_secret, client_id) {
        // It was the relay's; the LAN list, which could not be saved, is as it was.
        Ok(()) => {
            if let Some(unsaved) = &lan_unsaved {
                out.warn(&format!("LAN devices unchanged: {unsaved}"));
            }
        }
        Err(RegistryError::Api { code, .. }) if code == "CLIENT_NOT_FOUND" => {
            return Err(not_found("this bridge"));
        }
        Err(e) => {
            if let Some(unsaved) = &lan_unsaved {
                out.warn(&format!("LAN devices unchanged: {unsaved}"));
            }
            return Err(registry_error(&e, &registry, &id.bridge_id));
        }
    }
    if args.json {
        println!("{}", serde_json::json!({ "revoked": client_id, "deviceName": name }));
        return Ok(());
    }
    let who = name.map(|n| format!("{client_id} ({n})")).unwrap_or_else(|| client_id.to_owned());
    out.ok(&format!("Revoked {who}: its connection is closed and its secret no longer works"));
    out.info("To use the app again it must scan a new QR code (hermeschat-pair --refresh-code).");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_date_past_2038_is_not_wrapped() {
        // 2040-06-02 03:57:02 UTC: past what a 32-bit `time_t` holds (armv7 glibc).
        let shown = local_date_time(2_222_222_222_000);
        assert!(shown.starts_with("2040-"), "{shown}");
    }

    #[test]
    fn table_aligns_columns_and_words_times() {
        let now = 10_000_000_000;
        let clients = vec![
            ClientInfo {
                client_id: "hcl_0123456789abcdef".into(),
                device_name: "iPhone".into(),
                paired_at: now - 86_400_000,
                last_seen_at: Some(now - 120_000),
                online: false,
            },
            ClientInfo {
                client_id: "hcl_fedcba9876543210".into(),
                device_name: "Jo's iPad Pro".into(),
                paired_at: now - 1000,
                last_seen_at: None,
                online: true,
            },
        ];
        let t = table(&clients, now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("CLIENT ID             NAME           PAIRED"), "{t}");
        assert!(lines[1].contains("(2 min ago)") && lines[1].ends_with("offline"), "{t}");
        assert!(lines[2].contains(" now ") && lines[2].ends_with("online"), "{t}");
        assert_eq!(ago(now - 3 * 86_400_000, now), "3 days ago");
    }
}
