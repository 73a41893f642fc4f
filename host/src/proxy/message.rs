//! Frontend messages, decoded once when they arrive: the serve loop, the
//! classification of a batch and its translation for a server connection
//! all match on [`Kind`] instead of re-reading message bodies. Bodies that
//! only pass through (Execute, CopyData, ...) are not decoded; the frame is
//! kept and forwarded as it came.

use bytes::Bytes;

use crate::wire::{Fields, Frame, WireError};

/// What a client message is, with the fields signalbox acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Simple query; its text is [`Message::query_text`].
    Query,
    /// `text`: the SQL as the client sent it, in its client encoding.
    Parse {
        name: String,
        text: Bytes,
        param_types: Bytes,
    },
    Bind {
        portal: String,
        statement: String,
    },
    /// `kind` is `S` (statement) or `P` (portal).
    Describe {
        kind: u8,
        name: String,
    },
    Close {
        kind: u8,
        name: String,
    },
    Execute {
        portal: String,
    },
    Sync,
    Flush,
    Terminate,
    /// CopyData, CopyDone or CopyFail.
    Copy,
    /// Anything else (FunctionCall, a stray password message, ...).
    Other,
}

/// A frame and what it is.
#[derive(Clone, Debug)]
pub struct Message {
    pub frame: Frame,
    pub kind: Kind,
}

impl Message {
    /// Decode the fields of `frame` that routing and translation need.
    pub fn decode(frame: Frame) -> Result<Message, WireError> {
        let mut f = Fields::new(&frame.body);
        let kind = match frame.tag {
            b'Q' => {
                if !frame.body.contains(&0) {
                    return Err(WireError::Protocol(
                        "Query without a terminating NUL".into(),
                    ));
                }
                Kind::Query
            }
            b'P' => {
                let name = name(&mut f)?;
                let text = f.cbytes()?;
                let start = text.as_ptr() as usize - frame.body.as_ptr() as usize;
                let text = frame.body.slice(start..start + text.len());
                let rest = f.rest();
                let param_types = frame.body.slice(frame.body.len() - rest.len()..);
                Kind::Parse {
                    name,
                    text,
                    param_types,
                }
            }
            b'B' => Kind::Bind {
                portal: name(&mut f)?,
                statement: name(&mut f)?,
            },
            b'D' => Kind::Describe {
                kind: f.u8()?,
                name: name(&mut f)?,
            },
            b'C' => Kind::Close {
                kind: f.u8()?,
                name: name(&mut f)?,
            },
            b'E' => Kind::Execute {
                portal: name(&mut f)?,
            },
            b'S' => Kind::Sync,
            b'H' => Kind::Flush,
            b'X' => Kind::Terminate,
            b'd' | b'c' | b'f' => Kind::Copy,
            _ => Kind::Other,
        };
        Ok(Message { frame, kind })
    }

    /// The SQL bytes of a Query (up to its NUL), in the client encoding.
    pub fn query_text(&self) -> &[u8] {
        let body = &self.frame.body;
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        &body[..end]
    }
}

/// A statement or portal name. In a client encoding other than UTF-8 it may
/// not be UTF-8: it is only ever a key, so a lossy reading serves.
fn name(f: &mut Fields<'_>) -> Result<String, WireError> {
    Ok(String::from_utf8_lossy(f.cbytes()?).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn frame(build: impl FnOnce(&mut BytesMut)) -> Frame {
        let mut out = BytesMut::new();
        build(&mut out);
        crate::wire::take_frame(&mut out, 1 << 20)
            .unwrap()
            .expect("a whole message")
    }

    #[test]
    fn decodes_what_routing_needs() {
        let p = Message::decode(frame(|o| {
            crate::wire::parse(o, "s1", b"SELECT $1", &[0, 1, 0, 0, 0, 23])
        }))
        .unwrap();
        assert_eq!(
            p.kind,
            Kind::Parse {
                name: "s1".into(),
                text: Bytes::from_static(b"SELECT $1"),
                param_types: Bytes::from_static(&[0, 1, 0, 0, 0, 23]),
            }
        );
        let mut bind = BytesMut::new();
        crate::wire::bind_renamed(&mut bind, b"portal\0old\0\0\0\0\0\0\0", "s1").unwrap();
        let b =
            Message::decode(crate::wire::take_frame(&mut bind, 1024).unwrap().unwrap()).unwrap();
        assert_eq!(
            b.kind,
            Kind::Bind {
                portal: "portal".into(),
                statement: "s1".into()
            }
        );
        let d = Message::decode(frame(|o| crate::wire::describe(o, b'P', "p"))).unwrap();
        assert_eq!(
            d.kind,
            Kind::Describe {
                kind: b'P',
                name: "p".into()
            }
        );
        let c = Message::decode(frame(|o| crate::wire::close(o, b'S', "s1"))).unwrap();
        assert_eq!(
            c.kind,
            Kind::Close {
                kind: b'S',
                name: "s1".into()
            }
        );
        let q = Message::decode(frame(|o| crate::wire::query(o, "SELECT 1"))).unwrap();
        assert_eq!(
            (q.kind.clone(), q.query_text()),
            (Kind::Query, &b"SELECT 1"[..])
        );
    }

    #[test]
    fn malformed_bodies_are_protocol_errors() {
        for (tag, body) in [
            (b'Q', &b"SELECT 1"[..]),
            (b'P', &b"s1\0SELECT"[..]),
            (b'B', &b"portal"[..]),
            (b'D', &b""[..]),
            (b'C', &b"S"[..]),
        ] {
            let f = Frame {
                tag,
                body: Bytes::copy_from_slice(body),
            };
            assert!(
                matches!(Message::decode(f), Err(WireError::Protocol(_))),
                "{}",
                tag as char
            );
        }
    }
}
