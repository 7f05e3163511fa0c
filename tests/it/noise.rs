//! The remote transport's security and limit classes (REMOTE-NOTES §8),
//! against the real `exec-server --remote` executor. The test plays the
//! registry and the rendezvous itself, so it controls every frame the
//! executor sees and sees every frame it sends: a handshake built here
//! with the crate's Noise types, garbage, early data, floods; a registry
//! that blocks, rejects, or answers 500 with the token in the body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exec_server::remote::frame::{Body, RelayMessageFrame};
use exec_server::remote::noise::{Identity, Initiator, PublicKey, prologue};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::bin;

/// The environment and registration the fake registry knows.
pub const ENV: &str = "env-t";
pub const REGISTRATION: &str = "reg-1";
/// The one authorization the fake registry accepts.
pub const GOOD_AUTHZ: &str = "authz-good-7f3a";
/// What the fake registry's executor URL carries as its credential.
pub const URL_SECRET: &str = "sig-9d41c0ffee";

/// How the fake registry answers `validate`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Validate {
    /// `valid: true` exactly for [`GOOD_AUTHZ`].
    Honest,
    /// Always `valid: false`.
    Reject,
    /// 500 with a body that repeats the authorization.
    Fail,
    /// Wait this long, then answer honestly.
    Slow(Duration),
}

pub struct State {
    pub executor_key: Option<Value>,
    pub registers: usize,
    pub validates: usize,
    /// Validate calls in progress now, and the most at once.
    pub validating: usize,
    pub most_validating: usize,
    pub validate: Validate,
    /// Every request head and body the registry received.
    pub seen: Vec<String>,
}

/// A registry and a rendezvous router played by the test.
pub struct Fake {
    pub registry: String,
    pub state: Arc<Mutex<State>>,
    executors: tokio::sync::mpsc::UnboundedReceiver<WebSocketStream<TcpStream>>,
    harnesses: tokio::sync::mpsc::UnboundedReceiver<WebSocketStream<TcpStream>>,
}

