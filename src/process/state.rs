//! One process: its state, its seq counter and output log, and what reads
//! and writes do to it.
//!
//! Every event of a process (output chunk, exit, close) takes the next value
//! of one counter while the process's state is locked, and its notification
//! is queued under the same lock, so notifications leave in seq order.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::container::{Container, Containment};
use super::io::StdinCommand;
use super::limits::{Effective, OutputAction};
use super::output::OutputLog;
use super::spawn::PtyMaster;
use super::{Attachment, Effect, WriteOutcome};
use crate::error::Result;
use crate::jsonrpc::Outgoing;
use crate::limits::Reason;
use crate::protocol::{ReadParams, ReadResponse, Stream, WriteStatus};
use crate::sync::lock;

/// How many write ids each process remembers for de-duplication.
const WRITE_IDS_REMEMBERED: usize = 4096;

/// Bytes of stdin a process may have queued and not yet written to it.
/// A write that would go beyond is queued (in order) but answered only
/// once the child has taken enough, so a client that waits for answers
/// can't grow the server's memory with stdin the child does not read.
pub const STDIN_QUEUE_BYTES: u64 = 8 * 1024 * 1024;

/// The longest a single `process/read` waits (one day); larger `waitMs`
/// values are clamped, so no value can overflow a deadline.
const MAX_WAIT_MS: u64 = 24 * 60 * 60 * 1000;

/// One started process.
pub struct Process {
    pub id: String,
    /// `id`, shared by every event of the process.
    pub(super) shared_id: Arc<str>,
    pub pid: i32,
    pub argv: Vec<String>,
    pub tty: bool,
    pub(super) state: Mutex<State>,
    /// Woken on every state change, for long-polls and the reaper.
    pub(super) changed: Notify,
    pub(super) attachment: Attachment,
    /// Dropped when the process closes, so the feeder (and a pty's
    /// master it holds) goes too.
    pub(super) stdin: Mutex<Option<mpsc::UnboundedSender<StdinCommand>>>,
    /// Woken when the stdin feeder has written a chunk or stopped.
    pub(super) stdin_taken: Notify,
    /// Dropped when the process closes (nothing is left to resize).
    pub(super) pty: Mutex<Option<Arc<PtyMaster>>>,
    /// The process and everything it started.
    pub(super) container: Arc<Container>,
    /// For a sandboxed process: what `sandboxDenied` is judged from.
    pub(super) sandbox: Option<crate::sandbox::Watch>,
    /// Its proxy and bridges: stopped when it closes (not at exit, so that
    /// what it left running keeps them until then).
    pub(super) network: std::sync::Mutex<Option<crate::net::Guard>>,
    /// Output is pushed as notifications (`notifyOutput`, default true).
    pub(super) notify: bool,
    /// `holdOutput`: while the log is full, stop reading the child's
    /// output (it blocks on write) until a read takes some; nothing is
    /// evicted. Released for good by terminate and the end of the session.
    pub(super) hold: std::sync::atomic::AtomicBool,
    /// Its limits; the deadline and the output budget are kept here.
    pub(super) limits: Effective,
    /// Bytes of output read so far, against `limits.output_bytes`.
    pub(super) output_used: std::sync::atomic::AtomicU64,
    /// What kills its container (the deadline, the output budget).
    pub(super) containment: Arc<Containment>,
    /// When it started (the audit log's duration).
    pub(super) started: std::time::Instant,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) log: OutputLog,
    pub(super) next_seq: u64,
    pub(super) exit: Option<Exit>,
    pub(super) closed_seq: Option<u64>,
    pub(super) open_streams: u8,
    /// The group leader has been reaped: its id may be reused, so the group
    /// is no longer signalled.
    pub(super) reaped: bool,
    pub(super) stdin_closed: bool,
    pub(super) write_ids: WriteIds,
    /// Bytes of stdin accepted so far, and written to the child so far.
    pub(super) stdin_accepted: u64,
    pub(super) stdin_written: u64,
    /// The stdin feeder has stopped: nothing queued will be written.
    pub(super) stdin_gone: bool,
    /// Who ended it, when the server did (terminate, the deadline, the
    /// output budget): the first one counts.
    pub(super) cause: Option<Reason>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Exit {
    pub(super) seq: u64,
    pub(super) code: i32,
    pub(super) sandbox_denied: bool,
    pub(super) reason: Reason,
}

