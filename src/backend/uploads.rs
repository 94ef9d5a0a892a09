//! Uploaded files: stored under `<state>/uploads/` as `<id>` (the bytes) and `<id>.json` (the
//! metadata), both 0600. Names are only metadata — files are addressed by a random 32-hex id,
//! so a hostile name (`../../etc/passwd`) never reaches the filesystem.
//!
//! Routes:
//! - `POST /api/upload` (also `/api/uploads`, `/api/files`): `multipart/form-data` (every part
//!   with a filename is stored) or a raw body (name from `?name=`, `X-Filename` or
//!   `Content-Disposition`; type from `Content-Type`) → `{"files":[meta…], …first file's meta}`;
//! - `GET /api/uploads` (or `/api/files`) → `{"files":[meta…]}`, newest first;
//! - `GET /api/uploads/<id>` → the bytes with their content type (`nosniff`, attachment unless
//!   an image or plain text); `DELETE` removes it.
//!
//! Content types are kept when they are well-formed and agree with the bytes: an `image/*`
//! that is not a known image format, or a text type that is not UTF-8, is stored as
//! `application/octet-stream`. [`Store::for_chat`] turns a stored file into a chat content
//! part (images as data URLs, text inlined).

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::Shared;
use super::conn::{Conn, Request};

/// Longest stored file name, in characters.
const MAX_NAME: usize = 128;

/// Most text inlined into a chat message from one file, in bytes.
pub const MAX_INLINE_TEXT: usize = 256 << 10;

/// Most files kept; the oldest are removed past this.
const MAX_FILES: usize = 500;

/// Most bytes kept in all; the oldest files are removed past this (500 files of the 10 MiB
/// upload limit would be 5 GiB of the user's disk).
const MAX_BYTES: u64 = 512 << 20;

/// Metadata of a stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// 32 lowercase hex digits.
    pub id: String,
    /// The sanitised original name.
    pub name: String,
    /// The content type kept (`type/subtype`, lower case).
    pub content_type: String,
    /// What the client declared, when it was not kept.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub declared_type: Option<String>,
    /// `image`, `text` or `binary`.
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Unix ms.
    pub created_at: u64,
    /// Where to fetch it: `/api/uploads/<id>`.
    pub url: String,
}

/// The upload store.
pub struct Store {
    /// `<state>/uploads`.
    dir: PathBuf,
    /// Largest file accepted.
    max_bytes: usize,
    /// Files and bytes kept at most ([`MAX_FILES`], [`MAX_BYTES`]).
    keep: (usize, u64),
    /// Serialises writes and pruning.
    lock: Mutex<()>,
}

/// Why an upload was refused: HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub u16, pub String);

impl Store {
    /// A store in `dir` (created on first write) accepting files up to `max_bytes`.
    pub fn new(dir: PathBuf, max_bytes: usize) -> Store {
        Store { dir, max_bytes, keep: (MAX_FILES, MAX_BYTES), lock: Mutex::new(()) }
    }

