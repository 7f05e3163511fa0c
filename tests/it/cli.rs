//! `exec-server run` as a person uses it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{bin, eventually};

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

/// `-n`, as ssh's: the command gets an empty stdin and ours is left for
/// the loop around it.
#[test]
fn dash_n_leaves_our_stdin_to_the_loop_around_it() {
    let script = format!(
        "printf 'a\\nb\\nc\\n' | while read l; do {} run -n -- sh -c 'cat; echo \"$0\"' \"$l\"; done",
        bin()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a\nb\nc\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without -n the first command eats the rest of the loop's input.
    let script = script.replace(" run -n ", " run ");
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b\nc\na\n");
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
    // stdin is not a terminal here: twice forces a pty.
    let out = run(
        &[
            "--tty",
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

#[test]
fn yes_into_head_exits_141_at_once() {
    for argv in [&["yes"][..], &["seq", "1", "1000000000"][..]] {
        let mut child = Command::new(bin())
            .arg("run")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 2];
        stdout.read_exact(&mut first).unwrap();
        let closed = Instant::now();
        drop(stdout); // what `head -1` does once it has its line
        assert!(
            eventually(Duration::from_secs(1), || matches!(
                child.try_wait(),
                Ok(Some(_))
            )),
            "{argv:?} still runs a second after its output was closed"
        );
        assert_eq!(child.wait().unwrap().code(), Some(141), "{argv:?}");
        assert!(closed.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn the_command_needs_no_double_dash() {
    let out = run(&["echo", "-n", "no", "dashes"], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"no dashes");
}

#[test]
fn exit_codes_and_messages_read_like_a_shell() {
    let cases: [(&[&str], i32, &str); 9] = [
        (
            &["no-such-program-here"],
            127,
            "exec-server: no-such-program-here: command not found",
        ),
        (
            &["/etc/passwd"],
            126,
            "exec-server: /etc/passwd: Permission denied",
        ),
        (&["/etc"], 126, "exec-server: /etc: Is a directory"),
        // One argument with spaces is a program name; say how to run a line.
        (
            &["--", "true && true"],
            127,
            "use: exec-server run -- sh -c 'true && true'",
        ),
        // Mistyped options are refused before the program, as ssh does.
        (&["--cdw", "/", "true"], 2, "unexpected argument '--cdw'"),
        (&["-T", "true"], 2, "unexpected argument '-T'"),
        (&["-tx", "true"], 2, "unexpected argument '-x'"),
        (
            &["--cwd", "/nonexistent", "--", "true"],
            125,
            "/nonexistent: No such file or directory",
        ),
        (&["--network", "true"], 2, "--sandbox"),
    ];
    // A program that starts with `-` still runs after `--`.
    let out = run(&["--", "-no-such-program"], None);
    assert_eq!(out.status.code(), Some(127));
    for (args, code, text) in cases {
        let out = run(args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
        assert!(
            !err.contains("process/start"),
            "{args:?} speaks protocol: {err}"
        );
    }
}

#[test]
fn a_relative_cwd_is_resolved_here() {
    let out = run(&["--cwd", "..", "--", "pwd"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/\n");
}

#[test]
fn a_deleted_current_directory_is_refused_not_replaced_by_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    // The runner's own directory goes away after it starts, before it asks
    // for it: a shell that deleted its cwd is in the same place.
    let script = format!(
        "cd {} && rmdir {} && exec {} run -- pwd",
        gone.display(),
        gone.display(),
        bin()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("current directory"));
}

#[test]
fn tty_with_a_piped_stdin_warns_and_uses_pipes() {
    let out = run(&["--tty", "--", "cat"], Some(b"hi\n"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hi\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin is not a terminal"));
}

/// The runner on a real terminal of the test's: a pty whose slave is the
/// runner's stdin, stdout, stderr and controlling terminal.
struct OnTerminal {
    child: Child,
    master: OwnedFd,
    output: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl OnTerminal {
    fn start(args: &[&str], env: &[(&str, &str)]) -> OnTerminal {
        use std::os::unix::process::CommandExt;
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds owned here.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut cmd = Command::new(bin());
        cmd.arg("run").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl only.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = master.try_clone().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(reader);
            let mut buf = [0u8; 4096];
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        OnTerminal {
            child,
            master,
            output,
        }
    }

    fn termios(&self) -> libc::termios {
        // SAFETY: tcgetattr fills a zeroed struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.master.as_raw_fd(), &mut t), 0);
            t
        }
    }

    fn raw(&self) -> bool {
        self.termios().c_lflag & (libc::ICANON | libc::ECHO) == 0
    }

    fn type_in(&self, bytes: &[u8]) {
        // SAFETY: writes from a valid buffer.
        let n = unsafe { libc::write(self.master.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n, bytes.len() as isize);
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        if !eventually(within, || matches!(self.child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
            return None;
        }
        self.child.wait().unwrap().code()
    }
}

#[test]
fn a_terminating_signal_restores_the_terminal_and_ends_the_command() {
    for (signal, name) in [
        (libc::SIGTERM, "TERM"),
        (libc::SIGHUP, "HUP"),
        (libc::SIGQUIT, "QUIT"),
    ] {
        let mut t = OnTerminal::start(&["--tty", "--", "sh", "-c", "echo started; sleep 100"], &[]);
        assert!(
            eventually(Duration::from_secs(5), || t.raw()
                && t.output().contains("started")),
            "{name}: the terminal never went raw: {}",
            t.output()
        );
        // SAFETY: plain syscall on our child.
        unsafe { libc::kill(t.child.id() as i32, signal) };
        assert_eq!(
            t.exit_code(Duration::from_secs(5)),
            Some(128 + signal),
            "{name}"
        );
        assert!(!t.raw(), "{name} left the terminal raw");
    }
}

#[test]
fn tilde_dot_ends_a_session_that_ignores_interrupts() {
    let mut t = OnTerminal::start(
        &[
            "--tty",
            "--",
            "sh",
            "-c",
            "trap '' INT QUIT; echo started; sleep 100",
        ],
        &[],
    );
    assert!(eventually(Duration::from_secs(5), || t.raw()
        && t.output().contains("started")));
    t.type_in(b"\x03\x1c"); // ^C and ^\\: ignored
    std::thread::sleep(Duration::from_millis(200));
    assert!(matches!(t.child.try_wait(), Ok(None)), "^C ended it");
    // ~? lists the escapes, as ssh's does, and ends nothing.
    t.type_in(b"\r~?");
    assert!(
        eventually(Duration::from_secs(5), || t
            .output()
            .contains("~.  end the session")),
        "{}",
        t.output()
    );
    assert!(matches!(t.child.try_wait(), Ok(None)), "~? ended it");
    t.type_in(b"\r~.");
    assert_eq!(t.exit_code(Duration::from_secs(5)), Some(255));
    assert!(!t.raw());
    // With escapes off, the same keys reach the command.
    let mut t = OnTerminal::start(
        &[
            "--tty",
            "--escape-char",
            "none",
            "--",
            "sh",
            "-c",
            "read line; echo got:$line",
        ],
        &[],
    );
    assert!(eventually(Duration::from_secs(5), || t.raw()));
    std::thread::sleep(Duration::from_millis(200));
    t.type_in(b"~.\r");
    assert_eq!(
        t.exit_code(Duration::from_secs(5)),
        Some(0),
        "{}",
        t.output()
    );
    assert!(t.output().contains("got:~."), "{}", t.output());
}

#[test]
fn term_and_lang_travel_with_a_terminal() {
    let mut t = OnTerminal::start(
        &["--tty", "--", "sh", "-c", "echo \"[$TERM $LANG]\""],
        &[("TERM", "xterm-exec-test"), ("LANG", "C.UTF-8")],
    );
    assert_eq!(t.exit_code(Duration::from_secs(5)), Some(0));
    assert!(
        t.output().contains("[xterm-exec-test C.UTF-8]"),
        "{}",
        t.output()
    );
}

#[test]
fn debug_logging_shows_each_request_and_process_once_stamped() {
    let out = Command::new(bin())
        .args(["run", "--", "sh", "-c", "exit 4"])
        .env("EXEC_SERVER_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let log = String::from_utf8_lossy(&out.stderr);
    let start = log
        .lines()
        .find(|l| l.contains("method=\"process/start\""))
        .unwrap_or_else(|| panic!("no request line in {log}"));
    assert!(start.contains("micros="), "{start}");
    assert!(
        log.lines()
            .any(|l| l.contains("exited") && l.contains("code=4")),
        "{log}"
    );
    for line in log.lines().filter(|l| l.contains("exec_server::server")) {
        // One timestamp (the server's), not the runner's in front of it.
        assert_eq!(line.matches("Z ").count(), 1, "{line}");
        assert!(!line.contains("server_stderr"), "{line}");
    }
}

#[test]
fn completions_and_a_man_page_come_from_the_binary() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("exec-server") && text.contains("sandbox-check"),
            "{shell}"
        );
    }
    let out = Command::new(bin()).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH exec-server 1"), "{page}");
    assert!(page.contains("completions"), "{page}");
}

/// Every page a man page names exists: `exec-server man NAME` prints it
/// and `--dir` writes it; no page names `help`, which has none.
#[test]
fn every_man_page_named_exists() {
    let mut pending = vec![String::new()];
    let mut seen = Vec::new();
    while let Some(page) = pending.pop() {
        let mut command = Command::new(bin());
        command.arg("man");
        if !page.is_empty() {
            command.arg(&page);
        }
        let out = command.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "man {page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let title = if page.is_empty() {
            "exec-server".to_string()
        } else {
            format!("exec-server-{page}")
        };
        assert!(
            text.contains(&format!(".TH {title} 1")),
            "man {page}:\n{text}"
        );
        for line in text.lines() {
            // References look like `exec\-server\-run(1)`.
            if let Some(name) = line.strip_suffix("(1)") {
                let name = name.replace("\\-", "-");
                let sub = name.trim_start_matches("exec-server-").to_string();
                assert_ne!(sub, "help", "man {page} names a help page");
                if !seen.contains(&sub) {
                    seen.push(sub.clone());
                    pending.push(sub);
                }
            }
        }
    }
    for expected in [
        "run",
        "daemon",
        "daemon-status",
        "daemon-stop",
        "sandbox-check",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "{expected} not named: {seen:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for sub in &seen {
        assert!(
            dir.path().join(format!("exec-server-{sub}.1")).exists(),
            "{sub}"
        );
    }
    let out = Command::new(bin()).args(["man", "bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("there are: run"));
}

/// `run --c<Tab>` and `daemon s<Tab>` complete in bash (the generated
/// script found the subcommand and then completed nothing).
#[test]
fn bash_completes_options_and_subcommands_of_subcommands() {
    let present = Command::new("bash").arg("--version").output().is_ok();
    if !crate::support::available("bash", present, "bash completion needs bash") {
        return;
    }
    let script = Command::new(bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exec-server.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    let complete = |words: &str| -> String {
        let program = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); \
             COMPREPLY=(); _exec__server exec-server \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; \
             echo \"${{COMPREPLY[*]}}\"",
            path.display()
        );
        let out = Command::new("bash")
            .args(["-c", &program])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(complete("exec-server run --cw"), "--cwd");
    assert_eq!(complete("exec-server run --c"), "--cwd --cpus");
    assert_eq!(complete("exec-server daemon s"), "status stop");
    assert_eq!(complete("exec-server sa"), "sandbox-check");
    assert!(complete("exec-server run --").contains("--escape-char"));
}

/// `| head -1` closes our stdout early: no panic, no error, exit 0.
#[test]
fn printing_commands_stop_quietly_when_the_reader_goes() {
    for args in [
        &["sandbox-check"][..],
        &["completions", "bash"],
        &["man"],
        &["man", "run"],
    ] {
        // A pipe whose reader has gone already: every write fails (EPIPE).
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fresh descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors nothing else owns.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(reader);
        let out = Command::new(bin())
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        let code = out.status.code();
        assert!(
            code == Some(0) || (args[0] == "sandbox-check" && code == Some(1)),
            "{args:?}: {code:?} {err}"
        );
    }
}

#[test]
fn secret_looking_variables_pass_only_when_asked() {
    let run_with = |args: &[&str]| {
        Command::new(bin())
            .arg("run")
            .args(args)
            .env("EXEC_TEST_API_TOKEN", "t0k3n")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let script = ["--", "sh", "-c", "echo \"[$EXEC_TEST_API_TOKEN]\""];
    let dropped = run_with(&script);
    assert_eq!(String::from_utf8_lossy(&dropped.stdout), "[]\n");
    let passed = run_with(&[&["--env-pass", "EXEC_TEST_API_TOKEN"], &script[..]].concat());
    assert_eq!(String::from_utf8_lossy(&passed.stdout), "[t0k3n]\n");
}

#[test]
fn run_help_lists_exit_codes_logging_and_presets() {
    let out = Command::new(bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "125",
        "126",
        "127",
        "141",
        "EXEC_SERVER_LOG",
        "workspace-write",
        "/tmp",
        "--env-pass",
        "~.",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}: {help}");
    }
}

/// Secret-looking names are one list: the runner drops every one of them
/// (`DB_PASSWORD` went through), `--env-pass` passes one anyway, and
/// `--help` and README name each.
#[test]
fn every_secret_looking_name_stays_behind_and_help_and_readme_say_which() {
    let script = r#"echo "[$DB_PASSWORD][$GH_TOKEN][$MY_PASSWD][$AWS_CREDENTIALS][$API_KEY][$APP_SECRET][$PLAIN]""#;
    let run = |extra: &[&str]| {
        let out = Command::new(bin())
            .arg("run")
            .args(extra)
            .args(["--", "sh", "-c", script])
            .env("DB_PASSWORD", "pw")
            .env("GH_TOKEN", "tok")
            .env("MY_PASSWD", "pw2")
            .env("AWS_CREDENTIALS", "cred")
            .env("API_KEY", "key")
            .env("APP_SECRET", "sec")
            .env("PLAIN", "plain")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&[]), "[][][][][][][plain]");
    assert_eq!(run(&["--env-pass", "DB_PASSWORD"]), "[pw][][][][][][plain]");
    let help = Command::new(bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for name in exec_server::client::run::SECRET_NAMES {
        assert!(help.contains(name), "--help does not name {name}");
        assert!(
            readme.contains(&format!("`{name}`")),
            "README does not name {name}"
        );
    }
}

/// What README tells a new user holds: how to install, a dependency line
/// that resolves (no registry version: the crate is on none), and the
/// binary's size as measured (checked against a release build when one
/// is there).
#[test]
fn readme_install_dependency_and_size_are_true() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("cargo install --locked --path ."));
    let line = readme
        .lines()
        .find(|l| l.starts_with("exec-server = {"))
        .expect("a dependency line");
    assert!(
        line.contains("path = ") || line.contains("git = "),
        "{line}"
    );
    assert!(
        !line.contains("version = "),
        "the crate is on no registry: {line}"
    );
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("name = \"exec-server\""));
    let stated: u64 = readme
        .split("stripped: ")
        .nth(1)
        .and_then(|rest| rest.split(" MB").next())
        .and_then(|mb| mb.parse::<f64>().ok())
        .map(|mb| (mb * 1e6) as u64)
        .expect("README states the binary's size as `stripped: N MB`");
    let release = root.join("target/release/exec-server");
    match std::fs::metadata(&release) {
        Ok(meta) => {
            let real = meta.len();
            let off = real.abs_diff(stated) as f64 / real as f64;
            assert!(
                off < 0.15,
                "README says {stated} bytes, the release binary has {real}"
            );
        }
        Err(_) => eprintln!("no release build to check README's size against"),
    }
}

/// `--help` names every kind of `--listen` address, ws:// included.
#[test]
fn help_names_every_listen_address() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for kind in ["stdio", "unix:PATH", "ws://HOST:PORT"] {
        assert!(text.contains(kind), "--help does not name {kind}:\n{text}");
    }
}

/// What a server command says on stderr is printed once: as it comes,
/// not again inside the error message.
#[test]
fn a_failing_server_commands_stderr_is_printed_once() {
    let out = Command::new(bin())
        .args([
            "run",
            "--via",
            "sh -c 'echo the-server-said-this >&2; exit 3'",
            "--",
            "true",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert_eq!(err.matches("the-server-said-this").count(), 1, "{err}");
    assert!(err.contains("did not complete the handshake"), "{err}");
}

/// The rustdoc front page is the client library: an example of it, and
/// the wire contract linked (as `wire_contract`, which holds PROTOCOL.md).
#[test]
fn the_crate_front_page_shows_the_client_and_links_the_contract() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let front: String = lib
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let example = front
        .find("```no_run")
        .expect("an example on the front page");
    assert!(front[example..].contains("Client::new"), "{front}");
    assert!(front.contains("[`wire_contract`]") && front.contains("[`client`]"));
    assert!(lib.contains("#[doc = include_str!(\"../docs/PROTOCOL.md\")]"));
    // Before the private layout notes, not after.
    assert!(example < front.find("# Layout").unwrap_or(usize::MAX));
}
