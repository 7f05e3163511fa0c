//! The `exec-server` command line: parse flags, pick a mode, call into the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use exec_server::cli::{self as server, Config};
use exec_server::client::run::{self, RunOptions, SandboxMode};

/// Runs processes and touches files on this machine for an orchestrator,
/// over newline-delimited JSON-RPC 2.0.
#[derive(Debug, Parser)]
#[command(name = "exec-server", version, disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one command through a server (started lazily) and exit with its code.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Print what this host's kernel lets the sandbox enforce and how
    /// processes are contained; exits 1 when every sandbox would be refused.
    SandboxCheck,
    /// Print a shell completion script: `exec-server completions bash >
    /// /etc/bash_completion.d/exec-server`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff): `exec-server man | man -l -`, `exec-server
    /// man run`; or write every page to a directory.
    Man {
        /// The page: a subcommand (`run`, `daemon-status`, ...); none for
        /// the main page.
        page: Option<String>,
        /// Write every page (exec-server.1, exec-server-run.1, ...) here
        /// instead.
        #[arg(long, value_name = "DIR", conflicts_with = "page")]
        dir: Option<PathBuf>,
    },
    /// Run a relay: the registry (register, connect, validate) and the
    /// rendezvous router for remote executors, on one address. It sees
    /// only ciphertext and holds no private key.
    Relay(RelayArgs),
    /// Carry this process's stdin and stdout to a server at ADDRESS
    /// (`noise+http://HOST:PORT/ENVIRONMENT_ID`, `ws://`, `unix:`), so that
    /// an orchestrator that spawns a stdio server reaches a remote one.
    Bridge(BridgeArgs),
    /// Print the changes under a path as they happen (through a server,
    /// started lazily, or --via one): `created`, `modified`, `removed`,
    /// `renamed OLD -> NEW`, and `overflow` when some were dropped.
    Watch(WatchArgs),
    /// Look after a --persist daemon.
    Daemon {
        #[command(subcommand)]
        action: DaemonAction,
        /// The daemon's name.
        #[arg(long, value_name = "NAME", default_value = "default", global = true)]
        persist: String,
    },
}

#[derive(Debug, Subcommand)]
enum DaemonAction {
    /// Its pid, socket, uptime, and sessions with their processes.
    Status,
    /// End it, and everything it runs.
    Stop,
}

/// What `exec-server run --help` adds after the flags.
const RUN_HELP: &str = "\
Exit status:
  the command's own; 128+N when it died of signal N
  125  the runner failed: the server did not start, the connection was lost,
       the request or the working directory was refused, or output was lost
       (it fell out of the server's retention before it was read, e.g. while
       disconnected; the message says how many bytes), reconnecting gave up
       (the message says how to --attach), or the server was stopped
  126  the program exists but can't be executed
  127  the program was not found
  141  our output was closed (e.g. `| head`): the command is terminated
  255  the session was ended with the escape sequence (~.)

Environment:
  The command inherits the server's environment (here: this one) except
  variables whose names look secret (*TOKEN*, *KEY*, *SECRET*, *PASSWORD*,
  *PASSWD*, *CREDENTIAL*): pass those with --env-pass NAME or --env
  NAME=VALUE. With a pty,
  TERM, LANG and LC_* are passed too.
  EXEC_SERVER_LOG (or RUST_LOG) filters the log on stderr, e.g.
  EXEC_SERVER_LOG=debug shows every request and process.

Sandbox presets:
  read-only        read everything, write nothing
  workspace-write  read everything; write the workspace roots (--workspace-root,
                   default: --cwd or here), $TMPDIR and /tmp
  Without --network, no network either.

Escapes (with --tty, after a newline):
  ~.  end the session (the command is terminated)
  ~?  list the escapes
  ~~  send one ~";

#[derive(Debug, Args)]
struct RunArgs {
    /// The server command, e.g. "ssh host exec-server --stdio" (default: this
    /// binary with --stdio).
    #[arg(long, value_name = "CMD")]
    via: Option<String>,

