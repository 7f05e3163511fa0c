//! Processes of one session: starting them, pumping their output into a
//! sequence-numbered log, writing their stdin, signalling their groups and
//! reaping them.
//!
//! Every event of a process (output chunk, exit, close) takes the next value
//! of one counter while the process's state is locked, and its notification
//! is queued under the same lock, so notifications leave in seq order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, watch};

use crate::error::{Error, Result};
use crate::jsonrpc::Outgoing;
use crate::lock;
use crate::protocol::{
    ProcessSummary, ReadParams, ReadResponse, Signal, Stream, TtySize, WriteStatus,
};
use crate::transport::Outbound;

pub mod container;
pub mod exec;
pub mod init;
pub mod output;
pub mod spawn;
pub mod watchdog;

use container::{Container, Containment};
use output::{OutputLog, Retention};
use spawn::{Io, PtyMaster};

/// How many write ids each process remembers for de-duplication.
const WRITE_IDS_REMEMBERED: usize = 4096;
/// Bytes read from a child's pipe at a time, at most. Measured end to end
/// (1 GiB through `exec-server run`): 64 KiB 1.72 s, 256 KiB 1.34 s,
/// 1 MiB 1.42 s.
const READ_CHUNK: usize = 256 * 1024;
/// After the exit status is known, how long to let the output pumps drain
/// what the child wrote before exiting, so that it gets the lower seqs.
const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(50);

/// Bytes of stdin a process may have queued and not yet written to it.
/// A write that would go beyond is queued (in order) but answered only
/// once the child has taken enough, so a client that waits for answers
/// can't grow the server's memory with stdin the child does not read.
pub const STDIN_QUEUE_BYTES: u64 = 8 * 1024 * 1024;

/// The longest a single `process/read` waits (one day); larger `waitMs`
/// values are clamped, so no value can overflow a deadline.
const MAX_WAIT_MS: u64 = 24 * 60 * 60 * 1000;

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

/// The processes of one session.
pub struct ProcessTable {
    processes: Mutex<HashMap<String, Arc<Process>>>,
    limits: Limits,
    attachment: Attachment,
    containment: Arc<Containment>,
    /// Containers of forgotten processes that still hold something (a
    /// daemon the process left running); killed with the session.
    lingering: Mutex<Vec<Arc<Container>>>,
    /// How many children have not been reaped yet.
    live: watch::Sender<usize>,
}

/// What `process/start` needs: the client's id and the spawn spec.
pub struct StartRequest<'a> {
    pub id: String,
    pub spec: spawn::Spec<'a>,
}

/// The first answer to a `process/read`.
pub enum ReadNow {
    Ready(ReadResponse),
    /// Nothing to say yet; wait on this process.
    Wait(Arc<Process>),
}

/// A started process whose output is not being pumped yet. Dropping it
/// starts the pumps, the stdin feeder and the reaper; callers drop it once
/// the `process/start` response is queued, so that no notification of the
/// process can overtake that response.
pub struct Launch {
    table: Arc<ProcessTable>,
    process: Arc<Process>,
    parts: Option<(
        Io,
        exec::Child,
        Option<mpsc::UnboundedReceiver<StdinCommand>>,
    )>,
}

impl Drop for Launch {
    fn drop(&mut self) {
        let Some((io, child, stdin_rx)) = self.parts.take() else {
            return;
        };
        let process = &self.process;
        match io {
            Io::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                tokio::spawn(pump(process.clone(), Stream::Stdout, Source::Pipe(stdout)));
                tokio::spawn(pump(process.clone(), Stream::Stderr, Source::Pipe(stderr)));
                if let (Some(stdin), Some(rx)) = (stdin, stdin_rx) {
                    tokio::spawn(feed_stdin(process.clone(), Sink::Pipe(stdin), rx));
                }
            }
            Io::Pty(master) => {
                tokio::spawn(pump(
                    process.clone(),
                    Stream::Pty,
                    Source::Pty(master.clone()),
                ));
                if let Some(rx) = stdin_rx {
                    tokio::spawn(feed_stdin(process.clone(), Sink::Pty(master), rx));
                }
            }
        }
        tokio::spawn(reap(self.table.clone(), process.clone(), child));
    }
}

