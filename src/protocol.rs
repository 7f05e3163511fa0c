//! Params and results of every method (`docs/PROTOCOL.md` sections 3 to 5, 7).
//!
//! Field names are camelCase on the wire; every optional or added field has a
//! default, and unknown fields are ignored, so a newer client works with this
//! server.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::Error;

/// Method names.
pub mod method {
    pub const INITIALIZE: &str = "initialize";
    pub const INITIALIZED: &str = "initialized";
    pub const PROCESS_START: &str = "process/start";
    pub const PROCESS_READ: &str = "process/read";
    pub const PROCESS_WRITE: &str = "process/write";
    pub const PROCESS_CLOSE_STDIN: &str = "process/closeStdin";
    pub const PROCESS_SIGNAL: &str = "process/signal";
    pub const PROCESS_RESIZE: &str = "process/resize";
    pub const PROCESS_TERMINATE: &str = "process/terminate";
    pub const PROCESS_LIST: &str = "process/list";
    pub const PROCESS_OUTPUT: &str = "process/output";
    pub const PROCESS_EXITED: &str = "process/exited";
    pub const PROCESS_CLOSED: &str = "process/closed";
    pub const ENVIRONMENT_INFO: &str = "environment/info";
    pub const ENVIRONMENT_STATUS: &str = "environment/status";
    pub const FS_READ_FILE: &str = "fs/readFile";
    pub const FS_WRITE_FILE: &str = "fs/writeFile";
    pub const FS_CREATE_DIRECTORY: &str = "fs/createDirectory";
    pub const FS_GET_METADATA: &str = "fs/getMetadata";
    pub const FS_READ_DIRECTORY: &str = "fs/readDirectory";
    pub const FS_REMOVE: &str = "fs/remove";
    pub const FS_COPY: &str = "fs/copy";
    pub const FS_RENAME: &str = "fs/rename";
    pub const FS_CANONICALIZE: &str = "fs/canonicalize";
    pub const FS_WALK: &str = "fs/walk";
    pub const FS_OPEN: &str = "fs/open";
    pub const FS_READ_BLOCK: &str = "fs/readBlock";
    pub const FS_CLOSE: &str = "fs/close";
    pub const HTTP_REQUEST: &str = "http/request";
    pub const CAPABILITY_ROOTS_DISCOVER: &str = "capabilityRoots/discoverV1";
    pub const ENVIRONMENT_CONFIG_READ: &str = "environmentConfig/read";
    pub const HTTP_BODY_DELTA: &str = "http/request/bodyDelta";
    pub const NETWORK_POLICY_REQUEST: &str = "network/policyRequest";
    pub const NETWORK_POLICY_DECISION: &str = "network/policyDecision";
}

/// Bytes that travel as standard base64.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64_simd::STANDARD.encode_type::<String>(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Bytes)
            .map_err(|err| serde::de::Error::custom(base64_error(&err)))
    }
}

/// A base64 decode error in the protocol's style.
fn base64_error(err: &base64::DecodeError) -> String {
    use base64::DecodeError::*;
    match err {
        InvalidByte(offset, byte) => {
            format!("invalid base64: invalid byte {byte:#04x} at offset {offset}")
        }
        InvalidLength(len) => format!("invalid base64: invalid length {len}"),
        InvalidLastSymbol(offset, _) => {
            format!("invalid base64: invalid last symbol at offset {offset}")
        }
        InvalidPadding => "invalid base64: invalid padding".to_string(),
    }
}

/// A path field: an absolute native path or a `file:` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePath(pub PathBuf);

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_path(&text)
            .map(WirePath)
            .map_err(|err| serde::de::Error::custom(err.to_string()))
    }
}

/// Turn a wire path into an absolute native path.
pub fn parse_path(text: &str) -> Result<PathBuf, Error> {
    let native = if let Some(rest) = text.strip_prefix("file://") {
        // Only the local host is meaningful here.
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        percent_decode(rest).ok_or_else(|| {
            Error::InvalidParams(format!("invalid percent-escape in file uri {text}"))
        })?
    } else if let Some(rest) = text.strip_prefix("file:") {
        percent_decode(rest).ok_or_else(|| {
            Error::InvalidParams(format!("invalid percent-escape in file uri {text}"))
        })?
    } else {
        text.as_bytes().to_vec()
    };
    let path =
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(native));
    if !path.is_absolute() {
        return Err(Error::InvalidParams(format!(
            "path must be absolute: {text}"
        )));
    }
    Ok(path)
}

