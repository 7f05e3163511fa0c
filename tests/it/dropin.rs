//! What an unchanged reference orchestrator relies on (issue 21): the
//! reference's request ordering under `--concurrent-requests`, and the
//! reference's shapes where they differ from ours by default.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, b64};

/// Send a request by hand; its id.
fn send(s: &mut Server, method: &str, params: Value) -> i64 {
    let id = s.take_id();
    s.send(&json!({"id": id, "method": method, "params": params}));
    id
}

/// A process that never reads its stdin (nor ends on SIGINT), and a write to it that waits for
/// room (4 MiB writes fill its 8 MiB queue; the one after waits): the id
/// of that waiting write.
fn stuck_write(s: &mut Server, process: &str) -> i64 {
    // Deaf to SIGINT, so that `process/signal` can be sent meanwhile.
    let argv = ["sh", "-c", "trap '' INT; exec sleep 60"];
    s.start_process(process, &argv, json!({"pipeStdin": true}));
    let chunk = b64(&vec![b'x'; 4 << 20]);
    for n in 0..4 {
        let params = json!({"processId": process, "chunk": chunk, "writeId": format!("w{n}")});
        let id = send(s, "process/write", params);
        if s.no_response_for(id, Duration::from_millis(300)) {
            return id;
        }
        let answer = s.response(id);
        assert!(answer.get("error").is_none(), "{answer}");
    }
    panic!("every write was answered although the child reads nothing");
}

const QUIET: Duration = Duration::from_millis(500);

#[test]
fn one_request_at_a_time_holds_ordinary_requests_and_lets_control_ones_through() {
    let mut s = Server::started(&["--concurrent-requests", "1"]);
    let waiting = stuck_write(&mut s, "w");
    let meta = send(&mut s, "fs/getMetadata", json!({"path": "/tmp"}));
    let list = send(&mut s, "process/list", json!({}));
    assert!(
        s.no_response_for(meta, QUIET),
        "an ordinary request ran beside a waiting one"
    );
    // Control requests don't queue: info, status, a long-poll read, and
    // the terminate that unblocks the write.
    assert!(s.request("environment/info", json!({}))["result"].is_object());
    assert_eq!(
        s.request("environment/status", json!({}))["result"]["status"],
        "ready"
    );
    let poll = send(
        &mut s,
        "process/read",
        json!({"processId": "w", "afterSeq": 0, "waitMs": 20000}),
    );
    assert!(
        s.request(
            "process/signal",
            json!({"processId": "w", "signal": "interrupt"})
        )["result"]
            .is_object()
    );
    assert!(s.no_response_for(meta, QUIET));
    let terminate = s.request("process/terminate", json!({"processId": "w"}));
    assert_eq!(terminate["result"]["running"], true, "{terminate}");
    // Then the queue moves, in arrival order (the read ends too).
    let wanted = [waiting, meta, list, poll];
    let mut order = Vec::new();
    while order.len() < wanted.len() {
        let msg = s
            .recv_line(crate::support::TIMEOUT)
            .expect("the queued answers");
        if let Some(id) = msg["id"].as_i64().filter(|id| wanted.contains(id)) {
            assert!(msg.get("error").is_none() || id == waiting, "{msg}");
            order.push(id);
        }
    }
    order.retain(|id| *id != poll);
    assert_eq!(order, [waiting, meta, list]);
}

#[test]
fn without_the_flag_nothing_waits_for_a_waiting_write() {
    let mut s = Server::started(&[]);
    let waiting = stuck_write(&mut s, "w");
    let meta = s.request("fs/getMetadata", json!({"path": "/tmp"}));
    assert_eq!(meta["result"]["isDirectory"], true, "{meta}");
    s.call("process/terminate", json!({"processId": "w"}));
    assert!(s.response(waiting).is_object());
}

#[test]
fn n_requests_at_once_then_the_next_waits_its_turn() {
    let mut s = Server::started(&["--concurrent-requests", "2"]);
    let first = stuck_write(&mut s, "a");
    // One place is left: the second stuck write takes it.
    let second = stuck_write(&mut s, "b");
    let meta = send(&mut s, "fs/getMetadata", json!({"path": "/tmp"}));
    assert!(
        s.no_response_for(meta, QUIET),
        "a third request ran beside two"
    );
    s.call("process/terminate", json!({"processId": "b"}));
    assert!(s.response(second).is_object());
    assert_eq!(s.response(meta)["result"]["isDirectory"], true);
    s.call("process/terminate", json!({"processId": "a"}));
    assert!(s.response(first).is_object());
}

#[test]
fn a_count_of_zero_is_refused_at_start() {
    let out = std::process::Command::new(crate::support::bin())
        .args(["--stdio", "--concurrent-requests", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrent-requests"));
}

/// `workspaceRoots: []` (explicitly empty): no workspace root is writable,
/// not even the server's own (its cwd, the default root), and what the
/// policy lets it read still runs and reads, in a process and in an fs
/// method. The same policy without `workspaceRoots` writes the server's
/// root: the emptiness is what made the difference.
#[test]
fn an_empty_workspace_roots_list_makes_no_root_writable_and_starts_fine() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let mut cmd = std::process::Command::new(crate::support::bin());
    cmd.arg("--stdio").current_dir(&root);
    let mut s = Server::from_command(cmd);
    s.handshake();
    let policy = |roots: Option<Value>| {
        let mut sandbox = json!({"permissions": {"type": "managed", "network": "restricted",
            "file_system": {"type": "restricted", "entries": [
                {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
                {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"}]}}});
        if let Some(roots) = roots {
            sandbox["workspaceRoots"] = roots;
        }
        sandbox
    };
    let script = "cat /etc/hostname >/dev/null && echo read; echo x > f && echo wrote";
    let run = |s: &mut Server, id: &str, sandbox: Value| {
        s.start_process(
            id,
            &["/bin/sh", "-c", script],
            json!({"cwd": root.to_str().unwrap(), "sandbox": sandbox}),
        );
        let (out, _) = s.collect(id);
        String::from_utf8_lossy(&out).into_owned()
    };
    let out = run(&mut s, "empty", policy(Some(json!([]))));
    assert!(out.contains("read\n"), "{out}");
    assert!(!out.contains("wrote"), "{out}");
    assert!(!root.join("f").exists());
    let file = s.call(
        "fs/readFile",
        json!({"path": "/etc/hostname", "sandbox": policy(Some(json!([])))}),
    );
    assert!(file["dataBase64"].is_string());
    let write = s.request(
        "fs/writeFile",
        json!({"path": root.join("g").to_str().unwrap(), "dataBase64": "eA==",
            "sandbox": policy(Some(json!([])))}),
    );
    assert_eq!(
        write["error"]["data"]["kind"], "permissionDenied",
        "{write}"
    );
    // Absent: the server's own root (its cwd).
    let out = run(&mut s, "absent", policy(None));
    assert!(out.contains("wrote"), "{out}");
    assert!(root.join("f").exists());
}
