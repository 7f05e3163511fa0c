//! JSON-RPC 2.0 envelope: what one incoming line means, and how an outgoing
//! response or notification is written as one line.
//!
//! The server is lenient in what it accepts (the `jsonrpc` member may be
//! missing, as in the Codex dialect) and strict in what it sends (always
//! `"jsonrpc":"2.0"`, compact JSON, one message per line).

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Error;

/// A request id: an integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum RequestId {
    Number(serde_json::Number),
    String(String),
}

/// A call that wants a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: RequestId,
    pub method: String,
    pub params: Value,
}

/// A call that wants no response.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub method: String,
    pub params: Value,
}

/// One valid incoming message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request(Request),
    Notification(Notification),
    /// A response from the client. The server sends no requests, so these
    /// are logged and dropped.
    Response,
}

/// A response to send: a result or an error, never both.
#[derive(Debug)]
pub struct Response {
    pub id: Option<RequestId>,
    pub outcome: Result<Value, Error>,
}

/// What one incoming line holds.
#[derive(Debug)]
pub enum Incoming {
    /// A single message, or the error response it earned.
    Single(Result<Message, Response>),
    /// A non-empty batch (JSON-RPC 2.0 section 6).
    Batch(Vec<Result<Message, Response>>),
}

impl Response {
    pub fn ok(id: RequestId, result: Value) -> Self {
        Response {
            id: Some(id),
            outcome: Ok(result),
        }
    }

    pub fn err(id: Option<RequestId>, error: Error) -> Self {
        Response {
            id,
            outcome: Err(error),
        }
    }

    /// The response as a JSON value (used inside batch arrays).
    pub fn to_value(&self) -> Value {
        let mut map = Map::with_capacity(3);
        map.insert("jsonrpc".into(), Value::from("2.0"));
        map.insert(
            "id".into(),
            match &self.id {
                Some(id) => serde_json::to_value(id).unwrap_or(Value::Null),
                None => Value::Null,
            },
        );
        match &self.outcome {
            Ok(result) => map.insert("result".into(), result.clone()),
            Err(error) => map.insert("error".into(), error.to_json()),
        };
        Value::Object(map)
    }

