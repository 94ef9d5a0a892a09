//! The outbound side of a WebSocket on a non-blocking socket, shared by the crate's
//! readiness-driven threads (the relay reactor, the LAN server, the bridge's relay socket): a
//! queue of messages with a byte count (for back-pressure) and a flush that writes until the
//! socket would block.
//!
//! Large frames bypass tungstenite's write buffer, which would copy each one whole:
//! - a server may queue a text frame given as pieces ([`WsOut::push_pieces`]): the relay
//!   forwards a 16 MiB request as its own short prefix plus a slice of the message it received
//!   (and a large response as the slices before and after its `client` member);
//! - a client may queue a text frame it owns ([`WsOut::push_masked_text`]): the bridge's
//!   256 KiB download chunks are masked in place.
//!
//! Such a frame is written with vectored writes. While it is half written, the stream holds
//! back writes through tungstenite (a close the bridge sends straight through it on the way
//! out), so they cannot land in the middle of it. Pongs wait here, one at most
//! ([`WsOut::push_pong`]), and go out between frames.
//!
//! A message queued with [`WsOut::push_withdrawable`] can be taken back while no byte of it
//! has left ([`WsOut::withdraw`]): the relay drops a bridge's `client.connected` that is still
//! waiting when that app's socket is already gone, together with its `client.disconnected`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use tungstenite::{Bytes, Message, WebSocket};

use crate::stream::Stream;

/// True for the errors a non-blocking socket returns when it has nothing more to give or take.
pub fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// [`would_block`] for tungstenite's error type.
pub fn ws_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if would_block(io))
}

/// A queued outbound message.
enum Queued {
    /// Framed and buffered by tungstenite.
    Message(Message),
    /// A whole frame written by [`write_vectored`]: its header, then its payload in pieces.
    Frame {
        /// The header first, then the payload.
        pieces: Vec<Bytes>,
        /// Bytes of payload (what the queue's byte count counts).
        payload: usize,
        /// Keep the payload's buffer for [`WsOut::take_spare`] once written.
        recycle: bool,
    },
    /// A message taken back by [`WsOut::withdraw`]: skipped when its turn comes.
    Withdrawn,
}

impl Queued {
    /// Bytes of payload.
    fn len(&self) -> usize {
        match self {
            Queued::Message(m) => m.len(),
            Queued::Frame { payload, .. } => *payload,
            Queued::Withdrawn => 0,
        }
    }
}

/// A frame written from pieces, part-way through.
struct Vectored {
    /// The frame header followed by the payload pieces.
    pieces: Vec<Bytes>,
    /// Bytes of `pieces` already written.
    written: usize,
    /// Keep the last piece's buffer once written.
    recycle: bool,
}

/// The largest buffer kept for reuse: a download chunk frame (341 KiB of base64) fits; a rare
/// multi-MiB frame's buffer goes back to the system.
const SPARE_MAX: usize = 1 << 20;

/// Messages waiting for a WebSocket, and whether bytes wait in tungstenite or in a
/// half-written frame.
#[derive(Default)]
pub struct WsOut {
    /// Messages in order, each with its sequence number (increasing from front to back).
    queue: VecDeque<(u64, Queued)>,
    /// The sequence number of the next message queued.
    next_seq: u64,
    /// Entries of `queue` that are [`Queued::Withdrawn`].
    withdrawn: usize,
    bytes: usize,
    blocked: bool,
    vectored: Option<Vectored>,
    /// The emptied buffer of the last recycled frame ([`WsOut::take_spare`]).
    spare: Option<Vec<u8>>,
    /// The pong that answers the latest ping, not yet handed to tungstenite.
    pong: Option<Bytes>,
}

/// The socket broke while writing (the error, for logs); drop the connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken(pub String);

impl WsOut {
    /// Queues a message (sent by the next [`WsOut::flush`]).
    pub fn push(&mut self, msg: Message) {
        self.push_withdrawable(msg);
    }

    /// Queues a message like [`WsOut::push`] and returns its ticket for [`WsOut::withdraw`].
    pub fn push_withdrawable(&mut self, msg: Message) -> u64 {
        note_if_large(msg.len());
        self.bytes += msg.len();
        self.push_back(Queued::Message(msg))
    }

