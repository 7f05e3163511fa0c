//! Remote executors end to end: `exec-server relay`, an `exec-server
//! --remote` executor and orchestrators reaching it over Noise streams
//! (`run --via noise+http://…`, the library, `exec-server bridge`), all
//! real processes on loopback.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exec_server::client::{Client, ServerCommand, StartOptions};

use crate::support::{bin, eventually, listening};

/// A relay and (usually) one executor registered with it.
pub struct Remote {
    pub relay: Child,
    pub port: u16,
    pub environment: String,
    pub executor: Option<Child>,
    /// Extra flags of the relay (kept for a restart).
    relay_args: Vec<String>,
}

impl Remote {
    /// A relay on a port of its own, and an executor (with `args`) online.
    pub fn start(args: &[&str]) -> Remote {
        let mut remote = Remote::relay_only(&[]);
        remote.start_executor(args);
        remote.wait_online();
        remote
    }

    /// A relay alone (with `relay_args`).
    pub fn relay_only(relay_args: &[&str]) -> Remote {
        let relay_args: Vec<String> = relay_args.iter().map(|s| s.to_string()).collect();
        let (relay, url) = start_relay("ws://127.0.0.1:0", &relay_args);
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the relay printed {url:?}"));
        Remote {
            relay,
            port,
            environment: format!("env-{}", std::process::id()),
            executor: None,
            relay_args,
        }
    }

    /// The registry's base URL.
    pub fn registry(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The orchestrator's address of the environment.
    pub fn address(&self) -> String {
        format!("noise+http://127.0.0.1:{}/{}", self.port, self.environment)
    }

    /// `exec-server --remote … --environment-id …` plus `args`, not yet
    /// spawned.
    pub fn executor_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command
            .args(["--remote", &self.registry(), "--environment-id"])
            .arg(&self.environment)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        command
    }

    /// Start the executor.
    pub fn start_executor(&mut self, args: &[&str]) {
        let child = self.executor_command(args).spawn().expect("spawn executor");
        self.executor = Some(child);
    }

    /// Wait until the relay hands out bundles for the environment (its
    /// executor is connected).
    pub fn wait_online(&self) {
        let online = eventually(Duration::from_secs(20), || {
            registry_post(self.port, &self.environment, "connect", &harness_key_body()).0 == 200
        });
        assert!(online, "the executor did not come online at the relay");
    }

