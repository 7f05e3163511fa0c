//! `exec-server --remote URL --environment-id ID`: register with the
//! registry, keep one physical WebSocket to the rendezvous router, and
//! serve every Noise stream on it as one ordinary connection into the
//! server's session registry (so `initialize{resumeSessionId}` on a new
//! stream resumes a detached session).
//!
//! Per physical socket: at most 128 streams, 32 handshakes waiting for the
//! registry's `validate` (10 s each), 8 failed handshakes before the
//! socket is closed, 4 KiB authorizations, 128 records queued per stream,
//! 128 frames queued outbound. Reconnects back off from 1 s doubling to
//! 30 s; only an upgrade refused with a 4xx registers again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::dial::{DialError, Socket, dial};
use super::frame::{Body, RelayMessageFrame};
use super::noise::{Channel, Identity, MAX_AUTHORIZATION, PublicKey, Responder, prologue};
use super::registry::{Registration, Registry, Secret, strip_query};
use crate::server::{Server, connection};
use crate::transport::{Encoded, Frame, OUTBOUND_CAPACITY, Outbound, Transport};

/// Streams of one physical socket at most.
pub const MAX_STREAMS: usize = 128;
/// Handshakes waiting for the registry at most.
pub const MAX_PENDING: usize = 32;
/// Failed handshakes before the physical socket is closed.
pub const FAILURE_BUDGET: u32 = 8;
/// The registry's time to validate a harness key.
pub const VALIDATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Records queued for one stream at most; past it the stream is reset.
const STREAM_QUEUE: usize = 128;
/// Frames queued for the physical socket at most.
const PHYSICAL_QUEUE: usize = 128;
/// How long the reader waits for room in a stream's record queue before
/// it resets that stream (every stream of the socket waits meanwhile).
const STREAM_WAIT: Duration = Duration::from_secs(10);
/// Frames written to the physical socket with one flush at most.
const WRITE_BATCH: usize = 16;
/// The first reconnect delay, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Remote mode's settings.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The registry's base URL.
    pub registry: String,
    /// The environment to register as (trimmed, non-empty).
    pub environment_id: String,
    /// `--name`: for logs only (the reference sends it nowhere either).
    pub name: String,
    /// The registry bearer token.
    pub token: Secret,
    /// How often the physical socket is pinged; a pong must come within
    /// two of these.
    pub ping_every: Duration,
}

/// `exec-server --remote`: a server with no listener of its own (stdin
/// only with `--exit-on-stdin-close`) that serves the relay's streams.
pub fn run_remote(config: crate::server::Config, remote: RemoteConfig) -> std::io::Result<()> {
    crate::server::run_with(
        config,
        &[],
        Some(Box::new(move |server| Box::pin(run(server, remote)))),
    )
}

