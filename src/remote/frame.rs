//! The relay frame: one protobuf `codex.exec_server.relay.v1.RelayMessageFrame`
//! per WebSocket message (`docs/PROTOCOL.md`, "Remote executors"). The
//! router routes it by `stream_id`; everything of the session is inside a
//! `handshake` or `data` payload, encrypted.

use prost::Message as _;

/// The only frame version there is.
pub const VERSION: u32 = 1;

/// The reason every reset we send carries: a reset is unauthenticated
/// relay control data, so it says nothing.
pub const RESET_REASON: &str = "noise_relay_protocol_error";

/// One frame, as the reference's schema numbers its fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayMessageFrame {
    /// Always [`VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The virtual stream, chosen by the harness; untrusted.
    #[prost(string, tag = "2")]
    pub stream_id: String,
    /// Declared by the schema, sent as zero and never read.
    #[prost(uint32, tag = "3")]
    pub ack: u32,
    /// Declared by the schema, sent as zero and never read.
    #[prost(uint32, tag = "4")]
    pub ack_bits: u32,
    /// What the frame carries.
    #[prost(oneof = "Body", tags = "5, 6, 7, 8, 9, 10")]
    pub body: Option<Body>,
    /// W3C trace parent, in clear; receivers ignore it.
    #[prost(string, optional, tag = "11")]
    pub traceparent: Option<String>,
    /// W3C trace state, in clear; receivers ignore it.
    #[prost(string, optional, tag = "12")]
    pub tracestate: Option<String>,
}

/// The frame's body.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    /// One Noise transport record.
    #[prost(message, tag = "5")]
    Data(RelayData),
    /// Declared, never sent; ignored.
    #[prost(message, tag = "6")]
    AckFrame(Empty),
    /// The harness claims its stream with `next_seq: 0`; ignored otherwise.
    #[prost(message, tag = "7")]
    Resume(RelayResume),
    /// The stream is over; the reason is untrusted and never shown.
    #[prost(message, tag = "8")]
    Reset(RelayReset),
    /// Declared, never sent; ignored.
    #[prost(message, tag = "9")]
    Heartbeat(Empty),
    /// A Noise handshake message.
    #[prost(message, tag = "10")]
    Handshake(RelayHandshake),
}

/// A `data` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayData {
    /// Per stream and direction, from 0; never wraps.
    #[prost(uint32, tag = "1")]
    pub seq: u32,
    /// Reserved: always 0.
    #[prost(uint32, tag = "2")]
    pub segment_index: u32,
    /// Reserved: always 1.
    #[prost(uint32, tag = "3")]
    pub segment_count: u32,
    /// The record.
    #[prost(bytes = "vec", tag = "4")]
    pub payload: Vec<u8>,
}

/// An empty body (`ack_frame`, `heartbeat`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// A `resume` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayResume {
    /// Always 0 in practice.
    #[prost(uint32, tag = "1")]
    pub next_seq: u32,
}

/// A `reset` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayReset {
    /// Non-empty; untrusted.
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// A `handshake` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayHandshake {
    /// The Noise message.
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
}

/// Why a frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a protobuf frame at all.
    #[error("undecodable relay message frame: {0}")]
    Undecodable(String),
    /// A version other than 1.
    #[error("unsupported relay message frame version {0}")]
    Version(u32),
    /// A blank stream id.
    #[error("relay message frame is missing stream_id")]
    NoStream,
    /// No body.
    #[error("relay message frame is missing body")]
    NoBody,
    /// A `data` body with segments or no payload.
    #[error("relay data message frame is missing required fields")]
    Data,
    /// A `reset` without a reason.
    #[error("relay reset message frame is missing reason")]
    Reset,
    /// A `handshake` without a payload.
    #[error("relay handshake message frame is missing payload")]
    Handshake,
}

impl RelayMessageFrame {
    fn new(stream_id: &str, body: Body) -> Self {
        RelayMessageFrame {
            version: VERSION,
            stream_id: stream_id.to_string(),
            ack: 0,
            ack_bits: 0,
            body: Some(body),
            traceparent: None,
            tracestate: None,
        }
    }

    /// The harness's first frame on a stream: it claims the id.
    pub fn resume(stream_id: &str) -> Self {
        Self::new(stream_id, Body::Resume(RelayResume { next_seq: 0 }))
    }

