//! One connection: frames in, responses and notifications out, the
//! handshake and its gating. Everything method-specific lives in
//! [`super::dispatch`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use super::Server;
use super::dispatch::{self, ConnState, Ctx, Reply};
use super::session::Session;
use super::turns::Turns;
use crate::error::Error;
use crate::jsonrpc::{self, Incoming, Message, Outgoing, Request, Response};
use crate::protocol::{InitializeParams, InitializeResponse, ServerInfo, method};
use crate::transport::{Frame, Outbound, Transport};

/// A response that is ready, or one that will be.
enum Pending {
    Ready(Response),
    /// Ready; run the hook once the response is queued.
    ReadyThen(Response, Box<dyn FnOnce() + Send>),
    /// Ready later; then, once the response is queued, the follow-up
    /// (a streamed body) runs as long as the connection lasts.
    Later(Pin<Box<dyn Future<Output = (Response, Option<dispatch::FollowUp>)> + Send>>),
}

struct Connection {
    server: Arc<Server>,
    id: u64,
    outgoing: Outbound,
    session: Option<Arc<Session>>,
    initialized: bool,
    state: Arc<ConnState>,
    /// Answers still being worked on (long-polls, writes waiting for
    /// room, batches): they end with the connection.
    tasks: tokio::task::JoinSet<()>,
    /// The client has written `"jsonrpc"` (JSON-RPC 2.0 proper): an error
    /// with no usable id then says `id: null`. Until it has, it speaks the
    /// Codex dialect, which has no `jsonrpc` member and whose client
    /// can't read a null id: those errors say `id: -1`.
    strict_ids: bool,
    /// `--concurrent-requests N`: how many ordinary requests may run at
    /// once; none means no limit.
    turns: Option<Turns>,
}

/// Serve one connection until its input ends, then detach its session.
pub async fn serve(server: Arc<Server>, transport: Transport) {
    let Transport {
        mut incoming,
        outgoing,
    } = transport;
    let turns = server.config.concurrent_requests.map(Turns::new);
    let mut conn = Connection {
        id: server.next_connection_id(),
        server,
        outgoing: outgoing.clone(),
        session: None,
        initialized: false,
        state: Arc::new(ConnState::start(outgoing.clone())),
        tasks: tokio::task::JoinSet::new(),
        strict_ids: false,
        turns,
    };
    let mut shutdown = conn.server.shutdown.subscribe();
    // The flag only ever goes from false to true: any change is the end.
    while !*shutdown.borrow_and_update() {
        tokio::select! {
            frame = incoming.recv() => match frame {
                Some(frame) => conn.on_frame(frame).await,
                None => break,
            },
            _ = shutdown.changed() => break,
        }
        // Forget the tasks that are done.
        while conn.tasks.try_join_next().is_some() {}
    }
    // A read still waiting has nothing to answer to; what it would have
    // returned stays retained for a resumed session.
    conn.tasks.abort_all();
    // Calls to this client (policy questions) get no answer now: they
    // deny.
    conn.outgoing.close_calls();
    if let Some(session) = &conn.session {
        conn.server.sessions.detach(session, conn.id);
    }
}

impl Connection {
    async fn send(&self, mut response: Response) {
        if response.id.is_none() && !self.strict_ids {
            response.id = Some(jsonrpc::RequestId::Number((-1).into()));
        }
        // A send fails only when the writer is gone, and then the
        // connection is ending anyway.
        self.outgoing.send(Outgoing::Response(response)).await;
    }

