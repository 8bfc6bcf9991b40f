//! The protocol between an atoll host and the guest agent inside each microVM: exec and files
//! over a virtio-serial port of the VM's own (docs/design.md, MicroVMs, "Exec and files").
//!
//! Decisions:
//! - **A port of its own, not the network.** The channel is a virtio-serial port
//!   (`org.atoll.guest.0`) whose host end is a Unix socket in the VM's runtime directory; it
//!   works with egress off and no other VM can reach it. (vsock would do too where the host has
//!   vhost-vsock; this one does not.)
//! - **Self-synchronising framing: COBS with a zero delimiter.** Each frame is encoded with
//!   consistent-overhead byte stuffing (no zero bytes inside) and ends in `0x00`. A reader that
//!   joins mid-stream, or a writer that dies mid-frame, costs at most one frame: the next zero
//!   starts afresh. A length prefix would not resynchronise. Overhead: one byte in 254.
//! - **Everything the other side sends is untrusted.** A frame is at most [`MAX_FRAME`] bytes
//!   decoded; a longer one is skipped up to its delimiter and counted, never buffered. Unknown
//!   kinds and malformed bodies are errors for that frame alone; the host resets the channel
//!   on a guest that breaks the flow-control rules below.
//! - **Multiplexed sessions with credit.** Every frame carries a session id (the host picks
//!   them; 0 is the channel itself). The guest may send a session's output only against
//!   credit the host granted ([`Kind::Credit`]), and the host sends input only against credit
//!   the guest granted ([`Kind::InputCredit`]), so neither side buffers more than a window per
//!   session, and one session that floods or stalls does not hold up the others.
//! - **A hello per connection.** The host starts every connection with [`Kind::Hello`]
//!   carrying a random nonce; the guest ends all its sessions (killing their processes) and
//!   answers with the same nonce, so output of an earlier connection is never taken for this
//!   one's (the host skips everything before the matching hello).
//! - **Little-endian fixed fields, JSON where the shape is rich** (an exec's argv and
//!   environment, a file's metadata): small, and the guest agent needs no schema compiler.

use serde::{Deserialize, Serialize};

/// The protocol version the hello carries; a guest answering another is refused.
pub const VERSION: u32 = 1;
/// The virtio-serial port's name (QEMU `virtserialport,name=`), found by the guest in sysfs.
pub const PORT_NAME: &str = "org.atoll.guest.0";
/// The largest decoded frame: a header and [`MAX_CHUNK`] bytes of data, with room to spare.
pub const MAX_FRAME: usize = MAX_CHUNK + 1024;
/// The longest COBS-stuffed frame (without its delimiter) of a frame of [`MAX_FRAME`] bytes:
/// one overhead byte per 254, and the first and last code bytes.
pub const MAX_STUFFED: usize = MAX_FRAME + MAX_FRAME / 254 + 2;
/// The largest data chunk one frame carries (output, input, file contents).
pub const MAX_CHUNK: usize = 32 * 1024;
/// The credit window per session and direction: how many data bytes may be in flight.
pub const WINDOW: u32 = 256 * 1024;
/// The largest JSON body (exec request, file metadata).
pub const MAX_JSON: usize = 64 * 1024;