#[derive(Debug, Default)]
pub(super) struct WriteIds {
    pub(super) order: VecDeque<String>,
    pub(super) set: HashSet<String>,
}

impl WriteIds {
    /// Remember `id`; false if it was already remembered.
    pub(super) fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == WRITE_IDS_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id.to_string());
        self.set.insert(id.to_string());
        true
    }
}

impl Process {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Reserve room for one notification on the attached connection, if
    /// any. Room is reserved before the state lock is taken and the line is
    /// queued while it is held, which keeps notifications in seq order.
    pub(super) async fn reserve(&self) -> Option<crate::transport::Permit> {
        let tx = lock(&self.attachment)
            .connection
            .as_ref()
            .map(|(_, tx)| tx.clone())?;
        tx.reserve().await
    }

    /// The server is ending the process for `reason`, unless it has exited
    /// or another cause came first.
    pub(super) fn end_for(&self, reason: Reason) {
        let mut state = self.lock();
        if state.exit.is_none() && state.cause.is_none() {
            state.cause = Some(reason);
        }
    }

    /// Kill the process's whole tree for `reason` (the deadline, the
    /// output budget).
    pub(super) fn kill_for(&self, reason: Reason) {
        self.end_for(reason);
        self.release_hold();
        self.containment.kill(&self.container);
    }

    /// Take `len` bytes of output from the budget: how many of them may
    /// be kept, and whether the budget is used up now.
    pub(super) fn charge_output(&self, len: usize) -> (usize, bool) {
        use std::sync::atomic::Ordering;
        let before = self.output_used.fetch_add(len as u64, Ordering::SeqCst);
        let Some(budget) = self.limits.output_bytes else {
            return (len, false);
        };
        let room = budget.saturating_sub(before);
        let kept = (len as u64).min(room) as usize;
        (kept, before + len as u64 >= budget)
    }

    /// The output budget is used up: kill the tree, or stop reading
    /// (return once the process has exited, so the stream can end).
    pub(super) async fn output_exhausted(&self) {
        match self.limits.output_action {
            OutputAction::Kill => self.kill_for(Reason::OutputLimit),
            OutputAction::Block => self.wait_until(|s| s.exit.is_some()).await,
        }
    }