    /// The response as one line, newline included; the same members as
    /// [`Response::to_value`], written without copying the result first
    /// (a `process/read` result can be megabytes).
    pub fn to_line(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'a> {
            jsonrpc: &'static str,
            id: Option<&'a RequestId>,
            #[serde(skip_serializing_if = "Option::is_none")]
            result: Option<&'a Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<Value>,
        }
        let (result, error) = match &self.outcome {
            Ok(result) => (Some(result), None),
            Err(error) => (None, Some(error.to_json())),
        };
        let mut line = serde_json::to_vec(&Out {
            jsonrpc: "2.0",
            id: self.id.as_ref(),
            result,
            error,
        })
        .unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// One compact JSON line, newline included.
pub fn value_line(value: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

/// A server-to-client notification as one line, newline included.
pub fn notification_line(method: &str, params: &impl Serialize) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a, P> {
        jsonrpc: &'static str,
        method: &'a str,
        params: &'a P,
    }
    let mut line = serde_json::to_vec(&Out {
        jsonrpc: "2.0",
        method,
        params,
    })
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// Interpret one incoming line (without its newline).
pub fn parse(line: &[u8]) -> Incoming {
    let value: Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(err) => {
            return Incoming::Single(Err(Response::err(None, Error::Parse(err.to_string()))));
        }
    };
    match value {
        Value::Array(items) if items.is_empty() => Incoming::Single(Err(Response::err(
            None,
            Error::InvalidRequest("empty batch".into()),
        ))),
        Value::Array(items) => Incoming::Batch(items.into_iter().map(classify).collect()),
        other => Incoming::Single(classify(other)),
    }
}

/// Decide what kind of message one JSON value is.
fn classify(value: Value) -> Result<Message, Response> {
    let invalid = |id, msg: &str| Response::err(id, Error::InvalidRequest(msg.to_string()));
    let Value::Object(mut map) = value else {
        return Err(invalid(None, "a message must be a json object"));
    };
    let id = match map.remove("id") {
        None => None,
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(RequestId::Number(n)),
        Some(Value::String(s)) => Some(RequestId::String(s)),
        Some(other) => {
            return Err(invalid(
                None,
                &format!("request id must be an integer or a string, not {other}"),
            ));
        }
    };
    if let Some(version) = map.get("jsonrpc") {
        if version != "2.0" {
            return Err(invalid(
                id,
                &format!("unsupported jsonrpc version {version}"),
            ));
        }
    }
    match map.remove("method") {
        Some(Value::String(method)) => {
            let params = map.remove("params").unwrap_or(Value::Null);
            Ok(match id {
                Some(id) => Message::Request(Request { id, method, params }),
                None => Message::Notification(Notification { method, params }),
            })
        }
        Some(other) => Err(invalid(
            id,
            &format!("method must be a string, not {other}"),
        )),
        None if map.contains_key("result") || map.contains_key("error") => Ok(Message::Response),
        None => Err(invalid(id, "a request must have a method")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn single(line: &str) -> Result<Message, Response> {
        match parse(line.as_bytes()) {
            Incoming::Single(msg) => msg,
            Incoming::Batch(_) => panic!("expected a single message"),
        }
    }

    #[test]
    fn request_without_jsonrpc_member_is_accepted() {
        let msg = single(r#"{"id":1,"method":"initialize","params":{"clientName":"x"}}"#);
        let Ok(Message::Request(req)) = msg else {
            panic!("expected a request");
        };
        assert_eq!(req.method, "initialize");
        assert_eq!(req.params, json!({"clientName": "x"}));
    }

    #[test]
    fn wrong_jsonrpc_version_is_invalid_request_with_id() {
        let Err(resp) = single(r#"{"jsonrpc":"1.0","id":"a","method":"x"}"#) else {
            panic!("expected an error");
        };
        assert_eq!(
            String::from_utf8(resp.to_line()).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"error\":{\"code\":-32600,\
             \"message\":\"unsupported jsonrpc version \\\"1.0\\\"\",\
             \"data\":{\"kind\":\"invalidRequest\"}}}\n"
        );
    }

    #[test]
    fn not_json_is_parse_error_with_null_id() {
        let Err(resp) = single("{oops") else {
            panic!("expected an error");
        };
        let value = resp.to_value();
        assert_eq!(value["id"], Value::Null);
        assert_eq!(value["error"]["code"], -32700);
        assert_eq!(value["error"]["data"]["kind"], "parseError");
    }

    #[test]
    fn fractional_id_is_invalid_request() {
        let Err(resp) = single(r#"{"id":1.5,"method":"x"}"#) else {
            panic!("expected an error");
        };
        assert_eq!(resp.to_value()["error"]["code"], -32600);
    }

    #[test]
    fn empty_batch_is_one_invalid_request() {
        let Incoming::Single(Err(resp)) = parse(b"[]") else {
            panic!("expected one error");
        };
        assert_eq!(resp.to_value()["error"]["code"], -32600);
    }

    #[test]
    fn notification_line_is_compact_with_newline() {
        let line = notification_line("process/closed", &json!({"processId": "p", "seq": 3}));
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"jsonrpc\":\"2.0\",\"method\":\"process/closed\",\"params\":{\"processId\":\"p\",\"seq\":3}}\n"
        );
    }

    #[test]
    fn a_response_line_is_its_value_on_one_line() {
        let id = RequestId::Number(7.into());
        for response in [
            Response::ok(id.clone(), serde_json::json!({"a": [1, "x"]})),
            Response::err(Some(id), Error::MethodNotFound("nope".into())),
            Response::err(None, Error::Parse("bad".into())),
        ] {
            assert_eq!(response.to_line(), value_line(&response.to_value()));
        }
    }
}