/// What a frame is. Host → guest below 100, guest → host from 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// H→G, session 0: `version u32, nonce u64`. The guest ends every session first.
    Hello = 1,
    /// H→G: an [`ExecRequest`] (JSON) starts session `s`.
    Exec = 2,
    /// H→G: data for the session's stdin or the file being written.
    Input = 3,
    /// H→G: the end of the input (stdin closed; the file is complete).
    InputEnd = 4,
    /// H→G: kill the session's process group (or abandon the file) and end the session.
    Kill = 5,
    /// H→G: `u32`: the guest may send that many more output bytes for the session.
    Credit = 6,
    /// H→G: a [`FileRequest`] (JSON) to read a file: the guest answers [`Kind::FileInfo`],
    /// then the contents as [`Kind::Stdout`] chunks under credit, then [`Kind::Done`].
    ReadFile = 7,
    /// H→G: a [`FileRequest`] (JSON) to write a file from the session's input; the guest
    /// answers [`Kind::Done`] once it is in place (or [`Kind::Error`]).
    WriteFile = 8,
    /// G→H, session 0: `version u32, nonce u64`, the host's nonce.
    HelloAck = 101,
    /// G→H: `pid u32`: the exec's process started.
    Started = 102,
    /// G→H: stdout bytes (or file contents).
    Stdout = 103,
    /// G→H: stderr bytes.
    Stderr = 104,
    /// G→H: `code i32, signal i32` (-1 where it does not apply); the session is over.
    Exit = 105,
    /// G→H: a UTF-8 message; the session is over.
    Error = 106,
    /// G→H: `u32`: the host may send that many more input bytes.
    InputCredit = 107,
    /// G→H: a [`FileInfo`] (JSON).
    FileInfo = 108,
    /// G→H: the file was read to its end or written in place; the session is over.
    Done = 109,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Exec,
            3 => Input,
            4 => InputEnd,
            5 => Kill,
            6 => Credit,
            7 => ReadFile,
            8 => WriteFile,
            101 => HelloAck,
            102 => Started,
            103 => Stdout,
            104 => Stderr,
            105 => Exit,
            106 => Error,
            107 => InputCredit,
            108 => FileInfo,
            109 => Done,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub session: u32,
    pub body: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLong(usize),
    #[error("malformed byte stuffing")]
    Stuffing,
    #[error("frame shorter than its header ({0} bytes)")]
    Short(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} body: {message}")]
    Body { kind: Kind, message: String },
}

impl Frame {
    pub fn new(kind: Kind, session: u32, body: Vec<u8>) -> Frame {
        Frame {
            kind,
            session,
            body,
        }
    }

    pub fn json<T: Serialize>(kind: Kind, session: u32, v: &T) -> Frame {
        Frame::new(
            kind,
            session,
            serde_json::to_vec(v).expect("protocol types serialize"),
        )
    }

    pub fn u32(kind: Kind, session: u32, v: u32) -> Frame {
        Frame::new(kind, session, v.to_le_bytes().to_vec())
    }

    pub fn hello(kind: Kind, nonce: u64) -> Frame {
        let mut body = VERSION.to_le_bytes().to_vec();
        body.extend_from_slice(&nonce.to_le_bytes());
        Frame::new(kind, 0, body)
    }

    pub fn exit(session: u32, code: i32, signal: i32) -> Frame {
        let mut body = code.to_le_bytes().to_vec();
        body.extend_from_slice(&signal.to_le_bytes());
        Frame::new(Kind::Exit, session, body)
    }

    fn bad(&self, message: impl Into<String>) -> FrameError {
        FrameError::Body {
            kind: self.kind,
            message: message.into(),
        }
    }

    /// The body as a little-endian `u32` (credits, pids).
    pub fn as_u32(&self) -> Result<u32, FrameError> {
        let b: [u8; 4] = self
            .body
            .as_slice()
            .try_into()
            .map_err(|_| self.bad(format!("{} bytes, want 4", self.body.len())))?;
        Ok(u32::from_le_bytes(b))
    }

    /// A hello's `(version, nonce)`.
    pub fn as_hello(&self) -> Result<(u32, u64), FrameError> {
        if self.body.len() != 12 {
            return Err(self.bad(format!("{} bytes, want 12", self.body.len())));
        }
        let v = u32::from_le_bytes(self.body[0..4].try_into().expect("4 bytes"));
        let n = u64::from_le_bytes(self.body[4..12].try_into().expect("8 bytes"));
        Ok((v, n))
    }

    /// An exit's `(code, signal)`.
    pub fn as_exit(&self) -> Result<(i32, i32), FrameError> {
        if self.body.len() != 8 {
            return Err(self.bad(format!("{} bytes, want 8", self.body.len())));
        }
        let c = i32::from_le_bytes(self.body[0..4].try_into().expect("4 bytes"));
        let s = i32::from_le_bytes(self.body[4..8].try_into().expect("4 bytes"));
        Ok((c, s))
    }

