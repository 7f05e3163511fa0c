//! The sandbox's init: pid 1 of a sandboxed process's PID namespace.
//!
//! A sandboxed program runs in a PID namespace of its own, so that nothing
//! of the server or its watchdog is in its `/proc` or can be named by pid
//! (no signal, resource limit, priority or affinity can reach them), and
//! so that everything it starts dies when the namespace's init does. The
//! program itself can't be that init: pid 1 ignores every signal it has no
//! handler for, and would leave orphans unreaped. So the child of
//! [`super::exec::spawn`] builds the namespaces and mounts, then execs this
//! binary in its `__init` mode, which confines itself (Landlock, seccomp),
//! forks the program as pid 2, forwards the signals the server sends it to
//! the program's process group, reaps whatever is orphaned in the
//! namespace, and reports the program's exit status. It stays until the
//! last process of the namespace is gone (what the program left running
//! in the background), and everything goes when it is killed.
//!
//! Arguments: `__init FLAGS NAME COUNT ARGV...`. Fds: 3 the Landlock
//! ruleset, 4 the socket for the seccomp listener (flag `l`), 5 a pipe for
//! the errno of a failed exec (closed by a successful one), 6 a pipe for
//! `S` and the program's wait status, 7 a file with the program's
//! environment (`K=V` records ending in NUL). The init itself runs with an
//! empty environment, so nothing of the command's (`LD_PRELOAD`, say) runs
//! before it is confined.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use super::exec::Program;
use crate::sandbox::seccomp::Net;

/// The hidden first argument that makes the binary the init.
pub const ARG: &str = crate::sys::SANDBOX_INIT_ARG;

const RULESET_FD: i32 = 3;
const LISTENER_FD: i32 = 4;
const EXEC_ERROR_FD: i32 = 5;
const STATUS_FD: i32 = 6;
const ENV_FD: i32 = 7;

/// Signals the server may send, forwarded to the program's group.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGCONT,
    libc::SIGWINCH,
];

/// The flags argument: `n` network restricted (Unix sockets only), `m`
/// managed networking (IPv4 and IPv6 only) with `b` local binding, `t` the
/// program takes the terminal on fd 0, `l` a seccomp listener goes back
/// over fd 4.
pub fn flags(net: Net, tty: bool, listener: bool) -> String {
    let mut flags = String::from("-");
    let (restricted, managed, binding) = match net {
        Net::Open => (false, false, false),
        Net::UnixOnly => (true, false, false),
        Net::Managed { local_binding } => (false, true, local_binding),
    };
    for (on, c) in [
        (restricted, 'n'),
        (managed, 'm'),
        (binding, 'b'),
        (tty, 't'),
        (listener, 'l'),
    ] {
        if on {
            flags.push(c);
        }
    }
    flags
}

/// The init's whole life; returns its exit code.
pub fn main() -> i32 {
    let args: Vec<Vec<u8>> = std::env::args_os()
        .skip(2)
        .map(OsString::into_vec)
        .collect();
    match run(&args) {
        Ok(never) => match never {},
        Err(errno) => {
            report(errno);
            127
        }
    }
}

/// Tell the server why the program could not be started.
fn report(errno: i32) {
    let bytes = errno.to_le_bytes();
    // SAFETY: writes 4 bytes from a valid buffer.
    unsafe { libc::write(EXEC_ERROR_FD, bytes.as_ptr().cast(), 4) };
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

enum Never {}

fn run(args: &[Vec<u8>]) -> Result<Never, i32> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (Some(flags), Some(name), Some(count)) = (args.first(), args.get(1), args.get(2)) else {
        return Err(libc::EINVAL);
    };
    let flags = text(flags);
    let count: usize = text(count).parse().map_err(|_| libc::EINVAL)?;
    let argv = args.get(3..3 + count).ok_or(libc::EINVAL)?;
    let mut records = Vec::new();
    {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        // SAFETY: fd 7 is ours, given for this; the File closes it.
        let mut file = unsafe { std::fs::File::from_raw_fd(ENV_FD) };
        file.read_to_end(&mut records)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    }
    let env: Vec<(String, String)> = records
        .split(|&b| b == 0)
        .filter_map(|e| {
            let e = text(e);
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let listener = flags.contains('l');
    let net = if flags.contains('m') {
        Net::Managed {
            local_binding: flags.contains('b'),
        }
    } else if flags.contains('n') {
        Net::UnixOnly
    } else {
        Net::Open
    };
    let filter = crate::sandbox::seccomp::build(net, listener);
    crate::sandbox::confine(RULESET_FD, &filter, listener.then_some(LISTENER_FD))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EPERM))?;
    let program = Program::new(
        &text(name),
        argv,
        env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
    // SAFETY: plain system calls in a single-threaded process; the child
    // only makes system calls before it execs.
    unsafe {
        libc::close(RULESET_FD);
        libc::close(LISTENER_FD);
        let mut waited: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut waited);
        libc::sigaddset(&mut waited, libc::SIGCHLD);
        for &sig in FORWARDED {
            libc::sigaddset(&mut waited, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &waited, std::ptr::null_mut());
        match libc::fork() {
            -1 => Err(last_errno()),
            0 => {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                libc::close(STATUS_FD);
                if libc::setsid() == -1
                    || (flags.contains('t') && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1)
                    || super::exec::close_on_exec_from_3().is_err()
                {
                    report(last_errno());
                    libc::_exit(127);
                }
                report(program.exec());
                libc::_exit(127)
            }
            child => {
                // The program's stdio and exec-error pipe are the
                // program's alone: their ends must come when it (and what
                // it started) lets go of them.
                for fd in [EXEC_ERROR_FD, 0, 1, 2] {
                    libc::close(fd);
                }
                serve(child, &waited)
            }
        }
    }
}

/// Forward signals to the program's group and reap every process of the
/// namespace; report the program's status when it exits, and leave when
/// nothing is left.
fn serve(child: libc::pid_t, waited: &libc::sigset_t) -> ! {
    let mut reported = false;
    loop {
        // SAFETY: waits for a blocked signal; info is written by the kernel.
        let sig = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(waited, &mut info)
        };
        if sig == libc::SIGCHLD {
            loop {
                let mut status = 0;
                // SAFETY: reaps any child without blocking.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid == child && !reported {
                    reported = true;
                    let mut record = [b'S', 0, 0, 0, 0];
                    record[1..].copy_from_slice(&status.to_le_bytes());
                    // SAFETY: writes 5 bytes from a valid buffer.
                    unsafe { libc::write(STATUS_FD, record.as_ptr().cast(), 5) };
                }
                if pid == -1 {
                    // No process left in the namespace but this one.
                    // SAFETY: leave at once.
                    unsafe { libc::_exit(0) };
                }
                if pid == 0 {
                    break;
                }
            }
        } else if sig > 0 && !reported {
            // SAFETY: plain syscall; the group leader is unreaped.
            unsafe { libc::kill(-child, sig) };
        }
    }
}
