//! The outbound HTTP proxy from the environment, for the two connections that leave the
//! machine: the registry calls (ureq) and the bridge's WebSocket to the relay (HTTP `CONNECT`
//! here). Both pick the proxy with [`for_target`], so they never disagree.
//!
//! The variables are read as curl reads them: for an `https`/`wss` target `https_proxy`, then
//! `HTTPS_PROXY`; for `http`/`ws` `http_proxy`, then `HTTP_PROXY`; then `all_proxy` /
//! `ALL_PROXY`. An empty value is unset. `no_proxy` / `NO_PROXY` is a comma-separated list: `*`
//! (nothing proxied), a host name that also matches its subdomains (a leading `.` or `*.` is
//! the same), or an IP address; an entry's `:port` is ignored. Loopback (`localhost`,
//! `*.localhost`, `127.0.0.0/8`, `::1`) is never proxied, whatever the variables say.
//!
//! Only `http://` proxies are spoken to (CONNECT for both schemes, so the relay sees the same
//! request either way); another scheme (`socks5://`, `https://`) is an error that names it,
//! never a silent direct connection. Credentials in the proxy URL (`http://user:pass@host`)
//! are sent as `Proxy-Authorization: Basic` and never shown: [`Proxy::shown`] is `host:port`.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// An HTTP proxy to tunnel through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Its port (1080, curl's default, when the URL names none).
    pub port: u16,
    /// `user:password`, percent-decoded, when the URL carried them.
    credentials: Option<String>,
    /// The variable it came from, for messages.
    pub var: &'static str,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({} from {}", self.shown(), self.var)?;
        if self.credentials.is_some() {
            write!(f, ", with credentials")?;
        }
        write!(f, ")")
    }
}

impl Proxy {
    /// `host:port` (brackets around IPv6): what messages show, never the credentials.
    pub fn shown(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL for ureq (`http://[user:pass@]host:port`, credentials as they were written).
    pub fn url(&self) -> String {
        match &self.credentials {
            Some(c) => {
                let (user, pass) = c.split_once(':').unwrap_or((c, ""));
                format!("http://{}:{}@{}", pct_encode(user), pct_encode(pass), self.shown())
            }
            None => format!("http://{}", self.shown()),
        }
    }

    /// Asks the proxy on `tcp` for a tunnel to `host:port` and reads its answer, all within
    /// `timeout` (the socket's read timeout must be set). On success the socket carries the
    /// tunnel; nothing past the proxy's answer has been read.
    pub fn tunnel(
        &self,
        tcp: &mut TcpStream,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(), String> {
        let target =
            if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD.encode(c);
            head.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        head.push_str("\r\n");
        let shown = self.shown();
        tcp.write_all(head.as_bytes())
            .map_err(|e| format!("cannot send CONNECT to the proxy {shown}: {e}"))?;
        // Byte by byte up to the blank line: a proxy sends nothing past its answer before the
        // client speaks, and reading ahead could swallow the start of the tunnel.
        let deadline = Instant::now() + timeout;
        let mut answer = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= 16 << 10 {
                return Err(format!("the proxy {shown} sent an answer head over 16 KiB"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tcp.set_read_timeout(Some(left)).is_err() {
                return Err(format!("the proxy {shown} did not answer CONNECT in time"));
            }
            match tcp.read(&mut byte) {
                Ok(0) => {
                    return Err(format!("the proxy {shown} closed the connection at CONNECT"));
                }
                Ok(_) => answer.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("the proxy {shown} did not answer CONNECT in time"));
                }
                Err(e) => return Err(format!("reading the proxy {shown}'s answer: {e}")),
            }
        }
        let line = answer.split(|&b| b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let status = crate::http::status_of(&answer)
            .ok_or_else(|| format!("the proxy {shown} did not answer in HTTP"))?;
        match status {
            200..=299 => Ok(()),
            407 if self.credentials.is_some() => {
                Err(format!("the proxy {shown} refused the credentials in {} (407)", self.var))
            }
            407 => Err(format!(
                "the proxy {shown} requires credentials (407): put them in {} \
                 (http://user:password@host:port)",
                self.var
            )),
            _ => Err(format!("the proxy {shown} refused the tunnel to {target}: {}", line.trim())),
        }
    }
}

/// The proxy to use for `scheme://host` (`https`, `wss`, `http` or `ws`; host without
/// brackets), from the process environment.
pub fn for_target(scheme: &str, host: &str) -> Result<Option<Proxy>, String> {
    choose(scheme, host, &|name| std::env::var(name).ok())
}

/// [`for_target`] with the environment given by `var`.
pub fn choose(
    scheme: &str,
    host: &str,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, String> {
    let set = |name: &'static str| var(name).filter(|v| !v.trim().is_empty()).map(|v| (name, v));
    let secure = matches!(scheme, "https" | "wss");
    let found = if secure {
        set("https_proxy").or_else(|| set("HTTPS_PROXY"))
    } else {
        set("http_proxy").or_else(|| set("HTTP_PROXY"))
    }
    .or_else(|| set("all_proxy"))
    .or_else(|| set("ALL_PROXY"));
    let Some((name, value)) = found else { return Ok(None) };
    if is_loopback(host) {
        return Ok(None);
    }
    let no_proxy = set("no_proxy").or_else(|| set("NO_PROXY")).map(|(_, v)| v);
    if no_proxy.is_some_and(|list| bypassed(&list, host)) {
        return Ok(None);
    }
    parse(name, value.trim()).map(Some)
}

/// `localhost`, a name under `.localhost`, or a loopback address.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    })
}

/// Whether the `no_proxy` list names `host`.
fn bypassed(list: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host_ip = host.parse::<IpAddr>().ok();
    list.split(',').map(str::trim).filter(|e| !e.is_empty()).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        // A network (`10.0.0.0/8`, `fd00::/8`), as curl 7.86+, Python and Go read it.
        if let Some((net, bits)) = entry.split_once('/') {
            let net = net.trim_matches(['[', ']']).parse::<IpAddr>();
            return match (net, bits.parse::<u32>(), host_ip) {
                (Ok(net), Ok(bits), Some(ip)) => in_network(ip, net, bits),
                _ => false,
            };
        }
        // An address (IPv6 possibly in brackets, with or without a port).
        let bare = entry.trim_start_matches('[');
        let bare = bare.split(']').next().unwrap_or(bare);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return host_ip == Some(ip);
        }
        let name = entry.split(':').next().unwrap_or(&entry);
        let name = name.trim_start_matches('*').trim_start_matches('.').trim_end_matches('.');
        !name.is_empty()
            && (host == name
                || (host.len() > name.len()
                    && host.ends_with(name)
                    && host.as_bytes()[host.len() - name.len() - 1] == b'.'))
    })
}

