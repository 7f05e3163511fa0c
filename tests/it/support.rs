//! A small client for tests: spawns the real binary, sends lines, receives
//! messages with timeouts.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn bin() -> &'static str {
    quiet_logs();
    env!("CARGO_BIN_EXE_exec-server")
}

/// The servers the tests start log nothing (their expected refusals and
/// errors are not news in a passing run) unless `EXEC_SERVER_TEST_LOG`
/// names a filter (`EXEC_SERVER_TEST_LOG=debug cargo test ...`), or the
/// caller set `EXEC_SERVER_LOG`/`RUST_LOG` already. A test that reads a
/// server's log sets `EXEC_SERVER_LOG` on its command.
fn quiet_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("EXEC_SERVER_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
            let filter = std::env::var("EXEC_SERVER_TEST_LOG").unwrap_or_else(|_| "off".into());
            // SAFETY: std's own environment accesses (Command::spawn
            // included) take its environment lock; nothing in this test
            // binary reads the environment through libc meanwhile.
            unsafe { std::env::set_var("EXEC_SERVER_LOG", filter) };
        }
    });
}

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(text: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("base64 string"))
        .expect("valid base64")
}

/// A running server and our ends of its pipes (or of a connection to its
/// Unix socket).
pub struct Server {
    pub child: Child,
    stdin: Option<Box<dyn Write + Send>>,
    /// The socket's directory, for a server started with [`Server::start_unix`].
    _socket_dir: Option<tempfile::TempDir>,
    /// A `--persist` bridge: its daemon is stopped on drop.
    persist: bool,
    /// For a server reached through `exec-server bridge noise+http://…`:
    /// the relay and the executor (the server proper).
    pub remote: Option<crate::remote::Remote>,
    lines: Receiver<String>,
    /// Messages received but not yet asked for.
    backlog: VecDeque<Value>,
    next_id: i64,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        let mut cmd = Command::new(bin());
        cmd.arg("--stdio").args(args);
        Server::from_command(cmd)
    }

    /// Start the server from a prepared command (extra flags, process group).
    pub fn from_command(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn exec-server");
        let stdout = child.stdout.take().unwrap();
        let stdin = child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn Write + Send>);
        Server {
            stdin,
            child,
            _socket_dir: None,
            persist: false,
            remote: None,
            lines: read_lines(stdout),
            backlog: VecDeque::new(),
            next_id: 1000,
        }
    }

    /// Start a server listening on a Unix socket of its own (`--listen
    /// unix:PATH`) and connect to it: the same conversation, over a socket.
    pub fn start_unix(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exec.sock");
        let listen = format!("unix:{}", path.display());
        let (child, first) = spawn_listening(&[&["--listen", &listen], args].concat());
        assert_eq!(first, listen);
        let mut server = Server::attach_unix(child, &path);
        server._socket_dir = Some(dir);
        server
    }

    /// [`Server::start_unix`] from a prepared command (its environment):
    /// `--listen unix:PATH` is added.
    pub fn start_unix_command(mut cmd: Command) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exec.sock");
        let listen = format!("unix:{}", path.display());
        cmd.args(["--listen", &listen]);
        let (child, first) = listening(cmd);
        assert_eq!(first, listen);
        let mut server = Server::attach_unix(child, &path);
        server._socket_dir = Some(dir);
        server
    }

    /// A connection to the Unix socket `path` of the running server `child`.
    pub fn attach_unix(child: Child, path: &std::path::Path) -> Server {
        let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        let reader = stream.try_clone().unwrap();
        Server {
            stdin: Some(Box::new(SocketEnd(stream))),
            child,
            _socket_dir: None,
            persist: false,
            remote: None,
            lines: read_lines(reader),
            backlog: VecDeque::new(),
            next_id: 1000,
        }
    }

    /// A WebSocket connection to the running server `child` at `url`
    /// (`header` added to the upgrade request).
    pub fn attach_ws(child: Child, url: &str, header: Option<(&str, &str)>) -> Server {
        let (writer, lines) = ws_lines(url, header);
        Server {
            stdin: Some(Box::new(writer)),
            child,
            _socket_dir: None,
            persist: false,
            remote: None,
            lines,
            backlog: VecDeque::new(),
            next_id: 1000,
        }
    }

    /// Complete the handshake on a connection made with [`Server::attach_unix`].
    pub fn handshake(&mut self) {
        let init = self.request("initialize", json!({"clientName": "it"}));
        assert!(init["result"]["sessionId"].is_string(), "{init}");
        self.send(&json!({"method": "initialized"}));
    }

    /// Resume `session` on this connection (after [`Server::reconnect_unix`])
    /// and complete the handshake.
    pub fn resume(&mut self, session: &str) {
        let resumed = self.request(
            "initialize",
            json!({"clientName": "it", "resumeSessionId": session}),
        );
        assert_eq!(resumed["result"]["sessionId"], session, "{resumed}");
        self.send(&json!({"method": "initialized"}));
    }

    /// Start and complete the handshake.
    pub fn started(args: &[&str]) -> Server {
        let mut server = Server::start(args);
        server.handshake();
        server
    }

    pub fn send_raw(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    pub fn send(&mut self, value: &Value) {
        self.send_raw(&value.to_string());
    }

    /// Start a server listening on WebSocket `ws://127.0.0.1:0` (plus
    /// `args`) and connect to it: one JSON-RPC message per WebSocket
    /// message, seen here as lines.
    pub fn start_ws(args: &[&str]) -> Server {
        let (child, url) = spawn_listening(&[&["--listen", "ws://127.0.0.1:0"], args].concat());
        Server::attach_ws(child, &url, None)
    }

    /// Start `exec-server --stdio --persist=NAME` (plus `args`): a bridge
    /// to a daemon of its own, in a runtime directory of its own. The
    /// daemon is stopped when this is dropped.
    pub fn start_persist(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["--stdio", "--persist=transcript"])
            .args(args)
            .env("XDG_RUNTIME_DIR", dir.path());
        let mut server = Server::from_command(cmd);
        server._socket_dir = Some(dir);
        server.persist = true;
        server
    }

    /// A relay, an executor `exec-server --remote` (plus `args`) and an
    /// `exec-server bridge` to it: the same conversation, over a Noise
    /// stream through the relay, seen on the bridge's stdio.
    pub fn start_noise(args: &[&str]) -> Server {
        let remote = crate::remote::Remote::start(args);
        let mut server = Server::from_command(remote.bridge());
        server.remote = Some(remote);
        server
    }

    /// A server started with [`Server::start_unix`]: drop this connection
    /// and open a new one to the same socket (messages not yet taken are
    /// forgotten).
    pub fn reconnect_unix(&mut self) {
        let path = self
            ._socket_dir
            .as_ref()
            .expect("a unix server")
            .path()
            .join("exec.sock");
        self.stdin = None;
        let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        self.lines = read_lines(stream.try_clone().unwrap());
        self.stdin = Some(Box::new(SocketEnd(stream)));
        self.backlog.clear();
    }

    /// Close our end: stdin of a stdio server, the connection of a
    /// socket one.
    pub fn close_stdin(&mut self) {
        if let Some(mut end) = self.stdin.take() {
            let _ = end.flush();
        }
    }

    /// The next line from the server, parsed; `None` on timeout or EOF.
    pub fn recv_line(&mut self, timeout: Duration) -> Option<Value> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                Some(serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("server wrote a line that is not JSON ({e}): {line}")
                }))
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Send a request and wait for its response; other messages are kept.
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        self.response(id)
    }

    /// Wait for the response with `id`.
    pub fn response(&mut self, id: i64) -> Value {
        self.take(|m| m["id"] == id, &format!("the response to request {id}"))
    }

    /// Whether the response with `id` stays away for `wait` (what arrives
    /// meanwhile is kept).
    pub fn no_response_for(&mut self, id: i64, wait: Duration) -> bool {
        if self.backlog.iter().any(|m| m["id"] == id) {
            return false;
        }
        let deadline = Instant::now() + wait;
        while let Some(msg) = self.recv_line(deadline.saturating_duration_since(Instant::now())) {
            let found = msg["id"] == id;
            self.backlog.push_back(msg);
            if found {
                return false;
            }
        }
        true
    }

    /// The id the next [`Server::request`] will use; for requests sent by
    /// hand with [`Server::send`] meanwhile, take ids from here.
    pub fn take_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// Wait for a notification matching `pred`.
    pub fn notification(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        self.take(
            |m| m.get("id").is_none() && pred(m),
            "a matching notification",
        )
    }

    /// Wait for a request from the server (`network/policyRequest`).
    pub fn server_request(&mut self, method: &str) -> Value {
        self.take(
            |m| m.get("id").is_some() && m["method"] == method,
            &format!("a {method} request from the server"),
        )
    }

    /// The first message (kept earlier or arriving within the timeout) that
    /// matches `pred`; other messages are kept for later.
    fn take(&mut self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i).unwrap();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = self
                .recv_line(left)
                .unwrap_or_else(|| panic!("timed out waiting for {what}"));
            if pred(&msg) {
                return msg;
            }
            self.backlog.push_back(msg);
        }
    }

    /// The result of a request, panicking with the message on error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let response = self.request(method, params);
        assert!(
            response.get("error").is_none(),
            "{method} failed: {response}"
        );
        response["result"].clone()
    }

    /// Start a process and return its result.
    pub fn start_process(&mut self, id: &str, argv: &[&str], extra: Value) -> Value {
        let mut params = json!({"processId": id, "argv": argv, "cwd": "/tmp"});
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                params[k] = v;
            }
        }
        self.call("process/start", params)
    }

    /// Read all output of a process until it is closed; returns
    /// (bytes of each stream concatenated in seq order, exit code).
    pub fn collect(&mut self, id: &str) -> (Vec<u8>, Option<i64>) {
        let (out, last) = self.read_until_closed(id);
        (out, last["exitCode"].as_i64())
    }

    /// Read all output of a process until it is closed; returns the bytes
    /// in seq order and the final `process/read` result.
    pub fn read_until_closed(&mut self, id: &str) -> (Vec<u8>, Value) {
        let mut after = 0;
        let mut out = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "process {id} did not close in time"
            );
            let r = self.call(
                "process/read",
                json!({"processId": id, "afterSeq": after, "waitMs": 2000}),
            );
            for chunk in r["chunks"].as_array().unwrap() {
                out.extend(unb64(&chunk["chunk"]));
            }
            after = r["nextSeq"].as_u64().unwrap() - 1;
            if r["closed"] == true {
                return (out, r);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let (true, Some(dir)) = (self.persist, &self._socket_dir) {
            let _ = Command::new(bin())
                .args(["daemon", "stop", "--persist", "transcript"])
                .env("XDG_RUNTIME_DIR", dir.path())
                .output();
        }
    }
}

