//! `--persist`: the stdio process becomes a thin bridge to a per-user
//! daemon on a Unix socket, so that a dropped SSH connection (which kills
//! the bridge) only detaches the session: the daemon keeps the processes
//! and their output until the orchestrator resumes, or the detached TTL
//! ends them.
//!
//! The socket is `$XDG_RUNTIME_DIR/exec-server/NAME.sock`, or, without
//! `XDG_RUNTIME_DIR`, `/tmp/exec-server-UID/NAME.sock` (a directory of mode
//! 0700 that must belong to us and not be a link). The daemon's log, lock
//! and pid files lie beside it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a bridge waits for a daemon it started to listen.
const DAEMON_START: Duration = Duration::from_secs(10);
/// How long a bridge waits for the start lock another process holds.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Where one named daemon lives.
#[derive(Debug, Clone)]
pub struct Place {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Held (flock) while a bridge starts the daemon.
    pub lock: PathBuf,
    /// The daemon's stderr.
    pub log: PathBuf,
    /// The daemon's pid while it runs.
    pub pid: PathBuf,
}

impl Place {
    /// The files of daemon `name`, making (and checking) their directory.
    pub fn of(name: &str) -> io::Result<Place> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--persist name {name:?} must be a plain file name"),
            ));
        }
        let dir = directory()?;
        Ok(Place {
            socket: dir.join(format!("{name}.sock")),
            lock: dir.join(format!("{name}.lock")),
            log: dir.join(format!("{name}.log")),
            pid: dir.join(format!("{name}.pid")),
        })
    }
}

/// Where this user's daemons live: `$XDG_RUNTIME_DIR/exec-server`, or
/// `/tmp/exec-server-UID` without it.
fn directory_path() -> PathBuf {
    // SAFETY: getter without failure modes.
    let uid = unsafe { libc::geteuid() };
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("exec-server"),
        None => PathBuf::from(format!("/tmp/exec-server-{uid}")),
    }
}

/// Every directory a daemon of this user may live in (whichever
/// `XDG_RUNTIME_DIR` a bridge has): what sandboxed children must not see.
pub fn directories() -> Vec<PathBuf> {
    // SAFETY: getter without failure modes.
    let uid = unsafe { libc::geteuid() };
    let mut all = vec![
        directory_path(),
        PathBuf::from(format!("/tmp/exec-server-{uid}")),
        PathBuf::from(format!("/run/user/{uid}/exec-server")),
    ];
    all.dedup();
    all
}

/// The daemons' directory: private to this user.
fn directory() -> io::Result<PathBuf> {
    // SAFETY: getter without failure modes.
    let uid = unsafe { libc::geteuid() };
    let dir = directory_path();
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory of ours with mode 0700 (not a link)",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

/// Bridge this process's stdin and stdout to the daemon `name`, starting
/// it first if nothing answers. `daemon_args` are the flags it starts
/// with. Returns when either side ends.
pub fn bridge(name: &str, daemon_args: &[String]) -> io::Result<()> {
    let place = Place::of(name)?;
    let stream = connect_or_start(&place, daemon_args)?;
    let mut from_daemon = stream.try_clone()?;
    let mut to_daemon = stream;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let up = done_tx.clone();
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let _ = copy(&mut stdin, &mut to_daemon);
        let _ = up.send(());
    });
    std::thread::spawn(move || {
        let mut stdout = io::stdout().lock();
        let _ = copy(&mut from_daemon, &mut stdout);
        let _ = done_tx.send(());
    });
    // Either side ending ends the bridge (the process exits, closing the
    // socket: the daemon detaches the session).
    let _ = done_rx.recv();
    Ok(())
}

/// Copy until the end or an error, flushing each piece.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// A connection to the daemon, started under the lock when nothing
/// answers, so that two first bridges at once start exactly one.
fn connect_or_start(place: &Place, daemon_args: &[String]) -> io::Result<UnixStream> {
    if let Ok(stream) = UnixStream::connect(&place.socket) {
        return Ok(stream);
    }
    let lock = super::files::open_lock(&place.lock)?;
    super::files::lock_within(&lock, &place.lock, LOCK_WAIT)?;
    // Someone else may have started it while we waited for the lock.
    if let Ok(stream) = UnixStream::connect(&place.socket) {
        return Ok(stream);
    }
    let mut daemon = start_daemon(place, daemon_args)?;
    let deadline = Instant::now() + DAEMON_START;
    loop {
        match UnixStream::connect(&place.socket) {
            Ok(stream) => return Ok(stream),
            Err(_) if matches!(daemon.try_wait(), Ok(Some(_))) => {
                let status = daemon.try_wait().ok().flatten();
                return Err(io::Error::other(format!(
                    "the daemon exited ({}) before it listened on {}: {}",
                    status.map_or_else(|| "?".into(), |s| s.to_string()),
                    place.socket.display(),
                    why_it_died(place)
                )));
            }
            Err(err) if Instant::now() > deadline => {
                return Err(io::Error::new(
                    err.kind(),
                    format!(
                        "the daemon did not listen on {} in time: {}",
                        place.socket.display(),
                        why_it_died(place)
                    ),
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// What the daemon's log says of its end (its last lines), or, with an
/// empty log, what can be seen from here (a full filesystem).
fn why_it_died(place: &Place) -> String {
    let log = std::fs::read(&place.log).unwrap_or_default();
    let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(2048)..]);
    let tail = tail.trim();
    let dir = place.log.parent().unwrap_or(Path::new("/"));
    let full = super::files::free_bytes(dir).is_some_and(|free| free < 64 * 1024);
    match (tail.is_empty(), full) {
        (false, _) => format!("its log {} ends with: {tail}", place.log.display()),
        (true, true) => format!(
            "the filesystem of {} is full (its log {} is empty)",
            dir.display(),
            place.log.display()
        ),
        (true, false) => format!("its log {} is empty", place.log.display()),
    }
}

/// Start the daemon detached from us and from the SSH session: a session
/// of its own, stdin and stdout on /dev/null, stderr to its log.
fn start_daemon(place: &Place, daemon_args: &[String]) -> io::Result<std::process::Child> {
    let log: File = super::files::open_append(&place.log)?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("--listen")
        .arg(format!("unix:{}", place.socket.display()))
        .arg("--pid-file")
        .arg(&place.pid)
        .args(daemon_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // SAFETY: setsid only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Waited for only while it starts: it outlives us by design. Its
    // parent becomes init (or the nearest subreaper) when we exit.
    cmd.spawn()
}

/// The daemon's pid, if its pid file names a live exec-server.
pub fn daemon_pid(place: &Place) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(&place.pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let alive = Path::new(&format!("/proc/{pid}")).exists();
    let listening = UnixStream::connect(&place.socket).is_ok();
    (alive && listening).then_some(pid)
}
