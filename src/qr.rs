//! QR codes for the pairing payloads of PROTOCOL §2: UTF-8 JSON in byte mode, error
//! correction M, drawn either in the terminal or into a PNG.
//!
//! The encoding is pinned to byte mode on purpose. `qrcode`'s automatic segmentation would
//! switch to numeric or alphanumeric runs inside the JSON, which is legal but makes the symbol
//! depend on the payload's digits and gains almost nothing for a payload this short; one byte
//! segment is what the app's scanner is tested against.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use qrcode::bits::Bits;
use qrcode::{Color, EcLevel, QrCode, Version};

/// Light modules around the symbol on every side. ISO/IEC 18004 asks for four; fewer works on
/// a plain terminal background but not against a busy one, so we keep the full four.
pub const QUIET_ZONE: usize = 4;

/// Pixels per module side in the PNG: large enough to scan off a screen across a desk.
pub const PNG_SCALE: usize = 10;

/// The longest payload a QR code holds in byte mode at error correction M (version 40).
pub const MAX_PAYLOAD_BYTES: usize = 2331;

/// Turns on black-on-white for a terminal line. Entries 16 (#000000) and 231 (#ffffff) of the
/// 256-colour cube are used rather than the 16 base colours because themes remap the base
/// colours (a "white" that is mid-grey, a "black" that is dark grey) but leave the cube alone.
const INK_ON_PAPER: &str = "\x1b[38;5;16;48;5;231m";

/// Resets colours before each newline so the background never bleeds past the code.
const RESET: &str = "\x1b[0m";

/// Why a QR code could not be produced.
#[derive(Debug)]
pub enum QrError {
    /// The payload does not fit in any QR version at error correction M.
    TooLong {
        /// The payload's length in bytes.
        len: usize,
    },
    /// The PNG encoder refused the image (a bug, not a user error).
    Png(String),
    /// Writing the PNG file failed.
    Io {
        /// The file we tried to write.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
}

impl fmt::Display for QrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QrError::TooLong { len } => write!(
                f,
                "the pairing payload is {len} bytes, more than a QR code holds \
                 ({MAX_PAYLOAD_BYTES} bytes at error correction M); use a shorter display name"
            ),
            QrError::Png(e) => write!(f, "could not encode the QR code as PNG: {e}"),
            // `source` names the path already (`state::write_atomic`).
            QrError::Io { source, .. } => write!(f, "could not write {source}"),
        }
    }
}

impl std::error::Error for QrError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QrError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Encodes `payload` as a single byte-mode segment at error correction M, in the smallest
/// version that holds it.
fn encode(payload: &str) -> Result<QrCode, QrError> {
    let data = payload.as_bytes();
    let too_long = QrError::TooLong { len: data.len() };
    if data.len() > MAX_PAYLOAD_BYTES {
        return Err(too_long);
    }
    for version in 1..=40 {
        let mut bits = Bits::new(Version::Normal(version));
        // Both calls fail only with DataTooLong: the payload needs a bigger version.
        if bits.push_byte_data(data).is_err() || bits.push_terminator(EcLevel::M).is_err() {
            continue;
        }
        return QrCode::with_bits(bits, EcLevel::M).map_err(|_| too_long);
    }
    Err(too_long)
}

/// The symbol with its quiet zone as a square grid, row by row; `true` is a dark module.
struct Grid {
    /// Modules per side, quiet zone included.
    size: usize,
    /// `size * size` modules.
    dark: Vec<bool>,
}

impl Grid {
    /// Lays out `code` with [`QUIET_ZONE`] light modules around it.
    fn new(code: &QrCode) -> Grid {
        let width = code.width();
        let size = width + 2 * QUIET_ZONE;
        let colors = code.to_colors();
        let mut dark = vec![false; size * size];
        for (i, color) in colors.iter().enumerate() {
            let (x, y) = (i % width + QUIET_ZONE, i / width + QUIET_ZONE);
            dark[y * size + x] = *color == Color::Dark;
        }
        Grid { size, dark }
    }

    /// Whether the module at (x, y) is dark; anything past the edge is light (more quiet zone).
    fn is_dark(&self, x: usize, y: usize) -> bool {
        x < self.size && y < self.size && self.dark[y * self.size + x]
    }
}

/// The half-block glyph with the upper and/or lower half inked.
fn half_block(upper: bool, lower: bool) -> char {
    match (upper, lower) {
        (false, false) => ' ',
        (true, false) => '▀',
        (false, true) => '▄',
        (true, true) => '█',
    }
}

