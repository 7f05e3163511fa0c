//! `http/request`: an HTTP(S) request made by the executor on the client's
//! behalf (`docs/PROTOCOL.md` section 9), buffered or with the body
//! streamed as `http/request/bodyDelta` notifications.
//!
//! The executor's own environment applies: its `HTTP_PROXY`, `HTTPS_PROXY`,
//! `ALL_PROXY` and `NO_PROXY`, the system's root certificates, and an extra
//! CA bundle from `CODEX_CA_CERTIFICATE` or `SSL_CERT_FILE`. Nothing of a
//! request (URL, header values, bodies) is ever logged, and error texts
//! leave the URL out.

mod cookies;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::protocol::{Bytes, method};
use crate::sync::lock;
use crate::transport::{Outbound, Outgoing};

/// The sending of a streamed body, run once the result is queued.
pub type FollowUp = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Redirects followed at most, as browsers and the reference do.
const MAX_REDIRECTS: usize = 10;

/// Decoded bytes in one `http/request/bodyDelta` at most.
pub const MAX_DELTA: usize = 1 << 20;

/// A buffered body larger than this fails the request (its base64 would
/// make one message of more than 85 MiB); `streamResponse` has no limit.
pub const MAX_BUFFERED_BODY: usize = 64 << 20;

/// Buffered requests of one connection that may hold a body at once; more
/// wait their turn, so a client can't make the server hold more than
/// `MAX_BUFFERED_AT_ONCE * MAX_BUFFERED_BODY` for it.
pub const MAX_BUFFERED_AT_ONCE: usize = 4;

/// A connection's `http/request` state.
pub struct ConnHttp {
    /// The `requestId`s of streamed requests whose body is still being
    /// sent.
    streams: Mutex<HashSet<String>>,
    /// Turns for buffered requests.
    buffered: Arc<tokio::sync::Semaphore>,
}

impl Default for ConnHttp {
    fn default() -> Self {
        ConnHttp {
            streams: Mutex::default(),
            buffered: Arc::new(tokio::sync::Semaphore::new(MAX_BUFFERED_AT_ONCE)),
        }
    }
}

pub type ActiveStreams = Arc<ConnHttp>;

/// Streamed requests one connection may have active at once.
pub const MAX_STREAMS: usize = 128;

/// `http/request` params.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    method: String,
    url: String,
    #[serde(default)]
    headers: Vec<Header>,
    #[serde(default)]
    body_base64: Option<Bytes>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    redirect_policy: Redirects,
    request_id: String,
    #[serde(default)]
    stream_response: bool,
}

#[derive(Deserialize)]
struct Header {
    name: String,
    value: String,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Redirects {
    #[default]
    Follow,
    Stop,
}

/// A checked request, ready to send.
pub struct Request {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: reqwest::header::HeaderMap,
    body: Option<Vec<u8>>,
    timeout: Option<Duration>,
    redirects: Redirects,
    /// The reserved `requestId` of a streamed request.
    stream: Option<Reservation>,
    /// A buffered request's turn comes from here.
    turns: Arc<tokio::sync::Semaphore>,
}

/// A streamed request's `requestId`, held from acceptance until its last
/// notification is queued or the connection ends.
struct Reservation {
    id: String,
    active: ActiveStreams,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.active.streams).remove(&self.id);
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidParams(message)
}