    async fn on_frame(&mut self, frame: Frame) {
        let bytes = match frame {
            Frame::Line(bytes) => bytes,
            Frame::TooLong { size } => {
                let limit = self.server.config.max_message_bytes;
                let error = Error::MessageTooLarge { size, limit };
                tracing::warn!("{error}");
                self.send(Response::err(None, error)).await;
                return;
            }
        };
        if !self.strict_ids {
            // Where a JSON-RPC 2.0 client writes it: near the start.
            let head = &bytes[..bytes.len().min(256)];
            self.strict_ids = head.windows(9).any(|w| w == b"\"jsonrpc\"");
        }
        match jsonrpc::parse(&bytes) {
            Incoming::Single(Err(response)) => self.send(response).await,
            Incoming::Single(Ok(message)) => match self.handle(message, Some(bytes.len())) {
                None => {}
                Some(Pending::Ready(response)) => self.send(response).await,
                Some(Pending::ReadyThen(response, hook)) => {
                    self.send(response).await;
                    hook();
                }
                Some(Pending::Later(future)) => {
                    let out = self.outgoing.clone();
                    self.tasks.spawn(async move {
                        let (response, follow_up) = future.await;
                        if out.send(Outgoing::Response(response)).await
                            && let Some(follow_up) = follow_up
                        {
                            follow_up.await;
                        }
                    });
                }
            },
            Incoming::Batch(items) => {
                let pending: Vec<Pending> = items
                    .into_iter()
                    .filter_map(|item| match item {
                        Err(response) => Some(Pending::Ready(response)),
                        Ok(message) => self.handle(message, None),
                    })
                    .collect();
                if pending.is_empty() {
                    return;
                }
                // Hooks run at once: a batch may hold a read that waits on
                // the output of a process the same batch starts.
                let mut answers = Vec::with_capacity(pending.len());
                for p in pending {
                    answers.push(match p {
                        Pending::Ready(r) => Ok(r),
                        Pending::ReadyThen(r, hook) => {
                            hook();
                            Ok(r)
                        }
                        Pending::Later(f) => Err(f),
                    });
                }
                let out = self.outgoing.clone();
                self.tasks.spawn(async move {
                    let mut responses = Vec::with_capacity(answers.len());
                    let mut follow_ups = Vec::new();
                    for answer in answers {
                        responses.push(match answer {
                            Ok(r) => r,
                            Err(f) => {
                                let (r, follow_up) = f.await;
                                follow_ups.extend(follow_up);
                                r
                            }
                        });
                    }
                    if out.send(Outgoing::Batch(responses)).await {
                        futures_util::future::join_all(follow_ups).await;
                    }
                });
            }
        }
    }

    fn handle(&mut self, message: Message, size: Option<usize>) -> Option<Pending> {
        match message {
            Message::Reply(reply) => {
                let id = match &reply.id {
                    Some(jsonrpc::RequestId::Number(n)) => n.as_u64(),
                    _ => None,
                };
                // An answer to no call of ours (or to one given up on) is
                // dropped; the connection keeps serving.
                if !id.is_some_and(|id| self.outgoing.answer(id, reply.outcome)) {
                    tracing::debug!("ignoring a response that answers no waiting call");
                }
                None
            }
            Message::Notification(n) if n.method == method::INITIALIZED => {
                if self.session.is_some() {
                    self.initialized = true;
                } else {
                    tracing::warn!("received `initialized` before `initialize`");
                }
                None
            }
            Message::Notification(n) => {
                tracing::debug!(method = %n.method, "ignoring an unknown notification");
                None
            }
            Message::Request(request) => Some(self.request(request, size)),
        }
    }

    /// `size`: the bytes of the message it came in (what waiting for a
    /// turn holds); `None` for an item of a batch, which takes no turn.
    fn request(&mut self, request: Request, size: Option<usize>) -> Pending {
        let Request { id, method, params } = request;
        if method == method::INITIALIZE {
            let outcome = self.initialize(params);
            if let Err(error) = &outcome {
                refused(&method, error);
            }
            return Pending::Ready(Response::new(Some(id), outcome));
        }
        let Some(route) = dispatch::route(&method) else {
            let error = Error::MethodNotFound(method.clone());
            refused(&method, &error);
            return Pending::Ready(Response::err(Some(id), error));
        };
        let session = match self.gate(route.family) {
            Ok(session) => session,
            Err(error) => {
                refused(&method, &error);
                return Pending::Ready(Response::err(Some(id), error));
            }
        };
        let ctx = Ctx {
            server: self.server.clone(),
            session,
            conn: self.state.clone(),
        };
        let started = std::time::Instant::now();
        let turns = self.turns.as_ref().filter(|_| !is_control(&method));
        let (Some(turns), Some(size)) = (turns, size) else {
            let note = crate::audit::note_request(&method, &params, &ctx.session.id);
            return answer(
                (route.handler)(&ctx, &method, params),
                method,
                id,
                started,
                note,
            );
        };
        // `--concurrent-requests`: the place in the queue is taken now, in
        // arrival order; the handler runs when the turn comes, and the
        // turn passes on once its response is queued.
        let turn = match turns.take(size) {
            Ok(turn) => turn,
            Err(error) => return Pending::Ready(Response::err(Some(id), error)),
        };
        Pending::Later(Box::pin(async move {
            let Some(permit) = turn.await else {
                let error = Error::Internal {
                    message: "the connection is ending".into(),
                    errno: None,
                };
                return (Response::err(Some(id), error), None);
            };
            let note = crate::audit::note_request(&method, &params, &ctx.session.id);
            let (response, follow_up): (Response, Option<dispatch::FollowUp>) = match answer(
                (route.handler)(&ctx, &method, params),
                method,
                id,
                started,
                note,
            ) {
                Pending::Ready(response) => (response, None),
                Pending::ReadyThen(response, hook) => {
                    (response, Some(Box::pin(async move { hook() })))
                }
                Pending::Later(future) => future.await,
            };
            let after: dispatch::FollowUp = Box::pin(async move {
                drop(permit);
                if let Some(follow_up) = follow_up {
                    follow_up.await;
                }
            });
            (response, Some(after))
        }))
    }

