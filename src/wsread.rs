//! Reading WebSocket messages (RFC 6455 §5) on the readiness-driven threads that keep
//! WebSockets open for months: the relay's reactor, the bridge's relay socket, the LAN server.
//! tungstenite still does the handshakes and the writing; this is its read side, for three
//! reasons it could not serve:
//! - tungstenite zero-fills its whole read size (16 KiB here) before every read, even one that
//!   brings a 200-byte frame or nothing at all: about a tenth of the relay's user time at c16.
//!   [`WsReader`] reads small frames into a buffer that is zeroed when it is renewed (once
//!   per 12–16 KiB read on a busy connection), not per read, and hands each message out as a
//!   slice of it (no copy, no allocation); it reads a large frame's payload straight into a
//!   buffer of that frame's size, zeroed a step ahead of the reads (as tungstenite zeroes
//!   ahead of each of its own).
//! - tungstenite keeps its read buffer at the size of the largest message for as long as the
//!   connection lives (tungstenite-rs #480): 12 MiB for every peer that once sent a 12 MiB
//!   request. Here a large payload's buffer is the message itself. The buffer of a message of
//!   [`KEEP_MIN`] or more is kept for the next large frame until [`KEEP_FOR`] passes without
//!   one ([`WsReader::release_kept`]): back-to-back 12 MiB uploads reuse it instead of mapping
//!   and faulting in 16 MiB for each (about a quarter of their speed).
//! - the rules for what a peer may send are ours to state (PROTOCOL §4.4): one limit for
//!   frames and messages, checked from a frame's header, masking by role, no extensions.
//!
//! Control frames are returned to the caller, who answers them: a ping with a pong, a close
//! with a close ([`close_reply`]). A stream refused for breaking these rules is read dry
//! ([`discard_input`]), so the close frame telling the peer why is not lost to a reset.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tungstenite::protocol::Role;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Bytes, Utf8Bytes};

/// The small-frame buffer: frames up to this size (header included) are read into it with
/// as few reads as the socket allows; larger payloads get a buffer of their own.
pub const READ_SIZE: usize = 16 << 10;

/// Room under which the small-frame buffer is renewed before a read (half its size while it
/// is smaller than 8 KiB, or what the frame at its front needs): its unread bytes move to
/// the front of a buffer of its size (the same one once no message holds it).
const MIN_ROOM: usize = 4 << 10;

/// The small-frame buffer's first size ([`WsReader::fill`] grows it).
const FIRST_SIZE: usize = 2 << 10;

/// Messages from this size up leave their buffer kept for the next large frame. Smaller
/// buffers come from the allocator's free lists (`memory.rs`) without being mapped afresh.
pub const KEEP_MIN: usize = 1 << 20;

/// How long a kept buffer waits for the next large frame.
pub const KEEP_FOR: Duration = Duration::from_secs(2);

/// How much of a large frame's buffer is zeroed ahead of each read into it.
const LARGE_STEP: usize = 256 << 10;

/// The largest frame header: 2 bytes, an 8-byte length and a 4-byte mask.
const MAX_HEADER: usize = 14;

/// A message read from a WebSocket.
#[derive(Debug)]
pub enum Incoming {
    /// A text message (UTF-8, checked).
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping; answer it with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// The peer's close frame; answer it with [`close_reply`], then close the socket.
    Close(Option<CloseFrame>),
}

