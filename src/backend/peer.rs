//! Who is on the other end of a loopback connection: the built-in backend adds the gateway's
//! key to what it forwards, so on a machine with several users it must serve only the user
//! running it (anyone else could otherwise drive that user's agent through 127.0.0.1).
//!
//! Linux keeps the owner of every TCP socket in `/proc/net/tcp` and `/proc/net/tcp6`; the
//! client's end of a loopback connection is the line whose local address is our peer's and
//! whose remote address is ours. Elsewhere (macOS) the owner is not known and nobody is
//! refused.

use std::net::{SocketAddr, TcpStream};

/// `Some(uid)` of the process that owns the client end of `stream`, when this system tells.
pub fn client_uid(stream: &TcpStream) -> Option<u32> {
    let (peer, local) = (stream.peer_addr().ok()?, stream.local_addr().ok()?);
    owner(peer, local)
}

/// True when the client end of `stream` belongs to another user than this process's.
pub fn is_another_user(stream: &TcpStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let ours = unsafe { libc::geteuid() };
    client_uid(stream).is_some_and(|uid| uid != ours)
}

#[cfg(target_os = "linux")]
fn owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let table = if peer.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let text = std::fs::read_to_string(table).ok()?;
    let (want_local, want_remote) = (proc_addr(peer), proc_addr(local));
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
        let (l, r, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        (l.eq_ignore_ascii_case(&want_local) && r.eq_ignore_ascii_case(&want_remote))
            .then(|| uid.parse().ok())
            .flatten()
    })
}

#[cfg(not(target_os = "linux"))]
fn owner(_peer: SocketAddr, _local: SocketAddr) -> Option<u32> {
    None
}

/// An address as `/proc/net/tcp*` writes it: the address as 32-bit words in host byte order,
/// each in hex, then `:` and the port in hex.
#[cfg(target_os = "linux")]
fn proc_addr(addr: SocketAddr) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(40);
    let octets: Vec<u8> = match addr {
        SocketAddr::V4(a) => a.ip().octets().to_vec(),
        SocketAddr::V6(a) => a.ip().octets().to_vec(),
    };
    for word in octets.chunks(4) {
        let value = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        let _ = write!(out, "{value:08X}");
    }
    let _ = write!(out, ":{:04X}", addr.port());
    out
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::TcpListener;

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
    fn the_client_of_a_loopback_connection_is_this_user() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (served, _) = listener.accept().unwrap();
        // SAFETY: geteuid has no preconditions.
        let ours = unsafe { libc::geteuid() };
        if std::path::Path::new("/proc/net/tcp").exists() {
            assert_eq!(client_uid(&served), Some(ours));
        }
        assert!(!is_another_user(&served));
    }
}
