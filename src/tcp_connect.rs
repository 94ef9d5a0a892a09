//! Outbound TCP connections to hosts with several addresses, Happy Eyeballs style (RFC 8305):
//! the one connect routine of the bridge's relay socket ([`crate::bridge::relay_io`]) and the
//! registry calls ([`crate::registry_client`]), so a black-holed address (an IPv6 route that
//! drops everything) costs either of them the attempt delay, not the connect timeout. A name
//! that does not resolve is explained by what this machine's resolver lacks
//! ([`with_dns_hint`]), which the registry client adds to its own resolver's errors too.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a connection attempt has alone before the next address is tried alongside it
/// (RFC 8305's "Connection Attempt Delay").
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// At most this many resolved addresses are tried.
const MAX_ADDRESSES: usize = 8;

/// A TCP connection to `host:port` (a name, or an IP address without brackets), with
/// `TCP_NODELAY`; the error names the cause. The resolved addresses are tried as Happy
/// Eyeballs does (see [`connect_addrs`]).
pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("{what} {host}:{port}: {e}");
    let resolved = (host, port)
        .to_socket_addrs()
        .map_err(|e| failed("cannot resolve", &with_dns_hint(e.to_string())))?;
    connect_addrs(resolved.collect(), timeout).map_err(|e| match e {
        Some(e) => failed("cannot connect to", &e),
        None => failed("no address for", &"empty DNS answer"),
    })
}

/// `cause` with the next step added when it is a host name that did not resolve: on a machine
/// with no `/etc/resolv.conf` (a container `FROM scratch`, a bare chroot) the static build's
/// resolver asks 127.0.0.1, which says only "Try again".
pub fn with_dns_hint(cause: String) -> String {
    dns_hint(cause, &|p: &Path| p.exists())
}

/// [`with_dns_hint`] with the filesystem passed in.
fn dns_hint(cause: String, exists: &dyn Fn(&Path) -> bool) -> String {
    // Rust's own words for a failed getaddrinfo, whatever the C library adds.
    if !cause.contains("failed to lookup address information") {
        return cause;
    }
    let (resolv, hosts) = (Path::new("/etc/resolv.conf"), Path::new("/etc/hosts"));
    match (exists(resolv), exists(hosts)) {
        (false, false) => format!(
            "{cause}; {UNRESOLVED}: this machine has neither /etc/resolv.conf (no DNS server) \
             nor /etc/hosts (a minimal container or chroot?): add them, or use \
             an IP address instead of the name"
        ),
        (false, true) => format!(
            "{cause}; {UNRESOLVED}: this machine has no /etc/resolv.conf (no DNS server), \
             only /etc/hosts: add the one, a line for the name to the other, or use \
             an IP address instead of the name"
        ),
        _ => format!(
            "{cause}; {UNRESOLVED}: check its spelling and this machine's DNS \
             (/etc/resolv.conf)"
        ),
    }
}

/// How [`with_dns_hint`] begins its explanation of a name that did not resolve.
pub(crate) const UNRESOLVED: &str = "the host name did not resolve";

/// A TCP connection, with `TCP_NODELAY`, to the first of the resolved `addrs` that answers:
/// families alternating from the resolver's first ([`interleave_families`]), the next attempt
/// started when the previous one failed or after [`ATTEMPT_DELAY`], each attempt given
/// `timeout`. `Err(None)` when there is no address; otherwise the last attempt's error.
pub fn connect_addrs(
    addrs: Vec<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream, Option<io::Error>> {
    connect_first(&interleave_families(addrs), timeout, ATTEMPT_DELAY)
}

/// The addresses with the families alternating, the first address's family first, each
/// family in the resolver's order; at most 8.
pub fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(|a| a.is_ipv6());
    let (mut a, mut b): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|x| x.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(a.len() + b.len());
    a.reverse();
    b.reverse();
    while let Some(x) = a.pop() {
        out.push(x);
        if let Some(y) = b.pop() {
            out.push(y);
        }
    }
    out.extend(b.into_iter().rev());
    out.truncate(MAX_ADDRESSES);
    out
}

