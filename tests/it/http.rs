//! `http/request` against a real HTTP server started by the test (plain,
//! and TLS with the test CA).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, bin, unb64};
use crate::web::{Web, closed_port, pattern};

/// A server whose environment has no proxy settings (the machine's must
/// not route the test's loopback requests), plus `env`.
fn server(env: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(bin());
    cmd.arg("--stdio");
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env_remove("SSL_CERT_FILE")
        .env_remove("CODEX_CA_CERTIFICATE");
    cmd.envs(env.iter().copied());
    let mut server = Server::from_command(cmd);
    let init = server.request("initialize", json!({"clientName": "it"}));
    assert!(init["result"]["sessionId"].is_string(), "{init}");
    server.send(&json!({"method": "initialized"}));
    server
}

fn header<'a>(result: &'a Value, name: &str) -> Option<&'a str> {
    result["headers"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)?["value"]
        .as_str()
}

fn echo(result: &Value) -> Value {
    serde_json::from_slice(&unb64(&result["bodyBase64"])).unwrap()
}

fn echoed<'a>(echo: &'a Value, name: &str) -> Vec<&'a str> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap())
        .collect()
}

#[test]
fn a_buffered_request_returns_status_headers_and_body() {
    let web = Web::start("127.0.0.1");
    let mut s = server(&[]);
    let r = s.call(
        "http/request",
        json!({"method": "GET", "url": web.url("/hello"), "requestId": "r1"}),
    );
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(
        header(&r, "x-test"),
        Some("yes"),
        "names are lower-case: {r}"
    );
    assert_eq!(unb64(&r["bodyBase64"]), b"hello");
    // Method, repeated headers and body go out as given; 404 is a result.
    let r = s.call(
        "http/request",
        json!({"method": "PUT", "url": web.url("/echo?q=1"), "requestId": "r1",
               "headers": [{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}],
               "bodyBase64": crate::support::b64(b"twelve bytes")}),
    );
    let e = echo(&r);
    assert_eq!(
        (e["method"].as_str(), e["bodyLength"].as_u64()),
        (Some("PUT"), Some(12)),
        "{e}"
    );
    assert_eq!(echoed(&e, "x-a"), ["1", "2"], "{e}");
    let r = s.call(
        "http/request",
        json!({"method": "GET", "url": web.url("/none"), "requestId": "r1"}),
    );
    assert_eq!(r["status"], 404);
}

#[test]
fn redirects_are_followed_without_credentials_across_origins_or_returned() {
    let here = Web::start("127.0.0.1");
    let there = Web::start("127.0.0.1");
    let mut s = server(&[]);
    let secret = [
        json!({"name": "Authorization", "value": "Bearer s3cret"}),
        json!({"name": "Cookie", "value": "id=1"}),
        json!({"name": "X-Keep", "value": "kept"}),
    ];
    // Same origin: credentials stay.
    let same = here.url(&format!("/redirect?code=307&to={}", here.url("/echo")));
    let r = s.call(
        "http/request",
        json!({"method": "POST", "url": same, "requestId": "a",
        "headers": secret, "bodyBase64": crate::support::b64(b"body")}),
    );
    let e = echo(&r);
    assert_eq!(echoed(&e, "authorization"), ["Bearer s3cret"], "{e}");
    assert_eq!(
        (e["method"].as_str(), e["bodyLength"].as_u64()),
        (Some("POST"), Some(4)),
        "307 replays: {e}"
    );
    // Another origin (another port): credentials dropped, others kept;
    // 302 turns POST into GET without the body.
    let cross = here.url(&format!("/redirect?code=302&to={}", there.url("/echo")));
    let r = s.call(
        "http/request",
        json!({"method": "POST", "url": cross, "requestId": "a",
        "headers": secret, "bodyBase64": crate::support::b64(b"body")}),
    );
    let e = echo(&r);
    assert!(
        echoed(&e, "authorization").is_empty() && echoed(&e, "cookie").is_empty(),
        "{e}"
    );
    assert_eq!(echoed(&e, "x-keep"), ["kept"], "{e}");
    assert_eq!(
        (e["method"].as_str(), e["bodyLength"].as_u64()),
        (Some("GET"), Some(0)),
        "{e}"
    );
    let reached = there.seen();
    assert_eq!(reached.len(), 1);
    assert_eq!(
        (reached[0].method.as_str(), reached[0].path.as_str()),
        ("GET", "/echo")
    );
    assert_eq!(reached[0].header("authorization"), None);
    // Stop: the 3xx itself.
    let r = s.call(
        "http/request",
        json!({"method": "GET", "url": cross, "requestId": "a",
        "redirectPolicy": "stop"}),
    );
    assert_eq!(r["status"], 302, "{r}");
    assert_eq!(header(&r, "location"), Some(there.url("/echo").as_str()));
    // A loop ends after 10 hops with an error.
    let self_loop = here.url("/redirect?code=302&to=/redirect?code=302");
    let err = s.request(
        "http/request",
        json!({"method": "GET", "url": self_loop, "requestId": "a"}),
    );
    assert_eq!(err["error"]["code"], -32603, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("http/request failed: "),
        "{err}"
    );
}