impl Incoming {
    /// Payload bytes.
    pub fn len(&self) -> usize {
        match self {
            Incoming::Text(t) => t.len(),
            Incoming::Binary(b) | Incoming::Ping(b) | Incoming::Pong(b) => b.len(),
            Incoming::Close(f) => f.as_ref().map_or(0, |f| 2 + f.reason.len()),
        }
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a read returned no message.
#[derive(Debug)]
pub enum ReadError {
    /// Nothing more can be read now; wait for readiness.
    WouldBlock,
    /// A frame or message over the limit: the stream cannot be resynchronised. The relay and
    /// the LAN server close with 4008 (PROTOCOL §4.4).
    TooLarge {
        /// The size announced (a frame) or reached (a fragmented message).
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The peer broke RFC 6455; the connection is unusable.
    Protocol(&'static str),
    /// A text message, or a close frame's reason, that is not UTF-8 (RFC 6455 §8.1); the
    /// connection is unusable.
    NotUtf8(&'static str),
    /// The peer closed the connection without a close frame.
    Eof,
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::WouldBlock => f.write_str("nothing to read yet"),
            ReadError::TooLarge { size, max } => {
                write!(f, "a message of {size} bytes is over the {max}-byte limit")
            }
            ReadError::Protocol(what) | ReadError::NotUtf8(what) => {
                write!(f, "WebSocket protocol error: {what}")
            }
            ReadError::Eof => f.write_str("the connection closed without a close frame"),
            ReadError::Io(e) => write!(f, "socket: {e}"),
        }
    }
}

impl ReadError {
    /// The reason sent with [`ReadError::close_code`].
    pub fn close_reason(&self) -> &'static str {
        match self {
            ReadError::TooLarge { .. } => "message too large",
            ReadError::NotUtf8(_) => "invalid UTF-8",
            _ => "WebSocket protocol error",
        }
    }

    /// The close code that tells the peer why its stream was refused (RFC 6455 §7.4.1): 1007
    /// for text that is not UTF-8, 1002 for any other breach of the rules, `too_large` for a
    /// message over the limit; `None` when the stream ended or broke (nobody to tell).
    pub fn close_code(&self, too_large: u16) -> Option<u16> {
        match self {
            ReadError::NotUtf8(_) => Some(1007),
            ReadError::Protocol(_) => Some(1002),
            ReadError::TooLarge { .. } => Some(too_large),
            ReadError::WouldBlock | ReadError::Eof | ReadError::Io(_) => None,
        }
    }
}

/// What [`discard_input`] left the socket in.
#[derive(Debug, PartialEq, Eq)]
pub enum Discarded {
    /// The peer closed (or the socket failed): the connection can go.
    Closed,
    /// Nothing more to read now.
    Drained,
    /// `budget` bytes were dropped and more may wait: call again on a later turn.
    Budget,
}

/// Reads and drops what a refused peer still sends (the rest of a message over the limit, or
/// whatever follows a breach of RFC 6455), at most `budget` bytes a call. A socket closed with
/// unread bytes sends a reset, and the peer's stack may then throw away the close frame that
/// says why (4008, 1002, 1007) before its application reads it: so the refused socket is read
/// dry until the peer closes or the close grace ends.
pub fn discard_input(r: &mut impl Read, budget: usize) -> Discarded {
    let mut scratch = [0u8; 16 << 10];
    let mut dropped = 0;
    loop {
        if dropped >= budget {
            return Discarded::Budget;
        }
        match r.read(&mut scratch) {
            Ok(0) => return Discarded::Closed,
            Ok(n) => dropped += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Discarded::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Discarded::Closed,
        }
    }
}

/// Why a socket's reading ended.
#[derive(Debug)]
pub enum Ended {
    /// The peer sent a close frame.
    Closed(Option<CloseFrame>),
    /// The stream ended or broke, or the peer broke the rules.
    Failed(ReadError),
}

/// A frame header, checked.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: usize,
}

/// A frame whose payload is read straight into its own buffer.
struct LargeFrame {
    header: Header,
    /// Its capacity holds the whole payload; its length is the part zeroed or read so far.
    payload: Vec<u8>,
    /// Payload bytes read so far.
    filled: usize,
}

/// Reads messages from one WebSocket's byte stream (see the module doc).
pub struct WsReader {
    /// Our side: a server requires masked frames, a client unmasked ones.
    role: Role,
    /// The largest frame and the largest message.
    max: usize,
    /// The largest size of the small-frame buffer: [`READ_SIZE`].
    read_size: usize,
    /// Its size now: it starts at [`FIRST_SIZE`] and grows, up to `read_size`, when a read
    /// fills it (doubled) or a frame needs more (to the frame's size rounded up to a power of
    /// two). It never shrinks: a connection that never got busy holds 2 KiB, one that did
    /// 16 KiB.
    size: usize,
    /// The small-frame buffer (allocated at the first read): unread bytes are `buf[..end]`,
    /// room to read into is `buf[end..]` (zeroed or read before: initialized). Each small
    /// message is split off its front and shares its allocation until dropped.
    buf: BytesMut,
    end: usize,
    /// Bytes split off `buf` since it was last renewed: it can be renewed in place when that
    /// is at least the unread bytes it moves.
    consumed: usize,
    /// Bytes the frame at the front of `buf` needs in all, when that is known and it is small.
    want: usize,
    /// `buf` came from a long handshake tail: its next renewal is a fresh buffer of `size`, so
    /// the tail's allocation goes.
    oversized: bool,
    /// A frame too large for `buf`, part-way read.
    large: Option<LargeFrame>,
    /// A fragmented data message so far: its opcode and payload.
    fragments: Option<(u8, Vec<u8>)>,
    /// The buffer of the last message of [`KEEP_MIN`] or more (shared with the message while
    /// that lives), and when it was read.
    kept: Option<(Bytes, Instant)>,
}

impl WsReader {
    /// A reader for our `role`'s side of a connection, refusing frames and messages over
    /// `max` bytes, that reads `already` (bytes read past the handshake) first.
    pub fn new(role: Role, max: usize, already: &[u8]) -> WsReader {
        let mut r = WsReader {
            role,
            max,
            read_size: READ_SIZE,
            size: FIRST_SIZE,
            buf: BytesMut::new(),
            end: 0,
            consumed: 0,
            want: 0,
            oversized: already.len() > READ_SIZE,
            large: None,
            fragments: None,
            kept: None,
        };
        if !already.is_empty() {
            r.buf = BytesMut::from(already);
            r.end = already.len();
        }
        r
    }

