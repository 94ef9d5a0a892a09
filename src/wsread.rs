//! Giving back tungstenite's read buffer after a large message, on the readiness-driven
//! threads that keep WebSockets open for months (the relay's reactor, the bridge's relay
//! socket, the LAN server).
//!
//! tungstenite keeps its read buffer at the size of the largest message a connection sent,
//! for as long as the connection lives (tungstenite-rs #480): 12 MiB for every peer that once
//! sent a 12 MiB request, until it disconnects. The stream under the WebSocket follows the
//! frames it hands tungstenite ([`FrameTracker`], headers only); a while after a large message,
//! when those bytes end exactly at the end of a message that tungstenite has returned, and
//! nothing is left to write, [`Reclaim`] gives the connection a fresh tungstenite context, and
//! with it a small read buffer.

use std::time::{Duration, Instant};

use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use crate::stream::Stream;

/// Messages from this size up leave a read buffer worth giving back.
pub const RECLAIM_MIN: usize = 1 << 20;

/// How long after its last large message a connection's read buffer is renewed. Back-to-back
/// uploads keep reusing it: renewing it after each one cost about 15% of upload speed (a fresh
/// 16 MiB buffer is ~4,000 page faults).
pub const RECLAIM_AFTER: Duration = Duration::from_secs(2);

/// Follows WebSocket frames (RFC 6455 §5.2) in a byte stream: it reads each frame's header and
/// skips its payload, counting the messages that end, the way tungstenite returns them (a data
/// frame with FIN ends a message, each control frame is one).
#[derive(Debug, Default)]
pub struct FrameTracker {
    /// Bytes fed so far.
    fed: u64,
    /// The current frame's header bytes so far.
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to come, once its header is whole.
    payload_left: Option<u64>,
    /// A fragmented data message has begun and not ended.
    fragmented: bool,
    /// Messages ended so far.
    messages: u64,
    /// `fed` where the last message ended outside a fragmented one.
    boundary: u64,
}

impl FrameTracker {
    /// Follows `bytes`, the next ones of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if let Some(left) = self.payload_left {
                let n = left.min(bytes.len() as u64);
                self.skip(&mut bytes, n as usize);
                self.payload_left = Some(left - n);
                if left == n {
                    self.frame_ended();
                }
                continue;
            }
            let want = self.header_size();
            let n = (want - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            self.skip(&mut bytes, n);
            if self.header_len == self.header_size() {
                let payload = match self.header[1] & 0x7F {
                    126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or_default()),
                    len => u64::from(len),
                };
                self.payload_left = Some(payload);
                if payload == 0 {
                    self.frame_ended();
                }
            }
        }
    }

    /// Moves past `n` bytes of `bytes`.
    fn skip(&mut self, bytes: &mut &[u8], n: usize) {
        *bytes = &bytes[n..];
        self.fed += n as u64;
    }

    /// The size of the current frame's header, as far as its bytes so far tell.
    fn header_size(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn frame_ended(&mut self) {
        let (fin, control) = (self.header[0] & 0x80 != 0, self.header[0] & 0x08 != 0);
        if control || fin {
            self.messages += 1;
        }
        if !control {
            self.fragmented = !fin;
        }
        if !self.fragmented {
            self.boundary = self.fed;
        }
        self.header_len = 0;
        self.payload_left = None;
    }

    /// Messages ended so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// True when the bytes fed end exactly where a message ended, outside a fragmented one.
    pub fn at_message_end(&self) -> bool {
        self.boundary == self.fed && !self.fragmented
    }
}

/// The read-side bookkeeping of one WebSocket (see the module doc).
#[derive(Debug)]
pub struct Reclaim {
    /// Our side of the connection (a fresh context needs it).
    role: Role,
    /// Messages tungstenite returned.
    returned: u64,
    /// When the last message of [`RECLAIM_MIN`] bytes or more was read, unless the context
    /// was renewed since; never set on a connection whose stream does not follow its frames.
    large_read: Option<Instant>,
    /// The stream follows the frames ([`Stream::frames`]).
    tracked: bool,
}

impl Reclaim {
    /// Bookkeeping for `ws`, a WebSocket on our `role`'s side; it can be renewed only if its
    /// stream follows the frames from their first byte ([`Stream::track_frames`],
    /// [`Stream::track_frames_after_head`]).
    pub fn new(role: Role, ws: &WebSocket<Stream>) -> Reclaim {
        let tracked = ws.get_ref().frames().is_some();
        Reclaim { role, returned: 0, large_read: None, tracked }
    }

    /// Counts a message tungstenite returned at `now`.
    pub fn on_message(&mut self, msg: &Message, now: Instant) {
        self.returned += 1;
        if msg.len() >= crate::protocol::LARGE_FRAME {
            crate::memory::note_large_transfer();
        }
        if self.tracked && msg.len() >= RECLAIM_MIN {
            self.large_read = Some(now);
        }
    }