#[test]
fn timeouts_refusals_and_bad_params_are_errors_that_name_the_problem() {
    let web = Web::start("127.0.0.1");
    let mut s = server(&[]);
    let started = Instant::now();
    let r = s.request(
        "http/request",
        json!({"method": "GET", "url": web.url("/stall"),
        "requestId": "t", "timeoutMs": 300}),
    );
    assert_eq!(r["error"]["code"], -32603, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{r}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let refused = format!("http://127.0.0.1:{}/", closed_port());
    let r = s.request(
        "http/request",
        json!({"method": "GET", "url": refused, "requestId": "t"}),
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert_eq!(r["error"]["code"], -32603, "{r}");
    assert!(
        message.starts_with("http/request failed: ") && message.contains("refused"),
        "{r}"
    );
    assert!(
        !message.contains("127.0.0.1"),
        "the URL stays out of error texts: {r}"
    );
    for (params, expected) in [
        (
            json!({"method": "G T", "url": "http://x/", "requestId": "t"}),
            "http/request method is invalid",
        ),
        (
            json!({"method": "GET", "url": "not a url", "requestId": "t"}),
            "http/request url is invalid",
        ),
        (
            json!({"method": "GET", "url": "ftp://x/", "requestId": "t"}),
            "http/request only supports http and https URLs, got ftp",
        ),
        (
            json!({"method": "GET", "url": "http://x/", "requestId": "t", "headers": [{"name": "a b", "value": "1"}]}),
            "http/request header name is invalid",
        ),
        (
            json!({"method": "GET", "url": "http://x/", "requestId": "t", "headers": [{"name": "a", "value": "1\n2"}]}),
            "http/request header value is invalid for a",
        ),
        (json!({"method": "GET", "url": "http://x/"}), "requestId"),
    ] {
        let r = s.request("http/request", params);
        assert_eq!(r["error"]["code"], -32602, "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(expected),
            "{expected}: {r}"
        );
    }
    // The server still serves.
    assert_eq!(s.call("environment/status", json!({}))["status"], "ready");
}

#[test]
fn https_uses_the_executors_ca_bundle() {
    let web = Web::start_tls();
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/ca.pem");
    let mut trusting = server(&[("SSL_CERT_FILE", ca)]);
    let r = trusting.call(
        "http/request",
        json!({"method": "GET", "url": web.tls_url("/hello"), "requestId": "x"}),
    );
    assert_eq!(
        (r["status"].as_u64(), unb64(&r["bodyBase64"])),
        (Some(200), b"hello".to_vec())
    );
    let mut codex = server(&[("CODEX_CA_CERTIFICATE", ca)]);
    let r = codex.call(
        "http/request",
        json!({"method": "GET", "url": web.tls_url("/hello"), "requestId": "x"}),
    );
    assert_eq!(r["status"], 200);
    // Without it the test CA is not trusted.
    let mut plain = server(&[]);
    let r = plain.request(
        "http/request",
        json!({"method": "GET", "url": web.tls_url("/hello"), "requestId": "x"}),
    );
    assert_eq!(r["error"]["code"], -32603, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{r}"
    );
}

/// The server's peak resident memory, in MiB.
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

#[test]
fn a_streamed_100_mib_body_arrives_whole_in_order_with_bounded_server_memory() {
    let web = Web::start("127.0.0.1");
    let mut s = server(&[]);
    let r = s.call(
        "http/request",
        json!({"method": "GET", "url": web.url("/bytes?mib=100"),
        "requestId": "big", "streamResponse": true}),
    );
    assert_eq!(
        (r["status"].as_u64(), r["bodyBase64"].as_str()),
        (Some(200), Some("")),
        "{r}"
    );
    // A slow reader: nothing is read for a while; the server must wait,
    // not buffer the body.
    std::thread::sleep(Duration::from_secs(2));
    let paused_peak = peak_mib(s.child.id());
    let (mut offset, mut seq) = (0u64, 0u64);
    loop {
        let n = s.notification(|m| m["method"] == "http/request/bodyDelta");
        let p = &n["params"];
        seq += 1;
        assert_eq!(
            (p["requestId"].as_str(), p["seq"].as_u64()),
            (Some("big"), Some(seq)),
            "{n}"
        );
        let data = unb64(&p["deltaBase64"]);
        assert!(data.len() <= 1 << 20);
        for (i, b) in data.iter().enumerate() {
            if *b != pattern(offset + i as u64) {
                panic!("byte {} differs", offset + i as u64);
            }
        }
        offset += data.len() as u64;
        if p["done"] == true {
            assert!(data.is_empty() && p.get("error").is_none(), "{n}");
            break;
        }
    }
    assert_eq!(offset, 100 << 20);
    let peak = peak_mib(s.child.id());
    assert!(
        paused_peak < 80 && peak < 100,
        "peak memory {paused_peak} MiB paused, {peak} MiB in all"
    );
    // Once done, the id may be used again.
    let again = s.call(
        "http/request",
        json!({"method": "GET", "url": web.url("/hello"),
        "requestId": "big", "streamResponse": true}),
    );
    assert_eq!(again["status"], 200);
}

#[test]
fn an_active_stream_id_is_refused_and_a_failed_body_ends_with_an_error_delta() {
    let web = Web::start("127.0.0.1");
    let mut s = server(&[]);
    let r = s.call(
        "http/request",
        json!({"method": "GET", "url": web.url("/stall"),
        "requestId": "s1", "streamResponse": true, "timeoutMs": 1500}),
    );
    assert_eq!(r["status"], 200);
    let dup = s.request(
        "http/request",
        json!({"method": "GET", "url": web.url("/hello"),
        "requestId": "s1", "streamResponse": true}),
    );
    assert_eq!(dup["error"]["code"], -32602, "{dup}");
    assert_eq!(
        dup["error"]["message"],
        "http/request streamResponse requestId `s1` is already active"
    );
    // Buffered requests reserve nothing.
    let buffered = s.call(
        "http/request",
        json!({"method": "GET", "url": web.url("/hello"), "requestId": "s1"}),
    );
    assert_eq!(buffered["status"], 200);
    let first = s.notification(|m| m["method"] == "http/request/bodyDelta");
    assert_eq!(
        (
            first["params"]["seq"].as_u64(),
            unb64(&first["params"]["deltaBase64"])
        ),
        (Some(1), b"ab".to_vec()),
        "{first}"
    );
    let last = s.notification(|m| m["method"] == "http/request/bodyDelta");
    assert_eq!(
        (last["params"]["seq"].as_u64(), &last["params"]["done"]),
        (Some(2), &json!(true)),
        "{last}"
    );
    assert!(
        last["params"]["error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{last}"
    );
}

#[test]
fn the_executors_proxy_variables_apply() {
    let target = Web::start("127.0.0.2");
    // The executor's proxy: a test server that records the absolute-form
    // request it is sent.
    let proxy = Web::start("127.0.0.1");
    let proxy_url = format!("http://{}", proxy.addr);
    let mut s = server(&[("HTTP_PROXY", proxy_url.as_str()), ("NO_PROXY", "")]);
    let r = s.call(
        "http/request",
        json!({"method": "GET", "url": target.url("/hello"), "requestId": "p"}),
    );
    assert_eq!(r["status"], 404, "the proxy answered: {r}");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, target.url("/hello"));
    assert!(target.seen().is_empty());
    // NO_PROXY sends it straight there.
    let mut direct = server(&[
        ("HTTP_PROXY", proxy_url.as_str()),
        ("NO_PROXY", "127.0.0.2"),
    ]);
    let r = direct.call(
        "http/request",
        json!({"method": "GET", "url": target.url("/hello"), "requestId": "p"}),
    );
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(proxy.seen().len(), 1);
}

#[test]
fn urls_header_values_and_bodies_stay_out_of_the_log() {
    let web = Web::start("127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "exec \"$0\" --stdio 2>\"$1\"",
        bin(),
        log.to_str().unwrap(),
    ])
    .env("EXEC_SERVER_LOG", "trace")
    .env_remove("HTTP_PROXY")
    .env_remove("http_proxy");
    let mut s = Server::from_command(cmd);
    s.call("initialize", json!({"clientName": "it"}));
    s.send(&json!({"method": "initialized"}));
    let secret_headers = json!([{"name": "Authorization", "value": "Bearer SECRET-H"},
        {"name": "Cookie", "value": "SECRET-C"}]);
    for stream in [false, true] {
        let r = s.call(
            "http/request",
            json!({"method": "POST", "url": web.url("/echo?token=SECRET-Q"),
            "headers": secret_headers, "bodyBase64": crate::support::b64(b"SECRET-B"),
            "requestId": "x", "streamResponse": stream}),
        );
        assert_eq!(r["status"], 200);
    }
    let refused = format!("http://127.0.0.1:{}/SECRET-P?SECRET-Q", closed_port());
    let r = s.request(
        "http/request",
        json!({"method": "GET", "url": refused, "requestId": "y"}),
    );
    assert!(r.get("error").is_some());
    s.call("environment/status", json!({}));
    drop(s);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("http/request"), "trace logging is on: {text}");
    assert!(
        !text.contains("SECRET"),
        "a secret reached the log:\n{text}"
    );
}