    /// A Noise handshake message.
    pub fn handshake(stream_id: &str, payload: Vec<u8>) -> Self {
        Self::new(stream_id, Body::Handshake(RelayHandshake { payload }))
    }

    /// One transport record.
    pub fn data(stream_id: &str, seq: u32, payload: Vec<u8>) -> Self {
        Self::new(
            stream_id,
            Body::Data(RelayData {
                seq,
                segment_index: 0,
                segment_count: 1,
                payload,
            }),
        )
    }

    /// The end of a stream, saying nothing.
    pub fn reset(stream_id: &str) -> Self {
        Self::new(
            stream_id,
            Body::Reset(RelayReset {
                reason: RESET_REASON.into(),
            }),
        )
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decode and validate one WebSocket message's bytes.
    pub fn decode_valid(bytes: &[u8]) -> Result<Self, FrameError> {
        let frame = <Self as prost::Message>::decode(bytes)
            .map_err(|e| FrameError::Undecodable(e.to_string()))?;
        frame.validate()?;
        Ok(frame)
    }

    /// The checks both endpoints make.
    pub fn validate(&self) -> Result<(), FrameError> {
        if self.version != VERSION {
            return Err(FrameError::Version(self.version));
        }
        if self.stream_id.trim().is_empty() {
            return Err(FrameError::NoStream);
        }
        match &self.body {
            None => Err(FrameError::NoBody),
            Some(Body::Data(d))
                if d.segment_index != 0 || d.segment_count != 1 || d.payload.is_empty() =>
            {
                Err(FrameError::Data)
            }
            Some(Body::Reset(r)) if r.reason.is_empty() => Err(FrameError::Reset),
            Some(Body::Handshake(h)) if h.payload.is_empty() => Err(FrameError::Handshake),
            Some(_) => Ok(()),
        }
    }
}

/// Which body a frame carries, as [`RelayMessageFrame::route`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `data`.
    Data,
    /// `ack_frame`.
    Ack,
    /// `resume`.
    Resume,
    /// `reset`.
    Reset,
    /// `heartbeat`.
    Heartbeat,
    /// `handshake`.
    Handshake,
}

impl RelayMessageFrame {
    /// What a router needs of a frame, read without copying its payload:
    /// the stream id and the body's kind, with the frame-level checks
    /// (version 1, a stream id that is not blank, a body). The payload's
    /// own rules are the endpoints' to check.
    pub fn route(bytes: &[u8]) -> Result<(&str, Kind), FrameError> {
        Self::scan(bytes).map(|(stream, kind, _)| (stream, kind))
    }

    /// A `data` frame's seq and where its payload lies in `bytes`, read
    /// without copying it, with the checks of a full decode (version 1,
    /// the stream id, one segment, a payload). Anything else, or another
    /// body: `None`, and the caller decodes the frame whole.
    pub fn data_payload(bytes: &[u8]) -> Option<(&str, u32, std::ops::Range<usize>)> {
        let (stream, kind, body) = Self::scan(bytes).ok()?;
        if kind != Kind::Data {
            return None;
        }
        let (mut seq, mut index, mut count, mut payload) = (0u64, 0u64, 0u64, None);
        let mut at = body.start;
        while at < body.end {
            let (key, next) = varint_at(bytes, at)?;
            at = next;
            match (key >> 3, key & 7) {
                (1, 0) => (seq, at) = varint_at(bytes, at)?,
                (2, 0) => (index, at) = varint_at(bytes, at)?,
                (3, 0) => (count, at) = varint_at(bytes, at)?,
                (4, 2) => {
                    let (len, next) = varint_at(bytes, at)?;
                    let end = next.checked_add(usize::try_from(len).ok()?)?;
                    payload = Some(next..end);
                    at = end;
                }
                (_, 0) => at = varint_at(bytes, at)?.1,
                (_, 2) => {
                    let (len, next) = varint_at(bytes, at)?;
                    at = next.checked_add(usize::try_from(len).ok()?)?;
                }
                _ => return None,
            }
        }
        let payload = payload.filter(|p| !p.is_empty() && p.end <= body.end)?;
        if at != body.end || index != 0 || count != 1 {
            return None;
        }
        Some((stream, u32::try_from(seq).ok()?, payload))
    }

