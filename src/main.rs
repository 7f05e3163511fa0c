//! The `exec-server` command line: parse flags, pick a mode, call into the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use exec_server::server::{self, Config};

/// Runs processes and touches files on this machine for an orchestrator,
/// over newline-delimited JSON-RPC 2.0.
#[derive(Debug, Parser)]
#[command(name = "exec-server", version)]
struct Cli {
    /// Serve one connection on stdin/stdout (same as `--listen stdio`).
    #[arg(long)]
    stdio: bool,

    /// Where to listen: `stdio` or `stdio://`.
    #[arg(long, value_name = "ADDRESS")]
    listen: Option<String>,

    /// Longest accepted message line, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    max_message_bytes: usize,

    /// Output retained per process, in bytes.
    #[arg(long, default_value_t = 1024 * 1024, value_name = "BYTES")]
    retain_bytes: usize,

    /// Output chunks retained per process.
    #[arg(long, default_value_t = 50_000, value_name = "COUNT")]
    retain_chunks: usize,

    /// How long a closed process stays readable.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    closed_retention_ms: u64,

    /// How long a detached session lives before its processes are killed.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    detached_session_ttl_ms: u64,

    /// A root that `:workspace_roots` binds to (repeatable; default: the
    /// server's current directory).
    #[arg(long = "workspace-root", value_name = "DIR")]
    workspace_roots: Vec<PathBuf>,
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let stdio = cli.stdio || matches!(cli.listen.as_deref(), Some("stdio") | Some("stdio://"));
    if !stdio {
        match cli.listen.as_deref() {
            Some(other) => eprintln!("exec-server: unsupported listen address {other}"),
            None => eprintln!("exec-server: nothing to do; try `exec-server --stdio` or --help"),
        }
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
    let config = Config {
        max_message_bytes: cli.max_message_bytes,
        retain_bytes: cli.retain_bytes,
        retain_chunks: cli.retain_chunks.max(1),
        closed_retention: Duration::from_millis(cli.closed_retention_ms),
        detached_ttl: Duration::from_millis(cli.detached_session_ttl_ms),
        workspace_roots: cli.workspace_roots,
    };
    match server::run_stdio(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("exec-server: {err}");
            ExitCode::FAILURE
        }
    }
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
        .init();
}
