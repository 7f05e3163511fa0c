//! Starting a child: in its own session and process group, with pipes or
//! under a new pseudo-terminal.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use crate::error::{Error, lower_io};
use crate::protocol::TtySize;

/// What to start.
pub struct Spec<'a> {
    pub argv: &'a [String],
    pub arg0: Option<&'a str>,
    pub cwd: &'a Path,
    pub env: &'a BTreeMap<String, String>,
    /// `Some` to run under a new pseudo-terminal of that size.
    pub tty: Option<TtySize>,
    pub pipe_stdin: bool,
    /// The watchdog's pipe, for the child to register its group.
    pub watchdog_fd: Option<RawFd>,
    /// The sandbox the child enters before exec.
    pub sandbox: Option<std::sync::Arc<crate::sandbox::Prepared>>,
}

/// A started child and its ends of the I/O.
pub struct Spawned {
    pub child: Child,
    pub pid: i32,
    pub io: Io,
}

pub enum Io {
    Pipes {
        stdin: Option<ChildStdin>,
        stdout: ChildStdout,
        stderr: ChildStderr,
    },
    Pty(std::sync::Arc<PtyMaster>),
}

/// Start the child described by `spec`.
pub fn spawn(spec: &Spec<'_>) -> Result<Spawned, Error> {
    check_cwd(spec.cwd)?;
    let program = &spec.argv[0];
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .current_dir(spec.cwd)
        .env_clear()
        .envs(spec.env)
        .kill_on_drop(false);
    if let Some(arg0) = spec.arg0 {
        cmd.arg0(arg0);
    }
    let mut pty = None;
    match spec.tty {
        Some(size) => {
            let (master, slave) =
                open_pty(size).map_err(|e| Error::io("failed to open a pty", &e))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| Error::io("failed to dup the pty", &e))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            pty = Some(master);
        }
        None => {
            cmd.stdin(if spec.pipe_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
    }
    let tty = spec.tty.is_some();
    let watchdog_fd = spec.watchdog_fd;
    let sandbox = spec.sandbox.clone();
    // SAFETY: the closure makes only async-signal-safe calls (the sandbox
    // is entered with system calls on data prepared before the fork).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = watchdog_fd {
                super::watchdog::register_self(fd);
            }
            if let Some(sandbox) = &sandbox {
                sandbox.enter()?;
            }
            Ok(())
        });
    }
    let within = if spec.sandbox.is_some() {
        " in the sandbox"
    } else {
        ""
    };
    let mut child = cmd.spawn().map_err(|err| Error::SpawnFailed {
        message: format!("failed to start {program}{within}: {}", lower_io(&err)),
        errno: err.raw_os_error(),
    })?;
    // The command holds the parent's copies of the pty slave; drop them so
    // that the master sees EOF once the child's side is gone.
    drop(cmd);
    let pid = child.id().map(|id| id as i32).unwrap_or(0);
    let io = match pty {
        Some(master) => Io::Pty(std::sync::Arc::new(
            PtyMaster::new(master).map_err(|e| Error::io("failed to watch the pty", &e))?,
        )),
        None => {
            let stdout = child.stdout.take().expect("stdout is piped");
            let stderr = child.stderr.take().expect("stderr is piped");
            grow_pipe(stdout.as_raw_fd());
            grow_pipe(stderr.as_raw_fd());
            Io::Pipes {
                stdin: child.stdin.take(),
                stdout,
                stderr,
            }
        }
    };
    Ok(Spawned { child, pid, io })
}

/// Ask for a 1 MiB pipe buffer (the default is 64 KiB), so a fast writer
/// blocks less often and the server reads larger chunks. Best effort: an
/// unprivileged user over its pipe quota keeps the default.
fn grow_pipe(fd: RawFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES) };
}

const PIPE_BYTES: libc::c_int = 1024 * 1024;

fn check_cwd(cwd: &Path) -> Result<(), Error> {
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::SpawnFailed {
            message: format!("cwd {} is not a directory", cwd.display()),
            errno: Some(libc::ENOTDIR),
        }),
        Err(err) => Err(Error::SpawnFailed {
            message: format!("cwd {}: {}", cwd.display(), lower_io(&err)),
            errno: err.raw_os_error(),
        }),
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl on an fd we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Open a pty pair of the given size: (master, slave), both close-on-exec.
fn open_pty(size: TtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    let ws = winsize(size);
    // SAFETY: openpty writes two fds; the name and termios pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty returned two fresh fds that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_cloexec(master.as_raw_fd())?;
    set_cloexec(slave.as_raw_fd())?;
    Ok((master, slave))
}

/// The server's side of a pseudo-terminal, readable and writable without
/// blocking a thread.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: plain fcntl calls on an fd we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags == -1
                || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == -1
            {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, so it stays open for
        // as long as it is registered.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(PtyMaster { fd })
    }

    /// Read what the terminal printed into `buf`'s spare capacity; `Ok(0)`
    /// once every slave end is closed (Linux reports that as EIO).
    pub async fn read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| {
                let spare = buf.spare_capacity_mut();
                // SAFETY: reads into the vector's unused capacity, at most
                // its length.
                let n =
                    unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: the kernel initialised the first n bytes.
                unsafe { buf.set_len(buf.len() + n as usize) };
                Ok(n as usize)
            });
            match result {
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Write all of `data` to the terminal's input.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: writes from a valid buffer.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Set the terminal size; the kernel sends SIGWINCH to its foreground group.
    pub fn resize(&self, size: TtySize) -> io::Result<()> {
        let ws = winsize(size);
        // SAFETY: TIOCSWINSZ reads a valid winsize.
        if unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The terminal's end-of-file character (usually Ctrl-D).
    pub fn eof_char(&self) -> u8 {
        // SAFETY: tcgetattr fills a zeroed termios.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(self.fd.get_ref().as_raw_fd(), &mut t) == 0 {
                t.c_cc[libc::VEOF]
            } else {
                4
            }
        }
    }
}
