//! Binary frames (`docs/PROTOCOL.md` section 11): process output as raw
//! bytes instead of base64 JSON, for a client that asked for them in
//! `initialize` (`capabilities.binaryFrames`).
//!
//! On stdio and Unix sockets a frame sits between lines and can't be taken
//! for one: it starts with a NUL byte, which no JSON text starts with, and
//! says its own length (no newline follows it). Over WebSocket it is one
//! binary message with the same bytes.
//!
//! ```text
//! offset size
//!  0     1    0x00, the frame mark
//!  1     1    kind: 1 = process output, 2 = a response with bytes
//!  2     1    stream: 0 stdout, 1 stderr, 2 pty
//!  3     2    length of the process id (little-endian)
//!  5     8    seq (little-endian)
//! 13     4    length of the data (little-endian)
//! 17     P    the process id (UTF-8)
//! 17+P   N    the data
//! ```
//!
//! A response with bytes (`fs/readBlock`) uses the same layout: stream and
//! seq are 0, the "process id" is the response's JSON text (whose
//! `result.chunk` is `null`), and the data is the chunk.

use crate::protocol::Stream;

/// The first byte of every frame.
pub const MARK: u8 = 0;
/// The fixed part of a frame.
pub const HEADER: usize = 17;
/// The frame format this build speaks.
pub const VERSION: u64 = 1;
const KIND_OUTPUT: u8 = 1;
const KIND_RESULT: u8 = 2;

/// The header and JSON text of a response frame: `json` is the response
/// (without a newline) whose `result.chunk` is the frame's `len` bytes.
pub fn result_header(json: &[u8], len: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + json.len());
    frame.extend_from_slice(&[MARK, KIND_RESULT, 0]);
    frame.extend_from_slice(&(json.len() as u16).to_le_bytes());
    frame.extend_from_slice(&0u64.to_le_bytes());
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.extend_from_slice(json);
    frame
}

/// A decoded frame of either kind.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    Output(Output<'a>),
    /// A response's JSON text and its `result.chunk` bytes.
    Result {
        json: &'a [u8],
        data: &'a [u8],
    },
}

/// Take any frame apart; `None` when malformed or of an unknown kind.
pub fn decode_any(frame: &[u8]) -> Option<Decoded<'_>> {
    if frame.len() >= HEADER && frame[0] == MARK && frame[1] == KIND_RESULT {
        if total_len(frame) != frame.len() {
            return None;
        }
        let json_len = u16::from_le_bytes([frame[3], frame[4]]) as usize;
        return Some(Decoded::Result {
            json: &frame[HEADER..HEADER + json_len],
            data: &frame[HEADER + json_len..],
        });
    }
    decode(frame).map(Decoded::Output)
}

/// A frame of `process/output`: the same facts as the notification.
#[cfg(test)]
pub fn encode_output(process_id: &str, seq: u64, stream: Stream, data: &[u8]) -> Vec<u8> {
    let mut frame = output_header(process_id, seq, stream, data.len());
    frame.extend_from_slice(data);
    frame
}

/// Everything of an output frame but its data (which the writer sends
/// from where it is, without copying it in).
pub fn output_header(process_id: &str, seq: u64, stream: Stream, len: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + process_id.len());
    frame.extend_from_slice(&[MARK, KIND_OUTPUT, stream_code(stream)]);
    frame.extend_from_slice(&(process_id.len() as u16).to_le_bytes());
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.extend_from_slice(process_id.as_bytes());
    frame
}

fn stream_code(stream: Stream) -> u8 {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
        Stream::Pty => 2,
    }
}

/// The whole length of the frame that `head` starts (at least
/// [`HEADER`] bytes of it).
pub fn total_len(head: &[u8]) -> usize {
    let pid = u16::from_le_bytes([head[3], head[4]]) as usize;
    let data = u32::from_le_bytes([head[13], head[14], head[15], head[16]]) as usize;
    HEADER + pid + data
}

/// A decoded output frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Output<'a> {
    pub process_id: &'a str,
    pub seq: u64,
    pub stream: Stream,
    pub data: &'a [u8],
}

/// Take a whole frame apart; `None` for anything malformed or of a kind
/// this build does not know.
pub fn decode(frame: &[u8]) -> Option<Output<'_>> {
    if frame.len() < HEADER || frame[0] != MARK || frame[1] != KIND_OUTPUT {
        return None;
    }
    if total_len(frame) != frame.len() {
        return None;
    }
    let stream = match frame[2] {
        0 => Stream::Stdout,
        1 => Stream::Stderr,
        2 => Stream::Pty,
        _ => return None,
    };
    let pid_len = u16::from_le_bytes([frame[3], frame[4]]) as usize;
    let seq = u64::from_le_bytes(frame[5..13].try_into().ok()?);
    let process_id = std::str::from_utf8(&frame[HEADER..HEADER + pid_len]).ok()?;
    Some(Output {
        process_id,
        seq,
        stream,
        data: &frame[HEADER + pid_len..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_and_says_its_length() {
        let frame = encode_output("p-1", 42, Stream::Stderr, b"\n\x00raw\xff");
        assert_eq!(frame[0], MARK);
        assert_eq!(total_len(&frame), frame.len());
        assert_eq!(
            decode(&frame),
            Some(Output {
                process_id: "p-1",
                seq: 42,
                stream: Stream::Stderr,
                data: b"\n\x00raw\xff",
            })
        );
        assert_eq!(decode(&frame[..frame.len() - 1]), None);
        let mut bad = frame.clone();
        bad[1] = 9;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode_any(&bad), None);
    }

    #[test]
    fn a_response_frame_carries_its_json_and_bytes() {
        let json = br#"{"jsonrpc":"2.0","id":7,"result":{"chunk":null,"eof":true}}"#;
        let mut frame = result_header(json, 3);
        frame.extend_from_slice(b"a\nb");
        assert_eq!(total_len(&frame), frame.len());
        assert_eq!(
            decode_any(&frame),
            Some(Decoded::Result {
                json,
                data: b"a\nb"
            })
        );
        assert_eq!(decode(&frame), None, "not output");
    }
}
