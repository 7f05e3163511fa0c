//! Every kind of bad input gets its specified error, and the server answers
//! a valid request right after.

use serde_json::{Value, json};

use crate::support::Server;

/// Send `line` and check the error it earns, then check the server still serves.
fn rejected(s: &mut Server, line: &str, code: i64, kind: &str) -> Value {
    s.send_raw(line);
    let msg = s.recv_line(crate::support::TIMEOUT).expect("an answer");
    assert_eq!(msg["error"]["code"], code, "{line} -> {msg}");
    assert_eq!(msg["error"]["data"]["kind"], kind, "{line} -> {msg}");
    let status = s.request("environment/status", json!({}));
    assert!(
        status["result"]["status"] == "ready"
            || status["error"]["data"]["kind"] == "notInitialized",
        "server stopped serving after {line}: {status}"
    );
    msg
}

fn start_line(params: Value) -> String {
    json!({"id": 1, "method": "process/start", "params": params}).to_string()
}

#[test]
fn not_json() {
    let msg = rejected(&mut Server::started(&[]), "{nope", -32700, "parseError");
    assert_eq!(msg["id"], Value::Null);
}

#[test]
fn json_but_not_a_request() {
    let msg = rejected(
        &mut Server::started(&[]),
        r#"{"id": 4, "params": {}}"#,
        -32600,
        "invalidRequest",
    );
    assert_eq!(msg["id"], 4);
    rejected(
        &mut Server::started(&[]),
        "\"just a string\"",
        -32600,
        "invalidRequest",
    );
}

#[test]
fn wrong_param_types() {
    let line = start_line(json!({"processId": "p", "argv": [1, 2], "cwd": "/tmp"}));
    rejected(&mut Server::started(&[]), &line, -32602, "invalidParams");
}

#[test]
fn unknown_method() {
    rejected(
        &mut Server::started(&[]),
        r#"{"id": 1, "method": "fs/teleport"}"#,
        -32601,
        "methodNotFound",
    );
}

#[test]
fn request_before_initialize() {
    let line = start_line(json!({"processId": "p", "argv": ["true"], "cwd": "/tmp"}));
    let msg = rejected(&mut Server::start(&[]), &line, -32600, "notInitialized");
    assert_eq!(
        msg["error"]["message"],
        "client must call initialize before using exec methods"
    );
}

#[test]
fn request_before_initialized() {
    let mut s = Server::start(&[]);
    s.call("initialize", json!({"clientName": "t"}));
    let msg = rejected(
        &mut s,
        r#"{"id": 1, "method": "process/list"}"#,
        -32600,
        "notInitialized",
    );
    assert_eq!(
        msg["error"]["message"],
        "client must send initialized before using exec methods"
    );
}

#[test]
fn second_initialize() {
    rejected(
        &mut Server::started(&[]),
        r#"{"id": 1, "method": "initialize", "params": {"clientName": "x"}}"#,
        -32600,
        "alreadyInitialized",
    );
}

#[test]
fn empty_argv() {
    let line = start_line(json!({"processId": "p", "argv": [], "cwd": "/tmp"}));
    let msg = rejected(&mut Server::started(&[]), &line, -32602, "invalidParams");
    assert_eq!(msg["error"]["message"], "argv must not be empty");
}

#[test]
fn relative_cwd() {
    let line = start_line(json!({"processId": "p", "argv": ["true"], "cwd": "rel/dir"}));
    rejected(&mut Server::started(&[]), &line, -32602, "invalidParams");
}

#[test]
fn missing_cwd() {
    let line =
        start_line(json!({"processId": "p", "argv": ["true"], "cwd": "/definitely/not/here"}));
    let msg = rejected(&mut Server::started(&[]), &line, -32603, "spawnFailed");
    assert_eq!(msg["error"]["data"]["errno"], libc::ENOENT);
}

#[test]
fn missing_program() {
    let line =
        start_line(json!({"processId": "p", "argv": ["no-such-program-xyz"], "cwd": "/tmp"}));
    let msg = rejected(&mut Server::started(&[]), &line, -32603, "spawnFailed");
    assert_eq!(msg["error"]["data"]["errno"], libc::ENOENT);
}

#[test]
fn invalid_base64() {
    let mut s = Server::started(&[]);
    s.start_process("p", &["cat"], json!({"pipeStdin": true}));
    let line = json!({"id": 1, "method": "process/write", "params": {"processId": "p", "chunk": "%%%", "writeId": "a"}});
    rejected(&mut s, &line.to_string(), -32602, "invalidParams");
}

#[test]
fn empty_write_id() {
    let mut s = Server::started(&[]);
    s.start_process("p", &["cat"], json!({"pipeStdin": true}));
    let line = json!({"id": 1, "method": "process/write", "params": {"processId": "p", "chunk": "", "writeId": ""}});
    rejected(&mut s, &line.to_string(), -32602, "invalidParams");
}

#[test]
fn duplicate_process_id() {
    let mut s = Server::started(&[]);
    s.start_process("p", &["sleep", "30"], json!({}));
    let line = start_line(json!({"processId": "p", "argv": ["true"], "cwd": "/tmp"}));
    rejected(&mut s, &line, -32600, "processExists");
}

#[test]
fn unknown_process_id() {
    let line = r#"{"id": 1, "method": "process/read", "params": {"processId": "nope"}}"#;
    let msg = rejected(&mut Server::started(&[]), line, -32600, "unknownProcess");
    assert_eq!(msg["error"]["message"], "unknown process id nope");
}

#[test]
fn line_over_the_size_limit() {
    let mut s = Server::started(&["--max-message-bytes", "1000"]);
    let line = format!(
        r#"{{"id": 1, "method": "environment/status", "params": {{"pad": "{}"}}}}"#,
        "x".repeat(5000)
    );
    let msg = rejected(&mut s, &line, -32600, "messageTooLarge");
    assert_eq!(msg["id"], Value::Null);
}

#[test]
fn sandbox_that_cannot_be_enforced_is_refused() {
    let line = start_line(json!({
        "processId": "p", "argv": ["true"], "cwd": "/tmp",
        "sandbox": {"permissions": {"type": "managed", "network": "restricted",
            "file_system": {"type": "restricted", "entries": [
                {"path": {"type": "special", "value": {"kind": "root"}}, "access": "deny"},
                {"path": {"type": "path", "path": "/usr"}, "access": "read"},
            ]}}}
    }));
    let msg = rejected(
        &mut Server::started(&[]),
        &line,
        -32602,
        "sandboxUnavailable",
    );
    assert!(
        msg["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("sandbox intent cannot be enforced on this executor: ")
    );
}