    /// The session, if this connection may use methods of `family`.
    fn gate(&self, family: &str) -> Result<Arc<Session>, Error> {
        let Some(session) = &self.session else {
            return Err(Error::NotInitialized(format!(
                "client must call initialize before using {family} methods"
            )));
        };
        if !session.is_attached_to(self.id) {
            return Err(Error::SessionTakenOver);
        }
        if !self.initialized {
            return Err(Error::NotInitialized(format!(
                "client must send initialized before using {family} methods"
            )));
        }
        Ok(session.clone())
    }

    fn initialize(&mut self, params: Value) -> Result<Value, Error> {
        if self.session.is_some() {
            return Err(Error::AlreadyInitialized);
        }
        let params: InitializeParams = crate::protocol::decode(method::INITIALIZE, params)?;
        // Frames are on before the session is attached, so that every
        // output the client is sent after this is a frame.
        let frames = self.server.config.binary_frames
            && params
                .capabilities
                .as_ref()
                .and_then(|c| c["binaryFrames"]["version"].as_u64())
                .is_some_and(|v| v >= crate::frame::VERSION);
        self.outgoing.use_frames(frames);
        let sessions = &self.server.sessions;
        let attached = match &params.resume_session_id {
            Some(id) => sessions.resume(id, self.id, self.outgoing.clone()),
            None => Ok(sessions.create(self.id, self.outgoing.clone())),
        };
        let session = attached.inspect_err(|_| self.outgoing.use_frames(false))?;
        let capabilities = params.capabilities.as_ref().map(|_| {
            let mut granted = serde_json::json!({});
            if frames {
                granted["binaryFrames"] = serde_json::json!({"version": crate::frame::VERSION});
            }
            granted
        });
        tracing::info!(client = %params.client_name, session = %session.id, "initialized");
        let response = InitializeResponse {
            session_id: session.id.clone(),
            server_info: ServerInfo {
                name: "exec-server",
                version: env!("CARGO_PKG_VERSION"),
            },
            capabilities,
        };
        self.session = Some(session);
        Ok(serde_json::to_value(response).unwrap_or(Value::Null))
    }
}

/// A handler's reply as the connection's pending answer, logged when it
/// is known.
fn answer(
    reply: Reply,
    method: String,
    id: jsonrpc::RequestId,
    started: std::time::Instant,
    note: Option<crate::audit::RequestNote>,
) -> Pending {
    let audit = move |outcome: Result<Option<&serde_json::Value>, &Error>| {
        if let Some(note) = note {
            note.finish(outcome);
        }
    };
    match reply {
        Reply::Ready(outcome) => {
            log_request(&method, &id, started, outcome.as_ref().err());
            audit(outcome.as_ref().map(Some));
            Pending::Ready(Response::new(Some(id), outcome))
        }
        Reply::Rendered(outcome) => {
            log_request(&method, &id, started, outcome.as_ref().err());
            audit(outcome.as_ref().map(|_| None));
            Pending::Ready(Response::rendered(Some(id), outcome))
        }
        Reply::ReadyThen(outcome, hook) => {
            log_request(&method, &id, started, outcome.as_ref().err());
            audit(outcome.as_ref().map(Some));
            Pending::ReadyThen(Response::new(Some(id), outcome), hook)
        }
        Reply::Later(future) => Pending::Later(Box::pin(async move {
            let outcome = future.await;
            log_request(&method, &id, started, outcome.as_ref().err());
            audit(outcome.as_ref().map(Some));
            (Response::new(Some(id), outcome), None)
        })),
        Reply::LaterRendered(future) => Pending::Later(Box::pin(async move {
            let outcome = future.await;
            log_request(&method, &id, started, outcome.as_ref().err());
            audit(outcome.as_ref().map(|_| None));
            (Response::rendered(Some(id), outcome), None)
        })),
        Reply::LaterWithBytes(future) => Pending::Later(Box::pin(async move {
            let outcome = future.await;
            log_request(&method, &id, started, outcome.as_ref().err());
            audit(outcome.as_ref().map(|(value, _)| Some(value)));
            let response = match outcome {
                Ok((result, bytes)) => Response::with_bytes(Some(id), result, bytes),
                Err(err) => Response::err(Some(id), err),
            };
            (response, None)
        })),
        Reply::LaterThen(future) => Pending::Later(Box::pin(async move {
            let (outcome, follow_up) = future.await;
            log_request(&method, &id, started, outcome.as_ref().err());
            audit(outcome.as_ref().map(Some));
            (Response::new(Some(id), outcome), follow_up)
        })),
    }
}

