//! A bounded, seeded mutation fuzzer over everything that parses untrusted input: frames, HTTP
//! heads, registry request bodies, state files, QR payloads, and the passthrough checks.
//!
//! Why hand-written instead of cargo-fuzz: libFuzzer needs a nightly toolchain, which this
//! project's CI does not have. Mutating valid seeds (bit flips, byte and token splices,
//! truncation, repetition) with a fixed seed is reproducible and runs in every `cargo test`.
//! Each target runs for a time budget (`HERMESCHAT_FUZZ_SECS`, default 2 s) and prints how many
//! inputs it executed. A panic is a crash; the invariants below are checked on every input.

use std::time::{Duration, Instant};

use hermeschat_pair::http::{Parsed, parse_head};
use hermeschat_pair::protocol::{self as p, Frame};
use hermeschat_pair::state::{BridgeIdentity, Config};

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens that tend to reach interesting parser states.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b"\r\n",
    b"\r\n\r\n",
    b"\0",
    b"..",
    b"%2e%2e",
    b"//",
    b"\xff\xfe",
    b"\xf0\x9f\x98\x80",
    b"\"type\":\"request\"",
    b"\"bodyBase64\":true",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let i = rng.below(len + 1);
                data.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => data.truncate(rng.below(len)),
            4 if len > 0 => {
                let (a, b) = (rng.below(len), rng.below(len));
                let (a, b) = (a.min(b), a.max(b));
                let piece = data[a..b].to_vec();
                for _ in 0..1 + rng.below(8) {
                    data.extend_from_slice(&piece);
                }
            }
            5 if len > 1 => {
                let i = rng.below(len);
                data.remove(i);
            }
            _ => {
                let i = rng.below(len + 1);
                data.insert(i, rng.next() as u8);
            }
        }
    }
    data
}

/// Runs `check` on mutations of `seeds` for the time budget; returns executions.
fn fuzz(name: &str, seeds: &[&[u8]], mut check: impl FnMut(&[u8])) -> u64 {
    let budget = std::env::var("HERMESCHAT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    let deadline = Instant::now() + Duration::from_secs_f64(budget);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let mut runs = 0u64;
    for seed in seeds {
        check(seed);
        runs += 1;
    }
    while Instant::now() < deadline {
        for _ in 0..64 {
            let seed = seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, seed);
            check(&input);
            runs += 1;
        }
    }
    eprintln!("fuzz {name}: {runs} inputs, 0 crashes");
    runs
}

const FRAME_SEEDS: &[&[u8]] = &[
    br#"{"type":"request","id":"r1","method":"POST","path":"/api/chat","headers":{"content-type":"application/json"},"body":"{\"a\":1}"}"#,
    br#"{"type":"request","id":"r2","method":"POST","path":"/api/upload","headers":{},"body":"aGVsbG8=","bodyBase64":true,"client":"hcl_0123456789abcdef"}"#,
    br#"{"type":"request.start","id":"u1","method":"PUT","path":"/api/upload","headers":{"content-type":"image/png"},"length":1048576}"#,
    br#"{"type":"request.chunk","id":"u1","client":"hcl_0123456789abcdef","body":"aGVsbG8=","bodyBase64":true}"#,
    br#"{"type":"request.ack","id":"u1","bytes":262144}"#,
    br#"{"type":"cancel","id":"r1"}"#,
    br#"{"type":"response","id":"r1","client":"hcl_0123456789abcdef","status":200,"headers":{"a":"b"},"body":"x"}"#,
    br#"{"type":"response.start","id":"r1","status":200,"headers":{"content-type":"text/event-stream"}}"#,
    br#"{"type":"response.chunk","id":"r1","body":"data: x\n\n"}"#,
    br#"{"type":"response.end","id":"r1"}"#,
    br#"{"type":"response.error","id":"r1","code":"CANCELLED","message":"m"}"#,
    br#"{"type":"bridge.status","online":true}"#,
    br#"{"type":"client.connected","client":"hcl_0123456789abcdef","deviceName":"iPhone"}"#,
    br#"{"type":"client.disconnected","client":"hcl_0123456789abcdef"}"#,
    br#"{"type":"paired","clientId":"hcl_0123456789abcdef","clientSecret":"hcs_x"}"#,
];

