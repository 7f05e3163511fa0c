//! Who is at the other end of an accepted connection, when it is a
//! process on this host: its uid, and whether it is one of the server's
//! own sandboxed children (or the server itself, through its proxy).
//!
//! A Unix peer is known from `SO_PEERCRED`. A TCP peer on this host is
//! found in the kernel's socket table (`sock_diag`: the socket whose local
//! address is the peer's and whose remote address is ours), which gives
//! its owner's uid and inode; the processes holding that inode are then
//! looked for among the server's own descendants.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The local socket at the other end of a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPeer {
    /// The uid that owns the peer's socket.
    pub uid: u32,
    /// Its inode (0 while it waits in a listener's queue).
    pub inode: u64,
}

/// The peer's socket of the TCP connection from `peer` to `local`, when
/// the peer is a process of this host (of this network namespace);
/// `Ok(None)` when no such socket is here (a remote peer).
pub fn tcp_peer(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<TcpPeer>> {
    let (local, peer) = (canonical(local), canonical(peer));
    match sock_diag(local, peer) {
        Ok(found) => Ok(found),
        // No sock_diag here (no tcp_diag module, say): the same table as
        // text.
        Err(err) => proc_net_tcp(local, peer).map_err(|_| err),
    }
}

/// The peer's socket from `/proc/net/tcp` and `/proc/net/tcp6`.
/// `local` and `peer` as [`canonical`] makes them.
fn proc_net_tcp(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<TcpPeer>> {
    // How the kernel prints an address: each 32-bit word in host order.
    let text = |a: SocketAddr| -> String {
        let words: Vec<u32> = match a.ip() {
            IpAddr::V4(v4) => vec![u32::from_ne_bytes(v4.octets())],
            IpAddr::V6(v6) => v6
                .octets()
                .chunks(4)
                .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        let ip: String = words.iter().map(|w| format!("{w:08X}")).collect();
        format!("{ip}:{:04X}", a.port())
    };
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    // An IPv4 peer may hold an IPv6 socket with mapped addresses.
    let mut tables = vec![(
        match peer.ip() {
            IpAddr::V4(_) => "/proc/net/tcp",
            IpAddr::V6(_) => "/proc/net/tcp6",
        },
        text(peer),
        text(local),
    )];
    if peer.is_ipv4() {
        tables.push(("/proc/net/tcp6", text(mapped(peer)), text(mapped(local))));
    }
    for (file, want_local, want_remote) in tables {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[1] == want_local && fields[2] == want_remote {
                let uid = fields[7].parse().unwrap_or(u32::MAX);
                let inode = fields[9].parse().unwrap_or(0);
                return Ok(Some(TcpPeer { uid, inode }));
            }
        }
    }
    Ok(None)
}

/// The peer's socket from the kernel's socket table (`sock_diag`).
/// `local` and `peer` as [`canonical`] makes them.
fn sock_diag(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<TcpPeer>> {
    let family = match (local.ip(), peer.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
        // One of each never meets on one socket.
        _ => return Ok(None),
    };
    // SAFETY: a netlink socket, owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just made, ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = [0u8; 16 + 56];
    let len = request.len() as u32;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // inet_diag_req_v2
    let body = &mut request[16..];
    body[0] = family as u8;
    body[1] = libc::IPPROTO_TCP as u8;
    body[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: the peer's socket has the peer's address as its
    // source and ours as its destination.
    let id = &mut body[8..];
    id[0..2].copy_from_slice(&peer.port().to_be_bytes());
    id[2..4].copy_from_slice(&local.port().to_be_bytes());
    id[4..20].copy_from_slice(&address_bytes(peer.ip()));
    id[20..36].copy_from_slice(&address_bytes(local.ip()));
    id[40..48].copy_from_slice(&[0xff; 8]);
    // SAFETY: a buffer of the length given.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut answer = [0u8; 512];
    // SAFETY: a buffer of the length given.
    let got = unsafe { libc::recv(fd.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let answer = &answer[..got as usize];
    if answer.len() < 16 {
        return Err(io::Error::other("short sock_diag answer"));
    }
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = i32::from_ne_bytes(answer[16..20].try_into().unwrap_or_default());
        return match -errno {
            libc::ENOENT => Ok(None),
            0 => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    // inet_diag_msg: family, state, timer, retrans, sockid (48), expires,
    // rqueue, wqueue, uid, inode.
    let msg = &answer[16..];
    if msg.len() < 72 {
        return Err(io::Error::other("short inet_diag_msg"));
    }
    let uid = u32::from_ne_bytes(msg[64..68].try_into().unwrap_or_default());
    let inode = u32::from_ne_bytes(msg[68..72].try_into().unwrap_or_default());
    Ok(Some(TcpPeer {
        uid,
        inode: u64::from(inode),
    }))
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// An IPv4-mapped address as the IPv4 one (the kernel's table keys an
/// IPv4 connection by its IPv4 addresses).
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// An address as `inet_diag_sockid` holds it (16 bytes, network order).
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// Why a peer holding the socket `inode` (owned by `uid`) may not use the
/// server, if so: the socket is held by the server itself (something it
/// dialed for a child: the proxy) or by a process inside a sandbox (of
/// this server or of any other exec-server). The server's own
/// descendants are looked at first, then every process of the socket's
/// owner.
pub fn refuse_holder(inode: u64, uid: u32) -> Option<String> {
    if inode == 0 {
        return None;
    }
    let own = std::process::id() as i32;
    let needle = format!("socket:[{inode}]");
    let parents = match crate::sys::parents() {
        Ok(parents) => parents,
        Err(err) => return Some(format!("its processes could not be looked at: {err}")),
    };
    let mine = crate::sys::trees(&[own], &parents);
    let judge = |pid: i32| -> Option<String> {
        if pid == own {
            return Some("the server itself dialed it (for a child)".into());
        }
        in_a_sandbox(pid).then(|| format!("pid {pid} runs inside a sandbox"))
    };
    let mut found = false;
    for &pid in &mine {
        if holds(pid, &needle) {
            found = true;
            if let Some(why) = judge(pid) {
                return Some(why);
            }
        }
    }
    if found {
        return None;
    }
    // Not ours: any process of the socket's owner (a sandboxed child of
    // another server of this user must not reach this one either).
    let mine: HashSet<i32> = mine.into_iter().collect();
    for pid in processes_of(uid) {
        if !mine.contains(&pid) && holds(pid, &needle) {
            if let Some(why) = judge(pid) {
                return Some(why);
            }
        }
    }
    None
}

/// Whether `pid` runs inside a sandbox: one of its ancestors is a
/// sandbox's init (this binary in its `__init` mode). Every sandboxed
/// process descends from one (the init leads its PID namespace and reaps
/// its orphans), and none can change its own ancestry.
pub fn in_a_sandbox(pid: i32) -> bool {
    let mut at = pid;
    for _ in 0..256 {
        if at <= 1 {
            return false;
        }
        let cmdline = std::fs::read(format!("/proc/{at}/cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).nth(1) == Some(crate::sys::SANDBOX_INIT_ARG.as_bytes()) {
            return true;
        }
        match parent(at) {
            Some(p) => at = p,
            None => return false,
        }
    }
    false
}

/// Every process whose `/proc` entry belongs to `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (e.metadata().ok()?.uid() == uid).then_some(pid)
        })
        .collect()
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` has an fd open on `needle` (`socket:[N]`).
fn holds(pid: i32, needle: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| target.as_os_str().as_encoded_bytes() == needle.as_bytes())
    })
}

/// The credentials of a Unix socket's peer.
pub fn unix_peer(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_peer_is_found_with_our_uid_and_its_inode() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, from) = listener.accept().unwrap();
        let found = tcp_peer(accepted.local_addr().unwrap(), from)
            .unwrap()
            .unwrap();
        // SAFETY: getter.
        assert_eq!(found.uid, unsafe { libc::geteuid() });
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", client.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        assert_eq!(found.inode, inode);
        // The server's own socket is the holder: refused as "the server
        // itself".
        assert!(refuse_holder(found.inode, found.uid).is_some());
        // Nobody at an address nothing connected from.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            tcp_peer(accepted.local_addr().unwrap(), nobody).unwrap(),
            None
        );
    }

    #[test]
    fn the_text_table_finds_what_sock_diag_finds() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, from) = listener.accept().unwrap();
        let local = accepted.local_addr().unwrap();
        let by_diag = sock_diag(local, from).unwrap().unwrap();
        assert_eq!(proc_net_tcp(local, from).unwrap(), Some(by_diag));
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(proc_net_tcp(local, nobody).unwrap(), None);
        if let Ok(listener) = std::net::TcpListener::bind("[::1]:0") {
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, from) = listener.accept().unwrap();
            let local = accepted.local_addr().unwrap();
            assert_eq!(
                proc_net_tcp(local, from).unwrap(),
                sock_diag(local, from).unwrap()
            );
        }
    }

    #[test]
    fn ipv6_loopback_peers_are_found_too() {
        let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 here
        };
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, from) = listener.accept().unwrap();
        assert!(
            tcp_peer(accepted.local_addr().unwrap(), from)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn the_server_is_not_in_a_sandbox() {
        assert!(!in_a_sandbox(std::process::id() as i32));
    }
}
