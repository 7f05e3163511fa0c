//! Containment: every process a session starts lives, with all of its
//! descendants, in a container the server can kill as a whole, and that
//! dies with the server however the server dies. A `setsid` or a double
//! fork leaves a process group; it does not leave a container.
//!
//! The mechanism is chosen once, at start:
//!
//! - **cgroup v2**, when the server can create a cgroup below its own (as
//!   root, or with a delegated subtree): the server makes
//!   `exec-server-<pid>/` there and one cgroup per process below it. A
//!   child moves itself into its cgroup between `clone` and `exec`, so no
//!   descendant is ever outside it. Killing is `cgroup.kill`; the watchdog
//!   kills and removes the server's whole subtree when the server dies.
//! - **subreaper** otherwise: the server and each process it starts are
//!   child subreapers, so orphans come back up the tree instead of going
//!   to init. While a process runs, its whole tree stays below it; when it
//!   exits, the orphans that come back to the server are counted in its
//!   container. Killing stops the whole tree (SIGSTOP, scanned again until
//!   nothing new appears, so nothing can fork away), then SIGKILLs it. The
//!   watchdog does the same with every tree it was told of. Limits: a
//!   program that clears its own subreaper bit lets orphans reach the
//!   server unattributed until the next exit, and orphans of two processes
//!   that exit at the same instant can be counted in either container.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::limits::{self, Controller, Controllers, Effective};
use super::watchdog::Watchdog;
use crate::sync::lock;
use crate::sys::{parents, trees};

/// How processes are contained on this host.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// The server's own cgroup v2 subtree (this directory).
    Cgroup(PathBuf),
    /// Child subreapers and process-tree walks.
    Subreaper,
}

impl Mode {
    /// The name `environment/info` and `sandbox-check` report.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Cgroup(_) => "cgroup",
            Mode::Subreaper => "subreaper",
        }
    }
}

/// The server's containment: its mode and its watchdog.
pub struct Containment {
    mode: Mode,
    /// The cgroup controllers that enforce memory, CPU and pids limits.
    controllers: Controllers,
    watchdog: Option<Watchdog>,
    next_id: AtomicU64,
}

/// One process's container.
pub struct Container {
    kind: Kind,
    /// The cgroup v1 groups made for its limits (a hybrid host), and their
    /// `cgroup.procs` for the child to move itself in (closed once it
    /// runs).
    legacy: Vec<(Controller, PathBuf)>,
    legacy_procs: Mutex<Vec<OwnedFd>>,
}

enum Kind {
    Cgroup {
        dir: PathBuf,
        /// `cgroup.procs` of `dir`, for the child to move itself in, and
        /// `dir` itself, for a child made inside it (`CLONE_INTO_CGROUP`):
        /// needed only to start the process, closed once it runs.
        fds: Mutex<Option<(OwnedFd, OwnedFd)>>,
    },
    Tree {
        /// The process's own pid, once started.
        leader: Mutex<Option<i32>>,
        /// Orphans of the process's tree that came back to the server
        /// after the process exited; each a child of the server, so its pid
        /// can't be reused until the server reaps it.
        leftovers: Mutex<Vec<i32>>,
    },
}

/// What the child does between `clone` and `exec` for its container.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChildSetup {
    /// Write "0" here: move into the process's cgroup.
    pub cgroup_procs: Option<RawFd>,
    /// The process's cgroup directory: a child made straight inside it
    /// (`clone3` with `CLONE_INTO_CGROUP`) has no move to make, and a move
    /// can wait for an RCU grace period (about 10 ms after a quiet spell).
    pub cgroup_dir: Option<RawFd>,
    /// Write "0" to each of these too: the cgroup v1 groups of its limits.
    pub legacy_procs: [Option<RawFd>; 3],
    /// `RLIMIT_NPROC` to set once in the sandbox's user namespace, where
    /// it counts the tree alone (`pids` without a cgroup).
    pub nproc: Option<u64>,
    /// Become a child subreaper (kept across `exec`).
    pub subreaper: bool,
    /// Register with the watchdog through this pipe.
    pub watchdog: Option<RawFd>,
}