    pub fn as_json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, FrameError> {
        if self.body.len() > MAX_JSON {
            return Err(self.bad("JSON body over the limit"));
        }
        serde_json::from_slice(&self.body).map_err(|e| self.bad(e.to_string()))
    }

    /// The frame's bytes on the wire: stuffed, ending in the zero delimiter.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(5 + self.body.len());
        raw.push(self.kind as u8);
        raw.extend_from_slice(&self.session.to_le_bytes());
        raw.extend_from_slice(&self.body);
        let mut out = Vec::with_capacity(raw.len() + raw.len() / 254 + 2);
        cobs_encode(&raw, &mut out);
        out.push(0);
        out
    }

    /// Decodes one frame from its stuffed bytes (without the delimiter).
    pub fn decode(stuffed: &[u8]) -> Result<Frame, FrameError> {
        if stuffed.len() > MAX_STUFFED {
            return Err(FrameError::TooLong(stuffed.len()));
        }
        let raw = cobs_decode(stuffed).ok_or(FrameError::Stuffing)?;
        if raw.len() > MAX_FRAME {
            return Err(FrameError::TooLong(raw.len()));
        }
        if raw.len() < 5 {
            return Err(FrameError::Short(raw.len()));
        }
        let kind = Kind::from_u8(raw[0]).ok_or(FrameError::UnknownKind(raw[0]))?;
        let session = u32::from_le_bytes(raw[1..5].try_into().expect("4 bytes"));
        Ok(Frame::new(kind, session, raw[5..].to_vec()))
    }
}

