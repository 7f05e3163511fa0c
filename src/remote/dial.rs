//! Opening a relay WebSocket: `ws://` directly or through the process's
//! HTTP proxy (`HTTP_PROXY`/`ALL_PROXY`, `NO_PROXY`) with `CONNECT`.
//! Errors never carry the URL (its query is a credential).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The largest relay WebSocket message.
pub const MAX_FRAME: usize = 256 * 1024;

/// How long opening a socket may take, proxy and upgrade included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay socket.
pub type Socket = WebSocketStream<TcpStream>;

/// Why a relay socket could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// The upgrade was answered with this HTTP status.
    #[error("the relay refused the connection with HTTP {0}")]
    Refused(u16),
    /// Anything else.
    #[error("cannot reach the relay: {0}")]
    Failed(String),
}

/// Open the WebSocket at `url` (`ws://HOST:PORT/...`).
pub async fn dial(url: &str) -> Result<Socket, DialError> {
    tokio::time::timeout(CONNECT_TIMEOUT, dial_now(url))
        .await
        .map_err(|_| DialError::Failed("timed out".into()))?
}

async fn dial_now(url: &str) -> Result<Socket, DialError> {
    let Some(rest) = url.strip_prefix("ws://") else {
        return Err(DialError::Failed(
            "only ws:// relay URLs are supported (put a TLS-terminating proxy in front for wss)"
                .into(),
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_matches(['[', ']']);
    let stream = match proxy_for(host) {
        Some(proxy) => tunnel(&proxy, authority).await?,
        None => TcpStream::connect(authority)
            .await
            .map_err(|e| DialError::Failed(crate::error::os_text(&e)))?,
    };
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    match tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(DialError::Refused(response.status().as_u16()))
        }
        Err(err) => Err(DialError::Failed(format!(
            "websocket handshake: {}",
            kind(&err)
        ))),
    }
}

/// A text for a handshake error that leaves the URL out.
fn kind(err: &tokio_tungstenite::tungstenite::Error) -> &'static str {
    use tokio_tungstenite::tungstenite::Error;
    match err {
        Error::Io(_) => "i/o error",
        Error::Protocol(_) => "protocol error",
        Error::Url(_) => "invalid URL",
        Error::Capacity(_) => "too large",
        _ => "failed",
    }
}

/// The proxy for plain HTTP to `host`, from the environment, unless
/// `NO_PROXY` names it.
fn proxy_for(host: &str) -> Option<String> {
    let get = |name: &str| {
        std::env::var(name)
            .or_else(|_| std::env::var(name.to_ascii_lowercase()))
            .ok()
            .filter(|v| !v.trim().is_empty())
    };
    let proxy = get("HTTP_PROXY").or_else(|| get("ALL_PROXY"))?;
    let no_proxy = get("NO_PROXY").unwrap_or_default();
    let bypass = no_proxy.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        entry == "*"
            || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
    });
    if bypass {
        return None;
    }
    let address = proxy
        .trim()
        .strip_prefix("http://")
        .unwrap_or(proxy.trim())
        .trim_end_matches('/');
    Some(address.rsplit('@').next().unwrap_or(address).to_string())
}

/// A TCP stream to `authority` through the HTTP proxy at `proxy`.
async fn tunnel(proxy: &str, authority: &str) -> Result<TcpStream, DialError> {
    let failed = |what: &str| DialError::Failed(format!("proxy: {what}"));
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| failed(&crate::error::os_text(&e)))?;
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| failed(&crate::error::os_text(&e)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(failed("answer too long"));
        }
        if stream
            .read(&mut byte)
            .await
            .map_err(|e| failed(&e.to_string()))?
            == 0
        {
            return Err(failed("closed the connection"));
        }
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    if status != "200" {
        return Err(failed(&format!("CONNECT answered {status}")));
    }
    Ok(stream)
}
