//! The files the server itself writes (pid, log and lock files): never
//! opened through a link, never someone else's, never a file with other
//! names (a hard link), and a lock that is held elsewhere is an error
//! within a bound, not a hang.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// What an opened file must be: a regular file of ours with one name.
fn check_opened(file: &File, path: &Path) -> io::Result<()> {
    let meta = file.metadata()?;
    // SAFETY: getter without failure modes.
    let ours = unsafe { libc::geteuid() };
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing {}: {why}", path.display()),
        ))
    };
    if !meta.file_type().is_file() {
        return refuse("not a regular file".into());
    }
    if meta.uid() != ours {
        return refuse(format!(
            "it belongs to uid {}, not to us ({ours})",
            meta.uid()
        ));
    }
    if meta.nlink() > 1 {
        return refuse("it has other names (a hard link)".into());
    }
    Ok(())
}

/// `O_NOFOLLOW`'s refusal, said plainly.
fn explain(err: io::Error, path: &Path) -> io::Error {
    if err.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing {}: it is a symbolic link", path.display()),
        )
    } else {
        io::Error::new(err.kind(), format!("{}: {err}", path.display()))
    }
}

/// A file made anew at `path` (mode `mode`): an old regular file of ours
/// there is replaced; a link, or anything of someone else's, is refused.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // SAFETY: getter without failure modes.
        let ours = unsafe { libc::geteuid() };
        if meta.file_type().is_symlink() {
            return Err(explain(io::Error::from_raw_os_error(libc::ELOOP), path));
        }
        if !meta.file_type().is_file() || meta.uid() != ours {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refusing {}: it exists and is not a file of ours",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path).map_err(|e| explain(e, path))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| explain(e, path))
}

/// `path` opened for appending (made with mode 0600 when missing), never
/// through a link.
pub fn open_append(path: &Path) -> io::Result<File> {
    open_checked(path, OpenOptions::new().append(true))
}

/// `path` opened to be locked (made with mode 0600 when missing), never
/// through a link.
pub fn open_lock(path: &Path) -> io::Result<File> {
    open_checked(
        path,
        OpenOptions::new().read(true).write(true).truncate(false),
    )
}

/// `path` opened with `options`, made with mode 0600 when missing, never
/// through a link, and only a regular file of ours with one name.
fn open_checked(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| explain(e, path))?;
    check_opened(&file, path)?;
    Ok(file)
}

/// An exclusive `flock` on `file`, waited for at most `within`: then a
/// clear error naming the lock instead of a hang.
pub fn lock_within(file: &File, path: &Path, within: Duration) -> io::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        // SAFETY: flock on an fd we own; released when it closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) && err.kind() != io::ErrorKind::Interrupted
        {
            return Err(explain(err, path));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} is locked by another process and stayed locked for {} s \
                     (another bridge starting the daemon, or something holding it: \
                     `fuser {}` shows who)",
                    path.display(),
                    within.as_secs(),
                    path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes free for us on the filesystem holding `path`, when known.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_never_followed_or_replaced_silently() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(create_new(&link, 0o644).is_err());
        assert!(open_append(&link).is_err());
        assert!(open_lock(&link).is_err());
        let hard = dir.path().join("hard");
        std::fs::hard_link(&victim, &hard).unwrap();
        assert!(open_append(&hard).is_err());
        assert!(open_lock(&hard).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        // A plain old file of ours is replaced.
        let pid = dir.path().join("pid");
        std::fs::write(&pid, "old").unwrap();
        assert!(create_new(&pid, 0o644).is_ok());
    }

    #[test]
    fn a_held_lock_is_an_error_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = open_lock(&path).unwrap();
        lock_within(&held, &path, Duration::from_secs(1)).unwrap();
        let other = open_lock(&path).unwrap();
        let start = Instant::now();
        let err = lock_within(&other, &path, Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            err.to_string().contains("locked by another process"),
            "{err}"
        );
    }
}
