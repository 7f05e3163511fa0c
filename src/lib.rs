//! exec-server runs processes and touches files on a machine on behalf of an
//! orchestrator, speaking newline-delimited JSON-RPC 2.0 (the wire contract
//! is `PROTOCOL.md`, compatible with the Codex exec-server protocol).
//!
//! # Layout
//!
//! A request flows one way: transport -> jsonrpc -> dispatch -> handler ->
//! response.
//!
//! - [`transport`]: bytes in, frames out; lines out, bytes written. Knows no
//!   method.
//! - [`jsonrpc`]: what one line means (request, notification, batch, or the
//!   error it earned) and how a response or notification is written.
//! - [`error`]: the one error enum, and where each error gets its JSON-RPC
//!   code and `data.kind`.
//! - [`server`]: the connection loop and handshake gating, the method table
//!   (`dispatch`), the session registry, and the stdio mode.
//! - [`protocol`]: params and results of every method.
//! - [`process`]: spawning with pipes or a pty, the sequence-numbered output
//!   log, stdin, signals, reaping, and the watchdog that kills every child
//!   when the server dies.
//! - [`fs`]: the filesystem methods and per-connection streaming handles.
//! - [`env_policy`]: deriving a child's environment from a policy.
//! - [`environment`]: the `environment/info` result.
//! - [`sandbox`]: the executor's own sandbox (Landlock, a private mount
//!   namespace, seccomp) for `process/start` and the `fs/*` methods.
//! - `sys`: fd and socket helpers shared by `process` and `sandbox`.
//! - [`client`]: the orchestrator side: a client that spawns a server lazily
//!   over any command, process handles, and the `exec-server run` CLI.

pub mod client;
pub mod env_policy;
pub mod environment;
pub mod error;
pub mod fs;
pub mod jsonrpc;
pub mod process;
pub mod protocol;
pub mod sandbox;
pub mod server;
pub(crate) mod sys;
pub mod transport;

/// Lock a mutex, ignoring poisoning: every critical section here leaves its
/// data consistent, so one panicked task must not take the server down.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Match `name` against `pattern`, where `star` matches any run of items
/// and `one` any single item. Iterative, with one backtrack point for the
/// last star. Env-var patterns match lower-cased chars; sandbox globs match
/// the bytes of one path component.
pub(crate) fn wildcard<T: Copy + PartialEq>(pattern: &[T], name: &[T], star: T, one: T) -> bool {
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < name.len() {
        if pi < pattern.len() && (pattern[pi] == one || pattern[pi] == name[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < pattern.len() && pattern[pi] == star {
            backtrack = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = backtrack {
            pi = sp + 1;
            ni = sn + 1;
            backtrack = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[pi..].iter().all(|&c| c == star)
}
