//! The kernel sandbox, through the server: real escape attempts under a
//! workspace-write policy (each must fail, be reported as a sandbox
//! denial, and leave no trace), things that must keep working inside it,
//! the binding of `:workspace_roots`, and sandboxed filesystem methods.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{Server, b64, bin, unb64};

/// A workspace (a git repository with a denied `secret/`), a directory
/// outside it, and a TCP and a UDP listener that must hear nothing.
struct Fixture {
    _base: tempfile::TempDir,
    ws: PathBuf,
    outside: PathBuf,
    tcp: TcpListener,
    udp: UdpSocket,
}

impl Fixture {
    fn new() -> Fixture {
        let base = tempfile::tempdir().unwrap();
        let ws = base.path().join("ws");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(ws.join("secret")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(ws.join("secret/key"), "TOPSECRET\n").unwrap();
        std::fs::write(ws.join("file"), "mine\n").unwrap();
        std::fs::write(outside.join("victim"), "original\n").unwrap();
        git(&ws, &["init", "-q"]);
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        tcp.set_nonblocking(true).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        Fixture {
            _base: base,
            ws,
            outside,
            tcp,
            udp,
        }
    }

    /// The policy under test: read everything, write the workspace, deny
    /// `secret/`, no network.
    fn policy(&self) -> Value {
        json!({
            "permissions": {"type": "managed", "network": "restricted", "file_system": {
                "type": "restricted", "entries": [
                    {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
                    {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"},
                    {"path": {"type": "path", "path": ":workspace_roots/secret"}, "access": "deny"},
                ]}},
            "workspaceRoots": [self.ws.to_str().unwrap()],
        })
    }

    fn env(&self) -> Value {
        json!({
            "PATH": std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            "WS": self.ws.to_str().unwrap(),
            "OUT": self.outside.to_str().unwrap(),
            "TCP_PORT": self.tcp.local_addr().unwrap().port().to_string(),
            "UDP_PORT": self.udp.local_addr().unwrap().port().to_string(),
        })
    }

    /// The environment with `extra` members added.
    fn env_with(&self, extra: &Value) -> Value {
        let mut env = self.env();
        for (k, v) in extra.as_object().unwrap() {
            env[k] = v.clone();
        }
        env
    }

    /// Nothing reached the listeners.
    fn network_untouched(&self) -> bool {
        let mut buf = [0u8; 64];
        self.tcp.accept().is_err() && self.udp.recv_from(&mut buf).is_err()
    }

    fn outside_untouched(&self) -> bool {
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names == ["victim"]
            && std::fs::read_to_string(self.outside.join("victim")).unwrap() == "original\n"
    }
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// How a process ended, as the server told it.
#[derive(Debug)]
struct Ended {
    output: String,
    exit_code: i64,
    /// `sandboxDenied` of the final `process/read`.
    denied_read: bool,
    /// `sandboxDenied` of the `process/exited` notification.
    denied_exited: bool,
    sandbox_type: String,
}

/// Run `sh -c script` in `cwd` with `sandbox` and wait for it to close.
fn run(s: &mut Server, script: &str, cwd: &Path, sandbox: Value, env: Value, tty: bool) -> Ended {
    let id = format!("p{}", rand_id());
    let started = s.call(
        "process/start",
        json!({"processId": id, "argv": ["sh", "-c", script], "cwd": cwd.to_str().unwrap(),
               "env": env, "tty": tty, "sandbox": sandbox}),
    );
    let (output, last) = s.read_until_closed(&id);
    let exited = s.notification(|m| {
        m["method"] == "process/exited" && m["params"]["processId"] == id.as_str()
    });
    Ended {
        output: String::from_utf8_lossy(&output).into_owned(),
        exit_code: last["exitCode"].as_i64().unwrap(),
        denied_read: last["sandboxDenied"] == true,
        denied_exited: exited["params"]["sandboxDenied"] == true,
        sandbox_type: started["sandboxType"].as_str().unwrap_or("").to_string(),
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// One escape attempt: it must fail, be reported as a denial in both
/// places, and `untouched` must hold afterwards.
fn attempt(script: &str, tty: bool, untouched: impl Fn(&Fixture) -> bool) {
    let f = Fixture::new();
    let mut s = Server::started(&[]);
    let ended = run(&mut s, script, &f.ws, f.policy(), f.env(), tty);
    assert_eq!(ended.sandbox_type, "linuxSeccomp");
    assert_ne!(ended.exit_code, 0, "{script} succeeded: {ended:?}");
    assert!(
        ended.denied_read,
        "{script}: process/read not denied: {ended:?}"
    );
    assert!(
        ended.denied_exited,
        "{script}: process/exited not denied: {ended:?}"
    );
    assert!(untouched(&f), "{script} left a trace: {ended:?}");
    assert!(f.outside_untouched(), "{script} wrote outside: {ended:?}");
    assert!(
        f.network_untouched(),
        "{script} reached the network: {ended:?}"
    );
    assert!(
        !ended.output.contains("TOPSECRET"),
        "{script} read the secret"
    );
}

fn nothing(_: &Fixture) -> bool {
    true
}

macro_rules! escape {
    ($name:ident, $script:expr) => {
        escape!($name, $script, false, nothing);
    };
    ($name:ident, $script:expr, $tty:expr) => {
        escape!($name, $script, $tty, nothing);
    };
    ($name:ident, $script:expr, $tty:expr, $untouched:expr) => {
        #[test]
        fn $name() {
            attempt($script, $tty, $untouched);
        }
    };
}

escape!(shell_redirection_outside, "echo x > \"$OUT/a\"");
escape!(touch_outside, "touch \"$OUT/b\"");
escape!(
    python_write_outside,
    "python3 -c \"import os; open(os.environ['OUT'] + '/c', 'w').write('x')\""
);
escape!(git_init_outside, "git init -q \"$OUT/repo\"");
escape!(
    symlink_in_workspace_then_write_through_it,
    "ln -s \"$OUT/d\" link && echo x > link"
);
escape!(dot_dot_out_of_the_workspace, "echo x > ../outside/e");
escape!(
    hard_link_of_an_outside_file_then_write,
    "ln \"$OUT/victim\" hard && echo pwned > hard && cat \"$OUT/victim\" | grep -q pwned"
);
escape!(
    rename_out_of_the_root,
    "mv file \"$OUT/moved\"",
    false,
    |f| f.ws.join("file").exists()
);
escape!(write_git_config, "echo '[x]' >> .git/config", false, |f| {
    !std::fs::read_to_string(f.ws.join(".git/config"))
        .unwrap()
        .contains("[x]")
});
escape!(read_a_denied_path, "cat secret/key");
escape!(list_a_denied_path, "ls secret && cat secret/*");
escape!(
    tcp_connect,
    "python3 -c \"import os, socket; socket.create_connection(('127.0.0.1', int(os.environ['TCP_PORT'])), 2)\""
);
escape!(
    udp_send,
    "python3 -c \"import os, socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', int(os.environ['UDP_PORT'])))\""
);
escape!(
    dns_lookup,
    "getent ahosts exec-server-sandbox-test.example.com"
);
escape!(
    raw_socket,
    "python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\""
);
escape!(
    io_uring_setup,
    "python3 -c \"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 8, params)
err = ctypes.get_errno()
print('io_uring_setup:', fd, os.strerror(err))
sys.exit(0 if fd >= 0 else 1)
\""
);
escape!(
    unshare_to_regain_privileges,
    "unshare -r sh -c 'touch \"$OUT/f\"'"
);
escape!(
    write_through_proc_self_root,
    "echo x > \"/proc/self/root$OUT/g\""
);
escape!(
    grandchild_in_a_new_session,
    "setsid -w sh -c 'echo x > \"$OUT/h\"'"
);
escape!(mkdir_outside, "mkdir \"$OUT/dir\"");
escape!(copy_outside, "cp file \"$OUT/copy\"");
escape!(
    write_to_etc,
    "touch /etc/exec-server-sandbox-escape",
    false,
    |_| !Path::new("/etc/exec-server-sandbox-escape").exists()
);
escape!(chmod_outside, "chmod 777 \"$OUT/victim\"", false, |f| {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(f.outside.join("victim"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777
        != 0o777
});
escape!(fifo_outside, "mkfifo \"$OUT/fifo\"");
escape!(tty_shell_redirection_outside, "echo x > \"$OUT/a\"", true);
escape!(tty_touch_outside, "touch \"$OUT/b\"", true);
escape!(tty_read_a_denied_path, "cat secret/key", true);
escape!(
    tty_tcp_connect,
    "python3 -c \"import os, socket; socket.create_connection(('127.0.0.1', int(os.environ['TCP_PORT'])), 2)\"",
    true
);
escape!(
    tty_grandchild_in_a_new_session,
    "setsid -w sh -c 'echo x > \"$OUT/h\"'",
    true
);

/// No file in the workspace carries a set-user-id or set-group-id bit.
fn no_set_id_files(f: &Fixture) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::read_dir(&f.ws).unwrap().all(|e| {
        let mode = e.unwrap().metadata().unwrap().permissions().mode();
        mode & 0o6000 == 0
    })
}

escape!(
    chmod_set_uid_on_a_copied_shell,
    "cp /bin/sh rootsh && chmod 4755 rootsh",
    false,
    no_set_id_files
);
escape!(
    chmod_symbolic_set_gid,
    "cp /bin/sh rootsh && chmod g+s rootsh",
    false,
    no_set_id_files
);
escape!(
    install_with_a_set_uid_mode,
    "install -m 4755 /bin/sh rootsh",
    false,
    no_set_id_files
);
escape!(
    create_a_file_with_set_id_bits,
    "python3 -c \"import os; os.close(os.open('rootsh', os.O_CREAT | os.O_WRONLY, 0o6755))\"",
    false,
    no_set_id_files
);
escape!(
    fchmod_through_python,
    "python3 -c \"import os; fd = os.open('f2', os.O_CREAT | os.O_WRONLY, 0o755); os.fchmod(fd, 0o4755)\"",
    false,
    no_set_id_files
);
escape!(
    userfaultfd,
    "python3 -c \"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(323, 0)
print('userfaultfd:', fd, os.strerror(ctypes.get_errno()))
sys.exit(0 if fd >= 0 else 1)
\""
);

#[test]
fn abstract_unix_socket_outside_the_sandbox() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    let name = format!("exec-server-test-{}-{}", std::process::id(), rand_id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let f = Fixture::new();
    let mut s = Server::started(&[]);
    let script = format!(
        "python3 -c \"
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect('\\0{name}')
s.sendall(b'reached')
\""
    );
    let ended = run(&mut s, &script, &f.ws, f.policy(), f.env(), false);
    assert_ne!(ended.exit_code, 0, "{ended:?}");
    assert!(ended.denied_read && ended.denied_exited, "{ended:?}");
    assert!(listener.accept().is_err(), "the listener was reached");
    // Without a sandbox the same script connects: the test can fail.
    let ended = run(&mut s, &script, &f.ws, Value::Null, f.env(), false);
    assert_eq!(ended.exit_code, 0, "{ended:?}");
    assert!(listener.accept().is_ok());
}

/// The server inherits fd 3 open for appending to a file outside; no
/// child, sandboxed or not, may write through it.
#[test]
fn descriptors_the_server_inherited_do_not_reach_children() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    let victim = std::fs::OpenOptions::new()
        .append(true)
        .open(f.outside.join("victim"))
        .unwrap();
    let fd = victim.as_raw_fd();
    let mut cmd = Command::new(bin());
    cmd.arg("--stdio");
    // SAFETY: dup2 only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut s = Server::from_command(cmd);
    let init = s.request("initialize", json!({"clientName": "it"}));
    assert!(init["result"]["sessionId"].is_string(), "{init}");
    s.send(&json!({"method": "initialized"}));
    let script = "echo PWNED >&3; ls /proc/self/fd";
    for (sandbox, tty) in [
        (Value::Null, false),
        (Value::Null, true),
        (f.policy(), false),
        (f.policy(), true),
    ] {
        let ended = run(&mut s, script, &f.ws, sandbox, f.env(), tty);
        let fds: Vec<&str> = ended
            .output
            .split_whitespace()
            .filter(|w| w.parse::<u32>().is_ok())
            .collect();
        // `ls` itself holds fd 3 for the directory it lists.
        assert_eq!(fds, ["0", "1", "2", "3"], "{ended:?}");
    }
    assert!(f.outside_untouched(), "a child wrote through fd 3");
}

#[test]
fn ptrace_of_a_sibling() {
    let f = Fixture::new();
    let mut s = Server::started(&[]);
    s.start_process("sibling", &["sleep", "30"], json!({}));
    let list = s.call("process/list", json!({}));
    let pid = list["processes"][0]["pid"].as_i64().unwrap();
    let script = format!(
        "python3 -c \"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
r = libc.ptrace(16, {pid}, 0, 0)
print('ptrace:', r, os.strerror(ctypes.get_errno()))
sys.exit(0 if r == 0 else 1)
\""
    );
    let ended = run(&mut s, &script, &f.ws, f.policy(), f.env(), false);
    assert_ne!(ended.exit_code, 0, "{ended:?}");
    assert!(ended.denied_read && ended.denied_exited, "{ended:?}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    s.call("process/terminate", json!({"processId": "sibling"}));
}

/// Run `script` in the fixture's workspace under `policy`; it must succeed.
fn works(f: &Fixture, policy: Value, script: &str, tty: bool) -> Ended {
    let mut s = Server::started(&[]);
    let ended = run(&mut s, script, &f.ws, policy, f.env(), tty);
    assert_eq!(ended.exit_code, 0, "{script}: {ended:?}");
    assert!(!ended.denied_read && !ended.denied_exited, "{ended:?}");
    ended
}

#[test]
fn ordinary_work_succeeds_inside_the_sandbox() {
    let f = Fixture::new();
    let ended = works(
        &f,
        f.policy(),
        "echo made > new && cat new && rm new && mkdir d && rmdir d && chmod +x file \
         && echo piped | tr a-z A-Z && echo gone > /dev/null && python3 -c 'print(6*7)' \
         && git status --short",
        false,
    );
    assert!(ended.output.contains("made\nPIPED\n42\n"), "{ended:?}");
    assert!(ended.output.contains("?? file"), "{ended:?}");
    assert!(!f.ws.join("new").exists());
}

#[test]
fn git_commit_works_where_the_policy_makes_git_writable() {
    let f = Fixture::new();
    let mut policy = f.policy();
    policy["permissions"]["file_system"]["entries"]
        .as_array_mut()
        .unwrap()
        .push(
            json!({"path": {"type": "path", "path": ":workspace_roots/.git"}, "access": "write"}),
        );
    works(
        &f,
        policy,
        "git add file && git -c user.name=t -c user.email=t@t commit -qm first && git log --oneline",
        false,
    );
    let log = Command::new("git")
        .args(["log", "--oneline"])
        .current_dir(&f.ws)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&log.stdout).contains("first"));
    // Without that entry, `.git` stays read-only.
    let mut s = Server::started(&[]);
    let ended = run(
        &mut s,
        "git -c user.name=t -c user.email=t@t commit -q --allow-empty -m second",
        &f.ws,
        f.policy(),
        f.env(),
        false,
    );
    assert_ne!(ended.exit_code, 0);
    assert!(ended.denied_read, "{ended:?}");
}

#[test]
fn a_tty_program_works_inside_the_sandbox() {
    let f = Fixture::new();
    let ended = works(&f, f.policy(), "tty && stty size && echo ok > t", true);
    assert!(ended.output.contains("/dev/pts/"), "{ended:?}");
    assert!(ended.output.contains("24 80"), "{ended:?}");
    assert!(f.ws.join("t").exists());
}

#[test]
fn ordinary_failures_are_not_sandbox_denials() {
    let f = Fixture::new();
    let mut s = Server::started(&[]);
    for (script, code) in [
        ("false", 1),
        ("ls /nonexistent", 2),
        ("exec-server-no-such-command", 127),
    ] {
        let ended = run(&mut s, script, &f.ws, f.policy(), f.env(), false);
        assert_eq!(ended.exit_code, code, "{script}: {ended:?}");
        assert!(
            !ended.denied_read && !ended.denied_exited,
            "{script}: {ended:?}"
        );
    }
    // Unsandboxed, even output that looks like a denial is not one.
    let ended = run(
        &mut s,
        "echo 'Permission denied'; touch /proc/forbidden; exit 1",
        &f.ws,
        Value::Null,
        f.env(),
        false,
    );
    assert_eq!(ended.sandbox_type, "none");
    assert_eq!(ended.exit_code, 1);
    assert!(!ended.denied_read && !ended.denied_exited, "{ended:?}");
}

/// A policy that writes only `project_roots`, with optional `workspaceRoots`.
fn project_policy(workspace_roots: Option<&[&Path]>) -> Value {
    let mut policy = json!({
        "permissions": {"type": "managed", "network": "restricted", "file_system": {
            "type": "restricted", "entries": [
                {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
                {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"},
            ]}},
    });
    if let Some(roots) = workspace_roots {
        policy["workspaceRoots"] = json!(
            roots
                .iter()
                .map(|r| r.to_str().unwrap())
                .collect::<Vec<_>>()
        );
    }
    policy
}

/// Try to create `dir/probe` under `policy` on `s`; whether it was made.
fn can_write(s: &mut Server, dir: &Path, policy: Value) -> bool {
    let target = dir.join("probe");
    let _ = std::fs::remove_file(&target);
    let script = format!("touch '{}'", target.display());
    run(
        s,
        &script,
        Path::new("/"),
        policy,
        json!({"PATH": "/usr/bin:/bin"}),
        false,
    );
    target.exists()
}

#[test]
fn workspace_roots_in_the_request_win() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut s = Server::started(&["--workspace-root", b.path().to_str().unwrap()]);
    let policy = project_policy(Some(&[a.path()]));
    assert!(can_write(&mut s, a.path(), policy.clone()));
    assert!(!can_write(&mut s, b.path(), policy));
}

#[test]
fn workspace_root_flags_bind_when_the_request_has_none() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut s = Server::started(&["--workspace-root", b.path().to_str().unwrap()]);
    assert!(can_write(&mut s, b.path(), project_policy(None)));
    assert!(!can_write(&mut s, a.path(), project_policy(None)));
    let info = s.call("environment/info", json!({}));
    let uri = format!("file://{}", b.path().display());
    assert_eq!(info["workspaceRoots"], json!([uri]));
}

#[test]
fn the_servers_cwd_binds_without_flags() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cmd = Command::new(bin());
    cmd.arg("--stdio").current_dir(a.path());
    let mut s = Server::from_command(cmd);
    let init = s.request("initialize", json!({"clientName": "it"}));
    assert!(init["result"]["sessionId"].is_string());
    s.send(&json!({"method": "initialized"}));
    assert!(can_write(&mut s, a.path(), project_policy(None)));
    assert!(!can_write(&mut s, b.path(), project_policy(None)));
}

#[test]
fn an_empty_workspace_roots_list_drops_project_entries() {
    let b = tempfile::tempdir().unwrap();
    let mut s = Server::started(&["--workspace-root", b.path().to_str().unwrap()]);
    assert!(!can_write(&mut s, b.path(), project_policy(Some(&[]))));
}

#[test]
fn sandboxed_filesystem_methods_stay_inside_the_policy() {
    let f = Fixture::new();
    std::os::unix::fs::symlink(f.outside.join("victim"), f.ws.join("out-link")).unwrap();
    std::os::unix::fs::symlink(&f.outside, f.ws.join("out-dir")).unwrap();
    let mut s = Server::started(&[]);
    let sb = f.policy();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let denied = |r: &Value| r["error"]["data"]["kind"] == "permissionDenied";

    // Inside: works.
    let r = s.call(
        "fs/writeFile",
        json!({"path": path(&f.ws.join("made")), "dataBase64": b64(b"ok"), "sandbox": sb}),
    );
    assert_eq!(r, json!({}));
    let r = s.call(
        "fs/readFile",
        json!({"path": path(&f.ws.join("made")), "sandbox": sb}),
    );
    assert_eq!(unb64(&r["dataBase64"]), b"ok");

    // Outside, directly, through `..`, and through links made inside.
    let attempts = [
        ("fs/writeFile", f.outside.join("new"), true),
        ("fs/writeFile", f.ws.join("../outside/new"), true),
        ("fs/writeFile", f.ws.join("out-link"), true),
        ("fs/writeFile", f.ws.join("out-dir/new"), true),
        ("fs/readFile", f.ws.join("secret/key"), false),
        ("fs/createDirectory", f.ws.join("out-dir/sub"), false),
        ("fs/remove", f.ws.join("out-dir/victim"), false),
    ];
    for (method, target, write) in attempts {
        let mut params = json!({"path": path(&target), "sandbox": sb});
        if write {
            params["dataBase64"] = json!(b64(b"pwned"));
        }
        let r = s.request(method, params);
        assert!(denied(&r), "{method} {}: {r}", target.display());
    }
    let r = s.request(
        "fs/copy",
        json!({"sourcePath": path(&f.ws.join("file")), "destinationPath": path(&f.outside.join("copy")), "sandbox": sb}),
    );
    assert!(r.get("error").is_some(), "{r}");
    let r = s.request(
        "fs/open",
        json!({"path": path(&f.ws.join("secret/key")), "handleId": "h", "sandbox": sb}),
    );
    assert!(denied(&r), "{r}");
    let r = s.call(
        "fs/open",
        json!({"path": path(&f.ws.join("file")), "handleId": "h", "sandbox": sb}),
    );
    assert_eq!(r["handleId"], "h");
    let r = s.call(
        "fs/readBlock",
        json!({"handleId": "h", "offset": 0, "len": 64}),
    );
    assert_eq!(unb64(&r["chunk"]), b"mine\n");
    assert!(f.outside_untouched());
    // Reads of what the policy allows, outside the workspace, still work.
    let r = s.call(
        "fs/getMetadata",
        json!({"path": "/etc/hostname", "sandbox": sb}),
    );
    assert!(r.is_object());
}

/// A sandboxed process sees its own terminal in `/dev/pts` and no other:
/// it can neither write into an unsandboxed sibling's terminal nor read
/// what is typed there.
#[test]
fn other_terminals_are_out_of_reach() {
    let f = Fixture::new();
    let mut s = Server::started(&[]);
    s.start_process(
        "sibling",
        &["sh", "-c", "tty; exec cat"],
        json!({"tty": true, "pipeStdin": true}),
    );
    let first = s
        .notification(|m| m["method"] == "process/output" && m["params"]["processId"] == "sibling");
    let sibling = String::from_utf8(unb64(&first["params"]["chunk"]))
        .unwrap()
        .trim()
        .to_string();
    assert!(sibling.starts_with("/dev/pts/"), "{sibling}");
    let script = format!("ls /dev/pts; tty; printf SPOOF > {sibling}; cat {sibling}");
    for tty in [false, true] {
        let ended = run(&mut s, &script, &f.ws, f.policy(), f.env(), tty);
        assert_ne!(ended.exit_code, 0, "{ended:?}");
        let listed: Vec<&str> = ended
            .output
            .lines()
            .take_while(|l| !l.contains("/dev/pts/") && !l.contains("not a tty"))
            .collect();
        if tty {
            // Its own terminal, under its own name, and nothing else.
            assert_eq!(listed.len(), 1, "{ended:?}");
            assert!(
                ended.output.contains(&format!("/dev/pts/{}", listed[0])),
                "{ended:?}"
            );
        } else {
            assert!(listed.is_empty(), "{ended:?}");
        }
    }
    // The sibling saw no spoofed text, and still gets what is typed.
    s.call(
        "process/write",
        json!({"processId": "sibling", "chunk": b64(b"ping\n"), "writeId": "p"}),
    );
    s.call("process/closeStdin", json!({"processId": "sibling"}));
    let (output, _) = s.collect("sibling");
    let output = String::from_utf8_lossy(&output);
    assert!(!output.contains("SPOOF"), "{output}");
    assert!(output.contains("ping"), "{output}");
}

/// A policy with deny entries below the root (`a/secret`, a directory, and
/// `a/b/token`, a file) in a writable workspace, with `/tmp` writable too.
fn deep_deny_policy(f: &Fixture) -> Value {
    std::fs::create_dir_all(f.ws.join("a/secret")).unwrap();
    std::fs::create_dir_all(f.ws.join("a/b")).unwrap();
    std::fs::write(f.ws.join("a/secret/key"), "TOPSECRET\n").unwrap();
    std::fs::write(f.ws.join("a/b/token"), "TOPSECRET token\n").unwrap();
    json!({
        "permissions": {"type": "managed", "network": "restricted", "file_system": {
            "type": "restricted", "entries": [
                {"path": {"type": "special", "value": {"kind": "root"}}, "access": "read"},
                {"path": {"type": "special", "value": {"kind": "project_roots"}}, "access": "write"},
                {"path": {"type": "special", "value": {"kind": "tmpdir"}}, "access": "write"},
                {"path": {"type": "path", "path": "/tmp"}, "access": "write"},
                {"path": {"type": "path", "path": ":workspace_roots/a/secret"}, "access": "deny"},
                {"path": {"type": "path", "path": ":workspace_roots/a/b/token"}, "access": "deny"},
            ]}},
        "workspaceRoots": [f.ws.to_str().unwrap()],
    })
}

/// Renaming an ancestor of a deny entry, or the entry itself, in one run
/// must not expose it to the next run under the same policy.
#[test]
fn deny_entries_survive_renaming_their_ancestors() {
    let f = Fixture::new();
    let policy = deep_deny_policy(&f);
    let mut s = Server::started(&[]);
    let first = run(
        &mut s,
        "mv a moved; mv a/secret a/open; mv a/b a/c; mv a/b/token a/t; \
         rm -rf a; mkdir -p a/secret a/b; echo planted > a/b/token; ls -a a",
        &f.ws,
        policy.clone(),
        f.env(),
        false,
    );
    assert!(!first.output.contains("TOPSECRET"), "{first:?}");
    for path in ["a/secret/key", "a/b/token"] {
        assert!(
            std::fs::read_to_string(f.ws.join(path))
                .unwrap()
                .contains("TOPSECRET"),
            "{path} was moved or replaced: {first:?}"
        );
    }
    let second = run(
        &mut s,
        "cat moved/secret/key a/open/key a/c/token a/t a/secret/key a/b/token",
        &f.ws,
        policy,
        f.env(),
        false,
    );
    assert!(!second.output.contains("TOPSECRET"), "{second:?}");
    assert!(second.denied_read, "{second:?}");
}

/// The masks over deny entries are made inside each sandbox's own mount
/// namespace: a command that may write the temp directory finds nothing
/// there to replace, and whatever it plants changes nothing for later runs.
#[test]
fn deny_masks_can_not_be_replaced_from_a_writable_temp_directory() {
    let f = Fixture::new();
    let policy = deep_deny_policy(&f);
    let mut s = Server::started(&[]);
    let tamper = "for d in \"${TMPDIR:-/tmp}\"/exec-server-masks* /tmp/exec-server-masks*; do \
                  [ -e \"$d\" ] && echo found $d && rm -rf \"$d\" && ln -s \"$WS/a/secret\" \"$d\"; done; \
                  for d in dir file mask; do ln -s \"$WS/a/secret\" /tmp/$d 2>/dev/null; done; true";
    run(&mut s, tamper, &f.ws, policy.clone(), f.env(), false);
    let second = run(
        &mut s,
        "ls a/secret; cat a/secret/key a/b/token",
        &f.ws,
        policy,
        f.env(),
        false,
    );
    assert!(!second.output.contains("TOPSECRET"), "{second:?}");
    assert!(!second.output.lines().any(|l| l == "key"), "{second:?}");
    for d in ["dir", "file", "mask"] {
        let _ = std::fs::remove_file(Path::new("/tmp").join(d));
    }
}

/// What a sandboxed process could change of another: its limits, its
/// nice value and scheduling, its CPU affinity.
fn reachable_state(pid: i32) -> (String, String, String) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<String> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let affinity = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list"))
        .unwrap()
        .to_string();
    (
        std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap(),
        // priority, nice, policy
        format!("{} {} {}", fields[15], fields[16], fields[38]),
        affinity,
    )
}

/// Nothing sandboxed can name the server or its watchdog: no resource
/// limit, priority, affinity, signal or ptrace reaches them, and `/proc`
/// shows only the sandbox's own processes.
#[test]
fn the_server_and_its_watchdog_are_out_of_reach() {
    let f = Fixture::new();
    let mut s = Server::started(&[]);
    let server = s.child.id() as i32;
    let watchdog = crate::support::watchdog_of(s.child.id());
    let before = [reachable_state(server), reachable_state(watchdog)];
    let mut env = f.env();
    env["TARGETS"] = json!(format!("{server} {watchdog}"));
    let script = "exec python3 -c \"
import ctypes, os, resource, signal
libc = ctypes.CDLL(None, use_errno=True)
targets = [int(t) for t in os.environ['TARGETS'].split()]
reached = []
for pid in targets:
    for name, attempt in [
        ('prlimit', lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (6, 6))),
        ('cpu', lambda: resource.prlimit(pid, resource.RLIMIT_CPU, (1, 1))),
        ('nice', lambda: os.setpriority(os.PRIO_PROCESS, pid, 19)),
        ('affinity', lambda: os.sched_setaffinity(pid, {0})),
        ('sched', lambda: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))),
        ('signal', lambda: os.kill(pid, signal.SIGSTOP)),
        ('ptrace', lambda: libc.ptrace(16, pid, 0, 0) == 0 or (_ for _ in ()).throw(OSError(ctypes.get_errno(), 'ptrace'))),
        ('proc', lambda: open('/proc/%d/status' % pid).read()),
    ]:
        try:
            attempt()
            reached.append('%s %d' % (name, pid))
        except OSError as e:
            pass
print('pids:', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
print('reached:', reached)
\"";
    for tty in [false, true] {
        let ended = run(&mut s, script, &f.ws, f.policy(), f.env_with(&env), tty);
        assert!(ended.output.contains("reached: []"), "{ended:?}");
        // Only the sandbox's own processes: its init and python.
        let pids = ended
            .output
            .lines()
            .find_map(|l| l.trim().strip_prefix("pids: "))
            .unwrap_or_else(|| panic!("{ended:?}"))
            .to_string();
        let count = pids.matches(',').count() + 1;
        assert_eq!(count, 2, "{pids}");
        assert!(!pids.contains(&server.to_string()), "{pids}");
    }
    assert_eq!(before, [reachable_state(server), reachable_state(watchdog)]);
    // The server still starts processes.
    s.call("process/list", json!({}));
}

/// Signals reach a sandboxed program through its init, and its exit
/// status (a signal's too) comes back as it would unsandboxed.
#[test]
fn signals_and_exit_status_of_a_sandboxed_program() {
    let f = Fixture::new();
    let mut s = Server::started(&[]);
    for (signal, code) in [("terminate", 143), ("interrupt", 130), ("hangup", 129)] {
        let id = format!("sig-{signal}");
        s.call(
            "process/start",
            json!({"processId": id, "argv": ["sleep", "30"], "cwd": f.ws.to_str().unwrap(),
                   "env": f.env(), "sandbox": f.policy()}),
        );
        s.call("process/signal", json!({"processId": id, "signal": signal}));
        let (_, exit) = s.collect(&id);
        assert_eq!(exit, Some(code), "{signal}");
    }
    let ended = run(&mut s, "exit 7", &f.ws, f.policy(), f.env(), false);
    assert_eq!(ended.exit_code, 7);
}