/// Whether `ip` lies in `net`/`bits` (families must match; `bits` past the address's width
/// never matches).
fn in_network(ip: IpAddr, net: IpAddr, bits: u32) -> bool {
    let (ip, net, width) = match (ip.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u128::from(a.to_bits()), u128::from(n.to_bits()), 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (a.to_bits(), n.to_bits(), 128),
        _ => return false,
    };
    if bits > width {
        return false;
    }
    let mask = if bits == 0 { 0 } else { (u128::MAX >> (128 - bits)) << (width - bits) };
    ip & mask == net & mask
}

/// How a proxy variable of another scheme is refused (also how callers tell the cause is this
/// machine's setting, not the relay).
pub const UNSUPPORTED_SCHEME: &str = "only http:// proxies are supported";
/// How a proxy variable that does not parse is refused (see [`UNSUPPORTED_SCHEME`]).
pub const UNUSABLE_URL: &str = "is not a usable proxy URL";

/// Parses a proxy URL: `http://[user[:pass]@]host[:port][/]`, or `host[:port]` (http).
fn parse(var: &'static str, value: &str) -> Result<Proxy, String> {
    let bad = |why: &str| format!("{var} {UNUSABLE_URL}: {why}");
    let rest = match value.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{var} names a {scheme}:// proxy; {UNSUPPORTED_SCHEME} (set {var} to one, or \
                 unset it)"
            ));
        }
        None => value,
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let (credentials, hostport) = match authority.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, authority),
    };
    let credentials = match credentials {
        Some(c) => {
            let (user, pass) = c.split_once(':').unwrap_or((c, ""));
            Some(format!("{}:{}", pct_decode(user), pct_decode(pass)))
        }
        None => None,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (hostport.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    // curl's default proxy port.
    let port = match port {
        None | Some("") => 1080,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("bad port"))?,
    };
    Ok(Proxy { host, port, credentials, var })
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn picks_the_variable_of_the_scheme_then_all_proxy() {
        let vars = [("HTTPS_PROXY", "http://p1:3128"), ("http_proxy", "p2:8080")];
        let e = env(&vars);
        let p = choose("wss", "relay.example.com", &e).unwrap().unwrap();
        assert_eq!((p.host.as_str(), p.port, p.var), ("p1", 3128, "HTTPS_PROXY"));
        let p = choose("ws", "relay.example.com", &e).unwrap().unwrap();
        assert_eq!((p.host.as_str(), p.port, p.var), ("p2", 8080, "http_proxy"));
        let vars = [("ALL_PROXY", "http://[fd00::1]"), ("https_proxy", "")];
        let p = choose("https", "relay.example.com", &env(&vars)).unwrap().unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.shown()),
            ("fd00::1", 1080, "[fd00::1]:1080".into())
        );
        assert!(choose("https", "relay.example.com", &env(&[])).unwrap().is_none());
    }

    #[test]
    fn loopback_and_no_proxy_go_direct() {
        let vars = [
            ("https_proxy", "http://proxy:3128"),
            ("NO_PROXY", " .corp.example, 10.0.0.7,[fd00::7]:443 , *.lan,exact.org:8443"),
        ];
        let e = env(&vars);
        for host in [
            "localhost",
            "a.localhost",
            "127.0.0.1",
            "127.8.9.1",
            "::1",
            "::ffff:127.0.0.1",
            "corp.example",
            "relay.corp.example",
            "10.0.0.7",
            "fd00::7",
            "x.lan",
            "exact.org",
            "Relay.Corp.Example.",
        ] {
            assert!(choose("wss", host, &e).unwrap().is_none(), "{host} must go direct");
        }
        for host in ["relay.example.com", "notcorp.example", "10.0.0.8", "exact.org.evil"] {
            assert!(choose("wss", host, &e).unwrap().is_some(), "{host} must be proxied");
        }
        let all = [("https_proxy", "proxy:3128"), ("no_proxy", "*")];
        assert!(choose("wss", "relay.example.com", &env(&all)).unwrap().is_none());
        // Networks, as curl 7.86+ reads them.
        let nets =
            [("https_proxy", "proxy:3128"), ("no_proxy", "192.168.0.0/16,fd00::/8,0.0.0.0/0x")];
        let e = env(&nets);
        for host in ["192.168.4.2", "fd12::1", "::ffff:192.168.0.9"] {
            assert!(choose("wss", host, &e).unwrap().is_none(), "{host} must go direct");
        }
        for host in ["192.169.0.1", "fe80::1", "relay.example.com"] {
            assert!(choose("wss", host, &e).unwrap().is_some(), "{host} must be proxied");
        }
        assert!(in_network("10.1.2.3".parse().unwrap(), "0.0.0.0".parse().unwrap(), 0));
        assert!(!in_network("10.1.2.3".parse().unwrap(), "10.0.0.0".parse().unwrap(), 33));
    }

    #[test]
    fn credentials_are_decoded_used_and_never_shown() {
        let vars = [("https_proxy", "http://us%40er:p%3Ass@proxy.example:3128/")];
        let p = choose("wss", "relay.example.com", &env(&vars)).unwrap().unwrap();
        assert_eq!(p.credentials.as_deref(), Some("us@er:p:ss"));
        assert_eq!(p.shown(), "proxy.example:3128");
        assert!(!format!("{p:?}").contains("p:ss"));
        assert_eq!(p.url(), "http://us%40er:p%3Ass@proxy.example:3128");
    }

    #[test]
    fn other_schemes_are_refused_by_name() {
        let vars = [("ALL_PROXY", "socks5://user:secret@proxy:1080")];
        let e = choose("wss", "relay.example.com", &env(&vars)).unwrap_err();
        assert!(e.contains("socks5://") && e.contains("ALL_PROXY"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let vars = [("https_proxy", "http://proxy:99999")];
        assert!(choose("wss", "relay.example.com", &env(&vars)).is_err());
    }

    #[test]
    fn tunnels_through_a_connect_proxy() {
        use std::io::BufRead;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                head.push(line);
            }
            (&s).write_all(b"HTTP/1.1 200 Connection established\r\n\r\nTUNNEL").unwrap();
            head
        });
        let vars = [("https_proxy", format!("http://u:pw@127.0.0.2:{port}"))];
        let e = |n: &str| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
        let p = choose("wss", "relay.example.com", &e).unwrap().unwrap();
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        p.tunnel(&mut tcp, "relay.example.com", 443, Duration::from_secs(5)).unwrap();
        let mut rest = [0u8; 6];
        tcp.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"TUNNEL", "nothing past the proxy's answer is consumed");
        let head = server.join().unwrap();
        assert_eq!(head[0], "CONNECT relay.example.com:443 HTTP/1.1\r\n");
        assert!(head.contains(&"Proxy-Authorization: Basic dTpwdw==\r\n".to_owned()), "{head:?}");
    }
}