#[test]
fn fuzz_frames() {
    let limits = p::Limits::default();
    let runs = fuzz("frames", FRAME_SEEDS, |input| {
        let Ok(text) = std::str::from_utf8(input) else { return };
        // The bridge's reader (members first) and the typed parse agree, except that the
        // first, like the relay, refuses what is not an object, a field given twice and more
        // than MAX_FIELDS fields (`parse_message`'s doc).
        let message = tungstenite::Utf8Bytes::from(text.to_owned());
        let members_refuse = |e: &str| {
            ["top-level fields", "duplicate field", "a JSON object"].iter().any(|w| e.contains(w))
        };
        match (p::parse_message(&message), p::parse_frame(text)) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
            (Err(_), Err(_)) => {}
            (Err(e), Ok(_)) if members_refuse(&e) => {}
            (a, b) => panic!("the two readers disagree on {text:?}: {a:?} against {b:?}"),
        }
        match p::parse_frame(text) {
            Ok(frame) => {
                // Whatever parses re-serialises to something that parses to the same frame.
                let again = p::parse_frame(&frame.to_json()).expect("round trip");
                assert_eq!(again, frame);
                if let Frame::Request(req) | Frame::RequestStart(req) = &frame {
                    let _ = p::check_request_limits(req, &limits);
                    let _ = p::check_path(&req.path, p::DEFAULT_ALLOWED_PREFIXES);
                    for (k, v) in &req.headers {
                        let _ = p::check_header(k, v);
                    }
                }
                let _ = (frame.kind(), frame.request_id(), frame.is_terminal());
            }
            Err(msg) => {
                assert!(msg.starts_with("malformed") || msg.starts_with("unknown frame type"))
            }
        }
    });
    assert!(runs > 100);
}

/// In frames of 64 KiB or more `parse_message` keeps a request's body inside the message:
/// whatever it accepts, the plain parse reads the same way.
#[test]
fn fuzz_large_frames() {
    let pad = "QUFB".repeat(16 << 10);
    let mut parsed = 0u64;
    let runs = fuzz("large frames", FRAME_SEEDS, |input| {
        let Ok(text) = std::str::from_utf8(input) else { return };
        let large = if text.contains(r#""body":""#) {
            text.replacen(r#""body":""#, &format!(r#""body":"{pad}"#), 1)
        } else if let Some(stripped) = text.strip_suffix('}') {
            format!(r#"{stripped},"pad":"{pad}"}}"#)
        } else {
            format!("{text}{pad}")
        };
        let message = tungstenite::Utf8Bytes::from(large.clone());
        match p::parse_message(&message) {
            Ok(frame) => {
                assert_eq!(p::parse_frame(&large).as_ref(), Ok(&frame), "{text}");
                parsed += 1;
            }
            Err(msg) => {
                assert!(msg.starts_with("malformed") || msg.starts_with("unknown frame type"))
            }
        }
    });
    eprintln!("fuzz large frames: {parsed} parsed");
    assert!(runs > 100 && parsed >= FRAME_SEEDS.len() as u64);
}

/// A WebSocket frame's bytes: `first` is FIN and opcode; masked (with a key that changes the
/// bytes) or not.
fn ws_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    use hermeschat_pair::wsout::{apply_mask, frame_header};
    let mask = masked.then_some([0x5a, 0x01, 0xc3, 0x7e]);
    let mut body = payload.to_vec();
    if let Some(key) = mask {
        apply_mask(&mut body, key);
    }
    [frame_header(first, payload.len(), mask), body].concat()
}

/// Hands out its bytes `chunk` at a time, then answers `WouldBlock`; swallows writes (the
/// pongs and close replies tungstenite sends).
struct Feed<'a> {
    bytes: &'a [u8],
    chunk: usize,
}

impl std::io::Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.bytes.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = self.chunk.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

impl std::io::Write for Feed<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How reading a byte stream ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum WsEnd {
    /// Everything was read; more bytes could still complete a message.
    Pending,
    /// The bytes broke a rule or a limit.
    Refused,
    /// A text message was refused for its UTF-8 (tungstenite checks each fragment as it
    /// comes).
    BadUtf8,
    /// A close frame was read.
    Closed,
}

