//! The server's own doors (issue 19): no sandboxed child reaches any
//! endpoint of its server (its Unix socket, the persist daemon's socket,
//! its WebSocket port, by path, through /proc, with or without network,
//! through its proxy), no other local user reaches a session, and the
//! client sends nothing to a socket someone else could have planted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, available, bin};

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn python() -> bool {
    available(
        "python3",
        has("python3"),
        "python3 is needed for the endpoint tests",
    )
}

/// What a child tries: every door of its server, and one that is not
/// the server's (a listener of the test), printed as the names of those
/// it got through.
const TRY_EVERY_DOOR: &str = r#"
import os, socket
env = os.environ
token = env["TOKEN"]
def unix(path):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect(path)
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"clientName":"child"}}\n')
        return b"sessionId" in s.recv(65536)
    except Exception:
        return False
def ws(host, port=None):
    try:
        s = socket.create_connection((host, port or int(env["WS_PORT"])), 3)
        s.settimeout(3)
        s.sendall(("GET /?token=%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n"
                   % (token, token)).encode())
        return s.recv(4096).startswith(b"HTTP/1.1 101")
    except Exception:
        return False
def ws_to(port):
    return ws("127.0.0.1", port)
def other():
    try:
        socket.create_connection(("127.0.0.1", int(env["OTHER_PORT"])), 3)
        return True
    except Exception:
        return False
def listed(path):
    try:
        os.listdir(path)
        return True
    except Exception:
        return False
got = {
    "unix": unix(env["SOCK"]),
    "unix-by-proc": unix("/proc/%s/root%s" % (env["SERVER_PID"], env["SOCK"])),
    "unix-by-proc-1": unix("/proc/1/root%s" % env["SOCK"]),
    "persist": unix(env["PERSIST"]),
    "persist-dir": listed(os.path.dirname(env["PERSIST"])),
    "ws": ws("127.0.0.1"),
    "ws-localhost": ws("localhost"),
    "other": other(),
    "another-server-unix": unix(env["OTHER_SOCK"]),
    "another-server-ws": ws_to(int(env["OTHER_WS_PORT"])),
    "inherited-socket": any(
        os.readlink("/proc/self/fd/" + fd).startswith("socket:")
        for fd in os.listdir("/proc/self/fd") if int(fd) > 2
        if os.path.exists("/proc/self/fd/" + fd)),
}
print(" ".join(k for k, v in got.items() if v) or "none")
"#;

/// A server listening on a Unix socket inside the workspace (a writable
/// place for the sandboxed child) and on a loopback WebSocket port with a
/// token the child knows, with a persist daemon of the same user beside
/// it.
struct Doors {
    _base: tempfile::TempDir,
    ws_root: PathBuf,
    sock: PathBuf,
    runtime: PathBuf,
    ws_port: u16,
    token: String,
    other: TcpListener,
    server: Server,
    bridge: Child,
    /// Another server of the same user (unix and ws, no token), which
    /// knows nothing of the first one's children.
    another: Child,
    another_sock: PathBuf,
    another_ws_port: u16,
}

