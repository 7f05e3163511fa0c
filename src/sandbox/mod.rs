//! The executor's own sandbox (`docs/PROTOCOL.md` section 6).
//!
//! [`policy`] parses the intent and binds it to this machine's paths.
//! [`prepare`] turns the bound rules into a [`Prepared`] sandbox: a Landlock
//! ruleset (built in the server), a private mount plan for what Landlock
//! cannot say (deny under a readable root, read-only inside a writable
//! one), and a seccomp filter. A child enters it with [`Prepared::enter`]
//! before it execs, so it and every descendant are confined before
//! the command's first instruction. [`probably_denied`] is the
//! `sandboxDenied` rule.
//!
//! - `policy`: the intent, parsed and bound to this machine's paths.
//! - `landlock`, `seccomp`: the two kernel mechanisms, built in the server.
//! - `mounts`: the private mount namespace the child builds (masks, pins,
//!   read-only binds, `/dev/pts`, `/proc`).
//! - `netns`: managed networking's namespace: only `lo`, and a listener
//!   per allowed proxy port handed back to the server.
//! - `host`: what this host can enforce, probed once.
//! - `denial`: the `sandboxDenied` rule.
//! - `helper`: filesystem methods in a self-confining helper process.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

mod denial;
pub mod helper;
mod host;
pub mod landlock;
mod mounts;
mod netns;
pub mod policy;
pub mod seccomp;

pub use denial::{Watch, probably_denied};
pub use host::{describe_host, host};
pub use mounts::needs_user_namespace;

use crate::sys::{recv_fd, send_fd, socket_pair};
use mounts::MountPlan;
use policy::{Grant, Rules};

/// The `sandboxType` of a sandboxed process.
pub const SANDBOX_TYPE: &str = "linuxSeccomp";

/// Parse and bind a `sandbox` value without preparing anything: `Ok(None)`
/// when nothing is to be enforced.
pub fn rules(
    sandbox: Option<&Value>,
    start_cwd: Option<&Path>,
    server_roots: &[PathBuf],
) -> Result<Option<Rules>> {
    let Some(context) = policy::parse(sandbox)? else {
        return Ok(None);
    };
    let mut rules = policy::resolve(&context, start_cwd, server_roots)?;
    if let Some(rules) = &mut rules {
        rules.hidden = crate::endpoints::paths();
    }
    Ok(rules)
}

/// A sandbox ready for children to enter.
pub struct Prepared {
    /// Filesystem rules when the policy restricts the filesystem, and
    /// always the scopes: no abstract Unix socket or signal outside.
    ruleset: landlock::Ruleset,
    mounts: MountPlan,
    filter: seccomp::Filter,
    /// Child's and server's ends of the socket the filter's listener
    /// comes back through.
    listener_channel: Option<(OwnedFd, OwnedFd)>,
    /// The process's own terminal (`/dev/pts/N`), the one terminal its
    /// `/dev/pts` shows; set once the pty is open.
    terminal: std::sync::OnceLock<CString>,
    /// What the filter allows of sockets.
    pub net: seccomp::Net,
    /// Managed networking: the namespace the child builds.
    netns: Option<netns::Plan>,
}

/// Managed networking for a sandboxed process: its own network namespace,
/// into which only these host loopback ports are bridged.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    pub ports: Vec<u16>,
    /// The SOCKS5 UDP relay's port, bridged as a UDP socket.
    pub udp_port: Option<u16>,
    /// The command may bind and listen (on its own loopback).
    pub local_binding: bool,
}

/// Build the sandbox for `rules`, or say why this host can't enforce it.
/// `notify`: hear of refused calls through a seccomp listener.
/// `cwd`: the directory the child runs in, entered again once the mounts
/// are made (the old one would still see the tree below them).
/// `managed`: run in a network namespace of its own with only those ports
/// bridged in.
pub fn prepare(
    rules: &Rules,
    notify: bool,
    cwd: Option<&Path>,
    managed: Option<&Managed>,
) -> Result<Prepared> {
    let unavailable = |why: String| Error::SandboxUnavailable(why);
    let set = landlock::Ruleset::new(rules.fs.is_some()).map_err(|e| unavailable(e.to_string()))?;
    let mut plan = MountPlan::open(cwd)?;
    if let Some(fs) = &rules.fs {
        let read = landlock::EXECUTE | landlock::READ_FILE | landlock::READ_DIR;
        let device =
            landlock::READ_FILE | landlock::WRITE_FILE | landlock::TRUNCATE | landlock::IOCTL_DEV;
        for (path, grant) in fs {
            let access = match grant {
                Grant::Write => set.all(),
                Grant::Read => read,
                Grant::Device => device | landlock::READ_DIR,
                Grant::Deny => continue,
            };
            set.allow(path, access).map_err(|e| {
                unavailable(format!(
                    "cannot add a Landlock rule for {}: {e}",
                    path.display()
                ))
            })?;
        }
        plan = MountPlan::new(fs, cwd)?;
    }
    plan.hide(&rules.hidden, rules.fs.as_ref())?;
    let host = host();
    if !host.mount_namespace {
        return Err(unavailable(format!(
            "private mount and PID namespaces are needed ({}) and this host refuses them ({})",
            plan.needs_namespace(),
            host.mount_namespace_why
        )));
    }
    let notify = notify && host.seccomp_listener;
    let listener_channel = if notify {
        Some(socket_pair().map_err(|e| Error::io("failed to create a socket pair", &e))?)
    } else {
        None
    };
    let net = match managed {
        Some(m) => seccomp::Net::Managed {
            local_binding: m.local_binding,
        },
        None if rules.network_restricted => seccomp::Net::UnixOnly,
        None => seccomp::Net::Open,
    };
    let netns = match managed {
        Some(m) => Some(
            netns::Plan::new(&m.ports, m.udp_port)
                .map_err(|e| unavailable(format!("managed networking: {e}")))?,
        ),
        None => None,
    };
    Ok(Prepared {
        ruleset: set,
        mounts: plan,
        filter: seccomp::build(net, notify),
        listener_channel,
        terminal: std::sync::OnceLock::new(),
        net,
        netns,
    })
}

