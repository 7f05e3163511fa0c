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
        Remote::relay_logging(relay_args, None)
    }

    /// A relay alone (with `relay_args`), its log at `EXEC_SERVER_LOG=LEVEL`
    /// into the file `log`.
    pub fn relay_logging(relay_args: &[&str], log: Option<(&str, &std::path::Path)>) -> Remote {
        let relay_args: Vec<String> = relay_args.iter().map(|s| s.to_string()).collect();
        let mut command = Command::new(bin());
        command
            .args(["relay", "--listen", "ws://127.0.0.1:0"])
            .args(&relay_args);
        match log {
            Some((level, path)) => {
                command
                    .env("EXEC_SERVER_LOG", level)
                    .stderr(std::fs::File::create(path).unwrap());
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        let (relay, url) = listening(command);
        let mut remote = Remote::around(relay, &url, "env");
        remote.relay_args = relay_args;
        remote
    }

    /// A relay started by the caller (`url`: its first stdout line), with
    /// an environment named after `prefix`, no executor yet.
    pub fn around(relay: Child, url: &str, prefix: &str) -> Remote {
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the relay printed {url:?}"));
        Remote {
            relay,
            port,
            environment: format!("{prefix}-{}", std::process::id()),
            executor: None,
            relay_args: Vec::new(),
        }
    }

    /// A relay, and an executor online that reaches it (and the registry)
    /// through `proxy`, as its proxy variables say (`CONNECT` for the
    /// WebSocket).
    pub fn through_proxy(proxy: &ConnectProxy) -> Remote {
        let mut remote = Remote::relay_only(&[]);
        let mut executor = remote.executor_command(&[]);
        executor
            .env("HTTP_PROXY", &proxy.url)
            .env_remove("NO_PROXY");
        remote.executor = Some(executor.spawn().unwrap());
        remote.wait_online();
        remote
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
    // Output came as binary frames, carried as record-layer messages.
    assert!(client.binary_frames());
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
    /// The targets of the absolute-form requests, in order.
    pub paths: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
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
            paths: Default::default(),
        };
        let (tunnels, connects, requests, paths) = (
            proxy.tunnels.clone(),
            proxy.connects.clone(),
            proxy.requests.clone(),
            proxy.paths.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let tunnels = tunnels.clone();
                let connects = connects.clone();
                let requests = requests.clone();
                let paths = paths.clone();
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
                        paths.lock().unwrap().push(target.to_string());
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

    /// How many `register` calls went through.
    pub fn registrations(&self) -> usize {
        self.paths
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.ends_with("/register"))
            .count()
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
    let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (*k, v.as_ref())).collect();
    crate::support::run_via(address, &env, crate::support::NUMBERED_EXIT_7)
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
    let mut remote = Remote::through_proxy(&proxy);
    assert!(proxy.requests.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(proxy.connects.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(proxy.registrations(), 1);
    let runner = numbered_runner(&remote.address(), &[]);
    std::thread::sleep(Duration::from_millis(500));
    remote.restart_relay();
    assert_whole(runner, "relay restart");
    // The new relay knew nothing: its 401 on the old URL made the
    // executor register again.
    assert!(proxy.registrations() >= 2);
}

#[test]
fn a_cut_executor_socket_loses_nothing() {
    let proxy = ConnectProxy::start();
    let remote = Remote::through_proxy(&proxy);
    let connects = proxy.connects.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(proxy.registrations(), 1);
    let runner = numbered_runner(&remote.address(), &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(proxy.cut() >= 2, "no executor tunnel to cut");
    assert_whole(runner, "executor socket cut");
    // It came back on a new tunnel with the same URL: a plain disconnect
    // does not register again (only a 4xx on the upgrade does).
    assert!(proxy.connects.load(std::sync::atomic::Ordering::SeqCst) > connects);
    assert_eq!(
        proxy.registrations(),
        1,
        "the executor registered again after a plain disconnect"
    );
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

/// A WebSocket to the relay at `url`, or the HTTP status it was refused
/// with (0: another failure).
async fn ws_to(url: &str) -> Result<exec_server::remote::dial::Socket, u16> {
    use exec_server::remote::dial::{DialError, dial};
    match dial(url).await {
        Ok(socket) => Ok(socket),
        Err(DialError::Refused(status)) => Err(status),
        Err(_) => Err(0),
    }
}

/// A connect bundle from the relay on `port` (its JSON).
fn bundle(port: u16, env: &str, token: Option<&str>) -> serde_json::Value {
    let (status, body) = registry_post_with(port, env, "connect", &harness_key_body(), token);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn the_relay_checks_tokens_signatures_and_single_use_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "relay-token-5150\n").unwrap();
    let mut remote = Remote::relay_only(&["--token-file", token_file.to_str().unwrap()]);
    let port = remote.port;
    let env = remote.environment.clone();
    let exec_key = serde_json::json!({
        "security_profile": "noise_hybrid_ik_v1",
        "executor_public_key": exec_server::remote::noise::Identity::generate().unwrap().public(),
    })
    .to_string();
    // The bearer token: missing or wrong is 401, for every call.
    for token in [None, Some("wrong")] {
        for call in ["register", "connect", "validate"] {
            let (status, _) = registry_post_with(port, &env, call, &exec_key, token);
            assert_eq!(status, 401, "{call} with {token:?}");
        }
    }
    let tok = Some("relay-token-5150");
    // Unknown environment; then registered but its executor not connected.
    let (status, body) = registry_post_with(port, &env, "connect", &harness_key_body(), tok);
    assert_eq!(status, 404, "{body}");
    let (status, body) = registry_post_with(port, &env, "register", &exec_key, tok);
    assert_eq!(status, 200, "{body}");
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(first["security_profile"], "noise_hybrid_ik_v1");
    assert_eq!(first["environment_id"], env.as_str());
    let (status, body) = registry_post_with(port, &env, "connect", &harness_key_body(), tok);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("environment_offline"), "{body}");
    // Unknown members and other suites are refused.
    let (status, _) = registry_post_with(
        port,
        &env,
        "register",
        r#"{"security_profile":"noise_hybrid_ik_v1","executor_public_key":{"suite":"x","x25519_public_key":"","mlkem768_public_key":""}}"#,
        tok,
    );
    assert_eq!(status, 400);
    // A second registration makes the first URL stale (4xx on upgrade).
    let (status, body) = registry_post_with(port, &env, "register", &exec_key, tok);
    assert_eq!(status, 200, "{body}");
    let second: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ws_to(first["url"].as_str().unwrap()).await.err(), Some(401));
    let tampered = second["url"].as_str().unwrap().replace("sig=", "sig=0");
    assert_eq!(ws_to(&tampered).await.err(), Some(401));
    // The real executor, with the token from its file, comes online.
    let executor_token = dir.path().join("executor-token");
    std::fs::write(&executor_token, "relay-token-5150").unwrap();
    let mut executor =
        remote.executor_command(&["--registry-token-file", executor_token.to_str().unwrap()]);
    remote.executor = Some(executor.spawn().unwrap());
    let online = eventually(Duration::from_secs(20), || {
        registry_post_with(port, &env, "connect", &harness_key_body(), tok).0 == 200
    });
    assert!(online);
    // A bundle is good for one connection; a forged one for none.
    let b = bundle(port, &env, tok);
    let url = b["url"].as_str().unwrap();
    let socket = ws_to(url).await.expect("the bundle's URL works once");
    assert_eq!(ws_to(url).await.err(), Some(401));
    drop(socket);
    let forged = url.replace("role=harness", "role=environment");
    assert!(ws_to(&forged).await.is_err());
    // validate: true only for the bundle's own key and registration.
    let key = b["executor_public_key"].clone();
    let _ = key;
    let harness_key: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        &harness_key_body(),
    )
    .unwrap()["harness_public_key"]
        .clone();
    let ask = |registration: &str, key: &serde_json::Value, authz: &str| {
        let body = serde_json::json!({
            "executor_registration_id": registration,
            "harness_public_key": key,
            "harness_key_authorization": authz,
        })
        .to_string();
        let (status, body) = registry_post_with(port, &env, "validate", &body, tok);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["valid"].clone()
    };
    let authz = b["harness_key_authorization"].as_str().unwrap();
    let registration = b["executor_registration_id"].as_str().unwrap();
    assert_eq!(ask(registration, &harness_key, authz), false, "another key");
    assert_eq!(ask("other", &harness_key, authz), false);
    // The bundle's own key: minted by connect above for a fresh key, so
    // fetch one whose key we know.
    let known = exec_server::remote::noise::Identity::generate()
        .unwrap()
        .public();
    let body = serde_json::json!({ "harness_public_key": known }).to_string();
    let (status, body) = registry_post_with(port, &env, "connect", &body, tok);
    assert_eq!(status, 200);
    let mine: serde_json::Value = serde_json::from_str(&body).unwrap();
    let known = serde_json::to_value(&known).unwrap();
    let authz = mine["harness_key_authorization"].as_str().unwrap();
    assert_eq!(ask(registration, &known, authz), true);
    assert_eq!(ask(registration, &known, &format!("{authz}0")), false);
}

#[test]
fn no_secret_reaches_a_log_line_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let token = "bearer-SECRET-4e1d";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let relay_log = dir.path().join("relay.log");
    let mut remote = Remote::relay_logging(
        &["--token-file", token_file.to_str().unwrap()],
        Some(("trace", &relay_log)),
    );
    let executor_log = dir.path().join("executor.log");
    let mut executor = remote.executor_command(&[]);
    executor
        .env("CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN", token)
        .env("EXEC_SERVER_LOG", "trace")
        .stderr(std::fs::File::create(&executor_log).unwrap());
    remote.executor = Some(executor.spawn().unwrap());
    let online = eventually(Duration::from_secs(20), || {
        registry_post_with(
            remote.port,
            &remote.environment,
            "connect",
            &harness_key_body(),
            Some(token),
        )
        .0 == 200
    });
    assert!(online);
    let out = Command::new(bin())
        .args(["run", "--via", &remote.address(), "--", "sh", "-c"])
        .arg("echo \"token in child: ${CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN:-none}\"")
        .env("CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN", token)
        .env("EXEC_SERVER_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The executor's commands never inherit the token.
    assert_eq!(stdout, "token in child: none\n");
    let runner_log = String::from_utf8_lossy(&out.stderr).into_owned();
    let hex64 = |text: &str| {
        text.as_bytes()
            .windows(64)
            .any(|w| w.iter().all(u8::is_ascii_hexdigit) && w.iter().any(u8::is_ascii_digit))
    };
    for (name, log) in [
        ("relay", std::fs::read_to_string(&relay_log).unwrap()),
        ("executor", std::fs::read_to_string(&executor_log).unwrap()),
        ("runner", runner_log),
    ] {
        assert!(
            log.lines().count() > 3,
            "{name} logged nothing at trace:\n{log}"
        );
        assert!(!log.contains(token), "{name} logs the bearer token:\n{log}");
        assert!(!log.contains("sig="), "{name} logs a signed URL:\n{log}");
        assert!(!log.contains("v1."), "{name} logs an authorization:\n{log}");
        assert!(!hex64(&log), "{name} logs a MAC:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_executor_socket_carries_128_streams_refuses_the_129th_and_shrugs_off_a_flood() {
    let dir = tempfile::tempdir().unwrap();
    let relay_log = dir.path().join("relay.log");
    let mut remote = Remote::relay_logging(&[], Some(("info", &relay_log)));
    remote.start_executor(&[]);
    remote.wait_online();
    let address = remote.address();
    // 128 orchestrator connections at once, each its own stream.
    let clients: Vec<Client> = (0..128)
        .map(|_| Client::new(ServerCommand::parse(&address).unwrap()))
        .collect();
    let opened: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move { c.environment_status().await })
        })
        .collect();
    for (i, open) in opened.into_iter().enumerate() {
        let status = open.await.unwrap();
        assert!(status.is_ok(), "stream {i}: {status:?}");
    }
    // The 129th is refused cleanly: a reset, said as such.
    let extra = Client::new(ServerCommand::parse(&address).unwrap());
    let refused = extra.environment_status().await.unwrap_err().to_string();
    assert!(refused.contains("Noise relay stream reset"), "{refused}");
    // A flood of 1,000 bad attempts at the relay meanwhile: forged
    // signatures, streams not claimed first, garbage frames.
    let port = remote.port;
    let env = remote.environment.clone();
    let flood = tokio::spawn(async move {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let mut refused = 0;
        for i in 0..1000 {
            let url = if i % 2 == 0 {
                format!(
                    "ws://127.0.0.1:{port}/ws/environment/{env}?role=harness&reg=x&n=1&exp=99999999999&sig={i:064x}"
                )
            } else {
                let b = tokio::task::spawn_blocking({
                    let env = env.clone();
                    move || bundle(port, &env, None)
                })
                .await
                .unwrap();
                b["url"].as_str().unwrap().to_string()
            };
            match ws_to(&url).await {
                Err(_) => refused += 1,
                Ok(mut socket) => {
                    let frame = if i % 4 == 1 {
                        // A handshake before any claim: never forwarded.
                        exec_server::remote::frame::RelayMessageFrame::handshake("s", vec![1; 64])
                            .encode()
                    } else {
                        vec![0xff; 32]
                    };
                    let _ = socket.send(Message::Binary(frame.into())).await;
                    let _ = socket.send(Message::Text("hello".into())).await;
                }
            }
        }
        refused
    });
    // Every stream runs a command while the flood goes on.
    let runs: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let c = c.clone();
            tokio::spawn(async move {
                let script = format!(
                    "for j in 1 2 3; do echo {i}-$j; sleep 0.2; done; exit {}",
                    i % 100
                );
                let mut process = c
                    .start(StartOptions::new("p", ["sh", "-c", &script]).cwd("/tmp"))
                    .await?;
                let mut output = Vec::new();
                let status = process
                    .wait_with_output(|_, bytes| output.extend_from_slice(bytes))
                    .await?;
                Ok::<_, exec_server::client::ClientError>((status.code, output))
            })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let (code, output) = run.await.unwrap().unwrap();
        assert_eq!(code, (i % 100) as i32);
        assert_eq!(
            String::from_utf8_lossy(&output),
            format!("{i}-1\n{i}-2\n{i}-3\n")
        );
    }
    assert_eq!(flood.await.unwrap(), 500, "forged signatures got through");
    // The executor's one socket was never dropped.
    let log = std::fs::read_to_string(&relay_log).unwrap();
    assert_eq!(log.matches("executor connected").count(), 1, "{log}");
    for client in clients {
        client.shutdown().await;
    }
}

