//! Managed networking and the executor-local proxy: a sandboxed command
//! whose only way out is the proxy, the proxy's policy, SOCKS5, and the
//! questions put to the client. Every test asserts what reached a
//! test-owned listener (a real HTTP server on a loopback address standing
//! in for a public host), not only what the command printed.

use std::net::{TcpListener, ToSocketAddrs};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, available, unb64};
use crate::web::Web;

pub(crate) fn tools() -> bool {
    let has = |tool: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    available("curl", has("curl"), "curl is needed for the network tests")
        && available(
            "python3",
            has("python3"),
            "python3 is needed for the network tests",
        )
}

/// The tools, a test web server on 127.0.0.2 (standing in for a public
/// host) and a started server; `None` (skipped) without the tools.
fn ready() -> Option<(Web, Server)> {
    tools().then(|| (Web::start("127.0.0.2"), Server::started(&[])))
}

/// A sandbox that leaves the filesystem open: the network is the point.
pub(crate) fn sandbox() -> Value {
    json!({"permissions": {"type": "managed", "network": "restricted",
        "file_system": {"type": "unrestricted"}}})
}

pub(crate) fn proxy(domains: Value, extra: Value) -> Value {
    let mut proxy = json!({"enabled": true, "enableSocks5": true, "enableSocks5Udp": false,
        "allowUpstreamProxy": false, "dangerouslyAllowAllUnixSockets": false, "mode": "full",
        "domains": domains, "unixSockets": null, "allowLocalBinding": false});
    for (k, v) in extra.as_object().unwrap() {
        proxy[k] = v.clone();
    }
    proxy
}

/// Start params for a sandboxed, managed start with a proxy of `proxy`'s
/// making.
fn managed(domains: Value, extra: Value) -> Value {
    json!({"sandbox": sandbox(), "enforceManagedNetwork": true,
        "networkProxy": {"proxy": proxy(domains, extra)}})
}

pub(crate) fn env() -> Value {
    json!({"PATH": std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())})
}

/// Start `sh -c script` with `extra` start params; its output and exit code.
pub(crate) fn run(s: &mut Server, id: &str, script: &str, extra: Value) -> (String, i64) {
    let mut params = json!({"processId": id, "argv": ["sh", "-c", script], "cwd": "/tmp",
        "env": env(), "tty": false});
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    let started = s.call("process/start", params);
    assert_eq!(started["processId"], id, "{started}");
    let (out, code) = s.collect(id);
    (
        String::from_utf8_lossy(&out).into_owned(),
        code.unwrap_or(-1),
    )
}

/// `curl` printing the status code (or `000` when it could not connect).
pub(crate) fn curl(url: &str, flags: &str) -> String {
    format!(
        "curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\\n' {flags} '{url}' 2>/dev/null; echo \"exit=$?\""
    )
}

/// Decision notifications for `id`, as many as `n`.
fn decisions(s: &mut Server, id: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            s.notification(|m| {
                m["method"] == "network/policyDecision" && m["params"]["processId"] == id
            })["params"]
                .clone()
        })
        .collect()
}

