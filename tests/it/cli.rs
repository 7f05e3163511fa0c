//! `exec-server run` as a person uses it.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::bin;

fn run(args: &[&str], input: Option<&[u8]>) -> std::process::Output {
    let mut child = Command::new(bin())
        .arg("run")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/tmp")
        .spawn()
        .unwrap();
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn exit_code_and_streams_are_the_commands() {
    let out = run(&["--", "sh", "-c", "echo out; echo err >&2; exit 3"], None);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn a_signal_death_exits_with_128_plus_n() {
    let out = run(&["--", "sh", "-c", "kill -KILL $$"], None);
    assert_eq!(out.status.code(), Some(137));
}

#[test]
fn a_missing_program_exits_127_with_a_message() {
    let out = run(&["--", "no-such-program-here"], None);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-program-here"));
}

#[test]
fn piped_stdin_is_forwarded_and_closed() {
    let input: Vec<u8> = (0..100_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let out = run(&["--", "cat"], Some(&input));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout == input,
        "cat echoed {} of {} bytes",
        out.stdout.len(),
        input.len()
    );
}

#[test]
fn tty_mode_gives_the_command_a_terminal() {
    let out = run(
        &[
            "--tty",
            "--",
            "sh",
            "-c",
            "stty size; test -t 0 && echo is-a-tty",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "24 80\r\nis-a-tty\r\n"
    );
}

#[test]
fn env_and_cwd_flags_reach_the_command() {
    let out = run(
        &[
            "--env",
            "GREETING=hi there",
            "--cwd",
            "/usr",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\" $(pwd)",
        ],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi there /usr\n");
}

#[test]
fn a_server_that_cannot_start_is_reported() {
    let out = run(
        &["--via", "sh -c 'echo broken >&2; exit 1'", "--", "true"],
        None,
    );
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not complete the handshake") && err.contains("broken"),
        "{err}"
    );
}

#[test]
fn workspace_write_sandbox_denial_is_reported() {
    let target = "/etc/exec-server-cli-must-not-exist";
    let out = run(
        &["--sandbox", "workspace-write", "--", "touch", target],
        None,
    );
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sandbox probably denied"), "{stderr}");
    assert!(!std::path::Path::new(target).exists());
}

#[test]
fn read_only_sandbox_refuses_writes_in_the_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("new");
    let out = run(
        &[
            "--sandbox",
            "read-only",
            "--cwd",
            dir.path().to_str().unwrap(),
            "--",
            "touch",
            target.to_str().unwrap(),
        ],
        None,
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(!target.exists());
}
