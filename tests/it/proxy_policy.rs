//! The policy proxy decides on exactly what it forwards (issue 19): every
//! spelling of a denied or local address is refused over HTTP, CONNECT
//! and SOCKS5 (the spellings are generated, not listed), and request
//! shapes that two parties could read two ways get 400. What reached the
//! test's web servers is asserted, not only what the child printed.

use serde_json::{Value, json};

use crate::support::{Server, available};
use crate::web::Web;

fn tools() -> bool {
    let python = std::process::Command::new("sh")
        .args(["-c", "command -v python3"])
        .output()
        .is_ok_and(|o| o.status.success());
    available("python3", python, "python3 is needed for the proxy tests")
}

/// Every way of writing the IPv4 address `ip` this generator knows: one to
/// four parts, each part in decimal, octal or hex (any case, extra zeros),
/// every part in one form, a trailing dot, full-width digits and dots, and
/// IPv4-mapped IPv6 in several forms.
fn spellings(ip: [u8; 4]) -> Vec<String> {
    let [a, b, c, d] = ip.map(u32::from);
    let forms = |n: u32| {
        vec![
            n.to_string(),
            format!("0{n:o}"),
            format!("000{n:o}"),
            format!("0x{n:x}"),
            format!("0X{n:X}"),
            format!("0x000{n:x}"),
        ]
    };
    let splits = [
        vec![a, b, c, d],
        vec![a, b, (c << 8) | d],
        vec![a, (b << 16) | (c << 8) | d],
        vec![(a << 24) | (b << 16) | (c << 8) | d],
    ];
    let mut out = Vec::new();
    for parts in &splits {
        let per: Vec<Vec<String>> = parts.iter().map(|&p| forms(p)).collect();
        for (i, choices) in per.iter().enumerate() {
            for choice in choices {
                let mut words: Vec<String> = parts.iter().map(u32::to_string).collect();
                words[i] = choice.clone();
                out.push(words.join("."));
            }
        }
        for f in 0..per[0].len() {
            out.push(
                per.iter()
                    .map(|c| c[f].clone())
                    .collect::<Vec<_>>()
                    .join("."),
            );
        }
    }
    let plain = out.clone();
    out.extend(plain.iter().map(|p| format!("{p}.")));
    let dotted = format!("{a}.{b}.{c}.{d}");
    let full_width: String = dotted
        .chars()
        .map(|ch| match ch {
            '0'..='9' => char::from_u32(ch as u32 - '0' as u32 + 0xFF10).unwrap(),
            _ => '\u{3002}',
        })
        .collect();
    out.push(full_width);
    out.push(dotted.replace('.', "\u{FF0E}"));
    let hex = format!("{:x}:{:x}", (a << 8) | b, (c << 8) | d);
    for v6 in [
        format!("::ffff:{dotted}"),
        format!("::FFFF:{dotted}"),
        format!("::ffff:{hex}"),
        format!("0:0:0:0:0:ffff:{hex}"),
        format!("0000:0000:0000:0000:0000:ffff:{hex}"),
        format!("0::ffff:{dotted}"),
    ] {
        out.push(format!("[{v6}]"));
        out.push(format!("[{v6}%25lo]"));
    }
    out.sort();
    out.dedup();
    out
}

/// The child's side: each spelling through the HTTP proxy (absolute
/// form), as a CONNECT target, and as a SOCKS5 domain; one line per
/// spelling: `SPELLING HTTP_STATUS CONNECT_STATUS SOCKS_REPLY`.
const EVERY_WAY: &str = r#"
import json, os, socket, sys, urllib.parse
port = int(os.environ["PORT"])
hp = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
sp = urllib.parse.urlsplit(os.environ["ALL_PROXY"])
def status(data):
    line = data.split(b"\r\n")[0].split(b" ")
    return line[1].decode() if len(line) > 1 else "none"
def ask(raw):
    try:
        s = socket.create_connection((hp.hostname, hp.port), 5)
        s.settimeout(5)
        s.sendall(raw)
        return status(s.recv(4096))
    except Exception as e:
        return "err"
def socks(host):
    try:
        s = socket.create_connection((sp.hostname, sp.port), 5)
        s.settimeout(5)
        s.sendall(b"\x05\x01\x00")
        s.recv(2)
        name = host.strip("[]").encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        reply = s.recv(10)
        return str(reply[1]) if len(reply) > 1 else "none"
    except Exception:
        return "err"
for host in json.loads(os.environ["SPELLINGS"]):
    authority = "%s:%d" % (host, port)
    http = ask(("GET http://%s/hello HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)).encode())
    connect = ask(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)).encode())
    print(json.dumps([host, http, connect, socks(host)]), flush=True)
