//! The processes of one session, and what each request does to them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, watch};

use super::container::{Container, Containment};
use super::exec;
use super::io::{Sink, Source, StdinCommand, feed_stdin, pump};
use super::output::OutputLog;
use super::reap::reap;
use super::spawn::{self, Io};
use super::state::{Process, State, WriteIds};
use super::{Attachment, Effect, Limits, WriteOutcome};
use crate::error::{Error, Result};
use crate::protocol::{
    ProcessSummary, ReadParams, ReadResponse, Signal, Stream, TtySize, WriteStatus,
};
use crate::sync::lock;

/// The processes of one session.
pub struct ProcessTable {
    pub(super) processes: Mutex<HashMap<String, Arc<Process>>>,
    pub(super) limits: Limits,
    pub(super) attachment: Attachment,
    pub(super) containment: Arc<Containment>,
    /// Containers of forgotten processes that still hold something (a
    /// daemon the process left running); killed with the session.
    pub(super) lingering: Mutex<Vec<Arc<Container>>>,
    /// How many children have not been reaped yet.
    pub(super) live: watch::Sender<usize>,
}

/// What `process/start` needs: the client's id and the spawn spec.
pub struct StartRequest<'a> {
    pub id: String,
    pub spec: spawn::Spec<'a>,
    /// The process's proxy, kept until it closes.
    pub network: Option<crate::net::Guard>,
    /// Push output as notifications.
    pub notify_output: bool,
    /// Hold the child instead of evicting when retention is full.
    pub hold_output: bool,
    /// Its limits, checked against the server's policy and the host.
    pub limits: super::limits::Effective,
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

impl Launch {
    /// The started process's pid.
    pub fn pid(&self) -> i32 {
        self.process.pid
    }
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
        if let Some(ms) = process.limits.timeout_ms {
            tokio::spawn(deadline(process.clone(), ms));
        }
        if process.limits.memory_bytes.is_some() {
            tokio::spawn(oom_watch(process.clone()));
        }
    }
}

/// How often a process with a memory limit is checked for OOM kills.
const OOM_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// When the kernel kills any process of the tree for memory, end the
/// whole tree (`oomKilled`), as cgroup v2's `memory.oom.group` does, so
/// a shell around the killed program does not carry on as if nothing
/// happened (cgroup v1 has no such switch).
async fn oom_watch(process: Arc<Process>) {
    loop {
        if process.lock().exit.is_some() {
            return;
        }
        if process.containment.oom_kills(&process.container) > 0 {
            tracing::debug!(id = %process.id, "out of memory");
            process.kill_for(crate::limits::Reason::OomKilled);
            return;
        }
        tokio::time::sleep(OOM_CHECK_EVERY).await;
    }
}

/// At the deadline, kill the whole tree of a process that has not closed:
/// a running one ends `timedOut`; one that has exited keeps its reason,
/// but what it left running goes too.
async fn deadline(process: Arc<Process>, ms: u64) {
    let closed = process.wait_until(|s| s.closed_seq.is_some());
    if tokio::time::timeout(std::time::Duration::from_millis(ms), closed)
        .await
        .is_ok()
    {
        return;
    }
    tracing::debug!(id = %process.id, ms, "deadline reached");
    process.kill_for(crate::limits::Reason::TimedOut);
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
            .create(&req.limits)
            .map_err(|e| Error::io("failed to create the process's container", &e))?;
        let mut spec = req.spec;
        spec.container = self.containment.child_setup(&container);
        // The sandbox's init counts too.
        spec.container.nproc = req
            .limits
            .pids
            .filter(|_| req.limits.pids_by_rlimit)
            .map(|n| n.saturating_add(1));
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
        let mut network = req.network;
        if let Some(prepared) = &spec.sandbox {
            let bridges = prepared.take_bridges();
            if !bridges.is_empty() {
                network.get_or_insert_with(Default::default).bridge(bridges);
            }
        }
        let sandbox = spec.sandbox.as_ref().map(|prepared| {
            let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
            if let Some(listener) = prepared.take_listener() {
                tokio::spawn(crate::sandbox::seccomp::listen(listener, refused.clone()));
            }
            crate::sandbox::Watch {
                refused,
                network_restricted: prepared.network_limited(),
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
                cause: None,
            }),
            changed: Notify::new(),
            attachment: self.attachment.clone(),
            stdin: Mutex::new(stdin_tx),
            stdin_taken: Notify::new(),
            pty: Mutex::new(pty),
            container,
            sandbox,
            network: Mutex::new(network),
            notify: req.notify_output,
            hold: std::sync::atomic::AtomicBool::new(req.hold_output),
            limits: req.limits,
            output_used: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            containment: self.containment.clone(),
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
                process.end_for(crate::limits::Reason::Terminated);
                if let Some(network) = lock(&process.network).as_ref() {
                    network.stop_asking();
                }
                process.release_hold();
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
        let pty = crate::sync::lock(&process.pty).clone();
        let Some(pty) = pty else {
            if process.tty {
                // Closed: its terminal is gone, there is nothing to resize.
                return Ok(());
            }
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
            process.end_for(crate::limits::Reason::Terminated);
            process.release_hold();
            self.containment.kill(&process.container);
        }
        for container in lock(&self.lingering).iter() {
            self.containment.kill(container);
        }
    }

    /// Forget a closed process: its container goes too once empty, else
    /// it lingers until the session ends.
    pub(super) fn forget(&self, process: &Arc<Process>) {
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
