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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
    /// For a sandboxed program: the child is our init (pid 1 of the
    /// sandbox's PID namespace), which reports the program's exit status
    /// here and may live on while the program's descendants do.
    status: Option<AsyncFd<OwnedFd>>,
    reaped: bool,
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the child itself has been reaped (its pid may be reused).
    pub fn is_reaped(&self) -> bool {
        self.reaped
    }

    /// Wait for the program to exit: its status. A plain child is reaped
    /// by this; an init may still run (see [`Child::reap`]).
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        let Some(status) = &self.status else {
            return self.reap().await;
        };
        loop {
            tokio::select! {
                ready = status.readable() => {
                    let mut guard = ready?;
                    match read_status(status.get_ref().as_raw_fd()) {
                        Ok(Some(reported)) => return Ok(reported),
                        Ok(None) => break,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                        Err(err) => return Err(err),
                    }
                }
                gone = self.pidfd.readable() => {
                    let _ = gone?;
                    break;
                }
            }
        }
        // The init ended (killed, most likely) or closed its pipe: what it
        // reported last, else its own status.
        let own = self.reap().await?;
        let last = self
            .status
            .as_ref()
            .and_then(|s| read_status(s.get_ref().as_raw_fd()).ok().flatten());
        Ok(last.unwrap_or(own))
    }

    /// Wait for the child itself to end, and reap it.
    pub async fn reap(&mut self) -> io::Result<std::process::ExitStatus> {
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
                _ => {
                    self.reaped = true;
                    return Ok(std::process::ExitStatus::from_raw(status));
                }
            }
            // A pidfd becomes readable when its process exits.
            self.pidfd.readable().await?.clear_ready();
        }
    }
}

/// One status record of our init: `S` and the program's wait status.
/// `Ok(None)` at the end of the pipe.
fn read_status(fd: RawFd) -> io::Result<Option<std::process::ExitStatus>> {
    use std::os::unix::process::ExitStatusExt;
    let mut record = [0u8; 5];
    // SAFETY: reads into a valid buffer.
    let n = unsafe { libc::read(fd, record.as_mut_ptr().cast(), record.len()) };
    match n {
        0 => Ok(None),
        5 if record[0] == b'S' => Ok(Some(std::process::ExitStatus::from_raw(
            i32::from_le_bytes([record[1], record[2], record[3], record[4]]),
        ))),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("a malformed status record from the init")),
    }
}

/// Bytes of stack for the child, plus one guard page below them.
const STACK_BYTES: usize = 256 * 1024;

/// Everything the child uses, laid out before the clone.
struct Plan<'a> {
    program: Program,
    cwd: CString,
    stdio: [RawFd; 3],
    controlling_tty: bool,
    container: ChildSetup,
    sandbox: Option<&'a Prepared>,
    /// For a sandboxed program: exec our init instead, as pid 1.
    init: Option<InitLaunch>,
    /// The errno of the step that failed; set by the child.
    errno: AtomicI32,
    /// The strings the init's pointer arrays point into.
    _strings: Vec<CString>,
}

/// A program to exec as `execvp` would, prepared so that the exec itself
/// makes system calls only.
pub(super) struct Program {
    /// Paths to try, in order (the `PATH` search done ahead of time).
    programs: Vec<CString>,
    argv: Vec<*const c_char>,
    /// `/bin/sh PROGRAM ARGS...` for a file the kernel can't execute
    /// (`ENOEXEC`), as `execvp` does; slot 1 is set to the program tried.
    sh_argv: Vec<Cell<*const c_char>>,
    envp: Vec<*const c_char>,
    /// The strings the pointer arrays point into.
    _strings: Vec<CString>,
}

impl Program {
    /// `name` looked up in `PATH` of `env` (unless it holds a `/`), run
    /// with `argv` (`argv[0]` as the program should see it) and `env`.
    pub(super) fn new<'e>(
        name: &str,
        argv: &[impl AsRef<[u8]>],
        env: impl IntoIterator<Item = (&'e str, &'e str)>,
    ) -> io::Result<Program> {
        let mut strings = Vec::new();
        let mut pointer = |s: CString| {
            let p = s.as_ptr();
            strings.push(s);
            p
        };
        let mut args = Vec::with_capacity(argv.len() + 1);
        for arg in argv {
            args.push(pointer(c_string(arg)?));
        }
        args.push(std::ptr::null());
        let sh_argv = [pointer(c_string("/bin/sh")?), std::ptr::null()]
            .into_iter()
            .chain(args[1..].iter().copied())
            .map(Cell::new)
            .collect();
        let mut envp = Vec::new();
        let mut path = None;
        for (key, value) in env {
            if key == "PATH" {
                path = Some(value.to_string());
            }
            envp.push(pointer(c_string(format!("{key}={value}"))?));
        }
        envp.push(std::ptr::null());
        // The search `execvp` would make with the child's PATH.
        let programs = if name.contains('/') {
            vec![c_string(name)?]
        } else {
            path.as_deref()
                .unwrap_or("/bin:/usr/bin")
                .split(':')
                .map(|dir| {
                    let dir = if dir.is_empty() { "." } else { dir };
                    c_string(format!("{}/{name}", dir.trim_end_matches('/')))
                })
                .collect::<io::Result<_>>()?
        };
        Ok(Program {
            programs,
            argv: args,
            sh_argv,
            envp,
            _strings: strings,
        })
    }

    /// Exec it; returns only on failure, with the errno, as `execvp`: go
    /// on past paths that don't exist, remember that one was not
    /// permitted, stop at any other failure.
    ///
    /// # Safety
    /// System calls on prepared data only; callable between clone and exec.
    pub(super) unsafe fn exec(&self) -> c_int {
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        let mut result = libc::ENOENT;
        // SAFETY: execve on prepared, NUL-terminated arrays.
        unsafe {
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
        }
        result
    }
}