    /// Takes back the message queued with `ticket` if none of it was handed to the socket (or
    /// to tungstenite) yet: true when it will never be sent, false when it already left (or
    /// was withdrawn before). O(log n): the queue is ordered by ticket.
    pub fn withdraw(&mut self, ticket: u64) -> bool {
        let Ok(i) = self.queue.binary_search_by_key(&ticket, |(seq, _)| *seq) else {
            return false;
        };
        if matches!(self.queue[i].1, Queued::Withdrawn) {
            return false;
        }
        if i + 1 == self.queue.len() {
            if let Some((_, queued)) = self.queue.pop_back() {
                self.bytes = self.bytes.saturating_sub(queued.len());
            }
            return true;
        }
        let queued = std::mem::replace(&mut self.queue[i].1, Queued::Withdrawn);
        self.bytes = self.bytes.saturating_sub(queued.len());
        self.withdrawn += 1;
        // Placeholders are dropped once they are a quarter of the queue: the queue's length
        // stays within 4/3 of its messages, at O(1) amortised per withdrawal.
        if self.withdrawn > 64 && self.withdrawn * 4 > self.queue.len() {
            self.queue.retain(|(_, q)| !matches!(q, Queued::Withdrawn));
            self.withdrawn = 0;
        }
        true
    }

