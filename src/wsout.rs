//! The outbound side of a WebSocket on a non-blocking socket, shared by the crate's
//! readiness-driven servers (the relay reactor and the LAN server): a queue of messages with a
//! byte count (for back-pressure) and a flush that writes until the socket would block.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use tungstenite::{Message, WebSocket};

/// True for the errors a non-blocking socket returns when it has nothing more to give or take.
pub fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// [`would_block`] for tungstenite's error type.
pub fn ws_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if would_block(io))
}

/// Messages waiting for a WebSocket, and whether tungstenite holds bytes the socket refused.
#[derive(Default)]
pub struct WsOut {
    queue: VecDeque<Message>,
    bytes: usize,
    blocked: bool,
}

/// The socket broke while writing (the error, for logs); drop the connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken(pub String);

impl WsOut {
    /// Queues a message (sent by the next [`WsOut::flush`]).
    pub fn push(&mut self, msg: Message) {
        self.bytes += msg.len();
        self.queue.push_back(msg);
    }

    /// Bytes queued and not yet handed to tungstenite.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when nothing is queued and nothing is held back.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.blocked
    }

    /// True while tungstenite holds bytes the socket did not take: wait for writability.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Writes queued messages until the socket would block, then flushes. Only one message at
    /// a time sits in tungstenite's buffer, so the queue stays the one place bytes wait.
    pub fn flush<S: Read + Write>(&mut self, ws: &mut WebSocket<S>) -> Result<(), Broken> {
        loop {
            if self.blocked {
                match ws.flush() {
                    Ok(()) => self.blocked = false,
                    Err(e) if ws_would_block(&e) => return Ok(()),
                    Err(e) => return Err(Broken(e.to_string())),
                }
            }
            let Some(msg) = self.queue.pop_front() else {
                return match ws.flush() {
                    Ok(()) => Ok(()),
                    Err(e) if ws_would_block(&e) => {
                        self.blocked = true;
                        Ok(())
                    }
                    Err(e) => Err(Broken(e.to_string())),
                };
            };
            self.bytes = self.bytes.saturating_sub(msg.len());
            match ws.write(msg) {
                Ok(()) => {}
                // The message is buffered inside tungstenite.
                Err(e) if ws_would_block(&e) => {
                    self.blocked = true;
                    return Ok(());
                }
                Err(tungstenite::Error::WriteBufferFull(msg)) => {
                    self.bytes += msg.len();
                    self.queue.push_front(*msg);
                    self.blocked = true;
                    return Ok(());
                }
                Err(e) => return Err(Broken(e.to_string())),
            }
        }
    }
}
