//! The relay's registry store: SQLite in WAL mode under `--data`.
//!
//! Only SHA-256 digests of secrets and access codes are stored; every comparison of a presented
//! secret against a digest is constant time. Each worker thread opens its own connection; SQLite's
//! locking (with `BEGIN IMMEDIATE` for read-modify-write) makes access-code consumption atomic
//! across threads and processes.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::protocol::{
    ACCESS_CODE_FAILURE_WINDOW_MS, ACCESS_CODE_MAX_FAILURES, ClientInfo, PROBE_CLIENT_TTL_MS,
};
use crate::secret;

/// Live diagnostic credentials kept per bridge ([`Store::probe_client`]): `--doctor` needs
/// one at a time; more would only let a bridge's secret grow its client table.
pub const MAX_LIVE_PROBES: usize = 8;

/// A store failure (disk, corruption, lock timeout). Shown to callers as 500 `INTERNAL`.
#[derive(Debug)]
pub struct StoreError {
    /// What failed, for the log.
    pub message: String,
    /// The store itself is failing (damaged, unreadable, unwritable, full), as opposed to a
    /// lock held too long or a statement refused: `/v1/health` reports it.
    pub fault: bool,
}

impl StoreError {
    /// A failure that says nothing of the store's health.
    fn new(message: String) -> Self {
        StoreError { message, fault: false }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "relay store: {}", self.message)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let fault = matches!(
            e.sqlite_error_code(),
            Some(
                C::DatabaseCorrupt
                    | C::NotADatabase
                    | C::SystemIoFailure
                    | C::DiskFull
                    | C::CannotOpen
                    | C::ReadOnly
                    | C::PermissionDenied
                    | C::NoLargeFileSupport
            )
        );
        StoreError { message: e.to_string(), fault }
    }
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A bridge record as the registry needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// The bridgeId.
    pub id: String,
    /// The name apps show.
    pub display_name: String,
}

/// An authenticated app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Its clientId.
    pub id: String,
    /// The bridge it belongs to.
    pub bridge_id: String,
    /// The name it gave at pairing.
    pub device_name: String,
}

/// What a verify call concluded (PROTOCOL §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Paired: the new credential and the bridge's name.
    Paired {
        /// The new clientId.
        client_id: String,
        /// The new clientSecret (returned once, stored as a digest).
        client_secret: String,
        /// The bridge's display name.
        bridge_name: String,
    },
    /// No such bridge.
    BridgeNotFound,
    /// Wrong code.
    Invalid,
    /// The code was already used.
    Used,
    /// The code expired.
    Expired,
    /// Too many wrong codes; the current code is burned.
    TooManyAttempts,
}

/// The store's format, kept in SQLite's `user_version`: a relay refuses a store a newer relay
/// has written in a format it does not know (0 is a store from before the number was kept,
/// which [`migrate`] brings up to date).
const STORE_FORMAT: i64 = 1;

/// Brings a store written by an older relay up to [`SCHEMA`] and [`STORE_FORMAT`]:
/// `connected_at` came later; the bridges already there count as connected at their
/// registration (none is taken for an unfinished one).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_connected_at = conn
        .prepare("SELECT 1 FROM pragma_table_info('bridges') WHERE name = 'connected_at'")?
        .exists([])?;
    if !has_connected_at {
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             ALTER TABLE bridges ADD COLUMN connected_at INTEGER;
             UPDATE bridges SET connected_at = created_at;
             COMMIT;",
        )?;
    }
    // Written once: every worker thread opens the store, and this is a write.
    if conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? < STORE_FORMAT {
        conn.pragma_update(None, "user_version", STORE_FORMAT)?;
    }
    Ok(())
}

