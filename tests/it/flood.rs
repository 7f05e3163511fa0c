//! Connections are bounded and the server keeps room for the ones that
//! matter (issue 19): thousands of unfinished request heads and idle
//! connections from one peer, against a server held to 1,024
//! descriptors, while an authenticated client keeps connecting, starting
//! processes and reading their output.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Server, bin, listening};

/// Raise this test process's own soft descriptor limit (it holds the
/// flood's sockets); the number it may open.
pub fn room_for_sockets() -> usize {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        (limit.rlim_cur as usize).saturating_sub(256)
    }
}

#[test]
fn a_flood_of_unfinished_heads_leaves_an_authenticated_client_working() {
    let flood_size = room_for_sockets().min(3000);
    assert!(flood_size >= 1500, "this test needs room for 1,500 sockets");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "the-right-token").unwrap();
    let mut command = Command::new(bin());
    command
        .args(["--listen", "ws://127.0.0.1:0", "--connection-token-file"])
        .arg(&token_file)
        .env("EXEC_SERVER_LOG", "error")
        .stderr(Stdio::null());
    // SAFETY: setrlimit only, between fork and exec: the server gets a
    // hard limit of 1,024 descriptors, as an unprivileged one often has.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (mut child, url) = listening(command);
    let address = url.trim_start_matches("ws://").to_string();
    let server_pid = child.id();

    // The flood: one peer opening connections as fast as it can, half
    // sending an unfinished head, half nothing, holding every one.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, opened, address) = (stop.clone(), opened.clone(), address.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) && held.len() < flood_size {
                let Ok(mut s) = TcpStream::connect(&address) else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if held.len() % 2 == 0 {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n");
                }
                held.push(s);
                opened.fetch_add(1, Ordering::Relaxed);
            }
            // Hold them until told to stop.
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            held.len()
        })
    };
    while opened.load(Ordering::Relaxed) < 1000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The authenticated client: fresh connections, each a handshake and
    // process starts, while the flood goes on.
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let started = Instant::now();
        // The connection's own handle is a stand-in: the server is the
        // test's to stop.
        let stand_in = Command::new("true").spawn().unwrap();
        let mut s = Server::attach_ws(
            stand_in,
            &url,
            Some(("authorization", "Bearer the-right-token")),
        );
        s.handshake();
        for i in 0..4 {
            let id = format!("r{round}p{i}");
            s.start_process(&id, &["sh", "-c", &format!("echo {id}")], json!({}));
            let (out, code) = s.collect(&id);
            assert_eq!(String::from_utf8_lossy(&out), format!("{id}\n"));
            assert_eq!(code, Some(0));
        }
        slowest = slowest.max(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let held = flood.join().unwrap();
    assert!(held >= 1000, "the flood opened only {held}");
    // The server still holds well under its limit, and lives.
    let fds = std::fs::read_dir(format!("/proc/{server_pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(fds < 1024 - 64, "the server holds {fds} descriptors");
    // Generous: the point is that nothing timed out or failed; a client
    // kept out by the flood would wait for the 10 s timeouts.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest round {slowest:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The server raises its own soft descriptor limit to the hard one at
/// start; its children get the limit it was started with.
#[test]
fn the_server_raises_its_descriptor_limit_and_children_keep_theirs() {
    let mut command = Command::new(bin());
    command.arg("--stdio");
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 512,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut s = Server::from_command(command);
    s.handshake();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let numbers: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.parse::<u64>().is_ok())
        .collect();
    assert_eq!(numbers, ["4096", "4096"], "{line}");
    for (id, sandbox) in [
        ("plain", json!(null)),
        (
            "sandboxed",
            json!({
        "permissions": {"type": "managed", "network": "restricted",
            "file_system": {"type": "unrestricted"}}}),
        ),
    ] {
        s.start_process(
            id,
            &["sh", "-c", "ulimit -Sn; ulimit -Hn"],
            json!({"sandbox": sandbox}),
        );
        let (out, code) = s.collect(id);
        assert_eq!(code, Some(0));
        assert_eq!(String::from_utf8_lossy(&out), "512\n4096\n", "{id}");
    }
}
