//! Binary frames: negotiated in `initialize`, interleaved with JSON lines,
//! never sent to a client that did not ask, and the client library's use
//! of them (and its fallback). The frames are read here by a parser of the
//! documented layout written for the test, not the library's.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{bin, unb64};

/// One message from the server.
#[derive(Debug)]
enum Msg {
    Json(Value),
    /// (process id, seq, stream code, data)
    Frame(String, u64, u8, Vec<u8>),
    /// A response frame: its JSON and the bytes of `result.chunk`.
    Result(Value, Vec<u8>),
}

/// A raw stdio server and a thread splitting its output by the protocol's
/// rule: a NUL byte starts a frame, anything else a line.
struct Raw {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    rx: Receiver<Msg>,
}

impl Raw {
    fn start(args: &[&str]) -> Raw {
        let mut child = Command::new(bin())
            .arg("--stdio")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            loop {
                let first = match out.fill_buf() {
                    Ok([]) | Err(_) => return,
                    Ok(buf) => buf[0],
                };
                let msg = if first == 0 {
                    let mut head = [0u8; 17];
                    out.read_exact(&mut head).unwrap();
                    assert!(matches!(head[1], 1 | 2), "frame kind {}", head[1]);
                    let pid_len = u16::from_le_bytes([head[3], head[4]]) as usize;
                    let seq = u64::from_le_bytes(head[5..13].try_into().unwrap());
                    let len = u32::from_le_bytes(head[13..17].try_into().unwrap()) as usize;
                    let mut pid = vec![0u8; pid_len];
                    out.read_exact(&mut pid).unwrap();
                    let mut data = vec![0u8; len];
                    out.read_exact(&mut data).unwrap();
                    if head[1] == 2 {
                        Msg::Result(serde_json::from_slice(&pid).unwrap(), data)
                    } else {
                        Msg::Frame(String::from_utf8(pid).unwrap(), seq, head[2], data)
                    }
                } else {
                    let mut line = String::new();
                    out.read_line(&mut line).unwrap();
                    Msg::Json(
                        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")),
                    )
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        Raw { child, stdin, rx }
    }

    fn send(&mut self, v: Value) {
        writeln!(self.stdin, "{v}").unwrap();
    }

    fn next(&self) -> Msg {
        self.rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a message from the server")
    }

    /// The response to `id`; frames and notifications on the way are kept.
    fn response(&self, id: i64, kept: &mut Vec<Msg>) -> Value {
        loop {
            match self.next() {
                Msg::Json(v) if v["id"] == id => return v,
                other => kept.push(other),
            }
        }
    }

    fn handshake(&mut self, capabilities: Option<Value>) -> Value {
        let mut params = json!({"clientName": "frames-test"});
        if let Some(c) = capabilities {
            params["capabilities"] = c;
        }
        self.send(json!({"id": 1, "method": "initialize", "params": params}));
        let r = self.response(1, &mut Vec::new());
        self.send(json!({"method": "initialized"}));
        r["result"].clone()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ASK: &str = r#"{"binaryFrames": {"version": 1}}"#;

/// `seq 1 N` as the process prints it.
fn numbers(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn granted_frames_carry_all_output_between_json_lines_under_load() {
    let mut s = Raw::start(&[]);
    let result = s.handshake(Some(serde_json::from_str(ASK).unwrap()));
    assert_eq!(
        result["capabilities"],
        json!({"binaryFrames": {"version": 1}}),
        "{result}"
    );
    s.send(json!({"id": 2, "method": "process/start", "params": {"processId": "p", "argv": ["seq", "1", "300000"], "cwd": "/tmp"}}));
    // Requests keep flowing while the output streams.
    for id in 100..300 {
        s.send(json!({"id": id, "method": "environment/status"}));
    }
    let (mut data, mut seqs, mut answered, mut closed) = (Vec::new(), Vec::new(), 0, None);
    let mut by_seq = std::collections::HashMap::new();
    while closed.is_none() || answered < 201 {
        match s.next() {
            Msg::Frame(pid, seq, stream, bytes) => {
                assert_eq!((pid.as_str(), stream), ("p", 0));
                seqs.push(seq);
                data.extend_from_slice(&bytes);
                by_seq.insert(seq, bytes);
            }
            Msg::Json(v) if v["method"] == "process/output" => {
                panic!("JSON output to a framed client: {v}")
            }
            Msg::Json(v) if v["method"] == "process/closed" => closed = v["params"]["seq"].as_u64(),
            Msg::Json(v) if v.get("id").is_some() => {
                assert!(v.get("error").is_none(), "{v}");
                answered += 1;
            }
            Msg::Json(_) | Msg::Result(..) => {}
        }
    }
    assert!(
        data == numbers(300000),
        "output differs ({} bytes)",
        data.len()
    );
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "seqs from 1 without gaps");
    // Retention and process/read are unchanged: base64 JSON, the same
    // chunk under the same seq.
    s.send(json!({"id": 3, "method": "process/read", "params": {"processId": "p", "afterSeq": 0, "maxBytes": 100}}));
    let read = s.response(3, &mut Vec::new());
    let first = &read["result"]["chunks"][0];
    let seq = first["seq"].as_u64().expect("a retained chunk");
    assert!(
        by_seq[&seq] == unb64(&first["chunk"]),
        "chunk {seq} differs"
    );
}

#[test]
fn no_frame_reaches_a_client_that_did_not_ask_or_a_server_that_does_not_offer_them() {
    for (args, ask) in [(&[][..], false), (&["--no-binary-frames"][..], true)] {
        let mut s = Raw::start(args);
        let result = s.handshake(ask.then(|| serde_json::from_str(ASK).unwrap()));
        if ask {
            assert_eq!(result["capabilities"], json!({}), "not granted: {result}");
        } else {
            assert!(
                result.get("capabilities").is_none(),
                "unchanged for old clients: {result}"
            );
        }
        s.send(json!({"id": 2, "method": "process/start", "params": {"processId": "p", "argv": ["seq", "1", "20000"], "cwd": "/tmp"}}));
        let mut data = Vec::new();
        loop {
            match s.next() {
                Msg::Frame(..) => panic!("a frame for {args:?}"),
                Msg::Json(v) if v["method"] == "process/output" => {
                    data.extend(unb64(&v["params"]["chunk"]))
                }
                Msg::Json(v) if v["method"] == "process/closed" => break,
                Msg::Json(_) => {}
                Msg::Result(..) => panic!("a response frame for {args:?}"),
            }
        }
        assert!(data == numbers(20000));
    }
}

#[test]
fn read_blocks_come_as_response_frames_to_a_framed_client_and_as_base64_to_others() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    for framed in [true, false] {
        let mut s = Raw::start(&[]);
        s.handshake(framed.then(|| serde_json::from_str(ASK).unwrap()));
        s.send(json!({"id": 2, "method": "fs/open", "params": {"handleId": "h", "path": file.to_str().unwrap()}}));
        assert!(s.response(2, &mut Vec::new()).get("error").is_none());
        s.send(json!({"id": 3, "method": "fs/readBlock", "params": {"handleId": "h", "offset": 1000, "len": 200000}}));
        let (result, data) = match s.next() {
            Msg::Result(v, data) => {
                assert!(framed, "a frame for a client that did not ask");
                assert_eq!(
                    (v["id"].as_i64(), &v["result"]["chunk"]),
                    (Some(3), &Value::Null),
                    "{v}"
                );
                (v["result"].clone(), data)
            }
            Msg::Json(v) => {
                assert!(!framed, "JSON to a framed client: {v}");
                let data = unb64(&v["result"]["chunk"]);
                (v["result"].clone(), data)
            }
            other => panic!("{other:?}"),
        };
        assert!(data == content[1000..201000], "block differs");
        assert_eq!(result["eof"], false);
        // Errors stay JSON.
        s.send(json!({"id": 4, "method": "fs/readBlock", "params": {"handleId": "nope", "offset": 0, "len": 1}}));
        match s.next() {
            Msg::Json(v) => assert!(v["error"]["code"].is_i64(), "{v}"),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn the_client_reads_blocks_with_and_without_frames() {
    use exec_server::client::{Client, ServerCommand};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    for command in [
        ServerCommand::new(bin()).arg("--stdio"),
        ServerCommand::new(bin()).arg("--stdio").json_only(),
    ] {
        let client = Client::new(command);
        client.open("h", &file).await.unwrap();
        let (head, eof) = client.read_block("h", 0, 60_000).await.unwrap();
        let (tail, last) = client.read_block("h", 60_000, 60_000).await.unwrap();
        assert!(!eof && last);
        assert!([head, tail].concat() == content);
        client.shutdown().await;
    }
}

#[tokio::test]
async fn the_client_uses_frames_when_offered_and_falls_back_to_json() {
    use exec_server::client::{Client, ServerCommand, StartOptions};
    for (extra, framed) in [(None, true), (Some("--no-binary-frames"), false)] {
        let mut command = ServerCommand::new(bin()).arg("--stdio");
        if let Some(flag) = extra {
            command = command.arg(flag);
        }
        let client = Client::new(command);
        let mut p = client
            .start(StartOptions::new("p", ["seq", "1", "200000"]).cwd("/tmp"))
            .await
            .unwrap();
        let mut out = Vec::new();
        let status = p
            .wait_with_output(|_, d| out.extend_from_slice(d))
            .await
            .unwrap();
        assert_eq!(status.code, 0);
        assert!(out == numbers(200000));
        assert_eq!(client.binary_frames(), framed, "{extra:?}");
        client.shutdown().await;
    }
    // Asked not to, it does not.
    let client = Client::new(ServerCommand::new(bin()).arg("--stdio").json_only());
    client.session_id().await.unwrap();
    assert!(!client.binary_frames());
    client.shutdown().await;
}
