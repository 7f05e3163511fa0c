//! Process behaviour over real pipes and ptys.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Server, b64, unb64};

#[test]
fn omitted_pipe_stdin_gives_eof_at_once_and_writes_answer_stdin_closed() {
    let mut s = Server::started(&[]);
    s.start_process("p", &["sh", "-c", "cat; echo done; sleep 30"], json!({}));
    s.notification(|m| {
        m["method"] == "process/output" && unb64(&m["params"]["chunk"]) == b"done\n"
    });
    let r = s.call(
        "process/write",
        json!({"processId": "p", "chunk": b64(b"x\n"), "writeId": "1"}),
    );
    assert_eq!(r["status"], "stdinClosed");
    s.call("process/terminate", json!({"processId": "p"}));
}

#[test]
fn repeated_write_id_is_written_once_and_order_is_kept() {
    let mut s = Server::started(&[]);
    s.start_process(
        "p",
        &["sh", "-c", "while read l; do echo \"line:$l\"; done"],
        json!({"pipeStdin": true}),
    );
    for (id, text) in [("w1", "one\n"), ("w1", "one\n"), ("w2", "two\n")] {
        let r = s.call(
            "process/write",
            json!({"processId": "p", "chunk": b64(text.as_bytes()), "writeId": id}),
        );
        assert_eq!(r["status"], "accepted");
    }
    s.call("process/closeStdin", json!({"processId": "p"}));
    let (out, code) = s.collect("p");
    assert_eq!(String::from_utf8(out).unwrap(), "line:one\nline:two\n");
    assert_eq!(code, Some(0));
}

#[test]
fn waiting_read_does_not_delay_a_later_start() {
    let mut s = Server::started(&[]);
    s.start_process("quiet", &["sleep", "30"], json!({}));
    s.send(&json!({"id": 1, "method": "process/read", "params": {"processId": "quiet", "waitMs": 10000}}));
    let started = Instant::now();
    s.send(&json!({"id": 2, "method": "process/start", "params": {"processId": "next", "argv": ["true"], "cwd": "/tmp"}}));
    let first = s.recv_line(Duration::from_secs(5)).expect("a response");
    assert_eq!(
        first["id"], 2,
        "the start response must come first: {first}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "start took {:?}",
        started.elapsed()
    );
    s.call("process/terminate", json!({"processId": "quiet"}));
    let read = s.response(1);
    assert_eq!(read["result"]["exited"], true);
}

#[test]
fn tty_process_sees_its_size_and_a_resize() {
    let mut s = Server::started(&[]);
    s.start_process(
        "t",
        &["sh", "-c", "stty -echo; stty size; read x; stty size"],
        json!({"tty": true, "pipeStdin": false, "ttySize": {"cols": 90, "rows": 20}}),
    );
    s.notification(|m| {
        m["method"] == "process/output" && unb64(&m["params"]["chunk"]) == b"20 90\r\n"
    });
    s.call(
        "process/resize",
        json!({"processId": "t", "cols": 132, "rows": 43}),
    );
    s.call(
        "process/write",
        json!({"processId": "t", "chunk": b64(b"\n"), "writeId": "nl"}),
    );
    let (out, code) = s.collect("t");
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with("43 132\r\n"), "output: {text:?}");
    assert_eq!(code, Some(0));
}

#[test]
fn interrupt_reaches_a_grandchild_through_the_process_group() {
    let mut s = Server::started(&[]);
    let inner =
        "trap 'echo grandchild got INT; exit 3' INT; echo ready; while :; do sleep 0.05; done";
    s.start_process(
        "p",
        &["sh", "-c", &format!("sh -c \"{inner}\"; echo parent-done")],
        json!({}),
    );
    s.notification(|m| {
        m["method"] == "process/output" && unb64(&m["params"]["chunk"]).starts_with(b"ready")
    });
    s.call(
        "process/signal",
        json!({"processId": "p", "signal": "interrupt"}),
    );
    let (out, _) = s.collect("p");
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("grandchild got INT"), "output: {text:?}");
}