/// Serve the environment until the server shuts down.
pub async fn run(server: Arc<Server>, config: RemoteConfig) {
    let identity = match Identity::generate() {
        Ok(identity) => Arc::new(identity),
        Err(err) => {
            tracing::error!("remote mode: cannot make a Noise identity: {err}");
            return;
        }
    };
    let registry = match Registry::new(&config.registry, config.token.clone()) {
        Ok(registry) => registry,
        Err(err) => {
            tracing::error!("remote mode: {err}");
            return;
        }
    };
    let env = config.environment_id.clone();
    tracing::info!(
        environment = env.as_str(),
        name = config.name.as_str(),
        key = identity.public().fingerprint().as_str(),
        "remote mode: executor identity made"
    );
    let mut registration: Option<Registration> = None;
    let mut backoff = BACKOFF_FIRST;
    loop {
        let current = match &registration {
            Some(r) => r.clone(),
            None => match registry.register(&env, &identity.public()).await {
                Ok(r) => {
                    tracing::info!(
                        environment = env.as_str(),
                        registration = r.executor_registration_id.as_str(),
                        relay = strip_query(&r.url),
                        "registered with the registry"
                    );
                    registration = Some(r.clone());
                    r
                }
                Err(err) => {
                    tracing::warn!("registering {env}: {err}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        match dial(&current.url).await {
            Ok(socket) => {
                backoff = BACKOFF_FIRST;
                tracing::info!(environment = env.as_str(), "connected to the relay");
                let physical = Physical {
                    server: server.clone(),
                    identity: identity.clone(),
                    registry: registry.clone(),
                    environment_id: env.clone(),
                    registration_id: current.executor_registration_id.clone(),
                    ping_every: config.ping_every,
                };
                let reason = physical.serve(socket).await;
                tracing::info!(environment = env.as_str(), reason, "relay connection ended");
                if reason == "local_shutdown" {
                    return;
                }
            }
            Err(DialError::Refused(status)) if (400..500).contains(&status) => {
                // The URL is stale: register again (same key).
                tracing::info!("the relay refused the executor URL ({status}); registering again");
                registration = None;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(err) => {
                tracing::warn!("connecting {env} to the relay: {err}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// What the reader does after a frame.
enum Step {
    /// Read on.
    Go,
    /// Close the socket, for this reason.
    Close(&'static str),
    /// Wait for room in this stream's queue (instance, queue, record).
    Deliver(String, u64, mpsc::Sender<(u32, Vec<u8>)>, (u32, Vec<u8>)),
}

/// Write what the streams send, and ping; returns why it stopped
/// (`write_error`, `pong_timeout`), or `closed` once told to stop (after
/// writing what is queued when `stop` says so).
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut out: mpsc::Receiver<Vec<u8>>,
    mut stop: tokio::sync::oneshot::Receiver<bool>,
    ping_every: Duration,
    pong_seen: Arc<std::sync::atomic::AtomicBool>,
) -> &'static str {
    use std::sync::atomic::Ordering;
    let pong_timeout = ping_every.saturating_mul(2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the ping now outstanding was flushed.
    let mut ping_sent: Option<tokio::time::Instant> = None;
    let reason = loop {
        if ping_sent.is_some() && pong_seen.load(Ordering::SeqCst) {
            ping_sent = None;
        }
        let deadline = ping_sent.map(|at| at + pong_timeout);
        tokio::select! {
            queued = out.recv() => {
                let Some(bytes) = queued else { break "closed" };
                // What else is queued goes in the same write (up to the
                // batch), then one flush.
                let send = async {
                    sink.feed(Message::Binary(bytes.into())).await?;
                    for _ in 1..WRITE_BATCH {
                        let Ok(more) = out.try_recv() else { break };
                        sink.feed(Message::Binary(more.into())).await?;
                    }
                    sink.flush().await
                };
                let limit = deadline.unwrap_or_else(|| tokio::time::Instant::now() + pong_timeout);
                if !matches!(tokio::time::timeout_at(limit, send).await, Ok(Ok(()))) {
                    break "write_error";
                }
            }
            _ = ping.tick() => {
                if ping_sent.is_none() {
                    pong_seen.store(false, Ordering::SeqCst);
                    let send = sink.send(Message::Ping(Vec::new().into()));
                    if !matches!(tokio::time::timeout(pong_timeout, send).await, Ok(Ok(()))) {
                        break "write_error";
                    }
                    ping_sent = Some(tokio::time::Instant::now());
                }
            }
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if !pong_seen.load(Ordering::SeqCst) {
                    break "pong_timeout";
                }
                ping_sent = None;
            }
            flush = &mut stop => {
                if flush.unwrap_or(false) {
                    let drain = async {
                        while let Ok(bytes) = out.try_recv() {
                            if sink.feed(Message::Binary(bytes.into())).await.is_err() {
                                break;
                            }
                        }
                        let _ = sink.flush().await;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                }
                break "closed";
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    reason
}

/// One physical socket's context.
struct Physical {
    server: Arc<Server>,
    identity: Arc<Identity>,
    registry: Registry,
    environment_id: String,
    registration_id: String,
    ping_every: Duration,
}

/// What the socket loop hears from its tasks.
enum Event {
    /// The registry answered for a pending handshake.
    Validated {
        stream: String,
        instance: u64,
        valid: bool,
    },
    /// A stream's task ended.
    Ended { stream: String, instance: u64 },
}

struct Pending {
    instance: u64,
    responder: Responder,
    validation: tokio::task::JoinHandle<()>,
}

struct Active {
    instance: u64,
    records: mpsc::Sender<(u32, Vec<u8>)>,
}

/// The state of one physical socket.
struct Streams {
    active: HashMap<String, Active>,
    pending: HashMap<String, Pending>,
    failures: u32,
    next_instance: u64,
}

impl Physical {
    /// Serve the socket until it ends; the reason, as the reference names
    /// it (`peer_close`, `read_error`, `write_error`, `pong_timeout`,
    /// `local_shutdown`, `failure_budget`).
    ///
    /// Reading and writing are two tasks: the reader may wait for a
    /// stream's queue (a stream busy sending a large answer takes its
    /// records a moment later) while the writer goes on draining what the
    /// streams send, so neither waits on the other.
    async fn serve(&self, socket: Socket) -> &'static str {
        let (sink, mut source) = socket.split();
        let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(PHYSICAL_QUEUE);
        let (event_tx, mut event_rx) = mpsc::unbounded_channel::<Event>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<bool>();
        let pong_seen = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut writer = tokio::spawn(write_loop(
            sink,
            out_rx,
            stop_rx,
            self.ping_every,
            pong_seen.clone(),
        ));
        let mut streams = Streams {
            active: HashMap::new(),
            pending: HashMap::new(),
            failures: 0,
            next_instance: 1,
        };
        let mut shutdown = self.server.shutdown.subscribe();
        let reason = loop {
            if *shutdown.borrow_and_update() {
                break "local_shutdown";
            }
            tokio::select! {
                message = source.next() => match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        match self.on_frame(&bytes, &mut streams, &out_tx, &event_tx) {
                            Step::Go => {}
                            Step::Close(reason) => break reason,
                            Step::Deliver(stream, instance, records, record) => {
                                // Wait for room a while; a stream that takes
                                // nothing for that long is reset.
                                let sent = tokio::time::timeout(STREAM_WAIT, records.send(record)).await;
                                if !matches!(sent, Ok(Ok(()))) {
                                    tracing::debug!("a stream took no record for {STREAM_WAIT:?}; resetting it");
                                    if streams.active.get(&stream).is_some_and(|a| a.instance == instance) {
                                        streams.active.remove(&stream);
                                    }
                                    let _ = out_tx.try_send(RelayMessageFrame::reset(&stream).encode());
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Pong(_))) => pong_seen.store(true, std::sync::atomic::Ordering::SeqCst),
                    Some(Ok(Message::Close(_))) | None => break "peer_close",
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break "read_error",
                },
                Some(event) = event_rx.recv() => {
                    if let Some(reason) = self.on_event(event, &mut streams, &out_tx, &event_tx) {
                        break reason;
                    }
                }
                ended = &mut writer => break ended.unwrap_or("write_error"),
                _ = shutdown.changed() => break "local_shutdown",
            }
        };
        // Every stream ends with the socket: their connections end and
        // their sessions detach, to be resumed on a new stream.
        for (_, pending) in streams.pending.drain() {
            pending.validation.abort();
        }
        streams.active.clear();
        // What was queued (the last reset, say) goes before the close, when
        // the socket still carries anything.
        let _ = stop_tx.send(matches!(reason, "failure_budget" | "local_shutdown"));
        if !writer.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(3), &mut writer).await;
        }
        writer.abort();
        reason
    }

    /// Charge one failed handshake; the reason to close the socket once
    /// the budget is spent.
    fn fail(
        &self,
        streams: &mut Streams,
        out: &mpsc::Sender<Vec<u8>>,
        stream: &str,
    ) -> Option<&'static str> {
        let _ = out.try_send(RelayMessageFrame::reset(stream).encode());
        streams.failures += 1;
        if streams.failures >= FAILURE_BUDGET {
            tracing::warn!(
                environment = self.environment_id.as_str(),
                "{FAILURE_BUDGET} failed handshakes on this relay connection; closing it"
            );
            return Some("failure_budget");
        }
        None
    }

    fn on_frame(
        &self,
        bytes: &[u8],
        streams: &mut Streams,
        out: &mpsc::Sender<Vec<u8>>,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Step {
        let frame = match RelayMessageFrame::decode_valid(bytes) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::debug!("dropped a relay frame: {err}");
                return Step::Go;
            }
        };
        let id = frame.stream_id;
        match frame.body {
            Some(Body::Handshake(handshake)) => {
                if streams.active.contains_key(&id) {
                    let _ = out.try_send(RelayMessageFrame::reset(&id).encode());
                    return Step::Go;
                }
                if let Some(pending) = streams.pending.remove(&id) {
                    pending.validation.abort();
                    return self.fail(streams, out, &id).map_or(Step::Go, Step::Close);
                }
                if streams.active.len() >= MAX_STREAMS || streams.pending.len() >= MAX_PENDING {
                    tracing::info!("a stream was refused: the executor is at its stream limit");
                    let _ = out.try_send(RelayMessageFrame::reset(&id).encode());
                    return Step::Go;
                }
                let p = prologue(&self.environment_id, &self.registration_id, &id);
                let Ok(mut responder) = Responder::new(&self.identity, &p) else {
                    return self.fail(streams, out, &id).map_or(Step::Go, Step::Close);
                };
                let (key, authorization) = match responder.read_first(&handshake.payload) {
                    Ok(read) => read,
                    Err(err) => {
                        tracing::debug!("a handshake failed: {err}");
                        return self.fail(streams, out, &id).map_or(Step::Go, Step::Close);
                    }
                };
                if authorization.len() > MAX_AUTHORIZATION {
                    tracing::debug!("a handshake carried an oversized authorization");
                    return self.fail(streams, out, &id).map_or(Step::Go, Step::Close);
                }
                let Ok(authorization) = String::from_utf8(authorization) else {
                    return self.fail(streams, out, &id).map_or(Step::Go, Step::Close);
                };
                let instance = streams.next_instance;
                streams.next_instance += 1;
                let validation = tokio::spawn(validate(
                    self.registry.clone(),
                    self.environment_id.clone(),
                    self.registration_id.clone(),
                    key,
                    authorization,
                    id.clone(),
                    instance,
                    events.clone(),
                ));
                streams.pending.insert(
                    id,
                    Pending {
                        instance,
                        responder,
                        validation,
                    },
                );
                Step::Go
            }
            Some(Body::Data(data)) => {
                if let Some(active) = streams.active.get(&id) {
                    return match active.records.try_send((data.seq, data.payload)) {
                        Ok(()) => Step::Go,
                        Err(mpsc::error::TrySendError::Full(record)) => {
                            Step::Deliver(id, active.instance, active.records.clone(), record)
                        }
                        // Its task is ending; it says so itself.
                        Err(mpsc::error::TrySendError::Closed(_)) => Step::Go,
                    };
                }
                if let Some(pending) = streams.pending.remove(&id) {
                    // Early data: nothing may come before message 2.
                    pending.validation.abort();
                    return self.fail(streams, out, &id).map_or(Step::Go, Step::Close);
                }
                let _ = out.try_send(RelayMessageFrame::reset(&id).encode());
                Step::Go
            }
            Some(Body::Reset(_)) => {
                // The reason is untrusted: the stream just ends.
                if let Some(pending) = streams.pending.remove(&id) {
                    pending.validation.abort();
                }
                streams.active.remove(&id);
                Step::Go
            }
            // resume, ack_frame, heartbeat: nothing to do.
            _ => Step::Go,
        }
    }

    fn on_event(
        &self,
        event: Event,
        streams: &mut Streams,
        out: &mpsc::Sender<Vec<u8>>,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Option<&'static str> {
        match event {
            Event::Ended { stream, instance } => {
                if streams
                    .active
                    .get(&stream)
                    .is_some_and(|a| a.instance == instance)
                {
                    streams.active.remove(&stream);
                }
                None
            }
            Event::Validated {
                stream,
                instance,
                valid,
            } => {
                if streams
                    .pending
                    .get(&stream)
                    .is_none_or(|p| p.instance != instance)
                {
                    return None;
                }
                let pending = streams.pending.remove(&stream)?;
                if !valid {
                    tracing::info!("a harness key was not authorized");
                    return self.fail(streams, out, &stream);
                }
                let Ok((reply, channel)) = pending.responder.reply() else {
                    return self.fail(streams, out, &stream);
                };
                if out
                    .try_send(RelayMessageFrame::handshake(&stream, reply).encode())
                    .is_err()
                {
                    return Some("write_error");
                }
                let (records_tx, records_rx) = mpsc::channel(STREAM_QUEUE);
                streams.active.insert(
                    stream.clone(),
                    Active {
                        instance,
                        records: records_tx,
                    },
                );
                tracing::info!(
                    environment = self.environment_id.as_str(),
                    active = streams.active.len(),
                    "a harness stream was opened"
                );
                tokio::spawn(serve_stream(
                    self.server.clone(),
                    stream,
                    instance,
                    channel,
                    records_rx,
                    out.clone(),
                    events.clone(),
                ));
                None
            }
        }
    }
}

/// Ask the registry whether `key` may connect; anything but an explicit
/// `valid: true` in time is a no.
#[allow(clippy::too_many_arguments)]
async fn validate(
    registry: Registry,
    environment_id: String,
    registration_id: String,
    key: PublicKey,
    authorization: String,
    stream: String,
    instance: u64,
    events: mpsc::UnboundedSender<Event>,
) {
    let asked = registry.validate(&environment_id, &registration_id, &key, &authorization);
    let valid = match tokio::time::timeout(VALIDATION_TIMEOUT, asked).await {
        Ok(Ok(valid)) => valid,
        Ok(Err(err)) => {
            tracing::warn!("{err}");
            false
        }
        Err(_) => {
            tracing::warn!("the registry did not validate a harness key in time");
            false
        }
    };
    let _ = events.send(Event::Validated {
        stream,
        instance,
        valid,
    });
}

/// One stream: records in, decrypted messages to a connection of the
/// server; the connection's messages out, sealed.
async fn serve_stream(
    server: Arc<Server>,
    stream: String,
    instance: u64,
    mut channel: Channel,
    mut records: mpsc::Receiver<(u32, Vec<u8>)>,
    out: mpsc::Sender<Vec<u8>>,
    events: mpsc::UnboundedSender<Event>,
) {
    let max_message = server.config.max_message_bytes;
    let (in_tx, in_rx) = mpsc::channel(64);
    let (enc_tx, mut enc_rx) = mpsc::channel::<Encoded>(OUTBOUND_CAPACITY);
    let transport = Transport {
        incoming: in_rx,
        outgoing: Outbound::new(enc_tx, crate::jsonrpc::encode_line),
    };
    let mut serving = tokio::spawn(connection::serve(server, transport));
    loop {
        tokio::select! {
            record = records.recv() => {
                let Some((seq, record)) = record else { break };
                match channel.open(seq, record) {
                    Ok(messages) => {
                        let mut gone = false;
                        for message in messages {
                            let frame = if message.len() > max_message {
                                Frame::TooLong { size: message.len() }
                            } else {
                                Frame::Line(message)
                            };
                            gone |= in_tx.send(frame).await.is_err();
                        }
                        if gone {
                            break;
                        }
                    }
                    Err(err) => {
                        tracing::debug!("a stream failed: {err}");
                        break;
                    }
                }
            }
            encoded = enc_rx.recv() => {
                let Some(encoded) = encoded else { break };
                // A line without its newline, or a binary frame (granted
                // to a client that asked) as it is.
                let mut body = encoded.body.clone().unwrap_or_default();
                let mut head = &encoded.head[..];
                if head.first() != Some(&crate::frame::MARK) {
                    if body.is_empty() {
                        head = head.strip_suffix(b"\n").unwrap_or(head);
                    } else if body.ends_with(b"\n") {
                        body.truncate(body.len() - 1);
                    }
                }
                let frames = match channel.seal_frames(&stream, &[head, &body]) {
                    Ok(frames) => frames,
                    Err(err) => {
                        tracing::warn!("a stream cannot send: {err}");
                        break;
                    }
                };
                let mut gone = false;
                for frame in frames {
                    gone |= out.send(frame).await.is_err();
                }
                if gone {
                    break;
                }
            }
            _ = &mut serving => break,
        }
    }
    drop(in_tx);
    // The connection ends (its session detaches) before the slot is freed.
    let _ = serving.await;
    let _ = out.try_send(RelayMessageFrame::reset(&stream).encode());
    let _ = events.send(Event::Ended { stream, instance });
}
