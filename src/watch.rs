//! `fs/watch`: changes under a path, pushed as `fs/changed` notifications
//! and kept, for a session that comes back, in a bounded buffer read with
//! `fs/readChanges`.
//!
//! Straight on inotify (one instance per watch, read through the runtime):
//! the `notify` crate would add a thread and a dependency tree to do what
//! a hundred lines of `inotify_add_watch` and a parser do here, and hides
//! the queue overflow this must report.
//!
//! - Events of a window ([`WINDOW`]) go out together as one notification
//!   with the next `seq` of the watch. Within a window, repeated
//!   `modified` of a path, and `modified` of a path just `created`, are
//!   one event; nothing else is merged.
//! - A move within the tree is one `renamed` (`path`, `toPath`); out of
//!   it, `removed`; into it, `created`.
//! - Bounds: at most [`MAX_WATCHES`] watches per session, each of at
//!   most [`MAX_DIRECTORIES`] directories; at most
//!   `maxQueuedEvents` (default and ceiling [`MAX_QUEUED`]) events waiting
//!   in a window, past which one `overflow` event stands for what was
//!   dropped (as it does for the kernel's own queue overflow, or a
//!   directory the host's watch limit kept out); the last
//!   [`RETAINED_EVENTS`] events are kept for `fs/readChanges`.
//! - With a `sandbox`, only what its policy lets the process read is
//!   watched and reported: the path is resolved first, links are not
//!   followed into other directories, and every reported path is checked
//!   against the policy (by the server, not by a kernel sandbox).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::jsonrpc::Outgoing;
use crate::process::Attachment;
use crate::protocol::path_to_uri;
use crate::sandbox::policy::{Grant, Rules};
use crate::sync::lock;

/// How long events gather before they go out together.
pub const WINDOW: Duration = Duration::from_millis(50);
/// Watches one session may hold.
pub const MAX_WATCHES: usize = 64;
/// Events one window may hold (the default and the most a client may
/// ask for with `maxQueuedEvents`).
pub const MAX_QUEUED: usize = 65_536;
/// Directories one watch may watch (the host's inotify watches are
/// shared by every watcher of the user).
pub const MAX_DIRECTORIES: usize = 65_536;
/// Events kept per watch for `fs/readChanges`.
pub const RETAINED_EVENTS: usize = 65_536;

