//! The WebSocket transport, with the reference server's conventions: one
//! JSON-RPC message per WebSocket message (text or binary accepted; text
//! sent), `GET /readyz` answers 200, any request with an `Origin` header
//! gets 403 (no browser page may drive a local server), a plain `GET /`
//! (no `Upgrade: websocket`) 426 with a line saying what this is, other
//! paths 404, and a ping every 30 s (`--ws-ping-interval-ms`); a peer that answers no
//! ping for two intervals, or takes that long to take a message, is
//! dropped.
//! With a connection token, every other request must carry it
//! (`Authorization: Bearer T` or `?token=T`; compared in constant time).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Frame, OUTBOUND_CAPACITY, Outbound, Outgoing, Transport};
use crate::jsonrpc::encode_line;

/// How long a peer may take to send its request head (it holds a slot of
/// the few kept for connections not yet authenticated).
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head accepted.
const HEAD_BYTES: usize = 16 * 1024;

/// The limits of one WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest message accepted.
    pub max_message_bytes: usize,
    /// How often the server pings; a peer may go two of these without
    /// answering.
    pub ping_every: Duration,
}

/// What an accepted TCP connection is.
pub enum Accepted {
    /// A WebSocket connection, ready to serve.
    Connection(Transport),
    /// An HTTP request that was answered (readyz, refusals).
    Answered,
}

/// Serve the HTTP part of one TCP connection: answer it, or upgrade it.
/// `vet` runs once a complete request for the WebSocket path is in,
/// before its token is checked: `Some((status, why))` refuses it with that
/// status line (`403 Forbidden`, `503 Service Unavailable`).
pub async fn accept<V, F>(
    mut stream: TcpStream,
    token: Option<&str>,
    limits: Limits,
    vet: V,
) -> io::Result<Accepted>
where
    V: FnOnce() -> F,
    F: std::future::Future<Output = Option<(&'static str, String)>>,
{
    let max_message_bytes = limits.max_message_bytes;
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request head in time"))??;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(&head);
    if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
        respond(&mut stream, "400 Bad Request").await?;
        return Ok(Accepted::Answered);
    }
    let target = request.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let header = |name: &str| header_value(request.headers, name);
    if header("origin").is_some() {
        crate::audit::record(
            "refused",
            || serde_json::json!({"transport": "ws", "status": 403, "message": "a browser's request (Origin header)"}),
        );
        respond(&mut stream, "403 Forbidden").await?;
        return Ok(Accepted::Answered);
    }
    match (request.method, path) {
        (Some("GET"), "/readyz") => {
            respond(&mut stream, "200 OK").await?;
            return Ok(Accepted::Answered);
        }
        (_, "/") => {
            let upgrade = header("upgrade").is_some_and(|u| {
                u.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
            });
            if !upgrade {
                // A browser or curl: say what this is instead of a reset.
                answer(
                    &mut stream,
                    "426 Upgrade Required",
                    "upgrade: websocket\r\nsec-websocket-version: 13\r\n",
                    "This is an exec-server endpoint: JSON-RPC 2.0 over WebSocket. \
                     Connect with a WebSocket client, e.g. \
                     `exec-server run --via ws://HOST:PORT -- CMD`.\n",
                )
                .await?;
                return Ok(Accepted::Answered);
            }
        }
        _ => {
            respond(&mut stream, "404 Not Found").await?;
            return Ok(Accepted::Answered);
        }
    }
    if let Some((status, why)) = vet().await {
        tracing::warn!("refused a websocket connection: {why}");
        crate::audit::record(
            "refused",
            || serde_json::json!({"transport": "ws", "status": status, "message": why}),
        );
        respond(&mut stream, status).await?;
        return Ok(Accepted::Answered);
    }
    if let Some(token) = token {
        let bearer = header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string()));
        // The query's token percent-decoded (a `+` taken as itself or as
        // a space, as form encoding has it).
        let in_query: Vec<Vec<u8>> = query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("token="))
            .flat_map(|raw| {
                let plain = percent_decode(raw.as_bytes());
                let form = percent_decode(raw.replace('+', " ").as_bytes());
                [plain, form]
            })
            .collect();
        let matches = match bearer {
            Some(given) => same(given.as_bytes(), token.as_bytes()),
            None => in_query
                .iter()
                .fold(false, |hit, given| same(given, token.as_bytes()) | hit),
        };
        if !matches {
            crate::audit::record(
                "refused",
                || serde_json::json!({"transport": "ws", "status": 401, "message": "no valid connection token"}),
            );
            respond(&mut stream, "401 Unauthorized").await?;
            return Ok(Accepted::Answered);
        }
    }
    // The library's own limits sit above ours, so that a message over our
    // limit (but not absurdly so) is answered with `messageTooLarge` like a
    // long line; beyond the library's, the connection is closed.
    let mut config = WebSocketConfig::default();
    let ceiling = max_message_bytes.max(64 << 20).saturating_add(1 << 20);
    config.max_message_size = Some(ceiling);
    config.max_frame_size = Some(ceiling);
    let replay = Replay {
        head,
        at: 0,
        stream,
    };
    let socket = tokio_tungstenite::accept_async_with_config(replay, Some(config))
        .await
        .map_err(io::Error::other)?;
    Ok(Accepted::Connection(serve(socket, limits)))
}

