//! The wire protocol shared by the bridge, the relay and the app (see `docs/PROTOCOL.md`).
//!
//! Everything here is plain data: serde types for the QR payloads, the registry API and the
//! WebSocket frames, the limits of PROTOCOL §6 and the pure validation rules that both the relay
//! and the bridge apply. No I/O lives in this module.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::ops::Deref;

use serde::{Deserialize, Serialize};
use tungstenite::{Bytes, Utf8Bytes};

/// Protocol version carried in the relay QR payload (`v`).
pub const PROTOCOL_VERSION: u32 = 2;

/// Header a bridge sends on `/ws/bridge` so that its own restart can take over its socket.
pub const INSTANCE_HEADER: &str = "X-Hermes-Instance";

/// Header the bridge adds to every local request so the backend knows which app asked.
pub const CLIENT_HEADER: &str = "X-HermesChat-Client";

/// Access codes live this long after issue.
pub const ACCESS_CODE_TTL_MS: u64 = 600_000;

/// Diagnostic (`--doctor`) client credentials live this long.
pub const PROBE_CLIENT_TTL_MS: u64 = 300_000;

/// Wrong access codes allowed for one bridge inside [`ACCESS_CODE_FAILURE_WINDOW_MS`].
pub const ACCESS_CODE_MAX_FAILURES: u32 = 5;

/// The window over which wrong access codes are counted.
pub const ACCESS_CODE_FAILURE_WINDOW_MS: u64 = 600_000;

/// The relay pings every socket this often.
pub const RELAY_PING_INTERVAL_SECS: u64 = 20;

/// A peer silent for this long is closed with [`close_code::IDLE`].
pub const PEER_IDLE_TIMEOUT_SECS: u64 = 60;

/// The bridge reconnects when a pong is this late.
pub const BRIDGE_PONG_TIMEOUT_SECS: u64 = 45;

/// WebSocket close codes used by the relay (PROTOCOL §4).
pub mod close_code {
    /// The bridge socket was replaced by a newer one of the same instance.
    pub const REPLACED_BRIDGE: u16 = 4001;
    /// The app socket was replaced by a newer one of the same client.
    pub const REPLACED_APP: u16 = 4002;
    /// The client was revoked or the bridge deleted.
    pub const REVOKED: u16 = 4003;
    /// Too many bad frames, or a size limit that cannot be answered per request.
    pub const LIMIT: u16 = 4008;
    /// The peer was silent past the idle timeout.
    pub const IDLE: u16 = 4009;
}

/// Size and count limits of PROTOCOL §6. One value is shared by relay and bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest WebSocket message accepted, in bytes.
    pub max_frame: usize,
    /// Largest decoded request body, in bytes.
    pub max_body: usize,
    /// Open requests one app may have at once.
    pub max_open_per_app: usize,
    /// Open requests one bridge may have at once.
    pub max_open_per_bridge: usize,
    /// Headers per request.
    pub max_headers: usize,
    /// Bytes in one header value.
    pub max_header_value: usize,
    /// Bytes in a request path.
    pub max_path: usize,
    /// Outbound bytes queued for one socket before its sources are paused.
    pub max_queued_bytes: usize,
    /// Largest body of a `request.start` (sent in `request.chunk` frames), in bytes.
    pub max_upload: u64,
}

/// What the relay may add to an app's frame before the bridge reads it (the `client` stamp,
/// about 40 bytes): a bridge accepts frames from the relay up to `max_frame` plus this, so an
/// app frame at the limit, which the relay accepts, does not cost the bridge its socket.
pub const RELAY_STAMP_ROOM: usize = 1 << 10;

impl Limits {
    /// The largest message a bridge reads from the relay: [`Limits::max_frame`] and
    /// [`RELAY_STAMP_ROOM`].
    pub fn max_frame_from_relay(&self) -> usize {
        self.max_frame + RELAY_STAMP_ROOM
    }
}

/// Body bytes an app may send in `request.chunk` frames beyond what the bridge last
/// acknowledged with `request.ack`: what one upload may hold in the bridge's memory.
pub const UPLOAD_WINDOW: u64 = 1 << 20;

/// Body bytes every `request.chunk` but the last carries at least, so that an upload's window
/// holds a few dozen pieces, not a million.
pub const UPLOAD_MIN_CHUNK: u64 = 16 << 10;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 16 << 20,
            max_body: 12 << 20,
            max_open_per_app: 32,
            max_open_per_bridge: 256,
            max_headers: 64,
            max_header_value: 8 << 10,
            max_path: 2 << 10,
            max_queued_bytes: 32 << 20,
            max_upload: 1 << 30,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Identifiers

/// True when `s` is `len` lowercase hex digits.
fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A bridgeId: 24 lowercase hex digits.
pub fn is_bridge_id(s: &str) -> bool {
    is_lower_hex(s, 24)
}

/// An access code: 32 lowercase hex digits.
pub fn is_access_code(s: &str) -> bool {
    is_lower_hex(s, 32)
}

/// A relaySecret: `hrs_` and 64 lowercase hex digits.
pub fn is_relay_secret(s: &str) -> bool {
    s.strip_prefix("hrs_").is_some_and(|h| is_lower_hex(h, 64))
}

/// A clientId: `hcl_` and 16 lowercase hex digits.
pub fn is_client_id(s: &str) -> bool {
    s.strip_prefix("hcl_").is_some_and(|h| is_lower_hex(h, 16))
}

/// A clientSecret: `hcs_` and 64 lowercase hex digits.
pub fn is_client_secret(s: &str) -> bool {
    s.strip_prefix("hcs_").is_some_and(|h| is_lower_hex(h, 64))
}

/// A request id: 1–64 characters of `[A-Za-z0-9._-]`.
pub fn is_request_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

// ---------------------------------------------------------------------------------------------
// QR payloads (PROTOCOL §2)

/// The relay pairing QR: `{"v":2,"k":"hp","g","a","s","u","n"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayQr {
    /// Protocol version, always [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Kind, always `"hp"` (Hermes pairing).
    pub k: String,
    /// The bridgeId.
    pub g: String,
    /// The single-use access code.
    pub a: String,
    /// The registry's https URL.
    pub s: String,
    /// The app's relay WebSocket URL (`wss://…/ws/app`).
    pub u: String,
    /// The display name shown in the app.
    pub n: String,
}

impl RelayQr {
    /// Builds the payload for a bridge and a freshly issued access code.
    pub fn new(
        bridge_id: &str,
        access_code: &str,
        registry: &str,
        app_url: &str,
        name: &str,
    ) -> Self {
        RelayQr {
            v: PROTOCOL_VERSION,
            k: "hp".into(),
            g: bridge_id.into(),
            a: access_code.into(),
            s: registry.into(),
            u: app_url.into(),
            n: name.into(),
        }
    }
}

/// The LAN pairing QR: `{"mode":"hermes-local","url","token","expiresAt"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalQr {
    /// Always `"hermes-local"`.
    pub mode: String,
    /// `ws://<lan-ip>:<port>/ws/app`.
    pub url: String,
    /// The single-use pairing token.
    pub token: String,
    /// When the token expires, unix milliseconds.
    pub expires_at: u64,
}

// ---------------------------------------------------------------------------------------------
// Registry API (PROTOCOL §3)

