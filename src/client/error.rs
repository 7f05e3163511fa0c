//! What a client call can fail with.

/// Everything a client call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server command is malformed.
    #[error("invalid server command: {0}")]
    InvalidCommand(String),
    /// The server command could not be started at all.
    #[error("failed to start the server `{command}`: {message}")]
    Spawn {
        /// The server command, as a person would type it.
        command: String,
        /// Why it could not be started.
        message: String,
    },
    /// The server started but did not complete the handshake.
    #[error(
        "the server `{command}` did not complete the handshake: {message}{}",
        tail(stderr)
    )]
    Handshake {
        /// The server command, as a person would type it.
        command: String,
        /// What went wrong.
        message: String,
        /// The JSON-RPC error code when the server refused `initialize`
        /// (`-32010`: the session is still attached elsewhere; `-32600`:
        /// unknown or expired).
        code: Option<i64>,
        /// The last 4 KiB the server wrote on stderr.
        stderr: String,
    },
    /// The connection to the server ended; pending and later calls fail.
    #[error("the connection to the server was lost{}", tail(stderr))]
    ConnectionLost {
        /// The last 4 KiB the server wrote on stderr.
        stderr: String,
    },
    /// The server answered with an error.
    #[error("{method} failed: {message}")]
    Rpc {
        /// The method called.
        method: String,
        /// The JSON-RPC error code.
        code: i64,
        /// The server's `data.kind` (`notFound`, `spawnFailed`, ...).
        kind: String,
        /// The server's message.
        message: String,
        /// The OS error number, when the OS said why.
        errno: Option<i64>,
    },
    /// `write` to a process whose stdin is closed or was never piped
    /// (`StartOptions::pipe_stdin`): nothing was written.
    #[error("process {process_id} takes no input: its stdin is closed or was not piped")]
    StdinClosed {
        /// The process.
        process_id: String,
    },
    /// The server does not know the process (it was forgotten, or never
    /// started in this session).
    #[error("unknown process {process_id}")]
    UnknownProcess {
        /// The process.
        process_id: String,
    },
    /// The server shut down (and said so): its processes were ended, so
    /// there is nothing to resume.
    #[error("the server stopped ({reason}); its commands were ended")]
    ServerStopped {
        /// What the server gave as the reason (`exec-server daemon stop`,
        /// `SIGTERM`, ...).
        reason: String,
    },
    /// A signal name the protocol has no word for.
    #[error("unknown signal {0}: give TERM, SIGTERM, 15 or a protocol name (terminate)")]
    UnknownSignal(String),
    /// A result did not have the expected shape.
    #[error("unexpected result from {method}: {message}")]
    Decode {
        /// The method called.
        method: String,
        /// What did not fit.
        message: String,
    },
}

fn tail(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("; server stderr: {trimmed}")
    }
}

impl ClientError {
    /// The error as [`Display`](std::fmt::Display) has it, but without the
    /// server's stderr, for a caller that showed those lines as they came.
    pub fn without_stderr(&self) -> String {
        match self {
            ClientError::Handshake {
                command, message, ..
            } => format!("the server `{command}` did not complete the handshake: {message}"),
            ClientError::ConnectionLost { .. } => "the connection to the server was lost".into(),
            other => other.to_string(),
        }
    }

    /// The server's `data.kind`, for an RPC error.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ClientError::Rpc { kind, .. } => Some(kind),
            _ => None,
        }
    }
}