    /// Removes what an earlier bridge killed mid-upload (SIGKILL, a power cut) left here: the
    /// temp files of its writes, and stored bytes whose metadata was never written. Neither is
    /// listed, so neither would ever be pruned or counted against the bytes kept. Returns how
    /// many files went. Called once at start.
    pub fn remove_leftovers(&self) -> usize {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = crate::state::remove_stale_temps(&self.dir);
        let Ok(entries) = fs::read_dir(&self.dir) else { return removed };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().filter(|n| is_id(n)) else { continue };
            let has_meta = self.dir.join(format!("{id}.json")).exists();
            if !has_meta && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Stores `bytes` under a fresh id.
    pub fn put(&self, name: &str, declared: &str, bytes: &[u8]) -> Result<Meta, Refused> {
        if bytes.len() > self.max_bytes {
            return Err(Refused(
                413,
                format!("file too large ({} bytes; at most {})", bytes.len(), self.max_bytes),
            ));
        }
        let name = safe_name(name);
        let (content_type, declared_type) = classify(declared, &name, bytes);
        let kind = if content_type.starts_with("image/") {
            "image"
        } else if is_text_type(&content_type) {
            "text"
        } else {
            "binary"
        };
        let id = crate::secret::hex(&crate::secret::random_bytes::<16>());
        let meta = Meta {
            url: format!("/api/uploads/{id}"),
            id,
            name,
            content_type,
            declared_type,
            kind: kind.into(),
            size: bytes.len() as u64,
            sha256: format!("{:x}", Sha256::digest(bytes)),
            created_at: crate::relay::now_ms(),
        };
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let io_err =
            |e: &dyn std::fmt::Display| Refused(500, format!("cannot store the file: {e}"));
        crate::state::ensure_dir(&self.dir).map_err(|e| io_err(&e))?;
        crate::state::write_atomic(&self.dir.join(&meta.id), bytes).map_err(|e| io_err(&e))?;
        if let Err(e) = crate::state::write_json(&self.dir.join(format!("{}.json", meta.id)), &meta)
        {
            // Without its metadata the file would be listed nowhere and never pruned.
            let _ = fs::remove_file(self.dir.join(&meta.id));
            return Err(io_err(&e));
        }
        self.prune(&meta.id);
        Ok(meta)
    }

    /// Every stored file, newest first.
    pub fn list(&self) -> Vec<Meta> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Vec::new() };
        let mut all: Vec<Meta> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".json")?;
                if !is_id(id) {
                    return None;
                }
                crate::state::read_json::<Meta>(&e.path()).ok().flatten()
            })
            .collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        all
    }

    /// A file's metadata and bytes.
    pub fn get(&self, id: &str) -> Option<(Meta, Vec<u8>)> {
        if !is_id(id) {
            return None;
        }
        let meta = crate::state::read_json::<Meta>(&self.dir.join(format!("{id}.json"))).ok()??;
        let bytes = fs::read(self.dir.join(id)).ok()?;
        Some((meta, bytes))
    }

    /// Removes a file; false when there was none.
    pub fn delete(&self, id: &str) -> bool {
        if !is_id(id) {
            return false;
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let a = fs::remove_file(self.dir.join(id)).is_ok();
        let b = fs::remove_file(self.dir.join(format!("{id}.json"))).is_ok();
        a || b
    }

    /// Drops the oldest files past [`MAX_FILES`] or [`MAX_BYTES`], never `just_stored` (the
    /// file whose id the caller is about to answer, whatever the clock said). Called with the
    /// lock held.
    fn prune(&self, just_stored: &str) {
        let (max_files, max_bytes) = self.keep;
        let mut total = 0u64;
        let all = self.list();
        let newest_first = all
            .iter()
            .filter(|m| m.id == just_stored)
            .chain(all.iter().filter(|m| m.id != just_stored));
        for (i, meta) in newest_first.enumerate() {
            total = total.saturating_add(meta.size);
            if i > 0 && (i >= max_files || total > max_bytes) {
                let _ = fs::remove_file(self.dir.join(&meta.id));
                let _ = fs::remove_file(self.dir.join(format!("{}.json", meta.id)));
            }
        }
    }

    /// The chat content part for a stored file: an `image_url` data URL for images, a text
    /// part with the file inlined for text, a short note for anything else.
    pub fn for_chat(&self, id: &str) -> Option<serde_json::Value> {
        let (meta, bytes) = self.get(id)?;
        Some(match meta.kind.as_str() {
            "image" => json!({
                "type": "image_url",
                "image_url": {"url": format!("data:{};base64,{}", meta.content_type, STANDARD.encode(&bytes))},
            }),
            "text" => {
                let text = String::from_utf8_lossy(&bytes);
                let mut cut = text.len().min(MAX_INLINE_TEXT);
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                let more = if cut < text.len() { "\n[… truncated]" } else { "" };
                json!({
                    "type": "text",
                    "text": format!("[file: {}]\n```\n{}{more}\n```", meta.name, &text[..cut]),
                })
            }
            _ => json!({
                "type": "text",
                "text": format!(
                    "[attached file: {} ({}, {} bytes) — binary, not shown]",
                    meta.name, meta.content_type, meta.size
                ),
            }),
        })
    }
}

/// True for a stored-file id: 32 lowercase hex digits.
pub fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for the upload (POST) routes.
pub fn is_upload_route(path: &str) -> bool {
    matches!(path, "/api/upload" | "/api/uploads" | "/api/files")
}

/// True for the list and fetch routes (`/api/uploads/<id>`, `/api/files/<id>`).
pub fn is_files_route(path: &str) -> bool {
    path.starts_with("/api/uploads/") || path.starts_with("/api/files/")
}

