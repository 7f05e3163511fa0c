//! A small real HTTP/1.1 server (plain or TLS with the test CA in
//! `fixtures/tls`) on loopback, for `http/request` and the network proxy
//! tests. It records every request that reaches it, so a test can assert
//! what got through and what did not.
//!
//! Routes: `/hello` (200 `hello`), `/echo` (the request's method, path,
//! headers and body length as JSON), `/redirect?code=N&to=URL` (a
//! redirect), `/bytes?mib=N` (N MiB of a known pattern, streamed),
//! `/stall` (headers, then nothing for 30 s), `.../cf-cookies` and
//! `.../cf-forget` (Cloudflare cookies set and deleted, for the cookie
//! store), anything else 404.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// One request as it reached the server.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running test web server.
pub struct Web {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// The byte at `offset` of every `/bytes` body.
pub fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

impl Web {
    /// Plain HTTP on `ip` (a loopback address), port chosen by the kernel.
    pub fn start(ip: &str) -> Web {
        Web::serve(ip, None)
    }

    /// HTTPS with the certificate of `fixtures/tls` (for `localhost` and
    /// `127.0.0.1`, signed by `fixtures/tls/ca.pem`).
    pub fn start_tls() -> Web {
        Web::serve("127.0.0.1", Some(tls_config()))
    }

    fn serve(ip: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Web {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let log = log.clone();
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    match tls {
                        None => handle(stream, &log),
                        Some(config) => {
                            let Ok(conn) = rustls::ServerConnection::new(config) else {
                                return;
                            };
                            handle(rustls::StreamOwned::new(conn, stream), &log)
                        }
                    }
                });
            }
        });
        Web { addr, seen }
    }

    /// `http://ADDR` (or `https://localhost:PORT` for TLS, which is what
    /// the certificate names).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn tls_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Every request that reached the server so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn handle<S: Read + Write>(stream: S, log: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let seen = Seen {
        method: method.clone(),
        path: target.clone(),
        headers,
    };
    log.lock().unwrap().push(seen.clone());
    let mut stream = reader.into_inner();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
    };
    let respond = |stream: &mut S, status: &str, extra: &str, body: &[u8]| {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
        let _ = stream.flush();
    };
    // Reached as a proxy (absolute-form target): ChatGPT's hosts set
    // Cloudflare cookies (and a session cookie) here.
    if path.ends_with("/cf-cookies") {
        let cookies = "Set-Cookie: __cf_bm=bm1; Path=/; Domain=.chatgpt.com; HttpOnly\r\n\
                       Set-Cookie: session=secret; Path=/\r\n\
                       Set-Cookie: _cfuvid=u1; Path=/\r\n\
                       Set-Cookie: __cflb=lb1; Path=/; Secure\r\n";
        return respond(&mut stream, "200 OK", cookies, b"");
    }
    if path.ends_with("/cf-forget") {
        let cookies = "Set-Cookie: __cf_bm=; Path=/; Domain=chatgpt.com; Max-Age=0\r\n\
                       Set-Cookie: _cfuvid=; Path=/; Expires=Thu, 01 Jan 1970 00:00:01 GMT\r\n";
        return respond(&mut stream, "200 OK", cookies, b"");
    }
    match path {
        "/hello" => respond(&mut stream, "200 OK", "X-Test: yes\r\n", b"hello"),
        "/echo" => {
            let echo: Value = json!({
                "method": method,
                "path": target,
                "headers": seen.headers.iter().map(|(n, v)| json!([n.to_ascii_lowercase(), v])).collect::<Vec<_>>(),
                "bodyLength": body.len(),
            });
            respond(
                &mut stream,
                "200 OK",
                "Content-Type: application/json\r\n",
                echo.to_string().as_bytes(),
            )
        }
        "/redirect" => {
            let code = param("code").unwrap_or_else(|| "302".into());
            let to = param("to").unwrap_or_default();
            respond(
                &mut stream,
                &format!("{code} Moved"),
                &format!("Location: {to}\r\n"),
                b"",
            )
        }
        "/bytes" => {
            let mib: u64 = param("mib").and_then(|m| m.parse().ok()).unwrap_or(1);
            let total = mib << 20;
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n");
            if stream.write_all(head.as_bytes()).is_err() {
                return;
            }
            let block: Vec<u8> = (0..(251 * 256) as u64).map(pattern).collect();
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(block.len() as u64) as usize;
                // Blocks are a multiple of 251 long: each starts the
                // pattern over.
                if stream.write_all(&block[..n]).is_err() {
                    return;
                }
                sent += n as u64;
            }
            let _ = stream.flush();
        }
        "/stall" => {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nab";
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.flush();
            std::thread::sleep(Duration::from_secs(30));
        }
        _ => respond(&mut stream, "404 Not Found", "", b"no such route"),
    }
}

/// A TCP port on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

/// A TLS server configuration with the certificate of `fixtures/tls` (for
/// `localhost` and `127.0.0.1`, signed by `fixtures/tls/ca.pem`).
pub fn tls_config() -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls");
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    Arc::new(config)
}