    /// One pass over a frame's fields: the stream id, the body's kind and
    /// where the body's bytes lie, with the frame-level checks.
    fn scan(bytes: &[u8]) -> Result<(&str, Kind, std::ops::Range<usize>), FrameError> {
        let bad = || FrameError::Undecodable("malformed protobuf".into());
        let within = |at: usize, len: usize| at.checked_add(len).filter(|&e| e <= bytes.len());
        let mut at = 0;
        let mut version = 0u64;
        let mut stream: Option<&str> = None;
        let mut body = None;
        while at < bytes.len() {
            let (key, next) = varint_at(bytes, at).ok_or_else(bad)?;
            at = next;
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    let (value, next) = varint_at(bytes, at).ok_or_else(bad)?;
                    at = next;
                    if field == 1 {
                        version = value;
                    }
                }
                2 => {
                    let (len, next) = varint_at(bytes, at).ok_or_else(bad)?;
                    let len = usize::try_from(len).map_err(|_| bad())?;
                    let end = within(next, len).ok_or_else(bad)?;
                    let kind = match field {
                        2 => {
                            stream =
                                Some(std::str::from_utf8(&bytes[next..end]).map_err(|_| bad())?);
                            None
                        }
                        5 => Some(Kind::Data),
                        6 => Some(Kind::Ack),
                        7 => Some(Kind::Resume),
                        8 => Some(Kind::Reset),
                        9 => Some(Kind::Heartbeat),
                        10 => Some(Kind::Handshake),
                        _ => None,
                    };
                    if let Some(kind) = kind {
                        body = Some((kind, next..end));
                    }
                    at = end;
                }
                1 => at = within(at, 8).ok_or_else(bad)?,
                5 => at = within(at, 4).ok_or_else(bad)?,
                _ => return Err(bad()),
            }
        }
        let version = u32::try_from(version).unwrap_or(u32::MAX);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let stream = stream.unwrap_or("");
        if stream.trim().is_empty() {
            return Err(FrameError::NoStream);
        }
        let (kind, body) = body.ok_or(FrameError::NoBody)?;
        Ok((stream, kind, body))
    }
}

/// The start of a `data` frame of `stream` with `seq` whose payload (the
/// record, `payload` bytes) is to be appended: the bytes prost writes for
/// the same frame up to the payload itself, in a buffer with room for it.
pub fn data_frame_head(stream: &str, seq: u32, payload: usize) -> Vec<u8> {
    use prost::encoding::{encode_varint, encoded_len_varint};
    // The data body: seq (when not 0), segment_count 1, the payload.
    let seq_len = if seq == 0 {
        0
    } else {
        1 + encoded_len_varint(u64::from(seq))
    };
    let body = seq_len + 2 + 1 + encoded_len_varint(payload as u64) + payload;
    let mut out = Vec::with_capacity(2 + 1 + 5 + stream.len() + 1 + 5 + body);
    out.extend_from_slice(&[0x08, VERSION as u8, 0x12]);
    encode_varint(stream.len() as u64, &mut out);
    out.extend_from_slice(stream.as_bytes());
    out.push(0x2a);
    encode_varint(body as u64, &mut out);
    if seq != 0 {
        out.push(0x08);
        encode_varint(u64::from(seq), &mut out);
    }
    out.extend_from_slice(&[0x18, 0x01, 0x22]);
    encode_varint(payload as u64, &mut out);
    out
}

