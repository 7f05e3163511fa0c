//! The per-process proxies: HTTP (absolute-form requests and `CONNECT`)
//! and SOCKS5 (TCP `CONNECT`, and `UDP ASSOCIATE` when enabled), each on an
//! executor loopback port of its own. Every connection goes through the
//! process's [`Gate`]; refusals reach the child as the reference sends them
//! (HTTP 403 with `x-proxy-error`, SOCKS reply 0x02).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::gate::{Ask, Gate, Protocol};
use super::policy::{Reason, Target, normalize_host};

/// Connections one proxy (or one bridge) serves at once; more are closed
/// as they arrive, so a child can't grow the server without bound.
pub const MAX_CONNECTIONS: usize = 256;
/// A request head larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// How long a dial may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers never forwarded (hop-by-hop; `Transfer-Encoding` is kept: the
/// body is passed through as it was framed).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Accept connections on `listener` and serve each with `serve` until the
/// task is aborted (which drops, and so ends, every connection).
pub async fn accept_loop<F, Fut>(listener: TcpListener, gate: Arc<Gate>, serve: F)
where
    F: Fn(Arc<Gate>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= MAX_CONNECTIONS {
                        tracing::debug!("proxy connection refused: {MAX_CONNECTIONS} already open");
                        continue;
                    }
                    connections.spawn(serve(gate.clone(), stream, peer));
                }
                Err(err) => {
                    tracing::debug!("proxy accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A TCP connection to `addr`, given at most [`CONNECT_TIMEOUT`].
async fn connect_within(addr: impl tokio::net::ToSocketAddrs) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })
}

