//! The audit log (`--audit-log`): a scripted session leaves the expected
//! events, line by line, with secrets planted everywhere a client can put
//! them (variables, URLs, headers, bodies, arguments) absent; rotation
//! keeps the log within its size; a log that can't be written (a full
//! disk) costs events, counted and reported, never service.

use std::time::Duration;

use serde_json::{Value, json};

use crate::network;
use crate::support::{Server, b64, bin, eventually};
use crate::web::Web;

const SECRET: &str = "s3cr3t-planted-0b5e";

/// The log's lines, parsed (every line must parse).
fn lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The log's lines once `want` holds of them (the writer is a thread).
fn lines_when(path: &std::path::Path, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    let ok = eventually(Duration::from_secs(10), || {
        got = lines(path);
        want(&got)
    });
    assert!(ok, "the audit log never got there: {got:#?}");
    got
}

fn events(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn a_scripted_session_leaves_the_expected_trail_and_no_secret() {
    if !network::tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let work = tempfile::tempdir().unwrap();
    let web = Web::start("127.0.0.2");
    let denied = Web::start("127.0.0.3");
    let log_arg = log.display().to_string();
    let mut s = Server::start_unix(&["--audit-log", &log_arg]);
    s.handshake();
    // A process, its variables valued with the secret, its arguments
    // holding it as a token flag, a header and a URL's query.
    let url_with_secret = format!("{}?token={SECRET}", web.url("/hello"));
    let argv = [
        "sh",
        "-c",
        "exit 3",
        "--token",
        SECRET,
        &format!("Authorization: Bearer {SECRET}"),
        &url_with_secret,
    ];
    s.start_process(
        "p1",
        &argv,
        json!({"env": {"API_TOKEN": SECRET, "PLAIN": SECRET}, "envPolicy": {"inherit": "none"}}),
    );
    let (_, code) = s.collect("p1");
    assert_eq!(code, Some(3));
    // File writes, a rename and a removal (the content holds the secret).
    let file = work.path().join("notes.txt");
    let moved = work.path().join("moved.txt");
    s.call(
        "fs/writeFile",
        json!({"path": file, "dataBase64": b64(format!("key={SECRET}\n").as_bytes())}),
    );
    s.call(
        "fs/rename",
        json!({"sourcePath": file, "destinationPath": moved}),
    );
    s.call("fs/remove", json!({"path": moved}));
    // An HTTP request with the secret in its URL, a header and its body.
    let r = s.call(
        "http/request",
        json!({"method": "POST", "url": format!("{}?api_key={SECRET}", web.url("/echo")),
            "headers": [{"name": "Authorization", "value": format!("Bearer {SECRET}")}],
            "bodyBase64": b64(SECRET.as_bytes()), "requestId": "h1"}),
    );
    assert_eq!(r["status"], 200, "{r}");
    // One connection the network policy allows and one it denies.
    let script = [
        network::curl(&web.url("/hello"), ""),
        network::curl(&denied.url("/hello"), ""),
    ]
    .join("; ");
    let domains = json!({"127.0.0.2": "allow", "127.0.0.3": "none"});
    let (out, _) = network::run(
        &mut s,
        "net",
        &script,
        json!({"sandbox": network::sandbox(), "enforceManagedNetwork": true,
            "networkProxy": {"proxy": network::proxy(domains, json!({}))}}),
    );
    assert!(out.starts_with("200"), "{out}");
    // A refusal.
    let refused = s.request("fs/readFile", json!({"path": "relative/path"}));
    assert!(refused["error"].is_object(), "{refused}");
    // One whose error quotes what it was sent (the secret, where a
    // boolean belongs).
    let refused = s.request(
        "process/start",
        json!({"processId": "bad", "argv": ["true"], "cwd": "/tmp", "tty": SECRET}),
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains(SECRET),
        "{refused}"
    );
    // A detach and a resume.
    let session = s.call("server/status", json!({}))["sessions"][0]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    s.reconnect_unix();
    s.resume(&session);

    let got = lines_when(&log, |l| {
        l.iter().filter(|e| e["event"] == "session.attach").count() == 2
    });
    let names = events(&got);
    // In the order it happened.
    let expected = [
        "server.start",
        "session.attach",
        "process.start",
        "process.exit",
        "fs.write",
        "fs.rename",
        "fs.remove",
        "http.request",
        "process.start",
        "network.decision",
        "network.decision",
        "process.exit",
        "refused",
        "refused",
        "session.detach",
        "session.attach",
    ];
    assert_eq!(names, expected, "{got:#?}");
    // Seqs climb by one from 1; every line has a time.
    for (i, line) in got.iter().enumerate() {
        assert_eq!(line["seq"], i as u64 + 1, "{line}");
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
    let by = |name: &str| -> Vec<&Value> { got.iter().filter(|l| l["event"] == name).collect() };
    let start = by("process.start")[0];
    assert_eq!(start["processId"], "p1");
    assert_eq!(start["envNames"], json!(["API_TOKEN", "PLAIN"]));
    assert_eq!(start["sandbox"]["type"], "none");
    assert_eq!(start["argv"][3], "--token");
    assert_eq!(start["argv"][4], "<redacted>");
    let exit = by("process.exit")[0];
    assert_eq!(
        (exit["exitCode"].clone(), exit["reason"].clone()),
        (json!(3), json!("exited"))
    );
    assert!(
        exit["durationMs"].is_u64() && exit["bytesOut"] == 0,
        "{exit}"
    );
    let write = by("fs.write")[0];
    assert_eq!(write["bytes"], format!("key={SECRET}\n").len(), "{write}");
    assert_eq!(by("fs.rename")[0]["toPath"], moved.display().to_string());
    let http = by("http.request")[0];
    assert_eq!(
        (
            http["method"].clone(),
            http["host"].clone(),
            http["status"].clone()
        ),
        (json!("POST"), json!(web.addr.to_string()), json!(200))
    );
    let decisions: Vec<(String, String)> = by("network.decision")
        .iter()
        .map(|d| {
            (
                d["host"].as_str().unwrap().to_string(),
                d["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("127.0.0.2".to_string(), "allow".to_string()),
            ("127.0.0.3".to_string(), "deny".to_string())
        ]
    );
    assert_eq!(by("refused")[0]["request"], "fs/readFile");
    assert_eq!(by("session.attach")[1]["resumed"], true);
    // Nowhere a secret.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(SECRET),
        "a secret reached the audit log:\n{text}"
    );
    // Readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn rotation_keeps_the_log_and_its_predecessor_within_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let log_arg = log.display().to_string();
    let max = 16 * 1024;
    let mut s = Server::started(&["--audit-log", &log_arg, "--audit-log-max-bytes", "16K"]);
    let target = dir.path().join("f");
    for i in 0..400 {
        s.call(
            "fs/writeFile",
            json!({"path": target, "dataBase64": b64(format!("{i}").as_bytes())}),
        );
    }
    let old = dir.path().join("audit.log.1");
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    assert!(
        eventually(Duration::from_secs(10), || {
            lines(&log).last().is_some_and(|l| l["seq"] == 402)
        }),
        "the last write never reached the log"
    );
    assert!(size(&old) > 0, "the log never rotated");
    assert!(
        size(&log) + size(&old) <= max,
        "{} + {} bytes on disk, more than {max}",
        size(&log),
        size(&old)
    );
    // Both files are whole lines, and the newest seqs are kept.
    let (older, newer) = (lines(&old), lines(&log));
    assert_eq!(
        older.last().unwrap()["seq"].as_u64().unwrap() + 1,
        newer[0]["seq"].as_u64().unwrap()
    );
}

#[test]
fn a_link_or_someone_elses_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, "precious\n").unwrap();
    let link = dir.path().join("audit.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let linked = dir.path().join("linked.log");
    std::fs::hard_link(&target, &linked).unwrap();
    for (path, words) in [(&link, "symbolic link"), (&linked, "hard link")] {
        let out = std::process::Command::new(bin())
            .args(["--stdio", "--audit-log"])
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(words), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}

#[test]
fn a_log_that_cannot_be_written_costs_events_not_service() {
    // /dev/full: every write fails with ENOSPC, for root and for anyone.
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["--stdio", "--audit-log", "/dev/full"])
        .env("EXEC_SERVER_LOG", "off");
    let mut s = Server::from_command(cmd);
    s.handshake();
    for i in 0..20 {
        s.start_process(&format!("p{i}"), &["true"], json!({}));
    }
    for i in 0..20 {
        let (_, code) = s.collect(&format!("p{i}"));
        assert_eq!(code, Some(0));
    }
    let status = s.call("server/status", json!({}));
    assert!(
        status["auditLog"]["dropped"].as_u64().unwrap_or(0) >= 40,
        "{status}"
    );
    assert_eq!(status["auditLog"]["written"], 0, "{status}");

    // A real full disk (root can mount one): once there is room again, a
    // `dropped` line says how many events were lost.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32k", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !crate::support::available(
        "mount",
        mounted,
        "a tmpfs mount is needed for the full-disk test",
    ) {
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let log = dir.path().join("audit.log");
    let filler = dir.path().join("filler");
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["--stdio", "--audit-log"])
        .arg(&log)
        .env("EXEC_SERVER_LOG", "off");
    let mut s = Server::from_command(cmd);
    s.handshake();
    // Fill the disk.
    let _ = std::fs::write(&filler, vec![b'x'; 64 * 1024]);
    let work = tempfile::tempdir().unwrap();
    for i in 0..50 {
        s.call(
            "fs/writeFile",
            json!({"path": work.path().join("f"), "dataBase64": b64(format!("{i}").as_bytes())}),
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || {
            s.call("server/status", json!({}))["auditLog"]["dropped"]
                .as_u64()
                .unwrap_or(0)
                > 0
        }),
        "nothing was counted as dropped on a full disk"
    );
    // Room again: the next event brings the count.
    std::fs::remove_file(&filler).unwrap();
    s.call(
        "fs/writeFile",
        json!({"path": work.path().join("f"), "dataBase64": b64(b"again")}),
    );
    // (The writer may say it before the write comes, when it is idle.)
    let got = lines_when(&log, |l| {
        let at = l.iter().position(|e| e["event"] == "dropped");
        at.is_some_and(|at| l[at..].iter().any(|e| e["event"] == "fs.write"))
    });
    let dropped = got.iter().find(|e| e["event"] == "dropped").unwrap();
    assert!(dropped["count"].as_u64().unwrap() > 0, "{dropped}");
}

#[test]
fn the_last_events_reach_the_log_when_the_server_exits() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mut child = std::process::Command::new(bin())
        .args(["--stdio", "--audit-log"])
        .arg(&log)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let requests = [
        json!({"id": 1, "method": "initialize", "params": {"clientName": "it"}}),
        json!({"method": "initialized"}),
        json!({"id": 2, "method": "process/start", "params": {"processId": "long", "argv": ["sleep", "30"], "cwd": "/tmp"}}),
    ];
    for line in requests {
        writeln!(stdin, "{line}").unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    // The end of stdin ends the session, its process and the server.
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let got = lines(&log);
    let names = events(&got);
    assert_eq!(
        names,
        [
            "server.start",
            "session.attach",
            "process.start",
            "session.detach",
            "process.exit",
            "server.stop"
        ],
        "{got:#?}"
    );
    assert_eq!(got[4]["reason"], "terminated");
}

#[test]
fn the_log_goes_to_a_unix_socket_collector() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let target = format!("unix:{}", path.display());
    let mut s = Server::started(&["--audit-log", &target]);
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    s.start_process("p", &["true"], json!({}));
    let _ = s.collect("p");
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stream).lines() {
        let line: Value = serde_json::from_str(&line.unwrap()).unwrap();
        seen.push(line["event"].as_str().unwrap().to_string());
        if line["event"] == "process.exit" {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "server.start",
            "session.attach",
            "process.start",
            "process.exit"
        ]
    );
}

#[test]
fn a_detached_session_that_expires_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let log_arg = log.display().to_string();
    let mut s = Server::start_unix(&["--audit-log", &log_arg, "--detached-session-ttl-ms", "200"]);
    s.handshake();
    s.start_process("long", &["sleep", "30"], json!({}));
    // Gone, and not back within the TTL.
    s.reconnect_unix();
    let got = lines_when(&log, |l| l.iter().any(|e| e["event"] == "process.exit"));
    let names = events(&got);
    assert_eq!(
        names,
        [
            "server.start",
            "session.attach",
            "process.start",
            "session.detach",
            "session.expire",
            "process.exit"
        ],
        "{got:#?}"
    );
    assert_eq!(got[5]["reason"], "terminated");
    assert_eq!(got[3]["session"], got[4]["session"]);
}
