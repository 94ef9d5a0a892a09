//! Giving back tungstenite's read buffer after a large message, on the readiness-driven
//! threads that keep WebSockets open for months (the relay's reactor, the bridge's relay
//! socket, the LAN server).
//!
//! tungstenite keeps its read buffer at the size of the largest message a connection sent,
//! for as long as the connection lives (tungstenite-rs #480): 12 MiB for every peer that once
//! sent a 12 MiB request, until it disconnects. [`Reclaim`] counts what the messages
//! tungstenite returned took on the wire; a while after a large one, when that count equals
//! what the stream handed tungstenite and nothing is left to write, the connection gets a
//! fresh tungstenite context, and with it a small read buffer.

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

/// The bytes a message of `len` bytes took on the wire as one frame (RFC 6455 §5.2): frames
/// from a client carry a 4-byte mask key, frames from a server none.
fn frame_len(len: usize, masked: bool) -> u64 {
    let extended = match len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    (2 + extended + if masked { 4 } else { 0 } + len) as u64
}

/// The read-side bookkeeping of one WebSocket (see the module doc).
#[derive(Debug)]
pub struct Reclaim {
    /// Our side of the connection: a server reads masked frames, a client unmasked ones.
    role: Role,
    /// What the messages tungstenite returned took on the wire, counted as one frame per
    /// message, plus what the stream gave before tungstenite's first byte (the HTTP
    /// handshake; wrapping). A real frame never takes fewer bytes than counted, so this equals
    /// [`Stream::bytes_read`] only when tungstenite holds no unread byte; a fragmented message
    /// or an over-long length encoding leaves it short for good, which only stops the
    /// renewal. `None` once a close frame arrived, or when the start was unknown.
    consumed: Option<u64>,
    /// When the last message of [`RECLAIM_MIN`] bytes or more was read, unless the context
    /// was renewed since.
    large_read: Option<Instant>,
}

impl Reclaim {
    /// Bookkeeping for a WebSocket on our `role`'s side whose stream had handed out `before`
    /// bytes ahead of the first byte tungstenite reads as a frame (`None`: unknown; such a
    /// connection is never renewed).
    pub fn new(role: Role, before: Option<u64>) -> Reclaim {
        Reclaim { role, consumed: before, large_read: None }
    }

    /// Counts a message tungstenite returned at `now`.
    pub fn on_message(&mut self, msg: &Message, now: Instant) {
        if msg.len() >= RECLAIM_MIN {
            self.large_read = Some(now);
        }
        let masked = self.role == Role::Server;
        self.consumed = match msg {
            Message::Close(_) | Message::Frame(_) => None,
            _ => self.consumed.map(|c| c.wrapping_add(frame_len(msg.len(), masked))),
        };
    }

    /// When the read buffer should be renewed: [`RECLAIM_AFTER`] after the last large message,
    /// if one came since the last renewal.
    pub fn due(&self) -> Option<Instant> {
        self.large_read.map(|t| t + RECLAIM_AFTER)
    }

    /// At `now`, if a renewal is due: gives `ws` a fresh tungstenite context over the same
    /// stream, with the same configuration, when `quiet` (the caller has nothing queued for
    /// it and is not closing it) and nothing else is lost: tungstenite holds no unread byte
    /// (the count equals what the stream gave it) and no unwritten one (its flush completes),
    /// and the connection is open both ways. Otherwise tries again [`RECLAIM_AFTER`] later.
    pub fn renew_if_due(
        &mut self,
        mut ws: WebSocket<Stream>,
        quiet: bool,
        now: Instant,
    ) -> WebSocket<Stream> {
        if self.due().is_none_or(|due| now < due) {
            return ws;
        }
        let lossless = quiet
            && self.consumed == Some(ws.get_ref().bytes_read())
            && ws.can_read()
            && ws.can_write()
            && ws.flush().is_ok();
        if !lossless {
            self.large_read = Some(now);
            return ws;
        }
        let config = *ws.get_config();
        let stream = ws.into_inner();
        self.consumed = Some(stream.bytes_read());
        self.large_read = None;
        WebSocket::from_raw_socket(stream, self.role, Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths_follow_rfc_6455() {
        assert_eq!(frame_len(0, true), 6);
        assert_eq!(frame_len(125, false), 127);
        assert_eq!(frame_len(126, true), 2 + 2 + 4 + 126);
        assert_eq!(frame_len(0xFFFF, false), 2 + 2 + 0xFFFF);
        assert_eq!(frame_len(0x1_0000, true), 2 + 8 + 4 + 0x1_0000);
    }

    #[test]
    fn a_close_or_an_unknown_start_stops_renewal_for_good() {
        let now = Instant::now();
        let mut r = Reclaim::new(Role::Server, Some(10));
        r.on_message(&Message::text("x".repeat(RECLAIM_MIN)), now);
        assert_eq!(r.consumed, Some(10 + frame_len(RECLAIM_MIN, true)));
        assert_eq!(r.due(), Some(now + RECLAIM_AFTER));
        r.on_message(&Message::Close(None), now);
        r.on_message(&Message::text("after"), now);
        assert_eq!(r.consumed, None);

        let mut unknown = Reclaim::new(Role::Client, None);
        unknown.on_message(&Message::text("x"), now);
        assert_eq!(unknown.consumed, None);
        assert_eq!(unknown.due(), None, "only a large message makes a renewal due");
    }
}
