//! Who is on the other end of a loopback connection. The built-in backend adds the gateway's
//! key to what it forwards, so on a machine with several users it must serve only the user
//! running it (anyone else could otherwise drive that user's agent through 127.0.0.1); and the
//! other way, the key and the app's traffic must go only to the user's own gateway and backend,
//! not to another user's program that took their port ([`foreign_listener`]).
//!
//! Linux tells the owner of the client's socket: asked by its exact address pair through
//! `NETLINK_SOCK_DIAG` (one lookup in the kernel's socket table), or, where netlink sockets
//! or TCP diag are missing, found in `/proc/net/tcp{,6}`. A client whose socket cannot be
//! found (it reset the connection already) or is an orphan the kernel keeps after its owner
//! closed it (FIN-WAIT-2, TIME-WAIT: no inode, uid 0) is not taken for ours. Where the system
//! tells nothing (macOS; no netlink and no `/proc`; this process running as the overflow uid,
//! which every unmapped user looks like), and for such a client of nobody's, the backend asks
//! for its key instead ([`Access`], [`super::key`]).

use std::net::{SocketAddr, TcpStream};

/// What is known of the client end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Its socket is owned by this uid.
    Owner(u32),
    /// The system was asked, and has no owner for it (gone, or an orphan).
    Unknown,
    /// This system cannot tell.
    Unsupported,
}

/// The uid users outside this user namespace are shown as.
const OVERFLOW_UID: u32 = 65534;

/// The owner of the client end of the accepted `stream` from `peer`.
pub fn client(stream: &TcpStream, peer: SocketAddr) -> Client {
    match stream.local_addr() {
        Ok(local) => owner(peer, local),
        Err(_) => Client::Unknown,
    }
}

/// How the built-in backend treats a connection, from what the system tells of its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// This user's own client: served (the backend key is taken but not required).
    Ours,
    /// Another account's: refused at once.
    Stranger,
    /// The system was asked and has no owner for it (gone already, or an orphan): served only
    /// with the backend key ([`super::key`]), its health check too.
    Unknown,
    /// This system cannot tell (macOS; no netlink and no `/proc/net`; this process running as
    /// the overflow uid, which every unmapped user looks like): served only with the backend
    /// key, but for the health check.
    Unsupported,
}

/// Turns the lookup of a connection's owner off, as on a system that has none: set to `off`
/// (`HERMESCHAT_PEER_LOOKUP=off`). Test-only: the suites use it to run on Linux the path macOS
/// takes (the backend key required). It can only make the backend stricter, never let another
/// account in: without the lookup every client needs the key, which only this account can
/// read. [`foreign_listener`] is not affected.
pub const LOOKUP_ENV: &str = "HERMESCHAT_PEER_LOOKUP";

/// False when [`LOOKUP_ENV`] turns the lookup off.
pub fn lookup_enabled() -> bool {
    std::env::var(LOOKUP_ENV).map_or(true, |v| v.trim() != "off")
}

/// What the built-in backend may do for the client end of the accepted `stream` (from
/// `peer`).
pub fn access(stream: &TcpStream, peer: SocketAddr) -> Access {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if ours == OVERFLOW_UID {
        return Access::Unsupported;
    }
    match client(stream, peer) {
        Client::Owner(uid) if uid == ours => Access::Ours,
        Client::Owner(_) => Access::Stranger,
        Client::Unknown => Access::Unknown,
        Client::Unsupported => Access::Unsupported,
    }
}

/// The uid of the program listening on `addr` when it is another user's: neither this
/// process's user nor root (who can read this user's files anyway). A local user can take a
/// port the gateway or the user's backend left free and wait for what we send there (the
/// gateway's key, the app's traffic), so nothing is sent to such a listener. `None` when the
/// listener is ours or root's, when nothing listens there, or when this system cannot tell.
pub fn foreign_listener(addr: SocketAddr) -> Option<u32> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if ours == OVERFLOW_UID {
        return None;
    }
    // In a user namespace (a toolbox, a rootless container with the host's network), root's
    // and other host users' sockets all show as the overflow uid, and are refused alike: the
    // error names HERMESCHAT_TRUSTED_UIDS for a gateway run so on purpose.
    let trusted = |uid: u32| uid == ours || uid == 0 || trusted_uids().contains(&uid);
    listener_owners(addr).into_iter().find(|&uid| !trusted(uid))
}

