//! Filesystem methods under a sandbox: the server re-executes itself as a
//! short-lived helper that confines itself with the request's rules, then
//! runs the method. The kernel, not a string check, decides what the
//! method can touch, so symlinks and `..` can't lead out.
//!
//! The helper reads one request (`{rules, method, params,
//! maxMessageBytes}`) on stdin and writes one JSON-RPC style answer
//! (`{result}` or `{error}`) on stdout. For `fs/open` it sends the opened
//! file back over fd 3, a Unix socket.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::policy::Rules;
use crate::error::{Error, Result};
use crate::protocol::method;

/// The hidden first argument that makes the binary a helper.
pub const ARG: &str = "__sandboxed-fs";
/// The helper's fd for sending back an opened file.
const FILE_SOCKET_FD: i32 = 3;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    rules: Rules,
    method: String,
    params: Value,
    max_message_bytes: usize,
}

/// Run `name` with `params` in a helper confined by `rules`; the answer,
/// and for `fs/open` the opened file.
pub fn run(
    rules: &Rules,
    name: &str,
    params: &Value,
    max_message_bytes: usize,
) -> Result<(Value, Option<File>)> {
    let internal = |what: &str, err: std::io::Error| Error::io(what, &err);
    let request = serde_json::to_vec(&json!({
        "rules": rules,
        "method": name,
        "params": params,
        "maxMessageBytes": max_message_bytes,
    }))
    .map_err(|e| Error::Internal {
        message: format!("failed to encode the sandboxed request: {e}"),
        errno: None,
    })?;
    let (ours, theirs) =
        super::socket_pair().map_err(|e| internal("failed to create a socket pair", e))?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: dup2 only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(theirs_fd, FILE_SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Known to the server as its own child, so that it is never taken for
    // an orphan to reap or kill.
    let mut child = crate::process::container::spawn_known(|| cmd.spawn(), |c| c.id() as i32)
        .map_err(|e| internal("failed to start the sandboxed helper", e))?;
    let pid = child.id() as i32;
    drop(theirs);
    // The helper reads the whole request before it writes anything.
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(&request);
    let mut answer = Vec::new();
    let read = child
        .stdout
        .take()
        .expect("stdout is piped")
        .read_to_end(&mut answer);
    let status = child.wait();
    crate::process::container::forget(pid);
    let status = status.map_err(|e| internal("failed to wait for the sandboxed helper", e))?;
    written.map_err(|e| internal("failed to send the sandboxed request", e))?;
    read.map_err(|e| internal("failed to read the sandboxed answer", e))?;
    let answer: Value = serde_json::from_slice(&answer).map_err(|_| Error::Internal {
        message: format!("the sandboxed helper failed ({status})"),
        errno: None,
    })?;
    if let Some(error) = answer.get("error") {
        return Err(Error::Forwarded(Box::new(error.clone())));
    }
    let file = super::recv_fd(ours.as_raw_fd()).map(File::from);
    Ok((answer.get("result").cloned().unwrap_or(Value::Null), file))
}

/// The helper's `main`: confine, run, answer. Returns the exit code.
pub fn main() -> i32 {
    let answer = match serve() {
        Ok(result) => json!({ "result": result }),
        Err(err) => json!({ "error": err.to_json() }),
    };
    let mut out = std::io::stdout().lock();
    let ok = serde_json::to_writer(&mut out, &answer).is_ok() && out.flush().is_ok();
    if ok { 0 } else { 1 }
}

fn serve() -> Result<Value> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| Error::io("failed to read the request", &e))?;
    let request: Request = serde_json::from_slice(&input)
        .map_err(|e| Error::InvalidParams(format!("invalid sandboxed request: {e}")))?;
    let prepared = super::prepare(&request.rules, false, None, None)?;
    prepared
        .enter()
        .map_err(|e| Error::SandboxUnavailable(format!("failed to enter the sandbox: {e}")))?;
    if request.method == method::FS_OPEN {
        let p: crate::fs::OpenParams = crate::protocol::decode(&request.method, request.params)?;
        let file = crate::fs::open_for_reading(&p.path.0)?;
        super::send_fd(FILE_SOCKET_FD, file.as_raw_fd())
            .map_err(|e| Error::io("failed to send the opened file", &e))?;
        return Ok(json!({}));
    }
    if request.method == crate::capabilities::SCAN_ROOT {
        return crate::capabilities::scan_root(request.params);
    }
    crate::fs::run_method(&request.method, request.params, request.max_message_bytes)
}