/// A redirect to anything but http(s) fails (the notes say so); it came
/// back as a plain 302 result.
#[test]
fn redirects_to_other_schemes_fail() {
    let web = Web::start("127.0.0.1");
    let mut s = server(&[]);
    for to in [
        "file:///etc/passwd",
        "data:text/plain,hi",
        "unix:/run/docker.sock",
        "ftp://127.0.0.1/x",
        "gopher://127.0.0.1:70/",
    ] {
        let url = web.url(&format!("/redirect?code=302&to={to}"));
        let r = s.request(
            "http/request",
            json!({"method": "GET", "url": url, "requestId": "a"}),
        );
        assert_eq!(r["error"]["code"], -32603, "{to}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("http/request failed"),
            "{r}"
        );
        // With `stop`, the 3xx itself, as asked.
        let r = s.call(
            "http/request",
            json!({"method": "GET", "url": url, "requestId": "a", "redirectPolicy": "stop"}),
        );
        assert_eq!(r["status"], 302, "{r}");
    }
}

/// The reference's Cloudflare cookie store: for ChatGPT's hosts, the
/// allowlisted cookies a response sets are sent on later requests (from
/// any connection of the server) where their domain, host and `Secure`
/// allow; a session cookie set beside them never is, and no other host
/// gets any. (The hosts are reached through the executor's proxy: the
/// test server, which records what each request carried.)
#[test]
fn cloudflare_cookies_of_chatgpt_hosts_are_kept_and_nothing_else() {
    let proxy = Web::start("127.0.0.1");
    let proxy_url = format!("http://{}", proxy.addr);
    let mut cmd = Command::new(bin());
    for var in [
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HTTP_PROXY", &proxy_url).env("NO_PROXY", "");
    let mut s = Server::start_unix_command(cmd);
    s.handshake();
    let get = |s: &mut Server, url: &str, headers: Value| {
        let r = s.call(
            "http/request",
            json!({"method": "GET", "url": url, "headers": headers, "requestId": "c"}),
        );
        assert!(r["status"].is_u64(), "{url}: {r}");
        let seen = proxy.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.path, url);
        last.header("cookie").map(str::to_string)
    };
    assert_eq!(
        get(&mut s, "http://chatgpt.com/cf-cookies", json!([])),
        None
    );
    // Another connection of the same server.
    s.reconnect_unix();
    s.handshake();
    // The host that set them gets both of its own (not the session cookie,
    // not the Secure one over plain http).
    assert_eq!(
        get(&mut s, "http://chatgpt.com/x", json!([])).as_deref(),
        Some("__cf_bm=bm1; _cfuvid=u1")
    );
    // A subdomain gets the Domain one only; the other families none.
    assert_eq!(
        get(&mut s, "http://api.chatgpt.com/x", json!([])).as_deref(),
        Some("__cf_bm=bm1")
    );
    for other in [
        "http://example.com/x",
        "http://evilchatgpt.com/x",
        "http://chatgpt.com.example.net/x",
        "http://chat.openai.com/x",
    ] {
        assert_eq!(get(&mut s, other, json!([])), None, "{other}");
    }
    // A caller's own Cookie is sent as it is.
    assert_eq!(
        get(
            &mut s,
            "http://chatgpt.com/x",
            json!([{"name": "Cookie", "value": "mine=1"}])
        )
        .as_deref(),
        Some("mine=1")
    );
    // Max-Age=0 and an Expires in the past delete.
    get(&mut s, "http://chatgpt.com/cf-forget", json!([]));
    assert_eq!(get(&mut s, "http://chatgpt.com/x", json!([])), None);
}