#[test]
fn only_the_proxy_gets_out_of_a_managed_sandbox() {
    if !tools() {
        return;
    }
    let allowed = Web::start("127.0.0.2");
    let denied = Web::start("127.0.0.3");
    let raw = TcpListener::bind("127.0.0.1:0").unwrap();
    raw.set_nonblocking(true).unwrap();
    let raw_port = raw.local_addr().unwrap().port();
    let mut s = Server::started(&[]);
    let script = [
        curl(&allowed.url("/hello"), ""),
        curl(&denied.url("/hello"), ""),
        // Tools that ignore the proxy variables reach nothing.
        curl(&allowed.url("/hello"), "--noproxy '*'"),
        curl(&format!("http://127.0.0.1:{raw_port}/"), "--noproxy '*'"),
        format!("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {raw_port}), 3)' 2>/dev/null; echo \"python=$?\""),
        format!("python3 -c 'import socket; socket.create_connection((\"{}\", {}), 3)' 2>/dev/null; echo \"python=$?\"", "127.0.0.2", allowed.addr.port()),
        // No Unix socket can be made, so no daemon of the host can relay.
        "python3 -c 'import socket; socket.socket(socket.AF_UNIX)' 2>/dev/null; echo \"unix=$?\"".to_string(),
        "echo \"HTTP_PROXY=$HTTP_PROXY\"".to_string(),
        // Without local binding, nothing can listen, even on its own lo.
        "python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen()' 2>/dev/null; echo \"listen=$?\"".to_string(),
        // The refusal as the reference words it.
        format!("curl -s '{}'; echo", denied.url("/hello")),
    ]
    .join("; ");
    let (out, code) = run(
        &mut s,
        "m1",
        &script,
        json!({"sandbox": sandbox(),
        "enforceManagedNetwork": true,
        "networkProxy": {"proxy": proxy(json!({"127.0.0.2": "allow", "127.0.0.3": "none"}), json!({})),
            "environmentId": "env-1", "executionId": "exec-1"}}),
    );
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0..2], ["200", "exit=0"], "{out}");
    assert_eq!(lines[2..4], ["403", "exit=0"], "{out}");
    assert_eq!(lines[4..6], ["000", "exit=7"], "{out}");
    assert_eq!(lines[6..8], ["000", "exit=7"], "{out}");
    assert_ne!(lines[8], "python=0", "{out}");
    assert_ne!(lines[9], "python=0", "{out}");
    assert_ne!(lines[10], "unix=0", "{out}");
    assert!(
        lines[11].starts_with("HTTP_PROXY=http://127.0.0.1:"),
        "{out}"
    );
    assert_ne!(lines[12], "listen=0", "{out}");
    let refusal: Value = serde_json::from_str(lines[13]).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (
            &refusal["status"],
            &refusal["reason"],
            &refusal["host"],
            &refusal["protocol"]
        ),
        (
            &json!("blocked"),
            &json!("not_allowed_local"),
            &json!("127.0.0.3"),
            &json!("http")
        ),
        "{refusal}"
    );
    assert_eq!(
        refusal["message"],
        "Sandbox policy blocks local/private network addresses."
    );
    // What reached the listeners: the one proxied request, nothing else.
    let seen = allowed.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/hello")
    );
    assert_eq!(
        seen[0].header("proxy-connection"),
        None,
        "hop-by-hop headers are dropped"
    );
    assert!(denied.seen().is_empty());
    assert!(raw.accept().is_err(), "a raw connection got out");
    let d = decisions(&mut s, "m1", 2);
    assert_eq!(
        (
            &d[0]["decision"],
            &d[0]["reason"],
            &d[0]["source"],
            &d[0]["scope"]
        ),
        (
            &json!("allow"),
            &json!("allow"),
            &json!("baseline_policy"),
            &json!("domain")
        ),
        "{d:?}"
    );
    assert_eq!(
        (
            &d[0]["host"],
            &d[0]["port"],
            &d[0]["protocol"],
            &d[0]["method"]
        ),
        (
            &json!("127.0.0.2"),
            &json!(allowed.addr.port()),
            &json!("http"),
            &json!("GET")
        )
    );
    assert_eq!(d[0]["policyOverride"], false);
    assert!(
        d[0]["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{d:?}"
    );
    let ts = d[0]["timestamp"].as_str().unwrap();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );
    // 127.0.0.3 is local and not named by an exact entry.
    assert_eq!(
        (&d[1]["decision"], &d[1]["reason"]),
        (&json!("deny"), &json!("not_allowed_local")),
        "{d:?}"
    );
}

#[test]
fn limited_mode_lets_get_through_and_refuses_post_and_connect() {
    let Some((web, mut s)) = ready() else {
        return;
    };
    let script = [
        curl(&web.url("/hello"), ""),
        curl(&web.url("/echo"), "-X POST -d x=1"),
        format!("curl -sS -o /dev/null -D - -X POST -d x=1 '{}' | grep -i '^x-proxy-error' | tr -d '\\r'", web.url("/echo")),
        curl(&web.url("/hello"), "--proxytunnel"),
        curl(&web.url("/hello"), "-x \"$ALL_PROXY\""),
    ]
    .join("; ");
    let (out, _) = run(
        &mut s,
        "l1",
        &script,
        managed(json!({"127.0.0.2": "allow"}), json!({"mode": "limited"})),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0..2], ["200", "exit=0"], "{out}");
    assert_eq!(lines[2..4], ["403", "exit=0"], "{out}");
    assert_eq!(lines[4], "x-proxy-error: blocked-by-method-policy", "{out}");
    // CONNECT: refused by the proxy (curl: 56); SOCKS to port 80: refused.
    assert_eq!(lines[5..7], ["000", "exit=56"], "{out}");
    assert_eq!(lines[7], "000", "{out}");
    assert_ne!(lines[8], "exit=0", "{out}");
    // CONNECT and SOCKS fail; only the GETs reached the server.
    let seen = web.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    let reasons: Vec<Value> = decisions(&mut s, "l1", 5)
        .iter()
        .map(|d| d["reason"].clone())
        .collect();
    assert!(
        reasons.contains(&json!("method_not_allowed")),
        "{reasons:?}"
    );
    assert!(reasons.contains(&json!("mitm_required")), "{reasons:?}");
}

