//! The bridge's client for the registry API (PROTOCOL §3), over one `ureq` agent.
//!
//! The agent uses native-tls with the platform's roots, the same trust policy tungstenite's
//! default connector uses for the relay socket, so registry and relay agree on what is trusted.
//! Its TCP step is [`crate::tcp_connect`]'s (Happy Eyeballs). An error this machine causes (a
//! certificate its store does not trust, a name its resolver cannot find) says so and what to
//! do ([`with_trust_hint`], [`with_dns_hint`], [`is_this_machines_side`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use ureq::Agent;
use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
use ureq::unversioned::resolver::{DefaultResolver, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, LazyBuffers,
    NativeTlsConnector, NextTimeout, Transport,
};

use crate::http::is_timeout;
use crate::protocol::{self as p, ApiError};
use crate::tcp_connect::{UNRESOLVED, with_dns_hint};

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
        with_dns_hint(with_trust_hint(cause))
    }
}

/// `cause` with the next step added when it is a certificate this machine does not trust (a
/// relay behind `tls internal` or another private CA, or a machine with no CA store at all):
/// where the CA has to go, for the store this machine has now.
pub fn with_trust_hint(cause: String) -> String {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let trust = TrustEnv { cert_file: var("SSL_CERT_FILE"), cert_dir: var("SSL_CERT_DIR") };
    trust_hint(cause, &trust, &|path: &Path| {
        std::fs::read_dir(path).map_or(path.is_file(), |mut entries| entries.next().is_some())
    })
}

/// What OpenSSL is told to trust through the environment (`SSL_CERT_FILE`, `SSL_CERT_DIR`).
struct TrustEnv {
    /// `SSL_CERT_FILE`, when set and not empty.
    cert_file: Option<PathBuf>,
    /// `SSL_CERT_DIR`, when set and not empty.
    cert_dir: Option<PathBuf>,
}

/// The CA bundle files native-tls loads on Linux when `SSL_CERT_FILE` names none (the list
/// of `openssl-probe`, in its order: the first that exists is used). A static build has no
/// compiled-in OpenSSL directory worth the name, so these are all it looks at.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
    "/opt/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/certs/cacert.pem",
];

/// The CA directories (one certificate per hashed name) native-tls loads on Linux besides.
const CA_DIRS: &[&str] = &["/etc/ssl/certs", "/etc/pki/tls/certs", "/etc/security/certificates"];

/// [`with_trust_hint`] with its inputs passed in: `usable` tells whether a path is a file or a
/// directory with something in it.
fn trust_hint(cause: String, trust: &TrustEnv, usable: &dyn Fn(&Path) -> bool) -> String {
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
    // OpenSSL's words for a certificate of another name: no CA store change helps there.
    if ["hostname mismatch", "IP address mismatch"].iter().any(|m| cause.contains(m)) {
        return format!(
            "{cause}; the relay's certificate is not issued for the host in this URL: use the \
             name it is issued for (the relay's --public-url, and the same in --server), or \
             give the relay a certificate for this name"
        );
    }
    if cfg!(target_os = "macos") {
        return format!(
            "{cause}; {DISTRUST}: if it comes from a private CA, trust its CA in Keychain Access"
        );
    }
    // A variable naming nothing is ignored by OpenSSL without a word: say it. SSL_CERT_DIR
    // may list several directories, as PATH does.
    let named_nothing = |name: &str, path: &Path, fix: &str| {
        format!(
            "{cause}; {DISTRUST}: {name} names {}, which does not exist here (or is empty): \
             {fix}, or unset it to use the system store",
            path.display()
        )
    };
    if let Some(file) = trust.cert_file.as_deref().filter(|f| !usable(f)) {
        return named_nothing("SSL_CERT_FILE", file, "point it at the PEM file of the relay's CA");
    }
    if let Some(dirs) = &trust.cert_dir
        && !std::env::split_paths(dirs).any(|d| usable(&d))
    {
        let fix = "point it at a directory of hashed CA certificates (openssl rehash)";
        return named_nothing("SSL_CERT_DIR", dirs, fix);
    }
    if let Some(file) = &trust.cert_file {
        return format!(
            "{cause}; {DISTRUST}: SSL_CERT_FILE names {}, which does not hold the CA that \
             signed it: add that CA's PEM to the file",
            file.display()
        );
    }
    let bundle = CA_BUNDLES.iter().map(Path::new).find(|p| usable(p));
    let any_dir = CA_DIRS.iter().map(Path::new).any(usable);
    match bundle {
        None if !any_dir && trust.cert_dir.is_none() => format!(
            "{cause}; {NO_CA_STORE} (no {}, {} or {}, nor the other \
             usual places; a minimal container?), so it trusts no relay, public or private: \
             install the ca-certificates package, or copy a CA bundle (with the relay's CA in \
             it, if that is private) to {}, or name a PEM file in SSL_CERT_FILE",
            CA_BUNDLES[0], CA_BUNDLES[2], CA_BUNDLES[5], CA_BUNDLES[0]
        ),
        // Fedora, RHEL and their kin build the bundle from their own anchors directory.
        Some(file) if file.starts_with("/etc/pki") => format!(
            "{cause}; {DISTRUST} (this machine's store: {}): if it comes from a private CA, \
             add its CA to /etc/pki/ca-trust/source/anchors, then update-ca-trust, or name its \
             PEM file in SSL_CERT_FILE",
            file.display()
        ),
        _ => {
            let store = bundle.map(|f| format!(" (this machine's store: {})", f.display()));
            format!(
                "{cause}; {DISTRUST}{}: if it comes from a private CA, add its CA to the system \
                 store (/usr/local/share/ca-certificates, then update-ca-certificates) or name \
                 its PEM file in SSL_CERT_FILE",
                store.unwrap_or_default()
            )
        }
    }
}