    /// Run under a pseudo-terminal when stdin is a terminal (the local
    /// terminal goes raw); twice to force one.
    #[arg(short = 't', long, action = clap::ArgAction::Count)]
    tty: u8,

    /// Give the command an empty stdin (/dev/null) and leave ours unread,
    /// as `ssh -n` does: for a loop that reads its own stdin.
    #[arg(short = 'n')]
    null_stdin: bool,

    /// The escape character of a --tty session, or `none`.
    #[arg(long, value_name = "CHAR", default_value = "~", value_parser = parse_escape)]
    escape_char: Escape,

    /// Working directory (default: here, or the server's own directory
    /// with --via; relative to here without --via).
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,

    /// Set a variable for the command (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,

    /// Pass this variable from here even if its name looks secret
    /// (repeatable).
    #[arg(long = "env-pass", value_name = "NAME")]
    env_pass: Vec<String>,

    /// Run inside the server's sandbox.
    #[arg(long, value_enum)]
    sandbox: Option<SandboxArg>,

    /// Allow network access inside the sandbox.
    #[arg(long, requires = "sandbox")]
    network: bool,

    /// A root `:workspace_roots` binds to (repeatable).
    #[arg(long = "workspace-root", value_name = "DIR")]
    workspace_roots: Vec<PathBuf>,

    /// Memory the command (with everything it starts) may use, e.g. 512M;
    /// past it the kernel kills it.
    #[arg(long, value_name = "SIZE", value_parser = exec_server::limits::parse_size)]
    memory: Option<u64>,

    /// CPU time it may use, in cores (1.5: one and a half).
    #[arg(long, value_name = "N", value_parser = exec_server::limits::parse_cpus)]
    cpus: Option<f64>,

    /// Processes and threads it may have at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pids: Option<u64>,

    /// Kill it (and everything it started) after this long, e.g. 30s or
    /// 10m, and exit 124 as timeout(1) does.
    #[arg(long, value_name = "DURATION", value_parser = exec_server::limits::parse_duration_ms)]
    timeout: Option<u64>,

    /// Run anyway, without the limits the server can't enforce (it says
    /// which), instead of refusing.
    #[arg(long)]
    best_effort: bool,

    /// With a resumable --via (--persist, unix:, ws://), let the server
    /// drop output it can't retain while we are disconnected (and say how
    /// much was lost) instead of pausing the command until we are back.
    #[arg(long)]
    no_hold: bool,

    /// With a resumable --via, how long to keep trying to reconnect after
    /// the connection is lost before giving up (the command runs on, to be
    /// taken up with --attach).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    reconnect_for_ms: u64,

    /// Take up a command that a runner left behind when it gave up
    /// reconnecting (it prints this), instead of starting one:
    /// SESSION[/PROCESS][@SEQ]. Needs a resumable --via.
    #[arg(long, value_name = "SESSION[/PROCESS][@SEQ]", conflicts_with_all = ["argv", "sandbox", "tty"])]
    attach: Option<String>,

    /// The command and its arguments. Options of `run` come before it; a
    /// program whose name starts with `-` comes after `--`.
    #[arg(
        required_unless_present = "attach",
        trailing_var_arg = true,
        value_name = "PROGRAM ARGS"
    )]
    argv: Vec<String>,
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// The path to watch (on the server's machine with --via).
    path: PathBuf,

    /// The server command, e.g. "ssh host exec-server --stdio" (default:
    /// this binary with --stdio).
    #[arg(long, value_name = "CMD")]
    via: Option<String>,

    /// Only the path itself (a directory's own entries), not everything
    /// below it.
    #[arg(long)]
    no_recursive: bool,

    /// One JSON object a line: {"kind", "path", "toPath"}.
    #[arg(long)]
    json: bool,

    /// Exit after this many changes.
    #[arg(long, value_name = "N")]
    count: Option<usize>,
}

