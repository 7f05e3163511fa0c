//! What this host can enforce, probed once, and how `sandbox-check` says
//! it.

use std::io;
use std::sync::OnceLock;

use super::mounts::set_read_only;
use super::{landlock, seccomp};

/// What this host can enforce, probed once.
pub struct Host {
    pub landlock_abi: i32,
    pub mount_namespace: bool,
    pub mount_namespace_why: String,
    pub seccomp_listener: bool,
}

pub fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        // SAFETY: getter without failure modes.
        let uid = unsafe { libc::geteuid() };
        let flags = if uid == 0 {
            libc::CLONE_NEWNS | libc::CLONE_NEWPID
        } else {
            libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID
        };
        let (mount_namespace, mount_namespace_why) = match probe_in_child(|| {
            // SAFETY: system calls in a throwaway child.
            unsafe {
                libc::unshare(flags) == 0
                    && libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0
                    && set_read_only(c"/", true, true) == 0
            }
        }) {
            Ok(true) => (true, String::new()),
            Ok(false) => (
                false,
                if uid == 0 {
                    "a private, read-only mount tree and a PID namespace could not be made".into()
                } else {
                    "unprivileged user namespaces are disabled or restricted".into()
                },
            ),
            Err(e) => (false, format!("probe failed: {e}")),
        };
        let filter = seccomp::build(seccomp::Net::Open, true);
        let seccomp_listener = probe_in_child(|| {
            // SAFETY: prctl in a throwaway child.
            let nnp = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 };
            nnp && filter.install().is_ok_and(|fd| fd.is_some())
        })
        .unwrap_or(false);
        Host {
            landlock_abi: landlock::abi(),
            mount_namespace,
            mount_namespace_why,
            seccomp_listener,
        }
    })
}

/// Run `test` in a forked child and report whether it returned true. The
/// test makes only system calls on data prepared before the fork.
fn probe_in_child(test: impl Fn() -> bool) -> io::Result<bool> {
    // SAFETY: the child only runs `test` (system calls) and _exit.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            libc::_exit(if test() { 0 } else { 1 });
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
    }
}

/// A description of what this host can enforce, for `exec-server
/// sandbox-check`.
pub fn describe_host() -> (bool, String) {
    let host = host();
    let mut text = String::new();
    let landlock = host.landlock_abi >= landlock::SCOPES_ABI;
    text.push_str(&format!(
        "landlock: {}\n",
        if landlock {
            format!(
                "ABI {} (filesystem rules; abstract Unix sockets and signals scoped to the sandbox)",
                host.landlock_abi
            )
        } else if host.landlock_abi >= 1 {
            format!(
                "ABI {}, too old to scope abstract Unix sockets (ABI {} is needed): every sandbox is refused",
                host.landlock_abi,
                landlock::SCOPES_ABI
            )
        } else {
            "unavailable (every sandbox is refused)".into()
        }
    ));
    text.push_str(&format!(
        "namespaces: {}\n",
        if host.mount_namespace {
            "available (a PID namespace with its own /proc and init; a private mount tree: \
             read-only outside writable places, deny masks, read-only .git, only the own terminal)"
                .to_string()
        } else {
            format!(
                "unavailable: {} (every sandbox is refused)",
                host.mount_namespace_why
            )
        }
    ));
    text.push_str(&format!(
        "seccomp listener: {}\n",
        if host.seccomp_listener {
            "available (refused calls are known for sure)"
        } else {
            "unavailable (denials are judged from output only)"
        }
    ));
    (landlock && host.mount_namespace, text)
}