/// Whether `cause` is one [`with_trust_hint`] or [`with_dns_hint`] explained as this
/// machine's side (its CA store, its resolver), or a proxy variable that cannot be used, where
/// checking the relay is no help.
pub fn is_this_machines_side(cause: &str) -> bool {
    use crate::netproxy::{UNSUPPORTED_SCHEME, UNUSABLE_URL};
    [DISTRUST, NO_CA_STORE, UNRESOLVED, UNSUPPORTED_SCHEME, UNUSABLE_URL]
        .iter()
        .any(|marker| cause.contains(marker))
}

/// How [`with_trust_hint`] begins its explanation of a certificate this machine's store lacks.
const DISTRUST: &str = "this machine does not trust the relay's certificate";
/// How [`with_trust_hint`] says that this machine has no CA store at all.
const NO_CA_STORE: &str = "this machine has no CA certificates at all";

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
/// call, and the proxy given (`None`: every call goes direct). TCP connections are opened
/// Happy Eyeballs style by [`crate::tcp_connect`], as the relay socket's are.
fn agent_with(timeout: Duration, proxy: Option<ureq::Proxy>) -> Agent {
    agent_resolving(timeout, proxy, DefaultResolver::default())
}

/// [`agent_with`] with the given resolver (the system's, but for tests).
fn agent_resolving(
    timeout: Duration,
    proxy: Option<ureq::Proxy>,
    resolver: impl Resolver,
) -> Agent {
    let tls = TlsConfig::builder()
        .provider(TlsProvider::NativeTls)
        .root_certs(RootCerts::PlatformVerifier)
        .build();
    let config = Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .proxy(proxy);
    // ureq's default chain with our TCP connector in place of its own, which tries the
    // addresses one after another (a dead first address costs most of the connect timeout).
    // No SOCKS connector: `netproxy` refuses every proxy but http://.
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(HappyEyeballsConnector)
            .chain(NativeTlsConnector::default());
    Agent::with_parts(config.build(), connector, resolver)
}

/// ureq's TCP step through [`crate::tcp_connect::connect_addrs`]: the addresses ureq resolved
/// (the proxy's, for a CONNECT tunnel) raced Happy Eyeballs style, each attempt given the
/// call's connect timeout. Failures are ureq's own kinds (`Error::Io`, `Error::Timeout`), so
/// they read as ureq's connector's did.
#[derive(Debug)]
struct HappyEyeballsConnector;