impl Request {
    /// Check `params` as the reference does, in its order, and reserve the
    /// `requestId` of a streamed request.
    pub fn check(params: Params, active: &ActiveStreams) -> Result<Request> {
        use reqwest::header::{HeaderName, HeaderValue};
        let method = reqwest::Method::from_bytes(params.method.as_bytes())
            .map_err(|e| invalid(format!("http/request method is invalid: {e}")))?;
        let url = reqwest::Url::parse(&params.url)
            .map_err(|e| invalid(format!("http/request url is invalid: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "http/request only supports http and https URLs, got {}",
                url.scheme()
            )));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for Header { name, value } in params.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| invalid(format!("http/request header name is invalid: {e}")))?;
            let value = HeaderValue::from_str(&value).map_err(|e| {
                invalid(format!(
                    "http/request header value is invalid for {name}: {e}"
                ))
            })?;
            headers.append(header, value);
        }
        let stream = if params.stream_response {
            let id = params.request_id;
            let mut streams = lock(&active.streams);
            if streams.contains(&id) {
                return Err(invalid(format!(
                    "http/request streamResponse requestId `{id}` is already active"
                )));
            }
            if streams.len() >= MAX_STREAMS {
                return Err(Error::InvalidRequest(format!(
                    "at most {MAX_STREAMS} streamed http/requests may be active per connection"
                )));
            }
            streams.insert(id.clone());
            drop(streams);
            Some(Reservation {
                id,
                active: active.clone(),
            })
        } else {
            None
        };
        Ok(Request {
            method,
            url,
            headers,
            body: params.body_base64.map(|b| b.0),
            timeout: params.timeout_ms.map(Duration::from_millis),
            redirects: params.redirect_policy,
            stream,
            turns: active.buffered.clone(),
        })
    }

    /// Send the request: the result, and for a streamed one the follow-up
    /// that sends its body to `outbound` once the result is queued.
    pub async fn send(self, outbound: Outbound) -> (Result<Value>, Option<FollowUp>) {
        match self.exchange(outbound).await {
            Ok((result, follow_up)) => (Ok(result), follow_up),
            Err(err) => (Err(err), None),
        }
    }

    async fn exchange(self, outbound: Outbound) -> Result<(Value, Option<FollowUp>)> {
        let client = client(self.redirects)?;
        // Held until the whole body is read (dropped with this future).
        let _turn = match self.stream {
            Some(_) => None,
            None => {
                let turn = self.turns.clone().acquire_owned().await.ok();
                // Nothing is sent while the client leaves answers unread.
                outbound.budget().check()?;
                turn
            }
        };
        // The reference's Cloudflare cookies for ChatGPT's hosts; a
        // `Cookie` the caller sent is left as it is.
        let mut headers = self.headers;
        if !headers.contains_key(reqwest::header::COOKIE)
            && let Some(kept) = cookies::header_for(&self.url)
        {
            headers.insert(reqwest::header::COOKIE, kept);
        }
        let mut request = client.request(self.method, self.url).headers(headers);
        if let Some(body) = self.body {
            request = request.body(body);
        }
        if let Some(timeout) = self.timeout {
            request = request.timeout(timeout);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| failed("http/request failed", e))?;
        let status = response.status().as_u16();
        cookies::remember(response.url(), response.headers());
        if self.redirects == Redirects::Follow && unfollowable_redirect(&response) {
            // The client follows every http(s) redirect; one it handed
            // back points somewhere it must not go (`file:`, `data:`,
            // `unix:`...): that fails, as the reference's does.
            return Err(Error::Internal {
                message: "http/request failed: error following redirect: URL scheme is not allowed"
                    .into(),
                errno: None,
            });
        }
        let headers: Vec<Value> = response
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                let value = value.to_str().ok()?;
                Some(json!({"name": name.as_str(), "value": value}))
            })
            .collect();
        tracing::debug!(
            status,
            streamed = self.stream.is_some(),
            "http/request answered"
        );
        let Some(reservation) = self.stream else {
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| failed("failed to read http/request response body", e))?
            {
                if body.len() + chunk.len() > MAX_BUFFERED_BODY {
                    return Err(Error::Internal {
                        message: format!(
                            "failed to read http/request response body: it exceeds \
                             {MAX_BUFFERED_BODY} bytes; use streamResponse"
                        ),
                        errno: None,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            let result = json!({"status": status, "headers": headers, "bodyBase64": Bytes(body)});
            return Ok((result, None));
        };
        let result = json!({"status": status, "headers": headers, "bodyBase64": ""});
        Ok((
            result,
            Some(Box::pin(stream_body(response, reservation, outbound))),
        ))
    }
}

/// Send `response`'s body as `http/request/bodyDelta` notifications: at
/// most [`MAX_DELTA`] bytes each, `seq` from 1, the last one `done` (with
/// `error` if the body failed). Each waits for room on the connection, so
/// a slow client slows the read from the network; nothing piles up.
async fn stream_body(mut response: reqwest::Response, reservation: Reservation, out: Outbound) {
    let mut seq = 0;
    let mut delta = |data: &[u8], end: Option<Option<String>>| {
        seq += 1;
        let mut params = json!({
            "requestId": reservation.id,
            "seq": seq,
            "deltaBase64": Bytes(data.to_vec()),
        });
        if let Some(error) = end {
            params["done"] = Value::Bool(true);
            if let Some(error) = error {
                params["error"] = Value::String(error);
            }
        }
        Outgoing::Notification {
            method: method::HTTP_BODY_DELTA,
            params,
        }
    };
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                for piece in chunk.chunks(MAX_DELTA) {
                    if !out.send(delta(piece, None)).await {
                        return;
                    }
                }
            }
            Ok(None) => {
                out.send(delta(&[], Some(None))).await;
                return;
            }
            Err(e) => {
                let e = e.without_url();
                let text = error_text(&e);
                tracing::debug!(timeout = e.is_timeout(), "http/request body failed: {text}");
                out.send(delta(&[], Some(Some(text)))).await;
                return;
            }
        }
    }
}

