//! The one error type every handler returns, and the one place where an error
//! is mapped to its JSON-RPC code and its `data.kind`.

use std::io;

use serde_json::{Value, json};

/// JSON-RPC error codes used on the wire (`docs/PROTOCOL.md` section 2).
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    pub const NOT_FOUND: i64 = -32004;
    pub const SESSION_ATTACHED: i64 = -32010;
    /// The client is not reading: answers wait; retry once it has.
    pub const OVERLOADED: i64 = -32011;
}

/// Everything a request can fail with. Each variant's message is the
/// lower-case sentence sent as the JSON-RPC `message`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The line was not JSON.
    #[error("parse error: {0}")]
    Parse(String),
    /// JSON, but not a valid JSON-RPC request.
    #[error("{0}")]
    InvalidRequest(String),
    /// A method other than `initialize` before `initialize`/`initialized`.
    #[error("{0}")]
    NotInitialized(String),
    /// A second `initialize` on one connection.
    #[error("initialize may only be sent once per connection")]
    AlreadyInitialized,
    /// No such method.
    #[error("method not found: {0}")]
    MethodNotFound(String),
    /// Params that do not decode or do not make sense.
    #[error("{0}")]
    InvalidParams(String),
    /// A process id the session does not know.
    #[error("unknown process id {0}")]
    UnknownProcess(String),
    /// `process/start` with an id already in use.
    #[error("process {0} already exists")]
    ProcessExists(String),
    /// The OS refused to start the program.
    #[error("{message}")]
    SpawnFailed { message: String, errno: Option<i32> },
    /// A filesystem path that does not exist.
    #[error("{message}")]
    NotFound { message: String, errno: Option<i32> },
    /// The OS refused access.
    #[error("{message}")]
    PermissionDenied { message: String, errno: Option<i32> },
    /// The sandbox asked for cannot be enforced here.
    #[error("sandbox intent cannot be enforced on this executor: {0}")]
    SandboxUnavailable(String),
    /// `resumeSessionId` names no live session.
    #[error("unknown session id {0}")]
    UnknownSession(String),
    /// `resumeSessionId` names a session another connection holds.
    #[error("session {0} is already attached to another connection")]
    SessionAttached(String),
    /// This connection's session was resumed by another connection.
    #[error("session has been resumed by another connection")]
    SessionTakenOver,
    /// A line over `--max-message-bytes`.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge { size: usize, limit: usize },
    /// Input the OS or the method refuses: a directory where a file was
    /// expected, a non-empty directory, an existing path, and so on. `kind`
    /// names the case.
    #[error("{message}")]
    InvalidInput {
        kind: &'static str,
        message: String,
        errno: Option<i32>,
    },
    /// The connection's budget of answers waiting to be sent is spent
    /// (the client is not reading them): retryable.
    #[error(
        "{waiting} bytes of answers are waiting for the client to read them on this connection \
         (the limit is {limit}); retry once it has"
    )]
    Overloaded { waiting: usize, limit: usize },
    /// Too many bytes of this connection's writes wait for their
    /// processes to take them: retryable.
    #[error(
        "{waiting} bytes of earlier process/write calls on this connection are still waiting \
         for their processes to take them (the limit is {limit}); retry once they have"
    )]
    WritesPending { waiting: usize, limit: usize },
    /// Under `--concurrent-requests`, too many bytes of this connection's
    /// requests wait for their turn: retryable.
    #[error(
        "{waiting} bytes of earlier requests on this connection are waiting for their turn \
         (--concurrent-requests; the limit is {limit}); retry once they have started"
    )]
    TurnsFull { waiting: usize, limit: usize },
    /// An I/O failure of a known kind that the reference answers -32603
    /// (an existing path, a non-empty directory, a read-only filesystem):
    /// `kind` names it.
    #[error("{message}")]
    IoFailed {
        kind: &'static str,
        message: String,
        errno: Option<i32>,
    },
    /// Anything else, usually an I/O failure.
    #[error("{message}")]
    Internal { message: String, errno: Option<i32> },
    /// An error a sandboxed helper answered, passed on unchanged.
    /// The value is the helper's whole `error` object.
    #[error("{}", .0["message"].as_str().unwrap_or("error"))]
    Forwarded(Box<Value>),
}