    /// Kill the relay and start it again on the same port.
    pub fn restart_relay(&mut self) {
        let _ = self.relay.kill();
        let _ = self.relay.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (relay, url) =
                start_relay(&format!("ws://127.0.0.1:{}", self.port), &self.relay_args);
            if !url.is_empty() {
                self.relay = relay;
                return;
            }
            assert!(Instant::now() < deadline, "the relay did not start again");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `exec-server bridge ADDRESS`, stdio piped.
    pub fn bridge(&self) -> Command {
        let mut command = Command::new(bin());
        command.args(["bridge", &self.address()]);
        command
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(executor) = &mut self.executor {
            let _ = executor.kill();
            let _ = executor.wait();
        }
        let _ = self.relay.kill();
        let _ = self.relay.wait();
    }
}

fn start_relay(listen: &str, args: &[String]) -> (Child, String) {
    let mut command = Command::new(bin());
    command
        .args(["relay", "--listen", listen])
        .args(args)
        .stderr(Stdio::inherit());
    listening(command)
}

/// A registry body with a harness key that is well formed (and not used).
pub fn harness_key_body() -> String {
    let key = exec_server::remote::noise::Identity::generate()
        .unwrap()
        .public();
    serde_json::json!({ "harness_public_key": key }).to_string()
}

/// `POST /cloud/environment/ENV/CALL` with `body` to the relay on `port`:
/// the status and the body of the answer.
pub fn registry_post(port: u16, env: &str, call: &str, body: &str) -> (u16, String) {
    registry_post_with(port, env, call, body, None)
}

/// [`registry_post`] with an `Authorization: Bearer TOKEN`.
pub fn registry_post_with(
    port: u16,
    env: &str,
    call: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST /cloud/environment/{env}/{call} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn a_command_runs_through_relay_executor_and_run_via_noise() {
    let remote = Remote::start(&[]);
    let mut runner = Command::new(bin())
        .args(["run", "--via", &remote.address(), "--"])
        .args(["sh", "-c", "read x; echo \"got $x\"; echo err >&2; exit 3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    runner.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = runner.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got hello\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test]
async fn the_library_reaches_a_remote_executor_and_reads_a_large_file() {
    let remote = Remote::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let data: Vec<u8> = (0..128 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let client = Client::new(ServerCommand::parse(&remote.address()).unwrap());
    assert_eq!(client.read_file(&path).await.unwrap(), data);
    let mut process = client
        .start(StartOptions::new("p", ["sh", "-c", "echo remote; exit 4"]).cwd("/tmp"))
        .await
        .unwrap();
    let mut output = Vec::new();
    let status = process
        .wait_with_output(|_, bytes| output.extend_from_slice(bytes))
        .await
        .unwrap();
    assert_eq!((status.code, &output[..]), (4, &b"remote\n"[..]));
    // Output comes as JSON over a Noise stream: frames are never granted.
    assert!(!client.binary_frames());
    client.shutdown().await;
}

#[test]
fn the_reference_variables_name_a_noise_environment() {
    let remote = Remote::start(&[]);
    let bridge = |vars: &[(&str, &str)], input: &str| {
        let mut child = Command::new(bin())
            .arg("bridge")
            .env_remove("CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN")
            .envs(vars.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let registry = remote.registry();
    let all = [
        ("CODEX_EXEC_SERVER_NOISE_REGISTRY_URL", registry.as_str()),
        (
            "CODEX_EXEC_SERVER_NOISE_ENVIRONMENT_ID",
            remote.environment.as_str(),
        ),
        ("CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN", "unused-by-this-relay"),
    ];
    let (code, out, err) = bridge(
        &all,
        "{\"id\":1,\"method\":\"initialize\",\"params\":{\"clientName\":\"v\"}}\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("sessionId"), "{out}");
    // All three or none.
    let (code, _, err) = bridge(&all[..2], "");
    assert_eq!(code, Some(2));
    assert!(
        err.contains(
            "Noise environment requires CODEX_EXEC_SERVER_NOISE_REGISTRY_URL, \
             CODEX_EXEC_SERVER_NOISE_ENVIRONMENT_ID, and CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN"
        ),
        "{err}"
    );
    let (code, _, err) = bridge(&[], "");
    assert_eq!(code, Some(2));
    assert!(err.contains("give an ADDRESS"), "{err}");
    // An address without an environment.
    let out = Command::new(bin())
        .args(["bridge", "noise+http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("environment id is missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn remote_flags_follow_the_reference_rules() {
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--exit-on-stdin-close", "--stdio"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("only valid with --remote"), "{err}");
    let (code, err) = run(&["--remote", "http://127.0.0.1:1", "--environment-id", "  "]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("environment id is required for remote exec-server registration"),
        "{err}"
    );
    let (code, err) = run(&["--remote", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("environment id is required"), "{err}");
    let (code, err) = run(&[
        "--remote",
        "http://127.0.0.1:1",
        "--environment-id",
        "e",
        "--listen",
        "ws://127.0.0.1:0",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = run(&["relay", "--listen", "ws://0.0.0.0:0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("without --token-file"), "{err}");
}

#[test]
fn exit_on_stdin_close_ends_the_executor_with_its_processes() {
    let remote = Remote::relay_only(&[]);
    for how in ["flag", "variable"] {
        let mut command = remote.executor_command(&[]);
        if how == "flag" {
            command.arg("--exit-on-stdin-close");
        } else {
            command.env("CODEX_EXEC_SERVER_EXIT_ON_STDIN_CLOSE", "1");
        }
        let mut executor = command.stdin(Stdio::piped()).spawn().unwrap();
        remote.wait_online();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            executor.try_wait().unwrap().is_none(),
            "{how}: exited early"
        );
        drop(executor.stdin.take());
        let ended = eventually(Duration::from_secs(10), || {
            executor.try_wait().unwrap().is_some()
        });
        assert!(ended, "{how}: the executor outlived its stdin");
        assert!(executor.wait().unwrap().success());
    }
}

/// An HTTP proxy on loopback, as an executor or an orchestrator finds one
/// in `HTTP_PROXY`: `CONNECT` tunnels (the relay WebSockets) and
/// absolute-form requests (the registry calls). It counts both, and the
/// test can cut every tunnel open now, as a dropped network would.
pub struct ConnectProxy {
    pub url: String,
    tunnels: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    pub connects: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let proxy = ConnectProxy {
            url,
            tunnels: Default::default(),
            connects: Default::default(),
            requests: Default::default(),
        };
        let (tunnels, connects, requests) = (
            proxy.tunnels.clone(),
            proxy.connects.clone(),
            proxy.requests.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let tunnels = tunnels.clone();
                let connects = connects.clone();
                let requests = requests.clone();
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let mut words = text.split_whitespace();
                    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let (authority, forward) = if method == "CONNECT" {
                        connects.fetch_add(1, Ordering::SeqCst);
                        (target.to_string(), None)
                    } else {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let rest = target.strip_prefix("http://").unwrap_or(target);
                        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                        let rewritten = text.replacen(target, &format!("/{path}"), 1).into_bytes();
                        (authority.to_string(), Some(rewritten))
                    };
                    let Ok(mut server) = std::net::TcpStream::connect(&authority) else {
                        let _ = client
                            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
                        return;
                    };
                    match forward {
                        None => {
                            if client
                                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                                .is_err()
                            {
                                return;
                            }
                            tunnels.lock().unwrap().push(client.try_clone().unwrap());
                            tunnels.lock().unwrap().push(server.try_clone().unwrap());
                        }
                        Some(head) => {
                            if server.write_all(&head).is_err() {
                                return;
                            }
                        }
                    }
                    let (mut c2, mut s2) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let up = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                        let _ = s2.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut server, &mut client);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = up.join();
                });
            }
        });
        proxy
    }

    /// Cut every tunnel open now (no close frame); how many sockets.
    pub fn cut(&self) -> usize {
        let mut tunnels = self.tunnels.lock().unwrap();
        for socket in tunnels.iter() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        std::mem::take(&mut *tunnels).len()
    }
}

/// `exec-server run --via ADDRESS -- sh -c NUMBERED_EXIT_7` with `env`:
/// the runner, stdout and stderr piped.
fn numbered_runner(address: &str, env: &[(&str, &str)]) -> Child {
    Command::new(bin())
        .args(["run", "--via", address, "--", "sh", "-c"])
        .arg(crate::support::NUMBERED_EXIT_7)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for the runner; every numbered line once, in order, and exit 7.
fn assert_whole(runner: Child, what: &str) {
    let out = runner.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let text = String::from_utf8_lossy(&out.stdout);
    let want: Vec<String> = (1..=150).map(|i| i.to_string()).collect();
    assert_eq!(
        text.split_whitespace().collect::<Vec<_>>(),
        want,
        "{what}: stderr {err}"
    );
    assert_eq!(out.status.code(), Some(7), "{what}: stderr {err}");
    assert!(!err.contains("were lost"), "{what}: {err}");
}

#[test]
fn a_relay_killed_mid_stream_and_restarted_loses_nothing() {
    let proxy = ConnectProxy::start();
    let mut remote = Remote::relay_only(&[]);
    let mut executor = remote.executor_command(&[]);
    // The executor reaches the registry and the relay through its proxy
    // variables (CONNECT for the WebSocket).
    executor
        .env("HTTP_PROXY", &proxy.url)
        .env_remove("NO_PROXY");
    remote.executor = Some(executor.spawn().unwrap());
    remote.wait_online();
    assert!(proxy.requests.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(proxy.connects.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let registered = proxy.requests.load(std::sync::atomic::Ordering::SeqCst);
    let runner = numbered_runner(&remote.address(), &[]);
    std::thread::sleep(Duration::from_millis(500));
    remote.restart_relay();
    assert_whole(runner, "relay restart");
    // The new relay knew nothing: the executor registered again.
    assert!(proxy.requests.load(std::sync::atomic::Ordering::SeqCst) > registered);
}

#[test]
fn a_cut_executor_socket_loses_nothing() {
    let proxy = ConnectProxy::start();
    let mut remote = Remote::relay_only(&[]);
    let mut executor = remote.executor_command(&[]);
    executor
        .env("HTTP_PROXY", &proxy.url)
        .env_remove("NO_PROXY");
    remote.executor = Some(executor.spawn().unwrap());
    remote.wait_online();
    let connects = proxy.connects.load(std::sync::atomic::Ordering::SeqCst);
    let runner = numbered_runner(&remote.address(), &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(proxy.cut() >= 2, "no executor tunnel to cut");
    assert_whole(runner, "executor socket cut");
    // It came back on a new tunnel (the same registration).
    assert!(proxy.connects.load(std::sync::atomic::Ordering::SeqCst) > connects);
}

#[test]
fn a_cut_harness_socket_loses_nothing() {
    let remote = Remote::start(&[]);
    let proxy = ConnectProxy::start();
    let runner = numbered_runner(&remote.address(), &[("HTTP_PROXY", &proxy.url)]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(proxy.cut() >= 2, "no harness tunnel to cut");
    assert_whole(runner, "harness socket cut");
    assert!(proxy.connects.load(std::sync::atomic::Ordering::SeqCst) >= 2);
}
