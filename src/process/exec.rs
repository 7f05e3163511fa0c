//! Starting a program the way `posix_spawn` does: `clone` with
//! `CLONE_VM | CLONE_VFORK`, so the child borrows the server's address space
//! until it calls `execve` instead of copying it.
//!
//! A `fork` copies the page tables of the whole server and write-protects
//! all of its memory; with a few hundred MiB of retained output that made
//! every start slow and every later write to that memory fault. Here the
//! child runs on a small stack of its own, on data prepared by the parent:
//! it makes system calls only (no allocation, no locks), and reports a
//! failure through memory the parent reads once the child has exited.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

use super::container::ChildSetup;
use crate::sandbox::Prepared;

/// What to run, and what the child does before `execve`.
pub struct Exec<'a> {
    pub argv: &'a [String],
    pub arg0: Option<&'a str>,
    pub cwd: &'a Path,
    pub env: &'a BTreeMap<String, String>,
    /// Become fds 0, 1 and 2.
    pub stdio: [RawFd; 3],
    /// Make fd 0 the controlling terminal (after `setsid`).
    pub controlling_tty: bool,
    /// What the child does for its container.
    pub container: ChildSetup,
    pub sandbox: Option<&'a Prepared>,
}

/// A started child, reaped through its pidfd.
pub struct Child {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Wait for the child to exit and reap it.
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        loop {
            let mut status = 0;
            // SAFETY: waits for our own child only, without blocking.
            match unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } {
                0 => {}
                -1 => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                    continue;
                }
                _ => return Ok(std::process::ExitStatus::from_raw(status)),
            }
            // A pidfd becomes readable when its process exits.
            self.pidfd.readable().await?.clear_ready();
        }
    }
}

/// Bytes of stack for the child, plus one guard page below them.
const STACK_BYTES: usize = 256 * 1024;

/// Everything the child uses, laid out before the clone.
struct Plan<'a> {
    /// Paths to try, in order (the `PATH` search done ahead of time).
    programs: Vec<CString>,
    argv: Vec<*const c_char>,
    /// `/bin/sh PROGRAM ARGS...` for a file the kernel can't execute
    /// (`ENOEXEC`), as `execvp` does; slot 1 is set to the program tried.
    sh_argv: Vec<Cell<*const c_char>>,
    envp: Vec<*const c_char>,
    cwd: CString,
    stdio: [RawFd; 3],
    controlling_tty: bool,
    container: ChildSetup,
    sandbox: Option<&'a Prepared>,
    /// The errno of the step that failed; set by the child.
    errno: AtomicI32,
    /// The strings the pointer arrays point into.
    _strings: Vec<CString>,
}

/// A C string for the child; a NUL inside is `EINVAL`, as `execve` would
/// have it.
fn c_string(text: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(text.as_ref()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Start the program; returns once it has called `execve` (or failed to).
pub fn spawn(exec: &Exec<'_>) -> io::Result<Child> {
    let plan = plan(exec)?;
    let stack = Stack::new()?;
    let mut pidfd: c_int = -1;
    // SAFETY: signals are blocked around the clone so that no handler of
    // the server runs in the child while it shares the server's memory;
    // the child resets them before unblocking. The plan and the stack
    // outlive the child's use of them: CLONE_VFORK suspends this thread
    // until the child has exec'd or exited.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            (&raw const plan).cast_mut().cast::<c_void>(),
            &mut pidfd as *mut c_int,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid == -1 {
            return Err(clone_error);
        }
        pid
    };
    drop(stack);
    // SAFETY: CLONE_PIDFD stored a fresh close-on-exec fd for the child.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let errno = plan.errno.load(Ordering::Acquire);
    if errno != 0 {
        // The child has exited (that is what resumed us); reap it.
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(errno));
    }
    // SAFETY: the OwnedFd moves into the AsyncFd, so it stays open for as
    // long as it is registered.
    let pidfd = unsafe { AsyncFd::register(pidfd) }?;
    Ok(Child { pid, pidfd })
}

fn plan<'a>(exec: &Exec<'a>) -> io::Result<Plan<'a>> {
    let program = &exec.argv[0];
    let mut strings = Vec::new();
    let mut pointer = |s: CString| {
        let p = s.as_ptr();
        strings.push(s);
        p
    };
    let mut argv = Vec::with_capacity(exec.argv.len() + 1);
    argv.push(pointer(c_string(exec.arg0.unwrap_or(program))?));
    for arg in &exec.argv[1..] {
        argv.push(pointer(c_string(arg)?));
    }
    argv.push(std::ptr::null());
    let sh_argv = [pointer(c_string("/bin/sh")?), std::ptr::null()]
        .into_iter()
        .chain(argv[1..].iter().copied())
        .map(Cell::new)
        .collect();
    let mut envp = Vec::with_capacity(exec.env.len() + 1);
    for (key, value) in exec.env {
        envp.push(pointer(c_string(format!("{key}={value}"))?));
    }
    envp.push(std::ptr::null());
    // The search `execvp` would make with the child's PATH.
    let programs = if program.contains('/') {
        vec![c_string(program)?]
    } else {
        let path = exec.env.get("PATH").map_or("/bin:/usr/bin", String::as_str);
        path.split(':')
            .map(|dir| {
                let dir = if dir.is_empty() { "." } else { dir };
                c_string(format!("{}/{program}", dir.trim_end_matches('/')))
            })
            .collect::<io::Result<_>>()?
    };
    use std::os::unix::ffi::OsStrExt;
    let cwd = c_string(exec.cwd.as_os_str().as_bytes())?;
    Ok(Plan {
        programs,
        argv,
        sh_argv,
        envp,
        cwd,
        stdio: exec.stdio,
        controlling_tty: exec.controlling_tty,
        container: exec.container,
        sandbox: exec.sandbox,
        errno: AtomicI32::new(0),
        _strings: strings,
    })
}

