//! `exec-server run`: run one command through a lazily spawned server, as
//! if it ran here.

use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::{Client, ClientError, Event, ServerCommand, StartOptions};
use crate::protocol::Stream;

/// Exit code when the runner itself fails (not the command).
pub const RUNNER_FAILED: i32 = 125;

/// A sandbox preset for `--sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    ReadOnly,
    WorkspaceWrite,
}

/// What `exec-server run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The server command; `None` runs this binary with `--stdio`.
    pub via: Option<String>,
    pub tty: bool,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub sandbox: Option<SandboxMode>,
    pub network: bool,
    pub workspace_roots: Vec<PathBuf>,
    pub argv: Vec<String>,
}

/// The `sandbox` intent for a preset, with `:workspace_roots` left for the
/// executor to bind.
pub fn sandbox_intent(mode: SandboxMode, network: bool, roots: &[PathBuf]) -> Value {
    let special = |kind: &str| json!({"type": "special", "value": {"kind": kind}});
    let mut entries = vec![json!({"path": special("root"), "access": "read"})];
    if mode == SandboxMode::WorkspaceWrite {
        entries.push(json!({"path": special("project_roots"), "access": "write"}));
        entries.push(
            json!({"path": special("tmpdir"), "access": "write", "missing_path_behavior": "skip"}),
        );
        entries.push(json!({"path": special("slash_tmp"), "access": "write"}));
    }
    let mut intent = json!({
        "permissions": {
            "type": "managed",
            "file_system": {"type": "restricted", "entries": entries},
            "network": if network { "enabled" } else { "restricted" },
        }
    });
    if !roots.is_empty() {
        intent["workspaceRoots"] = json!(roots.iter().map(|r| super::uri(r)).collect::<Vec<_>>());
    }
    intent
}

/// How a run ended: the code to exit with, and what to tell the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub message: Option<String>,
}

/// Run the command. The command's output goes to this process's stdout and
/// stderr as it arrives; the caller prints `message`, if any.
pub fn run(options: RunOptions) -> Outcome {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            return Outcome {
                code: RUNNER_FAILED,
                message: Some(err.to_string()),
            };
        }
    };
    let outcome = runtime.block_on(async move {
        // Restored on drop, before the caller prints anything.
        let _terminal = if options.tty {
            RawTerminal::enter()
        } else {
            None
        };
        match run_inner(&options).await {
            Ok(outcome) => outcome,
            Err(err) => Outcome {
                code: match err.kind() {
                    Some("spawnFailed") => 127,
                    _ => RUNNER_FAILED,
                },
                message: Some(err.to_string()),
            },
        }
    });
    // The stdin forwarder may sit in a blocking read; don't wait for it.
    runtime.shutdown_background();
    outcome
}

async fn run_inner(options: &RunOptions) -> Result<Outcome, ClientError> {
    let command = match &options.via {
        Some(via) => ServerCommand::parse(via)?,
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
    let client = Client::new(command);
    let cwd = match (&options.cwd, &options.via) {
        (Some(dir), _) => dir.clone(),
        (None, None) => std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        // A remote server runs the command in its own directory.
        (None, Some(_)) => {
            let info = client.environment_info().await?;
            let uri = info["cwd"].as_str().unwrap_or("file:///");
            crate::protocol::parse_path(uri).unwrap_or_else(|_| PathBuf::from("/"))
        }
    };
    let mut start = StartOptions::new("run", options.argv.clone())
        .cwd(cwd)
        .pipe_stdin(true)
        .env_policy(json!({"inherit": "all", "ignoreDefaultExcludes": false, "exclude": [], "set": {}, "includeOnly": []}));
    for (k, v) in &options.env {
        start = start.env(k, v);
    }
    if options.tty {
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
    let mut process = client.start(start).await?;

    // stdin: a thread reads it (a blocking read can't be cancelled) and the
    // bytes are written in order; EOF closes the command's stdin.
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
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

    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupts = signal(SignalKind::interrupt()).ok();
    let mut winches = if options.tty {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    let mut stdin_open = true;
    let mut interrupted = 0;
    // Output is written as it comes, unbuffered: std's stdout is
    // line-buffered, which scans every chunk for a newline only to flush
    // at once anyway.
    // SAFETY: fds 1 and 2 stay open for the life of the process; the
    // ManuallyDrop keeps these Files from closing them.
    let mut stdout = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    let mut stderr = ManuallyDrop::new(unsafe { File::from_raw_fd(2) });
    let status = loop {
        tokio::select! {
            event = process.next_event() => match event? {
                Some(Event::Output { stream, data }) => {
                    let out: &mut File = if stream == Stream::Stderr { &mut stderr } else { &mut stdout };
                    let _ = out.write_all(&data);
                }
                Some(Event::Exited(_)) => {}
                Some(Event::Closed) | None => break process.wait().await?,
            },
            input = stdin_rx.recv(), if stdin_open => match input.flatten() {
                Some(data) => { process.write(&data).await?; }
                None => {
                    stdin_open = false;
                    if !options.tty {
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
            _ = recv_signal(&mut winches) => {
                if let Some((cols, rows)) = terminal_size() {
                    process.resize(cols, rows).await?;
                }
            }
        }
    };
    let message = status.sandbox_denied.then(|| {
        format!(
            "the sandbox probably denied something this command needed (exit {})",
            status.code
        )
    });
    client.shutdown().await;
    Ok(Outcome {
        code: status.code,
        message,
    })
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