/// Dial the first address of `target` that answers.
async fn dial(target: &Target) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address to connect to");
    for addr in &target.addrs {
        match connect_within(addr).await {
            Ok(stream) => return Ok(stream),
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// A tunnel to `host:port` through the executor's proxy: `CONNECT`, and a
/// 2xx answer.
async fn tunnel_via(proxy: &str, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let failed = |why: &str| std::io::Error::other(format!("upstream proxy: {why}"));
    let mut stream = connect_within(proxy)
        .await
        .map_err(|e| failed(&e.to_string()))?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let (head, rest) = read_head(&mut stream)
        .await
        .ok_or_else(|| failed("no answer"))?;
    let ok = head.starts_with(b"HTTP/1.") && head.get(9) == Some(&b'2');
    if !ok || !rest.is_empty() {
        return Err(failed("tunnel refused"));
    }
    Ok(stream)
}

/// Connect for an allowed request: through the executor's proxy when
/// forwarding is allowed (and the host is not in its `NO_PROXY`), else
/// straight to the checked addresses. `plain_http`: a plain HTTP request,
/// which goes to the executor's proxy in absolute form (the answer's
/// second part says so) rather than through a tunnel.
async fn connect(
    gate: &Gate,
    target: &Target,
    host: &str,
    port: u16,
    plain_http: bool,
) -> std::io::Result<(TcpStream, bool)> {
    if let Some(upstream) = gate.policy.upstream.as_ref().filter(|u| !u.bypassed(host)) {
        if plain_http {
            if let Some(proxy) = &upstream.http {
                let stream = connect_within(proxy.as_str())
                    .await
                    .map_err(|e| std::io::Error::other(format!("upstream proxy: {e}")))?;
                return Ok((stream, true));
            }
        } else if let Some(proxy) = &upstream.tunnel {
            return Ok((tunnel_via(proxy, host, port).await?, false));
        }
    }
    Ok((dial(target).await?, false))
}

/// Read a request head (through the blank line); the head and whatever
/// came after it.
async fn read_head(stream: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return Some((std::mem::take(&mut buf), rest));
            }
            if buf.len() > MAX_HEAD {
                return None;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

async fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &str) {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ));
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A refusal as the reference words it: JSON for plain HTTP, the message
/// alone for `CONNECT`.
async fn refuse(stream: &mut TcpStream, reason: &Reason, ask: &Ask<'_>) {
    let (code, message) = reason.explain();
    if ask.protocol == Protocol::HttpsConnect {
        let headers = [("content-type", "text/plain"), ("x-proxy-error", code)];
        respond(stream, "403 Forbidden", &headers, message).await;
    } else {
        let body = json!({
            "status": "blocked", "host": ask.host, "reason": reason.as_str(),
            "decision": "deny", "source": "baseline_policy", "protocol": "http",
            "port": ask.port, "message": message,
        });
        let headers = [
            ("content-type", "application/json"),
            ("x-proxy-error", code),
        ];
        respond(stream, "403 Forbidden", &headers, &body.to_string()).await;
    }
}

/// The gate's decision on an HTTP proxy request, and the connection to
/// its destination; `None` when the child has been answered instead (a
/// refusal, or 502 when the destination can't be reached).
async fn admit(gate: &Gate, ask: &Ask<'_>, client: &mut TcpStream) -> Option<(TcpStream, bool)> {
    let plain_http = ask.protocol == Protocol::Http;
    let connected = match gate.check(ask).await {
        Ok(target) => connect(gate, &target, ask.host, ask.port, plain_http).await,
        Err(reason) => {
            refuse(client, &reason, ask).await;
            return None;
        }
    };
    if connected.is_err() {
        respond(client, "502 Bad Gateway", &[], "upstream failure").await;
    }
    connected.ok()
}

/// Refuse the request shapes that let two parties read one message two
/// ways (RFC 9112 section 6.3): more than one `Host`; a `Content-Length`
/// given twice, signed, or not a plain number; `Content-Length` with
/// `Transfer-Encoding`; a `Transfer-Encoding` given twice or other than
/// `chunked`.
fn framing(headers: &[httparse::Header<'_>]) -> Result<(), &'static str> {
    let all = |name: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    if all("host").len() > 1 {
        return Err("more than one Host header");
    }
    let lengths = all("content-length");
    let encodings = all("transfer-encoding");
    if lengths.len() > 1 {
        return Err("more than one Content-Length header");
    }
    if let Some(length) = lengths.first() {
        let text = std::str::from_utf8(length).unwrap_or("").trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.len() > 19 {
            return Err("invalid Content-Length");
        }
    }
    if encodings.len() > 1 {
        return Err("more than one Transfer-Encoding header");
    }
    if let Some(encoding) = encodings.first() {
        if !lengths.is_empty() {
            return Err("both Content-Length and Transfer-Encoding");
        }
        if !std::str::from_utf8(encoding)
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("chunked")
        {
            return Err("unsupported Transfer-Encoding");
        }
    }
    Ok(())
}

/// `host[:port]` (IPv6 in brackets) into a normalized host and a port.
fn authority(text: &str, default_port: u16) -> Option<(String, u16)> {
    let text = text.rsplit_once('@').map_or(text, |(_, h)| h);
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (host.to_string(), port)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host.to_string(), port.parse().ok()?),
            Some(_) => (text.to_string(), default_port),
            None => (text.to_string(), default_port),
        }
    };
    Some((normalize_host(&host)?, port))
}

