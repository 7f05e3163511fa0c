//! `--listen ws://IP:PORT`: the reference's conventions (readyz, Origin
//! refused, one message per WebSocket message), the connection token, and
//! sessions that survive a cut TCP connection.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    CuttableProxy, NUMBERED, assert_numbered, bin, eventually, pid_gone, spawn_listening, unb64,
    ws_lines,
};

struct WsServer {
    child: Child,
    url: String,
}

impl WsServer {
    fn start(args: &[&str]) -> WsServer {
        let (child, url) = spawn_listening(&[&["--listen", "ws://127.0.0.1:0"], args].concat());
        assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
        WsServer { child, url }
    }

    /// The status line of a plain HTTP request with `headers`.
    fn http(&self, path: &str, headers: &str) -> String {
        let address = self.url.trim_start_matches("ws://");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\n{headers}\r\n"
        )
        .unwrap();
        // The status line only: an upgraded connection stays open.
        let mut status = String::new();
        let _ = BufReader::new(stream).read_line(&mut status);
        status.trim_end().to_string()
    }
}

impl Drop for WsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

#[test]
fn readyz_origin_and_unknown_paths() {
    let server = WsServer::start(&[]);
    assert_eq!(server.http("/readyz", ""), "HTTP/1.1 200 OK");
    assert_eq!(
        server.http("/", &format!("{UPGRADE}Origin: https://example.com\r\n")),
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(
        server.http("/readyz", "Origin: https://example.com\r\n"),
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(server.http("/other", UPGRADE), "HTTP/1.1 404 Not Found");
    assert_eq!(
        server.http("/", UPGRADE),
        "HTTP/1.1 101 Switching Protocols"
    );
    // A plain GET / (a browser, curl) gets an answer that says what this
    // is, not a dropped connection.
    assert_eq!(server.http("/", ""), "HTTP/1.1 426 Upgrade Required");
    let address = server.url.trim_start_matches("ws://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET / HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut whole = String::new();
    std::io::Read::read_to_string(&mut stream, &mut whole).unwrap();
    assert!(
        whole.to_ascii_lowercase().contains("upgrade: websocket"),
        "{whole}"
    );
    assert!(whole.contains("JSON-RPC 2.0 over WebSocket"), "{whole}");
}

#[test]
fn a_connection_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cr3t\n").unwrap();
    let server = WsServer::start(&["--connection-token-file", token.to_str().unwrap()]);
    assert_eq!(server.http("/", UPGRADE), "HTTP/1.1 401 Unauthorized");
    assert_eq!(
        server.http("/", &format!("{UPGRADE}Authorization: Bearer wrong\r\n")),
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        server.http("/?token=wrong", UPGRADE),
        "HTTP/1.1 401 Unauthorized"
    );
    assert_eq!(
        server.http("/", &format!("{UPGRADE}Authorization: Bearer s3cr3t\r\n")),
        "HTTP/1.1 101 Switching Protocols"
    );
    assert_eq!(
        server.http("/?token=s3cr3t", UPGRADE),
        "HTTP/1.1 101 Switching Protocols"
    );
    // And a real conversation with the token.
    let (mut writer, lines) = ws_lines(&server.url, Some(("authorization", "Bearer s3cr3t")));
    writeln!(
        writer,
        "{}",
        json!({"id": 1, "method": "initialize", "params": {"clientName": "it"}})
    )
    .unwrap();
    let answer: Value =
        serde_json::from_str(&lines.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
    assert!(answer["result"]["sessionId"].is_string(), "{answer}");
}

/// A token with characters a URL escapes is compared percent-decoded.
#[test]
fn a_query_token_is_percent_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a/b=c+d e\n").unwrap();
    let server = WsServer::start(&["--connection-token-file", token.to_str().unwrap()]);
    for accepted in [
        "/?token=a%2Fb%3Dc%2Bd%20e",
        "/?x=1&token=a%2fb%3dc%2Bd+e",
        "/?token=a/b=c+d%20e",
    ] {
        assert_eq!(
            server.http(accepted, UPGRADE),
            "HTTP/1.1 101 Switching Protocols",
            "{accepted}"
        );
    }
    for refused in [
        "/?token=a%2Fb%3Dc%2Bd",
        "/?token=a%2Fb%3Dc%2Bd%20e%00",
        "/?token=%61",
    ] {
        assert_eq!(
            server.http(refused, UPGRADE),
            "HTTP/1.1 401 Unauthorized",
            "{refused}"
        );
    }
}

#[test]
fn a_non_loopback_address_needs_a_token_or_insecure_listen() {
    let refused = Command::new(bin())
        .args(["--listen", "ws://0.0.0.0:0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("connection token"));
    let mut command = Command::new(bin());
    command
        .args(["--listen", "ws://0.0.0.0:0", "--insecure-listen"])
        .stderr(Stdio::null());
    let (mut allowed, first) = crate::support::listening(command);
    assert!(first.starts_with("ws://0.0.0.0:"), "{first}");
    let _ = allowed.kill();
    let _ = allowed.wait();
}

/// A request over a [`ws_lines`] connection; notifications are skipped.
fn request(
    writer: &mut impl Write,
    lines: &std::sync::mpsc::Receiver<String>,
    id: i64,
    method: &str,
    params: Value,
) -> Value {
    writeln!(
        writer,
        "{}",
        json!({"id": id, "method": method, "params": params})
    )
    .unwrap();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("an answer");
        let message: Value = serde_json::from_str(&line).unwrap();
        if message["id"] == id {
            return message;
        }
    }
}

/// A new ws connection to `url` that has sent `initialize` (resuming
/// `resume` when given) and, when that succeeded, `initialized`: its ends
/// and the answer to `initialize`.
fn connect(
    url: &str,
    resume: Option<&str>,
) -> (
    crate::support::WsWriter,
    std::sync::mpsc::Receiver<String>,
    Value,
) {
    let (mut writer, lines) = ws_lines(url, None);
    let mut params = json!({"clientName": "it"});
    if let Some(session) = resume {
        params["resumeSessionId"] = json!(session);
    }
    let answer = request(&mut writer, &lines, 1, "initialize", params);
    if answer.get("result").is_some() {
        writeln!(writer, "{}", json!({"method": "initialized"})).unwrap();
    }
    (writer, lines, answer)
}

/// Resume `session` from a new connection: the answer to its initialize.
fn try_resume(url: &str, session: &str) -> Value {
    connect(url, Some(session)).2
}

#[test]
fn a_cut_tcp_connection_resumes_with_every_line_once() {
    let server = WsServer::start(&[]);
    let (mut writer, lines, answer) = connect(&server.url, None);
    let session = answer["result"]["sessionId"].as_str().unwrap().to_string();
    request(
        &mut writer,
        &lines,
        2,
        "process/start",
        json!({"processId": "n", "cwd": "/tmp",
               "argv": ["sh", "-c", NUMBERED]}),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(writer); // the TCP connection is cut, no close frame
    drop(lines);
    std::thread::sleep(Duration::from_secs(1));
    let (mut writer, lines, answer) = connect(&server.url, Some(&session));
    assert_eq!(answer["result"]["sessionId"], session.as_str(), "{answer}");
    let list = request(&mut writer, &lines, 2, "process/list", json!({}));
    assert_eq!(list["result"]["processes"][0]["processId"], "n");
    let (mut after, mut out, mut id) = (0, Vec::new(), 10);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline);
        id += 1;
        let r = request(
            &mut writer,
            &lines,
            id,
            "process/read",
            json!({"processId": "n", "afterSeq": after, "waitMs": 1000}),
        );
        let r = &r["result"];
        for chunk in r["chunks"].as_array().unwrap() {
            out.extend(unb64(&chunk["chunk"]));
        }
        after = r["nextSeq"].as_u64().unwrap() - 1;
        if r["closed"] == true {
            break;
        }
    }
    assert_numbered(&out);
}

#[test]
fn a_peer_that_answers_no_ping_is_dropped_and_one_that_does_is_kept() {
    use tokio_tungstenite::tungstenite::{self, Message};
    let server = WsServer::start(&["--ws-ping-interval-ms", "200"]);

    // A peer that answers pings (tungstenite answers them as it reads).
    let (mut writer, lines, answer) = connect(&server.url, None);
    let kept = answer["result"]["sessionId"].as_str().unwrap().to_string();

    // A peer that goes silent after initialize: it never reads again, so
    // never answers a ping, but its TCP connection stays open.
    let address = server.url.trim_start_matches("ws://").to_string();
    let stream = std::net::TcpStream::connect(&address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut silent, _) = tungstenite::client::client(server.url.as_str(), stream).unwrap();
    let init = json!({"id": 1, "method": "initialize", "params": {"clientName": "it"}});
    silent.send(Message::Text(init.to_string().into())).unwrap();
    let dropped = loop {
        if let Message::Text(text) = silent.read().unwrap() {
            let answer: Value = serde_json::from_str(&text).unwrap();
            break answer["result"]["sessionId"].as_str().unwrap().to_string();
        }
    };

    // Many intervals later, the silent peer's session is free to resume...
    std::thread::sleep(Duration::from_millis(1500));
    let answer = try_resume(&server.url, &dropped);
    assert_eq!(answer["result"]["sessionId"], dropped.as_str(), "{answer}");
    // ...while the answering peer still holds its own.
    let answer = try_resume(&server.url, &kept);
    assert_eq!(answer["error"]["code"], -32010, "{answer}");
    let list = request(&mut writer, &lines, 2, "process/list", json!({}));
    assert!(list["result"]["processes"].is_array(), "{list}");
    drop(silent);
}

#[tokio::test]
async fn the_client_over_ws_answers_pings_and_resumes_after_a_cut() {
    use exec_server::client::{Client, ServerCommand};
    let server = WsServer::start(&["--ws-ping-interval-ms", "200"]);
    let proxy = CuttableProxy::start(server.url.trim_start_matches("ws://"));
    let command = ServerCommand::parse(&format!("ws://{}", proxy.address)).unwrap();
    assert!(command.resumable());
    let client = Client::new(command);

    // Many ping intervals with nothing else on the wire: the client answers
    // them, so its session stays attached here (-32010 to anyone else).
    let session = client.session_id().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let url = server.url.clone();
    let other = tokio::task::spawn_blocking(move || try_resume(&url, &session))
        .await
        .unwrap();
    assert_eq!(other["error"]["code"], -32010, "{other}");

    let mut p = client
        .start(crate::support::numbered_exit_7())
        .await
        .unwrap();
    let cutter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let cut = proxy.cut();
        (cut, proxy)
    });
    let mut out = Vec::new();
    let status = p
        .wait_with_output(|_, data| out.extend_from_slice(data))
        .await
        .unwrap();
    let (cut, _proxy) = cutter.await.unwrap();
    assert_eq!(cut, 1, "one connection was cut");
    assert_eq!(status.code, 7);
    assert_numbered(&out);
    client.shutdown().await;
}