/// Connects to the first of `addrs`, in this order, that answers (see [`connect_addrs`]);
/// `Err(None)` when there is none. Each attempt runs on its own short-lived thread with
/// `timeout`; one that connects after another won closes its socket as its thread ends.
fn connect_first(
    addrs: &[SocketAddr],
    timeout: Duration,
    attempt_delay: Duration,
) -> Result<TcpStream, Option<io::Error>> {
    if addrs.is_empty() {
        return Err(None);
    }
    if let [only] = addrs {
        let s = TcpStream::connect_timeout(only, timeout).map_err(Some)?;
        let _ = s.set_nodelay(true);
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel();
    let (mut started, mut ended, mut last) = (0, 0, None);
    let deadline = Instant::now() + timeout + attempt_delay * addrs.len() as u32;
    while ended < addrs.len() {
        if started < addrs.len() {
            let (addr, tx) = (addrs[started], tx.clone());
            let spawned = std::thread::Builder::new().name("tcp-connect".into()).spawn(move || {
                let _ = tx.send(TcpStream::connect_timeout(&addr, timeout));
            });
            if let Err(e) = spawned {
                ended += 1;
                last = Some(e);
            }
            started += 1;
        }
        let now = Instant::now();
        let wait = if started < addrs.len() {
            attempt_delay
        } else {
            deadline.saturating_duration_since(now)
        };
        match rx.recv_timeout(wait) {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => {
                ended += 1;
                last = Some(e);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if started < addrs.len() => {}
            Err(_) => break,
        }
    }
    Err(last.or_else(|| Some(io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))))
}

/// A loopback address whose connection attempts hang until they time out, as a black-holed
/// route's do: a listener whose accept queue is full (backlog 0, one connection queued and
/// never accepted), so the kernel drops further SYNs. Both returned sockets must be kept for
/// as long as the black hole is needed. For tests, here and in `registry_client`.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn black_hole(ip: std::net::IpAddr) -> (std::net::TcpListener, TcpStream, SocketAddr) {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind a loopback listener");
    // SAFETY: `listen` on a descriptor this function owns (the listener, alive for the call)
    // only changes the queue length of an already listening socket.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
    assert_eq!(rc, 0, "listen(fd, 0): {}", io::Error::last_os_error());
    let addr = listener.local_addr().expect("listener address");
    let filler = TcpStream::connect(addr).expect("fill the accept queue");
    (listener, filler, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address the kernel really drops SYNs to hangs: a connect to it alone times out.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_test_black_hole_swallows_connects() {
        let (_l, _filler, dead) = black_hole("127.0.0.1".parse().unwrap());
        let e = TcpStream::connect_timeout(&dead, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{e:?}");
    }

    /// With the first address black-holed, the second answers while the first still hangs:
    /// sequential attempts would wait out the 60 s timeout; the bound is 10 s.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_black_holed_address_costs_the_attempt_delay_not_the_timeout() {
        let good_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good = good_listener.local_addr().unwrap();
        let (_l, _filler, dead) = black_hole("127.0.0.1".parse().unwrap());
        let started = Instant::now();
        let s = connect_first(&[dead, good], Duration::from_secs(60), ATTEMPT_DELAY).unwrap();
        assert_eq!(s.peer_addr().unwrap(), good);
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    }

    #[test]
    fn nothing_answering_is_the_last_error_and_no_address_is_none() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = connect_first(&[closed, closed], Duration::from_secs(1), ATTEMPT_DELAY);
        assert_eq!(e.unwrap_err().unwrap().kind(), io::ErrorKind::ConnectionRefused);
        assert!(matches!(connect_addrs(vec![], Duration::from_secs(1)), Err(None)));
    }

    #[test]
    fn families_alternate_from_the_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let got = interleave_families(vec![
            a("[2001:db8::1]:1"),
            a("[2001:db8::2]:1"),
            a("[2001:db8::3]:1"),
            a("192.0.2.1:1"),
        ]);
        let want =
            [a("[2001:db8::1]:1"), a("192.0.2.1:1"), a("[2001:db8::2]:1"), a("[2001:db8::3]:1")];
        assert_eq!(got, want);
        let many: Vec<_> = (1..=12).map(|i| a(&format!("192.0.2.{i}:1"))).collect();
        assert_eq!(interleave_families(many).len(), MAX_ADDRESSES);
    }

    #[test]
    fn a_name_that_does_not_resolve_names_what_the_resolver_lacks() {
        let cause = || "io: failed to lookup address information: Try again".to_owned();
        let h = dns_hint(cause(), &|_: &Path| false);
        assert!(h.contains("neither /etc/resolv.conf (no DNS server) nor /etc/hosts"), "{h}");
        let h = dns_hint(cause(), &|p: &Path| p == Path::new("/etc/hosts"));
        assert!(h.contains("no /etc/resolv.conf (no DNS server), only /etc/hosts"), "{h}");
        let h = dns_hint(cause(), &|_: &Path| true);
        assert!(h.contains("check its spelling and this machine's DNS"), "{h}");
        assert_eq!(dns_hint("refused".to_owned(), &|_: &Path| false), "refused");
    }
}
