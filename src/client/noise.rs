//! Reaching a remote executor through a relay (`noise+http://HOST:PORT/ENV`,
//! `noise+https://…`): ask the registry for a connect bundle, open the
//! bundle's WebSocket, claim a fresh stream, run the Noise handshake with
//! the executor's pinned key, then carry JSON-RPC messages as sealed
//! records. Seen from the rest of the client it is a pair of pipes, as a
//! spawned server's are: one line per message.
//!
//! Every physical attempt takes a new bundle (they are single-use) and a
//! new stream id; a lost stream is resumed on a new one by the session
//! layer above, exactly as over `ws://`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use super::connection::Pipes;
use crate::remote::dial::dial;
use crate::remote::frame::{Body, RelayMessageFrame};
use crate::remote::noise::{Identity, Initiator, prologue};
use crate::remote::registry::{Bundle, Registry, Secret};

/// The registry bearer token variable (the reference orchestrator's).
pub const AUTH_TOKEN_VARIABLE: &str = "CODEX_EXEC_SERVER_NOISE_AUTH_TOKEN";

/// How long the registry may stay unable to hand out a bundle (the
/// executor offline, the registry restarting) before a connection attempt
/// fails.
const BUNDLE_PATIENCE: Duration = Duration::from_secs(10);
/// How long the handshake may take once the socket is open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a Noise environment is: the registry's base URL and the
/// environment id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http://HOST:PORT[/PREFIX]` or `https://…`.
    pub registry: String,
    /// The environment.
    pub environment_id: String,
}

impl Target {
    /// `noise+http://HOST:PORT[/PREFIX]/ENVIRONMENT_ID` (or `noise+https`).
    pub fn parse(address: &str) -> Result<Target, String> {
        let address = address.trim();
        let rest = address
            .strip_prefix("noise+")
            .filter(|r| r.starts_with("http://") || r.starts_with("https://"))
            .ok_or_else(|| {
                "a Noise address is noise+http://HOST:PORT/ENVIRONMENT_ID (or noise+https://)"
                    .to_string()
            })?;
        let rest = rest.split(['?', '#']).next().unwrap_or(rest);
        let (scheme, after) = rest.split_once("://").unwrap_or(("http", rest));
        let Some((base, environment)) = after.trim_end_matches('/').rsplit_once('/') else {
            return Err(format!(
                "{address}: the environment id is missing (noise+{scheme}://HOST:PORT/ENVIRONMENT_ID)"
            ));
        };
        let environment = crate::protocol::percent_decode(environment)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .ok_or_else(|| format!("{address}: the environment id is not percent-encoded right"))?;
        if base.is_empty() || environment.trim().is_empty() {
            return Err(format!(
                "{address}: expected noise+{scheme}://HOST:PORT/ENVIRONMENT_ID"
            ));
        }
        Ok(Target {
            registry: format!("{scheme}://{base}"),
            environment_id: environment.trim().to_string(),
        })
    }
}