    /// Appends to the queue under the next sequence number, which it returns.
    fn push_back(&mut self, queued: Queued) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back((seq, queued));
        seq
    }

    /// Answers a ping: a pong with its payload goes out before the next queued message. Only
    /// the latest ping is answered (RFC 6455 §5.5.3 allows it), so a peer that floods pings
    /// and reads nothing makes at most one pong wait here and one in tungstenite.
    pub fn push_pong(&mut self, payload: Bytes) {
        self.pong = Some(payload);
    }

    /// Queues a text frame whose payload is `pieces` joined, written without joining them.
    /// The pieces must join into valid UTF-8. Only for the server side of a WebSocket: the
    /// frame is sent unmasked.
    pub fn push_pieces(&mut self, payload: Vec<Bytes>) {
        let len = payload.iter().map(Bytes::len).sum();
        let mut head = frame_header(0x81, len, None);
        let mut pieces = Vec::with_capacity(payload.len() + 1);
        let mut payload = payload.into_iter();
        // A short first piece (the relay's prefix) shares the header's buffer: one slice and,
        // on TLS, one record fewer.
        match payload.next() {
            Some(first) if first.len() <= 256 => {
                head.extend_from_slice(&first);
                pieces.push(Bytes::from(head));
            }
            first => {
                pieces.push(Bytes::from(head));
                pieces.extend(first);
            }
        }
        pieces.extend(payload);
        self.push_frame(pieces, len, false);
    }

    /// Queues `text` as a masked text frame, masking it in place instead of letting tungstenite
    /// copy it into its write buffer to mask it there. For the client side of a WebSocket.
    /// With `recycle`, the buffer is kept once written, for [`WsOut::take_spare`].
    pub fn push_masked_text(&mut self, text: String, recycle: bool) {
        let key = crate::secret::random_bytes::<4>();
        let mut payload = text.into_bytes();
        apply_mask(&mut payload, key);
        let head = frame_header(0x81, payload.len(), Some(key));
        let len = payload.len();
        self.push_frame(vec![Bytes::from(head), Bytes::from(payload)], len, recycle);
    }

    fn push_frame(&mut self, pieces: Vec<Bytes>, payload: usize, recycle: bool) {
        note_if_large(payload);
        self.bytes += payload;
        self.push_back(Queued::Frame { pieces, payload, recycle });
    }

    /// The emptied buffer of the last frame queued with `recycle` and written since, if any:
    /// a large frame built in it costs no fresh mapping and no page faults.
    pub fn take_spare(&mut self) -> Option<Vec<u8>> {
        self.spare.take()
    }

    /// Ends a half-written frame: the stream's writes flow again, and a recycled payload
    /// buffer becomes the spare.
    fn end_vectored(&mut self, ws: &mut WebSocket<Stream>, written: bool) {
        let Some(v) = self.vectored.take() else { return };
        ws.get_mut().hold_writes(false);
        if !(written && v.recycle) {
            return;
        }
        if let Some(mut payload) = v.pieces.into_iter().next_back()
            && payload.is_unique()
        {
            // Only its allocation is wanted: one byte moves, not the frame (musl's `memmove`
            // copies even onto itself).
            payload.truncate(1);
            let mut buf = Vec::from(payload);
            if buf.capacity() <= SPARE_MAX {
                buf.clear();
                self.spare = Some(buf);
            }
        }
    }

    /// Bytes queued and not yet handed to the socket or tungstenite.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when nothing is queued and nothing is held back.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.blocked && self.pong.is_none()
    }

    /// True while bytes the socket did not take wait: wait for writability.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Writes queued messages until the socket would block, then flushes. Only one message at
    /// a time sits in tungstenite's buffer (or half-written from pieces), so the queue stays
    /// the one place bytes wait.
    pub fn flush(&mut self, ws: &mut WebSocket<Stream>) -> Result<(), Broken> {
        loop {
            if self.blocked {
                let done = match self.vectored.as_mut() {
                    Some(v) => write_vectored(ws.get_mut(), v),
                    None => flushed(ws.flush()),
                };
                match done {
                    Ok(true) => {
                        self.blocked = false;
                        self.end_vectored(ws, true);
                    }
                    Ok(false) => return Ok(()),
                    Err(e) => {
                        self.end_vectored(ws, false);
                        return Err(e);
                    }
                }
            }
            if let Some(payload) = self.pong.take() {
                match ws.write(Message::Pong(payload)) {
                    Ok(()) => {}
                    // The pong is buffered inside tungstenite.
                    Err(e) if ws_would_block(&e) => {
                        self.blocked = true;
                        return Ok(());
                    }
                    Err(tungstenite::Error::WriteBufferFull(msg)) => {
                        if let Message::Pong(payload) = *msg {
                            self.pong = Some(payload);
                        }
                        self.blocked = true;
                        return Ok(());
                    }
                    Err(e) => return Err(Broken(e.to_string())),
                }
            }
            let Some((seq, queued)) = self.queue.pop_front() else {
                return match flushed(ws.flush()) {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        self.blocked = true;
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
            };
            if matches!(queued, Queued::Withdrawn) {
                self.withdrawn = self.withdrawn.saturating_sub(1);
                continue;
            }
            let size = queued.len();
            // Queued large frames are freed as they are written, which a slow reader can
            // spread over seconds: the heap is trimmed only after the last one.
            note_if_large(size);
            self.bytes = self.bytes.saturating_sub(size);
            match queued {
                Queued::Message(msg) => match ws.write(msg) {
                    Ok(()) => {}
                    // The message is buffered inside tungstenite.
                    Err(e) if ws_would_block(&e) => {
                        self.blocked = true;
                        return Ok(());
                    }
                    Err(tungstenite::Error::WriteBufferFull(msg)) => {
                        self.bytes += msg.len();
                        self.queue.push_front((seq, Queued::Message(*msg)));
                        self.blocked = true;
                        return Ok(());
                    }
                    Err(e) => return Err(Broken(e.to_string())),
                },
                Queued::Frame { pieces, payload, recycle } => {
                    // After a close frame nothing more may follow (tungstenite refuses a
                    // plain message then too).
                    if !ws.can_write() {
                        return Err(Broken("the connection is closing".into()));
                    }
                    // What tungstenite buffered goes first.
                    match flushed(ws.flush()) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.bytes += size;
                            let queued = Queued::Frame { pieces, payload, recycle };
                            self.queue.push_front((seq, queued));
                            self.blocked = true;
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    }
                    ws.get_mut().hold_writes(true);
                    self.vectored = Some(Vectored { pieces, written: 0, recycle });
                    self.blocked = true;
                }
                // Skipped above.
                Queued::Withdrawn => {}
            }
        }
    }
}

/// Tells the allocator policy that a large frame is queued or being written
/// ([`crate::memory::note_large_transfer`]).
fn note_if_large(len: usize) {
    if len >= crate::protocol::LARGE_FRAME {
        crate::memory::note_large_transfer();
    }
}

/// A tungstenite flush as `Ok(true)` when done, `Ok(false)` when the socket would block.
fn flushed(r: tungstenite::Result<()>) -> Result<bool, Broken> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if ws_would_block(&e) => Ok(false),
        Err(e) => Err(Broken(e.to_string())),
    }
}