/// COBS: replaces every zero byte so that the output has none.
fn cobs_encode(raw: &[u8], out: &mut Vec<u8>) {
    let mut code_at = out.len();
    out.push(0);
    let mut code: u8 = 1;
    for &b in raw {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            if code == 0xff {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
}

/// The inverse of [`cobs_encode`]; `None` for input no encoder produces.
fn cobs_decode(stuffed: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(stuffed.len());
    let mut i = 0;
    while i < stuffed.len() {
        let code = stuffed[i] as usize;
        if code == 0 || i + code > stuffed.len() {
            return None;
        }
        out.extend_from_slice(&stuffed[i + 1..i + code]);
        i += code;
        if code < 0xff && i < stuffed.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// Splits a byte stream into frames: feed it what arrives, take the frames out. Bytes of an
/// overlong frame are dropped up to its delimiter (and that frame reported as too long), so
/// memory stays within [`MAX_FRAME`] whatever the other side sends.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Skipping an overlong frame up to its delimiter; how long it was so far.
    skipping: Option<usize>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Forgets any partial frame (a new connection).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.skipping = None;
    }

    /// Takes `bytes` and calls `each` for every frame (or frame error) they complete.
    pub fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(Result<Frame, FrameError>)) {
        let limit = MAX_STUFFED;
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == 0);
            let (part, rest, complete) = match end {
                Some(e) => (&bytes[..e], &bytes[e + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if let Some(n) = self.skipping.as_mut() {
                *n += part.len();
                if complete {
                    each(Err(FrameError::TooLong(*n)));
                    self.skipping = None;
                }
                continue;
            }
            if self.buf.len() + part.len() > limit {
                let n = self.buf.len() + part.len();
                self.buf.clear();
                if complete {
                    each(Err(FrameError::TooLong(n)));
                } else {
                    self.skipping = Some(n);
                }
                continue;
            }
            self.buf.extend_from_slice(part);
            if complete {
                if !self.buf.is_empty() {
                    each(Frame::decode(&self.buf));
                }
                self.buf.clear();
            }
        }
    }
}

/// A command to run ([`Kind::Exec`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments; the program is looked up in `PATH` if it has no `/`.
    pub argv: Vec<String>,
    /// The environment, replacing the agent's (`PATH`, `HOME` default to the guest's).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory (`/root` if absent).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether stdin is fed by [`Kind::Input`] (else it is `/dev/null`).
    #[serde(default)]
    pub stdin: bool,
}

/// A file to read or write ([`Kind::ReadFile`], [`Kind::WriteFile`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRequest {
    /// An absolute path.
    pub path: String,
    /// Write: the file's mode bits (e.g. 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Write: owner and group (root's if absent).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Write: the most bytes the host will send; the guest refuses more.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// A file's metadata, before its contents ([`Kind::FileInfo`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(bytes, |f| out.push(f));
        out
    }

    #[test]
    fn frames_round_trip_whatever_their_bytes() {
        let bodies: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0, 0],
            (0..=255u8).collect(),
            vec![7; 253],
            vec![7; 254],
            vec![7; 255],
            vec![0xff; MAX_CHUNK],
            (0..MAX_CHUNK).map(|i| (i % 3) as u8).collect(),
        ];
        let mut stream = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            let f = Frame::new(Kind::Stdout, i as u32, b.clone());
            let wire = f.encode();
            assert!(!wire[..wire.len() - 1].contains(&0));
            assert_eq!(Frame::decode(&wire[..wire.len() - 1]), Ok(f));
            stream.extend(wire);
        }
        // Fed byte by byte and all at once: the same frames.
        let all = frames(&stream);
        let mut d = Decoder::new();
        let mut one = Vec::new();
        for b in &stream {
            d.feed(std::slice::from_ref(b), |f| one.push(f));
        }
        assert_eq!(all, one);
        assert_eq!(all.len(), bodies.len());
        for (i, (f, b)) in all.into_iter().zip(&bodies).enumerate() {
            let f = f.unwrap();
            assert_eq!((f.session, &f.body), (i as u32, b));
        }
    }

    #[test]
    fn a_reader_resynchronises_at_the_next_delimiter() {
        let good = Frame::u32(Kind::Credit, 9, 4096);
        let wire = good.encode();
        // Joined mid-frame: the tail decodes to garbage (an error), the next frame is whole.
        let mut stream = wire[3..].to_vec();
        stream.extend(&wire);
        let got = frames(&stream);
        assert_eq!(got.len(), 2);
        assert!(got[0].is_err());
        assert_eq!(got[1], Ok(good));
    }

    #[test]
    fn hostile_input_is_an_error_per_frame_and_never_buffered_past_the_limit() {
        // Overlong: skipped to its delimiter, reported once, then the next frame is read.
        let mut stream = vec![1u8; 3 * MAX_FRAME];
        stream.push(0);
        let good = Frame::new(Kind::Stderr, 1, b"x".to_vec());
        stream.extend(good.encode());
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(1000) {
            d.feed(chunk, |f| got.push(f));
            assert!(d.buf.len() <= MAX_STUFFED);
        }
        assert!(matches!(got[0], Err(FrameError::TooLong(n)) if n == 3 * MAX_FRAME));
        assert_eq!(got[1], Ok(good));
        assert_eq!(got.len(), 2);
        // Bad stuffing, short frames, unknown kinds.
        assert_eq!(Frame::decode(&[5, 1]), Err(FrameError::Stuffing));
        assert_eq!(Frame::decode(&[3, 1, 2]), Err(FrameError::Short(2)));
        assert_eq!(
            Frame::decode(&[6, 99, 1, 1, 1, 1]),
            Err(FrameError::UnknownKind(99))
        );
        // Bodies of the wrong size or shape.
        assert!(Frame::new(Kind::Credit, 1, vec![1, 2]).as_u32().is_err());
        assert!(Frame::new(Kind::Exit, 1, vec![0; 9]).as_exit().is_err());
        assert!(Frame::new(Kind::Exec, 1, b"{\"argv\":1}".to_vec())
            .as_json::<ExecRequest>()
            .is_err());
        assert!(Frame::new(Kind::Exec, 1, b"{\"argv\":[],\"x\":1}".to_vec())
            .as_json::<ExecRequest>()
            .is_err());
    }
}