#[tokio::test]
async fn the_client_over_ws_notices_a_half_open_connection_and_resumes() {
    use exec_server::client::{Client, ServerCommand};
    let server = WsServer::start(&["--ws-ping-interval-ms", "200"]);
    let proxy = CuttableProxy::start(server.url.trim_start_matches("ws://"));
    let command = ServerCommand::parse(&format!("ws://{}", proxy.address))
        .unwrap()
        .keepalive(Duration::from_millis(200));
    let client = Client::new(command);
    let mut p = client
        .start(crate::support::numbered_exit_7())
        .await
        .unwrap();
    // The connection dies silently mid-stream; neither end hears a close,
    // so only the client's own pings can tell it (a new connection works).
    let freezer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        (proxy.freeze(), proxy)
    });
    let mut out = Vec::new();
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        p.wait_with_output(|_, data| out.extend_from_slice(data)),
    )
    .await
    .expect("the client noticed the dead connection")
    .unwrap();
    let (frozen, _proxy) = freezer.await.unwrap();
    assert_eq!(frozen, 1, "one connection was frozen");
    assert_eq!(status.code, 7);
    assert_numbered(&out);
    client.shutdown().await;
}

#[test]
fn a_session_left_by_a_cut_ws_connection_expires_with_its_descendants() {
    let server = WsServer::start(&["--detached-session-ttl-ms", "300"]);
    let (mut writer, lines, answer) = connect(&server.url, None);
    let session = answer["result"]["sessionId"].as_str().unwrap().to_string();
    request(
        &mut writer,
        &lines,
        2,
        "process/start",
        json!({"processId": "d", "cwd": "/tmp", "env": {"PATH": "/usr/bin:/bin"},
               "argv": ["sh", "-c", "setsid sleep 1000 & echo $!; sleep 1000"]}),
    );
    let read = request(
        &mut writer,
        &lines,
        3,
        "process/read",
        json!({"processId": "d", "afterSeq": 0, "waitMs": 2000}),
    );
    let daemon: i32 = String::from_utf8(unb64(&read["result"]["chunks"][0]["chunk"]))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let list = request(&mut writer, &lines, 4, "process/list", json!({}));
    let leader = list["result"]["processes"][0]["pid"].as_i64().unwrap() as i32;
    drop(writer); // the TCP connection is cut, no close frame
    drop(lines);
    assert!(
        eventually(Duration::from_secs(5), || pid_gone(daemon)
            && pid_gone(leader)),
        "the expired session's processes still run"
    );
    let late = try_resume(&server.url, &session);
    assert_eq!(late["error"]["code"], -32600, "{late}");
}

/// The loss test of issue 20 for WebSocket: the TCP connection cut (no
/// close frame) in the middle of a 3,000,000-line burst, 20 times at 20
/// places; every line arrives once, in order, with the exit code.
#[test]
fn a_ws_connection_cut_in_a_burst_loses_nothing_20_of_20() {
    let server = WsServer::start(&[]);
    let proxy = CuttableProxy::start(server.url.trim_start_matches("ws://"));
    let via = format!("ws://{}", proxy.address);
    for i in 0..20 {
        crate::support::burst_survives(&via, &[], (i + 1) * 1_000_000, |_| {
            assert!(proxy.cut() >= 1, "no connection to cut");
        });
    }
}