/// The header of a frame whose first byte (FIN, opcode) is `first`, with a payload of `len`
/// bytes, masked with `mask` if given (RFC 6455 §5.2). Our frames are final text frames
/// (`0x81`); the reader's tests build every other kind with it too.
pub fn frame_header(first: u8, len: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
    let masked = if mask.is_some() { 0x80 } else { 0 };
    let mut head = vec![first];
    match len {
        0..=125 => head.push(masked | len as u8),
        126..=0xFFFF => {
            head.push(masked | 126);
            head.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            head.push(masked | 127);
            head.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    head.extend(mask.iter().flatten());
    head
}

/// XORs `payload` with the masking key, byte `i` with `key[i % 4]` (RFC 6455 §5.3), eight
/// bytes at a time.
pub fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    let word = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut words = payload.chunks_exact_mut(8);
    for chunk in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    // Whole words leave the tail starting at a multiple of 8, so its key index starts at 0.
    for (b, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *b ^= k;
    }
}

/// Writes the rest of a frame given as pieces until it is all written (`Ok(true)`) or the
/// socket would block (`Ok(false)`).
fn write_vectored(stream: &mut Stream, v: &mut Vectored) -> Result<bool, Broken> {
    /// Pieces handed to one `writev`.
    const SLICES: usize = 8;
    loop {
        let mut skip = v.written;
        let mut slices = Vec::with_capacity(SLICES);
        for piece in &v.pieces {
            if skip >= piece.len() {
                skip -= piece.len();
                continue;
            }
            slices.push(IoSlice::new(&piece[skip..]));
            skip = 0;
            if slices.len() == SLICES {
                break;
            }
        }
        if slices.is_empty() {
            return Ok(true);
        }
        match stream.write_vectored_held(&slices) {
            Ok(0) => return Err(Broken("the socket accepted no bytes".into())),
            Ok(n) => v.written += n,
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) => return Err(Broken(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use tungstenite::protocol::Role;

    /// A connected loopback pair: ours non-blocking (as the reactors run it), and the peer.
    fn socket_pair() -> (Stream, TcpStream) {
        let (ours, peer) = crate::poll::tests::pair();
        ours.set_nonblocking(true).unwrap();
        (Stream::plain(ours), peer)
    }

    #[test]
    fn only_the_latest_ping_is_answered_and_before_what_is_queued() {
        let (ours, peer) = socket_pair();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut server = WebSocket::from_raw_socket(ours, Role::Server, None);
        let mut out = WsOut::default();
        out.push(Message::text("queued"));
        for n in 0..1000 {
            out.push_pong(Bytes::from(format!("ping {n}")));
        }
        assert!(!out.is_idle());
        out.flush(&mut server).unwrap();
        assert!(out.is_idle());
        let mut client = WebSocket::from_raw_socket(peer, Role::Client, None);
        assert_eq!(client.read().unwrap(), Message::Pong(Bytes::from_static(b"ping 999")));
        assert_eq!(client.read().unwrap(), Message::text("queued"));
    }

    /// A withdrawn message never leaves and no longer counts; one already handed to the
    /// socket cannot be withdrawn; the others go out in order, also after the placeholders of
    /// many withdrawn messages were compacted away.
    #[test]
    fn a_withdrawn_message_never_leaves_and_the_rest_keep_their_order() {
        let (ours, peer) = socket_pair();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut server = WebSocket::from_raw_socket(ours, Role::Server, None);
        let mut out = WsOut::default();
        let sent = out.push_withdrawable(Message::text("sent"));
        out.flush(&mut server).unwrap();
        assert!(!out.withdraw(sent), "already written");
        let mut want = Vec::new();
        for n in 0..300 {
            let text = format!("m{n}");
            let ticket = out.push_withdrawable(Message::text(text.clone()));
            // Some are taken back: in the middle of the queue, and at its back.
            let kept = out.push_withdrawable(Message::text(format!("k{n}")));
            if n % 3 == 0 {
                assert!(out.withdraw(kept));
                assert!(!out.withdraw(kept), "twice");
            } else {
                want.push(format!("k{n}"));
            }
            if n % 2 == 0 {
                assert!(out.withdraw(ticket));
            } else {
                want.insert(want.len() - usize::from(n % 3 != 0), text);
            }
        }
        let queued: usize = want.iter().map(String::len).sum();
        assert_eq!(out.bytes(), queued);
        assert!(out.queue.len() <= want.len() * 4 / 3 + 65, "{} entries", out.queue.len());
        out.flush(&mut server).unwrap();
        assert!(out.is_idle());
        let mut client = WebSocket::from_raw_socket(peer, Role::Client, None);
        assert_eq!(client.read().unwrap(), Message::text("sent"));
        for w in &want {
            assert_eq!(client.read().unwrap(), Message::text(w.as_str()));
        }
    }

    /// Frames from pieces, of every header size and around a plain message, arrive whole and
    /// in order at a real WebSocket client, however the socket splits the writes.
    #[test]
    fn frames_from_pieces_arrive_whole_and_in_order() {
        let (ours, peer) = socket_pair();
        let mut server = WebSocket::from_raw_socket(ours, Role::Server, None);
        let lens = [0usize, 1, 125, 126, 65535, 65536, 3 << 20];
        let reader = std::thread::spawn(move || {
            let mut client = WebSocket::from_raw_socket(peer, Role::Client, None);
            (0..lens.len() + 1).map(|_| client.read().unwrap()).collect::<Vec<_>>()
        });

        let mut out = WsOut::default();
        for (i, len) in lens.iter().enumerate() {
            let text: String = (0..*len).map(|j| (b'a' + ((i + j) % 26) as u8) as char).collect();
            let cut = [len / 3, 2 * len / 3];
            let bytes = Bytes::from(text);
            out.push_pieces(vec![
                bytes.slice(..cut[0]),
                bytes.slice(cut[0]..cut[1]),
                bytes.slice(cut[1]..),
            ]);
            if i == 3 {
                out.push(Message::text("between"));
            }
        }
        while !out.is_idle() {
            out.flush(&mut server).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let got = reader.join().unwrap();
        let mut want: Vec<String> = lens
            .iter()
            .enumerate()
            .map(|(i, len)| (0..*len).map(|j| (b'a' + ((i + j) % 26) as u8) as char).collect())
            .collect();
        want.insert(4, "between".into());
        let got: Vec<String> =
            got.into_iter().map(|m| m.into_text().unwrap().to_string()).collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(g == w, "a frame of {} bytes arrived as {} bytes", w.len(), g.len());
        }
    }

    /// Masked frames of every header size and of every length modulo 8, around a plain
    /// message, arrive whole and in order at a real WebSocket server (which refuses an
    /// unmasked frame from a client, and unmasks with the key in the header).
    #[test]
    fn masked_frames_arrive_whole_and_in_order() {
        let (ours, peer) = socket_pair();
        let mut client = WebSocket::from_raw_socket(ours, Role::Client, None);
        let lens = [0usize, 1, 7, 8, 9, 10, 11, 12, 125, 126, 65535, 65536, (3 << 20) + 5];
        let text = |i: usize, len: usize| -> String {
            (0..len).map(|j| (b'a' + ((i * 7 + j) % 26) as u8) as char).collect()
        };
        // The plain message, and a last frame pushed after the spare is checked.
        let reader = std::thread::spawn(move || {
            let mut server = WebSocket::from_raw_socket(peer, Role::Server, None);
            (0..lens.len() + 2).map(|_| server.read().unwrap()).collect::<Vec<_>>()
        });

        let mut out = WsOut::default();
        for (i, len) in lens.iter().enumerate() {
            out.push_masked_text(text(i, *len), true);
            if i == 4 {
                out.push(Message::text("between"));
            }
        }
        let flush_all = |out: &mut WsOut, client: &mut WebSocket<Stream>| {
            while !out.is_idle() {
                out.flush(client).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        flush_all(&mut out, &mut client);
        // The 64 KiB frame's buffer was kept; the 3 MiB one's went back (over SPARE_MAX).
        let spare = out.take_spare().expect("a written frame's buffer is kept");
        assert!(spare.is_empty() && (65536..=SPARE_MAX).contains(&spare.capacity()));
        assert!(out.take_spare().is_none());
        // A frame queued without `recycle` leaves none.
        let last = "x".repeat(70_000);
        out.push_masked_text(last.clone(), false);
        flush_all(&mut out, &mut client);
        assert!(out.take_spare().is_none());

        let got = reader.join().unwrap();
        let mut want: Vec<String> = lens.iter().enumerate().map(|(i, len)| text(i, *len)).collect();
        want.insert(5, "between".into());
        want.push(last);
        let got: Vec<String> =
            got.into_iter().map(|m| m.into_text().unwrap().to_string()).collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(g == w, "a frame of {} bytes arrived as {} bytes", w.len(), g.len());
        }
    }
}
