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