/// This process's harness identity: one, reused across reconnects.
fn identity() -> Result<&'static Identity, String> {
    static IDENTITY: OnceLock<Result<Identity, String>> = OnceLock::new();
    IDENTITY
        .get_or_init(|| Identity::generate().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// A connect bundle, retrying what may pass (no answer, 5xx, 408, 429,
/// the executor offline) with backoff from 0.5 s doubling to 5 s, for
/// [`BUNDLE_PATIENCE`].
async fn bundle(
    registry: &Registry,
    target: &Target,
    identity: &Identity,
) -> Result<Bundle, String> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(500);
    loop {
        match registry
            .connect(&target.environment_id, &identity.public())
            .await
        {
            Ok(bundle) => return Ok(bundle),
            Err(err) if err.retryable() && start.elapsed() + backoff < BUNDLE_PATIENCE => {
                tracing::debug!("registry connect: {err}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// A random UUID v4, as the reference's harness names its streams.
fn stream_id() -> String {
    let mut b = crate::remote::random_bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Open one Noise stream to `target` and see it as lines: each message
/// that comes in is one line of the reader; each line written goes out as
/// one message. A task carries both ways; the stream ends (the reader sees
/// EOF) on a reset, a bad frame or record, a close, or two `keepalive`
/// intervals without a word from the relay.
pub(super) async fn lines(
    target: &Target,
    token: &str,
    keepalive: Duration,
) -> Result<Pipes, String> {
    let identity = identity()?;
    let registry =
        Registry::new(&target.registry, Secret::new(token)).map_err(|e| e.to_string())?;
    // A reset during the handshake may be the executor at a passing limit
    // (handshakes waiting for the registry): a few more tries, each with a
    // new bundle and stream.
    let mut backoff = Duration::from_millis(250);
    let mut attempt = 1;
    let (mut sink, mut source, mut channel, stream) = loop {
        match open_stream(&registry, target, identity).await {
            Ok(open) => break open,
            Err(Attempt::Reset) if attempt < HANDSHAKE_ATTEMPTS => {
                tracing::debug!("the executor reset a handshake; trying again in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(Attempt::Reset) => return Err(RESET.to_string()),
            Err(Attempt::Failed(why)) => return Err(why),
        }
    };
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (their_read, mut their_write) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut lines = crate::lines::LineReader::new(their_read);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        let limit = keepalive.saturating_mul(2);
        'carry: loop {
            tokio::select! {
                read = lines.next_line() => {
                    let Ok(Some(line)) = read else { break };
                    let line = line.trim_ascii_end();
                    if line.is_empty() {
                        continue;
                    }
                    let Ok(frames) = channel.seal_frames(&stream, &[line]) else { break };
                    for frame in frames {
                        let send = sink.send(Message::Binary(frame.into()));
                        if !matches!(tokio::time::timeout(limit, send).await, Ok(Ok(()))) {
                            break 'carry;
                        }
                    }
                }
                message = source.next() => {
                    let Some(Ok(message)) = message else { break };
                    heard = tokio::time::Instant::now();
                    let bytes = match message {
                        Message::Binary(bytes) => bytes,
                        Message::Close(_) | Message::Text(_) => break,
                        _ => continue,
                    };
                    // Records of our stream are decrypted where they lie.
                    if let Some((id, seq, range)) = RelayMessageFrame::data_payload(&bytes) {
                        if id != stream {
                            continue;
                        }
                        let Ok(messages) = channel.open_from(seq, &bytes[range]) else {
                            tracing::debug!("a record from the executor failed; ending the stream");
                            break;
                        };
                        for message in messages {
                            // A binary frame says its own length.
                            let line = message.first() != Some(&crate::frame::MARK);
                            if their_write.write_all(&message).await.is_err()
                                || (line && their_write.write_all(b"\n").await.is_err())
                            {
                                break 'carry;
                            }
                        }
                        continue;
                    }
                    let Ok(frame) = RelayMessageFrame::decode_valid(&bytes) else { break };
                    if frame.stream_id != stream {
                        continue;
                    }
                    // Every valid data frame was taken above; a reset or a
                    // second handshake ends the stream.
                    if matches!(
                        frame.body,
                        Some(Body::Data(_) | Body::Reset(_) | Body::Handshake(_))
                    ) {
                        break;
                    }
                }
                _ = ping.tick() => {
                    if !super::connection::keep_alive(&mut sink, heard, limit, "the relay").await {
                        break;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    });
    let (read, write) = tokio::io::split(ours);
    Ok((Box::new(write), Box::new(read)))
}

/// How many handshakes a connection attempt makes when the executor resets
/// them.
const HANDSHAKE_ATTEMPTS: u32 = 4;

/// What a reset says, whatever the wire's reason (it is untrusted).
const RESET: &str = "Noise relay stream reset";

/// Why one stream did not open.
enum Attempt {
    /// The executor reset the stream during the handshake.
    Reset,
    /// Anything else.
    Failed(String),
}

type Sink = futures_util::stream::SplitSink<crate::remote::dial::Socket, Message>;
type Source = futures_util::stream::SplitStream<crate::remote::dial::Socket>;

/// One stream: a bundle, its socket, the claim and the handshake.
async fn open_stream(
    registry: &Registry,
    target: &Target,
    identity: &Identity,
) -> Result<(Sink, Source, crate::remote::noise::Channel, String), Attempt> {
    let failed = |e: String| Attempt::Failed(e);
    let bundle = bundle(registry, target, identity).await.map_err(failed)?;
    let socket = dial(&bundle.url)
        .await
        .map_err(|e| Attempt::Failed(e.to_string()))?;
    let stream = stream_id();
    let p = prologue(
        &target.environment_id,
        &bundle.executor_registration_id,
        &stream,
    );
    let mut initiator = Initiator::new(identity, &bundle.executor_public_key, &p)
        .map_err(|e| Attempt::Failed(e.to_string()))?;
    let first = initiator
        .first_message(bundle.harness_key_authorization.as_bytes())
        .map_err(|e| Attempt::Failed(e.to_string()))?;
    let (mut sink, mut source) = socket.split();
    let handshake = async {
        sink.send(Message::Binary(
            RelayMessageFrame::resume(&stream).encode().into(),
        ))
        .await
        .map_err(|_| Some("the relay closed the connection".to_string()))?;
        sink.send(Message::Binary(
            RelayMessageFrame::handshake(&stream, first).encode().into(),
        ))
        .await
        .map_err(|_| Some("the relay closed the connection".to_string()))?;
        loop {
            let message = match source.next().await {
                Some(Ok(message)) => message,
                Some(Err(_)) | None => {
                    return Err(Some(
                        "the relay closed the connection during the handshake".to_string(),
                    ));
                }
            };
            let bytes = match message {
                Message::Binary(bytes) => bytes,
                Message::Text(_) => {
                    return Err(Some(
                        "relay exec-server transport expects binary protobuf frames".to_string(),
                    ));
                }
                Message::Close(_) => {
                    return Err(Some(
                        "the relay closed the connection during the handshake".to_string(),
                    ));
                }
                _ => continue,
            };
            let frame = RelayMessageFrame::decode_valid(&bytes).map_err(|e| Some(e.to_string()))?;
            if frame.stream_id != stream {
                continue;
            }
            match frame.body {
                Some(Body::Handshake(reply)) => return Ok(reply.payload),
                // The wire reason is untrusted: never shown.
                Some(Body::Reset(_)) => return Err(None),
                Some(Body::Data(_)) => {
                    return Err(Some(
                        "Noise relay received data before handshake completion".to_string(),
                    ));
                }
                _ => continue,
            }
        }
    };
    let reply = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Err(_) => {
            return Err(Attempt::Failed(
                "the executor did not complete the Noise handshake in time".into(),
            ));
        }
        Ok(Err(None)) => return Err(Attempt::Reset),
        Ok(Err(Some(why))) => return Err(Attempt::Failed(why)),
        Ok(Ok(reply)) => reply,
    };
    let mut channel = initiator
        .finish(&reply)
        .map_err(|e| Attempt::Failed(e.to_string()))?;
    // Output may come as binary frames when the client asks for them.
    channel.accept_frames();
    Ok((sink, source, channel, stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_the_registry_and_the_environment() {
        assert_eq!(
            Target::parse("noise+http://127.0.0.1:9/env-1").unwrap(),
            Target {
                registry: "http://127.0.0.1:9".into(),
                environment_id: "env-1".into()
            }
        );
        let t = Target::parse("noise+https://relay.example/prefix/my%20env/").unwrap();
        assert_eq!(t.registry, "https://relay.example/prefix");
        assert_eq!(t.environment_id, "my env");
        assert!(Target::parse("noise+http://host:1").is_err());
        assert!(Target::parse("noise+ws://host:1/e").is_err());
        assert!(Target::parse("http://host:1/e").is_err());
    }

    #[test]
    fn stream_ids_are_uuid_v4() {
        let id = stream_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, stream_id());
    }
}