/// Registry error codes (the `code` of an [`ApiError`]).
pub mod api_code {
    /// The request body or query is malformed.
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    /// Missing or wrong credentials.
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    /// No such route.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// The bridgeId is not registered.
    pub const BRIDGE_NOT_FOUND: &str = "BRIDGE_NOT_FOUND";
    /// The clientId is not paired with this bridge.
    pub const CLIENT_NOT_FOUND: &str = "CLIENT_NOT_FOUND";
    /// The access code is wrong.
    pub const ACCESS_CODE_INVALID: &str = "ACCESS_CODE_INVALID";
    /// The access code was already used.
    pub const ACCESS_CODE_USED: &str = "ACCESS_CODE_USED";
    /// The access code expired.
    pub const ACCESS_CODE_EXPIRED: &str = "ACCESS_CODE_EXPIRED";
    /// Too many wrong access codes for this bridge; the current code is burned.
    pub const TOO_MANY_ATTEMPTS: &str = "TOO_MANY_ATTEMPTS";
    /// Per-IP rate limit hit.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// Another bridge instance holds the bridge socket.
    pub const BRIDGE_OWNED: &str = "BRIDGE_OWNED";
    /// A WebSocket endpoint was called without an upgrade.
    pub const UPGRADE_REQUIRED: &str = "UPGRADE_REQUIRED";
    /// The request head or body is too large.
    pub const TOO_LARGE: &str = "TOO_LARGE";
    /// The method is not allowed on this route.
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    /// The relay failed internally (store error).
    pub const INTERNAL: &str = "INTERNAL";
    /// The relay is overloaded (its worker queue is full); retry shortly.
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    /// The relay is stopping and did not carry the request out; retry shortly.
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
}

/// The error body of every failed registry call: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// The error itself.
    pub error: ApiErrorBody,
}

/// The inner object of an [`ApiError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// An UPPER_SNAKE code from [`api_code`].
    pub code: String,
    /// A human sentence.
    pub message: String,
}

impl ApiError {
    /// Builds an error body.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ApiError { error: ApiErrorBody { code: code.into(), message: message.into() } }
    }
}

/// `GET /v1/health` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// True, unless the relay's store is failing (then with status 503 and an `error`).
    pub ok: bool,
    /// The relay's version.
    pub version: String,
}

/// `POST /v1/bridge/register` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// The name the app shows for this bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The bridge software version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `POST /v1/bridge/register` response (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    /// The new bridgeId.
    pub bridge_id: String,
    /// The bridge's secret; shown once.
    pub relay_secret: String,
    /// Where the bridge connects (`wss://…/ws/bridge`).
    pub bridge_relay_url: String,
    /// Where apps connect (`wss://…/ws/app`).
    pub app_relay_url: String,
}

/// A request body naming only the bridge (`access-code`, `delete`, `probe-client`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeRequest {
    /// The bridgeId the caller authenticates for.
    pub bridge_id: String,
    /// A new display name (access-code only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// `POST /v1/bridge/access-code` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessCodeResponse {
    /// The new single-use code.
    pub access_code: String,
    /// Unix milliseconds.
    pub expires_at: u64,
}

/// One paired app in `GET /v1/bridge/clients`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientInfo {
    /// The app's clientId.
    pub client_id: String,
    /// The name the app gave at pairing.
    pub device_name: String,
    /// Unix milliseconds.
    pub paired_at: u64,
    /// Unix milliseconds of the last connect or disconnect, if any.
    pub last_seen_at: Option<u64>,
    /// Whether its socket is attached now.
    pub online: bool,
}

/// `GET /v1/bridge/clients` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientsResponse {
    /// Every paired app (diagnostic credentials excluded).
    pub clients: Vec<ClientInfo>,
}

/// `POST /v1/bridge/clients/revoke` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeRequest {
    /// The bridge.
    pub bridge_id: String,
    /// The app to cut off.
    pub client_id: String,
}

/// `POST /v1/bridge/probe-client` response: a diagnostic app credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeClientResponse {
    /// The temporary clientId.
    pub client_id: String,
    /// The temporary secret.
    pub client_secret: String,
    /// Unix milliseconds.
    pub expires_at: u64,
}

/// `POST /v1/pair/verify` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyRequest {
    /// The bridge from the QR.
    pub bridge_id: String,
    /// The access code from the QR.
    pub access_code: String,
    /// A name for this app install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
}

/// `POST /v1/pair/verify` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResponse {
    /// The new clientId.
    pub client_id: String,
    /// The app's long-term secret.
    pub client_secret: String,
    /// Where the app connects.
    pub app_relay_url: String,
    /// The bridge's display name.
    pub bridge_name: String,
}

/// `GET /v1/internal/hermes/bridge-status` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeStatusResponse {
    /// The bridge exists and the caller may see it.
    pub has_bridge: bool,
    /// Its socket is attached to the relay now.
    pub online: bool,
}

/// Generic `{"ok":true}` body for calls with nothing else to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkResponse {
    /// Always true.
    pub ok: bool,
}

// ---------------------------------------------------------------------------------------------
// Frames (PROTOCOL §5)

/// Headers as carried in frames: one value per lowercase-insensitive name.
pub type Headers = BTreeMap<String, String>;

/// Why a request failed (`response.error` codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The backend refused the connection or broke it.
    BackendUnreachable,
    /// The backend did not answer in time.
    BackendTimeout,
    /// The frame's method, headers or body are unusable.
    BadRequest,
    /// The path is outside the allow-list or malformed.
    ForbiddenPath,
    /// A size limit was exceeded.
    TooLarge,
    /// The app cancelled the request.
    Cancelled,
    /// No bridge is attached to the relay.
    BridgeOffline,
    /// The bridge dropped while the request was open.
    BridgeDisconnected,
    /// Too many open requests.
    Busy,
    /// The bridge is stopping.
    ShuttingDown,
    /// A frame that is not valid JSON or has an unknown type (only in `error` frames).
    BadFrame,
}

impl ErrorCode {
    /// The wire spelling, e.g. `"BRIDGE_OFFLINE"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BackendUnreachable => "BACKEND_UNREACHABLE",
            ErrorCode::BackendTimeout => "BACKEND_TIMEOUT",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::ForbiddenPath => "FORBIDDEN_PATH",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::BridgeOffline => "BRIDGE_OFFLINE",
            ErrorCode::BridgeDisconnected => "BRIDGE_DISCONNECTED",
            ErrorCode::Busy => "BUSY",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::BadFrame => "BAD_FRAME",
        }
    }
}

/// An HTTP request carried to the backend (`type: "request"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestFrame {
    /// Request id, unique among the app's open requests.
    pub id: String,
    /// Stamped by the relay with the sending app's clientId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Stamped by the relay with its number for the app socket the request came on (a
    /// relay-wide counter), and written back on every answer right after `client`: the relay
    /// drops answers whose number is not that of the app's current socket, so a replaced
    /// socket's late answers never reach a new one that reuses the request id. Relay ↔ bridge
    /// only; absent on older relays and in LAN mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn: Option<u64>,
    /// HTTP method.
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Request headers.
    #[serde(default)]
    pub headers: Headers,
    /// The body: UTF-8 text, or base64 when `body_base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<SharedStr>,
    /// Whether `body` is base64.
    #[serde(default, skip_serializing_if = "is_false")]
    pub body_base64: bool,
    /// `request.start` only: the length of the body that follows in `request.chunk` frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

/// A whole response in one frame (`type: "response"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseFrame {
    /// The request id answered.
    pub id: String,
    /// The app the response is for (bridge → relay only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn: Option<u64>,
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    #[serde(default)]
    pub headers: Headers,
    /// The body: UTF-8 text, or base64 when `body_base64`.
    #[serde(default)]
    pub body: String,
    /// Whether `body` is base64. Always written, `false` too: the design spec shows it as a
    /// field of every response, and an app may decode it as one that must be there.
    #[serde(default)]
    pub body_base64: bool,
}

