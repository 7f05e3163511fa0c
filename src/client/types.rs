//! Typed results of the methods the client has helpers for. Members a
//! server adds beyond these are ignored; members it leaves out take their
//! defaults, so the types work with any server of this protocol.

use serde::Deserialize;
use serde_json::Value;

/// `environment/info`: what the executor is.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnvironmentInfo {
    /// The shell the server would run commands with.
    pub shell: Shell,
    /// The server's working directory (a `file:` URI).
    pub cwd: String,
    /// The server's temporary directory (a `file:` URI).
    pub temp_dir: String,
    /// Every temporary directory it uses (`file:` URIs).
    pub temporary_directories: Vec<String>,
    /// What the server can do (`tty`, `sandbox`, `containment`, ...), as it
    /// says it.
    pub capabilities: Value,
    /// The operating system (`linux`).
    pub os: String,
    /// The architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// The roots `:workspace_roots` binds to (`file:` URIs).
    pub workspace_roots: Vec<String>,
}

/// A shell, by name and path.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Shell {
    /// Its file name (`bash`).
    pub name: String,
    /// Its absolute path.
    pub path: String,
}

/// `fs/getMetadata`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Metadata {
    /// A directory (after following a link, when asked to).
    pub is_directory: bool,
    /// A regular file.
    pub is_file: bool,
    /// A symbolic link (only when links are not followed).
    pub is_symlink: bool,
    /// Size in bytes.
    pub size: u64,
    /// Creation time, milliseconds since the epoch (0 when unknown).
    pub created_at_ms: i64,
    /// Modification time, milliseconds since the epoch.
    pub modified_at_ms: i64,
    /// Permission bits and file type (`st_mode`), when the server says.
    pub mode: Option<u32>,
}

/// One entry of `fs/readDirectory`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DirectoryEntry {
    /// The entry's name in its directory.
    pub file_name: String,
    /// A directory (a link counts as its target).
    pub is_directory: bool,
    /// A regular file (a link counts as its target).
    pub is_file: bool,
}

/// `fs/walk`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Walk {
    /// Everything found below the root, breadth first.
    pub entries: Vec<WalkEntry>,
    /// What could not be read.
    pub errors: Vec<WalkError>,
    /// A limit (depth, entries, directories) cut the walk short.
    pub truncated: bool,
}

/// One path found by `fs/walk`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct WalkEntry {
    /// Its path (sent as a `file:` URI, as the reference does).
    #[serde(deserialize_with = "wire_path")]
    pub path: std::path::PathBuf,
    /// `directory` or `file` (a link counts as what it points to).
    pub kind: String,
}

/// A path the server sent as a `file:` URI (or, from an older server, a
/// native path).
fn wire_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::path::PathBuf, D::Error> {
    crate::protocol::WirePath::deserialize(d).map(|p| p.0)
}

/// A path `fs/walk` could not read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct WalkError {
    /// The path.
    #[serde(deserialize_with = "wire_path")]
    pub path: std::path::PathBuf,
    /// Why.
    pub message: String,
}

pub use crate::protocol::ProcessSummary;

/// The result of `process/list`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct ProcessList {
    pub processes: Vec<ProcessSummary>,
}

/// The result of `fs/readDirectory`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct DirectoryListing {
    pub entries: Vec<DirectoryEntry>,
}

/// `process/read`: retained output after a seq, and where the process is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOutput {
    /// The chunks, in seq order.
    pub chunks: Vec<OutputChunk>,
    /// The seq to read after next time, minus one (`afterSeq` of the next
    /// read is `next_seq - 1`).
    pub next_seq: u64,
    /// The process has exited.
    pub exited: bool,
    /// Its exit code, once exited.
    pub exit_code: Option<i32>,
    /// Exited, and every stream has ended: nothing more will come.
    pub closed: bool,
    /// The server thinks the sandbox probably caused the failure.
    pub sandbox_denied: bool,
    /// Output after `afterSeq` fell out of retention before this read.
    pub truncated: bool,
    /// With `truncated`: bytes of all output that left the server's
    /// retained log so far (what a reader lost is that minus the bytes it
    /// had through `afterSeq`).
    pub dropped_bytes: Option<u64>,
    /// Once exited, why (`exited`, `signal`, `oomKilled`, `timedOut`,
    /// `outputLimit`, `terminated`); `None` from a server that does not
    /// say.
    pub reason: Option<String>,
}