/// Accounts whose gateway or backend the user runs on purpose (a shared gateway run by a
/// `hermes` system account, say): `HERMESCHAT_TRUSTED_UIDS`, comma-separated uids.
pub const TRUSTED_UIDS_ENV: &str = "HERMESCHAT_TRUSTED_UIDS";

fn trusted_uids() -> Vec<u32> {
    std::env::var(TRUSTED_UIDS_ENV)
        .map(|v| v.split(',').filter_map(|u| u.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// [`foreign_listener`] for any address `host` resolves to.
pub fn foreign_listener_at(host: &str, port: u16) -> Option<u32> {
    use std::net::ToSocketAddrs;
    (host, port).to_socket_addrs().ok()?.find_map(foreign_listener)
}

/// The owners of the sockets that would take a connection to `addr`: those listening on
/// `addr` itself if any, else on every address (the kernel prefers them in that order, and an
/// IPv4 socket over an IPv6 one taking IPv4 too). Several sockets share a port only with
/// `SO_REUSEPORT`, which the kernel allows within one user. The listening sockets come from
/// `NETLINK_SOCK_DIAG` (only those, however many connections the machine holds), else from
/// `/proc/net/tcp{,6}`.
#[cfg(target_os = "linux")]
fn listener_owners(addr: SocketAddr) -> Vec<u32> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let port = addr.port();
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    // Best first: the address itself, then every address of its family, then (IPv4) an IPv6
    // socket that takes IPv4 as mapped addresses.
    let ranked: Vec<SocketAddr> = match addr {
        SocketAddr::V4(a) => vec![
            addr,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), port),
            any6,
        ],
        SocketAddr::V6(_) => vec![addr, any6],
    };
    let listening = diag::listeners().unwrap_or_else(|_| proc_listeners());
    // Address and port only: a resolved link-local address carries a scope the tables lack.
    let same = |a: &SocketAddr, b: &SocketAddr| a.ip() == b.ip() && a.port() == b.port();
    let found: Vec<(usize, u32)> = listening
        .into_iter()
        .filter_map(|(at, uid)| ranked.iter().position(|r| same(r, &at)).map(|rank| (rank, uid)))
        .collect();
    let Some(best) = found.iter().map(|&(rank, _)| rank).min() else { return Vec::new() };
    // A socket listening on every address takes the connection only if `addr` is this
    // machine's: a backend on another host is none of this machine's listeners' business.
    if best > 0 && !is_local(addr.ip()) {
        return Vec::new();
    }
    found.into_iter().filter(|&(rank, _)| rank == best).map(|(_, uid)| uid).collect()
}

/// True for a loopback address or one of this machine's interfaces.
#[cfg(target_os = "linux")]
fn is_local(ip: std::net::IpAddr) -> bool {
    ip.is_loopback()
        || crate::netif::interfaces().is_ok_and(|all| all.iter().any(|iface| iface.addr == ip))
}

/// Every listening TCP socket in `/proc/net/tcp{,6}`: its address and owner.
#[cfg(target_os = "linux")]
fn proc_listeners() -> Vec<(SocketAddr, u32)> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid
            let fields: Vec<&str> = line.split_whitespace().take(8).collect();
            // 0A: TCP_LISTEN.
            if fields.get(3) != Some(&"0A") {
                continue;
            }
            let at = fields.get(1).and_then(|a| parse_proc_addr(a));
            let uid = fields.get(7).and_then(|u| u.parse::<u32>().ok());
            if let (Some(at), Some(uid)) = (at, uid) {
                found.push((at, uid));
            }
        }
    }
    found
}

/// The inverse of [`proc_addr`].
#[cfg(target_os = "linux")]
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(not(target_os = "linux"))]
fn listener_owners(_addr: SocketAddr) -> Vec<u32> {
    Vec::new()
}

#[cfg(target_os = "linux")]
fn owner(peer: SocketAddr, local: SocketAddr) -> Client {
    match diag::owner(peer, local) {
        Ok(Some(found)) => found,
        // Not found: gone, or no TCP diag in this kernel (it answers the same). Our own end
        // of the connection exists, so asking for it tells which.
        Ok(None) if matches!(diag::owner(local, peer), Ok(Some(_))) => Client::Unknown,
        // No netlink here (a sandbox may forbid it), or no TCP diag: the table in /proc.
        Ok(None) | Err(_) => proc_owner(peer, local),
    }
}

#[cfg(not(target_os = "linux"))]
fn owner(_peer: SocketAddr, _local: SocketAddr) -> Client {
    Client::Unsupported
}

