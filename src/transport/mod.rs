//! Transports turn a byte stream into frames (one incoming line each) and
//! encode outgoing messages into bytes. They know nothing of JSON-RPC
//! methods.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::jsonrpc::{Payload, Response};
use crate::sync::lock;

pub use crate::jsonrpc::Outgoing;

#[cfg(test)]
pub mod memory;
pub mod peer;
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
    tx: mpsc::Sender<Encoded>,
    /// Bytes of messages queued and not yet written.
    budget: Arc<Budget>,
    encode: fn(&Outgoing) -> Vec<u8>,
    /// Calls made to this peer and not yet answered.
    calls: Arc<Calls>,
    /// The peer asked for binary frames: output goes as frames.
    frames: Arc<AtomicBool>,
}

/// Bytes of answers one connection may hold waiting for its peer before
/// methods that produce large answers (buffered `http/request`,
/// `process/read`, `fs/readFile`, `fs/readBlock`) are refused with a
/// retryable `overloaded` error instead of producing more.
pub const ANSWER_BUDGET: usize = 32 << 20;

/// What one connection holds of encoded messages not yet written: every
/// message counts from the moment it is encoded until its writer has
/// written it (or it is dropped).
#[derive(Debug, Default)]
pub struct Budget {
    queued: std::sync::atomic::AtomicUsize,
}

impl Budget {
    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether a method may produce another large answer now.
    pub fn check(&self) -> crate::error::Result<()> {
        let waiting = self.queued();
        if waiting >= ANSWER_BUDGET {
            return Err(crate::error::Error::Overloaded {
                waiting,
                limit: ANSWER_BUDGET,
            });
        }
        Ok(())
    }

    fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            budget: self.clone(),
            bytes,
        }
    }
}

/// A message's share of its connection's [`Budget`], given back when the
/// message is written or dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.queued.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// At most this many calls to one peer wait for answers; more fail at once.
pub const MAX_CALLS_IN_FLIGHT: usize = 256;

/// The server's calls to one peer: ids from 1, the answers awaited.
#[derive(Default)]
struct Calls {
    state: Mutex<CallState>,
}

#[derive(Default)]
struct CallState {
    next: u64,
    pending: HashMap<u64, oneshot::Sender<Result<Value, Value>>>,
    /// The connection ended: no call waits, none starts.
    closed: bool,
}

/// Why a call to the peer got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallFailed {
    #[error("the connection ended")]
    Closed,
    #[error("too many calls are waiting for answers")]
    Busy,
    #[error("no answer within the time allowed")]
    TimedOut,
    #[error("the client answered with an error: {0}")]
    Refused(Value),
}

/// Room for one message on a connection, reserved ahead.
pub struct Permit {
    permit: mpsc::OwnedPermit<Encoded>,
    encode: fn(&Outgoing) -> Vec<u8>,
    frames: bool,
    budget: Arc<Budget>,
}

/// `message` as bytes: output as a binary frame (its header, and the
/// chunk itself, not copied) when the peer asked for frames; a result
/// already rendered as JSON text (a `process/read` answer) behind its
/// envelope without being copied again; everything else by the
/// transport's codec.
fn encode(message: Outgoing, codec: fn(&Outgoing) -> Vec<u8>, frames: bool) -> Encoded {
    match message {
        Outgoing::Output {
            process_id,
            seq,
            stream,
            chunk,
        } if frames => Encoded {
            head: crate::frame::output_header(&process_id, seq, stream, chunk.len()),
            body: Some(chunk),
            charge: None,
        },
        Outgoing::Response(crate::jsonrpc::Response {
            id,
            outcome: Ok(result),
            payload: Some(payload),
        }) => match *payload {
            Payload::Bytes(bytes) if frames => {
                // The response with `chunk: null`, the bytes as the frame's
                // data (as JSON if the response is too long for a frame: a
                // client's id can be long).
                let json = Response::new(id.clone(), Ok(result.clone())).to_line();
                if json.len() > usize::from(u16::MAX) {
                    let response = Response::with_bytes(id, result, bytes.to_vec());
                    return codec(&Outgoing::Response(response)).into();
                }
                Encoded {
                    head: crate::frame::result_header(&json[..json.len() - 1], bytes.len()),
                    body: Some(bytes),
                    charge: None,
                }
            }
            Payload::Rendered(mut text) => {
                let mut head = b"{\"jsonrpc\":\"2.0\",\"id\":".to_vec();
                let _ = serde_json::to_writer(&mut head, &id);
                head.extend_from_slice(b",\"result\":");
                text.extend_from_slice(b"}\n");
                Encoded {
                    head,
                    body: Some(text.into()),
                    charge: None,
                }
            }
            payload => codec(&Outgoing::Response(Response {
                id,
                outcome: Ok(result),
                payload: Some(Box::new(payload)),
            }))
            .into(),
        },
        other => codec(&other).into(),
    }
}

