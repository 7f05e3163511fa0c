//! The orchestrator side: a client that spawns a server lazily, over any
//! command, and calls it.
//!
//! A started process gets **the executor's environment** (the server's
//! own) without names that look secret ([`policy::SECRET_NAMES`]), as
//! `exec-server run` gives it: [`EnvPolicy::executor_default`]. Variables
//! set with [`StartOptions::env`] go over it; [`StartOptions::env_policy`]
//! derives it another way; [`StartOptions::exact_env`] sends exactly the
//! variables set. Paths are anything path-like (`&str`, `&Path`,
//! `PathBuf`); the environment policy, the sandbox ([`Sandbox`]) and walk
//! options ([`WalkOptions`]) are typed, and refuse unknown members when
//! read from JSON.
//!
//! ```no_run
//! use exec_server::client::{Client, ServerCommand, StartOptions};
//!
//! # async fn demo() -> Result<(), exec_server::client::ClientError> {
//! // Any command that speaks the protocol on its stdio: the local binary,
//! // `ssh host exec-server --stdio`, `kubectl exec -i pod -- exec-server --stdio`.
//! let command = ServerCommand::parse("ssh build-box exec-server --stdio")?;
//! let client = Client::new(command);
//! // Nothing runs until the first call; concurrent first calls share one start.
//! let mut process = client
//!     .start(StartOptions::new("p1", ["sh", "-c", "echo hi; exit 3"]).cwd("/tmp"))
//!     .await?;
//! let mut output = Vec::new();
//! let status = process.wait_with_output(|_stream, bytes| output.extend_from_slice(bytes)).await?;
//! assert_eq!((status.code, &output[..]), (3, &b"hi\n"[..]));
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::sync::lock;

mod command;
mod connection;
mod error;
#[cfg(feature = "remote")]
mod noise;
pub mod policy;
mod process;
pub mod run;
mod types;
mod watch;

pub use command::{RegistryToken, ServerCommand};
pub(crate) use connection::{Conn, Note};
pub use connection::{SERVER_STDERR_TARGET, bridge_stdio};
use connection::{connect, connect_resuming};
pub use error::ClientError;
pub use policy::{EnvPolicy, Inherit, Sandbox, WalkOptions};

pub use crate::protocol::Stream;
pub use process::{Event, ExitStatus, Process, StartOptions};
pub use types::{
    DirectoryEntry, EnvironmentInfo, Metadata, OutputChunk, ProcessSummary, ReadOutput, Shell,
    Walk, WalkEntry, WalkError,
};
pub use watch::{Change, Watcher};

/// How long shutdown waits for the server to exit after its stdin closes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A handle to one environment. Cheap to clone; every clone shares one
/// server, started on the first call.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    command: ServerCommand,
    client_name: String,
    /// The connection (or why there is none). Held while connecting, so
    /// that concurrent first calls, and concurrent calls after a loss,
    /// share one attempt.
    slot: tokio::sync::Mutex<Option<Result<Arc<Conn>, ClientError>>>,
    /// The same connection, for looks that can't wait (pid, drop).
    current: std::sync::Mutex<Option<Arc<Conn>>>,
    /// The session the first connection resumes ([`Client::resuming`]).
    resume_first: Option<String>,
    /// Told when a lost connection is being resumed, and how that ended.
    notices: Option<NoticeHook>,
}

/// What [`Client::with_notices`] calls.
type NoticeHook = Box<dyn Fn(&Notice) + Send + Sync>;

/// What happens to a client's connection, for a caller that tells a
/// person ([`Client::with_notices`]).
#[derive(Debug, Clone)]
pub enum Notice {
    /// The connection was lost; the session is being resumed. Said once per
    /// loss however many attempts it takes; the server command's stderr of
    /// the failed attempts is held back (the last is in the error, should
    /// they all fail).
    Reconnecting {
        /// The session.
        session: String,
    },
    /// The session was resumed on a new connection.
    Reconnected {
        /// The session.
        session: String,
    },
    /// Every attempt failed; calls now fail with `error`.
    ReconnectFailed {
        /// The session, which may still live on the server (until its
        /// detached TTL ends): [`Client::resuming`] can take it up again.
        session: String,
        /// The last attempt's error, the server's stderr included.
        error: ClientError,
    },
}

