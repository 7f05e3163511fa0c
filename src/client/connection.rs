//! A live connection to a started server: its stdin writer, its stdout
//! reader (with a fast path for `process/output` lines), pending calls and
//! process subscriptions, and its stderr.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::{ClientError, ServerCommand, Stream};
use crate::jsonrpc;
use crate::sync::lock;

/// How long the handshake may take (an SSH connection can be slow).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of the server's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// At most this many stderr lines of a resume attempt are held back.
const HELD_LINES: usize = 256;

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

/// A live connection to a started server.
pub(crate) struct Conn {
    /// Lines for the server's stdin; `None` closes it.
    pub(super) writer: mpsc::UnboundedSender<Option<Vec<u8>>>,
    state: Mutex<ConnState>,
    pub(super) next_id: AtomicI64,
    pub(super) stderr: Arc<Mutex<VecDeque<u8>>>,
    pub(super) pid: i32,
    pub(super) exited: Arc<AtomicBool>,
    pub(super) exit_notify: Arc<tokio::sync::Notify>,
    pub(super) session_id: Mutex<String>,
    /// The server granted binary frames.
    pub(super) frames: AtomicBool,
    /// The server said it is stopping (`server/stopping`), and why: a lost
    /// connection is then not resumed.
    pub(super) stopped: Mutex<Option<String>>,
}

/// The notification a server sends every connection as it shuts down
/// (an extension).
pub(crate) const SERVER_STOPPING: &str = "server/stopping";

/// A call's answer: parsed, or (for a raw call) the result's JSON text.
pub(crate) enum Answer {
    Value(Value),
    Raw(Vec<u8>),
    /// A result whose `chunk` came as raw bytes (a binary frame).
    Bytes(Value, Vec<u8>),
}

impl Answer {
    /// The result as JSON, `chunk` put back as base64.
    fn into_value(self) -> Value {
        match self {
            Answer::Value(value) => value,
            Answer::Raw(text) => serde_json::from_slice(&text).unwrap_or(Value::Null),
            Answer::Bytes(mut value, bytes) => {
                value["chunk"] = Value::String(base64_simd::STANDARD.encode_type(&bytes[..]));
                value
            }
        }
    }
}

/// A call waiting for its answer.
struct Waiter {
    tx: oneshot::Sender<Result<Answer, ClientError>>,
    /// Wants the result's JSON text, not a `Value`.
    raw: bool,
}

#[derive(Default)]
struct ConnState {
    pending: HashMap<i64, Waiter>,
    subscribers: HashMap<String, mpsc::UnboundedSender<Note>>,
    lost: Option<ClientError>,
}

impl Conn {
    pub(super) fn stderr_tail(&self) -> String {
        stderr_text(&self.stderr)
    }

    pub(super) fn kill(&self) {
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
        Ok(self.call_as(method, params, false).await?.into_value())
    }

    /// A call whose result may carry its `chunk` as raw bytes (then
    /// returned beside the result, whose `chunk` is `null`).
    pub(crate) async fn call_bytes(
        &self,
        method: &str,
        params: Value,
    ) -> Result<(Value, Option<Vec<u8>>), ClientError> {
        Ok(match self.call_as(method, params, false).await? {
            Answer::Bytes(value, bytes) => (value, Some(bytes)),
            other => (other.into_value(), None),
        })
    }

    /// A call whose result comes back as its JSON text, for a caller that
    /// parses it without a `Value` (`process/read`: megabytes of base64).
    pub(crate) async fn call_raw(
        &self,
        method: &str,
        params: Value,
    ) -> Result<Vec<u8>, ClientError> {
        match self.call_as(method, params, true).await? {
            Answer::Raw(text) => Ok(text),
            other => Ok(serde_json::to_vec(&other.into_value()).unwrap_or_default()),
        }
    }

