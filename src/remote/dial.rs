//! Opening a relay WebSocket: `ws://` or `wss://` (TLS checked against the
//! system's roots), directly or through the process's HTTP proxy
//! (`HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`, `NO_PROXY`) with `CONNECT`.
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

/// A byte stream a relay socket runs on: TCP, or TLS over it.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A relay socket.
pub type Socket = WebSocketStream<Box<dyn Io>>;

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
    let (tls, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        _ => {
            return Err(DialError::Failed(
                "a relay URL must start with ws:// or wss://".into(),
            ));
        }
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse::<u16>() {
            Ok(port) => (h, port),
            Err(_) => (authority, if tls { 443 } else { 80 }),
        },
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_matches(['[', ']']);
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let stream = match proxy_for(host, tls) {
        Some(proxy) => tunnel(&proxy, &target).await?,
        None => TcpStream::connect(&target)
            .await
            .map_err(|e| DialError::Failed(crate::error::os_text(&e)))?,
    };
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn Io> = if tls {
        Box::new(tls_to(host, stream).await?)
    } else {
        Box::new(stream)
    };
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

/// TLS to `host` over `stream`, checked against the system's roots.
async fn tls_to(
    host: &str,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DialError> {
    use rustls_platform_verifier::ConfigVerifierExt as _;
    static CONFIG: std::sync::OnceLock<Result<std::sync::Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    let config = CONFIG
        .get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            rustls::ClientConfig::with_platform_verifier()
                .map(std::sync::Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| DialError::Failed(format!("TLS: {e}")))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| DialError::Failed("TLS: invalid server name".into()))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| DialError::Failed(format!("TLS: {}", crate::error::os_text(&e))))
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

/// The proxy for `host` (over TLS or not), from the environment, unless
/// `NO_PROXY` names it.
fn proxy_for(host: &str, tls: bool) -> Option<String> {
    let get = |name: &str| {
        std::env::var(name)
            .or_else(|_| std::env::var(name.to_ascii_lowercase()))
            .ok()
            .filter(|v| !v.trim().is_empty())
    };
    let proxy = if tls {
        get("HTTPS_PROXY").or_else(|| get("ALL_PROXY"))?
    } else {
        get("HTTP_PROXY").or_else(|| get("ALL_PROXY"))?
    };
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
