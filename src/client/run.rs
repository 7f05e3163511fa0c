//! `exec-server run`: run one command through a lazily spawned server, as
//! if it ran here.

use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use std::sync::{Arc, Mutex};

use super::{Client, ClientError, Event, Notice, Sandbox, ServerCommand, StartOptions};
use crate::protocol::Stream;

/// Names of variables that look secret, which `run` does not pass from
/// the server's environment to the command (`--env-pass NAME` passes one
/// anyway).
pub use super::policy::SECRET_NAMES;

/// Exit code when the runner itself fails (not the command): the server
/// did not start, the connection was lost, the request or the working
/// directory was refused.
pub const RUNNER_FAILED: i32 = 125;
/// Exit code when the program exists but can't be executed.
pub const CANNOT_EXECUTE: i32 = 126;
/// Exit code when the program is not found.
pub const NOT_FOUND: i32 = 127;
/// Exit code when our output was closed (`| head`): 128 + SIGPIPE.
pub const BROKEN_PIPE: i32 = 128 + libc::SIGPIPE;
/// Exit code when the session was ended with the escape sequence (`~.`).
pub const ESCAPED: i32 = 255;

/// A sandbox preset for `--sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Read everything, write nothing.
    ReadOnly,
    /// Read everything; write the workspace roots, `$TMPDIR` and `/tmp`.
    WorkspaceWrite,
}

/// What `exec-server run` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The server command; `None` runs this binary with `--stdio`.
    pub via: Option<String>,
    /// How many times `--tty` was given: once, a pseudo-terminal when stdin
    /// is a terminal (else a warning and pipes); twice, always.
    pub tty: u8,
    /// Give the command an empty stdin and leave ours unread (`-n`).
    pub null_stdin: bool,
    /// The escape character of a `--tty` session (`~`); `None` disables
    /// escapes.
    pub escape_char: Option<u8>,
    /// The command's working directory; relative to here without `via`.
    pub cwd: Option<PathBuf>,
    /// Variables to set for the command.
    pub env: Vec<(String, String)>,
    /// Variables to pass from this environment even when their names
    /// look secret ([`SECRET_NAMES`]).
    pub env_pass: Vec<String>,
    /// Run inside the server's sandbox.
    pub sandbox: Option<SandboxMode>,
    /// Allow the network inside the sandbox.
    pub network: bool,
    /// Roots `:workspace_roots` binds to.
    pub workspace_roots: Vec<PathBuf>,
    /// With a resumable server command, have the server hold the command
    /// rather than drop output while nobody reads (`--no-hold` clears it).
    pub hold: bool,
    /// The command and its arguments (empty with `attach`).
    pub argv: Vec<String>,
    /// Take up a process of a session left detached instead of starting
    /// one: `SESSION[/PROCESS][@SEQ]` (process `run`, from the start of
    /// what is retained, by default).
    pub attach: Option<String>,
    /// How long to keep trying to reconnect a resumable `via` (default
    /// 30 s).
    pub reconnect_for: Option<std::time::Duration>,
    /// Memory, CPU, process count and deadline (`--memory`, `--cpus`,
    /// `--pids`, `--timeout`).
    pub limits: Option<crate::limits::Requested>,
}

/// What `timeout(1)` exits with when the command timed out.
pub const TIMED_OUT: i32 = 124;

/// `--attach SESSION[/PROCESS][@SEQ]`, parsed.
fn parse_attach(text: &str) -> Result<(String, String, u64), String> {
    let (rest, seq) = match text.rsplit_once('@') {
        Some((rest, seq)) => (
            rest,
            seq.parse::<u64>()
                .map_err(|_| format!("--attach {text}: {seq} is not a seq"))?,
        ),
        None => (text, 0),
    };
    let (session, process) = rest.split_once('/').unwrap_or((rest, "run"));
    if session.is_empty() || process.is_empty() {
        return Err(format!("--attach {text}: expected SESSION[/PROCESS][@SEQ]"));
    }
    Ok((session.to_string(), process.to_string(), seq))
}

