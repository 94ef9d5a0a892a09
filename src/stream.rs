//! The byte stream under a WebSocket on a readiness-driven thread (the relay's reactor, the
//! bridge's relay socket, the LAN server): plain TCP or TLS, for plain TCP a memory of having
//! been read dry, and, for a client's handshake, a keeper of the bytes read past the
//! response's head (the first frames, which [`crate::wsread::WsReader`] then reads).
//!
//! A reader reads until the socket would block, so every message used to cost one more
//! `recv` that returned `EAGAIN`. A read that returns fewer bytes than asked for has emptied a
//! plain socket; the next read then answers `WouldBlock` without a syscall, until the owner
//! reports readiness again ([`Stream::mark_ready`]). Level-triggered polling reports any byte
//! that arrives later, so nothing is left unread. TLS streams are never marked: the TLS layer
//! may hold decrypted bytes the socket no longer shows.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

/// A plain or TLS byte stream.
pub struct Stream {
    inner: Inner,
    /// Short reads mark the stream drained (only while the owner polls its readiness).
    armed: bool,
    /// The last read emptied the socket; cleared by [`Stream::mark_ready`].
    drained: bool,
    /// Writes through [`Write`] answer `WouldBlock` (a frame is being written around them).
    held: bool,
    /// Keeps the bytes read past an HTTP head, once asked to.
    head: HeadScan,
    /// Bytes the socket (or TLS) took so far: progress a slow reader makes inside one frame.
    written: u64,
}

/// Where [`Stream`] is in finding the end of an HTTP head (a handshake's response) in what
/// it reads, to keep what follows it.
#[derive(Debug)]
enum HeadScan {
    /// Not asked to.
    Off,
    /// Looking for the end. The state: `Some(0)` in a line, `Some(1)` after LF, `Some(2)`
    /// after LF CR; `None` before the head's first byte (leading empty lines are skipped, as
    /// httparse skips them).
    Looking(Option<u8>),
    /// Found: the bytes read after it.
    After(Vec<u8>),
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TlsSocket>>),
}

/// The TCP socket under TLS: OpenSSL's reads and writes of it run again when a signal
/// interrupts them, so EINTR never reaches OpenSSL, which would fail
/// the handshake or the connection for it.
#[derive(Debug)]
pub struct TlsSocket(pub TcpStream);

impl Read for TlsSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        retry_interrupted(|| self.0.read(buf))
    }
}

impl Write for TlsSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        retry_interrupted(|| self.0.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        retry_interrupted(|| self.0.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Stream {
    /// A plain TCP stream, not armed.
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream {
            inner: Inner::Plain(tcp),
            armed: false,
            drained: false,
            held: false,
            head: HeadScan::Off,
            written: 0,
        }
    }

    /// A TLS stream.
    pub fn tls(tls: native_tls::TlsStream<TlsSocket>) -> Stream {
        Stream {
            inner: Inner::Tls(Box::new(tls)),
            armed: false,
            drained: false,
            held: false,
            head: HeadScan::Off,
            written: 0,
        }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s,
            Inner::Tls(s) => &s.get_ref().0,
        }
    }

    /// Ends our side of the stream once everything has been written. A TLS stream first sends
    /// its close_notify alert: a peer that meets a bare FIN in TLS cannot tell it from a cut
    /// connection, and OpenSSL 3 reports "unexpected eof while reading". Best effort: a socket
    /// that cannot take the alert now still gets its FIN.
    pub fn shutdown_write(&mut self) {
        if let Inner::Tls(s) = &mut self.inner {
            let _ = s.shutdown();
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }

    /// Keeps the bytes that the next reads bring after an HTTP head (a client's side: the
    /// handshake's response, and frames read along with it). Call [`Stream::end_head_scan`]
    /// once the handshake is done.
    pub fn keep_after_head(&mut self) {
        self.head = HeadScan::Looking(None);
    }

    /// Stops looking for the head: the bytes read after it (none if it was not found), which
    /// were handed to the handshake but belong to the frames.
    pub fn end_head_scan(&mut self) -> Vec<u8> {
        match std::mem::replace(&mut self.head, HeadScan::Off) {
            HeadScan::After(bytes) => bytes,
            _ => Vec::new(),
        }
    }

    /// True for a TLS stream.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// Lets short reads mark the stream drained. Only for a non-blocking socket whose
    /// readiness the caller polls (level-triggered) and reports through
    /// [`Stream::mark_ready`]; `false` turns it off again (e.g. before blocking reads).
    pub fn arm(&mut self, armed: bool) {
        self.armed = armed;
        self.drained = false;
    }

    /// True when a short read found the socket drained and it has not been reported readable
    /// since: reads answer `WouldBlock` without a system call.
    pub fn is_drained(&self) -> bool {
        self.drained
    }

    /// The socket was reported readable: the next read goes to it.
    pub fn mark_ready(&mut self) {
        self.drained = false;
    }

    /// While held, writes through [`Write`] (tungstenite's) answer `WouldBlock`, so tungstenite
    /// keeps its bytes; only [`Stream::write_vectored_held`] reaches the socket.
    pub fn hold_writes(&mut self, held: bool) {
        self.held = held;
    }

    /// A vectored write that goes to the socket even while writes are held.
    pub fn write_vectored_held(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = match &mut self.inner {
            Inner::Plain(s) => retry_interrupted(|| s.write_vectored(bufs)),
            Inner::Tls(s) => s.write_vectored(bufs),
        }?;
        self.written += n as u64;
        Ok(n)
    }

    /// Bytes written to the socket so far (through [`Write`] or
    /// [`Stream::write_vectored_held`]).
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = match &mut self.inner {
            Inner::Plain(s) => {
                let n = retry_interrupted(|| s.read(buf))?;
                self.drained = self.armed && n > 0 && n < buf.len();
                n
            }
            Inner::Tls(s) => s.read(buf)?,
        };
        let mut end = None;
        match &mut self.head {
            HeadScan::Off => {}
            HeadScan::After(kept) => kept.extend_from_slice(&buf[..n]),
            HeadScan::Looking(state) => {
                for (i, &b) in buf[..n].iter().enumerate() {
                    // The head ends at LF LF or LF CR LF (httparse's rule; CR LF CR LF included).
                    *state = match (*state, b) {
                        (None, b'\r' | b'\n') => None,
                        (Some(1 | 2), b'\n') => {
                            end = Some(i + 1);
                            break;
                        }
                        (_, b'\n') => Some(1),
                        (Some(1), b'\r') => Some(2),
                        _ => Some(0),
                    };
                }
            }
        }
        if let Some(at) = end {
            self.head = HeadScan::After(buf[at..n].to_vec());
        }
        Ok(n)
    }
}

