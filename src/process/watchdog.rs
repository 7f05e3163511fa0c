//! The watchdog: a tiny forked process that kills everything the server
//! started when the server dies, however it dies (even SIGKILL).
//!
//! The server holds the only write end of a pipe to it; when the server
//! exits, the kernel closes it and the watchdog reads EOF. In cgroup mode
//! it then kills and removes the server's whole cgroup subtree. In
//! subreaper mode it kills every process tree it was told of: each child
//! registers itself before it execs (between `clone` and `exec`, so there
//! is no window in which a child exists that the watchdog does not know),
//! and the server registers the orphans it adopts. The server unregisters
//! a pid once it has reaped it, so that a recycled pid is never signalled.
//!
//! In subreaper mode the watchdog also holds a copy of the server's ends of
//! each running process's output (pipes or pty master) until the process
//! is reaped: the server's death then hangs up no terminal and breaks no
//! pipe, so no process dies of it (and sends its orphans to init) before
//! the watchdog has stopped its whole tree.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::container::{self, Mode};

const REGISTER: u8 = b'+';
const UNREGISTER: u8 = b'-';
/// Hold the fds that come with the record until the pid is unregistered.
const HOLD: u8 = b'H';

/// How long the watchdog waits for a killed cgroup subtree to empty before
/// it removes the directories.
const CGROUP_DRAIN: Duration = Duration::from_secs(2);

/// The server's end of the watchdog's socket.
#[derive(Debug)]
pub struct Watchdog {
    socket: OwnedFd,
    pid: i32,
    dead: AtomicBool,
}

impl Watchdog {
    /// Fork the watchdog. Call this while the process has one thread (before
    /// the async runtime starts): only then is `fork` safe.
    pub fn start(mode: &Mode, legacy_roots: Vec<PathBuf>) -> io::Result<Watchdog> {
        let cgroup_root = match mode {
            Mode::Cgroup(root) => Some(root.clone()),
            Mode::Subreaper => None,
        };
        let (ours, theirs) = crate::sys::socket_pair()?;
        // SAFETY: the caller guarantees a single-threaded process.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                drop(ours);
                watch(theirs, cgroup_root, legacy_roots)
            }
            pid => Ok(Watchdog {
                socket: ours,
                pid,
                dead: AtomicBool::new(false),
            }),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The server's end, for children to register themselves before exec.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Whether the watchdog still runs (it is reaped here once dead).
    pub fn alive(&self) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        let mut status = 0;
        // SAFETY: waits for our own child without blocking.
        if unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } == self.pid {
            tracing::error!(
                "the watchdog died: nothing would kill this server's processes if it died; \
                 no new process will be started (restart the server)"
            );
            self.dead.store(true, Ordering::Relaxed);
            container::forget(self.pid);
            return false;
        }
        true
    }

    /// Ask the watchdog to kill the tree rooted at `pid` if the server dies.
    pub fn register(&self, pid: i32) {
        send(self.socket.as_raw_fd(), REGISTER, pid);
    }

    /// Hold copies of `fds` (the server's ends of `pid`'s output) until
    /// `pid` is unregistered.
    pub fn hold(&self, pid: i32, fds: &[RawFd]) {
        let _ = crate::sys::send_with_fds(self.socket.as_raw_fd(), &record(HOLD, pid), fds);
    }

    /// Forget a pid that the server has reaped, and what was held for it.
    pub fn unregister(&self, pid: i32) {
        send(self.socket.as_raw_fd(), UNREGISTER, pid);
    }
}

/// Register the calling process. Only system calls: it is called in a
/// child between `clone` and `exec`. Fails when the watchdog is gone.
pub fn register_self(fd: RawFd) -> io::Result<()> {
    // SAFETY: getpid is async-signal-safe.
    let pid = unsafe { libc::getpid() };
    if send(fd, REGISTER, pid) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Withdraw `pid` (reaped after a failed start) through the watchdog's
/// socket `fd`.
pub fn withdraw(fd: RawFd, pid: i32) {
    send(fd, UNREGISTER, pid);
}

fn record(op: u8, pid: i32) -> [u8; 5] {
    let mut record = [0u8; 5];
    record[0] = op;
    record[1..].copy_from_slice(&pid.to_le_bytes());
    record
}

/// Send one record (one message: records never mix, however many
/// children write at once); false if the watchdog is gone.
fn send(fd: RawFd, op: u8, pid: i32) -> bool {
    let record = record(op, pid);
    // SAFETY: sends 5 bytes from a valid buffer.
    unsafe { libc::send(fd, record.as_ptr().cast(), record.len(), libc::MSG_NOSIGNAL) == 5 }
}

/// The watchdog's whole life.
fn watch(socket: OwnedFd, cgroup_root: Option<PathBuf>, legacy_roots: Vec<PathBuf>) -> ! {
    // SAFETY: plain syscalls in the freshly forked single-threaded child.
    unsafe {
        // Signals aimed at the server's terminal or group must not take the
        // watchdog down before it has done its job.
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Not a subreaper: the orphans of the trees it kills go to init.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"exec-watchdog".as_ptr());
        // Its own process group: a client that kills the server's group
        // (as a careful client does) must not take the watchdog with it.
        libc::setpgid(0, 0);
        // It may hold a few fds for every process.
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        // Do not hold the protocol channel open.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
    let mut roots: HashSet<i32> = HashSet::new();
    let mut held: HashMap<i32, Vec<OwnedFd>> = HashMap::new();
    let mut buf = [0u8; 64];
    loop {
        let (n, fds) = match crate::sys::recv_with_fds(socket.as_raw_fd(), &mut buf, 0) {
            Ok((0, _)) => break,
            Ok(message) => message,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if n != 5 {
            continue;
        }
        let pid = i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
        match buf[0] {
            REGISTER => {
                roots.insert(pid);
            }
            HOLD => {
                held.entry(pid).or_default().extend(fds);
            }
            UNREGISTER => {
                roots.remove(&pid);
                held.remove(&pid);
            }
            _ => {}
        }
    }
    // What the server left registered: after a clean exit, nothing.
    tracing::debug!("the server is gone; {} trees left to kill", roots.len());
    match cgroup_root {
        Some(root) => container::kill_cgroup_tree(&root, CGROUP_DRAIN),
        None => {
            let roots: Vec<i32> = roots.into_iter().collect();
            container::stop_and_kill(&roots);
            for pid in roots {
                if pid > 1 {
                    // The process group too, for a leader already gone.
                    // SAFETY: plain syscall.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
            }
        }
    }
    // The cgroup v1 groups of limits, empty now.
    for root in legacy_roots {
        super::limits::remove_legacy(&root, CGROUP_DRAIN);
    }
    // SAFETY: leave without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}