    /// True when reading `ws` now could only find the socket drained: the stream waits for the
    /// poller to report it again ([`Stream::is_drained`]), what it gave tungstenite ends where
    /// a message ended and tungstenite returned every message up to there, and the connection
    /// is open for reading. So no message and no error is due: a bad header tungstenite would
    /// refuse leaves the bytes short of a message's end, and the read goes ahead.
    /// The caller skips that read: tungstenite zero-fills its whole read size before each
    /// read, even one that finds nothing (16 KiB a time here).
    pub fn nothing_to_read(&self, ws: &WebSocket<Stream>) -> bool {
        let stream = ws.get_ref();
        stream.is_drained()
            && ws.can_read()
            && stream.frames().is_some_and(|f| f.at_message_end() && f.messages() == self.returned)
    }

    /// When the read buffer should be renewed: [`RECLAIM_AFTER`] after the last large message,
    /// if one came since the last renewal.
    pub fn due(&self) -> Option<Instant> {
        self.large_read.map(|t| t + RECLAIM_AFTER)
    }

    /// At `now`, if a renewal is due: gives `ws` a fresh tungstenite context over the same
    /// stream, with the same configuration, when `quiet` (the caller has nothing queued for
    /// it and is not closing it) and nothing else is lost: tungstenite holds no unread byte
    /// (what the stream gave it ends where a message ended, and tungstenite returned that
    /// message and every one before it) and no unwritten one (its flush completes), and the
    /// connection is open both ways. Otherwise tries again [`RECLAIM_AFTER`] later.
    pub fn renew_if_due(
        &mut self,
        mut ws: WebSocket<Stream>,
        quiet: bool,
        now: Instant,
    ) -> WebSocket<Stream> {
        if self.due().is_none_or(|due| now < due) {
            return ws;
        }
        let read_all = (ws.get_ref().frames())
            .is_some_and(|f| f.at_message_end() && f.messages() == self.returned);
        let lossless = quiet && read_all && ws.can_read() && ws.can_write() && ws.flush().is_ok();
        if !lossless {
            self.large_read = Some(now);
            return ws;
        }
        let config = *ws.get_config();
        self.large_read = None;
        WebSocket::from_raw_socket(ws.into_inner(), self.role, Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};

    /// A frame's bytes: `first` is FIN and opcode, `len` bytes of payload, masked or not.
    fn frame(first: u8, len: usize, masked: bool) -> Vec<u8> {
        let mask = if masked { 0x80 } else { 0 };
        let mut out = vec![first];
        match len {
            0..=125 => out.push(mask | len as u8),
            126..=0xFFFF => {
                out.push(mask | 126);
                out.extend((len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask | 127);
                out.extend((len as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend([1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(b'a', len));
        out
    }

    #[test]
    fn the_tracker_counts_messages_across_any_split() {
        for masked in [false, true] {
            // (bytes, messages ended after them, at a message end after them)
            let steps = [
                (frame(0x81, 200, masked), 1, true),
                (frame(0x01, 100, masked), 1, false), // a fragmented message begins
                (frame(0x89, 0, masked), 2, false),   // a ping inside it is a message
                (frame(0x00, 65_500, masked), 2, false),
                (frame(0x80, 70_000, masked), 3, true), // the last fragment ends it
                (frame(0x82, 0, masked), 4, true),
                (frame(0x81, 1 << 20, masked), 5, true),
            ];
            for chunk in [1, 7, 4096, usize::MAX] {
                let mut t = FrameTracker::default();
                for (bytes, messages, at_end) in &steps {
                    for (i, piece) in bytes.chunks(chunk.min(bytes.len()).max(1)).enumerate() {
                        if i > 0 {
                            assert!(!t.at_message_end(), "inside a frame ({chunk})");
                        }
                        t.feed(piece);
                    }
                    assert_eq!((t.messages(), t.at_message_end()), (*messages, *at_end));
                }
                // The same bytes in pieces that cross frame boundaries.
                let all: Vec<u8> = steps.iter().flat_map(|(b, _, _)| b.clone()).collect();
                let mut t = FrameTracker::default();
                for piece in all.chunks(chunk.min(all.len())) {
                    t.feed(piece);
                }
                assert_eq!((t.messages(), t.at_message_end()), (5, true), "{chunk}");
            }
        }
    }

    /// The daemon's side: unmasked frames from a server, read by a real tungstenite client.
    /// A renewal happens only where nothing is unread: not with a partial frame waiting
    /// (here right after a fragmented message, whose headers a one-frame count would get
    /// wrong), and the message then arrives intact.
    #[test]
    fn renewal_waits_for_unread_bytes_and_loses_none() {
        let (ours, mut peer) = crate::poll::tests::pair();
        // A regression fails the test instead of hanging it.
        ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut stream = Stream::plain(ours);
        stream.track_frames(&[]);
        let mut ws = WebSocket::from_raw_socket(stream, Role::Client, None);
        let mut reclaim = Reclaim::new(Role::Client, &ws);
        let later = Instant::now() + Duration::from_secs(60);
        let send = |f: Frame| {
            let mut bytes = Vec::new();
            f.format(&mut bytes).unwrap();
            bytes
        };
        let big = send(Frame::message(vec![b'x'; RECLAIM_MIN], OpCode::Data(Data::Text), true));
        let a = send(Frame::message(vec![b'y'; 100], OpCode::Data(Data::Text), false));
        let b = send(Frame::message(vec![b'z'; 65_500], OpCode::Data(Data::Continue), true));
        let next = send(Frame::message(b"after".to_vec(), OpCode::Data(Data::Text), true));
        // Written from a thread: more than the socket buffers may hold.
        let first = [big, a, b, next[..4].to_vec()].concat();
        let mut writer = peer.try_clone().unwrap();
        let wrote = std::thread::spawn(move || writer.write_all(&first));
        let read = |ws: &mut WebSocket<Stream>, reclaim: &mut Reclaim| {
            let msg = ws.read().unwrap();
            reclaim.on_message(&msg, Instant::now());
            msg
        };
        assert_eq!(read(&mut ws, &mut reclaim).len(), RECLAIM_MIN);
        assert_eq!(read(&mut ws, &mut reclaim).len(), 65_600);
        wrote.join().unwrap().unwrap();
        // Four bytes of the next frame are in tungstenite's buffer: no renewal.
        assert!(!ws.get_ref().frames().unwrap().at_message_end(), "read along with the last");
        ws = reclaim.renew_if_due(ws, true, later);
        assert_eq!(reclaim.due(), Some(later + RECLAIM_AFTER), "retried later, not renewed");
        peer.write_all(&next[4..]).unwrap();
        assert_eq!(read(&mut ws, &mut reclaim).into_text().unwrap().as_str(), "after");
        // Now everything is read: renewed, and the fresh context reads on.
        ws = reclaim.renew_if_due(ws, true, later + RECLAIM_AFTER);
        assert_eq!(reclaim.due(), None, "renewed");
        peer.write_all(&next).unwrap();
        assert_eq!(read(&mut ws, &mut reclaim).into_text().unwrap().as_str(), "after");
        // A caller with frames queued is never renewed under.
        let big = send(Frame::message(vec![b'x'; RECLAIM_MIN], OpCode::Data(Data::Text), true));
        peer.write_all(&big).unwrap();
        read(&mut ws, &mut reclaim);
        let _ = reclaim.renew_if_due(ws, false, later + 2 * RECLAIM_AFTER);
        assert!(reclaim.due().is_some(), "not quiet: not renewed");
    }

    #[test]
    fn a_read_is_skipped_only_when_it_could_find_nothing() {
        let (ours, mut peer) = crate::poll::tests::pair();
        ours.set_nonblocking(true).unwrap();
        let mut stream = Stream::plain(ours);
        stream.arm(true);
        stream.track_frames(&[]);
        let mut ws = WebSocket::from_raw_socket(stream, Role::Server, None);
        let mut reclaim = Reclaim::new(Role::Server, &ws);
        let wait_readable = |ws: &WebSocket<Stream>| {
            let mut byte = [0u8; 1];
            let deadline = Instant::now() + Duration::from_secs(10);
            while ws.get_ref().tcp().peek(&mut byte).is_err() {
                assert!(Instant::now() < deadline, "the peer's bytes never arrived");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // Two messages in one write: one short read takes both and drains the socket.
        peer.write_all(&[frame(0x81, 3, true), frame(0x81, 5, true)].concat()).unwrap();
        wait_readable(&ws);
        assert!(!reclaim.nothing_to_read(&ws), "not drained before the first read");
        let msg = ws.read().unwrap();
        reclaim.on_message(&msg, Instant::now());
        assert!(ws.get_ref().is_drained());
        assert!(!reclaim.nothing_to_read(&ws), "the second message waits in tungstenite");
        let msg = ws.read().unwrap();
        reclaim.on_message(&msg, Instant::now());
        assert_eq!(msg.len(), 5);
        assert!(reclaim.nothing_to_read(&ws), "everything returned, the socket drained");
        // A close: after tungstenite returns it, the read that reports the end is not skipped.
        peer.write_all(&frame(0x88, 0, true)).unwrap();
        wait_readable(&ws);
        ws.get_mut().mark_ready();
        let msg = ws.read().unwrap();
        reclaim.on_message(&msg, Instant::now());
        assert!(msg.is_close());
        assert!(!reclaim.nothing_to_read(&ws), "closed by the peer: the next read must report it");
    }

    #[test]
    fn a_bad_frame_behind_a_good_one_is_read_not_skipped() {
        let (ours, mut peer) = crate::poll::tests::pair();
        ours.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut stream = Stream::plain(ours);
        stream.arm(true);
        stream.track_frames(&[]);
        let mut ws = WebSocket::from_raw_socket(stream, Role::Server, None);
        let mut reclaim = Reclaim::new(Role::Server, &ws);
        // A good message, then a frame with a reserved bit set, in one short read.
        peer.write_all(&[frame(0x81, 3, true), frame(0x41, 3, true)].concat()).unwrap();
        let msg = ws.read().unwrap();
        reclaim.on_message(&msg, Instant::now());
        assert!(ws.get_ref().is_drained(), "one short read took both");
        assert!(!reclaim.nothing_to_read(&ws), "the bad frame's bytes wait in tungstenite");
        assert!(ws.read().is_err(), "and the read reports them");
    }
}