#[test]
fn socks5_tcp_goes_through_or_is_refused_by_the_policy() {
    if !tools() {
        return;
    }
    let allowed = Web::start("127.0.0.2");
    let denied = Web::start("127.0.0.3");
    let mut s = Server::started(&[]);
    let script = [
        curl(&allowed.url("/hello"), "-x \"$ALL_PROXY\""),
        curl(&denied.url("/hello"), "-x \"$ALL_PROXY\""),
        "echo \"ALL_PROXY=$ALL_PROXY\"".to_string(),
    ]
    .join("; ");
    let (out, _) = run(
        &mut s,
        "s1",
        &script,
        managed(
            json!({"127.0.0.2": "allow", "127.0.0.3": "deny"}),
            json!({}),
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0..2], ["200", "exit=0"], "{out}");
    assert_eq!(lines[2], "000", "{out}");
    assert_ne!(lines[3], "exit=0", "{out}");
    assert!(
        lines[4].starts_with("ALL_PROXY=socks5h://127.0.0.1:"),
        "{out}"
    );
    assert_eq!(allowed.seen().len(), 1);
    assert!(denied.seen().is_empty());
    let d = decisions(&mut s, "s1", 2);
    assert_eq!(
        (&d[0]["protocol"], &d[0]["decision"]),
        (&json!("socks5_tcp"), &json!("allow")),
        "{d:?}"
    );
    assert_eq!(
        (&d[1]["decision"], &d[1]["reason"]),
        (&json!("deny"), &json!("denied")),
        "{d:?}"
    );
    assert!(d[0].get("method").is_none(), "{d:?}");
}

#[test]
fn a_name_resolving_to_a_private_address_is_refused_unless_local_binding() {
    if !tools() {
        return;
    }
    // This machine's own name: /etc/hosts maps it to a loopback or
    // private address.
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let private = (name.as_str(), 80)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.is_ipv4()));
    let Some(addr) = private.filter(|a| a.ip().is_loopback()) else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the host name {name} does not resolve to a loopback address"
        );
        return;
    };
    let web = Web::start(&addr.ip().to_string());
    let url = format!("http://{name}:{}/hello", web.addr.port());
    let mut s = Server::started(&[]);
    let domains = json!({name.as_str(): "allow"});
    let (out, _) = run(
        &mut s,
        "n1",
        &curl(&url, ""),
        managed(domains.clone(), json!({})),
    );
    assert_eq!(out.lines().next(), Some("403"), "even allowlisted: {out}");
    assert!(web.seen().is_empty());
    assert_eq!(decisions(&mut s, "n1", 1)[0]["reason"], "not_allowed_local");
    let (out, _) = run(
        &mut s,
        "n2",
        &curl(&url, ""),
        managed(domains, json!({"allowLocalBinding": true})),
    );
    assert_eq!(out.lines().next(), Some("200"), "{out}");
    assert_eq!(web.seen().len(), 1);
}

#[test]
fn allowlist_misses_are_put_to_the_client_which_allows_denies_or_says_nothing() {
    let Some((web, mut s)) = ready() else {
        return;
    };
    let script = [
        curl(&web.url("/hello"), ""),
        curl(&web.url("/echo"), ""),
        curl(&web.url("/none"), ""),
    ]
    .join("; ");
    let params = json!({"processId": "c1", "argv": ["sh", "-c", script], "cwd": "/tmp",
        "env": env(), "sandbox": sandbox(), "enforceManagedNetwork": true,
        "networkProxy": {"proxy": proxy(json!({}), json!({"allowLocalBinding": true})),
            "policyDecisionTimeoutMs": 300}});
    s.call("process/start", params);
    let expected = json!({"processId": "c1", "request": {"protocol": "http", "host": "127.0.0.2", "port": web.addr.port()}});
    let ask = s.server_request("network/policyRequest");
    assert_eq!(ask["params"], expected, "{ask}");
    assert!(ask["id"].is_u64(), "{ask}");
    s.send(&json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"decision": {"type": "allow"}}}));
    let ask = s.server_request("network/policyRequest");
    s.send(&json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"decision": {"type": "deny", "reason": "user_said_no"}}}));
    // The third is never answered: it times out (300 ms + 5 s) and denies.
    let _unanswered = s.server_request("network/policyRequest");
    let (out, _) = s.collect("c1");
    let out = String::from_utf8_lossy(&out);
    let codes: Vec<&str> = out.lines().filter(|l| !l.starts_with("exit=")).collect();
    assert_eq!(codes, ["200", "403", "403"], "{out}");
    let seen = web.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the allowed request got through: {seen:?}"
    );
    assert_eq!(seen[0].path, "/hello");
    let d = decisions(&mut s, "c1", 3);
    assert_eq!(
        (
            &d[0]["decision"],
            &d[0]["source"],
            &d[0]["reason"],
            &d[0]["policyOverride"]
        ),
        (
            &json!("allow"),
            &json!("decider"),
            &json!("not_allowed"),
            &json!(true)
        ),
        "{d:?}"
    );
    assert_eq!(
        (&d[1]["decision"], &d[1]["reason"]),
        (&json!("deny"), &json!("user_said_no")),
        "{d:?}"
    );
    assert_eq!(
        (&d[2]["decision"], &d[2]["reason"], &d[2]["source"]),
        (&json!("deny"), &json!("not_allowed"), &json!("decider")),
        "{d:?}"
    );
}