impl Doors {
    fn open() -> Doors {
        let base = tempfile::tempdir().unwrap();
        let ws_root = base.path().join("ws");
        let runtime = base.path().join("runtime");
        std::fs::create_dir_all(&ws_root).unwrap();
        std::fs::create_dir_all(&runtime).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        // A persist daemon of this user, as `ssh host exec-server --stdio
        // --persist` would leave.
        let mut bridge = Command::new(bin())
            .args(["--stdio", "--persist=doors"])
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut to = bridge.stdin.take().unwrap();
        writeln!(
            to,
            "{}",
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"clientName": "bridge"}})
        )
        .unwrap();
        let mut first = String::new();
        BufReader::new(bridge.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("sessionId"), "{first}");
        std::mem::forget(to);

        let token = "child-can-read-this".to_string();
        let token_file = base.path().join("token");
        std::fs::write(&token_file, &token).unwrap();
        let sock = ws_root.join("exec.sock");
        let mut child = Command::new(bin())
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(["--listen", "ws://127.0.0.1:0", "--connection-token-file"])
            .arg(&token_file)
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = [String::new(), String::new()];
        for line in &mut lines {
            out.read_line(line).unwrap();
        }
        let ws = lines[1].trim().strip_prefix("ws://").unwrap().to_string();
        let ws_port = ws.rsplit(':').next().unwrap().parse().unwrap();
        let mut server = Server::attach_unix(child, &sock);
        server.handshake();
        let another_sock = base.path().join("another.sock");
        let mut another = Command::new(bin())
            .arg("--listen")
            .arg(format!("unix:{}", another_sock.display()))
            .args(["--listen", "ws://127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(another.stdout.take().unwrap());
        let mut lines = [String::new(), String::new()];
        for line in &mut lines {
            out.read_line(line).unwrap();
        }
        let another_ws_port = lines[1].trim().rsplit(':').next().unwrap().parse().unwrap();
        Doors {
            another,
            another_sock,
            another_ws_port,
            _base: base,
            ws_root,
            sock,
            runtime,
            ws_port,
            token,
            other: TcpListener::bind("127.0.0.1:0").unwrap(),
            server,
            bridge,
        }
    }

    fn env(&self) -> Value {
        json!({
            "PATH": std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            "SOCK": self.sock.to_str().unwrap(),
            "PERSIST": self.runtime.join("exec-server/doors.sock").to_str().unwrap(),
            "WS_PORT": self.ws_port.to_string(),
            "TOKEN": self.token,
            "SERVER_PID": self.server.child.id().to_string(),
            "OTHER_PORT": self.other.local_addr().unwrap().port().to_string(),
            "OTHER_SOCK": self.another_sock.to_str().unwrap(),
            "OTHER_WS_PORT": self.another_ws_port.to_string(),
        })
    }

    /// Run the door-trying script with `extra` start params: the doors it
    /// got through.
    fn attempt(&mut self, id: &str, extra: Value) -> String {
        let mut params = json!({"processId": id, "argv": ["python3", "-c", TRY_EVERY_DOOR],
            "cwd": self.ws_root.to_str().unwrap(), "env": self.env()});
        for (k, v) in extra.as_object().unwrap() {
            params[k] = v.clone();
        }
        let started = self.server.call("process/start", params);
        assert_eq!(started["processId"], id, "{started}");
        let (out, code) = self.server.collect(id);
        let out = String::from_utf8_lossy(&out).trim().to_string();
        assert_eq!(code, Some(0), "{id}: {out}");
        out
    }
}

impl Drop for Doors {
    fn drop(&mut self) {
        let _ = self.another.kill();
        let _ = self.another.wait();
        let _ = self.bridge.kill();
        let _ = self.bridge.wait();
        let _ = Command::new(bin())
            .args(["daemon", "stop", "--persist", "doors"])
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .output();
    }
}