/// A file name safe to show and to put in a header: the last path component, control and
/// quote characters dropped, no leading dots, at most `MAX_NAME` characters.
pub fn safe_name(raw: &str) -> String {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(c, '"' | '\'' | '`' | '<' | '>' | ':' | '*' | '?' | '|' | ';')
        })
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim();
    let name: String = cleaned.chars().take(MAX_NAME).collect();
    if name.is_empty() { "upload".to_owned() } else { name }
}

/// The image type the bytes start like, if any.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.len() >= 12
        && &bytes[4..8] == b"ftyp"
        && matches!(&bytes[8..12], b"heic" | b"heix" | b"mif1" | b"msf1" | b"avif")
    {
        Some(if &bytes[8..12] == b"avif" { "image/avif" } else { "image/heic" })
    } else {
        None
    }
}

/// `type/subtype` of a Content-Type value, lower case, when well-formed.
fn media_type(value: &str) -> Option<String> {
    let mt = value.split(';').next()?.trim().to_ascii_lowercase();
    let (t, s) = mt.split_once('/')?;
    let token = |x: &str| {
        !x.is_empty()
            && x.len() <= 64
            && x.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    (token(t) && token(s)).then_some(mt)
}

/// True for types inlined as text.
fn is_text_type(ct: &str) -> bool {
    ct.starts_with("text/")
        || matches!(
            ct,
            "application/json"
                | "application/xml"
                | "application/x-yaml"
                | "application/yaml"
                | "application/javascript"
                | "application/x-sh"
                | "application/toml"
        )
        || ct.ends_with("+json")
        || ct.ends_with("+xml")
}

/// True for names whose extension marks text (when the type says nothing).
fn text_extension(name: &str) -> bool {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    matches!(
        ext.as_str(),
        "txt"
            | "md"
            | "markdown"
            | "csv"
            | "tsv"
            | "json"
            | "yaml"
            | "yml"
            | "toml"
            | "xml"
            | "log"
            | "py"
            | "rs"
            | "js"
            | "ts"
            | "swift"
            | "go"
            | "java"
            | "c"
            | "h"
            | "cpp"
            | "sh"
            | "html"
            | "css"
            | "sql"
            | "ini"
            | "conf"
    )
}

/// The content type to keep (and the declared one when it was overruled).
fn classify(declared: &str, name: &str, bytes: &[u8]) -> (String, Option<String>) {
    let sniffed = sniff_image(bytes);
    let utf8 = std::str::from_utf8(bytes).is_ok();
    let generic = "application/octet-stream".to_owned();
    let Some(mt) = media_type(declared) else {
        // Missing or malformed: go by the bytes and the name.
        let ct = match sniffed {
            Some(img) => img.to_owned(),
            None if utf8 && text_extension(name) => "text/plain".to_owned(),
            None => generic,
        };
        let declared = declared.trim();
        return (ct, (!declared.is_empty()).then(|| declared.chars().take(100).collect()));
    };
    if mt.starts_with("image/") {
        return match sniffed {
            Some(img) => (img.to_owned(), (img != mt).then_some(mt)),
            None => (generic, Some(mt)),
        };
    }
    if is_text_type(&mt) {
        return if utf8 { (mt, None) } else { (generic, Some(mt)) };
    }
    if let Some(img) = sniffed {
        return (img.to_owned(), Some(mt));
    }
    if mt == generic && utf8 && text_extension(name) {
        return ("text/plain".to_owned(), Some(mt));
    }
    (mt, None)
}

/// A percent-decoded query value (lossy UTF-8).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `filename` (or `filename*=UTF-8''…`) of a Content-Disposition value.
fn disposition_param(value: &str, key: &str) -> Option<String> {
    let mut plain = None;
    for part in value.split(';').map(str::trim) {
        let Some((k, v)) = part.split_once('=') else { continue };
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim();
        if k == format!("{key}*") {
            let encoded = v.splitn(3, '\'').nth(2).unwrap_or(v);
            return Some(percent_decode(&encoded.replace('+', "%2B")));
        }
        if k == key {
            plain = Some(v.trim_matches('"').to_owned());
        }
    }
    plain
}

/// One part of a multipart body.
struct Part<'a> {
    /// The form field name.
    field: Option<String>,
    /// The file name, for file parts.
    filename: Option<String>,
    /// The part's Content-Type.
    content_type: String,
    /// The part's bytes.
    data: &'a [u8],
}