impl Containment {
    /// Choose the mechanism and fork the watchdog. Call this while the
    /// process has one thread (before the async runtime starts).
    pub fn start() -> Containment {
        let mode = match make_cgroup_root() {
            Ok(root) => Mode::Cgroup(root),
            Err(why) => {
                tracing::debug!("no cgroup containment ({why}); using child subreapers");
                // SAFETY: plain prctl.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
                Mode::Subreaper
            }
        };
        let controllers = limits::find_controllers(match &mode {
            Mode::Cgroup(root) => Some(root),
            Mode::Subreaper => None,
        });
        let watchdog = match Watchdog::start(&mode, controllers.legacy_roots()) {
            Ok(w) => Some(w),
            Err(err) => {
                tracing::warn!("no watchdog, children may outlive a killed server: {err}");
                None
            }
        };
        if let Some(w) = &watchdog {
            know(w.pid());
        }
        Containment {
            mode,
            controllers,
            watchdog,
            next_id: AtomicU64::new(1),
        }
    }

    /// Containment without a watchdog (nothing is forked), for unit tests
    /// that start no process.
    #[cfg(test)]
    pub fn for_tests() -> Containment {
        Containment {
            mode: Mode::Subreaper,
            controllers: Controllers::default(),
            watchdog: None,
            next_id: AtomicU64::new(1),
        }
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// At the server's clean exit, once every process is killed: remove its
    /// cgroup subtree and the v1 groups of limits (the watchdog does the
    /// same when the server dies, but it may itself be dead).
    pub fn release(&self) {
        if let Mode::Cgroup(root) = &self.mode {
            kill_cgroup_tree(root, std::time::Duration::from_secs(1));
        }
        for root in self.controllers.legacy_roots() {
            limits::remove_legacy(&root, std::time::Duration::from_secs(1));
        }
    }

    /// The controllers limits can use on this host.
    pub fn controllers(&self) -> &Controllers {
        &self.controllers
    }

    /// Wait until the watchdog dies, then say so at once (starts are
    /// refused from then on; see [`Containment::check`]). Never returns
    /// while it lives.
    pub async fn watch_watchdog(&self) {
        let Some(watchdog) = &self.watchdog else {
            return;
        };
        // SAFETY: a pidfd of our own child, owned here.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, watchdog.pid(), 0) };
        if fd < 0 {
            return;
        }
        // SAFETY: see above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the OwnedFd moves into the AsyncFd.
        let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register(fd) }) else {
            return;
        };
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return;
            };
            if !watchdog.alive() {
                return;
            }
            ready.clear_ready();
        }
    }

    /// Why no process can be started safely, if so: the watchdog died.
    pub fn check(&self) -> Result<(), String> {
        match &self.watchdog {
            Some(w) if !w.alive() => Err(
                "the watchdog that kills this server's processes when it dies is gone; \
                 no new process is started (restart the server)"
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    /// A new, empty container, with `limits` written into its cgroups.
    pub fn create(&self, limits: &Effective) -> io::Result<Arc<Container>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("p{id}");
        let mut legacy = Vec::new();
        let made = (|| {
            let kind = match &self.mode {
                Mode::Cgroup(root) => {
                    let dir = root.join(&name);
                    std::fs::create_dir(&dir)?;
                    let opened = limits::write_controls(
                        limits,
                        &self.controllers,
                        Some(&dir),
                        &mut legacy,
                        &name,
                    )
                    .and_then(|()| {
                        let procs = open_write(&dir.join("cgroup.procs"))?;
                        let dir_fd = std::fs::File::open(&dir)?;
                        Ok((procs, OwnedFd::from(dir_fd)))
                    });
                    let (procs, dir_fd) = match opened {
                        Ok(fds) => fds,
                        Err(err) => {
                            let _ = std::fs::remove_dir(&dir);
                            return Err(err);
                        }
                    };
                    Kind::Cgroup {
                        dir,
                        fds: Mutex::new(Some((procs, dir_fd))),
                    }
                }
                Mode::Subreaper => {
                    limits::write_controls(limits, &self.controllers, None, &mut legacy, &name)?;
                    Kind::Tree {
                        leader: Mutex::new(None),
                        leftovers: Mutex::new(Vec::new()),
                    }
                }
            };
            let procs = legacy
                .iter()
                .map(|(_, dir)| open_write(&dir.join("cgroup.procs")))
                .collect::<io::Result<Vec<OwnedFd>>>()?;
            Ok((kind, procs))
        })();
        match made {
            Ok((kind, procs)) => Ok(Arc::new(Container {
                kind,
                legacy,
                legacy_procs: Mutex::new(procs),
            })),
            Err(err) => {
                for (_, dir) in &legacy {
                    let _ = std::fs::remove_dir(dir);
                }
                Err(err)
            }
        }
    }

    /// How many processes of the container the kernel killed for memory.
    pub fn oom_kills(&self, container: &Container) -> u64 {
        let unified = match &container.kind {
            Kind::Cgroup { dir, .. } => Some(dir.as_path()),
            Kind::Tree { .. } => None,
        };
        limits::oom_kills(&self.controllers, unified, &container.legacy)
    }

    /// What a child of `container` does before exec.
    pub fn child_setup(&self, container: &Container) -> ChildSetup {
        let mut legacy_procs = [None; 3];
        for (slot, fd) in legacy_procs
            .iter_mut()
            .zip(lock(&container.legacy_procs).iter())
        {
            *slot = Some(fd.as_raw_fd());
        }
        let setup = match &container.kind {
            Kind::Cgroup { fds, .. } => {
                let fds = lock(fds);
                ChildSetup {
                    cgroup_procs: fds.as_ref().map(|(procs, _)| procs.as_raw_fd()),
                    cgroup_dir: fds.as_ref().map(|(_, dir)| dir.as_raw_fd()),
                    ..ChildSetup::default()
                }
            }
            Kind::Tree { .. } => ChildSetup {
                subreaper: true,
                watchdog: self.watchdog.as_ref().map(Watchdog::raw_fd),
                ..ChildSetup::default()
            },
        };
        ChildSetup {
            legacy_procs,
            ..setup
        }
    }

    /// Hold this while starting a child of the server, and record its pid
    /// before letting go: a child the server does not know yet would be
    /// taken for an orphan.
    pub fn starting(&self) -> Starting<'_> {
        Starting {
            registry: lock(registry()),
        }
    }

    /// The container's process was started with `pid`; `output` are the
    /// server's ends of its output.
    pub fn started(
        &self,
        container: &Container,
        pid: i32,
        output: &[RawFd],
        starting: Starting<'_>,
    ) {
        let mut registry = starting.registry;
        registry.known.insert(pid);
        drop(registry);
        if let Kind::Cgroup { fds, .. } = &container.kind {
            // The child is in its cgroup: the fds that put it there go.
            lock(fds).take();
        }
        lock(&container.legacy_procs).clear();
        if let Kind::Tree { leader, .. } = &container.kind {
            *lock(leader) = Some(pid);
            if let Some(w) = &self.watchdog {
                // A sandbox's init (pid 1 of its namespace) can't register
                // itself; registering twice is harmless.
                w.register(pid);
                w.hold(pid, output);
            }
        }
    }

    /// The container's process (`pid`) has been reaped: in subreaper mode,
    /// the orphans its tree left now belong to the server; count them in
    /// this container.
    pub fn leader_reaped(&self, container: &Arc<Container>, pid: i32) {
        let mut registry = lock(registry());
        registry.known.remove(&pid);
        if let Kind::Tree { leader, .. } = &container.kind {
            *lock(leader) = None;
            if let Some(w) = &self.watchdog {
                w.unregister(pid);
            }
            self.adopt(&mut registry, container);
        }
    }

    /// Count every child of the server nobody knows in `owner`.
    fn adopt(&self, registry: &mut Registry, owner: &Arc<Container>) {
        let Kind::Tree { leftovers, .. } = &owner.kind else {
            return;
        };
        for pid in own_children() {
            if registry.known.contains(&pid) || registry.adopted.contains_key(&pid) {
                continue;
            }
            registry.adopted.insert(pid, Arc::downgrade(owner));
            lock(leftovers).push(pid);
            if let Some(w) = &self.watchdog {
                w.register(pid);
            }
        }
    }

    /// In subreaper mode, reap adopted orphans that have exited (they are
    /// the server's children now), counting what they leave behind in the
    /// same container. Call on every SIGCHLD.
    pub fn reap_orphans(&self) {
        if self.mode != Mode::Subreaper {
            return;
        }
        let mut registry = lock(registry());
        loop {
            let adopted: Vec<(i32, Weak<Container>)> = registry
                .adopted
                .iter()
                .map(|(p, c)| (*p, c.clone()))
                .collect();
            let mut changed = false;
            for (pid, owner) in adopted {
                let mut status = 0;
                // SAFETY: waits for a child of ours without blocking.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
                    continue;
                }
                changed = true;
                registry.adopted.remove(&pid);
                if let Some(w) = &self.watchdog {
                    w.unregister(pid);
                }
                match owner.upgrade() {
                    Some(owner) => {
                        if let Kind::Tree { leftovers, .. } = &owner.kind {
                            lock(leftovers).retain(|&p| p != pid);
                        }
                        self.adopt(&mut registry, &owner);
                    }
                    None => {
                        // Nobody owns what it left: kill it.
                        let strays: Vec<i32> = own_children()
                            .into_iter()
                            .filter(|p| !registry.known.contains(p))
                            .filter(|p| !registry.adopted.contains_key(p))
                            .collect();
                        stop_and_kill(&strays);
                    }
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// Kill everything in the container.
    pub fn kill(&self, container: &Container) {
        match &container.kind {
            Kind::Cgroup { dir, .. } => {
                let kill = dir.join("cgroup.kill");
                if let Err(err) = crate::sys::at_descriptor_limit(|| std::fs::write(&kill, "1")) {
                    tracing::warn!("failed to kill cgroup {}: {err}", dir.display());
                }
            }
            Kind::Tree { leader, leftovers } => {
                // The registry lock keeps the reaper from reaping (and so
                // freeing) any of these pids while they are signalled.
                let _registry = lock(registry());
                let mut roots: Vec<i32> = lock(leftovers).clone();
                roots.extend(*lock(leader));
                stop_and_kill(&roots);
            }
        }
    }

    /// Whether nothing is left running in the container (the process
    /// itself may still be unreaped).
    pub fn is_empty(&self, container: &Container) -> bool {
        match &container.kind {
            Kind::Cgroup { dir, .. } => std::fs::read_to_string(dir.join("cgroup.events"))
                .map(|events| events.lines().any(|l| l == "populated 0"))
                .unwrap_or(true),
            Kind::Tree { leftovers, .. } => lock(leftovers).is_empty(),
        }
    }

    /// Let go of an empty container (its cgroup is removed).
    pub fn remove(&self, container: &Container) {
        if let Kind::Cgroup { dir, .. } = &container.kind {
            if let Err(err) = std::fs::remove_dir(dir) {
                tracing::debug!("cgroup {} not removed: {err}", dir.display());
            }
        }
        for (_, dir) in &container.legacy {
            limits::remove_legacy(dir, std::time::Duration::from_millis(100));
        }
    }
}

/// Proof that the registry is held while a child is started.
pub struct Starting<'a> {
    registry: MutexGuard<'a, Registry>,
}

/// The server's own children, as the server sees them.
#[derive(Default)]
struct Registry {
    /// Children the server started itself: processes, helpers, the
    /// watchdog.
    known: HashSet<i32>,
    /// Orphans that came back to the server, with the container each is
    /// counted in.
    adopted: HashMap<i32, Weak<Container>>,
}

/// One per server process: the children of a process are the process's.
fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: std::sync::LazyLock<Mutex<Registry>> =
        std::sync::LazyLock::new(|| Mutex::new(Registry::default()));
    &REGISTRY
}

/// Record a child the server started by other means (a helper), so it is
/// never taken for an orphan; [`forget`] it once reaped.
pub fn know(pid: i32) {
    lock(registry()).known.insert(pid);
}

pub fn forget(pid: i32) {
    lock(registry()).known.remove(&pid);
}

/// Run `spawn` with the registry held and record the pid it returns.
pub fn spawn_known<T>(
    spawn: impl FnOnce() -> io::Result<T>,
    pid: impl Fn(&T) -> i32,
) -> io::Result<T> {
    let mut registry = lock(registry());
    let child = spawn()?;
    registry.known.insert(pid(&child));
    Ok(child)
}

/// What `exec-server sandbox-check` says of containment on this host: the
/// mechanism a server started now would use, and why.
pub fn describe_host() -> String {
    let (mut text, root) = match make_cgroup_root() {
        Ok(root) => (
            format!(
                "containment: cgroup v2 (a cgroup per process under {}; cgroup.kill)\n",
                root.parent().unwrap_or(&root).display()
            ),
            Some(root),
        ),
        Err(why) => (
            format!(
                "containment: child subreapers ({why}); a cgroup below the server's own, \
                 delegated to its user, makes containment exact\n"
            ),
            None,
        ),
    };
    let controllers = limits::find_controllers(root.as_deref());
    let user_namespace = crate::sandbox::needs_user_namespace();
    text.push_str(&format!(
        "limits: {} enforced; sandboxed: {}\n",
        controllers.enforced().join(", "),
        controllers.enforced_sandboxed(user_namespace).join(", ")
    ));
    for legacy in controllers.legacy_roots() {
        let _ = std::fs::remove_dir(&legacy);
    }
    if let Some(root) = root {
        let _ = std::fs::remove_dir(&root);
    }
    text
}

/// Make the server's cgroup subtree, or say why not.
fn make_cgroup_root() -> Result<PathBuf, String> {
    let mount = cgroup2_mount().ok_or("no cgroup v2 hierarchy is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2")?;
    let (mount_point, mount_root) = mount;
    let relative = own
        .strip_prefix(mount_root.as_str())
        .unwrap_or(own)
        .trim_start_matches('/');
    let base = mount_point.join(relative);
    let root = base.join(format!("exec-server-{}", std::process::id()));
    std::fs::create_dir(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    if !root.join("cgroup.kill").exists() {
        let _ = std::fs::remove_dir(&root);
        return Err("the kernel has no cgroup.kill (Linux 5.14 is needed)".into());
    }
    Ok(root)
}

/// The cgroup v2 mount point and the cgroup path at its root.
fn cgroup2_mount() -> Option<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split(' ').collect();
        Some((PathBuf::from(fields.get(4)?), fields.get(3)?.to_string()))
    })
}

