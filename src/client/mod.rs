//! The orchestrator side: a client that spawns a server lazily, over any
//! command, and calls it.
//!
//! ```no_run
//! use exec_server::client::{Client, ServerCommand, StartOptions};
//!
//! # async fn demo() -> Result<(), exec_server::client::ClientError> {
//! // Any command that speaks the protocol on its stdio: the local binary,
//! // `ssh host exec-server --stdio`, `kubectl exec -i pod -- exec-server --stdio`.
//! let command = ServerCommand::parse("ssh build-box exec-server --stdio")?;
//! let client = Client::new(command);
//! // Nothing runs until the first call; concurrent first calls share one start.
//! let mut process = client
//!     .start(StartOptions::new("p1", ["sh", "-c", "echo hi; exit 3"]).cwd("/tmp"))
//!     .await?;
//! let mut output = Vec::new();
//! let status = process.wait_with_output(|_stream, bytes| output.extend_from_slice(bytes)).await?;
//! assert_eq!((status.code, &output[..]), (3, &b"hi\n"[..]));
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```

use crate::lock;
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OnceCell, mpsc, oneshot};

mod lines;
mod process;
pub mod run;
mod types;

pub use crate::protocol::Stream;
pub use process::{Event, ExitStatus, Process, StartOptions};
pub use types::{
    DirectoryEntry, EnvironmentInfo, Metadata, ProcessSummary, Shell, Walk, WalkEntry, WalkError,
};

/// How long the handshake may take (an SSH connection can be slow).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for the server to exit after its stdin closes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How much of the server's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// Everything a client call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server command is malformed.
    #[error("invalid server command: {0}")]
    InvalidCommand(String),
    /// The server command could not be started at all.
    #[error("failed to start the server `{command}`: {message}")]
    Spawn {
        /// The server command, as a person would type it.
        command: String,
        /// Why it could not be started.
        message: String,
    },
    /// The server started but did not complete the handshake.
    #[error(
        "the server `{command}` did not complete the handshake: {message}{}",
        tail(stderr)
    )]
    Handshake {
        /// The server command, as a person would type it.
        command: String,
        /// What went wrong.
        message: String,
        /// The last 4 KiB the server wrote on stderr.
        stderr: String,
    },
    /// The connection to the server ended; pending and later calls fail.
    #[error("the connection to the server was lost{}", tail(stderr))]
    ConnectionLost {
        /// The last 4 KiB the server wrote on stderr.
        stderr: String,
    },
    /// The server answered with an error.
    #[error("{method} failed: {message}")]
    Rpc {
        /// The method called.
        method: String,
        /// The JSON-RPC error code.
        code: i64,
        /// The server's `data.kind` (`notFound`, `spawnFailed`, ...).
        kind: String,
        /// The server's message.
        message: String,
        /// The OS error number, when the OS said why.
        errno: Option<i64>,
    },
    /// A result did not have the expected shape.
    #[error("unexpected result from {method}: {message}")]
    Decode {
        /// The method called.
        method: String,
        /// What did not fit.
        message: String,
    },
}

/// The `tracing` target of the server's stderr lines.
pub const SERVER_STDERR_TARGET: &str = "exec_server::client::server_stderr";

/// Log one line of the server's stderr at the level the server gave it
/// (its own log lines read `TIME LEVEL target: message`); anything else
/// (a panic, ssh's own messages) is a warning.
fn forward_stderr_line(line: &str) {
    let level = line.split_whitespace().nth(1).unwrap_or("");
    match level {
        "ERROR" => tracing::error!(target: SERVER_STDERR_TARGET, "{line}"),
        "INFO" => tracing::info!(target: SERVER_STDERR_TARGET, "{line}"),
        "DEBUG" => tracing::debug!(target: SERVER_STDERR_TARGET, "{line}"),
        "TRACE" => tracing::trace!(target: SERVER_STDERR_TARGET, "{line}"),
        _ => tracing::warn!(target: SERVER_STDERR_TARGET, "{line}"),
    }
}

fn tail(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("; server stderr: {trimmed}")
    }
}

impl ClientError {
    /// The server's `data.kind`, for an RPC error.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ClientError::Rpc { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// How to start a server: a program, its arguments, and optionally extra
/// environment and a working directory.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    /// The program (looked up in `PATH` when it has no `/`).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Variables added to its environment.
    pub env: Vec<(OsString, OsString)>,
    /// Its working directory (default: this process's).
    pub cwd: Option<PathBuf>,
}

impl ServerCommand {
    /// `program` with no arguments.
    pub fn new(program: impl Into<OsString>) -> Self {
        ServerCommand {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }
    }

    /// Add an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Add a variable to the server's environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Start the server in `dir`.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Split a command line the way a POSIX shell splits words: whitespace
    /// separates, single quotes keep everything, double quotes and
    /// backslashes escape. No expansion happens.
    pub fn parse(line: &str) -> Result<Self, ClientError> {
        let words = split_words(line)?;
        let mut words = words.into_iter();
        let program = words
            .next()
            .ok_or_else(|| ClientError::InvalidCommand("the command is empty".into()))?;
        let mut command = ServerCommand::new(program);
        command.args = words.map(OsString::from).collect();
        Ok(command)
    }

    fn display(&self) -> String {
        let mut text = self.program.to_string_lossy().into_owned();
        for arg in &self.args {
            text.push(' ');
            text.push_str(&arg.to_string_lossy());
        }
        text
    }
}

fn split_words(line: &str) -> Result<Vec<String>, ClientError> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => {
                            return Err(ClientError::InvalidCommand(
                                "unclosed single quote".into(),
                            ));
                        }
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => {
                                return Err(ClientError::InvalidCommand(
                                    "unclosed double quote".into(),
                                ));
                            }
                        },
                        Some(c) => w.push(c),
                        None => {
                            return Err(ClientError::InvalidCommand(
                                "unclosed double quote".into(),
                            ));
                        }
                    }
                }
            }
            '\\' => {
                let w = word.get_or_insert_with(String::new);
                if let Some(c) = chars.next() {
                    w.push(c);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

/// A handle to one environment. Cheap to clone; every clone shares one
/// server, started on the first call.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    command: ServerCommand,
    client_name: String,
    conn: OnceCell<Result<Arc<Conn>, ClientError>>,
}

/// A live connection to a started server.
pub(crate) struct Conn {
    /// Lines for the server's stdin; `None` closes it.
    writer: mpsc::UnboundedSender<Option<Vec<u8>>>,
    state: Mutex<ConnState>,
    next_id: AtomicI64,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    pid: i32,
    exited: Arc<AtomicBool>,
    exit_notify: Arc<tokio::sync::Notify>,
    session_id: Mutex<String>,
}

#[derive(Default)]
struct ConnState {
    pending: HashMap<i64, oneshot::Sender<Result<Value, ClientError>>>,
    subscribers: HashMap<String, mpsc::UnboundedSender<Note>>,
    lost: Option<ClientError>,
}

impl Client {
    /// A client for the server started by `command`. Nothing is started yet.
    pub fn new(command: ServerCommand) -> Self {
        Client {
            shared: Arc::new(Shared {
                command,
                client_name: format!("exec-server-client/{}", env!("CARGO_PKG_VERSION")),
                conn: OnceCell::new(),
            }),
        }
    }

    /// Whether the server has been started (or a start was attempted).
    pub fn is_started(&self) -> bool {
        self.shared.conn.initialized()
    }

    /// The server's process id, once started.
    pub fn server_pid(&self) -> Option<i32> {
        match self.shared.conn.get() {
            Some(Ok(conn)) => Some(conn.pid),
            _ => None,
        }
    }

    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, ClientError> {
        let shared = &self.shared;
        shared
            .conn
            .get_or_init(|| connect(&shared.command, &shared.client_name))
            .await
            .clone()
    }

    /// The session id the server gave this client.
    pub async fn session_id(&self) -> Result<String, ClientError> {
        let conn = self.conn().await?;
        Ok(lock(&conn.session_id).clone())
    }

    /// Call any method and return its raw result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.conn().await?.call(method, params).await
    }

    /// Call a method and decode its result.
    pub async fn call_as<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, ClientError> {
        let value = self.call(method, params).await?;
        serde_json::from_value(value).map_err(|e| ClientError::Decode {
            method: method.to_string(),
            message: e.to_string(),
        })
    }

    /// `environment/info`.
    pub async fn environment_info(&self) -> Result<EnvironmentInfo, ClientError> {
        self.call_as("environment/info", json!({})).await
    }

    /// `environment/status`.
    pub async fn environment_status(&self) -> Result<Value, ClientError> {
        self.call("environment/status", json!({})).await
    }

    /// `process/list`, sorted by process id.
    pub async fn list_processes(&self) -> Result<Vec<ProcessSummary>, ClientError> {
        let list: types::ProcessList = self.call_as("process/list", json!({})).await?;
        Ok(list.processes)
    }

    /// `fs/readFile`: the file's bytes.
    pub async fn read_file(&self, path: &Path) -> Result<Vec<u8>, ClientError> {
        let r = self
            .call("fs/readFile", json!({ "path": uri(path) }))
            .await?;
        decode_b64("fs/readFile", &r["dataBase64"])
    }

    /// `fs/writeFile` (atomic on the server).
    pub async fn write_file(&self, path: &Path, data: &[u8]) -> Result<(), ClientError> {
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        self.call(
            "fs/writeFile",
            json!({ "path": uri(path), "dataBase64": data }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/createDirectory`.
    pub async fn create_directory(&self, path: &Path, recursive: bool) -> Result<(), ClientError> {
        self.call(
            "fs/createDirectory",
            json!({ "path": uri(path), "recursive": recursive }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/getMetadata`.
    pub async fn get_metadata(
        &self,
        path: &Path,
        follow_symlinks: bool,
    ) -> Result<Metadata, ClientError> {
        self.call_as(
            "fs/getMetadata",
            json!({ "path": uri(path), "followSymlinks": follow_symlinks }),
        )
        .await
    }

    /// `fs/readDirectory`, sorted by name.
    pub async fn read_directory(&self, path: &Path) -> Result<Vec<DirectoryEntry>, ClientError> {
        let listing: types::DirectoryListing = self
            .call_as("fs/readDirectory", json!({ "path": uri(path) }))
            .await?;
        Ok(listing.entries)
    }

    /// `fs/remove`.
    pub async fn remove(
        &self,
        path: &Path,
        recursive: bool,
        force: bool,
    ) -> Result<(), ClientError> {
        self.call(
            "fs/remove",
            json!({ "path": uri(path), "recursive": recursive, "force": force }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/copy`.
    pub async fn copy(&self, from: &Path, to: &Path, recursive: bool) -> Result<(), ClientError> {
        self.call(
            "fs/copy",
            json!({ "sourcePath": uri(from), "destinationPath": uri(to), "recursive": recursive }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/rename`.
    pub async fn rename(&self, from: &Path, to: &Path) -> Result<(), ClientError> {
        self.call(
            "fs/rename",
            json!({ "sourcePath": uri(from), "destinationPath": uri(to) }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/canonicalize`: the resolved path on the server.
    pub async fn canonicalize(&self, path: &Path) -> Result<PathBuf, ClientError> {
        let r = self
            .call("fs/canonicalize", json!({ "path": uri(path) }))
            .await?;
        crate::protocol::parse_path(r["path"].as_str().unwrap_or("")).map_err(|e| {
            ClientError::Decode {
                method: "fs/canonicalize".into(),
                message: e.to_string(),
            }
        })
    }

    /// `fs/walk` with `options` as `docs/PROTOCOL.md` gives them.
    pub async fn walk(&self, path: &Path, options: Value) -> Result<Walk, ClientError> {
        self.call_as("fs/walk", json!({ "path": uri(path), "options": options }))
            .await
    }

    /// `fs/open`: a streaming handle for `read_block`.
    pub async fn open(&self, handle_id: &str, path: &Path) -> Result<(), ClientError> {
        self.call(
            "fs/open",
            json!({ "handleId": handle_id, "path": uri(path) }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/readBlock`: the bytes and whether the end was reached.
    pub async fn read_block(
        &self,
        handle_id: &str,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        let r = self
            .call(
                "fs/readBlock",
                json!({ "handleId": handle_id, "offset": offset, "len": len }),
            )
            .await?;
        Ok((decode_b64("fs/readBlock", &r["chunk"])?, r["eof"] == true))
    }

    /// `fs/close`.
    pub async fn close(&self, handle_id: &str) -> Result<(), ClientError> {
        self.call("fs/close", json!({ "handleId": handle_id }))
            .await
            .map(|_| ())
    }

    /// Start a process; its output arrives through the returned handle.
    pub async fn start(&self, options: StartOptions) -> Result<Process, ClientError> {
        let conn = self.conn().await?;
        Process::start(self.clone(), conn, options).await
    }

    /// Close the server's stdin, give it a short grace to exit (it kills
    /// its own processes), then kill its process group.
    pub async fn shutdown(&self) {
        if let Some(Ok(conn)) = self.shared.conn.get() {
            let _ = conn.writer.send(None);
            let exited = conn.exit_notify.notified();
            tokio::pin!(exited);
            exited.as_mut().enable();
            if !conn.exited.load(Ordering::SeqCst) {
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, exited).await;
            }
            conn.kill();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let Some(Ok(conn)) = self.conn.get() else {
            return;
        };
        let _ = conn.writer.send(None);
        let conn = conn.clone();
        // Drop can't wait; a short-lived thread gives the server its grace
        // and then makes sure nothing is left behind.
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
            while !conn.exited.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            conn.kill();
        });
    }
}

/// A path as a `file:` URI, so the client works with any server of the protocol.
pub(crate) fn uri(path: &std::path::Path) -> String {
    crate::protocol::path_to_uri(path)
}

pub(crate) fn decode_b64(method: &str, value: &Value) -> Result<Vec<u8>, ClientError> {
    let text = value.as_str().unwrap_or("");
    base64_simd::STANDARD
        .decode_type::<Vec<u8>>(text)
        .map_err(|e| ClientError::Decode {
            method: method.to_string(),
            message: format!("invalid base64: {e}"),
        })
}

impl Conn {
    fn stderr_tail(&self) -> String {
        stderr_text(&self.stderr)
    }

    fn kill(&self) {
        if !self.exited.load(Ordering::SeqCst) && self.pid > 1 {
            // SAFETY: plain syscall; the group leader is our unreaped child.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
    }

    pub(crate) fn subscribe(&self, process_id: &str) -> mpsc::UnboundedReceiver<Note> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = lock(&self.state);
        if state.lost.is_none() {
            state.subscribers.insert(process_id.to_string(), tx);
        }
        rx
    }

    pub(crate) fn unsubscribe(&self, process_id: &str) {
        let mut state = lock(&self.state);
        state.subscribers.remove(process_id);
    }

    /// Send a request and wait for its response. The call is registered
    /// before the connection state is checked, under one lock, so a call
    /// can never slip past a connection loss and wait forever.
    pub(crate) async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            if let Some(lost) = &state.lost {
                return Err(lost.clone());
            }
            state.pending.insert(id, tx);
        }
        let mut line = serde_json::to_vec(&json!({
            "jsonrpc": "2.0", "id": id, "method": method, "params": params
        }))
        .unwrap_or_default();
        line.push(b'\n');
        if self.writer.send(Some(line)).is_err() {
            lock(&self.state).pending.remove(&id);
            return Err(ClientError::ConnectionLost {
                stderr: self.stderr_tail(),
            });
        }
        match rx.await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(ClientError::Rpc {
                code,
                kind,
                message,
                errno,
                ..
            })) => Err(ClientError::Rpc {
                method: method.to_string(),
                code,
                kind,
                message,
                errno,
            }),
            Ok(Err(other)) => Err(other),
            Err(_) => Err(ClientError::ConnectionLost {
                stderr: self.stderr_tail(),
            }),
        }
    }

    fn notify(&self, line: &[u8]) {
        let _ = self.writer.send(Some(line.to_vec()));
    }

    /// Fail every pending call and end every subscription.
    fn lose(&self) {
        let error = ClientError::ConnectionLost {
            stderr: self.stderr_tail(),
        };
        let (pending, subscribers) = {
            let mut state = lock(&self.state);
            if state.lost.is_none() {
                state.lost = Some(error.clone());
            }
            (
                std::mem::take(&mut state.pending),
                std::mem::take(&mut state.subscribers),
            )
        };
        for (_, tx) in pending {
            let _ = tx.send(Err(error.clone()));
        }
        drop(subscribers);
    }

    fn dispatch(&self, line: &[u8]) {
        if let Some(output) = OutputLine::parse(line) {
            // The common case, a chunk of output, skips building a Value.
            let state = lock(&self.state);
            if let Some(tx) = state.subscribers.get(output.process_id) {
                let _ = tx.send(Note::Output {
                    seq: output.seq,
                    stream: output.stream,
                    data: output.data,
                });
            }
            return;
        }
        let Ok(msg) = serde_json::from_slice::<Value>(line) else {
            tracing::warn!("the server wrote a line that is not JSON");
            return;
        };
        if msg.get("method").is_some() {
            // Hand the message over without copying it (an output chunk
            // can be hundreds of KiB).
            match msg["params"]["processId"].as_str().map(str::to_owned) {
                Some(pid) => {
                    let state = lock(&self.state);
                    if let Some(tx) = state.subscribers.get(&pid) {
                        let _ = tx.send(Note::Other(msg));
                    }
                }
                None => tracing::debug!(method = %msg["method"], "unrouted notification"),
            }
            return;
        }
        let Some(id) = msg.get("id").and_then(Value::as_i64) else {
            return;
        };
        let tx = lock(&self.state).pending.remove(&id);
        let Some(tx) = tx else { return };
        let outcome = match msg.get("error") {
            Some(err) => Err(ClientError::Rpc {
                method: String::new(),
                code: err["code"].as_i64().unwrap_or(0),
                kind: err["data"]["kind"].as_str().unwrap_or("").to_string(),
                message: err["message"].as_str().unwrap_or("").to_string(),
                errno: err["data"]["errno"].as_i64(),
            }),
            None => Ok(msg.get("result").cloned().unwrap_or(Value::Null)),
        };
        let _ = tx.send(outcome);
    }
}

/// A notification for one process, as its [`Process`] receives it.
pub(crate) enum Note {
    /// A `process/output` taken apart by [`OutputLine::parse`], decoded.
    Output {
        seq: u64,
        stream: Stream,
        data: Vec<u8>,
    },
    /// Any other notification.
    Other(Value),
}

/// A `process/output` line written in the exact shape this server writes
/// (members in its order, no whitespace, no escapes in the id), taken apart
/// and decoded. Any other shape, from another server or a future version,
/// and a chunk that is not valid base64, are left to the general JSON path
/// (which reports the bad chunk).
#[derive(Debug, PartialEq, Eq)]
struct OutputLine<'a> {
    process_id: &'a str,
    seq: u64,
    stream: Stream,
    data: Vec<u8>,
}

impl<'a> OutputLine<'a> {
    fn parse(line: &'a [u8]) -> Option<Self> {
        let rest = line.strip_prefix(
            b"{\"jsonrpc\":\"2.0\",\"method\":\"process/output\",\"params\":{\"processId\":\"",
        )?;
        let (process_id, rest) = until_quote(rest)?;
        let rest = rest.strip_prefix(b"\",\"seq\":")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let rest = rest[digits..].strip_prefix(b",\"stream\":\"")?;
        let (stream, rest) = until_quote(rest)?;
        let stream = match stream {
            b"stdout" => Stream::Stdout,
            b"stderr" => Stream::Stderr,
            b"pty" => Stream::Pty,
            _ => return None,
        };
        let rest = rest.strip_prefix(b"\",\"chunk\":\"")?;
        // The chunk runs to the closing quote at the end of the line; it is
        // not scanned for a quote here: decoding rejects anything that is
        // not base64.
        let rest = rest
            .strip_suffix(b"\n")
            .map_or(rest, |r| r.strip_suffix(b"\r").unwrap_or(r));
        let chunk = rest.strip_suffix(b"\"}}")?;
        Some(OutputLine {
            process_id: std::str::from_utf8(process_id).ok()?,
            seq,
            stream,
            data: base64_simd::STANDARD.decode_type(chunk).ok()?,
        })
    }
}

/// The bytes before the next `"`, and the rest from that quote on; `None`
/// when an escape or control character comes first (then the text is not a
/// plain JSON string body).
fn until_quote(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = text
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    (text[end] == b'"').then(|| text.split_at(end))
}

fn stderr_text(buf: &Mutex<VecDeque<u8>>) -> String {
    let buf = lock(buf);
    let bytes: Vec<u8> = buf.iter().copied().collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Start the server and complete the handshake.
async fn connect(command: &ServerCommand, client_name: &str) -> Result<Arc<Conn>, ClientError> {
    let shown = command.display();
    let mut cmd = tokio::process::Command::new(&command.program);
    cmd.args(&command.args)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = &command.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|e| ClientError::Spawn {
        command: shown.clone(),
        message: crate::error::lower_io(&e),
    })?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let (mut stdin, stdout, mut stderr) = (
        child.stdin.take().expect("piped stdin"),
        child.stdout.take().expect("piped stdout"),
        child.stderr.take().expect("piped stderr"),
    );
    let (writer, mut lines) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let stderr_buf = Arc::new(Mutex::new(VecDeque::new()));
    let conn = Arc::new(Conn {
        writer,
        state: Mutex::new(ConnState::default()),
        next_id: AtomicI64::new(1),
        stderr: stderr_buf.clone(),
        pid,
        exited: Arc::new(AtomicBool::new(false)),
        exit_notify: Arc::new(tokio::sync::Notify::new()),
        session_id: Mutex::new(String::new()),
    });

    tokio::spawn(async move {
        while let Some(Some(line)) = lines.recv().await {
            if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                break;
            }
        }
        // Dropping stdin closes the server's input.
    });
    let stderr_done = Arc::new(tokio::sync::Notify::new());
    {
        let stderr_done = stderr_done.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match stderr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        for line in text.lines() {
                            forward_stderr_line(line);
                        }
                        let mut tail = lock(&stderr_buf);
                        tail.extend(&buf[..n]);
                        while tail.len() > STDERR_TAIL {
                            tail.pop_front();
                        }
                    }
                }
            }
            stderr_done.notify_waiters();
        });
    }
    {
        let conn = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let mut reader = lines::LineReader::new(stdout);
            while let Ok(Some(line)) = reader.next_line().await {
                match conn.upgrade() {
                    Some(conn) => conn.dispatch(line),
                    None => return,
                }
            }
            if let Some(conn) = conn.upgrade() {
                conn.lose();
            }
        });
    }
    {
        let exited = conn.exited.clone();
        let notify = conn.exit_notify.clone();
        let weak = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let _ = child.wait().await;
            exited.store(true, Ordering::SeqCst);
            notify.notify_waiters();
            // The server is gone even if something still holds its stdout.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(conn) = weak.upgrade() {
                conn.lose();
            }
        });
    }

    let handshake = async {
        let result = conn
            .call("initialize", json!({ "clientName": client_name }))
            .await?;
        conn.notify(b"{\"jsonrpc\":\"2.0\",\"method\":\"initialized\"}\n");
        Ok::<Value, ClientError>(result)
    };
    let failure = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(result)) => {
            let session = result["sessionId"].as_str().unwrap_or("").to_string();
            *lock(&conn.session_id) = session;
            return Ok(conn);
        }
        Ok(Err(ClientError::ConnectionLost { .. })) => {
            "the server exited before answering initialize".to_string()
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs()),
    };
    // Give the stderr reader a moment to catch the server's last words.
    let _ = tokio::time::timeout(Duration::from_millis(500), stderr_done.notified()).await;
    conn.kill();
    conn.lose();
    Err(ClientError::Handshake {
        command: shown,
        message: failure,
        stderr: conn.stderr_tail(),
    })
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words(r#"ssh -p 22 'host name' "a \"b\"" c\ d"#).unwrap(),
            vec!["ssh", "-p", "22", "host name", "a \"b\"", "c d"]
        );
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn the_output_fast_path_reads_what_the_server_writes() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let line = crate::jsonrpc::output_line("p-1", 42, Stream::Stderr, &data);
        let parsed = OutputLine::parse(&line).expect("the server's own shape");
        assert_eq!(parsed.process_id, "p-1");
        assert_eq!(parsed.seq, 42);
        assert_eq!(parsed.stream, Stream::Stderr);
        assert_eq!(parsed.data, data);
        // The empty chunk and a line without its newline.
        let line = crate::jsonrpc::output_line("q", 1, Stream::Pty, b"");
        let parsed = OutputLine::parse(line.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!((parsed.process_id, parsed.data), ("q", Vec::new()));
    }

    #[test]
    fn other_shapes_are_left_to_the_json_path() {
        let good = br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"stdout","chunk":"aGk="}}"#;
        assert!(OutputLine::parse(good).is_some());
        for line in [
            // An escaped id: the general path unescapes it.
            &br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"a"b","seq":1,"stream":"stdout","chunk":"aGk="}}"#[..],
            // Members in another order.
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"seq":1,"processId":"p","stream":"stdout","chunk":"aGk="}}"#,
            // Whitespace.
            br#"{"jsonrpc": "2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"stdout","chunk":"aGk="}}"#,
            // An unknown stream, an extra member, trailing text, a cut line.
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"tty","chunk":"aGk="}}"#,
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"stdout","chunk":"aGk=","x":1}}"#,
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"stdout","chunk":"aGk="}}x"#,
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"stdout","chunk":"aGk="#,
            // A chunk that is not base64.
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"stdout","chunk":"a\"k="}}"#,
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":1,"stream":"stdout","chunk":"aGk"}}"#,
            // A seq too big for u64, and none at all.
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":99999999999999999999999,"stream":"stdout","chunk":"aGk="}}"#,
            br#"{"jsonrpc":"2.0","method":"process/output","params":{"processId":"p","seq":,"stream":"stdout","chunk":"aGk="}}"#,
        ] {
            assert_eq!(OutputLine::parse(line), None, "{}", String::from_utf8_lossy(line));
        }
    }
}