/// Our reader ([`hermeschat_pair::wsread::WsReader`]) against tungstenite's, on the same
/// bytes, for both roles, read in pieces of several sizes, part handed over at the start, and
/// with small-frame buffers small enough to send most frames down the large-frame path: the
/// same messages in the same order, ending the same way. Where they may differ, by design:
/// ours refuses a frame from its header (reserved bits, opcode, masking, a control frame's
/// size, a continuation out of place), tungstenite once the whole frame has arrived, so on
/// bytes that end inside such a frame ours has refused while tungstenite waits; then
/// tungstenite must refuse it once the frame is completed. And tungstenite refuses a
/// fragmented text message's bad UTF-8 at the fragment, ours when the message is whole
/// (reading the control frames in between).
#[test]
fn fuzz_ws_reader_against_tungstenite() {
    use hermeschat_pair::wsread::{Incoming, ReadError, WsReader};
    use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    use tungstenite::{Error, Message};
    const LIMIT: usize = 300;

    /// `already` bytes are handed to the reader at its start, the rest read; `read_size` is
    /// its small-frame buffer's.
    fn ours(
        role: Role,
        bytes: &[u8],
        chunk: usize,
        already: usize,
        read_size: usize,
    ) -> (Vec<String>, WsEnd) {
        let (already, bytes) = bytes.split_at(already.min(bytes.len()));
        let mut reader = WsReader::new(role, LIMIT, already).with_read_size(read_size);
        let mut feed = Feed { bytes, chunk };
        let mut got = Vec::new();
        loop {
            let msg = match reader.read(&mut feed) {
                Ok(Incoming::Text(t)) => format!("text {:?}", t.as_str()),
                Ok(Incoming::Binary(b)) => format!("binary {:?}", &b[..]),
                Ok(Incoming::Ping(b)) => format!("ping {:?}", &b[..]),
                Ok(Incoming::Pong(b)) => format!("pong {:?}", &b[..]),
                Ok(Incoming::Close(f)) => {
                    // tungstenite reports a code no peer may send as its own 1002 reply.
                    let f = f.map(|f| match f.code.is_allowed() {
                        true => (u16::from(f.code), f.reason.to_string()),
                        false => (1002, "Protocol violation".into()),
                    });
                    got.push(format!("close {f:?}"));
                    return (got, WsEnd::Closed);
                }
                Err(ReadError::WouldBlock) if feed.bytes.is_empty() => {
                    return (got, WsEnd::Pending);
                }
                Err(ReadError::WouldBlock) => continue,
                Err(ReadError::Protocol(m)) if m.contains("UTF-8") => {
                    return (got, WsEnd::BadUtf8);
                }
                Err(_) => return (got, WsEnd::Refused),
            };
            got.push(msg);
        }
    }

    fn theirs(role: Role, bytes: &[u8], chunk: usize) -> (Vec<String>, WsEnd) {
        let config = WebSocketConfig::default()
            .read_buffer_size(64)
            .max_message_size(Some(LIMIT))
            .max_frame_size(Some(LIMIT));
        let mut ws = WebSocket::from_raw_socket(Feed { bytes, chunk }, role, Some(config));
        let mut got = Vec::new();
        loop {
            let msg = match ws.read() {
                Ok(Message::Text(t)) => format!("text {:?}", t.as_str()),
                Ok(Message::Binary(b)) => format!("binary {:?}", &b[..]),
                Ok(Message::Ping(b)) => format!("ping {:?}", &b[..]),
                Ok(Message::Pong(b)) => format!("pong {:?}", &b[..]),
                Ok(Message::Close(f)) => {
                    let f = f.map(|f| (u16::from(f.code), f.reason.to_string()));
                    got.push(format!("close {f:?}"));
                    return (got, WsEnd::Closed);
                }
                Ok(Message::Frame(_)) => unreachable!("read never returns a raw frame"),
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if ws.get_ref().bytes.is_empty() {
                        return (got, WsEnd::Pending);
                    }
                    continue;
                }
                Err(Error::Utf8(_)) => return (got, WsEnd::BadUtf8),
                Err(_) => return (got, WsEnd::Refused),
            };
            got.push(msg);
        }
    }

    /// The bytes that complete the frame `bytes` end inside, if they end inside one: the
    /// rest of its header (a zero length, a zero key), then payload bytes that unmask to
    /// ASCII. Empty when they end where a frame ends.
    fn completion(role: Role, bytes: &[u8]) -> Vec<u8> {
        let mut pos = 0;
        loop {
            let rest = &bytes[pos..];
            match rest.len() {
                0 => return Vec::new(),
                1 if role == Role::Server => return vec![0x80, 0, 0, 0, 0],
                1 => return vec![0],
                _ => {}
            }
            let masked = rest[1] & 0x80 != 0;
            let extended = match rest[1] & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let header_len = 2 + extended + if masked { 4 } else { 0 };
            let mut header = rest[..header_len.min(rest.len())].to_vec();
            let mut pad = Vec::new();
            while header.len() < header_len {
                header.push(0);
                pad.push(0);
            }
            let len = match extended {
                0 => u64::from(header[1] & 0x7F),
                _ => header[2..2 + extended].iter().fold(0, |n, &b| n << 8 | u64::from(b)),
            };
            if len > LIMIT as u64 {
                return pad;
            }
            let len = len as usize;
            let have = rest.len().saturating_sub(header_len);
            if have >= len && pad.is_empty() {
                pos += header_len + len;
                continue;
            }
            let key = if masked { &header[header_len - 4..] } else { &[0u8; 4][..] };
            pad.extend((have..len).map(|i| b'a' ^ key[i % 4]));
            return pad;
        }
    }

    let frames = |masked: bool| -> Vec<Vec<u8>> {
        let f = |first, payload: &[u8]| ws_frame(first, payload, masked);
        vec![
            f(0x81, br#"{"type":"request","id":"r1"}"#),
            [f(0x01, b"{\"a\":"), f(0x89, b"hi"), f(0x00, b"\"\xc3"), f(0x80, b"\xa9\"}")].concat(),
            [f(0x82, &[0, 1, 2, 255]), f(0x8A, b""), f(0x81, &[b'x'; 200])].concat(),
            [f(0x01, &[b'y'; 150]), f(0x80, &[b'z'; 140])].concat(),
            [f(0x81, b"a"), f(0x88, &[0x03, 0xe8, b'b', b'y', b'e'])].concat(),
            [f(0x88, &[0x03, 0xed]), f(0x81, b"after close")].concat(),
            f(0x81, &[b'w'; 126]),
        ]
    };
    let (masked, unmasked) = (frames(true), frames(false));
    let seeds: Vec<&[u8]> = masked.iter().chain(&unmasked).map(Vec::as_slice).collect();
    let (mut messages, mut refused) = (0usize, 0usize);
    let runs = fuzz("WebSocket reader", &seeds, |input| {
        for role in [Role::Server, Role::Client] {
            // (bytes per read, bytes handed over at the start, small-frame buffer): the last
            // two send most frames down the large-frame path.
            let n = input.len();
            for (chunk, already, read_size) in [(1, 0, 16 << 10), (5, n / 3, 14), (n.max(1), 0, 40)]
            {
                let a = ours(role, input, chunk, already, read_size);
                let b = theirs(role, input, chunk);
                let why = format!(
                    "{role:?}, {chunk}-byte reads after {already}, {read_size}-byte buffer, \
                     of {input:?}:\nours {a:?}\ntheirs {b:?}"
                );
                // After tungstenite refused a fragment's UTF-8, ours may read on through
                // control frames until the message ends (refused) or the bytes do.
                let early_utf8 = b.1 == WsEnd::BadUtf8
                    && a.0.starts_with(&b.0)
                    && a.0[b.0.len()..].iter().all(|m| !m.starts_with("text"));
                if !early_utf8 {
                    assert_eq!(a.0, b.0, "{why}");
                }
                if (a.1, b.1) == (WsEnd::Refused, WsEnd::Pending) {
                    // Ours refused from a header: tungstenite refuses the same frame once the
                    // rest of it arrives.
                    let whole = [input, &completion(role, input)].concat();
                    let c = theirs(role, &whole, whole.len().max(1));
                    assert_eq!(c, (a.0.clone(), WsEnd::Refused), "completed: {whole:?}\n{why}");
                } else if !early_utf8 {
                    assert_eq!(a.1, b.1, "{why}");
                }
                messages += a.0.len();
                refused += usize::from(a.1 == WsEnd::Refused);
            }
        }
    });
    eprintln!("fuzz WebSocket reader: {messages} messages read, {refused} streams refused");
    assert!(runs > 100 && messages > 0 && refused > 0);
}