impl RunArgs {
    /// The limits the flags ask for, if any.
    fn limits(&self) -> Option<exec_server::limits::Requested> {
        let limits = exec_server::limits::Requested {
            memory_bytes: self.memory,
            cpu_percent: self.cpus,
            pids: self.pids,
            timeout_ms: self.timeout,
            best_effort: self.best_effort,
            ..Default::default()
        };
        (limits != exec_server::limits::Requested::default()).then_some(limits)
    }
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// Where to listen: `ws://IP:PORT` (port 0 picks one; the URL is the
    /// first line on stdout). The registry answers HTTP on the same
    /// address.
    #[arg(long, value_name = "ws://IP:PORT", default_value = "ws://127.0.0.1:0")]
    listen: String,

    /// A file holding the bearer token registry callers (executors and
    /// orchestrators) must show; without it anyone who reaches the relay
    /// may register and connect, so it must then listen on loopback.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// A file holding the key URLs and authorizations are signed with
    /// (default: a new one at start, so they die with the relay).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// The URL clients reach this relay at, when not the listening address
    /// (behind a TLS-terminating proxy: `wss://relay.example.com`).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,

    /// How often sockets are pinged; one silent for two intervals is
    /// dropped.
    #[arg(long, value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    ping_interval_ms: u64,
}

#[derive(Debug, Args)]
struct BridgeArgs {
    /// The server: `noise+http://HOST:PORT/ENVIRONMENT_ID` (or
    /// `noise+https://`), `ws://IP:PORT`, `unix:PATH`. Default: the Noise
    /// environment CODEX_EXEC_SERVER_NOISE_REGISTRY_URL,
    /// CODEX_EXEC_SERVER_NOISE_ENVIRONMENT_ID and
    /// CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN name.
    #[arg(value_name = "ADDRESS")]
    address: Option<String>,

