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

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestId::Number(n) => write!(f, "{n}"),
            RequestId::String(s) => write!(f, "{s:?}"),
        }
    }
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

/// The answer to a call, as the peer that made the call receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The call's id (`None` when the peer could not tell which call).
    pub id: Option<RequestId>,
    /// The result, or the error object (`code`, `message`, `data`).
    pub outcome: Result<Value, Value>,
}

/// One valid incoming message: the same parser serves both peers (the
/// server reads requests and notifications, the client replies and
/// notifications).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request(Request),
    Notification(Notification),
    /// An answer to a call.
    Reply(Reply),
}

impl Request {
    /// The request as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'a> {
            jsonrpc: &'static str,
            id: &'a RequestId,
            method: &'a str,
            params: &'a Value,
        }
        let mut line = serde_json::to_vec(&Out {
            jsonrpc: "2.0",
            id: &self.id,
            method: &self.method,
            params: &self.params,
        })
        .unwrap_or_default();
        line.push(b'\n');
        line
    }
}

impl Notification {
    /// The notification as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        notification_line(&self.method, &self.params)
    }
}

/// A response to send: a result or an error, never both.
#[derive(Debug)]
pub struct Response {
    pub id: Option<RequestId>,
    pub outcome: Result<Value, Error>,
    /// More of the result than `outcome` says (boxed: rarely there).
    pub payload: Option<Box<Payload>>,
}

/// The part of a result that is not a plain `Value`.
#[derive(Debug)]
pub enum Payload {
    /// The result already written as JSON text (then `outcome` is
    /// `Ok(Null)` and not sent): a `process/read` answer rendered straight
    /// from the retained chunks, without a `Value` in between.
    Rendered(Vec<u8>),
    /// Bytes that are the result's `chunk` (`fs/readBlock`): base64 in
    /// JSON, raw in a binary frame.
    Bytes(bytes::Bytes),
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
    #[cfg(test)]
    pub fn ok(id: RequestId, result: Value) -> Self {
        Response::new(Some(id), Ok(result))
    }

    pub fn err(id: Option<RequestId>, error: Error) -> Self {
        Response::new(id, Err(error))
    }

    pub fn new(id: Option<RequestId>, outcome: Result<Value, Error>) -> Self {
        Response {
            id,
            outcome,
            payload: None,
        }
    }

    /// A result whose `chunk` member is `bytes`.
    pub fn with_bytes(id: Option<RequestId>, result: Value, bytes: Vec<u8>) -> Self {
        Response {
            payload: Some(Box::new(Payload::Bytes(bytes.into()))),
            ..Response::new(id, Ok(result))
        }
    }

    /// The result with its bytes put in as base64 (the JSON form).
    fn result_value(&self) -> Option<Value> {
        let mut result = self.outcome.as_ref().ok()?.clone();
        if let Some(Payload::Bytes(bytes)) = self.payload.as_deref() {
            result["chunk"] = Value::String(base64_simd::STANDARD.encode_type(&bytes[..]));
        }
        Some(result)
    }

    /// A result already rendered as JSON text, or the error.
    pub fn rendered(id: Option<RequestId>, outcome: Result<Vec<u8>, Error>) -> Self {
        match outcome {
            Ok(json) => Response {
                payload: Some(Box::new(Payload::Rendered(json))),
                ..Response::new(id, Ok(Value::Null))
            },
            Err(error) => Response::err(id, error),
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
            Ok(_) if self.payload.is_some() => {
                let result = match self.payload.as_deref() {
                    Some(Payload::Rendered(text)) => serde_json::from_slice(text).ok(),
                    _ => self.result_value(),
                };
                map.insert("result".into(), result.unwrap_or(Value::Null))
            }
            Ok(result) => map.insert("result".into(), result.clone()),
            Err(error) => map.insert("error".into(), error.to_json()),
        };
        Value::Object(map)
    }