/// The child: set up, then exec. Only returns (by exiting) on failure.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `spawn` passes its plan and waits (CLONE_VFORK) while we use it.
    let plan = unsafe { &*arg.cast::<Plan<'_>>() };
    // SAFETY: between clone and exec; see `Plan::enter`.
    let errno = unsafe { plan.enter() };
    plan.errno.store(errno.max(1), Ordering::Release);
    // SAFETY: leave at once, without running anything of the server's.
    unsafe { libc::_exit(127) }
}

impl Plan<'_> {
    /// Set the child up and exec; returns the errno of what failed.
    ///
    /// # Safety
    /// Only in the child of `spawn`: system calls on prepared data, no
    /// allocation, no locks.
    unsafe fn enter(&self) -> c_int {
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // SAFETY: plain system calls on prepared data.
        unsafe {
            // Handlers are the server's code: back to the defaults before
            // signals are let through. SIGPIPE, which Rust ignores, too,
            // and glibc's two internal signals, which glibc won't let
            // `sigaction` touch and its `posix_spawn` leaves ignored in the
            // programs it starts (this server, when a client started it).
            let default = [0u64; 4]; // a kernel sigaction: SIG_DFL, no flags, empty mask
            for sig in [libc::SIGRTMIN() - 2, libc::SIGRTMIN() - 1] {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default.as_ptr(),
                    0usize,
                    8usize,
                );
            }
            for sig in 1..=libc::SIGRTMAX() {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                {
                    let mut default: libc::sigaction = std::mem::zeroed();
                    default.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &default, std::ptr::null_mut());
                }
            }
            for (target, &fd) in self.stdio.iter().enumerate() {
                let target = target as c_int;
                let rc = if fd == target {
                    // Already in place: only let it survive exec.
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, target)
                };
                if rc == -1 {
                    return errno();
                }
            }
            if libc::setsid() == -1 {
                return errno();
            }
            if self.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                return errno();
            }
            if libc::chdir(self.cwd.as_ptr()) == -1 {
                return errno();
            }
            // Into the container before anything else can run: whatever
            // the program starts is born inside it.
            if let Some(fd) = self.container.cgroup_procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return errno();
                }
            }
            if self.container.subreaper
                && libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == -1
            {
                return errno();
            }
            if let Some(fd) = self.container.watchdog {
                if let Err(err) = super::watchdog::register_self(fd) {
                    return err.raw_os_error().unwrap_or(libc::EPIPE);
                }
            }
            if let Some(sandbox) = self.sandbox {
                if let Err(err) = sandbox.enter() {
                    return err.raw_os_error().unwrap_or(libc::EPERM);
                }
            }
            if close_on_exec_from_3().is_err() {
                return errno();
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // As execvp: go on past paths that don't exist, remember that
            // one was not permitted, stop at any other failure.
            let mut result = libc::ENOENT;
            for program in &self.programs {
                libc::execve(program.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
                match errno() {
                    libc::ENOEXEC => {
                        self.sh_argv[1].set(program.as_ptr());
                        libc::execve(
                            self.sh_argv[0].get(),
                            self.sh_argv.as_ptr().cast(),
                            self.envp.as_ptr(),
                        );
                        return errno();
                    }
                    libc::EACCES => result = libc::EACCES,
                    libc::ENOENT
                    | libc::ENOTDIR
                    | libc::ESTALE
                    | libc::ENODEV
                    | libc::ETIMEDOUT => {}
                    other => return other,
                }
            }
            result
        }
    }
}

/// The child's stack: an anonymous mapping with a guard page at its low
/// end, so an overflow faults instead of writing into the server's memory.
struct Stack {
    base: *mut c_void,
    len: usize,
}

impl Stack {
    fn new() -> io::Result<Stack> {
        let page = 4096;
        let len = STACK_BYTES + page;
        // SAFETY: a fresh private mapping; the guard page is made
        // inaccessible before use.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = Stack { base, len };
            if libc::mprotect(base, page, libc::PROT_NONE) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    /// The initial stack pointer (stacks grow down).
    fn top(&self) -> *mut c_void {
        // SAFETY: one past the end of our mapping, 16-byte aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer in use.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Mark every fd from 3 up close-on-exec, so that nothing but fds 0, 1
/// and 2 crosses an `execve`: neither what the server inherited from
/// whoever started it nor anything opened without `O_CLOEXEC`. Only a
/// system call, so the child of [`spawn`] can call it too.
pub fn close_on_exec_from_3() -> io::Result<()> {
    // SAFETY: close_range only changes flags of this process's fds.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Open `/dev/null` for the child's stdin.
pub fn dev_null() -> io::Result<OwnedFd> {
    // SAFETY: opens a fresh fd that nothing else owns.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pipe, both ends close-on-exec and blocking: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fresh fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
