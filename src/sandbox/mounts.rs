//! The private mount namespace a sandboxed child builds before it execs:
//! the plan (made in the server) and its application (system calls only,
//! in the child).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::cstring;
use super::policy::Grant;
use crate::error::{Error, Result};

/// What a mount operation does to its target.
enum MountKind {
    /// Cover a directory with an empty, unreadable, read-only tmpfs made
    /// in the child's own mount namespace: nothing outside can reach or
    /// replace it.
    MaskDirectory,
    /// Cover a file with an empty, unreadable file of a tmpfs private to
    /// the child (clone number N, taken when the child starts).
    MaskFile(usize),
    /// Make a directory between a writable root and a deny entry a mount
    /// point (bound onto itself), so that no command can rename or remove
    /// it and carry the denied path out from under its mask.
    Pin,
    /// Bind onto itself (with what is mounted below), then read-only.
    ReadOnly { keep: libc::c_ulong },
    /// Bind onto itself and make that mount writable again (unless the
    /// host had it read-only), inside the read-only tree.
    Writable { host_read_only: bool },
}

struct MountOp {
    target: CString,
    kind: MountKind,
}

/// The private mount namespace a child builds before exec: the whole tree
/// read-only (so metadata writes such as chmod, which Landlock does not
/// see, fail outside writable places), writable places bound writable
/// again, then the exceptions: masks over denied paths and read-only
/// binds inside writable places.
pub(super) struct MountPlan {
    /// `Some((uid_map, gid_map))` when an unprivileged server needs a user
    /// namespace to own the mount namespace.
    user_maps: Option<(Vec<u8>, Vec<u8>)>,
    ops: Vec<MountOp>,
    /// One slot per `MaskFile`: the child's detached clone of its private
    /// empty file, taken before the mounts and moved onto the target.
    file_masks: Vec<std::sync::atomic::AtomicI32>,
    /// Cover `/dev/pts` with an empty tmpfs (where the process's own
    /// terminal is bound), so no other terminal can be read or written.
    hide_terminals: bool,
    /// Make the whole tree read-only first (the filesystem is restricted).
    read_only_root: bool,
    cwd: Option<CString>,
}

impl MountPlan {
    /// The plan of a policy that leaves the filesystem open: namespaces
    /// (and a `/proc` of the new PID namespace) but no mounts.
    pub(super) fn open(cwd: Option<&Path>) -> Result<MountPlan> {
        Ok(MountPlan {
            user_maps: user_maps(),
            ops: Vec::new(),
            file_masks: Vec::new(),
            hide_terminals: false,
            read_only_root: false,
            cwd: cwd.map(cstring).transpose()?,
        })
    }

    pub(super) fn new(
        fs: &std::collections::BTreeMap<PathBuf, Grant>,
        cwd: Option<&Path>,
    ) -> Result<MountPlan> {
        let nearest = |path: &Path| {
            path.ancestors()
                .skip(1)
                .find_map(|a| fs.get(a).map(|g| (a.to_path_buf(), *g)))
        };
        // `fs` is ordered by path components, so an ancestor always comes
        // before what lies below it. Writable places are bound first, in
        // that order; then the pins, parents first; the exceptions after
        // them, in reverse, so that a read-only bind carries the masks and
        // binds below it.
        let mut writable = Vec::new();
        let mut pins = std::collections::BTreeSet::new();
        let mut exceptions = Vec::new();
        let mut file_masks = 0;
        for (path, grant) in fs {
            if *grant == Grant::Write {
                writable.push(MountOp {
                    target: cstring(path)?,
                    kind: MountKind::Writable {
                        host_read_only: locked_flags(path) & libc::MS_RDONLY != 0,
                    },
                });
            }
            let Some((above, above_grant)) = nearest(path) else {
                continue;
            };
            if above_grant == Grant::Deny && *grant != Grant::Deny {
                return Err(Error::SandboxUnavailable(format!(
                    "cannot allow {} inside the denied {}",
                    path.display(),
                    above.display()
                )));
            }
            let kind = match (grant, above_grant) {
                (Grant::Deny, Grant::Deny) => continue,
                (Grant::Deny, _) => {
                    // Every directory between the nearest writable root and
                    // the denied path, so none can be renamed away.
                    let root = path
                        .ancestors()
                        .skip(1)
                        .find(|a| fs.get(*a) == Some(&Grant::Write));
                    if let Some(root) = root {
                        for dir in path.ancestors().skip(1) {
                            if dir == root {
                                break;
                            }
                            pins.insert(dir.to_path_buf());
                        }
                    }
                    if path.is_dir() {
                        MountKind::MaskDirectory
                    } else {
                        file_masks += 1;
                        MountKind::MaskFile(file_masks - 1)
                    }
                }
                (Grant::Read, Grant::Write) => MountKind::ReadOnly {
                    keep: locked_flags(path),
                },
                _ => continue,
            };
            exceptions.push(MountOp {
                target: cstring(path)?,
                kind,
            });
        }
        for pin in pins {
            writable.push(MountOp {
                target: cstring(&pin)?,
                kind: MountKind::Pin,
            });
        }
        writable.extend(exceptions.into_iter().rev());
        Ok(MountPlan {
            user_maps: user_maps(),
            ops: writable,
            file_masks: (0..file_masks)
                .map(|_| std::sync::atomic::AtomicI32::new(-1))
                .collect(),
            hide_terminals: Path::new(PTS).is_dir(),
            read_only_root: true,
            cwd: cwd.map(cstring).transpose()?,
        })
    }

