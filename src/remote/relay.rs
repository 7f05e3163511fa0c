//! `exec-server relay`: a registry and a rendezvous router in one process,
//! on one address. The registry answers `register`, `connect` and
//! `validate` under `/cloud/environment/{id}/`; the router takes one
//! executor WebSocket per environment and any number of harness
//! WebSockets, and copies binary frames between them by `stream_id`.
//!
//! It holds no private key and sees no plaintext: it mints signed URLs and
//! harness authorizations with an HMAC key of its own, stores each
//! executor's public key, and routes ciphertext. Everything it holds is
//! bounded: environments, sockets, streams per environment, frame size,
//! frames queued per socket, single-use URLs remembered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::frame::{Kind, RelayMessageFrame};
use super::noise::{PublicKey, SECURITY_PROFILE};
use super::registry::Secret;
use crate::sync::lock;
use crate::transport::ws::{Replay, read_head, same};

/// Environments registered at most.
pub const MAX_ENVIRONMENTS: usize = 1024;
/// Sockets open at once at most (executors, harnesses, HTTP requests).
pub const MAX_SOCKETS: usize = 4096;
/// Harness streams of one environment at most (the executor takes 128).
pub const MAX_STREAMS: usize = 256;
/// The largest WebSocket message, as the reference's endpoints take.
pub const MAX_FRAME: usize = 256 * 1024;
/// Frames waiting for one harness socket at most; a harness that falls
/// this far behind is dropped (its session resumes on a new stream).
const HARNESS_QUEUE: usize = 256;
/// Frames waiting for an executor socket at most; harnesses wait.
const EXECUTOR_QUEUE: usize = 1024;
/// Request heads the relay waits for at once; a new connection past it
/// pushes out the oldest unfinished one.
const MAX_PENDING_HEADS: usize = 128;
/// Frames written to a socket with one flush at most.
const WRITE_BATCH: usize = 16;
/// How long the executor's socket waits for a harness that has no room
/// before that harness is dropped (every stream of the executor waits
/// meanwhile: the protocol has no flow control per stream).
const OFFER_WAIT: Duration = Duration::from_secs(5);
/// Bytes of frames the relay holds for all its sockets at most (each
/// frame holds its share until written): a harness past it waits, a
/// harness the executor sends to past it is dropped (and resumes).
const PENDING_BYTES: usize = 256 << 20;
/// The longest registry request body.
const MAX_BODY: usize = 64 * 1024;
/// How long a harness URL and authorization stay good.
const BUNDLE_LIFETIME: Duration = Duration::from_secs(120);
/// Used harness URLs remembered at most (each expires with its bundle).
const MAX_USED: usize = 65_536;

/// The relay's settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The bearer token registry callers must show; none: anyone.
    pub token: Option<Secret>,
    /// The HMAC key; none: a new one at start (URLs and authorizations
    /// then die with the process).
    pub key: Option<Secret>,
    /// The URL clients reach this relay at, when not the bound address
    /// (behind a TLS-terminating proxy: `wss://relay.example`).
    pub public_url: Option<String>,
    /// How often sockets are pinged; silent for two of these, dropped.
    pub ping_every: Duration,
}

/// Serve until SIGINT or SIGTERM. The first stdout line is the relay's
/// WebSocket URL; the registry answers on the same address over HTTP.
pub fn run(config: RelayConfig) -> std::io::Result<()> {
    // Sockets are what a relay holds: as many as the hard limit allows.
    crate::sys::raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let bound = listener.local_addr()?;
        let relay = Relay::new(&config, bound);
        tracing::info!("relay listening on ws://{bound}");
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ws://{bound}");
            let _ = out.flush();
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut heads = std::collections::VecDeque::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else {
                        // Out of descriptors, say: this connection is lost,
                        // the listener is not (and does not spin).
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let Some(slot) = relay.socket_slot() else {
                        tokio::spawn(crate::transport::ws::turn_away(stream));
                        continue;
                    };
                    // A flood of heads that never end can't keep a real
                    // client out: past the bound, the oldest unfinished
                    // head goes.
                    heads.retain(|(task, read): &(tokio::task::AbortHandle, Arc<std::sync::atomic::AtomicBool>)| {
                        !task.is_finished() && !read.load(Ordering::Relaxed)
                    });
                    if heads.len() >= MAX_PENDING_HEADS {
                        if let Some((oldest, _)) = heads.pop_front() {
                            tracing::debug!("dropped the oldest unfinished request head");
                            oldest.abort();
                        }
                    }
                    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let relay = relay.clone();
                    let flag = read.clone();
                    let task = tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(err) = relay.serve(stream, &flag).await {
                            tracing::debug!("relay connection ended: {err}");
                        }
                    });
                    heads.push_back((task.abort_handle(), read));
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        tracing::info!("relay stopping");
        Ok::<(), std::io::Error>(())
    })?;
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

