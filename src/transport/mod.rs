//! Transports turn a byte stream into frames (one incoming line each) and
//! encode outgoing messages into bytes. They know nothing of JSON-RPC
//! methods.

use tokio::sync::mpsc;

pub use crate::jsonrpc::Outgoing;

#[cfg(test)]
pub mod memory;
pub mod stdio;
pub mod unix;
pub mod ws;

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

/// The sending half of a connection. Senders give it typed messages; the
/// transport's codec turns each into bytes as it is queued, in the
/// sender's task, so that encoding (base64 of output, mostly) runs on as
/// many threads as there are producers rather than on the writer's alone
/// (measured: one encoding writer halved notification throughput).
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Vec<u8>>,
    encode: fn(&Outgoing) -> Vec<u8>,
}

/// Room for one message on a connection, reserved ahead.
pub struct Permit {
    permit: mpsc::OwnedPermit<Vec<u8>>,
    encode: fn(&Outgoing) -> Vec<u8>,
}

impl Outbound {
    /// A sender into `tx` whose messages `encode` turns into bytes.
    pub fn new(tx: mpsc::Sender<Vec<u8>>, encode: fn(&Outgoing) -> Vec<u8>) -> Outbound {
        Outbound { tx, encode }
    }

    /// Queue `message`, waiting for room; false once the writer is gone.
    pub async fn send(&self, message: Outgoing) -> bool {
        self.tx.send((self.encode)(&message)).await.is_ok()
    }

    /// Wait for room for one message; `None` once the writer is gone.
    pub async fn reserve(&self) -> Option<Permit> {
        let permit = self.tx.clone().reserve_owned().await.ok()?;
        Some(Permit {
            permit,
            encode: self.encode,
        })
    }
}

impl Permit {
    /// Queue `message` in the reserved room.
    pub fn send(self, message: Outgoing) {
        self.permit.send((self.encode)(&message));
    }
}

/// A connected peer: frames in, messages out.
pub struct Transport {
    pub incoming: mpsc::Receiver<Frame>,
    pub outgoing: Outbound,
}
