//! Where the built-in backend sends things: the Hermes gateway (address and key, re-read from
//! the Hermes configuration when it changes, one keep-alive client per address) and the
//! optional direct provider (`AI_API_KEY` + `AI_BASE_URL`).
//!
//! The key is only ever put into the `Authorization` header of upstream requests; it is never
//! logged, answered, or shown by `Debug`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bridge::local_http::{LocalClient, Timeouts};
use crate::gateway::HermesConfig;

/// How long a discovered gateway configuration is reused before the files are read again.
const CONFIG_TTL: Duration = Duration::from_secs(2);

/// The default base URL of the direct provider when `AI_BASE_URL` is not set.
pub const DEFAULT_DIRECT_BASE: &str = "https://api.openai.com/v1";

/// The default model of the direct provider when neither the request nor `AI_MODEL` names one.
pub const DEFAULT_DIRECT_MODEL: &str = "gpt-4o-mini";

/// Locks a mutex, ignoring poisoning: every critical section here leaves consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The direct OpenAI-compatible provider used when the gateway is down.
#[derive(Clone, PartialEq, Eq)]
pub struct Direct {
    /// Base URL, e.g. `https://api.openai.com/v1` (no trailing slash).
    pub base_url: String,
    /// `AI_API_KEY`.
    pub key: String,
    /// `AI_MODEL`, used when the request's model is the gateway's (`hermes-agent`) or absent.
    pub model: Option<String>,
}

impl fmt::Debug for Direct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Direct")
            .field("base_url", &self.base_url)
            .field("key", &"<redacted>")
            .field("model", &self.model)
            .finish()
    }
}

impl Direct {
    /// From `AI_API_KEY`, `AI_BASE_URL`, `AI_MODEL`; `None` without a key.
    pub fn from_env() -> Option<Direct> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let key = var("AI_API_KEY")?;
        let base_url = var("AI_BASE_URL").unwrap_or_else(|| DEFAULT_DIRECT_BASE.to_owned());
        Some(Direct {
            base_url: base_url.trim().trim_end_matches('/').to_owned(),
            key: key.trim().to_owned(),
            model: var("AI_MODEL"),
        })
    }
}

/// Where the gateway configuration comes from.
#[derive(Debug, Clone)]
pub enum GatewaySource {
    /// Discovered from the environment and `~/.hermes` (re-read every few seconds).
    Discover,
    /// Fixed (tests).
    Fixed(HermesConfig),
}

/// How long a verdict on the key stands before `/api/health` has it checked again (in the
/// background: the answer never waits for it).
pub const KEY_VERDICT_TTL: Duration = Duration::from_secs(30);

/// The last verdict on the key: for which address and key (a hash, not the key), refused or
/// not, and when.
#[derive(Debug, Clone, Copy)]
struct KeyVerdict {
    fingerprint: u64,
    refused: bool,
    at: Instant,
}

/// A hash of the gateway's address and key: a verdict applies to that pair only.
fn fingerprint(config: &HermesConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (config.addr(), config.key.as_deref().map(str::trim)).hash(&mut h);
    h.finish()
}

/// The gateway as the backend sees it now, with a shared keep-alive client.
pub struct Upstream {
    /// Where the configuration comes from.
    source: GatewaySource,
    /// Deadlines of gateway exchanges.
    timeouts: Timeouts,
    /// The last configuration read and when.
    cached: Mutex<Option<(Instant, HermesConfig)>>,
    /// The client for the current address.
    client: Mutex<Option<(String, Arc<LocalClient>)>>,
    /// What the gateway last said to the key (chat, a key check): lets `/api/health` say
    /// whether chat can use the gateway without asking the gateway each time.
    verdict: Mutex<Option<KeyVerdict>>,
    /// A background key check runs now.
    checking: AtomicBool,
}

impl Upstream {
    /// An upstream reading its configuration from `source`.
    pub fn new(source: GatewaySource, timeouts: Timeouts) -> Upstream {
        Upstream {
            source,
            timeouts,
            cached: Mutex::new(None),
            client: Mutex::new(None),
            verdict: Mutex::new(None),
            checking: AtomicBool::new(false),
        }
    }

    /// Records what the gateway said to `config`'s key (`refused`: 401/403).
    pub fn note_key(&self, config: &HermesConfig, refused: bool) {
        let verdict = KeyVerdict { fingerprint: fingerprint(config), refused, at: Instant::now() };
        *lock(&self.verdict) = Some(verdict);
    }

    /// Forgets the verdict: the gateway went away, and the one that comes back may run with
    /// another key.
    pub fn forget_key(&self) {
        *lock(&self.verdict) = None;
    }

    /// Chat cannot use the gateway with `config`'s key, as far as is known: there is none, or
    /// the gateway last refused it.
    pub fn key_known_bad(&self, config: &HermesConfig) -> bool {
        if config.key.as_deref().is_none_or(|k| k.trim().is_empty()) {
            return true;
        }
        let fp = fingerprint(config);
        lock(&self.verdict).is_some_and(|v| v.fingerprint == fp && v.refused)
    }

    /// Takes the right to run a background key check for `config`: `true` when its verdict is
    /// missing or older than [`KEY_VERDICT_TTL`] and no check runs; release with
    /// [`Upstream::key_check_done`].
    pub fn claim_key_check(&self, config: &HermesConfig) -> bool {
        if config.key.is_none() {
            return false;
        }
        let fp = fingerprint(config);
        let due = lock(&self.verdict)
            .is_none_or(|v| v.fingerprint != fp || v.at.elapsed() >= KEY_VERDICT_TTL);
        due && !self.checking.swap(true, Ordering::SeqCst)
    }

    /// Ends a check [`Upstream::claim_key_check`] allowed.
    pub fn key_check_done(&self) {
        self.checking.store(false, Ordering::SeqCst);
    }

    /// The current gateway configuration.
    pub fn config(&self) -> HermesConfig {
        match &self.source {
            GatewaySource::Fixed(c) => c.clone(),
            GatewaySource::Discover => {
                let mut cached = lock(&self.cached);
                match &*cached {
                    Some((at, c)) if at.elapsed() < CONFIG_TTL => c.clone(),
                    _ => {
                        let c = HermesConfig::load();
                        *cached = Some((Instant::now(), c.clone()));
                        c
                    }
                }
            }
        }
    }

    /// The keep-alive client for `config`'s address.
    pub fn client(&self, config: &HermesConfig) -> Arc<LocalClient> {
        let addr = config.addr();
        let mut slot = lock(&self.client);
        if let Some((a, c)) = &*slot
            && *a == addr
        {
            return c.clone();
        }
        let c = Arc::new(
            LocalClient::with_timeouts(&config.host, config.port, self.timeouts)
                .named("Hermes gateway"),
        );
        *slot = Some((addr, c.clone()));
        c
    }

    /// The `Authorization` header for `config` (none without a key).
    pub fn auth_header(config: &HermesConfig) -> Option<(String, String)> {
        config.key.as_ref().map(|k| ("Authorization".to_owned(), format!("Bearer {}", k.trim())))
    }
}