#[test]
fn pending_questions_deny_when_the_connection_ends() {
    if !tools() {
        return;
    }
    let web = Web::start("127.0.0.2");
    let mut s = Server::start_unix(&[]);
    let init = s.request("initialize", json!({"clientName": "it"}));
    let session = init["result"]["sessionId"].as_str().unwrap().to_string();
    s.send(&json!({"method": "initialized"}));
    let script = format!("{}; sleep 1", curl(&web.url("/hello"), ""));
    s.call(
        "process/start",
        json!({"processId": "q1", "argv": ["sh", "-c", script], "cwd": "/tmp",
        "env": env(), "sandbox": sandbox(), "enforceManagedNetwork": true,
        "networkProxy": {"proxy": proxy(json!({}), json!({"allowLocalBinding": true})),
            "policyDecisionTimeoutMs": 600000}}),
    );
    s.server_request("network/policyRequest");
    // The connection goes while the question waits: it is denied at once,
    // not after ten minutes; the resumed session sees the outcome.
    s.reconnect_unix();
    std::thread::sleep(Duration::from_millis(300));
    let init = s.request(
        "initialize",
        json!({"clientName": "it", "resumeSessionId": session}),
    );
    assert!(init.get("error").is_none(), "{init}");
    s.send(&json!({"method": "initialized"}));
    let (out, _) = s.collect("q1");
    assert_eq!(String::from_utf8_lossy(&out).lines().next(), Some("403"));
    assert!(web.seen().is_empty());
}

#[test]
fn enforcement_without_endpoints_fails_closed_and_given_ports_are_bridged() {
    if !tools() {
        return;
    }
    let mut s = Server::started(&[]);
    let r = s.request(
        "process/start",
        json!({"processId": "e1", "argv": ["true"], "cwd": "/tmp",
        "env": env(), "sandbox": sandbox(), "enforceManagedNetwork": true}),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert_eq!(
        r["error"]["message"],
        "sandbox intent cannot be enforced on this executor: managed networking requires proxy endpoints"
    );
    // An orchestrator's own proxy on executor loopback (here the test web
    // server stands in for it): its port, and only it, is reachable.
    let theirs = Web::start("127.0.0.1");
    let other = Web::start("127.0.0.1");
    let port = theirs.addr.port();
    let script = [
        curl(&format!("http://127.0.0.1:{port}/hello"), ""),
        curl(&other.url("/hello"), ""),
    ]
    .join("; ");
    let (out, _) = run(
        &mut s,
        "e2",
        &script,
        json!({"sandbox": sandbox(), "enforceManagedNetwork": true,
        "managedNetwork": {"loopbackPorts": [port], "allowLocalBinding": false}}),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0..2], ["200", "exit=0"], "{out}");
    assert_eq!(lines[2..4], ["000", "exit=7"], "{out}");
    assert_eq!(theirs.seen().len(), 1);
    assert!(other.seen().is_empty());
    // The config is checked before anything starts.
    let r = s.request(
        "process/start",
        json!({"processId": "e3", "argv": ["true"], "cwd": "/tmp",
        "networkProxy": {"proxy": proxy(json!({"*": "deny"}), json!({}))}}),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().starts_with(
            "invalid network proxy config: invalid value for network.denied_domains: *"
        ),
        "{r}"
    );
}

