//! Framing for tokio-util: a 2-byte big-endian length, then the frame.
//!
//! A zero length is a keep-alive and yields [`Frame::KeepAlive`]. A declared
//! length above the configured maximum is refused as soon as the two length
//! bytes are read, before any of the frame is buffered; so is one too short
//! to hold the dialect's TPDU, header, MTI and bitmap. Either error means the
//! stream cannot be framed any more: close the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::dialect::Dialect;

/// The default largest frame, after the length prefix (terminal-cup.md).
pub const DEFAULT_MAX_FRAME: usize = 2048;

/// One item read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A zero-length frame: keep-alive, gets no answer.
    KeepAlive,
    /// A message frame (TPDU and header included, length prefix excluded).
    Message(Bytes),
}

/// Why a stream cannot be framed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The declared length is above the maximum.
    #[error("frame length {declared} exceeds the maximum {max}")]
    TooLong {
        /// Length announced by the prefix.
        declared: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The declared length cannot hold a message of the dialect.
    #[error("frame length {declared} is below the minimum {min}")]
    TooShort {
        /// Length announced by the prefix.
        declared: usize,
        /// TPDU + header + MTI + bitmap.
        min: usize,
    },
}

/// The length-prefixed frame codec; see the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
    min: usize,
}

impl FrameCodec {
    /// A codec for `dialect` accepting frames of at most `max` bytes (capped at 65535).
    pub fn new(dialect: &Dialect, max: usize) -> FrameCodec {
        FrameCodec {
            max: max.min(u16::MAX as usize),
            min: dialect.min_frame_len(),
        }
    }

    /// The largest frame accepted.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 2 {
            return Ok(None);
        }
        let declared = usize::from(u16::from_be_bytes([src[0], src[1]]));
        if declared == 0 {
            src.advance(2);
            return Ok(Some(Frame::KeepAlive));
        }
        if declared > self.max {
            return Err(FrameError::TooLong {
                declared,
                max: self.max,
            });
        }
        if declared < self.min {
            return Err(FrameError::TooShort {
                declared,
                min: self.min,
            });
        }
        if src.len() < 2 + declared {
            src.reserve(2 + declared - src.len());
            return Ok(None);
        }
        src.advance(2);
        Ok(Some(Frame::Message(src.split_to(declared).freeze())))
    }
}

/// Writes a frame body behind its length prefix. (A [`crate::MessageWriter`]
/// writes complete frames itself; this is for bodies built elsewhere.)
impl Encoder<&[u8]> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, body: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        if body.len() > self.max {
            return Err(FrameError::TooLong {
                declared: body.len(),
                max: self.max,
            });
        }
        dst.reserve(2 + body.len());
        dst.put_u16(body.len() as u16);
        dst.put_slice(body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> FrameCodec {
        FrameCodec::new(&Dialect::cup_pos(), 64)
    }

    #[test]
    fn needs_more_bytes_is_not_an_error() {
        let mut c = codec();
        let mut buf = BytesMut::from(&[0x00][..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.put_slice(&[30, 1, 2, 3]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() >= 32, "reserves what the frame needs");
        buf.put_slice(&[0u8; 27]);
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Frame::Message(Bytes::from({
                let mut v = vec![1, 2, 3];
                v.extend([0u8; 27]);
                v
            })))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn zero_length_is_a_keep_alive() {
        let mut c = codec();
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Frame::KeepAlive));
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Frame::KeepAlive));
        assert_eq!(c.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut c = codec();
        let mut buf = BytesMut::from(&[0xFF, 0xFF][..]);
        let cap = buf.capacity();
        match c.decode(&mut buf) {
            Err(FrameError::TooLong { declared, max }) => {
                assert_eq!((declared, max), (65535, 64));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(buf.capacity(), cap, "nothing reserved for the frame");
    }

    #[test]
    fn too_short_to_be_a_message_is_refused() {
        let mut c = codec();
        let mut buf = BytesMut::from(&[0x00, 0x05, 1, 2, 3, 4, 5][..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(FrameError::TooShort {
                declared: 5,
                min: 21
            })
        ));
    }

    #[test]
    fn encoder_writes_the_length() {
        let mut c = codec();
        let mut buf = BytesMut::new();
        c.encode(&[9u8; 3][..], &mut buf).unwrap();
        assert_eq!(&buf[..], &[0, 3, 9, 9, 9]);
        assert!(c.encode(&[0u8; 65][..], &mut buf).is_err());
    }
}
