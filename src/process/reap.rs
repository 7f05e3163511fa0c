//! Waiting for a process: its exit, its close, and its expiry.

use std::sync::Arc;
use std::time::Duration;

use super::exec;
use super::state::Process;
use super::table::ProcessTable;

/// After the exit status is known, how long to let the output pumps drain
/// what the child wrote before exiting, so that it gets the lower seqs.
const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(50);

/// Wait for the child, record its exit, and forget the process once it has
/// been closed for the retention period.
pub(super) async fn reap(table: Arc<ProcessTable>, process: Arc<Process>, mut child: exec::Child) {
    let status = child.wait().await;
    if child.is_reaped() {
        process.lock().reaped = true;
        table
            .containment
            .leader_reaped(&process.container, process.pid);
        // Its pidfd goes now, not when the process is forgotten.
        drop(child);
    } else {
        // A sandbox's init lives on while what the program left does.
        let table = table.clone();
        let process = process.clone();
        tokio::spawn(async move {
            if let Err(err) = child.reap().await {
                tracing::warn!(id = %process.id, "waiting for the sandbox's init failed: {err}");
            }
            process.lock().reaped = true;
            table
                .containment
                .leader_reaped(&process.container, process.pid);
        });
    }
    // Let the pumps take what the child wrote before it exited.
    let drained = process.wait_until(|s| s.open_streams == 0);
    let _ = tokio::time::timeout(EXIT_DRAIN_GRACE, drained).await;
    let (code, signal) = match status {
        Ok(status) => exit_code(status),
        Err(err) => {
            tracing::warn!(id = %process.id, "waiting for the child failed: {err}");
            (-1, None)
        }
    };
    process.record_exit(code, signal).await;
    table.live.send_modify(|n| *n -= 1);

    // Wait for close, then keep the process readable for a while.
    process.wait_until(|s| s.closed_seq.is_some()).await;
    tokio::time::sleep(table.limits.closed_retention).await;
    table.forget(&process);
}

/// The protocol's exit code (128+N for a signal) and the signal's name.
fn exit_code(status: std::process::ExitStatus) -> (i32, Option<&'static str>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(sig)) => (128 + sig, Some(signal_name(sig))),
        (None, None) => (-1, None),
    }
}

/// The conventional name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGSYS => "SIGSYS",
        _ => "SIGUNKNOWN",
    }
}