impl<In: Transport> Connector<In> for HappyEyeballsConnector {
    type Out = Either<In, TcpTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        // A CONNECT tunnel made before this step is the connection.
        if let Some(tunnel) = chained {
            return Ok(Some(Either::A(tunnel)));
        }
        let timeout = details.timeout.not_zero().map_or(CONNECT_TIMEOUT, |t| *t);
        let stream = crate::tcp_connect::connect_addrs(details.addrs.to_vec(), timeout).map_err(
            |e| match e {
                Some(e) if is_timeout(&e) => ureq::Error::Timeout(details.timeout.reason),
                Some(e) => ureq::Error::Io(e),
                None => ureq::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "Connection refused",
                )),
            },
        )?;
        let config = details.config;
        let buffers = LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
        // Not registered with `register_shutdown`: that serves `Agent::shutdown`, never called.
        Ok(Some(Either::B(TcpTransport { stream, buffers })))
    }
}

/// The connect timeout of every call (the global deadline is the agent's).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A plain TCP socket as ureq's transport (ureq does not export its own): blocking I/O with
/// each call's remaining deadline as the socket's timeout.
#[derive(Debug)]
struct TcpTransport {
    stream: TcpStream,
    buffers: LazyBuffers,
}

impl TcpTransport {
    /// `timeout` as a socket timeout (`None`: no deadline), or the timeout error when it has
    /// already passed.
    fn deadline(timeout: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        Ok(timeout.not_zero().map(|t| *t))
    }
}