/// Our end of a socket connection: dropping it ends the connection (the
/// reader's clone of the socket would otherwise keep it open).
struct SocketEnd(std::os::unix::net::UnixStream);

impl Write for SocketEnd {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for SocketEnd {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// A thread reading `input` line by line into a channel.
fn read_lines(input: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(input).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Whether a pid is gone (no such process, or a zombie awaiting its reaper).
pub fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            state.starts_with('Z') || state.starts_with('X')
        }
    }
}

/// Poll `cond` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a test that needs `what` (a system package) can run. When it is
/// missing the test is skipped with a notice on stderr, unless
/// `EXEC_SERVER_TEST_REQUIRE` names it (comma-separated, or `all`): then
/// the test fails, so that CI, which installs everything, never skips.
pub fn available(what: &str, present: bool, why: &str) -> bool {
    if present {
        return true;
    }
    let required = std::env::var("EXEC_SERVER_TEST_REQUIRE").unwrap_or_default();
    if required
        .split(',')
        .any(|r| r.trim() == what || r.trim() == "all")
    {
        panic!("{why} (EXEC_SERVER_TEST_REQUIRE={required} makes this test mandatory)");
    }
    // Straight to stderr: the test harness captures eprintln! of tests
    // that pass, and this notice must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
    false
}