/// The SQLite-backed registry store. One per thread.
pub struct Store {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bridges (
    id              TEXT PRIMARY KEY,
    secret_hash     BLOB NOT NULL,
    display_name    TEXT NOT NULL,
    version         TEXT,
    created_at      INTEGER NOT NULL,
    code_hash       BLOB,
    code_expires_at INTEGER,
    code_used       INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    failures_since  INTEGER NOT NULL DEFAULT 0,
    connected_at    INTEGER
);
CREATE TABLE IF NOT EXISTS clients (
    id               TEXT PRIMARY KEY,
    bridge_id        TEXT NOT NULL REFERENCES bridges(id) ON DELETE CASCADE,
    secret_hash      BLOB NOT NULL,
    device_name      TEXT NOT NULL,
    paired_at        INTEGER NOT NULL,
    last_seen_at     INTEGER,
    probe_expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS clients_by_bridge ON clients(bridge_id);
";

/// Creates `path` empty with mode 0600 (SQLite takes an empty file for a new database), or
/// makes an existing one 0600: it holds digests and device names, and SQLite gives its WAL
/// and shared-memory files the database's own mode.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// A failure to set up the store at `path`, with the path, and for a damaged file what to do
/// (it is never moved or deleted here: what it holds is every pairing). `errno` is the
/// system's error behind it, if any.
fn open_error(path: &Path, e: rusqlite::Error, errno: i32) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, DiskFull, NotADatabase};
    let p = path.display();
    if e.sqlite_error_code() == Some(DiskFull) || is_disk_full(errno) {
        return StoreError::new(format!("{p}: {}", disk_full(path, &e)));
    }
    if !matches!(e.sqlite_error_code(), Some(NotADatabase | DatabaseCorrupt)) {
        return StoreError::new(format!("{p}: {e}"));
    }
    StoreError::new(format!(
        "{p} is not a usable SQLite database ({e}); it was left as it is. Restore it from a \
         backup, or move it aside to start with an empty store, which forgets every registered \
         bridge and paired app (each machine then runs hermeschat-pair again): \
         mv {p} {p}.broken (and {p}-wal and {p}-shm, if they exist)"
    ))
}

/// True for the errors of a full disk or an exhausted quota.
fn is_disk_full(errno: i32) -> bool {
    errno == libc::ENOSPC || errno == libc::EDQUOT
}

/// "The disk is full" for `path`, with what the system said and the way out.
fn disk_full(path: &Path, e: &dyn std::fmt::Display) -> String {
    let dir = path.parent().unwrap_or(path).display();
    format!(
        "the disk is full ({e}): free some space there (df -h {dir} shows how much is left) and \
         start the relay again"
    )
}

/// Why `relay.db` could not be created or opened for writing ([`private_file`]): a full disk,
/// or for a file that exists and that we may not write, who owns it and what to do.
fn create_error(path: &Path, e: &std::io::Error) -> StoreError {
    use std::os::unix::fs::MetadataExt;
    let p = path.display();
    if e.raw_os_error().is_some_and(is_disk_full) {
        return StoreError::new(format!("cannot create {p}: {}", disk_full(path, e)));
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) if e.kind() == std::io::ErrorKind::PermissionDenied => m,
        _ => return StoreError::new(format!("cannot create {p}: {e}")),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let (owner, next) = if meta.uid() == me {
        ("you".to_owned(), format!("make it writable: chmod 600 {p}"))
    } else {
        (
            user_label(meta.uid()),
            format!(
                "run the relay as that user, or give the store to the user the relay runs as \
                 ({}): chown {me} {p} (and {p}-wal and {p}-shm, if they exist)",
                user_label(me)
            ),
        )
    };
    StoreError::new(format!(
        "cannot open {p} for writing ({e}): it belongs to {owner}, mode {mode:04o}; {next}"
    ))
}