/// Every frame of PROTOCOL §5 and §8, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Frame {
    /// App → bridge: an HTTP request.
    #[serde(rename = "request")]
    Request(RequestFrame),
    /// App → bridge: the head of a request whose body follows in `request.chunk` frames
    /// (`length` bytes in all, at most [`UPLOAD_WINDOW`] of them sent ahead of the bridge's
    /// `request.ack`).
    #[serde(rename = "request.start")]
    RequestStart(RequestFrame),
    /// App → bridge: the next piece of a `request.start`'s body.
    #[serde(rename = "request.chunk")]
    RequestChunk {
        /// The request id.
        id: String,
        /// Stamped by the relay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
        /// The piece: UTF-8 text, or base64 when `body_base64`.
        body: SharedStr,
        /// Whether `body` is base64.
        #[serde(default, rename = "bodyBase64", skip_serializing_if = "is_false")]
        body_base64: bool,
    },
    /// Bridge → app: the backend has taken `bytes` bytes of a `request.start`'s body in all;
    /// the app may send up to [`UPLOAD_WINDOW`] bytes beyond that.
    #[serde(rename = "request.ack")]
    RequestAck {
        /// The request id.
        id: String,
        /// The app (bridge → relay only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
        /// Body bytes taken so far.
        bytes: u64,
    },
    /// App → bridge: abort a request.
    #[serde(rename = "cancel")]
    Cancel {
        /// The request to abort.
        id: String,
        /// Stamped by the relay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
    },
    /// Bridge → app: a whole response.
    #[serde(rename = "response")]
    Response(ResponseFrame),
    /// Bridge → app: the head of a streamed response.
    #[serde(rename = "response.start")]
    ResponseStart {
        /// The request id.
        id: String,
        /// The app (bridge → relay only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
        /// HTTP status.
        status: u16,
        /// Response headers.
        #[serde(default)]
        headers: Headers,
    },
    /// Bridge → app: one piece of a streamed body.
    #[serde(rename = "response.chunk")]
    ResponseChunk {
        /// The request id.
        id: String,
        /// The app (bridge → relay only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
        /// The piece: UTF-8 text, or base64 when `body_base64`.
        body: String,
        /// Whether `body` is base64; always written, as in [`ResponseFrame`].
        #[serde(default, rename = "bodyBase64")]
        body_base64: bool,
    },
    /// Bridge → app: the end of a streamed response.
    #[serde(rename = "response.end")]
    ResponseEnd {
        /// The request id.
        id: String,
        /// The app (bridge → relay only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
    },
    /// Bridge or relay → app: the request failed.
    #[serde(rename = "response.error")]
    ResponseError {
        /// The request id.
        id: String,
        /// The app (bridge → relay only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The app socket's number (relay ↔ bridge only; see [`RequestFrame::conn`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
        /// Why.
        code: ErrorCode,
        /// A human sentence.
        message: String,
    },
    /// Relay → app: whether the bridge is attached.
    #[serde(rename = "bridge.status")]
    BridgeStatus {
        /// True when the bridge socket is up.
        online: bool,
    },
    /// Relay → bridge: an app attached.
    #[serde(rename = "client.connected")]
    ClientConnected {
        /// Its clientId.
        client: String,
        /// Its name.
        #[serde(rename = "deviceName")]
        device_name: String,
    },
    /// Relay → bridge: an app detached; cancel its requests.
    #[serde(rename = "client.disconnected")]
    ClientDisconnected {
        /// Its clientId.
        client: String,
    },
    /// Relay or bridge → peer: a frame could not be used.
    #[serde(rename = "error")]
    Error {
        /// `BAD_FRAME`.
        code: ErrorCode,
        /// What was wrong.
        message: String,
    },
    /// LAN bridge → app: the pairing token was accepted; keep these credentials.
    #[serde(rename = "paired")]
    Paired {
        /// The new clientId.
        #[serde(rename = "clientId")]
        client_id: String,
        /// The app's secret for later connections.
        #[serde(rename = "clientSecret")]
        client_secret: String,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Frame {
    /// The request id a frame refers to, if it is request-scoped.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Frame::Request(r) | Frame::RequestStart(r) => Some(&r.id),
            Frame::Response(r) => Some(&r.id),
            Frame::Cancel { id, .. }
            | Frame::RequestChunk { id, .. }
            | Frame::RequestAck { id, .. }
            | Frame::ResponseStart { id, .. }
            | Frame::ResponseChunk { id, .. }
            | Frame::ResponseEnd { id, .. }
            | Frame::ResponseError { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The `client` field of a request-scoped frame, for routing.
    pub fn client_mut(&mut self) -> Option<&mut Option<String>> {
        match self {
            Frame::Request(r) | Frame::RequestStart(r) => Some(&mut r.client),
            Frame::Response(r) => Some(&mut r.client),
            Frame::Cancel { client, .. }
            | Frame::RequestChunk { client, .. }
            | Frame::RequestAck { client, .. }
            | Frame::ResponseStart { client, .. }
            | Frame::ResponseChunk { client, .. }
            | Frame::ResponseEnd { client, .. }
            | Frame::ResponseError { client, .. } => Some(client),
            _ => None,
        }
    }

    /// The wire name of the frame's type, e.g. `"response.chunk"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Request(_) => "request",
            Frame::RequestStart(_) => "request.start",
            Frame::RequestChunk { .. } => "request.chunk",
            Frame::RequestAck { .. } => "request.ack",
            Frame::Cancel { .. } => "cancel",
            Frame::Response(_) => "response",
            Frame::ResponseStart { .. } => "response.start",
            Frame::ResponseChunk { .. } => "response.chunk",
            Frame::ResponseEnd { .. } => "response.end",
            Frame::ResponseError { .. } => "response.error",
            Frame::BridgeStatus { .. } => "bridge.status",
            Frame::ClientConnected { .. } => "client.connected",
            Frame::ClientDisconnected { .. } => "client.disconnected",
            Frame::Error { .. } => "error",
            Frame::Paired { .. } => "paired",
        }
    }

    /// True for the frames that end a request: `response`, `response.end`, `response.error`.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Frame::Response(_) | Frame::ResponseEnd { .. } | Frame::ResponseError { .. })
    }

    /// True for the frames a bridge sends about a request.
    pub fn is_response(&self) -> bool {
        matches!(
            self,
            Frame::Response(_)
                | Frame::RequestAck { .. }
                | Frame::ResponseStart { .. }
                | Frame::ResponseChunk { .. }
                | Frame::ResponseEnd { .. }
                | Frame::ResponseError { .. }
        )
    }

    /// A `response.error` frame.
    pub fn error(
        id: &str,
        client: Option<&str>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Frame {
        Frame::ResponseError {
            id: id.to_owned(),
            client: client.map(str::to_owned),
            conn: None,
            code,
            message: message.into(),
        }
    }

    /// A `response.error` frame answering `req`: its id, `client` and `conn`.
    pub fn error_for(req: &RequestFrame, code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::ResponseError {
            id: req.id.clone(),
            client: req.client.clone(),
            conn: req.conn,
            code,
            message: message.into(),
        }
    }

    /// A `BAD_FRAME` error frame.
    pub fn bad_frame(message: impl Into<String>) -> Frame {
        Frame::Error { code: ErrorCode::BadFrame, message: message.into() }
    }

    /// Serialises the frame as JSON text.
    pub fn to_json(&self) -> String {
        // Room for the whole frame unless its body needs escapes: one allocation, not a
        // string doubled and copied as it grows.
        let room = 160
            + match self {
                Frame::Response(r) => {
                    r.body.len()
                        + r.headers.iter().map(|(n, v)| n.len() + v.len() + 6).sum::<usize>()
                }
                Frame::ResponseChunk { body, .. } => body.len(),
                _ => 0,
            };
        let mut out = Vec::with_capacity(room);
        // Serialising these types cannot fail: every map key is a string and no custom
        // serialiser returns an error; serde_json writes only UTF-8.
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => String::from_utf8(out).unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

/// A string that may share its memory with the WebSocket message it was read from: the body of
/// a request frame of 64 KiB to 16 MiB is not copied out of its frame ([`parse_message`]). It
/// reads as a `&str` and serialises as a JSON string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SharedStr(
    /// Always valid UTF-8: every constructor takes a `String`, a `&str` or a slice of a
    /// [`Utf8Bytes`] cut at the bounds of a `&str` inside it.
    Bytes,
);

impl SharedStr {
    /// The part of `message` that `part` (a `&str` borrowed from it) covers, without a copy.
    /// `None` when `part` does not lie inside `message`.
    pub fn slice_of(message: &Utf8Bytes, part: &str) -> Option<SharedStr> {
        let whole = message.as_str().as_bytes().as_ptr_range();
        let range = part.as_bytes().as_ptr_range();
        let inside = whole.start <= range.start && range.end <= whole.end;
        inside.then(|| SharedStr(AsRef::<Bytes>::as_ref(message).slice_ref(part.as_bytes())))
    }
}

impl Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        // SAFETY: the bytes are valid UTF-8 (see the field's invariant): they come from a
        // `String` or `&str`, or are the bytes of a `&str` inside a `Utf8Bytes` (whose
        // contents are UTF-8), and a `&str`'s bounds are character boundaries.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl From<SharedStr> for Bytes {
    fn from(s: SharedStr) -> Bytes {
        s.0
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> SharedStr {
        SharedStr(Bytes::from(s))
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> SharedStr {
        SharedStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl Serialize for SharedStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

impl<'de> Deserialize<'de> for SharedStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SharedStr, D::Error> {
        String::deserialize(d).map(SharedStr::from)
    }
}

/// A frame's top level with each value kept as its raw JSON text: how the relay routes
/// request and response frames without decoding their bodies. Names are borrowed from the
/// frame unless written with escapes, and fields keep their order, so reading a frame costs
/// one allocation, not two per field.
#[derive(Debug, Default)]
pub struct RawFrame<'a> {
    fields: Vec<(Cow<'a, str>, &'a str)>,
}

impl<'a> RawFrame<'a> {
    /// The raw JSON text of the field `name`.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Takes the field `name` out of the frame, giving its raw JSON text.
    pub fn remove(&mut self, name: &str) -> Option<&'a str> {
        let at = self.fields.iter().position(|(n, _)| n == name)?;
        Some(self.fields.remove(at).1)
    }

    /// The fields in the order they arrived: each name (decoded) and its raw JSON text.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &'a str)> {
        self.fields.iter().map(|(n, v)| (n.as_ref(), *v))
    }

    /// The frame written anew, with `client` and `conn` (when given) as its first fields and
    /// every other field as it arrived.
    pub fn to_json(&self, client: Option<&str>, conn: Option<u64>) -> String {
        let mut out = String::from("{");
        if let Some(client) = client {
            out.push_str("\"client\":");
            out.push_str(&json_string(client));
        }
        if let Some(conn) = conn {
            if out.len() > 1 {
                out.push(',');
            }
            // Writing to a `String` cannot fail.
            let _ = write!(out, "\"conn\":{conn}");
        }
        for (name, value) in self.fields() {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&json_string(name));
            out.push(':');
            out.push_str(value);
        }
        out.push('}');
        out
    }
}