/// The sandbox of a preset, with `:workspace_roots` bound to `roots`
/// when given (else left for the executor to bind).
pub fn sandbox_intent(mode: SandboxMode, network: bool, roots: &[PathBuf]) -> Sandbox {
    let sandbox = match mode {
        SandboxMode::ReadOnly => Sandbox::read_only(),
        SandboxMode::WorkspaceWrite => Sandbox::workspace_write(),
    }
    .network(network);
    if roots.is_empty() {
        sandbox
    } else {
        sandbox.workspace_roots(roots)
    }
}

/// How a run ended: the code to exit with, and what to tell the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The exit code: the command's, or one of this module's constants.
    pub code: i32,
    /// What to print on stderr, prefixed with `exec-server: `.
    pub message: Option<String>,
}

impl Outcome {
    fn failed(code: i32, message: impl Into<String>) -> Outcome {
        Outcome {
            code,
            message: Some(message.into()),
        }
    }
}

/// Say something on stderr now (before the command's output).
fn warn(text: &str) {
    let _ = writeln!(std::io::stderr(), "exec-server: {text}");
}

/// Run the command. The command's output goes to this process's stdout and
/// stderr as it arrives; the caller prints `message`, if any.
pub fn run(options: RunOptions) -> Outcome {
    // SAFETY: isatty on fd 0.
    let stdin_is_terminal = unsafe { libc::isatty(0) } == 1;
    let tty = match options.tty {
        0 => false,
        1 if !stdin_is_terminal => {
            warn(
                "stdin is not a terminal, so the command runs without one (give --tty twice to force it)",
            );
            false
        }
        _ => true,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => return Outcome::failed(RUNNER_FAILED, err.to_string()),
    };
    let outcome = runtime.block_on(async move {
        // Restored on drop, on every way out of here, before the caller
        // prints anything.
        let _terminal = if tty && stdin_is_terminal {
            RawTerminal::enter()
        } else {
            None
        };
        match run_inner(&options, tty, stdin_is_terminal).await {
            Ok(outcome) => outcome,
            Err(err) => {
                tracing::debug!("run failed: {err}");
                Outcome::failed(RUNNER_FAILED, err.without_stderr())
            }
        }
    });
    // The stdin forwarder may sit in a blocking read; don't wait for it.
    runtime.shutdown_background();
    outcome
}

/// The command's working directory, or why there is none.
fn working_directory(options: &RunOptions) -> Result<Option<PathBuf>, Outcome> {
    let here = || {
        std::env::current_dir().map_err(|err| {
            Outcome::failed(
                RUNNER_FAILED,
                format!(
                    "the current directory can't be used ({}); give --cwd",
                    crate::error::os_text(&err)
                ),
            )
        })
    };
    match (&options.cwd, &options.via) {
        (Some(dir), None) => {
            let dir = if dir.is_absolute() {
                dir.clone()
            } else {
                here()?.join(dir)
            };
            match std::fs::metadata(&dir) {
                Ok(meta) if meta.is_dir() => Ok(Some(dir)),
                Ok(_) => Err(Outcome::failed(
                    RUNNER_FAILED,
                    format!("{}: Not a directory", dir.display()),
                )),
                Err(err) => Err(Outcome::failed(
                    RUNNER_FAILED,
                    format!("{}: {}", dir.display(), crate::error::os_text(&err)),
                )),
            }
        }
        (Some(dir), Some(_)) if !dir.is_absolute() => Err(Outcome::failed(
            RUNNER_FAILED,
            format!(
                "--cwd {} is relative; with --via it names a directory on the server, so give it absolute",
                dir.display()
            ),
        )),
        (Some(dir), Some(_)) => Ok(Some(dir.clone())),
        (None, None) => here().map(Some),
        // A remote server runs the command in its own directory.
        (None, Some(_)) => Ok(None),
    }
}

/// What a refused start means to a person, as a shell would say it.
fn start_failure(err: ClientError, program: &str) -> Outcome {
    tracing::debug!("process/start failed: {err}");
    let ClientError::Rpc {
        kind,
        message,
        errno,
        ..
    } = &err
    else {
        return Outcome::failed(RUNNER_FAILED, err.without_stderr());
    };
    if kind != "spawnFailed" {
        return Outcome::failed(RUNNER_FAILED, message.clone());
    }
    // The server checks the working directory before the program.
    if let Some(rest) = message.strip_prefix("cwd ") {
        return Outcome::failed(RUNNER_FAILED, format!("working directory {rest}"));
    }
    if *errno == Some(i64::from(libc::ENOENT)) {
        let mut text = format!("{program}: command not found");
        if program.contains(char::is_whitespace) {
            // `run -- 'make && make test'`: one argument, not a command line.
            text.push_str(&format!(
                " (the program is the whole argument; for a shell command line use: \
                 exec-server run -- sh -c '{program}')"
            ));
        }
        return Outcome::failed(NOT_FOUND, text);
    }
    // As a shell says it: `/etc: Is a directory`.
    let reason = message.rsplit(": ").next().unwrap_or(message);
    Outcome::failed(CANNOT_EXECUTE, format!("{program}: {reason}"))
}

