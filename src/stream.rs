//! The byte stream under a WebSocket on a readiness-driven thread (the relay's reactor, the
//! bridge's relay socket): plain TCP or TLS, and for plain TCP a memory of having been read
//! dry.
//!
//! tungstenite reads until the socket would block, so every message used to cost one more
//! `recv` that returned `EAGAIN`. A read that returns fewer bytes than asked for has emptied a
//! plain socket; the next read then answers `WouldBlock` without a syscall, until the owner
//! reports readiness again ([`Stream::mark_ready`]). Level-triggered polling reports any byte
//! that arrives later, so nothing is left unread. TLS streams are never marked: the TLS layer
//! may hold decrypted bytes the socket no longer shows.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// A plain or TLS byte stream.
pub struct Stream {
    inner: Inner,
    /// Short reads mark the stream drained (only while the owner polls its readiness).
    armed: bool,
    /// The last read emptied the socket; cleared by [`Stream::mark_ready`].
    drained: bool,
    /// Writes through [`Write`] answer `WouldBlock` (a frame is being written around them).
    held: bool,
    /// Bytes handed out by [`Read`] so far.
    read_total: u64,
    /// Where the first HTTP head read through this stream ends, once asked for.
    head: HeadScan,
}

/// The search for the end of the first HTTP head (`\r\n\r\n`) in the bytes read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HeadScan {
    /// Not asked for.
    Off,
    /// Searching; this many bytes of `\r\n\r\n` matched at the end of what was read.
    Matched(u8),
    /// The head ended after this many bytes read.
    Ended(u64),
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<native_tls::TlsStream<TcpStream>>),
}

impl Stream {
    /// A plain TCP stream, not armed.
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream {
            inner: Inner::Plain(tcp),
            armed: false,
            drained: false,
            held: false,
            read_total: 0,
            head: HeadScan::Off,
        }
    }

    /// A TLS stream.
    pub fn tls(tls: native_tls::TlsStream<TcpStream>) -> Stream {
        Stream {
            inner: Inner::Tls(Box::new(tls)),
            armed: false,
            drained: false,
            held: false,
            read_total: 0,
            head: HeadScan::Off,
        }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s,
            Inner::Tls(s) => s.get_ref(),
        }
    }

    /// Bytes handed out by [`Read`] so far (decrypted bytes, for TLS).
    pub fn bytes_read(&self) -> u64 {
        self.read_total
    }

    /// Starts looking for the end of the HTTP head that the next reads bring (a handshake's
    /// response), so that [`Stream::head_end`] can tell where the bytes after it begin.
    pub fn find_head_end(&mut self) {
        self.head = HeadScan::Matched(0);
    }

    /// How many bytes [`Read`] had handed out when the head watched for by
    /// [`Stream::find_head_end`] ended; `None` if it has not ended (or was not watched for).
    pub fn head_end(&self) -> Option<u64> {
        match self.head {
            HeadScan::Ended(at) => Some(at),
            _ => None,
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
        match &mut self.inner {
            Inner::Plain(s) => s.write_vectored(bufs),
            Inner::Tls(s) => s.write_vectored(bufs),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = match &mut self.inner {
            Inner::Plain(s) => {
                let n = s.read(buf)?;
                self.drained = self.armed && n > 0 && n < buf.len();
                n
            }
            Inner::Tls(s) => s.read(buf)?,
        };
        if let HeadScan::Matched(mut matched) = self.head {
            let mut end = None;
            for (i, &b) in buf[..n].iter().enumerate() {
                matched = match (matched, b) {
                    (0 | 2, b'\r') | (1 | 3, b'\n') => matched + 1,
                    (_, b'\r') => 1,
                    _ => 0,
                };
                if matched == 4 {
                    end = Some(self.read_total + i as u64 + 1);
                    break;
                }
            }
            self.head = end.map_or(HeadScan::Matched(matched), HeadScan::Ended);
        }
        self.read_total += n as u64;
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.held {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match &mut self.inner {
            Inner::Plain(s) => s.write(buf),
            Inner::Tls(s) => s.write(buf),
        }
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

    #[test]
    fn the_head_end_is_found_across_reads() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (tcp, _) = l.accept().unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut s = Stream::plain(tcp);
        let mut buf = [0u8; 3];
        peer.write_all(b"ab").unwrap();
        s.read_exact(&mut buf[..2]).unwrap();
        assert_eq!(s.head_end(), None, "not asked for");
        // A stray CR restarts the match; the head ends after the first CR LF CR LF.
        s.find_head_end();
        peer.write_all(b"1\r\n\r\r\n\r\nframe\r\n\r\n").unwrap();
        let mut read = 0;
        while read < 17 {
            read += s.read(&mut buf).unwrap();
            if read < 8 {
                assert_eq!(s.head_end(), None, "after {read} bytes");
            }
        }
        assert_eq!(s.head_end(), Some(2 + 8));
        assert_eq!(s.bytes_read(), 2 + 17);
    }
}