    async fn call_as(&self, method: &str, params: Value, raw: bool) -> Result<Answer, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            if let Some(lost) = &state.lost {
                return Err(lost.clone());
            }
            state.pending.insert(id, Waiter { tx, raw });
        }
        let line = jsonrpc::Request {
            id: jsonrpc::RequestId::Number(id.into()),
            method: method.to_string(),
            params,
        }
        .to_line();
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

    /// Whether the connection is gone (calls fail at once).
    pub(super) fn is_lost(&self) -> bool {
        lock(&self.state).lost.is_some()
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
        for (_, waiter) in pending {
            let _ = waiter.tx.send(Err(error.clone()));
        }
        drop(subscribers);
    }

    /// A binary frame: output, as the notification would have said it.
    fn dispatch_frame(&self, frame: &[u8]) {
        let output = match crate::frame::decode_any(frame) {
            Some(crate::frame::Decoded::Output(output)) => output,
            Some(crate::frame::Decoded::Result { json, data }) => {
                let Some((id, outcome)) = reply_of(json) else {
                    tracing::warn!("the server sent a response frame this client can't read");
                    return;
                };
                let waiter = lock(&self.state).pending.remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter
                        .tx
                        .send(outcome.map(|v| Answer::Bytes(v, data.to_vec())));
                }
                return;
            }
            None => {
                tracing::warn!("the server sent a binary frame this client can't read");
                return;
            }
        };
        self.deliver(
            output.process_id,
            output.seq,
            output.stream,
            output.data.to_vec(),
        );
    }

    /// A chunk of output to its process's subscriber, if any.
    fn deliver(&self, process_id: &str, seq: u64, stream: Stream, data: Vec<u8>) {
        let state = lock(&self.state);
        if let Some(tx) = state.subscribers.get(process_id) {
            let _ = tx.send(Note::Output { seq, stream, data });
        }
    }

    fn dispatch(&self, line: &[u8]) {
        // A raw call's result, in the shape this server writes: handed over
        // as text, unparsed.
        if let Some((id, result)) = result_text(line) {
            let mut state = lock(&self.state);
            if state.pending.get(&id).is_some_and(|w| w.raw) {
                if let Some(waiter) = state.pending.remove(&id) {
                    let _ = waiter.tx.send(Ok(Answer::Raw(result.to_vec())));
                }
                return;
            }
        }
        if let Some(output) = OutputLine::parse(line) {
            // The common case, a chunk of output, skips building a Value.
            self.deliver(output.process_id, output.seq, output.stream, output.data);
            return;
        }
        // Everything else goes through the parser the server uses too.
        let message = match jsonrpc::parse(line) {
            jsonrpc::Incoming::Single(Ok(message)) => message,
            _ => {
                tracing::warn!("the server wrote a line that is not a JSON-RPC message");
                return;
            }
        };
        match message {
            jsonrpc::Message::Notification(note) => {
                // Handed over without copying (a chunk can be hundreds of
                // KiB).
                let key = match note.params["processId"].as_str() {
                    Some(pid) => Some(pid.to_owned()),
                    None if note.method == "fs/changed" => {
                        note.params["watchId"].as_str().map(super::watch::watch_key)
                    }
                    None => None,
                };
                match key {
                    Some(pid) => {
                        let state = lock(&self.state);
                        if let Some(tx) = state.subscribers.get(&pid) {
                            let _ = tx.send(Note::Other(note));
                        }
                    }
                    None if note.method == SERVER_STOPPING => {
                        let reason = note.params["reason"].as_str().unwrap_or("stopping");
                        *lock(&self.stopped) = Some(reason.to_string());
                    }
                    None => tracing::debug!(method = %note.method, "unrouted notification"),
                }
            }
            jsonrpc::Message::Reply(reply) => {
                let Some((id, outcome)) = reply_outcome(reply) else {
                    return;
                };
                let waiter = lock(&self.state).pending.remove(&id);
                let Some(Waiter { tx, .. }) = waiter else {
                    return;
                };
                let _ = tx.send(outcome.map(Answer::Value));
            }
            jsonrpc::Message::Request(request) => {
                tracing::debug!(method = %request.method, "the server asked something; ignored");
            }
        }
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
    Other(jsonrpc::Notification),
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

/// A reply's call id and its outcome as the client reports it.
fn reply_outcome(reply: jsonrpc::Reply) -> Option<(i64, Result<Value, ClientError>)> {
    let Some(jsonrpc::RequestId::Number(id)) = &reply.id else {
        return None;
    };
    let id = id.as_i64()?;
    let outcome = reply.outcome.map_err(|err| ClientError::Rpc {
        method: String::new(),
        code: err["code"].as_i64().unwrap_or(0),
        kind: err["data"]["kind"].as_str().unwrap_or("").to_string(),
        message: err["message"].as_str().unwrap_or("").to_string(),
        errno: err["data"]["errno"].as_i64(),
    });
    Some((id, outcome))
}

/// The reply a response frame's JSON text holds.
fn reply_of(json: &[u8]) -> Option<(i64, Result<Value, ClientError>)> {
    match jsonrpc::parse(json) {
        jsonrpc::Incoming::Single(Ok(jsonrpc::Message::Reply(reply))) => reply_outcome(reply),
        _ => None,
    }
}

/// A response line in the exact shape this server writes a result
/// (`{"jsonrpc":"2.0","id":N,"result":...}`): its id and the result's JSON
/// text. Errors and other shapes are left to the general path.
fn result_text(line: &[u8]) -> Option<(i64, &[u8])> {
    let rest = line.strip_prefix(b"{\"jsonrpc\":\"2.0\",\"id\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let id = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(b",\"result\":")?;
    let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
    Some((id, rest.strip_suffix(b"}")?))
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
/// Connect, retrying for a while when resuming: the daemon may still hold
/// the old connection (`-32010`), or a bridge may be starting.
pub(super) async fn connect_resuming(
    command: &ServerCommand,
    client_name: &str,
    resume: &str,
) -> Result<Arc<Conn>, ClientError> {
    let start = std::time::Instant::now();
    loop {
        let attempt = connect(command, client_name, Some(resume)).await;
        let mut patience = resume_patience(attempt.as_ref().err());
        if let Some(limit) = command.reconnect_for {
            if !patience.is_zero() {
                patience = limit;
            }
        }
        if start.elapsed() >= patience {
            return attempt;
        }
        tracing::debug!("resuming session {resume} failed, retrying");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long to keep trying a resume that failed with `failure`.
fn resume_patience(failure: Option<&ClientError>) -> Duration {
    match failure {
        None => Duration::ZERO,
        // An unknown or expired session won't come back.
        Some(ClientError::Handshake {
            code: Some(-32600), ..
        }) => Duration::ZERO,
        // The session lives, held by a connection the server has not yet
        // seen die (a half-open TCP connection ends at the ping limit, 60 s
        // by default).
        Some(ClientError::Handshake {
            code: Some(-32010), ..
        }) => ATTACHED_PATIENCE,
        // A bridge or daemon may still be starting.
        Some(_) => RESUME_PATIENCE,
    }
}

/// How long a client keeps trying to resume a lost session.
const RESUME_PATIENCE: Duration = Duration::from_secs(30);
/// How long it keeps trying while the server says the session is still
/// attached: past the server's default ping limit (60 s).
const ATTACHED_PATIENCE: Duration = Duration::from_secs(75);

pub(super) async fn connect(
    command: &ServerCommand,
    client_name: &str,
    resume: Option<&str>,
) -> Result<Arc<Conn>, ClientError> {
    let shown = command.display();
    if let Some(pipes) = listener_pipes(command).await {
        let (stdin, stdout) = pipes.map_err(|message| ClientError::Spawn {
            command: shown.clone(),
            message,
        })?;
        let io = Io {
            stdin,
            stdout,
            stderr: None,
            child: None,
        };
        return handshake(shown, client_name, resume, command.binary_frames, io).await;
    }
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
        message: crate::error::os_text(&e),
    })?;
    let io = Io {
        stdin: Box::new(child.stdin.take().expect("piped stdin")),
        stdout: Box::new(child.stdout.take().expect("piped stdout")),
        stderr: Some(child.stderr.take().expect("piped stderr")),
        child: Some(child),
    };
    handshake(shown, client_name, resume, command.binary_frames, io).await
}

/// The two ends of a connection to a server, as a spawned server's pipes
/// are seen: what is written goes to it, what is read comes from it.
pub(super) type Pipes = (
    Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    Box<dyn tokio::io::AsyncRead + Unpin + Send>,
);

/// The pipes of a server that `command` reaches where it listens (a
/// WebSocket, a Noise address, a Unix socket); `None` for a command to
/// start.
async fn listener_pipes(command: &ServerCommand) -> Option<Result<Pipes, String>> {
    match (&command.url, &command.socket) {
        (Some(url), _) => Some(url_lines(command, url).await),
        (None, Some(path)) => Some(unix_pipes(path).await),
        (None, None) => None,
    }
}

/// The pipes of a server listening on the Unix socket `path`, once both
/// the socket and its listener are found to be ours.
async fn unix_pipes(path: &std::path::Path) -> Result<Pipes, String> {
    trusted_socket(path)?;
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| crate::error::os_text(&e))?;
    // The one answer that can't be raced: who listens on it.
    trusted_listener(&stream)?;
    let (read, write) = stream.into_split();
    Ok((Box::new(write), Box::new(read)))
}

/// The pipes of a server at `url`: `ws://`, or `noise+http(s)://`.
async fn url_lines(command: &ServerCommand, url: &str) -> Result<Pipes, String> {
    let keepalive = command.keepalive.unwrap_or(WS_KEEPALIVE);
    if url.starts_with("noise+") {
        #[cfg(feature = "remote")]
        {
            let target = super::noise::Target::parse(url)?;
            let token = match &command.registry_token {
                Some(token) => token.0.clone(),
                None => std::env::var(super::noise::AUTH_TOKEN_VARIABLE).unwrap_or_default(),
            };
            return super::noise::lines(&target, token.trim(), keepalive).await;
        }
        #[cfg(not(feature = "remote"))]
        return Err("this build has no remote executors (the `remote` feature)".into());
    }
    ws_lines(url, keepalive).await
}

/// Carry this process's stdin to the server `command` reaches (a Noise
/// address, a WebSocket or a Unix socket) and its messages to stdout,
/// until either side ends: a remote server seen as a spawned one.
pub fn bridge_stdio(command: ServerCommand) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let address = command.display();
    let outcome = runtime.block_on(async move {
        let Some(pipes) = listener_pipes(&command).await else {
            return Err(format!(
                "{address}: expected noise+http://HOST:PORT/ENVIRONMENT_ID, ws://IP:PORT or unix:PATH"
            ));
        };
        let (mut write, mut read) = pipes?;
        // Stdin's end stops the sending; what the server still says
        // (answers to the last requests) is carried until it has been
        // quiet for BRIDGE_DRAIN, then the stream is closed (the session
        // detaches, as when a pipe closes).
        let mut stdin = tokio::io::stdin();
        let mut stdout = tokio::io::stdout();
        let mut up = vec![0u8; 64 * 1024];
        let mut down = vec![0u8; 64 * 1024];
        let mut stdin_open = true;
        let mut quiet_until = tokio::time::Instant::now();
        loop {
            tokio::select! {
                n = stdin.read(&mut up), if stdin_open => match n {
                    Ok(n) if n > 0 => {
                        if write.write_all(&up[..n]).await.is_err() {
                            break;
                        }
                    }
                    _ => {
                        stdin_open = false;
                        quiet_until = tokio::time::Instant::now() + BRIDGE_DRAIN;
                    }
                },
                n = read.read(&mut down) => match n {
                    Ok(n) if n > 0 => {
                        if stdout.write_all(&down[..n]).await.is_err()
                            || stdout.flush().await.is_err()
                        {
                            break;
                        }
                        quiet_until = tokio::time::Instant::now() + BRIDGE_DRAIN;
                    }
                    _ => break,
                },
                () = tokio::time::sleep_until(quiet_until), if !stdin_open => break,
            }
        }
        let _ = write.shutdown().await;
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_millis(200));
    outcome
}

/// How long a bridge whose stdin ended still waits for the server's last
/// words.
const BRIDGE_DRAIN: Duration = Duration::from_millis(300);

/// How often a WebSocket server is pinged by default.
const WS_KEEPALIVE: Duration = Duration::from_secs(30);

/// The largest WebSocket message accepted from a server (its own limit).
const WS_MAX_MESSAGE: usize = 64 << 20;

/// Open a WebSocket connection to `url` and see it as lines, as a
/// spawned server's pipes are seen: each message that comes in is one line
/// of the returned reader; each line written goes out as one text message.
/// A task carries both ways and ends (closing the TCP connection) when
/// either side ends, or when the server answers nothing, not even a ping,
/// for two `keepalive` intervals.
async fn ws_lines(url: &str, keepalive: Duration) -> Result<Pipes, String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    let rest = url.strip_prefix("ws://").ok_or("only ws:// is supported")?;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| crate::error::os_text(&e))?;
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .max_message_size(Some(WS_MAX_MESSAGE))
        .max_frame_size(Some(WS_MAX_MESSAGE));
    let (socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("websocket handshake with {authority}: {e}"))?;
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (their_read, mut their_write) = tokio::io::split(theirs);
    let (mut sink, mut source) = socket.split();
    tokio::spawn(async move {
        // The shared framer keeps a cut-short read in its own buffer, so
        // it may lose a race with the other branches.
        let mut lines = crate::lines::LineReader::new(their_read);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        // Silence, or a send stuck, for this long: the server is gone.
        let limit = keepalive.saturating_mul(2);
        loop {
            tokio::select! {
                read = lines.next_line() => {
                    let Ok(Some(line)) = read else { break };
                    let text = String::from_utf8_lossy(line.trim_ascii_end()).into_owned();
                    let send = sink.send(Message::Text(text.into()));
                    if !matches!(tokio::time::timeout(limit, send).await, Ok(Ok(()))) {
                        break;
                    }
                }
                message = source.next() => {
                    let Some(Ok(message)) = message else { break };
                    heard = tokio::time::Instant::now();
                    let (data, newline) = match &message {
                        Message::Text(text) => (text.as_bytes(), true),
                        // A binary frame says its own length.
                        Message::Binary(data) => (&data[..], data.first() != Some(&crate::frame::MARK)),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if their_write.write_all(data).await.is_err()
                        || (newline && their_write.write_all(b"\n").await.is_err())
                    {
                        break;
                    }
                }
                _ = ping.tick() => {
                    if !keep_alive(&mut sink, heard, limit, "the websocket server").await {
                        break;
                    }
                }
            }
        }
        // Ending the task closes the TCP connection, and the reader sees
        // EOF: the connection is lost (and resumed).
    });
    let (read, write) = tokio::io::split(ours);
    Ok((Box::new(write), Box::new(read)))
}