fn open_write(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string; the fd is fresh and owned here.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Kill and remove a cgroup subtree: `cgroup.kill`, wait (up to `wait`)
/// until nothing is left, then remove every directory, deepest first.
pub fn kill_cgroup_tree(root: &Path, wait: std::time::Duration) {
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        let populated = std::fs::read_to_string(root.join("cgroup.events"))
            .map(|e| e.lines().any(|l| l == "populated 1"))
            .unwrap_or(false);
        if !populated {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    remove_tree(root);
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The pids of this process's children (of all its threads).
fn own_children() -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}

/// Kill the trees rooted at `roots` so that nothing escapes: stop every
/// process found (a stopped process can't fork or exit), look again until
/// no new one appears, then SIGKILL them all.
pub fn stop_and_kill(roots: &[i32]) {
    let roots: Vec<i32> = roots.iter().copied().filter(|&p| p > 1).collect();
    if roots.is_empty() {
        return;
    }
    let mut stopped: HashSet<i32> = HashSet::new();
    for _ in 0..64 {
        let parents = match crate::sys::at_descriptor_limit(parents) {
            Ok(parents) => parents,
            Err(err) => {
                // No descriptor to look with: the roots and their process
                // groups at least.
                tracing::warn!("could not look for the descendants to kill: {err}");
                for &pid in &roots {
                    // SAFETY: plain syscalls.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
                break;
            }
        };
        let new: Vec<i32> = trees(&roots, &parents)
            .into_iter()
            .filter(|p| !stopped.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in new {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            stopped.insert(pid);
        }
    }
    for pid in stopped {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_follow_parents_from_the_roots_only() {
        let parents = [(10, 1), (11, 10), (12, 11), (20, 1), (21, 20), (13, 10)];
        let mut found = trees(&[10], &parents);
        found.sort();
        assert_eq!(found, [10, 11, 12, 13]);
        assert_eq!(trees(&[99], &parents), Vec::<i32>::new());
    }
}