/// Splits a `multipart/form-data` body. `Err` for a malformed one.
fn parse_multipart<'a>(body: &'a [u8], content_type: &str) -> Result<Vec<Part<'a>>, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary=").or_else(|| p.strip_prefix("BOUNDARY=")))
        .map(|b| b.trim_matches('"').to_owned())
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or("multipart body without a boundary")?;
    let delim = format!("--{boundary}").into_bytes();
    let find = |hay: &[u8], from: usize, needle: &[u8]| -> Option<usize> {
        hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut pos = find(body, 0, &delim).ok_or("multipart boundary not found")? + delim.len();
    loop {
        if body.get(pos..pos + 2) == Some(b"--") {
            return Ok(parts);
        }
        // Skip the CRLF after the delimiter.
        pos = find(body, pos, b"\r\n").ok_or("truncated multipart body")? + 2;
        let head_end = find(body, pos, b"\r\n\r\n").ok_or("multipart part without headers end")?;
        let head = String::from_utf8_lossy(&body[pos..head_end]).into_owned();
        let data_start = head_end + 4;
        let mut end_delim = b"\r\n".to_vec();
        end_delim.extend_from_slice(&delim);
        let data_end = find(body, data_start, &end_delim).ok_or("multipart part not terminated")?;
        let mut field = None;
        let mut filename = None;
        let mut ct = String::new();
        for line in head.split("\r\n") {
            let Some((name, value)) = line.split_once(':') else { continue };
            let name = name.trim().to_ascii_lowercase();
            if name == "content-disposition" {
                field = disposition_param(value, "name");
                filename = disposition_param(value, "filename");
            } else if name == "content-type" {
                ct = value.trim().to_owned();
            }
        }
        parts.push(Part { field, filename, content_type: ct, data: &body[data_start..data_end] });
        if parts.len() > 32 {
            return Err("too many parts in the multipart body".into());
        }
        pos = data_end + end_delim.len();
    }
}

/// Routes `/api/upload*` and `/api/files*`.
pub fn handle(shared: &Arc<Shared>, req: &Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let path = req.head.path();
    let method = req.head.method.as_str();
    let store = &shared.uploads;
    let id = path.strip_prefix("/api/uploads/").or_else(|| path.strip_prefix("/api/files/"));
    let fail = |c: &mut Conn, status: u16, code: &str, msg: &str| {
        c.error(status, code, msg, close).map(|()| status)
    };
    match (method, id) {
        ("POST" | "PUT", None) => upload(shared, req, c, close),
        ("GET", None) => {
            c.json(200, &json!({"files": store.list()}), close)?;
            Ok(200)
        }
        ("GET" | "HEAD", Some(id)) => {
            let id = id.trim_end_matches('/');
            let Some((meta, bytes)) = store.get(id) else {
                return fail(c, 404, "not_found", "no such file");
            };
            let inline = meta.kind == "image" || meta.content_type == "text/plain";
            let disposition = format!(
                "{}; filename=\"{}\"",
                if inline { "inline" } else { "attachment" },
                meta.name.replace(['"', '\\'], "_")
            );
            let headers = vec![
                ("Content-Type".to_owned(), meta.content_type.clone()),
                ("Content-Disposition".to_owned(), disposition),
                ("X-Content-Type-Options".to_owned(), "nosniff".to_owned()),
                ("Content-Security-Policy".to_owned(), "sandbox".to_owned()),
                ("Cache-Control".to_owned(), "private, max-age=3600".to_owned()),
            ];
            c.start_fixed(200, &headers, Some(bytes.len() as u64), close)?;
            if method == "GET" {
                io::Write::write_all(&mut c.stream, &bytes)?;
            }
            Ok(200)
        }
        ("DELETE", Some(id)) => {
            if store.delete(id.trim_end_matches('/')) {
                c.json(200, &json!({"ok": true}), close)?;
                Ok(200)
            } else {
                fail(c, 404, "not_found", "no such file")
            }
        }
        _ => fail(c, 405, "method_not_allowed", "method not allowed here"),
    }
}