/// A JSON string borrowed from the text it was read from when it has no escapes.
struct JsonStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for JsonStr<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = JsonStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<JsonStr<'de>, E> {
                Ok(JsonStr(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<JsonStr<'de>, E> {
                Ok(JsonStr(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// Most top-level fields a frame read as a [`RawFrame`] may have. Frames have a dozen at most;
/// the bound keeps a hostile 16 MiB frame of tiny fields from costing the relay a list of
/// millions (and the duplicate check below from costing it their square).
pub const MAX_FIELDS: usize = 64;

/// Reads a frame's top level as a [`RawFrame`] ([`crate::jsonscan`]). A field given twice is
/// refused (the relay forwards a request as the text it arrived as, so it must not check one
/// value of a field while the bridge reads another), and so is a frame of more than
/// [`MAX_FIELDS`] fields.
pub fn parse_raw(text: &str) -> Result<RawFrame<'_>, String> {
    parse_raw_max(text, MAX_FIELDS)
}

/// Fields the relay adds to an app's frame (`client`, `conn`): a frame it accepted with
/// [`MAX_FIELDS`] fields reaches the bridge with this many more.
const STAMP_FIELDS: usize = 2;

/// [`parse_raw`] with at most `max` fields.
fn parse_raw_max(text: &str, max: usize) -> Result<RawFrame<'_>, String> {
    let mut frame = RawFrame { fields: Vec::with_capacity(8) };
    crate::jsonscan::members(text, |name, value| {
        if frame.fields.iter().any(|(n, _)| *n == name) {
            return Err(format!("duplicate field {}", crate::jsonscan::shown_name(&name)));
        }
        if frame.fields.len() == max {
            return Err(format!("more than {max} top-level fields"));
        }
        frame.fields.push((name, value));
        Ok(())
    })?;
    Ok(frame)
}

/// Decodes one small top-level field of a [`RawFrame`]; `Ok(None)` when absent or null.
pub fn raw_field<T: serde::de::DeserializeOwned>(
    raw: &RawFrame<'_>,
    name: &str,
) -> Result<Option<T>, String> {
    match raw.get(name) {
        None => Ok(None),
        Some(v) => serde_json::from_str::<Option<T>>(v)
            .map_err(|e| format!("malformed frame: field {name}: {e}")),
    }
}

/// The `conn` field of a [`RawFrame`] (`Ok(None)` when absent or null), read without a JSON
/// decoder: it is on every frame the relay routes. `parse_raw` checked that the value is valid
/// JSON, so plain digits are a JSON integer; anything else (a string, `-1`, `1e3`, a number
/// past `u64`) is refused, as the typed parse refuses it.
pub fn raw_conn(raw: &RawFrame<'_>) -> Result<Option<u64>, String> {
    match raw.get("conn") {
        None | Some("null") => Ok(None),
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => v
            .parse()
            .map(Some)
            .map_err(|_| "malformed frame: field conn: number too large".to_owned()),
        Some(_) => Err("malformed frame: field conn: expected an unsigned integer".to_owned()),
    }
}

/// [`raw_field`] for a string, borrowed from the frame unless it has escapes.
pub fn raw_str<'a>(raw: &RawFrame<'a>, name: &str) -> Result<Option<Cow<'a, str>>, String> {
    match raw.get(name) {
        None => Ok(None),
        Some(v) => serde_json::from_str::<Option<JsonStr<'a>>>(v)
            .map(|s| s.map(|JsonStr(s)| s))
            .map_err(|e| format!("malformed frame: field {name}: {e}")),
    }
}

/// [`raw_field`] for a field that may be absent but not null, as the typed [`Frame`] parse
/// reads it: the relay must not pass on a frame the bridge would refuse.
fn raw_field_not_null<T: serde::de::DeserializeOwned>(
    raw: &RawFrame<'_>,
    name: &str,
) -> Result<Option<T>, String> {
    raw.get(name)
        .map(|v| serde_json::from_str::<T>(v))
        .transpose()
        .map_err(|e| format!("malformed frame: field {name}: {e}"))
}

/// A request's fields except the body, and the body's length as carried (its JSON text
/// length, an upper bound when escapes are present): enough to check and route it.
pub fn request_head(raw: &RawFrame<'_>) -> Result<(RequestFrame, usize), String> {
    let required = |name: &str| -> Result<String, String> {
        let value = raw_str(raw, name)?;
        value.map(Cow::into_owned).ok_or_else(|| format!("malformed frame: request needs {name}"))
    };
    let body_len = match raw.get("body") {
        None | Some("null") => 0,
        Some(text) if text.starts_with('"') => text.len().saturating_sub(2),
        Some(_) => return Err("malformed frame: body must be a string".into()),
    };
    let head = RequestFrame {
        id: required("id")?,
        client: None,
        conn: None,
        method: required("method")?,
        path: required("path")?,
        headers: raw_field_not_null(raw, "headers")?.unwrap_or_default(),
        body: None,
        body_base64: raw_field_not_null(raw, "bodyBase64")?.unwrap_or(false),
        // `Option<u64>`: `null` is no length, as the typed parse reads it.
        length: raw_field(raw, "length")?,
    };
    Ok((head, body_len))
}

