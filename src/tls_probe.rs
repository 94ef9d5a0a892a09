//! Telling a local server that speaks HTTPS where plain HTTP is expected (the backend, which
//! the bridge, pairing and `--doctor` talk to in plain HTTP on loopback).
//!
//! Such a server answers a plain request in one of three ways: a TLS alert (a record whose
//! first byte is 0x15), an HTTP 400 page (nginx: "The plain HTTP request was sent to HTTPS
//! port"; Go: "Client sent an HTTP request to an HTTPS server"), or, the most common (OpenSSL
//! behind uvicorn, Node, `openssl s_server`), a silent close. Only the first can be read off the
//! answer ([`is_tls_record`]); for the others, once a plain request has failed, [`answers_tls`]
//! asks the server itself with a TLS ClientHello.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long [`speaks_tls`] gives the server (loopback: it answers at once or not at all).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `bytes` start with a TLS record header: an alert (0x15) or a handshake (0x16)
/// record of an SSL 3.0 to TLS 1.3 version (0x03 0x00..=0x04).
pub fn is_tls_record(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

/// Whether the server at `host:port` (any of its addresses) answers a TLS ClientHello in TLS.
pub fn speaks_tls(host: &str, port: u16) -> bool {
    (host, port)
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.any(|addr| answers_tls(addr, PROBE_TIMEOUT)))
}

/// Whether the server at `addr` answers a TLS ClientHello with a TLS record (its ServerHello,
/// or an alert): a handshake whose outcome does not matter (no certificate is checked, nothing
/// is sent after it).
pub fn answers_tls(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(tcp) = TcpStream::connect_timeout(&addr, timeout) else { return false };
    if tcp.set_read_timeout(Some(timeout)).is_err() || tcp.set_write_timeout(Some(timeout)).is_err()
    {
        return false;
    }
    let Ok(connector) = native_tls::TlsConnector::builder()
        .danger_accept_invalid_certs(true)
        .danger_accept_invalid_hostnames(true)
        .build()
    else {
        return false;
    };
    let mut socket = FirstBytes { tcp, first: Vec::with_capacity(3) };
    // Success or failure alike: what counts is how the server's first bytes began.
    let _ = connector.connect("localhost", &mut socket);
    is_tls_record(&socket.first)
}

/// A socket that keeps the first three bytes read from it.
#[derive(Debug)]
struct FirstBytes {
    tcp: TcpStream,
    first: Vec<u8>,
}

impl Read for FirstBytes {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.tcp.read(buf)?;
        let want = 3 - self.first.len().min(3);
        self.first.extend_from_slice(&buf[..n.min(want)]);
        Ok(n)
    }
}

impl Write for FirstBytes {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// What to tell the user when `peer` ("the backend at 127.0.0.1:8765") speaks HTTPS.
pub fn hint(peer: &str) -> String {
    format!(
        "{peer} speaks HTTPS; hermeschat-pair talks plain HTTP to it: serve it over \
         plain HTTP on loopback (TLS adds nothing there, the traffic never leaves this machine), \
         or run hermeschat-pair --port <port> with a port where it speaks plain HTTP"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_records_are_told_from_http() {
        assert!(is_tls_record(b"\x15\x03\x03\x00\x02\x02\x46"));
        assert!(is_tls_record(b"\x16\x03\x01\x00\x05"));
        assert!(is_tls_record(b"\x15\x03\x00"));
        assert!(!is_tls_record(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(!is_tls_record(b"\x16\x03"));
        assert!(!is_tls_record(b"\x17\x03\x03"));
        assert!(!is_tls_record(b"\x16\x03\x05"));
        assert!(!is_tls_record(b""));
    }

    #[test]
    fn a_plain_http_server_does_not_speak_tls() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        });
        assert!(!answers_tls(addr, Duration::from_secs(2)));
        server.join().unwrap();
    }
}