    /// Wait until `ready` holds of the state (checked on every change).
    pub(super) async fn wait_until(&self, ready: impl Fn(&State) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if ready(&self.lock()) {
                return;
            }
            changed.await;
        }
    }

    /// Stop holding the child's output: evict as usual from now on.
    pub(super) fn release_hold(&self) {
        self.hold.store(false, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// For a held process: wait until the log has room (or the hold is
    /// released).
    async fn room_in_log(&self) {
        use std::sync::atomic::Ordering;
        while self.hold.load(Ordering::SeqCst) {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.hold.load(Ordering::SeqCst) || !self.lock().log.is_full() {
                return;
            }
            changed.await;
        }
    }

    pub(super) async fn push_output(&self, stream: Stream, data: Vec<u8>) {
        self.room_in_log().await;
        let permit = if self.notify {
            self.reserve().await
        } else {
            None
        };
        let chunk = bytes::Bytes::from(data);
        {
            let mut state = self.lock();
            let seq = state.next_seq;
            state.next_seq += 1;
            if let Some(permit) = permit {
                permit.send(Outgoing::Output {
                    process_id: self.shared_id.clone(),
                    seq,
                    stream,
                    chunk: chunk.clone(),
                });
            }
            let evict = !self.hold.load(std::sync::atomic::Ordering::SeqCst);
            state.log.push(seq, stream, chunk, evict);
        }
        self.changed.notify_waiters();
    }

    pub(super) async fn stream_ended(&self) {
        self.lock().open_streams -= 1;
        self.changed.notify_waiters();
        self.maybe_close().await;
    }

    pub(super) async fn record_exit(&self, code: i32, signal: Option<&'static str>) {
        tracing::debug!(id = %self.id, pid = self.pid, code, signal, "exited");
        // The memory controller killed something of its tree: that ends
        // the tree (cgroup v2's `memory.oom.group`, or the OOM watch),
        // whatever the leader made of it if it got there first.
        let oom =
            self.limits.memory_bytes.is_some() && self.containment.oom_kills(&self.container) > 0;
        let permit = self.reserve().await;
        let (reason, sandbox_denied) = {
            let mut state = self.lock();
            let reason = match state.cause {
                Some(cause) => cause,
                None if oom => Reason::OomKilled,
                None if signal.is_some() => Reason::Signal,
                None => Reason::Exited,
            };
            let seq = state.next_seq;
            state.next_seq += 1;
            let sandbox_denied =
                crate::sandbox::probably_denied(self.sandbox.as_ref(), code, || {
                    state.log.retained_text_lowercase()
                });
            state.exit = Some(Exit {
                seq,
                code,
                sandbox_denied,
                reason,
            });
            state.reaped = true;
            if let Some(permit) = permit {
                permit.send(Outgoing::Exited {
                    process_id: self.shared_id.clone(),
                    seq,
                    exit_code: code,
                    sandbox_denied,
                    signal,
                    reason,
                });
            }
            (reason, sandbox_denied)
        };
        self.changed.notify_waiters();
        crate::audit::record("process.exit", || {
            let out = self.output_used.load(std::sync::atomic::Ordering::SeqCst);
            serde_json::json!({
                "processId": self.id,
                "pid": self.pid,
                "exitCode": code,
                "signal": signal,
                "reason": reason.as_str(),
                "sandboxDenied": sandbox_denied,
                "durationMs": self.started.elapsed().as_millis() as u64,
                "bytesOut": out.min(self.limits.output_bytes.unwrap_or(u64::MAX)),
            })
        });
        self.maybe_close().await;
    }

    /// Record `closed` once the exit is known and every stream has ended.
    pub(super) async fn maybe_close(&self) {
        let ready = |s: &State| s.exit.is_some() && s.open_streams == 0 && s.closed_seq.is_none();
        if !ready(&self.lock()) {
            return;
        }
        let permit = self.reserve().await;
        {
            let mut state = self.lock();
            if !ready(&state) {
                return;
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.closed_seq = Some(seq);
            state.stdin_closed = true;
            // Nothing more goes to stdin: the feeder ends with the channel;
            // and the terminal's master goes (nothing reads it any more).
            crate::sync::lock(&self.stdin).take();
            crate::sync::lock(&self.pty).take();
            if let Some(permit) = permit {
                permit.send(Outgoing::Closed {
                    process_id: self.shared_id.clone(),
                    seq,
                });
            }
        }
        crate::sync::lock(&self.network).take();
        self.changed.notify_waiters();
    }

    /// The read's answer from the current state, and whether it may be
    /// returned without waiting: there are chunks, the process is closed,
    /// or its exit is after `afterSeq`. One lock, so both agree.
    pub(super) fn snapshot(&self, params: &ReadParams) -> (ReadResponse, bool) {
        let mut state = self.lock();
        let after = params.after_seq.unwrap_or(0);
        if self.hold.load(std::sync::atomic::Ordering::SeqCst) {
            // The reader has everything through `after`: room for more.
            state.log.forget_through(after);
            self.changed.notify_waiters();
        }
        let slice = if params.acknowledge {
            crate::process::output::Slice::default()
        } else {
            state.log.read(after, params.max_bytes)
        };
        let next_seq = match (params.max_bytes, slice.last_seq) {
            (Some(_), Some(last)) => last + 1,
            _ => state.next_seq,
        };
        let ready = params.acknowledge
            || !slice.chunks.is_empty()
            || state.closed_seq.is_some()
            || state.exit.is_some_and(|e| after < e.seq);
        let response = ReadResponse {
            chunks: slice.chunks,
            next_seq,
            exited: state.exit.is_some(),
            exit_code: state.exit.map(|e| e.code),
            closed: state.closed_seq.is_some(),
            failure: None,
            sandbox_denied: state.exit.is_some_and(|e| e.sandbox_denied),
            truncated: slice.truncated,
            dropped_bytes: slice.truncated.then_some(slice.dropped_bytes),
            reason: state.exit.map(|e| e.reason),
        };
        (response, ready)
    }

    /// Wait up to `waitMs` for something to say, then answer.
    pub async fn read(&self, params: &ReadParams) -> Result<ReadResponse> {
        let wait = Duration::from_millis(params.wait_ms.unwrap_or(0).min(MAX_WAIT_MS));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (response, ready) = self.snapshot(params);
            if ready || tokio::time::Instant::now() >= deadline {
                return Ok(response);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(self.snapshot(params).0);
            }
        }
    }

    pub(super) fn write(self: &Arc<Self>, data: Vec<u8>, write_id: Option<&str>) -> WriteOutcome {
        let mut state = self.lock();
        if let Some(id) = write_id {
            if !state.write_ids.insert(id) {
                return WriteOutcome::Now(WriteStatus::Accepted, None);
            }
        }
        let tx = match crate::sync::lock(&self.stdin).as_ref() {
            Some(tx) if !state.stdin_closed => tx.clone(),
            _ => return WriteOutcome::Now(WriteStatus::StdinClosed, None),
        };
        state.stdin_accepted += data.len() as u64;
        let end = state.stdin_accepted;
        if end - state.stdin_written <= STDIN_QUEUE_BYTES || state.stdin_gone {
            let effect: Effect = Box::new(move || {
                // If the feeder is gone, stdin closed meanwhile and the
                // bytes have nowhere to go.
                let _ = tx.send(StdinCommand::Data(data));
            });
            return WriteOutcome::Now(WriteStatus::Accepted, Some(effect));
        }
        // Queued now, so that later writes stay behind it; answered once
        // what is queued ahead of its end fits the limit again.
        let _ = tx.send(StdinCommand::Data(data));
        drop(state);
        let process = self.clone();
        WriteOutcome::WhenRoom(Box::pin(async move {
            loop {
                let taken = process.stdin_taken.notified();
                tokio::pin!(taken);
                taken.as_mut().enable();
                {
                    let state = process.lock();
                    if state.stdin_gone || end - state.stdin_written <= STDIN_QUEUE_BYTES {
                        return WriteStatus::Accepted;
                    }
                }
                taken.await;
            }
        }))
    }

    /// The feeder wrote `n` bytes to the child.
    pub(super) fn stdin_took(&self, n: usize) {
        self.lock().stdin_written += n as u64;
        self.stdin_taken.notify_waiters();
    }

    pub(super) fn close_stdin(&self) -> (WriteStatus, Option<Effect>) {
        let mut state = self.lock();
        let Some(tx) = crate::sync::lock(&self.stdin).clone() else {
            return (WriteStatus::StdinClosed, None);
        };
        if state.stdin_closed {
            return (WriteStatus::Accepted, None);
        }
        state.stdin_closed = true;
        let effect: Effect = Box::new(move || {
            let _ = tx.send(StdinCommand::Close);
        });
        (WriteStatus::Accepted, Some(effect))
    }

    /// Signal the whole group, unless the leader was reaped (its id may
    /// then belong to someone else).
    pub(super) fn signal_group(&self, signal: i32) {
        let state = self.lock();
        if state.reaped || self.pid <= 1 {
            return;
        }
        // SAFETY: plain syscall; the group exists while its leader is unreaped.
        unsafe { libc::kill(-self.pid, signal) };
    }
}