    /// For noise+http(s): a file holding the registry's bearer token
    /// (default: $CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN).
    #[arg(long, value_name = "FILE")]
    registry_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SandboxArg {
    /// Read everything, write nothing.
    ReadOnly,
    /// Read everything; write the workspace roots, $TMPDIR and /tmp.
    WorkspaceWrite,
}

/// `--escape-char`: one ASCII character, or none.
#[derive(Debug, Clone, Copy)]
struct Escape(Option<u8>);

fn parse_escape(text: &str) -> Result<Escape, String> {
    match text.as_bytes() {
        b"none" => Ok(Escape(None)),
        [c] if c.is_ascii() => Ok(Escape(Some(*c))),
        _ => Err(format!("expected one character or `none`, got {text}")),
    }
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected K=V, got {text}")),
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Serve one connection on stdin/stdout (same as `--listen stdio`).
    #[arg(long)]
    stdio: bool,

    /// Where to listen: `stdio` (or `stdio://`), `unix:PATH`, or
    /// `ws://HOST:PORT` (WebSocket; loopback unless a token is set or
    /// --insecure-listen). Repeatable: every connection shares one session
    /// registry, so a session can be resumed on another connection.
    #[arg(long, value_name = "ADDRESS", value_parser = parse_listen)]
    listen: Vec<server::Listen>,

    /// Longest accepted message line, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    max_message_bytes: usize,

    /// At most N ordinary requests of a connection run at once, started in
    /// the order they arrived; `1` gives the reference's ordering (control
    /// requests: initialize, process/read, signal, terminate,
    /// environment/info|status, fs/close never wait). Default: no limit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrent_requests: Option<u64>,

    /// Limits of a process that asks for none of its own, as
    /// `memory=512M,cpus=1.5,pids=256,timeout=10m,output=64M` (any subset).
    #[arg(long, value_name = "LIMITS", value_parser = limit_spec)]
    default_limits: Option<exec_server::limits::Requested>,

    /// The most any process may ask for (same form): a request above one
    /// is refused; a process that asks for nothing gets the default, else
    /// this.
    #[arg(long, value_name = "LIMITS", value_parser = limit_spec)]
    max_limits: Option<exec_server::limits::Requested>,

    /// Write an audit log: one JSON line per event (sessions, processes,
    /// file writes, HTTP requests, network decisions, refusals) to this
    /// file (appended, mode 0600), to `unix:PATH` (a stream socket) or to
    /// `stderr`.
    #[arg(long, value_name = "FILE", value_parser = exec_server::cli::AuditTarget::parse)]
    audit_log: Option<exec_server::cli::AuditTarget>,

    /// Rotate the audit log file so that it and its one predecessor
    /// (FILE.1) hold at most this many bytes, e.g. 64M.
    #[arg(long, value_name = "SIZE", value_parser = exec_server::limits::parse_size, requires = "audit_log")]
    audit_log_max_bytes: Option<u64>,

    /// Output retained per process, in bytes.
    #[arg(long, default_value_t = 1024 * 1024, value_name = "BYTES")]
    retain_bytes: usize,

    /// Output chunks retained per process.
    #[arg(long, default_value_t = 50_000, value_name = "COUNT")]
    retain_chunks: usize,

    /// How long a closed process stays readable.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    closed_retention_ms: u64,

    /// How long a detached session lives before its processes are killed
    /// (default 30000; 600000 for a --persist daemon).
    #[arg(long, value_name = "MS")]
    detached_session_ttl_ms: Option<u64>,

    /// With --stdio: bridge to a per-user daemon named NAME (default
    /// `default`) on a Unix socket, started if none answers, so that a
    /// dropped connection (ssh) only detaches the session.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "default", requires = "stdio")]
    persist: Option<String>,

    /// Exit after this long with no session left (default: never; 600000
    /// for a --persist daemon).
    #[arg(long, value_name = "MS")]
    idle_exit_ms: Option<u64>,

    /// Write the server's pid to this file while it runs.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,

    /// A file holding the token WebSocket peers must show
    /// (`Authorization: Bearer TOKEN` or `?token=TOKEN`).
    #[arg(long, value_name = "FILE")]
    connection_token_file: Option<PathBuf>,

    /// Listen on a non-loopback WebSocket address without a token.
    #[arg(long)]
    insecure_listen: bool,

    /// How often WebSocket peers are pinged; a peer that answers no ping
    /// for two intervals is dropped (its session detaches).
    #[arg(long, value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    ws_ping_interval_ms: u64,

    /// Never send binary frames, even to a client that asks for them
    /// (output stays base64 JSON).
    #[arg(long)]
    no_binary_frames: bool,

    /// A root that `:workspace_roots` binds to (repeatable; default: the
    /// server's current directory).
    #[arg(long = "workspace-root", value_name = "DIR")]
    workspace_roots: Vec<PathBuf>,

    /// Serve as a remote executor: register with the registry at URL
    /// (`http://` or `https://`) and serve the orchestrators' Noise
    /// streams over one outbound WebSocket to its relay.
    #[arg(long, value_name = "URL", conflicts_with_all = ["listen", "stdio", "persist"])]
    remote: Option<String>,

    /// With --remote: the environment to register as.
    #[arg(long, value_name = "ID", requires = "remote")]
    environment_id: Option<String>,

    /// With --remote: a name for this executor in logs.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "exec-server",
        requires = "remote"
    )]
    name: String,

    /// With --remote: a file holding the registry's bearer token (default:
    /// $CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN). Never passed to a command.
    #[arg(long, value_name = "FILE", requires = "remote")]
    registry_token_file: Option<PathBuf>,

    /// With --remote: shut down when stdin ends (also
    /// CODEX_EXEC_SERVER_EXIT_ON_STDIN_CLOSE=1), to tie the executor's life
    /// to a pipe.
    #[arg(long)]
    exit_on_stdin_close: bool,
}

/// The variable the registry token may come in (the reference's name).
const TOKEN_VARIABLE: &str = "CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN";

/// The registry token: from `file`, else from the variable. The variable
/// is taken out of this process's environment either way, so no command
/// (nor server) started from here inherits it.
fn registry_token(file: Option<&std::path::Path>) -> Result<String, String> {
    let from_env = std::env::var(TOKEN_VARIABLE).ok();
    // SAFETY: called before any thread of ours starts.
    unsafe { std::env::remove_var(TOKEN_VARIABLE) };
    match file {
        Some(path) => read_secret(path, "token"),
        None => Ok(from_env.unwrap_or_default().trim().to_string()),
    }
}