impl Transport for TcpTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        self.stream.set_write_timeout(Self::deadline(timeout)?)?;
        match self.stream.write_all(&self.buffers.output()[..amount]) {
            Ok(()) => Ok(()),
            Err(e) if is_timeout(&e) => Err(ureq::Error::Timeout(timeout.reason)),
            Err(e) => Err(e.into()),
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        self.stream.set_read_timeout(Self::deadline(timeout)?)?;
        let read = loop {
            match self.stream.read(self.buffers.input_append_buf()) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        match read {
            Ok(n) => {
                self.buffers.input_appended(n);
                Ok(n > 0)
            }
            Err(e) if is_timeout(&e) => Err(ureq::Error::Timeout(timeout.reason)),
            Err(e) => Err(e.into()),
        }
    }

    /// A pooled connection the server closed (or sent stray bytes on) is not reused.
    fn is_open(&mut self) -> bool {
        crate::http::still_open(&self.stream)
    }
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
        Registry::with_parts(base, &|name| std::env::var(name).ok(), DefaultResolver::default())
    }

    /// [`Registry::new`] with the environment read by `var` and the given resolver (the
    /// process's and the system's, but for tests).
    fn with_parts(
        base: &str,
        var: &dyn Fn(&str) -> Option<String>,
        resolver: impl Resolver,
    ) -> Registry {
        let base = base.trim_end_matches('/').to_owned();
        let target = base.parse::<ureq::http::Uri>().ok();
        let scheme = target.as_ref().and_then(|u| u.scheme_str()).unwrap_or("https").to_owned();
        let host = target.as_ref().and_then(|u| u.host()).unwrap_or_default();
        let host = host.trim_matches(['[', ']']).to_owned();
        // A proxy the relay socket would use but ureq cannot is an error, never a silent
        // direct connection.
        let (proxy, proxy_error) = match crate::netproxy::choose(&scheme, &host, var) {
            Ok(None) => (None, None),
            Ok(Some(p)) => match ureq::Proxy::new(&p.url()) {
                Ok(proxy) => (Some(proxy), None),
                Err(e) => (None, Some(format!("the proxy {} from {}: {e}", p.shown(), p.var))),
            },
            Err(e) => (None, Some(e)),
        };
        let agent = agent_resolving(Duration::from_secs(15), proxy, resolver);
        Registry { base, agent, proxy_error }
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

/// Linux only: the black hole is a Linux listen queue, the refusal's words Linux's.
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;
    use ureq::unversioned::resolver::ResolvedSocketAddrs;

    /// A DNS answer fixed in advance, whatever the name.
    #[derive(Debug)]
    struct Answer(Vec<SocketAddr>);

    impl Resolver for Answer {
        fn resolve(
            &self,
            _uri: &ureq::http::Uri,
            _config: &ureq::config::Config,
            _timeout: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            let mut addrs = self.empty();
            for a in &self.0 {
                addrs.push(*a);
            }
            Ok(addrs)
        }
    }

    /// A relay running in this process on a loopback port, stopped and its data removed on drop.
    struct InProcessRelay {
        addr: SocketAddr,
        stop: crate::relay::StopHandle,
        running: Option<std::thread::JoinHandle<std::io::Result<()>>>,
        dir: std::path::PathBuf,
    }

    impl InProcessRelay {
        fn start() -> InProcessRelay {
            let dir = std::env::temp_dir().join(format!(
                "hc-registry-client-{}-{}",
                std::process::id(),
                u64::from_le_bytes(crate::secret::random_bytes::<8>())
            ));
            let listen = "127.0.0.1:0".parse().unwrap();
            let relay =
                crate::relay::Relay::bind(crate::relay::RelayConfig::new(listen, dir.clone()))
                    .unwrap();
            let addr = relay.local_addr().unwrap();
            let flag = Arc::new(AtomicBool::new(false));
            let stop = relay.stop_handle(flag.clone());
            let running = Some(std::thread::spawn(move || relay.run(flag)));
            InProcessRelay { addr, stop, running, dir }
        }
    }

    impl Drop for InProcessRelay {
        fn drop(&mut self) {
            self.stop.stop();
            if let Some(r) = self.running.take() {
                let _ = r.join();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A registry whose name resolves to seven black-holed addresses, then the relay's (as a
    /// AAAA answer whose route drops everything would; IPv4 here, so that hosts without IPv6
    /// loopback run it too): the call goes through at once.
    /// Tried one after another, the dead addresses would take ureq's whole 5 s connect budget
    /// before the live one got its turn; the bound is 4 s.
    #[test]
    fn a_black_holed_first_address_costs_the_attempt_delay_not_the_connect_timeout() {
        let relay = InProcessRelay::start();
        let (_listener, _filler, dead) =
            crate::tcp_connect::black_hole("127.0.0.1".parse().unwrap());
        let mut answer = vec![dead; 7];
        answer.push(relay.addr);
        let base = format!("http://localhost:{}", relay.addr.port());
        let registry = Registry::with_parts(&base, &|_| None, Answer(answer));
        let started = Instant::now();
        let health = registry.health();
        let took = started.elapsed();
        assert!(health.is_ok(), "{:?}", health.err());
        assert!(took < Duration::from_secs(4), "took {took:?}");
    }

    /// Through an HTTP proxy from the environment, the registry is reached in a CONNECT
    /// tunnel, the proxy's own addresses raced the same way (its first one black-holed).
    #[test]
    fn a_proxy_from_the_environment_tunnels_the_call() {
        use std::io::BufRead;
        let relay = InProcessRelay::start();
        let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let relay_addr = relay.addr;
        let proxied = std::thread::spawn(move || {
            let (client, _) = proxy.accept().unwrap();
            let mut reader = std::io::BufReader::new(client.try_clone().unwrap());
            let mut head = String::new();
            while !head.ends_with("\r\n\r\n") {
                if reader.read_line(&mut head).unwrap() == 0 {
                    break;
                }
            }
            let upstream = TcpStream::connect(relay_addr).unwrap();
            (&client).write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
            let (mut down, mut up) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
            let back = std::thread::spawn(move || std::io::copy(&mut down, &mut up));
            let _ = std::io::copy(&mut reader, &mut &upstream);
            let _ = upstream.shutdown(std::net::Shutdown::Write);
            let _ = back.join();
            head
        });
        let (_listener, _filler, dead) =
            crate::tcp_connect::black_hole("127.0.0.1".parse().unwrap());
        let proxy_url = format!("http://proxy.invalid:{}", proxy_addr.port());
        let env = move |name: &str| (name == "http_proxy").then(|| proxy_url.clone());
        let base = format!("http://relay.invalid:{}", relay_addr.port());
        let registry = Registry::with_parts(&base, &env, Answer(vec![dead, proxy_addr]));
        let health = registry.health();
        drop(registry);
        assert!(health.is_ok(), "{:?}", health.err());
        let head = proxied.join().unwrap();
        let want = format!("CONNECT relay.invalid:{} HTTP/1.1\r\n", relay_addr.port());
        assert!(head.starts_with(&want), "{head}");
    }

    /// Every address refusing: the last refusal, in the system's words, as before.
    #[test]
    fn refused_everywhere_reads_as_before() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let registry =
            Registry::with_parts("http://localhost:9", &|_| None, Answer(vec![closed, closed]));
        let e = registry.health().unwrap_err().to_string();
        assert_eq!(
            e,
            "cannot reach the registry at http://localhost:9/v1/health: Connection refused (os \
             error 111)"
        );
    }
}

/// Not on macOS: there the platform verifies certificates, not OpenSSL.
#[cfg(all(test, not(target_os = "macos")))]
mod trust_tests {
    use super::*;

    /// OpenSSL 3's words for a certificate no trusted CA signed.
    const UNTRUSTED: &str = "certificate verify failed (unable to get local issuer certificate)";

    /// [`trust_hint`] on a machine where exactly `present` exist.
    fn hint(file: Option<&str>, dir: Option<&str>, present: &[&str]) -> String {
        let trust =
            TrustEnv { cert_file: file.map(PathBuf::from), cert_dir: dir.map(PathBuf::from) };
        trust_hint(UNTRUSTED.to_owned(), &trust, &|p: &Path| {
            present.iter().any(|q| p == Path::new(q))
        })
    }

    #[test]
    fn a_machine_without_any_ca_store_is_told_so_not_sent_to_update_ca_certificates() {
        let h = hint(None, None, &[]);
        assert!(h.starts_with(UNTRUSTED), "{h}");
        assert!(h.contains("no CA certificates at all") && h.contains("public or private"), "{h}");
        assert!(h.contains("install the ca-certificates package"), "{h}");
        assert!(h.contains("SSL_CERT_FILE") && !h.contains("update-ca-certificates"), "{h}");
    }

    /// A certificate for another name is the relay's URL or certificate to fix: sending the
    /// user to add a CA they already trust helped nothing.
    #[test]
    fn a_certificate_for_another_name_is_not_called_untrusted() {
        let trust = TrustEnv { cert_file: Some("/ca.pem".into()), cert_dir: None };
        for why in ["hostname mismatch", "IP address mismatch"] {
            let cause = format!("certificate verify failed: ({why})");
            let h = trust_hint(cause.clone(), &trust, &|_| true);
            assert!(h.starts_with(&cause), "{h}");
            assert!(h.contains("not issued for the host in this URL"), "{h}");
            assert!(!h.contains(DISTRUST) && !is_this_machines_side(&h), "{h}");
        }
    }

    #[test]
    fn a_cert_variable_naming_nothing_is_named() {
        let h = hint(Some("/nope.pem"), None, &["/etc/ssl/certs/ca-certificates.crt"]);
        assert!(h.contains("SSL_CERT_FILE names /nope.pem, which does not exist here"), "{h}");
        let h = hint(None, Some("/nodir"), &[]);
        assert!(h.contains("SSL_CERT_DIR names /nodir, which does not exist here"), "{h}");
        // A list of directories, one of which is there, names something.
        let h = hint(None, Some("/nodir:/certs"), &["/certs"]);
        assert!(!h.contains("SSL_CERT_DIR names"), "{h}");
        // One that exists but lacks the CA: add the CA to it.
        let h = hint(Some("/ca.pem"), None, &["/ca.pem"]);
        assert!(h.contains("SSL_CERT_FILE names /ca.pem, which does not hold the CA"), "{h}");
    }

    #[test]
    fn the_next_step_fits_the_store_this_machine_has() {
        let h = hint(None, None, &["/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs"]);
        assert!(h.contains("store: /etc/ssl/certs/ca-certificates.crt"), "{h}");
        assert!(h.contains("update-ca-certificates"), "{h}");
        let h = hint(None, None, &["/etc/pki/tls/certs/ca-bundle.crt"]);
        assert!(h.contains("/etc/pki/ca-trust/source/anchors, then update-ca-trust"), "{h}");
        let h = hint(None, None, &["/etc/ssl/cert.pem"]);
        assert!(h.contains("store: /etc/ssl/cert.pem") && h.contains("update-ca-certificates"));
        // A hashed directory alone is a store too.
        let h = hint(None, None, &["/etc/ssl/certs"]);
        assert!(!h.contains("no CA certificates") && h.contains("update-ca-certificates"), "{h}");
    }

    #[test]
    fn other_tls_errors_are_left_as_they_are() {
        let trust = TrustEnv { cert_file: None, cert_dir: None };
        let cause = "handshake failure".to_owned();
        assert_eq!(trust_hint(cause.clone(), &trust, &|_: &Path| false), cause);
    }
}