    /// The next message: from what was read before if it holds one, else from `stream`, read
    /// until a message is whole or the stream would block ([`ReadError::WouldBlock`]).
    pub fn read(&mut self, stream: &mut impl Read) -> Result<Incoming, ReadError> {
        loop {
            if let Some(msg) = self.next_buffered()? {
                if msg.len() >= crate::protocol::LARGE_FRAME {
                    crate::memory::note_large_transfer();
                }
                return Ok(msg);
            }
            self.fill(stream)?;
        }
    }

    /// This reader with a small-frame buffer of `size` bytes (at least a header's 14) instead
    /// of [`READ_SIZE`]: for tests that reach the large-frame path with small inputs.
    #[doc(hidden)]
    pub fn with_read_size(mut self, size: usize) -> WsReader {
        self.read_size = size.max(14);
        self.size = self.size.min(self.read_size);
        self
    }

    /// When the kept buffer is due to be released ([`WsReader::release_kept`]).
    pub fn kept_due(&self) -> Option<Instant> {
        self.kept.as_ref().map(|(_, at)| *at + KEEP_FOR)
    }

    /// Releases the kept buffer if it is due at `now`.
    pub fn release_kept(&mut self, now: Instant) {
        if self.kept_due().is_some_and(|due| now >= due) {
            self.kept = None;
        }
    }

    /// An empty buffer with room for a large frame's `len` bytes: the kept one when its
    /// message is gone and it fits without being more than twice the size, else a fresh one.
    /// It is zeroed [`LARGE_STEP`] at a time just before each read ([`WsReader::fill`]), so
    /// the zeroing and the read that overwrites it meet the same bytes in cache.
    fn large_buffer(&mut self, len: usize) -> Vec<u8> {
        if let Some((mut bytes, _)) = self.kept.take()
            && bytes.is_unique()
        {
            // Only its allocation is wanted: one byte moves, not the message (musl's
            // `memmove` copies even onto itself; glibc's returns at once).
            bytes.truncate(1);
            let mut buf = Vec::from(bytes);
            if (len..=len.saturating_mul(2)).contains(&buf.capacity()) {
                buf.clear();
                return buf;
            }
        }
        Vec::with_capacity(len)
    }