/// Renders `payload` for a terminal, two modules per character cell (upper and lower half),
/// one line per pair of module rows, each line ending in `\n`.
///
/// With `colour`, every line is wrapped in explicit black-on-white escapes and the glyphs ink
/// the dark modules, so the code reads the same on dark and light themes. Use it whenever
/// colour is allowed (a TTY and no `NO_COLOR`).
///
/// Without `colour` we cannot know the theme, so we pick the common default, a dark one: the
/// glyphs ink the *light* modules (drawn in the light foreground) and the dark modules are the
/// terminal's dark background. On a light theme this form shows inverted, which some scanners
/// read and some do not; the PNG written beside it is the fallback that always works.
pub fn render_terminal(payload: &str, colour: bool) -> Result<Drawing, QrError> {
    let grid = Grid::new(&encode(payload)?);
    let rows = grid.size.div_ceil(2);
    let mut out = String::with_capacity(rows * (grid.size * 3 + 32));
    for row in 0..rows {
        let (top, bottom) = (2 * row, 2 * row + 1);
        if colour {
            out.push_str(INK_ON_PAPER);
        }
        for x in 0..grid.size {
            let (upper, lower) = (grid.is_dark(x, top), grid.is_dark(x, bottom));
            out.push(if colour { half_block(upper, lower) } else { half_block(!upper, !lower) });
        }
        if colour {
            out.push_str(RESET);
        }
        out.push('\n');
    }
    Ok(Drawing { text: out, columns: grid.size, rows })
}

/// A QR code drawn for a terminal ([`render_terminal`]).
#[derive(Debug)]
pub struct Drawing {
    /// The lines, each ending in `\n`.
    pub text: String,
    /// The character cells each line takes: one per module, the quiet zone included.
    pub columns: usize,
    /// The lines.
    pub rows: usize,
}

/// Encodes `payload` as an 8-bit greyscale PNG, [`PNG_SCALE`] pixels per module, with the
/// quiet zone.
fn png_bytes(payload: &str) -> Result<Vec<u8>, QrError> {
    let grid = Grid::new(&encode(payload)?);
    let side = grid.size * PNG_SCALE;
    let mut pixels = Vec::with_capacity(side * side);
    for py in 0..side {
        for px in 0..side {
            let dark = grid.is_dark(px / PNG_SCALE, py / PNG_SCALE);
            pixels.push(if dark { 0 } else { 255 });
        }
    }
    let side = u32::try_from(side).map_err(|e| QrError::Png(e.to_string()))?;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| QrError::Png(e.to_string());
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(&pixels).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    Ok(out)
}

