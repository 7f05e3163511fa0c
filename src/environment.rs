//! `environment/info`: what this executor is.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::protocol::path_to_uri;

/// The signals `process/signal` accepts.
const SIGNALS: &[&str] = &[
    "interrupt",
    "terminate",
    "kill",
    "hangup",
    "quit",
    "user1",
    "user2",
];

/// The `environment/info` result.
/// `containment`: what holds each process's tree and enforces its limits;
/// `limits`: the server's defaults and ceilings.
pub fn info(
    workspace_roots: &[PathBuf],
    containment: &crate::process::container::Containment,
    limits: &crate::process::limits::Policy,
) -> Value {
    let shell = std::env::var_os("SHELL")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/bin/sh"));
    let shell_name = shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".into());
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let tmp = std::env::temp_dir();
    // `:tmpdir` binds to TMPDIR when it is set (relative to the server's
    // cwd if relative), and to nothing otherwise, as in the reference.
    let temporary: Vec<String> = std::env::var_os("TMPDIR")
        .filter(|v| !v.is_empty())
        .map(|v| path_to_uri(&cwd.join(v)))
        .into_iter()
        .collect();
    json!({
        "shell": { "name": shell_name, "path": shell.to_string_lossy() },
        "cwd": path_to_uri(&cwd),
        "tempDir": path_to_uri(&tmp),
        "temporaryDirectories": temporary,
        "capabilities": {
            // The reference's feature gates: true only for what this
            // server really does.
            "networkProxyLaunch": crate::net::PROXY_LAUNCH,
            "sandboxedFileStreaming": true,
            "environmentConfigRead": true,
            "capabilityDiscoverySandbox": true,
            "tty": true,
            "pipeStdin": true,
            "closeStdin": true,
            "resize": true,
            "signals": SIGNALS,
            "processList": true,
            "sandbox": crate::sandbox::describe_host().0,
            "filesystem": true,
            "containment": containment.mode().name(),
            // The `limits` of process/start this host enforces, and with a
            // sandbox.
            "limits": containment.controllers().enforced(),
            "sandboxedLimits": containment
                .controllers()
                .enforced_sandboxed(crate::sandbox::needs_user_namespace()),
        },
        "limits": { "defaults": limits.defaults, "max": limits.max },
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "workspaceRoots": workspace_roots.iter().map(|p| path_to_uri(p)).collect::<Vec<_>>(),
    })
}

/// The roots `:workspace_roots` binds to: the `--workspace-root` flags, or
/// the server's own cwd when none was given.
pub fn workspace_roots(flags: &[PathBuf]) -> Vec<PathBuf> {
    if flags.is_empty() {
        vec![std::env::current_dir().unwrap_or_else(|_| Path::new("/").to_path_buf())]
    } else {
        flags.to_vec()
    }
}
