//! Starting a child: in its own session and process group, with pipes or
//! under a new pseudo-terminal.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use super::exec::{self, Child, Exec};

use crate::error::{Error, os_text};
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
    /// What the child does for its container.
    pub container: super::container::ChildSetup,
    /// The sandbox the child enters before exec.
    pub sandbox: Option<std::sync::Arc<crate::sandbox::Prepared>>,
}

/// A started child and its ends of the I/O.
pub struct Spawned {
    pub child: Child,
    pub io: Io,
}

pub enum Io {
    Pipes {
        stdin: Option<pipe::Sender>,
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
    },
    Pty(std::sync::Arc<PtyMaster>),
}

impl Io {
    /// The server's ends of the child's output: the pipes it reads, or the
    /// pty master.
    pub fn output_fds(&self) -> Vec<RawFd> {
        match self {
            Io::Pipes { stdout, stderr, .. } => vec![stdout.as_raw_fd(), stderr.as_raw_fd()],
            Io::Pty(master) => vec![master.fd.get_ref().as_raw_fd()],
        }
    }
}

/// Start the child described by `spec`: in a session of its own (so its
/// process group can be signalled and killed as a whole), registered with
/// the watchdog and inside its sandbox before it execs.
pub fn spawn(spec: &Spec<'_>) -> Result<Spawned, Error> {
    check_cwd(spec.cwd)?;
    let program = &spec.argv[0];
    let within = if spec.sandbox.is_some() {
        " in the sandbox"
    } else {
        ""
    };
    let failed = |err: io::Error| {
        // execve says EACCES for a directory; say what a shell says (the
        // errno stays the kernel's).
        let text = if err.raw_os_error() == Some(libc::EACCES)
            && program.contains('/')
            && spec.cwd.join(program).is_dir()
        {
            os_text(&io::Error::from_raw_os_error(libc::EISDIR))
        } else {
            os_text(&err)
        };
        Error::SpawnFailed {
            message: format!("failed to start {program}{within}: {text}"),
            errno: err.raw_os_error(),
        }
    };
    // The child's ends are held here until it has exec'd, then dropped, so
    // that only the child keeps them open; `stdio` is what becomes its fds
    // 0, 1 and 2.
    let (child_ends, stdio, ours) = match spec.tty {
        Some(size) => {
            let (master, slave) =
                open_pty(size).map_err(|e| Error::io("failed to open a pty", &e))?;
            let fd = slave.as_raw_fd();
            if let Some(sandbox) = &spec.sandbox {
                let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                    .map_err(|e| Error::io("failed to name the pty", &e))?;
                sandbox.own_terminal(&path)?;
            }
            (vec![slave], [fd; 3], Ours::Pty(master))
        }
        None => {
            let (stdin_child, stdin_ours) = if spec.pipe_stdin {
                let (read, write) = exec::pipe().map_err(failed)?;
                (read, Some(write))
            } else {
                (exec::dev_null().map_err(failed)?, None)
            };
            let (stdout_ours, stdout_child) = exec::pipe().map_err(failed)?;
            let (stderr_ours, stderr_child) = exec::pipe().map_err(failed)?;
            grow_pipe(stdout_ours.as_raw_fd());
            grow_pipe(stderr_ours.as_raw_fd());
            let stdio = [&stdin_child, &stdout_child, &stderr_child].map(AsRawFd::as_raw_fd);
            (
                vec![stdin_child, stdout_child, stderr_child],
                stdio,
                Ours::Pipes(stdin_ours, stdout_ours, stderr_ours),
            )
        }
    };
    let child = exec::spawn(&Exec {
        argv: spec.argv,
        arg0: spec.arg0,
        cwd: spec.cwd,
        env: spec.env,
        stdio,
        controlling_tty: spec.tty.is_some(),
        container: spec.container,
        sandbox: spec.sandbox.as_deref(),
    })
    .map_err(failed)?;
    drop(child_ends);
    let io = match ours {
        Ours::Pty(master) => Io::Pty(std::sync::Arc::new(
            PtyMaster::new(master).map_err(|e| Error::io("failed to watch the pty", &e))?,
        )),
        Ours::Pipes(stdin, stdout, stderr) => {
            let watch = |e: io::Error| Error::io("failed to watch the child's pipes", &e);
            Io::Pipes {
                stdin: stdin
                    .map(pipe::Sender::from_owned_fd)
                    .transpose()
                    .map_err(watch)?,
                stdout: pipe::Receiver::from_owned_fd(stdout).map_err(watch)?,
                stderr: pipe::Receiver::from_owned_fd(stderr).map_err(watch)?,
            }
        }
    };
    Ok(Spawned { child, io })
}

/// The server's ends of the child's I/O, before they are watched.
enum Ours {
    Pipes(Option<OwnedFd>, OwnedFd, OwnedFd),
    Pty(OwnedFd),
}

/// How many bytes to read from `fd` at once: what is waiting there
/// (`FIONREAD`), at least 1 (a read of 0 bytes can't see the end of the
/// input) and at most `max`. Each chunk is allocated at the size it will
/// have, so the retention log holds no slack and a quiet stream holds no
/// buffer at all between reads.
pub fn available(fd: RawFd, max: usize) -> usize {
    let mut waiting: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut waiting) } == -1 {
        return max;
    }
    (waiting.max(1) as usize).min(max)
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
            message: format!("cwd {}: {}", cwd.display(), os_text(&err)),
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

    /// What the terminal printed, up to `max` bytes (see [`available`]);
    /// empty once every slave end is closed (Linux reports that as EIO).
    pub async fn read_chunk(&self, max: usize) -> io::Result<Vec<u8>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = Vec::with_capacity(available(self.fd.as_raw_fd(), max));
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
                unsafe { buf.set_len(n as usize) };
                Ok(())
            });
            match result {
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(Vec::new()),
                Ok(result) => return result.map(|()| buf),
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
