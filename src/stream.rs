//! The byte stream under a WebSocket on a readiness-driven thread (the relay's reactor, the
//! bridge's relay socket, the LAN server): plain TCP or TLS, for plain TCP a memory of having
//! been read dry, and, once asked, a follower of the frames it hands tungstenite
//! ([`crate::wsread::FrameTracker`]), which tells when tungstenite holds no unread byte.
//!
//! tungstenite reads until the socket would block, so every message used to cost one more
//! `recv` that returned `EAGAIN`. A read that returns fewer bytes than asked for has emptied a
//! plain socket; the next read then answers `WouldBlock` without a syscall, until the owner
//! reports readiness again ([`Stream::mark_ready`]). Level-triggered polling reports any byte
//! that arrives later, so nothing is left unread. TLS streams are never marked: the TLS layer
//! may hold decrypted bytes the socket no longer shows.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use crate::wsread::FrameTracker;

/// A plain or TLS byte stream.
pub struct Stream {
    inner: Inner,
    /// Short reads mark the stream drained (only while the owner polls its readiness).
    armed: bool,
    /// The last read emptied the socket; cleared by [`Stream::mark_ready`].
    drained: bool,
    /// Writes through [`Write`] answer `WouldBlock` (a frame is being written around them).
    held: bool,
    /// Follows the WebSocket frames in the bytes handed out, once asked to.
    frames: FrameWatch,
}

/// How far [`Stream`] follows the frames in what it reads ([`FrameTracker`]).
#[derive(Debug)]
enum FrameWatch {
    /// Not asked to.
    Off,
    /// Looking for the end of an HTTP head (a handshake's response); the frames start after it.
    /// The state: `Some(0)` in a line, `Some(1)` after LF, `Some(2)` after LF CR; `None` before
    /// the head's first byte (leading empty lines are skipped, as httparse skips them).
    Head(Option<u8>),
    /// Following the frames.
    Frames(FrameTracker),
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
            frames: FrameWatch::Off,
        }
    }

    /// A TLS stream.
    pub fn tls(tls: native_tls::TlsStream<TcpStream>) -> Stream {
        Stream {
            inner: Inner::Tls(Box::new(tls)),
            armed: false,
            drained: false,
            held: false,
            frames: FrameWatch::Off,
        }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s,
            Inner::Tls(s) => s.get_ref(),
        }
    }

    /// Starts following the WebSocket frames in what this stream reads from now on, after
    /// `already`: the bytes read past the HTTP upgrade request, which tungstenite is handed
    /// first (a server's side).
    pub fn track_frames(&mut self, already: &[u8]) {
        let mut t = FrameTracker::default();
        t.feed(already);
        self.frames = FrameWatch::Frames(t);
    }

    /// Follows the WebSocket frames that come after the HTTP head the next reads bring (a
    /// client's side: the handshake's response, and frame bytes read along with it). Call
    /// [`Stream::end_head_scan`] once the handshake is done.
    pub fn track_frames_after_head(&mut self) {
        self.frames = FrameWatch::Head(None);
    }

    /// Stops looking for the head if the handshake ended without it being found; nothing is
    /// followed then.
    pub fn end_head_scan(&mut self) {
        if matches!(self.frames, FrameWatch::Head(_)) {
            self.frames = FrameWatch::Off;
        }
    }

    /// The frames followed so far, if they are followed.
    pub fn frames(&self) -> Option<&FrameTracker> {
        match &self.frames {
            FrameWatch::Frames(t) => Some(t),
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
        let mut read = &buf[..n];
        if let FrameWatch::Head(mut state) = self.frames {
            let mut end = None;
            for (i, &b) in read.iter().enumerate() {
                // The head ends at LF LF or LF CR LF (httparse's rule; CR LF CR LF included).
                state = match (state, b) {
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
            match end {
                Some(at) => {
                    self.frames = FrameWatch::Frames(FrameTracker::default());
                    read = &read[at..];
                }
                None => self.frames = FrameWatch::Head(state),
            }
        }
        if let FrameWatch::Frames(t) = &mut self.frames {
            t.feed(read);
        }
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

    /// Reads everything `peer` sent through `s`, `chunk` bytes at a time at most.
    fn read_through(s: &mut Stream, chunk: usize, total: usize) {
        let mut buf = vec![0u8; chunk];
        let mut read = 0;
        while read < total {
            read += s.read(&mut buf).unwrap();
        }
    }

    #[test]
    fn frames_are_followed_from_the_end_of_the_head() {
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
                s.track_frames_after_head();
                peer.write_all(head).unwrap();
                read_through(&mut s, chunk, head.len());
                assert!(s.frames().is_some(), "head ended ({chunk}-byte reads)");
                assert_eq!(s.frames().unwrap().messages(), 0);
                peer.write_all(&frame).unwrap();
                read_through(&mut s, chunk, frame.len());
                let f = s.frames().unwrap();
                assert_eq!((f.messages(), f.at_message_end()), (1, true), "{chunk}-byte reads");
            }
        }
    }

    #[test]
    fn a_handshake_without_a_head_end_follows_nothing() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (tcp, _) = l.accept().unwrap();
        let mut s = Stream::plain(tcp);
        s.track_frames_after_head();
        peer.write_all(b"HTTP/1.1 101 Ok\r\n").unwrap();
        read_through(&mut s, 64, 17);
        s.end_head_scan();
        peer.write_all(b"\r\n\x81\x00").unwrap();
        read_through(&mut s, 64, 4);
        assert!(s.frames().is_none());
    }
}