macro_rules! numbered {
    () => {
        "for i in $(seq 1 150); do echo $i; sleep 0.01; done"
    };
}

/// A shell script that prints 1 to 150, one a line, 10 ms apart: output
/// that is still streaming when a test cuts a connection.
pub const NUMBERED: &str = numbered!();

/// [`NUMBERED`], then exit 7: a status a resumed wait must still report.
pub const NUMBERED_EXIT_7: &str = concat!(numbered!(), "; exit 7");

/// `exec-server run --via VIA -- sh -c NUMBERED_EXIT_7` with `env` added,
/// whose server command (the runner's children: a bridge, an ssh) is
/// SIGKILLed after `after`, as a dropped connection would end it; what the
/// runner printed and its status once it is done.
pub fn run_via_losing_its_server(
    via: &str,
    env: &[(&str, &std::ffi::OsStr)],
    after: Duration,
) -> std::process::Output {
    let child = run_via(via, env, NUMBERED_EXIT_7);
    std::thread::sleep(after);
    kill_server_command(&child);
    child.wait_with_output().unwrap()
}

/// `exec-server run --via VIA -- sh -c SCRIPT` with `env`, stdin closed,
/// stdout and stderr piped.
pub fn run_via(via: &str, env: &[(&str, &std::ffi::OsStr)], script: &str) -> Child {
    Command::new(bin())
        .args(["run", "--via", via, "--", "sh", "-c", script])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGKILL the server command under an `exec-server run` (its bridge, its
/// ssh): as a dropped connection would end it.
pub fn kill_server_command(runner: &Child) {
    let server = children_of(runner.id());
    assert!(!server.is_empty(), "no server command under the runner");
    for pid in server {
        // SAFETY: plain syscall on the runner's child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The library's options to start [`NUMBERED_EXIT_7`] as process `n`.
pub fn numbered_exit_7() -> exec_server::client::StartOptions {
    exec_server::client::StartOptions::new("n", ["sh", "-c", NUMBERED_EXIT_7]).cwd("/tmp")
}

/// Assert that `output` is exactly what [`NUMBERED`] prints: every line
/// once, in order.
pub fn assert_numbered(output: &[u8]) {
    let text = String::from_utf8_lossy(output);
    let want: Vec<String> = (1..=150).map(|i| i.to_string()).collect();
    assert_eq!(text.split_whitespace().collect::<Vec<_>>(), want);
}

/// The children of `pid` (of all its threads).
pub fn children_of(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Start the binary with `args` (a `--listen` address among them) and
/// wait until it says where it listens: the child and its first stdout
/// line.
pub fn spawn_listening(args: &[&str]) -> (Child, String) {
    let mut command = Command::new(bin());
    command.args(args).stderr(Stdio::inherit());
    listening(command)
}

/// Start `command` (a server with a `--listen` address) and wait until it
/// says where it listens: the child and its first stdout line.
pub fn listening(mut command: Command) -> (Child, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn exec-server");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    (child, first.trim().to_string())
}

/// The watchdog of a server started by a test: its child named
/// `exec-watchdog` (waited for: the watchdog names itself just after the
/// fork).
pub fn watchdog_of(server: u32) -> i32 {
    let find = || {
        children_of(server).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "exec-watchdog")
        })
    };
    let mut found = None;
    eventually(Duration::from_secs(5), || {
        found = find();
        found.is_some()
    });
    found.expect("the server has a watchdog")
}

/// A WebSocket connection to `url`, seen as lines: what is written to the
/// writer goes out one message per line; each message that comes in is a
/// line. `header` is added to the upgrade request. Dropping the writer
/// cuts the TCP connection without a close frame.
pub fn ws_lines(url: &str, header: Option<(&str, &str)>) -> (WsWriter, Receiver<String>) {
    use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
    let address = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let stream = std::net::TcpStream::connect(&address).unwrap();
    let mut request = url.into_client_request().unwrap();
    if let Some((name, value)) = header {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (mut socket, _) = tungstenite::client::client(request, stream.try_clone().unwrap())
        .expect("websocket handshake");
    stream
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let (out_tx, out_rx) = channel::<Option<String>>();
    let (in_tx, in_rx) = channel();
    std::thread::spawn(move || {
        loop {
            loop {
                match out_rx.try_recv() {
                    Ok(Some(line)) => {
                        if socket.send(Message::Text(line.into())).is_err() {
                            return;
                        }
                    }
                    // Our end is gone: cut the connection, no close frame.
                    Ok(None) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                }
            }
            match socket.read() {
                Ok(Message::Text(text)) => {
                    if in_tx.send(text.to_string()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(err))
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    });
    (
        WsWriter {
            pending: Vec::new(),
            out: out_tx,
        },
        in_rx,
    )
}

/// The writing side of [`ws_lines`].
pub struct WsWriter {
    pending: Vec<u8>,
    out: std::sync::mpsc::Sender<Option<String>>,
}

impl Write for WsWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            self.out
                .send(Some(text))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for WsWriter {
    fn drop(&mut self) {
        let _ = self.out.send(None);
    }
}

/// `seq 1 3000000`, then exit 7: the burst the loss tests drop a
/// connection in the middle of.
pub const BURST: &str = "seq 1 3000000; exit 7";

/// `exec-server run --via VIA -- sh -c BURST`, with `drop` called once the
/// runner has printed `after` bytes (mid-burst); checks that every line
/// arrived once, in order, that nothing was said lost, and the exit code.
pub fn burst_survives(
    via: &str,
    env: &[(&str, &std::ffi::OsStr)],
    after: usize,
    drop: impl FnOnce(&Child),
) {
    use std::io::Read;
    let mut child = run_via(via, env, BURST);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut out = Vec::with_capacity(24 << 20);
    let mut buf = vec![0u8; 1 << 16];
    let mut dropped = false;
    let mut drop = Some(drop);
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if !dropped && out.len() >= after {
            dropped = true;
            if let Some(drop) = drop.take() {
                drop(&child);
            }
        }
    }
    let status = child.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(
        dropped,
        "the burst ended before {after} bytes: nothing was dropped"
    );
    static EXPECTED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let expected = EXPECTED.get_or_init(|| {
        let mut all = Vec::with_capacity(23 << 20);
        for n in 1..=3_000_000u32 {
            let _ = writeln!(all, "{n}");
        }
        all
    });
    if out != *expected {
        let first = out
            .iter()
            .zip(expected.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(out.len().min(expected.len()));
        let at = first.saturating_sub(40);
        panic!(
            "after a drop at {after} bytes: {} bytes of {}, first difference at {first}: {:?} instead of {:?}; stderr: {errors}",
            out.len(),
            expected.len(),
            String::from_utf8_lossy(&out[at..(first + 40).min(out.len())]),
            String::from_utf8_lossy(&expected[at..(first + 40).min(expected.len())]),
        );
    }
    assert_eq!(status.code(), Some(7), "{errors}");
    assert!(!errors.contains("were lost"), "{errors}");
}

/// A TCP proxy on loopback in front of `upstream` whose connections the
/// test can cut (no close frame, as a dropped network would) or freeze
/// (nothing passes on them any more, not even a close: half-open). New
/// connections always pass.
pub struct CuttableProxy {
    pub address: String,
    live: std::sync::Arc<std::sync::Mutex<Vec<ProxiedConnection>>>,
}

struct ProxiedConnection {
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    dead: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CuttableProxy {
    pub fn start(upstream: &str) -> CuttableProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = upstream.to_string();
        let connections = live.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    return;
                };
                let dead = std::sync::Arc::new(AtomicBool::new(false));
                connections.lock().unwrap().push(ProxiedConnection {
                    client: client.try_clone().unwrap(),
                    server: server.try_clone().unwrap(),
                    dead: dead.clone(),
                });
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let dead = dead.clone();
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if !dead.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        if !dead.load(Ordering::SeqCst) {
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        }
                    });
                }
            }
        });
        CuttableProxy { address, live }
    }

    /// Cut every connection through the proxy; how many there were.
    pub fn cut(&self) -> usize {
        let mut connections = self.live.lock().unwrap();
        for c in connections.iter() {
            let _ = c.client.shutdown(std::net::Shutdown::Both);
            let _ = c.server.shutdown(std::net::Shutdown::Both);
        }
        std::mem::take(&mut *connections).len()
    }

    /// Let nothing through on every connection open now, and close none of
    /// them; how many there were.
    pub fn freeze(&self) -> usize {
        let mut connections = self.live.lock().unwrap();
        for c in connections.iter() {
            c.dead.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // Keep the sockets open for as long as the test runs.
        let frozen = std::mem::take(&mut *connections);
        let count = frozen.len();
        std::mem::forget(frozen);
        count
    }
}