/// The method names.
pub const FS_WATCH: &str = "fs/watch";
pub const FS_UNWATCH: &str = "fs/unwatch";
pub const FS_READ_CHANGES: &str = "fs/readChanges";
pub const FS_CHANGED: &str = "fs/changed";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchParams {
    pub path: crate::protocol::WirePath,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default)]
    pub max_queued_events: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchIdParams {
    pub watch_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadChangesParams {
    pub watch_id: String,
    #[serde(default)]
    pub after_seq: u64,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Created(PathBuf),
    Modified(PathBuf),
    Removed(PathBuf),
    Renamed(PathBuf, PathBuf),
    Overflow,
}

impl Change {
    fn to_json(&self) -> Value {
        match self {
            Change::Created(p) => json!({"kind": "created", "path": path_to_uri(p)}),
            Change::Modified(p) => json!({"kind": "modified", "path": path_to_uri(p)}),
            Change::Removed(p) => json!({"kind": "removed", "path": path_to_uri(p)}),
            Change::Renamed(p, to) => {
                json!({"kind": "renamed", "path": path_to_uri(p), "toPath": path_to_uri(to)})
            }
            Change::Overflow => json!({"kind": "overflow"}),
        }
    }
}

/// The watches of one session.
pub struct Watches {
    all: Mutex<HashMap<String, Arc<Watch>>>,
    next_id: AtomicU64,
    attachment: Attachment,
}

/// One watch: its retained batches, and the task reading it.
pub struct Watch {
    retained: Mutex<Retained>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct Retained {
    next_seq: u64,
    /// (seq, events) of the notifications sent, oldest first.
    batches: VecDeque<(u64, Arc<Value>)>,
    events: usize,
    /// The newest seq evicted.
    evicted_through: u64,
}

impl Watches {
    pub fn new(attachment: Attachment) -> Arc<Watches> {
        Arc::new(Watches {
            all: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            attachment,
        })
    }

    /// `fs/watch`, first half (blocking: a recursive watch walks the
    /// tree): check, and watch what the request names.
    pub fn prepare(&self, params: WatchParams, rules: Option<Rules>) -> Result<Prepared> {
        let max_queued = params.max_queued_events.unwrap_or(MAX_QUEUED);
        if !(1..=MAX_QUEUED).contains(&max_queued) {
            return Err(Error::InvalidParams(format!(
                "maxQueuedEvents must be from 1 to {MAX_QUEUED}, got {max_queued}"
            )));
        }
        if lock(&self.all).len() >= MAX_WATCHES {
            return Err(Error::InvalidRequest(format!(
                "this session has {MAX_WATCHES} watches, the most it may have; fs/unwatch one first"
            )));
        }
        let given = params.path.0;
        let root = std::fs::canonicalize(&given)
            .map_err(|e| crate::error::fs_error(format!("cannot watch {}", given.display()), &e))?;
        if let Some(rules) = &rules {
            if !readable(rules, &root) {
                return Err(Error::PermissionDenied {
                    message: format!(
                        "the sandbox does not let this process read {}",
                        given.display()
                    ),
                    errno: Some(libc::EACCES),
                });
            }
        }
        let mut reader = Reader::new(root, params.recursive, rules, max_queued)?;
        reader.start()?;
        Ok(Prepared(reader))
    }

    /// `fs/watch`, second half (in the runtime): start reading; the new
    /// watch's id.
    pub fn add(&self, prepared: Prepared) -> Result<String> {
        let reader = prepared.0;
        if lock(&self.all).len() >= MAX_WATCHES {
            return Err(Error::InvalidRequest(format!(
                "this session has {MAX_WATCHES} watches, the most it may have; fs/unwatch one first"
            )));
        }
        let id = format!("w{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let watch = Arc::new(Watch {
            retained: Mutex::new(Retained {
                next_seq: 1,
                ..Retained::default()
            }),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(run(
            reader,
            watch.clone(),
            id.clone(),
            self.attachment.clone(),
        ));
        *lock(&watch.task) = Some(task);
        lock(&self.all).insert(id.clone(), watch);
        Ok(id)
    }

    /// `fs/unwatch`.
    pub fn remove(&self, id: &str) -> Result<()> {
        let watch = lock(&self.all).remove(id).ok_or_else(|| unknown(id))?;
        watch.stop();
        Ok(())
    }

    /// `fs/readChanges`: the retained notifications after `after_seq`.
    pub fn read(&self, id: &str, after_seq: u64) -> Result<Value> {
        let watch = lock(&self.all)
            .get(id)
            .cloned()
            .ok_or_else(|| unknown(id))?;
        let retained = lock(&watch.retained);
        let changes: Vec<Value> = retained
            .batches
            .iter()
            .filter(|(seq, _)| *seq > after_seq)
            .map(|(seq, events)| json!({"seq": seq, "events": &**events}))
            .collect();
        Ok(json!({
            "changes": changes,
            "nextSeq": retained.next_seq,
            "truncated": after_seq < retained.evicted_through,
        }))
    }

    /// Stop every watch (the session ended).
    pub fn stop_all(&self) {
        for (_, watch) in lock(&self.all).drain() {
            watch.stop();
        }
    }
}

fn unknown(id: &str) -> Error {
    Error::NotFound {
        message: format!("unknown watch {id}"),
        errno: None,
    }
}

impl Watch {
    fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// Whether `rules` let a process read `path` (the longest rule that is an
/// ancestor of it decides; hidden paths never).
fn readable(rules: &Rules, path: &Path) -> bool {
    if rules.hidden.iter().any(|h| path.starts_with(h)) {
        return false;
    }
    let Some(fs) = &rules.fs else {
        return true;
    };
    fs.iter()
        .filter(|(p, _)| path.starts_with(p))
        .max_by_key(|(p, _)| p.as_os_str().len())
        .is_some_and(|(_, g)| *g != Grant::Deny)
}

/// A watch made and not yet reading.
pub struct Prepared(Reader);

/// The inotify side of a watch.
struct Reader {
    fd: OwnedFd,
    root: PathBuf,
    recursive: bool,
    rules: Option<Rules>,
    max_queued: usize,
    /// Watch descriptor -> the directory (or file) it watches.
    paths: HashMap<i32, PathBuf>,
    pending: Vec<Change>,
    overflowed: bool,
    created: HashSet<PathBuf>,
    modified: HashSet<PathBuf>,
    /// A `moved from` waiting for its `moved to` (cookie, path, a dir).
    moving: Option<(u32, PathBuf, bool)>,
    /// What `read` reads into, kept between reads.
    buf: Vec<u8>,
}

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_DONT_FOLLOW
    | libc::IN_EXCL_UNLINK;

impl Reader {
    fn new(
        root: PathBuf,
        recursive: bool,
        rules: Option<Rules>,
        max_queued: usize,
    ) -> Result<Reader> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::io(
                "cannot start a watch (the host's inotify instance limit, \
                 fs.inotify.max_user_instances, may be reached)",
                &err,
            ));
        }
        // SAFETY: a fresh fd, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Reader {
            fd,
            root,
            recursive,
            rules,
            max_queued,
            paths: HashMap::new(),
            pending: Vec::new(),
            overflowed: false,
            created: HashSet::new(),
            modified: HashSet::new(),
            moving: None,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn allowed(&self, path: &Path) -> bool {
        self.rules.as_ref().is_none_or(|r| readable(r, path))
    }

    /// Watch the root (and, recursively, every directory below it).
    fn start(&mut self) -> Result<()> {
        let root = self.root.clone();
        self.add(&root)
            .map_err(|e| Error::io(format!("cannot watch {}", root.display()), &e))?;
        if self.recursive && root.is_dir() {
            let mut errors = 0;
            self.add_below(&root, false, &mut errors);
            if errors > 0 {
                return Err(Error::Internal {
                    message: format!(
                        "cannot watch every directory under {} (at most {MAX_DIRECTORIES} per \
                         watch, and the host's inotify watch limit, fs.inotify.max_user_watches, \
                         may be reached)",
                        root.display()
                    ),
                    errno: None,
                });
            }
        }
        Ok(())
    }

    fn add(&mut self, path: &Path) -> std::io::Result<()> {
        if self.paths.len() >= MAX_DIRECTORIES {
            // The user's inotify watches are shared by all its watchers.
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid C string and our inotify fd.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.paths.insert(wd, path.to_path_buf());
        Ok(())
    }

    /// Watch the directories below `dir` (not following links); with
    /// `report`, say `created` for everything found (it appeared before
    /// its directory was watched).
    fn add_below(&mut self, dir: &Path, report: bool, errors: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !self.allowed(&path) {
                continue;
            }
            if report {
                self.push(Change::Created(path.clone()));
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if self.add(&path).is_err() {
                    *errors += 1;
                    continue;
                }
                self.add_below(&path, report, errors);
            }
        }
    }

    fn push(&mut self, change: Change) {
        if self.overflowed {
            // The window has said it lost some: nothing more is kept.
            return;
        }
        match &change {
            Change::Created(p) => {
                if !self.created.insert(p.clone()) {
                    return;
                }
            }
            Change::Modified(p) => {
                if self.created.contains(p) || !self.modified.insert(p.clone()) {
                    return;
                }
            }
            Change::Removed(p) | Change::Renamed(p, _) => {
                self.created.remove(p);
                self.modified.remove(p);
            }
            Change::Overflow => {}
        }
        if self.pending.len() >= self.max_queued || change == Change::Overflow {
            self.pending.push(Change::Overflow);
            self.overflowed = true;
            return;
        }
        self.pending.push(change);
    }

    /// The window's events, and a fresh window.
    fn take(&mut self) -> Vec<Change> {
        if let Some((_, path, _)) = self.moving.take() {
            self.push(Change::Removed(path));
        }
        self.created.clear();
        self.modified.clear();
        self.overflowed = false;
        std::mem::take(&mut self.pending)
    }

    /// Read what the kernel has; false when the watch can't go on.
    fn read(&mut self) -> bool {
        let mut buf = std::mem::take(&mut self.buf);
        let going = self.read_into(&mut buf);
        self.buf = buf;
        going
    }

    fn read_into(&mut self, buf: &mut [u8]) -> bool {
        loop {
            // SAFETY: reads into a buffer we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                return match err.kind() {
                    std::io::ErrorKind::WouldBlock => true,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => false,
                };
            }
            let n = n as usize;
            let mut at = 0;
            while at + 16 <= n {
                let field = |i: usize| {
                    u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap_or([0; 4]))
                };
                let wd = field(0) as i32;
                let mask = field(4);
                let cookie = field(8);
                let len = field(12) as usize;
                let name_bytes = &buf[at + 16..(at + 16 + len).min(n)];
                let end = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len());
                let name = std::ffi::OsStr::from_bytes(&name_bytes[..end]).to_owned();
                at += 16 + len;
                self.event(wd, mask, cookie, &name);
            }
        }
    }

    fn event(&mut self, wd: i32, mask: u32, cookie: u32, name: &std::ffi::OsStr) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            self.push(Change::Overflow);
            if self.recursive {
                // Directories made meanwhile went unseen: watch them now
                // (watching one twice is harmless), so that what follows
                // is seen again.
                let root = self.root.clone();
                let mut errors = 0;
                self.add_below(&root, false, &mut errors);
            }
            return;
        }
        if mask & libc::IN_IGNORED != 0 {
            self.paths.remove(&wd);
            return;
        }
        let Some(dir) = self.paths.get(&wd).cloned() else {
            return;
        };
        let is_dir = mask & libc::IN_ISDIR != 0;
        // A move's two halves come one after the other; anything else
        // between them means the other half is outside the tree.
        if mask & libc::IN_MOVED_TO == 0 {
            if let Some((_, from, _)) = self.moving.take() {
                self.push(Change::Removed(from));
            }
        }
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
            if dir == self.root {
                self.push(Change::Removed(dir));
            }
            return;
        }
        let path = if name.is_empty() {
            dir.clone()
        } else {
            dir.join(name)
        };
        if !self.allowed(&path) {
            return;
        }
        if mask & libc::IN_CREATE != 0 {
            self.push(Change::Created(path.clone()));
            if is_dir && self.recursive {
                self.watch_new_dir(&path);
            }
        } else if mask & libc::IN_MODIFY != 0 {
            self.push(Change::Modified(path));
        } else if mask & libc::IN_DELETE != 0 {
            self.push(Change::Removed(path));
        } else if mask & libc::IN_MOVED_FROM != 0 {
            self.moving = Some((cookie, path, is_dir));
        } else if mask & libc::IN_MOVED_TO != 0 {
            match self.moving.take() {
                Some((c, from, _)) if c == cookie => {
                    if is_dir {
                        // Its watches now watch the new place.
                        for p in self.paths.values_mut() {
                            if let Ok(rest) = p.strip_prefix(&from) {
                                *p = path.join(rest);
                            }
                        }
                    }
                    self.push(Change::Renamed(from, path));
                }
                other => {
                    if let Some((_, from, _)) = other {
                        self.push(Change::Removed(from));
                    }
                    self.push(Change::Created(path.clone()));
                    if is_dir && self.recursive {
                        self.watch_new_dir(&path);
                    }
                }
            }
        }
    }

    fn watch_new_dir(&mut self, path: &Path) {
        let mut errors = 0;
        if self.add(path).is_err() {
            errors += 1;
        } else {
            self.add_below(path, true, &mut errors);
        }
        if errors > 0 {
            // Changes under it can't be seen: the client must look.
            self.push(Change::Overflow);
        }
    }
}