/// The client's line of `/proc/net/tcp{,6}`: local address our peer's, remote ours. The
/// table is read twice before the socket is taken for gone: a read of a changing table may
/// skip lines. A table without our own end of the connection either (WSL 1 keeps it empty)
/// tells nothing.
#[cfg(target_os = "linux")]
fn proc_owner(peer: SocketAddr, local: SocketAddr) -> Client {
    let table = if peer.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let (want_local, want_remote) = (proc_addr(peer), proc_addr(local));
    let mut ours_listed = false;
    for _ in 0..2 {
        let Ok(text) = std::fs::read_to_string(table) else { return Client::Unsupported };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().take(10).collect();
            let (Some(l), Some(r)) = (fields.get(1), fields.get(2)) else { continue };
            if l.eq_ignore_ascii_case(&want_remote) && r.eq_ignore_ascii_case(&want_local) {
                ours_listed = true;
            }
            if !(l.eq_ignore_ascii_case(&want_local) && r.eq_ignore_ascii_case(&want_remote)) {
                continue;
            }
            let uid = fields.get(7).and_then(|u| u.parse::<u32>().ok());
            let inode = fields.get(9).and_then(|i| i.parse::<u64>().ok());
            // An orphan (closed by its owner) has inode 0.
            return match (uid, inode) {
                (Some(uid), Some(inode)) if inode != 0 => Client::Owner(uid),
                _ => Client::Unknown,
            };
        }
    }
    if ours_listed { Client::Unknown } else { Client::Unsupported }
}

/// An address as `/proc/net/tcp*` writes it: the address as 32-bit words in host byte order,
/// each in hex, then `:` and the port in hex.
#[cfg(target_os = "linux")]
fn proc_addr(addr: SocketAddr) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(40);
    for word in ip_words(addr).iter().take(if addr.is_ipv4() { 1 } else { 4 }) {
        let _ = write!(out, "{:08X}", u32::from_ne_bytes(*word));
    }
    let _ = write!(out, ":{:04X}", addr.port());
    out
}

/// The address as the kernel keeps it: four 32-bit words of network-order bytes (IPv4 in the
/// first).
#[cfg(target_os = "linux")]
fn ip_words(addr: SocketAddr) -> [[u8; 4]; 4] {
    let mut words = [[0u8; 4]; 4];
    match addr {
        SocketAddr::V4(a) => words[0] = a.ip().octets(),
        SocketAddr::V6(a) => {
            for (word, chunk) in words.iter_mut().zip(a.ip().octets().chunks(4)) {
                word.copy_from_slice(chunk);
            }
        }
    }
    words
}

/// The exact lookup through `NETLINK_SOCK_DIAG` (`linux/inet_diag.h`, `linux/sock_diag.h`).
#[cfg(target_os = "linux")]
mod diag {
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::{Client, ip_words};

    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    /// `TCP_LISTEN` in the kernel's state numbering.
    const TCP_LISTEN: u32 = 10;
    /// `sizeof(struct nlmsghdr)`.
    const NLMSG_HDR: usize = 16;
    /// `sizeof(struct inet_diag_req_v2)`.
    const REQ_LEN: usize = 56;
    /// Where `idiag_uid` and `idiag_inode` sit in `struct inet_diag_msg`.
    const MSG_UID: usize = 64;
    const MSG_INODE: usize = 68;

    /// The owner of the TCP socket whose source is `src` and destination `dst`: `None` when
    /// the kernel has none (or no TCP diag at all: it answers the same).
    pub(super) fn owner(src: SocketAddr, dst: SocketAddr) -> io::Result<Option<Client>> {
        let fd = ask(&request(src, dst))?;
        let mut answer = [0u8; 512];
        // SAFETY: recv into a buffer we own, at most its length.
        let got =
            unsafe { libc::recv(fd.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        parse(&answer[..got as usize])
    }

    /// Every listening TCP socket, IPv4 and IPv6: its address and owner (a dump filtered to
    /// the LISTEN state by the kernel).
    pub(super) fn listeners() -> io::Result<Vec<(SocketAddr, u32)>> {
        let mut found = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
            let mut m = request_head(flags, family, 1 << TCP_LISTEN);
            m.resize(NLMSG_HDR + REQ_LEN, 0); // any address, port, interface, cookie
            let fd = ask(&m)?;
            let mut buf = vec![0u8; 32 << 10];
            'answers: loop {
                // SAFETY: recv into a buffer we own, at most its length.
                let got =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if got <= 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut rest = &buf[..got as usize];
                while rest.len() >= NLMSG_HDR {
                    let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                    if len < NLMSG_HDR || len > rest.len() {
                        return Err(io::Error::other("a malformed netlink answer"));
                    }
                    match kind {
                        NLMSG_DONE => break 'answers,
                        NLMSG_ERROR => return Err(io::Error::other("netlink refused the dump")),
                        SOCK_DIAG_BY_FAMILY => {
                            if let Some(one) = listener(&rest[NLMSG_HDR..len]) {
                                found.push(one);
                            }
                        }
                        _ => {}
                    }
                    rest = rest.get((len + 3) & !3..).unwrap_or_default();
                }
            }
        }
        Ok(found)
    }

