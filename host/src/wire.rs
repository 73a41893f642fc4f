//! The PostgreSQL v3 wire protocol at the level the router needs: raw framing
//! (type byte + length), the few server messages signalbox itself emits, and
//! field access for the client messages routing reads. Message bodies that
//! only pass through are never decoded.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const PROTOCOL_V3: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("out of memory: no room to buffer a {0}-byte message (the [clients] buffer_budget_mb is in use)")]
    OutOfMemory(usize),
    /// A client took no byte of an answer for this many seconds while it
    /// held a server connection.
    #[error("the client took none of its answer for {0} s ([clients] write_timeout_s)")]
    Stalled(u64),
}

/// One framed message: its type byte and body (without the length).
#[derive(Clone, Debug)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// The whole message as on the wire.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.put_u8(self.tag);
        out.put_i32(self.body.len() as i32 + 4);
        out.put_slice(&self.body);
    }
}

/// Split one complete message off the front of `buf`, if it holds one.
/// The single framing function: client and server streams both use it.
pub fn take_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > max {
        return Err(WireError::Protocol(format!("invalid message length {len}")));
    }
    let total = len as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(total);
    let tag = msg[0];
    msg.advance(5);
    Ok(Some(Frame {
        tag,
        body: msg.freeze(),
    }))
}

/// The (type, body) of each whole message in `bytes` (which signalbox built
/// itself, so it is well formed); a truncated tail is ignored.
pub fn frames(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        let total = usize::try_from(len).ok()?.checked_add(1)?;
        if total < 5 || rest.len() < total {
            return None;
        }
        let (msg, tail) = rest.split_at(total);
        rest = tail;
        Some((msg[0], &msg[5..]))
    })
}

/// Read the untyped startup-phase packet (length + body).
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Bytes, WireError> {
    let len = match r.read_i32().await {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    };
    if !(8..=10_000).contains(&len) {
        return Err(WireError::Protocol(format!(
            "invalid startup packet length {len}"
        )));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    Ok(Bytes::from(body))
}

/// Reads NUL-terminated strings and integers out of a message body.
pub struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// A NUL-terminated string as bytes (text in the client's encoding).
    pub fn cbytes(&mut self) -> Result<&'a [u8], WireError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| WireError::Protocol("unterminated string".into()))?;
        let s = &self.data[..end];
        self.data = &self.data[end + 1..];
        Ok(s)
    }

    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| WireError::Protocol("unterminated string".into()))?;
        let s = std::str::from_utf8(&self.data[..end])
            .map_err(|_| WireError::Protocol("invalid UTF-8 in string".into()))?;
        self.data = &self.data[end + 1..];
        Ok(s)
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        if self.data.len() < 2 {
            return Err(WireError::Protocol("message too short".into()));
        }
        let v = i16::from_be_bytes([self.data[0], self.data[1]]);
        self.data = &self.data[2..];
        Ok(v)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        let (&b, rest) = self
            .data
            .split_first()
            .ok_or_else(|| WireError::Protocol("message too short".into()))?;
        self.data = rest;
        Ok(b)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |b| b.put_u8(status));
}

pub fn parse_complete(out: &mut BytesMut) {
    message(out, b'1', |_| {});
}

pub fn close_complete(out: &mut BytesMut) {
    message(out, b'3', |_| {});
}

pub fn bind_complete(out: &mut BytesMut) {
    message(out, b'2', |_| {});
}

pub fn no_data(out: &mut BytesMut) {
    message(out, b'n', |_| {});
}

/// `ParameterDescription` of a statement without parameters.
pub fn no_parameters(out: &mut BytesMut) {
    message(out, b't', |b| b.put_i16(0));
}

/// An `ErrorResponse` (severity ERROR or FATAL) with SQLSTATE `code`.
pub fn error_response(out: &mut BytesMut, severity: &str, code: &str, text: &str) {
    message(out, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity);
        b.put_u8(b'V');
        put_cstr(b, severity);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, text);
        b.put_u8(0);
    });
}

/// A `NoticeResponse` (severity NOTICE, SQLSTATE 00000).
pub fn notice(out: &mut BytesMut, text: &str) {
    message(out, b'N', |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "00000"),
            (b'M', text),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// SQLSTATE and message of an `ErrorResponse` body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    let mut f = Fields::new(body);
    while let Ok(kind) = f.u8() {
        if kind == 0 {
            break;
        }
        let Ok(value) = f.cstr() else { break };
        match kind {
            b'C' => code = value.to_owned(),
            b'M' => msg = value.to_owned(),
            _ => {}
        }
    }
    (code, msg)
}

/// `RowDescription` of one text column named `name` (as `SHOW` answers).
pub fn text_row_description(out: &mut BytesMut, name: &str) {
    message(out, b'T', |b| {
        b.put_i16(1);
        put_cstr(b, name);
        b.put_i32(0); // table oid
        b.put_i16(0); // column number
        b.put_i32(25); // text
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0); // text format
    });
}

/// `DataRow` of one text value.
pub fn text_data_row(out: &mut BytesMut, value: &str) {
    message(out, b'D', |b| {
        b.put_i16(1);
        b.put_i32(value.len() as i32);
        b.put_slice(value.as_bytes());
    });
}

/// `CommandComplete` with `tag` (e.g. `DEALLOCATE ALL`).
pub fn command_complete(out: &mut BytesMut, tag: &str) {
    message(out, b'C', |b| put_cstr(b, tag));
}