impl Prepared {
    /// Confine the calling process: a command's child before exec (a
    /// `clone(CLONE_VM)` child sharing the server's memory, so only system
    /// calls on data prepared by the server), or the single-threaded fs
    /// helper confining itself.
    pub fn enter(&self) -> io::Result<()> {
        self.mounts
            .apply(self.terminal.get().map(CString::as_c_str), None)?;
        confine(
            self.ruleset.raw_fd(),
            &self.filter,
            self.listener_channel.as_ref().map(|(c, _)| c.as_raw_fd()),
        )
    }

    /// The namespace half of [`Prepared::enter`], for a child that is pid 1
    /// of a new PID namespace (made by `clone`, with a new user namespace
    /// when `user_namespace_made`): the mounts, and a `/proc` of that PID
    /// namespace. The init it execs then confines itself ([`confine`]).
    pub fn enter_namespaces(&self, user_namespace_made: bool) -> io::Result<()> {
        self.mounts.apply(
            self.terminal.get().map(CString::as_c_str),
            Some(user_namespace_made),
        )?;
        match &self.netns {
            Some(plan) => plan.enter(),
            None => Ok(()),
        }
    }

    /// Whether the network is closed to the process (restricted, or only
    /// the proxy): a network failure is then probably the sandbox's doing.
    pub fn network_limited(&self) -> bool {
        self.net != seccomp::Net::Open
    }

    /// After a successful spawn: the bridge listeners of managed
    /// networking the child made, by port.
    pub fn take_bridges(&self) -> Vec<(u16, OwnedFd)> {
        self.netns
            .as_ref()
            .map(netns::Plan::take_listeners)
            .unwrap_or_default()
    }

    /// What the init needs to confine itself: the Landlock ruleset, the
    /// child's end of the listener channel (when listening), and what the
    /// filter allows of sockets.
    pub fn for_init(&self) -> (RawFd, Option<RawFd>, seccomp::Net) {
        (
            self.ruleset.raw_fd(),
            self.listener_channel.as_ref().map(|(c, _)| c.as_raw_fd()),
            self.net,
        )
    }

    /// The process runs under the pty whose slave is `path`: that terminal,
    /// and no other, is in the sandbox's `/dev/pts`.
    pub fn own_terminal(&self, path: &Path) -> Result<()> {
        let _ = self.terminal.set(cstring(path)?);
        Ok(())
    }

    /// After a successful spawn: the filter's listener the child sent.
    pub fn take_listener(&self) -> Option<OwnedFd> {
        let (_, server_end) = self.listener_channel.as_ref()?;
        recv_fd(server_end.as_raw_fd())
    }
}

/// Confine the calling process for good: no capabilities, no new
/// privileges, the Landlock ruleset, the seccomp filter (its listener sent
/// over `listener_socket` when there is one). Only system calls: callable
/// between clone and exec.
pub fn confine(
    ruleset: RawFd,
    filter: &seccomp::Filter,
    listener_socket: Option<RawFd>,
) -> io::Result<()> {
    drop_capabilities();
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    landlock::restrict_self(ruleset)?;
    let listener = filter.install()?;
    if let (Some(fd), Some(socket)) = (listener, listener_socket) {
        send_fd(socket, fd)?;
        // SAFETY: our own copy; the server holds the one it received.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Remove every capability from the bounding, ambient, effective,
/// permitted and inheritable sets, so that a command run as root is an
/// ordinary user in the sandbox. Errors are ignored: an unprivileged
/// caller has nothing to drop.
fn drop_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // SAFETY: prctl and capset calls on valid arguments.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() == libc::EINVAL
            {
                break;
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr());
    }
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidParams(format!("path contains a NUL byte: {}", path.display())))
}