/// Writes `payload` as a PNG QR code to `path`, replacing it atomically.
///
/// The file is created 0600: it carries a live single-use access code, so other users of the
/// machine must not be able to pair with it before its owner does.
pub fn write_png(payload: &str, path: &Path) -> Result<(), QrError> {
    let bytes = png_bytes(payload)?;
    crate::state::write_atomic(path, &bytes)
        .map_err(|source| QrError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// A payload shaped like a real relay pairing QR, with a non-ASCII display name.
    fn realistic_payload() -> String {
        let qr = crate::protocol::RelayQr::new(
            "0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef",
            "https://relay.example.com",
            "wss://relay.example.com/ws/app",
            "my-macbook — Zoë 工作",
        );
        serde_json::to_string(&qr).unwrap()
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        /// Creates `hermeschat-qr-<tag>-<pid>-<nanos>`.
        fn new(tag: &str) -> TestDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("hermeschat-qr-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Decodes every QR code rqrr finds in a greyscale image (0 = black).
    fn decode(width: usize, height: usize, luma: impl FnMut(usize, usize) -> u8) -> Vec<String> {
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(width, height, luma);
        img.detect_grids()
            .into_iter()
            .filter_map(|g| g.decode().ok().map(|(_, text)| text))
            .collect()
    }

    /// Drops ANSI SGR sequences (`ESC [ ... m`) from a line.
    fn strip_ansi(line: &str) -> String {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Turns terminal output back into a module grid (one cell = 1 module wide, 2 tall);
    /// `glyph_is_dark` says whether inked halves are dark modules.
    fn terminal_to_modules(text: &str, glyph_is_dark: bool) -> Vec<Vec<bool>> {
        let mut rows = Vec::new();
        for line in text.lines() {
            let line = strip_ansi(line);
            let (mut upper, mut lower) = (Vec::new(), Vec::new());
            for c in line.chars() {
                let (u, l) = match c {
                    ' ' => (false, false),
                    '▀' => (true, false),
                    '▄' => (false, true),
                    '█' => (true, true),
                    other => panic!("unexpected glyph {other:?}"),
                };
                upper.push(u == glyph_is_dark);
                lower.push(l == glyph_is_dark);
            }
            rows.push(upper);
            rows.push(lower);
        }
        rows
    }

    /// Decodes a module grid, scaled up so rqrr's finder search has room.
    fn decode_modules(modules: &[Vec<bool>]) -> Vec<String> {
        const SCALE: usize = 4;
        let height = modules.len();
        let width = modules[0].len();
        assert!(modules.iter().all(|r| r.len() == width), "ragged rows");
        decode(
            width * SCALE,
            height * SCALE,
            |x, y| {
                if modules[y / SCALE][x / SCALE] { 0 } else { 255 }
            },
        )
    }

    #[test]
    fn png_round_trips_through_a_decoder() {
        let dir = TestDir::new("png");
        let path = dir.0.join("hermeschat_pair.png");
        let payload = realistic_payload();
        write_png(&payload, &path).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the PNG holds a live access code");

        let file = std::io::BufReader::new(fs::File::open(&path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        assert_eq!(info.width, info.height);
        let side = info.width as usize;
        assert_eq!(side % PNG_SCALE, 0);
        let px = |x: usize, y: usize| buf[y * side + x];

        // A 4-module quiet zone is white all round; the finder pattern's corner follows it.
        let edge = 4 * PNG_SCALE;
        for i in 0..side {
            for j in 0..edge {
                assert_eq!(px(i, j), 255, "top quiet zone at ({i},{j})");
                assert_eq!(px(j, i), 255, "left quiet zone at ({j},{i})");
                assert_eq!(px(i, side - 1 - j), 255, "bottom quiet zone");
                assert_eq!(px(side - 1 - j, i), 255, "right quiet zone");
            }
        }
        assert_eq!(px(edge, edge), 0);
        assert_eq!(px(edge + PNG_SCALE - 1, edge + PNG_SCALE - 1), 0);

        let decoded = decode(side, side, px);
        assert_eq!(decoded, vec![payload]);
    }

    #[test]
    fn png_replaces_an_existing_file() {
        let dir = TestDir::new("replace");
        let path = dir.0.join("hermeschat_pair.png");
        write_png("first", &path).unwrap();
        let first = fs::read(&path).unwrap();
        write_png("second", &path).unwrap();
        assert_ne!(fs::read(&path).unwrap(), first);
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn png_error_names_the_path() {
        let dir = TestDir::new("missing");
        let path = dir.0.join("no-such-dir").join("qr.png");
        let err = write_png("x", &path).unwrap_err();
        assert!(matches!(err, QrError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-dir/qr.png"), "{err}");
    }

    #[test]
    fn colour_terminal_rendering_decodes() {
        let payload = realistic_payload();
        let text = render_terminal(&payload, true).unwrap().text;
        for line in text.lines() {
            assert!(line.starts_with(INK_ON_PAPER), "line lacks colours: {line:?}");
            assert!(line.ends_with(RESET), "line does not reset: {line:?}");
        }
        let modules = terminal_to_modules(&text, true);
        // The quiet zone is light: blank cells in this mode.
        let first = strip_ansi(text.lines().next().unwrap());
        assert!(first.chars().all(|c| c == ' '), "{first:?}");
        assert_eq!(decode_modules(&modules), vec![payload]);
    }

    #[test]
    fn plain_terminal_rendering_inks_the_light_modules() {
        let payload = realistic_payload();
        let text = render_terminal(&payload, false).unwrap().text;
        assert!(!text.contains('\x1b'), "plain output must carry no escapes");
        // Quiet zone is light, so on a dark theme it is drawn as full blocks.
        for line in text.lines().take(QUIET_ZONE / 2) {
            assert!(line.chars().all(|c| c == '█'), "{line:?}");
        }
        let modules = terminal_to_modules(&text, false);
        assert_eq!(decode_modules(&modules), vec![payload.clone()]);
        // Read with the wrong polarity, it must not decode: the inversion is real.
        assert!(decode_modules(&terminal_to_modules(&text, true)).is_empty());
    }

    #[test]
    fn terminal_lines_are_square_with_the_symbol() {
        let code = encode("hello").unwrap();
        let size = code.width() + 2 * QUIET_ZONE;
        let drawing = render_terminal("hello", false).unwrap();
        assert_eq!((drawing.columns, drawing.rows), (size, size.div_ceil(2)));
        let text = drawing.text;
        assert_eq!(text.lines().count(), size.div_ceil(2));
        assert!(text.lines().all(|l| l.chars().count() == size));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn byte_mode_at_error_correction_m() {
        // Twenty digits: numeric mode would fit version 1 (34 digits at M); byte mode holds
        // only 14 bytes there, so version 2 proves the single byte segment.
        let code = encode("12345678901234567890").unwrap();
        assert_eq!(code.version(), Version::Normal(2));
        assert_eq!(code.error_correction_level(), EcLevel::M);

        let text = render_terminal("12345678901234567890", true).unwrap().text;
        let modules = terminal_to_modules(&text, true);
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(
            modules[0].len() * 4,
            modules.len() * 4,
            |x, y| if modules[y / 4][x / 4] { 0 } else { 255 },
        );
        let grids = img.detect_grids();
        assert_eq!(grids.len(), 1);
        let (meta, text) = grids[0].decode().unwrap();
        assert_eq!(text, "12345678901234567890");
        assert_eq!(meta.ecc_level, 0, "format bits 00 mean error correction M");
    }

    #[test]
    fn too_long_payload_is_reported() {
        assert!(encode(&"x".repeat(MAX_PAYLOAD_BYTES)).is_ok());
        let err = render_terminal(&"x".repeat(MAX_PAYLOAD_BYTES + 1), true).unwrap_err();
        assert!(matches!(err, QrError::TooLong { len } if len == MAX_PAYLOAD_BYTES + 1));
        assert!(err.to_string().contains("2332 bytes"), "{err}");
    }
}