/// A request refused before any handler saw it, in the audit log.
fn refused(method: &str, error: &Error) {
    if let Some(note) = crate::audit::note_request(method, &serde_json::Value::Null, "") {
        note.finish(Err(error));
    }
}

/// Requests that never wait for a turn under `--concurrent-requests`: the
/// reference's control lane (info, status, signal, terminate, fs/close),
/// plus the long-poll `process/read`, so that a waiting read can't hold
/// up the terminate that would end it, and this server's session ending.
fn is_control(method: &str) -> bool {
    matches!(
        method,
        method::ENVIRONMENT_INFO
            | method::ENVIRONMENT_STATUS
            | method::PROCESS_SIGNAL
            | method::PROCESS_TERMINATE
            | method::PROCESS_READ
            | method::FS_CLOSE
            | dispatch::SERVER_STATUS
            | dispatch::SESSION_END
    )
}

/// One debug line per answered request: method, id, how long it took, and
/// how it ended (never its params or result: they may hold file contents
/// or secrets).
fn log_request(
    method: &str,
    id: &jsonrpc::RequestId,
    started: std::time::Instant,
    failure: Option<&Error>,
) {
    let micros = started.elapsed().as_micros();
    match failure {
        None => tracing::debug!(method, %id, micros, "ok"),
        Some(err) => {
            tracing::debug!(method, %id, micros, code = err.code(), kind = err.kind(), "{err}")
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::process::container::Containment;
    use crate::transport::memory;

    fn server() -> Arc<Server> {
        Server::new(
            super::super::Config::default(),
            Arc::new(Containment::for_tests()),
        )
    }

    #[tokio::test]
    async fn the_handshake_and_gating_over_an_in_memory_connection() {
        let server = server();
        let (transport, mut peer) = memory::pair();
        let serving = tokio::spawn(serve(server.clone(), transport));
        peer.send_json(json!({"id": 1, "method": "environment/status"}))
            .await;
        let refused = peer.next_json().await.unwrap();
        assert_eq!(refused["error"]["code"], -32600, "{refused}");
        peer.send_json(json!({"id": 2, "method": "initialize", "params": {"clientName": "t"}}))
            .await;
        let session = peer.next_json().await.unwrap();
        let id = session["result"]["sessionId"].as_str().unwrap().to_string();
        peer.send_json(json!({"method": "initialized"})).await;
        peer.send_json(json!({"id": 3, "method": "environment/status"}))
            .await;
        assert_eq!(peer.next_json().await.unwrap()["result"]["status"], "ready");
        // The peer goes: the connection ends and the session detaches.
        drop(peer);
        serving.await.unwrap();
        let sessions = server.sessions.snapshot();
        assert_eq!(sessions.len(), 1);
        assert_eq!((&sessions[0].0, sessions[0].1), (&id, false));
    }

    #[tokio::test]
    async fn a_server_shutdown_ends_the_connection_and_its_long_polls() {
        let server = server();
        let (transport, peer) = memory::pair();
        let serving = tokio::spawn(serve(server.clone(), transport));
        server.shutdown.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(5), serving)
            .await
            .expect("the connection ended")
            .unwrap();
        drop(peer);
    }
}
