//! A started process, seen from the client.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Client, ClientError, Conn, EnvPolicy, Note, Sandbox, decode_b64, uri};
use crate::protocol::{Stream, TtySize};

/// How much output a held process may send before the client tells the
/// server it arrived (a quarter of the server's default retention, so the
/// child seldom waits).
const ACK_EVERY: u64 = 256 * 1024;

/// What to start.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The process id, chosen by the client, unique in the session.
    pub process_id: String,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The working directory on the server; `None` sends `/` (the protocol
    /// has no default), so give one.
    pub cwd: Option<PathBuf>,
    /// Variables set over what `env_policy` derives (or, with no policy,
    /// the exact environment).
    pub env: BTreeMap<String, String>,
    /// How the executor derives the environment; by default
    /// [`EnvPolicy::executor_default`] (its own, without secret-looking
    /// names). `None` ([`StartOptions::exact_env`]): exactly `env`.
    pub env_policy: Option<EnvPolicy>,
    /// Run under a pseudo-terminal of this size.
    pub tty: Option<TtySize>,
    /// Keep stdin open for writes (else it is `/dev/null`).
    pub pipe_stdin: bool,
    /// What the program sees as `argv[0]`.
    pub arg0: Option<String>,
    /// The sandbox (`docs/PROTOCOL.md` section 6).
    pub sandbox: Option<Sandbox>,
    /// Ask the server not to push output (`notifyOutput: false`), for a
    /// caller that reads it with [`Client::read_output`] only.
    pub notify_output: bool,
    /// Ask the server to hold the child instead of evicting output when
    /// retention is full (`holdOutput`): nothing is lost, the child waits
    /// for the reads.
    pub hold_output: bool,
    /// Memory, CPU, process count, deadline and output budget
    /// (`docs/PROTOCOL.md` section 11); `None`: the server's defaults.
    pub limits: Option<crate::limits::Requested>,
}

impl StartOptions {
    /// Start `argv` as process `process_id`.
    pub fn new<I, S>(process_id: impl Into<String>, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StartOptions {
            process_id: process_id.into(),
            argv: argv.into_iter().map(Into::into).collect(),
            cwd: None,
            env: BTreeMap::new(),
            env_policy: Some(EnvPolicy::executor_default()),
            tty: None,
            pipe_stdin: false,
            arg0: None,
            sandbox: None,
            notify_output: true,
            hold_output: false,
            limits: None,
        }
    }

    /// Run under these limits (a limit the server can't enforce is refused
    /// unless `best_effort` is set in them).
    pub fn limits(mut self, limits: crate::limits::Requested) -> Self {
        self.limits = Some(limits);
        self
    }

    /// The working directory on the server (default: `/`, so set it).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Set a variable, over what the policy derives.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Derive the environment on the executor from `policy`
    /// (`docs/PROTOCOL.md` section 7) instead of the default.
    pub fn env_policy(mut self, policy: EnvPolicy) -> Self {
        self.env_policy = Some(policy);
        self
    }

    /// The environment is exactly what [`StartOptions::env`] sets, nothing
    /// of the executor's (no `PATH` either, unless set).
    pub fn exact_env(mut self) -> Self {
        self.env_policy = None;
        self
    }

    /// Run under a pseudo-terminal of this size.
    pub fn tty(mut self, cols: u16, rows: u16) -> Self {
        self.tty = Some(TtySize { cols, rows });
        self
    }

    /// Keep stdin open for [`Process::write`].
    pub fn pipe_stdin(mut self, yes: bool) -> Self {
        self.pipe_stdin = yes;
        self
    }

    /// Run inside the executor's sandbox (`docs/PROTOCOL.md` section 6):
    /// [`Sandbox::read_only`], [`Sandbox::workspace_write`], or one of
    /// your own.
    pub fn sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = Some(sandbox);
        self
    }

    /// Hold the child instead of dropping output the server can no longer
    /// retain (`holdOutput`): the [`Process`] tells the server what arrived
    /// as it goes, and the child waits while nobody reads (a connection
    /// that is down, a caller that stopped calling [`Process::next_event`]).
    /// Nothing is lost as long as the session lives; but a process whose
    /// events nobody takes stops once the server's retention (1 MiB by
    /// default) is full, so don't set it for output you mean to ignore.
    pub fn hold_output(mut self, yes: bool) -> Self {
        self.hold_output = yes;
        self
    }

    /// Only poll: the server pushes no output (read it with
    /// [`Client::read_output`]), and holds the child when retention is
    /// full instead of dropping output. Events of the started [`Process`]
    /// then carry no output.
    pub fn poll_only(mut self) -> Self {
        self.notify_output = false;
        self.hold_output = true;
        self
    }
}