fn restricted_fs(network: &str, ws_root: &Path) -> Value {
    json!({"sandbox": {
        "permissions": {"type": "managed", "network": network, "file_system": {
            "type": "restricted", "entries": [
                {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
                {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"},
            ]}},
        "workspaceRoots": [ws_root.to_str().unwrap()]}})
}

#[test]
fn a_sandboxed_child_reaches_no_door_of_its_server() {
    if !python() {
        return;
    }
    let mut d = Doors::open();
    // Unsandboxed, every door opens (the test can fail), as README says.
    let open = d.attempt("plain", json!({}));
    for door in [
        "unix",
        "persist",
        "persist-dir",
        "ws",
        "ws-localhost",
        "other",
    ] {
        assert!(
            open.split(' ').any(|w| w == door),
            "unsandboxed: {door} missing from {open}"
        );
    }
    let sessions = |d: &mut Doors| {
        let status = d.server.call("server/status", json!({}));
        status["sessions"].as_array().unwrap().len()
    };
    let before = sessions(&mut d);
    let ws_root = d.ws_root.clone();
    let variants = [
        ("net-enabled", restricted_fs("enabled", &ws_root), "other"),
        (
            "net-restricted",
            restricted_fs("restricted", &ws_root),
            "none",
        ),
        (
            "fs-open",
            json!({"sandbox": {"permissions": {"type": "managed", "network": "restricted",
                "file_system": {"type": "unrestricted"}}}}),
            "none",
        ),
        (
            "tty",
            {
                let mut p = restricted_fs("enabled", &ws_root);
                p["tty"] = json!(true);
                p
            },
            "other",
        ),
    ];
    for (id, params, expected) in variants {
        let got = d.attempt(id, params);
        assert_eq!(got, expected, "{id}: the sandboxed child got through");
    }
    // No sandboxed child made a session.
    assert_eq!(sessions(&mut d), before);
}

#[test]
fn a_managed_child_cannot_have_the_proxy_dial_its_server() {
    if !python() || !available("curl", has("curl"), "curl is needed") {
        return;
    }
    let mut d = Doors::open();
    let port = d.ws_port;
    let script = format!(
        "for h in 127.0.0.1 localhost 127.1 0x7f.0.0.1 2130706433 '[::ffff:127.0.0.1]'; do \
           curl -s -o /dev/null -w '%{{http_code}} ' --max-time 5 \"http://$h:{port}/readyz\"; \
           curl -s -o /dev/null -w '%{{http_code}} ' --max-time 5 -p \"http://$h:{port}/readyz\"; \
         done; echo"
    );
    let proxy = json!({"enabled": true, "enableSocks5": true, "enableSocks5Udp": false,
        "allowUpstreamProxy": false, "dangerouslyAllowAllUnixSockets": false, "mode": "full",
        "domains": {"*": "allow"}, "unixSockets": null, "allowLocalBinding": true});
    let params = json!({"processId": "m", "argv": ["sh", "-c", script],
        "cwd": "/tmp", "env": d.env(),
        "sandbox": {"permissions": {"type": "managed", "network": "restricted",
            "file_system": {"type": "unrestricted"}}},
        "enforceManagedNetwork": true, "networkProxy": {"proxy": proxy}});
    let started = d.server.call("process/start", params);
    assert_eq!(started["processId"], "m", "{started}");
    let (out, _) = d.server.collect("m");
    let out = String::from_utf8_lossy(&out);
    for code in out.split_whitespace() {
        assert!(
            code == "403" || code == "400" || code == "000",
            "the proxy reached the server's own port: {out}"
        );
    }
    assert!(!out.contains("200"), "{out}");
}

/// Whether this test can be a second local user (root, and the
/// `exec-server-ci` user `.ci/run` makes).
fn second_user() -> bool {
    // SAFETY: getter without failure modes.
    let root = unsafe { libc::geteuid() } == 0;
    let user = Command::new("id")
        .arg("exec-server-ci")
        .output()
        .is_ok_and(|o| o.status.success());
    available(
        "second-user",
        root && user,
        "this test needs root and the user exec-server-ci (.ci/run makes it)",
    )
}

const UPGRADE: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 3)
s.settimeout(5)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
print(s.recv(4096).split(b"\r\n")[0].decode())
"#;

#[test]
fn another_local_user_is_refused_by_a_loopback_listener_without_a_token() {
    if !python() || !second_user() {
        return;
    }
    // A socket in a directory the other user may enter.
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sock = dir.path().join("s.sock");
    let mut command = Command::new(bin());
    command
        .args(["--listen", "ws://127.0.0.1:0", "--listen"])
        .arg(format!("unix:{}", sock.display()));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url = String::new();
    for _ in 0..2 {
        url.clear();
        out.read_line(&mut url).unwrap();
        if url.starts_with("ws://") {
            break;
        }
    }
    let url = url.trim().to_string();
    let port = url.rsplit(':').next().unwrap().to_string();
    let unix_try = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({:?})\n    s.sendall(b'{{\"id\":1,\"method\":\"initialize\",\"params\":{{\"clientName\":\"x\"}}}}\\n')\n    s.settimeout(3)\n    print('served' if b'sessionId' in s.recv(4096) else 'refused')\nexcept Exception as e:\n    print('refused', e)",
        sock.to_str().unwrap()
    );
    let theirs = Command::new("runuser")
        .args(["-u", "exec-server-ci", "--", "python3", "-c", &unix_try])
        .current_dir("/")
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&theirs.stdout);
    assert!(
        theirs.starts_with("refused"),
        "another user over unix: {theirs}"
    );
    let as_them = Command::new("runuser")
        .args([
            "-u",
            "exec-server-ci",
            "--",
            "python3",
            "-c",
            UPGRADE,
            &port,
        ])
        .current_dir("/")
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&as_them.stdout);
    assert!(theirs.starts_with("HTTP/1.1 403"), "another user: {theirs}");
    // The server's own user is served (the test can fail).
    let ours = Command::new("python3")
        .args(["-c", UPGRADE, &port])
        .output()
        .unwrap();
    let ours = String::from_utf8_lossy(&ours.stdout);
    assert!(ours.starts_with("HTTP/1.1 101"), "the same user: {ours}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A fake server at `path`, run as `user` (or as us): it records whatever
/// it is sent into `path.log`.
fn fake_server(path: &Path, user: Option<&str>) -> Child {
    let script = format!(
        r#"
import socket, os
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind({path:?})
os.chmod({path:?}, 0o777)
s.listen(4)
print("ready", flush=True)
s.settimeout(20)
try:
    c, _ = s.accept()
except Exception:
    raise SystemExit(0)
c.settimeout(3)
data = b""
try:
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
except Exception:
    pass
open({log:?}, "wb").write(data)
"#,
        path = path.to_str().unwrap(),
        log = format!("{}.log", path.display()),
    );
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "python3", "-c", &script]);
            c
        }
        None => {
            let mut c = Command::new("python3");
            c.args(["-c", &script]);
            c
        }
    };
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    child
}