/// The escape sequences of a `--tty` session, as ssh has them: after a
/// newline, `~.` ends the session and `~~` sends one `~`.
struct Escapes {
    char: u8,
    at_line_start: bool,
    pending: bool,
}

impl Escapes {
    fn new(char: u8) -> Escapes {
        Escapes {
            char,
            at_line_start: true,
            pending: false,
        }
    }

    /// The bytes to send for `input`, or `None` when the session ends.
    fn filter(&mut self, input: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                if b == b'.' {
                    return None;
                }
                if b == b'?' {
                    let c = self.char as char;
                    let _ = write!(
                        std::io::stderr(),
                        "\r\nSupported escape sequences:\r\n {c}.  end the session (the command is \
                         terminated)\r\n {c}?  this message\r\n {c}{c}  send the escape \
                         character\r\n(Escapes are recognised only after a newline.)\r\n"
                    );
                    self.at_line_start = false;
                    continue;
                }
                out.push(self.char);
                if b == self.char {
                    self.at_line_start = false;
                    continue;
                }
            } else if self.at_line_start && b == self.char {
                self.pending = true;
                continue;
            }
            out.push(b);
            self.at_line_start = b == b'\r' || b == b'\n';
        }
        Some(out)
    }
}

async fn run_inner(
    options: &RunOptions,
    tty: bool,
    stdin_is_terminal: bool,
) -> Result<Outcome, ClientError> {
    let cwd = match working_directory(options) {
        Ok(cwd) => cwd,
        Err(outcome) => return Ok(outcome),
    };
    let command = match &options.via {
        Some(via) => {
            let command = ServerCommand::parse(via)?;
            match options.reconnect_for {
                Some(how_long) => command.reconnect_for(how_long),
                None => command,
            }
        }
        None => {
            let exe = std::env::current_exe().map_err(|e| ClientError::Spawn {
                command: "exec-server".into(),
                message: e.to_string(),
            })?;
            let mut command = ServerCommand::new(exe).arg("--stdio");
            for root in &options.workspace_roots {
                command = command.arg("--workspace-root").arg(root);
            }
            command
        }
    };
    // Reconnecting is said once; a resume that gives up is kept, to say
    // how to take the command up again.
    let gave_up: Arc<Mutex<Option<(String, ClientError)>>> = Arc::default();
    let make_client = |command: ServerCommand, attach: Option<&str>| {
        let gave_up = gave_up.clone();
        let client = match attach {
            Some(session) => Client::resuming(command, session),
            None => Client::new(command),
        };
        client.with_notices(move |notice| match notice {
            Notice::Reconnecting { .. } => warn("connection lost, reconnecting…"),
            Notice::Reconnected { .. } => {}
            Notice::ReconnectFailed { session, error } => {
                *crate::sync::lock(&gave_up) = Some((session.clone(), error.clone()));
            }
        })
    };
    let (client, mut process) = if let Some(text) = &options.attach {
        let (session, process_id, seq) = match parse_attach(text) {
            Ok(parsed) => parsed,
            Err(message) => return Ok(Outcome::failed(RUNNER_FAILED, message)),
        };
        if !command.resumable() {
            return Ok(Outcome::failed(
                RUNNER_FAILED,
                "--attach needs a --via that can resume a session (--persist, unix:, ws://)",
            ));
        }
        let client = make_client(command, Some(&session));
        match client.attach(&process_id, seq, options.hold).await {
            Ok(process) => (client, process),
            Err(err) => {
                client.shutdown().await;
                return Ok(Outcome::failed(
                    RUNNER_FAILED,
                    format!("--attach {text}: {err}"),
                ));
            }
        }
    } else {
        let client = make_client(command, None);
        let cwd = match cwd {
            Some(dir) => dir,
            None => {
                let info = client.environment_info().await?;
                crate::protocol::parse_path(&info.cwd).unwrap_or_else(|_| PathBuf::from("/"))
            }
        };
        let mut start = StartOptions::new("run", options.argv.clone())
            .cwd(cwd)
            .pipe_stdin(true)
            // A drop of any length within the session's life loses nothing:
            // the child waits instead of its output being evicted.
            // The environment: the library's default, the executor's
            // without secret-looking names.
            .hold_output(options.hold && client.resumable());
        if let Some(limits) = &options.limits {
            start = start.limits(limits.clone());
        }
        let mut env: Vec<(String, String)> = Vec::new();
        if tty {
            // As ssh does: the terminal type and the locale travel with a pty.
            for (key, value) in std::env::vars() {
                if key == "TERM" || key == "LANG" || key.starts_with("LC_") {
                    env.push((key, value));
                }
            }
        }
        for name in &options.env_pass {
            match std::env::var(name) {
                Ok(value) => env.push((name.clone(), value)),
                Err(_) => warn(&format!("--env-pass {name}: not set here, not passed")),
            }
        }
        env.extend(options.env.iter().cloned());
        for (k, v) in &env {
            start = start.env(k, v);
        }
        if tty {
            let (cols, rows) = terminal_size().unwrap_or((80, 24));
            start = start.tty(cols, rows);
        }
        if let Some(mode) = options.sandbox {
            start = start.sandbox(sandbox_intent(
                mode,
                options.network,
                &options.workspace_roots,
            ));
        }
        let process = match client.start(start).await {
            Ok(process) => {
                if !process.unenforced_limits().is_empty() {
                    warn(&format!(
                        "--best-effort: this host does not enforce {}; the command runs without",
                        process.unenforced_limits().join(", ")
                    ));
                }
                process
            }
            Err(err) => {
                let outcome = start_failure(err, &options.argv[0]);
                client.shutdown().await;
                return Ok(outcome);
            }
        };
        (client, process)
    };

    // stdin: a thread reads it (a blocking read can't be cancelled) and the
    // bytes are written in order; EOF closes the command's stdin.
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    if options.null_stdin {
        // At once: the command reads an empty stdin; ours stays unread.
        let _ = stdin_tx.try_send(None);
    } else {
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = stdin_tx.blocking_send(None);
                        break;
                    }
                    Ok(n) => {
                        if stdin_tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    let mut escapes = match options.escape_char {
        Some(c) if tty && stdin_is_terminal => Some(Escapes::new(c)),
        _ => None,
    };

    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupts = signal(SignalKind::interrupt()).ok();
    let mut winches = if tty {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    // These end the run: the command is terminated, the terminal restored,
    // and the runner exits 128+N, as if it had died of the signal.
    let mut enders: Vec<(i32, tokio::signal::unix::Signal)> = [
        (libc::SIGTERM, SignalKind::terminate()),
        (libc::SIGHUP, SignalKind::hangup()),
        (libc::SIGQUIT, SignalKind::quit()),
    ]
    .into_iter()
    .filter_map(|(n, kind)| signal(kind).ok().map(|s| (n, s)))
    .collect();
    let mut stdin_open = true;
    let mut interrupted = 0;
    let mut lost_with: Option<ClientError> = None;
    // Output is written as it comes, unbuffered: std's stdout is
    // line-buffered, which scans every chunk for a newline only to flush
    // at once anyway.
    // SAFETY: fds 1 and 2 stay open for the life of the process; the
    // ManuallyDrop keeps these Files from closing them.
    let mut stdout = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    let mut stderr = ManuallyDrop::new(unsafe { File::from_raw_fd(2) });
    let ended = loop {
        tokio::select! {
            event = process.next_event() => match event {
                Err(err) => {
                    lost_with = Some(err);
                    break None;
                }
                Ok(event) => match event {
                Some(Event::Output { stream, data }) => {
                    let out: &mut File = if stream == Stream::Stderr { &mut stderr } else { &mut stdout };
                    if let Err(err) = out.write_all(&data) {
                        if err.kind() == std::io::ErrorKind::BrokenPipe {
                            // `| head` has all it wants: stop, as ssh does.
                            break Some(Outcome { code: BROKEN_PIPE, message: None });
                        }
                    }
                }
                // Counted by the process; said once at the end.
                Some(Event::Lost { .. }) => {}
                Some(Event::Exited(_)) => {}
                Some(Event::Closed) | None => break None,
                },
            },
            input = stdin_rx.recv(), if stdin_open => match input.flatten() {
                Some(data) => {
                    let data = match &mut escapes {
                        Some(escapes) => match escapes.filter(&data) {
                            Some(data) => data,
                            None => break Some(Outcome::failed(ESCAPED, "session ended (~.)")),
                        },
                        None => data,
                    };
                    if !data.is_empty() {
                        match process.write(&data).await {
                            Ok(_) => {}
                            // The command closed its stdin: the rest of
                            // ours has nowhere to go.
                            Err(ClientError::StdinClosed { .. }) => stdin_open = false,
                            Err(err) => return Err(err),
                        }
                    }
                }
                None => {
                    stdin_open = false;
                    if !tty {
                        process.close_stdin().await?;
                    }
                }
            },
            _ = recv_signal(&mut interrupts) => {
                interrupted += 1;
                if interrupted == 1 {
                    process.signal("interrupt").await?;
                } else {
                    process.terminate().await?;
                }
            }
            n = recv_any(&mut enders) => break Some(Outcome { code: 128 + n, message: None }),
            _ = recv_signal(&mut winches) => {
                if let Some((cols, rows)) = terminal_size() {
                    process.resize(cols, rows).await?;
                }
            }
        }
    };
    if let Some(err) = lost_with {
        // The command is not ours to end: it may run on, for another
        // runner to take up.
        let gave_up = crate::sync::lock(&gave_up).take();
        let seq = process.last_seq();
        let id = process.id().to_string();
        drop(process);
        client.shutdown().await;
        let Some((session, error)) = gave_up else {
            return Err(err);
        };
        // Its stderr was held back while it tried: said here, once.
        let via = options
            .via
            .as_deref()
            .unwrap_or_default()
            .replace('\'', "'\\''");
        return Ok(Outcome::failed(
            RUNNER_FAILED,
            format!(
                "reconnecting failed: {error}\nexec-server: the command may run on in its \
                 session on the server (until the session's detached TTL); take it up again \
                 with:\n  exec-server run --via '{via}' --attach {session}/{id}@{seq}"
            ),
        ));
    }
    if let Some(outcome) = ended {
        let _ = process.terminate().await;
        finish(&client).await;
        return Ok(outcome);
    }
    let status = process.wait().await?;
    if let Some(reason) = client.server_stopped() {
        // Ended by the server's shutdown, not by itself.
        client.shutdown().await;
        return Ok(Outcome::failed(
            RUNNER_FAILED,
            ClientError::ServerStopped { reason }.to_string(),
        ));
    }
    // Output that fell out of the server's retention before we read it.
    let lost = process.lost_bytes();
    finish(&client).await;
    if lost > 0 {
        // Never a success code for output that is not all there.
        return Ok(Outcome::failed(
            RUNNER_FAILED,
            format!(
                "{lost} bytes of output were lost (retention exceeded while disconnected); \
                 the command exited {}",
                status.code
            ),
        ));
    }
    let limits = options.limits.clone().unwrap_or_default();
    let (code, message) = match status.reason.as_deref() {
        Some("timedOut") => (
            TIMED_OUT,
            Some(match limits.timeout_ms {
                Some(ms) => format!("timed out after {}; the command was killed", show_ms(ms)),
                None => "timed out (the server's default limit); the command was killed".into(),
            }),
        ),
        Some("oomKilled") => (
            status.code,
            Some(match limits.memory_bytes {
                Some(bytes) => format!("killed: out of memory (limit {})", show_bytes(bytes)),
                None => "killed: out of memory (the server's default limit)".into(),
            }),
        ),
        Some("outputLimit") => (
            status.code,
            Some("killed: the command's output reached its limit".into()),
        ),
        _ => (
            status.code,
            status.sandbox_denied.then(|| {
                format!(
                    "the sandbox probably denied something this command needed (exit {})",
                    status.code
                )
            }),
        ),
    };
    Ok(Outcome { code, message })
}

/// `90000` ms as `1m30s`, as a person writes it.
fn show_ms(ms: u64) -> String {
    if ms % 1000 != 0 || ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// Bytes with a binary unit: `512 MiB`.
fn show_bytes(bytes: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= scale && bytes % scale == 0 {
            return format!("{} {unit}", bytes / scale);
        }
    }
    format!("{bytes} bytes")
}

/// Done with the command: end its session (a resumable server would keep
/// it for the detached TTL), then the connection.
async fn finish(client: &Client) {
    if client.resumable() {
        if let Err(err) = client.end_session().await {
            tracing::debug!("session/end: {err}");
        }
    }
    client.shutdown().await;
}

/// The number of the first of `signals` to arrive.
async fn recv_any(signals: &mut [(i32, tokio::signal::unix::Signal)]) -> i32 {
    if signals.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for (n, signal) in signals.iter_mut() {
            if signal.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*n);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// The local terminal's size, if stdout or stdin is a terminal.
fn terminal_size() -> Option<(u16, u16)> {
    for fd in [1, 0, 2] {
        // SAFETY: TIOCGWINSZ fills a zeroed winsize.
        unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            if libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
                return Some((ws.ws_col, ws.ws_row));
            }
        }
    }
    None
}

/// The local terminal in raw mode, restored on drop.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: termios calls on fd 0 with zeroed structs.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// What `exec-server watch` does.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// The server command; `None` runs this binary with `--stdio`.
    pub via: Option<String>,
    /// The path to watch (relative to here without `via`).
    pub path: PathBuf,
    /// Everything below it too.
    pub recursive: bool,
    /// One JSON object a line instead of text.
    pub json: bool,
    /// Stop after this many changes.
    pub count: Option<usize>,
}