/// The error's text and its causes.
fn error_text(err: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut cause: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = cause {
        let part = e.to_string();
        // Causes often repeat their cause's text; say each thing once.
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

fn failed(context: &str, err: reqwest::Error) -> Error {
    let err = error_text(&err.without_url());
    tracing::debug!("{context}: {err}");
    Error::Internal {
        message: format!("{context}: {err}"),
        errno: None,
    }
}

/// A redirect the client did not follow (its location is not an http(s)
/// URL, or not a URL at all).
fn unfollowable_redirect(response: &reqwest::Response) -> bool {
    matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308)
        && response.headers().get(reqwest::header::LOCATION).is_some()
}

/// The two shared clients (redirects followed, redirects returned), built
/// on first use from the executor's environment.
fn client(redirects: Redirects) -> Result<&'static reqwest::Client> {
    static CLIENTS: OnceLock<std::result::Result<[reqwest::Client; 2], String>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = extra_roots()?;
        let build = |policy| {
            reqwest::Client::builder()
                .redirect(policy)
                .tls_certs_merge(roots.clone())
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))
        };
        Ok([
            build(reqwest::redirect::Policy::limited(MAX_REDIRECTS))?,
            build(reqwest::redirect::Policy::none())?,
        ])
    });
    match clients {
        Ok([follow, stop]) => Ok(if redirects == Redirects::Follow {
            follow
        } else {
            stop
        }),
        Err(why) => Err(Error::Internal {
            message: format!("http/request failed: {why}"),
            errno: None,
        }),
    }
}

/// The executor's extra CA bundle: `CODEX_CA_CERTIFICATE`, else
/// `SSL_CERT_FILE`, added to the system's roots.
fn extra_roots() -> std::result::Result<Vec<reqwest::Certificate>, String> {
    let Some(path) = ["CODEX_CA_CERTIFICATE", "SSL_CERT_FILE"]
        .iter()
        .find_map(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
    else {
        return Ok(Vec::new());
    };
    let path = std::path::PathBuf::from(path);
    let pem = std::fs::read(&path)
        .map_err(|e| format!("cannot read the CA bundle {}: {e}", path.display()))?;
    reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("cannot parse the CA bundle {}: {e}", path.display()))
}