/// One started process.
pub struct Process {
    pub id: String,
    /// `id`, shared by every event of the process.
    shared_id: Arc<str>,
    pub pid: i32,
    pub argv: Vec<String>,
    pub tty: bool,
    state: Mutex<State>,
    /// Woken on every state change, for long-polls and the reaper.
    changed: Notify,
    attachment: Attachment,
    stdin: Option<mpsc::UnboundedSender<StdinCommand>>,
    /// Woken when the stdin feeder has written a chunk or stopped.
    stdin_taken: Notify,
    pty: Option<Arc<PtyMaster>>,
    /// The process and everything it started.
    container: Arc<Container>,
    /// For a sandboxed process: what `sandboxDenied` is judged from.
    sandbox: Option<crate::sandbox::Watch>,
}

#[derive(Debug)]
struct State {
    log: OutputLog,
    next_seq: u64,
    exit: Option<Exit>,
    closed_seq: Option<u64>,
    open_streams: u8,
    /// The group leader has been reaped: its id may be reused, so the group
    /// is no longer signalled.
    reaped: bool,
    stdin_closed: bool,
    write_ids: WriteIds,
    /// Bytes of stdin accepted so far, and written to the child so far.
    stdin_accepted: u64,
    stdin_written: u64,
    /// The stdin feeder has stopped: nothing queued will be written.
    stdin_gone: bool,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    seq: u64,
    code: i32,
    sandbox_denied: bool,
}

enum StdinCommand {
    Data(Vec<u8>),
    Close,
}