impl Client {
    /// A client for the server started by `command`. Nothing is started yet.
    pub fn new(command: ServerCommand) -> Self {
        Client {
            shared: Arc::new(Shared {
                command,
                client_name: format!("exec-server-client/{}", env!("CARGO_PKG_VERSION")),
                slot: tokio::sync::Mutex::new(None),
                current: std::sync::Mutex::new(None),
                resume_first: None,
                notices: None,
            }),
        }
    }

    /// A client whose first connection resumes `session` (left detached by
    /// another client, e.g. a runner that gave up reconnecting) instead of
    /// starting one. The command must be resumable.
    pub fn resuming(command: ServerCommand, session: impl Into<String>) -> Self {
        let mut client = Client::new(command);
        if let Some(shared) = Arc::get_mut(&mut client.shared) {
            shared.resume_first = Some(session.into());
        }
        client
    }

    /// Call `notice` when a lost connection is being resumed and when that
    /// ends ([`Notice`]). Set it before the first call.
    pub fn with_notices(mut self, notice: impl Fn(&Notice) + Send + Sync + 'static) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.notices = Some(Box::new(notice));
        }
        self
    }

    fn tell(&self, notice: Notice) {
        if let Some(tell) = &self.shared.notices {
            tell(&notice);
        }
    }

    /// Whether the server has been started (or a start was attempted).
    pub fn is_started(&self) -> bool {
        self.shared
            .slot
            .try_lock()
            .map_or(true, |slot| slot.is_some())
    }

    /// The server's process id, once started (0 for a socket).
    pub fn server_pid(&self) -> Option<i32> {
        lock(&self.shared.current).as_ref().map(|conn| conn.pid)
    }

    /// Why the server said it is stopping (`server/stopping`), if it did.
    pub fn server_stopped(&self) -> Option<String> {
        lock(&self.shared.current)
            .as_ref()
            .and_then(|conn| lock(&conn.stopped).clone())
    }

    /// Whether a lost connection is resumed (see
    /// [`ServerCommand::resumable`]).
    pub fn resumable(&self) -> bool {
        self.shared.command.resumable()
    }

    /// The connection: started on first use; after a loss, resumed (a new
    /// connection, the same session) when the command is resumable, else
    /// the lost one, whose calls fail at once.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, ClientError> {
        let shared = &self.shared;
        let mut slot = shared.slot.lock().await;
        let resume = match &*slot {
            Some(Ok(conn)) if !conn.is_lost() || !shared.command.resumable() => {
                return Ok(conn.clone());
            }
            Some(Err(err)) => return Err(err.clone()),
            Some(Ok(lost)) => {
                // Whatever is left of the old server command goes.
                lost.kill();
                let reason = crate::sync::lock(&lost.stopped).clone();
                if let Some(reason) = reason {
                    let stopped = ClientError::ServerStopped { reason };
                    *slot = Some(Err(stopped.clone()));
                    return Err(stopped);
                }
                Some(lock(&lost.session_id).clone())
            }
            None => None,
        };
        let result = match (&resume, &shared.resume_first) {
            (Some(session), _) => {
                tracing::info!("connection lost; resuming session {session}");
                self.tell(Notice::Reconnecting {
                    session: session.clone(),
                });
                let result = connect_resuming(&shared.command, &shared.client_name, session).await;
                self.tell(match &result {
                    Ok(_) => Notice::Reconnected {
                        session: session.clone(),
                    },
                    Err(error) => Notice::ReconnectFailed {
                        session: session.clone(),
                        error: error.clone(),
                    },
                });
                result
            }
            (None, Some(session)) => {
                connect_resuming(&shared.command, &shared.client_name, session).await
            }
            (None, None) => connect(&shared.command, &shared.client_name, None).await,
        };
        *lock(&shared.current) = result.as_ref().ok().cloned();
        *slot = Some(result.clone());
        result
    }

    /// Whether the server sends this client output as binary frames
    /// (false until connected, and with a server that does not offer them).
    pub fn binary_frames(&self) -> bool {
        lock(&self.shared.current)
            .as_ref()
            .is_some_and(|conn| conn.frames.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// `process/read`: the retained output of `process_id` after
    /// `after_seq` (at most about `max_bytes`), waiting up to `wait_ms`
    /// for some. The answer is parsed without building a JSON value (its
    /// base64 is decoded straight from the text): the fast way to poll.
    pub async fn read_output(
        &self,
        process_id: &str,
        after_seq: u64,
        max_bytes: Option<usize>,
        wait_ms: Option<u64>,
    ) -> Result<ReadOutput, ClientError> {
        let mut params = serde_json::json!({"processId": process_id, "afterSeq": after_seq});
        if let Some(max) = max_bytes {
            params["maxBytes"] = max.into();
        }
        if let Some(wait) = wait_ms {
            params["waitMs"] = wait.into();
        }
        let text = self.conn().await?.call_raw("process/read", params).await?;
        types::parse_read(&text).map_err(|message| ClientError::Decode {
            method: "process/read".into(),
            message,
        })
    }

    /// The session id the server gave this client.
    pub async fn session_id(&self) -> Result<String, ClientError> {
        let conn = self.conn().await?;
        Ok(lock(&conn.session_id).clone())
    }

    /// Call any method and return its raw result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.conn().await?.call(method, params).await
    }

    /// Call a method and decode its result.
    pub async fn call_as<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, ClientError> {
        let value = self.call(method, params).await?;
        serde_json::from_value(value).map_err(|e| ClientError::Decode {
            method: method.to_string(),
            message: e.to_string(),
        })
    }

    /// `environment/info`.
    pub async fn environment_info(&self) -> Result<EnvironmentInfo, ClientError> {
        self.call_as("environment/info", json!({})).await
    }

    /// `environment/status`.
    pub async fn environment_status(&self) -> Result<Value, ClientError> {
        self.call("environment/status", json!({})).await
    }

    /// `process/list`, sorted by process id.
    pub async fn list_processes(&self) -> Result<Vec<ProcessSummary>, ClientError> {
        let list: types::ProcessList = self.call_as("process/list", json!({})).await?;
        Ok(list.processes)
    }

    /// `fs/readFile`: the file's bytes.
    pub async fn read_file(&self, path: impl AsRef<Path>) -> Result<Vec<u8>, ClientError> {
        let r = self
            .call("fs/readFile", json!({ "path": uri(path.as_ref()) }))
            .await?;
        decode_b64("fs/readFile", &r["dataBase64"])
    }

    /// `fs/writeFile` (atomic on the server).
    pub async fn write_file(&self, path: impl AsRef<Path>, data: &[u8]) -> Result<(), ClientError> {
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        self.call(
            "fs/writeFile",
            json!({ "path": uri(path.as_ref()), "dataBase64": data }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/createDirectory`.
    pub async fn create_directory(
        &self,
        path: impl AsRef<Path>,
        recursive: bool,
    ) -> Result<(), ClientError> {
        self.call(
            "fs/createDirectory",
            json!({ "path": uri(path.as_ref()), "recursive": recursive }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/getMetadata`.
    pub async fn get_metadata(
        &self,
        path: impl AsRef<Path>,
        follow_symlinks: bool,
    ) -> Result<Metadata, ClientError> {
        self.call_as(
            "fs/getMetadata",
            json!({ "path": uri(path.as_ref()), "followSymlinks": follow_symlinks }),
        )
        .await
    }

    /// `fs/readDirectory`, sorted by name.
    pub async fn read_directory(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<Vec<DirectoryEntry>, ClientError> {
        let listing: types::DirectoryListing = self
            .call_as("fs/readDirectory", json!({ "path": uri(path.as_ref()) }))
            .await?;
        Ok(listing.entries)
    }

    /// `fs/remove`.
    pub async fn remove(
        &self,
        path: impl AsRef<Path>,
        recursive: bool,
        force: bool,
    ) -> Result<(), ClientError> {
        self.call(
            "fs/remove",
            json!({ "path": uri(path.as_ref()), "recursive": recursive, "force": force }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/copy`.
    pub async fn copy(
        &self,
        from: impl AsRef<Path>,
        to: impl AsRef<Path>,
        recursive: bool,
    ) -> Result<(), ClientError> {
        self.call(
            "fs/copy",
            json!({ "sourcePath": uri(from.as_ref()), "destinationPath": uri(to.as_ref()), "recursive": recursive }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/rename`.
    pub async fn rename(
        &self,
        from: impl AsRef<Path>,
        to: impl AsRef<Path>,
    ) -> Result<(), ClientError> {
        self.call(
            "fs/rename",
            json!({ "sourcePath": uri(from.as_ref()), "destinationPath": uri(to.as_ref()) }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/canonicalize`: the resolved path on the server.
    pub async fn canonicalize(&self, path: impl AsRef<Path>) -> Result<PathBuf, ClientError> {
        let r = self
            .call("fs/canonicalize", json!({ "path": uri(path.as_ref()) }))
            .await?;
        crate::protocol::parse_path(r["path"].as_str().unwrap_or("")).map_err(|e| {
            ClientError::Decode {
                method: "fs/canonicalize".into(),
                message: e.to_string(),
            }
        })
    }

    /// `fs/walk`.
    pub async fn walk(
        &self,
        path: impl AsRef<Path>,
        options: &WalkOptions,
    ) -> Result<Walk, ClientError> {
        self.call_as(
            "fs/walk",
            json!({ "path": uri(path.as_ref()), "options": options }),
        )
        .await
    }

    /// `fs/open`: a streaming handle for `read_block`.
    pub async fn open(&self, handle_id: &str, path: impl AsRef<Path>) -> Result<(), ClientError> {
        self.call(
            "fs/open",
            json!({ "handleId": handle_id, "path": uri(path.as_ref()) }),
        )
        .await
        .map(|_| ())
    }

    /// `fs/readBlock`: the bytes and whether the end was reached.
    pub async fn read_block(
        &self,
        handle_id: &str,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        let params = json!({ "handleId": handle_id, "offset": offset, "len": len });
        let (r, bytes) = self
            .conn()
            .await?
            .call_bytes("fs/readBlock", params)
            .await?;
        let data = match bytes {
            // With binary frames, the block came as raw bytes.
            Some(bytes) => bytes,
            None => decode_b64("fs/readBlock", &r["chunk"])?,
        };
        Ok((data, r["eof"] == true))
    }

    /// `fs/close`.
    pub async fn close(&self, handle_id: &str) -> Result<(), ClientError> {
        self.call("fs/close", json!({ "handleId": handle_id }))
            .await
            .map(|_| ())
    }

    /// Start a process; its output arrives through the returned handle.
    pub async fn start(&self, options: StartOptions) -> Result<Process, ClientError> {
        let conn = self.conn().await?;
        Process::start(self.clone(), conn, options).await
    }

    /// A handle to a process of this session that is already running (in
    /// a session taken up with [`Client::resuming`]): its events from
    /// `after_seq` on (0: all that is retained). With `hold`, it tells the
    /// server what arrived, as a process started with `hold_output` does.
    pub async fn attach(
        &self,
        process_id: &str,
        after_seq: u64,
        hold: bool,
    ) -> Result<Process, ClientError> {
        let conn = self.conn().await?;
        Process::attach(self.clone(), conn, process_id, after_seq, hold).await
    }

    /// End the session now (`session/end`, an extension of this server):
    /// its processes are killed and it can't be resumed. For a resumable
    /// server (`--persist`, a socket) whose session would otherwise linger
    /// detached for the TTL. A server without the method answers
    /// `-32601`, which is returned.
    pub async fn end_session(&self) -> Result<(), ClientError> {
        self.call("session/end", json!({})).await.map(|_| ())
    }

    /// Close the server's stdin, give it a short grace to exit (it kills
    /// its own processes), then kill its process group.
    pub async fn shutdown(&self) {
        let current = lock(&self.shared.current).clone();
        if let Some(conn) = current {
            let _ = conn.writer.send(None);
            let exited = conn.exit_notify.notified();
            tokio::pin!(exited);
            exited.as_mut().enable();
            if !conn.exited.load(Ordering::SeqCst) {
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, exited).await;
            }
            conn.kill();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let Some(conn) = lock(&self.current).take() else {
            return;
        };
        let _ = conn.writer.send(None);
        // Drop can't wait; a short-lived thread gives the server its grace
        // and then makes sure nothing is left behind.
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
            while !conn.exited.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            conn.kill();
        });
    }
}

/// A path as a `file:` URI, so the client works with any server of the protocol.
pub(crate) fn uri(path: &std::path::Path) -> String {
    crate::protocol::path_to_uri(path)
}

pub(crate) fn decode_b64(method: &str, value: &Value) -> Result<Vec<u8>, ClientError> {
    let text = value.as_str().unwrap_or("");
    base64_simd::STANDARD
        .decode_type::<Vec<u8>>(text)
        .map_err(|e| ClientError::Decode {
            method: method.to_string(),
            message: format!("invalid base64: {e}"),
        })
}