/// The transport of one upgraded connection.
fn serve(socket: tokio_tungstenite::WebSocketStream<Replay>, limits: Limits) -> Transport {
    let max_message_bytes = limits.max_message_bytes;
    let ping_every = limits.ping_every;
    let pong_timeout = ping_every.saturating_mul(2);
    let (mut sink, mut source) = socket.split();
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, mut out_rx) = mpsc::channel::<super::Encoded>(OUTBOUND_CAPACITY);
    let (pong_tx, mut pong_rx) = mpsc::unbounded_channel::<()>();
    let reader = tokio::spawn(async move {
        while let Some(message) = source.next().await {
            let data = match message {
                Ok(Message::Text(text)) => text.as_bytes().to_vec(),
                Ok(Message::Binary(data)) => data.to_vec(),
                Ok(Message::Pong(_)) => {
                    let _ = pong_tx.send(());
                    continue;
                }
                Ok(Message::Ping(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_)) | Err(_) => break,
            };
            let frame = if data.len() > max_message_bytes {
                Frame::TooLong { size: data.len() }
            } else if data.iter().all(u8::is_ascii_whitespace) {
                continue;
            } else {
                Frame::Line(data)
            };
            if in_tx.send(frame).await.is_err() {
                break;
            }
        }
        // Dropping in_tx ends the connection.
    });
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut ping = tokio::time::interval_at(start + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pong = start;
        loop {
            // A peer that takes no message for as long as it may leave a
            // ping unanswered is as gone as one that answers none.
            let sent = tokio::select! {
                line = out_rx.recv() => {
                    let Some(line) = line else { break };
                    let mut line = line.into_vec();
                    // A pre-rendered answer comes with the line codec's
                    // newline: one message needs none.
                    if line.first() != Some(&crate::frame::MARK) && line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    // A binary frame goes as a binary message; JSON is
                    // always UTF-8 (the lossy pass is never taken).
                    let message = if line.first() == Some(&crate::frame::MARK) {
                        Message::Binary(line.into())
                    } else {
                        let text = String::from_utf8(line)
                            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                        Message::Text(text.into())
                    };
                    tokio::time::timeout(pong_timeout, sink.send(message)).await
                }
                _ = ping.tick() => {
                    if last_pong.elapsed() >= pong_timeout {
                        tracing::info!("a websocket peer stopped answering pings; dropping it");
                        break;
                    }
                    tokio::time::timeout(pong_timeout, sink.send(Message::Ping(Vec::new().into()))).await
                }
                Some(()) = pong_rx.recv() => {
                    last_pong = tokio::time::Instant::now();
                    continue;
                }
            };
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    tracing::info!("a websocket peer took no message in time; dropping it");
                    break;
                }
            }
        }
        // The reader may wait forever on a peer that went silent: stop it,
        // which ends the connection (its session detaches).
        reader.abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    });
    Transport {
        incoming: in_rx,
        outgoing: Outbound::new(out_tx, encode_message),
    }
}

/// The WebSocket codec: one message's JSON, without the line codec's
/// newline.
fn encode_message(message: &Outgoing) -> Vec<u8> {
    let mut line = encode_line(message);
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    line
}

/// The first header named `name` (any case) of a parsed request head.
pub(crate) fn header_value(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
}

/// Read up to the end of the request head (`\r\n\r\n`).
pub(crate) async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        // One byte at a time: nothing past the head may be consumed (the
        // WebSocket handshake reads the head again from the replay).
        if stream.read(&mut byte).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// Turn a connection away before reading anything of it (the server is
/// full): 503 and close, given at most a second.
pub async fn turn_away(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        respond(&mut stream, "503 Service Unavailable"),
    )
    .await;
}

async fn respond(stream: &mut TcpStream, status: &str) -> io::Result<()> {
    let body = status.split_once(' ').map_or(status, |(_, text)| text);
    answer(stream, status, "", body).await
}

/// A whole HTTP answer, then the end of the connection. `headers` are
/// extra lines, each ending in CRLF.
pub(crate) async fn answer(
    stream: &mut TcpStream,
    status: &str,
    headers: &str,
    body: &str,
) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// `%XX` escapes decoded (a malformed one kept as it is).
pub(crate) fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

/// Equal, in time that depends on the lengths only.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// The TCP stream with the request head it already gave handed out again
/// first, for the WebSocket handshake to read.
pub(crate) struct Replay {
    head: Vec<u8>,
    at: usize,
    stream: TcpStream,
}

impl Replay {
    /// `stream`, which already gave `head` (for the relay).
    #[cfg_attr(not(feature = "remote"), allow(dead_code))]
    pub(crate) fn new(head: Vec<u8>, stream: TcpStream) -> Replay {
        Replay {
            head,
            at: 0,
            stream,
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_tokens_are_percent_decoded() {
        assert_eq!(super::percent_decode(b"a%2Fb%3d%3D"), b"a/b==");
        assert_eq!(super::percent_decode(b"100%"), b"100%");
        assert_eq!(super::percent_decode(b"%zz%4"), b"%zz%4");
        assert_eq!(super::percent_decode(b"%41"), b"A");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(super::same(b"secret", b"secret"));
        assert!(!super::same(b"secret", b"secreT"));
        assert!(!super::same(b"secret", b"secret2"));
        assert!(!super::same(b"", b"x"));
    }
}