    /// Mask the server's own endpoints (`paths`: sockets, the persist
    /// directory) whatever the policy grants: Landlock does not govern
    /// `connect` to a named socket, so a readable (or even an unlisted)
    /// socket would let the child ask its own server for an unsandboxed
    /// process. The directories above each that the child may write are
    /// pinned, as for a denied path. `fs`: the policy's rules, `None` when
    /// the filesystem is open (everything writable).
    pub(super) fn hide(
        &mut self,
        paths: &[PathBuf],
        fs: Option<&std::collections::BTreeMap<PathBuf, Grant>>,
    ) -> Result<()> {
        let mut pins = std::collections::BTreeSet::new();
        let mut masks: Vec<MountOp> = Vec::new();
        // Parents first, so that what lies inside a masked directory is
        // known to be hidden already.
        let mut paths = paths.to_vec();
        paths.sort();
        for path in &paths {
            let masked_already = self.ops.iter().chain(&masks).any(|op| {
                matches!(op.kind, MountKind::MaskDirectory)
                    && path
                        .starts_with(Path::new(std::ffi::OsStr::from_bytes(op.target.as_bytes())))
            });
            let Ok(meta) = path.symlink_metadata() else {
                continue;
            };
            if masked_already || path == Path::new("/") {
                continue;
            }
            // Writable above: from the nearest writable root (or `/` when
            // the filesystem is open) down to the path's parent.
            let root = match fs {
                Some(fs) => path
                    .ancestors()
                    .skip(1)
                    .find(|a| fs.get(*a) == Some(&Grant::Write)),
                None => Some(Path::new("/")),
            };
            if let Some(root) = root {
                for dir in path.ancestors().skip(1) {
                    if dir == root {
                        break;
                    }
                    pins.insert(dir.to_path_buf());
                }
            }
            let kind = if meta.is_dir() {
                MountKind::MaskDirectory
            } else {
                self.file_masks.push(std::sync::atomic::AtomicI32::new(-1));
                MountKind::MaskFile(self.file_masks.len() - 1)
            };
            masks.push(MountOp {
                target: cstring(path)?,
                kind,
            });
        }
        for pin in pins {
            self.ops.push(MountOp {
                target: cstring(&pin)?,
                kind: MountKind::Pin,
            });
        }
        self.ops.extend(masks);
        Ok(())
    }

    /// What the namespaces are needed for, to say when they are refused.
    pub(super) fn needs_namespace(&self) -> String {
        let mut why = vec!["the server's pid hidden".to_string()];
        if self.hide_terminals {
            why.push(format!("{PTS} (other terminals)"));
        }
        why.extend(
            self.ops
                .iter()
                .filter(|op| !matches!(op.kind, MountKind::Writable { .. } | MountKind::Pin))
                .map(|op| op.target.to_string_lossy().into_owned()),
        );
        why.join(", ")
    }