#[test]
fn two_mib_of_output_reports_truncation_and_keeps_an_exact_tail() {
    let mut s = Server::started(&[]);
    const TOTAL: usize = 2 * 1024 * 1024;
    s.start_process(
        "big",
        &["sh", "-c", &format!("seq 1 400000 | head -c {TOTAL}")],
        json!({}),
    );
    s.notification(|m| m["method"] == "process/closed" && m["params"]["processId"] == "big");
    let r = s.call("process/read", json!({"processId": "big", "afterSeq": 0}));
    assert_eq!(r["truncated"], true);
    assert_eq!(r["closed"], true);
    let mut tail = Vec::new();
    for chunk in r["chunks"].as_array().unwrap() {
        tail.extend(unb64(&chunk["chunk"]));
    }
    let expected: String = (1..=400000).map(|n| format!("{n}\n")).collect();
    let expected = &expected.as_bytes()[..TOTAL];
    assert!(
        !tail.is_empty() && tail.len() <= 1024 * 1024,
        "retained {} bytes",
        tail.len()
    );
    assert_eq!(
        &tail[..],
        &expected[TOTAL - tail.len()..],
        "retained tail differs"
    );
    // A reader that has seen everything up to the retained part is not truncated.
    let first = r["chunks"][0]["seq"].as_u64().unwrap();
    let r2 = s.call(
        "process/read",
        json!({"processId": "big", "afterSeq": first - 1}),
    );
    assert_eq!(r2["truncated"], false);
}

#[test]
fn output_chunks_and_events_share_one_increasing_sequence() {
    let mut s = Server::started(&[]);
    s.start_process(
        "p",
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo $i; echo e$i >&2; done",
        ],
        json!({}),
    );
    let closed = s.notification(|m| m["method"] == "process/closed");
    let r = s.call("process/read", json!({"processId": "p"}));
    let seqs: Vec<u64> = r["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs {seqs:?}");
    let closed_seq = closed["params"]["seq"].as_u64().unwrap();
    assert_eq!(r["nextSeq"].as_u64().unwrap(), closed_seq + 1);
    assert!(
        seqs.iter().all(|&q| q < closed_seq - 1),
        "exit comes after output read before it"
    );
}

#[test]
fn env_policy_core_keeps_only_core_variables() {
    let mut s = Server::started(&[]);
    s.start_process(
        "p",
        &["/usr/bin/env"],
        json!({"envPolicy": {"inherit": "core", "ignoreDefaultExcludes": false, "exclude": [], "set": {}, "includeOnly": []}}),
    );
    let (out, _) = s.collect("p");
    let text = String::from_utf8(out).unwrap();
    for line in text.lines() {
        let name = line.split('=').next().unwrap();
        assert!(
            [
                "PATH", "SHELL", "TMPDIR", "TEMP", "TMP", "HOME", "LANG", "LC_ALL", "LC_CTYPE",
                "LOGNAME", "USER"
            ]
            .contains(&name),
            "unexpected variable {name}"
        );
    }
    assert!(text.contains("PATH="), "PATH is a core variable: {text}");
}

/// The program is looked up on the PATH the child gets (as `execvp`
/// does), not the server's; a script without `#!` runs under `/bin/sh`; a
/// file that can't be executed is `EACCES`, one that doesn't exist `ENOENT`.
#[test]
fn programs_are_found_and_started_as_execvp_would() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("no-shebang");
    std::fs::write(&script, "echo \"ran as $0 with $1\"\n").unwrap();
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\necho never\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = format!("/nonexistent-dir:{}:/usr/bin:/bin", dir.path().display());

    let mut s = Server::started(&[]);
    // Found on the child's PATH only; ENOEXEC falls back to /bin/sh.
    s.start_process(
        "script",
        &["no-shebang", "arg"],
        json!({"env": {"PATH": path}}),
    );
    let (out, code) = s.collect("script");
    assert_eq!(code, Some(0));
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("ran as "), "{text}");
    assert!(text.ends_with("no-shebang with arg\n"), "{text}");

    let start = |s: &mut Server, argv: &[&str], env: serde_json::Value| {
        s.request(
            "process/start",
            json!({"processId": "x", "argv": argv, "cwd": "/tmp", "env": env}),
        )
    };
    let denied = start(&mut s, &["not-executable"], json!({"PATH": path}));
    assert_eq!(denied["error"]["data"]["errno"], libc::EACCES, "{denied}");
    let missing = start(&mut s, &["no-such-program-anywhere"], json!({"PATH": path}));
    assert_eq!(missing["error"]["data"]["errno"], libc::ENOENT, "{missing}");
    // The server's own PATH is not searched: `env` is not in this one.
    let elsewhere = start(&mut s, &["env"], json!({"PATH": dir.path()}));
    assert_eq!(
        elsewhere["error"]["data"]["errno"],
        libc::ENOENT,
        "{elsewhere}"
    );
}

