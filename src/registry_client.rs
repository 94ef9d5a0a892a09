//! The bridge's client for the registry API (PROTOCOL §3), over one `ureq` agent.
//!
//! The agent uses native-tls with the platform's roots, the same trust policy tungstenite's
//! default connector uses for the relay socket, so registry and relay agree on what is trusted.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use ureq::Agent;
use ureq::tls::{RootCerts, TlsConfig, TlsProvider};

use crate::protocol::{self as p, ApiError};

/// Why a registry call failed.
#[derive(Debug)]
pub enum RegistryError {
    /// The registry could not be reached (DNS, refused, TLS, timeout).
    Unreachable {
        /// The URL called.
        url: String,
        /// What went wrong.
        cause: String,
    },
    /// The registry answered with an error body.
    Api {
        /// HTTP status.
        status: u16,
        /// `error.code`.
        code: String,
        /// `error.message`.
        message: String,
    },
    /// The registry answered something that is not the protocol.
    BadResponse {
        /// The URL called.
        url: String,
        /// What was wrong.
        cause: String,
    },
}

impl RegistryError {
    /// The API error code, if the registry answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            RegistryError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Unreachable { url, cause } => {
                write!(f, "cannot reach the registry at {url}: {cause}")
            }
            RegistryError::Api { status, code, message } => {
                write!(f, "the registry refused: {message} ({status} {code})")
            }
            RegistryError::BadResponse { url, cause } => {
                write!(f, "{url} did not answer like a HermesChat registry: {cause}")
            }
        }
    }
}

impl std::error::Error for RegistryError {}

/// OpenSSL's words for an https:// URL whose server answers in plain HTTP ("wrong version
/// number"), said plainly; other causes as they are, without the HTTP client's name for the
/// kind of error in front ("io: Connection refused").
fn plain_cause(url: &str, cause: String) -> String {
    let cause = match cause.strip_prefix("io: ") {
        Some(said) => said.to_owned(),
        None => cause,
    };
    if url.starts_with("https://") && cause.contains("wrong version number") {
        "the server does not speak TLS there (is it http://?)".to_owned()
    } else {
        with_trust_hint(cause)
    }
}

/// `cause` with the next step added when it is a certificate this machine does not trust (a
/// relay behind `tls internal` or another private CA): where the CA has to go.
pub fn with_trust_hint(cause: String) -> String {
    // OpenSSL 3 and 1.1 spell the first differently; macOS's Security framework says "not
    // trusted".
    let untrusted = [
        "self-signed certificate",
        "self signed certificate",
        "unable to get local issuer certificate",
        "certificate verify failed",
        "not trusted",
    ];
    if !untrusted.iter().any(|u| cause.contains(u)) {
        return cause;
    }
    let place = if cfg!(target_os = "macos") {
        "trust its CA in Keychain Access"
    } else {
        "add its CA to the system store (/usr/local/share/ca-certificates, then \
         update-ca-certificates) or name its PEM file in SSL_CERT_FILE"
    };
    format!(
        "{cause}; this machine does not trust the relay's certificate: if it comes from a private CA, {place}"
    )
}

/// What an answer without the relay's JSON error body most likely is, for the statuses a
/// reverse proxy gives when it cannot reach the relay behind it (nginx and Caddy answer
/// `502 Bad Gateway` while the relay is stopped, `504` when it does not answer in time, and a
/// `503` page when the upstream is marked down). `None` for any other status. The relay's own
/// answers always carry a JSON error, so such a page comes from something in front of it.
pub fn proxy_page(status: u16) -> Option<String> {
    let reason = match status {
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => return None,
    };
    Some(format!(
        "the proxy in front of the relay answered HTTP {status} ({reason}): the relay behind it \
         is not running, or the proxy cannot reach it (is hermeschat-relay started, on the \
         address the proxy's configuration names?)"
    ))
}

/// An HTTP agent for loopback only (without a proxy: proxy settings from the
/// environment never apply to this machine's own servers).
pub fn local_agent(timeout: Duration) -> Agent {
    agent_with(timeout, None)
}

/// Builds the crate's one kind of HTTP agent: native-tls with platform roots, status codes
/// returned as responses (error bodies carry the protocol's codes), a global deadline per
/// call, and the proxy given (`None`: every call goes direct).
fn agent_with(timeout: Duration, proxy: Option<ureq::Proxy>) -> Agent {
    let tls = TlsConfig::builder()
        .provider(TlsProvider::NativeTls)
        .root_certs(RootCerts::PlatformVerifier)
        .build();
    let config = Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(Duration::from_secs(5)))
        .proxy(proxy);
    config.build().new_agent()
}

/// A registry at a base URL (`https://relay.example.com`).
pub struct Registry {
    base: String,
    agent: Agent,
    /// Why the proxy the environment names for `base` cannot be used: every call fails with it.
    proxy_error: Option<String>,
}