/// `POST /api/upload`: multipart or raw.
fn upload(shared: &Arc<Shared>, req: &Request, c: &mut Conn, close: bool) -> io::Result<u16> {
    let ct = req.head.header("content-type").unwrap_or("").to_owned();
    let store = &shared.uploads;
    let mut stored = Vec::new();
    let result: Result<(), Refused> = (|| {
        if ct.to_ascii_lowercase().starts_with("multipart/") {
            let parts = parse_multipart(&req.body, &ct).map_err(|m| Refused(400, m))?;
            for p in
                parts.iter().filter(|p| p.filename.is_some() || p.field.as_deref() == Some("file"))
            {
                let name = p.filename.clone().unwrap_or_else(|| "upload".into());
                stored.push(store.put(&name, &p.content_type, p.data)?);
            }
            if stored.is_empty() {
                return Err(Refused(400, "the multipart body has no file part".into()));
            }
        } else {
            if req.body.is_empty() {
                return Err(Refused(400, "empty upload".into()));
            }
            let name = req
                .head
                .query("name")
                .or(req.head.query("filename"))
                .map(percent_decode)
                .or_else(|| req.head.header("x-filename").map(str::to_owned))
                .or_else(|| {
                    req.head
                        .header("content-disposition")
                        .and_then(|v| disposition_param(v, "filename"))
                })
                .unwrap_or_else(|| "upload".into());
            stored.push(store.put(&name, &ct, &req.body)?);
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            let mut body = serde_json::to_value(&stored[0]).unwrap_or_else(|_| json!({}));
            body["files"] = json!(stored);
            shared.log(&format!(
                "stored {} upload(s): {}",
                stored.len(),
                stored
                    .iter()
                    .map(|m| format!("{} {} {}B", m.id, m.content_type, m.size))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            c.json(201, &body, close)?;
            Ok(201)
        }
        Err(Refused(status, msg)) => {
            let code = if status == 413 {
                "too_large"
            } else if status == 400 {
                "bad_request"
            } else {
                "internal"
            };
            c.error(status, code, &msg, close)?;
            Ok(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_files_go_past_the_count_or_the_bytes_kept() {
        let dir = std::env::temp_dir().join(format!("hcp-uploads-keep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut store = Store::new(dir.clone(), 1 << 20);
        store.keep = (3, 25);
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(store.put(&format!("f{n}.txt"), "text/plain", b"0123456789").unwrap().id);
            // Distinct creation times: the order is by time.
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        let kept: Vec<String> = store.list().into_iter().map(|m| m.id).collect();
        assert_eq!(kept, vec![ids[4].clone(), ids[3].clone()], "the newest 20 of 25 bytes");
        store.keep = (1, 0);
        store.put("big.txt", "text/plain", &[b'x'; 40]).unwrap();
        assert_eq!(store.list().len(), 1, "the newest file is kept whatever its size");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_types_and_multipart() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_name("...hidden"), "hidden");
        assert_eq!(safe_name("a\r\nb\"c.txt"), "abc.txt");
        assert_eq!(safe_name(""), "upload");
        assert_eq!(safe_name(&"x".repeat(500)).len(), MAX_NAME);
        let png = b"\x89PNG\r\n\x1a\n0000";
        assert_eq!(classify("image/png", "a.png", png), ("image/png".into(), None));
        assert_eq!(
            classify("image/png", "a.png", b"<script>"),
            ("application/octet-stream".into(), Some("image/png".into()))
        );
        assert_eq!(classify("text/plain", "a", &[0xff, 0xfe]).0, "application/octet-stream");
        assert_eq!(classify("x\r\ny", "a.md", b"# hi").0, "text/plain");
        assert_eq!(classify("", "a.bin", png).0, "image/png");
        let body = b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../a b.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nn\r\n--XX--\r\n";
        let parts = parse_multipart(body, "multipart/form-data; boundary=XX").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].filename.as_deref(), Some("../a b.txt"));
        assert_eq!(parts[0].data, b"hello");
        assert_eq!(parts[1].field.as_deref(), Some("note"));
        assert!(parse_multipart(b"garbage", "multipart/form-data; boundary=XX").is_err());
        assert!(parse_multipart(body, "multipart/form-data").is_err());
        assert_eq!(percent_decode("a%20b%2F..%zz"), "a b/..%zz");
    }
}
