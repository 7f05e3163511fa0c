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
    /// Its path.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other`.
    pub kind: String,
}

/// A path `fs/walk` could not read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct WalkError {
    /// The path.
    pub path: String,
    /// Why.
    pub message: String,
}

/// One process of `process/list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
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
/// each chunk's base64 is borrowed from the text, then decoded (SIMD).
pub(crate) fn parse_read(text: &[u8]) -> Result<ReadOutput, String> {
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
    })
}