/// Message types a client may send after startup (PostgreSQL's list). A
/// frame starting with anything else is rejected before waiting for its
/// body: a misplaced StartupMessage begins with a zero byte.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P'
            | b'B'
            | b'D'
            | b'E'
            | b'C'
            | b'H'
            | b'S'
            | b'X'
            | b'd'
            | b'c'
            | b'f'
            | b'F'
            | b'p'
    )
}

/// Whether an ErrorResponse body ends the connection (severity FATAL or
/// PANIC): the server closes right after sending it.
pub fn is_fatal(body: &[u8]) -> bool {
    let mut f = Fields::new(body);
    while let Ok(kind) = f.u8() {
        if kind == 0 {
            break;
        }
        let Ok(value) = f.cstr() else { break };
        if kind == b'V' || kind == b'S' {
            return value == "FATAL" || value == "PANIC";
        }
    }
    false
}

/// Raw `Query` message.
pub fn query(out: &mut BytesMut, sql: &str) {
    message(out, b'Q', |b| put_cstr(b, sql));
}

/// Raw `Parse` message.
pub fn parse(out: &mut BytesMut, name: &str, sql: &[u8], param_types: &[u8]) {
    message(out, b'P', |b| {
        put_cstr(b, name);
        b.put_slice(sql);
        b.put_u8(0);
        b.put_slice(param_types);
    });
}

/// Raw `Close` message for a statement (`S`) or portal (`P`).
pub fn close(out: &mut BytesMut, kind: u8, name: &str) {
    message(out, b'C', |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    });
}

/// Raw `Describe` message.
pub fn describe(out: &mut BytesMut, kind: u8, name: &str) {
    message(out, b'D', |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    });
}

/// A `Bind` of `statement` to `portal` without parameters, text results.
pub fn bind_plain(out: &mut BytesMut, portal: &str, statement: &str) {
    message(out, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.put_slice(&[0; 6]);
    });
}

/// An `Execute` of `portal`, all rows.
pub fn execute(out: &mut BytesMut, portal: &str) {
    message(out, b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(0);
    });
}

/// A `Bind` message with its statement name replaced.
pub fn bind_renamed(out: &mut BytesMut, body: &[u8], statement: &str) -> Result<(), WireError> {
    let mut f = Fields::new(body);
    let portal = f.cbytes()?;
    let _old = f.cbytes()?;
    let rest = f.rest();
    message(out, b'B', |b| {
        b.put_slice(portal);
        b.put_u8(0);
        put_cstr(b, statement);
        b.put_slice(rest);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_bounds() {
        let mut out = BytesMut::new();
        query(&mut out, "SELECT 1");
        ready_for_query(&mut out, b'I');
        let seen: Vec<(u8, Vec<u8>)> = frames(&out).map(|(t, b)| (t, b.to_vec())).collect();
        assert_eq!(
            seen,
            [(b'Q', b"SELECT 1\0".to_vec()), (b'Z', b"I".to_vec())]
        );
        // Byte by byte: nothing until a message is whole.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in out.iter() {
            buf.extend_from_slice(&[*b]);
            if let Some(f) = take_frame(&mut buf, 1024).unwrap() {
                got.push((f.tag, f.body.to_vec()));
            }
        }
        assert_eq!(got, seen);
        assert!(buf.is_empty());
        let mut big = BytesMut::from(&[b'Q', 0x7f, 0, 0, 0][..]);
        assert!(matches!(
            take_frame(&mut big, 1024),
            Err(WireError::Protocol(_))
        ));
        let mut short = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(matches!(
            take_frame(&mut short, 1024),
            Err(WireError::Protocol(_))
        ));
    }

    #[test]
    fn error_fields_and_bind_rename() {
        let mut out = BytesMut::new();
        error_response(&mut out, "ERROR", "53300", "pool exhausted");
        assert_eq!(
            error_fields(&out[5..]),
            ("53300".into(), "pool exhausted".into())
        );
        let body = b"portal\0s1\0\0\0\0\0\0\0";
        let mut out = BytesMut::new();
        bind_renamed(&mut out, body, "sb_1").unwrap();
        assert_eq!(&out[5..], b"portal\0sb_1\0\0\0\0\0\0\0");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// However the bytes arrive, the decoder yields exactly the
            /// messages that were sent, and nothing before they are whole.
            #[test]
            fn frames_survive_any_split(
                msgs in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..200)), 0..20),
                cuts in prop::collection::vec(1usize..64, 1..400),
            ) {
                let mut wire_bytes = BytesMut::new();
                for (tag, body) in &msgs {
                    message(&mut wire_bytes, *tag, |b| b.put_slice(body));
                }
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                let mut pos = 0;
                let mut cut = cuts.iter().cycle();
                while pos < wire_bytes.len() {
                    let end = (pos + cut.next().copied().unwrap_or(1)).min(wire_bytes.len());
                    buf.extend_from_slice(&wire_bytes[pos..end]);
                    pos = end;
                    while let Some(f) = take_frame(&mut buf, 1 << 20).unwrap() {
                        got.push((f.tag, f.body.to_vec()));
                    }
                }
                prop_assert_eq!(got, msgs);
                prop_assert!(buf.is_empty());
            }

            /// Arbitrary input never panics the decoder and never yields a
            /// message larger than the limit.
            #[test]
            fn garbage_is_an_error_or_a_bounded_frame(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(f)) = take_frame(&mut buf, 128) {
                    prop_assert!(f.body.len() <= 128);
                }
            }
        }
    }
}