#[derive(Debug, Default)]
struct WriteIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl WriteIds {
    /// Remember `id`; false if it was already remembered.
    fn insert(&mut self, id: &str) -> bool {
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

impl ProcessTable {
    pub fn new(limits: Limits, attachment: Attachment, containment: Arc<Containment>) -> Arc<Self> {
        Arc::new(ProcessTable {
            processes: Mutex::new(HashMap::new()),
            limits,
            attachment,
            containment,
            lingering: Mutex::new(Vec::new()),
            live: watch::channel(0).0,
        })
    }

    /// Start a process and the tasks that pump its output and reap it.
    pub fn start(self: &Arc<Self>, req: StartRequest<'_>) -> Result<Launch> {
        let mut processes = lock(&self.processes);
        if processes.contains_key(&req.id) {
            return Err(Error::ProcessExists(req.id));
        }
        self.containment
            .check()
            .map_err(|message| Error::SpawnFailed {
                message,
                errno: None,
            })?;
        let container = self
            .containment
            .create()
            .map_err(|e| Error::io("failed to create the process's container", &e))?;
        let mut spec = req.spec;
        spec.container = self.containment.child_setup(&container);
        let starting = self.containment.starting();
        let spawned = match spawn::spawn(&spec) {
            Ok(spawned) => spawned,
            Err(err) => {
                drop(starting);
                self.containment.remove(&container);
                return Err(err);
            }
        };
        self.containment.started(
            &container,
            spawned.child.pid(),
            &spawned.io.output_fds(),
            starting,
        );
        let sandbox = spec.sandbox.as_ref().map(|prepared| {
            let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
            if let Some(listener) = prepared.take_listener() {
                tokio::spawn(crate::sandbox::seccomp::listen(listener, refused.clone()));
            }
            crate::sandbox::Watch {
                refused,
                network_restricted: prepared.network_restricted,
                program: std::path::Path::new(&spec.argv[0])
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            }
        });
        let tty = spec.tty.is_some();
        let (stdin_tx, stdin_rx) = if tty || spec.pipe_stdin {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let pty = match &spawned.io {
            Io::Pty(master) => Some(master.clone()),
            Io::Pipes { .. } => None,
        };
        let process = Arc::new(Process {
            id: req.id.clone(),
            shared_id: Arc::from(req.id.as_str()),
            pid: spawned.child.pid(),
            argv: spec.argv.to_vec(),
            tty,
            state: Mutex::new(State {
                log: OutputLog::new(self.limits.retention),
                next_seq: 1,
                exit: None,
                closed_seq: None,
                open_streams: if tty { 1 } else { 2 },
                reaped: false,
                stdin_closed: stdin_tx.is_none(),
                write_ids: WriteIds::default(),
                stdin_accepted: 0,
                stdin_written: 0,
                stdin_gone: false,
            }),
            changed: Notify::new(),
            attachment: self.attachment.clone(),
            stdin: stdin_tx,
            stdin_taken: Notify::new(),
            pty,
            container,
            sandbox,
        });
        processes.insert(req.id, process.clone());
        drop(processes);
        self.live.send_modify(|n| *n += 1);
        tracing::debug!(id = %process.id, pid = process.pid, "started");
        Ok(Launch {
            table: self.clone(),
            process,
            parts: Some((spawned.io, spawned.child, stdin_rx)),
        })
    }

    /// Look a process up by id.
    pub fn get(&self, id: &str) -> Result<Arc<Process>> {
        lock(&self.processes)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownProcess(id.to_string()))
    }

    fn find(&self, id: &str) -> Option<Arc<Process>> {
        lock(&self.processes).get(id).cloned()
    }

    /// `process/read`: the answer now when there is something to say (or
    /// no wait was asked for), else the process to wait on with
    /// [`Process::read`].
    pub fn read(&self, params: &ReadParams) -> Result<ReadNow> {
        let process = self.get(&params.process_id)?;
        let (response, ready) = process.snapshot(params);
        Ok(if ready || params.wait_ms.unwrap_or(0) == 0 {
            ReadNow::Ready(response)
        } else {
            ReadNow::Wait(process)
        })
    }

    /// `process/write`: the status now with the write itself as an effect
    /// to run once the response is queued, or (past the stdin queue limit)
    /// the bytes queued at once and the status once there is room.
    pub fn write(&self, id: &str, data: Vec<u8>, write_id: Option<&str>) -> WriteOutcome {
        match self.find(id) {
            Some(process) => process.write(data, write_id),
            None => WriteOutcome::Now(WriteStatus::UnknownProcess, None),
        }
    }

    /// `process/closeStdin`.
    pub fn close_stdin(&self, id: &str) -> (WriteStatus, Option<Effect>) {
        match self.find(id) {
            Some(process) => process.close_stdin(),
            None => (WriteStatus::UnknownProcess, None),
        }
    }

    /// `process/signal`: a no-op for unknown or exited processes.
    pub fn signal(&self, id: &str, signal: Signal) -> Option<Effect> {
        let process = self.find(id)?;
        Some(Box::new(move || process.signal_group(signal.number())))
    }

    /// `process/terminate`: whether it was running, and as an effect the
    /// kill of its whole container: the process and whatever it left
    /// running, even after it exited.
    pub fn terminate(&self, id: &str) -> (bool, Option<Effect>) {
        match self.find(id) {
            Some(process) => {
                let running = lock(&process.state).exit.is_none();
                let containment = self.containment.clone();
                (
                    running,
                    Some(Box::new(move || containment.kill(&process.container))),
                )
            }
            None => (false, None),
        }
    }

    /// `process/resize`.
    pub fn resize(&self, id: &str, size: TtySize) -> Result<()> {
        let process = self.get(id)?;
        let Some(pty) = &process.pty else {
            return Err(Error::InvalidRequest(format!(
                "process {id} has no terminal"
            )));
        };
        pty.resize(size)
            .map_err(|e| Error::io(format!("failed to resize the terminal of {id}"), &e))
    }

    /// `process/list`, sorted by id.
    pub fn list(&self) -> Vec<ProcessSummary> {
        let mut all: Vec<ProcessSummary> = lock(&self.processes)
            .values()
            .map(|p| {
                let state = lock(&p.state);
                ProcessSummary {
                    process_id: p.id.clone(),
                    pid: p.pid,
                    argv: p.argv.clone(),
                    tty: p.tty,
                    exited: state.exit.is_some(),
                    exit_code: state.exit.map(|e| e.code),
                    closed: state.closed_seq.is_some(),
                }
            })
            .collect();
        all.sort_by(|a, b| a.process_id.cmp(&b.process_id));
        all
    }

    /// Kill every process of this session, with everything each started.
    pub fn kill_all(&self) {
        let all: Vec<Arc<Process>> = lock(&self.processes).values().cloned().collect();
        for process in all {
            self.containment.kill(&process.container);
        }
        for container in lock(&self.lingering).iter() {
            self.containment.kill(container);
        }
    }

    /// Forget a closed process: its container goes too once empty, else
    /// it lingers until the session ends.
    fn forget(&self, process: &Arc<Process>) {
        let mut processes = lock(&self.processes);
        if processes
            .get(&process.id)
            .is_some_and(|p| Arc::ptr_eq(p, process))
        {
            processes.remove(&process.id);
        }
        drop(processes);
        let mut lingering = lock(&self.lingering);
        lingering.retain(|c| {
            let empty = self.containment.is_empty(c);
            if empty {
                self.containment.remove(c);
            }
            !empty
        });
        if self.containment.is_empty(&process.container) {
            self.containment.remove(&process.container);
        } else {
            lingering.push(process.container.clone());
        }
    }

    /// Wait until every child of this session has been reaped.
    pub async fn wait_reaped(&self) {
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }
}

impl Process {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Reserve room for one notification on the attached connection, if
    /// any. Room is reserved before the state lock is taken and the line is
    /// queued while it is held, which keeps notifications in seq order.
    async fn reserve(&self) -> Option<crate::transport::Permit> {
        let tx = lock(&self.attachment)
            .connection
            .as_ref()
            .map(|(_, tx)| tx.clone())?;
        tx.reserve().await
    }

    async fn push_output(&self, stream: Stream, data: Vec<u8>) {
        let permit = self.reserve().await;
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
            state.log.push(seq, stream, chunk);
        }
        self.changed.notify_waiters();
    }

    async fn stream_ended(&self) {
        self.lock().open_streams -= 1;
        self.changed.notify_waiters();
        self.maybe_close().await;
    }

    async fn record_exit(&self, code: i32, signal: Option<&'static str>) {
        tracing::debug!(id = %self.id, pid = self.pid, code, signal, "exited");
        let permit = self.reserve().await;
        {
            let mut state = self.lock();
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
            });
            state.reaped = true;
            if let Some(permit) = permit {
                permit.send(Outgoing::Exited {
                    process_id: self.shared_id.clone(),
                    seq,
                    exit_code: code,
                    sandbox_denied,
                    signal,
                });
            }
        }
        self.changed.notify_waiters();
        self.maybe_close().await;
    }

    /// Record `closed` once the exit is known and every stream has ended.
    async fn maybe_close(&self) {
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
            if let Some(permit) = permit {
                permit.send(Outgoing::Closed {
                    process_id: self.shared_id.clone(),
                    seq,
                });
            }
        }
        self.changed.notify_waiters();
    }

    /// The read's answer from the current state, and whether it may be
    /// returned without waiting: there are chunks, the process is closed,
    /// or its exit is after `afterSeq`. One lock, so both agree.
    fn snapshot(&self, params: &ReadParams) -> (ReadResponse, bool) {
        let state = self.lock();
        let after = params.after_seq.unwrap_or(0);
        let slice = state.log.read(after, params.max_bytes);
        let next_seq = match (params.max_bytes, slice.last_seq) {
            (Some(_), Some(last)) => last + 1,
            _ => state.next_seq,
        };
        let ready = !slice.chunks.is_empty()
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

    fn write(self: &Arc<Self>, data: Vec<u8>, write_id: Option<&str>) -> WriteOutcome {
        let mut state = self.lock();
        if let Some(id) = write_id {
            if !state.write_ids.insert(id) {
                return WriteOutcome::Now(WriteStatus::Accepted, None);
            }
        }
        let tx = match &self.stdin {
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
    fn stdin_took(&self, n: usize) {
        self.lock().stdin_written += n as u64;
        self.stdin_taken.notify_waiters();
    }

    fn close_stdin(&self) -> (WriteStatus, Option<Effect>) {
        let mut state = self.lock();
        let Some(tx) = &self.stdin else {
            return (WriteStatus::StdinClosed, None);
        };
        if state.stdin_closed {
            return (WriteStatus::Accepted, None);
        }
        state.stdin_closed = true;
        let tx = tx.clone();
        let effect: Effect = Box::new(move || {
            let _ = tx.send(StdinCommand::Close);
        });
        (WriteStatus::Accepted, Some(effect))
    }

    /// Signal the whole group, unless the leader was reaped (its id may
    /// then belong to someone else).
    fn signal_group(&self, signal: i32) {
        let state = self.lock();
        if state.reaped || self.pid <= 1 {
            return;
        }
        // SAFETY: plain syscall; the group exists while its leader is unreaped.
        unsafe { libc::kill(-self.pid, signal) };
    }
}

/// Where output comes from.
enum Source {
    Pipe(tokio::net::unix::pipe::Receiver),
    Pty(Arc<PtyMaster>),
}

impl Source {
    /// The next chunk of output, read into a buffer of its own sized to
    /// what is waiting; empty at the end.
    async fn read_chunk(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Source::Pipe(pipe) => loop {
                pipe.readable().await?;
                let mut buf = Vec::with_capacity(spawn::available(
                    std::os::fd::AsRawFd::as_raw_fd(pipe),
                    READ_CHUNK,
                ));
                match pipe.try_read_buf(&mut buf) {
                    Ok(_) => return Ok(buf),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(err),
                }
            },
            Source::Pty(master) => master.read_chunk(READ_CHUNK).await,
        }
    }
}

/// Where stdin goes.
enum Sink {
    Pipe(tokio::net::unix::pipe::Sender),
    Pty(Arc<PtyMaster>),
}

async fn pump(process: Arc<Process>, stream: Stream, mut source: Source) {
    loop {
        match source.read_chunk().await {
            Ok(data) if data.is_empty() => break,
            Ok(data) => process.push_output(stream, data).await,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::warn!(id = %process.id, "reading {} failed: {err}", stream.as_str());
                break;
            }
        }
    }
    // Release the read end (and for a pty, the input side) promptly.
    drop(source);
    process.stream_ended().await;
}