struct Relay {
    mac_key: Vec<u8>,
    token: Option<Secret>,
    /// `ws://HOST:PORT` or the public URL, without a trailing `/`.
    base: String,
    ping_every: Duration,
    sockets: Arc<AtomicUsize>,
    environments: Mutex<HashMap<String, Environment>>,
    used: Mutex<HashMap<String, u64>>,
    next_link: AtomicU64,
    /// [`PENDING_BYTES`], shared by every socket.
    pending: Arc<Semaphore>,
}

struct Environment {
    registration_id: String,
    key: PublicKey,
    executor: Option<Link>,
    streams: HashMap<String, Link>,
}

/// One socket the router can write to, and end.
#[derive(Clone)]
struct Link {
    id: u64,
    tx: mpsc::Sender<Queued>,
    end: Arc<Notify>,
}

/// A frame waiting for its socket, with its share of [`PENDING_BYTES`]
/// (none for the relay's own resets).
type Queued = (bytes::Bytes, Option<OwnedSemaphorePermit>);

/// A socket's share of [`MAX_SOCKETS`].
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An HTTP answer: status line and JSON body.
struct Answer(&'static str, serde_json::Value);

fn error(status: &'static str, code: &str, message: &str) -> Answer {
    Answer(
        status,
        serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Relay {
    fn new(config: &RelayConfig, bound: SocketAddr) -> Arc<Relay> {
        let mac_key = match &config.key {
            Some(key) => key.expose().as_bytes().to_vec(),
            None => super::random_bytes(32),
        };
        let base = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("ws://{bound}"))
            .trim_end_matches('/')
            .to_string();
        Arc::new(Relay {
            mac_key,
            token: config.token.clone(),
            base,
            ping_every: config.ping_every,
            sockets: Arc::default(),
            environments: Mutex::default(),
            used: Mutex::default(),
            next_link: AtomicU64::new(1),
            pending: Arc::new(Semaphore::new(PENDING_BYTES)),
        })
    }

    fn socket_slot(&self) -> Option<Slot> {
        if self.sockets.fetch_add(1, Ordering::Relaxed) >= MAX_SOCKETS {
            self.sockets.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(self.sockets.clone()))
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        use clatter::bytearray::ByteArray as _;
        use clatter::traits::Hash as _;
        let mut data = Vec::new();
        for part in parts {
            data.extend_from_slice(&(part.len() as u64).to_be_bytes());
            data.extend_from_slice(part);
        }
        hex(clatter::crypto::hash::Sha256::hmac(&self.mac_key, &data).as_slice())
    }

    async fn serve(
        self: Arc<Self>,
        mut stream: TcpStream,
        read: &std::sync::atomic::AtomicBool,
    ) -> std::io::Result<()> {
        let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream))
            .await
            .map_err(|_| std::io::Error::other("no request head in time"))??;
        read.store(true, Ordering::Relaxed);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        if !matches!(request.parse(&head), Ok(httparse::Status::Complete(_))) {
            return reply(
                &mut stream,
                error("400 Bad Request", "bad_request", "bad request"),
            )
            .await;
        }
        let header = |name: &str| crate::transport::ws::header_value(request.headers, name);
        let method = request.method.unwrap_or("").to_string();
        let target = request.path.unwrap_or("/").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let query: HashMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                let v = crate::transport::ws::percent_decode(v.as_bytes());
                (k.to_string(), String::from_utf8_lossy(&v).into_owned())
            })
            .collect();
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(|s| {
                String::from_utf8_lossy(&crate::transport::ws::percent_decode(s.as_bytes()))
                    .into_owned()
            })
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["readyz"]) => {
                reply(&mut stream, Answer("200 OK", serde_json::json!({}))).await
            }
            ("POST", ["cloud", "environment", env, call]) => {
                let length: usize = header("content-length")
                    .and_then(|l| l.trim().parse().ok())
                    .unwrap_or(0);
                if length > MAX_BODY {
                    return reply(
                        &mut stream,
                        error(
                            "413 Payload Too Large",
                            "too_large",
                            "request body too large",
                        ),
                    )
                    .await;
                }
                let mut body = vec![0; length];
                tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut body))
                    .await
                    .map_err(|_| std::io::Error::other("no request body in time"))??;
                let answer = if !self.authorized(header("authorization").as_deref()) {
                    error(
                        "401 Unauthorized",
                        "unauthorized",
                        "missing or wrong bearer token",
                    )
                } else {
                    self.registry_call(env, call, &body)
                };
                reply(&mut stream, answer).await
            }
            ("GET", ["ws", "environment", env]) => {
                let upgrade =
                    header("upgrade").is_some_and(|u| u.to_ascii_lowercase().contains("websocket"));
                if !upgrade {
                    return reply(
                        &mut stream,
                        error(
                            "426 Upgrade Required",
                            "upgrade_required",
                            "connect with a WebSocket",
                        ),
                    )
                    .await;
                }
                let env = env.to_string();
                match self.admit(&env, &query) {
                    Err(answer) => reply(&mut stream, answer).await,
                    Ok(role) => {
                        let config = WebSocketConfig::default()
                            .max_message_size(Some(MAX_FRAME))
                            .max_frame_size(Some(MAX_FRAME));
                        let socket = tokio_tungstenite::accept_async_with_config(
                            Replay::new(head, stream),
                            Some(config),
                        )
                        .await
                        .map_err(std::io::Error::other)?;
                        match role {
                            Role::Environment(registration) => {
                                self.serve_executor(env, registration, socket).await
                            }
                            Role::Harness => self.serve_harness(env, socket).await,
                        }
                        Ok(())
                    }
                }
            }
            _ => {
                reply(
                    &mut stream,
                    error("404 Not Found", "not_found", "no such endpoint"),
                )
                .await
            }
        }
    }

    fn authorized(&self, header: Option<&str>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        same(given.as_bytes(), token.expose().as_bytes())
    }

    fn registry_call(&self, env: &str, call: &str, body: &[u8]) -> Answer {
        if env.trim().is_empty() || env.len() > 256 {
            return error(
                "400 Bad Request",
                "invalid_environment",
                "invalid environment id",
            );
        }
        match call {
            "register" => self.register(env, body),
            "connect" => self.connect(env, body),
            "validate" => self.validate(env, body),
            _ => error("404 Not Found", "not_found", "no such registry call"),
        }
    }

    fn register(&self, env: &str, body: &[u8]) -> Answer {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            security_profile: String,
            executor_public_key: PublicKey,
        }
        let body: Body = match serde_json::from_slice(body) {
            Ok(body) => body,
            Err(err) => return error("400 Bad Request", "invalid_request", &err.to_string()),
        };
        if body.security_profile != SECURITY_PROFILE {
            return error(
                "400 Bad Request",
                "unsupported_security_profile",
                "unsupported security profile",
            );
        }
        let registration_id = hex(&super::random_bytes(16));
        let mut environments = lock(&self.environments);
        if !environments.contains_key(env) && environments.len() >= MAX_ENVIRONMENTS {
            return error(
                "503 Service Unavailable",
                "too_many_environments",
                "relay is full",
            );
        }
        let fingerprint = body.executor_public_key.fingerprint();
        let entry = environments
            .entry(env.to_string())
            .or_insert_with(|| Environment {
                registration_id: String::new(),
                key: body.executor_public_key.clone(),
                executor: None,
                streams: HashMap::new(),
            });
        entry.registration_id = registration_id.clone();
        entry.key = body.executor_public_key;
        // The old registration's executor socket is stale now.
        if let Some(old) = entry.executor.take() {
            old.end.notify_one();
        }
        drop(environments);
        tracing::info!(
            environment = env,
            registration = registration_id.as_str(),
            key = fingerprint.as_str(),
            "executor registered"
        );
        let sig = self.mac(&[b"environment", env.as_bytes(), registration_id.as_bytes()]);
        let url = format!(
            "{}/ws/environment/{}?role=environment&reg={registration_id}&sig={sig}",
            self.base,
            super::path_segment(env)
        );
        Answer(
            "200 OK",
            serde_json::json!({
                "environment_id": env,
                "url": url,
                "security_profile": SECURITY_PROFILE,
                "executor_registration_id": registration_id,
            }),
        )
    }

    fn connect(&self, env: &str, body: &[u8]) -> Answer {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            harness_public_key: PublicKey,
        }
        let body: Body = match serde_json::from_slice(body) {
            Ok(body) => body,
            Err(err) => return error("400 Bad Request", "invalid_request", &err.to_string()),
        };
        let environments = lock(&self.environments);
        let Some(entry) = environments.get(env) else {
            return error(
                "404 Not Found",
                "environment_not_found",
                "no such environment",
            );
        };
        if entry.executor.is_none() {
            return error(
                "409 Conflict",
                "environment_offline",
                "the environment's executor is not connected",
            );
        }
        let registration_id = entry.registration_id.clone();
        let key = entry.key.clone();
        drop(environments);
        let expires = (now_secs() + BUNDLE_LIFETIME.as_secs()).to_string();
        let nonce = hex(&super::random_bytes(16));
        let sig = self.mac(&[
            b"harness",
            env.as_bytes(),
            registration_id.as_bytes(),
            nonce.as_bytes(),
            expires.as_bytes(),
        ]);
        let url = format!(
            "{}/ws/environment/{}?role=harness&reg={registration_id}&n={nonce}&exp={expires}&sig={sig}",
            self.base,
            super::path_segment(env)
        );
        let authorization = format!(
            "v1.{expires}.{}",
            self.mac(&[
                b"authorization",
                env.as_bytes(),
                registration_id.as_bytes(),
                &body.harness_public_key.bytes(),
                expires.as_bytes(),
            ])
        );
        tracing::info!(
            environment = env,
            harness = body.harness_public_key.fingerprint().as_str(),
            "connect bundle issued"
        );
        Answer(
            "200 OK",
            serde_json::json!({
                "environment_id": env,
                "url": url,
                "security_profile": SECURITY_PROFILE,
                "executor_registration_id": registration_id,
                "executor_public_key": key,
                "harness_key_authorization": authorization,
            }),
        )
    }

    fn validate(&self, env: &str, body: &[u8]) -> Answer {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            executor_registration_id: String,
            harness_public_key: PublicKey,
            harness_key_authorization: String,
        }
        let body: Body = match serde_json::from_slice(body) {
            Ok(body) => body,
            Err(_) => return error("400 Bad Request", "invalid_request", "invalid request"),
        };
        let current = lock(&self.environments)
            .get(env)
            .map(|e| e.registration_id.clone());
        let valid = current.as_deref() == Some(body.executor_registration_id.as_str())
            && self.authorization_holds(
                env,
                &body.executor_registration_id,
                &body.harness_public_key,
                &body.harness_key_authorization,
            );
        if !valid {
            tracing::info!(environment = env, "harness key rejected");
        }
        Answer("200 OK", serde_json::json!({ "valid": valid }))
    }

    /// Whether `authorization` is one this relay minted for `key` on this
    /// registration, and has not expired.
    fn authorization_holds(
        &self,
        env: &str,
        registration: &str,
        key: &PublicKey,
        authorization: &str,
    ) -> bool {
        let mut parts = authorization.splitn(3, '.');
        let (Some("v1"), Some(expires), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(at) = expires.parse::<u64>() else {
            return false;
        };
        let expected = self.mac(&[
            b"authorization",
            env.as_bytes(),
            registration.as_bytes(),
            &key.bytes(),
            expires.as_bytes(),
        ]);
        same(mac.as_bytes(), expected.as_bytes()) && at >= now_secs()
    }

    /// Check a WebSocket URL's signature: who it is for.
    fn admit(&self, env: &str, query: &HashMap<String, String>) -> Result<Role, Answer> {
        let get = |k: &str| query.get(k).map(String::as_str).unwrap_or("");
        let stale = || {
            error(
                "401 Unauthorized",
                "stale_url",
                "the URL is not valid (any more)",
            )
        };
        let registration = get("reg");
        let current = lock(&self.environments)
            .get(env)
            .map(|e| e.registration_id.clone());
        if current.as_deref() != Some(registration) {
            return Err(stale());
        }
        match get("role") {
            "environment" => {
                let sig = self.mac(&[b"environment", env.as_bytes(), registration.as_bytes()]);
                if !same(get("sig").as_bytes(), sig.as_bytes()) {
                    return Err(stale());
                }
                Ok(Role::Environment(registration.to_string()))
            }
            "harness" => {
                let sig = self.mac(&[
                    b"harness",
                    env.as_bytes(),
                    registration.as_bytes(),
                    get("n").as_bytes(),
                    get("exp").as_bytes(),
                ]);
                let expires: u64 = get("exp").parse().unwrap_or(0);
                if !same(get("sig").as_bytes(), sig.as_bytes()) || expires < now_secs() {
                    return Err(stale());
                }
                // One bundle, one physical connection.
                let mut used = lock(&self.used);
                let now = now_secs();
                used.retain(|_, until| *until >= now);
                if used.len() >= MAX_USED {
                    return Err(error("503 Service Unavailable", "busy", "relay is busy"));
                }
                if used.insert(sig, expires).is_some() {
                    return Err(stale());
                }
                Ok(Role::Harness)
            }
            _ => Err(error(
                "400 Bad Request",
                "invalid_role",
                "role must be environment or harness",
            )),
        }
    }

    fn new_link(&self, capacity: usize) -> (Link, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(capacity);
        let link = Link {
            id: self.next_link.fetch_add(1, Ordering::Relaxed),
            tx,
            end: Arc::new(Notify::new()),
        };
        (link, rx)
    }

    async fn serve_executor(
        self: &Arc<Self>,
        env: String,
        registration: String,
        socket: tokio_tungstenite::WebSocketStream<Replay>,
    ) {
        let (link, rx) = self.new_link(EXECUTOR_QUEUE);
        {
            let mut environments = lock(&self.environments);
            let Some(entry) = environments.get_mut(&env) else {
                return;
            };
            if entry.registration_id != registration {
                return;
            }
            if let Some(old) = entry.executor.replace(link.clone()) {
                old.end.notify_one();
            }
        }
        tracing::info!(environment = env.as_str(), "executor connected");
        let relay = self.clone();
        let from_env = env.clone();
        pump(
            socket,
            rx,
            link.end.clone(),
            self.ping_every,
            self.pending.clone(),
            move |bytes| {
                // Route by stream id; the frame is read for that alone
                // (its payload is not even copied).
                let Ok((stream_id, _)) = RelayMessageFrame::route(&bytes) else {
                    return Next::Continue;
                };
                let target = lock(&relay.environments)
                    .get(&from_env)
                    .and_then(|e| e.streams.get(stream_id).cloned());
                match target {
                    // Waits a while for room: a harness that reads slowly
                    // slows its executor (TCP pushes back) rather than
                    // being dropped; one that stops reading is dropped.
                    Some(harness) => Next::Offer(harness, bytes),
                    None => Next::Continue,
                }
            },
        )
        .await;
        let streams = {
            let mut environments = lock(&self.environments);
            match environments.get_mut(&env) {
                Some(entry) if entry.executor.as_ref().is_some_and(|l| l.id == link.id) => {
                    entry.executor = None;
                    entry.streams.drain().map(|(_, l)| l).collect()
                }
                _ => Vec::new(),
            }
        };
        for stream in streams {
            stream.end.notify_one();
        }
        tracing::info!(environment = env.as_str(), "executor disconnected");
    }

    async fn serve_harness(
        self: &Arc<Self>,
        env: String,
        socket: tokio_tungstenite::WebSocketStream<Replay>,
    ) {
        let (link, rx) = self.new_link(HARNESS_QUEUE);
        let claimed: Arc<Mutex<Option<String>>> = Arc::default();
        let relay = self.clone();
        let from_env = env.clone();
        let me = link.clone();
        let mine = claimed.clone();
        pump(
            socket,
            rx,
            link.end.clone(),
            self.ping_every,
            self.pending.clone(),
            move |bytes| {
                let Ok((stream_id, kind)) = RelayMessageFrame::route(&bytes) else {
                    return Next::Continue;
                };
                let mut claimed = lock(&mine);
                let executor = {
                    let mut environments = lock(&relay.environments);
                    let Some(entry) = environments.get_mut(&from_env) else {
                        return Next::End;
                    };
                    match claimed.as_deref() {
                        None => {
                            // The first frame claims the stream id.
                            if kind != Kind::Resume
                                || entry.streams.contains_key(stream_id)
                                || entry.streams.len() >= MAX_STREAMS
                            {
                                return Next::End;
                            }
                            entry.streams.insert(stream_id.to_string(), me.clone());
                            *claimed = Some(stream_id.to_string());
                            tracing::info!(
                                environment = from_env.as_str(),
                                stream = stream_id,
                                "harness stream opened"
                            );
                        }
                        Some(id) if id != stream_id => return Next::Continue,
                        Some(_) => {}
                    }
                    entry.executor.clone()
                };
                match executor {
                    // The executor's queue is shared: a full one makes this
                    // harness wait (its reads stop), never drops a frame.
                    Some(executor) => Next::Forward(executor.tx, bytes),
                    None => Next::End,
                }
            },
        )
        .await;
        let stream = lock(&claimed).take();
        if let Some(stream) = stream {
            let executor = {
                let mut environments = lock(&self.environments);
                environments.get_mut(&env).and_then(|entry| {
                    if entry.streams.get(&stream).is_some_and(|l| l.id == link.id) {
                        entry.streams.remove(&stream);
                    }
                    entry.executor.clone()
                })
            };
            // The harness is gone: tell the executor, so the stream's
            // session detaches now (and can be resumed) rather than when
            // the executor next notices.
            if let Some(executor) = executor {
                let _ = executor
                    .tx
                    .try_send((RelayMessageFrame::reset(&stream).encode().into(), None));
            }
            tracing::info!(
                environment = env.as_str(),
                stream = stream.as_str(),
                "harness stream closed"
            );
        }
    }
}

