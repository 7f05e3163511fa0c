//! An in-memory connection, for tests of the server's logic without a
//! binary, a pipe or a socket: the test holds the peer's end.

use tokio::sync::mpsc;

use super::{Frame, OUTBOUND_CAPACITY, Outbound, Transport};
use crate::jsonrpc::encode_line;

/// The peer's end: lines to send, lines received (newline included).
pub struct Peer {
    pub send: mpsc::Sender<Frame>,
    pub receive: mpsc::Receiver<super::Encoded>,
}

/// A connected pair: the server's transport and the peer's end.
pub fn pair() -> (Transport, Peer) {
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    (
        Transport {
            incoming: in_rx,
            outgoing: Outbound::new(out_tx, encode_line),
        },
        Peer {
            send: in_tx,
            receive: out_rx,
        },
    )
}

impl Peer {
    /// Send one message as a line.
    pub async fn send_json(&self, value: serde_json::Value) {
        let line = serde_json::to_vec(&value).unwrap_or_default();
        let _ = self.send.send(Frame::Line(line)).await;
    }

    /// The next message, parsed.
    pub async fn next_json(&mut self) -> Option<serde_json::Value> {
        let line = self.receive.recv().await?.into_vec();
        serde_json::from_slice(&line).ok()
    }
}