async fn feed_stdin(
    process: Arc<Process>,
    mut sink: Sink,
    mut rx: mpsc::UnboundedReceiver<StdinCommand>,
) {
    while let Some(command) = rx.recv().await {
        let (result, n) = match (&mut sink, command) {
            (Sink::Pipe(pipe), StdinCommand::Data(data)) => {
                (pipe.write_all(&data).await, data.len())
            }
            (Sink::Pty(pty), StdinCommand::Data(data)) => (pty.write_all(&data).await, data.len()),
            (Sink::Pipe(_), StdinCommand::Close) => break,
            (Sink::Pty(pty), StdinCommand::Close) => (pty.write_all(&[pty.eof_char()]).await, 0),
        };
        if let Err(err) = result {
            tracing::debug!(id = %process.id, "stdin closed: {err}");
            process.lock().stdin_closed = true;
            break;
        }
        process.stdin_took(n);
    }
    // Nothing queued will be written now: no write waits for room.
    process.lock().stdin_gone = true;
    process.stdin_taken.notify_waiters();
}

/// Wait for the child, record its exit, and forget the process once it has
/// been closed for the retention period.
async fn reap(table: Arc<ProcessTable>, process: Arc<Process>, mut child: exec::Child) {
    let status = child.wait().await;
    if child.is_reaped() {
        process.lock().reaped = true;
        table
            .containment
            .leader_reaped(&process.container, process.pid);
    } else {
        // A sandbox's init lives on while what the program left does.
        let table = table.clone();
        let process = process.clone();
        tokio::spawn(async move {
            if let Err(err) = child.reap().await {
                tracing::warn!(id = %process.id, "waiting for the sandbox's init failed: {err}");
            }
            process.lock().reaped = true;
            table
                .containment
                .leader_reaped(&process.container, process.pid);
        });
    }
    // Let the pumps take what the child wrote before it exited.
    let drained = async {
        loop {
            let changed = process.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if process.lock().open_streams == 0 {
                return;
            }
            changed.await;
        }
    };
    let _ = tokio::time::timeout(EXIT_DRAIN_GRACE, drained).await;
    let (code, signal) = match status {
        Ok(status) => exit_code(status),
        Err(err) => {
            tracing::warn!(id = %process.id, "waiting for the child failed: {err}");
            (-1, None)
        }
    };
    process.record_exit(code, signal).await;
    table.live.send_modify(|n| *n -= 1);

    // Wait for close, then keep the process readable for a while.
    loop {
        let changed = process.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if process.lock().closed_seq.is_some() {
            break;
        }
        changed.await;
    }
    tokio::time::sleep(table.limits.closed_retention).await;
    table.forget(&process);
}

/// The protocol's exit code (128+N for a signal) and the signal's name.
fn exit_code(status: std::process::ExitStatus) -> (i32, Option<&'static str>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(sig)) => (128 + sig, Some(signal_name(sig))),
        (None, None) => (-1, None),
    }
}

/// The conventional name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGSYS => "SIGSYS",
        _ => "SIGUNKNOWN",
    }
}
