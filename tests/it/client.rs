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
        .walk(
            dir.path(),
            &exec_server::client::WalkOptions::new().max_depth(8),
        )
        .await
        .unwrap();
    assert!(!walk.truncated);
    let kinds: Vec<&str> = walk.entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["directory", "file"], "{walk:?}");
    // The URIs on the wire come back as paths.
    assert_eq!(walk.entries[0].path, dir.path().join("sub"));
    std::fs::create_dir_all(dir.path().join(".hidden/inside")).unwrap();
    let options = exec_server::client::WalkOptions::new().prune_hidden_directories(true);
    let pruned = client.walk(dir.path(), &options).await.unwrap();
    let paths: Vec<_> = pruned.entries.iter().map(|e| e.path.clone()).collect();
    assert!(paths.contains(&dir.path().join(".hidden")), "{pruned:?}");
    assert!(
        !paths.contains(&dir.path().join(".hidden/inside")),
        "{pruned:?}"
    );
    let info = client.environment_info().await.unwrap();
    assert_eq!(info.os, "linux");
    assert!(info.cwd.starts_with("file://"), "{info:?}");
    assert!(!info.shell.path.is_empty());
    client.shutdown().await;
}

/// What a new user tripped over: by default a process gets the executor's
/// environment (PATH, HOME, ...) without secret-looking names; `exact_env`
/// gives exactly what was set.
#[tokio::test]
async fn the_default_environment_is_the_executors_without_secrets() {
    // A program found only through the executor's PATH, as `cargo` in
    // ~/.cargo/bin is.
    let tools = tempfile::tempdir().unwrap();
    let tool = tools.path().join("only-on-path");
    std::fs::write(&tool, "#!/bin/sh\necho \"[$PLAIN_VARIABLE][${DB_PASSWORD-gone}][${GITHUB_TOKEN-gone}][${HOME:+home}][$SET]\"\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let client = Client::new(
        ServerCommand::new(bin())
            .arg("--stdio")
            .env("PATH", format!("{}:/usr/bin:/bin", tools.path().display()))
            .env("DB_PASSWORD", "hunter2")
            .env("GITHUB_TOKEN", "t0k")
            .env("PLAIN_VARIABLE", "plain"),
    );
    let mut p = client
        .start(
            StartOptions::new("env", ["only-on-path"])
                .cwd("/")
                .env("SET", "set"),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let status = p
        .wait_with_output(|_, d| out.extend_from_slice(d))
        .await
        .unwrap();
    assert_eq!(status.code, 0);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "[plain][gone][gone][home][set]\n"
    );
    // Exactly what was set: no PATH, so the program is not found.
    let err = client
        .start(
            StartOptions::new("exact", ["only-on-path"])
                .cwd("/")
                .exact_env(),
        )
        .await
        .err()
        .expect("found without the executor's PATH");
    assert_eq!(err.kind(), Some("spawnFailed"), "{err}");
    let mut p = client
        .start(
            StartOptions::new("exact2", ["/usr/bin/env"])
                .cwd("/")
                .exact_env()
                .env("ONLY", "only"),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    p.wait_with_output(|_, d| out.extend_from_slice(d))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "ONLY=only\n");
    client.shutdown().await;
}

/// The typed parameters refuse what the protocol does not have, so a
/// misspelt member read from a configuration file is an error, not a
/// policy silently ignored.
#[test]
fn typed_parameters_refuse_unknown_members() {
    use exec_server::client::{EnvPolicy, Sandbox, WalkOptions};
    assert!(serde_json::from_value::<EnvPolicy>(json!({"inherrit": "all"})).is_err());
    assert!(serde_json::from_value::<EnvPolicy>(json!({"inherit": "al"})).is_err());
    let policy: EnvPolicy =
        serde_json::from_value(json!({"inherit": "core", "exclude": ["X*"]})).unwrap();
    assert_eq!(
        policy,
        EnvPolicy::inherit(exec_server::client::Inherit::Core).exclude("X*")
    );
    assert!(
        serde_json::from_value::<WalkOptions>(json!({"maxDepht": 3, "maxDirectories": 1,
        "maxEntries": 1, "followDirectorySymlinks": false}))
        .is_err()
    );
    let sandbox = json!({"permissions": {"type": "managed", "network": "restricted",
        "file_system": {"type": "restricted", "entries": [
            {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"}]}}});
    let parsed: Sandbox = serde_json::from_value(sandbox.clone()).unwrap();
    assert_eq!(parsed, Sandbox::read_only());
    assert_eq!(serde_json::to_value(&parsed).unwrap(), sandbox);
    for bad in [
        json!({"permissions": {"type": "managed", "network": "restricted",
            "filesystem": {"type": "unrestricted"}}}),
        json!({"permissions": {"type": "managed", "file_system": {"type": "restricted",
            "entries": [{"path": {"type": "path", "path": "/x"}, "acess": "read"}]}}}),
        json!({"permissions": {"type": "disabled"}, "workspaceRoot": []}),
        json!({"permissions": {"type": "sandboxed"}}),
    ] {
        assert!(
            serde_json::from_value::<Sandbox>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}

/// `write` to a process without piped stdin is an error; `signal` takes
/// the names `kill` takes; fs methods take any path-like argument.
#[tokio::test]
async fn writes_signals_and_paths_as_a_caller_expects() {
    let client = local();
    let p = client
        .start(StartOptions::new("nostdin", ["sleep", "30"]).cwd("/"))
        .await
        .unwrap();
    match p.write(b"x").await {
        Err(ClientError::StdinClosed { process_id }) => assert_eq!(process_id, "nostdin"),
        other => panic!("write to a process without stdin: {other:?}"),
    }
    assert!(matches!(
        p.signal("BOGUS").await,
        Err(ClientError::UnknownSignal(_))
    ));
    p.terminate().await.unwrap();
    for (n, name) in ["TERM", "SIGTERM", "15", "sigint", "terminate"]
        .iter()
        .enumerate()
    {
        let mut p = client
            .start(StartOptions::new(format!("sig{n}"), ["sleep", "30"]).cwd("/"))
            .await
            .unwrap();
        p.signal(name).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .expect("the signal did not end it")
            .unwrap();
        assert!(status.signal.is_some(), "{name}: {status:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f").to_string_lossy().into_owned();
    client.write_file(&file, b"via a string").await.unwrap();
    assert_eq!(
        client.read_file(file.as_str()).await.unwrap(),
        b"via a string"
    );
    client
        .write_file(dir.path().join("g"), b"via a PathBuf")
        .await
        .unwrap();
    assert!(
        client
            .get_metadata(dir.path().join("g"), true)
            .await
            .unwrap()
            .is_file
    );
    client.shutdown().await;
}
