//! Who is on the other end of a loopback connection: the built-in backend adds the gateway's
//! key to what it forwards, so on a machine with several users it must serve only the user
//! running it (anyone else could otherwise drive that user's agent through 127.0.0.1).
//!
//! Linux tells the owner of the client's socket: asked by its exact address pair through
//! `NETLINK_SOCK_DIAG` (one lookup in the kernel's socket table), or, where netlink sockets
//! are not allowed, found in `/proc/net/tcp{,6}`. A client whose socket cannot be found (it
//! reset the connection already) or is only a TIME-WAIT remnant (which has no owner) is not
//! taken for ours. Where the system tells nothing (macOS, no netlink and no `/proc`) nobody is
//! refused.

use std::net::{SocketAddr, TcpStream};

/// What is known of the client end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Its socket is owned by this uid.
    Owner(u32),
    /// The system was asked, and has no owner for it (gone, or only a TIME-WAIT remnant).
    Unknown,
    /// This system cannot tell.
    Unsupported,
}

/// The owner of the client end of the accepted `stream` from `peer`.
pub fn client(stream: &TcpStream, peer: SocketAddr) -> Client {
    match stream.local_addr() {
        Ok(local) => owner(peer, local),
        Err(_) => Client::Unknown,
    }
}

/// True unless the client end of `stream` (accepted from `peer`) is known to be this user's
/// own, or this system cannot tell.
pub fn is_another_user(stream: &TcpStream, peer: SocketAddr) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let ours = unsafe { libc::geteuid() };
    match client(stream, peer) {
        Client::Owner(uid) => uid != ours,
        Client::Unknown => true,
        Client::Unsupported => false,
    }
}

#[cfg(target_os = "linux")]
fn owner(peer: SocketAddr, local: SocketAddr) -> Client {
    match diag::owner(peer, local) {
        Ok(found) => found,
        // No netlink here (a sandbox may forbid it): the table in /proc, if readable.
        Err(_) => proc_owner(peer, local),
    }
}

#[cfg(not(target_os = "linux"))]
fn owner(_peer: SocketAddr, _local: SocketAddr) -> Client {
    Client::Unsupported
}

/// TCP states in the kernel's numbering (`include/net/tcp_states.h`).
#[cfg(target_os = "linux")]
const TCP_TIME_WAIT: u8 = 6;

/// The client's line of `/proc/net/tcp{,6}`: local address our peer's, remote ours. The
/// table is read twice before the socket is taken for gone: a read of a changing table may
/// skip lines.
#[cfg(target_os = "linux")]
fn proc_owner(peer: SocketAddr, local: SocketAddr) -> Client {
    let table = if peer.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let (want_local, want_remote) = (proc_addr(peer), proc_addr(local));
    for _ in 0..2 {
        let Ok(text) = std::fs::read_to_string(table) else { return Client::Unsupported };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
            let mut fields = line.split_whitespace().skip(1);
            let (Some(l), Some(r), Some(st)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            if !(l.eq_ignore_ascii_case(&want_local) && r.eq_ignore_ascii_case(&want_remote)) {
                continue;
            }
            let uid = fields.nth(3).and_then(|u| u.parse().ok());
            return match (u8::from_str_radix(st, 16), uid) {
                (Ok(TCP_TIME_WAIT), _) | (_, None) => Client::Unknown,
                (_, Some(uid)) => Client::Owner(uid),
            };
        }
    }
    Client::Unknown
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

    use super::{Client, TCP_TIME_WAIT, ip_words};

    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    /// `sizeof(struct nlmsghdr)`.
    const NLMSG_HDR: usize = 16;
    /// `sizeof(struct inet_diag_req_v2)`.
    const REQ_LEN: usize = 56;
    /// Where `idiag_state` and `idiag_uid` sit in `struct inet_diag_msg`.
    const MSG_STATE: usize = 1;
    const MSG_UID: usize = 64;

    /// The owner of the TCP socket whose source is `src` and destination `dst`.
    pub(super) fn owner(src: SocketAddr, dst: SocketAddr) -> io::Result<Client> {
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
        let request = request(src, dst);
        // SAFETY: `request` is a valid buffer of its length; a netlink datagram socket sends
        // to the kernel with no address.
        let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
        if sent != request.len() as isize {
            return Err(io::Error::last_os_error());
        }
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
        let mut answer = [0u8; 512];
        // SAFETY: recv into a buffer we own, at most its length.
        let got =
            unsafe { libc::recv(fd.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(parse(&answer[..got as usize]))
    }

    /// An `nlmsghdr` and an `inet_diag_req_v2` naming one TCP socket by its address pair.
    fn request(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut m = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
        m.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        let family = if src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        m.push(family as u8);
        m.push(libc::IPPROTO_TCP as u8);
        m.push(0); // no extensions
        m.push(0); // padding
        m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
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

    /// The owner in the kernel's answer: an `inet_diag_msg`, or an error (no such socket).
    fn parse(answer: &[u8]) -> Client {
        let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let msg = &answer[NLMSG_HDR.min(answer.len())..];
        match (kind, msg.get(MSG_STATE), msg.get(MSG_UID..MSG_UID + 4)) {
            (Some(SOCK_DIAG_BY_FAMILY), Some(&state), Some(uid)) if state != TCP_TIME_WAIT => {
                Client::Owner(u32::from_ne_bytes([uid[0], uid[1], uid[2], uid[3]]))
            }
            (Some(NLMSG_ERROR), _, _) | (Some(_), _, _) | (None, _, _) => Client::Unknown,
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::TcpListener;

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

    #[test]
    fn the_client_of_a_loopback_connection_is_this_user_by_either_lookup() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(bind) else { continue };
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (served, peer) = listener.accept().unwrap();
            let local = served.local_addr().unwrap();
            assert_eq!(diag::owner(peer, local).unwrap(), Client::Owner(ours()), "{bind} netlink");
            if std::path::Path::new("/proc/net/tcp").exists() {
                assert_eq!(proc_owner(peer, local), Client::Owner(ours()), "{bind} /proc");
            }
            assert!(!is_another_user(&served, peer));
            // A client gone (reset) is nobody's: not taken for ours.
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: setsockopt with a valid linger of its size on a socket we own.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&client),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            drop(client);
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(diag::owner(peer, local).unwrap(), Client::Unknown, "{bind} after reset");
            assert_eq!(proc_owner(peer, local), Client::Unknown, "{bind} /proc after reset");
            assert!(is_another_user(&served, peer), "{bind}: a reset client was taken for ours");
        }
    }
}