pub(crate) fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// A native path as a `file:` URI, percent-encoding what a URI can't carry.
pub fn path_to_uri(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

// ---- handshake ----

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeParams {
    pub client_name: String,
    #[serde(default)]
    pub resume_session_id: Option<String>,
    /// (ext) What the client can take: `{binaryFrames: {version}}`.
    #[serde(default)]
    pub capabilities: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeResponse {
    pub session_id: String,
    pub server_info: ServerInfo,
    /// (ext) What of the client's `capabilities` the server accepted;
    /// present when the client sent some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub name: &'static str,
    pub version: &'static str,
}

// ---- processes ----

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartParams {
    pub process_id: String,
    pub argv: Vec<String>,
    pub cwd: WirePath,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub env_policy: Option<EnvPolicy>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub tty_size: Option<TtySize>,
    #[serde(default)]
    pub pipe_stdin: bool,
    #[serde(default)]
    pub arg0: Option<String>,
    /// Parsed by the sandbox layer; kept raw here.
    #[serde(default)]
    pub sandbox: Option<serde_json::Value>,
    /// Managed networking must be enforced (with `sandbox` only).
    #[serde(default)]
    pub enforce_managed_network: bool,
    /// `{loopbackPorts, allowLocalBinding}`; parsed by the network layer.
    #[serde(default)]
    pub managed_network: Option<serde_json::Value>,
    /// The executor-local proxy to start; parsed by the network layer.
    #[serde(default)]
    pub network_proxy: Option<serde_json::Value>,
    /// (ext) Push `process/output` (default true); false for a client
    /// that only polls.
    #[serde(default)]
    pub notify_output: Option<bool>,
    /// (ext) When retention is full, stop reading the child's output
    /// until `process/read` takes some, instead of evicting.
    #[serde(default)]
    pub hold_output: bool,
    /// (ext) Memory, CPU, process count, deadline and output budget.
    #[serde(default)]
    pub limits: Option<crate::limits::Requested>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for TtySize {
    fn default() -> Self {
        TtySize { cols: 80, rows: 24 }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartResponse {
    pub process_id: String,
    pub sandbox_type: &'static str,
    /// (ext) Limits asked for with `bestEffort` that this host does not
    /// enforce.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unenforced_limits: Vec<&'static str>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadParams {
    pub process_id: String,
    #[serde(default)]
    pub after_seq: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<usize>,
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// (ext) Only say "I have everything through `afterSeq`": no chunks,
    /// no wait; a held process gets the room back.
    #[serde(default)]
    pub acknowledge: bool,
}

/// Where a chunk of output came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Stream {
    /// The process's stdout pipe.
    Stdout,
    /// The process's stderr pipe.
    Stderr,
    /// The pseudo-terminal (stdout and stderr together).
    Pty,
}

impl Stream {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Pty => "pty",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputChunk {
    pub seq: u64,
    pub stream: Stream,
    pub chunk: SharedBytes,
}

/// Bytes shared with the output log (no copy per read), base64 on the
/// wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBytes(pub bytes::Bytes);

impl Serialize for SharedBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64_simd::STANDARD.encode_type::<String>(&self.0))
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadResponse {
    pub chunks: Vec<OutputChunk>,
    pub next_seq: u64,
    pub exited: bool,
    pub exit_code: Option<i32>,
    pub closed: bool,
    pub failure: Option<String>,
    pub sandbox_denied: bool,
    pub truncated: bool,
    /// With `truncated` (ext): bytes of all output that has left the
    /// retained log so far, so a reader knows how much it lost (that
    /// minus the bytes it had through `afterSeq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_bytes: Option<u64>,
    /// (ext) Once exited: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<crate::limits::Reason>,
}

impl ReadResponse {
    /// The result as JSON text, equal to what the serializer writes, with
    /// each chunk's base64 encoded (SIMD) straight into it: no `Value`, no
    /// escaper pass over the base64.
    pub fn render(&self) -> Vec<u8> {
        use std::io::Write;
        let data: usize = self.chunks.iter().map(|c| c.chunk.0.len()).sum();
        let mut out = Vec::with_capacity(data.div_ceil(3) * 4 + 64 * self.chunks.len() + 160);
        out.extend_from_slice(b"{\"chunks\":[");
        for (i, c) in self.chunks.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = write!(
                out,
                "{{\"seq\":{},\"stream\":\"{}\",\"chunk\":\"",
                c.seq,
                c.stream.as_str()
            );
            base64_simd::STANDARD.encode_append(&c.chunk.0, &mut out);
            out.extend_from_slice(b"\"}");
        }
        let _ = write!(
            out,
            "],\"nextSeq\":{},\"exited\":{},\"exitCode\":",
            self.next_seq, self.exited
        );
        let _ = serde_json::to_writer(&mut out, &self.exit_code);
        let _ = write!(out, ",\"closed\":{},\"failure\":", self.closed);
        let _ = serde_json::to_writer(&mut out, &self.failure);
        let _ = write!(
            out,
            ",\"sandboxDenied\":{},\"truncated\":{}",
            self.sandbox_denied, self.truncated
        );
        if let Some(dropped) = self.dropped_bytes {
            let _ = write!(out, ",\"droppedBytes\":{dropped}");
        }
        if let Some(reason) = self.reason {
            let _ = write!(out, ",\"reason\":\"{}\"", reason.as_str());
        }
        out.push(b'}');
        out
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteParams {
    pub process_id: String,
    pub chunk: Bytes,
    #[serde(default)]
    pub write_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum WriteStatus {
    Accepted,
    UnknownProcess,
    StdinClosed,
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteResponse {
    pub status: WriteStatus,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessIdParams {
    pub process_id: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Signal {
    Interrupt,
    Terminate,
    Kill,
    Hangup,
    Quit,
    User1,
    User2,
}

impl Signal {
    pub fn number(self) -> i32 {
        match self {
            Signal::Interrupt => libc::SIGINT,
            Signal::Terminate => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Hangup => libc::SIGHUP,
            Signal::Quit => libc::SIGQUIT,
            Signal::User1 => libc::SIGUSR1,
            Signal::User2 => libc::SIGUSR2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignalParams {
    pub process_id: String,
    pub signal: Signal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResizeParams {
    pub process_id: String,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct TerminateResponse {
    pub running: bool,
}

/// One process of `process/list` (the server writes it, the client
/// library reads it: members a server leaves out take their defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessSummary {
    /// The process id the client chose.
    pub process_id: String,
    /// Its pid on the executor.
    pub pid: i32,
    /// What it runs.
    pub argv: Vec<String>,
    /// Under a pseudo-terminal.
    pub tty: bool,
    /// It has exited.
    pub exited: bool,
    /// Its exit code, once exited.
    pub exit_code: Option<i32>,
    /// Exited and every stream ended.
    pub closed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListResponse {
    pub processes: Vec<ProcessSummary>,
}

/// What `process/output` carries; the server writes these lines by hand
/// (`process::output_line`), checked against this in a test.
#[cfg(test)]
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputNotification<'a> {
    pub process_id: &'a str,
    pub seq: u64,
    pub stream: Stream,
    pub chunk: &'a str,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitedNotification<'a> {
    pub process_id: &'a str,
    pub seq: u64,
    pub exit_code: i32,
    pub sandbox_denied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<&'static str>,
    /// (ext) Why it ended.
    pub reason: crate::limits::Reason,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClosedNotification<'a> {
    pub process_id: &'a str,
    pub seq: u64,
}

// ---- fs/walk ----

/// `fs/walk` bounds when the request gives none: depth, directories read,
/// entries returned.
pub const WALK_DEFAULT_MAX_DEPTH: u32 = 64;
pub const WALK_DEFAULT_MAX_DIRECTORIES: u32 = 10_000;
pub const WALK_DEFAULT_MAX_ENTRIES: u32 = 100_000;

// ---- environment policy ----

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Inherit {
    #[default]
    All,
    Core,
    None,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvPolicy {
    pub inherit: Inherit,
    pub ignore_default_excludes: bool,
    pub exclude: Vec<String>,
    pub set: BTreeMap<String, String>,
    pub include_only: Vec<String>,
}

/// Decode params, naming the method in the error.
pub fn decode<T: serde::de::DeserializeOwned>(
    name: &str,
    params: serde_json::Value,
) -> Result<T, Error> {
    serde_json::from_value(params)
        .map_err(|err| Error::InvalidParams(format!("invalid params for {name}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_read_is_what_the_serializer_writes() {
        for (chunks, exit_code, failure) in [
            (vec![], None, None),
            (
                vec![
                    (1, Stream::Stdout, &b"hello\n"[..]),
                    (2, Stream::Stderr, b"\x00\xff"),
                ],
                Some(-3),
                Some("x\"y".to_string()),
            ),
        ] {
            let response = ReadResponse {
                chunks: chunks
                    .into_iter()
                    .map(|(seq, stream, data)| OutputChunk {
                        seq,
                        stream,
                        chunk: SharedBytes(bytes::Bytes::copy_from_slice(data)),
                    })
                    .collect(),
                next_seq: 3,
                exited: exit_code.is_some(),
                exit_code,
                closed: false,
                failure,
                sandbox_denied: true,
                truncated: false,
                dropped_bytes: exit_code.map(|_| 77),
                reason: exit_code.map(|_| crate::limits::Reason::OomKilled),
            };
            assert_eq!(
                String::from_utf8(response.render()).unwrap(),
                serde_json::to_string(&response).unwrap()
            );
        }
    }

    #[test]
    fn file_uri_is_percent_decoded() {
        assert_eq!(
            parse_path("file:///tmp/a%20b").unwrap(),
            PathBuf::from("/tmp/a b")
        );
    }

    #[test]
    fn relative_path_is_invalid_params() {
        let err = parse_path("tmp/x").unwrap_err();
        assert_eq!(err.kind(), "invalidParams");
        assert_eq!(err.to_string(), "path must be absolute: tmp/x");
    }

    #[test]
    fn uri_round_trips_through_encoding() {
        let path = std::path::Path::new("/tmp/a b%c");
        assert_eq!(path_to_uri(path), "file:///tmp/a%20b%25c");
        assert_eq!(parse_path(&path_to_uri(path)).unwrap(), path);
    }
}