/// One HTTP proxy connection: one request (or one tunnel).
pub async fn serve_http(gate: Arc<Gate>, mut client: TcpStream, peer: SocketAddr) {
    let Some((head, rest)) = read_head(&mut client).await else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(&head), Ok(httparse::Status::Complete(_))) {
        respond(&mut client, "400 Bad Request", &[], "bad request").await;
        return;
    }
    let method = request.method.unwrap_or("").to_string();
    let target = request.path.unwrap_or("").to_string();
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if let Err(why) = framing(request.headers) {
        respond(&mut client, "400 Bad Request", &[], why).await;
        return;
    }
    if method == "CONNECT" {
        let Some((host, port)) = authority(&target, 443) else {
            respond(&mut client, "400 Bad Request", &[], "missing authority").await;
            return;
        };
        if let Some(given) = header("host") {
            if authority(&given, 443) != Some((host.clone(), port)) {
                let why = "Host header does not match the CONNECT target";
                respond(&mut client, "400 Bad Request", &[], why).await;
                return;
            }
        }
        let ask = Ask {
            protocol: Protocol::HttpsConnect,
            host: &host,
            port,
            method: Some("CONNECT"),
            client: Some(peer),
        };
        let Some((mut upstream, _)) = admit(&gate, &ask, &mut client).await else {
            return;
        };
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
            || upstream.write_all(&rest).await.is_err()
        {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
    // Absolute form only: `http://host[:port]/path`.
    let lower = target.to_ascii_lowercase();
    let Some(after_scheme) = lower.strip_prefix("http://").map(|_| &target[7..]) else {
        let why = if target.starts_with('/') {
            "missing host"
        } else {
            "unsupported request target"
        };
        respond(&mut client, "400 Bad Request", &[], why).await;
        return;
    };
    let split = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let (auth, path) = after_scheme.split_at(split);
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('/') => p.split('#').next().unwrap_or("/").to_string(),
        p => format!("/{}", p.split('#').next().unwrap_or("")),
    };
    let Some((host, port)) = authority(auth, 80) else {
        respond(&mut client, "400 Bad Request", &[], "missing host").await;
        return;
    };
    if let Some(given) = header("host") {
        if authority(&given, 80) != Some((host.clone(), port)) {
            let why = "Host header does not match request target";
            respond(&mut client, "400 Bad Request", &[], why).await;
            return;
        }
    }
    let ask = Ask {
        protocol: Protocol::Http,
        host: &host,
        port,
        method: Some(&method),
        client: Some(peer),
    };
    // In limited mode only one read-only request may reach the host: a
    // chunked body could carry a second request behind the first.
    if gate.policy.mode == super::policy::Mode::Limited && header("transfer-encoding").is_some() {
        gate.refuse_state(&ask, Reason::MethodNotAllowed);
        let why = "request bodies must have a Content-Length in limited mode";
        respond(&mut client, "400 Bad Request", &[], why).await;
        return;
    }
    let declared: u64 = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if gate.policy.mode == super::policy::Mode::Limited && rest.len() as u64 > declared {
        // A second request behind the first would skip the method guard.
        gate.refuse_state(&ask, Reason::MethodNotAllowed);
        let why = "nothing may follow the request body in limited mode";
        respond(&mut client, "400 Bad Request", &[], why).await;
        return;
    }
    if header("x-unix-socket").is_some() {
        gate.refuse_state(&ask, Reason::UnixSocketUnsupported);
        respond(
            &mut client,
            "501 Not Implemented",
            &[],
            "unix sockets unsupported",
        )
        .await;
        return;
    }
    let Some((mut upstream, via_proxy)) = admit(&gate, &ask, &mut client).await else {
        return;
    };
    // The request in origin form, hop-by-hop headers (and those the
    // `Connection` header names) left out, one request per connection.
    let named: Vec<String> = header("connection")
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let form = if via_proxy { &target } else { &path };
    let mut out = format!("{method} {form} HTTP/1.1\r\n").into_bytes();
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in request.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&name.as_str()) || named.contains(&name) {
            continue;
        }
        if name == "content-length" {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        }
        if name == "transfer-encoding" {
            chunked = true;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    // The body: what came with the head, then the rest of its declared
    // length (or, chunked, whatever the client sends until the answer
    // ends). Nothing after it: a second request would skip the gate.
    let body_limit = match (length, chunked) {
        (_, true) => u64::MAX,
        (Some(n), false) => n,
        (None, false) => 0,
    };
    let first = &rest[..rest.len().min(body_limit as usize)];
    out.extend_from_slice(first);
    if upstream.write_all(&out).await.is_err() {
        return;
    }
    let remaining = body_limit.saturating_sub(first.len() as u64);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let send_body = async {
        let mut body = (&mut client_read).take(remaining);
        let _ = tokio::io::copy(&mut body, &mut upstream_write).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = send_body => {}
        _ = tokio::io::copy(&mut upstream_read, &mut client_write) => {}
    }
    let _ = client_write.shutdown().await;
}