#[test]
fn without_a_sandbox_the_proxy_variables_are_advice_only() {
    let Some((web, mut s)) = ready() else {
        return;
    };
    let script = [
        curl(&web.url("/hello"), ""),
        curl(&web.url("/hello"), "--noproxy '*'"),
    ]
    .join("; ");
    let (out, _) = run(
        &mut s,
        "a1",
        &script,
        json!({
        "networkProxy": {"proxy": proxy(json!({}), json!({}))}}),
    );
    let lines: Vec<&str> = out.lines().collect();
    // Through the proxy: refused. Around it: nothing stops it.
    assert_eq!(lines[0], "403", "{out}");
    assert_eq!(lines[2], "200", "{out}");
    assert_eq!(web.seen().len(), 1);
    let _ = unb64;
}

#[test]
fn with_upstream_forwarding_allowed_requests_go_through_the_executors_proxy() {
    if !tools() {
        return;
    }
    let web = Web::start("127.0.0.2");
    // The executor's own proxy: a test server that records the
    // absolute-form request it is sent (and answers 404 to it).
    let upstream = Web::start("127.0.0.1");
    let mut cmd = std::process::Command::new(crate::support::bin());
    cmd.arg("--stdio")
        .env("HTTP_PROXY", format!("http://{}", upstream.addr))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let mut s = Server::from_command(cmd);
    s.call("initialize", json!({"clientName": "it"}));
    s.send(&json!({"method": "initialized"}));
    let (out, _) = run(
        &mut s,
        "u1",
        &curl(&web.url("/hello"), ""),
        managed(
            json!({"127.0.0.2": "allow"}),
            json!({"allowUpstreamProxy": true}),
        ),
    );
    assert_eq!(out.lines().next(), Some("404"), "{out}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, web.url("/hello"));
    assert!(web.seen().is_empty(), "went direct instead");
    // Denied hosts never reach the upstream proxy either.
    let (out, _) = run(
        &mut s,
        "u2",
        &curl("http://127.0.0.3:1/", ""),
        managed(
            json!({"127.0.0.2": "allow"}),
            json!({"allowUpstreamProxy": true}),
        ),
    );
    assert_eq!(out.lines().next(), Some("403"), "{out}");
    assert_eq!(upstream.seen().len(), 1);
}

#[test]
fn socks5_udp_datagrams_go_only_where_the_policy_allows() {
    if !tools() {
        return;
    }
    let echo = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&reply, from);
        }
    });
    let denied = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
    denied.set_nonblocking(true).unwrap();
    let denied_port = denied.local_addr().unwrap().port();
    let script = format!(
        r#"
import os, socket, struct
port = int(os.environ["ALL_PROXY"].rsplit(":", 1)[1])
t = socket.create_connection(("127.0.0.1", port), 5)
t.sendall(b"\x05\x01\x00"); assert t.recv(2) == b"\x05\x00"
t.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
r = t.recv(10); print("associate", r[1])
relay = (socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
def send(host, p, data):
    u.sendto(b"\x00\x00\x00\x01" + socket.inet_aton(host) + struct.pack(">H", p) + data, relay)
send("127.0.0.3", {denied_port}, b"leak")
send("127.0.0.2", {echo_port}, b"ping")
d, _ = u.recvfrom(2048); print("reply", d[10:].decode())
"#
    );
    let mut s = Server::started(&[]);
    let (out, code) = run(
        &mut s,
        "d1",
        &format!("python3 -c '{script}'"),
        managed(
            json!({"127.0.0.2": "allow"}),
            json!({"enableSocks5Udp": true}),
        ),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["associate 0", "reply echo:ping"],
        "{out}"
    );
    let mut buf = [0u8; 64];
    assert!(
        denied.recv_from(&mut buf).is_err(),
        "a refused datagram got out"
    );
    let d = decisions(&mut s, "d1", 2);
    let udp: Vec<(&Value, &Value)> = d.iter().map(|d| (&d["protocol"], &d["decision"])).collect();
    assert!(
        udp.contains(&(&json!("socks5_udp"), &json!("allow"))),
        "{d:?}"
    );
    assert!(
        udp.contains(&(&json!("socks5_udp"), &json!("deny"))),
        "{d:?}"
    );
}

#[test]
fn local_binding_lets_the_command_talk_on_its_own_loopback_only() {
    let Some((web, mut s)) = ready() else {
        return;
    };
    // A server and a client inside the namespace: allowed with local
    // binding; the host's listeners stay out of reach all the same.
    let script = format!(
        "python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen(); c = socket.create_connection(s.getsockname(), 3); a, _ = s.accept(); c.sendall(b\"ping\"); print(a.recv(4).decode())'; {}",
        curl(&web.url("/hello"), "--noproxy '*'")
    );
    let (out, _) = run(
        &mut s,
        "b1",
        &script,
        managed(json!({}), json!({"allowLocalBinding": true})),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["ping", "000", "exit=7"], "{out}");
    assert!(web.seen().is_empty());
}