/// The varint at `at` in `bytes`, and where the next field starts.
fn varint_at(bytes: &[u8], mut at: usize) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(at)?;
        at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((value, at));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_frame_round_trips_and_leaves_zeros_off_the_wire() {
        let frame = RelayMessageFrame::data("s-1", 0, vec![7, 8, 9]);
        let bytes = frame.encode();
        // version 1, stream id, then the data body: seq 0 and
        // segment_index 0 are not emitted, segment_count 1 and the payload
        // are.
        assert_eq!(
            bytes,
            [
                0x08, 1, 0x12, 3, b's', b'-', b'1', 0x2a, 7, 0x18, 1, 0x22, 3, 7, 8, 9
            ]
        );
        assert_eq!(RelayMessageFrame::decode_valid(&bytes), Ok(frame));
    }

    #[test]
    fn a_router_reads_the_stream_and_kind_as_a_full_decode_does() {
        let mut traced = RelayMessageFrame::data("stream-9", 77, vec![5; 70_000]);
        traced.traceparent = Some("00-abc-def-01".into());
        for (frame, kind) in [
            (RelayMessageFrame::data("s-1", 0, vec![1, 2]), Kind::Data),
            (traced, Kind::Data),
            (RelayMessageFrame::resume("r"), Kind::Resume),
            (RelayMessageFrame::reset("x"), Kind::Reset),
            (
                RelayMessageFrame::handshake("h", vec![9; 3000]),
                Kind::Handshake,
            ),
        ] {
            let bytes = frame.encode();
            assert_eq!(
                RelayMessageFrame::route(&bytes),
                Ok((frame.stream_id.as_str(), kind))
            );
        }
        let mut v2 = RelayMessageFrame::resume("s");
        v2.version = 2;
        assert_eq!(
            RelayMessageFrame::route(&v2.encode()),
            Err(FrameError::Version(2))
        );
        assert_eq!(
            RelayMessageFrame::route(&RelayMessageFrame::resume(" ").encode()),
            Err(FrameError::NoStream)
        );
        let mut none = RelayMessageFrame::resume("s");
        none.body = None;
        assert_eq!(
            RelayMessageFrame::route(&none.encode()),
            Err(FrameError::NoBody)
        );
        // Truncated anywhere: an error, never a panic.
        let bytes = RelayMessageFrame::data("abc", 3, vec![7; 300]).encode();
        for cut in 0..bytes.len() {
            let _ = RelayMessageFrame::route(&bytes[..cut]);
        }
        assert!(RelayMessageFrame::route(&[0xff; 12]).is_err());
        // A data frame's payload, found in place; seq 0 and large seqs.
        for (seq, len) in [(0u32, 1usize), (5, 61_456), (u32::MAX, 300)] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = RelayMessageFrame::data("s-7", seq, payload.clone()).encode();
            let (stream, got, range) = RelayMessageFrame::data_payload(&bytes).unwrap();
            assert_eq!((stream, got, &bytes[range]), ("s-7", seq, &payload[..]));
        }
        for cut in 0..bytes.len() {
            let _ = RelayMessageFrame::data_payload(&bytes[..cut]);
        }
        let mut two = RelayMessageFrame::data("s", 1, vec![1]);
        if let Some(Body::Data(d)) = &mut two.body {
            d.segment_count = 2;
        }
        assert!(RelayMessageFrame::data_payload(&two.encode()).is_none());
        assert!(
            RelayMessageFrame::data_payload(&RelayMessageFrame::resume("s").encode()).is_none()
        );
    }

    #[test]
    fn every_rule_of_validation_is_checked() {
        let mut frame = RelayMessageFrame::data("s", 1, vec![1]);
        frame.version = 2;
        assert_eq!(frame.validate(), Err(FrameError::Version(2)));
        let frame = RelayMessageFrame::data("  ", 1, vec![1]);
        assert_eq!(frame.validate(), Err(FrameError::NoStream));
        let mut frame = RelayMessageFrame::resume("s");
        frame.body = None;
        assert_eq!(frame.validate(), Err(FrameError::NoBody));
        let frame = RelayMessageFrame::data("s", 1, vec![]);
        assert_eq!(frame.validate(), Err(FrameError::Data));
        let mut frame = RelayMessageFrame::data("s", 1, vec![1]);
        if let Some(Body::Data(d)) = &mut frame.body {
            d.segment_count = 2;
        }
        assert_eq!(frame.validate(), Err(FrameError::Data));
        let mut frame = RelayMessageFrame::reset("s");
        frame.body = Some(Body::Reset(RelayReset { reason: "".into() }));
        assert_eq!(frame.validate(), Err(FrameError::Reset));
        let frame = RelayMessageFrame::handshake("s", vec![]);
        assert_eq!(frame.validate(), Err(FrameError::Handshake));
        for ok in [
            RelayMessageFrame::resume("s"),
            RelayMessageFrame::reset("s"),
            RelayMessageFrame::handshake("s", vec![1]),
        ] {
            assert_eq!(ok.validate(), Ok(()));
        }
        assert!(matches!(
            RelayMessageFrame::decode_valid(&[0xff, 0xff, 0xff]),
            Err(FrameError::Undecodable(_))
        ));
    }
}