/// A TLS-terminating proxy on loopback (the certificate of
/// `fixtures/tls`, for `localhost`) in front of `upstream`: how a relay is
/// put behind `wss://` and `https://`. Its port.
fn tls_terminator(upstream: u16) -> u16 {
    let acceptor = tokio_rustls::TlsAcceptor::from(crate::web::tls_config());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut plain) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
    });
    port
}

#[test]
fn a_relay_behind_tls_is_reached_over_wss_and_https() {
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/ca.pem");
    // The relay's own port is known only once it runs; its public URL is
    // the terminator's, which needs the relay's port: start a relay to
    // learn a free port, then the real one on it.
    let probe = Remote::relay_only(&[]);
    let relay_port = probe.port;
    drop(probe);
    let tls_port = tls_terminator(relay_port);
    let public = format!("wss://localhost:{tls_port}");
    let (relay, url) = {
        let mut command = Command::new(bin());
        command
            .args(["relay", "--listen", &format!("ws://127.0.0.1:{relay_port}")])
            .args(["--public-url", &public])
            .stderr(Stdio::inherit());
        listening(command)
    };
    let mut remote = Remote::around(relay, &url, "tls");
    let registry = format!("https://localhost:{tls_port}");
    let executor = Command::new(bin())
        .args([
            "--remote",
            &registry,
            "--environment-id",
            &remote.environment,
        ])
        .env("SSL_CERT_FILE", ca)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    remote.executor = Some(executor);
    remote.wait_online();
    let address = format!("noise+https://localhost:{tls_port}/{}", remote.environment);
    let out = Command::new(bin())
        .args(["run", "--via", &address, "--", "echo", "over tls"])
        .env("SSL_CERT_FILE", ca)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "over tls\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the test CA, the certificate is not trusted: no plaintext
    // fallback.
    let out = Command::new(bin())
        .args(["run", "--via", &address, "--", "echo", "over tls"])
        .env("SSL_CERT_FILE", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_and_an_output_flood_share_a_stream_without_a_reset() {
    let remote = Remote::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = lost.clone();
    let client =
        Client::new(ServerCommand::parse(&remote.address()).unwrap()).with_notices(move |n| {
            if matches!(n, exec_server::client::Notice::Reconnecting { .. }) {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
    // A process that floods output for the whole test...
    let mut flood = client
        .start(StartOptions::new("flood", ["sh", "-c", "head -c 128000000 /dev/zero"]).cwd("/tmp"))
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut bytes = 0usize;
        let status = flood
            .wait_with_output(|_, chunk| bytes += chunk.len())
            .await
            .map(|s| s.code);
        (status, bytes)
    });
    // ...while large requests go the other way on the same stream.
    for i in 0..4 {
        let data: Vec<u8> = (0..16 << 20).map(|j| ((i * 7 + j) % 251) as u8).collect();
        let path = dir.path().join(format!("big-{i}"));
        client.write_file(&path, &data).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
    let (status, bytes) = reader.await.unwrap();
    assert_eq!(status.unwrap(), 0);
    assert_eq!(bytes, 128_000_000);
    // The stream was never reset (no reconnect was needed).
    assert_eq!(lost.load(std::sync::atomic::Ordering::SeqCst), 0);
    client.shutdown().await;
}

#[test]
fn a_flood_of_unfinished_request_heads_keeps_no_caller_out() {
    use std::os::unix::process::CommandExt;
    // A relay with 512 descriptors; 700 connections that start a request
    // head and never finish it would take them all.
    let mut command = Command::new(bin());
    command
        .args(["relay", "--listen", "ws://127.0.0.1:0"])
        .stderr(Stdio::inherit());
    // SAFETY: only setrlimit between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 512,
                rlim_max: 512,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (relay, url) = listening(command);
    let mut remote = Remote::around(relay, &url, "heads");
    let port = remote.port;
    remote.start_executor(&[]);
    remote.wait_online();
    // This test process holds the flood's sockets: room for them beside
    // what the other tests hold.
    assert!(crate::flood::room_for_sockets() >= 1500);
    let flood: Vec<std::net::TcpStream> = (0..700)
        .filter_map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            let _ = s.write_all(b"POST /cloud/environment/x/register HTTP/1.1\r\nhost: x\r\n");
            Some(s)
        })
        .collect();
    assert!(flood.len() > 600, "{} flood connections", flood.len());
    // The relay holds at most its 128 unfinished heads (each new one
    // pushes out the oldest), not a descriptor per flood connection.
    let held = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let settled = eventually(Duration::from_secs(3), || held(remote.relay.id()) < 200);
    assert!(
        settled,
        "the relay holds {} descriptors",
        held(remote.relay.id())
    );
    // A real registry call and a real stream still get through.
    let (status, body) = registry_post(
        remote.port,
        &remote.environment,
        "connect",
        &harness_key_body(),
    );
    assert_eq!(status, 200, "{body}");
    let out = Command::new(bin())
        .args(["run", "--via", &remote.address(), "--", "echo", "through"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "through\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(flood);
}