"#;

fn managed(domains: Value, local_binding: bool, mode: &str) -> Value {
    json!({"sandbox": {"permissions": {"type": "managed", "network": "restricted",
            "file_system": {"type": "unrestricted"}}},
        "enforceManagedNetwork": true,
        "networkProxy": {"proxy": {"enabled": true, "enableSocks5": true, "enableSocks5Udp": true,
            "allowUpstreamProxy": false, "dangerouslyAllowAllUnixSockets": false, "mode": mode,
            "domains": domains, "unixSockets": null, "allowLocalBinding": local_binding}}})
}

/// Run python `script` in a managed sandbox with `extra` start params and
/// `env` added: its output lines.
fn run(s: &mut Server, id: &str, script: &str, env: Value, extra: Value) -> Vec<String> {
    let mut full_env =
        json!({"PATH": std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())});
    for (k, v) in env.as_object().unwrap() {
        full_env[k] = v.clone();
    }
    let mut params = json!({"processId": id, "argv": ["python3", "-c", script], "cwd": "/tmp",
        "env": full_env});
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    let started = s.call("process/start", params);
    assert_eq!(started["processId"], id, "{started}");
    let (out, code) = s.collect(id);
    let out = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(code, Some(0), "{id}: {out}");
    out.lines().map(str::to_string).collect()
}

/// Every spelling of `ip` tried three ways: none may get through.
fn none_get_through(s: &mut Server, id: &str, web: &Web, ip: [u8; 4], extra: Value) {
    let all = spellings(ip);
    assert!(all.len() > 100, "only {} spellings", all.len());
    let env = json!({"PORT": web.addr.port().to_string(), "SPELLINGS": json!(all).to_string()});
    let lines = run(s, id, EVERY_WAY, env, extra);
    assert_eq!(lines.len(), all.len(), "{lines:?}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let refused_http = |code: &Value| code == "403" || code == "400";
        assert!(refused_http(&v[1]), "HTTP got through: {line}");
        assert!(refused_http(&v[2]), "CONNECT got through: {line}");
        assert!(v[3] == "2" || v[3] == "1", "SOCKS5 got through: {line}");
    }
    assert!(web.seen().is_empty(), "{id}: reached: {:?}", web.seen());
}

#[test]
fn every_spelling_of_a_denied_address_is_refused_over_http_connect_and_socks() {
    if !tools() {
        return;
    }
    let web = Web::start("127.0.0.2");
    let mut s = Server::started(&[]);
    let deny = managed(json!({"*": "allow", "127.0.0.2": "deny"}), true, "full");
    none_get_through(&mut s, "deny", &web, [127, 0, 0, 2], deny.clone());
    // The plain spelling of an address that is not denied gets through:
    // the test can fail.
    let open = Web::start("127.0.0.3");
    let env = json!({"PORT": open.addr.port().to_string(), "SPELLINGS": json!(["127.0.0.3", "0x7f.3"]).to_string()});
    let lines = run(&mut s, "control", EVERY_WAY, env, deny);
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            (&v[1], &v[2], &v[3]),
            (&json!("200"), &json!("200"), &json!("0")),
            "{line}"
        );
    }
    // Two spellings, three ways each; the tunnels carried no request.
    assert_eq!(open.seen().len(), 2, "{:?}", open.seen());
}

#[test]
fn every_spelling_of_a_local_address_is_refused_without_local_binding() {
    if !tools() {
        return;
    }
    let web = Web::start("127.0.0.2");
    let mut s = Server::started(&[]);
    // Allowed by a pattern, but local: refused in every spelling.
    let params = managed(json!({"*": "allow"}), false, "full");
    none_get_through(&mut s, "local", &web, [127, 0, 0, 2], params);
}

#[test]
fn an_allowlist_holds_for_every_spelling() {
    if !tools() {
        return;
    }
    let web = Web::start("127.0.0.2");
    let mut s = Server::started(&[]);
    // Only 127.0.0.3 is allowed (exactly, so as a local literal too).
    let params = managed(json!({"127.0.0.3": "allow"}), false, "full");
    none_get_through(&mut s, "allowlist", &web, [127, 0, 0, 2], params);
}