/// SOCKS5 reply codes.
const SOCKS_OK: u8 = 0x00;
const SOCKS_FAILURE: u8 = 0x01;
const SOCKS_NOT_ALLOWED: u8 = 0x02;
const SOCKS_REFUSED: u8 = 0x05;
const SOCKS_UNSUPPORTED: u8 = 0x07;

/// What the SOCKS proxy may do beyond TCP.
pub struct Socks {
    /// The UDP relay for `UDP ASSOCIATE`, when enabled: its address as the
    /// child must send to it.
    pub udp_relay: Option<SocketAddr>,
}

async fn socks_reply(stream: &mut TcpStream, code: u8, bound: Option<SocketAddr>) {
    let mut reply = vec![5, code, 0];
    match bound {
        Some(SocketAddr::V6(a)) => {
            reply.push(4);
            reply.extend_from_slice(&a.ip().octets());
            reply.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V4(a)) => {
            reply.push(1);
            reply.extend_from_slice(&a.ip().octets());
            reply.extend_from_slice(&a.port().to_be_bytes());
        }
        None => reply.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0]),
    }
    let _ = stream.write_all(&reply).await;
}

/// A SOCKS5 address (`ATYP` already read) and port.
async fn socks_address(stream: &mut (impl AsyncRead + Unpin), atyp: u8) -> Option<(String, u16)> {
    let host = match atyp {
        1 => {
            let mut ip = [0u8; 4];
            stream.read_exact(&mut ip).await.ok()?;
            IpAddr::from(ip).to_string()
        }
        4 => {
            let mut ip = [0u8; 16];
            stream.read_exact(&mut ip).await.ok()?;
            IpAddr::from(ip).to_string()
        }
        3 => {
            let len = stream.read_u8().await.ok()? as usize;
            let mut name = vec![0u8; len];
            stream.read_exact(&mut name).await.ok()?;
            String::from_utf8(name).ok()?
        }
        _ => return None,
    };
    let port = stream.read_u16().await.ok()?;
    Some((normalize_host(&host)?, port))
}