/// One chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Its sequence number.
    pub seq: u64,
    /// The stream it came from.
    pub stream: crate::protocol::Stream,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The result of `process/read` as JSON text, parsed without a `Value`:
/// in the exact shape this server writes it, by hand (each chunk's base64
/// found by its closing quote and decoded with SIMD, which rejects anything
/// that is not base64); any other shape by serde, borrowing the chunks.
pub(crate) fn parse_read(text: &[u8]) -> Result<ReadOutput, String> {
    if let Some(read) = parse_read_fast(text) {
        return Ok(read);
    }
    parse_read_general(text)
}

/// This server's shape: `{"chunks":[{"seq":N,"stream":"S","chunk":"B"},..],
/// "nextSeq":N,"exited":B,"exitCode":N|null,"closed":B,"failure":null,
/// "sandboxDenied":B,"truncated":B}`.
fn parse_read_fast(text: &[u8]) -> Option<ReadOutput> {
    fn number(rest: &[u8]) -> Option<(u64, &[u8])> {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let n = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        Some((n, &rest[digits..]))
    }
    fn boolean<'a>(rest: &'a [u8], key: &[u8]) -> Option<(bool, &'a [u8])> {
        let rest = rest.strip_prefix(key)?;
        if let Some(r) = rest.strip_prefix(b"true") {
            Some((true, r))
        } else {
            Some((false, rest.strip_prefix(b"false")?))
        }
    }
    let mut rest = text.strip_prefix(b"{\"chunks\":[")?;
    let mut chunks = Vec::new();
    while let Some(r) = rest.strip_prefix(b"{\"seq\":") {
        let (seq, r) = number(r)?;
        let r = r.strip_prefix(b",\"stream\":\"")?;
        let end = r.iter().position(|&b| b == b'"')?;
        let stream = match &r[..end] {
            b"stdout" => crate::protocol::Stream::Stdout,
            b"stderr" => crate::protocol::Stream::Stderr,
            b"pty" => crate::protocol::Stream::Pty,
            _ => return None,
        };
        let r = r[end..].strip_prefix(b"\",\"chunk\":\"")?;
        let end = memchr_quote(r)?;
        let data = base64_simd::STANDARD
            .decode_type::<Vec<u8>>(&r[..end])
            .ok()?;
        chunks.push(OutputChunk { seq, stream, data });
        let r = r[end..].strip_prefix(b"\"}")?;
        rest = r.strip_prefix(b",").unwrap_or(r);
    }
    let rest = rest.strip_prefix(b"],\"nextSeq\":")?;
    let (next_seq, rest) = number(rest)?;
    let (exited, rest) = boolean(rest, b",\"exited\":")?;
    let rest = rest.strip_prefix(b",\"exitCode\":")?;
    let (exit_code, rest) = match rest.strip_prefix(b"null") {
        Some(r) => (None, r),
        None => {
            let (negative, r) = match rest.strip_prefix(b"-") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            let (n, r) = number(r)?;
            let n = i32::try_from(n).ok()?;
            (Some(if negative { -n } else { n }), r)
        }
    };
    let (closed, rest) = boolean(rest, b",\"closed\":")?;
    let rest = rest.strip_prefix(b",\"failure\":null")?;
    let (sandbox_denied, rest) = boolean(rest, b",\"sandboxDenied\":")?;
    let (truncated, rest) = boolean(rest, b",\"truncated\":")?;
    let (dropped_bytes, rest) = match rest.strip_prefix(b",\"droppedBytes\":") {
        Some(r) => {
            let (n, r) = number(r)?;
            (Some(n), r)
        }
        None => (None, rest),
    };
    let (reason, rest) = match rest.strip_prefix(b",\"reason\":\"") {
        Some(r) => {
            let end = r.iter().position(|&b| b == b'"')?;
            let word = std::str::from_utf8(&r[..end]).ok()?;
            if !word.bytes().all(|b| b.is_ascii_alphabetic()) {
                return None;
            }
            (Some(word.to_string()), &r[end + 1..])
        }
        None => (None, rest),
    };
    (rest == b"}").then_some(ReadOutput {
        chunks,
        next_seq,
        exited,
        exit_code,
        closed,
        sandbox_denied,
        truncated,
        dropped_bytes,
        reason,
    })
}