/// Something that happened to a process, in seq order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes the process wrote.
    Output {
        /// Where: stdout, stderr, or the pty.
        stream: Stream,
        /// The bytes, as written.
        data: Vec<u8>,
    },
    /// Output was lost: it fell out of the server's retention before this
    /// client read it (the connection was down longer than retention
    /// lasts, or the client read too slowly). `bytes` is how much; the
    /// events go on after the gap.
    Lost {
        /// How many bytes of output are missing here.
        bytes: u64,
    },
    /// The process exited (output may still follow, from what it left
    /// running).
    Exited(ExitStatus),
    /// Exit is known and every stream ended; no more events follow.
    Closed,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code; 128+N for a process killed by signal N.
    pub code: i32,
    /// The signal's name (`"SIGKILL"`), when a signal ended it.
    pub signal: Option<String>,
    /// The server thinks the sandbox probably caused the failure.
    pub sandbox_denied: bool,
    /// Why it ended (`exited`, `signal`, `oomKilled`, `timedOut`,
    /// `outputLimit`, `terminated`), when the server says.
    pub reason: Option<String>,
}

/// A process started through a [`Client`].
pub struct Process {
    client: Client,
    conn: Arc<Conn>,
    id: String,
    events: mpsc::UnboundedReceiver<Note>,
    /// The last seq turned into an event.
    seen: u64,
    /// Bytes of output accounted for through `seen`: delivered, or
    /// reported lost.
    accounted: u64,
    /// Bytes reported lost so far.
    lost: u64,
    /// The server holds the child instead of evicting (`holdOutput`): it
    /// is told what arrived ([`ACK_EVERY`]), or the child stops.
    hold: bool,
    /// `accounted` when the server was last told.
    acked: u64,
    /// `seen` when the server was last told.
    acked_seq: u64,
    ready: VecDeque<Event>,
    exit: Option<ExitStatus>,
    closed: bool,
    writes: AtomicU64,
    write_prefix: String,
    unenforced_limits: Vec<String>,
}