/// A secret (`what`: a token, a key) read from a file: trimmed, and not
/// empty.
fn read_secret(path: &std::path::Path, what: &str) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        Ok(_) => Err(format!("{} holds no {what}", path.display())),
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

/// The secret in the file at `path`, if given; a file that can't be
/// read, or holds none, is said (after `prefix`) and ends the command.
fn secret_flag(
    path: Option<&std::path::Path>,
    what: &str,
    prefix: &str,
) -> Result<Option<String>, ExitCode> {
    path.map(|path| read_secret(path, what))
        .transpose()
        .map_err(|err| {
            eprintln!("exec-server: {prefix}{err}");
            ExitCode::from(2)
        })
}

/// `exec-server relay`.
fn relay(args: RelayArgs) -> ExitCode {
    let Some(listen) = args
        .listen
        .strip_prefix("ws://")
        .and_then(|a| a.trim_end_matches('/').parse::<std::net::SocketAddr>().ok())
    else {
        eprintln!(
            "exec-server: invalid relay --listen `{}`; expected `ws://IP:PORT`",
            args.listen
        );
        return ExitCode::from(2);
    };
    let token = match secret_flag(args.token_file.as_deref(), "token", "--token-file ") {
        Ok(token) => token,
        Err(code) => return code,
    };
    if token.is_none() && !listen.ip().is_loopback() {
        eprintln!(
            "exec-server: refusing to run a relay on {listen} without --token-file: \
             anyone who reaches it could register an environment"
        );
        return ExitCode::from(2);
    }
    let key = match secret_flag(args.key_file.as_deref(), "key", "--key-file ") {
        Ok(key) => key,
        Err(code) => return code,
    };
    let config = server::RelayConfig {
        listen,
        token: token.map(server::Secret::new),
        key: key.map(server::Secret::new),
        public_url: args.public_url,
        ping_every: Duration::from_millis(args.ping_interval_ms),
    };
    match server::relay(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("exec-server: relay: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `exec-server bridge [ADDRESS]`.
fn bridge(args: BridgeArgs) -> ExitCode {
    use exec_server::client::{ClientError, ServerCommand};
    // Read before the token variable is taken out of the environment.
    let command = match &args.address {
        Some(address) => ServerCommand::parse(address),
        None => ServerCommand::from_env().unwrap_or_else(|| {
            Err(ClientError::InvalidCommand(
                "give an ADDRESS, or set CODEX_EXEC_SERVER_NOISE_REGISTRY_URL, \
                 CODEX_EXEC_SERVER_NOISE_ENVIRONMENT_ID and CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN"
                    .into(),
            ))
        }),
    };
    let token = match registry_token(args.registry_token_file.as_deref()) {
        Ok(token) => token,
        Err(err) => {
            eprintln!("exec-server: --registry-token-file {err}");
            return ExitCode::from(2);
        }
    };
    let command = match command {
        Ok(command) if token.is_empty() => command,
        Ok(command) => command.registry_token(token),
        Err(err) => {
            eprintln!("exec-server: bridge: {err}");
            return ExitCode::from(2);
        }
    };
    match exec_server::client::bridge_stdio(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("exec-server: bridge: {err}");
            ExitCode::from(125)
        }
    }
}

fn main() -> ExitCode {
    // The sandbox's init: before anything else, with nothing of the
    // server's (not even logging) set up.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == exec_server::cli::INIT_ARG)
    {
        return ExitCode::from(exec_server::cli::init_main() as u8);
    }
    init_logging();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == server::SANDBOX_HELPER_ARG)
    {
        return ExitCode::from(server::sandbox_helper_main() as u8);
    }
    // What this process inherited beyond stdin, stdout and stderr must not
    // reach the commands it runs (nor the server it starts, for `run`).
    if let Err(err) = exec_server::cli::close_on_exec_from_3() {
        eprintln!("exec-server: cannot mark inherited descriptors close-on-exec: {err}");
        return ExitCode::from(125);
    }
    let cli = Cli::parse();
    if let Some(Command::SandboxCheck) = cli.command {
        let (ok, text) = server::describe_sandbox();
        let text = text + &exec_server::cli::describe_containment();
        let written = emit(text.as_bytes());
        return if ok { written } else { ExitCode::FAILURE };
    }
    if let Some(Command::Completions { shell }) = cli.command {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "exec-server", &mut script);
        if shell == clap_complete::Shell::Bash {
            // clap_complete 4.6 spells the hyphen of our name two ways in
            // the bash script (`exec__server__subcmd__run` where it finds
            // the subcommand, `exec__subcmd__server__subcmd__run` where it
            // completes it), so nothing after a subcommand completed.
            let text =
                String::from_utf8_lossy(&script).replace("exec__subcmd__server", "exec__server");
            script = text.into_bytes();
        }
        return emit(&script);
    }
    if let Some(Command::Man { page, dir }) = cli.command {
        return man(page.as_deref(), dir.as_deref());
    }
    if let Some(Command::Relay(args)) = cli.command {
        return relay(args);
    }
    if let Some(Command::Bridge(args)) = cli.command {
        return bridge(args);
    }
    if let Some(Command::Watch(args)) = cli.command {
        let outcome = run::watch(run::WatchOptions {
            via: args.via,
            path: args.path,
            recursive: !args.no_recursive,
            json: args.json,
            count: args.count,
        });
        if let Some(message) = outcome.message {
            eprintln!("exec-server: {message}");
        }
        return ExitCode::from(outcome.code.clamp(0, 255) as u8);
    }
    if let Some(Command::Daemon { action, persist }) = cli.command {
        return daemon(action, &persist);
    }
    if let Some(Command::Run(args)) = cli.command {
        let limits = args.limits();
        let outcome = run::run(RunOptions {
            via: args.via,
            tty: args.tty,
            null_stdin: args.null_stdin,
            escape_char: args.escape_char.0,
            cwd: args.cwd,
            env: args.env,
            env_pass: args.env_pass,
            sandbox: args.sandbox.map(|s| match s {
                SandboxArg::ReadOnly => SandboxMode::ReadOnly,
                SandboxArg::WorkspaceWrite => SandboxMode::WorkspaceWrite,
            }),
            network: args.network,
            workspace_roots: args.workspace_roots,
            hold: !args.no_hold,
            argv: args.argv,
            attach: args.attach,
            reconnect_for: Some(Duration::from_millis(args.reconnect_for_ms)),
            limits,
        });
        if let Some(message) = outcome.message {
            eprintln!("exec-server: {message}");
        }
        return ExitCode::from(outcome.code.clamp(0, 255) as u8);
    }
    serve(cli.serve)
}

