//! Through a real `sshd` on 127.0.0.1: the way an orchestrator reaches
//! another host. `.ci/run` installs openssh-server.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use exec_server::client::{Client, Event, ServerCommand, StartOptions};

use crate::support::{bin, eventually};

/// An sshd of our own on a free port, with a fresh host key and one
/// authorized client key, all in a temporary directory.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    /// The `XDG_RUNTIME_DIR` of the servers it runs: their `--persist`
    /// daemons live, and leave their lock and log, here.
    runtime: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Sshd {
    /// `None` (after a visible notice) when sshd or ssh is missing and
    /// the environment does not make these tests mandatory.
    fn start() -> Option<Sshd> {
        let sshd = Path::new("/usr/sbin/sshd");
        let ssh = Command::new("ssh").arg("-V").output().is_ok();
        if !crate::support::available(
            "ssh",
            sshd.exists() && ssh,
            "sshd or ssh is missing: install openssh-server and openssh-client (.ci/run does)",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, kind) in [("host_key", "ed25519"), ("client_key", "ed25519")] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(d.join(name))
                .status()
                .unwrap();
            assert!(status.success());
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        // Privilege separation wants this directory to exist.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nLogLevel ERROR\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "sshd did not start listening"
        );
        Some(Sshd {
            child,
            port,
            key: d.join("client_key"),
            runtime: tempfile::tempdir().unwrap(),
            _dir: dir,
        })
    }

    /// The `--via` command line that runs the server over this sshd.
    fn via(&self) -> String {
        let bin = bin();
        format!(
            "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o LogLevel=ERROR 127.0.0.1 env XDG_RUNTIME_DIR={} \
             EXEC_SERVER_LOG={} {} --stdio",
            self.port,
            self.key.display(),
            self.runtime.path().display(),
            std::env::var("EXEC_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            bin
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn cli_runs_a_command_over_ssh() {
    let Some(sshd) = Sshd::start() else { return };
    let out = Command::new(bin())
        .args([
            "run",
            "--via",
            &sshd.via(),
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test]
async fn library_runs_and_resizes_a_tty_process_over_ssh() {
    let Some(sshd) = tokio::task::spawn_blocking(Sshd::start).await.unwrap() else {
        return;
    };
    let client = Client::new(ServerCommand::parse(&sshd.via()).unwrap());
    let mut p = client
        .start(
            StartOptions::new(
                "t",
                ["sh", "-c", "stty -echo; stty size; read x; stty size"],
            )
            .cwd("/tmp")
            .tty(100, 30),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("30 100\r\n") {
        match p.next_event().await.unwrap() {
            Some(Event::Output { data, .. }) => out.extend(data),
            other => panic!("expected the first size, got {other:?}"),
        }
    }
    p.resize(120, 40).await.unwrap();
    p.write(b"\n").await.unwrap();
    let status = p
        .wait_with_output(|_, d| out.extend_from_slice(d))
        .await
        .unwrap();
    assert_eq!(status.code, 0);
    assert!(
        String::from_utf8_lossy(&out).ends_with("40 120\r\n"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    client.shutdown().await;
}

/// The server over ssh as `--stdio --persist=NAME`: a conversation on the
/// ssh process's pipes.
struct OverSsh {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    next_id: i64,
}

impl OverSsh {
    fn start(sshd: &Sshd, name: &str) -> OverSsh {
        let via = sshd
            .via()
            .replace("--stdio", &format!("--stdio --persist={name}"));
        let words: Vec<String> = via.split_whitespace().map(String::from).collect();
        let mut child = Command::new(&words[0])
            .args(&words[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        OverSsh {
            stdin: child.stdin.take().unwrap(),
            stdout: std::io::BufReader::new(child.stdout.take().unwrap()),
            child,
            next_id: 1,
        }
    }

    fn request(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead, Write};
        let id = self.next_id;
        self.next_id += 1;
        let line =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        writeln!(self.stdin, "{line}").unwrap();
        loop {
            let mut text = String::new();
            assert!(self.stdout.read_line(&mut text).unwrap() > 0, "ssh closed");
            let message: serde_json::Value = serde_json::from_str(&text).unwrap();
            if message["id"] == id {
                return message;
            }
        }
    }

    fn initialized(&mut self) {
        use std::io::Write;
        writeln!(
            self.stdin,
            "{}",
            serde_json::json!({"method": "initialized"})
        )
        .unwrap();
    }
}

#[test]
fn a_killed_ssh_client_loses_nothing_with_persist() {
    use serde_json::json;
    let Some(sshd) = Sshd::start() else { return };
    let name = format!("it-ssh-{}", std::process::id());
    let mut first = OverSsh::start(&sshd, &name);
    let answer = first.request("initialize", json!({"clientName": "it"}));
    let session = answer["result"]["sessionId"].as_str().unwrap().to_string();
    first.initialized();
    first.request(
        "process/start",
        json!({"processId": "n", "cwd": "/tmp",
               "argv": ["sh", "-c", crate::support::NUMBERED]}),
    );
    std::thread::sleep(Duration::from_millis(300));
    first.child.kill().unwrap(); // the ssh client dies: the connection drops
    first.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut second = OverSsh::start(&sshd, &name);
    let answer = second.request(
        "initialize",
        json!({"clientName": "it", "resumeSessionId": session}),
    );
    assert_eq!(answer["result"]["sessionId"], session.as_str(), "{answer}");
    second.initialized();
    let mut after = 0;
    let mut out = Vec::new();
    loop {
        let r = second.request(
            "process/read",
            json!({"processId": "n", "afterSeq": after, "waitMs": 1000}),
        );
        let r = &r["result"];
        for chunk in r["chunks"].as_array().unwrap() {
            out.extend(crate::support::unb64(&chunk["chunk"]));
        }
        after = r["nextSeq"].as_u64().unwrap() - 1;
        if r["closed"] == true {
            break;
        }
    }
    crate::support::assert_numbered(&out);
    drop(second);
    stop_daemon(&sshd, &name);
}

#[test]
fn exec_server_run_over_ssh_survives_killing_ssh_with_persist() {
    let Some(sshd) = Sshd::start() else { return };
    let name = format!("it-run-{}", std::process::id());
    let via = sshd
        .via()
        .replace("--stdio", &format!("--stdio --persist={name}"));
    // The runner's server command is ssh: killed as a network failure
    // would end it.
    let out = crate::support::run_via_losing_its_server(&via, &[], Duration::from_millis(700));
    crate::support::assert_numbered(&out.stdout);
    assert_eq!(out.status.code(), Some(7));
    stop_daemon(&sshd, &name);
}

/// Stop the `--persist NAME` daemon the test's ssh sessions started.
fn stop_daemon(sshd: &Sshd, name: &str) {
    let stop = Command::new(bin())
        .args(["daemon", "stop", "--persist", name])
        .env("XDG_RUNTIME_DIR", sshd.runtime.path())
        .output()
        .unwrap();
    assert!(stop.status.success(), "{stop:?}");
}

/// The loss test of issue 20 over a real sshd: the ssh client killed in
/// the middle of a 3,000,000-line burst, 20 times at 20 places; with
/// `--persist`, every line arrives once, in order, with the exit code.
#[test]
fn a_killed_ssh_client_in_a_burst_loses_nothing_20_of_20() {
    let Some(sshd) = Sshd::start() else { return };
    let name = format!("it-burst-{}", std::process::id());
    let via = sshd
        .via()
        .replace("--stdio", &format!("--stdio --persist={name}"));
    for i in 0..20 {
        crate::support::burst_survives(
            &via,
            &[],
            (i + 1) * 1_000_000,
            crate::support::kill_server_command,
        );
    }
    stop_daemon(&sshd, &name);
}
