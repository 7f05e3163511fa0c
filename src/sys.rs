//! Small fd and socket helpers shared by `process/` and `sandbox/`: a
//! seqpacket socket pair and passing fds over it (SCM_RIGHTS).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The argument that makes this binary a sandbox's init; every sandboxed
/// process descends from one (how a peer is known to be sandboxed).
pub const SANDBOX_INIT_ARG: &str = "__init";

/// The most fds one message carries.
pub const MAX_FDS: usize = 8;

/// A connected pair of close-on-exec Unix seqpacket sockets, for passing
/// fds between processes (a seccomp listener, an opened file, the ends of
/// a child's I/O for the watchdog to hold).
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh fds, owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The control buffer of a message: room for [`MAX_FDS`] fds.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Send `data` (not empty) with `fds` (at most [`MAX_FDS`]) as one
/// message. No allocation: usable between `clone` and `exec`.
pub fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = Control([0; 64]);
    let bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: a zeroed msghdr is valid; its pointers go to locals that
    // outlive the call, and CMSG_SPACE of at most 8 fds fits `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<i32>();
            for (i, &fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd);
            }
        }
        if libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receive one message into `buf`, with the fds it carries (close-on-exec).
/// `Ok((0, _))` when the peer is gone.
pub fn recv_with_fds(
    socket: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control([0; 64]);
    let mut fds = Vec::new();
    // SAFETY: the kernel fills at most the buffers given; received fds are
    // fresh and owned here.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len();
        let n = libc::recvmsg(socket, &mut msg, flags | libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<i32>();
                let data = libc::CMSG_DATA(cmsg).cast::<i32>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, fds))
    }
}

/// Send one fd (SCM_RIGHTS) with a one-byte message.
pub fn send_fd(socket: RawFd, fd: RawFd) -> io::Result<()> {
    send_with_fds(socket, &[0], &[fd])
}

/// Receive one fd sent by [`send_fd`], without waiting.
pub fn recv_fd(socket: RawFd) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    recv_with_fds(socket, &mut byte, libc::MSG_DONTWAIT)
        .ok()?
        .1
        .pop()
}

/// The soft `RLIMIT_NOFILE` the server was started with, given back to
/// every child (0: never raised).
static CHILD_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raise this process's soft `RLIMIT_NOFILE` to its hard limit (a server
/// with many connections and processes needs descriptors; a flood must
/// not starve it at 1,024); children get the old soft limit back
/// ([`restore_child_nofile`]), as programs that use `select` expect.
/// Returns the limit now in force.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let old = limit.rlim_cur;
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                CHILD_NOFILE.store(old, std::sync::atomic::Ordering::Relaxed);
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

/// The soft `RLIMIT_NOFILE` in force now.
pub fn nofile_limit() -> u64 {
    // SAFETY: getrlimit on a struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        limit.rlim_cur
    }
}

/// In a child between clone and exec: the soft `RLIMIT_NOFILE` the server
/// was started with. System calls only.
pub fn restore_child_nofile() {
    let old = CHILD_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
    if old == 0 {
        return;
    }
    // SAFETY: getrlimit/setrlimit on a struct on the stack.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = old.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Have the allocator give large blocks back to the system when they are
/// freed. glibc's malloc serves a block of 128 KiB or more with `mmap`,
/// but raises that threshold to the size of each such block freed, so
/// that after a burst of big messages (a client's 8 MiB writes) later ones
/// come from the heap, which is kept: the server stayed near its peak
/// after the burst was done. A fixed threshold keeps every block of 2 MiB
/// or more mapped on its own (and unmapped when freed): above the output
/// chunks (at most 1 MiB, read from a pipe at full speed from the heap),
/// below the messages a client can make big. A trim threshold gives back a
/// free heap top.
pub fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 * 1024 * 1024);
    }
}

/// Whether an error is the descriptor table (or the system's) being full.
pub fn out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One descriptor held back (`/dev/null`) for the operations that must
/// not fail at the descriptor limit: killing a container, looking for
/// what to kill. [`reserve_spare_descriptor`] takes it at start.
static SPARE: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// Hold the spare descriptor (again).
pub fn reserve_spare_descriptor() {
    let mut spare = crate::sync::lock(&SPARE);
    if spare.is_none() {
        *spare = std::fs::File::open("/dev/null").ok();
    }
}

/// Run `op`; when it fails for want of a descriptor, again with the spare
/// let go, then a few more times while others come back (20 ms apart, up
/// to about 200 ms). Killing must work exactly when a client has used up
/// every descriptor.
pub fn at_descriptor_limit<T>(mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut result = op();
    for attempt in 0..10 {
        match &result {
            Err(err) if out_of_descriptors(err) => {}
            _ => break,
        }
        if attempt == 0 {
            let mut spare = crate::sync::lock(&SPARE);
            if spare.take().is_some() {
                result = op();
                drop(spare);
                reserve_spare_descriptor();
                continue;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        result = op();
    }
    result
}

/// Every process's parent, from `/proc`.
pub fn parents() -> std::io::Result<Vec<(i32, i32)>> {
    // Out of descriptors (or memory) is a failure of the walk, never a
    // process taken for gone: the callers kill or judge by this list.
    let exhausted =
        |e: &std::io::Error| out_of_descriptors(e) || e.raw_os_error() == Some(libc::ENOMEM);
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = match std::fs::read_to_string(entry.path().join("stat")) {
            Ok(stat) => stat,
            Err(e) if exhausted(&e) => return Err(e),
            // Gone since the directory was read.
            Err(_) => continue,
        };
        // The command name may hold anything but ends at the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let Some(ppid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if state != Some("Z") && state != Some("X") {
            all.push((pid, ppid));
        }
    }
    Ok(all)
}

/// The live processes in the trees rooted at `roots`, roots included.
pub fn trees(roots: &[i32], parents: &[(i32, i32)]) -> Vec<i32> {
    let alive: std::collections::HashSet<i32> = parents.iter().map(|&(p, _)| p).collect();
    let mut found: Vec<i32> = roots
        .iter()
        .copied()
        .filter(|p| alive.contains(p))
        .collect();
    let mut seen: std::collections::HashSet<i32> = found.iter().copied().collect();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for &(pid, ppid) in parents {
            if ppid == parent && seen.insert(pid) {
                found.push(pid);
            }
        }
        i += 1;
    }
    found
}

/// Now as RFC 3339 UTC with milliseconds (`2026-08-11T12:34:56.789Z`).
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_786_451_696, 789), "2026-08-11T12:34:56.789Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
    }
    use std::os::fd::AsRawFd;

    #[test]
    fn fds_and_data_cross_a_socket_pair() {
        let (a, b) = socket_pair().unwrap();
        let (r, w) = crate::process::exec::pipe().unwrap();
        send_with_fds(a.as_raw_fd(), b"hold", &[r.as_raw_fd(), w.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hold");
        assert_eq!(fds.len(), 2);
        send_fd(a.as_raw_fd(), r.as_raw_fd()).unwrap();
        assert!(recv_fd(b.as_raw_fd()).is_some());
        assert!(recv_fd(b.as_raw_fd()).is_none());
        drop(a);
        assert_eq!(recv_with_fds(b.as_raw_fd(), &mut buf, 0).unwrap().0, 0);
    }
}
