//! Landlock, through its three system calls: the parent builds a ruleset
//! (one fd), the child restricts itself with it just before exec.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

pub const EXECUTE: u64 = 1 << 0;
pub const WRITE_FILE: u64 = 1 << 1;
pub const READ_FILE: u64 = 1 << 2;
pub const READ_DIR: u64 = 1 << 3;
const REFER: u64 = 1 << 13;
pub const TRUNCATE: u64 = 1 << 14;
pub const IOCTL_DEV: u64 = 1 << 15;
/// Rights that make sense on a file (not a directory).
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
/// `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET` (ABI 6): no connecting to an
/// abstract Unix socket made outside the domain (a path-less socket is out
/// of reach of every filesystem rule).
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
/// `LANDLOCK_SCOPE_SIGNAL` (ABI 6): no signals to processes outside.
const SCOPE_SIGNAL: u64 = 1 << 1;
/// The first ABI with scopes.
pub const SCOPES_ABI: i32 = 6;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version of the running kernel; 0 when unavailable.
pub fn abi() -> i32 {
    static ABI: OnceLock<i32> = OnceLock::new();
    *ABI.get_or_init(|| {
        // SAFETY: the version query takes no attribute.
        let v = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        if v < 0 { 0 } else { v as i32 }
    })
}

/// Every filesystem right the kernel's ABI knows: all of them are handled,
/// so whatever a rule does not grant is denied.
pub fn handled(abi: i32) -> u64 {
    let mut all = (1 << 13) - 1;
    if abi >= 2 {
        all |= REFER;
    }
    if abi >= 3 {
        all |= TRUNCATE;
    }
    if abi >= 5 {
        all |= IOCTL_DEV;
    }
    all
}

/// A ruleset under construction, then ready for children to enter.
pub struct Ruleset {
    fd: OwnedFd,
    handled: u64,
}

impl Ruleset {
    /// A ruleset that scopes abstract Unix sockets and signals to the
    /// domain; with `filesystem`, it also handles every filesystem right,
    /// so that what no rule grants is denied.
    pub fn new(filesystem: bool) -> io::Result<Ruleset> {
        let abi = abi();
        if abi < 1 {
            return Err(io::Error::other("Landlock is not available on this kernel"));
        }
        if abi < SCOPES_ABI {
            return Err(io::Error::other(format!(
                "Landlock ABI {abi} can't scope abstract Unix sockets (ABI {SCOPES_ABI}, Linux 6.12, is needed)"
            )));
        }
        let handled = if filesystem { handled(abi) } else { 0 };
        let attr = RulesetAttr {
            handled_access_fs: handled,
            handled_access_net: 0,
            scoped: SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL,
        };
        let size = std::mem::size_of::<RulesetAttr>();
        // SAFETY: attr is valid for `size` bytes.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size as usize,
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from the kernel, owned here (close-on-exec).
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Ruleset { fd, handled })
    }

    /// Every right this ruleset handles.
    pub fn all(&self) -> u64 {
        self.handled
    }

    /// Allow `access` beneath `path` (only the file rights when it is not
    /// a directory).
    pub fn allow(&self, path: &Path, access: u64) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("path contains a NUL byte"))?;
        // SAFETY: c is a valid C string.
        let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd, owned here.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fstat fills a zeroed stat.
        let is_dir = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(file.as_raw_fd(), &mut st) == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFDIR
        };
        let mut access = access & self.handled;
        if !is_dir {
            access &= FILE_RIGHTS;
        }
        if access == 0 {
            return Ok(());
        }
        let attr = PathBeneathAttr {
            allowed_access: access,
            parent_fd: file.as_raw_fd(),
        };
        // SAFETY: attr is a valid path-beneath rule.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd.as_raw_fd(),
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Enter the ruleset; in the child, after `PR_SET_NO_NEW_PRIVS`. Only
/// makes a system call, so it is safe between fork and exec.
pub fn restrict_self(ruleset_fd: RawFd) -> io::Result<()> {
    // SAFETY: a plain system call on an fd the caller keeps open.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset_fd, 0u32) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