/// Write all of `bytes` to stdout. A reader that has gone (`| head -1`)
/// has what it wanted: that is no error and no panic.
fn emit(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("exec-server: cannot write to stdout: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `exec-server man [PAGE] [--dir DIR]`: one page per command, each
/// subcommand's named `exec-server-NAME` as the main page refers to it.
fn man(page: Option<&str>, dir: Option<&std::path::Path>) -> ExitCode {
    use clap::CommandFactory;
    let mut command = Cli::command();
    command.build();
    let wanted = match page {
        Some(page) => format!("exec-server-{page}"),
        None => "exec-server".into(),
    };
    fn pages(command: &clap::Command, all: &mut Vec<clap::Command>) {
        all.push(command.clone());
        for sub in command.get_subcommands() {
            pages(sub, all);
        }
    }
    let mut all = Vec::new();
    pages(&command, &mut all);
    let name = |c: &clap::Command| c.get_display_name().unwrap_or(c.get_name()).to_string();
    let source = concat!("exec-server ", env!("CARGO_PKG_VERSION"));
    if let Some(dir) = dir {
        for c in &all {
            let page = clap_mangen::Man::new(c.clone()).source(source);
            if let Err(err) = page.generate_to(dir) {
                eprintln!(
                    "exec-server: man page {} into {}: {err}",
                    name(c),
                    dir.display()
                );
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let Some(found) = all.iter().find(|c| name(c) == wanted) else {
        let known: Vec<String> = all
            .iter()
            .skip(1)
            .map(|c| name(c).trim_start_matches("exec-server-").to_string())
            .collect();
        eprintln!(
            "exec-server: no man page {}; there are: {}",
            page.unwrap_or_default(),
            known.join(", ")
        );
        return ExitCode::from(2);
    };
    let mut text = Vec::new();
    if let Err(err) = clap_mangen::Man::new(found.clone())
        .source(source)
        .render(&mut text)
    {
        eprintln!("exec-server: {err}");
        return ExitCode::FAILURE;
    }
    emit(&text)
}

/// A --persist daemon's detached TTL and idle exit, by default: 10 minutes.
const PERSIST_TTL_MS: u64 = 600_000;

/// `exec-server daemon status|stop`.
fn daemon(action: DaemonAction, name: &str) -> ExitCode {
    let place = match server::PersistPlace::of(name) {
        Ok(place) => place,
        Err(err) => {
            eprintln!("exec-server: {err}");
            return ExitCode::FAILURE;
        }
    };
    let Some(pid) = server::daemon_pid(&place) else {
        println!("no daemon {name} runs ({})", place.socket.display());
        return match action {
            DaemonAction::Status => ExitCode::from(3),
            DaemonAction::Stop => ExitCode::SUCCESS,
        };
    };
    match action {
        DaemonAction::Status => match server::daemon_status(&place) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("exec-server: daemon {name} (pid {pid}): {err}");
                ExitCode::FAILURE
            }
        },
        DaemonAction::Stop => {
            // SAFETY: plain syscall; the pid file names a live daemon.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while server::daemon_pid(&place).is_some() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if server::daemon_pid(&place).is_some() {
                eprintln!("exec-server: daemon {name} (pid {pid}) did not stop");
                return ExitCode::FAILURE;
            }
            println!("stopped daemon {name} (pid {pid})");
            ExitCode::SUCCESS
        }
    }
}

fn parse_listen(text: &str) -> Result<server::Listen, String> {
    server::Listen::parse(text)
}

fn serve(cli: ServeArgs) -> ExitCode {
    let mut listen = cli.listen;
    if cli.stdio && !listen.contains(&server::Listen::Stdio) {
        listen.push(server::Listen::Stdio);
    }
    let exit_on_stdin_close = cli.exit_on_stdin_close
        || std::env::var("CODEX_EXEC_SERVER_EXIT_ON_STDIN_CLOSE")
            .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
    if exit_on_stdin_close && cli.remote.is_none() {
        eprintln!("exec-server: --exit-on-stdin-close is only valid with --remote");
        return ExitCode::from(2);
    }
    let remote = match &cli.remote {
        Some(url) => {
            let environment_id = cli
                .environment_id
                .as_deref()
                .map(str::trim)
                .unwrap_or_default();
            if environment_id.is_empty() {
                eprintln!(
                    "exec-server: environment id is required for remote exec-server registration"
                );
                return ExitCode::from(2);
            }
            let token = match registry_token(cli.registry_token_file.as_deref()) {
                Ok(token) => token,
                Err(err) => {
                    eprintln!("exec-server: --registry-token-file {err}");
                    return ExitCode::from(2);
                }
            };
            Some(server::RemoteConfig {
                registry: url.clone(),
                environment_id: environment_id.to_string(),
                name: cli.name.clone(),
                token: server::Secret::new(token),
                ping_every: Duration::from_millis(cli.ws_ping_interval_ms),
            })
        }
        None => None,
    };
    if listen.is_empty() && remote.is_none() {
        eprintln!("exec-server: nothing to do; try `exec-server --stdio` or --help");
        return ExitCode::from(2);
    }
    for root in &cli.workspace_roots {
        if !root.is_absolute() {
            eprintln!(
                "exec-server: --workspace-root must be absolute: {}",
                root.display()
            );
            return ExitCode::from(2);
        }
    }
    if let Some(name) = &cli.persist {
        // The daemon's flags: ours, with the daemon's defaults.
        let mut args = vec![
            format!("--max-message-bytes={}", cli.max_message_bytes),
            format!("--retain-bytes={}", cli.retain_bytes),
            format!("--retain-chunks={}", cli.retain_chunks),
            format!("--closed-retention-ms={}", cli.closed_retention_ms),
            format!(
                "--detached-session-ttl-ms={}",
                cli.detached_session_ttl_ms.unwrap_or(PERSIST_TTL_MS)
            ),
            format!(
                "--idle-exit-ms={}",
                cli.idle_exit_ms.unwrap_or(PERSIST_TTL_MS)
            ),
        ];
        for root in &cli.workspace_roots {
            args.push(format!("--workspace-root={}", root.display()));
        }
        if cli.no_binary_frames {
            args.push("--no-binary-frames".into());
        }
        if let Some(n) = cli.concurrent_requests {
            args.push(format!("--concurrent-requests={n}"));
        }
        match &cli.audit_log {
            Some(exec_server::cli::AuditTarget::File(path)) => {
                // The daemon's cwd is not ours.
                let path = std::env::current_dir().unwrap_or_default().join(path);
                args.push(format!("--audit-log={}", path.display()));
            }
            Some(exec_server::cli::AuditTarget::Unix(path)) => {
                let path = std::env::current_dir().unwrap_or_default().join(path);
                args.push(format!("--audit-log=unix:{}", path.display()));
            }
            Some(exec_server::cli::AuditTarget::Stderr) => args.push("--audit-log=stderr".into()),
            None => {}
        }
        if let Some(max) = cli.audit_log_max_bytes {
            args.push(format!("--audit-log-max-bytes={max}"));
        }
        for (flag, spec) in [
            ("--default-limits", &cli.default_limits),
            ("--max-limits", &cli.max_limits),
        ] {
            if let Some(spec) = spec {
                args.push(format!("{flag}={}", exec_server::limits::spec_text(spec)));
            }
        }
        return match server::bridge(name, &args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("exec-server: --persist {name}: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let connection_token = match secret_flag(cli.connection_token_file.as_deref(), "token", "") {
        Ok(token) => token,
        Err(code) => return code,
    };
    let config = Config {
        max_message_bytes: cli.max_message_bytes,
        retain_bytes: cli.retain_bytes,
        retain_chunks: cli.retain_chunks.max(1),
        closed_retention: Duration::from_millis(cli.closed_retention_ms),
        detached_ttl: Duration::from_millis(cli.detached_session_ttl_ms.unwrap_or(30_000)),
        idle_exit: cli.idle_exit_ms.map(Duration::from_millis),
        pid_file: cli.pid_file,
        connection_token,
        insecure_listen: cli.insecure_listen,
        ws_ping_every: Duration::from_millis(cli.ws_ping_interval_ms),
        binary_frames: !cli.no_binary_frames,
        concurrent_requests: cli.concurrent_requests.map(|n| n as usize),
        workspace_roots: cli.workspace_roots,
        exit_on_stdin_close,
        audit_log: cli.audit_log.map(|t| (t, cli.audit_log_max_bytes)),
        limits: exec_server::cli::LimitPolicy {
            defaults: cli.default_limits.unwrap_or_default(),
            max: cli.max_limits.unwrap_or_default(),
        },
    };
    let outcome = match remote {
        Some(remote) => server::run_remote(config, remote),
        None => server::run(config, &listen),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("exec-server: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `--default-limits`/`--max-limits`.
fn limit_spec(text: &str) -> Result<exec_server::limits::Requested, String> {
    exec_server::limits::parse_spec(text)
}

/// Logs go to stderr; `EXEC_SERVER_LOG` (or `RUST_LOG`) filters them.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("EXEC_SERVER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(LogFormat(tracing_subscriber::fmt::format()))
        .init();
}

/// The usual format, except for the lines of a server that `run` started:
/// those are the server's own log lines, already stamped, and are written
/// as they are.
struct LogFormat(tracing_subscriber::fmt::format::Format);

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LogFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if event.metadata().target() == exec_server::client::SERVER_STDERR_TARGET {
            use tracing_subscriber::fmt::FormatFields;
            ctx.format_fields(writer.by_ref(), event)?;
            return writeln!(writer);
        }
        self.0.format_event(ctx, writer, event)
    }
}