/// One tick of a WebSocket client's keep-alive: false when the peer
/// (`who`) has said nothing for `limit` (it is taken as lost) or a ping
/// can't be sent within it.
pub(super) async fn keep_alive<S>(
    sink: &mut S,
    heard: tokio::time::Instant,
    limit: Duration,
    who: &str,
) -> bool
where
    S: futures_util::Sink<tokio_tungstenite::tungstenite::Message> + Unpin,
{
    use futures_util::SinkExt;
    if heard.elapsed() >= limit {
        tracing::debug!("{who} answers nothing; taking the connection as lost");
        return false;
    }
    let send = sink.send(tokio_tungstenite::tungstenite::Message::Ping(
        Vec::new().into(),
    ));
    matches!(tokio::time::timeout(limit, send).await, Ok(Ok(())))
}

/// The ends of a connection: a spawned server's pipes, or a socket.
struct Io {
    stdin: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    stdout: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    stderr: Option<tokio::process::ChildStderr>,
    child: Option<tokio::process::Child>,
}

/// Start the connection's tasks and complete the handshake (resuming
/// `resume` when given).
async fn handshake(
    shown: String,
    client_name: &str,
    resume: Option<&str>,
    frames: bool,
    io: Io,
) -> Result<Arc<Conn>, ClientError> {
    let Io {
        mut stdin,
        stdout,
        stderr,
        child,
    } = io;
    let pid = child
        .as_ref()
        .and_then(|c| c.id())
        .map(|p| p as i32)
        .unwrap_or(0);
    let (writer, mut lines) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let stderr_buf = Arc::new(Mutex::new(VecDeque::new()));
    // A resume's attempts keep the server command's stderr (ssh saying it
    // can't connect, again and again) to themselves until one succeeds;
    // a failed one's is in its error.
    let held: Arc<Mutex<Option<Vec<String>>>> = Arc::new(Mutex::new(resume.map(|_| Vec::new())));
    let conn = Arc::new(Conn {
        writer,
        state: Mutex::new(ConnState::default()),
        next_id: AtomicI64::new(1),
        stderr: stderr_buf.clone(),
        pid,
        exited: Arc::new(AtomicBool::new(false)),
        exit_notify: Arc::new(tokio::sync::Notify::new()),
        session_id: Mutex::new(String::new()),
        frames: AtomicBool::new(false),
        stopped: Mutex::new(None),
    });

    tokio::spawn(async move {
        while let Some(Some(line)) = lines.recv().await {
            if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                break;
            }
        }
        // Shutting down stdin ends the server's input (a socket's write
        // half too, which dropping alone does not close while the read
        // half lives).
        let _ = stdin.shutdown().await;
    });
    let stderr_done = Arc::new(tokio::sync::Notify::new());
    if let Some(mut stderr) = stderr {
        let stderr_done = stderr_done.clone();
        let held = held.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match stderr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        for line in text.lines() {
                            match lock(&held).as_mut() {
                                Some(lines) if lines.len() < HELD_LINES => {
                                    lines.push(line.to_string())
                                }
                                Some(_) => {}
                                None => forward_stderr_line(line),
                            }
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
        // Without a child (a socket), the server is gone for us when its
        // end of the connection is: shutdown waits for that, not a grace.
        let socket_ends = child.is_none();
        let exited = conn.exited.clone();
        let notify = conn.exit_notify.clone();
        let conn = Arc::downgrade(&conn);
        tokio::spawn(async move {
            use crate::lines::Piece;
            let mut reader = crate::lines::LineReader::with_frames(stdout);
            while let Ok(Some(piece)) = reader.next_piece().await {
                let Some(conn) = conn.upgrade() else { return };
                match piece {
                    Piece::Line(line) => conn.dispatch(line),
                    Piece::Frame(frame) => conn.dispatch_frame(frame),
                    Piece::TooLong(_) => {}
                }
            }
            if socket_ends {
                exited.store(true, Ordering::SeqCst);
                notify.notify_waiters();
            }
            if let Some(conn) = conn.upgrade() {
                conn.lose();
            }
        });
    }
    if let Some(mut child) = child {
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
        // Output as raw bytes when the server offers it (servers that
        // don't ignore the member and send base64 JSON).
        let mut params = json!({ "clientName": client_name });
        if frames {
            params["capabilities"] = json!({"binaryFrames": {"version": crate::frame::VERSION}});
        }
        if let Some(id) = resume {
            params["resumeSessionId"] = json!(id);
        }
        let result = conn.call("initialize", params).await?;
        conn.notify(
            &jsonrpc::Notification {
                method: "initialized".into(),
                params: Value::Null,
            }
            .to_line(),
        );
        Ok::<Value, ClientError>(result)
    };
    let (failure, code) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(result)) => {
            let session = result["sessionId"].as_str().unwrap_or("").to_string();
            *lock(&conn.session_id) = session;
            let granted = result["capabilities"]["binaryFrames"]["version"].as_u64();
            conn.frames.store(granted.is_some(), Ordering::SeqCst);
            // Resumed: what the server command said meanwhile is news now.
            for line in lock(&held).take().unwrap_or_default() {
                forward_stderr_line(&line);
            }
            return Ok(conn);
        }
        Ok(Err(ClientError::ConnectionLost { .. })) => (
            "the server exited before answering initialize".to_string(),
            None,
        ),
        Ok(Err(ClientError::Rpc { code, message, .. })) => {
            (format!("{message} ({code})"), Some(code))
        }
        Ok(Err(err)) => (err.to_string(), None),
        Err(_) => (
            format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs()),
            None,
        ),
    };
    // Give the stderr reader a moment to catch the server's last words.
    let _ = tokio::time::timeout(Duration::from_millis(500), stderr_done.notified()).await;
    conn.kill();
    conn.lose();
    Err(ClientError::Handshake {
        command: shown,
        message: failure,
        code,
        stderr: conn.stderr_tail(),
    })
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn a_resume_waits_longest_for_a_session_still_attached() {
        let refused = |message: &str, code: i64| ClientError::Handshake {
            command: "x".into(),
            message: message.into(),
            code: Some(code),
            stderr: String::new(),
        };
        let attached = refused(
            "session s is already attached to another connection (-32010)",
            -32010,
        );
        let unknown = refused("unknown session id s (-32600)", -32600);
        let gone = ClientError::Spawn {
            command: "x".into(),
            message: "connection refused".into(),
        };
        assert_eq!(resume_patience(Some(&attached)), ATTACHED_PATIENCE);
        assert_eq!(resume_patience(Some(&unknown)), Duration::ZERO);
        assert_eq!(resume_patience(Some(&gone)), RESUME_PATIENCE);
        assert!(
            ATTACHED_PATIENCE > Duration::from_secs(60),
            "past the ping limit"
        );
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

/// Refuse a socket another user could have put (or could replace) at
/// `path` before anything is sent to it: it must be owned by us or root,
/// and its directory must not be writable by others (unless sticky, where
/// only an entry's owner may rename or remove it).
fn trusted_socket(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    // SAFETY: getter without failure modes.
    let ours = unsafe { libc::geteuid() };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // Connecting says what is wrong.
        Err(_) => return Ok(()),
    };
    if !meta.file_type().is_socket() {
        return Err(format!("{} is not a socket", path.display()));
    }
    if meta.uid() != ours && meta.uid() != 0 {
        return Err(format!(
            "refusing {}: it belongs to uid {}, not to us ({ours}) or root",
            path.display(),
            meta.uid()
        ));
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_path_buf(),
        None => std::path::PathBuf::from("."),
    };
    let dir_meta = std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mode = dir_meta.mode();
    let others_write = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if (dir_meta.uid() != ours && dir_meta.uid() != 0) || (others_write && !sticky) {
        return Err(format!(
            "refusing {}: its directory {} can be changed by other users",
            path.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// The process listening on `stream`'s socket must run as us or root.
fn trusted_listener(stream: &tokio::net::UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("the server's credentials could not be read: {e}"))?;
    // SAFETY: getter without failure modes.
    let ours = unsafe { libc::geteuid() };
    if cred.uid() != ours && cred.uid() != 0 {
        return Err(format!(
            "refusing the server: it runs as uid {}, not as us ({ours}) or root",
            cred.uid()
        ));
    }
    Ok(())
}
