//! Managed networking's namespace: a sandboxed command in managed mode
//! runs in a network namespace of its own, whose only interface is a
//! loopback, and whose only listeners are the bridges this child makes
//! before it execs: one on `127.0.0.1:PORT` for each allowed proxy port,
//! handed to the server, which forwards what they accept to the host's
//! `127.0.0.1:PORT`. Nothing else exists to connect to.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys::{recv_fd, socket_pair};

/// The most ports one process may have bridged.
pub const MAX_PORTS: usize = 16;

/// What a child needs to build its namespace: the ports, and the socket
/// its listeners go back to the server through.
pub struct Plan {
    ports: Vec<u16>,
    /// A UDP socket on this port too (the SOCKS5 UDP relay's).
    udp: Option<u16>,
    /// The child's end and the server's end.
    channel: (OwnedFd, OwnedFd),
}

impl Plan {
    pub fn new(ports: &[u16], udp: Option<u16>) -> io::Result<Plan> {
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() > MAX_PORTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_PORTS} loopback ports can be bridged"),
            ));
        }
        Ok(Plan {
            ports,
            udp,
            channel: socket_pair()?,
        })
    }

    /// In the child, with the capabilities of its user namespace: a new
    /// network namespace, its loopback up, and a listener for each port
    /// sent to the server. Only system calls on prepared data.
    pub fn enter(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(rc)
            }
        };
        // SAFETY: system calls on stack data.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNET))?;
            let sock = check(libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
            ))?;
            let mut req: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo\0".iter().enumerate() {
                req.ifr_name[i] = *b as libc::c_char;
            }
            let up = check(libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req)).and_then(|_| {
                req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
                check(libc::ioctl(sock, libc::SIOCSIFFLAGS, &req))
            });
            libc::close(sock);
            up?;
            let tcp = self.ports.iter().map(|&p| (p, libc::SOCK_STREAM));
            for (port, kind) in tcp.chain(self.udp.map(|p| (p, libc::SOCK_DGRAM))) {
                let fd = check(libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0))?;
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: port.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let made = check(libc::bind(
                    fd,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                ))
                .and_then(|_| match kind {
                    libc::SOCK_STREAM => check(libc::listen(fd, 128)),
                    _ => Ok(0),
                })
                .and_then(|_| crate::sys::send_fd(self.channel.0.as_raw_fd(), fd).map(|_| 0));
                libc::close(fd);
                made?;
            }
        }
        Ok(())
    }

    /// After a successful spawn: the sockets the child made, by port (the
    /// listeners, then the UDP socket).
    pub fn take_listeners(&self) -> Vec<(u16, OwnedFd)> {
        let server_end: RawFd = self.channel.1.as_raw_fd();
        self.ports
            .iter()
            .chain(&self.udp)
            .map_while(|&port| recv_fd(server_end).map(|fd| (port, fd)))
            .collect()
    }
}