/// The relay's scan of a frame's top level (`jsonscan`, `parse_raw`) against `serde_json`
/// reading the same text as a map of raw values and, to check every value as a decoder does
/// (paired surrogates, numbers in range), as a `Value`: both accept or both refuse, and what
/// is accepted splits into the same names and the same raw value texts. Mutated seeds run as
/// they are and with their strings grown past the scan's 64-byte blocks.
#[test]
fn fuzz_raw_frames_against_serde_json() {
    use serde_json::value::RawValue;
    /// `serde_json`'s reading: each name decoded, each value's raw text; `None` if refused
    /// (a name given twice or more than `MAX_FIELDS` fields included).
    fn reference(text: &str) -> Option<Vec<(String, &str)>> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Vec<(String, &'de str)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, &'de str)> = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, &'de RawValue>()? {
                    if out.iter().any(|(n, _)| *n == name) || out.len() == p::MAX_FIELDS {
                        return Err(serde::de::Error::custom("refused"));
                    }
                    out.push((name, value.get()));
                }
                Ok(out)
            }
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = serde::Deserializer::deserialize_map(&mut de, Fields).ok()?;
        de.end().ok()?;
        serde_json::from_str::<serde_json::Value>(text).ok()?;
        Some(fields)
    }
    let mut accepted = 0u64;
    let mut check = |text: &str| {
        let ours = p::parse_raw(text)
            .ok()
            .map(|raw| raw.fields().map(|(n, v)| (n.to_owned(), v)).collect::<Vec<_>>());
        match (reference(text), ours) {
            (Some(want), Some(got)) => {
                assert_eq!(got, want, "{text}");
                accepted += 1;
            }
            (None, None) => {}
            (want, got) => panic!("{text}: serde_json {want:?}, parse_raw {got:?}"),
        }
    };
    let long = "QUFB".repeat(40);
    // Frames nested at and just past the nesting limit (126 inside the frame's object).
    let deep = |n: usize| {
        format!(r#"{{"type":"cancel","id":"r1","x":{}1{}}}"#, "[".repeat(n), "]".repeat(n))
    };
    let (deep126, deep127) = (deep(126), deep(127));
    let mut seeds = FRAME_SEEDS.to_vec();
    seeds.extend([deep126.as_bytes(), deep127.as_bytes()]);
    let runs = fuzz("raw frames", &seeds, |input| {
        let Ok(text) = std::str::from_utf8(input) else { return };
        check(text);
        check(&text.replace(r#"":""#, &format!(r#"":"{long}"#)));
    });
    eprintln!("fuzz raw frames: {accepted} accepted");
    assert!(runs > 100 && accepted >= FRAME_SEEDS.len() as u64);
}

#[test]
fn fuzz_http_heads() {
    let seeds: &[&[u8]] = &[
        b"GET /ws/app?bridgeId=0123456789abcdef01234567 HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer hcs_x\r\n\r\n",
        b"POST /v1/pair/verify HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /v1/health HTTP/1.0\r\n\r\n",
    ];
    let runs = fuzz("http heads", seeds, |input| match parse_head(input) {
        Parsed::Complete(head) => {
            assert!(head.len <= input.len());
            assert!(head.len <= hermeschat_pair::http::MAX_HEAD);
            let _ = (head.path(), head.query("bridgeId"), head.bearer(), head.wants_close());
            let _ = (head.content_length(), head.is_websocket_upgrade());
        }
        Parsed::Partial => assert!(input.len() <= hermeschat_pair::http::MAX_HEAD),
        Parsed::Invalid(status, _) => assert!(status == 400 || status == 431),
    });
    assert!(runs > 100);
}

#[test]
fn fuzz_registry_bodies() {
    let seeds: &[&[u8]] = &[
        br#"{"displayName":"mac","version":"0.1.0"}"#,
        br#"{"bridgeId":"0123456789abcdef01234567","accessCode":"0123456789abcdef0123456789abcdef","deviceName":"iPhone"}"#,
        br#"{"bridgeId":"0123456789abcdef01234567","clientId":"hcl_0123456789abcdef"}"#,
    ];
    let runs = fuzz("registry bodies", seeds, |input| {
        let _ = serde_json::from_slice::<p::RegisterRequest>(input);
        let _ = serde_json::from_slice::<p::VerifyRequest>(input);
        let _ = serde_json::from_slice::<p::BridgeRequest>(input);
        let _ = serde_json::from_slice::<p::RevokeRequest>(input);
        if let Ok(text) = std::str::from_utf8(input) {
            for id in [p::is_bridge_id, p::is_access_code, p::is_client_id, p::is_request_id] {
                let _ = id(text);
            }
        }
    });
    assert!(runs > 100);
}

#[test]
fn fuzz_state_files_and_qr_payloads() {
    let seeds: &[&[u8]] = &[
        br#"{"v":2,"bridgeId":"0123456789abcdef01234567","relaySecret":"hrs_0000000000000000000000000000000000000000000000000000000000000000","bridgeRelayUrl":"wss://r/ws/bridge","appRelayUrl":"wss://r/ws/app","instanceId":"hin_1","registryUrl":"https://r","displayName":"mac","createdAt":1}"#,
        br#"{"registryUrl":"https://r","port":8765}"#,
        br#"{"v":2,"k":"hp","g":"0123456789abcdef01234567","a":"0123456789abcdef0123456789abcdef","s":"https://r","u":"wss://r/ws/app","n":"mac"}"#,
        br#"{"mode":"hermes-local","url":"ws://192.168.1.2:8766/ws/app","token":"t","expiresAt":1}"#,
    ];
    let runs = fuzz("state files and QR payloads", seeds, |input| {
        if let Ok(id) = serde_json::from_slice::<BridgeIdentity>(input) {
            // Validation never panics, and Debug never prints the secret.
            let _ = id.validate();
            if id.relay_secret.len() >= 8 {
                assert!(!format!("{id:?}").contains(&id.relay_secret));
            }
        }
        let _ = serde_json::from_slice::<Config>(input);
        let _ = serde_json::from_slice::<p::RelayQr>(input);
        let _ = serde_json::from_slice::<p::LocalQr>(input);
    });
    assert!(runs > 100);
}

#[test]
fn fuzz_passthrough_checks() {
    let seeds: &[&[u8]] = &[
        b"/api/chat",
        b"/v1/chat/completions?stream=true",
        b"/api/uploads/a%20b.png",
        b"/health",
        b"/api/sessions/abc/messages",
    ];
    let runs = fuzz("passthrough checks", seeds, |input| {
        let Ok(path) = std::str::from_utf8(input) else { return };
        if p::check_path(path, p::DEFAULT_ALLOWED_PREFIXES).is_ok() {
            // Whatever passes can neither escape the prefixes nor smuggle a request line.
            assert!(path.starts_with('/') && !path.starts_with("//"));
            assert!(!path.bytes().any(|b| b <= b' ' || b >= 0x7f));
            let route = path.split(['?', '#']).next().unwrap_or("");
            // No segment is a dot segment, raw or percent-encoded (a backend decodes once).
            let decoded = percent_decode(route);
            assert!(!decoded.split('/').any(|s| s == ".." || s == "."), "{path:?}");
            assert!(
                route.starts_with("/api/")
                    || route.starts_with("/v1/")
                    || route == "/health"
                    || route.starts_with("/health/")
                    || route == "/api"
                    || route == "/v1"
            );
        }
        if p::check_header("X-Test", path).is_ok() {
            assert!(!path.contains(['\r', '\n', '\0']));
        }
        if p::check_header(path, "v").is_ok() {
            assert!(!path.is_empty() && !path.contains([' ', ':', '\r', '\n']));
        }
    });
    assert!(runs > 100);
}

/// Decodes `%xx` escapes once, as a backend would.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