impl Error {
    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        use Error::*;
        match self {
            Parse(_) => code::PARSE_ERROR,
            InvalidRequest(_)
            | NotInitialized(_)
            | AlreadyInitialized
            | UnknownProcess(_)
            | ProcessExists(_)
            | PermissionDenied { .. }
            | UnknownSession(_)
            | SessionTakenOver
            | MessageTooLarge { .. }
            | InvalidInput { .. } => code::INVALID_REQUEST,
            MethodNotFound(_) => code::METHOD_NOT_FOUND,
            InvalidParams(_) | SandboxUnavailable(_) => code::INVALID_PARAMS,
            SpawnFailed { .. } | Internal { .. } | IoFailed { .. } => code::INTERNAL_ERROR,
            NotFound { .. } => code::NOT_FOUND,
            SessionAttached(_) => code::SESSION_ATTACHED,
            Overloaded { .. } | WritesPending { .. } | TurnsFull { .. } => code::OVERLOADED,
            Forwarded(error) => error["code"].as_i64().unwrap_or(code::INTERNAL_ERROR),
        }
    }

    /// The `data.kind` string, so clients never parse `message`.
    pub fn kind(&self) -> &'static str {
        use Error::*;
        match self {
            Parse(_) => "parseError",
            InvalidRequest(_) => "invalidRequest",
            NotInitialized(_) => "notInitialized",
            AlreadyInitialized => "alreadyInitialized",
            MethodNotFound(_) => "methodNotFound",
            InvalidParams(_) => "invalidParams",
            UnknownProcess(_) => "unknownProcess",
            ProcessExists(_) => "processExists",
            SpawnFailed { .. } => "spawnFailed",
            NotFound { .. } => "notFound",
            PermissionDenied { .. } => "permissionDenied",
            SandboxUnavailable(_) => "sandboxUnavailable",
            UnknownSession(_) => "unknownSession",
            SessionAttached(_) => "sessionAttached",
            SessionTakenOver => "sessionTakenOver",
            MessageTooLarge { .. } => "messageTooLarge",
            InvalidInput { kind, .. } | IoFailed { kind, .. } => kind,
            Overloaded { .. } | WritesPending { .. } | TurnsFull { .. } => "overloaded",
            Internal { .. } | Forwarded(_) => "internal",
        }
    }

    /// The OS error number behind the error, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::SpawnFailed { errno, .. }
            | Error::NotFound { errno, .. }
            | Error::PermissionDenied { errno, .. }
            | Error::InvalidInput { errno, .. }
            | Error::IoFailed { errno, .. }
            | Error::Internal { errno, .. } => *errno,
            _ => None,
        }
    }

    /// The JSON-RPC `error` object.
    pub fn to_json(&self) -> Value {
        if let Error::Forwarded(error) = self {
            return (**error).clone();
        }
        let mut data = json!({ "kind": self.kind() });
        if let Some(errno) = self.errno() {
            data["errno"] = json!(errno);
        }
        if matches!(
            self,
            Error::Overloaded { .. } | Error::WritesPending { .. } | Error::TurnsFull { .. }
        ) {
            data["retryable"] = json!(true);
        }
        json!({ "code": self.code(), "message": self.to_string(), "data": data })
    }

    /// An internal error from an I/O failure, with `context` naming what failed.
    pub fn io(context: impl std::fmt::Display, err: &io::Error) -> Self {
        Error::Internal {
            message: format!("{context}: {}", os_text(err)),
            errno: err.raw_os_error(),
        }
    }
}

/// An I/O error's text as the operating system words it (strerror:
/// `No such file or directory`, `Permission denied`), without Rust's
/// "(os error N)" suffix: the number travels in `data.errno`. Clients of
/// the reference map these very words to an error kind.
pub fn os_text(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(n) => {
            let full = io::Error::from_raw_os_error(n).to_string();
            match full.find(" (os error") {
                Some(i) => full[..i].to_string(),
                None => full,
            }
        }
        None => err.to_string(),
    }
}

/// A filesystem error: `what` names the operation and the path (for
/// example "failed to read /tmp/x"); the OS error decides the code and kind.
/// The codes are the reference's, which goes by the error's class: not
/// found -32004, permission denied and invalid input -32600, anything else
/// (an existing path, a non-empty directory, a read-only filesystem...)
/// -32603; `data.kind` says which it was.
pub fn fs_error(what: impl std::fmt::Display, err: &io::Error) -> Error {
    let message = format!("{what}: {}", os_text(err));
    let errno = err.raw_os_error();
    let failed = |kind| Error::IoFailed {
        kind,
        message: message.clone(),
        errno,
    };
    let invalid = || Error::InvalidInput {
        kind: "invalidInput",
        message: message.clone(),
        errno,
    };
    match errno {
        Some(libc::ENOENT) => Error::NotFound { message, errno },
        Some(libc::EACCES | libc::EPERM) => Error::PermissionDenied { message, errno },
        // EROFS: a sandbox's read-only mount. EXDEV: Landlock refuses a
        // link or rename that would carry a file out of what its rules
        // allow (the unsandboxed rename handles a real cross-filesystem
        // move before it gets here). Both are denials, of the -32603 class.
        Some(libc::EROFS | libc::EXDEV) => failed("permissionDenied"),
        Some(libc::EISDIR) => failed("isADirectory"),
        Some(libc::ENOTDIR) => failed("notADirectory"),
        Some(libc::ENOTEMPTY) => failed("directoryNotEmpty"),
        Some(libc::EEXIST) => failed("alreadyExists"),
        Some(libc::ELOOP) => failed("tooManySymlinks"),
        Some(libc::ENAMETOOLONG) => failed("invalidInput"),
        Some(libc::EINVAL) => invalid(),
        None if err.kind() == io::ErrorKind::InvalidInput => invalid(),
        _ => Error::Internal { message, errno },
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_carries_code_kind_and_errno() {
        let err = Error::SpawnFailed {
            message: "failed to start nope: No such file or directory".into(),
            errno: Some(2),
        };
        assert_eq!(
            err.to_json(),
            json!({"code": -32603, "message": "failed to start nope: No such file or directory",
                   "data": {"kind": "spawnFailed", "errno": 2}})
        );
    }

    #[test]
    fn kernel_refusals_of_a_filesystem_method_are_permission_denied() {
        for errno in [libc::EACCES, libc::EPERM, libc::EROFS, libc::EXDEV] {
            let err = fs_error(
                "failed to rename /a to /b",
                &io::Error::from_raw_os_error(errno),
            );
            assert_eq!(err.kind(), "permissionDenied", "errno {errno}");
        }
    }

    #[test]
    fn io_text_is_lower_case_without_os_error_suffix() {
        let err = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_text(&err), "No such file or directory");
    }
}