    /// The address and owner in one `inet_diag_msg`.
    fn listener(msg: &[u8]) -> Option<(SocketAddr, u32)> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let family = i32::from(*msg.first()?);
        let port = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
        let src: [u8; 16] = msg.get(8..24)?.try_into().ok()?;
        let uid = u32::from_ne_bytes(msg.get(MSG_UID..MSG_UID + 4)?.try_into().ok()?);
        let ip = if family == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(src))
        };
        Some((SocketAddr::new(ip, port), uid))
    }

    /// Opens a `NETLINK_SOCK_DIAG` socket and sends it `request`; the answers are read from
    /// the socket returned, with a receive timeout of a second (the kernel answers at once, or
    /// not at all).
    fn ask(request: &[u8]) -> io::Result<OwnedFd> {
        // SAFETY: socket() with constant arguments; the descriptor is owned by `fd` at once.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(raw)
        };
        // SAFETY: `request` is a valid buffer of its length; a netlink datagram socket sends
        // to the kernel with no address.
        let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
        if sent != request.len() as isize {
            return Err(io::Error::last_os_error());
        }
        set_timeout(&fd);
        Ok(fd)
    }

    /// A receive timeout of a second.
    fn set_timeout(fd: &OwnedFd) {
        let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
        // SAFETY: setsockopt with a valid timeval of its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
    }

    /// An `nlmsghdr` and an `inet_diag_req_v2` naming one TCP socket by its address pair.
    fn request(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let family = if src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let mut m = request_head(libc::NLM_F_REQUEST as u16, family, u32::MAX); // every state
        m.extend_from_slice(&src.port().to_be_bytes());
        m.extend_from_slice(&dst.port().to_be_bytes());
        for word in ip_words(src).iter().chain(ip_words(dst).iter()) {
            m.extend_from_slice(word);
        }
        m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
        m.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
        m.extend_from_slice(&u32::MAX.to_ne_bytes());
        m
    }

    /// An `nlmsghdr` with `flags`, then the start of an `inet_diag_req_v2` for TCP sockets of
    /// `family` in `states` (a bit per state); the socket id follows.
    fn request_head(flags: u16, family: libc::c_int, states: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
        m.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        m.push(family as u8);
        m.push(libc::IPPROTO_TCP as u8);
        m.push(0); // no extensions
        m.push(0); // padding
        m.extend_from_slice(&states.to_ne_bytes());
        m
    }

    /// The owner in the kernel's answer: an `inet_diag_msg` (an orphan's, inode 0, is
    /// nobody's), `ENOENT` (none), or another error.
    fn parse(answer: &[u8]) -> io::Result<Option<Client>> {
        let word = |at: usize| {
            answer.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        match kind {
            Some(SOCK_DIAG_BY_FAMILY) => {
                let (uid, inode) = (word(NLMSG_HDR + MSG_UID), word(NLMSG_HDR + MSG_INODE));
                Ok(Some(match (uid, inode) {
                    (Some(uid), Some(inode)) if inode != 0 => Client::Owner(uid),
                    _ => Client::Unknown,
                }))
            }
            // struct nlmsgerr: a negative errno first.
            Some(NLMSG_ERROR) => match word(NLMSG_HDR).map(|e| (e as i32).wrapping_neg()) {
                Some(libc::ENOENT) => Ok(None),
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Err(io::Error::other("a short netlink error")),
            },
            _ => Err(io::Error::other("an unexpected netlink answer")),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    fn ours() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn addresses_are_written_as_the_kernel_writes_them() {
        if cfg!(target_endian = "little") {
            assert_eq!(proc_addr("127.0.0.1:8765".parse().unwrap()), "0100007F:223D");
            assert_eq!(
                proc_addr("[::1]:80".parse().unwrap()),
                "00000000000000000000000001000000:0050"
            );
        }
    }

    /// A connected pair on `bind`, when this machine has that address.
    fn pair(bind: &str) -> Option<(TcpStream, TcpStream, SocketAddr)> {
        let listener = TcpListener::bind(bind).ok()?;
        let client = TcpStream::connect(listener.local_addr().ok()?).ok()?;
        let (served, peer) = listener.accept().ok()?;
        Some((client, served, peer))
    }

    #[test]
    fn the_client_of_a_loopback_connection_is_this_user_by_either_lookup() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Some((client, served, peer)) = pair(bind) else { continue };
            let local = served.local_addr().unwrap();
            // Each lookup where this system has it (a sandbox may bar netlink or /proc).
            if let Ok(found) = diag::owner(peer, local) {
                assert_eq!(found, Some(Client::Owner(ours())), "{bind} netlink");
            }
            if std::path::Path::new("/proc/net/tcp").exists() {
                assert_eq!(proc_owner(peer, local), Client::Owner(ours()), "{bind} /proc");
            }
            if ours() != OVERFLOW_UID {
                assert_eq!(access(&served, peer), Access::Ours, "{bind}");
            }
            drop(client);
        }
    }

    #[test]
    fn a_client_gone_or_closed_is_nobodys() {
        let known = |c: Client| c != Client::Unsupported;
        for reset in [true, false] {
            let Some((client, served, peer)) = pair("127.0.0.1:0") else { return };
            let local = served.local_addr().unwrap();
            if reset {
                // Reset: the client's socket is gone.
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                // SAFETY: setsockopt with a valid linger of its size on a socket we own.
                unsafe {
                    libc::setsockopt(
                        client.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
            }
            // Closed: an orphan in FIN-WAIT-2 the kernel keeps, inode 0, uid 0.
            drop(client);
            std::thread::sleep(std::time::Duration::from_millis(50));
            if let Ok(found) = diag::owner(peer, local) {
                assert!(
                    matches!(found, None | Some(Client::Unknown)),
                    "reset {reset}: netlink {found:?}"
                );
            }
            let proc = proc_owner(peer, local);
            assert!(!known(proc) || proc == Client::Unknown, "reset {reset}: /proc {proc:?}");
            if ours() != OVERFLOW_UID && known(client_of(&served, peer)) {
                assert_ne!(access(&served, peer), Access::Ours, "reset {reset}: taken for ours");
            }
        }
    }

    #[test]
    fn netlink_and_proc_list_the_same_listeners() {
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else { return };
        let at = listener.local_addr().unwrap();
        let mine = (at, ours());
        let on_port = |all: Vec<(SocketAddr, u32)>| -> Vec<(SocketAddr, u32)> {
            all.into_iter().filter(|(a, _)| a.port() == at.port()).collect()
        };
        let from_proc = on_port(proc_listeners());
        match diag::listeners() {
            Ok(found) => {
                assert_eq!(on_port(found), vec![mine], "netlink");
                if std::path::Path::new("/proc/net/tcp").exists() {
                    assert_eq!(from_proc, vec![mine], "/proc");
                }
            }
            // Only where this system has no netlink diag for us (a sandbox).
            Err(e) => eprintln!("netlink listeners unavailable here: {e}"),
        }
        assert_eq!(parse_proc_addr(&proc_addr(at)), Some(at));
        let v6: SocketAddr = "[2001:db8::1]:8642".parse().unwrap();
        assert_eq!(parse_proc_addr(&proc_addr(v6)), Some(v6));
    }

    #[test]
    fn our_own_listener_is_found_and_not_foreign() {
        for bind in ["127.0.0.1:0", "[::1]:0", "0.0.0.0:0"] {
            let Ok(listener) = TcpListener::bind(bind) else { continue };
            let port = listener.local_addr().unwrap().port();
            let at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let at =
                if bind.starts_with('[') { format!("[::1]:{port}").parse().unwrap() } else { at };
            if std::path::Path::new("/proc/net/tcp").exists() {
                assert_eq!(listener_owners(at), vec![ours()], "{bind}");
            }
            assert_eq!(foreign_listener(at), None, "{bind}");
            drop(listener);
            assert!(listener_owners(at).is_empty(), "{bind}: closed");
        }
    }

    fn client_of(served: &TcpStream, peer: SocketAddr) -> Client {
        client(served, peer)
    }
}