/// Runs a socket call again when a signal interrupted it. A blocking socket with a timeout
/// (the handshakes) is never restarted by the kernel, even for a signal nobody handles: a
/// SIGCHLD from a process the daemon started (the gateway wake-up) used to fail a relay
/// handshake with EINTR. Non-blocking sockets never wait, so never see it. TLS gets it from
/// [`TlsSocket`], below OpenSSL.
fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.held {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = match &mut self.inner {
            Inner::Plain(s) => retry_interrupted(|| s.write(buf)),
            Inner::Tls(s) => s.write(buf),
        }?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Plain(s) => s.flush(),
            Inner::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_short_read_answers_would_block_until_marked_ready() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (tcp, _) = l.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let mut s = Stream::plain(tcp);
        let mut buf = [0u8; 64];

        // Not armed: every read goes to the socket.
        peer.write_all(b"one").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(s.read(&mut buf).unwrap(), 3);
        assert_eq!(s.read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);

        s.arm(true);
        peer.write_all(b"two").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(s.read(&mut buf).unwrap(), 3);
        // Drained: bytes that arrive now wait for the next readiness report.
        peer.write_all(b"three").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(s.read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        s.mark_ready();
        assert_eq!(s.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"three");

        // A full read says nothing about what is left: the next read still goes to the socket.
        peer.write_all(&[7u8; 100]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.mark_ready();
        assert_eq!(s.read(&mut buf).unwrap(), 64);
        assert_eq!(s.read(&mut buf).unwrap(), 36);
        // End of stream is not "drained": it keeps reading as 0.
        drop(peer);
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.mark_ready();
        assert_eq!(s.read(&mut buf).unwrap(), 0);
        assert_eq!(s.read(&mut buf).unwrap(), 0);
    }

    /// Reads everything `peer` sent through `s`, `chunk` bytes at a time at most.
    fn read_through(s: &mut Stream, chunk: usize, total: usize) {
        let mut buf = vec![0u8; chunk];
        let mut read = 0;
        while read < total {
            read += s.read(&mut buf).unwrap();
        }
    }

    #[test]
    fn the_bytes_after_the_head_are_kept() {
        // CR LF CR LF, and httparse's bare-LF ending after leading empty lines; each head is
        // followed by a frame whose text looks like a head's end.
        let frame = [&[0x81u8, 4][..], b"\r\n\r\n"].concat();
        for head in
            [&b"HTTP/1.1 101 Ok\r\nA: b\r\n\r\r\n\r\n"[..], b"\r\n\nHTTP/1.1 101 Ok\nA: b\n\n"]
        {
            for chunk in [1, 3, 64] {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (tcp, _) = l.accept().unwrap();
                tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
                let mut s = Stream::plain(tcp);
                s.keep_after_head();
                peer.write_all(&[head, &frame].concat()).unwrap();
                read_through(&mut s, chunk, head.len() + frame.len());
                assert_eq!(s.end_head_scan(), frame, "{chunk}-byte reads");
                // Later reads are not kept.
                peer.write_all(b"more").unwrap();
                read_through(&mut s, chunk, 4);
                assert_eq!(s.end_head_scan(), b"");
            }
        }
    }

    #[test]
    fn a_handshake_without_a_head_end_keeps_nothing() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (tcp, _) = l.accept().unwrap();
        let mut s = Stream::plain(tcp);
        s.keep_after_head();
        peer.write_all(b"HTTP/1.1 101 Ok\r\n").unwrap();
        read_through(&mut s, 64, 17);
        assert_eq!(s.end_head_scan(), b"");
    }
}
