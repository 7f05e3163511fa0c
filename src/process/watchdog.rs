//! The watchdog: a tiny forked process that kills every child's process
//! group when the server dies, however it dies (even SIGKILL).
//!
//! Each child registers its own process group with the watchdog before it
//! execs (between `clone` and `exec`, so there is no window in which a child exists
//! that the watchdog does not know). The server holds the only write end of
//! the pipe; when the server exits, the kernel closes it, the watchdog reads
//! EOF, kills every group still registered and exits. The server unregisters
//! a group once it has seen the group empty, so that a recycled id is never
//! signalled.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

const REGISTER: u8 = b'+';
const UNREGISTER: u8 = b'-';

/// The server's end of the watchdog pipe.
#[derive(Debug)]
pub struct Watchdog {
    pipe: OwnedFd,
}

impl Watchdog {
    /// Fork the watchdog. Call this while the process has one thread (before
    /// the async runtime starts): only then is `fork` safe.
    pub fn start() -> io::Result<Watchdog> {
        let (read_end, write_end) = super::exec::pipe()?;
        // SAFETY: the caller guarantees a single-threaded process.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                drop(write_end);
                watch(read_end)
            }
            _ => Ok(Watchdog { pipe: write_end }),
        }
    }

    /// The write end, for children to register themselves before exec.
    pub fn raw_fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Forget a process group that is known to be empty.
    pub fn unregister(&self, pgid: i32) {
        send(self.pipe.as_raw_fd(), UNREGISTER, pgid);
    }
}

/// Register the calling process's group. Only a system call: it is called
/// in a child between `clone` and `exec`.
pub fn register_self(fd: RawFd) {
    // SAFETY: getpid is async-signal-safe.
    let pid = unsafe { libc::getpid() };
    send(fd, REGISTER, pid);
}

fn send(fd: RawFd, op: u8, pgid: i32) {
    let mut record = [0u8; 5];
    record[0] = op;
    record[1..].copy_from_slice(&pgid.to_le_bytes());
    // A record is far below PIPE_BUF, so the write is atomic even with many
    // writers. A failure means the watchdog is gone; nothing can be done.
    // SAFETY: writes 5 bytes from a valid buffer.
    unsafe { libc::write(fd, record.as_ptr().cast(), record.len()) };
}

/// The watchdog's whole life.
fn watch(pipe: OwnedFd) -> ! {
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
        libc::prctl(libc::PR_SET_NAME, c"exec-watchdog".as_ptr());
        // Its own process group: a client that kills the server's group
        // (as a careful client does) must not take the watchdog with it.
        libc::setpgid(0, 0);
        // Do not hold the protocol channel open.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
    let mut groups: HashSet<i32> = HashSet::new();
    let mut buf = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n as usize]);
        let whole = pending.len() / 5 * 5;
        for record in pending[..whole].chunks_exact(5) {
            let pgid = i32::from_le_bytes([record[1], record[2], record[3], record[4]]);
            match record[0] {
                REGISTER => {
                    groups.insert(pgid);
                }
                UNREGISTER => {
                    groups.remove(&pgid);
                }
                _ => {}
            }
        }
        pending.drain(..whole);
    }
    for pgid in groups {
        if pgid > 1 {
            // SAFETY: plain syscall.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
    // SAFETY: leave without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}