    /// The response as one line, newline included; the same members as
    /// [`Response::to_value`], written without copying the result first
    /// (a `process/read` result can be megabytes).
    pub fn to_line(&self) -> Vec<u8> {
        if let (Ok(_), Some(Payload::Rendered(result))) = (&self.outcome, self.payload.as_deref()) {
            let mut line = Vec::with_capacity(result.len() + 64);
            line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
            let _ = serde_json::to_writer(&mut line, &self.id);
            line.extend_from_slice(b",\"result\":");
            line.extend_from_slice(result);
            line.extend_from_slice(b"}\n");
            return line;
        }
        if let Some(Payload::Bytes(_)) = self.payload.as_deref() {
            return Response::new(
                self.id.clone(),
                Ok(self.result_value().unwrap_or(Value::Null)),
            )
            .to_line();
        }
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

/// What goes out to a peer, not yet encoded: the processes and the
/// connection say what happened; the transport's codec decides the bytes
/// ([`encode_line`] for newline-delimited transports).
#[derive(Debug)]
pub enum Outgoing {
    /// The answer to one request.
    Response(Response),
    /// The answers to one batch, as one message.
    Batch(Vec<Response>),
    /// A process wrote output (`process/output`).
    Output {
        process_id: std::sync::Arc<str>,
        seq: u64,
        stream: crate::protocol::Stream,
        /// Shared with the output log: not copied to be sent.
        chunk: bytes::Bytes,
    },
    /// A process exited (`process/exited`).
    Exited {
        process_id: std::sync::Arc<str>,
        seq: u64,
        exit_code: i32,
        sandbox_denied: bool,
        signal: Option<&'static str>,
        reason: crate::limits::Reason,
    },
    /// A process closed (`process/closed`).
    Closed {
        process_id: std::sync::Arc<str>,
        seq: u64,
    },
    /// Any other notification (`http/request/bodyDelta`,
    /// `network/policyDecision`).
    Notification { method: &'static str, params: Value },
    /// A call from the server to the client (`network/policyRequest`):
    /// ids are integers from 1 per connection.
    Request {
        id: u64,
        method: &'static str,
        params: Value,
    },
}

/// The line codec: `message` as one line of compact JSON, newline
/// included.
pub fn encode_line(message: &Outgoing) -> Vec<u8> {
    use crate::protocol::{ClosedNotification, ExitedNotification, method};
    match message {
        Outgoing::Response(response) => response.to_line(),
        Outgoing::Batch(responses) => value_line(&Value::Array(
            responses.iter().map(Response::to_value).collect(),
        )),
        Outgoing::Output {
            process_id,
            seq,
            stream,
            chunk,
        } => output_line(process_id, *seq, *stream, chunk),
        Outgoing::Exited {
            process_id,
            seq,
            exit_code,
            sandbox_denied,
            signal,
            reason,
        } => notification_line(
            method::PROCESS_EXITED,
            &ExitedNotification {
                process_id,
                seq: *seq,
                exit_code: *exit_code,
                sandbox_denied: *sandbox_denied,
                signal: *signal,
                reason: *reason,
            },
        ),
        Outgoing::Closed { process_id, seq } => notification_line(
            method::PROCESS_CLOSED,
            &ClosedNotification {
                process_id,
                seq: *seq,
            },
        ),
        Outgoing::Notification { method, params } => notification_line(method, params),
        Outgoing::Request { id, method, params } => Request {
            id: RequestId::Number((*id).into()),
            method: method.to_string(),
            params: params.clone(),
        }
        .to_line(),
    }
}

/// The codec's fast path: a `process/output` line, equal to what the
/// serializer writes for `protocol::OutputNotification`. Base64 needs no
/// JSON escaping, so the chunk is encoded (with SIMD) straight into the
/// line instead of going through the serializer's escaper byte by byte.
pub(crate) fn output_line(
    process_id: &str,
    seq: u64,
    stream: crate::protocol::Stream,
    data: &[u8],
) -> Vec<u8> {
    use std::io::Write;
    let mut line = Vec::with_capacity(data.len().div_ceil(3) * 4 + process_id.len() + 100);
    line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"");
    line.extend_from_slice(crate::protocol::method::PROCESS_OUTPUT.as_bytes());
    line.extend_from_slice(b"\",\"params\":{\"processId\":");
    // Writing into a Vec can't fail.
    let _ = serde_json::to_writer(&mut line, process_id);
    let _ = write!(
        line,
        ",\"seq\":{seq},\"stream\":\"{}\",\"chunk\":\"",
        stream.as_str()
    );
    base64_simd::STANDARD.encode_append(data, &mut line);
    line.extend_from_slice(b"\"}}\n");
    line
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
    let (value, mut duplicates) = match strict::parse(line) {
        Ok(parsed) => parsed,
        Err(err) => {
            return Incoming::Single(Err(Response::err(None, Error::Parse(err.to_string()))));
        }
    };
    match value {
        Value::Array(items) if items.is_empty() => Incoming::Single(Err(Response::err(
            None,
            Error::InvalidRequest("empty batch".into()),
        ))),
        Value::Array(items) => Incoming::Batch(
            items
                .into_iter()
                .zip(duplicates)
                .map(|(item, duplicate)| classify(item, duplicate))
                .collect(),
        ),
        other => Incoming::Single(classify(other, duplicates.pop().flatten())),
    }
}

/// Decide what kind of message one JSON value is. `duplicate`: a member
/// named twice in one object of this message, which is refused, so that
/// what a proxy or reviewer reads is what the server applies.
fn classify(value: Value, duplicate: Option<strict::Duplicate>) -> Result<Message, Response> {
    let invalid = |id, msg: &str| Response::err(id, Error::InvalidRequest(msg.to_string()));
    let Value::Object(mut map) = value else {
        return Err(invalid(None, "a message must be a json object"));
    };
    if let Some(duplicate) = duplicate {
        let id = match map.get("id") {
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
                Some(RequestId::Number(n.clone()))
            }
            Some(Value::String(s)) => Some(RequestId::String(s.clone())),
            _ => None,
        };
        let message = format!("duplicate member {}", duplicate.name);
        return Err(Response::err(
            id,
            if duplicate.in_params {
                Error::InvalidParams(message)
            } else {
                Error::InvalidRequest(message)
            },
        ));
    }
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
        None if map.contains_key("result") || map.contains_key("error") => {
            let outcome = match map.remove("error") {
                Some(error) => Err(error),
                None => Ok(map.remove("result").unwrap_or(Value::Null)),
            };
            Ok(Message::Reply(Reply { id, outcome }))
        }
        None => Err(invalid(id, "a request must have a method")),
    }
}