/// `exec-server run --via unix:PATH --env SECRET=... -- true`: its exit
/// code and stderr.
fn run_via(path: &Path) -> (i32, String) {
    let out = Command::new(bin())
        .args(["run", "--via"])
        .arg(format!("unix:{}", path.display()))
        .args(["--env", "SECRET=hunter2", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn nothing_was_sent(path: &Path, mut fake: Child) {
    let _ = fake.kill();
    let _ = fake.wait();
    let mut sent = Vec::new();
    if let Ok(mut log) = std::fs::File::open(format!("{}.log", path.display())) {
        log.read_to_end(&mut sent).unwrap();
    }
    assert!(sent.is_empty(), "sent: {}", String::from_utf8_lossy(&sent));
}

#[test]
fn the_client_sends_nothing_to_a_socket_another_user_made() {
    if !python() || !second_user() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    let path = dir.path().join("exec.sock");
    let fake = fake_server(&path, Some("exec-server-ci"));
    let (code, err) = run_via(&path);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("belongs to uid"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    nothing_was_sent(&path, fake);
}

#[test]
fn the_client_sends_nothing_to_a_socket_in_a_directory_others_can_change() {
    if !python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let path = dir.path().join("exec.sock");
    let fake = fake_server(&path, None);
    let (code, err) = run_via(&path);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("can be changed by other users"), "{err}");
    nothing_was_sent(&path, fake);
}

/// A bridge `--stdio --persist=NAME` with the daemons' directory in
/// `runtime`, its stdin closed at once: its exit status, stderr, and how
/// long it took.
fn bridge_once(runtime: &Path, name: &str) -> (i32, String, Duration) {
    let start = std::time::Instant::now();
    let out = Command::new(bin())
        .args(["--stdio", &format!("--persist={name}")])
        .env("XDG_RUNTIME_DIR", runtime)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

fn private_runtime() -> (tempfile::TempDir, PathBuf) {
    let runtime = tempfile::tempdir().unwrap();
    let dir = runtime.path().join("exec-server");
    std::fs::create_dir(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    (runtime, dir)
}

#[test]
fn planted_links_make_every_file_writing_path_refuse() {
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("victim");
    // The persist daemon's log, lock and pid files, each a planted link.
    for file in ["log", "lock", "pid"] {
        std::fs::write(&victim, "original\n").unwrap();
        let (runtime, dir) = private_runtime();
        std::os::unix::fs::symlink(&victim, dir.join(format!("links.{file}"))).unwrap();
        let (code, err, _) = bridge_once(runtime.path(), "links");
        assert_ne!(code, 0, "{file}: {err}");
        assert!(
            err.contains("symbolic link") || err.contains("before it listened"),
            "{file}: {err}"
        );
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "original\n",
            "{file}: written through the link"
        );
        let _ = Command::new(bin())
            .args(["daemon", "stop", "--persist", "links"])
            .env("XDG_RUNTIME_DIR", runtime.path())
            .output();
    }
    // --listen unix: at a planted link.
    {
        std::fs::write(&victim, "original\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("s.sock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let out = Command::new(bin())
            .arg("--listen")
            .arg(format!("unix:{}", link.display()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is not a socket"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original\n");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    // --pid-file: a link, and a hard link, to the victim.
    for hard in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("server.pid");
        if hard {
            std::fs::hard_link(&victim, &pid).unwrap();
        } else {
            std::os::unix::fs::symlink(&victim, &pid).unwrap();
        }
        let mut command = Command::new(bin());
        command
            .arg("--listen")
            .arg(format!("unix:{}", dir.path().join("s.sock").display()))
            .arg("--pid-file")
            .arg(&pid)
            .stderr(Stdio::piped());
        let (mut child, first) = crate::support::listening(command);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if hard {
            // A hard link is only another name: replaced by a file of
            // its own, the victim untouched.
            assert!(first.starts_with("unix:"), "{first} {err}");
            assert_ne!(std::fs::read_to_string(&pid).unwrap(), "original\n");
        } else {
            assert_eq!(first, "", "started through a link");
            assert!(err.contains("symbolic link"), "{err}");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original\n");
    }
}

#[test]
fn a_lock_held_by_someone_else_is_a_clear_error_in_seconds() {
    if !python() {
        return;
    }
    let (runtime, dir) = private_runtime();
    let lock = dir.join("held.lock");
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time\nf = open(sys.argv[1], 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)",
        ])
        .arg(&lock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held");
    let (code, err, took) = bridge_once(runtime.path(), "held");
    let _ = holder.kill();
    let _ = holder.wait();
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("locked by another process"), "{err}");
    assert!(took < Duration::from_secs(9), "took {took:?}");
}

#[test]
fn a_full_filesystem_under_the_persist_directory_is_named() {
    // SAFETY: getter without failure modes.
    let root = unsafe { libc::geteuid() } == 0;
    if !available("root", root, "mounting a small tmpfs needs root") {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(runtime.path())
        .status()
        .unwrap();
    assert!(mounted.success());
    let dir = runtime.path().join("exec-server");
    std::fs::create_dir(&dir).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    // Fill it.
    let mut filler = std::fs::File::create(runtime.path().join("filler")).unwrap();
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    let _ = filler.sync_all();
    let (code, err, _) = bridge_once(runtime.path(), "full");
    let _ = Command::new("umount")
        .arg("-l")
        .arg(runtime.path())
        .status();
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("is full") || err.contains("No space left"),
        "the cause is not named: {err}"
    );
    assert!(!err.contains("did not listen in time"), "{err}");
}
