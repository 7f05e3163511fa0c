//! The client library against the real binary over real pipes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exec_server::client::{Client, ClientError, ServerCommand, StartOptions};
use serde_json::json;

use crate::support::{bin, eventually, pid_gone};

/// A server command that records each spawn in `dir/spawns` and copies
/// everything the client sends into `dir/input`.
fn recorded(dir: &std::path::Path) -> ServerCommand {
    let script = format!(
        "echo spawned >> '{d}/spawns'; tee -a '{d}/input' | exec '{bin}' --stdio",
        d = dir.display(),
        bin = bin()
    );
    ServerCommand::new("sh").arg("-c").arg(script)
}

fn count_lines(path: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| l.contains(needle)).count())
        .unwrap_or(0)
}

fn local() -> Client {
    Client::new(ServerCommand::new(bin()).arg("--stdio"))
}

#[tokio::test]
async fn nothing_is_spawned_before_the_first_call() {
    let dir = tempfile::tempdir().unwrap();
    let client = Client::new(recorded(dir.path()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !dir.path().join("spawns").exists(),
        "spawned before any call"
    );
    assert!(!client.is_started());
    client.environment_status().await.unwrap();
    assert_eq!(count_lines(&dir.path().join("spawns"), "spawned"), 1);
    client.shutdown().await;
}

#[tokio::test]
async fn fifty_concurrent_first_calls_share_one_server_and_one_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let client = Client::new(recorded(dir.path()));
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.environment_status().await })
        })
        .collect();
    for call in calls {
        let status = call.await.unwrap().unwrap();
        assert_eq!(status["status"], "ready");
    }
    assert_eq!(count_lines(&dir.path().join("spawns"), "spawned"), 1);
    assert_eq!(
        count_lines(&dir.path().join("input"), "\"method\":\"initialize\""),
        1
    );
    client.shutdown().await;
}

#[tokio::test]
async fn a_failed_start_reaches_every_waiter_with_the_stderr_tail() {
    let command = ServerCommand::new("sh")
        .arg("-c")
        .arg("echo 'no server here' >&2; exit 4");
    let client = Client::new(command);
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.environment_status().await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
        assert!(err.to_string().contains("no server here"), "{err}");
    }
}

#[tokio::test]
async fn fifty_mib_of_output_arrives_complete_and_in_order() {
    let client = local();
    const LINES: u32 = 7_000_000;
    let mut p = client
        .start(StartOptions::new("big", ["seq", "1", &LINES.to_string()]).cwd("/tmp"))
        .await
        .unwrap();
    let mut got = Vec::with_capacity(60 << 20);
    let status = p
        .wait_with_output(|_, data| got.extend_from_slice(data))
        .await
        .unwrap();
    assert_eq!(status.code, 0);
    let mut expected = Vec::with_capacity(got.len());
    for n in 1..=LINES {
        expected.extend_from_slice(format!("{n}\n").as_bytes());
    }
    assert!(expected.len() > 50 << 20);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "output differs from seq's");
    client.shutdown().await;
}

#[tokio::test]
async fn a_retried_write_id_writes_once() {
    let client = local();
    let mut p = client
        .start(
            StartOptions::new("cat", ["cat"])
                .cwd("/tmp")
                .pipe_stdin(true),
        )
        .await
        .unwrap();
    assert_eq!(
        p.write_with_id(b"once\n", "retry-me").await.unwrap(),
        "accepted"
    );
    assert_eq!(
        p.write_with_id(b"once\n", "retry-me").await.unwrap(),
        "accepted"
    );
    assert_eq!(p.write(b"auto\n").await.unwrap(), "accepted");
    p.close_stdin().await.unwrap();
    let mut out = Vec::new();
    p.wait_with_output(|_, d| out.extend_from_slice(d))
        .await
        .unwrap();
    assert_eq!(out, b"once\nauto\n");
    client.shutdown().await;
}

#[tokio::test]
async fn the_servers_death_fails_pending_calls_within_a_second() {
    let client = local();
    let _p = client
        .start(StartOptions::new("s", ["sleep", "30"]).cwd("/tmp"))
        .await
        .unwrap();
    let pending = {
        let c = client.clone();
        tokio::spawn(async move {
            c.call("process/read", json!({"processId": "s", "waitMs": 30000}))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = client.server_pid().unwrap();
    // SAFETY: plain syscall on the server we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(1), pending).await;
    let result = result
        .expect("the pending call did not fail within a second")
        .unwrap();
    assert!(
        matches!(result, Err(ClientError::ConnectionLost { .. })),
        "{result:?}"
    );
    assert!(killed.elapsed() < Duration::from_secs(1));
    let later = client.environment_status().await;
    assert!(matches!(later, Err(ClientError::ConnectionLost { .. })));
}

#[tokio::test]
async fn dropping_the_client_leaves_no_process_behind() {
    let client = local();
    let _p = client
        .start(StartOptions::new("s", ["sleep", "1000"]).cwd("/tmp"))
        .await
        .unwrap();
    let list = client.list_processes().await.unwrap();
    let child = list[0].pid;
    let server = client.server_pid().unwrap();
    drop(_p);
    drop(client);
    let gone = Arc::new(move || pid_gone(child) && pid_gone(server));
    assert!(
        tokio::task::spawn_blocking(move || eventually(Duration::from_secs(5), || gone()))
            .await
            .unwrap(),
        "server or child still running after drop"
    );
}

#[tokio::test]
async fn files_round_trip_through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let client = local();
    let path = dir.path().join("x y.bin");
    let data: Vec<u8> = (0..=255).collect();
    client.write_file(&path, &data).await.unwrap();
    assert_eq!(client.read_file(&path).await.unwrap(), data);
    let missing = client
        .read_file(&dir.path().join("nope"))
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), Some("notFound"));
    client.shutdown().await;
}

#[tokio::test]
async fn typed_results_for_metadata_listings_walks_and_info() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/f.txt"), "12345").unwrap();
    let client = local();
    let meta = client
        .get_metadata(&dir.path().join("sub/f.txt"), true)
        .await
        .unwrap();
    assert!(
        meta.is_file && !meta.is_directory && meta.size == 5,
        "{meta:?}"
    );
    let entries = client.read_directory(dir.path()).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].file_name, "sub");
    assert!(entries[0].is_directory);
    let walk = client
        .walk(dir.path(), serde_json::json!({}))
        .await
        .unwrap();
    assert!(!walk.truncated);
    let kinds: Vec<&str> = walk.entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["directory", "file"], "{walk:?}");
    let info = client.environment_info().await.unwrap();
    assert_eq!(info.os, "linux");
    assert!(info.cwd.starts_with("file://"), "{info:?}");
    assert!(!info.shell.path.is_empty());
    client.shutdown().await;
}