/// A watch's task: read, gather a window, send, retain.
async fn run(mut reader: Reader, watch: Arc<Watch>, id: String, attachment: Attachment) {
    let shared_id: Arc<str> = Arc::from(id.as_str());
    // SAFETY: the reader owns the fd and outlives this registration (it is
    // dropped after `fd`, declared later).
    let Ok(fd) = (unsafe { AsyncFd::register(reader.fd.as_raw_fd()) }) else {
        tracing::warn!(watch = %id, "a watch could not be registered with the runtime");
        return;
    };
    loop {
        // Wait for the first event of a window.
        match fd.readable().await {
            Ok(mut ready) => {
                ready.clear_ready();
                if !reader.read() {
                    return;
                }
            }
            Err(_) => return,
        }
        if reader.pending.is_empty() && reader.moving.is_none() {
            continue;
        }
        // Gather the rest of the window.
        let until = tokio::time::Instant::now() + WINDOW;
        while let Ok(Ok(mut ready)) = tokio::time::timeout_at(until, fd.readable()).await {
            ready.clear_ready();
            if !reader.read() {
                break;
            }
        }
        let changes = reader.take();
        if changes.is_empty() {
            continue;
        }
        send(&watch, &shared_id, &attachment, changes).await;
    }
}

/// Number and retain one window's changes, and notify the attached
/// connection (waiting for room: meanwhile the kernel queues, and says
/// so if it overflows).
async fn send(watch: &Watch, id: &Arc<str>, attachment: &Attachment, changes: Vec<Change>) {
    let events = Arc::new(Value::Array(changes.iter().map(Change::to_json).collect()));
    let tx = lock(attachment)
        .connection
        .as_ref()
        .map(|(_, tx)| tx.clone());
    let permit = match tx {
        Some(tx) => tx.reserve().await,
        None => None,
    };
    let mut retained = lock(&watch.retained);
    let seq = retained.next_seq;
    retained.next_seq += 1;
    retained.events += changes.len();
    retained.batches.push_back((seq, events.clone()));
    while retained.events > RETAINED_EVENTS && retained.batches.len() > 1 {
        if let Some((old_seq, old)) = retained.batches.pop_front() {
            retained.events -= old.as_array().map_or(0, Vec::len);
            retained.evicted_through = old_seq;
        }
    }
    if let Some(permit) = permit {
        permit.send(Outgoing::Notification {
            method: FS_CHANGED,
            params: json!({"watchId": &**id, "seq": seq, "events": &*events}),
        });
    }
}