    /// The next message among the bytes read so far, if they hold one.
    fn next_buffered(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            if let Some(mut large) = self.large.take() {
                if large.filled < large.header.len {
                    self.large = Some(large);
                    return Ok(None);
                }
                if let Some(mask) = large.header.mask {
                    crate::wsout::apply_mask(&mut large.payload, mask);
                }
                match self.frame_done(large.header, Bytes::from(large.payload))? {
                    Some(msg) => return Ok(Some(msg)),
                    None => continue,
                }
            }
            let unread = &self.buf[..self.end];
            self.want = MAX_HEADER;
            let Some((header, header_len)) = self.parse_header(unread)? else {
                return Ok(None);
            };
            let have = unread.len() - header_len;
            let total = header_len + header.len;
            if have >= header.len {
                let mut frame = self.buf.split_to(total);
                (self.end, self.consumed) = (self.end - total, self.consumed + total);
                frame.advance(header_len);
                if let Some(mask) = header.mask {
                    crate::wsout::apply_mask(&mut frame, mask);
                }
                match self.frame_done(header, frame.freeze())? {
                    Some(msg) => return Ok(Some(msg)),
                    None => continue,
                }
            }
            if total <= self.read_size {
                // The rest of a small frame comes into `buf` ([`WsReader::fill`] makes room).
                self.want = total;
                return Ok(None);
            }
            let mut payload = self.large_buffer(header.len);
            payload.extend_from_slice(&self.buf[header_len..self.end]);
            drop(self.buf.split_to(self.end));
            (self.end, self.consumed) = (0, self.consumed + self.end);
            self.large = Some(LargeFrame { header, payload, filled: have });
        }
    }

    /// Reads once from `stream`: into the large frame's payload if one is part-way, else into
    /// `buf` after what is unread there, first renewing `buf` when its room is short.
    fn fill(&mut self, stream: &mut impl Read) -> Result<(), ReadError> {
        if let Some(large) = &mut self.large {
            if large.payload.len() == large.filled {
                let step = (large.header.len - large.filled).min(LARGE_STEP);
                large.payload.resize(large.filled + step, 0);
            }
            large.filled += read_some(stream, &mut large.payload[large.filled..])?;
            return Ok(());
        }
        let room = self.buf.len() - self.end;
        if room < MIN_ROOM.min(self.size / 2) || self.buf.len() < self.want {
            self.size = self.size.max(self.want.next_power_of_two()).min(self.read_size);
            self.renew_buffer();
        }
        let offered = self.buf.len() - self.end;
        let n = read_some(stream, &mut self.buf[self.end..])?;
        self.end += n;
        if n == offered {
            self.size = (self.size * 2).min(self.read_size);
        }
        Ok(())
    }

    /// Moves the unread bytes to the front of a buffer of `size`, zeroed after them: the
    /// same allocation when no message holds it any more and it has the room without growing,
    /// else a fresh one of exactly `size` (growing in place would keep the dead front part).
    fn renew_buffer(&mut self) {
        self.buf.truncate(self.end);
        let in_place = !self.oversized
            && self.consumed >= self.end
            && self.buf.try_reclaim(self.size - self.end);
        if in_place {
            self.buf.resize(self.size, 0);
        } else {
            let mut fresh = BytesMut::zeroed(self.size);
            fresh[..self.end].copy_from_slice(&self.buf[..self.end]);
            self.buf = fresh;
            self.oversized = false;
        }
        self.consumed = 0;
    }