/// The index of the first `"` (libc's vectorised `memchr`).
fn memchr_quote(bytes: &[u8]) -> Option<usize> {
    // SAFETY: searches within the slice's bounds.
    let found = unsafe { libc::memchr(bytes.as_ptr().cast(), b'"' as i32, bytes.len()) };
    (!found.is_null()).then(|| found as usize - bytes.as_ptr() as usize)
}

fn parse_read_general(text: &[u8]) -> Result<ReadOutput, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw<'a> {
        #[serde(borrow)]
        chunks: Vec<RawChunk<'a>>,
        next_seq: u64,
        #[serde(default)]
        exited: bool,
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        closed: bool,
        #[serde(default)]
        sandbox_denied: bool,
        #[serde(default)]
        truncated: bool,
        #[serde(default)]
        dropped_bytes: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
    }
    #[derive(Deserialize)]
    struct RawChunk<'a> {
        seq: u64,
        stream: crate::protocol::Stream,
        #[serde(borrow)]
        chunk: std::borrow::Cow<'a, str>,
    }
    let raw: Raw<'_> = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let chunks = raw
        .chunks
        .into_iter()
        .map(|c| {
            let data = base64_simd::STANDARD
                .decode_type::<Vec<u8>>(c.chunk.as_bytes())
                .map_err(|e| format!("chunk {} is not base64: {e}", c.seq))?;
            Ok(OutputChunk {
                seq: c.seq,
                stream: c.stream,
                data,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(ReadOutput {
        chunks,
        next_seq: raw.next_seq,
        exited: raw.exited,
        exit_code: raw.exit_code,
        closed: raw.closed,
        sandbox_denied: raw.sandbox_denied,
        truncated: raw.truncated,
        dropped_bytes: raw.dropped_bytes,
        reason: raw.reason,
    })
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn the_fast_read_parser_agrees_with_serde_on_what_the_server_renders() {
        use crate::protocol::{OutputChunk as Wire, ReadResponse, SharedBytes, Stream};
        for (chunks, exit_code, closed) in [
            (vec![], None, false),
            (
                vec![
                    (1, Stream::Stdout, &b"hello\n"[..]),
                    (7, Stream::Stderr, b"\x00\xff\""),
                ],
                Some(-9),
                true,
            ),
        ] {
            let response = ReadResponse {
                chunks: chunks
                    .into_iter()
                    .map(|(seq, stream, data)| Wire {
                        seq,
                        stream,
                        chunk: SharedBytes(bytes::Bytes::copy_from_slice(data)),
                    })
                    .collect(),
                next_seq: 9,
                exited: exit_code.is_some(),
                exit_code,
                closed,
                failure: None,
                sandbox_denied: false,
                truncated: true,
                dropped_bytes: Some(1234),
                reason: exit_code.map(|_| crate::limits::Reason::TimedOut),
            };
            let text = response.render();
            let fast = parse_read_fast(&text).expect("the server's shape");
            assert_eq!(fast, parse_read_general(&text).unwrap());
            assert_eq!(fast.exit_code, exit_code);
            assert_eq!(fast.reason.is_some(), exit_code.is_some());
        }
        // Another shape (spaces, another member order) takes serde's path.
        let other =
            br#"{"nextSeq": 2, "chunks": [{"chunk": "aGk=", "stream": "stdout", "seq": 1}]}"#;
        assert!(parse_read_fast(other).is_none());
        assert_eq!(parse_read(other).unwrap().chunks[0].data, b"hi");
    }
}
