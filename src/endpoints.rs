//! The server's own doors: every address a client can reach it on (its
//! Unix sockets, the `--persist` daemons' directory, its TCP listeners).
//!
//! Recorded as the server binds them, and read by what must keep children
//! away from them: the sandbox masks the paths in every sandboxed child's
//! mount namespace, and the policy proxy refuses to dial the ports.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

static PATHS: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());
static TCP: RwLock<Vec<SocketAddr>> = RwLock::new(Vec::new());

/// A path a client can reach the server through (a socket, or a
/// directory of sockets): hidden from every sandboxed child.
pub fn add_path(path: &Path) {
    let path = absolute(path);
    let mut paths = PATHS.write().unwrap_or_else(|e| e.into_inner());
    if !paths.contains(&path) {
        paths.push(path);
    }
}

/// A TCP address the server accepts connections on.
pub fn add_tcp(address: SocketAddr) {
    let mut all = TCP.write().unwrap_or_else(|e| e.into_inner());
    if !all.contains(&address) {
        all.push(address);
    }
}

/// The paths to hide, as they are now (those that exist).
pub fn paths() -> Vec<PathBuf> {
    PATHS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .cloned()
        .collect()
}

/// Whether dialing `to` would reach one of the server's own listeners:
/// its port, on the listener's address, or on any address of this host
/// when the listener is bound to all of them.
pub fn is_own_tcp(to: SocketAddr) -> bool {
    let all = TCP.read().unwrap_or_else(|e| e.into_inner());
    let to_ip = to.ip().to_canonical();
    all.iter().any(|l| {
        l.port() == to.port()
            && (l.ip().to_canonical() == to_ip
                || (l.ip().is_unspecified() && is_this_host(to_ip))
                || (to_ip.is_unspecified()))
    })
}

/// Whether `ip` is one of this host's own addresses (loopback, or one
/// assigned to an interface).
pub fn is_this_host(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        // Unknown: take it as ours (the caller refuses).
        return true;
    }
    let mut found = false;
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let node = unsafe { &*at };
        if !node.ifa_addr.is_null() {
            // SAFETY: the family says which sockaddr it is.
            let family = i32::from(unsafe { (*node.ifa_addr).sa_family });
            let addr = match family {
                libc::AF_INET => {
                    // SAFETY: an AF_INET sockaddr.
                    let sin = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in>() };
                    Some(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 sockaddr.
                    let sin6 = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in6>() };
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            };
            if addr.map(|a| a.to_canonical()) == Some(ip) {
                found = true;
                break;
            }
        }
        at = node.ifa_next;
    }
    // SAFETY: the list getifaddrs made.
    unsafe { libc::freeifaddrs(list) };
    found
}

fn absolute(path: &Path) -> PathBuf {
    // The directory resolved (it exists), the last component kept as it
    // is (a socket is not followed).
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => dir
            .canonicalize()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        (Some(_), Some(name)) => std::env::current_dir()
            .ok()
            .and_then(|d| d.canonicalize().ok())
            .map(|d| d.join(name))
            .unwrap_or_else(|| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_ports_match_every_spelling_of_the_address() {
        add_tcp("127.0.0.1:47001".parse().unwrap());
        add_tcp("0.0.0.0:47002".parse().unwrap());
        assert!(is_own_tcp("127.0.0.1:47001".parse().unwrap()));
        assert!(is_own_tcp("[::ffff:127.0.0.1]:47001".parse().unwrap()));
        assert!(is_own_tcp("0.0.0.0:47001".parse().unwrap()));
        assert!(!is_own_tcp("127.0.0.2:47001".parse().unwrap()));
        assert!(!is_own_tcp("127.0.0.1:47003".parse().unwrap()));
        // Bound to every address: any of this host's.
        assert!(is_own_tcp("127.0.0.5:47002".parse().unwrap()));
        assert!(is_own_tcp("[::1]:47002".parse().unwrap()));
        assert!(!is_own_tcp("192.0.2.1:47002".parse().unwrap()));
    }
}
