//! Containment: nothing a session starts outlives it. Fifty processes of
//! every shape (pipes, ptys, grandchildren, `setsid` daemons, double-forked
//! daemons, leaders that exit at once and leave a daemon behind; sandboxed
//! and not) are ended three ways: `process/terminate` of each, the end of
//! stdin, and SIGKILL of the server. Each time, nothing of them is left.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, eventually};

/// Processes whose command line holds `token`, as (pid, command line).
pub(crate) fn holding(token: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
            let rest = stat.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().take(5).collect();
            text.push_str(&format!(" [state ppid pgrp sid: {f:?}]"));
        }
        if text.contains(token) && !crate::support::pid_gone(pid) {
            found.push((pid, text));
        }
    }
    found
}

/// A number no other test uses, for `sleep` to carry in its command line.
fn token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}{:03}{:02}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst),
        7
    )
}

fn sandbox() -> Value {
    json!({"permissions": {"type": "managed", "network": "restricted", "file_system": {
        "type": "restricted", "entries": [
            {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"}]}}})
}

/// Start fifty processes of every shape; returns their ids once every
/// daemon is running.
fn start_fifty(s: &mut Server, t: &str) -> Vec<String> {
    let quiet = "</dev/null >/dev/null 2>&1";
    let shapes = [
        format!("exec sleep {t}"),
        format!("sleep {t} & wait"),
        format!("setsid sleep {t} {quiet} & sleep {t}"),
        format!("(sleep {t} {quiet} &); sleep {t}"),
        format!("setsid sh -c '(setsid sleep {t} {quiet} &)' {quiet}; (sleep {t} {quiet} &)"),
    ];
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = format!("p{i}");
        let script = &shapes[i % shapes.len()];
        let mut extra = json!({"tty": i % 4 == 1, "env": {"PATH": "/usr/bin:/bin"}});
        if i % 3 == 0 {
            extra["sandbox"] = sandbox();
        }
        s.start_process(&id, &["sh", "-c", script], extra);
        ids.push(id);
    }
    // The last shape's leader exits at once; wait until the server has
    // seen it go (and so counted what it left in its container). In
    // subreaper mode, orphans a process leaves in the very instant the
    // server is SIGKILLed can escape: README says so.
    for i in (0..50).filter(|i| i % shapes.len() == shapes.len() - 1) {
        let id = format!("p{i}");
        s.notification(|m| {
            m["method"] == "process/exited" && m["params"]["processId"] == id.as_str()
        });
    }
    // Each shape leaves at least one `sleep` of its own.
    assert!(
        eventually(Duration::from_secs(10), || {
            holding(&format!("sleep {t}")).len() >= 50
        }),
        "not every process started: {:?}",
        holding(t)
    );
    ids
}

fn assert_none_left(t: &str, how: &str) {
    assert!(
        eventually(Duration::from_secs(2), || holding(t).is_empty()),
        "after {how}, survivors: {:?}",
        holding(t)
    );
}

#[test]
fn terminating_each_process_leaves_nothing_of_it() {
    let t = token();
    let mut s = Server::started(&[]);
    let ids = start_fifty(&mut s, &t);
    for id in &ids {
        s.call("process/terminate", json!({"processId": id}));
    }
    assert_none_left(&t, "process/terminate of each");
    // Every process reaches `closed`, including those whose leader had
    // exited before the terminate and whose daemons held the output.
    for id in &ids {
        let r = s.call(
            "process/read",
            json!({"processId": id, "afterSeq": 0, "waitMs": 2000}),
        );
        let mut r = r;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while r["closed"] != true && std::time::Instant::now() < deadline {
            let after = r["nextSeq"].as_u64().unwrap() - 1;
            r = s.call(
                "process/read",
                json!({"processId": id, "afterSeq": after, "waitMs": 1000}),
            );
        }
        assert_eq!(r["closed"], true, "{id} never closed: {r}");
    }
}

#[test]
fn the_end_of_stdin_leaves_nothing() {
    let t = token();
    let mut s = Server::started(&[]);
    start_fifty(&mut s, &t);
    s.close_stdin();
    assert!(
        eventually(Duration::from_secs(10), || matches!(
            s.child.try_wait(),
            Ok(Some(_))
        )),
        "the server did not exit"
    );
    assert_none_left(&t, "the end of stdin");
}

#[test]
fn sigkill_of_the_server_leaves_nothing() {
    let t = token();
    let mut s = Server::started(&[]);
    start_fifty(&mut s, &t);
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    assert_none_left(&t, "SIGKILL of the server");
}

#[test]
fn terminate_of_an_exited_shell_kills_its_background_child() {
    let t = token();
    let mut s = Server::started(&[]);
    s.start_process(
        "bg",
        &["sh", "-c", &format!("sleep {t} & echo $!")],
        json!({"env": {"PATH": "/usr/bin:/bin"}}),
    );
    let exited = s.notification(|m| m["method"] == "process/exited");
    assert_eq!(exited["params"]["exitCode"], 0);
    assert_eq!(holding(&t).len(), 1, "the background sleep runs");
    let r = s.call("process/terminate", json!({"processId": "bg"}));
    assert_eq!(r["running"], false);
    assert_none_left(&t, "process/terminate of the exited shell");
    s.notification(|m| m["method"] == "process/closed");
}

#[test]
fn environment_info_and_sandbox_check_name_the_same_containment() {
    let mut s = Server::started(&[]);
    let info = s.call("environment/info", json!({}));
    let mechanism = info["capabilities"]["containment"]
        .as_str()
        .unwrap()
        .to_string();
    let check = std::process::Command::new(crate::support::bin())
        .arg("sandbox-check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("containment:"))
        .unwrap_or_default();
    match mechanism.as_str() {
        "cgroup" => assert!(line.contains("cgroup v2"), "{line}"),
        "subreaper" => assert!(line.contains("child subreapers"), "{line}"),
        other => panic!("unknown containment {other}"),
    }
}

#[test]
fn a_dead_watchdog_refuses_new_starts_with_a_clear_error() {
    let mut s = Server::started(&[]);
    let server = s.child.id();
    let watchdog = crate::support::watchdog_of(server);
    // SAFETY: plain syscall on our own grandchild.
    assert_eq!(unsafe { libc::kill(watchdog, libc::SIGKILL) }, 0);
    assert!(eventually(Duration::from_secs(2), || {
        crate::support::pid_gone(watchdog)
    }));
    let r = s.request(
        "process/start",
        json!({"processId": "late", "argv": ["true"], "cwd": "/tmp"}),
    );
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("watchdog"), "{r}");
    // The server still answers.
    s.call("process/list", json!({}));
    // With nobody to clean up after it, the server removes its own cgroup
    // subtree as it exits.
    let own = std::fs::read_to_string(format!("/proc/{server}/cgroup")).unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2").then(|| {
            let f: Vec<&str> = left.split(' ').collect();
            (f[4].to_string(), f[3].to_string())
        })
    });
    let root = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .zip(mount)
        .map(|(path, (point, base))| {
            let rel = path
                .strip_prefix(base.as_str())
                .unwrap_or(path)
                .trim_start_matches('/');
            std::path::Path::new(&point)
                .join(rel)
                .join(format!("exec-server-{server}"))
        });
    let made = root.as_ref().is_some_and(|r| r.exists());
    s.close_stdin();
    assert!(s.child.wait().unwrap().success());
    if let (true, Some(root)) = (made, root) {
        assert!(!root.exists(), "{} was left behind", root.display());
    }
}