/// Frames from this size up are handled in place: the bridge keeps a request's body as a
/// slice of the message ([`parse_message`]) and the relay forwards the frame as slices of the
/// message it arrived in; smaller frames are cheaper to copy.
pub const LARGE_FRAME: usize = 64 << 10;

/// Parses a received text message like [`parse_frame`]: what both accept reads the same, and
/// what [`parse_frame`] refuses is refused; `tests/fuzz.rs` checks it. Every frame is first
/// read as its members ([`parse_raw`]), so, as at the relay, a frame that is not a JSON
/// object, gives a top-level field twice or has more than [`MAX_FIELDS`] of them (and the
/// relay's two-field stamp) is refused here even where the typed parse would take it. Requests and their chunks, most of what a
/// bridge reads, are built from those members at any size (the typed parse of an internally
/// tagged enum first copies every member into a buffer of its own); other frames are parsed
/// again by [`parse_frame`]. The body of a frame of [`LARGE_FRAME`] or more is kept as a
/// slice of the message ([`SharedStr`]) instead of being copied out of it.
pub fn parse_message(message: &Utf8Bytes) -> Result<Frame, String> {
    let text = message.as_str();
    // Room for the relay's stamp on an app frame at the limit.
    let raw = parse_raw_max(text, MAX_FIELDS + STAMP_FIELDS)
        .map_err(|e| format!("malformed frame: {e}"))?;
    let body = || -> Result<Option<SharedStr>, String> {
        Ok(match raw.get("body") {
            None | Some("null") => None,
            // Without escapes the JSON string's contents are the body itself.
            Some(quoted) if quoted.starts_with('"') && !quoted.contains('\\') => {
                let inner = quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or_default();
                // `raw` borrows from the message, so the slice is found. A copy when the frame
                // is small or the body the smaller part of it: a slice keeps alive the whole
                // buffer the message was read into, and an upload's window counts only body
                // bytes.
                let large = text.len() >= LARGE_FRAME && inner.len() >= text.len() / 2;
                large
                    .then(|| SharedStr::slice_of(message, inner))
                    .flatten()
                    .or_else(|| Some(inner.into()))
            }
            Some(quoted) => Some(
                serde_json::from_str::<String>(quoted)
                    .map_err(|e| format!("malformed frame: field body: {e}"))?
                    .into(),
            ),
        })
    };
    match raw_str(&raw, "type")?.as_deref() {
        Some("request") => {
            let (mut req, _) = request_head(&raw)?;
            req.client = raw_field(&raw, "client")?;
            req.conn = raw_field(&raw, "conn")?;
            req.body = body()?;
            Ok(Frame::Request(req))
        }
        Some("request.chunk") => Ok(Frame::RequestChunk {
            id: raw_str(&raw, "id")?.ok_or("malformed frame: request.chunk needs id")?.into_owned(),
            client: raw_field(&raw, "client")?,
            conn: raw_field(&raw, "conn")?,
            body: body()?.ok_or("malformed frame: request.chunk needs body")?,
            body_base64: raw_field_not_null(&raw, "bodyBase64")?.unwrap_or(false),
        }),
        _ => parse_frame(text),
    }
}

/// `s` as a JSON string: quoted, and escaped as `serde_json` escapes it.
pub fn json_string(s: &str) -> String {
    // Serialising a `str` cannot fail (no map keys, no I/O).
    serde_json::to_string(s).unwrap_or_default()
}