    /// The header at the front of `bytes` and its length, once it is whole; an error for a
    /// header the rules refuse.
    fn parse_header(&self, bytes: &[u8]) -> Result<Option<(Header, usize)>, ReadError> {
        let [first, second, ..] = *bytes else { return Ok(None) };
        if first & 0x70 != 0 {
            return Err(ReadError::Protocol("a reserved bit is set (no extension was agreed)"));
        }
        let opcode = first & 0x0F;
        if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
            return Err(ReadError::Protocol("an unknown opcode"));
        }
        let masked = second & 0x80 != 0;
        match self.role {
            Role::Server if !masked => {
                return Err(ReadError::Protocol("an unmasked frame from a client"));
            }
            Role::Client if masked => {
                return Err(ReadError::Protocol("a masked frame from a server"));
            }
            _ => {}
        }
        let extended = match second & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + extended + if masked { 4 } else { 0 };
        if bytes.len() < header_len {
            return Ok(None);
        }
        let len = match extended {
            2 => u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
            8 => bytes[2..10].iter().fold(0u64, |n, &b| n << 8 | u64::from(b)),
            _ => u64::from(second & 0x7F),
        };
        let fin = first & 0x80 != 0;
        if opcode >= 8 {
            if !fin {
                return Err(ReadError::Protocol("a fragmented control frame"));
            }
            if len > 125 {
                return Err(ReadError::Protocol("a control frame over 125 bytes"));
            }
        }
        // Known from the header, before the payload is read: a data frame's place in its
        // message, and what it adds to it.
        let so_far = match (&self.fragments, opcode) {
            (Some((_, parts)), 0) => parts.len() as u64,
            (None, 0) => {
                return Err(ReadError::Protocol("a continuation frame outside a message"));
            }
            (Some(_), 1 | 2) => {
                return Err(ReadError::Protocol("a new message inside a fragmented one"));
            }
            _ => 0,
        };
        if len.saturating_add(so_far) > self.max as u64 {
            return Err(ReadError::TooLarge { size: len.saturating_add(so_far), max: self.max });
        }
        let mask = masked.then(|| {
            let m = &bytes[header_len - 4..header_len];
            [m[0], m[1], m[2], m[3]]
        });
        // `len` is at most `max`, a `usize`.
        Ok(Some((Header { fin, opcode, mask, len: len as usize }, header_len)))
    }

    /// A whole frame: a message, or a part of one (then `None`).
    fn frame_done(
        &mut self,
        header: Header,
        payload: Bytes,
    ) -> Result<Option<Incoming>, ReadError> {
        match header.opcode {
            // Copied (at most 125 bytes): a pong waiting to be sent must not pin the buffer.
            9 => Ok(Some(Incoming::Ping(Bytes::copy_from_slice(&payload)))),
            10 => Ok(Some(Incoming::Pong(Bytes::copy_from_slice(&payload)))),
            8 => close_frame(&payload).map(|f| Some(Incoming::Close(f))),
            0 => {
                let Some((opcode, mut parts)) = self.fragments.take() else {
                    return Err(ReadError::Protocol("a continuation frame outside a message"));
                };
                parts.reserve_exact(payload.len());
                parts.extend_from_slice(&payload);
                if header.fin {
                    return self.message(opcode, Bytes::from(parts)).map(Some);
                }
                self.fragments = Some((opcode, parts));
                Ok(None)
            }
            _ if self.fragments.is_some() => {
                Err(ReadError::Protocol("a new message inside a fragmented one"))
            }
            opcode if header.fin => self.message(opcode, payload).map(Some),
            opcode => {
                self.fragments = Some((opcode, Vec::from(payload)));
                Ok(None)
            }
        }
    }
}

impl WsReader {
    /// A whole data message; a large one's buffer is kept.
    fn message(&mut self, opcode: u8, bytes: Bytes) -> Result<Incoming, ReadError> {
        if bytes.len() >= KEEP_MIN {
            self.kept = Some((bytes.clone(), Instant::now()));
        }
        if opcode == 2 {
            return Ok(Incoming::Binary(bytes));
        }
        match Utf8Bytes::try_from(bytes) {
            Ok(text) => Ok(Incoming::Text(text)),
            Err(_) => Err(ReadError::NotUtf8("a text message that is not UTF-8")),
        }
    }
}

/// One read into `buf` (never empty): the bytes read, or why there are none.
fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> Result<usize, ReadError> {
    loop {
        match stream.read(buf) {
            Ok(0) => return Err(ReadError::Eof),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(ReadError::WouldBlock),
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// A close frame's payload: empty, or a code and a UTF-8 reason (RFC 6455 §5.5.1).
fn close_frame(payload: &[u8]) -> Result<Option<CloseFrame>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("a close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let Ok(reason) = std::str::from_utf8(reason) else {
                return Err(ReadError::NotUtf8("a close reason that is not UTF-8"));
            };
            let code = CloseCode::from(u16::from_be_bytes([*hi, *lo]));
            Ok(Some(CloseFrame { code, reason: reason.into() }))
        }
    }
}

