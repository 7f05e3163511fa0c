//! The seccomp filter every sandboxed process runs under, written as a
//! small classic-BPF program, and the listener through which the server
//! learns, for sure, that the filter refused something.
//!
//! Refused: sockets of any family but Unix (when the network is
//! restricted); in managed networking, Unix sockets (so no daemon of the
//! host can relay traffic out) and any family but IPv4 and IPv6, and
//! `bind`/`listen` unless local binding is allowed; new namespaces, mounts, ptrace and reading or writing
//! other processes' memory, io_uring (which could bypass this filter),
//! userfaultfd, BPF, perf, keyrings, kernel modules and kexec; setting the
//! set-user-id or set-group-id bit, by the chmod family or by creating a
//! file or node with it (a root server's sandbox could otherwise leave a
//! set-uid root shell for any local user). `openat2`, whose mode this
//! filter can't see, gets ENOSYS, as `clone3` does. A refused call fails with
//! EPERM; when the server listens, it hears of it first (user
//! notification). `clone3` gets ENOSYS so that libc falls back to `clone`,
//! whose flags the filter can see. Other architectures' calls (i386, x32)
//! kill the process: their numbers mean different calls.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use libc::sock_filter;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the sandbox's seccomp filter knows x86_64 and aarch64 only");

/// Namespace flags of `clone`/`unshare` (CLONE_NEWTIME aside: its bit is
/// part of the exit signal for `clone`).
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWCGROUP) as u32;

/// Calls refused outright.
const REFUSED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_userfaultfd,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_open_by_handle_at,
];

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// The set-user-id and set-group-id mode bits.
const SET_ID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;
/// Open flags under which the mode argument is used: `O_CREAT` and the
/// bit of `O_TMPFILE` that is not `O_DIRECTORY`.
const CREATING: u32 = (libc::O_CREAT | 0o20_000_000) as u32;

/// Calls whose mode argument (by index) must not carry [`SET_ID_BITS`].
const MODE_CALLS: &[(libc::c_long, u8)] = &[
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_chmod, 1),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_creat, 1),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_mknod, 1),
    (libc::SYS_fchmod, 1),
    (libc::SYS_fchmodat, 2),
    (libc::SYS_fchmodat2, 2),
    (libc::SYS_mknodat, 2),
];

/// Calls that create a file with a mode when their flags (by index) ask
/// for it: (call, flags argument, mode argument).
const CREATE_CALLS: &[(libc::c_long, u8, u8)] = &[
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_open, 1, 2),
    (libc::SYS_openat, 2, 3),
];

/// The offset of argument `i`'s low half in `seccomp_data`.
const fn arg(i: u8) -> u32 {
    16 + 8 * i as u32
}

/// Where a jump goes, resolved when the program is finished.
#[derive(Clone, Copy, PartialEq)]
enum Label {
    Next,
    Allow,
    Refuse,
    NoSys,
    Kill,
    Socket,
    InetSocket,
    Namespaces,
    /// Refuse when argument N has a set-id bit.
    SetIdMode(u8),
    /// Go to `SetIdMode(mode)` when argument `flags` creates a file.
    Creating {
        flags: u8,
        mode: u8,
    },
}

enum Insn {
    Load(u32),
    Jeq(u32, Label, Label),
    Jge(u32, Label, Label),
    Jset(u32, Label, Label),
    Ret(u32),
    Mark(Label),
}

/// A finished filter program.
/// What the filter lets a process do with sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// Any socket.
    Open,
    /// Unix sockets only (the network is restricted).
    UnixOnly,
    /// IPv4 and IPv6 sockets only, in a network namespace whose only way
    /// out is the proxy; `bind` and `listen` only with local binding.
    Managed { local_binding: bool },
}

pub struct Filter {
    program: Vec<sock_filter>,
    notify: bool,
}

/// Build the filter. `notify`: refusals go through a listener the server
/// reads (the listener answers EPERM); otherwise they fail with EPERM.
pub fn build(net: Net, notify: bool) -> Filter {
    use Insn::*;
    use Label::*;
    let refuse = if notify {
        libc::SECCOMP_RET_USER_NOTIF
    } else {
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
    };
    let mut code = vec![Load(4), Jeq(AUDIT_ARCH, Next, Kill), Load(0)];
    #[cfg(target_arch = "x86_64")]
    code.push(Jge(0x4000_0000, Kill, Next));
    code.push(Jeq(libc::SYS_clone3 as u32, NoSys, Next));
    code.push(Jeq(libc::SYS_openat2 as u32, NoSys, Next));
    match net {
        Net::Open => {}
        Net::UnixOnly => code.push(Jeq(libc::SYS_socket as u32, Socket, Next)),
        Net::Managed { local_binding } => {
            code.push(Jeq(libc::SYS_socket as u32, InetSocket, Next));
            if !local_binding {
                code.push(Jeq(libc::SYS_bind as u32, Refuse, Next));
                code.push(Jeq(libc::SYS_listen as u32, Refuse, Next));
            }
        }
    }
    code.push(Jeq(libc::SYS_clone as u32, Namespaces, Next));
    code.push(Jeq(libc::SYS_unshare as u32, Namespaces, Next));
    for &nr in REFUSED {
        code.push(Jeq(nr as u32, Refuse, Next));
    }
    for &(nr, mode) in MODE_CALLS {
        code.push(Jeq(nr as u32, SetIdMode(mode), Next));
    }
    for &(nr, flags, mode) in CREATE_CALLS {
        code.push(Jeq(nr as u32, Creating { flags, mode }, Next));
    }
    code.push(Ret(SECCOMP_RET_ALLOW));
    // Jumps only go forward: the flag checks come before the mode checks
    // they lead to.
    let checks = CREATE_CALLS
        .iter()
        .map(|&(_, flags, mode)| Creating { flags, mode })
        .chain(CREATE_CALLS.iter().map(|&(_, _, mode)| SetIdMode(mode)))
        .chain(MODE_CALLS.iter().map(|&(_, mode)| SetIdMode(mode)));
    let mut marked = Vec::new();
    for label in checks {
        if marked.contains(&label) {
            continue;
        }
        marked.push(label);
        code.push(Mark(label));
        match label {
            SetIdMode(i) => code.extend([Load(arg(i)), Jset(SET_ID_BITS, Refuse, Allow)]),
            Creating { flags, mode } => {
                code.extend([Load(arg(flags)), Jset(CREATING, SetIdMode(mode), Allow)])
            }
            _ => {}
        }
    }
    code.extend([
        Mark(Socket),
        Load(16), // args[0], low half: the address family
        Jeq(libc::AF_UNIX as u32, Allow, Refuse),
        Mark(InetSocket),
        Load(16),
        Jeq(libc::AF_INET as u32, Allow, Next),
        Jeq(libc::AF_INET6 as u32, Allow, Refuse),
        Mark(Namespaces),
        Load(16), // args[0], low half: the flags
        Jset(NAMESPACE_FLAGS, Refuse, Allow),
        Mark(Allow),
        Ret(SECCOMP_RET_ALLOW),
        Mark(Refuse),
        Ret(refuse),
        Mark(NoSys),
        Ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        Mark(Kill),
        Ret(libc::SECCOMP_RET_KILL_PROCESS),
    ]);
    Filter {
        program: assemble(&code),
        notify,
    }
}