/// Raw requests sent to the HTTP proxy, one a line of output: the status.
const RAW: &str = r#"
import json, os, socket, urllib.parse
hp = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
sp = urllib.parse.urlsplit(os.environ["ALL_PROXY"])
for raw in json.loads(os.environ["REQUESTS"]):
    try:
        s = socket.create_connection((hp.hostname, hp.port), 5)
        s.settimeout(5)
        s.sendall(raw.encode())
        line = s.recv(4096).split(b"\r\n")[0].split(b" ")
        print(line[1].decode() if len(line) > 1 else "none", flush=True)
    except Exception:
        print("err", flush=True)
if os.environ.get("UDP") == "1":
    s = socket.create_connection((sp.hostname, sp.port), 5)
    s.sendall(b"\x05\x01\x00")
    s.recv(2)
    s.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    print("udp=%d" % s.recv(10)[1], flush=True)
"#;

/// Requests two parties could read two ways: each gets 400, and nothing
/// reaches the host.
#[test]
fn smuggling_shaped_requests_get_400() {
    if !tools() {
        return;
    }
    let web = Web::start("127.0.0.3");
    let mut s = Server::started(&[]);
    let a = format!("127.0.0.3:{}", web.addr.port());
    let get =
        |headers: &str, body: &str| format!("GET http://{a}/hello HTTP/1.1\r\n{headers}\r\n{body}");
    let post =
        |headers: &str, body: &str| format!("POST http://{a}/echo HTTP/1.1\r\n{headers}\r\n{body}");
    let shapes = vec![
        get(&format!("Host: {a}\r\nHost: {a}\r\n"), ""),
        get(&format!("Host: {a}\r\nhost: other.example\r\n"), ""),
        get("Host: other.example\r\n", ""),
        post(
            &format!("Host: {a}\r\nContent-Length: 5\r\nContent-Length: 5\r\n"),
            "hello",
        ),
        post(
            &format!("Host: {a}\r\nContent-Length: 5\r\nContent-Length: 6\r\n"),
            "hello!",
        ),
        post(&format!("Host: {a}\r\nContent-Length: +5\r\n"), "hello"),
        post(&format!("Host: {a}\r\nContent-Length: -1\r\n"), ""),
        post(&format!("Host: {a}\r\nContent-Length: 5, 5\r\n"), "hello"),
        post(&format!("Host: {a}\r\nContent-Length: 0x5\r\n"), "hello"),
        post(&format!("Host: {a}\r\nContent-Length: five\r\n"), "hello"),
        post(
            &format!("Host: {a}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
            "0\r\n\r\n",
        ),
        post(
            &format!("Host: {a}\r\nTransfer-Encoding: chunked, identity\r\n"),
            "0\r\n\r\n",
        ),
        post(
            &format!("Host: {a}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
            "0\r\n\r\n",
        ),
        post(
            &format!("Host: {a}\r\nTransfer-Encoding: xchunked\r\n"),
            "0\r\n\r\n",
        ),
        format!("CONNECT {a} HTTP/1.1\r\nHost: other.example:443\r\n\r\n"),
        format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nHost: {a}\r\n\r\n"),
    ];
    let env = json!({"REQUESTS": json!(shapes).to_string()});
    let full = managed(json!({"127.0.0.3": "allow"}), true, "full");
    let lines = run(&mut s, "shapes", RAW, env, full.clone());
    assert_eq!(lines.len(), shapes.len(), "{lines:?}");
    for (shape, status) in shapes.iter().zip(&lines) {
        assert_eq!(status, "400", "not refused: {shape:?}");
    }
    assert!(web.seen().is_empty(), "{:?}", web.seen());
    // A well-formed request gets through (the test can fail).
    let fine = vec![get(&format!("Host: {a}\r\n"), "")];
    let env = json!({"REQUESTS": json!(fine).to_string()});
    assert_eq!(run(&mut s, "fine", RAW, env, full), ["200"]);
    assert_eq!(web.seen().len(), 1);

    // Limited mode: nothing may follow the body, and no UDP.
    let limited = managed(json!({"127.0.0.3": "allow"}), true, "limited");
    let behind = vec![
        format!(
            "{}{}",
            get(&format!("Host: {a}\r\n"), ""),
            post(&format!("Host: {a}\r\nContent-Length: 0\r\n"), "")
        ),
        format!(
            "{}DELETE /x HTTP/1.1\r\n\r\n",
            get(&format!("Host: {a}\r\nContent-Length: 2\r\n"), "ok")
        ),
    ];
    let env = json!({"REQUESTS": json!(behind).to_string(), "UDP": "1"});
    let lines = run(&mut s, "limited", RAW, env, limited);
    assert_eq!(lines, ["400", "400", "udp=2"], "limited mode");
    assert_eq!(web.seen().len(), 1, "{:?}", web.seen());
}