/// The JSON of a `response.chunk` frame whose body is `bytes` in base64, the same text as
/// [`Frame::to_json`] gives. It is written in one pass: base64 needs no escaping, so a 256 KiB
/// chunk is encoded straight into the frame (with SIMD where the CPU has it) instead of into a
/// string that serialisation then scans for escapes and copies.
pub fn base64_chunk_json(
    mut out: String,
    id: &str,
    client: Option<&str>,
    conn: Option<u64>,
    bytes: &[u8],
) -> String {
    out.clear();
    out.reserve(bytes.len().div_ceil(3) * 4 + 128);
    out.push_str(r#"{"type":"response.chunk","id":"#);
    out.push_str(&json_string(id));
    if let Some(client) = client {
        out.push_str(r#","client":"#);
        out.push_str(&json_string(client));
    }
    if let Some(conn) = conn {
        // Writing to a `String` cannot fail.
        let _ = write!(out, r#","conn":{conn}"#);
    }
    out.push_str(r#","body":""#);
    base64_simd::STANDARD.encode_append(bytes, &mut out);
    out.push_str(r#"","bodyBase64":true}"#);
    out
}

/// How [`parse_frame`]'s error for a frame of a type this program does not know begins (one
/// a newer peer speaks), as apart from a malformed frame of a known type.
pub const UNKNOWN_FRAME_TYPE: &str = "unknown frame type: ";

/// Parses a text frame. Errors are worded for a `BAD_FRAME` message.
pub fn parse_frame(text: &str) -> Result<Frame, String> {
    serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("unknown variant") {
            format!("{UNKNOWN_FRAME_TYPE}{msg}")
        } else {
            format!("malformed frame: {msg}")
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Request checks shared by the relay (§6) and the bridge (§7)

/// Checks a request frame against the limits of §6. Returns the error code and message for a
/// `response.error` when it is over a limit or its id is out of spec.
pub fn check_request_limits(
    req: &RequestFrame,
    limits: &Limits,
) -> Result<(), (ErrorCode, String)> {
    let body_len = req.body.as_deref().map_or(0, str::len);
    check_request_limits_sized(req, body_len, limits)
}

/// The length of the request body in `raw` once its JSON escapes are decoded: what the limit
/// is about. Only worth its scan for a body [`check_request_limits_sized`] refused by its
/// carried length, an upper bound (`\"` is one byte, `\/` too, which some JSON encoders
/// write for every `/`, base64's included).
pub fn unescaped_body_len(raw: &RawFrame<'_>) -> usize {
    let Some(text) = raw.get("body").and_then(|t| t.strip_prefix('"')?.strip_suffix('"')) else {
        return 0;
    };
    let bytes = text.as_bytes();
    let (mut len, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            len += 1;
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'u') => {
                // `\uXXXX`: the UTF-8 length of the code unit; a surrogate pair is two escapes
                // for one 4-byte character (2 + 2 counted).
                let unit = text.get(i + 2..i + 6).and_then(|h| u16::from_str_radix(h, 16).ok());
                len += match unit {
                    Some(0..=0x7f) => 1,
                    Some(0x80..=0x7ff) | Some(0xd800..=0xdfff) => 2,
                    _ => 3,
                };
                i += 6;
            }
            _ => {
                len += 1;
                i += 2;
            }
        }
    }
    len
}

/// [`check_request_limits`] with the body's length (as carried: base64 or text) given apart,
/// for callers that keep the body out of the frame (the relay forwards it untouched).
pub fn check_request_limits_sized(
    req: &RequestFrame,
    body_len: usize,
    limits: &Limits,
) -> Result<(), (ErrorCode, String)> {
    if !is_request_id(&req.id) {
        return Err((ErrorCode::BadRequest, "request id must be 1-64 of [A-Za-z0-9._-]".into()));
    }
    if req.path.len() > limits.max_path {
        return Err((ErrorCode::TooLarge, format!("path longer than {} bytes", limits.max_path)));
    }
    if req.headers.len() > limits.max_headers {
        return Err((ErrorCode::TooLarge, format!("more than {} headers", limits.max_headers)));
    }
    if req.headers.values().any(|v| v.len() > limits.max_header_value) {
        return Err((
            ErrorCode::TooLarge,
            format!("a header value is longer than {} bytes", limits.max_header_value),
        ));
    }
    let body_len = if req.body_base64 { body_len / 4 * 3 } else { body_len };
    if body_len > limits.max_body {
        return Err((ErrorCode::TooLarge, format!("body larger than {} bytes", limits.max_body)));
    }
    Ok(())
}

/// `s` as it may appear in a log line or an error message when a peer chose it: control
/// characters escaped (no forged lines, no terminal escapes) and cut to 80 characters.
pub fn shown(s: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// The path prefixes the bridge forwards by default (PROTOCOL §7).
pub const DEFAULT_ALLOWED_PREFIXES: &[&str] = &["/api/", "/v1/", "/health"];

/// Checks a request path against the passthrough rules of §7: a single leading `/`, no scheme,
/// no fragment, no `;`, no `.`/`..` segment even percent-encoded, nothing that decodes to a
/// control character, backslash, `%`, `?`, `#` or invalid UTF-8 (which some servers would
/// decode again, cut, or turn into a separator), and under one of `allowed` prefixes.
pub fn check_path<S: AsRef<str>>(path: &str, allowed: &[S]) -> Result<(), String> {
    if !path.starts_with('/') || path.starts_with("//") {
        return Err("path must start with a single '/'".into());
    }
    // Paths travel percent-encoded: a raw space, control byte, backslash or non-ASCII byte is
    // refused here rather than failing later in the HTTP client.
    if path.bytes().any(|b| b <= b' ' || b >= 0x7f || b == b'\\') {
        return Err("path contains a space, control character, backslash or non-ASCII byte".into());
    }
    if path.contains("://") {
        return Err("path must not contain a scheme".into());
    }
    // A fragment is not part of a request target (RFC 9112), and servers read it differently.
    if path.contains('#') {
        return Err("path must not contain a fragment ('#')".into());
    }
    let route = path.split('?').next().unwrap_or(path);
    // `;` starts path parameters, which some servers drop before resolving `..` (`/api/..;/x`).
    if route.contains(';') {
        return Err("path must not contain ';'".into());
    }
    let decoded = match percent_decode(route) {
        Some(d) => d,
        None => return Err("path decodes to invalid UTF-8".into()),
    };
    if decoded.chars().any(|c| c.is_control() || matches!(c, '\\' | '%' | '?' | '#')) {
        return Err(
            "path decodes to a control character, backslash, '%', '?' or '#' (encoded twice?)"
                .into(),
        );
    }
    if decoded.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err("path must not contain '.' or '..' segments".into());
    }
    let allowed_prefix = |p: &str| match p.strip_suffix('/') {
        Some(dir) => route.starts_with(p) || route == dir,
        None => route == p || route.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')),
    };
    if !allowed.iter().any(|p| allowed_prefix(p.as_ref())) {
        let list: Vec<&str> = allowed.iter().map(AsRef::as_ref).collect();
        return Err(format!("path is outside the allowed prefixes ({})", list.join(", ")));
    }
    Ok(())
}

/// Decodes `%xx` escapes so that `%2e%2e` cannot hide a `..` segment; `None` when the result
/// is not UTF-8 (an overlong `%c0%ae` among others).
fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// Hop-by-hop headers (and Host) that never cross the bridge.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// True when `name` is the header `canonical` as a server may read it: in any case, and with
/// `_` for `-` (CGI and WSGI servers read `Content_Length` as `Content-Length`).
pub fn same_header(name: &str, canonical: &str) -> bool {
    name.len() == canonical.len()
        && name
            .bytes()
            .zip(canonical.bytes())
            .all(|(n, c)| n.eq_ignore_ascii_case(&c) || (n == b'_' && c == b'-'))
}

/// True for the client header ([`CLIENT_HEADER`]) in any spelling: an app must not speak for
/// another.
pub fn is_client_header(name: &str) -> bool {
    same_header(name, CLIENT_HEADER)
}

/// True when a header must not be forwarded (hop-by-hop, Host, or framing the bridge redoes),
/// in any spelling ([`same_header`]).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| same_header(name, h))
        || name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("proxy-") || p.eq_ignore_ascii_case("proxy_"))
}

/// True when `needle` (lowercase ASCII) occurs in `haystack`, ignoring ASCII case; for media
/// types, checked on every response without a lowercased copy.
pub fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    needle.is_empty()
        || haystack
            .as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Longest header name forwarded.
pub const MAX_HEADER_NAME: usize = 256;

/// A header name is a non-empty HTTP token of at most [`MAX_HEADER_NAME`] bytes; a value has
/// no control character but tab.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    let token = !name.is_empty()
        && name.len() <= MAX_HEADER_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("header name {} is not a valid token", shown(name)));
    }
    if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return Err(format!("header {name} contains a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescaped_body_len_counts_decoded_bytes() {
        let len = |body: &str| {
            let text = format!(r#"{{"type":"request","body":{body}}}"#);
            super::unescaped_body_len(&super::parse_raw(&text).unwrap())
        };
        assert_eq!(len(r#""abc""#), 3);
        assert_eq!(len(r#""a\"b\/c\n""#), 6);
        assert_eq!(len(r#""\u0041\u00e9\u20ac""#), 1 + 2 + 3);
        assert_eq!(len(r#""\ud83d\ude00""#), 4);
        assert_eq!(len("null"), 0);
    }
    use super::*;

    #[test]
    fn raw_frames_borrow_names_keep_order_and_refuse_a_name_given_twice() {
        let text = r#"{"type":"response","\u0069d":"a\"b","client":"c","status":200}"#;
        let mut raw = parse_raw(text).unwrap();
        assert!(matches!(raw_str(&raw, "type"), Ok(Some(Cow::Borrowed("response")))));
        // An escaped name or value is decoded into an owned string.
        assert!(matches!(raw_str(&raw, "id"), Ok(Some(Cow::Owned(s))) if s == "a\"b"));
        assert!(raw_str(&raw, "status").unwrap_err().contains("field status"));
        assert_eq!(raw_str(&raw, "none"), Ok(None));
        assert_eq!(raw.remove("client"), Some(r#""c""#));
        assert!(raw.remove("client").is_none());
        assert_eq!(raw.to_json(None, None), r#"{"type":"response","id":"a\"b","status":200}"#);
        let stamped = r#"{"client":"x\ny","type":"response","id":"a\"b","status":200}"#;
        assert_eq!(raw.to_json(Some("x\ny"), None), stamped);
        let stamped = r#"{"client":"x\ny","conn":7,"type":"response","id":"a\"b","status":200}"#;
        assert_eq!(raw.to_json(Some("x\ny"), Some(7)), stamped);
        assert_eq!(parse_raw("{}").unwrap().to_json(Some("c"), None), r#"{"client":"c"}"#);
        assert_eq!(parse_raw("{}").unwrap().to_json(None, Some(0)), r#"{"conn":0}"#);

        // A name given twice is refused, and so are more than MAX_FIELDS fields.
        let fields = |n: usize| (0..n).map(|i| format!(r#""f{i}":{i}"#)).collect::<Vec<_>>();
        for n in [2, 16, MAX_FIELDS - 1] {
            let mut f = fields(n);
            assert!(parse_raw(&format!("{{{}}}", f.join(","))).is_ok(), "{n}");
            f.push(r#""f1":"again""#.into());
            let err = parse_raw(&format!("{{{}}}", f.join(","))).unwrap_err();
            assert!(err.to_string().contains("duplicate field `f1`"), "{n}: {err}");
        }
        assert!(parse_raw(&format!("{{{}}}", fields(MAX_FIELDS).join(","))).is_ok());
        let err = parse_raw(&format!("{{{}}}", fields(MAX_FIELDS + 1).join(","))).unwrap_err();
        assert!(err.to_string().contains("more than 64 top-level fields"), "{err}");
        // An escaped spelling of a name is the same name.
        assert!(parse_raw(r#"{"id":"a","\u0069d":"b"}"#).is_err());
    }

    #[test]
    fn identifiers() {
        assert!(is_bridge_id("0123456789abcdef01234567"));
        assert!(!is_bridge_id("0123456789ABCDEF01234567"));
        assert!(!is_bridge_id("0123456789abcdef0123456"));
        assert!(is_relay_secret(&format!("hrs_{}", "a".repeat(64))));
        assert!(!is_relay_secret(&format!("hcs_{}", "a".repeat(64))));
        assert!(is_client_id("hcl_0123456789abcdef"));
        assert!(is_client_secret(&format!("hcs_{}", "0".repeat(64))));
        assert!(is_request_id("a.b_c-1"));
        assert!(!is_request_id(""));
        assert!(!is_request_id(&"a".repeat(65)));
        assert!(!is_request_id("a b"));
        assert!(!is_request_id("é"));
    }

    #[test]
    fn frames_round_trip_with_wire_names() {
        let text = r#"{"type":"request","id":"1","method":"POST","path":"/api/x","headers":{"a":"b"},"body":"aGk=","bodyBase64":true}"#;
        let frame = parse_frame(text).unwrap();
        let Frame::Request(r) = &frame else { panic!("not a request") };
        assert!(r.body_base64);
        assert_eq!(r.body.as_deref(), Some("aGk="));
        let back = frame.to_json();
        assert!(back.contains(r#""bodyBase64":true"#));

        let err = Frame::error("7", Some("hcl_0123456789abcdef"), ErrorCode::BridgeOffline, "x");
        let json = err.to_json();
        assert!(json.contains(r#""type":"response.error""#));
        assert!(json.contains(r#""code":"BRIDGE_OFFLINE""#));
        assert_eq!(parse_frame(&json).unwrap(), err);

        let chunk =
            parse_frame(r#"{"type":"response.chunk","id":"1","body":"x","bodyBase64":true}"#)
                .unwrap();
        assert!(matches!(chunk, Frame::ResponseChunk { body_base64: true, .. }));
        assert!(parse_frame(r#"{"type":"nope"}"#).unwrap_err().starts_with("unknown frame type"));
        assert!(parse_frame("{").unwrap_err().starts_with("malformed"));
    }

    #[test]
    fn qr_payload_fields() {
        let qr = RelayQr::new("b", "a", "https://r", "wss://r/ws/app", "n");
        assert_eq!(
            serde_json::to_string(&qr).unwrap(),
            r#"{"v":2,"k":"hp","g":"b","a":"a","s":"https://r","u":"wss://r/ws/app","n":"n"}"#
        );
        let local = LocalQr {
            mode: "hermes-local".into(),
            url: "ws://x".into(),
            token: "t".into(),
            expires_at: 5,
        };
        assert_eq!(
            serde_json::to_string(&local).unwrap(),
            r#"{"mode":"hermes-local","url":"ws://x","token":"t","expiresAt":5}"#
        );
    }

    #[test]
    fn paths() {
        let allowed = DEFAULT_ALLOWED_PREFIXES;
        assert!(check_path("/api/health", allowed).is_ok());
        assert!(check_path("/v1/chat/completions?x=1", allowed).is_ok());
        assert!(check_path("/health", allowed).is_ok());
        assert!(check_path("//evil.com/api/", allowed).is_err());
        assert!(check_path("/api/../etc/passwd", allowed).is_err());
        assert!(check_path("/api/%2e%2e/secret", allowed).is_err());
        assert!(check_path("/api/x\r\nHost: y", allowed).is_err());
        assert!(check_path("http://x/api/", allowed).is_err());
        assert!(check_path("/admin", allowed).is_err());
        assert!(check_path("/healthz", allowed).is_err());
        assert!(check_path("/api/a b", allowed).is_err());
        assert!(check_path("/api/é", allowed).is_err());
        // What some server would read as another path (a hostile relay's tries).
        for odd in [
            "/api/x#/../../admin",
            "/api/..;/admin",
            "/api/x;jsessionid=1",
            "/api/..%5c..%5cadmin",
            "/api/..%00/admin",
            "/api/%252e%252e/admin",
            "/api/%%32%65%%32%65/admin",
            "/api/%2e%2e%3f/admin",
            "/api/%c0%ae%c0%ae/admin",
            "/api/%u002e%u002e/admin",
            "/api/a%23b",
        ] {
            assert!(check_path(odd, allowed).is_err(), "{odd}");
        }
        // Encoded text that is none of those still passes.
        assert!(check_path("/api/uploads/caf%C3%A9%20menu?q=%25&x=a;b", allowed).is_ok());
    }

    #[test]
    fn headers() {
        assert!(check_header("X-Ok", "fine").is_ok());
        assert!(check_header("X-Ok", "tab\tfine").is_ok());
        assert!(check_header("Bad Name", "v").is_err());
        assert!(check_header("X", "a\r\nInjected: 1").is_err());
        assert!(check_header("X", "a\x0bb").is_err());
        assert!(check_header(&"X".repeat(MAX_HEADER_NAME + 1), "v").is_err());
        assert!(is_hop_by_hop("Connection"));
        assert!(is_hop_by_hop("Proxy-Anything"));
        assert!(is_hop_by_hop("HOST"));
        assert!(is_hop_by_hop("Content_Length"));
        assert!(is_hop_by_hop("transfer_encoding"));
        assert!(is_hop_by_hop("proxy_authorization"));
        assert!(!is_hop_by_hop("content-type"));
        assert!(!is_hop_by_hop("x_custom"));
        assert!(is_client_header("x_hermeschat_client"));
        assert!(!is_client_header("X-HermesChat-Clients"));
    }

    #[test]
    fn peer_chosen_text_is_shown_escaped_and_short() {
        assert_eq!(shown("plain"), "plain");
        assert_eq!(shown("a\nforged line\u{1b}[2J"), "a\\nforged line\\u{1b}[2J");
        let long = "x".repeat(1000);
        assert_eq!(shown(&long).chars().count(), 81);
    }

    #[test]
    fn conn_is_read_as_the_typed_parse_reads_it() {
        for (value, want) in [
            ("0", Ok(Some(0))),
            ("18446744073709551615", Ok(Some(u64::MAX))),
            ("null", Ok(None)),
            ("18446744073709551616", Err(())),
            ("-1", Err(())),
            ("1.0", Err(())),
            ("1e3", Err(())),
            ("\"1\"", Err(())),
            ("true", Err(())),
        ] {
            let text = format!(r#"{{"type":"response.end","id":"a","client":"c","conn":{value}}}"#);
            let got = raw_conn(&parse_raw(&text).unwrap()).map_err(|_| ());
            assert_eq!(got, want, "{value}");
            let typed = parse_frame(&text).map(|f| match f {
                Frame::ResponseEnd { conn, .. } => conn,
                _ => unreachable!(),
            });
            assert_eq!(typed.map_err(|_| ()), want, "{value}");
        }
        assert_eq!(raw_conn(&parse_raw(r#"{"type":"x"}"#).unwrap()), Ok(None));
    }

    #[test]
    fn limits() {
        let l = Limits::default();
        let mut r = RequestFrame {
            id: "1".into(),
            client: None,
            conn: None,
            method: "GET".into(),
            path: "/api/x".into(),
            headers: Headers::new(),
            body: None,
            body_base64: false,
            length: None,
        };
        assert!(check_request_limits(&r, &l).is_ok());
        r.body = Some("A".repeat(17 << 20).into());
        r.body_base64 = true;
        assert_eq!(check_request_limits(&r, &l).unwrap_err().0, ErrorCode::TooLarge);
        r.body = None;
        r.id = "bad id".into();
        assert_eq!(check_request_limits(&r, &l).unwrap_err().0, ErrorCode::BadRequest);
    }

    #[test]
    fn a_base64_chunk_is_written_as_serialisation_would() {
        use base64::Engine as _;
        for (id, client, conn, bytes) in [
            ("r1", None, None, &b""[..]),
            ("r\"2", Some("hcl_0123"), Some(0), &b"\x00\xff\x10abc"[..]),
            ("r3", Some("c\u{e9}"), Some(u64::MAX), &[7u8; 1000][..]),
            // Every padding case, and a whole 256 KiB chunk of every byte value.
            ("r4", None, None, &[1u8][..]),
            ("r5", Some("c"), Some(12), &[1u8, 2][..]),
            (
                "r6",
                None,
                None,
                &(0..256 << 10).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>()[..],
            ),
        ] {
            let frame = Frame::ResponseChunk {
                id: id.into(),
                client: client.map(Into::into),
                conn,
                body: base64::engine::general_purpose::STANDARD.encode(bytes),
                body_base64: true,
            };
            assert_eq!(base64_chunk_json(String::new(), id, client, conn, bytes), frame.to_json());
            // A reused buffer's old contents are gone.
            let reused = String::from("left over from the last chunk");
            assert_eq!(base64_chunk_json(reused, id, client, conn, bytes), frame.to_json());
        }
    }

    #[test]
    fn a_large_request_keeps_its_body_inside_the_message() {
        let body = "QUJD".repeat(50_000);
        let text = format!(
            r#"{{"type":"request","client":"c1","id":"u1","method":"POST","path":"/api/x","headers":{{"a":"b"}},"body":"{body}","bodyBase64":true}}"#
        );
        let message = Utf8Bytes::from(text.clone());
        let Ok(Frame::Request(r)) = parse_message(&message) else { panic!("not a request") };
        // Everything as the plain parse reads it...
        assert_eq!(Ok(Frame::Request(r.clone())), parse_frame(&text));
        // ...and the body is the message's own bytes, not a copy.
        let inside = message.as_str().as_bytes().as_ptr_range();
        let b = r.body.as_deref().unwrap().as_bytes().as_ptr_range();
        assert!(inside.start <= b.start && b.end <= inside.end);

        // Escapes are decoded (into a copy).
        let escaped = format!(
            r#"{{"type":"request","id":"u2","method":"POST","path":"/p","body":"\u0041{body}"}}"#
        );
        let Ok(Frame::Request(r)) = parse_message(&Utf8Bytes::from(escaped)) else { panic!() };
        assert_eq!(r.body.as_deref(), Some(format!("A{body}").as_str()));

        // Other large frames, malformed ones and a field given twice.
        let chunk = format!(r#"{{"type":"response.chunk","id":"u3","body":"{body}"}}"#);
        assert!(matches!(parse_message(&Utf8Bytes::from(chunk)), Ok(Frame::ResponseChunk { .. })));
        let number = format!(
            r#"{{"type":"request","id":"u4","method":"GET","path":"/","body":5,"x":"{body}"}}"#
        );
        assert!(
            parse_message(&Utf8Bytes::from(number)).unwrap_err().contains("body must be a string")
        );
        let twice = format!(
            r#"{{"type":"request","id":"u5","id":"u6","method":"GET","path":"/","x":"{body}"}}"#
        );
        assert!(
            parse_message(&Utf8Bytes::from(twice)).unwrap_err().contains("duplicate field `id`")
        );
        // A null where the typed parse wants a map or a bool is refused by both parses, at any
        // size, so the relay never passes on a request the bridge would drop.
        for field in [r#""headers":null"#, r#""bodyBase64":null"#] {
            let small =
                format!(r#"{{"type":"request","id":"n","method":"GET","path":"/",{field}}}"#);
            let large = format!(
                r#"{{"type":"request","id":"n","method":"GET","path":"/",{field},"x":"{body}"}}"#
            );
            assert!(parse_frame(&small).is_err(), "{field}");
            assert!(parse_message(&Utf8Bytes::from(large)).is_err(), "{field}");
        }
    }

    #[test]
    fn the_bridge_reader_agrees_with_the_typed_parse_on_edge_cases() {
        let r = r#""type":"request","id":"a","method":"GET","path":"/api/x""#;
        let cases = [
            format!("{{{r}}}"),
            format!(r#"{{{r},"id":"b"}}"#),
            format!(r#"{{{r},"headers":null}}"#),
            format!(r#"{{{r},"headers":{{"a":"b","a":"c"}}}}"#),
            format!(r#"{{{r},"headers":{{"a":1}}}}"#),
            format!(r#"{{{r},"bodyBase64":null}}"#),
            format!(r#"{{{r},"length":null}}"#),
            format!(r#"{{{r},"length":-1}}"#),
            format!(r#"{{{r},"client":null,"body":null}}"#),
            format!(r#"{{{r},"client":"hcl_1","conn":18446744073709551615}}"#),
            format!(r#"{{{r},"conn":null}}"#),
            format!(r#"{{{r},"conn":18446744073709551616}}"#),
            format!(r#"{{{r},"conn":-1}}"#),
            format!(r#"{{{r},"conn":"1"}}"#),
            format!(r#"{{{r},"conn":1.5}}"#),
            r#"{"type":"request.chunk","id":"a","conn":3,"body":"QQ=="}"#.to_owned(),
            r#"{"type":"request.chunk","id":"a","conn":"3","body":"QQ=="}"#.to_owned(),
            r#"{"type":"cancel","id":"a","client":"hcl_1","conn":3}"#.to_owned(),
            format!(r#"{{{r},"body":"x","body":"y"}}"#),
            format!(r#"{{{r},"body":"\ud800"}}"#),
            format!(r#"{{{r},"x":{{"y":[1,2,{{"z":null}}]}}}}"#),
            format!(r#" {{{r}}} "#),
            r#"{"type":"request","\u0069d":"a","method":"GET","path":"/api/x"}"#.to_owned(),
            r#"{"type":"request","id":1,"method":"GET","path":"/api/x"}"#.to_owned(),
            r#"{"type":"request.chunk","id":"a","body":"QQ==","bodyBase64":true}"#.to_owned(),
            r#"{"type":"request.chunk","id":"a","body":null}"#.to_owned(),
            r#"{"type":"request.chunk","id":"a"}"#.to_owned(),
            r#"{"type":"cancel","id":"a"}"#.to_owned(),
            r#"{"type":"nope","id":"a"}"#.to_owned(),
        ];
        for text in cases {
            let (ours, typed) = (parse_message(&Utf8Bytes::from(text.clone())), parse_frame(&text));
            match (&ours, &typed) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{text}: {ours:?} against {typed:?}"),
            }
        }
        // The differences: like the relay, the bridge refuses a frame of too many fields, an
        // unknown field given twice and the array form of a frame.
        let many: String = (0..MAX_FIELDS).map(|i| format!(r#","x{i}":1"#)).collect();
        for (text, why) in [
            (format!("{{{r}{many}}}"), "top-level fields"),
            (format!(r#"{{{r},"x":1,"x":2}}"#), "duplicate field"),
            (r#"{"type":"cancel","id":"a","x":1,"x":2}"#.to_owned(), "duplicate field"),
            (r#"["request","a",null,null,"GET","/api/x"]"#.to_owned(), "JSON object"),
            (r#"["cancel","a"]"#.to_owned(), "JSON object"),
        ] {
            assert!(parse_frame(&text).is_ok(), "{text}");
            let refused = parse_message(&Utf8Bytes::from(text)).unwrap_err();
            assert!(refused.contains(why), "{refused}");
        }
    }

    #[test]
    fn only_the_body_of_a_large_frame_stays_inside_its_message() {
        // A message may be a piece of a larger buffer (tungstenite cuts each message out of
        // its read buffer): a small body kept as a slice would keep all of it alive.
        let body = |len: usize| "QUFB".repeat(len / 4);
        for (len, shared) in [(200, false), (LARGE_FRAME, true)] {
            let frame = format!(
                r#"{{"type":"request","id":"a","method":"POST","path":"/api/x","body":"{}","bodyBase64":true}}"#,
                body(len)
            );
            let mut buffer = frame.clone().into_bytes();
            buffer.resize(4 << 20, b' ');
            let buffer = Bytes::from(buffer);
            let message = Utf8Bytes::try_from(buffer.slice(..frame.len())).unwrap();
            let Ok(Frame::Request(req)) = parse_message(&message) else { panic!("{frame}") };
            let kept = req.body.unwrap();
            assert_eq!(&*kept, body(len));
            let inside = buffer.as_ptr_range().contains(&kept.as_ptr());
            assert_eq!(inside, shared, "body of {len} bytes");
        }
    }
}