impl Process {
    pub(super) async fn start(
        client: Client,
        conn: Arc<Conn>,
        o: StartOptions,
    ) -> Result<Process, ClientError> {
        // Subscribe first: the first notification may follow the response
        // at once.
        let events = conn.subscribe(&o.process_id);
        let mut params = json!({
            "processId": o.process_id,
            "argv": o.argv,
            "cwd": uri(o.cwd.as_deref().unwrap_or(std::path::Path::new("/"))),
            "env": o.env,
            "tty": o.tty.is_some(),
            "pipeStdin": o.pipe_stdin,
        });
        if let Some(size) = o.tty {
            params["ttySize"] = json!({"cols": size.cols, "rows": size.rows});
        }
        if let Some(policy) = o.env_policy {
            params["envPolicy"] = json!(policy);
        }
        if let Some(arg0) = o.arg0 {
            params["arg0"] = json!(arg0);
        }
        if let Some(sandbox) = o.sandbox {
            params["sandbox"] = json!(sandbox);
        }
        if !o.notify_output {
            params["notifyOutput"] = json!(false);
        }
        let hold = o.hold_output;
        if hold {
            params["holdOutput"] = json!(true);
        }
        if let Some(limits) = o.limits {
            params["limits"] = json!(limits);
        }
        let started = match conn.call("process/start", params).await {
            Ok(started) => started,
            Err(err) => {
                conn.unsubscribe(&o.process_id);
                return Err(err);
            }
        };
        let mut process = Process::handle(
            client,
            conn,
            o.process_id,
            events,
            0,
            hold && o.notify_output,
            false,
        )
        .await;
        process.unenforced_limits = started["unenforcedLimits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        Ok(process)
    }

    /// A handle to a running process of a resumed session, caught up from
    /// `after_seq`.
    pub(super) async fn attach(
        client: Client,
        conn: Arc<Conn>,
        id: &str,
        after_seq: u64,
        hold: bool,
    ) -> Result<Process, ClientError> {
        let events = conn.subscribe(id);
        let mut process =
            Process::handle(client, conn, id.to_string(), events, after_seq, hold, true).await;
        // The server knows the process, or says so.
        process.catch_up().await?;
        Ok(process)
    }

    async fn handle(
        client: Client,
        conn: Arc<Conn>,
        id: String,
        events: mpsc::UnboundedReceiver<Note>,
        seen: u64,
        hold: bool,
        attached: bool,
    ) -> Process {
        let session = client.session_id().await.unwrap_or_default();
        let mut write_prefix = format!("{}-{id}", &session[..session.len().min(8)]);
        if attached {
            // Not the first handle of this process: its write ids must not
            // be the ones an earlier handle used (they would be taken for
            // retries and dropped).
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            write_prefix.push_str(&format!("-{nonce:x}"));
        }
        Process {
            write_prefix,
            client,
            conn,
            id,
            events,
            seen,
            accounted: 0,
            lost: 0,
            hold,
            acked: 0,
            acked_seq: seen,
            ready: VecDeque::new(),
            exit: None,
            closed: false,
            writes: AtomicU64::new(0),
            unenforced_limits: Vec::new(),
        }
    }

    /// Limits asked for with `best_effort` that the server does not
    /// enforce (it ran the process without them).
    pub fn unenforced_limits(&self) -> &[String] {
        &self.unenforced_limits
    }

    /// The process id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The seq of the last event [`Process::next_event`] returned (where
    /// [`Client::attach`] continues, after this handle failed).
    pub fn last_seq(&self) -> u64 {
        self.seen
    }

    /// The next event, or `None` after [`Event::Closed`]. Gaps in the
    /// notification stream are filled with `process/read`.
    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            self.acknowledge(false);
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            if self.closed {
                return Ok(None);
            }
            // Caught up: whatever arrived is told before waiting (with a
            // small retention the child may be waiting for exactly that).
            self.acknowledge(true);
            let Some(note) = self.events.recv().await else {
                // The subscription ended with the connection.
                if !self.client.resumable() {
                    return Err(ClientError::ConnectionLost {
                        stderr: self.conn.stderr_tail(),
                    });
                }
                // Resume, listen again, and read what went by meanwhile.
                self.conn = self.client.conn().await?;
                self.events = self.conn.subscribe(&self.id);
                self.catch_up().await?;
                continue;
            };
            let seq = match &note {
                Note::Output { seq, .. } => *seq,
                Note::Other(note) => note.params["seq"].as_u64().unwrap_or(0),
            };
            if seq <= self.seen {
                continue;
            }
            if seq > self.seen + 1 {
                self.fill_gap(seq).await?;
            }
            self.seen = seq;
            let msg = match note {
                Note::Output { stream, data, .. } => {
                    self.deliver(stream, data);
                    continue;
                }
                Note::Other(note) => note,
            };
            let params = &msg.params;
            match msg.method.as_str() {
                "process/output" => {
                    let stream =
                        serde_json::from_value(params["stream"].clone()).unwrap_or(Stream::Stdout);
                    let data = decode_b64("process/output", &params["chunk"])?;
                    self.deliver(stream, data);
                }
                "process/exited" => {
                    let status = ExitStatus {
                        code: params["exitCode"].as_i64().unwrap_or(-1) as i32,
                        signal: params["signal"].as_str().map(String::from),
                        sandbox_denied: params["sandboxDenied"].as_bool().unwrap_or(false),
                        reason: params["reason"].as_str().map(String::from),
                    };
                    self.exit = Some(status.clone());
                    self.ready.push_back(Event::Exited(status));
                }
                "process/closed" => {
                    self.closed = true;
                    self.ready.push_back(Event::Closed);
                }
                _ => {}
            }
        }
    }

    /// After a resumed connection: everything since `self.seen`, from the
    /// server's retained log, up to and including the exit and the close.
    async fn catch_up(&mut self) -> Result<(), ClientError> {
        loop {
            let r = self.read_retained().await?;
            if self.take_chunks(&r, u64::MAX)? {
                continue;
            }
            self.take_exit(&r);
            if r["closed"] == true && !self.closed {
                self.closed = true;
                self.ready.push_back(Event::Closed);
            }
            // Notifications from here on carry later seqs.
            self.seen = self
                .seen
                .max(r["nextSeq"].as_u64().unwrap_or(1).saturating_sub(1));
            return Ok(());
        }
    }

    /// One `process/read` after `self.seen`, a loss it reports noted.
    async fn read_retained(&mut self) -> Result<Value, ClientError> {
        let r = self
            .call(
                "process/read",
                json!({"processId": self.id, "afterSeq": self.seen}),
            )
            .await?;
        self.note_loss(&r);
        Ok(r)
    }

    /// The chunks of read answer `r` after `self.seen` and before `upto`,
    /// as events; whether there were any.
    fn take_chunks(&mut self, r: &Value, upto: u64) -> Result<bool, ClientError> {
        let mut took = false;
        for chunk in r["chunks"].as_array().into_iter().flatten() {
            let seq = chunk["seq"].as_u64().unwrap_or(0);
            if seq <= self.seen || seq >= upto {
                continue;
            }
            let stream = serde_json::from_value(chunk["stream"].clone()).unwrap_or(Stream::Stdout);
            let data = decode_b64("process/read", &chunk["chunk"])?;
            self.deliver(stream, data);
            self.seen = seq;
            took = true;
        }
        Ok(took)
    }

    /// The exit a read answer reports, as an event, once.
    fn take_exit(&mut self, r: &Value) {
        if r["exited"] == true && self.exit.is_none() {
            let status = ExitStatus {
                code: r["exitCode"].as_i64().unwrap_or(-1) as i32,
                signal: None,
                sandbox_denied: r["sandboxDenied"].as_bool().unwrap_or(false),
                reason: r["reason"].as_str().map(String::from),
            };
            self.exit = Some(status.clone());
            self.ready.push_back(Event::Exited(status));
        }
    }

    /// A call about this process; on a resumable client, one that the loss
    /// of the connection interrupted is sent again on the resumed one
    /// (every method used here is safe to repeat: reads, writes by write
    /// id, close of stdin, resize, terminate).
    async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        let conn = self.client.conn().await?;
        match conn.call(method, params.clone()).await {
            Err(ClientError::ConnectionLost { .. }) if self.client.resumable() => {
                self.client.conn().await?.call(method, params).await
            }
            other => other,
        }
    }

    /// Read the output between `self.seen` and `upto` from the server's
    /// retained log, as many reads as it takes (one answers at most its
    /// `maxBytes`); what fell out of retention is reported as lost.
    async fn fill_gap(&mut self, upto: u64) -> Result<(), ClientError> {
        loop {
            let r = self.read_retained().await?;
            let progressed = self.take_chunks(&r, upto)?;
            self.take_exit(&r);
            // Done once the log has nothing more before `upto` (what it
            // no longer has was reported lost).
            let next = r["nextSeq"].as_u64().unwrap_or(upto);
            if !progressed || self.seen + 1 >= upto || next >= upto {
                return Ok(());
            }
        }
    }

    /// For a held process, tell the server what has arrived once enough
    /// has since it was last told, or whenever the caller has caught up:
    /// it frees that much of its retained log, and the child, which waits
    /// for room, goes on. Sent without waiting for the answer.
    fn acknowledge(&mut self, caught_up: bool) {
        let due =
            self.accounted - self.acked >= ACK_EVERY || (caught_up && self.seen > self.acked_seq);
        if !self.hold || self.closed || !due {
            return;
        }
        self.acked = self.accounted;
        self.acked_seq = self.seen;
        let conn = self.conn.clone();
        let params = json!({"processId": self.id, "afterSeq": self.seen, "acknowledge": true});
        tokio::spawn(async move {
            let _ = conn.call("process/read", params).await;
        });
    }

    /// An output event, counted.
    fn deliver(&mut self, stream: Stream, data: Vec<u8>) {
        self.accounted += data.len() as u64;
        self.ready.push_back(Event::Output { stream, data });
    }

    /// A read that says output after `self.seen` fell out of retention:
    /// an [`Event::Lost`] with how much (the server's count of bytes that
    /// left its log, less what this client had accounted for).
    fn note_loss(&mut self, r: &Value) {
        if r["truncated"] != true {
            return;
        }
        let dropped = r["droppedBytes"].as_u64().unwrap_or(self.accounted);
        let bytes = dropped.saturating_sub(self.accounted);
        self.accounted += bytes;
        self.lost += bytes;
        tracing::warn!(process = %self.id, bytes, "output was lost: it fell out of the server's retention");
        self.ready.push_back(Event::Lost { bytes });
    }

    /// Bytes of output reported lost so far ([`Event::Lost`]).
    pub fn lost_bytes(&self) -> u64 {
        self.lost
    }

    /// Wait until the process is closed, handing every output chunk to
    /// `on_output`; returns how it ended.
    pub async fn wait_with_output(
        &mut self,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        while let Some(event) = self.next_event().await? {
            if let Event::Output { stream, data } = event {
                on_output(stream, &data);
            }
        }
        self.exit.clone().ok_or_else(|| ClientError::Decode {
            method: "process/closed".into(),
            message: "closed without an exit".into(),
        })
    }

    /// Wait until the process is closed, discarding output.
    pub async fn wait(&mut self) -> Result<ExitStatus, ClientError> {
        self.wait_with_output(|_, _| {}).await
    }

    /// Write to stdin with a fresh write id; returns the server's status
    /// (`accepted`). A process whose stdin is closed or was never piped is
    /// [`ClientError::StdinClosed`]; one the server does not know,
    /// [`ClientError::UnknownProcess`].
    pub async fn write(&self, data: &[u8]) -> Result<String, ClientError> {
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.write_prefix);
        self.write_with_id(data, &id).await
    }

    /// Write with an explicit id: retrying with the same id writes once.
    pub async fn write_with_id(&self, data: &[u8], write_id: &str) -> Result<String, ClientError> {
        let chunk = base64::engine::general_purpose::STANDARD.encode(data);
        let r = self
            .call(
                "process/write",
                json!({"processId": self.id, "chunk": chunk, "writeId": write_id}),
            )
            .await?;
        match r["status"].as_str().unwrap_or("") {
            "stdinClosed" => Err(ClientError::StdinClosed {
                process_id: self.id.clone(),
            }),
            "unknownProcess" => Err(ClientError::UnknownProcess {
                process_id: self.id.clone(),
            }),
            status => Ok(status.to_string()),
        }
    }

    /// Close stdin (on a tty: send the EOF character).
    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.call("process/closeStdin", json!({"processId": self.id}))
            .await
            .map(|_| ())
    }

    /// Send a signal to the process's group: a protocol name
    /// (`"interrupt"`, `"terminate"`, `"kill"`, `"hangup"`, `"quit"`,
    /// `"user1"`, `"user2"`), or as `kill` takes it: `TERM`, `SIGTERM`,
    /// `15` (any case). Others are [`ClientError::UnknownSignal`].
    pub async fn signal(&self, signal: &str) -> Result<(), ClientError> {
        let signal = signal_name(signal)?;
        self.client
            .conn()
            .await?
            .call(
                "process/signal",
                json!({"processId": self.id, "signal": signal}),
            )
            .await
            .map(|_| ())
    }

    /// Resize the process's terminal.
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), ClientError> {
        self.call(
            "process/resize",
            json!({"processId": self.id, "cols": cols, "rows": rows}),
        )
        .await
        .map(|_| ())
    }

    /// Kill the process group; whether it was still running.
    pub async fn terminate(&self) -> Result<bool, ClientError> {
        let r = self
            .call("process/terminate", json!({"processId": self.id}))
            .await?;
        Ok(r["running"] == true)
    }

    /// The client this process belongs to.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The protocol's name of a signal given as the protocol, `kill` or a
/// number names it.
pub(crate) fn signal_name(given: &str) -> Result<&'static str, ClientError> {
    let upper = given.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let name = match bare {
        "INTERRUPT" | "INT" | "2" => "interrupt",
        "TERMINATE" | "TERM" | "15" => "terminate",
        "KILL" | "9" => "kill",
        "HANGUP" | "HUP" | "1" => "hangup",
        "QUIT" | "3" => "quit",
        "USER1" | "USR1" | "10" => "user1",
        "USER2" | "USR2" | "12" => "user2",
        _ => return Err(ClientError::UnknownSignal(given.to_string())),
    };
    Ok(name)
}

impl Drop for Process {
    fn drop(&mut self) {
        self.conn.unsubscribe(&self.id);
    }
}
