//! The Unix-socket transport: newline-delimited like stdio, one connection
//! per accepted peer, each read and written on threads of its own with the
//! same framer and writer as stdio.
//!
//! The socket is made with mode 0600; a peer of another uid is refused
//! unless the server runs as root; a socket file left by a server that is
//! gone is replaced, one something still listens on is not.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use super::stdio::{read_frames, write_lines};
use super::{OUTBOUND_CAPACITY, Outbound, Transport};
use crate::jsonrpc::encode_line;

/// A bound listener, and its path (removed when this is dropped).
pub struct Listener {
    pub listener: tokio::net::UnixListener,
    pub path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind `path` for this user only.
pub fn bind(path: &Path) -> io::Result<Listener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a server already listens on {}", path.display()),
                ));
            }
            // Nothing answers: a socket left by a server that is gone.
            std::fs::remove_file(path)?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    // Owner only, from the start: no other user can connect between the
    // bind and a chmod. This runs before the server serves anything.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: see above.
    unsafe { libc::umask(old) };
    let listener = bound?;
    listener.set_nonblocking(true)?;
    Ok(Listener {
        listener: tokio::net::UnixListener::from_std(listener)?,
        path: path.to_path_buf(),
    })
}

/// Why a peer may not use this server, if so: another uid than ours
/// (unless we are root), or a process inside a sandbox, of this server or
/// another (whatever reached the socket: its path is masked in their
/// namespaces).
pub fn refuse_peer(stream: &tokio::net::UnixStream) -> Option<String> {
    use std::os::fd::AsFd;
    let cred = match super::peer::unix_peer(stream.as_fd()) {
        Ok(cred) => cred,
        Err(err) => return Some(format!("its credentials could not be read: {err}")),
    };
    // SAFETY: getter without failure modes.
    let ours = unsafe { libc::geteuid() };
    if ours != 0 && cred.uid != ours {
        return Some(format!("uid {} is not the server's ({ours})", cred.uid));
    }
    if cred.pid > 0 && super::peer::in_a_sandbox(cred.pid) {
        return Some(format!("pid {} runs inside a sandbox", cred.pid));
    }
    None
}

/// The transport of one accepted connection.
pub fn start(stream: tokio::net::UnixStream, max_message_bytes: usize) -> io::Result<Transport> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    let reader = stream.try_clone()?;
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    std::thread::Builder::new()
        .name("unix-reader".into())
        .spawn(move || {
            if let Err(err) = read_frames(&reader, max_message_bytes, |frame| {
                in_tx.blocking_send(frame).is_ok()
            }) {
                tracing::debug!("reading a unix connection failed: {err}");
            }
            // The connection is over: let a writer stuck on a peer that
            // stopped reading go too.
            let _ = reader.shutdown(std::net::Shutdown::Both);
        })?;
    std::thread::Builder::new()
        .name("unix-writer".into())
        .spawn(move || {
            if let Err(err) = write_lines(&stream, out_rx) {
                tracing::debug!("writing a unix connection failed: {err}");
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(Transport {
        incoming: in_rx,
        outgoing: Outbound::new(out_tx, encode_line),
    })
}
