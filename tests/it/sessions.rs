//! Sessions that outlive their connection, over a Unix socket: detach on
//! disconnect, resume by session id with nothing lost, refusal while
//! attached elsewhere, expiry that takes every process with it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    NUMBERED, assert_numbered, bin, eventually, pid_gone, spawn_listening, unb64,
};

/// A server listening on a Unix socket in a directory of its own.
struct Listening {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Listening {
    fn start(args: &[&str]) -> Listening {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exec.sock");
        let listen = format!("unix:{}", path.display());
        // Ready once it says where it listens.
        let (child, first) = spawn_listening(&[&["--listen", &listen], args].concat());
        assert_eq!(first, listen);
        Listening {
            child,
            path,
            _dir: dir,
        }
    }

    fn connect(&self) -> Peer {
        Peer::connect(&self.path)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One connection: requests and their answers, notifications dropped.
struct Peer {
    stream: UnixStream,
    lines: BufReader<UnixStream>,
    next_id: i64,
}

impl Peer {
    fn connect(path: &Path) -> Peer {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Peer {
            lines: BufReader::new(stream.try_clone().unwrap()),
            stream,
            next_id: 1,
        }
    }

    /// The answer to a request (notifications in between are skipped).
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        writeln!(self.stream, "{line}").unwrap();
        loop {
            let mut text = String::new();
            assert!(
                self.lines.read_line(&mut text).unwrap() > 0,
                "the server closed the connection"
            );
            let message: Value = serde_json::from_str(&text).unwrap();
            if message["id"] == id {
                return message;
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let answer = self.request(method, params);
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// A new session, or `resume` one: its id.
    fn handshake(&mut self, resume: Option<&str>) -> Result<String, Value> {
        let mut params = json!({"clientName": "it"});
        if let Some(id) = resume {
            params["resumeSessionId"] = json!(id);
        }
        let answer = self.request("initialize", params);
        match answer["result"]["sessionId"].as_str() {
            Some(id) => {
                writeln!(self.stream, "{}", json!({"method": "initialized"})).unwrap();
                Ok(id.to_string())
            }
            None => Err(answer),
        }
    }

    /// Everything `id` wrote from `after` on, until it is closed.
    fn read_to_close(&mut self, id: &str, mut after: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "{id} did not close");
            let r = self.call(
                "process/read",
                json!({"processId": id, "afterSeq": after, "waitMs": 1000}),
            );
            for chunk in r["chunks"].as_array().unwrap() {
                out.extend(unb64(&chunk["chunk"]));
            }
            after = r["nextSeq"].as_u64().unwrap() - 1;
            if r["closed"] == true {
                return out;
            }
        }
    }
}

#[test]
fn a_dropped_connection_resumes_with_every_line_once_and_in_order() {
    let server = Listening::start(&[]);
    let mut first = server.connect();
    let session = first.handshake(None).unwrap();
    first.call(
        "process/start",
        json!({"processId": "n", "argv": ["sh", "-c", NUMBERED], "cwd": "/tmp"}),
    );
    // Read a little, then drop the connection mid-stream.
    let r = first.call(
        "process/read",
        json!({"processId": "n", "afterSeq": 0, "waitMs": 1000}),
    );
    assert!(!r["chunks"].as_array().unwrap().is_empty());
    drop(first);
    std::thread::sleep(Duration::from_secs(1));
    let mut second = server.connect();
    assert_eq!(second.handshake(Some(&session)).unwrap(), session);
    let list = second.call("process/list", json!({}));
    assert_eq!(list["processes"][0]["processId"], "n");
    assert_numbered(&second.read_to_close("n", 0));
}

#[test]
fn a_session_attached_elsewhere_is_refused_and_one_of_two_resumes_wins() {
    let server = Listening::start(&[]);
    let mut first = server.connect();
    let session = first.handshake(None).unwrap();
    let mut other = server.connect();
    let refused = other.handshake(Some(&session)).unwrap_err();
    assert_eq!(refused["error"]["code"], -32010, "{refused}");
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    // Two at once: exactly one wins, the other is told to retry.
    let path = server.path.clone();
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let path = path.clone();
            let session = session.clone();
            std::thread::spawn(move || {
                let mut peer = Peer::connect(&path);
                let outcome = peer.handshake(Some(&session));
                (outcome, peer)
            })
        })
        .collect();
    let outcomes: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let wins = outcomes.iter().filter(|(o, _)| o.is_ok()).count();
    assert_eq!(wins, 1);
    let (loser, _) = outcomes.iter().find(|(o, _)| o.is_err()).unwrap();
    assert_eq!(loser.as_ref().unwrap_err()["error"]["code"], -32010);
}

#[test]
fn a_detached_session_expires_with_every_process_and_descendant() {
    let server = Listening::start(&["--detached-session-ttl-ms", "300"]);
    let mut peer = server.connect();
    let session = peer.handshake(None).unwrap();
    peer.call(
        "process/start",
        json!({"processId": "d", "argv": ["sh", "-c", "setsid sleep 1000 & echo $!; sleep 1000"],
               "cwd": "/tmp", "env": {"PATH": "/usr/bin:/bin"}}),
    );
    let r = peer.call(
        "process/read",
        json!({"processId": "d", "afterSeq": 0, "waitMs": 2000}),
    );
    let daemon: i32 = String::from_utf8(unb64(&r["chunks"][0]["chunk"]))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let leader = peer.call("process/list", json!({}))["processes"][0]["pid"]
        .as_i64()
        .unwrap() as i32;
    drop(peer);
    assert!(
        eventually(Duration::from_secs(3), || pid_gone(daemon)
            && pid_gone(leader)),
        "the expired session's processes still run"
    );
    let mut late = server.connect();
    let refused = late.handshake(Some(&session)).unwrap_err();
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
}

#[test]
fn the_socket_is_private_and_not_taken_from_a_running_server() {
    use std::os::unix::fs::PermissionsExt;
    let server = Listening::start(&[]);
    let mode = std::fs::metadata(&server.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = Command::new(bin())
        .arg("--listen")
        .arg(format!("unix:{}", server.path.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listens"));
    // The first one still serves.
    server.connect().handshake(None).unwrap();
}

#[test]
fn a_socket_file_left_by_a_dead_server_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let (mut child, first) = spawn_listening(&["--listen", &format!("unix:{}", path.display())]);
    assert!(first.starts_with("unix:"), "{first}");
    Peer::connect(&path).handshake(None).unwrap();
    // SIGTERM: the server ends and removes its socket.
    // SAFETY: plain syscall on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!path.exists());
}

#[test]
fn a_resume_while_the_old_connection_waits_in_a_long_poll() {
    let server = Listening::start(&[]);
    let mut first = server.connect();
    let session = first.handshake(None).unwrap();
    first.call(
        "process/start",
        json!({"processId": "q", "cwd": "/tmp", "pipeStdin": true, "argv": ["cat"]}),
    );
    // A read that waits (nothing to say yet), then the connection drops.
    let line = json!({"jsonrpc": "2.0", "id": 99, "method": "process/read",
                      "params": {"processId": "q", "afterSeq": 0, "waitMs": 60000}});
    writeln!(first.stream, "{line}").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(first);
    // Resuming may race the detach: -32010 is retried.
    let started = Instant::now();
    let mut second = loop {
        let mut peer = server.connect();
        match peer.handshake(Some(&session)) {
            Ok(_) => break peer,
            Err(refused) => {
                assert_eq!(refused["error"]["code"], -32010, "{refused}");
                assert!(started.elapsed() < Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    // Nothing the cancelled read would have returned is lost.
    second.call(
        "process/write",
        json!({"processId": "q", "chunk": crate::support::b64(b"kept\n"), "writeId": "w"}),
    );
    second.call("process/closeStdin", json!({"processId": "q"}));
    assert_eq!(second.read_to_close("q", 0), b"kept\n");
}

/// An unprivileged server refuses a peer of another uid, even one that can
/// reach its socket (root here). Needs root and the `exec-server-ci` user
/// (`.ci/run` makes it before the tests).
#[test]
fn an_unprivileged_server_refuses_a_peer_of_another_uid() {
    // SAFETY: getter without failure modes.
    let root = unsafe { libc::geteuid() } == 0;
    let user = Command::new("id")
        .arg("exec-server-ci")
        .output()
        .is_ok_and(|o| o.status.success());
    if !crate::support::available(
        "second-user",
        root && user,
        "this test needs root and the user exec-server-ci (.ci/run makes it)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let path = dir.path().join("theirs.sock");
    let mut command = Command::new("runuser");
    command
        .args(["-u", "exec-server-ci", "--"])
        .arg(bin())
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .env_remove("XDG_RUNTIME_DIR")
        .stderr(Stdio::null());
    let (mut child, first) = crate::support::listening(command);
    assert!(first.starts_with("unix:"), "{first}");
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = writeln!(
        stream,
        "{}",
        json!({"id": 1, "method": "initialize", "params": {"clientName": "root"}})
    );
    let mut answer = String::new();
    let n = BufReader::new(&stream).read_line(&mut answer).unwrap_or(0);
    assert_eq!(n, 0, "root was served by another user's server: {answer}");
    // `child` is runuser, which does not pass a SIGKILL on: the server
    // (its child) goes first, else it outlives the test.
    for pid in crate::support::children_of(child.id()) {
        // SAFETY: plain syscall on a child of our child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let _ = child.wait();
}