/// One SOCKS5 connection.
pub async fn serve_socks(
    gate: Arc<Gate>,
    socks: Arc<Socks>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let greeting = async {
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.ok()?;
        let mut methods = vec![0u8; head[1] as usize];
        client.read_exact(&mut methods).await.ok()?;
        Some((head[0], methods))
    };
    let Ok(Some((version, methods))) = tokio::time::timeout(HEAD_TIMEOUT, greeting).await else {
        return;
    };
    if version != 5 {
        return;
    }
    if !methods.contains(&0) {
        let _ = client.write_all(&[5, 0xff]).await;
        return;
    }
    if client.write_all(&[5, 0]).await.is_err() {
        return;
    }
    let mut request = [0u8; 4];
    if client.read_exact(&mut request).await.is_err() || request[0] != 5 {
        return;
    }
    let Some((host, port)) = socks_address(&mut client, request[3]).await else {
        socks_reply(&mut client, SOCKS_FAILURE, None).await;
        return;
    };
    match request[1] {
        1 => {
            let ask = Ask {
                protocol: Protocol::Socks5Tcp,
                host: &host,
                port,
                method: None,
                client: Some(peer),
            };
            let target = match gate.check(&ask).await {
                Ok(target) => target,
                Err(_) => return socks_reply(&mut client, SOCKS_NOT_ALLOWED, None).await,
            };
            match connect(&gate, &target, &host, port, false).await {
                Ok((mut upstream, _)) => {
                    socks_reply(&mut client, SOCKS_OK, upstream.local_addr().ok()).await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(err) => {
                    let code = if err.kind() == std::io::ErrorKind::ConnectionRefused {
                        SOCKS_REFUSED
                    } else {
                        SOCKS_FAILURE
                    };
                    socks_reply(&mut client, code, None).await;
                }
            }
        }
        3 if gate.policy.mode == super::policy::Mode::Limited => {
            // Limited mode lets no datagram out (the docs say refused).
            let ask = Ask {
                protocol: Protocol::Socks5Udp,
                host: &host,
                port,
                method: None,
                client: Some(peer),
            };
            gate.refuse_state(&ask, Reason::MethodNotAllowed);
            socks_reply(&mut client, SOCKS_NOT_ALLOWED, None).await;
        }
        3 => match socks.udp_relay {
            Some(relay) => {
                socks_reply(&mut client, SOCKS_OK, Some(relay)).await;
                // The association lasts as long as this connection.
                let mut sink = [0u8; 512];
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            }
            None => socks_reply(&mut client, SOCKS_UNSUPPORTED, None).await,
        },
        _ => socks_reply(&mut client, SOCKS_UNSUPPORTED, None).await,
    }
}

/// The UDP relay: datagrams from the child (`RSV RSV FRAG ATYP ADDR PORT
/// DATA`) go out through the gate, one decision per destination, and the
/// answers come back wrapped the same way. Fragments are dropped, as are
/// datagrams the policy refuses.
pub async fn udp_relay(gate: Arc<Gate>, inside: UdpSocket) {
    let Ok(outside) = UdpSocket::bind("0.0.0.0:0").await else {
        return;
    };
    let mut allowed: std::collections::HashMap<(String, u16), Option<SocketAddr>> =
        std::collections::HashMap::new();
    let mut child: Option<SocketAddr> = None;
    let mut from_child = vec![0u8; 65_536];
    let mut from_outside = vec![0u8; 65_536];
    loop {
        tokio::select! {
            got = inside.recv_from(&mut from_child) => {
                let Ok((n, source)) = got else { continue };
                child = Some(source);
                let datagram = &from_child[..n];
                if datagram.len() < 4 || datagram[2] != 0 {
                    continue;
                }
                let mut cursor = std::io::Cursor::new(&datagram[4..]);
                let Some((host, port)) = socks_address(&mut cursor, datagram[3]).await else {
                    continue;
                };
                let payload = &datagram[4 + cursor.position() as usize..];
                let key = (host.clone(), port);
                let to = match allowed.get(&key) {
                    Some(to) => *to,
                    None => {
                        let ask = Ask { protocol: Protocol::Socks5Udp, host: &host, port, method: None, client: Some(source) };
                        let to = gate.check(&ask).await.ok().and_then(|t| t.addrs.first().copied());
                        if allowed.len() < 1024 {
                            allowed.insert(key, to);
                        }
                        to
                    }
                };
                if let Some(to) = to {
                    let _ = outside.send_to(payload, to).await;
                }
            }
            got = outside.recv_from(&mut from_outside) => {
                let (Ok((n, from)), Some(child)) = (got, child) else { continue };
                // Only answers from a destination the gate allowed.
                if !allowed.values().any(|to| *to == Some(from)) {
                    continue;
                }
                let mut wrapped = vec![0, 0, 0];
                match from {
                    SocketAddr::V4(a) => { wrapped.push(1); wrapped.extend_from_slice(&a.ip().octets()); }
                    SocketAddr::V6(a) => { wrapped.push(4); wrapped.extend_from_slice(&a.ip().octets()); }
                }
                wrapped.extend_from_slice(&from.port().to_be_bytes());
                wrapped.extend_from_slice(&from_outside[..n]);
                let _ = inside.send_to(&wrapped, child).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_split_and_normalized() {
        assert_eq!(
            authority("Example.com:8080", 80),
            Some(("example.com".into(), 8080))
        );
        assert_eq!(
            authority("example.com", 443),
            Some(("example.com".into(), 443))
        );
        assert_eq!(authority("[::1]:99", 80), Some(("::1".into(), 99)));
        assert_eq!(authority("user:pw@host:1", 80), Some(("host".into(), 1)));
        assert_eq!(authority("host:notaport", 80), None);
        assert_eq!(authority("", 80), None);
    }
}