/// A JSON parser that builds the same `Value` as `serde_json`, and also
/// notes, per message, the first member named twice in one object (which
/// `serde_json` would silently resolve to the last one).
mod strict {
    use std::cell::RefCell;
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    /// A member named twice, and whether it was inside `params`.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Duplicate {
        pub name: String,
        pub in_params: bool,
    }

    /// The value, and for each message (one, or each element of a batch)
    /// its first duplicate member.
    pub fn parse(line: &[u8]) -> serde_json::Result<(Value, Vec<Option<Duplicate>>)> {
        let found = RefCell::new(Vec::new());
        let mut de = serde_json::Deserializer::from_slice(line);
        let value = Seed {
            found: &found,
            level: Level::Root,
        }
        .deserialize(&mut de)?;
        de.end()?;
        let mut found = found.into_inner();
        if !value.is_array() {
            // One message: whatever was found belongs to it.
            found = vec![found.into_iter().flatten().next()];
        }
        Ok((value, found))
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Level {
        /// The whole line: a message or a batch.
        Root,
        /// A batch's element, or the single message.
        Message,
        InParams,
        Other,
    }

    struct Seed<'a> {
        /// For a batch, one slot per element; otherwise slots as found.
        found: &'a RefCell<Vec<Option<Duplicate>>>,
        level: Level,
    }

    impl Seed<'_> {
        fn note(&self, name: &str, in_params: bool) {
            let mut found = self.found.borrow_mut();
            match found.last_mut() {
                Some(slot @ None) => {
                    *slot = Some(Duplicate {
                        name: name.to_string(),
                        in_params,
                    })
                }
                Some(Some(_)) => {}
                None => found.push(Some(Duplicate {
                    name: name.to_string(),
                    in_params,
                })),
            }
        }

        fn child(&self, level: Level) -> Seed<'_> {
            Seed {
                found: self.found,
                level,
            }
        }
    }

    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
            de.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_string()))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            loop {
                let level = match self.level {
                    Level::Root => {
                        self.found.borrow_mut().push(None);
                        Level::Message
                    }
                    Level::InParams => Level::InParams,
                    _ => Level::Other,
                };
                match seq.next_element_seed(self.child(level))? {
                    Some(item) => items.push(item),
                    None => {
                        if self.level == Level::Root {
                            self.found.borrow_mut().pop();
                        }
                        return Ok(Value::Array(items));
                    }
                }
            }
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
            let mut map = Map::new();
            while let Some(key) = access.next_key::<String>()? {
                let level = match self.level {
                    Level::Root | Level::Message if key == "params" => Level::InParams,
                    Level::InParams => Level::InParams,
                    _ => Level::Other,
                };
                let value = access.next_value_seed(self.child(level))?;
                if map.contains_key(&key) {
                    self.note(
                        &key,
                        level == Level::InParams && self.level == Level::InParams,
                    );
                }
                map.insert(key, value);
            }
            Ok(Value::Object(map))
        }
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
    fn a_member_named_twice_in_params_is_invalid_params_naming_it() {
        let Err(resp) = single(
            r#"{"id":3,"method":"process/start","params":{"sandbox":{"permissions":{"type":"managed"},"permissions":{"type":"disabled"}}}}"#,
        ) else {
            panic!("expected an error");
        };
        let value = resp.to_value();
        assert_eq!(value["id"], 3);
        assert_eq!(value["error"]["code"], -32602);
        assert_eq!(value["error"]["message"], "duplicate member permissions");
    }

    #[test]
    fn a_member_named_twice_in_the_envelope_is_invalid_request() {
        let Err(resp) = single(r#"{"id":"a","method":"x","method":"y"}"#) else {
            panic!("expected an error");
        };
        let value = resp.to_value();
        assert_eq!(value["id"], "a");
        assert_eq!(value["error"]["code"], -32600);
        assert_eq!(value["error"]["message"], "duplicate member method");
    }

    #[test]
    fn duplicates_in_a_batch_belong_to_their_own_element() {
        let Incoming::Batch(items) = parse(
            br#"[{"id":1,"method":"a","params":{"x":1}},{"id":2,"method":"b","params":[{"y":1,"y":2}]},{"id":3,"method":"c"}]"#,
        ) else {
            panic!("expected a batch");
        };
        assert!(matches!(items[0], Ok(Message::Request(_))));
        let Err(resp) = &items[1] else {
            panic!("expected an error for the second element");
        };
        assert_eq!(resp.to_value()["id"], 2);
        assert_eq!(resp.to_value()["error"]["message"], "duplicate member y");
        assert!(matches!(items[2], Ok(Message::Request(_))));
    }

    #[test]
    fn the_strict_parser_builds_what_serde_json_builds() {
        let text =
            r#"{"a":[1,-2,3.5,1e300,"s\u00e9",true,null,{"b":{}}],"c":18446744073709551615}"#;
        let (value, duplicates) = strict::parse(text.as_bytes()).unwrap();
        assert_eq!(value, serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(duplicates, vec![None]);
    }

    #[test]
    fn the_hand_made_output_line_is_what_the_serializer_writes() {
        use crate::protocol::{OutputNotification, Stream, method};
        for id in ["p", "with \"quotes\" and \\ and \u{1}"] {
            let made = output_line(id, 7, Stream::Pty, b"hi");
            let serialized = notification_line(
                method::PROCESS_OUTPUT,
                &OutputNotification {
                    process_id: id,
                    seq: 7,
                    stream: Stream::Pty,
                    chunk: "aGk=",
                },
            );
            assert_eq!(
                String::from_utf8(made).unwrap(),
                String::from_utf8(serialized).unwrap()
            );
        }
    }

    #[test]
    fn replies_parse_for_the_peer_that_called() {
        let Ok(Message::Reply(reply)) = single(r#"{"jsonrpc":"2.0","id":4,"result":{"ok":true}}"#)
        else {
            panic!("expected a reply");
        };
        assert_eq!(reply.id, Some(RequestId::Number(4.into())));
        assert_eq!(reply.outcome, Ok(json!({"ok": true})));
        let Ok(Message::Reply(reply)) =
            single(r#"{"jsonrpc":"2.0","id":"x","error":{"code":-32601,"message":"no"}}"#)
        else {
            panic!("expected a reply");
        };
        assert_eq!(reply.outcome.unwrap_err()["code"], -32601);
    }

    #[test]
    fn a_request_line_parses_back_to_itself() {
        let request = Request {
            id: RequestId::Number(9.into()),
            method: "process/read".into(),
            params: json!({"processId": "p", "afterSeq": 3}),
        };
        let line = request.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        let Ok(Message::Request(parsed)) =
            single(std::str::from_utf8(&line[..line.len() - 1]).unwrap())
        else {
            panic!("expected a request");
        };
        assert_eq!(parsed, request);
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