    /// In the child: a private mount namespace (owned by a new user
    /// namespace when unprivileged) with the plan's mounts.
    /// `pid_namespace`: `Some(user_namespace_made)` when this process is
    /// pid 1 of a new PID namespace (whose user namespace `clone` already
    /// made, unprivileged); then `/proc` is mounted anew for it.
    pub(super) fn apply(
        &self,
        terminal: Option<&std::ffi::CStr>,
        pid_namespace: Option<bool>,
    ) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: system calls on C strings prepared by the server.
        unsafe {
            match &self.user_maps {
                Some((uid_map, gid_map)) => {
                    if pid_namespace != Some(true) {
                        check(libc::unshare(libc::CLONE_NEWUSER))?;
                    }
                    write_file(c"/proc/self/setgroups", b"deny")?;
                    write_file(c"/proc/self/uid_map", uid_map)?;
                    write_file(c"/proc/self/gid_map", gid_map)?;
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                }
                None => check(libc::unshare(libc::CLONE_NEWNS))?,
            }
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            self.clone_file_masks()?;
            if self.read_only_root {
                check(set_read_only(c"/", true, true))?;
            }
            if pid_namespace.is_some() {
                // The PID namespace's own /proc: only its processes, none
                // of the server's.
                check(libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ))?;
                if self.read_only_root {
                    check(set_read_only(c"/proc", true, false))?;
                }
            }
            for op in &self.ops {
                let target = op.target.as_c_str();
                match &op.kind {
                    MountKind::MaskDirectory => {
                        check(libc::mount(
                            c"tmpfs".as_ptr(),
                            target.as_ptr(),
                            c"tmpfs".as_ptr(),
                            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            c"mode=000,size=4k".as_ptr().cast(),
                        ))?;
                    }
                    MountKind::MaskFile(slot) => {
                        let tree = self.file_masks[*slot].swap(-1, Ordering::Relaxed);
                        check(move_mount(tree, target))?;
                        check(set_read_only(target, true, false))?;
                    }
                    MountKind::Pin => check(bind(target, target, true))?,
                    MountKind::ReadOnly { keep } => {
                        check(bind(target, target, true))?;
                        check(remount_read_only(target, *keep))?;
                    }
                    MountKind::Writable { host_read_only } => {
                        check(bind(target, target, true))?;
                        if !host_read_only {
                            check(set_read_only(target, false, false))?;
                        }
                        // Nothing written there is set-uid or a device to
                        // anything run from there.
                        check(set_attributes(
                            target,
                            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                            0,
                            false,
                        ))?;
                    }
                }
            }
            if self.hide_terminals {
                // A detached copy of the own terminal's node, taken before
                // the tmpfs covers it (a bind from /proc/self/fd would name
                // the parent namespace's mount, which the kernel refuses).
                let own = match terminal {
                    Some(terminal) => Some((terminal, clone_tree(terminal)?)),
                    None => None,
                };
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/dev/pts".as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"mode=0755,size=4k".as_ptr().cast(),
                ))?;
                if let Some((terminal, tree)) = own {
                    // Put it back where ttyname() looks for it.
                    let fd = libc::open(
                        terminal.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                    check(move_mount(tree, terminal))?;
                }
                check(set_read_only(c"/dev/pts", true, false))?;
            }
            if let Some(cwd) = &self.cwd {
                check(libc::chdir(cwd.as_ptr()))?;
            }
        }
        Ok(())
    }
}

/// Where terminals live.
const PTS: &str = "/dev/pts";

/// `Some((uid_map, gid_map))` when an unprivileged server needs a user
/// namespace to own the sandbox's other namespaces.
fn user_maps() -> Option<(Vec<u8>, Vec<u8>)> {
    // SAFETY: getters without failure modes.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    (uid != 0).then(|| {
        (
            format!("{uid} {uid} 1\n").into_bytes(),
            format!("{gid} {gid} 1\n").into_bytes(),
        )
    })
}

/// Whether the sandbox runs in a user namespace of its own.
pub fn needs_user_namespace() -> bool {
    user_maps().is_some()
}

/// Where the child mounts, for an instant, the tmpfs its file masks come
/// from; what was there shows again once it is detached.
const SCRATCH: &std::ffi::CStr = c"/tmp";

