//! Descriptors come back (issue 20): a process that has closed and been
//! forgotten holds none (a pty's master, a cgroup's directory were kept
//! for ever), starts that fail at the descriptor limit leave nothing
//! behind, and neither do 1,000 failing starts of each kind.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, bin, eventually};

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A server with `limit` descriptors (soft and hard) and a short closed
/// retention, handshaken.
fn server(limit: Option<u64>) -> Server {
    let mut command = Command::new(bin());
    command.args(["--stdio", "--closed-retention-ms", "200"]);
    if let Some(limit) = limit {
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut s = Server::from_command(command);
    s.handshake();
    s
}

/// Wait until the server has forgotten every process, then until its
/// descriptors are back to `idle` (a little slack for the runtime's own).
fn back_to(s: &mut Server, idle: usize, what: &str) {
    let pid = s.child.id();
    let forgotten = eventually(Duration::from_secs(10), || {
        s.call("process/list", json!({}))["processes"]
            .as_array()
            .is_some_and(|p| p.is_empty())
    });
    assert!(forgotten, "{what}: processes were not forgotten");
    let back = eventually(Duration::from_secs(5), || fds(pid) <= idle);
    let now = fds(pid);
    let list = std::process::Command::new("ls")
        .args(["-l", &format!("/proc/{pid}/fd")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(back, "{what}: {now} descriptors, {idle} when idle:\n{list}");
}

#[test]
fn finished_processes_hold_no_descriptor() {
    let mut s = server(None);
    std::thread::sleep(Duration::from_millis(200));
    let idle = fds(s.child.id());
    for n in 0..40 {
        let extra = json!({"tty": n % 2 == 0, "pipeStdin": n % 4 < 2});
        s.start_process(&format!("p{n}"), &["true"], extra);
    }
    back_to(&mut s, idle, "40 finished processes");
}

/// The reviewers' case: 64 descriptors, 100 starts (most fail with
/// EMFILE), terminate everything: the server is back to idle and starts
/// again.
#[test]
fn starts_that_fail_at_the_descriptor_limit_leave_nothing_behind() {
    let mut s = server(Some(64));
    std::thread::sleep(Duration::from_millis(200));
    let idle = fds(s.child.id());
    let mut failed = 0;
    for n in 0..100 {
        let r = s.request(
            "process/start",
            json!({"processId": format!("p{n}"), "argv": ["sleep", "30"], "cwd": "/",
                   "env": {}, "tty": n % 2 == 0, "pipeStdin": n % 3 == 0}),
        );
        if r["error"].is_object() {
            failed += 1;
        }
    }
    assert!(failed > 50, "the limit was not reached: {failed} failed");
    // Then the starts that need fewest descriptors, to leave as few free
    // as can be: killing must not need one the server has not got.
    for n in 100..150 {
        s.request(
            "process/start",
            json!({"processId": format!("p{n}"), "argv": ["sleep", "30"], "cwd": "/",
                   "env": {}, "tty": false, "pipeStdin": false}),
        );
    }
    for n in 0..150 {
        s.request("process/terminate", json!({"processId": format!("p{n}")}));
    }
    back_to(&mut s, idle, "after terminating everything");
    let r = s.request(
        "process/start",
        json!({"processId": "again", "argv": ["true"], "cwd": "/", "env": {}}),
    );
    assert!(r["result"].is_object(), "{r}");
}

#[test]
fn a_thousand_failing_starts_of_each_kind_leave_nothing_behind() {
    let mut s = server(None);
    std::thread::sleep(Duration::from_millis(200));
    let idle = fds(s.child.id());
    let open = json!({"permissions": {"type": "managed", "network": "restricted",
        "file_system": {"type": "unrestricted"}}});
    let kinds: Vec<(&str, Value)> = vec![
        ("missing", json!({"argv": ["/nonexistent/program"]})),
        (
            "missing-pty",
            json!({"argv": ["/nonexistent/program"], "tty": true}),
        ),
        ("directory", json!({"argv": ["/etc"], "pipeStdin": true})),
        ("cwd", json!({"argv": ["true"], "cwd": "/nonexistent"})),
        (
            "sandboxed",
            json!({"argv": ["/nonexistent/program"], "sandbox": open}),
        ),
        (
            "sandboxed-pty",
            json!({"argv": ["/nonexistent/program"], "tty": true, "sandbox": open}),
        ),
    ];
    let mut id = 10_000;
    for (kind, extra) in &kinds {
        // Pipelined: all sent, then all answered.
        for n in 0..1000 {
            let mut params = json!({"processId": format!("{kind}{n}"), "cwd": "/",
                "env": {"PATH": "/usr/bin:/bin"}});
            for (k, v) in extra.as_object().unwrap() {
                params[k] = v.clone();
            }
            s.send(&json!({"id": id + n, "method": "process/start", "params": params}));
        }
        for n in 0..1000 {
            let r = s.response(id + n);
            if !r["error"].is_object() {
                let what = s.call(
                    "process/read",
                    json!({"processId": format!("{kind}{n}"), "waitMs": 3000}),
                );
                panic!("{kind}: started: {r}\nread: {what}");
            }
        }
        id += 1000;
        back_to(&mut s, idle + 1, kind);
    }
}

/// While a closed process waits to be forgotten (30 s by default), it
/// holds no descriptor: 40 closed processes cost the server nothing.
#[test]
fn closed_processes_waiting_to_be_forgotten_hold_no_descriptor() {
    let mut s = Server::started(&[]);
    std::thread::sleep(Duration::from_millis(200));
    let pid = s.child.id();
    let idle = fds(pid);
    for n in 0..40 {
        let extra = json!({"tty": n % 2 == 0, "pipeStdin": n % 4 < 2});
        s.start_process(&format!("p{n}"), &["true"], extra);
    }
    let closed = eventually(Duration::from_secs(10), || {
        let list = s.call("process/list", json!({}));
        let all = list["processes"].as_array().cloned().unwrap_or_default();
        all.len() == 40 && all.iter().all(|p| p["closed"] == true)
    });
    assert!(closed, "the processes did not close");
    let back = eventually(Duration::from_secs(5), || fds(pid) <= idle);
    assert!(
        back,
        "{} descriptors for 40 closed processes, {idle} idle",
        fds(pid)
    );
}

/// A start that fails after the child registered itself with the
/// watchdog withdraws it: else, when the server ends, its watchdog kills
/// whatever process has that pid by then (a process of another test, of
/// the user, in the reviewers' run another server's sandbox).
#[test]
fn failed_starts_leave_nothing_for_the_watchdog_to_kill() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(bin())
        .arg("--stdio")
        .env("EXEC_SERVER_LOG", "exec_server::process::watchdog=debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let open = json!({"permissions": {"type": "managed", "network": "restricted",
        "file_system": {"type": "unrestricted"}}});
    // Written from a thread of its own: the answers are read meanwhile.
    let writer = std::thread::spawn(move || {
        let mut send = |v: Value| writeln!(stdin, "{v}").unwrap();
        send(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                    "params": {"clientName": "t"}}));
        send(json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}));
        for n in 1..=1000 {
            let argv = if n % 2 == 0 {
                json!(["/nonexistent/program"])
            } else {
                json!(["/etc"])
            };
            let mut params = json!({"processId": format!("p{n}"), "argv": argv, "cwd": "/",
                                    "env": {"PATH": "/usr/bin:/bin"}, "tty": n % 3 == 0});
            if n % 4 < 2 {
                params["sandbox"] = open.clone();
            }
            send(json!({"jsonrpc": "2.0", "id": n, "method": "process/start", "params": params}));
        }
        stdin
    });
    let mut failed = 0;
    let mut line = String::new();
    for _ in 0..=1000 {
        line.clear();
        out.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["error"]["data"]["kind"] == "spawnFailed" {
            failed += 1;
        }
    }
    assert_eq!(failed, 1000, "every start should have failed");
    let stdin = writer.join().unwrap();
    // Killed, as a server may be: the watchdog then acts on what it holds.
    child.kill().unwrap();
    drop(stdin);
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut errors = String::new();
        let _ = stderr.read_to_string(&mut errors);
        let _ = tx.send(errors);
    });
    let errors = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the watchdog did not end within 30 s of the server");
    child.wait().unwrap();
    assert!(
        errors.contains("gone; 0 trees left to kill"),
        "the watchdog was left pids of failed starts:\n{errors}"
    );
}
