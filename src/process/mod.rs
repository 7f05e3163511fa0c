//! Processes of one session: starting them, pumping their output into a
//! sequence-numbered log, writing their stdin, signalling their groups and
//! reaping them.
//!
//! - `table`: the processes of a session, and what each request does to them.
//! - `state`: one process: its state, seq counter and output log, reads
//!   and writes.
//! - `io`: the pumps that read output and the feeder that writes stdin.
//! - `reap`: waiting for a process, its exit, close and expiry.
//! - `spawn`, `exec`, `init`: starting a child; `container`, `watchdog`:
//!   what keeps every process and descendant within reach.
//!
//! Every event of a process (output chunk, exit, close) takes the next value
//! of one counter while the process's state is locked, and its notification
//! is queued under the same lock, so notifications leave in seq order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::WriteStatus;
use crate::transport::Outbound;

pub mod container;
pub mod exec;
pub mod init;
pub mod limits;
pub mod output;
pub mod spawn;
pub mod watchdog;

mod io;
mod reap;
mod state;
mod table;

use output::Retention;

pub use table::{ProcessTable, ReadNow, StartRequest};

/// Where a session's notifications go: the attached connection, if any,
/// and how many times a connection has attached (one lock for both, so an
/// expiry timer can tell, in one look, that a resume happened since).
pub type Attachment = Arc<Mutex<Attached>>;

/// The attachment state of a session.
#[derive(Default)]
pub struct Attached {
    /// The connection's id and its sending half.
    pub connection: Option<(u64, Outbound)>,
    /// Bumped on every attach.
    pub generation: u64,
    /// The session expired: nobody may attach again.
    pub expired: bool,
}

/// Work a request does once its response is queued, so that no effect of
/// a request (output, exit) can be seen before its response.
pub type Effect = Box<dyn FnOnce() + Send>;

/// The answer to `process/write`.
pub enum WriteOutcome {
    /// Answer now; run the effect (queue the bytes) after the answer.
    Now(WriteStatus, Option<Effect>),
    /// The bytes are queued; answer once the child has taken enough of
    /// what was queued before them.
    WhenRoom(std::pin::Pin<Box<dyn std::future::Future<Output = WriteStatus> + Send>>),
}

/// Settings that apply to every process.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub retention: Retention,
    pub closed_retention: Duration,
}