impl Registry {
    /// A client for the registry at `base`.
    ///
    /// The proxy is the one the relay socket uses for the same host (`crate::netproxy`:
    /// `https_proxy`/`http_proxy`/`all_proxy` by scheme, `no_proxy`, loopback always direct).
    pub fn new(base: &str) -> Registry {
        let base = base.trim_end_matches('/').to_owned();
        let target = base.parse::<ureq::http::Uri>().ok();
        let scheme = target.as_ref().and_then(|u| u.scheme_str()).unwrap_or("https").to_owned();
        let host = target.as_ref().and_then(|u| u.host()).unwrap_or_default();
        let host = host.trim_matches(['[', ']']).to_owned();
        // A proxy the relay socket would use but ureq cannot is an error, never a silent
        // direct connection.
        let (proxy, proxy_error) = match crate::netproxy::for_target(&scheme, &host) {
            Ok(None) => (None, None),
            Ok(Some(p)) => match ureq::Proxy::new(&p.url()) {
                Ok(proxy) => (Some(proxy), None),
                Err(e) => (None, Some(format!("the proxy {} from {}: {e}", p.shown(), p.var))),
            },
            Err(e) => (None, Some(e)),
        };
        Registry { base, agent: agent_with(Duration::from_secs(15), proxy), proxy_error }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&B>,
    ) -> Result<T, RegistryError> {
        let url = format!("{}{path}", self.base);
        // The query (ids only) is logged nowhere; secrets travel only in the header.
        let shown = url.split('?').next().unwrap_or(&url).to_owned();
        if let Some(cause) = &self.proxy_error {
            return Err(RegistryError::Unreachable { url: shown, cause: cause.clone() });
        }
        let auth = bearer.map(|s| format!("Bearer {s}"));
        let result = if method == "GET" {
            let mut req = self.agent.get(&url).header("Accept", "application/json");
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        } else {
            let mut req = self.agent.post(&url).header("Accept", "application/json");
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            match body {
                Some(b) => req.send_json(b),
                None => req.send_json(serde_json::json!({})),
            }
        };
        let mut resp = result.map_err(|e| RegistryError::Unreachable {
            url: shown.clone(),
            cause: plain_cause(&url, e.to_string()),
        })?;
        let status = resp.status().as_u16();
        let text =
            resp.body_mut().with_config().limit(1 << 20).read_to_string().map_err(|e| {
                RegistryError::Unreachable { url: shown.clone(), cause: e.to_string() }
            })?;
        if (200..300).contains(&status) {
            return serde_json::from_str(&text).map_err(|e| RegistryError::BadResponse {
                url: shown,
                cause: format!("HTTP {status}: {e}"),
            });
        }
        match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => {
                Err(RegistryError::Api { status, code: e.error.code, message: e.error.message })
            }
            // A proxy's error page: the registry is out of reach behind it, not wrong.
            Err(_) => Err(match proxy_page(status) {
                Some(cause) => RegistryError::Unreachable { url: shown, cause },
                None => RegistryError::BadResponse {
                    url: shown,
                    cause: format!("HTTP {status} without an error body"),
                },
            }),
        }
    }

    /// `GET /v1/health`.
    pub fn health(&self) -> Result<p::HealthResponse, RegistryError> {
        self.call::<(), _>("GET", "/v1/health", None, None)
    }

    /// `POST /v1/bridge/register`.
    pub fn register(&self, display_name: &str) -> Result<p::RegisterResponse, RegistryError> {
        let body = p::RegisterRequest {
            display_name: Some(display_name.to_owned()),
            version: Some(crate::VERSION.to_owned()),
        };
        self.call("POST", "/v1/bridge/register", None, Some(&body))
    }

    /// `POST /v1/bridge/access-code`.
    pub fn access_code(
        &self,
        bridge_id: &str,
        relay_secret: &str,
        display_name: Option<&str>,
    ) -> Result<p::AccessCodeResponse, RegistryError> {
        let body = p::BridgeRequest {
            bridge_id: bridge_id.to_owned(),
            display_name: display_name.map(str::to_owned),
        };
        self.call("POST", "/v1/bridge/access-code", Some(relay_secret), Some(&body))
    }

    /// `POST /v1/bridge/delete`.
    pub fn delete(&self, bridge_id: &str, relay_secret: &str) -> Result<(), RegistryError> {
        let body = p::BridgeRequest { bridge_id: bridge_id.to_owned(), display_name: None };
        self.call::<_, serde_json::Value>(
            "POST",
            "/v1/bridge/delete",
            Some(relay_secret),
            Some(&body),
        )
        .map(|_| ())
    }

    /// `GET /v1/bridge/clients`.
    pub fn clients(
        &self,
        bridge_id: &str,
        relay_secret: &str,
    ) -> Result<Vec<p::ClientInfo>, RegistryError> {
        let path = format!("/v1/bridge/clients?bridgeId={bridge_id}");
        self.call::<(), p::ClientsResponse>("GET", &path, Some(relay_secret), None)
            .map(|r| r.clients)
    }

    /// `POST /v1/bridge/clients/revoke`.
    pub fn revoke(
        &self,
        bridge_id: &str,
        relay_secret: &str,
        client_id: &str,
    ) -> Result<(), RegistryError> {
        let body =
            p::RevokeRequest { bridge_id: bridge_id.to_owned(), client_id: client_id.to_owned() };
        self.call::<_, serde_json::Value>(
            "POST",
            "/v1/bridge/clients/revoke",
            Some(relay_secret),
            Some(&body),
        )
        .map(|_| ())
    }

    /// `POST /v1/bridge/probe-client`: a diagnostic app credential for `--doctor` (valid a few
    /// minutes, never listed as a device; no user's secret is ever borrowed).
    pub fn probe_client(
        &self,
        bridge_id: &str,
        relay_secret: &str,
    ) -> Result<p::ProbeClientResponse, RegistryError> {
        let body = p::BridgeRequest { bridge_id: bridge_id.to_owned(), display_name: None };
        self.call("POST", "/v1/bridge/probe-client", Some(relay_secret), Some(&body))
    }

    /// `GET /v1/internal/hermes/bridge-status`.
    pub fn bridge_status(
        &self,
        bridge_id: &str,
        secret: &str,
    ) -> Result<p::BridgeStatusResponse, RegistryError> {
        let path = format!("/v1/internal/hermes/bridge-status?bridgeId={bridge_id}");
        self.call::<(), _>("GET", &path, Some(secret), None)
    }
}