/// The child starts with default signal handling and nothing blocked,
/// whatever the server itself ignores or handles (Rust ignores SIGPIPE).
#[test]
fn children_start_with_default_signal_dispositions() {
    let mut s = Server::started(&[]);
    s.start_process(
        "p",
        &["sh", "-c", "grep -E '^Sig(Blk|Ign|Cgt):' /proc/self/status"],
        json!({}),
    );
    let (out, code) = s.collect("p");
    assert_eq!(code, Some(0));
    let text = String::from_utf8(out).unwrap();
    for line in text.lines() {
        let (name, mask) = line.split_once(':').unwrap();
        let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
        // sh may catch a few signals itself, but blocks and ignores none.
        if name != "SigCgt" {
            assert_eq!(mask, 0, "{line}");
        }
    }
    // A writer to a closed pipe dies of SIGPIPE (128 + 13), as it would
    // from a shell, instead of failing with EPIPE.
    s.start_process(
        "pipe",
        &[
            "sh",
            "-c",
            "(yes; echo \"yes: $?\" >&2) | head -c 1 >/dev/null",
        ],
        json!({}),
    );
    let (out, _) = s.collect("pipe");
    assert_eq!(String::from_utf8(out).unwrap(), "yes: 141\n");
}

/// A child that never reads its stdin: writes are accepted up to the
/// stdin queue limit (8 MiB), then the next answer waits for room; the
/// server's memory stays bounded, and the waiting answer comes once the
/// child is gone. A child that reads is never held up.
#[test]
fn stdin_for_a_child_that_does_not_read_is_bounded() {
    let mut s = Server::started(&[]);
    s.start_process("deaf", &["sleep", "30"], json!({"pipeStdin": true}));
    let chunk = b64(&vec![b'x'; 1024 * 1024]);
    let mut accepted = 0;
    let mut waiting = None;
    for i in 0..64 {
        let id = 5000 + i;
        s.send(&json!({"id": id, "method": "process/write",
            "params": {"processId": "deaf", "chunk": chunk, "writeId": format!("w{i}")}}));
        match s.recv_line(Duration::from_millis(500)) {
            Some(r) if r["id"] == id => {
                assert_eq!(r["result"]["status"], "accepted", "{r}");
                accepted += 1;
            }
            Some(other) => panic!("unexpected {other}"),
            None => {
                waiting = Some(id);
                break;
            }
        }
    }
    let waiting = waiting.expect("a write beyond the limit waits for room");
    assert!(
        (8..=10).contains(&accepted),
        "{accepted} MiB were answered before the limit held"
    );
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", s.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(rss_kib < 64 * 1024, "server RSS {rss_kib} KiB");
    s.call("process/terminate", json!({"processId": "deaf"}));
    let r = s.response(waiting);
    assert_eq!(r["result"]["status"], "accepted", "{r}");

    // A reader takes everything without a wait.
    s.start_process(
        "reader",
        &["sh", "-c", "cat >/dev/null"],
        json!({"pipeStdin": true}),
    );
    for i in 0..24 {
        let r = s.call(
            "process/write",
            json!({"processId": "reader", "chunk": chunk, "writeId": format!("r{i}")}),
        );
        assert_eq!(r["status"], "accepted");
    }
}