/// What a socket's reader does with a frame.
enum Next {
    /// Read on.
    Continue,
    /// Close the socket.
    End,
    /// Queue it there, waiting for room (bounded by the write deadline;
    /// past it this socket is closed).
    Forward(mpsc::Sender<Queued>, bytes::Bytes),
    /// Queue it for that harness, waiting for room for [`OFFER_WAIT`] at
    /// most; past it the harness is dropped (its session resumes on a new
    /// stream) and this socket reads on.
    Offer(Link, bytes::Bytes),
}

enum Role {
    Environment(String),
    Harness,
}

/// Carry one socket: frames queued on `rx` are written; binary messages
/// read are given to `on_frame`, which says what next; text messages are
/// dropped. Pings every `ping_every`; silent for two, or `end` notified,
/// the socket is closed.
async fn pump(
    socket: tokio_tungstenite::WebSocketStream<Replay>,
    mut rx: mpsc::Receiver<Queued>,
    end: Arc<Notify>,
    ping_every: Duration,
    pending: Arc<Semaphore>,
    mut on_frame: impl FnMut(bytes::Bytes) -> Next,
) {
    let (mut sink, mut source) = socket.split();
    let limit = ping_every.saturating_mul(2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            message = source.next() => {
                let Some(Ok(message)) = message else { break };
                heard = tokio::time::Instant::now();
                match message {
                    Message::Binary(data) => match on_frame(data) {
                        Next::Continue => {}
                        Next::End => break,
                        Next::Offer(link, bytes) => {
                            let pending = pending.clone();
                            let offer = async {
                                let n = u32::try_from(bytes.len()).map_err(|_| ())?;
                                let share = pending.acquire_many_owned(n).await.map_err(|_| ())?;
                                link.tx.send((bytes, Some(share))).await.map_err(|_| ())
                            };
                            if !matches!(tokio::time::timeout(OFFER_WAIT, offer).await, Ok(Ok(()))) {
                                tracing::info!("a harness stopped reading; dropping its stream");
                                link.end.notify_one();
                            }
                        }
                        Next::Forward(tx, bytes) => {
                            let pending = pending.clone();
                            let forward = async move {
                                let n = u32::try_from(bytes.len()).map_err(|_| ())?;
                                let share = pending.acquire_many_owned(n).await.map_err(|_| ())?;
                                tx.send((bytes, Some(share))).await.map_err(|_| ())
                            };
                            if !matches!(tokio::time::timeout(limit, forward).await, Ok(Ok(()))) {
                                break;
                            }
                        }
                    },
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            out = rx.recv() => {
                // The frame's share of the budget goes once it is written.
                let Some((bytes, share)) = out else { break };
                // What else is queued goes in the same write (up to the
                // batch), then one flush.
                let mut shares = vec![share];
                let send = async {
                    sink.feed(Message::Binary(bytes)).await?;
                    for _ in 1..WRITE_BATCH {
                        let Ok((more, share)) = rx.try_recv() else { break };
                        shares.push(share);
                        sink.feed(Message::Binary(more)).await?;
                    }
                    sink.flush().await
                };
                if !matches!(tokio::time::timeout(limit, send).await, Ok(Ok(()))) {
                    break;
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= limit {
                    tracing::info!("a relay socket stopped answering pings; dropping it");
                    break;
                }
                let send = sink.send(Message::Ping(Vec::new().into()));
                if !matches!(tokio::time::timeout(limit, send).await, Ok(Ok(()))) {
                    break;
                }
            }
            () = end.notified() => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

async fn reply(stream: &mut TcpStream, answer: Answer) -> std::io::Result<()> {
    let Answer(status, body) = answer;
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