/// Print the changes under a path until interrupted (or `count` of them).
pub fn watch(options: WatchOptions) -> Outcome {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => return Outcome::failed(RUNNER_FAILED, err.to_string()),
    };
    runtime.block_on(async move {
        match watch_inner(&options).await {
            Ok(outcome) => outcome,
            Err(err) => Outcome::failed(RUNNER_FAILED, err.without_stderr()),
        }
    })
}

async fn watch_inner(options: &WatchOptions) -> Result<Outcome, ClientError> {
    let (command, path) = match &options.via {
        Some(via) => (ServerCommand::parse(via)?, options.path.clone()),
        None => {
            let exe = std::env::current_exe().map_err(|e| ClientError::Spawn {
                command: "exec-server".into(),
                message: e.to_string(),
            })?;
            let here = std::env::current_dir().unwrap_or_default();
            (
                ServerCommand::new(exe).arg("--stdio"),
                here.join(&options.path),
            )
        }
    };
    let client = Client::new(command);
    let mut watcher = client.watch(path.clone(), options.recursive).await?;
    warn(&format!("watching {}", path.display()));
    let mut interrupts =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let mut seen = 0usize;
    let mut stdout = std::io::stdout();
    loop {
        let changes = tokio::select! {
            changes = watcher.next() => changes,
            _ = recv_signal(&mut interrupts) => break,
        };
        let Some(changes) = changes else {
            client.shutdown().await;
            return Ok(Outcome::failed(
                RUNNER_FAILED,
                "the connection to the server was lost",
            ));
        };
        for change in changes? {
            let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
            let line = if options.json {
                serde_json::json!({
                    "kind": change.kind,
                    "path": show(&change.path),
                    "toPath": show(&change.to_path),
                })
                .to_string()
            } else {
                match (&change.kind[..], show(&change.path), show(&change.to_path)) {
                    ("overflow", _, _) => "overflow (changes were dropped; look again)".into(),
                    (kind, Some(path), Some(to)) => format!("{kind:<8} {path} -> {to}"),
                    (kind, Some(path), None) => format!("{kind:<8} {path}"),
                    (kind, None, _) => kind.to_string(),
                }
            };
            if writeln!(stdout, "{line}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                // `| head`: done.
                client.shutdown().await;
                return Ok(Outcome {
                    code: 0,
                    message: None,
                });
            }
            seen += 1;
            if options.count.is_some_and(|n| seen >= n) {
                client.shutdown().await;
                return Ok(Outcome {
                    code: 0,
                    message: None,
                });
            }
        }
    }
    client.shutdown().await;
    Ok(Outcome {
        code: 128 + libc::SIGINT,
        message: None,
    })
}