/// The close frame that answers the peer's `received` one: its code echoed when it is one a
/// peer may send, else 1002 (a protocol error, RFC 6455 §7.4), without a reason.
pub fn close_reply(received: &Option<CloseFrame>) -> Option<CloseFrame> {
    let code = received.as_ref()?.code;
    let code = if code.is_allowed() { code } else { CloseCode::Protocol };
    Some(CloseFrame { code, reason: "".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's bytes: `first` is FIN and opcode; masked with `[1, 2, 3, 4]` or not.
    pub(crate) fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask = masked.then_some([1u8, 2, 3, 4]);
        let mut body = payload.to_vec();
        if let Some(key) = mask {
            crate::wsout::apply_mask(&mut body, key);
        }
        [crate::wsout::frame_header(first, payload.len(), mask), body].concat()
    }

    /// Hands out `bytes` at most `chunk` at a time, then answers `WouldBlock`.
    struct Trickle<'a> {
        bytes: &'a [u8],
        chunk: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.bytes.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.chunk.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    /// Every message in `bytes`, read `chunk` bytes at a time, and how reading ended.
    fn read_all(role: Role, bytes: &[u8], chunk: usize) -> (Vec<String>, ReadError) {
        let mut reader = WsReader::new(role, 1 << 20, &[]);
        let mut stream = Trickle { bytes, chunk };
        let mut got = Vec::new();
        loop {
            match reader.read(&mut stream) {
                Ok(Incoming::Text(t)) => got.push(format!("text {}", t.len())),
                Ok(Incoming::Binary(b)) => got.push(format!("binary {}", b.len())),
                Ok(Incoming::Ping(b)) => got.push(format!("ping {:?}", &b[..])),
                Ok(Incoming::Pong(b)) => got.push(format!("pong {}", b.len())),
                Ok(Incoming::Close(f)) => got.push(format!(
                    "close {:?}",
                    f.map(|f| (u16::from(f.code), f.reason.to_string()))
                )),
                Err(ReadError::WouldBlock) if !stream.bytes.is_empty() => {}
                Err(e) => return (got, e),
            }
        }
    }

    #[test]
    fn messages_arrive_whole_across_any_split() {
        let big = vec![b'x'; 70_000];
        let bytes = [
            frame(0x81, b"hello", true),
            frame(0x01, &big[..100], true), // a fragmented message begins
            frame(0x89, b"hi", true),       // a ping inside it
            frame(0x00, &big[..65_500], true),
            frame(0x80, &big, true), // the last fragment ends it
            frame(0x82, &[], true),
            frame(0x81, &big, true), // a frame larger than the buffer
            frame(0x8A, &[], true),
            frame(0x88, &[0x03, 0xE8, b'o', b'k'], true),
        ]
        .concat();
        let want = [
            "text 5",
            "ping [104, 105]",
            "text 135600",
            "binary 0",
            "text 70000",
            "pong 0",
            "close Some((1000, \"ok\"))",
        ];
        for chunk in [1, 7, 4096, READ_SIZE, usize::MAX] {
            let (got, end) = read_all(Role::Server, &bytes, chunk);
            assert_eq!(got, want, "{chunk}-byte reads");
            assert!(matches!(end, ReadError::WouldBlock), "{chunk}: {end}");
        }
    }

    #[test]
    fn payloads_are_unmasked_and_text_is_checked() {
        let text = "héllo, wörld: an odd length";
        let mut reader = WsReader::new(Role::Server, 1 << 20, &frame(0x81, text.as_bytes(), true));
        let mut nothing = Trickle { bytes: &[], chunk: 1 };
        match reader.read(&mut nothing) {
            Ok(Incoming::Text(t)) => assert_eq!(t.as_str(), text),
            other => panic!("{other:?}"),
        }
        let bad = frame(0x81, &[0xFF, 0xFE], true);
        let (_, end) = read_all(Role::Server, &bad, 64);
        assert!(matches!(end, ReadError::NotUtf8(m) if m.contains("UTF-8")), "{end}");
        assert_eq!(end.close_code(4008), Some(1007));
    }

    #[test]
    fn the_rules_refuse_what_a_peer_may_not_send() {
        let cases: [(Role, Vec<u8>, &str); 9] = [
            (Role::Server, frame(0x81, b"a", false), "unmasked"),
            (Role::Client, frame(0x81, b"a", true), "masked frame from a server"),
            (Role::Server, frame(0xC1, b"a", true), "reserved bit"),
            (Role::Server, frame(0x83, b"a", true), "unknown opcode"),
            (Role::Server, frame(0x09, b"a", true), "fragmented control"),
            (Role::Server, frame(0x89, &[0; 126], true), "over 125"),
            (Role::Server, frame(0x80, b"a", true), "continuation frame outside"),
            (Role::Server, [frame(0x01, b"a", true), frame(0x81, b"b", true)].concat(), "inside"),
            (Role::Server, frame(0x88, &[3], true), "one-byte"),
        ];
        for (role, bytes, want) in cases {
            let (_, end) = read_all(role, &bytes, 64);
            assert!(matches!(end, ReadError::Protocol(m) if m.contains(want)), "{want}: {end}");
            assert_eq!(end.close_code(4008), Some(1002), "{want}");
        }
        // Over the limit, announced by one frame or reached by fragments: refused from the
        // header, before the payload is read.
        let limit = 1 << 20;
        let over = frame(0x81, &vec![b'a'; limit + 1], true);
        let (_, end) = read_all(Role::Server, &over[..14], 64);
        assert!(matches!(end, ReadError::TooLarge { size, .. } if size == limit as u64 + 1));
        let half = vec![b'a'; limit / 2 + 1];
        let parts = [frame(0x01, &half, true), frame(0x80, &half, true)].concat();
        let (_, end) = read_all(Role::Server, &parts, 4096);
        assert!(matches!(end, ReadError::TooLarge { .. }), "{end}");
        // A 64-bit length with its top bit set is over any limit, not a wrap.
        let huge = [0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        let (_, end) = read_all(Role::Server, &huge, 64);
        assert!(matches!(end, ReadError::TooLarge { .. }), "{end}");
    }

    #[test]
    fn the_end_of_the_stream_is_reported() {
        struct Closed;
        impl Read for Closed {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Ok(0)
            }
        }
        let mut reader = WsReader::new(Role::Client, 1 << 20, &frame(0x81, b"last", false));
        assert!(matches!(reader.read(&mut Closed), Ok(Incoming::Text(_))));
        assert!(matches!(reader.read(&mut Closed), Err(ReadError::Eof)));
    }

    #[test]
    fn small_messages_share_one_buffer_that_is_renewed_in_place_only_when_free() {
        let texts: Vec<String> =
            (0..400).map(|i| format!("message {i:03} {}", "x".repeat(i))).collect();
        let bytes: Vec<u8> = texts.iter().flat_map(|t| frame(0x81, t.as_bytes(), true)).collect();
        let read = |held: bool| {
            let mut reader = WsReader::new(Role::Server, 1 << 20, &[]);
            let mut stream = Trickle { bytes: &bytes, chunk: 1000 };
            let (mut got, mut bases) = (Vec::new(), std::collections::HashSet::new());
            while got.len() < texts.len() {
                match reader.read(&mut stream) {
                    Ok(Incoming::Text(t)) => {
                        // Grown in place or not, the buffer is never larger than its size.
                        assert!(reader.buf.capacity() <= READ_SIZE, "{}", reader.buf.capacity());
                        // The buffer a message lies in, by its 16 KiB-aligned neighbourhood.
                        bases.insert(t.as_ptr() as usize / READ_SIZE);
                        if held {
                            got.push(t);
                        } else {
                            assert_eq!(t.as_str(), texts[got.len()]);
                            got.push("".into());
                        }
                    }
                    Err(ReadError::WouldBlock) => {}
                    other => panic!("{other:?}"),
                }
            }
            (got, bases.len())
        };
        // Held messages keep their bytes while later ones are read into fresh buffers.
        let (got, held_buffers) = read(true);
        assert_eq!(got.iter().map(|t| t.as_str()).collect::<Vec<_>>(), texts);
        // Dropped at once, they leave the buffer free to be renewed in place.
        let (_, buffers) = read(false);
        assert!(bytes.len() > 4 * READ_SIZE && held_buffers > 4, "{held_buffers}");
        assert!(buffers <= 2, "{buffers} buffers for messages dropped at once");
    }

    #[test]
    fn the_small_buffer_starts_small_and_grows_when_reads_fill_it() {
        let mut reader = WsReader::new(Role::Server, 1 << 20, &[]);
        let ping = frame(0x89, b"", true);
        assert!(reader.read(&mut Trickle { bytes: &ping, chunk: 64 }).is_ok());
        // The ping's 6 bytes were split off the front of a 2 KiB buffer.
        assert_eq!(reader.buf.len() + ping.len(), FIRST_SIZE, "an idle connection holds 2 KiB");
        let many: Vec<u8> = (0..200).flat_map(|_| frame(0x81, &[b'a'; 100], true)).collect();
        let mut stream = Trickle { bytes: &many, chunk: usize::MAX };
        for _ in 0..200 {
            assert!(matches!(reader.read(&mut stream), Ok(Incoming::Text(t)) if t.len() == 100));
        }
        assert_eq!(reader.size, READ_SIZE, "reads that fill it double it");
    }

    #[test]
    fn a_growing_buffer_is_never_larger_than_its_size() {
        // Reads that fill the buffer grow it while the messages are dropped at once, so its
        // renewals may be in place: growing one in place would keep its dead front part.
        let frames: Vec<u8> =
            (0..3000).flat_map(|i| frame(0x81, &vec![b'x'; 50 + i % 700], true)).collect();
        let mut reader = WsReader::new(Role::Server, 1 << 20, &[]);
        let mut stream = Trickle { bytes: &frames, chunk: usize::MAX };
        let mut read = 0;
        loop {
            match reader.read(&mut stream) {
                Ok(Incoming::Text(_)) => read += 1,
                Err(ReadError::WouldBlock) => break,
                other => panic!("{other:?}"),
            }
            assert!(reader.buf.capacity() <= READ_SIZE, "{}", reader.buf.capacity());
        }
        assert_eq!(read, 3000);
    }

    #[test]
    fn a_large_buffer_is_reused_once_its_message_is_gone_and_released_when_quiet() {
        let payload = vec![b'k'; KEEP_MIN];
        let bytes = [frame(0x81, &payload, true), frame(0x81, &payload, true)].concat();
        let mut stream = Trickle { bytes: &bytes, chunk: 64 << 10 };
        let mut reader = WsReader::new(Role::Server, 2 << 20, &[]);
        let mut next = |reader: &mut WsReader| loop {
            match reader.read(&mut stream) {
                Ok(Incoming::Text(t)) => return t,
                Err(ReadError::WouldBlock) => {}
                other => panic!("{other:?}"),
            }
        };
        let first = next(&mut reader);
        let at = first.as_ptr();
        assert!(reader.kept_due().is_some());
        drop(first);
        let second = next(&mut reader);
        assert_eq!(second.as_ptr(), at, "the first message's buffer was reused");
        assert_eq!(second.as_str(), std::str::from_utf8(&payload).unwrap());
        // Released once due, not before.
        let due = reader.kept_due().unwrap();
        reader.release_kept(due - Duration::from_millis(1));
        assert!(reader.kept.is_some());
        reader.release_kept(due);
        assert!(reader.kept.is_none() && reader.kept_due().is_none());
        // While a message still holds it, a fresh buffer is used.
        let bytes = frame(0x81, &payload, true);
        let mut reader = WsReader::new(Role::Server, 2 << 20, &bytes);
        let held = match reader.read(&mut Trickle { bytes: &[], chunk: 1 }) {
            Ok(Incoming::Text(t)) => t,
            other => panic!("{other:?}"),
        };
        let mut again = WsReader::new(Role::Server, 2 << 20, &[]);
        again.kept = reader.kept.take();
        let fresh = again.large_buffer(KEEP_MIN);
        assert_ne!(fresh.as_ptr(), held.as_ptr());
    }

    #[test]
    fn a_long_handshake_tail_leaves_no_large_buffer_behind() {
        let tail = [frame(0x81, &[b'a'; 30_000], true), frame(0x81, b"b", true)].concat();
        let mut reader = WsReader::new(Role::Server, 1 << 20, &tail);
        let mut nothing = Trickle { bytes: &[], chunk: 1 };
        assert!(matches!(reader.read(&mut nothing), Ok(Incoming::Text(t)) if t.len() == 30_000));
        assert!(matches!(reader.read(&mut nothing), Ok(Incoming::Text(t)) if t.as_str() == "b"));
        assert!(matches!(reader.read(&mut nothing), Err(ReadError::WouldBlock)));
        assert!(reader.buf.capacity() <= READ_SIZE, "{}", reader.buf.capacity());
    }

    #[test]
    fn a_close_is_answered_with_its_code_when_a_peer_may_send_it() {
        let reply = |code: u16| {
            let f = CloseFrame { code: CloseCode::from(code), reason: "why".into() };
            close_reply(&Some(f)).map(|f| (u16::from(f.code), f.reason.to_string()))
        };
        assert_eq!(reply(1001), Some((1001, String::new())));
        assert_eq!(reply(4000), Some((4000, String::new())));
        assert_eq!(reply(1005), Some((1002, String::new())), "1005 is never sent");
        assert_eq!(close_reply(&None), None);
    }
}
