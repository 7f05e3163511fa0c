//! exec-server runs processes and touches files on a machine on behalf of an
//! orchestrator, speaking newline-delimited JSON-RPC 2.0, wire-compatible
//! with the Codex exec-server protocol. The wire contract is
//! [`wire_contract`] (`docs/PROTOCOL.md`, shipped with the crate).
//!
//! # The client library
//!
//! The public API is [`client`]: what an orchestrator uses to start a
//! server (locally, over ssh, any command) and drive it.
//!
//! ```no_run
//! use exec_server::client::{Client, Sandbox, ServerCommand, StartOptions};
//!
//! # async fn demo() -> Result<(), exec_server::client::ClientError> {
//! // Started on the first call, over any command that speaks the protocol.
//! let client = Client::new(ServerCommand::parse("ssh build-box exec-server --stdio")?);
//! // The environment is the executor's, without secret-looking names.
//! let mut build = client
//!     .start(
//!         StartOptions::new("build", ["cargo", "build"])
//!             .cwd("/src/project")
//!             .sandbox(Sandbox::workspace_write()),
//!     )
//!     .await?;
//! let status = build
//!     .wait_with_output(|stream, bytes| eprint!("{stream:?}: {}", String::from_utf8_lossy(bytes)))
//!     .await?;
//! eprintln!("exit {}", status.code);
//! let manifest = client.read_file("/src/project/Cargo.toml").await?;
//! # let _ = manifest;
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! A client-only build (`default-features = false, features =
//! ["client"]`) compiles none of the server, nor clap or
//! tracing-subscriber. The client needs tokio with the `rt`, `macros`,
//! `process`, `io-util`, `sync`, `time` and `signal` features, which this
//! crate enables.
//!
//! Everything else is the server, which the `exec-server` binary runs; its
//! modules are private. The layout below is for those who work on it.
//!
//! # Layout
//!
//! A request flows one way: transport -> jsonrpc -> dispatch -> handler ->
//! response.
//!
//! - `transport`: bytes in, frames out; lines out, bytes written. Knows no
//!   method.
//! - `jsonrpc`: what one line means (request, notification, batch, or the
//!   error it earned, duplicate members included) and how a response or
//!   notification is written.
//! - `error`: the one error enum, and where each error gets its JSON-RPC
//!   code and `data.kind`.
//! - `server`: the connection loop and handshake gating, the method table
//!   (`dispatch`), the session registry, and the stdio mode.
//! - `protocol`: params and results of every method.
//! - `process`: spawning with pipes or a pty, the sequence-numbered output
//!   log, stdin, signals, reaping, containment (a cgroup or a subreaper
//!   tree per process), the sandbox's init, and the watchdog that kills
//!   everything when the server dies.
//! - `fs`: the filesystem methods and per-connection streaming handles.
//! - `http`: `http/request`, an HTTP(S) client on the executor.
//! - `net`: managed networking: the per-process policy proxy (HTTP,
//!   SOCKS5), its decisions and the questions put to the client, and the
//!   bridges into a sandboxed command's network namespace.
//! - `env_policy`: deriving a child's environment from a policy.
//! - `environment`: the `environment/info` result.
//! - `sandbox`: the executor's own sandbox (Landlock, PID and mount
//!   namespaces, seccomp) for `process/start` and the `fs/*` methods.
//! - `sys`: fd and socket helpers shared by `process` and `sandbox`.
//! - `sync`, `wildcard`: a poison-ignoring mutex lock, and the wildcard
//!   matcher of env-var patterns and sandbox globs.
//! - [`client`]: the orchestrator side: a client that spawns a server lazily
//!   over any command, process handles, and the `exec-server run` CLI.

#![warn(missing_docs)]
// The modules both sides share (errors, protocol types) carry the server's
// parts too; a client-only build leaves those unused.
#![cfg_attr(not(feature = "server"), allow(dead_code))]

#[cfg(feature = "client")]
pub mod client;

/// The wire contract, `docs/PROTOCOL.md` as shipped with the crate (its
/// text is the contract's own markdown, not rustdoc's, hence the allows).
#[doc = include_str!("../docs/PROTOCOL.md")]
#[allow(
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls
)]
pub mod wire_contract {}
#[cfg(feature = "server")]
mod audit;
#[cfg(feature = "server")]
mod capabilities;
#[cfg(feature = "server")]
mod endpoints;
#[cfg(feature = "server")]
mod env_config;
#[cfg(feature = "server")]
mod env_policy;
#[cfg(feature = "server")]
mod environment;
mod error;
mod frame;
#[cfg(feature = "server")]
mod fs;
#[cfg(feature = "server")]
mod http;
mod jsonrpc;
pub mod limits;
mod lines;
#[cfg(feature = "server")]
mod net;
#[cfg(feature = "server")]
mod process;
mod protocol;
/// The remote transport's parts (the relay frame, the Noise channel, the
/// registry's calls), for an orchestrator or a test that drives a relay
/// stream itself; `exec-server --remote`, `exec-server relay` and the
/// client's `noise+http://` addresses are built on them.
#[cfg(feature = "remote")]
pub mod remote;
#[cfg(feature = "server")]
mod sandbox;
#[cfg(feature = "server")]
mod server;
mod sync;
#[cfg(feature = "server")]
mod sys;
#[cfg(feature = "server")]
mod transport;
#[cfg(feature = "server")]
mod watch;
#[cfg(feature = "server")]
mod wildcard;

/// What the `exec-server` binary calls into; not an API to build on.
#[doc(hidden)]
#[cfg(feature = "server")]
pub mod cli {
    pub use crate::audit::Target as AuditTarget;
    pub use crate::process::container::describe_host as describe_containment;
    pub use crate::process::exec::close_on_exec_from_3;
    pub use crate::process::init::{ARG as INIT_ARG, main as init_main};
    pub use crate::process::limits::Policy as LimitPolicy;
    #[cfg(feature = "remote")]
    pub use crate::remote::executor::{RemoteConfig, run_remote};
    #[cfg(feature = "remote")]
    pub use crate::remote::registry::Secret;
    #[cfg(feature = "remote")]
    pub use crate::remote::relay::{RelayConfig, run as relay};
    pub use crate::sandbox::describe_host as describe_sandbox;
    pub use crate::sandbox::helper::{ARG as SANDBOX_HELPER_ARG, main as sandbox_helper_main};
    pub use crate::server::persist::{Place as PersistPlace, bridge, daemon_pid};
    pub use crate::server::{Config, Listen, daemon_status, run};
}