fn assemble(code: &[Insn]) -> Vec<sock_filter> {
    // Positions of the labels, counting real instructions only.
    let mut marks = Vec::new();
    let mut pos = 0usize;
    for insn in code {
        match insn {
            Insn::Mark(label) => marks.push((*label, pos)),
            _ => pos += 1,
        }
    }
    let target = |label: Label, at: usize| -> u8 {
        if label == Label::Next {
            return 0;
        }
        let (_, to) = marks
            .iter()
            .find(|(l, _)| *l == label)
            .expect("every label is marked");
        u8::try_from(to - at - 1).expect("the filter is short enough for 8-bit jumps")
    };
    let stmt = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |op: u32, k: u32, t: Label, f: Label, at: usize| sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt: target(t, at),
        jf: target(f, at),
        k,
    };
    let mut out = Vec::new();
    for insn in code {
        let at = out.len();
        out.push(match *insn {
            Insn::Mark(_) => continue,
            Insn::Load(offset) => stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset),
            Insn::Ret(value) => stmt(libc::BPF_RET | libc::BPF_K, value),
            Insn::Jeq(k, t, f) => jump(libc::BPF_JEQ, k, t, f, at),
            Insn::Jge(k, t, f) => jump(libc::BPF_JGE, k, t, f, at),
            Insn::Jset(k, t, f) => jump(libc::BPF_JSET, k, t, f, at),
        });
    }
    out
}

impl Filter {
    /// Install the filter on the calling thread (the child, after
    /// `PR_SET_NO_NEW_PRIVS`); returns the listener when notifying. Only
    /// makes a system call, so it is safe between fork and exec.
    pub fn install(&self) -> io::Result<Option<RawFd>> {
        let prog = libc::sock_fprog {
            len: self.program.len() as u16,
            filter: self.program.as_ptr() as *mut sock_filter,
        };
        let flags = if self.notify {
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
        } else {
            0
        };
        // SAFETY: prog points at a valid program that outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.notify.then_some(rc as RawFd))
    }
}

/// Answer a sandboxed process tree's refused calls with EPERM, recording
/// that something was refused, until no process uses the filter.
pub async fn listen(listener: OwnedFd, refused: Arc<AtomicBool>) {
    let fd = listener.as_raw_fd();
    // SAFETY: the OwnedFd moves into the AsyncFd, so it stays open for as
    // long as it is registered.
    let Ok(watched) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    loop {
        let Ok(mut guard) = watched.readable().await else {
            return;
        };
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd without waiting.
        unsafe { libc::poll(&mut poll, 1, 0) };
        if poll.revents & libc::POLLIN != 0 {
            answer_one(fd, &refused);
        } else if poll.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        } else {
            guard.clear_ready();
        }
    }
}

fn answer_one(fd: RawFd, refused: &AtomicBool) {
    // SAFETY: RECV wants a zeroed struct; SEND reads a valid response.
    unsafe {
        let mut notif: libc::seccomp_notif = std::mem::zeroed();
        if libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV as _, &mut notif) != 0 {
            // The caller died before we looked.
            return;
        }
        refused.store(true, Ordering::SeqCst);
        tracing::debug!(
            pid = notif.pid,
            syscall = notif.data.nr,
            "sandbox refused a call"
        );
        let mut resp: libc::seccomp_notif_resp = std::mem::zeroed();
        resp.id = notif.id;
        resp.error = -libc::EPERM;
        libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND as _, &mut resp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_assembles_with_forward_jumps_in_range() {
        let nets = [
            Net::Open,
            Net::UnixOnly,
            Net::Managed {
                local_binding: false,
            },
            Net::Managed {
                local_binding: true,
            },
        ];
        for net in nets {
            for notify in [false, true] {
                let filter = build(net, notify);
                assert!(filter.program.len() < 256);
                let last = filter.program.last().unwrap();
                assert_eq!(last.code as u32, libc::BPF_RET | libc::BPF_K);
            }
        }
    }
}