/// How the child starts our init (this binary's `__init` mode) as pid 1 of
/// a new PID namespace, with the program to run as its arguments.
struct InitLaunch {
    /// This binary, opened once.
    exe: RawFd,
    argv: Vec<*const c_char>,
    envp: [*const c_char; 1],
    /// What the init finds as fds 3 to 7 (-1: closed); see
    /// [`super::init`].
    fds: [RawFd; 5],
    /// `clone` makes a user namespace too (an unprivileged server).
    user_namespace: bool,
    /// Our ends: where the program's exec failure and its exit status
    /// come back; and their write ends, dropped after the clone.
    exec_error: OwnedFd,
    status: OwnedFd,
    /// The write ends of those pipes, and the environment's file.
    _write_ends: [OwnedFd; 3],
}

/// The program's environment as `K=V` records, each ending in NUL, in an
/// anonymous file for the init to read: in its arguments, every user of
/// the machine could read it in `ps`.
fn env_file(env: &BTreeMap<String, String>) -> io::Result<OwnedFd> {
    // SAFETY: a fresh anonymous file, owned here.
    let fd = unsafe { libc::memfd_create(c"exec-server-env".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut records = Vec::new();
    for (key, value) in env {
        records.extend_from_slice(key.as_bytes());
        records.push(b'=');
        records.extend_from_slice(value.as_bytes());
        records.push(0);
    }
    use std::io::{Seek, Write};
    let mut file = file;
    file.write_all(&records)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// This binary, for the child to exec as the sandbox's init.
fn own_exe() -> io::Result<RawFd> {
    static EXE: std::sync::OnceLock<Result<OwnedFd, i32>> = std::sync::OnceLock::new();
    let fd = EXE.get_or_init(|| {
        // SAFETY: opens a fresh fd, owned by the static.
        let fd = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::ENOENT))
        } else {
            // SAFETY: see above.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    });
    match fd {
        Ok(fd) => Ok(std::os::fd::AsRawFd::as_raw_fd(fd)),
        Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
    }
}

/// A C string for the child; a NUL inside is `EINVAL`, as `execve` would
/// have it.
fn c_string(text: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(text.as_ref()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Start the program; returns once it has called `execve` (or failed to).
pub fn spawn(exec: &Exec<'_>) -> io::Result<Child> {
    let mut plan = plan(exec)?;
    let stack = Stack::new()?;
    let mut flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD;
    if let Some(init) = &plan.init {
        flags |= libc::CLONE_NEWPID;
        if init.user_namespace {
            flags |= libc::CLONE_NEWUSER;
        }
    }
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
        // Made straight inside its cgroup when the kernel can (then the
        // child has no move to make), else moved by the child.
        let mut made = None;
        if let Some(cgroup) = plan.container.cgroup_dir {
            plan.container.cgroup_procs = None;
            made = clone_into_cgroup(&plan, &stack, flags, cgroup, &mut pidfd);
            if made.is_none() {
                plan.container.cgroup_procs = exec.container.cgroup_procs;
            }
        }
        let (pid, clone_error) = match made {
            Some(pid) => (pid, io::Error::from_raw_os_error(0)),
            None => {
                let pid = libc::clone(
                    child_main,
                    stack.top(),
                    flags,
                    (&raw const plan).cast_mut().cast::<c_void>(),
                    &mut pidfd as *mut c_int,
                );
                (pid, io::Error::last_os_error())
            }
        };
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid == -1 {
            return Err(clone_error);
        }
        pid
    };
    drop(stack);
    // SAFETY: CLONE_PIDFD stored a fresh close-on-exec fd for the child.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // A child that failed, for whatever reason, is killed (if it still
    // runs), reaped, and withdrawn from the watchdog it registered with:
    // else the watchdog would kill, when the server ends, whatever
    // process has its pid by then.
    let registered = plan.container.watchdog.filter(|_| plan.init.is_none());
    let fail = |err: io::Error| {
        let mut wait_status = 0;
        // SAFETY: our own, unreaped child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut wait_status, 0);
        }
        if let Some(fd) = registered {
            super::watchdog::withdraw(fd, pid);
        }
        err
    };
    let errno = plan.errno.load(Ordering::Acquire);
    if errno != 0 {
        // The child has exited (that is what resumed us).
        return Err(fail(io::Error::from_raw_os_error(errno)));
    }
    let mut status = None;
    if let Some(init) = plan.init.take() {
        let InitLaunch {
            exec_error,
            status: status_end,
            _write_ends,
            ..
        } = init;
        // Only the init and the program hold the write ends now: the
        // exec-error pipe ends (EOF) when the program has exec'd, or
        // carries the errno of its failure.
        drop(_write_ends);
        let mut errno = [0u8; 4];
        // SAFETY: a blocking read into a valid buffer.
        let n = loop {
            let n = unsafe { libc::read(exec_error.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n == 4 {
            // The init exits once its program has.
            return Err(fail(io::Error::from_raw_os_error(i32::from_le_bytes(
                errno,
            ))));
        }
        set_nonblocking(status_end.as_raw_fd()).map_err(fail)?;
        // SAFETY: the OwnedFd moves into the AsyncFd.
        status = Some(unsafe { AsyncFd::register(status_end) }.map_err(|e| fail(e.into()))?);
    }
    // SAFETY: the OwnedFd moves into the AsyncFd, so it stays open for as
    // long as it is registered.
    let pidfd = unsafe { AsyncFd::register(pidfd) }.map_err(|e| fail(e.into()))?;
    Ok(Child {
        pid,
        pidfd,
        status,
        reaped: false,
    })
}

/// `clone3`'s arguments (`struct clone_args`, as of Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (not in every libc yet).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Whether `clone3` with `CLONE_INTO_CGROUP` works here; cleared for good
/// the first time the kernel (or a seccomp policy around the server)
/// refuses it.
static CLONE3_INTO_CGROUP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Start the child with `clone3` straight inside `cgroup`: its pid, or
/// `None` when this way did not work (then the caller uses `clone`, and
/// the child moves itself).
///
/// # Safety
/// As for `clone` in [`spawn`]: signals blocked, the plan and the stack
/// outliving the child's use of them (`CLONE_VFORK`).
#[cfg(target_arch = "x86_64")]
unsafe fn clone_into_cgroup(
    plan: &Plan<'_>,
    stack: &Stack,
    flags: c_int,
    cgroup: RawFd,
    pidfd: &mut c_int,
) -> Option<c_int> {
    if !CLONE3_INTO_CGROUP.load(Ordering::Relaxed) {
        return None;
    }
    let exit_signal = (flags & 0xff) as u64;
    let (low, size) = stack.usable();
    let mut args = CloneArgs {
        flags: (flags as u32 as u64 & !0xff) | CLONE_INTO_CGROUP,
        pidfd: (pidfd as *mut c_int) as u64,
        exit_signal,
        stack: low as u64,
        stack_size: size as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    let arg = (plan as *const Plan<'_>).cast_mut().cast::<c_void>();
    let ret: libc::c_long;
    // SAFETY: the child starts on its own stack and only calls
    // `child_main`, then exits with what it returns; the parent's
    // registers are as the syscall left them.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &raw mut args,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") child_main as extern "C" fn(*mut c_void) -> c_int,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret >= 0 {
        return Some(ret as c_int);
    }
    // Refused: this start goes the old way (which reports any real
    // error), and when the kernel or a policy does not offer the call at
    // all, every later one too.
    let errno = -ret as i32;
    if matches!(
        errno,
        libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP
    ) {
        CLONE3_INTO_CGROUP.store(false, Ordering::Relaxed);
        tracing::debug!(
            "clone3 into a cgroup is not available here (errno {errno}); moving children instead"
        );
    }
    None
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone_into_cgroup(
    _: &Plan<'_>,
    _: &Stack,
    _: c_int,
    _: RawFd,
    _: &mut c_int,
) -> Option<c_int> {
    None
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags == -1 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn plan<'a>(exec: &Exec<'a>) -> io::Result<Plan<'a>> {
    let program = &exec.argv[0];
    let mut strings = Vec::new();
    let argv: Vec<&str> = std::iter::once(exec.arg0.unwrap_or(program))
        .chain(exec.argv[1..].iter().map(String::as_str))
        .collect();
    let env = exec.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    use std::os::unix::ffi::OsStrExt;
    let cwd = c_string(exec.cwd.as_os_str().as_bytes())?;
    let init = match exec.sandbox {
        Some(sandbox) => {
            // The init's arguments: its mode, flags, the program to look
            // for, the program's argv (as it should see it), then its
            // environment: the init itself runs with none, so that nothing
            // of the command's (LD_PRELOAD, ...) runs before confinement.
            let (ruleset, listener, net) = sandbox.for_init();
            let mut args = vec![
                c_string("exec-server-init")?,
                c_string(super::init::ARG)?,
                c_string(super::init::flags(
                    net,
                    exec.controlling_tty,
                    listener.is_some(),
                ))?,
                c_string(program)?,
                c_string(exec.argv.len().to_string())?,
                c_string(exec.arg0.unwrap_or(program))?,
            ];
            for arg in &exec.argv[1..] {
                args.push(c_string(arg)?);
            }
            let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
            argv.push(std::ptr::null());
            strings.extend(args);
            let (exec_error, exec_error_w) = pipe()?;
            let (status, status_w) = pipe()?;
            let env_file = env_file(exec.env)?;
            Some(InitLaunch {
                exe: own_exe()?,
                argv,
                envp: [std::ptr::null()],
                fds: [
                    ruleset,
                    listener.unwrap_or(-1),
                    exec_error_w.as_raw_fd(),
                    status_w.as_raw_fd(),
                    env_file.as_raw_fd(),
                ],
                user_namespace: crate::sandbox::needs_user_namespace(),
                exec_error,
                status,
                _write_ends: [exec_error_w, status_w, env_file],
            })
        }
        None => None,
    };
    Ok(Plan {
        program: Program::new(program, &argv, env)?,
        cwd,
        stdio: exec.stdio,
        controlling_tty: exec.controlling_tty,
        container: exec.container,
        sandbox: exec.sandbox,
        init,
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
            // The descriptor limit the server was started with, not the
            // one it raised for itself.
            crate::sys::restore_child_nofile();
            // Under our init, the program takes the terminal, not the init.
            if self.controlling_tty
                && self.init.is_none()
                && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1
            {
                return errno();
            }
            if libc::chdir(self.cwd.as_ptr()) == -1 {
                return errno();
            }
            // Into the container before anything else can run: whatever
            // the program starts is born inside it (and inside the v1
            // groups of its limits, on a hybrid host).
            for fd in self.container.legacy_procs.into_iter().flatten() {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return errno();
                }
            }
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
            // Pid 1 of a new PID namespace has no pid of its own to give
            // the watchdog; the server registers it.
            if let (Some(fd), None) = (self.container.watchdog, &self.init) {
                if let Err(err) = super::watchdog::register_self(fd) {
                    return err.raw_os_error().unwrap_or(libc::EPIPE);
                }
            }
            if let (Some(sandbox), Some(init)) = (self.sandbox, &self.init) {
                if let Err(err) = sandbox.enter_namespaces(init.user_namespace) {
                    return err.raw_os_error().unwrap_or(libc::EPERM);
                }
                // In its own user namespace, RLIMIT_NPROC counts the
                // processes of this tree alone (the init's too).
                if let (Some(n), true) = (self.container.nproc, init.user_namespace) {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NPROC, &limit) == -1 {
                        return errno();
                    }
                }
                return init.exec();
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
            self.program.exec()
        }
    }
}

impl InitLaunch {
    /// In the child: put the init's fds in place (3 to 7), everything else
    /// close-on-exec, and exec the init with default signal handling.
    /// Returns only on failure, with the errno.
    ///
    /// # Safety
    /// Only in the child of `spawn`: system calls on prepared data.
    unsafe fn exec(&self) -> c_int {
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // SAFETY: plain system calls on prepared data.
        unsafe {
            // Out of the way first, so that no source is overwritten by
            // another's target.
            let mut high = [-1; 5];
            for (i, &fd) in self.fds.iter().enumerate() {
                if fd >= 0 {
                    high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
                    if high[i] < 0 {
                        return errno();
                    }
                }
            }
            for (i, &fd) in high.iter().enumerate() {
                let target = 3 + i as c_int;
                if fd < 0 {
                    libc::close(target);
                } else if libc::dup2(fd, target) < 0 {
                    return errno();
                }
            }
            if libc::syscall(
                libc::SYS_close_range,
                8u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) == -1
            {
                return errno();
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::syscall(
                libc::SYS_execveat,
                self.exe,
                c"".as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            errno()
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

    /// The usable part (above the guard page): its lowest address and
    /// size, as `clone3` takes them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn usable(&self) -> (*mut c_void, usize) {
        let page = self.len - STACK_BYTES;
        // SAFETY: within our mapping.
        (
            unsafe { self.base.cast::<u8>().add(page).cast() },
            STACK_BYTES,
        )
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
/// system call, so the child of `spawn` can call it too.
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
