//! No child outlives the server, whatever way the server ends, and no
//! zombie is left behind.

use std::time::Duration;

use serde_json::json;

use crate::support::{Server, eventually, pid_gone, unb64};

/// Start process "tree": a shell whose background child sleeps; returns the
/// grandchild's pid.
fn start_tree(s: &mut Server) -> i32 {
    s.start_process(
        "tree",
        &["sh", "-c", "sleep 1000 & echo $!; wait"],
        json!({}),
    );
    let out =
        s.notification(|m| m["method"] == "process/output" && m["params"]["processId"] == "tree");
    String::from_utf8(unb64(&out["params"]["chunk"]))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Start a pipe child, a tty child and a grandchild, all sleeping; return
/// their pids.
fn start_sleepers(s: &mut Server) -> Vec<i32> {
    s.start_process("pipe", &["sleep", "1000"], json!({}));
    s.start_process("tty", &["sleep", "1000"], json!({"tty": true}));
    let grandchild = start_tree(s);
    let list = s.call("process/list", json!({}));
    let mut pids: Vec<i32> = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect();
    pids.push(grandchild);
    assert_eq!(pids.len(), 4);
    assert!(pids.iter().all(|&p| !pid_gone(p)), "all sleepers run");
    pids
}

#[test]
fn sigkill_of_the_server_kills_every_child_and_grandchild() {
    let mut s = Server::started(&[]);
    let pids = start_sleepers(&mut s);
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(2), || pids.iter().all(|&p| pid_gone(p))),
        "survivors: {:?}",
        pids.iter().filter(|&&p| !pid_gone(p)).collect::<Vec<_>>()
    );
}

#[test]
fn stdin_eof_kills_children_and_the_server_exits() {
    let mut s = Server::started(&[]);
    let pids = start_sleepers(&mut s);
    s.close_stdin();
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            s.child.try_wait(),
            Ok(Some(_))
        )),
        "server did not exit after stdin closed"
    );
    assert!(s.child.try_wait().unwrap().unwrap().success());
    assert!(eventually(Duration::from_secs(2), || pids
        .iter()
        .all(|&p| pid_gone(p))));
}

#[test]
fn sigterm_of_the_server_kills_children() {
    let mut s = Server::started(&[]);
    let pids = start_sleepers(&mut s);
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert!(eventually(Duration::from_secs(5), || matches!(
        s.child.try_wait(),
        Ok(Some(_))
    )));
    assert!(eventually(Duration::from_secs(2), || pids
        .iter()
        .all(|&p| pid_gone(p))));
}

#[test]
fn terminate_kills_the_whole_process_group() {
    let mut s = Server::started(&[]);
    let grandchild = start_tree(&mut s);
    let r = s.call("process/terminate", json!({"processId": "tree"}));
    assert_eq!(r["running"], true);
    assert!(eventually(Duration::from_secs(2), || pid_gone(grandchild)));
}

#[test]
fn finished_children_leave_no_zombies() {
    let mut s = Server::started(&[]);
    for i in 0..20 {
        s.start_process(&format!("p{i}"), &["true"], json!({}));
    }
    for i in 0..20 {
        let id = format!("p{i}");
        s.notification(|m| {
            m["method"] == "process/closed" && m["params"]["processId"] == id.as_str()
        });
    }
    let server = s.child.id() as i32;
    let zombies = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| {
                let rest: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                rest.len() > 2 && rest[0] == "Z" && rest[1].parse::<i32>().ok() == Some(server)
            })
            .count()
    };
    assert!(
        eventually(Duration::from_secs(2), || zombies() == 0),
        "zombie children of the server remain"
    );
}

#[test]
fn killing_the_servers_whole_group_still_kills_its_children() {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(crate::support::bin());
    cmd.arg("--stdio").process_group(0);
    let mut s = Server::from_command(cmd);
    s.call("initialize", json!({"clientName": "it"}));
    s.send(&json!({"method": "initialized"}));
    let pids = start_sleepers(&mut s);
    let group = s.child.id() as i32;
    // SAFETY: plain syscall on the group we created.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    s.child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(2), || pids.iter().all(|&p| pid_gone(p))),
        "survivors: {:?}",
        pids.iter().filter(|&&p| !pid_gone(p)).collect::<Vec<_>>()
    );
}
