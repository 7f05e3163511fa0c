//! Clients that only poll: `notifyOutput: false` (no output pushed) and
//! `holdOutput: true` (the child waits for the reads instead of output
//! being evicted), through the raw protocol and the client library.

use std::time::Duration;

use serde_json::json;

use crate::support::{Server, bin, unb64};

fn numbers(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Read `id` to the end with 64 KiB polls, pausing between them; the
/// bytes, and whether any read said output was lost.
fn slow_poll(s: &mut Server, id: &str) -> (Vec<u8>, bool) {
    let (mut out, mut after, mut lost) = (Vec::new(), 0, false);
    loop {
        let r = s.call(
            "process/read",
            json!({"processId": id, "afterSeq": after, "maxBytes": 65536, "waitMs": 1000}),
        );
        lost |= r["truncated"] == true;
        let chunks = r["chunks"].as_array().unwrap();
        for c in chunks {
            out.extend(unb64(&c["chunk"]));
        }
        after = r["nextSeq"].as_u64().unwrap() - 1;
        if r["closed"] == true && chunks.is_empty() {
            return (out, lost);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_held_poll_only_process_loses_nothing_and_pushes_nothing() {
    // Retention of 64 KiB against 1.3 MB of output read slowly.
    let mut s = Server::started(&["--retain-bytes", "65536"]);
    s.start_process(
        "held",
        &["seq", "1", "200000"],
        json!({"notifyOutput": false, "holdOutput": true}),
    );
    let (out, lost) = slow_poll(&mut s, "held");
    assert!(!lost, "a held process lost output");
    assert!(out == numbers(200000), "{} bytes", out.len());
    // Without holding, the same slow reader loses output to eviction.
    s.start_process(
        "evicted",
        &["seq", "1", "200000"],
        json!({"notifyOutput": false}),
    );
    let (out, lost) = slow_poll(&mut s, "evicted");
    assert!(
        lost && out.len() < numbers(200000).len(),
        "nothing was evicted?"
    );
    // No output was pushed for either; exits and closes still are.
    while let Some(m) = s.recv_line(Duration::from_millis(200)) {
        assert_ne!(m["method"], "process/output", "{m}");
    }
}

#[test]
fn terminate_releases_a_held_process_nobody_reads() {
    let mut s = Server::started(&["--retain-bytes", "65536"]);
    s.start_process(
        "stuck",
        &["seq", "1", "10000000"],
        json!({"notifyOutput": false, "holdOutput": true}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = s.call("process/terminate", json!({"processId": "stuck"}));
    assert_eq!(r["running"], true);
    s.notification(|m| m["method"] == "process/closed" && m["params"]["processId"] == "stuck");
}

#[tokio::test]
async fn the_library_polls_without_notifications() {
    use exec_server::client::{Client, ServerCommand, StartOptions};
    let client = Client::new(
        ServerCommand::new(bin())
            .arg("--stdio")
            .arg("--retain-bytes=65536"),
    );
    let _p = client
        .start(
            StartOptions::new("p", ["seq", "1", "300000"])
                .cwd("/tmp")
                .poll_only(),
        )
        .await
        .unwrap();
    let (mut out, mut after) = (Vec::new(), 0);
    loop {
        let r = client
            .read_output("p", after, Some(1 << 20), Some(1000))
            .await
            .unwrap();
        assert!(!r.truncated);
        for c in &r.chunks {
            // In order (the exit's own seq may come between chunks: it is
            // recorded while the pipes still drain).
            assert!(c.seq > after, "in order");
            after = c.seq;
            out.extend_from_slice(&c.data);
        }
        after = after.max(r.next_seq - 1);
        if r.closed && r.chunks.is_empty() {
            assert_eq!(r.exit_code, Some(0));
            break;
        }
    }
    assert!(out == numbers(300000));
    client.shutdown().await;
}