impl MountPlan {
    /// Make one detached clone of an empty, unreadable file per file mask:
    /// a tmpfs mounted for an instant on [`SCRATCH`], the file made there,
    /// cloned (`open_tree`), and the tmpfs detached again. Nothing outside
    /// this child's mount namespace can see or change the clones.
    ///
    /// # Safety
    /// System calls on prepared data only; callable between clone and exec.
    unsafe fn clone_file_masks(&self) -> io::Result<()> {
        if self.file_masks.is_empty() {
            return Ok(());
        }
        let check = |rc: libc::c_int| {
            if rc != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: system calls on static C strings and prepared cells.
        unsafe {
            check(libc::mount(
                c"tmpfs".as_ptr(),
                SCRATCH.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0700,size=4k".as_ptr().cast(),
            ))?;
            let file = c"/tmp/mask";
            let fd = libc::open(
                file.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0,
            );
            let made = if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                libc::close(fd);
                Ok(())
            };
            let cloned = made.and_then(|()| {
                for slot in &self.file_masks {
                    slot.store(clone_tree(file)?, Ordering::Relaxed);
                }
                Ok(())
            });
            libc::umount2(SCRATCH.as_ptr(), libc::MNT_DETACH);
            cloned
        }
    }
}

/// `open_tree(OPEN_TREE_CLONE)`: a detached bind mount of `path`, as an
/// fd to move elsewhere with [`move_mount`].
///
/// # Safety
/// A plain system call; callable between clone and exec.
unsafe fn clone_tree(path: &std::ffi::CStr) -> io::Result<libc::c_int> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: a valid C string.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd as libc::c_int)
}

/// Attach the detached mount `tree` (from [`clone_tree`]) at `target`,
/// closing `tree`. Returns 0 or -1.
///
/// # Safety
/// A plain system call; callable between clone and exec.
unsafe fn move_mount(tree: libc::c_int, target: &std::ffi::CStr) -> libc::c_int {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    // SAFETY: valid C strings; `tree` is ours to close.
    unsafe {
        let rc = libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        );
        libc::close(tree);
        rc as libc::c_int
    }
}

/// Bind-mount `source` onto `target` (with the mounts below it when
/// `recursive`). Returns 0 or -1.
///
/// # Safety
/// A plain system call; callable between fork and exec.
unsafe fn bind(source: &std::ffi::CStr, target: &std::ffi::CStr, recursive: bool) -> libc::c_int {
    let flags = if recursive {
        libc::MS_BIND | libc::MS_REC
    } else {
        libc::MS_BIND
    };
    // SAFETY: valid C strings; null type and data are allowed for a bind.
    unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    }
}

/// Make the bind mount at `target` read-only, keeping the `keep` flags a
/// user namespace may not clear. Returns 0 or -1.
///
/// # Safety
/// A plain system call; callable between fork and exec.
unsafe fn remount_read_only(target: &std::ffi::CStr, keep: libc::c_ulong) -> libc::c_int {
    // SAFETY: a valid C string; null source, type and data for a remount.
    unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | keep,
            std::ptr::null(),
        )
    }
}

/// `mount_setattr`: set or clear the read-only flag of the mount at
/// `path` (and every mount below it when `recursive`). Returns 0 or -1.
///
/// # Safety
/// A plain system call; callable between fork and exec.
pub(super) unsafe fn set_read_only(
    path: &std::ffi::CStr,
    read_only: bool,
    recursive: bool,
) -> libc::c_int {
    let (set, clear) = if read_only {
        (MOUNT_ATTR_RDONLY, 0)
    } else {
        (0, MOUNT_ATTR_RDONLY)
    };
    // SAFETY: the caller's contract.
    unsafe { set_attributes(path, set, clear, recursive) }
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `mount_setattr`: set and clear `MOUNT_ATTR_*` flags of the mount at
/// `path` (and every mount below it when `recursive`). Returns 0 or -1.
///
/// # Safety
/// A plain system call; callable between fork and exec.
unsafe fn set_attributes(
    path: &std::ffi::CStr,
    set: u64,
    clear: u64,
    recursive: bool,
) -> libc::c_int {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: attr is valid for its size.
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            if recursive { AT_RECURSIVE } else { 0 },
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) as libc::c_int
    }
}

/// Write all of `data` to a file that exists (async-signal-safe).
fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: open/write/close on a valid path and buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        if n != data.len() as isize {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Flags of the mount holding `path` that a remount inside a user
/// namespace must keep (they are locked).
fn locked_flags(path: &Path) -> libc::c_ulong {
    let Ok(c) = cstring(path) else {
        return 0;
    };
    // SAFETY: statvfs fills a zeroed struct.
    let flags = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_flag
    };
    let mut keep = 0;
    for (st, ms) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if flags & st != 0 {
            keep |= ms;
        }
    }
    keep
}
