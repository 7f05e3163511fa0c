//! Transports turn a byte stream into frames (one incoming line each) and
//! write outgoing lines. They know nothing of JSON-RPC methods.

use tokio::sync::mpsc;

pub mod stdio;

/// One incoming unit of a newline-delimited stream.
#[derive(Debug)]
pub enum Frame {
    /// One line, without its `\n` or `\r\n`; never blank.
    Line(Vec<u8>),
    /// A line longer than the limit; its bytes were discarded.
    TooLong { size: usize },
}

/// How many outgoing lines may wait for the writer before senders wait.
/// Bounding the queue gives backpressure from a slow client down to the
/// output pumps, and from them to the children's pipes.
pub const OUTBOUND_CAPACITY: usize = 32;

/// The sending half of a connection: complete lines, newline included.
pub type Outbound = mpsc::Sender<Vec<u8>>;

/// A connected peer: frames in, lines out.
pub struct Transport {
    pub incoming: mpsc::Receiver<Frame>,
    pub outgoing: Outbound,
}