impl Fake {
    pub async fn start(validate: Validate) -> Fake {
        let registry = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rendezvous = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rendezvous_port = rendezvous.local_addr().unwrap().port();
        let harness = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let harness_port = harness.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            executor_key: None,
            registers: 0,
            validates: 0,
            validating: 0,
            most_validating: 0,
            validate,
            seen: Vec::new(),
        }));
        let registry_url = format!("http://{}", registry.local_addr().unwrap());
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = registry.accept().await else {
                    return;
                };
                tokio::spawn(serve_registry(
                    stream,
                    shared.clone(),
                    rendezvous_port,
                    harness_port,
                ));
            }
        });
        let (tx, executors) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = rendezvous.accept().await else {
                    return;
                };
                if let Ok(socket) = tokio_tungstenite::accept_async(stream).await {
                    let _ = tx.send(socket);
                }
            }
        });
        let (tx, harnesses) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = harness.accept().await else {
                    return;
                };
                if let Ok(socket) = tokio_tungstenite::accept_async(stream).await {
                    let _ = tx.send(socket);
                }
            }
        });
        Fake {
            registry: registry_url,
            state,
            executors,
            harnesses,
        }
    }

    /// The executor command for this registry.
    pub fn executor(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(bin());
        command
            .args(["--remote", &self.registry, "--environment-id", ENV])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// The next executor socket to reach the rendezvous.
    pub async fn next_executor(&mut self, within: Duration) -> Option<WebSocketStream<TcpStream>> {
        tokio::time::timeout(within, self.executors.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next harness socket to reach the rendezvous.
    pub async fn next_harness(&mut self, within: Duration) -> Option<WebSocketStream<TcpStream>> {
        tokio::time::timeout(within, self.harnesses.recv())
            .await
            .ok()
            .flatten()
    }

    /// The executor's registered public key.
    pub fn executor_key(&self) -> PublicKey {
        let key = self.state.lock().unwrap().executor_key.clone().unwrap();
        serde_json::from_value(key).unwrap()
    }
}

async fn serve_registry(
    mut stream: TcpStream,
    state: Arc<Mutex<State>>,
    rendezvous: u16,
    harness: u16,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let length: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    if stream.read_exact(&mut body).await.is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
    state.lock().unwrap().seen.push(format!("{text}{body}"));
    let (status, answer) = if path.ends_with("/register") {
        let mut s = state.lock().unwrap();
        s.registers += 1;
        s.executor_key = Some(body["executor_public_key"].clone());
        (
            200,
            json!({
                "environment_id": ENV,
                "url": format!("ws://127.0.0.1:{rendezvous}/executor?sig={URL_SECRET}"),
                "security_profile": "noise_hybrid_ik_v1",
                "executor_registration_id": REGISTRATION,
            }),
        )
    } else if path.ends_with("/connect") {
        let key = state.lock().unwrap().executor_key.clone();
        (
            200,
            json!({
                "environment_id": ENV,
                "url": format!("ws://127.0.0.1:{harness}/harness?sig={URL_SECRET}"),
                "security_profile": "noise_hybrid_ik_v1",
                "executor_registration_id": REGISTRATION,
                "executor_public_key": key,
                "harness_key_authorization": GOOD_AUTHZ,
            }),
        )
    } else if path.ends_with("/validate") {
        let mode = {
            let mut s = state.lock().unwrap();
            s.validates += 1;
            s.validating += 1;
            s.most_validating = s.most_validating.max(s.validating);
            s.validate
        };
        if let Validate::Slow(wait) = mode {
            tokio::time::sleep(wait).await;
        }
        state.lock().unwrap().validating -= 1;
        let authz = body["harness_key_authorization"].as_str().unwrap_or("");
        let registration = body["executor_registration_id"].as_str().unwrap_or("");
        match mode {
            Validate::Honest | Validate::Slow(_) => (
                200,
                json!({"valid": authz == GOOD_AUTHZ && registration == REGISTRATION}),
            ),
            Validate::Reject => (200, json!({"valid": false})),
            Validate::Fail => (
                500,
                json!({"error": {"code": "boom", "message": format!("cannot check {authz}")}}),
            ),
        }
    } else {
        (404, json!({"error": {"message": "no such call"}}))
    };
    let answer = answer.to_string();
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A harness handshake for `stream` against the executor's `key`:
/// message 1 carrying `authorization`, and the initiator to finish it.
pub fn message_one(key: &PublicKey, stream: &str, authorization: &[u8]) -> (Initiator, Vec<u8>) {
    let harness = Identity::generate().unwrap();
    let mut initiator =
        Initiator::new(&harness, key, &prologue(ENV, REGISTRATION, stream)).unwrap();
    let first = initiator.first_message(authorization).unwrap();
    (initiator, first)
}

pub async fn send(socket: &mut WebSocketStream<TcpStream>, frame: RelayMessageFrame) {
    socket
        .send(Message::Binary(frame.encode().into()))
        .await
        .unwrap();
}

/// What the executor said next: a frame, or the end of the socket.
#[derive(Debug)]
pub enum Heard {
    Frame(RelayMessageFrame),
    Closed,
    Nothing,
}

pub async fn hear(socket: &mut WebSocketStream<TcpStream>, within: Duration) -> Heard {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return Heard::Nothing,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return Heard::Closed,
            Ok(Some(Ok(Message::Binary(bytes)))) => {
                return Heard::Frame(RelayMessageFrame::decode_valid(&bytes).unwrap());
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

fn is_reset(heard: &Heard, stream: &str) -> bool {
    matches!(heard, Heard::Frame(f) if f.stream_id == stream && matches!(f.body, Some(Body::Reset(_))))
}

/// A fake registry, an executor registered with it, and its socket.
async fn connected(
    validate: Validate,
    args: &[&str],
) -> (Fake, tokio::process::Child, WebSocketStream<TcpStream>) {
    let mut fake = Fake::start(validate).await;
    let executor = fake.executor(args).spawn().unwrap();
    let socket = fake
        .next_executor(Duration::from_secs(20))
        .await
        .expect("the executor connects to the rendezvous");
    (fake, executor, socket)
}

#[tokio::test]
async fn a_good_handshake_gets_message_two_and_a_channel() {
    let (fake, _executor, mut socket) = connected(Validate::Honest, &[]).await;
    let key = fake.executor_key();
    send(&mut socket, RelayMessageFrame::resume("s1")).await;
    let (initiator, first) = message_one(&key, "s1", GOOD_AUTHZ.as_bytes());
    send(&mut socket, RelayMessageFrame::handshake("s1", first)).await;
    let Heard::Frame(reply) = hear(&mut socket, Duration::from_secs(10)).await else {
        panic!("no message 2");
    };
    let Some(Body::Handshake(reply)) = reply.body else {
        panic!("not a handshake: {reply:?}");
    };
    let mut channel = initiator.finish(&reply.payload).unwrap();
    for (seq, record) in channel
        .seal(br#"{"id":1,"method":"initialize","params":{"clientName":"raw"}}"#)
        .unwrap()
    {
        send(&mut socket, RelayMessageFrame::data("s1", seq, record)).await;
    }
    let Heard::Frame(answer) = hear(&mut socket, Duration::from_secs(10)).await else {
        panic!("no answer");
    };
    let Some(Body::Data(data)) = answer.body else {
        panic!("not data: {answer:?}");
    };
    let messages = channel.open(data.seq, data.payload).unwrap();
    let answer: Value = serde_json::from_slice(&messages[0]).unwrap();
    assert!(answer["result"]["sessionId"].is_string(), "{answer}");
}

#[tokio::test]
async fn a_wrong_executor_key_or_prologue_never_gets_message_two() {
    let (fake, _executor, mut socket) = connected(Validate::Honest, &[]).await;
    // Pinned to another key: the executor can't read message 1.
    let impostor = Identity::generate().unwrap().public();
    let (_, first) = message_one(&impostor, "s1", GOOD_AUTHZ.as_bytes());
    send(&mut socket, RelayMessageFrame::handshake("s1", first)).await;
    assert!(is_reset(
        &hear(&mut socket, Duration::from_secs(10)).await,
        "s1"
    ));
    // Bound to another stream id: the prologue differs.
    let (_, first) = message_one(&fake.executor_key(), "s-other", GOOD_AUTHZ.as_bytes());
    send(&mut socket, RelayMessageFrame::handshake("s2", first)).await;
    assert!(is_reset(
        &hear(&mut socket, Duration::from_secs(10)).await,
        "s2"
    ));
    assert_eq!(fake.state.lock().unwrap().validates, 0);
}

#[tokio::test]
async fn an_oversized_authorization_is_refused_before_the_registry_is_asked() {
    let (fake, _executor, mut socket) = connected(Validate::Honest, &[]).await;
    let (_, first) = message_one(&fake.executor_key(), "s1", &[b'a'; 4097]);
    send(&mut socket, RelayMessageFrame::handshake("s1", first)).await;
    assert!(is_reset(
        &hear(&mut socket, Duration::from_secs(10)).await,
        "s1"
    ));
    // 4,096 bytes is still read, and asked about.
    let (_, first) = message_one(&fake.executor_key(), "s2", &[b'a'; 4096]);
    send(&mut socket, RelayMessageFrame::handshake("s2", first)).await;
    assert!(is_reset(
        &hear(&mut socket, Duration::from_secs(10)).await,
        "s2"
    ));
    assert_eq!(fake.state.lock().unwrap().validates, 1);
}

/// Eight failures of `kind` close the physical socket (and the executor
/// comes back on a new one); seven do not.
async fn budget_closes_the_socket(kind: &str) {
    let (mut fake, _executor, mut socket) =
        connected(Validate::Slow(Duration::from_secs(5)), &[]).await;
    let key = fake.executor_key();
    for i in 0..8 {
        let stream = format!("s{i}");
        match kind {
            "garbage" => {
                send(
                    &mut socket,
                    RelayMessageFrame::handshake(&stream, vec![7; 100 + i]),
                )
                .await
            }
            "duplicate" | "early-data" => {
                let (_, first) = message_one(&key, &stream, GOOD_AUTHZ.as_bytes());
                send(
                    &mut socket,
                    RelayMessageFrame::handshake(&stream, first.clone()),
                )
                .await;
                // Wait until the registry is asked, so the stream is pending.
                let asked = i + 1;
                let deadline = Instant::now() + Duration::from_secs(10);
                while fake.state.lock().unwrap().validates < asked {
                    assert!(Instant::now() < deadline, "validation was never asked");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let again = if kind == "duplicate" {
                    RelayMessageFrame::handshake(&stream, first)
                } else {
                    RelayMessageFrame::data(&stream, 0, vec![1, 2, 3])
                };
                send(&mut socket, again).await;
            }
            _ => unreachable!(),
        }
        let heard = hear(&mut socket, Duration::from_secs(10)).await;
        assert!(is_reset(&heard, &stream), "{kind} {i}: {heard:?}");
        if i < 7 {
            // Still open: an unknown stream's data gets its reset.
            send(&mut socket, RelayMessageFrame::data("probe", 0, vec![1])).await;
            let heard = hear(&mut socket, Duration::from_secs(10)).await;
            assert!(is_reset(&heard, "probe"), "{kind} {i}: {heard:?}");
        }
    }
    // The eighth closed it.
    let mut closed = false;
    for _ in 0..4 {
        match hear(&mut socket, Duration::from_secs(10)).await {
            Heard::Closed => {
                closed = true;
                break;
            }
            Heard::Nothing => break,
            Heard::Frame(_) => {}
        }
    }
    assert!(closed, "{kind}: eight failures did not close the socket");
    assert!(
        fake.next_executor(Duration::from_secs(10)).await.is_some(),
        "{kind}: the executor did not come back"
    );
}

#[tokio::test]
async fn eight_malformed_handshakes_close_the_physical_socket() {
    budget_closes_the_socket("garbage").await;
}

#[tokio::test]
async fn eight_duplicate_handshakes_close_the_physical_socket() {
    budget_closes_the_socket("duplicate").await;
}

#[tokio::test]
async fn eight_early_data_frames_close_the_physical_socket() {
    budget_closes_the_socket("early-data").await;
}

#[tokio::test]
async fn an_unknown_stream_is_reset_and_the_socket_stays() {
    let (_fake, _executor, mut socket) = connected(Validate::Honest, &[]).await;
    for i in 0..20 {
        let stream = format!("nobody-{i}");
        send(
            &mut socket,
            RelayMessageFrame::data(&stream, 0, vec![9; 32]),
        )
        .await;
        assert!(is_reset(
            &hear(&mut socket, Duration::from_secs(10)).await,
            &stream
        ));
    }
    // Undecodable and invalid frames are dropped without a word.
    socket
        .send(Message::Binary(vec![0xff, 0x01, 0x02].into()))
        .await
        .unwrap();
    let mut bad = RelayMessageFrame::resume("x");
    bad.version = 2;
    send(&mut socket, bad).await;
    assert!(matches!(
        hear(&mut socket, Duration::from_millis(500)).await,
        Heard::Nothing
    ));
}

#[tokio::test]
async fn a_slow_validation_does_not_hold_other_handshakes() {
    let (fake, _executor, mut socket) =
        connected(Validate::Slow(Duration::from_secs(2)), &[]).await;
    let key = fake.executor_key();
    let started = Instant::now();
    let mut initiators = HashMap::new();
    for stream in ["a", "b", "c"] {
        let (initiator, first) = message_one(&key, stream, GOOD_AUTHZ.as_bytes());
        initiators.insert(stream.to_string(), initiator);
        send(&mut socket, RelayMessageFrame::handshake(stream, first)).await;
    }
    let mut done = 0;
    while done < 3 {
        let Heard::Frame(frame) = hear(&mut socket, Duration::from_secs(10)).await else {
            panic!("no reply");
        };
        if let Some(Body::Handshake(reply)) = frame.body {
            let initiator = initiators.remove(&frame.stream_id).unwrap();
            initiator.finish(&reply.payload).unwrap();
            done += 1;
        }
    }
    // All three were asked at once: 2 s each, done in well under 6 s.
    assert_eq!(fake.state.lock().unwrap().most_validating, 3);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_rejected_or_failed_validation_fails_closed_without_echoing_the_body() {
    for mode in [Validate::Reject, Validate::Fail] {
        let mut fake = Fake::start(mode).await;
        let mut executor = fake
            .executor(&[])
            .env("EXEC_SERVER_LOG", "trace")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut socket = fake.next_executor(Duration::from_secs(20)).await.unwrap();
        let (_, first) = message_one(&fake.executor_key(), "s1", GOOD_AUTHZ.as_bytes());
        send(&mut socket, RelayMessageFrame::handshake("s1", first)).await;
        let heard = hear(&mut socket, Duration::from_secs(10)).await;
        assert!(is_reset(&heard, "s1"), "{mode:?}: {heard:?}");
        executor.start_kill().unwrap();
        let out = executor.wait_with_output().await.unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            !log.contains(GOOD_AUTHZ),
            "{mode:?}: the log shows the authorization"
        );
        assert!(
            !log.contains(URL_SECRET),
            "{mode:?}: the log shows the URL's signature"
        );
        assert!(
            !log.contains("cannot check"),
            "{mode:?}: the log echoes the body"
        );
    }
}

#[tokio::test]
async fn the_executor_drops_a_socket_that_answers_no_ping_and_keeps_one_that_does() {
    let (mut fake, _executor, mut socket) =
        connected(Validate::Honest, &["--ws-ping-interval-ms", "200"]).await;
    // Read (so pings are answered) for 1.5 s: it stays.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, socket.next()).await {
        if matches!(message, Message::Ping(_)) {
            pings += 1;
        }
        // tungstenite queues the pong; flushing sends it.
        let _ = socket.flush().await;
    }
    assert!(pings >= 3, "{pings} pings in 1.5 s");
    assert!(
        fake.next_executor(Duration::from_millis(100))
            .await
            .is_none()
    );
    // Stop reading: no pong goes back; within two intervals (and a
    // reconnect delay) it is on a new socket.
    let started = Instant::now();
    let again = fake.next_executor(Duration::from_secs(10)).await;
    assert!(
        again.is_some(),
        "the executor kept a socket that answers no ping"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    drop(socket);
}

/// Copy frames both ways between one executor socket and one harness
/// socket, as the reference's test rendezvous does; every frame is kept
/// (`true`: from the harness).
fn copy_frames(
    executor: WebSocketStream<TcpStream>,
    harness: WebSocketStream<TcpStream>,
    captured: Arc<Mutex<Vec<(bool, RelayMessageFrame)>>>,
) {
    let (mut exec_tx, mut exec_rx) = executor.split();
    let (mut harn_tx, mut harn_rx) = harness.split();
    let up = captured.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = harn_rx.next().await {
            if let Message::Binary(bytes) = &message {
                up.lock()
                    .unwrap()
                    .push((true, RelayMessageFrame::decode_valid(bytes).unwrap()));
                if exec_tx.send(message).await.is_err() {
                    break;
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(message)) = exec_rx.next().await {
            if let Message::Binary(bytes) = &message {
                captured
                    .lock()
                    .unwrap()
                    .push((false, RelayMessageFrame::decode_valid(bytes).unwrap()));
                if harn_tx.send(message).await.is_err() {
                    break;
                }
            }
        }
    });
}

#[tokio::test]
async fn the_rendezvous_sees_only_ciphertext_in_as_many_records_as_the_framing_implies() {
    let (mut fake, _executor, executor_socket) = connected(Validate::Honest, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("secret-file.txt");
    // 90 KiB of text whose base64 makes a request of over 120 KiB.
    let content: String = (0..90 * 1024)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    let b64 = crate::support::b64(content.as_bytes());
    let lines = [
        json!({"id": 1, "method": "initialize", "params": {"clientName": "client-name-marker"}}),
        json!({"method": "initialized"}),
        json!({"id": 2, "method": "process/start", "params": {
            "processId": "p", "argv": ["echo", "argv-marker-31337"], "cwd": "/tmp", "tty": false}}),
        json!({"id": 3, "method": "fs/writeFile", "params": {
            "path": target.to_str().unwrap(), "dataBase64": b64}}),
        json!({"id": 4, "method": "fs/readFile", "params": {"path": target.to_str().unwrap()}}),
    ]
    .map(|v| v.to_string());
    assert!(lines[3].len() > 120 * 1024);
    let mut bridge = tokio::process::Command::new(bin())
        .args(["bridge", &format!("noise+{}/{ENV}", fake.registry)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let harness_socket = fake.next_harness(Duration::from_secs(20)).await.unwrap();
    let captured = Arc::new(Mutex::new(Vec::new()));
    copy_frames(executor_socket, harness_socket, captured.clone());
    let mut stdin = bridge.stdin.take().unwrap();
    for line in &lines {
        stdin.write_all(line.as_bytes()).await.unwrap();
        stdin.write_all(b"\n").await.unwrap();
    }
    // Every answer (and the echo's output) comes back through the copier.
    let mut reader = tokio::io::BufReader::new(bridge.stdout.take().unwrap());
    let mut answered = 0;
    let mut read_back = String::new();
    while answered < 4 {
        let mut line = String::new();
        use tokio::io::AsyncBufReadExt;
        tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut line))
            .await
            .expect("answers come back")
            .unwrap();
        let message: Value = serde_json::from_str(&line).unwrap();
        if message.get("id").is_some() {
            assert!(message.get("error").is_none(), "{message}");
            answered += 1;
            if message["id"] == 4 {
                read_back = message["result"]["dataBase64"]
                    .as_str()
                    .unwrap()
                    .to_string();
            }
        }
    }
    assert_eq!(read_back, b64);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), content);
    drop(stdin);
    let frames = captured.lock().unwrap().clone();
    // Nothing of the session in clear, either way.
    let plaintexts: [&[u8]; 9] = [
        b"initialize",
        b"process/start",
        b"fs/writeFile",
        b"client-name-marker",
        b"argv-marker-31337",
        b"secret-file.txt",
        b"sessionId",
        &content.as_bytes()[..64],
        &b64.as_bytes()[..64],
    ];
    for (_, frame) in &frames {
        let bytes = match &frame.body {
            Some(Body::Data(d)) => &d.payload,
            Some(Body::Handshake(h)) => &h.payload,
            _ => continue,
        };
        for plain in plaintexts {
            assert!(
                !bytes.windows(plain.len()).any(|w| w == plain),
                "a payload shows {:?} in clear",
                String::from_utf8_lossy(plain)
            );
        }
        assert!(frame.traceparent.is_none() && frame.tracestate.is_none());
    }
    // One record per 60 KiB of `length ‖ JSON`, each message starting a
    // new one: the 120 KiB request takes three.
    let want: usize = lines.iter().map(|l| (l.len() + 4).div_ceil(61_440)).sum();
    let data_up: Vec<u32> = frames
        .iter()
        .filter(|(up, _)| *up)
        .filter_map(|(_, f)| match &f.body {
            Some(Body::Data(d)) => Some(d.seq),
            _ => None,
        })
        .collect();
    assert_eq!((lines[3].len() + 4).div_ceil(61_440), 3);
    assert_eq!(data_up.len(), want);
    assert_eq!(data_up, (0..want as u32).collect::<Vec<_>>());
    // The harness claimed its stream first, then sent message 1.
    assert!(matches!(
        frames[0],
        (
            true,
            RelayMessageFrame {
                body: Some(Body::Resume(_)),
                ..
            }
        )
    ));
    let _ = bridge.wait().await;
}

#[tokio::test]
async fn the_harness_drops_a_relay_that_answers_no_ping() {
    use exec_server::client::{Client, ServerCommand};
    use exec_server::remote::noise::Responder;
    // No executor process: the test is the executor, with a key of its
    // own that the registry hands out.
    let mut fake = Fake::start(Validate::Honest).await;
    let identity = Identity::generate().unwrap();
    fake.state.lock().unwrap().executor_key =
        Some(serde_json::to_value(identity.public()).unwrap());
    let command = ServerCommand::parse(&format!("noise+{}/{ENV}", fake.registry))
        .unwrap()
        .keepalive(Duration::from_millis(200));
    let client = Client::new(command);
    let status = {
        let client = client.clone();
        tokio::spawn(async move { client.environment_status().await })
    };
    let mut socket = fake.next_harness(Duration::from_secs(20)).await.unwrap();
    // resume, then message 1.
    let mut stream = String::new();
    let mut responder = None;
    while responder.is_none() {
        let Heard::Frame(frame) = hear(&mut socket, Duration::from_secs(10)).await else {
            panic!("no handshake");
        };
        if let Some(Body::Handshake(h)) = frame.body {
            stream = frame.stream_id.clone();
            let mut r = Responder::new(&identity, &prologue(ENV, REGISTRATION, &stream)).unwrap();
            let (_, authz) = r.read_first(&h.payload).unwrap();
            assert_eq!(authz, GOOD_AUTHZ.as_bytes());
            responder = Some(r);
        }
    }
    let (reply, mut channel) = responder.unwrap().reply().unwrap();
    send(&mut socket, RelayMessageFrame::handshake(&stream, reply)).await;
    // Answer initialize; then read nothing more, so no pong goes back.
    let Heard::Frame(frame) = hear(&mut socket, Duration::from_secs(10)).await else {
        panic!("no initialize");
    };
    let Some(Body::Data(data)) = frame.body else {
        panic!("not data");
    };
    let init: Value =
        serde_json::from_slice(&channel.open(data.seq, data.payload).unwrap()[0]).unwrap();
    assert_eq!(init["method"], "initialize");
    let answer = json!({"id": init["id"], "result": {"sessionId": "s-1", "serverInfo": {"name": "t", "version": "0"}}});
    for (seq, record) in channel.seal(answer.to_string().as_bytes()).unwrap() {
        send(&mut socket, RelayMessageFrame::data(&stream, seq, record)).await;
    }
    let stopped = Instant::now();
    // The call in flight fails once the harness gives the silent socket
    // up (two 200 ms intervals without a pong), rather than hanging.
    let outcome = tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("the harness kept a relay that answers no ping")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(stopped.elapsed() >= Duration::from_millis(300));
    // The next call opens a new stream.
    let next = {
        let client = client.clone();
        tokio::spawn(async move { client.environment_status().await })
    };
    assert!(fake.next_harness(Duration::from_secs(10)).await.is_some());
    next.abort();
    drop(socket);
}

#[tokio::test]
async fn registry_calls_follow_no_redirect_and_keep_the_token_to_themselves() {
    use exec_server::remote::registry::{Registry, Secret};
    // Where a redirect would lead: it must never be asked.
    let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere_url = format!("http://{}/steal", elsewhere.local_addr().unwrap());
    let reached = Arc::new(Mutex::new(0usize));
    {
        let reached = reached.clone();
        tokio::spawn(async move {
            while let Ok((_, _)) = elsewhere.accept().await {
                *reached.lock().unwrap() += 1;
            }
        });
    }
    let redirecting = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", redirecting.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = redirecting.accept().await {
            let location = elsewhere_url.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    let registry = Registry::new(&base, Secret::new("bearer-token-77aa")).unwrap();
    let key = Identity::generate().unwrap().public();
    let err = registry.register(ENV, &key).await.unwrap_err().to_string();
    assert!(
        !err.contains("bearer-token-77aa") && !err.contains("steal"),
        "{err}"
    );
    let err = registry.connect(ENV, &key).await.unwrap_err().to_string();
    assert!(!err.contains("steal"), "{err}");
    assert!(
        registry
            .validate(ENV, REGISTRATION, &key, "authz")
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*reached.lock().unwrap(), 0, "a redirect was followed");
    // Nor does a Debug of the client show the token.
    assert!(!format!("{registry:?}").contains("bearer-token-77aa"));
}

#[tokio::test]
async fn at_most_32_handshakes_wait_for_the_registry_and_the_33rd_is_reset_uncharged() {
    let (fake, _executor, mut socket) =
        connected(Validate::Slow(Duration::from_secs(3)), &[]).await;
    let key = fake.executor_key();
    for i in 0..33 {
        let stream = format!("p{i}");
        let (_, first) = message_one(&key, &stream, GOOD_AUTHZ.as_bytes());
        send(&mut socket, RelayMessageFrame::handshake(&stream, first)).await;
    }
    // The 33rd is reset at once; the 32 are still being validated.
    let heard = hear(&mut socket, Duration::from_secs(2)).await;
    assert!(is_reset(&heard, "p32"), "{heard:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while fake.state.lock().unwrap().validates < 32 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.state.lock().unwrap().validates, 32);
    // Not charged to the failure budget: eight more refusals of this kind
    // would have closed the socket; the 32 all complete instead.
    let mut replies = 0;
    while replies < 32 {
        match hear(&mut socket, Duration::from_secs(10)).await {
            Heard::Frame(RelayMessageFrame {
                body: Some(Body::Handshake(_)),
                ..
            }) => replies += 1,
            Heard::Frame(_) => {}
            other => panic!("after {replies} replies: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_registry_that_takes_longer_than_10_s_is_a_rejection() {
    let (fake, _executor, mut socket) =
        connected(Validate::Slow(Duration::from_secs(12)), &[]).await;
    let (_, first) = message_one(&fake.executor_key(), "slow", GOOD_AUTHZ.as_bytes());
    let started = Instant::now();
    send(&mut socket, RelayMessageFrame::handshake("slow", first)).await;
    let heard = hear(&mut socket, Duration::from_secs(15)).await;
    assert!(is_reset(&heard, "slow"), "{heard:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(12),
        "reset after {waited:?}"
    );
}

/// A stream whose output waits for a relay that is not reading, and which
/// meanwhile gets a request of many records: the executor waits for room
/// instead of resetting the stream, and answers once the relay reads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_blocked_on_output_takes_a_large_request_without_a_reset() {
    let (fake, _executor, mut socket) = connected(Validate::Honest, &[]).await;
    send(&mut socket, RelayMessageFrame::resume("s1")).await;
    let (initiator, first) = message_one(&fake.executor_key(), "s1", GOOD_AUTHZ.as_bytes());
    send(&mut socket, RelayMessageFrame::handshake("s1", first)).await;
    let Heard::Frame(RelayMessageFrame {
        body: Some(Body::Handshake(reply)),
        ..
    }) = hear(&mut socket, Duration::from_secs(10)).await
    else {
        panic!("no message 2");
    };
    let mut channel = initiator.finish(&reply.payload).unwrap();
    let frames_of = |value: Value, channel: &mut exec_server::remote::noise::Channel| {
        channel
            .seal_frames("s1", &[value.to_string().as_bytes()])
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("big");
    let data: Vec<u8> = (0..12 << 20).map(|i| (i % 251) as u8).collect();
    let mut outgoing = Vec::new();
    for message in [
        json!({"id": 1, "method": "initialize", "params": {"clientName": "raw"}}),
        json!({"method": "initialized"}),
        // Output that fills every queue while nobody reads it.
        json!({"id": 2, "method": "process/start", "params": {
            "processId": "flood", "argv": ["head", "-c", "40000000", "/dev/zero"],
            "cwd": "/tmp", "tty": false}}),
    ] {
        outgoing.extend(frames_of(message, &mut channel));
    }
    let write = json!({"id": 3, "method": "fs/writeFile", "params": {
        "path": target.to_str().unwrap(), "dataBase64": crate::support::b64(&data)}});
    let (mut tx, mut rx) = socket.split();
    for frame in outgoing {
        tx.send(Message::Binary(frame.into())).await.unwrap();
    }
    // Give the flood time to fill the executor's queues, then send the
    // request (hundreds of records) from a task of its own: the executor
    // may stop reading until its stream has room.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let big = frames_of(write, &mut channel);
    assert!(big.len() > 200, "{} records", big.len());
    let sender = tokio::spawn(async move {
        for frame in big {
            tx.send(Message::Binary(frame.into())).await.unwrap();
        }
        tx
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Now read on: the answer to the write comes, and no reset.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut answered = false;
    while !answered {
        let message = tokio::time::timeout_at(deadline, rx.next())
            .await
            .expect("the write was answered in time");
        let Some(Ok(Message::Binary(bytes))) = message else {
            continue;
        };
        let frame = RelayMessageFrame::decode_valid(&bytes).unwrap();
        match frame.body {
            Some(Body::Reset(_)) => panic!("the executor reset the stream"),
            Some(Body::Data(d)) => {
                for message in channel.open(d.seq, d.payload).unwrap() {
                    if message.first() == Some(&b'{') {
                        let value: Value = serde_json::from_slice(&message).unwrap();
                        if value["id"] == 3 {
                            assert!(value.get("error").is_none(), "{value}");
                            answered = true;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(std::fs::read(&target).unwrap(), data);
    let _ = sender.await;
}