impl Outbound {
    /// A sender into `tx` whose messages `encode` turns into bytes.
    pub fn new(tx: mpsc::Sender<Encoded>, encode: fn(&Outgoing) -> Vec<u8>) -> Outbound {
        Outbound {
            tx,
            budget: Arc::default(),
            encode,
            calls: Arc::default(),
            frames: Arc::default(),
        }
    }

    /// What this connection holds of messages not yet written.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// From now on, send output as binary frames (or stop).
    pub fn use_frames(&self, on: bool) {
        self.frames.store(on, Ordering::SeqCst);
    }

    fn encode(&self, message: Outgoing) -> Encoded {
        encode(message, self.encode, self.frames.load(Ordering::Relaxed)).charged(&self.budget)
    }

    /// Queue `message` only if at least `keep_free` other messages would
    /// still fit: for best-effort messages (audit records) that must never
    /// hold up output. False when it was dropped.
    pub fn send_if_room(&self, message: Outgoing, keep_free: usize) -> bool {
        if self.tx.capacity() <= keep_free {
            return false;
        }
        self.tx.try_send(self.encode(message)).is_ok()
    }

    /// Call `method` on the peer and wait for its answer, at most
    /// `timeout`.
    pub async fn call(
        &self,
        method: &'static str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, CallFailed> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = lock(&self.calls.state);
            if state.closed {
                return Err(CallFailed::Closed);
            }
            if state.pending.len() >= MAX_CALLS_IN_FLIGHT {
                return Err(CallFailed::Busy);
            }
            state.next += 1;
            let id = state.next;
            state.pending.insert(id, tx);
            id
        };
        // Forget the call however this ends (a timeout, or the caller
        // dropping the future).
        struct Forget<'a>(&'a Calls, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                lock(&self.0.state).pending.remove(&self.1);
            }
        }
        let _forget = Forget(&self.calls, id);
        let asked = async {
            if !self.send(Outgoing::Request { id, method, params }).await {
                return Err(CallFailed::Closed);
            }
            match rx.await {
                Ok(Ok(result)) => Ok(result),
                Ok(Err(error)) => Err(CallFailed::Refused(error)),
                Err(_) => Err(CallFailed::Closed),
            }
        };
        tokio::time::timeout(timeout, asked)
            .await
            .unwrap_or(Err(CallFailed::TimedOut))
    }

    /// The peer answered call `id`; false when no call of that id waits
    /// (unknown, or already given up).
    pub fn answer(&self, id: u64, outcome: Result<Value, Value>) -> bool {
        match lock(&self.calls.state).pending.remove(&id) {
            Some(waiting) => {
                let _ = waiting.send(outcome);
                true
            }
            None => false,
        }
    }

    /// The connection ended: every waiting call fails now, later ones at
    /// once.
    pub fn close_calls(&self) {
        let mut state = lock(&self.calls.state);
        state.closed = true;
        state.pending.clear();
    }

    /// Queue `message`, waiting for room; false once the writer is gone.
    pub async fn send(&self, message: Outgoing) -> bool {
        self.tx.send(self.encode(message)).await.is_ok()
    }

    /// Wait for room for one message; `None` once the writer is gone.
    pub async fn reserve(&self) -> Option<Permit> {
        let permit = self.tx.clone().reserve_owned().await.ok()?;
        Some(Permit {
            permit,
            encode: self.encode,
            frames: self.frames.load(Ordering::Relaxed),
            budget: self.budget.clone(),
        })
    }
}

impl Permit {
    /// Queue `message` in the reserved room.
    pub fn send(self, message: Outgoing) {
        self.permit
            .send(encode(message, self.encode, self.frames).charged(&self.budget));
    }
}

/// One message for a writer: its bytes, and for a binary frame the output
/// it carries, shared with the retained log rather than copied in.
#[derive(Debug)]
pub struct Encoded {
    pub head: Vec<u8>,
    pub body: Option<bytes::Bytes>,
    /// Its share of the connection's budget, until it is written.
    pub charge: Option<Charge>,
}

impl Encoded {
    fn charged(mut self, budget: &Arc<Budget>) -> Encoded {
        self.charge = Some(budget.charge(self.len()));
        self
    }

    /// The message as one buffer (for a transport that needs one).
    pub fn into_vec(self) -> Vec<u8> {
        match self.body {
            None => self.head,
            Some(body) => {
                let mut all = self.head;
                all.extend_from_slice(&body);
                all
            }
        }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.as_ref().map_or(0, |b| b.len())
    }
}

impl From<Vec<u8>> for Encoded {
    fn from(head: Vec<u8>) -> Self {
        Encoded {
            head,
            body: None,
            charge: None,
        }
    }
}

/// A connected peer: frames in, messages out.
pub struct Transport {
    pub incoming: mpsc::Receiver<Frame>,
    pub outgoing: Outbound,
}