/// `uid N (name)`, with the name when the user database has one.
pub(crate) fn user_label(uid: u32) -> String {
    match crate::state::account_name(uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

impl Store {
    /// Opens (creating if needed) `relay.db` in `dir`, in WAL mode.
    pub fn open(dir: &Path) -> StoreResult<Store> {
        let path = dir.join("relay.db");
        private_file(&path).map_err(|e| create_error(&path, &e))?;
        let conn = Connection::open(&path)
            .map_err(|e| StoreError::new(format!("cannot open {}: {e}", path.display())))?;
        // `Some(format)`: a newer relay's store, not touched.
        let setup = || -> rusqlite::Result<Option<i64>> {
            conn.busy_timeout(Duration::from_secs(5))?;
            // Before anything writes: a newer relay's store is left exactly as it is.
            let format: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if format > STORE_FORMAT {
                return Ok(Some(format));
            }
            conn.pragma_update(None, "journal_mode", "WAL")?;
            // FULL syncs the WAL on every commit: a pairing confirmed to a caller survives a
            // crash or power cut. Registry writes are rare, so the fsync costs nothing that
            // matters.
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.execute_batch(SCHEMA)?;
            migrate(&conn).map(|()| None)
        };
        let newer = setup();
        if let Ok(Some(format)) = newer {
            return Err(StoreError::new(format!(
                "{} was written by a newer hermeschat-relay (store format {format}; this one \
                 reads format {STORE_FORMAT} and older), and was left as it is: run that \
                 newer relay, or give this one a --data directory of its own",
                path.display()
            )));
        }
        if let Err(e) = newer {
            // SAFETY: the handle is valid while `conn` lives; sqlite3_system_errno only reads
            // the error number its last failed call recorded.
            let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
            return Err(open_error(&path, e, errno));
        }
        Ok(Store { conn })
    }

    /// [`Store::open`] for the first connection of a process that holds the data directory's
    /// lock: when it fails, the WAL (if empty) and shared-memory files it created are removed,
    /// instead of being left behind by a start that never happened (on a full disk, a
    /// partial `relay.db-shm`). No other connection can have them open: they did not exist,
    /// and no other relay runs here. The next start makes them again.
    pub fn open_first(dir: &Path) -> StoreResult<Store> {
        let (wal, shm) = (dir.join("relay.db-wal"), dir.join("relay.db-shm"));
        let had = (wal.exists(), shm.exists());
        Store::open(dir).inspect_err(|_| {
            if !had.0 && std::fs::metadata(&wal).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(&wal);
            }
            if !had.1 {
                let _ = std::fs::remove_file(&shm);
            }
        })
    }

    /// Copies every change in the WAL into `relay.db` and empties the WAL
    /// (`wal_checkpoint(TRUNCATE)`), so that relay.db alone holds the whole store. Fails when
    /// another connection keeps it from finishing.
    pub fn checkpoint(&self) -> StoreResult<()> {
        let (busy, log, done): (i64, i64, i64) =
            self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        if busy != 0 {
            return Err(StoreError::new(format!(
                "checkpoint incomplete ({done} of {log} WAL pages copied): another connection \
                 to relay.db is open"
            )));
        }
        Ok(())
    }

    /// Rows inserted, updated or deleted through this connection so far: a call that
    /// returned `Ok` and moved it committed a write.
    pub fn total_changes(&self) -> u64 {
        self.conn.total_changes()
    }

    /// A cheap read of the bridges table (its first row at most), for `/v1/health`.
    pub fn probe(&self) -> StoreResult<()> {
        self.conn
            .query_row("SELECT count(*) FROM (SELECT 1 FROM bridges LIMIT 1)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Records that the bridge's socket connected (the first time only: a later connect
    /// changes nothing, so it writes nothing).
    pub fn mark_connected(&self, bridge_id: &str, now_ms: u64) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE bridges SET connected_at = ?2 WHERE id = ?1 AND connected_at IS NULL",
            params![bridge_id, now_ms as i64],
        )?;
        Ok(())
    }

    /// Deletes the unfinished registrations: bridges registered before `cutoff_ms` whose socket
    /// never connected, that have no client and whose access code was never redeemed, except
    /// those `attached` says are attached now. A pairing connects its bridge within seconds,
    /// so these are pairings that failed midway, or registrations nobody uses (the command
    /// registers anew when its bridge is gone). Returns how many went.
    pub fn expire_unfinished(
        &self,
        cutoff_ms: u64,
        attached: impl Fn(&str) -> bool,
    ) -> StoreResult<usize> {
        // A redeemed code is a pairing that finished, even if its app was revoked since (and
        // its bridge's connects went unrecorded, under a relay older than `connected_at`).
        let mut stmt = self.conn.prepare(
            "SELECT id FROM bridges WHERE connected_at IS NULL AND created_at < ?1
             AND code_used = 0
             AND NOT EXISTS (SELECT 1 FROM clients WHERE clients.bridge_id = bridges.id)",
        )?;
        let ids: Vec<String> =
            stmt.query_map(params![cutoff_ms as i64], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let mut expired = 0;
        for id in ids.iter().filter(|id| !attached(id)) {
            // Checked again in the statement: a pairing may have finished meanwhile.
            expired += self.conn.execute(
                "DELETE FROM bridges WHERE id = ?1 AND connected_at IS NULL AND code_used = 0
                 AND NOT EXISTS (SELECT 1 FROM clients WHERE clients.bridge_id = bridges.id)",
                params![id],
            )?;
        }
        Ok(expired)
    }

    /// Ends, as of `now_ms`, every access code not yet redeemed and every diagnostic client
    /// credential still valid then: the wall clock was set back, so each would stay valid its
    /// lifetime plus the step. A code ended so is answered `ACCESS_CODE_EXPIRED` (its bridge
    /// gets a new one with `--refresh-code`). Returns `(codes, probe credentials)` ended.
    pub fn withdraw_codes(&self, now_ms: u64) -> StoreResult<(usize, usize)> {
        let codes = self.conn.execute(
            "UPDATE bridges SET code_expires_at = ?1
             WHERE code_used = 0 AND code_hash IS NOT NULL AND code_expires_at > ?1",
            params![now_ms as i64],
        )?;
        let probes = self.conn.execute(
            "UPDATE clients SET probe_expires_at = ?1 WHERE probe_expires_at > ?1",
            params![now_ms as i64],
        )?;
        Ok((codes, probes))
    }

    /// Registers a new bridge and returns `(bridgeId, relaySecret)`.
    pub fn register(
        &self,
        display_name: &str,
        version: Option<&str>,
        now_ms: u64,
    ) -> StoreResult<(String, String)> {
        let id = secret::new_bridge_id();
        let relay_secret = secret::new_relay_secret();
        self.conn.execute(
            "INSERT INTO bridges (id, secret_hash, display_name, version, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, &secret::digest(&relay_secret)[..], display_name, version, now_ms as i64],
        )?;
        Ok((id, relay_secret))
    }

    /// Checks a relaySecret for a bridge. `Ok(None)` when the bridge is unknown or the secret
    /// wrong (callers answer both the same way where the protocol asks for no oracle).
    pub fn auth_bridge(&self, bridge_id: &str, relay_secret: &str) -> StoreResult<Option<Bridge>> {
        let row: Option<(Vec<u8>, String)> = self
            .conn
            .query_row(
                "SELECT secret_hash, display_name FROM bridges WHERE id = ?1",
                params![bridge_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.and_then(|(hash, name)| {
            secret::matches(relay_secret, &hash)
                .then(|| Bridge { id: bridge_id.to_owned(), display_name: name })
        }))
    }

    /// True when the bridge exists.
    pub fn bridge_exists(&self, bridge_id: &str) -> StoreResult<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM bridges WHERE id = ?1", params![bridge_id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Issues a fresh access code for a bridge, replacing the old one and clearing the failure
    /// count. Optionally renames the bridge. Returns `(code, expiresAt)`.
    pub fn issue_access_code(
        &self,
        bridge_id: &str,
        display_name: Option<&str>,
        now_ms: u64,
        ttl_ms: u64,
    ) -> StoreResult<(String, u64)> {
        let code = secret::new_access_code();
        let expires = now_ms + ttl_ms;
        self.conn.execute(
            "UPDATE bridges SET code_hash = ?2, code_expires_at = ?3, code_used = 0,
                 failures = 0, failures_since = 0,
                 display_name = COALESCE(?4, display_name)
             WHERE id = ?1",
            params![bridge_id, &secret::digest(&code)[..], expires as i64, display_name],
        )?;
        Ok((code, expires))
    }

    /// Exchanges an access code for a client credential, atomically: of two concurrent calls
    /// with the same code exactly one pairs.
    pub fn verify(
        &mut self,
        bridge_id: &str,
        access_code: &str,
        device_name: &str,
        now_ms: u64,
    ) -> StoreResult<Verify> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        type Row = (String, Option<Vec<u8>>, Option<i64>, i64, i64, i64);
        let row: Option<Row> = tx
            .query_row(
                "SELECT display_name, code_hash, code_expires_at, code_used, failures, failures_since
                 FROM bridges WHERE id = ?1",
                params![bridge_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()?;
        let Some((bridge_name, code_hash, expires, used, failures, since)) = row else {
            return Ok(Verify::BridgeNotFound);
        };
        let now = now_ms as i64;
        let in_window = now - since < ACCESS_CODE_FAILURE_WINDOW_MS as i64;
        let failures = if in_window { failures } else { 0 };
        if failures >= ACCESS_CODE_MAX_FAILURES as i64 {
            return Ok(Verify::TooManyAttempts);
        }
        let matches = code_hash.as_deref().is_some_and(|h| secret::matches(access_code, h));
        if !matches {
            let since = if in_window { since } else { now };
            let failures = failures + 1;
            let burned = failures >= ACCESS_CODE_MAX_FAILURES as i64;
            tx.execute(
                "UPDATE bridges SET failures = ?2, failures_since = ?3,
                     code_hash = CASE WHEN ?4 THEN NULL ELSE code_hash END
                 WHERE id = ?1",
                params![bridge_id, failures, since, burned],
            )?;
            tx.commit()?;
            return Ok(if burned { Verify::TooManyAttempts } else { Verify::Invalid });
        }
        if used != 0 {
            return Ok(Verify::Used);
        }
        if expires.is_none_or(|e| now >= e) {
            return Ok(Verify::Expired);
        }
        let client_id = secret::new_client_id();
        let client_secret = secret::new_client_secret();
        tx.execute("UPDATE bridges SET code_used = 1 WHERE id = ?1", params![bridge_id])?;
        tx.execute(
            "INSERT INTO clients (id, bridge_id, secret_hash, device_name, paired_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![client_id, bridge_id, &secret::digest(&client_secret)[..], device_name, now],
        )?;
        tx.commit()?;
        Ok(Verify::Paired { client_id, client_secret, bridge_name })
    }

    /// Deletes a bridge with its clients and codes.
    pub fn delete_bridge(&self, bridge_id: &str) -> StoreResult<bool> {
        Ok(self.conn.execute("DELETE FROM bridges WHERE id = ?1", params![bridge_id])? > 0)
    }

    /// The paired apps of a bridge (diagnostic credentials excluded). `online` is left false;
    /// the caller fills it from the live socket table.
    pub fn list_clients(&self, bridge_id: &str) -> StoreResult<Vec<ClientInfo>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, device_name, paired_at, last_seen_at FROM clients
             WHERE bridge_id = ?1 AND probe_expires_at IS NULL ORDER BY paired_at, id",
        )?;
        let rows = stmt.query_map(params![bridge_id], |r| {
            Ok(ClientInfo {
                client_id: r.get(0)?,
                device_name: r.get(1)?,
                paired_at: r.get::<_, i64>(2)? as u64,
                last_seen_at: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                online: false,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes one client of a bridge. False when it was not paired with that bridge.
    pub fn revoke(&self, bridge_id: &str, client_id: &str) -> StoreResult<bool> {
        Ok(self.conn.execute(
            "DELETE FROM clients WHERE id = ?1 AND bridge_id = ?2",
            params![client_id, bridge_id],
        )? > 0)
    }

    /// Creates a diagnostic client credential, valid [`PROBE_CLIENT_TTL_MS`]. Expired ones of
    /// the same bridge are removed on the way, and the oldest live ones beyond
    /// [`MAX_LIVE_PROBES`]. Returns `(clientId, clientSecret, expiresAt)`.
    pub fn probe_client(&self, bridge_id: &str, now_ms: u64) -> StoreResult<(String, String, u64)> {
        self.conn.execute(
            "DELETE FROM clients WHERE bridge_id = ?1 AND probe_expires_at IS NOT NULL
                 AND probe_expires_at <= ?2",
            params![bridge_id, now_ms as i64],
        )?;
        // A bridge's secret cannot grow its client table without bound (every app sign-in
        // compares against each of its clients): only the newest live probes are kept.
        self.conn.execute(
            "DELETE FROM clients WHERE bridge_id = ?1 AND probe_expires_at IS NOT NULL
                 AND id NOT IN (SELECT id FROM clients WHERE bridge_id = ?1
                     AND probe_expires_at IS NOT NULL
                     ORDER BY probe_expires_at DESC, rowid DESC LIMIT ?2)",
            params![bridge_id, (MAX_LIVE_PROBES - 1) as i64],
        )?;
        let client_id = secret::new_client_id();
        let client_secret = secret::new_client_secret();
        let expires = now_ms + PROBE_CLIENT_TTL_MS;
        self.conn.execute(
            "INSERT INTO clients (id, bridge_id, secret_hash, device_name, paired_at, probe_expires_at)
             VALUES (?1, ?2, ?3, 'hermeschat-pair --doctor', ?4, ?5)",
            params![
                client_id,
                bridge_id,
                &secret::digest(&client_secret)[..],
                now_ms as i64,
                expires as i64
            ],
        )?;
        Ok((client_id, client_secret, expires))
    }

    /// Finds the client of `bridge_id` whose secret is `client_secret`. Every candidate digest of
    /// that bridge is compared in constant time, so timing says nothing about the secret.
    pub fn auth_client(
        &self,
        bridge_id: &str,
        client_secret: &str,
        now_ms: u64,
    ) -> StoreResult<Option<Client>> {
        let presented = secret::digest(client_secret);
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, secret_hash, device_name, probe_expires_at FROM clients WHERE bridge_id = ?1",
        )?;
        let mut rows = stmt.query(params![bridge_id])?;
        let mut found = None;
        while let Some(r) = rows.next()? {
            let hash: Vec<u8> = r.get(1)?;
            let probe_expires: Option<i64> = r.get(3)?;
            let live = probe_expires.is_none_or(|e| (now_ms as i64) < e);
            if secret::digests_equal(&presented, &hash) && live {
                found = Some(Client {
                    id: r.get(0)?,
                    bridge_id: bridge_id.to_owned(),
                    device_name: r.get(2)?,
                });
            }
        }
        Ok(found)
    }

    /// Records when a client was last seen (connect and disconnect).
    pub fn touch_client(&self, client_id: &str, now_ms: u64) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE clients SET last_seen_at = ?2 WHERE id = ?1",
            params![client_id, now_ms as i64],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("hcp-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (Store::open(&dir).unwrap(), dir)
    }

    #[test]
    fn the_database_and_its_wal_are_private_even_if_it_was_not() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let (s, dir) = temp_store("mode");
        s.register("mac", None, 1_000).unwrap();
        for name in ["relay.db", "relay.db-wal"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        drop(s);
        // A store from a version that left it 0644.
        std::fs::set_permissions(dir.join("relay.db"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let s = Store::open(&dir).unwrap();
        assert_eq!(mode(&dir.join("relay.db")), 0o600);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pairing_lifecycle() {
        let (mut s, dir) = temp_store("life");
        let (id, relay_secret) = s.register("mac", Some("1"), 1_000).unwrap();
        assert!(s.auth_bridge(&id, &relay_secret).unwrap().is_some());
        assert!(s.auth_bridge(&id, "hrs_wrong").unwrap().is_none());
        let (code, exp) = s.issue_access_code(&id, Some("renamed"), 1_000, 600_000).unwrap();
        assert_eq!(exp, 601_000);
        let Verify::Paired { client_id, client_secret, bridge_name } =
            s.verify(&id, &code, "phone", 2_000).unwrap()
        else {
            panic!("not paired")
        };
        assert_eq!(bridge_name, "renamed");
        assert_eq!(s.verify(&id, &code, "phone", 2_000).unwrap(), Verify::Used);
        let c = s.auth_client(&id, &client_secret, 3_000).unwrap().unwrap();
        assert_eq!(c.id, client_id);
        assert!(s.auth_client(&id, &relay_secret, 3_000).unwrap().is_none());
        assert_eq!(s.list_clients(&id).unwrap().len(), 1);
        assert!(s.revoke(&id, &client_id).unwrap());
        assert!(s.auth_client(&id, &client_secret, 3_000).unwrap().is_none());
        assert!(s.delete_bridge(&id).unwrap());
        assert_eq!(s.verify(&id, &code, "p", 4_000).unwrap(), Verify::BridgeNotFound);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_registrations_that_never_connected_and_have_no_client_expire() {
        let (mut s, dir) = temp_store("unfinished");
        let (never, _) = s.register("never", None, 1_000).unwrap();
        let (connected, _) = s.register("connected", None, 1_000).unwrap();
        let (paired, _) = s.register("paired", None, 1_000).unwrap();
        let (attached, _) = s.register("attached", None, 1_000).unwrap();
        let (young, _) = s.register("young", None, 50_000).unwrap();
        let (revoked, _) = s.register("paired, app revoked", None, 1_000).unwrap();
        s.mark_connected(&connected, 2_000).unwrap();
        for id in [&paired, &revoked] {
            let (code, _) = s.issue_access_code(id, None, 1_000, 600_000).unwrap();
            assert!(matches!(s.verify(id, &code, "phone", 2_000).unwrap(), Verify::Paired { .. }));
        }
        let app = s.list_clients(&revoked).unwrap().remove(0).client_id;
        assert!(s.revoke(&revoked, &app).unwrap());
        let expired = s.expire_unfinished(10_000, |id| id == attached).unwrap();
        assert_eq!(expired, 1);
        assert!(!s.bridge_exists(&never).unwrap(), "the unfinished registration is still there");
        for id in [&connected, &paired, &attached, &young, &revoked] {
            assert!(s.bridge_exists(id).unwrap(), "{id} expired");
        }
        // A later connect does not move the first one.
        s.mark_connected(&young, 60_000).unwrap();
        s.mark_connected(&young, 70_000).unwrap();
        let still_attached = |id: &str| id == attached;
        assert_eq!(s.expire_unfinished(100_000, still_attached).unwrap(), 0, "a bridge expired");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_store_of_an_older_relay_keeps_its_bridges() {
        let dir = std::env::temp_dir().join(format!("hcp-store-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The bridges table as relays before `connected_at` created it, with one bridge.
        let old = Connection::open(dir.join("relay.db")).unwrap();
        old.execute_batch(
            "CREATE TABLE bridges (id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL,
             display_name TEXT NOT NULL, version TEXT, created_at INTEGER NOT NULL,
             code_hash BLOB, code_expires_at INTEGER, code_used INTEGER NOT NULL DEFAULT 0,
             failures INTEGER NOT NULL DEFAULT 0, failures_since INTEGER NOT NULL DEFAULT 0);
             INSERT INTO bridges (id, secret_hash, display_name, created_at)
             VALUES ('000000000000000000000001', x'00', 'old', 5);",
        )
        .unwrap();
        drop(old);
        let s = Store::open(&dir).unwrap();
        // Opened twice: the migration runs once.
        let s2 = Store::open(&dir).unwrap();
        assert_eq!(s.expire_unfinished(u64::MAX >> 2, |_| false).unwrap(), 0);
        assert!(s2.bridge_exists("000000000000000000000001").unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn expiry_and_lockout() {
        let (mut s, dir) = temp_store("lock");
        let (id, _) = s.register("mac", None, 0).unwrap();
        let (code, _) = s.issue_access_code(&id, None, 0, 1_000).unwrap();
        assert_eq!(s.verify(&id, &code, "p", 1_000).unwrap(), Verify::Expired);
        let (code, _) = s.issue_access_code(&id, None, 0, 600_000).unwrap();
        for _ in 0..4 {
            assert_eq!(s.verify(&id, &"0".repeat(32), "p", 10).unwrap(), Verify::Invalid);
        }
        assert_eq!(s.verify(&id, &"0".repeat(32), "p", 10).unwrap(), Verify::TooManyAttempts);
        // The right code is burned too.
        assert_eq!(s.verify(&id, &code, "p", 10).unwrap(), Verify::TooManyAttempts);
        // A fresh code works again.
        let (code, _) = s.issue_access_code(&id, None, 20, 600_000).unwrap();
        assert!(matches!(s.verify(&id, &code, "p", 30).unwrap(), Verify::Paired { .. }));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn live_probe_clients_are_capped_oldest_first() {
        let (s, dir) = temp_store("probecap");
        let (id, _) = s.register("mac", None, 0).unwrap();
        let probes: Vec<_> =
            (0..MAX_LIVE_PROBES + 3).map(|i| s.probe_client(&id, i as u64).unwrap()).collect();
        let live = probes
            .iter()
            .filter(|(_, secret, _)| s.auth_client(&id, secret, 100).unwrap().is_some());
        assert_eq!(live.count(), MAX_LIVE_PROBES);
        // The newest are the ones kept.
        for (_, secret, _) in &probes[3..] {
            assert!(s.auth_client(&id, secret, 100).unwrap().is_some());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn probe_clients_expire_and_are_not_listed() {
        let (s, dir) = temp_store("probe");
        let (id, _) = s.register("mac", None, 0).unwrap();
        let (cid, secret, exp) = s.probe_client(&id, 0).unwrap();
        assert_eq!(s.auth_client(&id, &secret, 1).unwrap().unwrap().id, cid);
        assert!(s.auth_client(&id, &secret, exp).unwrap().is_none());
        assert!(s.list_clients(&id).unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_digests_are_stored() {
        let (mut s, dir) = temp_store("digest");
        let (id, relay_secret) = s.register("mac", None, 0).unwrap();
        let (code, _) = s.issue_access_code(&id, None, 0, 600_000).unwrap();
        let Verify::Paired { client_secret, .. } = s.verify(&id, &code, "p", 1).unwrap() else {
            panic!()
        };
        drop(s);
        let mut raw = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            raw.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        let raw = String::from_utf8_lossy(&raw);
        for secret in [&relay_secret, &client_secret, &code] {
            assert!(!raw.contains(secret.as_str()), "a secret is stored in clear");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
